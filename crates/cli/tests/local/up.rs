//! `br2k up --detach`, a failover by hand, `br2k down`, and cleanup after a crashed runner.

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
    Up { name: name.into(), state: state.to_owned(), run: crate::up_detached(name, state, &[]) }
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

#[test]
fn with_etcd_tls_the_service_serves_and_etcd_answers_only_clients_with_a_certificate_of_its_authority() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let output = br2k()
        .args(["--json", "up", "--detach", "--name", "t-tls", "--election-timeout", "500", "--etcd-tls"])
        .arg("--app")
        .arg(logserver())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(output.status.success(), "up failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let service =
        Up { name: "t-tls".into(), state: state.clone(), run: serde_json::from_slice(&output.stdout).unwrap() };
    let location = service.run["location"].as_str().unwrap().to_owned();
    let (code, body) = crate::http(&location, "POST", "/log", r#"{"user": 7}"#);
    assert_eq!(code, 200, "a request is logged and answered over etcd with TLS: {body}");

    let node = &service.run["nodes"][0];
    let url = node["etcd_url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://"), "{url}");
    let tls_dir = state.join("n1/tls");
    let own = br2k_replication::EtcdTls {
        ca: tls_dir.join("ca.crt"),
        cert: tls_dir.join("member.crt"),
        key: tls_dir.join("member.key"),
    };
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&own.key).unwrap().permissions().mode() & 0o777, 0o600, "the key is private");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let read = |url: String, tls: Option<br2k_replication::EtcdTls>| {
        runtime.block_on(br2k_replication::inspect::read_records_with(
            &url,
            "t-tls",
            Duration::from_secs(3),
            tls.as_ref(),
        ))
    };
    let records = read(url.clone(), Some(own.clone())).expect("a replica's certificate reads the records");
    assert!(records.log_size >= 1, "{records:?}");
    // Plain HTTP is not served at all, and a certificate of another authority is refused.
    assert!(read(url.replace("https://", "http://"), None).is_err(), "plain HTTP answered");
    let stranger_dir = dir.path().join("stranger");
    let stranger = br2k_deploy::etcd_tls::EtcdCertificates::make("t-tls", &[vec!["10.0.0.1".into()]])
        .unwrap()
        .write_member(0, &stranger_dir)
        .unwrap();
    let foreign = br2k_replication::EtcdTls { ca: own.ca.clone(), cert: stranger.cert, key: stranger.key };
    assert!(read(url, Some(foreign)).is_err(), "a client certificate of another authority was accepted");
}
