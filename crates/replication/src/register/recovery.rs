//! Restoring a service whose every replica and etcd member lost its data.
//!
//! A Register whose etcd holds no log at all, and whose app is behind the newest backup
//! linked to the anchor (see [`super::lineage`]), restores that backup before it takes
//! leadership: it fetches the snapshot and every segment (each checked against its digest
//! in the manifest, the manifest against its signature or the chain), restores the app
//! from the snapshot, replays the segments' entries after it, seeds etcd so the log goes
//! on after the backup's index, and takes a snapshot there, from which the other replicas
//! (as empty as it was) catch up. The idempotency table comes back with them: the snapshot
//! carries it and the replayed entries add theirs, so a client retrying a request whose
//! answer the disaster swallowed gets that answer, not a second execution.

use std::sync::Arc;

use tracing::{info, warn};

use super::Registrar;
use crate::app::AppState;
use crate::backup::lineage::{Found, Lineage};
use crate::backup::manifest::SegmentEntry;
use crate::backup::restore::{in_repository, log_of};
use crate::data::CompactedLog;
use crate::error::{Error, Result};

impl<S: AppState> Registrar<S> {
    /// Restores the newest linked backup when this etcd holds no log and the app is
    /// behind it. Returns the index restored to, if it restored.
    ///
    /// # Errors
    /// A backup that cannot be fetched, or that does not match its digests; the app's
    /// refusal. Nothing is seeded in etcd then, and the Register tries again.
    pub(crate) async fn restore_from_backup(self: &Arc<Self>) -> Result<Option<u64>> {
        let (Some(config), Some(publisher)) = (&self.config.backup, &self.config.publisher) else { return Ok(None) };
        if !self.store.holds_no_log().await? {
            return Ok(None);
        }
        let anchor = publisher
            .registry
            .backup(&self.config.service)
            .await
            .map_err(|e| Error::Backup(format!("restore: cannot read the backup recorded on chain: {e}")))?;
        let Some(anchor) = anchor.filter(|b| b.index > self.executor.state.applied_index()) else { return Ok(None) };
        // On a shared registry anyone may push to some repository there: only the
        // service's own backup repository is trusted.
        if !in_repository(&anchor.artifact, &config.registry.host(), &config.repository) {
            return Err(Error::Backup(format!(
                "restore: the backup recorded on chain is at {:?}, not in the service's backup repository {}/{}; \
                 its manager can clear the record with `br2k backup reset {}`",
                anchor.artifact,
                config.registry.host(),
                config.repository,
                self.config.service
            )));
        }
        let lineage = Lineage {
            registry: &config.registry,
            repository: &config.repository,
            chain: &publisher.registry,
            service: &self.config.service,
        };
        let found = lineage.newest(&anchor, None).await.map_err(|e| Error::Backup(format!("restore: {e}")))?;
        info!(
            index = found.manifest.index,
            digest = %found.digest,
            anchor = anchor.index,
            "etcd holds no log: restoring the newest backup linked to the one recorded on chain"
        );
        self.restore_found(&lineage, &found).await
    }

    /// Restores `found` (already checked against the anchor): see the module's
    /// documentation.
    async fn restore_found(self: &Arc<Self>, lineage: &Lineage<'_>, found: &Found) -> Result<Option<u64>> {
        let started = std::time::Instant::now();
        let backup = &found.manifest;
        let digest = &found.digest;
        let fetch = async |blob: &br2k_oci::artifact::Descriptor| {
            lineage
                .registry
                .fetch_blob(lineage.repository, &blob.digest, blob.size)
                .await
                .map_err(|e| Error::Backup(format!("restore: {e}")))
        };
        // Everything is fetched and checked before anything is restored: a backup with
        // one altered blob or a gap in its log leaves the replica as empty as it was.
        let mut blobs = Vec::with_capacity(backup.segments.len());
        for segment in &backup.segments {
            blobs.push(fetch(&segment.blob).await?);
        }
        let entries = log_of(backup, &blobs).map_err(|e| Error::Backup(format!("restore: {digest}: {e}")))?;
        let state = match &backup.state {
            Some(state) => Some((state, fetch(&state.blob).await?)),
            None => None,
        };
        // Checked before anything changes: what the backup would leave applied must not
        // pass the index it claims (the app would hold entries etcd then lacks).
        let leaves = state.as_ref().map_or(self.executor.state.applied_index(), |(s, _)| s.index);
        if leaves > backup.index {
            return Err(Error::Backup(format!(
                "restore: {digest} would leave index {leaves} applied, past its own {}; nothing was changed",
                backup.index
            )));
        }
        if backup.service != self.config.service {
            return Err(Error::Backup(format!(
                "restore: {digest} is a backup of {:?}, not of {:?}; nothing was changed",
                backup.service, self.config.service
            )));
        }
        if let Some((state, bytes)) = state {
            let meta = crate::data::SnapshotMeta {
                index: state.index,
                state_version: state.version,
                digest: state.blob.digest.clone(),
                size: bytes.len() as u64,
                replica: backup.replica.clone(),
                created_at: crate::data::unix_seconds(),
            };
            let incoming = self.snapshots.disk.incoming_path();
            tokio::fs::write(&incoming, &bytes)
                .await
                .map_err(|e| Error::Snapshot { path: incoming.display().to_string(), reason: e.to_string() })?;
            self.snapshots.install(&meta).await?;
        }
        let mut tally: CompactedLog = backup.tally.clone();
        for entry in &entries {
            self.replay(entry, &mut tally).await?;
        }
        self.executor.state.persist().await.map_err(Error::Persist)?;
        self.executor.record.clear()?;
        if self.executor.state.applied_index() > backup.index {
            return Err(Error::Backup(format!(
                "restore: the app applied {} entries, past the backup's {}",
                self.executor.state.applied_index(),
                backup.index
            )));
        }
        tally.first_index = backup.index + 1;
        if !self.store.seed_restored(backup.index, &tally, backup.terms, &self.config.replica).await? {
            info!("another replica seeded etcd first; following it");
            return Ok(None);
        }
        let applied = self.executor.state.applied_index();
        let index = backup.index;
        self.reporter.set_status(|s| {
            s.lpi = index;
            s.ssi = index;
            s.ls = index;
            s.applied_index = applied;
            s.first_index = index + 1;
        });
        // The other replicas are as empty as this one was: they catch up from a snapshot.
        self.snapshots.maybe_take(index);
        info!(index, anchored = found.anchored, ms = started.elapsed().as_millis() as u64, "restored from the backup");
        Ok(Some(index))
    }

    /// Applies one entry of a backup's log: a Replication request that succeeded runs
    /// again here (the others changed nothing in the replicated state).
    async fn replay(&self, entry: &SegmentEntry, tally: &mut CompactedLog) -> Result<()> {
        use crate::data::{ProcessState, RequestKind};
        tally.count(&entry.state);
        self.executor.apply_if_recorded(entry.index, &entry.state, &entry.request).await?;
        self.idempotency.apply(entry.index, &entry.request, &entry.state);
        let replicated = entry.state.kind == RequestKind::Replication && entry.state.state == ProcessState::Success;
        if !replicated || entry.index <= self.executor.state.applied_index() {
            return Ok(());
        }
        let route = self
            .executor
            .route_of(&entry.request.method, &entry.request.path)
            .filter(|r| r.kind == RequestKind::Replication)
            .ok_or_else(|| Error::UnknownRoute {
                index: entry.index,
                method: entry.request.method.clone(),
                path: entry.request.path.clone(),
            })?;
        let request = crate::app::Request::from_entry(entry.index, entry.request.clone());
        if self.executor.execute(entry.index, route, request, false).await?.is_err() {
            warn!(index = entry.index, "a request that succeeded before the disaster failed when replayed");
        }
        Ok(())
    }
}
