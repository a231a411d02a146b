//! `br2k up --detach`, a failover by hand, `br2k down`, cleanup after a crashed runner, and
//! `br2k dashboard` following a failover.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{alive, br2k, logserver, namespaces_of_slot, one_at_a_time};

/// A detached `br2k up`, brought down when dropped (also when a test fails half-way).
struct Up {
    name: String,
    state: std::path::PathBuf,
    run: Value,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = br2k().args(["down", "--name", &self.name]).arg("--state-dir").arg(&self.state).output();
    }
}

fn up(name: &str, state: &Path) -> Up {
    let output = br2k()
        .args(["--json", "up", "--detach", "--name", name, "--election-timeout", "500"])
        .arg("--app")
        .arg(logserver())
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "up failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Up { name: name.into(), state: state.to_owned(), run: serde_json::from_slice(&output.stdout).unwrap() }
}

fn down(name: &str, state: &Path) -> std::process::Output {
    br2k().args(["down", "--name", name]).arg("--state-dir").arg(state).output().unwrap()
}

fn run_file(state: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(state.join("run.json")).ok()?).ok()
}

fn pids(run: &Value) -> Vec<u64> {
    run["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| [n["app_pid"].as_u64(), n["etcd_pid"].as_u64()])
        .flatten()
        .collect()
}

#[test]
fn killing_the_leader_by_hand_moves_the_registry_location_then_down_stops_everything() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let service = up("t-failover", &state);
    let run = &service.run;
    let first_epoch = run["epoch"].as_u64().unwrap();
    let location = run["location"].as_str().unwrap().to_owned();
    let leader = run["nodes"].as_array().unwrap().iter().find(|n| n["app_url"] == location.as_str()).unwrap().clone();
    assert_eq!(leader["role"], "leader");
    let slot = run["slot"].as_u64().unwrap();

    // Kill the leader's app and etcd member, as an operator would with kill -9.
    let killed = Instant::now();
    for pid in [leader["app_pid"].as_u64().unwrap(), leader["etcd_pid"].as_u64().unwrap()] {
        assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    }
    let moved = loop {
        let now = run_file(&state).unwrap();
        if now["epoch"].as_u64().unwrap_or(0) > first_epoch && now["location"] != location.as_str() {
            break now;
        }
        assert!(killed.elapsed() < Duration::from_secs(20), "no new location within 20 s: {now}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("new location {} after {:?}", moved["location"], killed.elapsed());
    // The runner starts the killed node again, which rejoins as a follower.
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_file(&state).unwrap()["nodes"].as_array().unwrap().iter().filter(|n| n["role"] == "follower").count() < 2
    {
        assert!(Instant::now() < deadline, "the killed node did not come back: {}", run_file(&state).unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }

    let all = pids(&run_file(&state).unwrap());
    let output = down("t-failover", &state);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("t-failover stopped"));
    assert!(all.iter().all(|&pid| !alive(pid)), "every replica process is gone");
    assert!(namespaces_of_slot(slot).is_empty(), "no namespace is left: {:?}", namespaces_of_slot(slot));
    assert!(!state.join("run.json").exists());

    // A second down says so instead of pretending.
    let output = down("t-failover", &state);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not up here"));
}

#[test]
fn a_crashed_runner_takes_its_replicas_along_and_the_next_start_clears_its_network() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let crashed = up("t-crash", &state);
    let run = crashed.run.clone();
    std::mem::forget(crashed); // this runner is killed below, not brought down
    let slot = run["slot"].as_u64().unwrap();
    let children = pids(&run);
    let runner = run["pid"].as_u64().unwrap();
    assert!(std::process::Command::new("kill").args(["-9", &runner.to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while children.iter().any(|&pid| alive(pid)) {
        assert!(Instant::now() < deadline, "replica processes outlived their runner");
        std::thread::sleep(Duration::from_millis(100));
    }
    let namespaces = run["namespaces"] == true;
    if namespaces {
        assert_eq!(namespaces_of_slot(slot).len(), 3, "a crash leaves the namespaces for the next runner to clear");
        // Mark one: a namespace made again under the same name will not have the mark
        // (the kernel reuses namespace ids, so they cannot tell).
        let mark =
            ["-n", &format!("b2k{slot}n1"), "link", "add", "b2kmark", "type", "veth", "peer", "name", "b2kmark2"];
        assert!(std::process::Command::new("ip").args(mark).status().unwrap().success());
    }

    // The next start finds the dead runner's slot and clears it before taking one.
    let again = up("t-crash", &state);
    let new_slot = again.run["slot"].as_u64().unwrap();
    if namespaces {
        let marked = std::process::Command::new("ip")
            .args(["-n", &format!("b2k{slot}n1"), "link", "show", "b2kmark"])
            .output()
            .unwrap();
        assert!(!marked.status.success(), "the crashed runner's namespace b2k{slot}n1 is still there");
        assert_eq!(namespaces_of_slot(new_slot).len(), 3);
    }
    let output = down("t-crash", &state);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(namespaces_of_slot(new_slot).is_empty() && namespaces_of_slot(slot).is_empty());
}

/// `br2k dashboard` against a service put up here: the page and its data show three
/// replicas and the leader, and after the leader is killed the event stream the page
/// listens to brings the new leader by itself (nobody asks again). No answer carries the
/// chain key the service's replicas sign with.
#[test]
fn the_dashboard_shows_the_replicas_and_pushes_a_leader_change_to_the_page() {
    use std::io::{BufRead as _, Write as _};
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    let state = crate::work_root(&tmp).join("up").join("t-dash");
    // Put up with the default state directory, which the dashboard finds by name.
    let output = br2k()
        .env("TMPDIR", &tmp)
        .args(["--json", "up", "--detach", "--name", "t-dash", "--election-timeout", "500"])
        .arg("--app")
        .arg(logserver())
        .output()
        .unwrap();
    assert!(output.status.success(), "up failed: {}", String::from_utf8_lossy(&output.stderr));
    let service = Up { name: "t-dash".into(), state, run: serde_json::from_slice(&output.stdout).unwrap() };
    let run = &service.run;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let mut dashboard = br2k()
        .env("TMPDIR", &tmp)
        .args(["dashboard", "t-dash", "--refresh", "200ms", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--rpc-url", run["rpc_url"].as_str().unwrap(), "--registry", run["registry"].as_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _stop = Stop(&mut dashboard);

    // The data behind the page: three running replicas, one of them leading.
    let leader_of = |view: &Value| -> Option<String> {
        let replicas = view["services"][0]["replicas"].as_array()?;
        let leaders: Vec<_> = replicas.iter().filter(|r| r["status"]["role"] == "leader").collect();
        (replicas.len() == 3 && leaders.len() == 1).then(|| leaders[0]["name"].as_str().unwrap().to_owned())
    };
    let started = Instant::now();
    let (first_leader, services) = loop {
        let (code, body) = crate::http(&base, "GET", "/api/services", "");
        if code == 200 {
            let view: Value = serde_json::from_str(&body).unwrap();
            if let Some(leader) = leader_of(&view) {
                break (leader, body);
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the dashboard never showed 3 replicas and a leader");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (code, page) = crate::http(&base, "GET", "/", "");
    assert_eq!(code, 200);
    assert!(page.contains("br2k dashboard") && page.contains("new EventSource(\"/api/events\")"), "{page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page loads nothing from elsewhere");

    // The page's event stream: its first event is the current view.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut events = std::io::BufReader::new(stream);
    let mut next_view = || loop {
        let mut line = String::new();
        assert!(events.read_line(&mut line).unwrap() > 0, "the event stream ended");
        if let Some(data) = line.strip_prefix("data: ") {
            return serde_json::from_str::<Value>(data.trim_end()).unwrap();
        }
    };
    assert_eq!(leader_of(&next_view()).as_deref(), Some(first_leader.as_str()));

    // Kill the leader's app and etcd member; the stream alone brings the new leader.
    let node = run["nodes"].as_array().unwrap().iter().find(|n| n["name"] == first_leader.as_str()).unwrap();
    for pid in [node["app_pid"].as_u64().unwrap(), node["etcd_pid"].as_u64().unwrap()] {
        assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    }
    let killed = Instant::now();
    let mut pushed = Vec::new();
    let new_leader = loop {
        let view = next_view();
        pushed.push(view.to_string());
        if let Some(leader) = leader_of(&view).filter(|l| *l != first_leader) {
            break leader;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "no new leader pushed within 30 s");
    };
    eprintln!("the dashboard pushed leader {new_leader} {:?} after the kill", killed.elapsed());

    // Nothing it served carries a key: not the anvil accounts' keys the local chain and
    // the replicas sign with, nor anything named like a secret.
    let served = [services, page].into_iter().chain(pushed).collect::<Vec<_>>().join("\n").to_lowercase();
    for secret in [
        "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
        "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
        "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdfc2a4c",
        "7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
        "private_key",
        "password",
        "token",
    ] {
        assert!(!served.contains(secret), "the dashboard served {secret:?}");
    }
}
