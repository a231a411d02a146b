//! Idempotency keys, and each request type's effect.

use std::sync::atomic::Ordering;

use br2k_replication::{ProcessState, RequestKind};

use crate::harness::{Cluster, entries};

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_key_gets_the_stored_answer_and_never_executes_twice() {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let first = c.post(l, "/append", "a1", Some("key-1")).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("br2k-replayed").is_none());
    let first_body = first.text().await.unwrap();
    let again = c.post(l, "/append", "a1", Some("key-1")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["br2k-replayed"], "true");
    assert_eq!(again.headers()["br2k-index"], "1");
    assert_eq!(again.text().await.unwrap(), first_body);
    assert_eq!(c.counter("ls").await, 1, "the retry was not logged");

    let reused = c.post(l, "/append", "different", Some("key-1")).await;
    assert_eq!(reused.status(), 422);
    assert!(reused.text().await.unwrap().contains("already used for a different request"));

    // Concurrent duplicates: one entry, one answer for all.
    let sends = (0..5).map(|_| c.post(l, "/append", "a2", Some("key-2")));
    let answers = futures::future::join_all(sends).await;
    for answer in &answers {
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["br2k-index"], "2");
    }
    assert_eq!(c.counter("ls").await, 2);
    c.converged(&entries(&[(1, "a1"), (2, "a2")])).await;

    // A Normal request retried executes once; an External_TXN is logged, not executed.
    for _ in 0..3 {
        assert_eq!(c.post(l, "/once", "", Some("key-3")).await.status(), 200);
    }
    assert_eq!(c.outside.executions.load(Ordering::SeqCst), 1);
    assert_eq!(c.post(l, "/ext", "0xabc", None).await.status(), 201);
    let ext = c.rs(4).await.unwrap();
    assert_eq!((ext.kind, ext.state), (RequestKind::ExternalTxn, ProcessState::Success));
    let failed = c.post(l, "/append", "fail", None).await;
    assert_eq!(failed.status(), 400);
    assert_eq!(c.rs(5).await.unwrap().state, ProcessState::Fail);
    // Followers replay exactly the Success Replication entries.
    c.converged(&entries(&[(1, "a1"), (2, "a2")])).await;

    // Reads: the leader answers; a follower sends the client on.
    let list = c.http.get(format!("{}/list", c.replicas[l].url)).send().await.unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(list.json::<Vec<(u64, String)>>().await.unwrap(), entries(&[(1, "a1"), (2, "a2")]));
    let f = (l + 1) % 3;
    let list = c.http.get(format!("{}/list", c.replicas[f].url)).send().await.unwrap();
    assert_eq!(list.status(), 503);
    assert_eq!(list.headers()["br2k-leader"], c.replicas[l].url.as_str());

    // A graceful shutdown steps the leader down before it stops.
    c.replicas[l].shutdown().await;
    assert_eq!(c.replicas[l].status().role, br2k_replication::Role::Follower);
}
