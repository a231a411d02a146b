//! `br2k scale`, `br2k replace` and `br2k members` against a `br2k up` runner, as an
//! operator uses them: each command killed (SIGKILL) at each step of a grow and of a
//! shrink and finished by the next command, a SIGKILLed replica replaced, while a client
//! sends requests with idempotency keys and fails over. At the end every live replica
//! holds the same log, with every acknowledged request once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{alive, br2k, http_with_headers, ok, one_at_a_time};

const NAME: &str = "t-scale";

struct Runner {
    state: PathBuf,
}

impl Runner {
    /// `br2k up --detach` of the log server in `state`, with `extra` flags.
    fn up(state: &Path, extra: &[&str]) -> Self {
        crate::up_detached(NAME, state, extra);
        Self { state: state.to_owned() }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = br2k().args(["down", "--name", NAME]).arg("--state-dir").arg(&self.state).output();
    }
}

fn run_file(state: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(state.join("run.json")).unwrap()).unwrap()
}

/// The app URLs of the nodes that are members.
fn live_urls(state: &Path) -> Vec<String> {
    run_file(state)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["retired"] != true)
        .map(|n| n["app_url"].as_str().unwrap().to_owned())
        .collect()
}

fn members(state: &Path) -> Value {
    let output = br2k().args(["--json", "members", NAME]).arg("--state-dir").arg(state).output().unwrap();
    serde_json::from_str(&ok(output)).unwrap()
}

fn command(state: &Path, args: &[&str]) -> std::process::Command {
    let mut command = br2k();
    command.args(args).arg("--state-dir").arg(state).args(["--step-timeout", "120"]);
    command
}

/// Sends `POST /log` requests one after another to the live nodes, each with its own
/// Idempotency-Key and retried (failing over) until acknowledged.
fn client(state: &Path, stop: &AtomicBool) -> BTreeSet<u64> {
    let mut acknowledged = BTreeSet::new();
    let (mut seq, mut next) = (0, 0);
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let started = Instant::now();
        loop {
            let urls = live_urls(state);
            let url = &urls[next % urls.len()];
            let body = format!(r#"{{"user":9,"seq":{seq}}}"#);
            let key = format!("scale-test-{seq}");
            let (status, _) = http_with_headers(url, "POST", "/log", &[("Idempotency-Key", &key)], &body);
            if (200..300).contains(&status) {
                acknowledged.insert(seq);
                break;
            }
            next += 1;
            assert!(started.elapsed() < Duration::from_secs(90), "request {seq} never acknowledged");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    acknowledged
}

fn voters(members: &Value) -> usize {
    members["members"].as_array().unwrap().iter().filter(|m| m["learner"] == false).count()
}

#[test]
fn scale_and_replace_killed_at_every_step_are_finished_by_the_next_command_with_nothing_lost() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _runner = Runner::up(&state, &["--no-restart", "--snapshot-interval", "40", "--trailing-entries", "10"]);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (state, stop) = (state.clone(), stop.clone());
        std::thread::spawn(move || client(&state, &stop))
    };
    std::thread::sleep(Duration::from_secs(1));

    // Each step of a grow (3 -> 4) and of a shrink (4 -> 3), the command killed as the
    // step begins; `members` shows the change stopped there, and the same command run
    // again finishes it.
    let started = Instant::now();
    for ((grow, grow_key), (shrink, shrink_key)) in crate::GROW_STEPS.iter().zip(crate::SHRINK_STEPS.iter()) {
        for (replicas, step, key) in [("4", grow, grow_key), ("3", shrink, shrink_key)] {
            let args = ["scale", NAME, "--replicas", replicas];
            crate::kill_when(&mut command(&state, &args), &format!(": {step} ..."));
            let stopped = members(&state);
            assert_eq!(stopped["inProgress"]["next"], *key, "the journal shows where it stopped: {stopped}");
            let finished = command(&state, &args).output().unwrap();
            let text = String::from_utf8_lossy(&finished.stderr).into_owned();
            assert!(finished.status.success(), "resuming after a kill at {step:?}:\n{text}");
            assert!(text.contains("left half done"), "{text}");
            let now = members(&state);
            assert_eq!(now["inProgress"], Value::Null, "{now}");
            assert_eq!(voters(&now).to_string(), replicas, "{now}");
            assert!(now["members"].as_array().unwrap().iter().all(|m| m["learner"] == false && m["healthy"] == true));
        }
    }
    eprintln!("10 changes, each killed once and finished, in {:?}", started.elapsed());

    // A replica killed with SIGKILL (the runner starts nothing again: --no-restart) is
    // replaced by a fresh one on another node.
    let run = run_file(&state);
    let victim = run["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["retired"] != true && n["role"] == "follower")
        .unwrap()
        .clone();
    let name = victim["name"].as_str().unwrap().to_owned();
    for pid in [victim["app_pid"].as_u64().unwrap(), victim["etcd_pid"].as_u64().unwrap()] {
        assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
        while alive(pid) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let replaced = Instant::now();
    let output = command(&state, &["--json", "replace", NAME, &name]).output().unwrap();
    let change: Value = serde_json::from_str(&ok(output)).unwrap();
    assert_eq!(change["change"]["kind"]["old"], name.as_str(), "{change}");
    eprintln!("replaced the killed {name} by {} in {:?}", change["change"]["kind"]["new"], replaced.elapsed());
    let now = members(&state);
    assert_eq!(voters(&now), 3, "{now}");
    assert!(now["members"].as_array().unwrap().iter().all(|m| m["replica"] != name.as_str() && m["healthy"] == true));
    let layout: Value = serde_json::from_str(&std::fs::read_to_string(state.join("layout.json")).unwrap()).unwrap();
    assert_eq!(layout["replicas"], 3, "the count is recorded: {layout}");

    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let acknowledged = sender.join().unwrap();
    assert!(acknowledged.len() > 20, "only {} requests went through", acknowledged.len());

    // Every live replica converges on the same log, with every acknowledged request once.
    let dirs: Vec<PathBuf> = run_file(&state)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["retired"] != true)
        .map(|n| PathBuf::from(n["dir"].as_str().unwrap()).join("app"))
        .collect();
    assert_eq!(dirs.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(30);
    let log = loop {
        let logs: Vec<Vec<(u64, Option<u64>)>> = dirs
            .iter()
            .map(|d| br2k_logserver::read_log(d).unwrap().into_iter().map(|e| (e.index, e.seq)).collect())
            .collect();
        if logs.iter().all(|l| *l == logs[0]) && logs[0].len() >= acknowledged.len() {
            break logs[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "the replicas did not converge: {:?}",
            logs.iter().map(Vec::len).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let seqs: Vec<u64> = log.iter().filter_map(|(_, seq)| *seq).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(seqs.len(), unique.len(), "a request was applied twice");
    let lost: Vec<&u64> = acknowledged.difference(&unique).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    eprintln!("{} requests acknowledged, 0 lost, 0 applied twice", acknowledged.len());
}

/// With etcd TLS, an added node gets a certificate of the service's authority (made for
/// every address a node can have when the service starts: its key is never kept) and the
/// commands present a live node's certificate: a grow to 4 and back works as without.
#[test]
fn with_etcd_tls_the_service_grows_and_shrinks_back() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _runner = Runner::up(&state, &["--etcd-tls"]);
    for replicas in ["4", "3"] {
        ok(command(&state, &["scale", NAME, "--replicas", replicas]).output().unwrap());
        let now = members(&state);
        assert_eq!(voters(&now).to_string(), replicas, "{now}");
        assert!(now["members"].as_array().unwrap().iter().all(|m| m["healthy"] == true), "{now}");
        assert!(
            now["members"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["peerUrls"][0].as_str().unwrap().starts_with("https://"))
        );
        if replicas == "4" {
            let own = std::fs::read_to_string(state.join("n4/tls/member.crt")).unwrap();
            assert_ne!(
                own,
                std::fs::read_to_string(state.join("n1/tls/member.crt")).unwrap(),
                "n4 has its own certificate"
            );
            let ca = |n: &str| std::fs::read_to_string(state.join(n).join("tls/ca.crt")).unwrap();
            assert_eq!(ca("n4"), ca("n1"), "of the service's one authority");
        }
    }
}
