#![doc = include_str!("../README.md")]

pub mod attacker;
pub mod chain;
pub mod checker;
pub mod deployed;
pub mod payments;
pub mod report;
pub mod users;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use br2k_deploy::local::{ChainChoice, EtcdTimings, LocalChainOptions, NetworkMode, Sandbox, SandboxSpec};
use br2k_replication::Role;
use br2k_resolver::{Resolver, ResolverConfig};

pub use attacker::{FaultKind, Target};
pub use report::Report;

use crate::attacker::{FaultEvent, HealthWatch, Rng};
use crate::users::{Progress, UserPlan};

/// A testbed run's parameters.
#[derive(Clone, Debug)]
pub struct TestbedConfig {
    /// How many users (each with its own id).
    pub users: usize,
    /// Requests each user sends.
    pub requests_per_user: u64,
    /// Requests per second per user.
    pub rate: f64,
    /// The fault.
    pub fault: FaultKind,
    /// Which node it hits.
    pub target: Target,
    /// The wait before each fault is drawn anew from this range.
    pub interval: (Duration, Duration),
    /// How long each fault lasts.
    pub duration: Duration,
    /// etcd's election timeout.
    pub election_ms: u64,
    /// The replicas' snapshot policy (small intervals make a short run compact its log,
    /// so that a wiped node catches up from a snapshot).
    pub snapshots: br2k_replication::SnapshotPolicy,
    /// Seed of the attacker's choices.
    pub seed: u64,
    /// Replicas.
    pub replicas: usize,
    /// The log server binary.
    pub app: PathBuf,
    /// Where the nodes' data and logs go.
    pub work_dir: PathBuf,
    /// Network placement.
    pub network: NetworkMode,
    /// A user gives up on one request after this long.
    pub give_up_after: Duration,
    /// Requests each user keeps waiting for their answers at once (payments; the log
    /// workload's users send one at a time, as the paper's).
    pub in_flight: usize,
    /// The chain under a payments run and its faults (the log workload's chain only holds
    /// the registry).
    pub chain: chain::ChainSettings,
}

impl TestbedConfig {
    fn check(&self) -> Result<(), Error> {
        let bad = |what: String| Err(Error::Config(what));
        if self.users == 0 || self.users > 1000 {
            return bad(format!("users must be 1 to 1000, not {}", self.users));
        }
        if self.requests_per_user == 0 {
            return bad("requests per user must be at least 1".into());
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1000.0) {
            return bad(format!("rate must be above 0 and at most 1000 requests/s per user, not {}", self.rate));
        }
        if self.interval.0 > self.interval.1 || self.interval.0.is_zero() {
            return bad(format!(
                "the interval range {:?}..{:?} must be non-empty and above zero",
                self.interval.0, self.interval.1
            ));
        }
        if self.fault != FaultKind::None && self.duration.is_zero() {
            return bad("the fault duration must be above zero".into());
        }
        if self.fault.fills_a_disk() && self.network == NetworkMode::Loopback {
            return bad(format!(
                "{} faults mount a small tmpfs per node, which needs root: run as root with --network namespaces \
                 (or auto)",
                self.fault
            ));
        }
        if self.fault == FaultKind::Partition && self.network == NetworkMode::Loopback {
            return bad("partition faults need --network namespaces (or auto, as root)".into());
        }
        if self.in_flight == 0 || self.in_flight > 64 {
            return bad(format!("requests in flight per user must be 1 to 64, not {}", self.in_flight));
        }
        if let Some(problem) = self.chain.problem() {
            return bad(problem);
        }
        if self.chain.fault == Some(chain::ChainFault::Rpc) && self.duration.is_zero() {
            return bad("the rpc fault lasts --duration, which must be above zero".into());
        }
        if self.replicas < 3 && self.fault != FaultKind::None {
            return bad(format!("with {} replicas no fault can be survived; use at least 3", self.replicas));
        }
        Ok(())
    }
}

/// Why a run could not be carried out (as opposed to a run whose checks failed, which
/// is a [`Report`] whose `passed` is false).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad parameters.
    #[error("{0}")]
    Config(String),
    /// The service could not be put up or operated.
    #[error(transparent)]
    Deploy(#[from] br2k_deploy::DeployError),
    /// The chain could not be reached.
    #[error(transparent)]
    Registry(#[from] br2k_resolver::Error),
    /// etcd's records could not be read.
    #[error("reading the service's records from etcd: {0}")]
    Records(#[from] br2k_replication::Error),
    /// A user's task ended abnormally (a bug in the testbed).
    #[error("a user task ended abnormally: {0}")]
    User(String),
    /// A replica's log could not be read.
    #[error("reading node {node}'s log: {reason}")]
    Log {
        /// The node.
        node: usize,
        /// Why.
        reason: String,
    },
}

/// The service name the testbed runs the log server under.
pub const SERVICE: &str = "testbed-logserver";

/// Runs the experiment and checks it, reporting progress lines to `progress`.
///
/// # Errors
/// When the run could not be carried out; a run that was carried out returns its report
/// whatever the checks found.
pub async fn run(config: TestbedConfig, progress: &(dyn Fn(&str) + Sync)) -> Result<Report, Error> {
    config.check()?;
    if !config.chain.is_default() || config.in_flight != 1 {
        return Err(Error::Config(
            "--block-time, --confirmations, --rpc-endpoints, --chain-fault and --in-flight are for --workload \
             payments (the log server's users send one request at a time, and its chain only holds the registry)"
                .into(),
        ));
    }
    let started_at = std::time::SystemTime::now();
    let timings = EtcdTimings::with_election_ms(config.election_ms);
    let spec = SandboxSpec {
        service: SERVICE.into(),
        replicas: config.replicas,
        retired: Vec::new(),
        app: config.app.clone(),
        app_args: Vec::new(),
        app_env: [("BR2K_OUTBOX".into(), config.work_dir.join("outbox").display().to_string())]
            .into_iter()
            .chain(br2k_deploy::local::snapshot_env(&config.snapshots))
            .collect(),
        work_dir: config.work_dir.clone(),
        network: config.network,
        slot: None,
        etcd: timings,
        chain: ChainChoice::Local(LocalChainOptions::default()),
        startup_timeout: Duration::from_secs(30),
        disks: config.fault.disks(),
        etcd_tls: false,
    };
    let mut sandbox = Sandbox::start(spec, progress).await?;
    let (leader, _) = sandbox.service().wait_for_leader(Duration::from_secs(30)).await?;
    let published = sandbox.wait_published(1, Duration::from_secs(30)).await?;
    progress(&format!(
        "node {} leads; registry location {} (epoch {})",
        leader + 1,
        published.location,
        published.epoch
    ));

    let registry = sandbox.registry().clone();
    let resolver = Resolver::new(
        registry,
        ResolverConfig { poll_interval: Duration::from_millis(200), ..ResolverConfig::default() },
    );
    let start = Instant::now();
    let counters = Arc::new(Progress::default());
    let run_id = format!("tb{}", started_at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis()));
    let mut users = Vec::new();
    for user in 1..=config.users as u64 {
        let plan = UserPlan {
            user,
            requests: config.requests_per_user,
            rate: config.rate,
            give_up_after: config.give_up_after,
            run_id: run_id.clone(),
            claim_after: 0,
        };
        users.push(tokio::spawn(users::run_user(plan, resolver.clone(), SERVICE.into(), start, Arc::clone(&counters))));
    }
    let total = config.users as u64 * config.requests_per_user;
    progress(&format!(
        "{} users x {} requests at {}/s each; attacker: {} on {} every {:?}..{:?} for {:?} (seed {})",
        config.users,
        config.requests_per_user,
        config.rate,
        config.fault,
        config.target,
        config.interval.0,
        config.interval.1,
        config.duration,
        config.seed
    ));

    let faults = attack(&mut sandbox, &config, &users, start, &counters, total, progress).await?;
    let mut acks = Vec::new();
    let mut unacknowledged = Vec::new();
    for user in users {
        match user.await {
            Ok(log) => {
                acks.extend(log.acks);
                unacknowledged.extend(log.unacknowledged);
            }
            Err(e) => return Err(Error::User(e.to_string())),
        }
    }
    let end_ms = millis(start.elapsed());
    progress(&format!(
        "users done in {:.1} s; healing every node and waiting for the replicas to converge",
        end_ms as f64 / 1000.0
    ));
    sandbox.service_mut().heal_all().await?;
    let converged = converge(&sandbox, Duration::from_secs(60)).await;
    if let Err(reason) = &converged {
        progress(&format!("replicas did not converge: {reason}"));
    }
    let (leader, _) = sandbox.service().wait_for_leader(Duration::from_secs(30)).await?;
    // The replicas that are members at the end (a replaced node is retired, its data gone).
    let live = sandbox.service().live_nodes();
    let statuses = sandbox.service().statuses().await;
    let state_versions: Vec<u64> = live.iter().map(|&i| statuses[i].as_ref().map_or(0, |s| s.state_version)).collect();
    let records =
        br2k_replication::inspect::read_records(&sandbox.service().etcd_url(leader), SERVICE, Duration::from_secs(10))
            .await?;
    for i in 0..sandbox.service().len() {
        sandbox.service_mut().stop_app(i).await;
    }
    let mut logs = Vec::new();
    for &i in &live {
        let log = br2k_logserver::read_log(&sandbox.service().app_data_dir(i))
            .map_err(|e| Error::Log { node: i + 1, reason: format!("{e:#}") })?;
        logs.push(log);
    }
    sandbox.shutdown().await;
    let mut findings = checker::check(&records, &logs, &acks, &unacknowledged, &faults, None, end_ms);
    findings.replication.state_versions = state_versions;
    if let Err(reason) = converged {
        findings.replication.identical = false;
        findings.replication.difference.get_or_insert(reason);
    }
    Ok(Report::new(&config, started_at, end_ms, findings, faults, &acks, unacknowledged))
}

/// The attacker's loop, until every user is done. Returns the faults it injected.
async fn attack<T>(
    sandbox: &mut Sandbox,
    config: &TestbedConfig,
    users: &[tokio::task::JoinHandle<T>],
    start: Instant,
    counters: &Progress,
    total: u64,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<FaultEvent>, Error> {
    let mut rng = Rng::new(config.seed);
    let mut drill_step = 0;
    let mut faults: Vec<FaultEvent> = Vec::new();
    // For full disks: each fault's watch of the node's health, to say how long it was unhealthy.
    let mut watches: Vec<(usize, HealthWatch)> = Vec::new();
    let mut next_report = Instant::now() + Duration::from_secs(10);
    let done = || users.iter().all(tokio::task::JoinHandle::is_finished);
    let report = |faults: &[FaultEvent]| {
        progress(&format!(
            "{:>6.1} s: {}/{total} acknowledged, {} given up, {} faults",
            start.elapsed().as_secs_f64(),
            counters.acked.load(Ordering::Relaxed),
            counters.failed.load(Ordering::Relaxed),
            faults.len()
        ));
    };
    loop {
        let until = Instant::now() + rng.between(config.interval.0, config.interval.1);
        if sleep_until_or_done(until, &done, &mut next_report, &|| report(&faults)).await {
            break;
        }
        if config.fault == FaultKind::None {
            continue;
        }
        let leader = sandbox.service().leader().await.map(|(i, _)| i);
        let node = match config.target {
            Target::Leader => match leader {
                Some(i) => i,
                None => {
                    progress("no leader to attack right now; trying again after the next interval");
                    continue;
                }
            },
            Target::Random => {
                let live = sandbox.service().live_nodes();
                live[rng.below(live.len())]
            }
        };
        if config.fault.fills_a_disk() {
            watches.push((faults.len(), HealthWatch::start(&sandbox.service().app_url(node))));
        }
        let window = br2k_membership::catch_up_window(&config.snapshots);
        // When it struck: a membership change takes a while, and its event spans it
        // (struck at its start, healed at its end).
        let at_ms = millis(start.elapsed());
        let node = if config.fault == FaultKind::ScaleDrill {
            match attacker::scale_step(sandbox.service_mut(), drill_step, node, window).await? {
                Some(changed) => {
                    drill_step += 1;
                    changed
                }
                None => continue,
            }
        } else if config.fault == FaultKind::Replace {
            attacker::replace(sandbox.service_mut(), node, window).await?;
            node
        } else {
            attacker::inject(sandbox.service_mut(), config.fault, node).await?;
            node
        };
        tracing::info!(node = node + 1, fault = %config.fault, at_ms, "fault injected");
        let was_leader = leader == Some(node);
        faults.push(FaultEvent { node: node + 1, was_leader, at_ms, healed_ms: None, unhealthy_ms: None });
        // A membership change is over when the change is: nothing to wait for, nothing to heal.
        let heal_at = if matches!(config.fault, FaultKind::Replace | FaultKind::ScaleDrill) {
            Instant::now()
        } else {
            Instant::now() + config.duration
        };
        let finished = sleep_until_or_done(heal_at, &done, &mut next_report, &|| report(&faults)).await;
        attacker::heal(sandbox.service_mut(), config.fault, node).await?;
        if let Some(last) = faults.last_mut() {
            last.healed_ms = Some(millis(start.elapsed()));
        }
        if let Some((_, watch)) = watches.last() {
            watch.healed();
        }
        if finished {
            break;
        }
    }
    report(&faults);
    for (fault, watch) in watches {
        let unhealthy = watch.unhealthy_for().await;
        faults[fault].unhealthy_ms = unhealthy.map(millis);
        if unhealthy.is_none() {
            progress(&format!("node {} was still unhealthy 120 s after its disk had room again", faults[fault].node));
        }
    }
    Ok(faults)
}

/// Sleeps until `until`, returning early (true) once every user is done; calls `report`
/// every 10 s.
async fn sleep_until_or_done(
    until: Instant,
    done: &dyn Fn() -> bool,
    next_report: &mut Instant,
    report: &dyn Fn(),
) -> bool {
    loop {
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= until {
            return false;
        }
        if now >= *next_report {
            report();
            *next_report = now + Duration::from_secs(10);
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(100))).await;
    }
}

/// Waits until every replica has applied everything: one leader, and every replica's
/// applied index equal to the leader's LS and SSI.
async fn converge(sandbox: &Sandbox, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let all = sandbox.service().statuses().await;
        let statuses: Vec<_> = sandbox.service().live_nodes().into_iter().map(|i| all[i].clone()).collect();
        let ok: Vec<_> = statuses.iter().filter_map(|s| s.as_ref().ok()).collect();
        match ok.iter().find(|s| s.role == Role::Leader) {
            Some(leader) if ok.len() == statuses.len() => {
                let target = leader.ssi;
                if leader.ls == target && ok.iter().all(|s| s.applied_index == target && s.ssi == target) {
                    return Ok(());
                }
                last = format!(
                    "leader {} at LS {} SSI {}; applied: {}",
                    leader.replica,
                    leader.ls,
                    leader.ssi,
                    ok.iter().map(|s| format!("{}={}", s.replica, s.applied_index)).collect::<Vec<_>>().join(" ")
                );
            }
            _ => {
                last = format!("{} of {} replicas answer, none of them the leader", ok.len(), statuses.len());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("after {timeout:?}: {last}"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
