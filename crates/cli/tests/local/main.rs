//! `br2k up`, `br2k down` and `br2k testbed` as real processes: real etcd members, real
//! app replicas, a real anvil, and (as root) real network namespaces.
//!
//! The tests of this binary take turns (one lock): each puts a whole service up, and
//! running them side by side on a 2-core machine would measure the machine, not br2k.

mod dashboard;
mod deploy;
mod image;
mod manager;
mod membership;
mod scale;
mod testbed;
mod up;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `br2k`, with the project's tools on PATH.
fn br2k() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_br2k"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let foundry = root.join("tools/node_modules/@foundry-rs/anvil-linux-amd64/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![foundry];
    paths.extend(std::env::split_paths(&path));
    command.env("PATH", std::env::join_paths(paths).expect("PATH joins"));
    command.env_remove("ETH_RPC_URL").env_remove("BR2K_REGISTRY").env_remove("ETH_PRIVATE_KEY");
    command
}

/// The stdout of a `br2k` run that must succeed; both streams when it did not.
fn ok(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `br2k up --detach` of the log server as `name` in `state`, with `extra` flags: its
/// `--json` answer (the run), the test failing with both streams when it did not start.
fn up_detached(name: &str, state: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let output = br2k()
        .args(["--json", "up", "--detach", "--name", name, "--election-timeout", "500"])
        .args(extra)
        .arg("--app")
        .arg(logserver())
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    serde_json::from_str(&ok(output)).unwrap()
}

/// The private directory `br2k` keeps local state under when TMPDIR is `tmp`:
/// `tmp/br2k-<uid>` (the uid read back from a directory this user just made).
fn work_root(tmp: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::create_dir_all(tmp).unwrap();
    tmp.join(format!("br2k-{}", std::fs::metadata(tmp).unwrap().uid()))
}

/// The logserver binary `cargo test --workspace` builds next to `br2k`.
fn logserver() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_br2k")).with_file_name("br2k-logserver");
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p br2k-logserver` first)",
        path.display()
    );
    path
}

fn payments() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_br2k")).with_file_name("br2k-payments");
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p br2k-payments` first)",
        path.display()
    );
    path
}

/// Runs `command` until a line of its progress (stderr) ends with `ending`, then kills it
/// with SIGKILL, as an operator's machine lost mid-command would; fails if it ends first.
fn kill_when(command: &mut Command, ending: &str) {
    use std::io::BufRead as _;
    let mut child = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut said = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let reached = line.ends_with(ending);
        said.push(line);
        if reached {
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
    }
    panic!("{command:?} ended ({}) before a line ending {ending:?}:\n{}", child.wait().unwrap(), said.join("\n"));
}

/// The steps of a grow and of a shrink as `br2k scale` reports them, each with the name
/// the journal gives it.
const GROW_STEPS: [(&str, &str); 5] = [
    ("add the etcd member as a learner", "add-learner"),
    ("start the replica", "start-replica"),
    ("promote the learner to a voter", "promote"),
    ("catch up", "catch-up"),
    ("record the replica count", "record-count"),
];
const SHRINK_STEPS: [(&str, &str); 5] = [
    ("move leadership", "move-leadership"),
    ("remove the etcd member", "remove-member"),
    ("stop the replica", "stop-replica"),
    ("delete its data", "delete-data"),
    ("record the replica count", "record-count"),
];

fn namespaces_of_slot(slot: u64) -> Vec<String> {
    let prefix = format!("b2k{slot}n");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)).collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// One HTTP/1.1 request to `base` (`http://host:port`), by hand (the tests need no HTTP
/// client crate): the status code (0 when nothing answered) and the body.
fn http(base: &str, method: &str, path: &str, json_body: &str) -> (u16, String) {
    http_with_headers(base, method, path, &[], json_body)
}

/// [`http`] with extra request headers.
fn http_with_headers(base: &str, method: &str, path: &str, headers: &[(&str, &str)], json_body: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(
        &authority.parse().expect("an IP:port location"),
        std::time::Duration::from_secs(2),
    ) else {
        return (0, String::new());
    };
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n{json_body}",
        headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect::<String>(),
        json_body.len()
    );
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}
