//! Which backup a restore uses, and which one a new leader's backups continue: the newest
//! one in the service's repository that an operator the registry allows signed and whose
//! chain of manifests reaches the backup recorded on chain (the anchor). Without such a
//! backup, the anchor itself.
//!
//! A backup signed by anyone else, or whose chain does not reach the anchor (a backup of
//! a history a restore abandoned, or one whose manifests were altered or deleted), is
//! passed over with a warning that says why.

use std::collections::HashSet;

use br2k_oci::registry::RegistryClient;
use br2k_resolver::{RecordedBackup, RegistryClient as ServiceRegistry};
use tracing::warn;

use super::manifest::{BACKUP_TYPE, BACKUP_TYPE_V1, BackupManifest, SigningDomain, backup_tag, tag_index};
use crate::error::{Error, Result};

/// A backup found and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its manifest's digest.
    pub digest: String,
    /// What it holds.
    pub manifest: BackupManifest,
    /// Whether the chain records it (it is the anchor).
    pub anchored: bool,
}

/// Where backups are looked for and checked.
pub(crate) struct Lineage<'a> {
    pub(crate) registry: &'a RegistryClient,
    pub(crate) repository: &'a str,
    pub(crate) chain: &'a ServiceRegistry,
    pub(crate) service: &'a str,
}

impl Lineage<'_> {
    /// The manifest `digest`, read and checked.
    pub(crate) async fn manifest(&self, digest: &str) -> Result<BackupManifest> {
        self.read(digest).await.map_err(Error::Backup)
    }

    /// The manifest `digest`, read and checked; what went wrong in words.
    async fn read(&self, digest: &str) -> std::result::Result<BackupManifest, String> {
        let oci = self
            .registry
            .pull_artifact_manifest(self.repository, digest, &[BACKUP_TYPE, BACKUP_TYPE_V1])
            .await
            .map_err(|e| format!("the backup {digest}: {e}"))?;
        BackupManifest::from_oci(&oci).map_err(|e| format!("the backup {digest} is refused: {e}"))
    }

    /// The newest backup linked to `anchor` and signed by an operator; the anchor when
    /// none is newer. A leader passes its SSI as `at_most`: a backup above it was not
    /// made by a leader of this service (a leaked operator key signed it) and is never
    /// continued.
    ///
    /// # Errors
    /// The anchor's manifest cannot be read or does not fit the chain's record; the
    /// registry or the chain does not answer.
    pub(crate) async fn newest(&self, anchor: &RecordedBackup, at_most: Option<u64>) -> Result<Found> {
        let anchor_digest = format!("sha256:{:x}", anchor.digest);
        let anchored = self.manifest(&anchor_digest).await?;
        if anchored.service != self.service {
            return Err(Error::Backup(format!(
                "the backup {anchor_digest} recorded on chain for {} is a backup of {}",
                self.service, anchored.service
            )));
        }
        if anchored.index != anchor.index {
            return Err(Error::Backup(format!(
                "the backup {anchor_digest} says it reaches {}, the chain records {}",
                anchored.index, anchor.index
            )));
        }
        let tags = self
            .registry
            .tags(self.repository)
            .await
            .map_err(|e| Error::Backup(format!("list the backups in {}: {e}", self.repository)))?;
        let mut candidates: Vec<u64> = tags
            .iter()
            .filter_map(|t| tag_index(self.service, t))
            .filter(|i| *i > anchor.index && at_most.is_none_or(|max| *i <= max))
            .collect();
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let domain = self.domain();
        // Manifests already followed back to the anchor.
        let mut linked: HashSet<String> = HashSet::from([anchor_digest.clone()]);
        for index in candidates {
            match self.check_candidate(&domain, index, anchor.index, &mut linked).await {
                Ok(found) => return Ok(found),
                Err(Error::Backup(why)) => warn!(%why, "a newer backup is passed over"),
                Err(e) => return Err(e),
            }
        }
        Ok(Found { digest: anchor_digest, manifest: anchored, anchored: true })
    }

    /// The signing domain of this service's backups.
    pub(crate) fn domain(&self) -> SigningDomain {
        SigningDomain {
            chain_id: self.chain.chain().chain_id(),
            registry: self.chain.address(),
            service: br2k_resolver::service_id(self.service),
        }
    }

    /// The backup at `index` if an operator signed it and its chain reaches the anchor
    /// (at `anchor_index`, whose digest starts `linked`).
    async fn check_candidate(
        &self,
        domain: &SigningDomain,
        index: u64,
        anchor_index: u64,
        linked: &mut HashSet<String>,
    ) -> Result<Found> {
        let refused = |why: String| Error::Backup(format!("the backup at {index}: {why}"));
        let tag = backup_tag(self.service, index);
        let digest = self.registry.manifest_digest(self.repository, &tag).await.map_err(|e| refused(e.to_string()))?;
        let head = self.read(&digest).await.map_err(refused)?;
        if head.index != index || head.service != self.service {
            return Err(refused(format!("its manifest says it is {}'s at {}", head.service, head.index)));
        }
        self.check_signed(domain, &head).await.map_err(|e| refused(e.to_string()))?;
        // Follow `previous` back to a manifest known to reach the anchor; indexes fall at
        // each step, so the walk ends.
        let mut path = vec![digest.clone()];
        let mut at = head.clone();
        loop {
            let Some(previous) = at.previous.clone() else {
                return Err(refused(format!("its chain ends at index {} without reaching the anchor", at.index)));
            };
            if linked.contains(&previous) {
                break;
            }
            let before = self.read(&previous).await.map_err(|e| refused(format!("its chain is broken: {e}")))?;
            if before.index >= at.index || before.index <= anchor_index {
                return Err(refused(format!(
                    "its chain goes from index {} to {} without reaching the anchor at {anchor_index}",
                    at.index, before.index
                )));
            }
            path.push(previous);
            at = before;
        }
        linked.extend(path);
        Ok(Found { digest, manifest: head, anchored: false })
    }

    /// Checks that an operator of the service (as the registry says now) signed `backup`.
    ///
    /// # Errors
    /// Not signed, not by whom it says, or by a key that is no operator; the chain fails.
    pub(crate) async fn check_signed(&self, domain: &SigningDomain, backup: &BackupManifest) -> Result<()> {
        let signer = domain.signer_of(backup).map_err(Error::Backup)?;
        let allowed = self
            .chain
            .is_operator(self.service, signer)
            .await
            .map_err(|e| Error::Backup(format!("read whether {signer} is an operator: {e}")))?;
        if allowed {
            Ok(())
        } else {
            Err(Error::Backup(format!("it is signed by {signer}, which is not an operator of the service")))
        }
    }
}
