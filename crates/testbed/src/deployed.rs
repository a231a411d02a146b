//! The paper's users against a service deployed on its own (`br2k deploy`), as the demo
//! runs them: they find it through the registry, follow it through leader changes, and
//! when nothing answers they file a claim so its manager recovers it. Afterwards the
//! replicas on this machine are checked the way the testbed checks its own: every
//! acknowledged request in the log once, every replica identical, Table 2's counts.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use br2k_deploy::local::run_file::RunFile;
use br2k_replication::{Role, Status};
use br2k_resolver::Resolver;

use crate::checker::{self, Disaster, Findings};
use crate::report::{Latency, tables};
use crate::users::{self, Ack, Progress, Unacknowledged, UserPlan};
use crate::{Error, millis};

/// The users' parameters.
#[derive(Clone, Debug)]
pub struct UsersConfig {
    /// The service.
    pub service: String,
    /// How many users.
    pub users: usize,
    /// Requests each user sends.
    pub requests_per_user: u64,
    /// Requests per second per user.
    pub rate: f64,
    /// A user gives up on one request after this long.
    pub give_up_after: Duration,
    /// Failed attempts within a minute after which a user claims; 0 never claims.
    pub claim_after: u32,
    /// A total disaster to bring about during the run, if any.
    pub disaster: Option<DisasterPlan>,
}

/// When to bring about a total disaster, and to which local service: every replica killed
/// and every disk lost. Only the backup recorded on chain can bring the service back
/// (through its manager, on a user's claim).
#[derive(Clone, Debug)]
pub struct DisasterPlan {
    /// How long after the users start.
    pub at: Duration,
    /// The local runner's state directory (every replica's data, deleted).
    pub state_dir: std::path::PathBuf,
}

/// What the users saw.
#[derive(Clone, Debug, Default)]
pub struct UsersRun {
    /// Acknowledged requests.
    pub acks: Vec<Ack>,
    /// The others.
    pub unacknowledged: Vec<Unacknowledged>,
    /// Claims filed.
    pub claims: u64,
    /// How long the users ran (milliseconds).
    pub end_ms: u64,
    /// The disaster brought about, if one was.
    pub disaster: Option<Disaster>,
}

/// Runs the users to the end, reporting progress every 5 s.
///
/// # Errors
/// Bad parameters, or a user task that ended abnormally.
pub async fn run_users(
    resolver: Resolver,
    config: &UsersConfig,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<UsersRun, Error> {
    if config.users == 0 || config.requests_per_user == 0 || !(config.rate > 0.0 && config.rate <= 1000.0) {
        return Err(Error::Config("users, requests and a rate in (0, 1000] are needed".into()));
    }
    let start = Instant::now();
    let counters = Arc::new(Progress::default());
    let run_id = format!("u{}", std::process::id());
    let tasks: Vec<_> = (1..=config.users as u64)
        .map(|user| {
            let plan = UserPlan {
                user,
                requests: config.requests_per_user,
                rate: config.rate,
                give_up_after: config.give_up_after,
                run_id: run_id.clone(),
                claim_after: config.claim_after,
            };
            tokio::spawn(users::run_user(plan, resolver.clone(), config.service.clone(), start, Arc::clone(&counters)))
        })
        .collect();
    let total = config.users as u64 * config.requests_per_user;
    let mut disaster = None;
    while !tasks.iter().all(tokio::task::JoinHandle::is_finished) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(plan) = config.disaster.as_ref().filter(|plan| disaster.is_none() && start.elapsed() >= plan.at) {
            let struck = match bring_about(plan, &resolver, &config.service, start).await {
                Ok(struck) => struck,
                Err(e) => {
                    for task in &tasks {
                        task.abort();
                    }
                    return Err(Error::Config(format!("the disaster could not be brought about: {e}")));
                }
            };
            progress(&format!(
                "{:>5.1} s: DISASTER: killed {} processes and deleted every replica's data; the newest backup \
                 reached index {} (backup interval {:.1} s)",
                struck.at_ms as f64 / 1000.0,
                struck.killed,
                struck.recovery_point,
                struck.backup_interval_ms as f64 / 1000.0
            ));
            disaster = Some(struck);
        }
        if start.elapsed().as_millis() % 5000 < 100 {
            progress(&format!(
                "{:>5.1} s: {}/{total} acknowledged, {} given up",
                start.elapsed().as_secs_f64(),
                counters.acked.load(Ordering::Relaxed),
                counters.failed.load(Ordering::Relaxed)
            ));
        }
    }
    let mut run = UsersRun::default();
    for task in tasks {
        let log = task.await.map_err(|e| Error::User(e.to_string()))?;
        run.acks.extend(log.acks);
        run.unacknowledged.extend(log.unacknowledged);
        run.claims += log.claims;
    }
    run.end_ms = millis(start.elapsed());
    run.disaster = disaster;
    Ok(run)
}

/// Kills every process of the local service and deletes its state directory, after
/// noting what the newest backup covers and the service's backup interval.
async fn bring_about(
    plan: &DisasterPlan,
    resolver: &Resolver,
    service: &str,
    start: Instant,
) -> Result<Disaster, Error> {
    let file = RunFile::read(&plan.state_dir)?
        .filter(RunFile::runner_alive)
        .ok_or_else(|| Error::Config(format!("no replicas of {service:?} run from {}", plan.state_dir.display())))?;
    let http = status_client()?;
    let mut backup_interval_ms = 0;
    // The newest backup the leader pushed (signed, linked to the one recorded on chain):
    // what a restore takes.
    let mut newest = 0;
    for node in &file.nodes {
        if let Ok(answer) = http.get(format!("{}/br2k/status", node.app_url)).send().await
            && let Ok(status) = answer.json::<Status>().await
        {
            backup_interval_ms = backup_interval_ms.max(status.backup.interval_ms);
            newest = newest.max(status.backup.index);
        }
    }
    if backup_interval_ms == 0 {
        return Err(Error::Config(format!(
            "no replica of {service:?} backs up (its status shows no backup interval): after a disaster nothing \
             could restore it; deploy it from an image in a container registry (`br2k deploy --image`)"
        )));
    }
    let recovery_point = resolver.registry().backup(service).await?.map_or(0, |b| b.index).max(newest);
    let dir = plan.state_dir.clone();
    let killed = tokio::task::spawn_blocking(move || br2k_deploy::local::run_file::destroy(&dir))
        .await
        .map_err(|e| Error::Config(format!("the disaster task ended abnormally: {e}")))??;
    Ok(Disaster { at_ms: millis(start.elapsed()), recovery_point, backup_interval_ms, killed })
}

/// A client for the replicas' status endpoints.
fn status_client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .no_proxy()
        .build()
        .map_err(|e| Error::Config(format!("cannot build an HTTP client: {e}")))
}

/// Checks the replicas a local runner keeps in `state_dir` against what the users saw:
/// waits until they agree, reads the RS records from etcd and every replica's log.
/// Returns the findings and the report as Markdown.
///
/// # Errors
/// No running replicas there, or records and logs that cannot be read.
pub async fn check_local(
    state_dir: &Path,
    config: &UsersConfig,
    run: &UsersRun,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<(Findings, String), Error> {
    let read = || -> Result<RunFile, Error> {
        RunFile::read(state_dir)?.filter(RunFile::runner_alive).ok_or_else(|| {
            Error::Config(format!("no replicas of {:?} run from {}", config.service, state_dir.display()))
        })
    };
    progress("waiting for every replica to apply everything");
    let http = status_client()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (leader_etcd, converged) = loop {
        let file = read()?;
        let mut statuses = Vec::new();
        for node in &file.nodes {
            let status = match http.get(format!("{}/br2k/status", node.app_url)).send().await {
                Ok(answer) => answer.json::<Status>().await.ok(),
                Err(_) => None,
            };
            statuses.push((node.etcd_url.clone(), status));
        }
        let leader = statuses.iter().find(|(_, s)| s.as_ref().is_some_and(|s| s.role == Role::Leader));
        if let Some((etcd, Some(leader))) = leader {
            let all = statuses.iter().all(|(_, s)| s.as_ref().is_some_and(|s| s.applied_index == leader.ssi));
            if all && leader.ls == leader.ssi {
                break (etcd.clone(), Ok(()));
            }
            if Instant::now() >= deadline {
                break (etcd.clone(), Err("the replicas did not converge within 60 s".to_owned()));
            }
        } else if Instant::now() >= deadline {
            return Err(Error::Config("no replica leads; nothing to check".into()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let records =
        br2k_replication::inspect::read_records(&leader_etcd, &config.service, Duration::from_secs(10)).await?;
    let mut logs = Vec::new();
    for (i, node) in read()?.nodes.iter().enumerate() {
        let log = br2k_logserver::read_log(&node.dir.join("app"))
            .map_err(|e| Error::Log { node: i + 1, reason: format!("{e:#}") })?;
        logs.push(log);
    }
    let mut findings =
        checker::check(&records, &logs, &run.acks, &run.unacknowledged, &[], run.disaster.as_ref(), run.end_ms);
    if let Err(reason) = converged {
        findings.replication.identical = false;
        findings.replication.difference.get_or_insert(reason);
    }
    let total = config.users as u64 * config.requests_per_user;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### {} users x {} requests at {}/s against {}; {} claim(s) filed; users ran {:.0} s\n",
        config.users,
        config.requests_per_user,
        config.rate,
        config.service,
        run.claims,
        run.end_ms as f64 / 1000.0
    );
    tables(&mut out, &findings, total, None, &[], &Latency::of(&run.acks));
    let _ = writeln!(out, "\nVerdict: {}", if findings.passed() { "PASSED" } else { "FAILED" });
    Ok((findings, out))
}
