//! What every fixture needs around a child process: finding the program, keeping the
//! tail of its output for error messages, and killing it on drop.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use std::{env, thread};

use crate::SETUP_COMMAND;

/// A program a fixture needs is not installed where the project's setup puts it.
#[derive(Debug, thiserror::Error)]
#[error("{program} not found (looked at {searched}); run `{SETUP_COMMAND}` from the repository root")]
pub struct ToolNotFound {
    /// The program's name.
    pub program: String,
    /// Every place that was looked at, comma-separated.
    pub searched: String,
}

/// The repository root (this crate lives in `crates/test-utils`).
pub fn workspace_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// Finds one of Foundry's native binaries (`forge`, `anvil`, `cast`): the path in
/// `BR2K_<NAME>` if set, else where `tools/setup.sh` installs it, else on `PATH`.
///
/// # Errors
/// [`ToolNotFound`], naming the setup command, when it is in none of those places.
pub fn foundry_binary(name: &str) -> Result<PathBuf, ToolNotFound> {
    let installed = workspace_root().join(format!("tools/node_modules/@foundry-rs/{name}-linux-amd64/bin/{name}"));
    locate(name, &format!("BR2K_{}", name.to_ascii_uppercase()), &[installed])
}

/// Finds `program`: the path in the environment variable `env_override` if set, else
/// the first of `candidates` that exists, else `program` on `PATH`. A relative override
/// is taken from the workspace root when it names nothing from here: cargo runs each
/// test in its own crate's directory, and the README's commands are run from the root.
pub(crate) fn locate(program: &str, env_override: &str, candidates: &[PathBuf]) -> Result<PathBuf, ToolNotFound> {
    let mut searched = Vec::new();
    if let Some(path) = env::var_os(env_override) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        if path.is_relative() && workspace_root().join(&path).is_file() {
            return Ok(workspace_root().join(path));
        }
        // An explicit override that points nowhere is a mistake; do not fall back silently.
        return Err(ToolNotFound { program: program.into(), searched: format!("${env_override}={}", path.display()) });
    }
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate.clone());
        }
        searched.push(candidate.display().to_string());
    }
    if let Some(paths) = env::var_os("PATH") {
        for dir in env::split_paths(&paths) {
            let path = dir.join(program);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    searched.push(format!("{program} on PATH"));
    Err(ToolNotFound { program: program.into(), searched: searched.join(", ") })
}

/// The last lines a child printed on stdout and stderr, kept for error messages.
#[derive(Clone, Debug, Default)]
pub(crate) struct OutputTail {
    lines: Arc<Mutex<VecDeque<String>>>,
}

impl OutputTail {
    const KEEP: usize = 200;

    /// Reads `stream` to its end on a thread of its own, keeping its lines and sending
    /// each one to `lines_to` while that receiver lives. Reading to the end also keeps
    /// the child from blocking on a full pipe.
    pub(crate) fn follow(&self, stream: impl Read + Send + 'static, lines_to: Option<Sender<String>>) {
        let tail = self.clone();
        thread::spawn(move || {
            let mut lines_to = lines_to;
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if let Some(sender) = &lines_to
                    && sender.send(line.clone()).is_err()
                {
                    lines_to = None;
                }
                let mut lines = tail.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if lines.len() == Self::KEEP {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
    }

    /// Everything kept so far, one line per line.
    pub(crate) fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        lines.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// Why [`first_line`] returned without a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoLine {
    /// The deadline passed.
    Timeout,
    /// The child closed its output (it exited).
    Ended,
}

/// The first line from `lines` that `parse` makes something of, if one comes by `deadline`:
/// how a fixture learns the port a child chose for itself.
pub(crate) fn first_line<T>(
    lines: &Receiver<String>,
    deadline: Instant,
    mut parse: impl FnMut(&str) -> Option<T>,
) -> Result<T, NoLine> {
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(found) = parse(&line) {
                    return Ok(found);
                }
            }
            Err(RecvTimeoutError::Timeout) => return Err(NoLine::Timeout),
            Err(RecvTimeoutError::Disconnected) => return Err(NoLine::Ended),
        }
    }
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Already exited is fine; kill only fails then.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `command`, trying again for a moment while the kernel says its executable is
/// busy (`ETXTBSY`): a program written just before (a test's script) can be held open for
/// writing by a child another thread forked in that instant, until that child execs.
///
/// # Errors
/// The spawn's error, once it is not a busy executable or the moment has passed.
pub(crate) fn spawn_retrying_busy(command: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            result => return result,
        }
    }
}
