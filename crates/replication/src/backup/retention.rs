//! Which backups stay in the registry: the newest `keep_last`, the newest of each of the
//! last `keep_daily` days that have one, the one the chain records and every one after it
//! (what a restore follows back to it). The leader passes the anchor before its latest,
//! so a record that a reorg undoes never costs the backups linking to the one before. The others' manifests are deleted
//! through the registry's API; their blobs, once no kept manifest names them, are
//! reclaimed by the registry's own garbage collection (`docker-registry garbage-collect`,
//! Harbor's GC), which br2k cannot run for it.

use std::collections::{BTreeMap, BTreeSet};

use br2k_oci::registry::RegistryClient;
use tracing::{info, warn};

use super::manifest::{backup_tag, tag_index};
use crate::config::Retention;
use crate::error::{Error, Result};

impl Retention {
    /// The indexes to keep of `backups` (index -> when it was made, unix seconds), with
    /// the chain's anchor at `anchor`.
    pub fn keep(&self, backups: &BTreeMap<u64, u64>, anchor: u64) -> BTreeSet<u64> {
        let mut keep: BTreeSet<u64> = backups.keys().rev().take(self.keep_last).copied().collect();
        keep.extend(backups.keys().filter(|index| **index >= anchor));
        let mut days = BTreeSet::new();
        for (index, created) in backups.iter().rev() {
            let day = created / 86_400;
            if days.len() < self.keep_daily && days.insert(day) {
                keep.insert(*index);
            }
        }
        keep
    }
}

/// What a pass of retention did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Backups kept.
    pub kept: usize,
    /// Backups deleted.
    pub deleted: usize,
}

/// Deletes from `repository` the backups of `service` that `policy` does not keep. `created` caches when
/// each backup was made (read from its manifest once).
///
/// # Errors
/// The registry's; a backup whose time cannot be read is kept, never deleted blindly.
pub async fn prune(
    registry: &RegistryClient,
    repository: &str,
    service: &str,
    policy: Retention,
    anchor: u64,
    created: &mut BTreeMap<u64, (String, u64)>,
) -> Result<Pruned> {
    let failed = |action: &str, e: br2k_oci::OciError| Error::Backup(format!("retention: {action}: {e}"));
    let tags = registry.tags(repository).await.map_err(|e| failed("list the backups", e))?;
    let present: BTreeSet<u64> = tags.iter().filter_map(|t| tag_index(service, t)).collect();
    created.retain(|index, _| present.contains(index));
    for index in &present {
        if created.contains_key(index) {
            continue;
        }
        let digest = registry
            .manifest_digest(repository, &backup_tag(service, *index))
            .await
            .map_err(|e| failed("read a backup", e))?;
        let manifest = registry
            .pull_artifact_manifest(repository, &digest, &[super::BACKUP_TYPE, super::BACKUP_TYPE_V1])
            .await
            .map_err(|e| failed("read a backup", e))?;
        match manifest.annotations.get("io.br2k.created").and_then(|c| c.parse().ok()) {
            Some(at) => {
                created.insert(*index, (digest, at));
            }
            None => warn!(index, "a backup says not when it was made; retention keeps it"),
        }
    }
    let times: BTreeMap<u64, u64> = created.iter().map(|(index, (_, at))| (*index, *at)).collect();
    let keep = policy.keep(&times, anchor);
    let mut pruned = Pruned { kept: present.len(), deleted: 0 };
    let doomed: Vec<(u64, String)> =
        created.iter().filter(|(index, _)| !keep.contains(index)).map(|(i, (d, _))| (*i, d.clone())).collect();
    for (index, digest) in doomed {
        registry.delete_manifest(repository, &digest).await.map_err(|e| failed("delete a backup", e))?;
        created.remove(&index);
        pruned.deleted += 1;
        pruned.kept -= 1;
    }
    if pruned.deleted > 0 {
        info!(
            deleted = pruned.deleted,
            kept = pruned.kept,
            "old backups deleted (the registry's garbage collection frees their blobs)"
        );
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn keeps_the_last_the_newest_of_each_day_and_everything_from_the_anchor_on() {
        // Ten backups a day for ten days, index 1..=100, made at noon-ish of day d.
        let backups: BTreeMap<u64, u64> = (1..=100).map(|i| (i, ((i - 1) / 10) * DAY + 40_000 + i)).collect();
        let policy = Retention { keep_last: 5, keep_daily: 3 };
        let keep = policy.keep(&backups, 93);
        // The last five (96..=100), the anchor and after (93..=100), the newest of days
        // 9, 8, 7 (100, 90, 80).
        assert_eq!(keep, BTreeSet::from([80, 90, 93, 94, 95, 96, 97, 98, 99, 100]));
        // The anchor far back keeps everything after it.
        assert_eq!(policy.keep(&backups, 50).len(), 51);
        // Nothing is kept twice or lost when the policy asks for more than there is.
        let all = Retention { keep_last: 1000, keep_daily: 1000 }.keep(&backups, 101);
        assert_eq!(all.len(), 100);
        assert!(Retention { keep_last: 0, keep_daily: 0 }.keep(&backups, 101).is_empty());
    }
}
