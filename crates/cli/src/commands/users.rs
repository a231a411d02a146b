//! `br2k users NAME`: the paper's users against a deployed service.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use br2k_resolver::{Resolver, ResolverConfig};
use br2k_testbed::deployed::{self, DisasterPlan, UsersConfig};
use clap::Args;

use super::{ChecksFailed, GlobalOpts};

const USERS_EXAMPLES: &str = "\
Examples:
  br2k users logserver --users 3 --requests 60                 # prints what the users saw
  br2k users logserver --claim-after 3 --check-local           # claims when it is dead; Table 2 at the end
  br2k users logserver --disaster-at 20 --check-local           # a total disaster drill (see below)

With a key (ETH_PRIVATE_KEY or --keystore) a user whose requests keep failing files a
claim, so the service's manager (`br2k manager run`) recovers it; without one, nobody claims.

--disaster-at S is a drill for the worst case, on a service this machine runs: S seconds
in, every replica, etcd member and their runner are killed and the runner's state
directory (every replica's data) is deleted. Only the backup recorded on chain can bring
the service back: a user claims, the manager redeploys, the replicas restore it. With
--check-local the report then says how many acknowledged requests the disaster took
(those after the recorded backup) and fails if any was acknowledged more than the backup
interval before it. It needs a key, so that a user can claim, and a running manager.";

/// Send requests to a deployed service as the paper's users do: each user its own id, a
/// steady rate, through the registry and the failover client (following leader changes,
/// retrying with the same idempotency key, claiming when nothing answers). With
/// --check-local, the replicas this machine runs are then checked: every acknowledged
/// request in the log exactly once, every replica identical, and the paper's Table 2.
#[derive(Args, Debug)]
#[command(after_help = USERS_EXAMPLES)]
pub(crate) struct UsersArgs {
    /// The service name.
    name: String,

    /// Users, each with its own id.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    users: u64,

    /// Requests each user sends.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,

    /// Requests per second each user sends.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,

    /// Seconds a user keeps retrying one request before giving up on it.
    #[arg(long, value_name = "SECONDS", default_value_t = 180)]
    give_up_after: u64,

    /// Failed attempts within a minute after which a user files a claim (needs a key); 0 never.
    #[arg(long, value_name = "N", default_value_t = 5)]
    claim_after: u32,

    /// Afterwards, check the replicas this machine runs (`br2k deploy --context local`).
    #[arg(long)]
    check_local: bool,

    /// Seconds after the start to kill every local replica and delete all their data (a
    /// total disaster drill; needs a key and a running manager).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    disaster_at: Option<u64>,

    /// The local runner's state directory [default: <tmp>/br2k-UID/up/NAME].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

impl UsersArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1000.0) {
            anyhow::bail!("--rate must be above 0 and at most 1000 requests/s, not {}", self.rate);
        }
        let signer = global.wallet.signer()?;
        let claim_after = if signer.is_some() { self.claim_after } else { 0 };
        if self.disaster_at.is_some() && claim_after == 0 {
            anyhow::bail!(
                "--disaster-at needs users who claim: give a key (ETH_PRIVATE_KEY or --keystore) and a --claim-after \
                 above 0, and run the service's manager (`br2k manager run`), or nothing brings the service back"
            );
        }
        let disaster = match self.disaster_at {
            Some(seconds) => Some(DisasterPlan {
                at: Duration::from_secs(seconds),
                state_dir: super::up::state_dir(&self.name, self.state_dir.clone())?,
            }),
            None => None,
        };
        let registry = global.registry.open(&global.chain.connect(signer).await?, &out).await?;
        let resolver = Resolver::new(
            registry,
            ResolverConfig { poll_interval: Duration::from_millis(200), ..ResolverConfig::default() },
        );
        let config = UsersConfig {
            service: self.name.clone(),
            users: usize::try_from(self.users)?,
            requests_per_user: self.requests,
            rate: self.rate,
            give_up_after: Duration::from_secs(self.give_up_after),
            claim_after,
            disaster,
        };
        let progress = |line: &str| out.progress(format_args!("users: {line}"));
        out.progress(format_args!(
            "users: {} users x {} requests at {}/s to {}{}",
            self.users,
            self.requests,
            self.rate,
            self.name,
            if claim_after > 0 { format!("; a claim after {claim_after} failures") } else { String::new() }
        ));
        let run = deployed::run_users(resolver, &config, &progress).await?;
        progress(&format!(
            "done in {:.1} s: {} acknowledged, {} given up, {} claim(s) filed",
            run.end_ms as f64 / 1000.0,
            run.acks.len(),
            run.unacknowledged.len(),
            run.claims
        ));
        if !self.check_local {
            return out.result(
                &format!("{} acknowledged, {} not", run.acks.len(), run.unacknowledged.len()),
                &serde_json::json!({
                    "acknowledged": run.acks.len(), "unacknowledged": run.unacknowledged, "claims": run.claims,
                    "elapsedMs": run.end_ms, "disaster": run.disaster,
                }),
            );
        }
        let dir = super::up::state_dir(&self.name, self.state_dir)?;
        let (findings, markdown) = deployed::check_local(&dir, &config, &run, &progress).await?;
        out.result(&markdown, &serde_json::to_value(&findings)?)?;
        if findings.passed() { Ok(()) } else { Err(ChecksFailed.into()) }
    }
}
