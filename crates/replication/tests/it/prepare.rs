//! Prepare Service on etcd data left by a dead leader.

use std::sync::atomic::Ordering;

use br2k_replication::{EntryState, LogEntry, ProcessState, RequestKind};

use crate::harness::{Cluster, SERVICE, entries, eventually};

fn log(path: &str, body: &str) -> Vec<u8> {
    let entry = LogEntry {
        method: "POST".into(),
        path: path.into(),
        query: None,
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
        idempotency_key: None,
        stamp: None,
    };
    serde_json::to_vec(&entry).unwrap()
}

fn rs(kind: RequestKind, state: ProcessState) -> Vec<u8> {
    serde_json::to_vec(&EntryState { kind, state, epoch: 1, response: None }).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn prepare_service_ignores_null_reexecutes_in_process_and_settles_in_doubt() {
    let mut c = Cluster::new(false).await;
    let mut etcd = c.etcd_client(0).await;
    let prefix = format!("/br2k/{SERVICE}");
    let left = [
        ("/append", "a1", RequestKind::Replication, ProcessState::Success),
        ("/append", "a2", RequestKind::Replication, ProcessState::InProcess),
        ("/append", "a3", RequestKind::Replication, ProcessState::Null),
        ("/once", "", RequestKind::Normal, ProcessState::InProcess), // was sent
        ("/once", "", RequestKind::Normal, ProcessState::InProcess), // never sent
        ("/append", "fail", RequestKind::Replication, ProcessState::Fail),
        ("/ext", "", RequestKind::ExternalTxn, ProcessState::Null),
    ];
    for (i, (path, body, kind, state)) in left.iter().enumerate() {
        let index = i + 1;
        etcd.put(format!("{prefix}/log/{index:020}"), log(path, body), None).await.unwrap();
        etcd.put(format!("{prefix}/rs/{index:020}"), rs(*kind, *state), None).await.unwrap();
    }
    etcd.put(format!("{prefix}/ls"), "7", None).await.unwrap();
    etcd.put(format!("{prefix}/ssi"), "1", None).await.unwrap();
    etcd.put(format!("{prefix}/cl"), r#"{"replica":"dead","location":"http://127.0.0.1:9"}"#, None).await.unwrap();
    c.outside.sent.lock().unwrap().insert(4);

    for i in 0..3 {
        let replica = c.spawn_replica(i).await;
        c.replicas.push(replica);
    }
    let l = c.leader(None).await;

    // Every replica holds exactly the Replication entries that did not Fail and were
    // started: 1 (Success) and 2 (InProcess, re-executed); not 3 (Null) nor 6 (Fail).
    c.converged(&entries(&[(1, "a1"), (2, "a2")])).await;
    let c = &c;
    let state = |i| async move { c.rs(i).await.unwrap() };
    assert_eq!(state(2).await.state, ProcessState::Success);
    assert!(state(2).await.response.is_some(), "the re-executed entry's answer is recorded");
    assert_eq!(state(3).await.state, ProcessState::Ignore);
    assert_eq!(state(4).await.state, ProcessState::Success, "reconciled: it had been sent");
    assert_eq!(state(5).await.state, ProcessState::InProcess, "still in doubt");
    assert_eq!(state(6).await.state, ProcessState::Fail);
    assert_eq!(state(7).await.state, ProcessState::Ignore);
    assert_eq!(c.counter("ssi").await, 7);
    assert_eq!(c.replicas[l].status().in_doubt, vec![5]);
    assert_eq!(c.outside.executions.load(Ordering::SeqCst), 0, "no Normal request executed again");
    let mut etcd = c.etcd_client(0).await;
    let doubts = etcd
        .get(format!("{prefix}/doubt/"), Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .unwrap();
    let keys: Vec<_> = doubts.kvs().iter().map(|kv| kv.key_str().unwrap().to_owned()).collect();
    assert_eq!(keys, vec![format!("{prefix}/doubt/{:020}", 5)]);

    // New requests continue after the old log.
    let response = c.post(l, "/append", "a8", None).await;
    assert_eq!(response.headers()["br2k-index"], "8");
    c.converged(&entries(&[(1, "a1"), (2, "a2"), (8, "a8")])).await;
    eventually("followers' LPIs reach 8", async || {
        c.counter("lpi/r0").await == 8 && c.counter("lpi/r1").await == 8 && c.counter("lpi/r2").await == 8
    })
    .await;
}
