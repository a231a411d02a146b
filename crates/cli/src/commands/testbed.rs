//! `br2k testbed`: the paper's evaluation (section IV, Table 2) under real faults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use br2k_testbed::chain::{ChainFault, ChainSettings};
use br2k_testbed::{FaultKind, Target, TestbedConfig};
use clap::Args;

use super::GlobalOpts;
use crate::opts::LocalReplicaOpts;

const EXAMPLES: &str = "\
Examples:
  br2k testbed --fault partition --target leader --requests 200      # a short leader test
  br2k testbed --fault pause --target random --interval 5..10 --duration 3
  br2k testbed --workload payments --fault kill --target leader --requests 100   # payouts under faults
  br2k testbed --fault disk-full --target random --requests 2000 --interval 20..30 --duration 10   # full disks
  # payouts on a chain like a real one: 2 s blocks, 3 confirmations, leader kills, and
  # reorgs of 2 blocks every 15-30 s (mined payouts dropped before they are deep enough):
  br2k testbed --workload payments --fault kill --block-time 2 --confirmations 3 --in-flight 8 \
    --chain-fault reorg --chain-interval 15..30 --requests 200
  # three RPC endpoints for the outbox, one of them hanging for 20 s every 20-30 s:
  br2k testbed --workload payments --fault none --block-time 2 --confirmations 3 --rpc-endpoints 3 \
    --chain-fault rpc --chain-interval 20..30 --duration 20 --requests 200
  # the paper's scale (5 x 10,000 requests at 2/s: about 85 minutes per test):
  br2k testbed --users 5 --requests 10000 --rate 2 --target leader --interval 120..140 --duration 20
  br2k testbed --users 5 --requests 10000 --rate 2 --target random --interval 60..120 --duration 20

Partition faults cut a node's network link for real, which needs root (each node runs in
its own network namespace), as do disk-full faults (each node's data directory is a small
tmpfs of its own; the report says how long the full node was unhealthy); pause and kill
faults run as any user. Exit status 0 when
every check passed; 1 when an acknowledged request was lost or answered wrongly, a
request was duplicated or the replicas differ (the report says which), or when the run
could not be carried out (the error says why).";

/// Run the paper's evaluation: a replicated log server on this machine, users sending
/// requests through the registry, an attacker breaking nodes; then check that no
/// acknowledged request was lost or duplicated and every replica is identical, and print
/// the paper's Table 2 for the run.
#[derive(Args, Debug)]
#[command(after_help = EXAMPLES)]
pub(crate) struct TestbedArgs {
    /// Users, each with its own id.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    users: u64,

    /// Requests each user sends.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,

    /// Requests per second each user sends (the paper: 2).
    #[arg(long, default_value_t = 2.0)]
    rate: f64,

    /// What the users do: `log` (the paper's log server) or `payments` (the payment
    /// service: payouts through the transaction outbox and deposits verified on chain; the
    /// checker reads the chain itself).
    #[arg(long, default_value = "log", value_parser = ["log", "payments"])]
    workload: String,

    /// The fault: partition (cut the network link), pause (SIGSTOP, then SIGCONT), kill
    /// (SIGKILL, then restart), wipe (SIGKILL, all the node's data deleted, then restart
    /// empty: it catches up from a peer's snapshot), disk-full (the node's app data
    /// directory, a small tmpfs of its own, filled until writes fail, then given room
    /// again), etcd-disk-full (the same for its etcd data directory), replace (the node
    /// replaced by a fresh one while it runs: a membership change, the old node's etcd
    /// member removed and a new node added as a learner, caught up and promoted; log
    /// workload only), or none.
    #[arg(long, default_value = "partition")]
    fault: FaultKind,

    /// Instead of a fault: the scale drill, 3 replicas grown to 5 and shrunk back to 3
    /// while the users send requests, one membership change after each --interval wait
    /// (a node added as a learner, caught up and promoted; the --target node removed,
    /// leadership moved off it first). Log workload only.
    #[arg(long, conflicts_with = "fault")]
    scale_drill: bool,

    /// Which node is hit: the current leader, or a random node.
    #[arg(long, default_value = "leader")]
    target: Target,

    /// Seconds between two faults, drawn anew each time from LO..HI.
    #[arg(long, value_name = "LO..HI", default_value = "20..40", value_parser = parse_range)]
    interval: (Duration, Duration),

    /// Seconds each fault lasts (the paper: 20).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    duration: f64,

    /// Seed of the attacker's random choices [default: from the clock; printed].
    #[arg(long)]
    seed: Option<u64>,

    /// Give up on a request after this many seconds of failing over.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    give_up_after: u64,

    /// Requests each user keeps waiting for their answers at once (payments only; a payout
    /// is answered once it is deep enough, seconds on a chain with a block time).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    in_flight: u64,

    /// Seconds between blocks of the run's chain, as on a real chain (payments only)
    /// [default: a block per transaction, at once].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=60))]
    block_time: Option<u64>,

    /// Blocks a payout must be under before it counts as paid (payments only; the payment
    /// service's --confirmations).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    confirmations: u64,

    /// RPC endpoints the payment service's outbox is given, each a relay to the chain
    /// (payments only; broadcasts go to all, reads to the first that answers).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    rpc_endpoints: u64,

    /// A fault of the chain, struck beside --fault (payments only): reorg (the last
    /// confirmations-1 blocks replaced: payouts mined but not yet deep enough leave the
    /// chain), deep-reorg (the last confirmations+1 replaced: payouts answered as paid leave
    /// it, which the service must detect and repair), or rpc (one of --rpc-endpoints stops
    /// answering for --duration).
    #[arg(long, value_name = "FAULT")]
    chain_fault: Option<ChainFault>,

    /// Seconds between two chain faults, drawn anew each time from LO..HI.
    #[arg(long, value_name = "LO..HI", default_value = "20..40", value_parser = parse_range)]
    chain_interval: (Duration, Duration),

    /// Keep the nodes' data and logs here (default: a temporary directory, removed at the end;
    /// a payments run also leaves the chain's final state and every acknowledged payout there).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,

    /// Also write the report as JSON to FILE.
    #[arg(long = "json-out", visible_alias = "json-file", value_name = "FILE")]
    json_out: Option<PathBuf>,

    #[command(flatten)]
    local: LocalReplicaOpts,
}

impl TestbedArgs {
    /// Runs it, printing the report; [`ChecksFailed`] when a check failed.
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        if !(self.duration.is_finite() && self.duration >= 0.0 && self.duration <= 3600.0) {
            bail!("--duration must be 0 to 3600 seconds, not {}", self.duration);
        }
        let payments = self.workload == "payments";
        let app = if payments { self.local.app_or("br2k-payments")? } else { self.local.app()? };
        let temp;
        let work_dir = match self.work_dir {
            Some(dir) => dir,
            None => {
                temp =
                    tempfile::Builder::new().prefix("br2k-testbed-").tempdir().context("creating a work directory")?;
                temp.path().to_owned()
            }
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        });
        let config = TestbedConfig {
            users: usize::try_from(self.users)?,
            requests_per_user: self.requests,
            rate: self.rate,
            fault: if self.scale_drill { FaultKind::ScaleDrill } else { self.fault },
            target: self.target,
            interval: self.interval,
            duration: Duration::from_secs_f64(self.duration),
            election_ms: self.local.election_timeout,
            snapshots: self.local.snapshots()?,
            seed,
            replicas: self.local.count(),
            app,
            work_dir,
            network: self.local.network,
            give_up_after: Duration::from_secs(self.give_up_after),
            in_flight: usize::try_from(self.in_flight)?,
            chain: ChainSettings {
                block_time: self.block_time,
                confirmations: self.confirmations,
                endpoints: usize::try_from(self.rpc_endpoints)?,
                fault: self.chain_fault,
                interval: self.chain_interval,
            },
        };
        let progress = |line: &str| out.progress(format_args!("testbed: {line}"));
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        if payments {
            let (findings, faults) = tokio::select! {
                run = br2k_testbed::payments::run(config, &progress) => run?,
                _ = tokio::signal::ctrl_c() => bail!("interrupted; every node was stopped"),
                _ = terminate.recv() => bail!("terminated; every node was stopped"),
            };
            if let Some(path) = &self.json_out {
                let text = serde_json::to_string_pretty(&findings)?;
                std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
            }
            if global.json {
                println!("{}", serde_json::to_string(&findings)?);
            } else {
                print!("{}", findings.markdown(faults));
            }
            return if findings.passed() { Ok(()) } else { Err(ChecksFailed.into()) };
        }
        let report = tokio::select! {
            report = br2k_testbed::run(config, &progress) => report?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted; every node was stopped"),
            _ = terminate.recv() => bail!("terminated; every node was stopped"),
        };
        if let Some(path) = &self.json_out {
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        }
        if global.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.markdown());
        }
        if report.passed { Ok(()) } else { Err(ChecksFailed.into()) }
    }
}

/// The run was carried out and its report printed, but a check failed.
#[derive(Debug, thiserror::Error)]
#[error("the testbed's checks failed (see the report above)")]
pub(crate) struct ChecksFailed;

/// `LO..HI` (or a single value) in seconds.
fn parse_range(text: &str) -> Result<(Duration, Duration), String> {
    let (lo, hi) = text.split_once("..").unwrap_or((text, text));
    let seconds = |s: &str| {
        s.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0 && *v <= 86_400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("{text:?} is not LO..HI in seconds (e.g. 20..40), each above 0"))
    };
    let (lo, hi) = (seconds(lo)?, seconds(hi)?);
    if lo > hi {
        return Err(format!("{text:?}: LO must not be above HI"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::parse_range;
    use std::time::Duration;

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("20..40"), Ok((Duration::from_secs(20), Duration::from_secs(40))));
        assert_eq!(parse_range("2.5"), Ok((Duration::from_millis(2500), Duration::from_millis(2500))));
        assert!(parse_range("40..20").is_err());
        assert!(parse_range("0..5").is_err());
        assert!(parse_range("a..b").unwrap_err().contains("LO..HI"));
    }
}
