//! Backups of the service, by the leader, into the service's container registry, anchored
//! on chain (the paper's follow-up: backups located through the service registry).
//!
//! A backup is an OCI artifact (`application/vnd.br2k.backup.v2`, see [`manifest`]) whose
//! manifest names a base snapshot and the log segments after it up to the SSI. Each
//! backup uploads only what the registry lacks: the entries since the previous backup as
//! one new segment, the snapshot only when a newer one replaced it, and a small manifest.
//! Segments merge as they pile up (every [`MERGE_FANOUT`] of one level into one of the
//! next), so a manifest names a few dozen blobs at most and each entry is uploaded about
//! `1 + log_8(backups per snapshot)` times, where a backup used to upload every
//! entry since the snapshot again.
//!
//! Every backup carries the leader's signature by its operator key, and names the backup
//! before it, so backups form a hash chain. Only every
//! `record_interval` is one recorded on chain (`recordBackup`, the anchor): gas falls by
//! the ratio of the two intervals while the recovery point stays one backup interval,
//! because a restore takes the newest backup signed by an operator whose chain reaches the
//! anchor ([`lineage`]). Retention ([`retention`]) deletes the backups its policy does not
//! keep, never the anchor nor what links the newest to it.
//!
//! A registry or chain that does not answer never stops the service: the task retries
//! with a growing pause, and `/br2k/status` shows how far behind it is.
//!
//! **Restore** (`crate::register`'s recovery): a Register whose etcd holds no log at all (every member lost
//! its data) restores the newest linked backup before it takes leadership.

pub mod lineage;
pub mod manifest;
pub mod point;
pub(crate) mod restore;
pub mod retention;
mod spool;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use br2k_resolver::RecordedBackup;
use tracing::{info, warn};

use self::lineage::{Found, Lineage};
pub use self::manifest::{
    BACKUP_TYPE, BACKUP_TYPE_V1, BackupManifest, LOG_MEDIA_TYPE, MAX_BACKUP_BYTES, STATE_MEDIA_TYPE, SegmentBlob,
    SegmentEntry, Signed, SigningDomain, StateBlob, TAG_PREFIX, TALLY_ANNOTATION, TERMS_ANNOTATION, backup_tag,
};
use self::spool::{SpoolWriter, Spooled};
use crate::app::AppState;
use crate::config::Config;
pub use crate::config::{BackupConfig, MERGE_FANOUT, Retention};
use crate::data::CompactedLog;
use crate::data::Keys;
use crate::error::{Error, Result};
use crate::reporter::Reporter;
use crate::state_transfer::Snapshots;
pub use crate::status::{AnchorStatus, BackupStatus};
use crate::store::{Store, Term};

/// The least time between two backups asked for with `POST /br2k/backup`.
const ON_DEMAND_SPACING: Duration = Duration::from_secs(1);

/// The leader's backup task: ends the term only when leadership is lost.
/// What the leader's backups work with, and how the front asks for one now.
pub(crate) struct Backups<S> {
    config: Config,
    keys: Keys,
    snapshots: Arc<Snapshots<S>>,
    reporter: Arc<Reporter>,
    /// Woken to make the leader back up at once.
    pub(crate) now: tokio::sync::Notify,
    /// Set with `now` when the backup asked for is to be recorded on chain too.
    pub(crate) forced: std::sync::atomic::AtomicBool,
    /// When `POST /br2k/backup` was last honoured (at most one per backup interval).
    pub(crate) asked_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl<S: AppState> Backups<S> {
    pub(crate) fn new(config: Config, keys: Keys, snapshots: Arc<Snapshots<S>>, reporter: Arc<Reporter>) -> Self {
        Self {
            config,
            keys,
            snapshots,
            reporter,
            now: tokio::sync::Notify::new(),
            forced: std::sync::atomic::AtomicBool::new(false),
            asked_at: std::sync::Mutex::default(),
        }
    }
}

/// The leader's backup task: one backup every interval (sooner when asked), for as long as
/// the term lasts; ends the term only when leadership is lost.
pub(crate) async fn back_up_while_leading<S: AppState>(
    backups: Arc<Backups<S>>,
    store: Store,
    term: Term,
) -> Result<()> {
    let runtime = &backups;
    let Some(config) = runtime.config.backup.clone() else { return Ok(()) };
    let interval_ms = u64::try_from(config.interval.as_millis()).unwrap_or(u64::MAX);
    let record_ms = u64::try_from(config.record_interval.as_millis()).unwrap_or(u64::MAX);
    runtime.reporter.set_status(|s| {
        s.backup.interval_ms = interval_ms;
        s.backup.anchor.interval_ms = record_ms;
    });
    let mut writer = Writer::new(runtime, &store, &term, &config);
    let mut pause = config.interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            // `POST /br2k/backup` (`br2k backup now`, admin token): the front honours one
            // per backup interval, and asking only brings the next backup (and its
            // anchor) forward.
            () = runtime.now.notified() => tokio::time::sleep(ON_DEMAND_SPACING).await,
        }
        let started = std::time::Instant::now();
        match writer.back_up_once().await {
            Ok(()) => {
                // What a backup holds is read when it starts and safe once it is pushed:
                // starting the next one earlier by twice this one's duration keeps them
                // about an interval apart, so that nothing acknowledged more than an
                // interval ago is missing from the newest backup.
                pause = config.interval.saturating_sub(started.elapsed() * 2).max(config.interval / 2);
                runtime.reporter.set_status(|s| s.backup.last_error = None);
            }
            Err(e) if e.ends_term() => return Err(e),
            Err(e) => {
                pause = (pause * 2).min(Duration::from_secs(300)).max(config.interval);
                warn!(error = %e, retry_in = ?pause, "backup failed; the service keeps answering");
                let text = e.to_string();
                runtime.reporter.set_status(|s| s.backup.last_error = Some(text));
            }
        }
    }
}

/// What the leader knows of its backups during one term.
struct Writer<'a, S: AppState> {
    runtime: &'a Backups<S>,
    store: &'a Store,
    term: &'a Term,
    config: &'a BackupConfig,
    /// The backup the next one continues, once found (`None` before, or when none could be
    /// found: the next backup then starts a chain of its own, recorded on chain at once).
    head: Option<Found>,
    /// Whether `head` was looked for this term.
    looked: bool,
    /// The backup the chain records.
    anchor: Option<RecordedBackup>,
    /// The index of the anchor before it (or the one the chain had when this term began):
    /// what retention protects from, because a record a reorg could still undo must not
    /// let retention delete the backups that link to the record before it.
    settled: u64,
    /// Segments this leader pushed, by digest, while a manifest still names them: merged
    /// without being fetched back.
    pushed: HashMap<String, Spooled>,
    /// Where segments are built on their way up (under the data directory).
    spool: std::path::PathBuf,
    /// Names the next spooled file.
    spooled: u64,
    /// When each backup in the registry was made, for retention.
    created: BTreeMap<u64, (String, u64)>,
    /// When retention last ran without an anchor to trigger it (no chain).
    pruned_at: std::time::Instant,
    /// The index the chain records when it is above the service's SSI: no leader wrote
    /// it (a leaked operator key did), so it is never adopted, and nothing is recorded
    /// until the manager's `resetBackup` clears it.
    pinned: Option<u64>,
}

impl<'a, S: AppState> Writer<'a, S> {
    fn new(runtime: &'a Backups<S>, store: &'a Store, term: &'a Term, config: &'a BackupConfig) -> Self {
        // What an earlier term (or a crash) left in the spool is of no use now.
        let spool = runtime.config.data_dir.join("backup-spool");
        let _ = std::fs::remove_dir_all(&spool);
        Self {
            runtime,
            store,
            term,
            config,
            head: None,
            looked: false,
            anchor: None,
            settled: 0,
            pushed: HashMap::new(),
            spool,
            spooled: 0,
            created: BTreeMap::new(),
            pruned_at: std::time::Instant::now(),
            pinned: None,
        }
    }

    /// Reads the anchor, and the newest backup linked to it, which this term's backups
    /// continue.
    async fn find_head(&mut self) -> Result<()> {
        let Some(publisher) = &self.runtime.config.publisher else {
            self.looked = true;
            return Ok(());
        };
        let service = &self.runtime.config.service;
        self.anchor = publisher
            .registry
            .backup(service)
            .await
            .map_err(|e| Error::Backup(format!("read the backup recorded on chain: {e}")))?;
        self.looked = true;
        let Some(anchor) = self.anchor.clone() else { return Ok(()) };
        let ssi = self.store.get_index(&self.runtime.keys.ssi()).await?;
        if self.pin_check(Some(&anchor), ssi) {
            // Backups go on (signed, in the registry) as a chain of their own.
            self.anchor = None;
            return Ok(());
        }
        self.settled = anchor.index;
        self.show_anchor(&anchor);
        let lineage = Lineage {
            registry: &self.config.registry,
            repository: &self.config.repository,
            chain: &publisher.registry,
            service,
        };
        match lineage.newest(&anchor, Some(ssi)).await {
            Ok(found) => {
                let (index, digest) = (found.manifest.index, found.digest.clone());
                let (bytes, segments) = (found.manifest.bytes(), found.manifest.segments.len() as u64);
                self.runtime.reporter.set_status(|s| {
                    if s.backup.index < index {
                        s.backup.index = index;
                        s.backup.digest = Some(digest);
                        s.backup.bytes = bytes;
                        s.backup.segments = segments;
                    }
                });
                self.head = Some(found);
            }
            // The next backup starts afresh and is recorded at once, so restores find it.
            Err(e) => warn!(error = %e, "the newest backup cannot be found; the next one starts a new chain"),
        }
        Ok(())
    }

    /// Whether the chain's record (`recorded`) is above `ssi`, the highest index the
    /// service settled: then it is never adopted, and the alert says what to do.
    fn pin_check(&mut self, recorded: Option<&RecordedBackup>, ssi: u64) -> bool {
        let pinned = recorded.map(|r| r.index).filter(|index| *index > ssi);
        if pinned != self.pinned {
            let service = &self.runtime.config.service;
            let alert = pinned.map(|index| {
                format!(
                    "the backup index recorded on chain ({index}) is above the service's ({ssi}): no leader recorded \
                     it, so nothing is recorded until it is cleared; remove the operator key that wrote it, then run \
                     `br2k backup reset {service}` with the manager's key"
                )
            });
            match &alert {
                Some(text) => warn!(alert = %text, "backups are not recorded on chain"),
                None => info!("the chain's backup record was cleared; recording again"),
            }
            self.runtime.reporter.set_status(|s| s.backup.alert = alert);
            self.pinned = pinned;
        }
        pinned.is_some()
    }

    /// A backup no restore would accept is never pushed: the error, raised as an alert too.
    fn refuse_unrestorable(&self, why: &str) -> Error {
        let alert = format!(
            "{why}: backups stopped until the service's state is smaller (snapshots and compaction more often, or \
             less state)"
        );
        self.runtime.reporter.set_status(|s| s.backup.alert = Some(alert.clone()));
        Error::Backup(alert)
    }

    /// Reads the chain's record again and checks it against the SSI (see `pin_check`).
    async fn still_pinned(&mut self) -> Result<bool> {
        let Some(publisher) = &self.runtime.config.publisher else { return Ok(false) };
        let recorded = publisher
            .registry
            .backup(&self.runtime.config.service)
            .await
            .map_err(|e| Error::Backup(format!("read the backup recorded on chain: {e}")))?;
        let ssi = self.store.get_index(&self.runtime.keys.ssi()).await?;
        Ok(self.pin_check(recorded.as_ref(), ssi))
    }

    fn show_anchor(&self, anchor: &RecordedBackup) {
        let digest = format!("sha256:{:x}", anchor.digest);
        let (index, at) = (anchor.index, anchor.recorded_at);
        self.runtime.reporter.set_status(|s| {
            s.backup.anchor.index = index;
            s.backup.anchor.digest = Some(digest);
            s.backup.anchor.at = at;
        });
    }

    /// One backup, if anything was acknowledged since the last one.
    async fn back_up_once(&mut self) -> Result<()> {
        if !self.looked {
            self.find_head().await?;
        }
        let forced = self.runtime.forced.swap(false, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let store = self.store;
        let ssi = store.get_index(&self.runtime.keys.ssi()).await?;
        let done = self.head.as_ref().map_or(0, |h| h.manifest.index);
        if ssi <= done {
            // Nothing new. The newest backup, if only signed, is still recorded when asked
            // for (`br2k backup now` waits for the chain to reach the SSI) or once the
            // record interval passes, so the chain catches up with an idle service.
            let anchored = self.anchor.as_ref().map_or(0, |a| a.index);
            if let Some(head) =
                self.head.clone().filter(|h| (forced || self.record_due()) && h.manifest.index > anchored)
                && self.record(&head.digest, head.manifest.index).await?
            {
                self.prune().await;
            }
            return Ok(());
        }
        let mut uploaded = 0u64;
        let mut next = self.base(ssi, &mut uploaded).await?;
        let new_from = next.segments.last().map_or(next.log_from, |s| s.to + 1);
        if new_from <= ssi {
            let bytes = self.read_entries(new_from, ssi).await?;
            self.push_segment(&mut next, new_from, ssi, 0, bytes, &mut uploaded).await?;
        }
        self.merge(&mut next, &mut uploaded).await?;
        let live: std::collections::HashSet<&str> = next.segments.iter().map(|s| s.blob.digest.as_str()).collect();
        self.pushed.retain(|digest, _| live.contains(digest.as_str()));
        next.index = ssi;
        next.created = crate::data::unix_seconds();
        if let Err(e) = next.check() {
            return Err(self.refuse_unrestorable(&format!("a backup this leader built does not fit: {e}")));
        }

        let repository = &self.config.repository;
        let registry = &self.config.registry;
        let service = &self.runtime.config.service;
        if let Some(publisher) = &self.runtime.config.publisher {
            let lineage = Lineage { registry, repository, chain: &publisher.registry, service };
            lineage
                .domain()
                .sign(&publisher.signer, &mut next)
                .map_err(|e| Error::Backup(format!("sign the backup: {e}")))?;
        }
        let oci = next.to_oci();
        let digest = registry
            .push_artifact_manifest(repository, &backup_tag(service, ssi), &oci)
            .await
            .map_err(|e| Error::Backup(format!("push to {repository}: {e}")))?;
        uploaded += oci.to_bytes().len() as u64;
        let mut anchored = false;
        if self.runtime.config.publisher.is_some() {
            // A chain of its own (no head was found), a first backup, or the interval
            // passed: record this one.
            if forced || self.record_due() || self.head.is_none() {
                anchored = self.record(&digest, ssi).await?;
            }
        }
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(index = ssi, %digest, uploaded, segments = next.segments.len(), anchored, "backup pushed");
        let (bytes, segments) = (next.bytes(), next.segments.len() as u64);
        let shown = digest.clone();
        let pinned = self.pinned.is_some();
        self.runtime.reporter.set_status(|s| {
            if !pinned {
                s.backup.alert = None;
            }
            s.backup.index = ssi;
            s.backup.digest = Some(shown);
            s.backup.at = next.created;
            s.backup.took_ms = took_ms;
            s.backup.bytes = bytes;
            s.backup.pushed_bytes = uploaded;
            s.backup.segments = segments;
        });
        self.created.insert(ssi, (digest.clone(), next.created));
        self.head = Some(Found { digest, manifest: next, anchored });
        let prune_due =
            self.runtime.config.publisher.is_none() && self.pruned_at.elapsed() >= self.config.record_interval;
        if anchored || prune_due {
            self.prune().await;
        }
        Ok(())
    }

    /// What the next backup starts from: the head's snapshot and segments when its
    /// snapshot is at least as new as this replica's and etcd still holds what follows
    /// it; else this replica's latest snapshot (uploaded if the registry lacks it), with
    /// the head's segments that reach past it.
    async fn base(&mut self, ssi: u64, uploaded: &mut u64) -> Result<BackupManifest> {
        let runtime = self.runtime;
        let store = self.store;
        let compacted = store.compacted().await?;
        let local = runtime.snapshots.latest().filter(|s| s.index <= ssi);
        let local_index = local.as_ref().map_or(0, |s| s.index);
        let template = |log_from: u64, tally: CompactedLog| BackupManifest {
            service: runtime.config.service.clone(),
            index: ssi,
            log_from,
            previous: self.head.as_ref().map(|h| h.digest.clone()),
            state: None,
            segments: Vec::new(),
            tally,
            terms: 0,
            created: 0,
            replica: runtime.config.replica.clone(),
            epoch: self.term.epoch,
            signed: None,
        };
        let terms = store.get_index(&runtime.keys.terms()).await?;
        if let Some(head) = &self.head {
            let prev = &head.manifest;
            let continues = prev.log_from.saturating_sub(1) >= local_index && prev.index + 1 >= compacted.first_index;
            if continues && prev.artifact_is_current() {
                let mut next = template(prev.log_from, prev.tally.clone());
                next.state.clone_from(&prev.state);
                next.segments.clone_from(&prev.segments);
                next.terms = terms;
                return Ok(next);
            }
        }
        // Rebase on this replica's latest snapshot.
        let log_from = local.as_ref().map_or(compacted.first_index.max(1), |s| s.index + 1);
        if log_from < compacted.first_index {
            return Err(Error::Backup(format!(
                "etcd's log starts at {} but this replica's latest snapshot reaches {local_index}: the next snapshot \
                 lets backups go on",
                compacted.first_index
            )));
        }
        let tally = self.tally_before(&compacted, log_from).await?;
        let mut next = template(log_from, tally);
        next.terms = terms;
        if let Some(snapshot) = &local {
            if snapshot.size > MAX_BACKUP_BYTES {
                return Err(self.refuse_unrestorable(&format!(
                    "the snapshot at {} is {} bytes, over the {MAX_BACKUP_BYTES} a restore accepts",
                    snapshot.index, snapshot.size
                )));
            }
            // Streamed from its file, under the digest and size its record holds (the
            // registry checks them as it commits the upload): a snapshot of any size takes
            // a read buffer's worth of memory.
            let path = runtime.snapshots.disk.data_path(snapshot.index);
            let annotations = BTreeMap::from([(br2k_oci::artifact::TITLE_ANNOTATION.to_owned(), "state".to_owned())]);
            let size = snapshot.size;
            let (blob, fresh) = self
                .config
                .registry
                .push_file_layer(
                    &self.config.repository,
                    STATE_MEDIA_TYPE,
                    annotations,
                    (&path, &snapshot.digest, size),
                )
                .await
                .map_err(|e| {
                    Error::Backup(format!(
                        "push the snapshot at {} to {} (a newer snapshot may have replaced it): {e}",
                        snapshot.index, self.config.repository
                    ))
                })?;
            *uploaded += if fresh { size } else { 0 };
            next.state = Some(StateBlob { blob, index: snapshot.index, version: snapshot.state_version });
        }
        // The head's segments that reach past the snapshot stay (the first may start
        // before it: a restore skips what the snapshot holds).
        if let Some(head) = &self.head
            && head.manifest.index + 1 >= log_from
            && head.manifest.index + 1 >= compacted.first_index
            && head.manifest.artifact_is_current()
        {
            next.segments = head.manifest.segments.iter().filter(|s| s.to >= log_from).cloned().collect();
        }
        Ok(next)
    }

    /// Table 2's counts of the entries before `log_from`: compaction's tally, plus the
    /// entries etcd still holds below it.
    async fn tally_before(&self, compacted: &CompactedLog, log_from: u64) -> Result<CompactedLog> {
        let store = self.store;
        let mut before = compacted.clone();
        let mut next = compacted.first_index.max(1);
        while next < log_from {
            let page = store.states(next, log_from - 1).await?;
            let Some(&(last, _)) = page.last() else { break };
            for (_, state) in page.iter().filter(|(index, _)| *index < log_from) {
                before.count(state);
            }
            next = last + 1;
        }
        before.first_index = log_from;
        Ok(before)
    }

    /// A new file to build a segment in.
    async fn spool_file(&mut self) -> Result<SpoolWriter> {
        self.spooled += 1;
        let name = format!("segment-{}-{}", self.term.epoch, self.spooled);
        SpoolWriter::create(&self.spool, &name)
            .await
            .map_err(|e| Error::Backup(format!("start a segment in {}: {e}", self.spool.display())))
    }

    /// The entries `from..=to` as a segment's JSON lines, written to a spool file a page
    /// at a time.
    async fn read_entries(&mut self, from: u64, to: u64) -> Result<Spooled> {
        let spool_error = |e: std::io::Error| Error::Backup(format!("write a segment to the spool: {e}"));
        let mut lines = self.spool_file().await?;
        let store = self.store;
        let mut next = from;
        while next <= to {
            let page = store.entries(next, to).await?;
            let Some(last) = page.last().map(|e| e.index) else {
                return Err(Error::Backup(format!("etcd holds no entry from {next} to {to}")));
            };
            for entry in page {
                if entry.index != next {
                    return Err(Error::Backup(format!("etcd's log has no entry {next} (compacted?)")));
                }
                let line = SegmentEntry { index: entry.index, state: entry.state, request: entry.request };
                let mut bytes = serde_json::to_vec(&line).expect("entries serialize");
                bytes.push(b'\n');
                lines.write(&bytes).await.map_err(spool_error)?;
                if lines.size() > MAX_BACKUP_BYTES {
                    return Err(self.refuse_unrestorable(&format!(
                        "the entries {from}..={to} are over the {MAX_BACKUP_BYTES} bytes a restore accepts"
                    )));
                }
                next += 1;
            }
            next = next.max(last + 1);
        }
        lines.finish().await.map_err(spool_error)
    }

    async fn push_segment(
        &mut self,
        next: &mut BackupManifest,
        from: u64,
        to: u64,
        level: u32,
        segment: Spooled,
        uploaded: &mut u64,
    ) -> Result<()> {
        let size = segment.size;
        let (blob, fresh) = self
            .config
            .registry
            .push_file_layer(
                &self.config.repository,
                LOG_MEDIA_TYPE,
                manifest::segment_annotations(from, to, level),
                (&segment.path, &segment.digest, size),
            )
            .await
            .map_err(|e| Error::Backup(format!("push a log segment to {}: {e}", self.config.repository)))?;
        *uploaded += if fresh { size } else { 0 };
        self.pushed.insert(blob.digest.clone(), segment);
        next.segments.push(SegmentBlob { blob, from, to, level });
        Ok(())
    }

    /// Merges the last `merge_fanout` segments while they are of one level.
    async fn merge(&mut self, next: &mut BackupManifest, uploaded: &mut u64) -> Result<()> {
        let fanout = self.config.merge_fanout.max(2);
        loop {
            let n = next.segments.len();
            if n < fanout {
                return Ok(());
            }
            let level = next.segments[n - 1].level;
            if next.segments[n - fanout..].iter().any(|s| s.level != level) {
                return Ok(());
            }
            let merged: Vec<SegmentBlob> = next.segments.drain(n - fanout..).collect();
            let spool_error = |e: std::io::Error| Error::Backup(format!("merge segments in the spool: {e}"));
            let mut bytes = self.spool_file().await?;
            for segment in &merged {
                if let Some(held) = self.pushed.get(&segment.blob.digest) {
                    bytes.append_file(&held.path).await.map_err(spool_error)?;
                    continue;
                }
                // One this leader did not push: fetched to the spool (checked against its
                // digest), then copied in.
                let fetched = self.spool_file().await?.finish().await.map_err(spool_error)?;
                self.config
                    .registry
                    .fetch_blob_to_file(&self.config.repository, &segment.blob.digest, segment.blob.size, &fetched.path)
                    .await
                    .map_err(|e| Error::Backup(format!("fetch a segment to merge: {e}")))?;
                bytes.append_file(&fetched.path).await.map_err(spool_error)?;
            }
            if bytes.size() > MAX_BACKUP_BYTES {
                return Err(self.refuse_unrestorable(&format!(
                    "merged segments are over the {MAX_BACKUP_BYTES} bytes a restore accepts"
                )));
            }
            let bytes = bytes.finish().await.map_err(spool_error)?;
            let (from, to) = (merged[0].from, merged[fanout - 1].to);
            self.push_segment(next, from, to, level + 1, bytes, uploaded).await?;
        }
    }

    /// Whether the record interval passed since the anchor (or there is none yet).
    fn record_due(&self) -> bool {
        let now = crate::data::unix_seconds();
        self.anchor.as_ref().is_none_or(|a| now.saturating_sub(a.recorded_at) >= self.config.record_interval.as_secs())
    }

    /// Records the backup `digest` reaching `index` on chain; `false` when the chain's
    /// record is pinned above the service (nothing is sent then: it would revert).
    async fn record(&mut self, digest: &str, index: u64) -> Result<bool> {
        if self.pinned.is_some() && self.still_pinned().await? {
            return Ok(false);
        }
        let Some(publisher) = &self.runtime.config.publisher else { return Ok(false) };
        let service = &self.runtime.config.service;
        let hash = digest
            .strip_prefix("sha256:")
            .and_then(|h| h.parse().ok())
            .ok_or_else(|| Error::Backup(format!("the registry reported an odd digest {digest}")))?;
        let reference = format!("{}/{}@{digest}", self.config.registry.host(), self.config.repository);
        let outcome = match publisher.registry.record_backup(service, index, hash, &reference).await {
            Ok(outcome) => outcome,
            // Pinned while this term went on (a leaked key recorded a higher index).
            Err(_) if self.still_pinned().await? => return Ok(false),
            Err(e) => return Err(Error::Backup(format!("record on chain: {e}"))),
        };
        let recorded =
            RecordedBackup { index, digest: hash, artifact: reference, recorded_at: crate::data::unix_seconds() };
        self.show_anchor(&recorded);
        // A service's first record writes storage that was empty (about three times the
        // gas of the next ones): it sets no estimate of what recording costs a day.
        let previous = self.anchor.replace(recorded);
        let first = previous.is_none();
        self.settled = previous.map_or(0, |a| a.index);
        let per_day = outcome.gas_used.saturating_mul(86_400) / self.config.record_interval.as_secs().max(1);
        self.runtime.reporter.set_status(|s| {
            s.backup.anchor.count += 1;
            s.backup.anchor.gas_total += outcome.gas_used;
            s.backup.anchor.gas_last = outcome.gas_used;
            if !first {
                s.backup.anchor.gas_per_day = per_day;
            }
        });
        info!(index, %digest, gas = outcome.gas_used, "backup recorded on chain");
        Ok(true)
    }

    /// Applies the retention policy; a failure is logged and retried after the next
    /// anchor (backups go on meanwhile).
    async fn prune(&mut self) {
        self.pruned_at = std::time::Instant::now();
        let anchor = self.settled;
        let service = &self.runtime.config.service;
        let (registry, repository) = (&self.config.registry, &self.config.repository);
        match retention::prune(registry, repository, service, self.config.retention, anchor, &mut self.created).await {
            Ok(pruned) => self.runtime.reporter.set_status(|s| {
                s.backup.kept = pruned.kept as u64;
                s.backup.deleted += pruned.deleted as u64;
            }),
            Err(e) => warn!(error = %e, "retention failed; it runs again after the next anchor"),
        }
    }
}

impl BackupManifest {
    /// Whether its segments can be continued (a first-format backup's one log layer is
    /// continued by rebasing instead).
    fn artifact_is_current(&self) -> bool {
        self.segments.iter().all(|s| s.blob.annotations.contains_key("io.br2k.segment.from"))
    }
}
