//! The files a local runner (`br2k up`) keeps in its state directory:
//!
//! - `run.json`, rewritten while the runner lives: its pid, the chain, the published
//!   location and every node's processes and role. `br2k down`, the local backend's view
//!   of the replicas, and scripts read it.
//! - `layout.json`, written once when the replicas' data is created and kept with it:
//!   which service, how many replicas, which local slot (the slot fixes the nodes'
//!   addresses, which etcd records in its data). A later runner that keeps the data must
//!   use the same layout, or its etcd members could not find each other.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DeployError, Result};

/// The run file's name in a state directory.
pub const RUN_FILE: &str = "run.json";
/// The layout file's name in a state directory.
pub const LAYOUT_FILE: &str = "layout.json";
/// The file a runner writes its pid to first thing, before any replica runs (run.json
/// comes once they all answer), so nobody takes a starting runner for a dead one.
pub const RUNNER_PID_FILE: &str = "runner.pid";

/// What `run.json` records of a running `br2k up`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunFile {
    /// The runner's pid.
    pub pid: u32,
    /// The service name.
    pub service: String,
    /// The chain the leader publishes to.
    pub rpc_url: String,
    /// The registry's address.
    pub registry: String,
    /// The location last read from the registry.
    pub location: Option<String>,
    /// Its epoch.
    pub epoch: Option<u64>,
    /// The local slot: namespaces `b2k<slot>n<i>` and bridge `b2k<slot>` when `namespaces`.
    pub slot: u8,
    /// Whether the nodes live in network namespaces.
    pub namespaces: bool,
    /// The nodes.
    pub nodes: Vec<NodeEntry>,
    /// How far behind SSI an added replica's recorded LPI may be and count as caught up
    /// (its snapshot interval plus trailing entries); `None` from older runners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_window: Option<u64>,
}

/// One node in `run.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Its name (`n1`, ...), which is also its replica id.
    pub name: String,
    /// The app's URL.
    pub app_url: String,
    /// Its etcd member's client URL.
    pub etcd_url: String,
    /// The app's pid while it runs.
    pub app_pid: Option<u32>,
    /// The etcd member's pid while it runs.
    pub etcd_pid: Option<u32>,
    /// The role it last reported.
    pub role: Option<String>,
    /// Its directory (data and logs).
    pub dir: PathBuf,
    /// Retired by a membership change: it runs nothing and is no member.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

impl RunFile {
    /// Reads `dir/run.json`; `None` when there is none.
    ///
    /// # Errors
    /// When it exists but cannot be read or is not a run file.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        read_json(&dir.join(RUN_FILE), "a br2k run file (it is rewritten by `br2k up`; remove it if no runner uses it)")
    }

    /// Whether the runner that wrote it still runs.
    pub fn runner_alive(&self) -> bool {
        is_runner(self.pid)
    }

    /// Writes it to `dir/run.json` atomically.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(RUN_FILE), self)
    }
}

/// A total disaster, for drills of recovery from backups: SIGKILLs the runner recorded
/// in `dir` and every node's app and etcd member at once, waits until they are gone, then
/// deletes `dir` with all their data (what losing the machine's disks leaves). Returns how
/// many processes it killed.
///
/// # Errors
/// No live runner in `dir`, or a directory that cannot be deleted.
pub fn destroy(dir: &Path) -> Result<usize> {
    let run = RunFile::read(dir)?
        .filter(RunFile::runner_alive)
        .ok_or_else(|| DeployError::Invalid(format!("no live runner in {}: nothing to destroy", dir.display())))?;
    let pids: Vec<u32> = std::iter::once(run.pid)
        .chain(run.nodes.iter().flat_map(|node| [node.app_pid, node.etcd_pid]).flatten())
        .collect();
    let killed = pids.iter().filter(|pid| super::sys::send(**pid, super::sys::Signal::Kill).is_ok()).count();
    // Nothing may still write into the directory while it is deleted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(|pid| super::sys::exists(*pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::remove_dir_all(dir).map_err(|e| DeployError::io(format!("delete {}", dir.display()), e))?;
    Ok(killed)
}

/// The pid of the runner recorded in `dir` (starting or running), if it still runs.
pub fn running_pid(dir: &Path) -> Option<u32> {
    let starting = std::fs::read_to_string(dir.join(RUNNER_PID_FILE)).ok().and_then(|s| s.trim().parse::<u32>().ok());
    let running = RunFile::read(dir).ok().flatten().map(|run| run.pid);
    [starting, running].into_iter().flatten().find(|pid| is_runner(*pid))
}

/// Whether `pid` is alive and is a `br2k up` runner: a runner killed with SIGKILL leaves
/// its pid behind, and the kernel may give that number to an unrelated process, which
/// must never be taken for the runner (let alone be stopped as one).
fn is_runner(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    super::process_exists(pid) && cmdline.split(|b| *b == 0).any(|arg| arg == b"up")
}

/// This process's claim on a state directory as its runner; released when dropped.
#[derive(Debug)]
pub struct RunnerClaim {
    path: PathBuf,
}

impl RunnerClaim {
    /// Records this process as `dir`'s runner.
    ///
    /// # Errors
    /// [`DeployError::Invalid`] when another runner of `dir` still runs; I/O errors.
    pub fn take(dir: &Path) -> Result<Self> {
        if let Some(pid) = running_pid(dir).filter(|pid| *pid != std::process::id()) {
            return Err(DeployError::Invalid(format!(
                "{} is in use by the runner with pid {pid}; stop it first (`br2k down`)",
                dir.display()
            )));
        }
        let path = dir.join(RUNNER_PID_FILE);
        std::fs::write(&path, std::process::id().to_string())
            .map_err(|e| DeployError::io(format!("write {}", path.display()), e))?;
        Ok(Self { path })
    }
}

impl Drop for RunnerClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the replicas' data in a state directory was made for (`layout.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// The service name.
    pub service: String,
    /// How many replicas (the count a membership change last recorded).
    pub replicas: usize,
    /// How many nodes were made (membership changes add nodes and retire others; a node
    /// keeps its address for good). 0 in files from before membership changes: `replicas`.
    #[serde(default)]
    pub nodes: usize,
    /// The nodes retired by membership changes (0-based indices): they run nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<usize>,
    /// The local slot (it fixes the nodes' addresses).
    pub slot: u8,
    /// Whether the nodes lived in network namespaces (10.213.S.x) or on loopback (127.213.S.x).
    pub namespaces: bool,
}

impl Layout {
    /// Reads `dir/layout.json`; `None` when there is none.
    ///
    /// # Errors
    /// When it exists but cannot be read or is not a layout file.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        read_json(&dir.join(LAYOUT_FILE), "a br2k layout file (remove the state directory to start afresh)")
    }

    /// How many nodes a start on this data makes (retired ones included).
    pub fn node_count(&self) -> usize {
        self.nodes.max(self.replicas + self.retired.len())
    }

    /// Writes it to `dir/layout.json` atomically.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_json(&dir.join(LAYOUT_FILE), self)
    }

    /// Refuses to reuse data made for another service, replica count or network mode.
    /// The count may be the recorded one or that of the live nodes: they differ by one
    /// while a membership change is half done (its journal finishes it once started).
    ///
    /// # Errors
    /// [`DeployError::Invalid`] naming what differs and how to start afresh.
    pub fn check_reuse(&self, service: &str, replicas: usize, namespaces: bool, dir: &Path) -> Result<()> {
        let live = self.node_count() - self.retired.len();
        let differs = if self.service != service {
            Some(format!("service {:?}, not {service:?}", self.service))
        } else if self.replicas != replicas && live != replicas {
            Some(format!("{} replicas, not {replicas}", self.replicas))
        } else if self.namespaces != namespaces {
            let mode = |ns: bool| if ns { "network namespaces" } else { "loopback addresses" };
            Some(format!("{}, not {}", mode(self.namespaces), mode(namespaces)))
        } else {
            None
        };
        match differs {
            None => Ok(()),
            Some(what) => Err(DeployError::Invalid(format!(
                "the data kept in {} was made for {what}; deploy it as it was, or remove that directory to start afresh (its data is lost)",
                dir.display()
            ))),
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path, what: &str) -> Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DeployError::io(format!("read {}", path.display()), e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DeployError::Invalid(format!("{} is not {what}: {e}", path.display())))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("plain data serialises") + "\n";
    let temp = path.with_extension("json.tmp");
    std::fs::write(&temp, text)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| DeployError::io(format!("write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_is_reused_only_as_it_was_made() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Layout::read(dir.path()).unwrap(), None);
        let layout =
            Layout { service: "s".into(), replicas: 3, nodes: 0, retired: Vec::new(), slot: 7, namespaces: false };
        layout.write(dir.path()).unwrap();
        let read = Layout::read(dir.path()).unwrap().unwrap();
        assert_eq!(read, layout);
        read.check_reuse("s", 3, false, dir.path()).unwrap();
        assert_eq!(read.node_count(), 3, "a file from before membership changes has one node per replica");
        let err = read.check_reuse("s", 5, false, dir.path()).unwrap_err().to_string();
        assert!(err.contains("made for 3 replicas, not 5"), "{err}");
        let err = read.check_reuse("t", 3, false, dir.path()).unwrap_err().to_string();
        assert!(err.contains("service \"s\", not \"t\""), "{err}");
        let err = read.check_reuse("s", 3, true, dir.path()).unwrap_err().to_string();
        assert!(err.contains("loopback addresses, not network namespaces"), "{err}");
    }

    #[test]
    fn a_damaged_run_file_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RUN_FILE), "{").unwrap();
        let err = RunFile::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a br2k run file") && err.contains("remove it"), "{err}");
        assert_eq!(running_pid(dir.path()), None);
    }

    #[test]
    fn a_live_process_that_is_not_a_runner_is_not_taken_for_one() {
        let dir = tempfile::tempdir().unwrap();
        // This test process is alive, but it is no `br2k up`.
        std::fs::write(dir.path().join(RUNNER_PID_FILE), std::process::id().to_string()).unwrap();
        assert_eq!(running_pid(dir.path()), None);
    }
}
