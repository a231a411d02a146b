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
    // A new key costs no lookup: the replicate write itself requires it to have no record.
    assert_eq!(key_lookups(&c, l).await, 0);
    let again = c.post(l, "/append", "a1", Some("key-1")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["br2k-replayed"], "true");
    assert_eq!(again.headers()["br2k-index"], "1");
    assert_eq!(again.text().await.unwrap(), first_body);
    assert_eq!(c.counter("ls").await, 1, "the retry was not logged");
    assert_eq!(key_lookups(&c, l).await, 1, "the retry's record failed the write's condition: looked up");

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

    // New keys sent together with a retry of an answered one (mostly in one group): the
    // retry gets its stored answer, each new one is logged once.
    let bodies: Vec<(String, String)> = (0..8).map(|k| (format!("n{k}"), format!("new-{k}"))).collect();
    let mut sends: Vec<_> = bodies.iter().map(|(body, key)| c.post(l, "/append", body, Some(key))).collect();
    sends.push(c.post(l, "/append", "a1", Some("key-1")));
    let answers = futures::future::join_all(sends).await;
    let (retry, new) = answers.split_last().unwrap();
    assert_eq!((retry.status().as_u16(), retry.headers()["br2k-index"].to_str().unwrap()), (200, "1"));
    let mut indexes: Vec<u64> = new
        .iter()
        .map(|a| {
            assert_eq!(a.status(), 200);
            a.headers()["br2k-index"].to_str().unwrap().parse().unwrap()
        })
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (3..=10).collect::<Vec<_>>(), "each new key logged once, the retry not at all");
    let mut expected = entries(&[(1, "a1"), (2, "a2")]);
    // Their order in the log is the order they arrived in; read it back.
    let listed: Vec<(u64, String)> =
        c.http.get(format!("{}/list", c.replicas[l].url)).send().await.unwrap().json().await.unwrap();
    expected.extend(listed.iter().filter(|(i, _)| *i > 2).cloned());
    assert_eq!(listed.len(), 10);
    c.converged(&expected).await;

    // A Normal request retried executes once; an External_TXN is logged, not executed.
    for _ in 0..3 {
        assert_eq!(c.post(l, "/once", "", Some("key-3")).await.status(), 200);
    }
    assert_eq!(c.outside.executions.load(Ordering::SeqCst), 1);
    assert_eq!(c.post(l, "/ext", "0xabc", None).await.status(), 201);
    let ext = c.rs(12).await.unwrap();
    assert_eq!((ext.kind, ext.state), (RequestKind::ExternalTxn, ProcessState::Success));
    let failed = c.post(l, "/append", "fail", None).await;
    assert_eq!(failed.status(), 400);
    assert_eq!(c.rs(13).await.unwrap().state, ProcessState::Fail);
    // Followers replay exactly the Success Replication entries.
    c.converged(&expected).await;

    // Reads: the leader answers; a follower sends the client on.
    let list = c.http.get(format!("{}/list", c.replicas[l].url)).send().await.unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(list.json::<Vec<(u64, String)>>().await.unwrap(), expected);
    let f = (l + 1) % 3;
    let list = c.http.get(format!("{}/list", c.replicas[f].url)).send().await.unwrap();
    assert_eq!(list.status(), 503);
    assert_eq!(list.headers()["br2k-leader"], c.replicas[l].url.as_str());

    // A graceful shutdown steps the leader down before it stops.
    c.replicas[l].shutdown().await;
    assert_eq!(c.replicas[l].status().role, br2k_replication::Role::Follower);
}

/// How many idempotency keys leader `l` has looked up in etcd.
async fn key_lookups(c: &Cluster, l: usize) -> u64 {
    c.pipeline(l).await.get("leader: idempotency key lookups").map_or(0, |t| t.calls)
}
