//! Idempotency keys, and each request type's effect.

use std::sync::atomic::Ordering;
use std::time::Duration;

use br2k_replication::{
    EntryState, IdempotencyRecord, LogEntry, ProcessState, RequestKind, Role, SnapshotPolicy, Status, StoredReply,
    TableStatus,
};

use crate::harness::{Cluster, SERVICE, entries, eventually};

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_key_gets_the_stored_answer_and_never_executes_twice() {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let first = c.post(l, "/append", "a1", Some("key-1")).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("br2k-replayed").is_none());
    let first_body = first.text().await.unwrap();
    // Keys are settled against the leader's idempotency table: no etcd read.
    assert_eq!(key_lookups(&c, l).await, 0);
    let again = c.post(l, "/append", "a1", Some("key-1")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["br2k-replayed"], "true");
    assert_eq!(again.headers()["br2k-index"], "1");
    assert_eq!(again.text().await.unwrap(), first_body);
    assert_eq!(c.counter("ls").await, 1, "the retry was not logged");
    assert_eq!(key_lookups(&c, l).await, 0, "answered from the table, not from etcd");
    assert_eq!(c.count_keys("idem/").await, 0, "etcd holds no record per key");

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

/// A retry of `answered[n]` (sent by [`crate::harness::Load::append_many`] with tag `t`)
/// at replica `i`: its stored answer at its index, not a second execution.
async fn replayed(c: &Cluster, i: usize, answered: &[(u64, String)], n: usize) {
    let (index, text) = &answered[n];
    let key = format!("key-t-{}", text.trim_start_matches('t'));
    let retry = c.post(i, "/append", text, Some(&key)).await;
    assert_eq!(retry.status(), 200, "{key} at replica {i}");
    assert_eq!(retry.headers()["br2k-replayed"], "true", "{key} at replica {i}");
    assert_eq!(retry.headers()["br2k-index"].to_str().unwrap(), index.to_string(), "{key} at replica {i}");
}

/// Replica `i`'s idempotency table as its `/br2k/status` shows it, without its eviction
/// count (a replica's own since it started).
async fn table(c: &Cluster, i: usize) -> TableStatus {
    let status: Status =
        c.http.get(format!("{}/br2k/status", c.replicas[i].url)).send().await.unwrap().json().await.unwrap();
    TableStatus { evicted: 0, ..status.idempotency }
}

/// Waits until every replica's table has applied the whole log (LS) and all three are
/// the same; returns it.
async fn agreed_tables(c: &Cluster) -> TableStatus {
    let ls = c.counter("ls").await;
    eventually("every replica's table reaches LS and the three agree", async || {
        let tables = [table(c, 0).await, table(c, 1).await, table(c, 2).await];
        tables.iter().all(|t| t.applied == ls && *t == tables[0])
    })
    .await;
    table(c, 0).await
}

/// Retries are answered from the replicated idempotency table, not from etcd: after the
/// request's entry was compacted away, by a new leader, by a replica whose disk was wiped
/// (it caught up from a peer's snapshot, which carries the table), and by a replica
/// restarted from its own snapshot and the log.
#[tokio::test(flavor = "multi_thread")]
async fn retries_are_answered_from_the_table_after_compaction_a_leader_change_and_a_wiped_replicas_catch_up() {
    let mut c = Cluster::start_snapshotting(SnapshotPolicy { interval: 10, trailing: 5 }).await;
    let answered = c.load().append_many("t", 40, 4).await;
    let l = c.leader(None).await;
    eventually("the log is compacted past the first requests", async || {
        c.replicas[l].status().first_index > answered[0].0 + 1
    })
    .await;
    assert!(c.rs(answered[0].0).await.is_none(), "the first request's entry is gone from etcd");
    assert_eq!(c.count_keys("idem/").await, 0, "etcd holds no record per key");
    replayed(&c, l, &answered, 0).await;
    replayed(&c, l, &answered, 39).await;

    let l2 = (l + 1) % 3;
    c.hand_leadership(l, l2).await;
    replayed(&c, l2, &answered, 1).await;

    let w = (l2 + 1) % 3;
    c.wipe_replica(w);
    c.restart_replica(w).await;
    eventually("the wiped replica catches up from a peer's snapshot", async || {
        let status = c.replicas[w].status();
        status.state_version > 0 && status.lpi >= status.ssi
    })
    .await;
    c.hand_leadership(l2, w).await;
    for n in [0, 20, 39] {
        replayed(&c, w, &answered, n).await;
    }
    // Restarted, it rebuilds its table from its own snapshot and the log, and leads again
    // (its etcd member still does).
    c.restart_replica(w).await;
    eventually("the restarted replica leads again", async || c.replicas[w].status().role == Role::Leader).await;
    replayed(&c, w, &answered, 2).await;
    assert_eq!(c.counter("ls").await, 40, "no retry was logged");
    c.converged(&answered).await;
    assert_eq!(agreed_tables(&c).await.records, 40);
}

/// Keys expire by their age, measured on the times the leader wrote into the log, and
/// by the byte cap of the replica that leads; every replica drops the same keys at the
/// same index, whatever its own settings.
#[tokio::test(flavor = "multi_thread")]
async fn keys_expire_by_age_and_by_the_leaders_byte_cap_alike_on_every_replica() {
    let mut c = Cluster::new(false).await;
    c.idempotency = (Duration::from_secs(2), 256 << 20);
    let mut c = c.with_replicas(SnapshotPolicy::disabled()).await;
    let old = c.load().append_many("old", 10, 2).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let new = c.load().append_many("new", 10, 2).await;
    let tables = agreed_tables(&c).await;
    assert_eq!((tables.records, tables.keep_from), (10, new[0].0), "the old keys expired: {tables:?}");
    let l = c.leader(None).await;
    let kept = c.post(l, "/append", "new0", Some("key-new-0")).await;
    assert_eq!(kept.headers()["br2k-replayed"], "true");
    // Past the window a retry is a new request: executed again, at a new index.
    let expired = c.post(l, "/append", "old0", Some("key-old-0")).await;
    assert_eq!(expired.status(), 200);
    assert!(expired.headers().get("br2k-replayed").is_none());
    let index: u64 = expired.headers()["br2k-index"].to_str().unwrap().parse().unwrap();
    assert!(index > new.last().unwrap().0 && old[0].0 < new[0].0);

    // The leader comes back with a 2,000-byte cap; the followers keep theirs (256 MiB).
    c.idempotency = (Duration::from_secs(3600), 2_000);
    c.restart_replica(l).await;
    eventually("the restarted replica leads again", async || c.replicas[l].status().role == Role::Leader).await;
    c.load().append_many("cap", 30, 3).await;
    let tables = agreed_tables(&c).await;
    // A record of this test counts about 350 bytes: the cap holds to within the group
    // logged after the last stamp.
    assert!(tables.bytes <= 2_000 + 3 * 400, "{tables:?}");
    assert!((3..=10).contains(&tables.records), "the oldest keys went first: {tables:?}");
    let latest = c.post(l, "/append", "cap29", Some("key-cap-29")).await;
    assert_eq!(latest.headers()["br2k-replayed"], "true", "the newest keys stay");
}

/// The fingerprint the runtime gives a request (method, path, query, body), in hex, as
/// the older `idem/` records held it.
fn fingerprint_hex(method: &str, path: &str, body: &[u8]) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for part in [method.as_bytes(), path.as_bytes(), b""] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(body);
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A service from before the idempotency table: etcd holds an `idem/` record per keyed
/// request. The first leader moves them into the table through the log (import entries,
/// each written with the deletion of its records), and every replica answers their
/// retries, also for keys the log itself does not show.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgraded_service_moves_its_idempotency_records_from_etcd_into_the_table() {
    let c = Cluster::new(false).await;
    let mut etcd = c.etcd_client(0).await;
    let prefix = format!("/br2k/{SERVICE}");
    let lease = etcd.lease_grant(3600, None).await.unwrap().id();
    let put = |kind| etcd_client::PutOptions::new().with_lease(kind);
    for index in 1..=150u64 {
        let body = format!("tx{index}").into_bytes();
        let key = format!("key-u-{index}");
        // Entries 101 to 150 were logged without their key in the log: only the record has it.
        let entry = LogEntry {
            method: "POST".into(),
            path: "/ext".into(),
            query: None,
            headers: Vec::new(),
            body: body.clone(),
            idempotency_key: (index <= 100).then(|| key.clone()),
            stamp: None,
        };
        let response = StoredReply {
            status: 201,
            content_type: Some("application/json".into()),
            body: format!("{{\"recorded\":{index}}}").into_bytes(),
        };
        let state = EntryState {
            kind: RequestKind::ExternalTxn,
            state: ProcessState::Success,
            epoch: 1,
            response: Some(response.clone()),
        };
        let record =
            IdempotencyRecord { index, fingerprint: fingerprint_hex("POST", "/ext", &body), response: Some(response) };
        etcd.put(format!("{prefix}/log/{index:020}"), serde_json::to_vec(&entry).unwrap(), None).await.unwrap();
        etcd.put(format!("{prefix}/rs/{index:020}"), serde_json::to_vec(&state).unwrap(), None).await.unwrap();
        etcd.put(format!("{prefix}/idem/{key}"), serde_json::to_vec(&record).unwrap(), Some(put(lease))).await.unwrap();
    }
    for counter in ["ls", "ssi"] {
        etcd.put(format!("{prefix}/{counter}"), "150", None).await.unwrap();
    }
    let c = c.with_replicas(SnapshotPolicy::disabled()).await;
    let l = c.leader(None).await;
    eventually("the records leave etcd", async || c.count_keys("idem/").await == 0).await;
    assert_eq!(c.counter("ls").await, 152, "two import entries (100 records each at most)");
    for index in [1u64, 100, 101, 150] {
        let retry = c
            .http
            .post(format!("{}/ext", c.replicas[l].url))
            .header("Idempotency-Key", format!("key-u-{index}"))
            .body(format!("tx{index}"))
            .send()
            .await
            .unwrap();
        assert_eq!(retry.status(), 201, "key-u-{index}");
        assert_eq!(retry.headers()["br2k-replayed"], "true", "key-u-{index}");
        assert_eq!(retry.text().await.unwrap(), format!("{{\"recorded\":{index}}}"));
    }
    assert_eq!(c.counter("ls").await, 152, "no retry was logged");
    assert_eq!(agreed_tables(&c).await.records, 150, "every replica holds every imported key");
}
