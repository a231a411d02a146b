//! A node's disk that fills: a data directory on a filesystem of its own, of a fixed size
//! (a tmpfs), which a fault fills and later gives room again.
//!
//! A full disk is the most common fault in production; this makes it real for the
//! testbed and for tests. Once filled, the app's writes fail with ENOSPC, some after
//! taking part of what they were given (a page's worth may be left), exactly as on any
//! full filesystem: nothing is simulated above the kernel. Mounting needs root
//! (CAP_SYS_ADMIN), as the testbed's network namespaces do.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{DeployError, Result};

use super::sys;

/// The file that takes the room left when the disk is filled.
const FILLER: &str = ".br2k-filler";

/// A directory on a tmpfs of its own, unmounted when dropped.
#[derive(Debug)]
pub struct LimitedDisk {
    dir: PathBuf,
    size: u64,
}

impl LimitedDisk {
    /// Mounts a tmpfs of `size` bytes at `dir` (created if missing). `dir` must be empty:
    /// a mount over files would hide them from the app.
    ///
    /// # Errors
    /// When `dir` holds files or cannot be created, or the mount is refused (it needs
    /// root).
    pub fn mount(dir: &Path, size: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| DeployError::io(format!("create {}", dir.display()), e))?;
        let mut entries = std::fs::read_dir(dir).map_err(|e| DeployError::io(format!("read {}", dir.display()), e))?;
        if entries.next().is_some() {
            return Err(DeployError::Invalid(format!(
                "{} is not empty: a size-limited disk is mounted before the node writes anything",
                dir.display()
            )));
        }
        sys::mount_tmpfs(dir, size).map_err(|e| {
            DeployError::io(
                format!(
                    "mount a tmpfs of {size} bytes at {} (a disk that can fill needs root: CAP_SYS_ADMIN)",
                    dir.display()
                ),
                e,
            )
        })?;
        Ok(Self { dir: dir.to_owned(), size })
    }

    /// The mounted directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its size, bytes.
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// Fills the disk: a filler file takes every byte left, so the next write that needs
    /// room fails with ENOSPC. Returns how many bytes it took.
    ///
    /// # Errors
    /// When the filler cannot be written for another reason than a full disk.
    pub fn fill(&self) -> Result<u64> {
        let path = self.dir.join(FILLER);
        let failed = |e| DeployError::io(format!("fill {}", path.display()), e);
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(failed)?;
        let chunk = vec![0u8; 1 << 20];
        let mut taken = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => taken += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(e)),
            }
        }
        Ok(taken)
    }

    /// Gives the room back: removes the filler.
    ///
    /// # Errors
    /// When the filler exists but cannot be removed.
    pub fn free(&self) -> Result<()> {
        let path = self.dir.join(FILLER);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(DeployError::io(format!("remove {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Whether it is filled now.
    pub fn is_full(&self) -> bool {
        self.dir.join(FILLER).exists()
    }
}

impl Drop for LimitedDisk {
    fn drop(&mut self) {
        if let Err(e) = sys::unmount(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not unmount a size-limited disk");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_disk_refuses_writes_until_it_is_freed() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("disk");
        let disk = LimitedDisk::mount(&dir, 1 << 20).expect("a tmpfs mounts (the tests run as root, as CI does)");
        std::fs::write(dir.join("a"), b"before").unwrap();
        let taken = disk.fill().unwrap();
        assert!(taken > 900_000 && taken <= 1 << 20, "{taken}");
        assert!(disk.is_full());
        let refused = std::fs::write(dir.join("b"), vec![1u8; 8192]).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ENOSPC), "{refused}");
        disk.free().unwrap();
        assert!(!disk.is_full());
        std::fs::write(dir.join("b"), vec![1u8; 8192]).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"before");

        // Not over files, which it would hide.
        let used = root.path().join("used");
        std::fs::create_dir_all(&used).unwrap();
        std::fs::write(used.join("x"), b"x").unwrap();
        assert!(LimitedDisk::mount(&used, 1 << 20).unwrap_err().to_string().contains("not empty"));
        drop(disk);
        assert!(!dir.join("a").exists(), "unmounted when dropped");
    }
}
