//! Files that hold credentials or keys: created 0600 from the start (never widened and
//! then narrowed), written through a temporary file and renamed, so neither a reader nor
//! a crash ever sees half of one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{DeployError, Result};

/// Writes `bytes` to `path` (creating its directory), mode 0600.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DeployError::io(format!("create {}", dir.display()), e))?;
    }
    let temp = path.with_extension("partial");
    let _ = std::fs::remove_file(&temp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| DeployError::io(format!("write {}", path.display()), e))
}
