//! `br2k manager run` against real parts: an anvil with the registry, a real container
//! registry holding the logserver image, the service deployed locally from it. The
//! disaster is real too: the runner and every replica's app and etcd member are killed
//! with SIGKILL; only their data directories survive, as disks survive a power cut.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use br2k_test_utils::{Anvil, OciRegistry};
use serde_json::Value;

use crate::deploy::br2k_at;
use crate::{alive, http, logserver, ok, one_at_a_time};

/// A project with a registry, the logserver image pushed, and `service` deployed from it.
struct Project {
    dir: tempfile::TempDir,
    anvil: Anvil,
    registry: OciRegistry,
    service: &'static str,
    manager: Option<Child>,
}

impl Project {
    fn deploy(service: &'static str) -> Self {
        let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
        let registry =
            OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let project = Self { dir, anvil, registry, service, manager: None };
        project.run(&["service-registry", "deploy"]);
        let logserver = logserver();
        project.run(&["image", "build", logserver.to_str().unwrap(), "--name", "br2k/logserver", "--tag", "v1"]);
        project.run(&["image-registry", "add", "lab", &project.registry.url(), "--plain-http"]);
        project.run(&[
            "deploy",
            service,
            "--context",
            "local",
            "--image",
            "br2k/logserver:v1",
            "--network",
            "loopback",
            "--election-timeout",
            "500",
            "--backup-interval",
            "2",
        ]);
        project
    }

    fn br2k(&self) -> Command {
        br2k_at(self.dir.path(), &self.anvil)
    }

    fn run(&self, args: &[&str]) -> String {
        ok(self.br2k().args(args).output().unwrap())
    }

    fn state_dir(&self) -> PathBuf {
        crate::work_root(&self.dir.path().join("tmp")).join("up").join(self.service)
    }

    fn manager_log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("manager-{n}.log"))
    }

    /// Starts `br2k manager run` (claims only, no probes), its log in `manager-N.log`.
    fn start_manager(&mut self, n: usize) {
        self.start_manager_probing(n, "0s");
    }

    /// Starts `br2k manager run` probing every `every` (`0s`: never).
    fn start_manager_probing(&mut self, n: usize, every: &str) {
        let log = std::fs::File::create(self.manager_log(n)).unwrap();
        let child = self
            .br2k()
            .args(["manager", "run", "--service", self.service, "--probe-interval", every, "--grace", "10s"])
            .args(["--poll-interval", "200ms", "--metrics", "off", "--network", "loopback"])
            .args(["--election-timeout", "500", "--backup-interval", "2"])
            .arg("--state-dir")
            .arg(self.dir.path().join("manager"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.manager = Some(child);
        self.wait_log(n, "manager started", Duration::from_secs(30));
    }

    /// SIGKILLs the manager, as a crash would.
    fn kill_manager(&mut self) {
        if let Some(mut child) = self.manager.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_log(&self, n: usize, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(self.manager_log(n)).unwrap_or_default();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "the manager did not log {text:?} within {timeout:?}:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The location and epoch the registry holds.
    fn resolve(&self) -> (String, u64) {
        let resolved: Value = serde_json::from_str(&self.run(&["--json", "resolve", self.service])).unwrap();
        (resolved["location"].as_str().unwrap().to_owned(), resolved["epoch"].as_u64().unwrap())
    }

    fn state(&self) -> String {
        let info: Value = serde_json::from_str(&self.run(&["--json", "service", "info", self.service])).unwrap();
        info["state"].as_str().unwrap().to_owned()
    }

    /// Appends `user`'s entries `seqs` through the leader; every one must be acknowledged.
    fn append(&self, user: u64, seqs: std::ops::RangeInclusive<u64>) -> Vec<u64> {
        let (location, _) = self.resolve();
        seqs.map(|seq| {
            let (status, body) = http(&location, "POST", "/log", &format!("{{\"user\": {user}, \"seq\": {seq}}}"));
            assert_eq!(status, 200, "POST /log at {location}: {body}");
            serde_json::from_str::<Value>(&body).unwrap()["index"].as_u64().unwrap()
        })
        .collect()
    }

    /// The log indices the service holds now.
    fn indices(&self) -> Vec<u64> {
        let (location, _) = self.resolve();
        let (status, body) = http(&location, "GET", "/log", "");
        assert_eq!(status, 200, "GET /log at {location}: {body}");
        let entries: Value = serde_json::from_str(&body).unwrap();
        entries["entries"].as_array().unwrap().iter().map(|e| e["index"].as_u64().unwrap()).collect()
    }

    /// Kills the runner and every replica's app and etcd member with SIGKILL, and waits
    /// until none of them is left.
    fn disaster(&self) {
        let run: Value =
            serde_json::from_str(&std::fs::read_to_string(self.state_dir().join("run.json")).unwrap()).unwrap();
        let mut pids = vec![run["pid"].as_u64().unwrap()];
        let live: Vec<&Value> = run["nodes"].as_array().unwrap().iter().filter(|n| n["retired"] != true).collect();
        for node in &live {
            pids.extend(["app_pid", "etcd_pid"].iter().filter_map(|k| node[k].as_u64()));
        }
        assert_eq!(pids.len(), 1 + 2 * live.len(), "a runner and each live node's app and etcd: {run}");
        let list: Vec<String> = pids.iter().map(ToString::to_string).collect();
        ok(Command::new("kill").arg("-9").args(&list).output().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|pid| alive(*pid)) {
            assert!(Instant::now() < deadline, "processes {pids:?} survived SIGKILL");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Files a claim with anvil key `key` (not the manager's).
    fn claim(&self, key: usize, reason: &str) {
        let output = self
            .br2k()
            .env("ETH_PRIVATE_KEY", alloy::hex::encode_prefixed(self.anvil.key(key).to_bytes()))
            .args(["claim", self.service, "--reason", reason])
            .output()
            .unwrap();
        ok(output);
    }

    /// Waits until a location with an epoch above `epoch` answers `/br2k/health`.
    fn wait_answering(&self, epoch: u64, timeout: Duration) -> (String, u64) {
        let deadline = Instant::now() + timeout;
        loop {
            let (location, now) = self.resolve();
            if now > epoch && http(&location, "GET", "/br2k/health", "").0 == 200 {
                return (location, now);
            }
            assert!(
                Instant::now() < deadline,
                "no new location above epoch {epoch} answered within {timeout:?}; manager log:\n{}",
                std::fs::read_to_string(self.manager_log(1)).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid in the state directory's `runner.pid`, if that runner is alive.
    fn live_runner(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.state_dir().join("runner.pid")).ok()?;
        text.trim().parse().ok().filter(|pid| alive(*pid))
    }

    /// The runner pid `run.json` records.
    fn serving_runner(&self) -> u64 {
        let run: Value =
            serde_json::from_str(&std::fs::read_to_string(self.state_dir().join("run.json")).unwrap()).unwrap();
        run["pid"].as_u64().unwrap()
    }

    /// Waits until the manager's log holds `text` `n` times.
    fn wait_count(&self, log: usize, text: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let content = std::fs::read_to_string(self.manager_log(log)).unwrap_or_default();
            if count(&content, text) >= n {
                return content;
            }
            assert!(Instant::now() < deadline, "the manager did not log {text:?} {n} times:\n{content}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        self.kill_manager();
        let _ = self.br2k().args(["down", "--name", self.service]).output();
    }
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// The backup index the chain records (0 before the first).
fn recorded_backup(project: &Project) -> u64 {
    let listed: Value = serde_json::from_str(&project.run(&["--json", "backup", "ls", project.service])).unwrap();
    listed["recorded"]["index"].as_u64().unwrap_or(0)
}

#[test]
fn a_claim_after_every_disk_was_lost_brings_the_service_back_from_the_backup_recorded_on_chain() {
    let _turn = one_at_a_time();
    let mut project = Project::deploy("restored");
    let backed_up = project.append(1, 1..=20);
    let last = *backed_up.iter().max().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while recorded_backup(&project) < last {
        assert!(Instant::now() < deadline, "no backup reaching {last} was recorded within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Acknowledged within the last backup interval: these may be lost, and are counted.
    let recent = project.append(1, 21..=25);
    let (_, epoch) = project.resolve();

    // Every process killed and every disk lost: the runner's state directory (the
    // replicas' data and their etcd members') is deleted.
    project.disaster();
    std::fs::remove_dir_all(project.state_dir()).unwrap();
    project.start_manager(1);
    let claimed = Instant::now();
    project.claim(3, "no answer from any replica");
    let (_, new_epoch) = project.wait_answering(epoch, Duration::from_secs(180));
    eprintln!("claim to answering after the disks were lost: {:.1} s", claimed.elapsed().as_secs_f64());
    assert!(new_epoch > epoch);
    project.wait_log(1, "recovered in", Duration::from_secs(30));

    let held = project.indices();
    for index in &backed_up {
        assert!(held.contains(index), "request {index}, acknowledged before the recorded backup, was lost: {held:?}");
    }
    let lost = recent.iter().filter(|i| !held.contains(i)).count();
    eprintln!("acknowledged within the last backup interval and lost: {lost} of {}", recent.len());
    let after = project.append(2, 1..=1);
    assert!(after[0] > last, "indexes go on after the backup's");
    assert_eq!(project.state(), "running");
}

#[test]
fn a_claim_after_every_replica_died_brings_the_service_back_from_its_image_with_its_data() {
    let _turn = one_at_a_time();
    let mut project = Project::deploy("recovered");
    let acknowledged = project.append(1, 1..=5);
    let (before, epoch) = project.resolve();
    project.start_manager(1);

    // A claim against a healthy service is dropped (spurious), twice (duplicate).
    project.claim(1, "spurious: it looked slow");
    project.claim(2, "spurious again");
    let log = project.wait_log(1, "claim dropped: it answers", Duration::from_secs(30));
    assert!(!log.contains("recovering:"), "{log}");

    project.disaster();
    assert_eq!(http(&before, "GET", "/br2k/health", "").0, 0, "nothing answers at {before} any more");
    let claimed = Instant::now();
    project.claim(3, "no answer from any replica");
    let (after, new_epoch) = project.wait_answering(epoch, Duration::from_secs(120));
    let took = claimed.elapsed();
    eprintln!("claim to answering: {:.1} s (epoch {epoch} -> {new_epoch}, {before} -> {after})", took.as_secs_f64());

    let log = project.wait_log(1, "recovered in", Duration::from_secs(30));
    assert_eq!(count(&log, "recovering:"), 1, "one recovery:\n{log}");
    assert!(log.contains("redeploying") && log.contains("@sha256:"), "redeployed by digest:\n{log}");
    assert!(log.contains("pulling") && log.contains("every blob checked"), "{log}");
    assert_eq!(project.state(), "running");
    // The replicas run the image unpacked from the pull, not the build output.
    let unpacked =
        crate::work_root(&project.dir.path().join("tmp")).join("deploy/recovered/rootfs/usr/local/bin/br2k-logserver");
    let run: Value =
        serde_json::from_str(&std::fs::read_to_string(project.state_dir().join("run.json")).unwrap()).unwrap();
    for node in run["nodes"].as_array().unwrap() {
        let exe = std::fs::read_link(format!("/proc/{}/exe", node["app_pid"].as_u64().unwrap())).unwrap();
        assert_eq!(exe, unpacked);
    }
    // Everything acknowledged before the disaster is still there, and it takes more.
    let held = project.indices();
    for index in &acknowledged {
        assert!(held.contains(index), "index {index} acknowledged before the disaster is gone: {held:?}");
    }
    let more = project.append(1, 6..=7);
    assert!(more.iter().all(|i| i > acknowledged.last().unwrap()), "{more:?} after {acknowledged:?}");

    // `br2k status` shows it all: state, the three replicas with one leader, no open claim.
    let status = project.run(&["status", "recovered"]);
    assert!(status.starts_with("recovered  running  epoch"), "{status}");
    assert_eq!(count(&status, " leader "), 1, "{status}");
    assert_eq!(count(&status, " follower "), 2, "{status}");
    assert!(status.contains("open claims (since the last new location): 0"), "{status}");
    assert!(status.contains("backup: none recorded on chain"), "{status}");
    assert!(status.contains("@sha256:"), "{status}");
    // Each replica's storage: snapshots, where the log starts, its etcd member's database
    // against the explicit quota the local backend gives it.
    assert_eq!(count(&status, "log in etcd from "), 3, "{status}");
    assert_eq!(count(&status, " of a 2.0 GiB quota ("), 3, "{status}");

    // A grow to 4 whose command is killed as it promotes the new member: the change
    // stays journaled in the service's etcd, the recorded count stays 3.
    crate::kill_when(
        project.br2k().args(["scale", "recovered", "--replicas", "4", "--state-dir"]).arg(project.state_dir()),
        ": promote the learner to a voter ...",
    );
    let info: Value = serde_json::from_str(&project.run(&["--json", "service", "info", "recovered"])).unwrap();
    assert_eq!(info["recoveryInfo"]["replicas"], 3, "{info}");

    // A burst of claims during a second disaster: one recovery, on the data kept (the 4th
    // node included), after which the manager finishes the interrupted grow.
    let (_, epoch) = project.resolve();
    project.disaster();
    for key in [4, 5, 6] {
        project.claim(key, "burst");
    }
    project.wait_answering(epoch, Duration::from_secs(120));
    project.wait_count(1, "recovered in", 2);
    let log = project.wait_count(1, "claim: ", 6);
    assert_eq!(count(&log, "recovering:"), 2, "one recovery per disaster, whatever the claims:\n{log}");
    assert_eq!(count(&log, "claim: "), 6, "every claim was seen:\n{log}");
    assert!(project.indices().len() >= acknowledged.len() + more.len());
    let log =
        project.wait_log(1, "membership change left half done: add n4 finished (4 replicas)", Duration::from_secs(120));
    assert!(log.contains("finishing the abandoned add n4 at: promote the learner to a voter"), "{log}");
    let info: Value = serde_json::from_str(&project.run(&["--json", "service", "info", "recovered"])).unwrap();
    assert_eq!(info["recoveryInfo"]["replicas"], 4, "the grown count is recorded on chain: {info}");
    let state = project.state_dir();
    let members: Value =
        serde_json::from_str(&project.run(&["--json", "members", "recovered", "--state-dir", state.to_str().unwrap()]))
            .unwrap();
    assert_eq!(members["voters"], 4, "{members}");
    assert_eq!(members["inProgress"], Value::Null, "{members}");
    assert!(members["members"].as_array().unwrap().iter().all(|m| m["healthy"] == true), "{members}");
}

/// `br2k scale` killed as each step of a grow (3 to 4) and of a shrink (4 to 3) begins;
/// the manager, probing every second, finishes each change nobody runs, and the recovery
/// info on chain ends at the count the change reached.
#[test]
fn the_manager_finishes_a_scale_killed_at_any_step() {
    let _turn = one_at_a_time();
    let mut project = Project::deploy("rescaled");
    let acknowledged = project.append(1, 1..=5);
    project.start_manager_probing(1, "1s");
    let state = project.state_dir();
    let started = Instant::now();
    let mut finished = 0;
    for ((grow, _), (shrink, _)) in crate::GROW_STEPS.iter().zip(crate::SHRINK_STEPS.iter()) {
        for (replicas, step) in [("4", grow), ("3", shrink)] {
            crate::kill_when(
                project.br2k().args(["scale", "rescaled", "--replicas", replicas, "--state-dir"]).arg(&state),
                &format!(": {step} ..."),
            );
            finished += 1;
            let log = project.wait_count(1, "membership change left half done: ", finished);
            let members: Value = serde_json::from_str(&project.run(&[
                "--json",
                "members",
                "rescaled",
                "--state-dir",
                state.to_str().unwrap(),
            ]))
            .unwrap();
            assert_eq!(members["inProgress"], Value::Null, "killed at {step:?}: {members}\n{log}");
            assert_eq!(members["voters"].to_string(), replicas, "killed at {step:?}: {members}\n{log}");
            let info: Value = serde_json::from_str(&project.run(&["--json", "service", "info", "rescaled"])).unwrap();
            assert_eq!(info["recoveryInfo"]["replicas"].to_string(), replicas, "killed at {step:?}: {info}");
        }
    }
    eprintln!("10 changes killed at every step, each finished by the manager, in {:?}", started.elapsed());
    let log = std::fs::read_to_string(project.manager_log(1)).unwrap();
    assert_eq!(count(&log, "could not finish"), 0, "{log}");
    assert_eq!(count(&log, "recovering:"), 0, "no recovery: the service served throughout\n{log}");
    let held = project.indices();
    assert!(acknowledged.iter().all(|i| held.contains(i)), "{acknowledged:?} in {held:?}");
}

#[test]
fn a_manager_killed_mid_recovery_finishes_it_once_and_a_tampered_image_is_refused() {
    let _turn = one_at_a_time();
    let mut project = Project::deploy("resumed");
    let acknowledged = project.append(7, 1..=3);
    let (_, epoch) = project.resolve();
    project.start_manager(1);

    project.disaster();
    project.claim(1, "down");
    // Killed once the redeployed runner exists, before the service answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    let runner = loop {
        if let Some(pid) = project.live_runner() {
            break pid;
        }
        assert!(Instant::now() < deadline, "the manager did not start a runner");
        std::thread::sleep(Duration::from_millis(20));
    };
    project.kill_manager();
    let journal: Value =
        serde_json::from_str(&std::fs::read_to_string(project.dir.path().join("manager/manager.json")).unwrap())
            .unwrap();
    assert_eq!(journal["recoveries"]["resumed"]["deploy_started"], true, "{journal}");

    project.start_manager(2);
    project.wait_answering(epoch, Duration::from_secs(120));
    let log = project.wait_log(2, "recovered in", Duration::from_secs(60));
    assert!(log.contains("resuming the recovery"), "{log}");
    assert!(!log.contains("redeploying"), "the second manager must not deploy again:\n{log}");
    // The runner rewrites run.json once it sees its replicas serve, which can be a moment
    // after the service first answers: until then the file still names the killed runner.
    let deadline = Instant::now() + Duration::from_secs(30);
    while project.serving_runner() != runner && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(project.serving_runner(), runner, "the runner the first manager started serves: one deployment");
    assert_eq!(project.state(), "running");
    let held = project.indices();
    assert!(acknowledged.iter().all(|i| held.contains(i)), "{acknowledged:?} not all in {held:?}");

    // The registry's copy of the manifest is altered: same digest, other content.
    project.kill_manager();
    project.run(&["down", "--name", "resumed"]);
    tamper_manifest(&project);
    let output =
        project.br2k().args(["deploy", "resumed", "--context", "local", "--network", "loopback"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a tampered image was deployed: {stderr}");
    assert!(stderr.contains("does not match") && stderr.contains("refusing"), "{stderr}");
    assert!(!project.state_dir().join("runner.pid").is_file(), "nothing was started");

    // The manager refuses it the same way, and keeps the service Recovering.
    project.start_manager(3);
    project.claim(2, "down after the image changed");
    let log = project.wait_log(3, "recovery attempt 1 failed", Duration::from_secs(60));
    assert!(log.contains("does not match"), "{log}");
    assert_eq!(project.state(), "recovering");
}

/// Rewrites the stored manifest blob of the pushed image in the registry's storage.
fn tamper_manifest(project: &Project) {
    let images: Value =
        serde_json::from_str(&std::fs::read_to_string(project.dir.path().join(".br2k/images.json")).unwrap()).unwrap();
    let digest = images["images"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_owned();
    let data = find_blob(&project.registry.storage(), &digest).expect("the registry stores the manifest");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&data).unwrap()).unwrap();
    manifest["annotations"] = serde_json::json!({ "tampered": "yes" });
    std::fs::write(&data, serde_json::to_vec(&manifest).unwrap()).unwrap();
}

fn find_blob(root: &Path, hex: &str) -> Option<PathBuf> {
    let path = root.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data");
    path.is_file().then_some(path)
}
