//! What the manager keeps on disk (`STATE_DIR/manager.json`), so that a manager that
//! stops, crashes or is killed neither misses nor repeats work:
//!
//! - the block cursor: the first block whose events it has not handled yet. It advances
//!   only after the events below it were handled, so a crash re-reads them; re-reading
//!   is harmless because handling is idempotent (a claim against a service that is being
//!   recovered, or that is healthy again, is dropped);
//! - the services it learned the names of (events carry ids; backends need names);
//! - each recovery under way, written *before* the first step of that recovery, so a
//!   restarted manager resumes it instead of starting a second one.
//!
//! Writes go to a temporary file renamed over the old one: a crash leaves the old
//! journal or the new one, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alloy::primitives::{Address, B256};
use serde::{Deserialize, Serialize};

use crate::Error;

/// The journal file's name in the state directory.
pub const JOURNAL_FILE: &str = "manager.json";

/// A recovery under way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// The epoch the registry held when the recovery began: it is done once a location
    /// with a higher epoch answers.
    pub from_epoch: u64,
    /// Why it began (the claim's reason, or what the probe found).
    pub reason: String,
    /// When it began (unix milliseconds), for its duration.
    pub started_ms: u64,
    /// Whether the backend was asked to deploy (the replicas may be starting).
    pub deploy_started: bool,
    /// Failed attempts so far.
    pub attempts: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// A service the manager could not check or act on (its backend or the chain failed):
/// kept apart, so that one failing service never holds up the others, and checked again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFailure {
    /// Failures in a row.
    pub count: u32,
    /// When the first of them happened (unix milliseconds).
    pub since_ms: u64,
    /// What the last one was.
    pub last_error: String,
}

/// The manager's persisted state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The chain the journal belongs to.
    pub chain_id: u64,
    /// The registry the journal belongs to.
    pub registry: Address,
    /// The first block not handled yet.
    pub next_block: u64,
    /// Names of the services this manager looks after, by id.
    pub services: BTreeMap<B256, String>,
    /// Recoveries under way, by service name.
    pub recoveries: BTreeMap<String, Recovery>,
    /// Services whose last check failed, by name; checked again until one passes.
    #[serde(default)]
    pub failures: BTreeMap<String, ServiceFailure>,
}

impl Journal {
    /// A journal for a manager starting at `first_block`.
    pub const fn new(chain_id: u64, registry: Address, first_block: u64) -> Self {
        Self {
            chain_id,
            registry,
            next_block: first_block,
            services: BTreeMap::new(),
            recoveries: BTreeMap::new(),
            failures: BTreeMap::new(),
        }
    }

    /// The path of the journal in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(JOURNAL_FILE)
    }

    /// Reads the journal in `dir`; `None` when there is none yet.
    ///
    /// # Errors
    /// [`Error::Journal`] when it cannot be read or is damaged, saying what to do.
    pub fn load(dir: &Path) -> Result<Option<Self>, Error> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Journal { path, reason: e.to_string() }),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| Error::Journal {
            path,
            reason: format!(
                "not a manager journal ({e}); move it away to start afresh (the manager then re-reads claims from --from-block)"
            ),
        })
    }

    /// Checks that the journal belongs to this chain and registry.
    ///
    /// # Errors
    /// [`Error::Journal`] naming both, so a state directory is never reused by mistake.
    pub fn check_belongs(&self, dir: &Path, chain_id: u64, registry: Address) -> Result<(), Error> {
        if self.chain_id == chain_id && self.registry == registry {
            return Ok(());
        }
        Err(Error::Journal {
            path: Self::path(dir),
            reason: format!(
                "it belongs to registry {} on chain {}, not {registry} on chain {chain_id}; give this manager a --state-dir of its own",
                self.registry, self.chain_id
            ),
        })
    }

    /// Writes the journal to `dir` atomically.
    ///
    /// # Errors
    /// [`Error::Journal`] when it cannot be written.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let path = Self::path(dir);
        let temp = dir.join(format!("{JOURNAL_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("plain data serialises") + "\n";
        // Durable before it counts: the file's bytes, then the rename (the directory).
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temp)?;
            std::io::Write::write_all(&mut file, text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| Error::Journal { path: path.clone(), reason: format!("cannot write it: {e}") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_survives_a_round_trip_and_refuses_another_registry() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Journal::load(dir.path()).unwrap(), None);
        let mut journal = Journal::new(31337, Address::repeat_byte(1), 7);
        journal.services.insert(B256::repeat_byte(2), "logserver".into());
        journal.recoveries.insert(
            "logserver".into(),
            Recovery {
                from_epoch: 12,
                reason: "no answer".into(),
                started_ms: 1,
                deploy_started: true,
                attempts: 1,
                last_error: Some("x".into()),
            },
        );
        journal.save(dir.path()).unwrap();
        let loaded = Journal::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, journal);
        loaded.check_belongs(dir.path(), 31337, Address::repeat_byte(1)).unwrap();
        let err = loaded.check_belongs(dir.path(), 1, Address::repeat_byte(1)).unwrap_err().to_string();
        assert!(err.contains("--state-dir of its own"), "{err}");
    }

    #[test]
    fn a_damaged_journal_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(Journal::path(dir.path()), "{\"chain_id\": 1").unwrap();
        let err = Journal::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a manager journal") && err.contains("move it away"), "{err}");
    }
}
