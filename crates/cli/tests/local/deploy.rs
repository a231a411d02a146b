//! `br2k deploy`: the Kubernetes manifests `--dry-run` prints, checked against the
//! official schemas (kubernetes-validate), and a local deployment run from an image
//! pulled by digest from a real registry, recorded on a real anvil.

use std::path::{Path, PathBuf};
use std::process::Command;

use br2k_test_utils::{Anvil, OciRegistry};
use serde_json::Value;

use crate::{br2k, http, logserver, ok, one_at_a_time};

/// tools/.venv/bin/kubernetes-validate, which tools/setup.sh installs.
fn kubernetes_validate() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tools/.venv/bin/kubernetes-validate");
    assert!(path.is_file(), "{} is missing: run `bash tools/setup.sh`", path.display());
    path
}

/// A project directory with an image, a registry entry and a context `prod` made by `add`.
fn project(add_context: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "a-token\n").unwrap();
    let in_dir = |args: &[&str]| {
        br2k().current_dir(dir.path()).env("BR2K_HOME", dir.path().join("home")).args(args).output().unwrap()
    };
    ok(in_dir(&["image", "build", "/bin/true", "--name", "br2k/demo", "--tag", "v1"]));
    ok(in_dir(&["image-registry", "add", "harbor", "https://harbor.example.org"]));
    let mut args = vec!["context", "add", "prod", "--server", "https://k8s.example.org:6443", "--token-file", "token"];
    args.extend_from_slice(add_context);
    ok(in_dir(&args));
    dir
}

fn dry_run(dir: &Path, extra_env: &[(&str, &str)], replicas: &str, extra_args: &[&str]) -> String {
    let mut command = br2k();
    command.current_dir(dir).env("BR2K_HOME", dir.join("home"));
    for (key, value) in extra_env {
        command.env(key, value);
    }
    let output = command
        .args(["deploy", "logserver", "--context", "prod", "--image", "br2k/demo:v1", "--dry-run"])
        .args(["--replicas", replicas, "--rpc-url", "http://10.0.0.5:8545"])
        .args(["--registry", "0x5FbDB2315678afecb367f032d93F642f64180aa3"])
        .args(extra_args)
        .output()
        .unwrap();
    ok(output)
}

fn validate(dir: &Path, yaml: &str) {
    let file = dir.join("manifests.yaml");
    std::fs::write(&file, yaml).unwrap();
    let output = Command::new(kubernetes_validate())
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .arg(&file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the manifests do not validate:\n{report}\n{yaml}");
    let objects = yaml.split("\n---\n").count();
    assert_eq!(report.matches(" passed for resource ").count(), objects, "every object was checked:\n{report}");
}

#[test]
fn every_manifest_the_dry_run_prints_validates_against_the_kubernetes_schemas() {
    // Three unlabelled nodes, a storage class, an open registry.
    let dir =
        project(&["--namespace", "team-a", "--node", "w1", "--node", "w2", "--node", "w3", "--storage-class", "fast"]);
    let yaml = dry_run(dir.path(), &[], "3", &[]);
    validate(dir.path(), &yaml);
    assert_eq!(yaml.matches("kind: StatefulSet\n").count(), 3, "one controller per replica");
    assert_eq!(yaml.matches("kind: Pod\n").count(), 0, "no bare Pods: Kubernetes recreates the replicas");
    assert_eq!(yaml.matches("kind: Service\n").count(), 3);
    assert_eq!(yaml.matches("kind: PersistentVolumeClaim\n").count(), 6);
    assert_eq!(yaml.matches("kind: Secret\n").count(), 1, "no pull secret for an open registry");
    assert_eq!(yaml.matches("kind: NetworkPolicy\n").count(), 1, "etcd reachable by the service's own Pods only");
    assert_eq!(yaml.matches("kind: PodDisruptionBudget\n").count(), 1);
    assert_eq!(yaml.matches("kind: ConfigMap\n").count(), 2, "the settings the manager redeploys with, the etcd hint");
    assert_eq!(yaml.matches(" name: etcd-init\n").count(), 3, "every etcd member starts after its init step");
    assert!(yaml.contains("--config-file=/tmp/etcd/etcd.json"), "{yaml}");
    assert!(yaml.contains("minAvailable: 2") && yaml.contains("runAsNonRoot: true"), "{yaml}");
    assert!(yaml.contains("storage: 4Gi") && yaml.contains("--quota-backend-bytes=2147483648"), "{yaml}");
    assert!(yaml.contains("harbor.example.org/br2k/demo@sha256:"), "pinned by digest");

    // Labelled nodes, a public endpoint, and a registry that needs credentials.
    let dir = project(&["--node", "w1:pool=br2k,zone=a", "--endpoint", "https://logserver.example.org"]);
    let credentials = [("BR2K_REGISTRY_USERNAME", "robot"), ("BR2K_REGISTRY_PASSWORD", "pull-password-42")];
    let yaml = dry_run(dir.path(), &credentials, "1", &[]);
    validate(dir.path(), &yaml);
    assert_eq!(yaml.matches("kind: Secret\n").count(), 2, "the operator key and the pull secret");
    assert!(yaml.contains("key: pool") && yaml.contains("https://logserver.example.org"), "{yaml}");
    assert!(!yaml.contains("pull-password-42") && !yaml.contains("robot"), "secret data is never printed");
    assert!(!yaml.contains("BR2K_BACKUP_REPOSITORY"), "no push credential, no backups (never the pull one)");
    // With a push-only credential for the backups: its own Secret, mounted into the app.
    let with_push = [
        credentials[0],
        credentials[1],
        ("BR2K_BACKUP_PUSH_USERNAME", "backup-robot"),
        ("BR2K_BACKUP_PUSH_PASSWORD", "push-password-7"),
    ];
    let yaml = dry_run(
        dir.path(),
        &with_push,
        "1",
        &["--etcd-volume-size", "10Gi", "--etcd-memory", "4Gi", "--priority-class", "br2k-critical"],
    );
    validate(dir.path(), &yaml);
    assert_eq!(yaml.matches("kind: Secret\n").count(), 3, "the operator key, the pull and the push secrets");
    assert!(yaml.contains("name: logserver-backup-push") && yaml.contains("BR2K_BACKUP_REPOSITORY"), "{yaml}");
    assert!(!yaml.contains("push-password-7") && !yaml.contains("backup-robot"), "secret data is never printed");
    assert!(
        yaml.contains("priorityClassName: br2k-critical") && yaml.contains("--quota-backend-bytes=5368709120"),
        "{yaml}"
    );

    // With TLS for etcd: the certificates' Secret (its data never printed), mounted in both
    // containers of every Pod, and https everywhere etcd is reached.
    let yaml = dry_run(dir.path(), &[], "1", &["--etcd-tls"]);
    validate(dir.path(), &yaml);
    assert_eq!(yaml.matches("kind: Secret\n").count(), 2, "the operator key and the certificates");
    assert!(yaml.contains("name: logserver-etcd-tls") && yaml.contains("--client-cert-auth=true"), "{yaml}");
    assert!(!yaml.contains("PRIVATE KEY") && !yaml.contains("http://127.0.0.1:2379"), "{yaml}");

    // More replicas than nodes: refused before anything is printed.
    let mut command = br2k();
    command.current_dir(dir.path()).env("BR2K_HOME", dir.path().join("home"));
    let refused = command
        .args(["deploy", "logserver", "--context", "prod", "--image", "br2k/demo:v1", "--dry-run", "--replicas", "3"])
        .args(["--registry", "0x5FbDB2315678afecb367f032d93F642f64180aa3"])
        .output()
        .unwrap();
    assert!(!refused.status.success() && refused.stdout.is_empty());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("3 replicas need 3 worker nodes"));
}

/// `br2k` in `dir`, on `anvil`, as account 0, with temporary state under `dir/tmp`.
pub(crate) fn br2k_at(dir: &Path, anvil: &Anvil) -> Command {
    let mut command = br2k();
    command
        .current_dir(dir)
        .env("TMPDIR", dir.join("tmp"))
        .env("BR2K_HOME", dir.join("home"))
        .env("ETH_RPC_URL", anvil.endpoint())
        .env("ETH_PRIVATE_KEY", alloy::hex::encode_prefixed(anvil.key(0).to_bytes()))
        // The replicas' admin routes (`br2k backup now`): they take it from the deploy's
        // environment, as the commands that call them do.
        .env("BR2K_ADMIN_TOKEN", "a-test-admin-token");
    command
}

/// Brings the deployed service down when dropped (also when the test fails half-way).
struct Deployed<'a>(&'a Path, &'a Anvil);

impl Drop for Deployed<'_> {
    fn drop(&mut self) {
        let _ = br2k_at(self.0, self.1).args(["down", "--name", "deployed"]).output();
    }
}

/// Brings a service down by name when dropped.
struct Down<'a>(&'a Path, &'a Anvil, &'a str);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = br2k_at(self.0, self.1).args(["down", "--name", self.2]).output();
    }
}

/// The list `GET /log` at `url` answers once it holds `count` entries (within 30 s).
fn eventually_log(url: &str, count: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (status, body) = http(url, "GET", "/log", "");
        let list = (status == 200)
            .then(|| serde_json::from_str::<Value>(&body).ok())
            .flatten()
            .and_then(|v| v["entries"].as_array().cloned())
            .unwrap_or_default();
        if list.len() >= count || std::time::Instant::now() > deadline {
            return list;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The process id of each running app replica.
fn app_pids(dir: &Path) -> Vec<u64> {
    let run = crate::work_root(&dir.join("tmp")).join("up/deployed/run.json");
    let run: Value = serde_json::from_str(&std::fs::read_to_string(run).unwrap()).unwrap();
    run["nodes"].as_array().unwrap().iter().map(|n| n["app_pid"].as_u64().unwrap()).collect()
}

/// The executable each running app replica was started from (`/proc/PID/exe`).
fn app_executables(dir: &Path) -> Vec<PathBuf> {
    app_pids(dir).into_iter().map(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()).collect()
}

/// The key each running app replica was given (its `ETH_PRIVATE_KEY`).
fn app_keys(dir: &Path) -> Vec<String> {
    app_pids(dir)
        .into_iter()
        .map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            let key = environ.split(|b| *b == 0).find_map(|v| v.strip_prefix(b"ETH_PRIVATE_KEY="));
            String::from_utf8(key.expect("a replica publishing locations has a key").to_vec()).unwrap()
        })
        .collect()
}

#[test]
fn deploy_local_runs_the_image_pulled_from_the_registry_and_records_it_on_chain() {
    let _turn = one_at_a_time();
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let registry =
        OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    let run = |args: &[&str]| ok(br2k_at(dir.path(), &anvil).args(args).output().unwrap());
    run(&["service-registry", "deploy"]);
    let built: Value = serde_json::from_str(&run(&[
        "--json",
        "image",
        "build",
        logserver().to_str().unwrap(),
        "--name",
        "br2k/logserver",
        "--tag",
        "v1",
    ]))
    .unwrap();
    let digest = built["digest"].as_str().unwrap().to_owned();
    run(&["image-registry", "add", "lab", &registry.url(), "--plain-http"]);

    let deploy = |extra: &[&str]| {
        let mut command = br2k_at(dir.path(), &anvil);
        command.args(["--json", "deploy", "deployed", "--context", "local", "--network", "loopback"]);
        command.args(["--election-timeout", "500", "--backup-interval", "2"]).args(extra).output().unwrap()
    };
    let first: Value = serde_json::from_str(&ok(deploy(&["--image", "br2k/logserver:v1", "--replicas", "3"]))).unwrap();
    let guard = Deployed(dir.path(), &anvil);
    let unpacked =
        crate::work_root(&dir.path().join("tmp")).join("deploy/deployed/rootfs/usr/local/bin/br2k-logserver");
    assert!(unpacked.starts_with(first["app"].as_str().unwrap()), "{first}");
    assert_eq!(app_executables(dir.path()), vec![unpacked.clone(); 3], "every replica runs the unpacked image");
    let keys = app_keys(dir.path());
    let manager = alloy::hex::encode_prefixed(anvil.key(0).to_bytes());
    assert!(!keys.contains(&manager), "no replica holds the manager's key");
    assert_eq!(keys.iter().collect::<std::collections::HashSet<_>>().len(), 3, "each replica has a key of its own");
    assert_eq!(std::fs::read(&unpacked).unwrap(), std::fs::read(logserver()).unwrap());
    let location = first["location"].as_str().unwrap().to_owned();
    let (status, _) = http(&location, "GET", "/br2k/health", "");
    assert_eq!(status, 200, "the leader at {location} answers");

    // The leader backs up into the registry the image came from; `br2k backup now` asks
    // for one at once and waits until the chain records it.
    let (status, _) = http(&location, "POST", "/log", r#"{"user": 1}"#);
    assert_eq!(status, 200);
    let now: Value = serde_json::from_str(&run(&["--json", "backup", "now", "deployed"])).unwrap();
    assert!(now["index"].as_u64().unwrap() >= 1, "{now}");
    assert!(now["artifact"].as_str().unwrap().starts_with(&format!("{}/br2k/logserver@sha256:", registry.host())));
    let listed: Value = serde_json::from_str(&run(&["--json", "backup", "ls", "deployed"])).unwrap();
    assert_eq!(listed["recorded"]["index"], now["index"], "{listed}");
    assert!(listed["backups"].as_array().unwrap().iter().any(|b| b["recorded"] == true), "{listed}");

    // A copy at a past index, under a new name: its replicas hold exactly entries 1..=N,
    // and the original runs on untouched.
    for user in 2..=6 {
        let (status, _) = http(&location, "POST", "/log", &format!(r#"{{"user": {user}}}"#));
        assert_eq!(status, 200);
    }
    let now: Value = serde_json::from_str(&run(&["--json", "backup", "now", "deployed"])).unwrap();
    let last = now["index"].as_u64().unwrap();
    assert!(last >= 6, "{now}");
    let copy = |extra: &[&str]| {
        let mut command = br2k_at(dir.path(), &anvil);
        command.args(["--json", "backup", "restore", "deployed", "--to-index", "4", "--as", "deployed-copy"]);
        command.args(["--network", "loopback", "--election-timeout", "500"]).args(extra).output().unwrap()
    };
    let copied: Value = serde_json::from_str(&ok(copy(&[]))).unwrap();
    let _copy_guard = Down(dir.path(), &anvil, "deployed-copy");
    let (_, original) = http(&location, "GET", "/log", "");
    let original: Value = serde_json::from_str(&original).unwrap();
    let original = original["entries"].as_array().unwrap().clone();
    assert_eq!(original.len() as u64, last, "the original keeps everything");
    let held = eventually_log(copied["location"].as_str().unwrap(), 4);
    assert_eq!(held, original[..4], "the copy ({copied}) holds entries 1..=4 of the original, and no more");
    let run_file = crate::work_root(&dir.path().join("tmp")).join("up/deployed-copy/run.json");
    let run_file: Value = serde_json::from_str(&std::fs::read_to_string(run_file).unwrap()).unwrap();
    for node in run_file["nodes"].as_array().unwrap() {
        let url = node["app_url"].as_str().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let status = loop {
            let (_, body) = http(url, "GET", "/br2k/status", "");
            let status: Value = serde_json::from_str(&body).unwrap_or_default();
            if status["applied_index"] == 4 || std::time::Instant::now() > deadline {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        // Entries 1..=4 applied, from the copy's backup; its log goes on from 5.
        let held = (&status["applied_index"], &status["first_index"]);
        assert_eq!(held, (&Value::from(4), &Value::from(5)), "{url}: {status}");
    }
    let again = copy(&[]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already a service"), "{again:?}");
    let mut future = br2k_at(dir.path(), &anvil);
    future.args(["backup", "restore", "deployed", "--to-index", "1000", "--as", "deployed-future"]);
    let future = future.output().unwrap();
    let said = String::from_utf8_lossy(&future.stderr);
    assert!(!future.status.success() && said.contains("reaches index 1000: the newest reaches"), "{said}");

    let info: Value = serde_json::from_str(&run(&["--json", "service", "info", "deployed"])).unwrap();
    let recovery = &info["recoveryInfo"];
    assert_eq!(recovery["context"], "local");
    assert_eq!(recovery["replicas"], 3);
    assert_eq!(recovery["containerRegistry"], registry.url());
    assert_eq!(recovery["image"], "br2k/logserver:v1");
    assert_eq!(recovery["imageDigest"], digest.as_str());
    assert_eq!(recovery["deployer"].as_str().unwrap().parse::<alloy::primitives::Address>().unwrap(), anvil.address(0));

    let again = deploy(&["--image", "br2k/logserver:v1"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already runs here"), "{again:?}");

    // Down, and deployed again from what the chain records (no --image): the manager's path.
    drop(guard);
    let second: Value = serde_json::from_str(&ok(deploy(&[]))).unwrap();
    let _guard = Deployed(dir.path(), &anvil);
    assert_eq!(second["image"], format!("{}/br2k/logserver@{digest}", registry.host()));
    assert_eq!(second["replicas"], 3);
    assert_eq!(app_executables(dir.path()).len(), 3);
}
