//! Snapshots of the app state: taking them every so many entries, and catching up from a
//! peer's when this replica is behind the first index still in etcd.
//!
//! **Taking.** After a follower applies a page, after the leader records a group, and
//! after Prepare Service, the runtime asks [`Runtime::maybe_snapshot`] with its LPI. A
//! snapshot is due every [`crate::SnapshotPolicy::interval`] entries, and also as soon as
//! the log has been compacted past this replica's latest snapshot (so every live replica
//! can serve a snapshot a lagging one can replay from). The app captures its state at once
//! (nothing executes meanwhile); the bytes are written on a blocking thread while requests
//! carry on.
//!
//! **Catching up.** A replica whose LPI is below `first_index - 1` (a wiped disk, a new
//! node, a long partition) fetches the newest snapshot a live peer advertises in its
//! membership record, with the peer token, checks its size and digest against that
//! record, restores it through the app, and replays the retained log from there. A
//! snapshot that fails any check is discarded and the replica tries another peer, or
//! again on its next wake-up; its own state is untouched until a snapshot has passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use tokio::sync::Notify;

use crate::app::AppState;
use crate::config::{Config, SnapshotPolicy};
use crate::data::{Keys, MemberRecord, SnapshotMeta};
use crate::error::{Error, Result};
use crate::idempotency::IdempotencyTable;
use crate::membership::Membership;
use crate::record_file::RecordFile;
use crate::reporter::Reporter;
use crate::snapshot::{Lineage, SnapshotStore, digest_of};
use crate::store::Store;
use crate::sync::lock;

/// The header carrying the peer token on a snapshot fetch.
pub(crate) const PEER_TOKEN_HEADER: &str = "br2k-peer-token";

/// How long a snapshot download may go without receiving a byte.
const FETCH_STALL: Duration = Duration::from_secs(10);

/// Why a peer's advertised snapshot is not fetched, if it is not: its index is above `ssi`
/// (what the service settled), its size above `max`, or its front's URL is not a plain
/// `http(s)://host[:port]` (a path, query or credentials would let a record aim the peer
/// token anywhere the replica can reach).
fn refuse_record(record: &MemberRecord, meta: &SnapshotMeta, ssi: u64, max: u64) -> Option<String> {
    if meta.index > ssi {
        return Some(format!("it claims index {}, above the service's settled {ssi}", meta.index));
    }
    if meta.size > max {
        return Some(format!(
            "it claims {} bytes, over the {max} this replica takes (--max-snapshot-bytes)",
            meta.size
        ));
    }
    let url = match reqwest::Url::parse(&record.url) {
        Ok(url) => url,
        Err(e) => return Some(format!("its front's URL {:?} does not parse: {e}", record.url)),
    };
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none();
    (!plain).then(|| format!("its front's URL {:?} is not a plain http(s)://host:port", record.url))
}

/// This replica's snapshots as the runtime tracks them.
#[derive(Debug, Default)]
pub(crate) struct SnapshotState {
    /// The latest complete snapshot.
    pub(crate) latest: Option<SnapshotMeta>,
    /// Whether one is being written.
    pub(crate) building: bool,
    /// The state version of this replica's state.
    pub(crate) state_version: u64,
}

/// This replica's snapshots: the ones on disk, taking new ones, and catching up from a
/// peer's. It holds what it works on (the app, the idempotency table that goes into every
/// snapshot, the record file a restore clears) and reports through the status sink and the
/// membership record; the store is given to each call that reads etcd.
pub(crate) struct Snapshots<S> {
    replica: String,
    policy: SnapshotPolicy,
    /// The largest snapshot fetched from a peer.
    max_bytes: u64,
    keys: Keys,
    /// The snapshot files.
    pub(crate) disk: SnapshotStore,
    /// The latest of them, and whether one is being written.
    state: std::sync::Mutex<SnapshotState>,
    /// Woken when a snapshot completes (the leader's compaction waits on it).
    pub(crate) taken: Notify,
    app: Arc<S>,
    idempotency: Arc<IdempotencyTable>,
    record: RecordFile,
    reporter: Arc<Reporter>,
    membership: Arc<Membership>,
    /// For fetching peers' snapshots; never follows a redirect.
    http: reqwest::Client,
}

impl<S: AppState> Snapshots<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: &Config,
        keys: Keys,
        app: Arc<S>,
        idempotency: Arc<IdempotencyTable>,
        record: RecordFile,
        reporter: Arc<Reporter>,
        membership: Arc<Membership>,
        http: reqwest::Client,
    ) -> Self {
        Self {
            replica: config.replica.clone(),
            policy: config.snapshots,
            max_bytes: config.limits.max_snapshot_bytes,
            keys,
            disk: SnapshotStore::new(&config.data_dir),
            state: std::sync::Mutex::default(),
            taken: Notify::new(),
            app,
            idempotency,
            record,
            reporter,
            membership,
            http,
        }
    }

    /// At start-up: finishes a restore a crash interrupted, and loads what the snapshot
    /// directory holds.
    pub(crate) async fn open(&self) -> Result<()> {
        self.disk.open()?;
        let lineage = self.disk.lineage()?;
        if let Some(meta) = &lineage.restoring {
            warn!(index = meta.index, "a snapshot restore was interrupted; restoring it again");
            self.restore_adopted(meta).await?;
        }
        let lineage = self.disk.lineage()?;
        let latest = self.disk.latest()?;
        let index = latest.as_ref().map_or(0, |m| m.index);
        // The idempotency table is durable in the snapshots: start from the latest one's
        // (the node loop replays the retained log from there).
        match latest.as_ref().map(|m| crate::snapshot::read_table(&self.disk.data_path(m.index))) {
            Some(Ok(Some(table))) => self.idempotency.replace(table),
            Some(Ok(None)) => {
                info!(index, "the latest snapshot is from before the idempotency table: the table starts empty there");
                self.idempotency.reset(index);
            }
            Some(Err(e)) => return Err(e),
            None => self.idempotency.reset(0),
        }
        {
            let mut snapshot = lock(&self.state);
            snapshot.latest.clone_from(&latest);
            snapshot.state_version = lineage.state_version;
        }
        self.membership.set(|m| m.snapshot.clone_from(&latest));
        self.reporter.set_status(|s| {
            s.snapshot_index = index;
            s.state_version = lineage.state_version;
        });
        Ok(())
    }

    /// The LPI this replica reports in `lpi/<replica>` (what compaction keeps the log for)
    /// when it has processed up to `lpi`: no further than its latest snapshot, because its
    /// idempotency table is durable only there, and after a crash it replays the log from
    /// it. Without snapshots nothing is compacted, and it reports `lpi`.
    pub(crate) fn recoverable_lpi(&self, lpi: u64) -> u64 {
        if !self.policy.enabled() {
            return lpi;
        }
        lpi.min(self.latest().map_or(0, |m| m.index))
    }

    /// The latest complete snapshot of this replica.
    pub(crate) fn latest(&self) -> Option<SnapshotMeta> {
        lock(&self.state).latest.clone()
    }

    /// Whether a snapshot at `index` is due (and none is being written).
    pub(crate) fn due(&self, index: u64) -> bool {
        let policy = self.policy;
        if !policy.enabled() {
            return false;
        }
        let first_index = self.reporter.status.borrow().first_index;
        let snapshot = lock(&self.state);
        let last = snapshot.latest.as_ref().map_or(0, |m| m.index);
        let periodic = index >= last + policy.interval;
        // The log was compacted past our latest snapshot: take one a lagging peer can use.
        let needed_by_peers = first_index > last + 1 && index + 1 >= first_index && index > last;
        !snapshot.building && (periodic || needed_by_peers)
    }

    /// Takes a snapshot at `index` if one is due. Call only while nothing executes and
    /// every entry up to `index` is applied, persisted and final.
    pub(crate) fn maybe_take(self: &Arc<Self>, index: u64) {
        if !self.due(index) {
            return;
        }
        let mut snapshot = lock(&self.state);
        if snapshot.building {
            return;
        }
        // The table must be at the snapshot's index too (a replica that stepped down
        // passes again entries its table has: it waits until it is past them).
        if self.idempotency.applied() != index {
            return;
        }
        let builder = match self.app.snapshot() {
            Ok(app) => Box::new(crate::snapshot::Envelope { table: self.idempotency.capture(), app }),
            Err(e) => {
                warn!(index, error = %e, "the app could not capture its state for a snapshot; will try again");
                return;
            }
        };
        snapshot.building = true;
        let state_version = snapshot.state_version;
        drop(snapshot);
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let store = this.disk.clone();
            let replica = this.replica.clone();
            let saved = tokio::task::spawn_blocking(move || store.save(builder, index, state_version, &replica)).await;
            let saved = saved.unwrap_or_else(|e| {
                Err(Error::Snapshot { path: "snapshot".into(), reason: format!("the snapshot writer panicked: {e}") })
            });
            match saved {
                Ok(meta) => {
                    info!(index, bytes = meta.size, digest = %meta.digest,
                        ms = started.elapsed().as_millis() as u64, "snapshot taken");
                    this.done(meta);
                }
                Err(e) => warn!(index, error = %e, "snapshot failed; will try again"),
            }
            // Only now, so that no second build starts from the snapshot before this one.
            lock(&this.state).building = false;
        });
    }

    /// Records a new complete snapshot (taken here or restored from a peer).
    fn done(&self, meta: SnapshotMeta) {
        {
            let mut snapshot = lock(&self.state);
            if snapshot.latest.as_ref().is_some_and(|l| l.index >= meta.index) {
                return;
            }
            snapshot.latest = Some(meta.clone());
        }
        self.reporter.set_status(|s| s.snapshot_index = meta.index);
        self.membership.set(|m| m.snapshot = Some(meta));
        self.taken.notify_one();
    }

    /// Brings this replica, whose LPI is below `first_index - 1`, up to a peer's snapshot.
    /// Returns the snapshot's index: the new LPI.
    ///
    /// # Errors
    /// [`Error::NoSnapshotSource`] when no live peer holds a recent enough snapshot yet;
    /// the last peer's error when every one failed. The state is unchanged in both cases.
    pub(crate) async fn catch_up(&self, store: &Store, first_index: u64, lpi: u64) -> Result<u64> {
        let needed = first_index.saturating_sub(1);
        self.membership.set(|m| m.catching_up = true);
        let result = self.catch_up_from_peers(store, first_index, needed, lpi).await;
        self.membership.set(|m| m.catching_up = false);
        result
    }

    async fn catch_up_from_peers(&self, store: &Store, first_index: u64, needed: u64, lpi: u64) -> Result<u64> {
        let mut peers: Vec<(String, MemberRecord, SnapshotMeta)> = store
            .members()
            .await?
            .into_iter()
            .filter(|(replica, record)| *replica != self.replica && !record.catching_up && record.diverged.is_none())
            .filter_map(|(replica, record)| {
                let meta = record.snapshot.clone().filter(|m| m.index >= needed)?;
                Some((replica, record, meta))
            })
            .collect();
        // A peer's record is only as trustworthy as etcd's contents: a snapshot past what the
        // service settled, or larger than this replica takes, or served from anywhere but
        // the peer's own front, is never fetched (and the peer token never sent there).
        let ssi = store.get_index(&self.keys.ssi()).await?;
        let max = self.max_bytes;
        peers.retain(|(peer, record, meta)| match refuse_record(record, meta, ssi, max) {
            None => true,
            Some(why) => {
                warn!(%peer, index = meta.index, %why, "a peer's snapshot record is refused");
                false
            }
        });
        if peers.is_empty() {
            return Err(Error::NoSnapshotSource { first_index, needed });
        }
        peers.sort_by_key(|(_, _, meta)| std::cmp::Reverse(meta.index));
        info!(lpi, first_index, peers = peers.len(), "behind the compacted log: catching up from a peer's snapshot");
        let token = self.membership.peer_token(store).await?;
        let mut last_error = None;
        for (peer, record, meta) in peers {
            let started = Instant::now();
            match self.fetch_snapshot(&peer, &record.url, &meta, &token).await {
                Ok(()) => {
                    self.install(&meta).await?;
                    info!(index = meta.index, from = %peer, bytes = meta.size,
                        ms = started.elapsed().as_millis() as u64, "caught up from a peer's snapshot");
                    return Ok(meta.index);
                }
                Err(e) => {
                    warn!(error = %e, "snapshot refused; trying the next peer");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("at least one peer was tried"))
    }

    /// Downloads `meta` from `peer` into the incoming file, checking size and digest as
    /// it streams; removes the file on any failure.
    async fn fetch_snapshot(&self, peer: &str, url: &str, meta: &SnapshotMeta, token: &str) -> Result<()> {
        let path = self.disk.incoming_path();
        let result = self.download(url, meta, token, &path).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        result.map_err(|reason| Error::SnapshotFetch {
            peer: peer.to_owned(),
            url: url.to_owned(),
            index: meta.index,
            reason,
        })
    }

    async fn download(
        &self,
        url: &str,
        meta: &SnapshotMeta,
        token: &str,
        path: &std::path::Path,
    ) -> Result<(), String> {
        let url = format!("{}/br2k/snapshot?index={}", url.trim_end_matches('/'), meta.index);
        let mut response =
            tokio::time::timeout(FETCH_STALL, self.http.get(&url).header(PEER_TOKEN_HEADER, token).send())
                .await
                .map_err(|_| format!("no answer within {FETCH_STALL:?}"))?
                .map_err(|e| format!("request failed: {e}"))?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Err(format!("answered {status}: {}", body.chars().take(300).collect::<String>()));
        }
        let mut file =
            tokio::fs::File::create(path).await.map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let mut hash = Sha256::new();
        let mut size = 0u64;
        loop {
            let chunk = tokio::time::timeout(FETCH_STALL, response.chunk())
                .await
                .map_err(|_| format!("stalled for {FETCH_STALL:?} after {size} of {} bytes", meta.size))?
                .map_err(|e| format!("cut off after {size} of {} bytes: {e}", meta.size))?;
            let Some(chunk) = chunk else { break };
            size += chunk.len() as u64;
            if size > meta.size {
                return Err(format!("longer than the {} bytes its record announces", meta.size));
            }
            hash.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        if size != meta.size {
            return Err(format!("truncated: {size} of {} bytes", meta.size));
        }
        let digest = digest_of(hash);
        if digest != meta.digest {
            return Err(format!(
                "does not match its digest: the record says {}, the bytes hash to {digest}",
                meta.digest
            ));
        }
        file.sync_all().await.map_err(|e| format!("cannot sync {}: {e}", path.display()))?;
        Ok(())
    }

    /// Installs a downloaded and checked snapshot: adopts it as this replica's own, then
    /// restores the app from it, with the lineage file marking the restore in progress
    /// so that a crash half-way is finished at the next start.
    pub(crate) async fn install(&self, meta: &SnapshotMeta) -> Result<()> {
        self.disk.install(&self.disk.incoming_path(), meta)?;
        self.restore_adopted(meta).await?;
        self.done(meta.clone());
        Ok(())
    }

    async fn restore_adopted(&self, meta: &SnapshotMeta) -> Result<()> {
        let mut lineage = self.disk.lineage()?;
        lineage.restoring = Some(meta.clone());
        self.disk.set_lineage(&lineage)?;
        let mut opened = crate::snapshot::open_envelope(&self.disk.data_path(meta.index))?;
        self.app.restore(&opened.app).await.map_err(|source| Error::Restore { index: meta.index, source })?;
        match opened.table.take() {
            Some(table) => self.idempotency.replace(table),
            None => self.idempotency.reset(meta.index),
        }
        drop(opened);
        self.record.clear()?;
        self.disk.set_lineage(&Lineage { state_version: meta.index, restoring: None })?;
        lock(&self.state).state_version = meta.index;
        let applied = self.app.applied_index();
        self.reporter.set_status(|s| {
            s.state_version = meta.index;
            s.applied_index = applied;
            s.lpi = meta.index;
        });
        Ok(())
    }
}
