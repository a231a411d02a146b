//! Finding the programs the local backend runs.

use std::path::{Path, PathBuf};

use crate::error::{DeployError, Result};

/// Finds `program`: the path in `env_override` if set (and then only there), else the
/// first of `candidates` that exists, else on `PATH`.
pub(crate) fn locate(program: &str, env_override: &str, candidates: &[PathBuf]) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_override) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(DeployError::ToolNotFound {
                program: program.into(),
                searched: format!("${env_override}={}", path.display()),
            })
        };
    }
    let mut searched: Vec<String> = Vec::new();
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate.clone());
        }
        searched.push(candidate.display().to_string());
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let path = dir.join(program);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    searched.push(format!("{program} on PATH"));
    Err(DeployError::ToolNotFound { program: program.into(), searched: searched.join(", ") })
}

/// Where `tools/setup.sh` installs Foundry's `name`, for a binary built in this
/// repository's `target/<profile>/` (the usual case for `br2k`).
pub(crate) fn installed_foundry(name: &str) -> Vec<PathBuf> {
    let relative = format!("tools/node_modules/@foundry-rs/{name}-linux-amd64/bin/{name}");
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/debug/br2k or target/debug/deps/test-binary: try each ancestor.
        for dir in exe.ancestors().skip(1).take(4) {
            out.push(dir.join(&relative));
        }
    }
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(relative));
    out
}

/// A sibling of the running executable (`target/debug/br2k-logserver` next to
/// `target/debug/br2k`), or of its parent directory (for test binaries in `deps/`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().skip(1).take(2).map(|dir| dir.join(name)).find(|p| p.is_file())
}
