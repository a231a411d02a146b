//! The replica: Check role, Register (with Prepare Service), Follow the Latest Service
//! State, Check for pending process, and stepping down (paper Fig. 2, 3, Table 1).
//!
//! One task, the *node loop*, owns the role. It wakes on a timer (Check role), on etcd
//! watch events (`ssi`, `cl`) and on a failure reported by the leader's pipeline, and does
//! one thing per wake-up: step down, register, or follow. While it leads, the tasks of the
//! leader's term ([`crate::leader`]) replicate and process client requests, and compact,
//! settle and back up beside them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{error, info, warn};

use crate::app::{AppState, Failure, Outcome, Recorded, Reply, Request, Rollback, StepObserver};
use crate::app::{Route, Routes};
use crate::config::Config;
use crate::data::{self, EntryState, Keys, LeaderRecord, LogEntry, MemberRecord, ProcessState, RequestKind, Step};
use crate::error::{Error, Result};
use crate::guard::guarded;
use crate::leader::{IdempotencyLease, LeaderTerm, Submit, outcome_ops};
use crate::record_file::RecordFile;
use crate::snapshot::SnapshotStore;
use crate::state_transfer::SnapshotState;
use crate::status::{Role, Status};
use crate::store::{MemberStatus, Op, Store, StoredEntry, Term};
use crate::sync::{AbortOnDrop, lock};

/// How many entries a follower or a Register reads and applies at a time.
const PAGE: u64 = 256;

pub(crate) struct Runtime<S> {
    pub(crate) config: Config,
    pub(crate) keys: Keys,
    pub(crate) state: Arc<S>,
    pub(crate) routes: Routes<S>,
    pub(crate) observer: Option<StepObserver>,
    pub(crate) record: RecordFile,
    /// The status sink every layer reports to.
    pub(crate) reporter: crate::reporter::Reporter,
    /// The leader term's request queue while this replica leads.
    pub(crate) submit: RwLock<Option<mpsc::Sender<Submit>>>,
    store: std::sync::OnceLock<Store>,
    /// Set by the watch task when `cl` changes.
    cl_changed: AtomicBool,
    /// The entries and SSI the watch task delivers, for following.
    pub(crate) feed: crate::feed::Feed,
    /// This replica's snapshots on disk.
    pub(crate) snapshots: SnapshotStore,
    /// The latest of them, and whether one is being written.
    pub(crate) snapshot: Mutex<SnapshotState>,
    /// Woken when a snapshot completes (the leader's compaction waits on it).
    pub(crate) snapshot_taken: Notify,
    /// Woken to make the leader back up at once.
    pub(crate) backup_now: Notify,
    /// Set with `backup_now` when the backup asked for is to be recorded on chain too.
    pub(crate) backup_forced: std::sync::atomic::AtomicBool,
    /// When `POST /br2k/backup` was last honoured (at most one per backup interval).
    pub(crate) backup_asked_at: Mutex<Option<std::time::Instant>>,
    /// What this replica's membership record should say.
    pub(crate) member: watch::Sender<MemberRecord>,
    /// The peer token, once read from etcd.
    pub(crate) peer_token: Mutex<Option<String>>,
    /// For fetching peers' snapshots (and the local member's metrics).
    pub(crate) http: reqwest::Client,
    /// When the local member's quota was last asked of its metrics.
    quota_probed: Mutex<Option<Instant>>,
    /// The byte budget of logged requests waiting or being processed ([`Limits::max_queued_bytes`]).
    ///
    /// [`Limits::max_queued_bytes`]: crate::Limits::max_queued_bytes
    queue_bytes: Arc<Semaphore>,
    /// The transaction outbox's chain client, when the runtime has an outbox.
    pub(crate) chain: Option<Arc<crate::outbox::Chain>>,
    /// Woken when a request was left in doubt, to settle it soon.
    pub(crate) settle_now: Notify,
    /// The idempotency keys this replica has passed, with their answers.
    pub(crate) idempotency: crate::idempotency::IdempotencyTable,
}

/// Where the node loop stands between wake-ups.
struct Node {
    /// Check for pending process is still to do (at start and after each step-down).
    pending_check: bool,
    /// Latest processed index.
    lpi: u64,
    /// The LPI last reported in `lpi/<replica>`, and when: a follower writes it at most
    /// once per poll interval, so that followers do not double the cluster's writes.
    lpi_written: (u64, Instant),
    /// When `cl` was last read by the follower (it is read again on a `cl` event or
    /// after a poll interval).
    cl_read: Option<Instant>,
    /// When the follower last read the compaction record, and its first index.
    compacted_read: Option<(Instant, u64)>,
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

/// How long a replica whose handler failed as leader leaves leadership to others.
const HOLD_OFF: Duration = Duration::from_secs(10);

impl<S: AppState> Runtime<S> {
    /// The replica's shared state, before it connects to anything.
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
        let member =
            MemberRecord { url: config.public_url.clone(), snapshot: None, catching_up: false, diverged: None };
        let stats = Arc::new(crate::stats::Stats::default());
        let metrics = crate::metrics::Metrics::new(&config.service, &config.replica, &stats);
        Self {
            keys: Keys::new(&config.service),
            record: RecordFile::new(&config.data_dir),
            snapshots: SnapshotStore::new(&config.data_dir),
            snapshot: Mutex::default(),
            snapshot_taken: Notify::new(),
            backup_now: Notify::new(),
            backup_forced: std::sync::atomic::AtomicBool::new(false),
            backup_asked_at: Mutex::default(),
            member: watch::Sender::new(member),
            peer_token: Mutex::default(),
            // Never redirected: a peer's answer must not send the peer token (or this
            // replica) to another host.
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .expect("an HTTP client with default TLS settings builds"),
            quota_probed: Mutex::default(),
            queue_bytes: Arc::new(Semaphore::new(config.limits.max_queued_bytes.min(Semaphore::MAX_PERMITS))),
            config,
            state: Arc::new(state),
            routes,
            observer,
            reporter: crate::reporter::Reporter::new(status, metrics, stats.clone()),
            submit: RwLock::new(None),
            store: std::sync::OnceLock::new(),
            cl_changed: AtomicBool::new(true),
            feed: crate::feed::Feed::default(),
            chain,
            settle_now: Notify::new(),
            idempotency: crate::idempotency::IdempotencyTable::default(),
        }
    }

    /// Opens what the replica keeps: its data directory, record file, divergence mark and
    /// snapshots (failing early on any that is unreadable, rather than after serving), then
    /// connects to the local etcd member.
    pub(crate) async fn open(&self) -> Result<()> {
        std::fs::create_dir_all(&self.config.data_dir).map_err(|e| Error::RecordFile {
            path: self.config.data_dir.display().to_string(),
            reason: format!("cannot create the data directory: {e}"),
        })?;
        // Fails early on an unreadable record file rather than after serving.
        self.record.read()?;
        self.load_divergence()?;
        self.open_snapshots().await?;
        let store = Store::connect(
            &self.config.etcd_endpoint,
            self.keys.clone(),
            self.config.timings.etcd_timeout,
            self.reporter.stats.clone(),
            self.config.etcd_tls.as_ref(),
        )
        .await?;
        let _ = self.store.set(store);
        Ok(())
    }

    /// The status with the pipeline's counters as they are now.
    pub(crate) fn current_status(&self) -> Status {
        let mut status = self.reporter.status.borrow().clone();
        status.pipeline = self.reporter.stats.snapshot();
        status.outbox = self.chain.as_ref().map(|chain| chain.status());
        status.idempotency = self.idempotency.status();
        status
    }

    pub(crate) fn store(&self) -> &Store {
        self.store.get().expect("the store is set before anything runs")
    }

    pub(crate) fn route_of(&self, method: &str, path: &str) -> Option<&Route<S>> {
        self.routes.get(method, path)
    }

    /// Takes `bytes` of the queue's budget for a request to log, waiting up to
    /// [`QUEUE_WAIT`] for earlier requests to be answered; `None` when the queue stays full.
    pub(crate) async fn reserve_queue(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes).ok()?;
        tokio::time::timeout(QUEUE_WAIT, self.queue_bytes.clone().acquire_many_owned(bytes)).await.ok()?.ok()
    }

    /// The node loop: until `shutdown`, wake up and do one thing.
    pub(crate) async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let changes = Arc::new(Notify::new());
        let _watcher = AbortOnDrop(tokio::spawn(self.clone().watch_changes(changes.clone())));
        let _membership = AbortOnDrop(tokio::spawn(self.clone().keep_membership()));
        let timings = self.config.timings;
        let mut check = tokio::time::interval(timings.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(timings.follow_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut node = Node {
            pending_check: true,
            lpi: self.start_index(),
            lpi_written: (u64::MAX, Instant::now()),
            cl_read: None,
            compacted_read: None,
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
            let check_condition = tokio::select! {
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
                _ = check.tick() => true,
                () = changes.notified(), if !leading => false,
                _ = poll.tick(), if !leading => false,
            };
            self.wake(&mut node, check_condition).await;
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
        let snapshot = self.latest_snapshot().map_or(0, |m| m.index);
        self.state.applied_index().max(snapshot).min(self.idempotency.applied())
    }

    /// The LPI this replica reports in `lpi/<replica>` (what compaction keeps the log for)
    /// when it has processed up to `lpi`: no further than its latest snapshot, because its
    /// idempotency table is durable only there, and after a crash it replays the log from
    /// it. Without snapshots nothing is compacted, and it reports `lpi`.
    pub(crate) fn recoverable_lpi(&self, lpi: u64) -> u64 {
        if !self.config.snapshots.enabled() {
            return lpi;
        }
        lpi.min(self.latest_snapshot().map_or(0, |m| m.index))
    }

    /// The stamp the leader writes into the next keyed entries it logs (see
    /// [`crate::data::Stamp`]).
    pub(crate) fn stamp(&self) -> crate::data::Stamp {
        let now_ms = data::unix_millis();
        self.idempotency.stamp(now_ms, self.config.idempotency_retention, self.config.idempotency_max_bytes)
    }

    /// One wake-up of the node loop: Check role, then act on it.
    async fn wake(self: &Arc<Self>, node: &mut Node, check_condition: bool) {
        // A follower woken by a change (SSI moved, `cl` changed) keeps the "not leader" it
        // read at the last check tick: asking the member's status on every group cost
        // each follower a status call per group, more etcd work than the group's writes.
        // One that just became the Raft leader registers at the next tick (100 ms).
        let condition = match node.condition {
            Some(false) if !check_condition && node.leader.is_none() => false,
            _ => self.read_condition().await,
        };
        node.condition = Some(condition);
        if node.leader.is_some() {
            if !condition {
                self.step_down(node, "leader condition lost (local etcd member is not the Raft leader)").await;
            }
            return;
        }
        if self.diverged() {
            // Stopped for good: its state is not the service's, so it never leads.
            if condition {
                self.hand_off().await;
            }
            return;
        }
        let holding_off = node.hold_off.is_some_and(|until| Instant::now() < until);
        if !holding_off {
            node.hold_off = None;
        }
        if condition && holding_off {
            self.hand_off().await;
            return;
        }
        if node.retry.waiting() {
            return;
        }
        if node.pending_check {
            match self.check_pending().await {
                Ok(()) => {
                    node.pending_check = false;
                    node.lpi = node.lpi.min(self.start_index());
                }
                Err(e) => return self.failed(node, &e),
            }
        }
        let result = if condition { self.register(node).await } else { self.follow(node).await };
        match result {
            Ok(()) => {
                node.retry.reset();
                self.clear_fault();
                self.reporter.clear_error();
            }
            Err(e) => self.failed(node, &e),
        }
    }

    /// A wake-up that could not do its job. A local fault (a full disk, an I/O error, a
    /// handler that panicked) stops this replica at the next entry: it does not lead for
    /// a while, rolls back what the attempt left (Check for pending process) and tries
    /// again with backoff.
    fn failed(&self, node: &mut Node, error: &Error) {
        if self.reporter.status.borrow().role == Role::Register {
            self.reporter.set_role(Role::Follower, None, "register failed");
        }
        if error.is_local_fault() {
            node.hold_off = Some(Instant::now() + HOLD_OFF);
            node.pending_check = true;
            node.retry.failed();
            let index = match error {
                Error::LocalFault { index, .. } | Error::Handler { index, .. } => *index,
                _ => node.lpi + 1,
            };
            self.note_fault(index, error);
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

    /// Restores a peer's snapshot when the entries after this replica's LPI were compacted
    /// away (see [`crate::state_transfer`]).
    async fn catch_up_if_behind(&self, node: &mut Node, first_index: u64) -> Result<()> {
        if node.lpi + 1 < first_index {
            node.lpi = self.catch_up(first_index, node.lpi).await?;
        }
        Ok(())
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
                || (quota.is_some() && s.quota != quota);
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
            if self.reporter.status.borrow().quota.is_some() || last.is_some_and(|at| at.elapsed() < Duration::from_secs(30)) {
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

    /// Watches the log up to SSI (into the [`crate::feed::Feed`]) and `cl`, and wakes the
    /// node loop when SSI or `cl` changes; re-watches after a broken stream (the periodic
    /// poll covers the gap, reading from etcd).
    ///
    /// A leader watches nothing: it wrote what the watch would show it, and every event
    /// would cost etcd an encoding and a send for nothing.
    async fn watch_changes(self: Arc<Self>, changes: Arc<Notify>) {
        let mut roles = self.reporter.status.subscribe();
        let leads = |status: &Status| matches!(status.role, Role::Leader | Role::Register);
        loop {
            while leads(&roles.borrow_and_update()) {
                if roles.changed().await.is_err() {
                    return;
                }
            }
            if let Ok((mut log, mut cl)) = self.store().watch_changes().await {
                // Where SSI stood when the watch began (it only reports changes).
                let ssi = self.store().progress_local().await.ok().map(|(ssi, _)| ssi);
                self.feed.restart(ssi);
                changes.notify_one();
                loop {
                    let (message, moved) = tokio::select! {
                        m = log.message() => {
                            let moved = matches!(&m, Ok(Some(m)) if self.feed.take_in(&self.keys, m.events()));
                            (m, moved)
                        }
                        m = cl.message() => {
                            self.cl_changed.store(true, Ordering::SeqCst);
                            (m, true)
                        }
                        _ = roles.changed() => {
                            if leads(&roles.borrow_and_update()) {
                                self.feed.restart(None);
                                break;
                            }
                            continue;
                        }
                    };
                    match message {
                        // A watch etcd cancelled (its start revision was compacted away
                        // while it lagged) delivers nothing more: watch again.
                        Ok(Some(message)) if !message.canceled() => {
                            if moved {
                                changes.notify_one();
                            }
                        }
                        _ => {
                            self.feed.restart(None);
                            changes.notify_one();
                            break;
                        }
                    }
                }
            }
            tokio::time::sleep(self.config.timings.follow_poll).await;
        }
    }

    /// Follow the Latest Service State: execute every Replication entry whose state is
    /// Success, in index order, up to SSI.
    async fn follow(self: &Arc<Self>, node: &mut Node) -> Result<()> {
        let started = Instant::now();
        let store = self.store();
        let poll = self.config.timings.follow_poll;
        if self.cl_changed.swap(false, Ordering::SeqCst) || node.cl_read.is_none_or(|at| at.elapsed() >= poll) {
            let leader = store.leader().await?.map(|(record, _)| record);
            node.cl_read = Some(Instant::now());
            if self.reporter.status.borrow().leader != leader {
                self.reporter.set_status(|s| s.leader = leader);
            }
        }
        // SSI from the watch; the compaction record (and SSI with it) read at most once
        // per poll interval, or every time while the watch is down.
        // `read`: SSI as read from the member this round, when it was.
        let watched = self.feed.ssi();
        let (ssi, first_index, read) = match node.compacted_read {
            Some((at, first_index)) if watched.is_some() && at.elapsed() < poll => {
                (watched.unwrap_or(0), first_index, None)
            }
            _ => {
                let (ssi, compacted) = store.progress_local().await?;
                let first_index = compacted.first_index.max(1);
                node.compacted_read = Some((Instant::now(), first_index));
                (ssi.max(watched.unwrap_or(0)), first_index, Some(ssi))
            }
        };
        if self.reporter.status.borrow().ssi != ssi || self.reporter.status.borrow().first_index != first_index {
            self.reporter.set_status(|s| {
                s.ssi = ssi;
                s.first_index = first_index;
            });
        }
        self.catch_up_if_behind(node, first_index).await?;
        if node.lpi >= ssi {
            self.follower_snapshot(node.lpi).await?;
            let (written, at) = node.lpi_written;
            if written != self.recoverable_lpi(node.lpi) && at.elapsed() >= poll {
                self.write_lpi(node).await?;
            }
            return Ok(());
        }
        let to = ssi.min(node.lpi + PAGE);
        self.feed.collect_from(node.lpi + 1);
        let mut entries = self.feed.entries(node.lpi + 1, to);
        self.reporter.stats.add_many(crate::stats::stage::FOLLOW_WATCHED, entries.len() as u64, Duration::ZERO);
        let read_from = entries.last().map_or(node.lpi, |e| e.index) + 1;
        if read_from <= to {
            // What the watch lacks is read, up to an SSI read first from the same member:
            // etcd tells watchers of a write a moment before reads can see it, so an
            // entry read right after the watch's SSI could still show its old state.
            let readable = match read {
                Some(ssi) => ssi,
                None => store.progress_local().await?.0,
            };
            if read_from <= to.min(readable) {
                entries.extend(store.entries_local(read_from, to.min(readable)).await?);
            }
        }
        for entry in entries {
            // SSI covers only recorded Replication entries: one that reads as not final
            // was read before its outcome became readable here. Passing it would skip its
            // execution for good; stop and read it again at the next round (a safeguard:
            // the reads above are bounded by an SSI read before them).
            let recorded =
                matches!(entry.state.state, ProcessState::Success | ProcessState::Fail | ProcessState::Ignore);
            if entry.state.kind == RequestKind::Replication && !recorded {
                warn!(replica = %self.config.replica, index = entry.index, ssi, state = ?entry.state.state,
                    "an entry SSI covers is not recorded in what this member answered yet: reading it again");
                break;
            }
            self.apply_if_recorded(entry.index, &entry.state, &entry.request).await?;
            if entry.state.kind == RequestKind::Replication
                && entry.state.state == ProcessState::Success
                && entry.index > self.state.applied_index()
            {
                let route = self.replication_route(&entry)?;
                let request = Request::from_entry(entry.index, entry.request.clone());
                // A local fault returns here: LPI stays below this entry.
                let outcome = self.execute(entry.index, route, request, false).await?;
                self.check_answer(entry.index, &entry.request, entry.state.response.as_ref(), &outcome)?;
            }
            self.idempotency.apply(entry.index, &entry.request, &entry.state);
            node.lpi = entry.index;
        }
        self.record.clear()?;
        if node.lpi_written.1.elapsed() >= poll {
            self.write_lpi(node).await?;
        }
        let (lpi, applied) = (node.lpi, self.state.applied_index());
        self.reporter.set_status(|s| {
            s.lpi = lpi;
            s.applied_index = applied;
        });
        self.follower_snapshot(lpi).await?;
        self.reporter.stats.add(crate::stats::stage::FOLLOW, started.elapsed());
        Ok(())
    }

    /// A follower's snapshot at `lpi` when one is due, the state persisted first (a
    /// follower persists only now and then, and the app captures persisted state).
    async fn follower_snapshot(self: &Arc<Self>, lpi: u64) -> Result<()> {
        if self.snapshot_due(lpi) {
            self.state.persist().await.map_err(Error::Persist)?;
            self.maybe_snapshot(lpi);
        }
        Ok(())
    }

    /// Makes the app state durable, then says in `lpi/<replica>` how far it reaches. A
    /// follower persists only here, once per poll interval, not after every round (an
    /// fsync per group on every follower competed with etcd's own for the disk): what
    /// `lpi` says is always durable, so compaction never deletes an entry a follower would
    /// need again after a crash, and the entries after it are replayed from etcd.
    async fn write_lpi(&self, node: &mut Node) -> Result<()> {
        self.state.persist().await.map_err(Error::Persist)?;
        let reported = self.recoverable_lpi(node.lpi);
        self.store().put(&self.keys.lpi(&self.config.replica), reported.to_string()).await?;
        node.lpi_written = (reported, Instant::now());
        Ok(())
    }

    fn replication_route(&self, entry: &StoredEntry) -> Result<&Route<S>> {
        self.route_of(&entry.request.method, &entry.request.path)
            .filter(|r| r.kind == RequestKind::Replication)
            .ok_or_else(|| Error::UnknownRoute {
                index: entry.index,
                method: entry.request.method.clone(),
                path: entry.request.path.clone(),
            })
    }

    /// Executes one entry through its handler, recording the step in the local record
    /// file around it; `observed` (Process Request only) also awaits the step observer.
    pub(crate) async fn execute(
        &self,
        index: u64,
        route: &Route<S>,
        request: Request,
        observed: bool,
    ) -> Result<Recorded> {
        self.record.write(index, Step::Executing, None)?;
        if observed {
            self.observe(Step::Executing, index).await;
        }
        let (method, path) = (request.method.clone(), request.path.clone());
        let outcome = guarded((route.handler)(self.state.clone(), request), self.config.limits.handler_timeout)
            .await
            .map_err(|fault| fault.at("handler", index, &method, &path))?;
        // A fault leaves the record file at Executing: Check for pending process rolls
        // the attempt back before anything else runs.
        let outcome = self.recordable(outcome, "handler", index, &method, &path)?;
        let reply = match &outcome {
            Ok(reply) | Err(reply) => reply.to_stored(),
        };
        self.record.write(index, Step::Executed, Some(reply))?;
        if observed {
            self.observe(Step::Executed, index).await;
        }
        Ok(outcome)
    }

    /// Runs a route's rollback for the entry at `index`, guarded like a handler.
    async fn roll_back(&self, rollback: &Rollback<S>, index: u64, entry: LogEntry) -> Result<()> {
        let (method, path) = (entry.method.clone(), entry.path.clone());
        guarded(rollback(self.state.clone(), Request::from_entry(index, entry)), self.config.limits.handler_timeout)
            .await
            .map_err(|fault| fault.at("rollback", index, &method, &path))?
            .map_err(|source| self.local_fault("rollback", index, &method, &path, source))
    }

    /// A handler's outcome as it is recorded (Success or Fail, the answer within the
    /// reply limit).
    ///
    /// # Errors
    /// [`Error::LocalFault`] for a [`Failure::Fault`]: never recorded.
    pub(crate) fn recordable(
        &self,
        outcome: Outcome,
        hook: &'static str,
        index: u64,
        method: &str,
        path: &str,
    ) -> Result<Recorded> {
        match outcome {
            Ok(reply) => Ok(self.storable(Ok(reply))),
            Err(Failure::Refused(reply)) => Ok(self.storable(Err(reply))),
            Err(Failure::Fault(source)) => Err(self.local_fault(hook, index, method, path, source)),
        }
    }

    /// The error for a local fault this replica's app reported in `hook`.
    pub(crate) fn local_fault(
        &self,
        hook: &'static str,
        index: u64,
        method: &str,
        path: &str,
        source: std::io::Error,
    ) -> Error {
        Error::LocalFault {
            replica: self.config.replica.clone(),
            hook,
            index,
            method: method.to_owned(),
            path: path.to_owned(),
            source,
        }
    }

    /// An outcome as it can be stored for retries: an answer over the reply limit keeps
    /// its status and says it was too large (etcd refuses requests over 1.5 MiB, and each
    /// answer is written with the entry's state and kept in every replica's idempotency
    /// table).
    pub(crate) fn storable(&self, outcome: Recorded) -> Recorded {
        let max = self.config.limits.max_reply;
        let shrink = |reply: Reply| {
            if reply.body.len() <= max {
                return reply;
            }
            warn!(status = reply.status, bytes = reply.body.len(), max, "a handler's answer is over the reply limit");
            let note = format!(
                "the answer was {} bytes, over the {max}-byte limit for answers of logged requests; \
                 the request's outcome stands, read its result through a read route",
                reply.body.len()
            );
            Reply {
                body: Reply::error(reply.status, &note).body,
                content_type: Some("application/json".into()),
                ..reply
            }
        };
        match outcome {
            Ok(reply) => Ok(shrink(reply)),
            Err(reply) => Err(shrink(reply)),
        }
    }

    pub(crate) async fn observe(&self, step: Step, index: u64) {
        if let Some(observer) = &self.observer {
            observer(step, index).await;
        }
    }

    /// Check for pending process: after a step-down or a restart, undo what an
    /// interrupted execution may have left, so that following brings this replica to
    /// exactly the service state.
    ///
    /// The paper executes the interrupted request at once. That is only right if the new
    /// leader keeps it; if the InProcess write did not land, the new leader marks it
    /// Ignore. So this replica only restores "not executed" here, and executes the
    /// request when following, if and only if its final state is Success.
    async fn check_pending(&self) -> Result<()> {
        let Some(record) = self.record.read()? else { return Ok(()) };
        match record.step {
            Step::BeforeExecution => {
                info!(index = record.index, "pending process: interrupted before execution; nothing to undo");
            }
            Step::Executed => {
                info!(index = record.index, "pending process: interrupted after execution; the effect stays");
            }
            Step::Executing => {
                let entry = self.store().entries(record.index, record.index).await?.pop();
                let Some(entry) = entry else {
                    return Err(Error::MissingRecord { key: self.keys.log(record.index) });
                };
                let route = self.route_of(&entry.request.method, &entry.request.path);
                match route.and_then(|r| r.rollback.clone()) {
                    Some(rollback) => {
                        info!(index = record.index, "pending process: interrupted during execution; rolling back");
                        self.roll_back(&rollback, entry.index, entry.request).await?;
                        self.state.persist().await.map_err(Error::Persist)?;
                    }
                    None => warn!(
                        index = record.index,
                        "pending process: interrupted during execution and the route has no rollback; \
                         trusting the app state's applied index"
                    ),
                }
            }
        }
        self.record.clear()?;
        let applied = self.state.applied_index();
        self.reporter.set_status(|s| {
            s.applied_index = applied;
            s.lpi = s.lpi.min(applied);
        });
        Ok(())
    }

    /// Follower -> Register -> Leader: take `cl`, run Prepare Service, publish the
    /// location, start serving.
    async fn register(self: &Arc<Self>, node: &mut Node) -> Result<()> {
        self.reporter.set_role(Role::Register, None, "leader condition holds");
        let store = self.store();
        // Every member lost its data: the backup recorded on chain is the service.
        if let Some(index) = self.restore_from_backup().await? {
            node.lpi = index;
        }
        let first_index = store.compacted().await?.first_index.max(1);
        self.reporter.set_status(|s| s.first_index = first_index);
        // Prepare Service replays the log from this replica's LPI: get a snapshot first.
        self.catch_up_if_behind(node, first_index).await?;
        let base = store.epoch_base(self.chain_epoch()).await?;
        let me = LeaderRecord { replica: self.config.replica.clone(), location: self.config.public_url.clone() };
        let term = store.take_leadership(&me, base).await?;
        info!(replica = %self.config.replica, epoch = term.epoch, "took the current-leader record");
        self.reporter.set_status(|s| {
            s.epoch = Some(term.epoch);
            s.leader = Some(me);
        });

        let ls = self.prepare_service(&term, node).await?;
        self.maybe_snapshot(ls);
        self.publish_location(term.epoch).await;
        node.leader = Some(LeaderTerm::start(self, term.clone(), ls + 1));
        self.reporter.set_role(Role::Leader, Some(term.epoch), "prepared");
        Ok(())
    }

    /// The on-chain epoch, the base for fresh etcd data (0 without a registry, or when
    /// the chain cannot be asked).
    async fn chain_epoch(&self) -> u64 {
        let Some(publisher) = &self.config.publisher else { return 0 };
        match publisher.registry.service_location(&self.config.service).await {
            Ok(resolved) => resolved.epoch,
            Err(e) => {
                warn!(error = %e, "could not read the on-chain epoch for fresh etcd data; starting from 0");
                0
            }
        }
    }

    /// Prepare Service (Table 1, lines 1-16): from this replica's LPI to LS, Null entries
    /// become Ignore; Replication entries that did not Fail are executed (InProcess ones
    /// too, and their outcome recorded); Normal entries left InProcess are in doubt.
    /// Returns LS.
    async fn prepare_service(&self, term: &Term, node: &mut Node) -> Result<u64> {
        let store = self.store();
        // Counts this term (for the paper's Table 2, which etcd's compacted history no
        // longer tells) and confirms the fence before anything else.
        let terms = store.get_index(&self.keys.terms()).await?;
        store.authority_write(term, vec![Op::counter(self.keys.terms(), terms + 1)]).await?;
        let ls = store.get_index(&self.keys.ls()).await?;
        let ssi = store.get_index(&self.keys.ssi()).await?;
        // Everything above SSI is still to be decided, whatever this replica applied.
        node.lpi = node.lpi.min(ssi);
        self.undo_unrecorded(ssi, ls).await?;
        let last_record = self.record.read()?;
        while node.lpi < ls {
            let page = store.entries(node.lpi + 1, ls.min(node.lpi + PAGE)).await?;
            let to = page.last().map_or(ls, |e| e.index);
            let mut ops = Vec::new();
            // Each entry as decided here, for the idempotency table once it is recorded.
            let mut passed = Vec::with_capacity(page.len());
            for entry in page {
                let index = entry.index;
                let kind = entry.state.kind;
                let decide = |state, response| EntryState { kind, state, epoch: term.epoch, response };
                let decided = match (entry.state.state, kind) {
                    (ProcessState::Null, _)
                    | (ProcessState::InProcess, RequestKind::ExternalTxn | RequestKind::Read) => {
                        Some(decide(ProcessState::Ignore, None))
                    }
                    (ProcessState::Success | ProcessState::InProcess, RequestKind::Replication) => {
                        let in_process = entry.state.state == ProcessState::InProcess;
                        let outcome = if index > self.state.applied_index() {
                            let route = self.replication_route(&entry)?;
                            let request = Request::from_entry(index, entry.request.clone());
                            let outcome = self.execute(index, route, request, false).await?;
                            if !in_process {
                                let recorded = entry.state.response.as_ref();
                                self.check_answer(index, &entry.request, recorded, &outcome)?;
                            }
                            Some(outcome)
                        } else if in_process {
                            // This replica executed it as leader and lost leadership
                            // before recording the outcome: the answer is in the record file.
                            let reply = last_record.as_ref().filter(|r| r.index == index).and_then(|r| r.reply.clone());
                            Some(Ok(reply.map_or_else(|| crate::faults::lost_answer(index), crate::Reply::from_stored)))
                        } else {
                            None
                        };
                        match (in_process, outcome) {
                            (true, Some(outcome)) => Some(recorded_state(kind, term.epoch, &outcome)),
                            _ => None,
                        }
                    }
                    (ProcessState::InProcess, RequestKind::Normal) => {
                        match self.route_of(&entry.request.method, &entry.request.path).filter(|r| r.apply.is_some()) {
                            // Its effect comes before everything after it: settle it now.
                            Some(route) => {
                                info!(index, "settling a payment a dead leader left unrecorded before going on");
                                let outcome = self.settle_until_decided(route, term, index, &entry.request).await?;
                                // Recorded, then applied, before the entries after it run.
                                let record =
                                    outcome_ops(&self.keys, index, kind, term.epoch, &outcome, &entry.request, None);
                                store.authority_write(term, record).await?;
                                let settled = recorded_state(kind, term.epoch, &outcome);
                                if let Ok(reply) = outcome {
                                    self.apply_recorded(route, index, &entry.request, reply).await?;
                                }
                                passed.push((index, entry.request, settled));
                                continue;
                            }
                            None => {
                                warn!(index, path = %entry.request.path, "Normal request left InProcess by a dead leader: in doubt");
                                ops.push(Op::Put(self.keys.doubt(index), Vec::new()));
                                None
                            }
                        }
                    }
                    (ProcessState::Success, RequestKind::Normal | RequestKind::ExternalTxn) => {
                        self.apply_if_recorded(index, &entry.state, &entry.request).await?;
                        None
                    }
                    _ => None,
                };
                if let Some(decided) = &decided {
                    ops.push(Op::Put(self.keys.rs(index), crate::codec::encode(decided)));
                }
                passed.push((index, entry.request, decided.unwrap_or(entry.state)));
            }
            self.state.persist().await.map_err(Error::Persist)?;
            ops.push(Op::counter(self.keys.lpi(&self.config.replica), self.recoverable_lpi(to)));
            ops.push(Op::counter(self.keys.ssi(), to));
            store.authority_write(term, ops).await?;
            for (index, request, state) in &passed {
                self.idempotency.apply(*index, request, state);
            }
            self.record.clear()?;
            node.lpi = to;
        }
        // Confirms the fence and that SSI reaches LS even when there was nothing to do.
        store
            .authority_write(
                term,
                vec![
                    Op::counter(self.keys.lpi(&self.config.replica), self.recoverable_lpi(ls)),
                    Op::counter(self.keys.ssi(), ls),
                ],
            )
            .await?;
        // Requests the outbox settles wait for the settler: the chain may take a while.
        let in_doubt = self.reconcile_in_doubt(term, false).await?;
        let ls = self.import_idempotency_records(term, ls).await?;
        node.lpi = ls;
        let applied = self.state.applied_index();
        self.reporter.set_status(|s| {
            s.ls = ls;
            s.ssi = ls;
            s.lpi = ls;
            s.applied_index = applied;
            s.in_doubt = in_doubt;
        });
        Ok(ls)
    }

    /// Moves the `idem/` records in etcd into the idempotency table (records of a service
    /// from before the table, and late answers of requests left in doubt): each batch as an
    /// import entry in the log, logged in the same transaction that deletes its records,
    /// so a record is always in one place or the other. Every replica adds them to its
    /// table when it passes the entry. Returns LS after them.
    async fn import_idempotency_records(&self, term: &Term, mut ls: u64) -> Result<u64> {
        use crate::idempotency::{IMPORT_PATH, Imported};
        /// Records per import entry: with the entry's own writes, one etcd transaction.
        const BATCH: i64 = 100;
        /// The most an import entry's body holds, bytes (answers are at most 512 KiB).
        const BODY: usize = 384 * 1024;
        let (from, to) = self.keys.idem_range();
        let mut start = from;
        loop {
            let page = self.store().values_in_page(&start, &to, BATCH).await?;
            let Some((last_key, _)) = page.last() else { return Ok(ls) };
            let mut next = last_key.clone();
            next.push(0);
            let (mut records, mut deletes, mut bytes) = (Vec::new(), Vec::new(), 0);
            for (key, value) in page {
                let client_key = self.keys.idem_key_of(&key).map(str::to_owned).ok_or_else(|| Error::CorruptRecord {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: "not an idempotency record's key".into(),
                });
                let imported = client_key.and_then(|client_key| {
                    let record: data::IdempotencyRecord = crate::codec::decode(&key, &value)?;
                    Ok(Imported {
                        key: client_key,
                        index: record.index,
                        fingerprint: record.fingerprint,
                        response: record.response,
                    })
                });
                match imported {
                    Ok(record) => {
                        let size = record.response.as_ref().map_or(0, |r| r.body.len()) + record.key.len() + 128;
                        if !records.is_empty() && bytes + size > BODY {
                            next = key;
                            break;
                        }
                        bytes += size;
                        records.push(record);
                        deletes.push(Op::Delete(String::from_utf8_lossy(&key).into_owned()));
                    }
                    // Left for an operator: a retry with its key is a new request.
                    Err(e) => error!(error = %e, "an unreadable idempotency record is not imported; it stays in etcd"),
                }
            }
            start = String::from_utf8_lossy(&next).into_owned();
            if records.is_empty() {
                continue;
            }
            let index = ls + 1;
            let count = records.len();
            let entry = LogEntry {
                method: "POST".into(),
                path: IMPORT_PATH.into(),
                query: None,
                headers: Vec::new(),
                body: crate::codec::encode(&records),
                idempotency_key: None,
                stamp: Some(self.stamp()),
            };
            let answer = Reply::json(200, &serde_json::json!({ "imported": count }));
            let state = recorded_state(RequestKind::ExternalTxn, term.epoch, &Ok(answer));
            let mut ops = vec![
                Op::Put(self.keys.log(index), crate::codec::encode(&entry)),
                Op::Put(self.keys.rs(index), crate::codec::encode(&state)),
                Op::counter(self.keys.ls(), index),
                Op::counter(self.keys.ssi(), index),
                Op::counter(self.keys.lpi(&self.config.replica), self.recoverable_lpi(index)),
            ];
            ops.extend(deletes);
            self.store().authority_write(term, ops).await?;
            self.idempotency.apply(index, &entry, &state);
            info!(index, records = count, "moved idempotency records from etcd into the idempotency table");
            ls = index;
        }
    }

    /// Rolls back what this replica executed above SSI without its outcome being
    /// recorded: a group it executed as leader just before losing leadership (or
    /// crashing). Prepare Service then executes those entries again and records their
    /// real answers; without this it would see them as already applied and leave them
    /// InProcess, answered to nobody and applied on this replica only.
    ///
    /// From the first such entry on, every Replication entry up to the applied index is
    /// rolled back, newest first (a later one may depend on it). A route without a
    /// rollback stops the undo there; its entries keep their effect, and Prepare Service
    /// records them with the answer from the record file when it has it.
    async fn undo_unrecorded(&self, ssi: u64, ls: u64) -> Result<()> {
        let applied = self.state.applied_index().min(ls);
        if applied <= ssi {
            return Ok(());
        }
        let mut executed = Vec::new();
        let mut from = ssi + 1;
        while from <= applied {
            let page = self.store().entries(from, applied).await?;
            from = page.last().map_or(applied, |e| e.index) + 1;
            executed.extend(page);
        }
        let unrecorded = |e: &StoredEntry| {
            e.state.kind == RequestKind::Replication
                && !matches!(e.state.state, ProcessState::Success | ProcessState::Fail)
        };
        let Some(first) = executed.iter().position(unrecorded) else { return Ok(()) };
        for entry in executed[first..].iter().rev() {
            if entry.state.kind != RequestKind::Replication {
                continue;
            }
            let route = self.route_of(&entry.request.method, &entry.request.path);
            let Some(rollback) = route.and_then(|r| r.rollback.clone()) else {
                warn!(
                    index = entry.index,
                    "executed without a recorded outcome and the route has no rollback: keeping its effect"
                );
                break;
            };
            info!(index = entry.index, "rolling back an execution whose outcome was never recorded");
            self.roll_back(&rollback, entry.index, entry.request.clone()).await?;
        }
        self.state.persist().await.map_err(Error::Persist)
    }

    /// The idempotency lease when `request` has a key: a request settled after every
    /// replica passed it in doubt has its answer written into a leased record too.
    async fn lease_for(&self, lease: &IdempotencyLease, request: &LogEntry) -> Result<Option<i64>> {
        match request.idempotency_key {
            Some(_) => Ok(Some(lease.get(self).await?)),
            None => Ok(None),
        }
    }

    /// The outbox of the request at `index` when it is an only-once request and the
    /// runtime has an outbox.
    pub(crate) fn outbox_for(&self, kind: RequestKind, term: &Term, index: u64) -> Option<crate::outbox::Outbox> {
        let chain = self.chain.as_ref().filter(|_| kind == RequestKind::Normal)?;
        Some(crate::outbox::Outbox::new(chain.clone(), self.store().clone(), self.keys.clone(), term.clone(), index))
    }

    /// While this replica leads: settles the requests left in doubt whose route sends
    /// transactions through the outbox, by running them again (the outbox hands back
    /// what it stored), soon after one is left in doubt and every few seconds.
    pub(crate) async fn settle_while_leading(self: Arc<Self>, term: Term) -> Result<()> {
        if self.chain.is_none() {
            return Ok(());
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = self.settle_now.notified() => {}
            }
            match self.reconcile_in_doubt(&term, true).await {
                Ok(left) => self.reporter.set_status(|s| s.in_doubt = left),
                Err(e @ Error::LeadershipLost { .. }) => return Err(e),
                Err(e) => warn!(error = %e, "could not settle the requests in doubt; trying again"),
            }
        }
    }

    /// Settles in-doubt Normal requests whose route has a reconcile hook and, when
    /// `replay`, those whose route sends transactions through the outbox (by running them
    /// again); returns the ones still in doubt.
    async fn reconcile_in_doubt(&self, term: &Term, replay: bool) -> Result<Vec<u64>> {
        let store = self.store();
        let mut left = Vec::new();
        let lease = IdempotencyLease::default();
        for index in store.indexes_under(&self.keys.doubt_prefix()).await? {
            let Some(entry) = store.entries(index, index).await?.pop() else { continue };
            let route = self.route_of(&entry.request.method, &entry.request.path);
            let answer = match route {
                Some(route) if route.reconcile.is_some() => {
                    let reconcile = route.reconcile.clone().expect("checked");
                    let asked = reconcile(self.state.clone(), Request::from_entry(index, entry.request.clone()));
                    let (method, path) = (&entry.request.method, &entry.request.path);
                    match guarded(asked, self.config.limits.handler_timeout).await {
                        Ok(answer) => answer.and_then(|outcome| {
                            self.recordable(outcome, "reconcile hook", index, method, path)
                                .inspect_err(|error| warn!(%error, "the request stays in doubt"))
                                .ok()
                        }),
                        Err(fault) => {
                            let error = fault.at("reconcile hook", index, &entry.request.method, &entry.request.path);
                            warn!(%error, "the request stays in doubt");
                            None
                        }
                    }
                }
                Some(route) if replay && route.replayable => self.run_again(route, term, index, &entry.request).await?,
                _ => None,
            };
            match answer {
                Some(outcome) => {
                    info!(index, success = outcome.is_ok(), "in-doubt request reconciled");
                    let lease = self.lease_for(&lease, &entry.request).await?;
                    let mut ops =
                        outcome_ops(&self.keys, index, entry.state.kind, term.epoch, &outcome, &entry.request, lease);
                    ops.push(Op::Delete(self.keys.doubt(index)));
                    store.authority_write(term, ops).await?;
                }
                None => left.push(index),
            }
        }
        if !left.is_empty() {
            warn!(in_doubt = ?left, "Normal requests remain in doubt; see /br2k/status");
        }
        Ok(left)
    }

    /// Runs an in-doubt only-once request again with its outbox: its outcome, or `None`
    /// while a transaction is still unsettled (or the handler failed).
    async fn run_again(&self, route: &Route<S>, term: &Term, index: u64, entry: &LogEntry) -> Result<Option<Recorded>> {
        let mut request = Request::from_entry(index, entry.clone());
        let Some(outbox) = self.outbox_for(RequestKind::Normal, term, index) else { return Ok(None) };
        request.outbox = Some(outbox.clone());
        let ran = guarded((route.handler)(self.state.clone(), request), self.config.limits.handler_timeout).await;
        if outbox.leadership_lost() {
            return Err(Error::LeadershipLost { epoch: term.epoch });
        }
        Ok(match ran {
            Ok(_) if outbox.unsettled() => None,
            Ok(outcome) => match self.recordable(outcome, "handler", index, &entry.method, &entry.path) {
                Ok(recorded) => Some(recorded),
                Err(error) => {
                    warn!(%error, "the request stays in doubt");
                    None
                }
            },
            Err(fault) => {
                warn!(error = %fault.at("handler", index, &entry.method, &entry.path), "the request stays in doubt");
                None
            }
        })
    }

    /// Runs an only-once request whose effect later requests wait for until the outbox
    /// settles it (the chain answering again, a lingering transaction mined), checking
    /// between attempts that this replica still leads.
    pub(crate) async fn settle_until_decided(
        &self,
        route: &Route<S>,
        term: &Term,
        index: u64,
        entry: &LogEntry,
    ) -> Result<Recorded> {
        let mut attempts = 0u32;
        loop {
            // A later request's stored transaction may hold a lower nonce that was never
            // broadcast (its leader died), or that a reorg dropped while no leader ran:
            // this one cannot be mined before it. Broadcast those first, not only after a
            // whole settle_within of waiting (the testbed's reorgs under leader kills
            // held a payout 30 s behind such a gap).
            if let Some(chain) = &self.chain {
                chain.rebroadcast_after(self.store(), &self.keys, index).await;
            }
            if let Some(outcome) = self.run_again(route, term, index, entry).await? {
                return Ok(outcome);
            }
            attempts += 1;
            if attempts == 1 {
                warn!(index, "a payment is not settled yet; the requests after it wait for it");
                self.reporter.set_status(|s| {
                    if !s.in_doubt.contains(&index) {
                        s.in_doubt.push(index);
                    }
                });
            }
            // Still the leader? (A write fenced by the term, with nothing in it.)
            self.store().authority_write(term, Vec::new()).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Applies the entry at `index` from its record if it is an only-once or External_TXN
    /// Success this replica has not applied yet and its route has an effect (followers,
    /// Prepare Service and restores all go through here).
    pub(crate) async fn apply_if_recorded(&self, index: u64, state: &EntryState, entry: &LogEntry) -> Result<()> {
        let recorded = matches!(state.kind, RequestKind::Normal | RequestKind::ExternalTxn)
            && state.state == ProcessState::Success
            && index > self.state.applied_index();
        if recorded
            && let (Some(route), Some(response)) = (self.route_of(&entry.method, &entry.path), state.response.clone())
        {
            self.apply_recorded(route, index, entry, Reply::from_stored(response)).await?;
        }
        Ok(())
    }

    /// Applies a recorded Success of `route` (only-once or External_TXN) to the replicated
    /// state, as every replica does in log order.
    pub(crate) async fn apply_recorded(
        &self,
        route: &Route<S>,
        index: u64,
        entry: &LogEntry,
        reply: Reply,
    ) -> Result<()> {
        let Some(apply) = &route.apply else { return Ok(()) };
        let request = Request::from_entry(index, entry.clone());
        guarded(apply(self.state.clone(), request, reply), self.config.limits.handler_timeout)
            .await
            .map_err(|fault| fault.at("apply hook", index, &entry.method, &entry.path))?
            .map_err(|source| self.local_fault("apply hook", index, &entry.method, &entry.path, source))?;
        self.reporter.set_status(|s| s.in_doubt.retain(|&i| i != index));
        Ok(())
    }

    /// Publishes `updateLocation(id, location, epoch)` before serving; if the chain cannot
    /// be reached, serves anyway and keeps trying in the background while this term lasts.
    async fn publish_location(self: &Arc<Self>, epoch: u64) {
        let Some(publisher) = self.config.publisher.clone() else {
            info!("no registry configured: the leader's location is not published");
            return;
        };
        let this = self.clone();
        let attempt = move || {
            let (publisher, this) = (publisher.clone(), this.clone());
            async move {
                let result =
                    publisher.registry.update_location(&this.config.service, &this.config.public_url, epoch).await;
                match result {
                    Ok(tx) => {
                        info!(epoch, location = %this.config.public_url, tx = %tx.hash, "location published");
                        this.reporter.set_status(|s| s.published_epoch = Some(epoch));
                        true
                    }
                    Err(e) if e.is_unreachable() => {
                        warn!(epoch, error = %e, "chain unreachable: serving anyway, will retry publishing");
                        false
                    }
                    Err(e) => {
                        error!(epoch, error = %e, "the registry refused the location; clients follow the Br2k-Leader hints");
                        true
                    }
                }
            }
        };
        if attempt().await {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(this.config.timings.publish_retry).await;
                if this.reporter.status.borrow().epoch != Some(epoch) || attempt().await {
                    break;
                }
            }
        });
    }

    /// Leader -> Follower: stop taking requests, stop the term's tasks (interrupting an
    /// execution if one runs), then Check for pending process before following.
    async fn step_down(&self, node: &mut Node, reason: &str) {
        let Some(term) = node.leader.take() else { return };
        *self.submit.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        term.stop().await;
        self.reporter.set_role(Role::Follower, None, reason);
        node.pending_check = true;
        node.lpi = self.start_index();
    }
}

/// The final state that records `outcome`.
fn recorded_state(kind: RequestKind, epoch: u64, outcome: &Recorded) -> EntryState {
    let (state, reply) = match outcome {
        Ok(reply) => (ProcessState::Success, reply),
        Err(reply) => (ProcessState::Fail, reply),
    };
    EntryState { kind, state, epoch, response: Some(reply.to_stored()) }
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

/// How long the front waits on a full request queue before answering 503.
pub(crate) const QUEUE_WAIT: Duration = Duration::from_millis(500);
