//! The node: a replica's handles and the loop that decides what it does (paper Fig. 2).
//!
//! [`Runtime::open`] builds the handles over the store, each owned by the layer that
//! changes it (the status sink, membership, snapshots, faults, backups, the executor, the
//! settler) and the roles over them ([`crate::follower`], [`crate::register`],
//! [`crate::leader`]). One task, the *node loop*, owns the role. It wakes on a timer (Check
//! role), on etcd watch events (`ssi`, `cl`) and on a failure reported by the leader's
//! term, and does one thing per wake-up, as [`Wake::decide`] says: step down, hand etcd
//! leadership on, register, follow, or nothing. While it leads, the tasks of the leader's
//! term replicate and process client requests, and compact, settle and back up beside
//! them.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::app::{AppState, Routes, StepObserver};
use crate::config::Config;
use crate::data::Keys;
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::follower::{Follower, Following};
use crate::leader::{Intake, LeaderTerm, Leading};
use crate::record_file::RecordFile;
use crate::register::Registrar;
use crate::settle::Settler;
use crate::status::{Role, Status};
use crate::store::{MemberStatus, Store};
use crate::sync::{AbortOnDrop, lock};

/// One replica: its handles, and what the node loop keeps between wake-ups.
pub(crate) struct Runtime<S> {
    pub(crate) config: Config,
    pub(crate) keys: Keys,
    pub(crate) state: Arc<S>,
    /// Runs the app's code for entries.
    pub(crate) executor: Arc<Executor<S>>,
    /// The status sink every layer reports to.
    pub(crate) reporter: Arc<crate::reporter::Reporter>,
    /// The leader's request queue and its byte budget.
    pub(crate) intake: Intake,
    store: Store,
    /// The register role: Prepare Service, and Check for pending process.
    registrar: Arc<Registrar<S>>,
    /// The follower role, and the watch task that feeds it.
    pub(crate) follower: Arc<Follower<S>>,
    /// This replica's snapshots: on disk, taken, and fetched from peers.
    pub(crate) snapshots: Arc<crate::state_transfer::Snapshots<S>>,
    /// Where local faults and a divergence are noted.
    pub(crate) faults: Arc<crate::faults::Faults>,
    /// The leader's backups, and the front's way to ask for one now.
    pub(crate) backups: Arc<crate::backup::Backups<S>>,
    /// This replica's membership record and the peer token.
    pub(crate) membership: Arc<crate::membership::Membership>,
    /// For fetching peers' snapshots (and the local member's metrics).
    pub(crate) http: reqwest::Client,
    /// When the local member's quota was last asked of its metrics.
    quota_probed: Mutex<Option<Instant>>,
    /// The transaction outbox's chain client, when the runtime has an outbox.
    pub(crate) chain: Option<Arc<crate::outbox::Chain>>,
    /// Settles the requests left in doubt.
    pub(crate) settler: Arc<Settler<S>>,
    /// The idempotency keys this replica has passed, with their answers.
    pub(crate) idempotency: Arc<crate::idempotency::IdempotencyTable>,
}

/// What a replica is made of before it opens its data and connects to etcd: built by the
/// [`crate::Builder`], opened by [`Runtime::open`] when the replica serves.
pub(crate) struct Parts<S> {
    pub(crate) config: Config,
    pub(crate) state: Arc<S>,
    routes: Routes<S>,
    observer: Option<StepObserver>,
    pub(crate) chain: Option<Arc<crate::outbox::Chain>>,
    /// The status sink: there from the start, so the status can be read before serving.
    pub(crate) reporter: Arc<crate::reporter::Reporter>,
    pub(crate) idempotency: Arc<crate::idempotency::IdempotencyTable>,
}

impl<S: AppState> Parts<S> {
    pub(crate) fn new(
        config: Config,
        state: S,
        routes: Routes<S>,
        observer: Option<StepObserver>,
        chain: Option<Arc<crate::outbox::Chain>>,
    ) -> Self {
        let status = Status {
            service: config.service.clone(),
            replica: config.replica.clone(),
            role: Role::Follower,
            epoch: None,
            leader: None,
            ls: 0,
            ssi: 0,
            lpi: state.applied_index(),
            applied_index: state.applied_index(),
            in_doubt: Vec::new(),
            etcd_reachable: false,
            etcd_learner: false,
            removed_from_etcd: false,
            published_epoch: None,
            pipeline: std::collections::BTreeMap::new(),
            last_error: None,
            snapshot_index: 0,
            state_version: 0,
            first_index: 1,
            db_size: 0,
            db_size_in_use: 0,
            quota: None,
            etcd_alarms: Vec::new(),
            backup: crate::status::BackupStatus::default(),
            fault: None,
            divergence: None,
            outbox: None,
            idempotency: crate::idempotency::TableStatus::default(),
        };
        let stats = Arc::new(crate::stats::Stats::default());
        let metrics = crate::metrics::Metrics::new(&config.service, &config.replica, &stats);
        let reporter = Arc::new(crate::reporter::Reporter::new(status, metrics, stats));
        Self {
            config,
            state: Arc::new(state),
            routes,
            observer,
            chain,
            reporter,
            idempotency: Arc::new(crate::idempotency::IdempotencyTable::default()),
        }
    }

    /// The status as it is now (before the replica serves).
    pub(crate) fn current_status(&self) -> Status {
        status_now(&self.reporter, self.chain.as_deref(), &self.idempotency)
    }
}

/// The status with the pipeline's counters, the outbox's and the idempotency table's as
/// they are now.
fn status_now(
    reporter: &crate::reporter::Reporter,
    chain: Option<&crate::outbox::Chain>,
    idempotency: &crate::idempotency::IdempotencyTable,
) -> Status {
    let mut status = reporter.status.borrow().clone();
    status.pipeline = reporter.stats.snapshot();
    status.outbox = chain.map(crate::outbox::Chain::status);
    status.idempotency = idempotency.status();
    status
}

/// Where the node loop stands between wake-ups.
struct LoopState {
    /// Check for pending process is still to do (at start and after each step-down).
    pending_check: bool,
    /// Where this replica stands in the log (LPI), and what the follower last read.
    following: Following,
    /// The leader condition as last read (at a check tick, or when it was not false).
    condition: Option<bool>,
    leader: Option<LeaderTerm>,
    /// Set when the app's code failed here as leader (a handler panicked or hung): until
    /// then this replica hands etcd leadership on instead of registering, so that another
    /// replica takes over rather than this one failing at the same request again.
    hold_off: Option<Instant>,
    /// The wait before the next attempt after a local fault (a full disk).
    retry: crate::faults::Backoff,
}

/// Why the node loop woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Woken {
    /// The Check role timer: the leader condition is read afresh.
    CheckTick,
    /// A change (SSI moved, `cl` changed) or the follower's poll timer.
    Change,
}

/// Whether a wake-up asks the local member for the leader condition. A follower woken by a
/// change keeps the "not leader" it read at the last check tick: asking the member's status
/// on every group cost each follower a status call per group, more etcd work than the
/// group's writes. One that just became the Raft leader registers at the next tick.
fn reads_condition(cached: Option<bool>, woken: Woken, leading: bool) -> bool {
    !(cached == Some(false) && woken == Woken::Change && !leading)
}

/// What the node loop knows at a wake-up, once it has the leader condition.
#[derive(Clone, Copy, Debug)]
struct Wake {
    /// It leads (a leader's term is running).
    leading: bool,
    /// The leader condition: the local etcd member is the Raft leader.
    condition: bool,
    /// It diverged: stopped for good.
    diverged: bool,
    /// Its app failed here as leader a moment ago: others should lead for a while.
    holding_off: bool,
    /// A local fault stopped it and the backoff has not passed.
    retry_waiting: bool,
}

/// What one wake-up does (paper Fig. 2, with br2k's stops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeStep {
    /// A leader that lost the condition steps down.
    StepDown,
    /// Move etcd leadership to another member: this replica must not lead now.
    HandOff,
    /// Nothing this time (a leader that keeps the condition, a diverged follower, a
    /// backoff not yet passed).
    Stay,
    /// Follower -> Register -> Leader.
    Register,
    /// Follow the Latest Service State.
    Follow,
}

impl Wake {
    fn decide(self) -> NodeStep {
        if self.leading {
            return if self.condition { NodeStep::Stay } else { NodeStep::StepDown };
        }
        if self.diverged {
            // Its state is not the service's, so it never leads.
            return if self.condition { NodeStep::HandOff } else { NodeStep::Stay };
        }
        if self.condition && self.holding_off {
            return NodeStep::HandOff;
        }
        if self.retry_waiting {
            return NodeStep::Stay;
        }
        if self.condition { NodeStep::Register } else { NodeStep::Follow }
    }
}

/// How long a replica whose handler failed as leader leaves leadership to others.
const HOLD_OFF: Duration = Duration::from_secs(10);

impl<S: AppState> Runtime<S> {
    /// Opens a replica made of `parts`: its data directory, record file, divergence mark
    /// and snapshots (failing early on any that is unreadable, rather than after serving),
    /// then the local etcd member's store, then everything built over them.
    pub(crate) async fn open(parts: Parts<S>) -> Result<Self> {
        let Parts { config, state, routes, observer, chain, reporter, idempotency } = parts;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::RecordFile {
            path: config.data_dir.display().to_string(),
            reason: format!("cannot create the data directory: {e}"),
        })?;
        let keys = Keys::new(&config.service);
        let record = RecordFile::new(&config.data_dir);
        // Fails early on an unreadable record file rather than after serving.
        record.read()?;
        let membership = Arc::new(crate::membership::Membership::new(&config, &keys));
        let faults = Arc::new(crate::faults::Faults::new(
            &config.replica,
            &config.data_dir,
            reporter.clone(),
            membership.clone(),
        ));
        faults.load_divergence()?;
        // Never redirected: a peer's answer must not send the peer token (or this replica)
        // to another host.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("an HTTP client with default TLS settings builds");
        let snapshots = Arc::new(crate::state_transfer::Snapshots::new(
            &config,
            keys.clone(),
            state.clone(),
            idempotency.clone(),
            record.clone(),
            reporter.clone(),
            membership.clone(),
            http.clone(),
        ));
        snapshots.open().await?;
        let store = Store::connect(
            &config.etcd_endpoint,
            keys.clone(),
            config.timings.etcd_timeout,
            reporter.stats.clone(),
            config.etcd_tls.as_ref(),
        )
        .await?;
        let backups =
            Arc::new(crate::backup::Backups::new(config.clone(), keys.clone(), snapshots.clone(), reporter.clone()));
        let executor = Arc::new(Executor::new(
            &config.replica,
            config.limits,
            state.clone(),
            routes,
            observer,
            record.clone(),
            reporter.clone(),
            chain.clone(),
        ));
        let settler = Arc::new(Settler::new(&config, keys.clone(), store.clone(), executor.clone(), reporter.clone()));
        let follower = Arc::new(Follower::new(
            &config,
            keys.clone(),
            store.clone(),
            executor.clone(),
            snapshots.clone(),
            idempotency.clone(),
            faults.clone(),
            reporter.clone(),
        ));
        let registrar = Arc::new(Registrar::new(
            config.clone(),
            keys.clone(),
            store.clone(),
            executor.clone(),
            snapshots.clone(),
            idempotency.clone(),
            faults.clone(),
            settler.clone(),
            follower.clone(),
            reporter.clone(),
        ));
        Ok(Self {
            registrar,
            executor,
            settler,
            keys,
            faults,
            snapshots,
            backups,
            membership,
            http,
            quota_probed: Mutex::default(),
            intake: Intake::new(config.limits.max_queued_bytes),
            config,
            state,
            reporter,
            store,
            follower,
            chain,
            idempotency,
        })
    }

    /// The status with the pipeline's counters as they are now.
    pub(crate) fn current_status(&self) -> Status {
        status_now(&self.reporter, self.chain.as_deref(), &self.idempotency)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// What a leader's term works with.
    fn leading(&self) -> Arc<Leading<S>> {
        Arc::new(Leading {
            config: self.config.clone(),
            keys: self.keys.clone(),
            store: self.store.clone(),
            reporter: self.reporter.clone(),
            executor: self.executor.clone(),
            idempotency: self.idempotency.clone(),
            snapshots: self.snapshots.clone(),
            backups: self.backups.clone(),
            settler: self.settler.clone(),
            chain: self.chain.clone(),
        })
    }

    /// The node loop: until `shutdown`, wake up and do one thing.
    pub(crate) async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let changes = Arc::new(Notify::new());
        let _watcher = AbortOnDrop(tokio::spawn(self.follower.clone().watch_changes(changes.clone())));
        let _membership = AbortOnDrop(tokio::spawn({
            let (membership, store) = (self.membership.clone(), self.store().clone());
            async move { membership.keep(&store).await }
        }));
        let _removal = AbortOnDrop(tokio::spawn({
            let (membership, store, reporter) = (self.membership.clone(), self.store().clone(), self.reporter.clone());
            async move { membership.watch_removal(&store, &reporter).await }
        }));
        let timings = self.config.timings;
        let mut check = tokio::time::interval(timings.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(timings.follow_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut node = LoopState {
            pending_check: true,
            following: Following::at(self.start_index()),
            condition: None,
            leader: None,
            hold_off: None,
            retry: crate::faults::Backoff::default(),
        };
        tokio::pin!(shutdown);
        loop {
            let leading = node.leader.is_some();
            let failure = async {
                match node.leader.as_mut() {
                    Some(term) => term.failed.recv().await,
                    None => std::future::pending().await,
                }
            };
            let woken = tokio::select! {
                biased;
                () = &mut shutdown => break,
                failure = failure => {
                    let reason = failure.as_ref().map_or_else(|| "leader pipeline ended".to_owned(), ToString::to_string);
                    self.step_down(&mut node, &reason).await;
                    if let Some(fault) = failure.filter(|e| e.is_local_fault() || matches!(e, Error::Panicked(_))) {
                        // The fault is never the request's answer: the request stays
                        // unrecorded and the replica that takes over executes it.
                        if fault.is_local_fault() {
                            self.reporter.metrics.count_local_fault();
                        }
                        self.reporter.note_error(&fault);
                        node.hold_off = Some(Instant::now() + HOLD_OFF);
                        self.hand_off().await;
                    }
                    continue;
                }
                _ = check.tick() => Woken::CheckTick,
                () = changes.notified(), if !leading => Woken::Change,
                _ = poll.tick(), if !leading => Woken::Change,
            };
            self.wake(&mut node, woken).await;
        }
        if node.leader.is_some() {
            self.step_down(&mut node, "shutting down").await;
        }
    }

    /// Where processing resumes after a start or a step-down: the app's applied index, or
    /// this replica's latest snapshot if that is further (the entries between them changed
    /// nothing here: the snapshot was taken from this very state, or restored into it);
    /// but not past what the idempotency table has applied, which replays the entries it
    /// lacks (the app skips those it has).
    fn start_index(&self) -> u64 {
        let snapshot = self.snapshots.latest().map_or(0, |m| m.index);
        self.state.applied_index().max(snapshot).min(self.idempotency.applied())
    }

    /// Follower -> Register -> Leader: the register role prepares the service, then the
    /// leader's term starts and the front submits to it.
    async fn register(&self, node: &mut LoopState) -> Result<()> {
        let (term, ls) = self.registrar.register(&mut node.following).await?;
        self.follower.feed.stop_collecting();
        let (leader, submit) = LeaderTerm::start(&self.leading(), term.clone(), ls + 1);
        self.intake.set(Some(submit));
        node.leader = Some(leader);
        self.reporter.set_role(Role::Leader, Some(term.epoch), "prepared");
        Ok(())
    }

    /// One wake-up of the node loop: Check role, then act on it.
    async fn wake(self: &Arc<Self>, node: &mut LoopState, woken: Woken) {
        let condition = match node.condition {
            Some(cached) if !reads_condition(Some(cached), woken, node.leader.is_some()) => cached,
            _ => self.read_condition().await,
        };
        node.condition = Some(condition);
        let holding_off = node.hold_off.is_some_and(|until| Instant::now() < until);
        if !holding_off {
            node.hold_off = None;
        }
        let view = Wake {
            leading: node.leader.is_some(),
            condition,
            diverged: self.faults.diverged(),
            holding_off,
            retry_waiting: node.retry.waiting(),
        };
        let step = view.decide();
        match step {
            NodeStep::StepDown => {
                return self.step_down(node, "leader condition lost (local etcd member is not the Raft leader)").await;
            }
            NodeStep::HandOff => return self.hand_off().await,
            NodeStep::Stay => return,
            NodeStep::Register | NodeStep::Follow => {}
        }
        if node.pending_check {
            match self.registrar.check_pending().await {
                Ok(()) => {
                    node.pending_check = false;
                    node.following.lpi = node.following.lpi.min(self.start_index());
                }
                Err(e) => return self.failed(node, &e),
            }
        }
        let result = if step == NodeStep::Register {
            self.register(node).await
        } else {
            self.follower.follow(&mut node.following).await
        };
        match result {
            Ok(()) => {
                node.retry.reset();
                self.faults.clear_fault();
                self.reporter.clear_error();
            }
            Err(e) => self.failed(node, &e),
        }
    }

    /// A wake-up that could not do its job. A local fault (a full disk, an I/O error, a
    /// handler that panicked) stops this replica at the next entry: it does not lead for
    /// a while, rolls back what the attempt left (Check for pending process) and tries
    /// again with backoff.
    fn failed(&self, node: &mut LoopState, error: &Error) {
        if self.reporter.status.borrow().role == Role::Register {
            self.reporter.set_role(Role::Follower, None, "register failed");
        }
        if error.is_local_fault() {
            node.hold_off = Some(Instant::now() + HOLD_OFF);
            node.pending_check = true;
            node.retry.failed();
            let index = match error {
                Error::LocalFault { index, .. } | Error::Handler { index, .. } => *index,
                _ => node.following.lpi + 1,
            };
            self.faults.note_fault(index, error);
        }
        self.reporter.note_error(error);
    }

    /// The leader condition as the local member says it now (false when it does not
    /// answer), noting what it says of itself in the status.
    async fn read_condition(&self) -> bool {
        match self.store().member_status().await {
            Ok(member) => {
                if !self.reporter.status.borrow().etcd_reachable {
                    self.reporter.set_status(|s| s.etcd_reachable = true);
                }
                self.note_member(&member);
                if member.quota == 0 {
                    self.probe_quota().await;
                }
                member.leads
            }
            Err(e) => {
                // An unreadable condition counts as false (a paused or cut-off member).
                if self.reporter.status.borrow().etcd_reachable {
                    warn!(replica = %self.config.replica, error = %e, "local etcd member not answering");
                    self.reporter.set_status(|s| s.etcd_reachable = false);
                }
                false
            }
        }
    }

    /// Moves etcd leadership to another member after this replica's app failed as leader.
    async fn hand_off(&self) {
        match self.store().hand_off_leadership().await {
            Ok(Some(member)) => {
                info!(replica = %self.config.replica, to_member = format!("{member:x}"),
                    "the app failed here as leader: handed etcd leadership to another member");
            }
            Ok(None) => warn!(replica = %self.config.replica,
                "the app failed here as leader and no other etcd member can take leadership"),
            Err(e) => warn!(replica = %self.config.replica, error = %e, "could not hand etcd leadership on"),
        }
    }

    /// Keeps the local member's database figures and alarms in the status; says loudly
    /// when an alarm is raised or cleared.
    fn note_member(&self, member: &MemberStatus) {
        let before = self.reporter.status.borrow().etcd_alarms.clone();
        if member.alarms != before {
            for alarm in member.alarms.iter().filter(|a| !before.contains(a)) {
                error!(replica = %self.config.replica, "{}", alarm_advice(alarm, &self.config.etcd_endpoint));
            }
            if member.alarms.is_empty() {
                info!(replica = %self.config.replica, "etcd alarms cleared");
            }
        }
        let quota = (member.quota > 0).then_some(member.quota);
        self.reporter.status.send_if_modified(|s| {
            let changed = s.db_size != member.db_size
                || s.db_size_in_use != member.db_size_in_use
                || s.etcd_alarms != member.alarms
                || (quota.is_some() && s.quota != quota)
                || s.etcd_learner != member.learner;
            s.etcd_learner = member.learner;
            s.db_size = member.db_size;
            s.db_size_in_use = member.db_size_in_use;
            s.etcd_alarms.clone_from(&member.alarms);
            if quota.is_some() {
                s.quota = quota;
            }
            changed
        });
    }

    /// etcd before 3.6 does not report its space quota in `status`; its metrics do
    /// (`etcd_server_quota_backend_bytes`). Asked at most every 30 s until answered.
    async fn probe_quota(&self) {
        {
            let mut last = lock(&self.quota_probed);
            if self.reporter.status.borrow().quota.is_some()
                || last.is_some_and(|at| at.elapsed() < Duration::from_secs(30))
            {
                return;
            }
            *last = Some(Instant::now());
        }
        let endpoint = self.config.etcd_metrics_endpoint.as_deref().unwrap_or(&self.config.etcd_endpoint);
        let url = format!("{}/metrics", endpoint.trim_end_matches('/'));
        let text = tokio::time::timeout(self.config.timings.etcd_timeout, async {
            self.http.get(&url).send().await?.error_for_status()?.text().await
        })
        .await;
        let quota = text.ok().and_then(Result::ok).and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("etcd_server_quota_backend_bytes "))?;
            let value: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            (value.is_finite() && value > 0.0).then_some(value as u64)
        });
        if let Some(quota) = quota {
            self.reporter.set_status(|s| s.quota = Some(quota));
        }
    }

    /// Leader -> Follower: stop taking requests, stop the term's tasks (interrupting an
    /// execution if one runs), then Check for pending process before following.
    async fn step_down(&self, node: &mut LoopState, reason: &str) {
        let Some(term) = node.leader.take() else { return };
        self.intake.set(None);
        term.stop().await;
        self.reporter.set_role(Role::Follower, None, reason);
        node.pending_check = true;
        node.following.lpi = self.start_index();
    }
}

/// What an operator reads when the local etcd member raises `alarm`.
pub(crate) fn alarm_advice(alarm: &str, endpoint: &str) -> String {
    if alarm.contains("NOSPACE") {
        format!(
            "etcd raised a NOSPACE alarm ({alarm}): its database reached the space quota and every write is refused. \
             Free space and disarm it: `etcdctl --endpoints {endpoint} compact $(etcdctl --endpoints {endpoint} \
             endpoint status --write-out=fields | grep Revision | cut -d: -f2)`, then `etcdctl defrag` on each member \
             one at a time, then `etcdctl alarm disarm`; with snapshots on, br2k compacts the log itself, so check \
             --snapshot-interval if this recurs"
        )
    } else {
        format!(
            "etcd raised an alarm ({alarm}); writes may be refused until an operator clears it (`etcdctl --endpoints {endpoint} alarm list`)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wake(leading: bool, condition: bool) -> Wake {
        Wake { leading, condition, diverged: false, holding_off: false, retry_waiting: false }
    }

    #[test]
    fn a_follower_woken_by_a_change_keeps_the_condition_it_read_at_the_last_tick() {
        assert!(!reads_condition(Some(false), Woken::Change, false));
        assert!(reads_condition(Some(false), Woken::CheckTick, false));
        assert!(reads_condition(Some(true), Woken::Change, false));
        assert!(reads_condition(None, Woken::Change, false));
        assert!(reads_condition(Some(false), Woken::Change, true), "a leader always checks");
    }

    #[test]
    fn each_wake_up_does_one_thing_as_fig_2_and_the_stops_say() {
        assert_eq!(wake(true, true).decide(), NodeStep::Stay);
        assert_eq!(wake(true, false).decide(), NodeStep::StepDown);
        assert_eq!(wake(false, true).decide(), NodeStep::Register);
        assert_eq!(wake(false, false).decide(), NodeStep::Follow);
        // Diverged: never leads, never follows.
        assert_eq!(Wake { diverged: true, ..wake(false, true) }.decide(), NodeStep::HandOff);
        assert_eq!(Wake { diverged: true, ..wake(false, false) }.decide(), NodeStep::Stay);
        // The app failed here as leader: others lead for a while; following goes on.
        assert_eq!(Wake { holding_off: true, ..wake(false, true) }.decide(), NodeStep::HandOff);
        assert_eq!(Wake { holding_off: true, ..wake(false, false) }.decide(), NodeStep::Follow);
        // A local fault's backoff: wait, unless the condition must be handed off.
        assert_eq!(Wake { retry_waiting: true, ..wake(false, false) }.decide(), NodeStep::Stay);
        assert_eq!(Wake { retry_waiting: true, holding_off: true, ..wake(false, true) }.decide(), NodeStep::HandOff);
        // A leader steps down on the condition alone.
        assert_eq!(Wake { diverged: true, holding_off: true, ..wake(true, false) }.decide(), NodeStep::StepDown);
    }
}
