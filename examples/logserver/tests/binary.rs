//! The `br2k-logserver` binary: three processes on a real etcd cluster.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use br2k_test_utils::{EtcdCluster, KillOnDrop};

#[tokio::test(flavor = "multi_thread")]
async fn three_logserver_processes_serve_every_route_type() {
    let etcd = EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    // Clients must show this token: a 0600 file, as an operator would keep it.
    let token_file = dir.path().join("client-token");
    std::fs::write(&token_file, "tok-3n\n").unwrap();
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let ports: Vec<u16> =
        (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
    let children = (0..3)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_br2k-logserver"))
                .args(["--replica", &format!("n{i}"), "--etcd", &etcd.endpoint(i)])
                .args(["--listen", &format!("127.0.0.1:{}", ports[i]), "--check-interval-ms", "50"])
                .arg("--data-dir")
                .arg(dir.path().join(format!("n{i}")))
                .arg("--outbox")
                .arg(dir.path().join("outbox"))
                .arg("--client-token-file")
                .arg(&token_file)
                .env_remove("BR2K_REGISTRY")
                .env_remove("BR2K_CLIENT_TOKEN")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map(KillOnDrop)
                .unwrap()
        })
        .collect();
    let _replicas: Vec<KillOnDrop> = children;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let url = |i: usize, path: &str| format!("http://127.0.0.1:{}{path}", ports[i]);

    let started = Instant::now();
    let leader = loop {
        let mut found = None;
        for i in 0..3 {
            if let Ok(r) = http.get(url(i, "/br2k/status")).send().await
                && r.json::<serde_json::Value>().await.unwrap()["role"] == "leader"
            {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

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
