//! `deployments/<chain-id>.json`: the registry `br2k service-registry deploy` put on each
//! chain, so later commands find it without `--registry`.

use std::path::{Path, PathBuf};

use alloy::primitives::{Address, B256};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One chain's deployments file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct DeploymentsFile {
    /// The chain the file is about.
    pub(crate) chain_id: u64,
    /// The service registry on it.
    pub(crate) service_registry: RecordedRegistry,
}

/// A deployed registry as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct RecordedRegistry {
    /// Its address.
    pub(crate) address: Address,
    /// Its claim cooldown in seconds.
    pub(crate) claim_cooldown: u64,
    /// The block it was deployed in (where its event history starts).
    pub(crate) block: u64,
    /// The deployment transaction.
    pub(crate) tx_hash: B256,
}

/// The deployments directory.
pub(crate) struct Deployments {
    dir: PathBuf,
}

impl Deployments {
    pub(crate) fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    /// The file for `chain_id`.
    pub(crate) fn path(&self, chain_id: u64) -> PathBuf {
        self.dir.join(format!("{chain_id}.json"))
    }

    /// The registry recorded for `chain_id`, if any.
    pub(crate) fn load(&self, chain_id: u64) -> Result<Option<RecordedRegistry>> {
        let path = self.path(chain_id);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let file: DeploymentsFile = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a br2k deployments file: fix it, or delete it and deploy again", path.display())
        })?;
        if file.chain_id != chain_id {
            bail!(
                "{} records chain {}, not chain {chain_id}: fix it, or delete it and deploy again",
                path.display(),
                file.chain_id
            );
        }
        Ok(Some(file.service_registry))
    }

    /// Records `registry` for `chain_id`, replacing what was there; written to a temporary
    /// file and renamed, so a crash never leaves half a file.
    pub(crate) fn store(&self, chain_id: u64, registry: RecordedRegistry) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let path = self.path(chain_id);
        let file = DeploymentsFile { chain_id, service_registry: registry };
        let mut text = serde_json::to_string_pretty(&file).context("cannot encode the deployments file")?;
        text.push('\n');
        let temporary = self.dir.join(format!(".{chain_id}.json.tmp"));
        std::fs::write(&temporary, text).with_context(|| format!("cannot write {}", temporary.display()))?;
        std::fs::rename(&temporary, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> RecordedRegistry {
        RecordedRegistry {
            address: Address::repeat_byte(0x11),
            claim_cooldown: 300,
            block: 1,
            tx_hash: B256::repeat_byte(2),
        }
    }

    #[test]
    fn round_trips_and_misses_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let deployments = Deployments::new(&dir.path().join("deployments"));
        assert_eq!(deployments.load(31337).unwrap(), None, "a missing file is no registry, not an error");
        let path = deployments.store(31337, recorded()).unwrap();
        assert_eq!(path, dir.path().join("deployments/31337.json"));
        assert_eq!(deployments.load(31337).unwrap(), Some(recorded()));
        assert_eq!(deployments.load(1).unwrap(), None);
    }

    #[test]
    fn rejects_garbage_and_a_wrong_chain() {
        let dir = tempfile::tempdir().unwrap();
        let deployments = Deployments::new(dir.path());
        std::fs::write(deployments.path(5), "{not json").unwrap();
        let err = deployments.load(5).unwrap_err();
        assert!(format!("{err:#}").contains("is not a br2k deployments file"), "{err:#}");

        deployments.store(7, recorded()).unwrap();
        std::fs::copy(deployments.path(7), deployments.path(8)).unwrap();
        let err = deployments.load(8).unwrap_err();
        assert!(err.to_string().contains("records chain 7, not chain 8"), "{err}");
    }
}
