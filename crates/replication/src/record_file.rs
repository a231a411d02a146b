//! The paper's local record file: where this replica was in Process Request, so that
//! Check for pending process knows, after a step-down or a crash, whether an entry was
//! interrupted before, during or after its execution.
//!
//! Each write is one `pwrite` of a JSON line at offset 0; readers take the first line, so
//! stale bytes after it do not matter and no rename is needed (a rename over an existing
//! file makes ext4 flush the data, which cost milliseconds per request). It is not fsynced:
//! it must survive the process being killed, which the page cache ensures (a write
//! system call is not torn by SIGKILL); after a power loss the app state's own durable
//! index is what counts, and rollbacks are harmless when there is nothing to undo.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::Step;
use crate::data::StoredReply;
use crate::error::{Error, Result};

/// What the file says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) index: u64,
    pub(crate) step: Step,
    /// The handler's answer, once it returned: a replica that leads again before anyone
    /// recorded the outcome finds the answer here instead of executing twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reply: Option<StoredReply>,
}

#[derive(Clone, Debug)]
pub(crate) struct RecordFile {
    path: PathBuf,
}

impl RecordFile {
    pub(crate) fn new(dir: &Path) -> Self {
        Self { path: dir.join("br2k-record.json") }
    }

    fn put_line(&self, line: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.io_fail(&e))?;
        file.write_all_at(line, 0).map_err(|e| self.io_fail(&e))
    }

    /// An I/O failure, named the way an operator looks for it ("disk full: ...").
    fn io_fail(&self, error: &std::io::Error) -> Error {
        self.fail(format!("{}: {error}", crate::error::fault_kind(error)))
    }

    fn fail(&self, reason: impl std::fmt::Display) -> Error {
        Error::RecordFile { path: self.path.display().to_string(), reason: reason.to_string() }
    }

    pub(crate) fn write(&self, index: u64, step: Step, reply: Option<StoredReply>) -> Result<()> {
        let mut line = serde_json::to_vec(&Record { index, step, reply }).expect("records serialize");
        line.push(b'\n');
        self.put_line(&line)
    }

    pub(crate) fn read(&self) -> Result<Option<Record>> {
        match std::fs::read(&self.path) {
            Ok(body) => {
                let line = body.split(|&b| b == b'\n').next().unwrap_or_default();
                if line.is_empty() {
                    return Ok(None);
                }
                serde_json::from_slice::<Option<Record>>(line)
                    .map_err(|e| self.fail(format!("undecodable ({e}); remove it only after checking the app state")))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_fail(&e)),
        }
    }

    /// Records that nothing is in progress.
    pub(crate) fn clear(&self) -> Result<()> {
        self.put_line(b"null\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let file = RecordFile::new(dir.path());
        assert_eq!(file.read().unwrap(), None);
        file.write(7, Step::Executed, Some(StoredReply { status: 200, content_type: None, body: vec![1; 100] }))
            .unwrap();
        file.write(7, Step::Executing, None).unwrap(); // shorter: the stale tail is ignored
        assert_eq!(file.read().unwrap(), Some(Record { index: 7, step: Step::Executing, reply: None }));
        file.clear().unwrap();
        assert_eq!(file.read().unwrap(), None);
        std::fs::write(dir.path().join("br2k-record.json"), "garbage").unwrap();
        assert!(file.read().unwrap_err().to_string().contains("undecodable"));
    }
}
