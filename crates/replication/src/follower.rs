//! The follower role: Follow the Latest Service State (paper Fig. 3). A follower executes
//! every Replication entry whose state is Success, in index order, up to SSI, applies the
//! recorded effects of the others, and reports in `lpi/<replica>` how far it has durably
//! gone. Its watch task turns etcd's watch of the log and of `cl` into the feed it reads
//! entries from, so that it rarely reads etcd itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::warn;

use crate::app::{AppState, Request};
use crate::config::Config;
use crate::data::{Keys, ProcessState, RequestKind};
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::faults::Faults;
use crate::feed::Feed;
use crate::idempotency::IdempotencyTable;
use crate::reporter::Reporter;
use crate::state_transfer::Snapshots;
use crate::status::{Role, Status};
use crate::store::Store;

/// How many entries a follower or a Register reads and applies at a time.
pub(crate) const PAGE: u64 = 256;

/// Where a replica stands in the log, and what the follower last read and wrote.
pub(crate) struct Following {
    /// Latest processed index (LPI).
    pub(crate) lpi: u64,
    /// The LPI last reported in `lpi/<replica>`, and when: a follower writes it at most
    /// once per poll interval, so that followers do not double the cluster's writes.
    pub(crate) lpi_written: (u64, Instant),
    /// When `cl` was last read by the follower (it is read again on a `cl` event or
    /// after a poll interval).
    pub(crate) cl_read: Option<Instant>,
    /// When the follower last read the compaction record, and its first index.
    pub(crate) compacted_read: Option<(Instant, u64)>,
}

impl Following {
    /// A replica that has processed up to `lpi` and reported nothing yet.
    pub(crate) fn at(lpi: u64) -> Self {
        Self { lpi, lpi_written: (u64::MAX, Instant::now()), cl_read: None, compacted_read: None }
    }
}

/// What the follower works with.
pub(crate) struct Follower<S> {
    replica: String,
    poll: Duration,
    keys: Keys,
    store: Store,
    /// The entries and SSI the watch task delivers.
    pub(crate) feed: Arc<Feed>,
    /// Set by the watch task when `cl` changes.
    cl_changed: AtomicBool,
    executor: Arc<Executor<S>>,
    snapshots: Arc<Snapshots<S>>,
    idempotency: Arc<IdempotencyTable>,
    faults: Arc<Faults>,
    reporter: Arc<Reporter>,
}

impl<S: AppState> Follower<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: &Config,
        keys: Keys,
        store: Store,
        executor: Arc<Executor<S>>,
        snapshots: Arc<Snapshots<S>>,
        idempotency: Arc<IdempotencyTable>,
        faults: Arc<Faults>,
        reporter: Arc<Reporter>,
    ) -> Self {
        Self {
            replica: config.replica.clone(),
            poll: config.timings.follow_poll,
            keys,
            store,
            feed: Arc::new(Feed::default()),
            cl_changed: AtomicBool::new(true),
            executor,
            snapshots,
            idempotency,
            faults,
            reporter,
        }
    }

    /// Watches the log up to SSI (into the [`crate::feed::Feed`]) and `cl`, and wakes the
    /// node loop when SSI or `cl` changes; re-watches after a broken stream (the periodic
    /// poll covers the gap, reading from etcd).
    ///
    /// A leader watches nothing: it wrote what the watch would show it, and every event
    /// would cost etcd an encoding and a send for nothing.
    pub(crate) async fn watch_changes(self: Arc<Self>, changes: Arc<Notify>) {
        let mut roles = self.reporter.status.subscribe();
        let leads = |status: &Status| matches!(status.role, Role::Leader | Role::Register);
        loop {
            while leads(&roles.borrow_and_update()) {
                if roles.changed().await.is_err() {
                    return;
                }
            }
            if let Ok((mut log, mut cl)) = self.store.watch_changes().await {
                // Where SSI stood when the watch began (it only reports changes).
                let ssi = self.store.progress_local().await.ok().map(|(ssi, _)| ssi);
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
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Follow the Latest Service State: execute every Replication entry whose state is
    /// Success, in index order, up to SSI.
    pub(crate) async fn follow(&self, node: &mut Following) -> Result<()> {
        let started = Instant::now();
        let store = &self.store;
        let poll = self.poll;
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
            if written != self.snapshots.recoverable_lpi(node.lpi) && at.elapsed() >= poll {
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
                warn!(replica = %self.replica, index = entry.index, ssi, state = ?entry.state.state,
                    "an entry SSI covers is not recorded in what this member answered yet: reading it again");
                break;
            }
            self.executor.apply_if_recorded(entry.index, &entry.state, &entry.request).await?;
            if entry.state.kind == RequestKind::Replication
                && entry.state.state == ProcessState::Success
                && entry.index > self.executor.state.applied_index()
            {
                let route = self.executor.replication_route(&entry)?;
                let request = Request::from_entry(entry.index, entry.request.clone());
                // A local fault returns here: LPI stays below this entry.
                let outcome = self.executor.execute(entry.index, route, request, false).await?;
                self.faults.check_answer(entry.index, &entry.request, entry.state.response.as_ref(), &outcome)?;
            }
            self.idempotency.apply(entry.index, &entry.request, &entry.state);
            node.lpi = entry.index;
        }
        self.executor.record.clear()?;
        if node.lpi_written.1.elapsed() >= poll {
            self.write_lpi(node).await?;
        }
        let (lpi, applied) = (node.lpi, self.executor.state.applied_index());
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
    async fn follower_snapshot(&self, lpi: u64) -> Result<()> {
        if self.snapshots.due(lpi) {
            self.executor.state.persist().await.map_err(Error::Persist)?;
            self.snapshots.maybe_take(lpi);
        }
        Ok(())
    }

    /// Makes the app state durable, then says in `lpi/<replica>` how far it reaches. A
    /// follower persists only here, once per poll interval, not after every round (an
    /// fsync per group on every follower competed with etcd's own for the disk): what
    /// `lpi` says is always durable, so compaction never deletes an entry a follower would
    /// need again after a crash, and the entries after it are replayed from etcd.
    pub(crate) async fn write_lpi(&self, node: &mut Following) -> Result<()> {
        self.executor.state.persist().await.map_err(Error::Persist)?;
        let reported = self.snapshots.recoverable_lpi(node.lpi);
        self.store.put(&self.keys.lpi(&self.replica), reported.to_string()).await?;
        node.lpi_written = (reported, Instant::now());
        Ok(())
    }

    /// Restores a peer's snapshot when the entries after this replica's LPI were compacted
    /// away (see [`crate::state_transfer`]).
    pub(crate) async fn catch_up_if_behind(&self, node: &mut Following, first_index: u64) -> Result<()> {
        if node.lpi + 1 < first_index {
            node.lpi = self.snapshots.catch_up(&self.store, first_index, node.lpi).await?;
        }
        Ok(())
    }
}
