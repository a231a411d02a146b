//! The `br2k-logserver` binary: three processes on a real etcd cluster.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use br2k_test_utils::{EtcdCluster, KillOnDrop};

/// Three log server processes on `etcd`, replica `n{i}` keeping its data in `data_dirs[i]`
/// and answering clients that show `token_file`'s token.
fn spawn_three(
    etcd: &EtcdCluster,
    data_dirs: &[std::path::PathBuf],
    outbox: &std::path::Path,
    token_file: &std::path::Path,
) -> (Vec<KillOnDrop>, Vec<u16>) {
    let ports: Vec<u16> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let children = (0..3)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_br2k-logserver"))
                .args(["--replica", &format!("n{i}"), "--etcd", &etcd.endpoint(i)])
                .args(["--listen", &format!("127.0.0.1:{}", ports[i]), "--check-interval-ms", "50"])
                .arg("--data-dir")
                .arg(&data_dirs[i])
                .arg("--outbox")
                .arg(outbox)
                .arg("--client-token-file")
                .arg(token_file)
                .env_remove("BR2K_REGISTRY")
                .env_remove("BR2K_CLIENT_TOKEN")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(KillOnDrop)
                .unwrap()
        })
        .collect();
    (children, ports)
}

/// A client token in a 0600 file, as an operator would keep it.
fn token_file(dir: &std::path::Path, token: &str) -> std::path::PathBuf {
    let path = dir.join("client-token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// Waits (up to 20 s) until one of the replicas on `ports` says it leads.
async fn leader_of(http: &reqwest::Client, ports: &[u16]) -> usize {
    let started = Instant::now();
    loop {
        for (i, port) in ports.iter().enumerate() {
            if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/br2k/status")).send().await
                && r.json::<serde_json::Value>().await.unwrap()["role"] == "leader"
            {
                return i;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_logserver_processes_serve_every_route_type() {
    let etcd = EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    // Clients must show this token.
    let token_file = token_file(dir.path(), "tok-3n");
    let data_dirs: Vec<_> = (0..3).map(|i| dir.path().join(format!("n{i}"))).collect();
    let (_replicas, ports) = spawn_three(&etcd, &data_dirs, &dir.path().join("outbox"), &token_file);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let url = |i: usize, path: &str| format!("http://127.0.0.1:{}{path}", ports[i]);
    let leader = leader_of(&http, &ports).await;

    let anonymous = http.post(url(leader, "/log")).body(r#"{"user": 7}"#).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "no token, nothing logged");
    let post = |path: &str, body: &str| http.post(url(leader, path)).bearer_auth("tok-3n").body(body.to_owned()).send();
    let appended: serde_json::Value = post("/log", r#"{"user": 7}"#).await.unwrap().json().await.unwrap();
    assert_eq!(appended, serde_json::json!({ "index": 1, "position": 0 }));
    let appended: serde_json::Value = post("/log", r#"{"user": 8}"#).await.unwrap().json().await.unwrap();
    assert_eq!(appended, serde_json::json!({ "index": 2, "position": 1 }));
    let bad = post("/log", r#"{"usr": 8}"#).await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("unknown field `usr`"));
    let sent = post("/notify", r#"{"user": 7, "message": "hi"}"#).await.unwrap();
    assert_eq!(sent.status(), 200);
    // The malformed append was refused before it was logged: the notification is entry 3.
    assert_eq!(sent.headers()["br2k-index"], "3");
    assert!(dir.path().join("outbox").join(format!("{:020}.json", 3)).is_file());
    let tx = format!(r#"{{"user": 7, "tx_hash": "0x{}"}}"#, "ab".repeat(32));
    assert_eq!(post("/tx", &tx).await.unwrap().status(), 201);
    assert_eq!(post("/tx", r#"{"user": 7, "tx_hash": "0x12"}"#).await.unwrap().status(), 400);

    let list: serde_json::Value =
        http.get(url(leader, "/log")).bearer_auth("tok-3n").send().await.unwrap().json().await.unwrap();
    assert_eq!(list, serde_json::json!({ "entries": [{ "index": 1, "user": 7 }, { "index": 2, "user": 8 }] }));
    // Followers hold the same log on disk, and send readers to the leader.
    let follower = (leader + 1) % 3;
    let path = dir.path().join(format!("n{follower}")).join("log.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&path).unwrap_or_default() != "{\"index\":1,\"user\":7}\n{\"index\":2,\"user\":8}\n" {
        assert!(started.elapsed() < Duration::from_secs(10), "the follower's log did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redirected = http.get(url(follower, "/log")).send().await.unwrap();
    assert_eq!(redirected.status(), 503);
    assert_eq!(redirected.headers()["br2k-leader"], url(leader, "").as_str());
}

#[test]
fn a_registry_without_an_operator_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_br2k-logserver"))
        .args(["--replica", "n0", "--registry", "0x5FbDB2315678afecb367f032d93F642f64180aa3", "--data-dir"])
        .arg(dir.path())
        .env_remove("ETH_PRIVATE_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--registry needs the replica's operator key: set ETH_PRIVATE_KEY"), "{stderr}");
}

#[test]
fn trailing_entries_not_below_the_snapshot_interval_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_br2k-logserver"))
        .args(["--replica", "n0", "--snapshot-interval", "100", "--trailing-entries", "100", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("trailing entries (100) must be smaller than the snapshot interval (100)"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_whose_disk_fills_stops_at_the_entry_and_converges_once_it_has_room() {
    let etcd = EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    let token_file = token_file(dir.path(), "tok-disk");
    let data_dirs: Vec<_> = (0..3).map(|i| dir.path().join(format!("n{i}"))).collect();
    // Every replica's data on a small disk of its own; the one that fills is picked once
    // the leader is known.
    let disks: Vec<_> = data_dirs
        .iter()
        .map(|d| {
            br2k_deploy::local::LimitedDisk::mount(d, 1 << 20)
                .expect("a small tmpfs mounts (the tests run as root, as CI does)")
        })
        .collect();
    let (_replicas, ports) = spawn_three(&etcd, &data_dirs, &dir.path().join("outbox"), &token_file);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let url = |i: usize, path: &str| format!("http://127.0.0.1:{}{path}", ports[i]);
    let leader = leader_of(&http, &ports).await;
    let follower = (leader + 1) % 3;
    let append =
        |n: u64| http.post(url(leader, "/log")).bearer_auth("tok-disk").body(format!(r#"{{"user": {n}}}"#)).send();
    assert_eq!(append(0).await.unwrap().status(), 200);
    let started = Instant::now();
    while br2k_logserver::read_log(&data_dirs[follower]).unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "the follower did not apply the first entry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    disks[follower].fill().unwrap();
    // Enough to overflow what is left of the log file's last page.
    for n in 1..=300 {
        let response = append(n).await.unwrap();
        assert_eq!(response.status(), 200, "the leader answers whatever a follower's disk does");
    }
    let status = |i: usize| {
        let http = http.clone();
        let url = url(i, "/br2k/status");
        async move { http.get(url).send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let started = Instant::now();
    let stopped = loop {
        let s = status(follower).await;
        if !s["fault"].is_null() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the follower never said its disk is full: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let fault = &stopped["fault"];
    let at = fault["index"].as_u64().unwrap();
    assert!(fault["reason"].as_str().unwrap().contains("disk full"), "{fault}");
    let on_disk: Vec<u64> = br2k_logserver::read_log(&data_dirs[follower]).unwrap().iter().map(|e| e.index).collect();
    assert!(at > 1, "the first entry was applied before the disk filled");
    assert_eq!(on_disk, (1..at).collect::<Vec<_>>(), "it stopped at the first entry it could not write, none skipped");
    let health = http.get(url(follower, "/br2k/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert!(health.text().await.unwrap().contains(&format!("n{follower}: disk full")));
    let text = std::fs::read_to_string(data_dirs[follower].join("log.jsonl")).unwrap();
    assert!(text.ends_with('\n'), "a torn line was left");
    let lpi = |key: String| {
        let endpoint = etcd.endpoint(leader);
        async move {
            let mut client = etcd_client::Client::connect([endpoint], None).await.unwrap();
            let found = client.get(key, None).await.unwrap();
            found.kvs().first().map_or(0, |kv| kv.value_str().unwrap().parse::<u64>().unwrap())
        }
    };
    let recorded = lpi(format!("/br2k/logserver/lpi/n{follower}")).await;
    assert!(recorded < at, "LPI {recorded} in etcd passed the entry {at} the follower could not apply");

    // Room again: it resumes from that entry and ends identical to the leader.
    disks[follower].free().unwrap();
    let started = Instant::now();
    loop {
        let (mine, theirs) = (
            br2k_logserver::read_log(&data_dirs[follower]).unwrap(),
            br2k_logserver::read_log(&data_dirs[leader]).unwrap(),
        );
        if mine == theirs && mine.len() == 301 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{} of 301 entries", mine.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    while http.get(url(follower, "/br2k/health")).send().await.unwrap().status() != 200 {
        assert!(started.elapsed() < Duration::from_secs(20), "the follower stayed unhealthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// On Kubernetes the image's binary is also the etcd member's init container: with
/// `BR2K_ETCD_INIT` set it writes etcd's configuration file and exits, without its
/// replica flags. Here the first deploy of one replica (no peers, the hint says `new`),
/// then a second run that finds the member's data and keeps it.
#[test]
fn the_binary_runs_the_etcd_init_step_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (config, hint, data) = (dir.path().join("scratch/etcd.json"), dir.path().join("hint"), dir.path().join("etcd"));
    std::fs::write(&hint, "new").unwrap();
    let flags = format!(
        "--name=ls-1\n--data-dir={}\n--initial-advertise-peer-urls=http://127.0.0.1:2380\n\
         --initial-cluster=ls-1=http://127.0.0.1:2380\n--quota-backend-bytes=1073741824\n--pre-vote=true",
        data.display()
    );
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_br2k-logserver"))
            .env("BR2K_ETCD_INIT", &config)
            .env("BR2K_ETCD_INIT_FLAGS", &flags)
            .env("BR2K_ETCD_INIT_PEERS", "")
            .env("BR2K_ETCD_INIT_BOOTSTRAP_FILE", &hint)
            .env_remove("BR2K_REPLICA")
            .env_remove("BR2K_DATA_DIR")
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert_eq!(written["initial-cluster-state"], "new");
    assert_eq!(written["quota-backend-bytes"], 1_073_741_824u64);
    assert_eq!(written["pre-vote"], true);
    std::fs::create_dir_all(data.join("member/wal")).unwrap();
    std::fs::write(data.join("member/wal/0000000000000000-0000000000000000.wal"), b"").unwrap();
    std::fs::write(&hint, "existing").unwrap();
    let second = run();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    assert_eq!(written["initial-cluster-state"], "existing", "a member with data keeps it");
}
