//! Files that hold credentials or keys: created 0600 from the start (never widened and
//! then narrowed), written through a temporary file that is synced and renamed (and the
//! rename synced), so neither a reader nor a crash ever sees half of one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{OciError, Result};

/// Writes `bytes` to `path` (creating its directory), mode 0600.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| OciError::io(format!("create {}", dir.display()), e))?;
    }
    let temp = path.with_extension("partial");
    let _ = std::fs::remove_file(&temp);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(bytes)?;
        // Durable before it replaces the old one, and the rename durable too: a key that
        // funds were sent to must survive a power cut.
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| OciError::io(format!("write {}", path.display()), e))
}
