//! Bad input of every kind: clear errors, nothing stored half-way.

use br2k_replication::{Config, Replicated, Reply};

use crate::harness::{Cluster, SERVICE, entries, eventually};

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_before_anything_is_stored() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let url = &c.replicas[l].url;

    let big = c.post(l, "/append", &"x".repeat(2000), None).await;
    assert_eq!(big.status(), 413);
    assert!(big.text().await.unwrap().contains("over 1024 bytes"));
    let unknown = c.post(l, "/nope", "", None).await;
    assert_eq!(unknown.status(), 404);
    assert!(unknown.text().await.unwrap().contains("no route POST /nope"));
    let wrong = c.http.get(format!("{url}/append")).send().await.unwrap();
    assert_eq!(wrong.status(), 405);
    assert_eq!(wrong.headers()["allow"], "POST");
    let bad_key = c.post(l, "/append", "a", Some(&"k".repeat(300))).await;
    assert_eq!(bad_key.status(), 400);
    assert!(bad_key.text().await.unwrap().contains("Idempotency-Key"));
    let raw = c.http.post(format!("{url}/append")).header("Content-Length", "10").body("abc").send().await;
    if let Ok(raw) = raw {
        assert!(raw.status().is_client_error(), "a body shorter than its length is refused: {}", raw.status());
    }
    assert_eq!(c.counter("ls").await, 0, "nothing was logged");

    assert_eq!(c.post(l, "/append", "a1", None).await.status(), 200);
    c.converged(&entries(&[(1, "a1")])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_etcd_values_and_an_unreachable_member_make_a_replica_unhealthy_until_fixed() {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    assert_eq!(c.post(l, "/append", "a1", None).await.status(), 200);
    c.converged(&entries(&[(1, "a1")])).await;
    let health = |i: usize| {
        let (http, url) = (c.http.clone(), format!("{}/br2k/health", c.replicas[i].url));
        async move {
            let response = http.get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(health(f).await.0, 200);

    // Garbage in SSI: followers stop and say which key is wrong; nothing is overwritten.
    let mut etcd = c.etcd_client(l).await;
    let ssi_key = format!("/br2k/{SERVICE}/ssi");
    etcd.put(ssi_key.clone(), "not-a-number", None).await.unwrap();
    eventually("the follower reports the bad key", async || {
        let (status, body) = health(f).await;
        status == 503 && body.contains(&ssi_key) && body.contains("expected a decimal index")
    })
    .await;
    let stored = etcd.get(ssi_key.clone(), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"not-a-number");
    etcd.put(ssi_key, "1", None).await.unwrap();
    eventually("the follower is healthy again", async || health(f).await.0 == 200).await;

    // The follower's own etcd member dies: it says so, and recovers with it.
    c.etcd.kill(f).unwrap();
    eventually("an unreachable member is reported", async || {
        let (status, body) = health(f).await;
        status == 503 && body.contains("local etcd member not answering")
    })
    .await;
    c.etcd.restart(f).unwrap();
    eventually("healthy once the member is back", async || health(f).await.0 == 200).await;
    let status: serde_json::Value =
        c.http.get(format!("{}/br2k/status", c.replicas[f].url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["role"], "follower");
    assert_eq!(status["lpi"], 1);
}

#[test]
fn bad_declarations_are_refused_with_every_problem_named() {
    struct Nothing;
    impl br2k_replication::AppState for Nothing {
        fn applied_index(&self) -> u64 {
            0
        }
        fn snapshot(&self) -> std::io::Result<Box<dyn br2k_replication::SnapshotBuilder>> {
            Err(std::io::Error::other("nothing to snapshot"))
        }
        async fn restore(&self, _: &std::path::Path) -> std::io::Result<()> {
            Ok(())
        }
    }
    async fn handler(_: std::sync::Arc<Nothing>, _: br2k_replication::Request) -> br2k_replication::Outcome {
        Ok(Reply::json(200, &()))
    }
    let mut config = Config::new("bad name", "r/1", "localhost:2379", ([127, 0, 0, 1], 0).into(), "ftp://x", "/tmp/x");
    config.snapshots = br2k_replication::SnapshotPolicy { interval: 50, trailing: 50 };
    config.kept_headers = vec!["x-trace".into(), "Authorization".into()];
    config.limits.max_body = 2 * 1024 * 1024;
    config.limits.max_head = 100;
    config.limits.handler_timeout = std::time::Duration::ZERO;
    let error = Replicated::builder(config)
        .replicate("POST", "/a", handler)
        .replicate("POST", "/a", handler)
        .read("GET", "/br2k/status", handler)
        .read("GET", "/metrics", handler)
        .rollback("POST", "/missing", |_: std::sync::Arc<Nothing>, _| async { Ok(()) })
        .reconcile("POST", "/a", |_: std::sync::Arc<Nothing>, _| async { None })
        .admit("GET", "/missing", |_| Ok(()))
        .build(Nothing)
        .err()
        .expect("refused");
    let text = error.to_string();
    for expected in [
        "service \"bad name\"",
        "replica \"r/1\"",
        "declared twice",
        "route path \"/br2k/status\" must start with '/', have no query and not be /metrics or under /br2k/",
        "route path \"/metrics\" must start with",
        "rollback for POST /missing: declare the route first",
        "only Normal routes can be in doubt",
        "public URL \"ftp://x\"",
        "etcd endpoint \"localhost:2379\"",
        "trailing entries (50) must be smaller than the snapshot interval (50)",
        "header \"Authorization\" carries credentials and cannot be kept",
        "max body 2097152 must be between 1 and 524288 bytes",
        "max head 100 must be between 1024 and 65536 bytes",
        "the handler timeout 0ns must be at least 100 ms",
        "admission for GET /missing: declare the route first",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from: {text}");
    }
}
