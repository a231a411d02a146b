//! Where local runs keep their state and unpacked images: a directory of the user's own
//! under the temporary directory, made mode 0700 and checked at every use. A shared name
//! such as `/tmp/br2k-up` could be made first by another local user, who would then own
//! the directory an app binary is unpacked into and run from.

use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use super::sys;
use crate::error::{DeployError, Result};

/// `<tmp>/br2k-<uid>`: created 0700 if missing, refused unless it is a real directory (not
/// a link), owned by this user, and closed to everyone else.
///
/// # Errors
/// A directory that cannot be made, or that another user could have prepared.
pub fn work_root() -> Result<PathBuf> {
    let uid = sys::effective_uid();
    let root = std::env::temp_dir().join(format!("br2k-{uid}"));
    private_dir(&root, uid)?;
    Ok(root)
}

/// `dir` made (mode 0700) or checked: a directory of `uid`'s own that nobody else can
/// enter or write.
fn private_dir(dir: &Path, uid: u32) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(DeployError::io(format!("create {}", dir.display()), e)),
    }
    let metadata = std::fs::symlink_metadata(dir).map_err(|e| DeployError::io(format!("read {}", dir.display()), e))?;
    let problem = if !metadata.file_type().is_dir() {
        Some("is not a directory (a link or a file)".to_owned())
    } else if metadata.uid() != uid {
        Some(format!("belongs to user {} (not {uid})", metadata.uid()))
    } else if metadata.permissions().mode() & 0o077 != 0 {
        Some(format!("is open to other users (mode {:03o})", metadata.permissions().mode() & 0o777))
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(DeployError::Invalid(format!(
            "{} {problem}: br2k keeps state and runs unpacked apps from there, so it must be private to you; \
             remove it (or `chmod 700` it if it is yours), or point TMPDIR elsewhere",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_directory_of_ones_own_is_used() {
        let tmp = tempfile::tempdir().unwrap();
        let uid = sys::effective_uid();
        let fresh = tmp.path().join("fresh");
        private_dir(&fresh, uid).unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o700);
        private_dir(&fresh, uid).unwrap();

        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&open, uid).unwrap_err().to_string().contains("open to other users (mode 777)"));

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert!(private_dir(&link, uid).unwrap_err().to_string().contains("not a directory"));

        let theirs = tmp.path().join("theirs");
        std::fs::DirBuilder::new().mode(0o700).create(&theirs).unwrap();
        assert!(private_dir(&theirs, uid + 1).unwrap_err().to_string().contains(&format!("belongs to user {uid}")));
    }
}
