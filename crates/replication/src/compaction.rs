//! Log compaction, by the leader, for as long as its term lasts.
//!
//! After each of its own snapshots (and every few seconds, for followers that caught up
//! since), the leader deletes the log entries below `snapshot index - trailing` in one
//! fenced transaction, then compacts etcd's history to that transaction's revision, so the
//! database stops growing. It never deletes:
//! - what a live replica may need again (its `lpi/<replica>` says how far it has applied,
//!   but no further than its latest snapshot, from which it rebuilds its idempotency table
//!   after a crash; a dead or cut-off replica is not live once its membership lease
//!   expires, so it never blocks compaction, and catches up from a snapshot when it
//!   returns);
//! - an entry that is not final (an in-doubt Normal request waits for its reconcile).
//!
//! The same transaction moves `compacted`: the new first index, plus a tally of what was
//! deleted, so counts over the whole log survive. Indexes never restart. A leader killed
//! half-way leaves either the old log or the compacted one: the delete and the record are
//! one transaction, and compacting etcd's history again is harmless.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::app::AppState;
use crate::config::{Config, SnapshotPolicy};
use crate::data::Keys;
use crate::error::{Error, Result};
use crate::reporter::Reporter;
use crate::state_transfer::Snapshots;
use crate::store::{Op, Store, Term};

/// How often the leader looks again without a new snapshot.
const RECHECK: Duration = Duration::from_secs(5);

/// What the leader's compaction works with.
pub(crate) struct Compactor<S> {
    replica: String,
    policy: SnapshotPolicy,
    keys: Keys,
    store: Store,
    snapshots: Arc<Snapshots<S>>,
    reporter: Arc<Reporter>,
}

impl<S: AppState> Compactor<S> {
    pub(crate) fn new(
        config: &Config,
        keys: Keys,
        store: Store,
        snapshots: Arc<Snapshots<S>>,
        reporter: Arc<Reporter>,
    ) -> Self {
        Self { replica: config.replica.clone(), policy: config.snapshots, keys, store, snapshots, reporter }
    }

    /// The leader's compaction task; ends the term only when leadership is lost.
    pub(crate) async fn run(self, term: Term) -> Result<()> {
        if !self.policy.enabled() {
            return Ok(());
        }
        loop {
            match self.compact_once(&term).await {
                Ok(()) => {}
                Err(e) if e.ends_term() => return Err(e),
                Err(e) => warn!(error = %e, "log compaction failed; will try again"),
            }
            tokio::select! {
                () = self.snapshots.taken.notified() => {}
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// One compaction, if there is anything to delete.
    async fn compact_once(&self, term: &Term) -> Result<()> {
        let Some(snapshot) = self.snapshots.latest() else { return Ok(()) };
        let store = &self.store;
        let keys = &self.keys;
        let compacted = store.compacted().await?;
        let first = compacted.first_index.max(1);
        // Entries below `target` go; `target` becomes the first index.
        let mut target = snapshot.index.saturating_sub(self.policy.trailing);
        if target <= first {
            return Ok(());
        }
        let mut held_by = None;
        for (replica, record) in store.members().await? {
            if replica == self.replica || record.catching_up || record.diverged.is_some() {
                continue;
            }
            // An unreadable LPI holds compaction back (as 0) rather than stopping it: the
            // replica rewrites it as it follows.
            let applied = match store.get_index(&keys.lpi(&replica)).await {
                Err(e @ Error::CorruptRecord { .. }) => {
                    warn!(%replica, error = %e, "unreadable LPI: compaction waits for the replica to rewrite it");
                    0
                }
                applied => applied?,
            };
            if applied + 1 < target {
                target = applied + 1;
                held_by = Some(replica);
            }
        }
        if let Some(&doubt) = store.indexes_under(&keys.doubt_prefix()).await?.first() {
            target = target.min(doubt);
        }
        if target <= first {
            if let Some(replica) = held_by {
                tracing::debug!(%replica, "compaction waits for a live replica to apply more of the log");
            }
            return Ok(());
        }

        let mut tally = compacted.clone();
        let mut from = first;
        'count: while from < target {
            let page = store.states(from, target).await?;
            let Some(&(last, _)) = page.last() else { break };
            for (index, state) in page {
                // Not final: it must stay, and so must everything after it.
                if !tally.count(&state) {
                    target = index;
                    break 'count;
                }
            }
            from = last + 1;
        }
        if target <= first {
            return Ok(());
        }
        tally.first_index = target;
        let ops = vec![
            Op::DeleteRange(keys.log(first), keys.log(target)),
            Op::DeleteRange(keys.rs(first), keys.rs(target)),
            // The transactions of final requests: settled, their answers recorded.
            Op::DeleteRange(keys.outbox().tx_start(), keys.outbox().tx_before(target)),
            Op::Put(keys.compacted(), crate::codec::encode(&tally)),
        ];
        let revision = store.authority_write(term, ops).await?;
        self.reporter.set_status(|s| s.first_index = target);
        store.compact_history(revision).await?;
        info!(
            deleted = target - first,
            first_index = target,
            snapshot = snapshot.index,
            revision,
            "log compacted: entries below the first index deleted, etcd history compacted"
        );
        Ok(())
    }
}
