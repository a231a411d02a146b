//! A service's state at a chosen index, as the first backup of a copy under a new name
//! (`br2k backup restore NAME --to-index N --as COPY`): to inspect the past, or to replace
//! the original on purpose, without touching the running service.
//!
//! Of the backups retention kept, the oldest that reaches `N` and whose snapshot is at or
//! before it is taken, if an operator of the service signed it (or the chain records it).
//! Its snapshot and the segments up to `N` are named again (the last one cut at `N` and
//! uploaded as a new blob), in a backup of the copy at exactly `N`. Recorded on chain for
//! the copy, it is what the copy's replicas, starting on an empty etcd, restore.

use br2k_oci::registry::RegistryClient;
use br2k_resolver::RegistryClient as ServiceRegistry;

use super::lineage::Lineage;
use super::manifest::{BackupManifest, LOG_MEDIA_TYPE, backup_tag, segment_annotations, tag_index};
use super::restore::log_of;
use crate::error::{Error, Result};

/// A backup made for a copy of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointInTime {
    /// The backup of the original it was cut from: its index and digest.
    pub source: (u64, String),
    /// The copy's backup: its manifest's digest.
    pub digest: String,
    /// What it holds (index `N` exactly).
    pub manifest: BackupManifest,
    /// Where it is, as the chain records it (`host/repository@digest`).
    pub artifact: String,
}

/// Cuts a backup of `service` (in `repository` of `registry`) at `to_index` and pushes it
/// as the first backup of `copy`; `chain` says who the service's operators are.
///
/// # Errors
/// No retained backup covers `to_index` (the error says which indexes are covered), the
/// covering one is not signed by an operator, or the registry fails.
pub async fn cut_for_copy(
    registry: &RegistryClient,
    repository: &str,
    chain: &ServiceRegistry,
    service: &str,
    to_index: u64,
    copy: &str,
) -> Result<PointInTime> {
    let lineage = Lineage { registry, repository, chain, service };
    let failed = |what: &str, e: br2k_oci::OciError| Error::Backup(format!("{what}: {e}"));
    let tags = registry.tags(repository).await.map_err(|e| failed("list the backups", e))?;
    let mut indexes: Vec<u64> = tags.iter().filter_map(|t| tag_index(service, t)).collect();
    indexes.sort_unstable();
    if indexes.is_empty() {
        return Err(Error::Backup(format!("{service} has no backups in {}/{repository}", registry.host())));
    }
    let anchor = chain.backup(service).await.map_err(|e| Error::Backup(format!("read the recorded backup: {e}")))?;
    let anchor_digest = anchor.map(|a| format!("sha256:{:x}", a.digest));
    let mut covered = Vec::new();
    for index in indexes.iter().copied().filter(|i| *i >= to_index) {
        let digest = registry
            .manifest_digest(repository, &backup_tag(service, index))
            .await
            .map_err(|e| failed("read a backup", e))?;
        let backup = lineage.manifest(&digest).await?;
        covered.push((backup.log_from.saturating_sub(1), backup.index));
        if backup.log_from.saturating_sub(1) > to_index {
            continue;
        }
        if anchor_digest.as_deref() != Some(digest.as_str()) {
            lineage.check_signed(&lineage.domain(), &backup).await.map_err(|e| {
                Error::Backup(format!(
                    "the backup at {index} cannot be trusted: {}",
                    e.to_string().trim_start_matches("backup: ")
                ))
            })?;
        }
        let manifest = cut(registry, repository, &backup, to_index, copy).await?;
        let oci = manifest.to_oci();
        let pushed = registry
            .push_artifact_manifest(repository, &backup_tag(copy, to_index), &oci)
            .await
            .map_err(|e| failed("push the copy's backup", e))?;
        let artifact = format!("{}/{repository}@{pushed}", registry.host());
        return Ok(PointInTime { source: (index, digest), digest: pushed, manifest, artifact });
    }
    let newest = indexes[indexes.len() - 1];
    Err(Error::Backup(if covered.is_empty() {
        format!(
            "no backup of {service} kept in {}/{repository} reaches index {to_index}: the newest reaches {newest} \
             (`br2k backup now {service}` makes one of everything acknowledged)",
            registry.host()
        )
    } else {
        let spans: Vec<String> = covered.iter().map(|(from, to)| format!("{from}..={to}")).collect();
        format!(
            "no backup of {service} kept in {}/{repository} holds index {to_index}: the kept ones from there on hold \
             {} (each from its snapshot on); retention has removed older ones",
            registry.host(),
            spans.join(", ")
        )
    }))
}

/// `backup` cut at `to_index` (at or after its snapshot) as a backup of `copy`, the last
/// segment it keeps cut and uploaded when it reaches past `to_index`.
async fn cut(
    registry: &RegistryClient,
    repository: &str,
    backup: &BackupManifest,
    to_index: u64,
    copy: &str,
) -> Result<BackupManifest> {
    let mut next = backup.clone();
    next.service = copy.to_owned();
    next.index = to_index;
    next.previous = None;
    next.created = crate::data::unix_seconds();
    next.replica = "br2k backup restore".to_owned();
    // Recorded on chain for the copy by its manager: the chain vouches for it.
    next.signed = None;
    next.segments.retain(|s| s.from <= to_index);
    if to_index < backup.log_from {
        next.segments.clear();
    }
    if let Some(last) = next.segments.last_mut().filter(|s| s.to > to_index) {
        let bytes = registry
            .fetch_blob(repository, &last.blob.digest, last.blob.size)
            .await
            .map_err(|e| Error::Backup(format!("fetch a segment to cut: {e}")))?;
        // Checked as a restore checks it, then cut: the entries up to `to_index` only.
        let whole = BackupManifest {
            segments: vec![last.clone()],
            log_from: last.from,
            index: last.to,
            state: None,
            ..backup.clone()
        };
        let mut kept = Vec::new();
        for entry in log_of(&whole, &[bytes]).map_err(Error::Backup)?.into_iter().take_while(|e| e.index <= to_index) {
            kept.extend(serde_json::to_vec(&entry).expect("entries serialize"));
            kept.push(b'\n');
        }
        let (blob, _) = registry
            .push_layer(repository, LOG_MEDIA_TYPE, segment_annotations(last.from, to_index, 0), kept)
            .await
            .map_err(|e| Error::Backup(format!("push the cut segment: {e}")))?;
        *last = super::SegmentBlob { blob, from: last.from, to: to_index, level: 0 };
    }
    next.check().map_err(|e| Error::Backup(format!("the copy's backup does not fit: {e}")))?;
    Ok(next)
}
