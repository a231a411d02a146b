//! Backups of the service, by the leader, into the service's container registry, recorded
//! on chain (the paper's follow-up: backups located through the service registry).
//!
//! Every backup interval the leader pushes one OCI artifact (`application/vnd.br2k.backup.v1`)
//! holding:
//! - the `state` layer: its latest snapshot, byte for byte (absent before the first);
//! - the `log` layer: every entry after that snapshot up to SSI, as JSON lines of index,
//!   state and request (the log segment).
//!
//! Blobs are content-addressed, so a snapshot already in the registry is not sent again:
//! between two snapshots a backup costs its log segment and a manifest. Then the leader
//! records the manifest's digest on chain (`recordBackup`) with the index the backup
//! reaches. Whatever is restored is checked against that digest, and through the manifest
//! every file is too. A registry or chain that does not answer never stops the service:
//! the task retries with a growing pause, and `/br2k/status` shows how far behind it is.
//!
//! **Restore.** A Register whose etcd holds no log at all (every member lost its data)
//! and whose app is behind the backup recorded on chain restores it before it takes
//! leadership: it pulls the artifact by the digest the chain records (refusing anything
//! that does not hash to it), restores the app from the `state` layer, replays the `log`
//! layer, seeds etcd so the log goes on after the backup's index, and takes a snapshot
//! there, from which the other replicas (as empty as it was) catch up. The idempotency
//! table comes back with them: the snapshot carries it and the log layer's entries add
//! theirs, so a client retrying a request whose answer the disaster swallowed gets that
//! answer, not a second execution, for every key the backup covers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use br2k_oci::artifact::{Artifact, Layer};
use br2k_oci::registry::RegistryClient;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::app::AppState;
use crate::data::{EntryState, LogEntry};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::store::Term;

/// The least time between two backups asked for with `POST /br2k/backup`.
const ON_DEMAND_SPACING: Duration = Duration::from_secs(1);

/// The artifact type of a br2k backup.
pub const BACKUP_TYPE: &str = "application/vnd.br2k.backup.v1";
/// The media type of the `state` layer (an app snapshot, in the app's own format).
pub const STATE_MEDIA_TYPE: &str = "application/vnd.br2k.state.v1";
/// The annotation holding Table 2's counts of the entries before the `log` layer (a
/// [`crate::data::CompactedLog`] as JSON), so that they survive a restore.
pub const TALLY_ANNOTATION: &str = "io.br2k.tally";
/// The annotation holding how many leadership terms the service had seen, so that Table
/// 2's leader changes go on across a restore.
pub const TERMS_ANNOTATION: &str = "io.br2k.terms";
/// The media type of the `log` layer ([`SegmentEntry`] JSON lines).
pub const LOG_MEDIA_TYPE: &str = "application/vnd.br2k.log.v1+jsonl";

/// Where and how often the leader backs the service up.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// The service's container registry, with its credentials (from the environment or
    /// Docker's config.json, never from etcd or the chain).
    pub registry: Arc<RegistryClient>,
    /// The repository backups go to (the service's image repository).
    pub repository: String,
    /// How often the leader pushes a backup (default 30 s): what a total disaster can lose
    /// is bounded by it.
    pub interval: Duration,
}

/// One log entry in a backup's `log` layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// Its index.
    pub index: u64,
    /// Its final state.
    pub state: EntryState,
    /// The request.
    pub request: LogEntry,
}

/// What `/br2k/status` says of backups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStatus {
    /// The index the latest backup recorded on chain reaches (0: none yet).
    pub index: u64,
    /// Its manifest's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// When it was pushed, seconds since the Unix epoch.
    #[serde(default)]
    pub at: u64,
    /// How long reading, pushing and recording it took, milliseconds.
    #[serde(default)]
    pub took_ms: u64,
    /// Its size: the state and log layers, bytes.
    #[serde(default)]
    pub bytes: u64,
    /// Why the last attempt failed, if it did and none has succeeded since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The backup interval, milliseconds (0: this replica does not back up): what a total
    /// disaster may lose of what was acknowledged.
    #[serde(default)]
    pub interval_ms: u64,
}

/// The leader's backup task: ends the term only when leadership is lost.
pub(crate) async fn back_up_while_leading<S: AppState>(runtime: Arc<Runtime<S>>, term: Term) -> Result<()> {
    let Some(config) = runtime.config.backup.clone() else { return Ok(()) };
    let interval_ms = u64::try_from(config.interval.as_millis()).unwrap_or(u64::MAX);
    runtime.set_status(|s| s.backup.interval_ms = interval_ms);
    // Carry on from what the chain records (an earlier leader's backups).
    if let Some(publisher) = &runtime.config.publisher {
        match publisher.registry.backup(&runtime.config.service).await {
            Ok(Some(recorded)) => runtime.set_status(|s| {
                if s.backup.index < recorded.index {
                    s.backup.index = recorded.index;
                    s.backup.digest = Some(format!("sha256:{:x}", recorded.digest));
                    s.backup.at = recorded.recorded_at;
                }
            }),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "could not read the recorded backup; backing up from this replica's view"),
        }
    }
    let mut pause = config.interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            // `POST /br2k/backup` (`br2k backup now`): anyone who reaches the service can
            // ask, so asking only brings the next backup forward, to at most one a second.
            () = runtime.backup_now.notified() => tokio::time::sleep(ON_DEMAND_SPACING).await,
        }
        let started = std::time::Instant::now();
        match back_up_once(&runtime, &term, &config).await {
            Ok(()) => {
                // What a backup holds is read when it starts and safe once it is recorded:
                // starting the next one earlier by twice this one's duration keeps the
                // records about an interval apart, so that nothing acknowledged more than
                // an interval ago is missing from the recorded backup.
                pause = config.interval.saturating_sub(started.elapsed() * 2).max(config.interval / 2);
                runtime.set_status(|s| s.backup.last_error = None);
            }
            Err(e @ Error::LeadershipLost { .. }) => return Err(e),
            Err(e) => {
                pause = (pause * 2).min(Duration::from_secs(300)).max(config.interval);
                warn!(error = %e, retry_in = ?pause, "backup failed; the service keeps answering");
                let text = e.to_string();
                runtime.set_status(|s| s.backup.last_error = Some(text));
            }
        }
    }
}

/// One backup, if anything was acknowledged since the last one.
pub(crate) async fn back_up_once<S: AppState>(runtime: &Runtime<S>, term: &Term, config: &BackupConfig) -> Result<()> {
    let started = std::time::Instant::now();
    let store = runtime.store();
    let ssi = store.get_index(&runtime.keys.ssi()).await?;
    let done = runtime.status.borrow().backup.index;
    if ssi <= done {
        return Ok(());
    }
    // The entries from the snapshot on are still in etcd: the leader compacts only below
    // its own snapshot.
    let snapshot = runtime.latest_snapshot().filter(|s| s.index <= ssi);
    let compacted = store.compacted().await?;
    let from = snapshot.as_ref().map_or(1, |s| s.index + 1).max(compacted.first_index);
    // Table 2's counts of the entries before the log layer (compaction's tally, plus the
    // entries the snapshot covers that etcd still holds), so they survive a restore.
    let mut before = compacted.clone();
    let mut next = compacted.first_index.max(1);
    while next < from {
        let page = store.states(next, from - 1).await?;
        let Some(&(last, _)) = page.last() else { break };
        for (_, state) in page.iter().filter(|(index, _)| *index < from) {
            before.count(state);
        }
        next = last + 1;
    }
    before.first_index = from;
    let mut lines = Vec::new();
    let mut next = from;
    while next <= ssi {
        let page = store.entries(next, ssi).await?;
        next = page.last().map_or(ssi, |e| e.index) + 1;
        for entry in page {
            let line = SegmentEntry { index: entry.index, state: entry.state, request: entry.request };
            lines.extend(serde_json::to_vec(&line).expect("entries serialize"));
            lines.push(b'\n');
        }
    }
    let mut layers = Vec::new();
    let mut annotations = BTreeMap::from([
        ("io.br2k.service".to_owned(), runtime.config.service.clone()),
        ("io.br2k.index".to_owned(), ssi.to_string()),
        ("io.br2k.log.from".to_owned(), from.to_string()),
        ("io.br2k.replica".to_owned(), runtime.config.replica.clone()),
        ("io.br2k.epoch".to_owned(), term.epoch.to_string()),
        ("io.br2k.created".to_owned(), crate::data::unix_seconds().to_string()),
        (TALLY_ANNOTATION.to_owned(), serde_json::to_string(&before).expect("a tally serializes")),
        (TERMS_ANNOTATION.to_owned(), store.get_index(&runtime.keys.terms()).await?.to_string()),
    ]);
    if let Some(snapshot) = &snapshot {
        let path = runtime.snapshots.data_path(snapshot.index);
        let bytes = tokio::fs::read(&path).await.map_err(|e| Error::Snapshot {
            path: path.display().to_string(),
            reason: format!("cannot read it for a backup (a newer snapshot may have replaced it): {e}"),
        })?;
        layers.push(Layer { media_type: STATE_MEDIA_TYPE.into(), title: "state".into(), bytes });
        annotations.insert("io.br2k.snapshot.index".into(), snapshot.index.to_string());
        annotations.insert("io.br2k.state.version".into(), snapshot.state_version.to_string());
    }
    layers.push(Layer { media_type: LOG_MEDIA_TYPE.into(), title: "log".into(), bytes: lines });
    let bytes = layers.iter().map(|l| l.bytes.len() as u64).sum::<u64>();
    let artifact = Artifact { artifact_type: BACKUP_TYPE.into(), layers, annotations };
    let tag = format!("br2k-backup-{ssi}");
    let digest = config
        .registry
        .push_artifact(&config.repository, &tag, &artifact)
        .await
        .map_err(|e| Error::Backup(format!("push to {}: {e}", config.repository)))?;
    let reference = format!("{}/{}@{digest}", config.registry.host(), config.repository);
    if let Some(publisher) = &runtime.config.publisher {
        let hash = digest
            .strip_prefix("sha256:")
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| Error::Backup(format!("the registry reported an odd digest {digest}")))?;
        publisher
            .registry
            .record_backup(&runtime.config.service, ssi, hash, &reference)
            .await
            .map_err(|e| Error::Backup(format!("record on chain: {e}")))?;
    }
    info!(index = ssi, %digest, from, "backup pushed and recorded");
    let at = crate::data::unix_seconds();
    let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    runtime.set_status(|s| {
        s.backup.index = ssi;
        s.backup.digest = Some(digest);
        s.backup.at = at;
        s.backup.took_ms = took_ms;
        s.backup.bytes = bytes;
    });
    Ok(())
}

impl<S: AppState> Runtime<S> {
    /// Restores the backup recorded on chain when this etcd holds no log and the app is
    /// behind it (see the module's documentation). Returns the index restored to, if it
    /// restored.
    ///
    /// # Errors
    /// A backup that cannot be fetched, or that does not match what the chain records;
    /// the app's refusal. Nothing is seeded in etcd then, and the Register tries again.
    pub(crate) async fn restore_from_backup(self: &Arc<Self>) -> Result<Option<u64>> {
        let (Some(config), Some(publisher)) = (&self.config.backup, &self.config.publisher) else { return Ok(None) };
        if !self.store().holds_no_log().await? {
            return Ok(None);
        }
        let recorded = publisher
            .registry
            .backup(&self.config.service)
            .await
            .map_err(|e| Error::Backup(format!("restore: cannot read the backup recorded on chain: {e}")))?;
        let Some(recorded) = recorded.filter(|b| b.index > self.state.applied_index()) else { return Ok(None) };
        let digest = format!("sha256:{:x}", recorded.digest);
        let repository = repository_of(&recorded.artifact, &config.registry.host()).ok_or_else(|| {
            Error::Backup(format!(
                "restore: the backup recorded on chain is at {:?}, not in the service's registry {}",
                recorded.artifact,
                config.registry.host()
            ))
        })?;
        let started = std::time::Instant::now();
        info!(index = recorded.index, %digest, "etcd holds no log: restoring the backup recorded on chain");
        let artifact = config
            .registry
            .pull_artifact(&repository, &digest, BACKUP_TYPE)
            .await
            .map_err(|e| Error::Backup(format!("restore: {e}")))?;
        let annotated = |key: &str| artifact.annotations.get(key).and_then(|v| v.parse::<u64>().ok());
        if annotated("io.br2k.index") != Some(recorded.index) {
            return Err(Error::Backup(format!(
                "restore: the backup {digest} says it reaches {:?}, the chain records {}",
                annotated("io.br2k.index"),
                recorded.index
            )));
        }
        if let Some(state) = artifact.layers.iter().find(|l| l.media_type == STATE_MEDIA_TYPE) {
            let index = annotated("io.br2k.snapshot.index")
                .ok_or_else(|| Error::Backup(format!("restore: the backup {digest} names no snapshot index")))?;
            let meta = crate::data::SnapshotMeta {
                index,
                state_version: annotated("io.br2k.state.version").unwrap_or(0),
                digest: br2k_oci::image::sha256_digest(&state.bytes),
                size: state.bytes.len() as u64,
                replica: artifact.annotations.get("io.br2k.replica").cloned().unwrap_or_default(),
                created_at: crate::data::unix_seconds(),
            };
            let incoming = self.snapshots.incoming_path();
            tokio::fs::write(&incoming, &state.bytes)
                .await
                .map_err(|e| Error::Snapshot { path: incoming.display().to_string(), reason: e.to_string() })?;
            self.install(&meta).await?;
        }
        let mut tally: crate::data::CompactedLog = match artifact.annotations.get(TALLY_ANNOTATION) {
            Some(text) => serde_json::from_str(text).map_err(|e| {
                Error::Backup(format!("restore: the backup {digest} has a tally that does not decode: {e}"))
            })?,
            None => crate::data::CompactedLog::default(),
        };
        tally.first_index = recorded.index + 1;
        if let Some(log) = artifact.layers.iter().find(|l| l.media_type == LOG_MEDIA_TYPE) {
            for line in log.bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let entry: SegmentEntry = serde_json::from_slice(line)
                    .map_err(|e| Error::Backup(format!("restore: a log line of {digest} does not decode: {e}")))?;
                self.replay(&entry, &mut tally).await?;
            }
        }
        self.state.persist().await.map_err(Error::Persist)?;
        self.record.clear()?;
        if self.state.applied_index() > recorded.index {
            return Err(Error::Backup(format!(
                "restore: the app applied {} entries, past the backup's {}",
                self.state.applied_index(),
                recorded.index
            )));
        }
        let terms = annotated(TERMS_ANNOTATION).unwrap_or(0);
        if !self.store().seed_restored(recorded.index, &tally, terms, &self.config.replica).await? {
            info!("another replica seeded etcd first; following it");
            return Ok(None);
        }
        let applied = self.state.applied_index();
        self.set_status(|s| {
            s.lpi = recorded.index;
            s.ssi = recorded.index;
            s.ls = recorded.index;
            s.applied_index = applied;
            s.first_index = recorded.index + 1;
        });
        // The other replicas are as empty as this one was: they catch up from a snapshot.
        self.maybe_snapshot(recorded.index);
        info!(index = recorded.index, ms = started.elapsed().as_millis() as u64, "restored from the backup");
        Ok(Some(recorded.index))
    }

    /// Applies one entry of a backup's log: a Replication request that succeeded runs
    /// again here (the others changed nothing in the replicated state).
    async fn replay(&self, entry: &SegmentEntry, tally: &mut crate::data::CompactedLog) -> Result<()> {
        use crate::data::{ProcessState, RequestKind};
        tally.count(&entry.state);
        self.apply_if_recorded(entry.index, &entry.state, &entry.request).await?;
        self.idempotency.apply(entry.index, &entry.request, &entry.state);
        let replicated = entry.state.kind == RequestKind::Replication && entry.state.state == ProcessState::Success;
        if !replicated || entry.index <= self.state.applied_index() {
            return Ok(());
        }
        let route = self
            .route_of(&entry.request.method, &entry.request.path)
            .filter(|r| r.kind == RequestKind::Replication)
            .ok_or_else(|| Error::UnknownRoute {
                index: entry.index,
                method: entry.request.method.clone(),
                path: entry.request.path.clone(),
            })?;
        let request = crate::app::Request::from_entry(entry.index, entry.request.clone());
        if self.execute(entry.index, route, request, false).await?.is_err() {
            warn!(index = entry.index, "a request that succeeded before the disaster failed when replayed");
        }
        Ok(())
    }
}

/// The repository of `artifact` (`host/repository@digest`) when it is on `host`.
fn repository_of(artifact: &str, host: &str) -> Option<String> {
    let (name, _digest) = artifact.split_once('@')?;
    let repository = name.strip_prefix(host)?.strip_prefix('/')?;
    (!repository.is_empty()).then(|| repository.to_owned())
}
