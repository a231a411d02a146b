//! Snapshots, log compaction and catch-up from a peer's snapshot, on a real etcd cluster
//! with small intervals (a snapshot every 50 entries, 20 kept below it).

use std::time::{Duration, Instant};

use br2k_replication::{ProcessState, Role, SnapshotPolicy};

use crate::harness::{Cluster, SERVICE, eventually};

const POLICY: SnapshotPolicy = SnapshotPolicy { interval: 50, trailing: 20 };

/// The statuses' view of where the log starts.
fn first_index(c: &Cluster) -> u64 {
    c.statuses().iter().map(|s| s.first_index).max().unwrap_or(1)
}

/// Waits until every running replica's journal has exactly the answered entries.
async fn converged_on(c: &Cluster, replicas: &[usize], answered: &[(u64, String)]) {
    c.converged_on(replicas, answered).await;
    for &i in replicas {
        let journal = c.replicas[i].state.entries();
        let mut unique = journal.clone();
        unique.dedup_by_key(|e| e.1.clone());
        assert_eq!(unique.len(), journal.len(), "replica {i} holds a duplicate");
    }
}

/// Sends `before` appends, crashes follower `f`, sends `after` more and waits until
/// compaction has deleted well past where `f` stopped. Returns every answered append and
/// the last index `f` applied.
async fn leave_behind(c: &mut Cluster, f: usize, before: usize, after: usize) -> (Vec<(u64, String)>, u64) {
    let mut answered = c.load().append_many("a", before, 4).await;
    c.converged(&answered).await;
    c.replicas[f].crash();
    let left_at = c.replicas[f].state.entries().last().unwrap().0;
    answered.extend(c.load().append_many("b", after, 4).await);
    eventually("compaction passes the dead follower", async || first_index(c) > left_at + 100).await;
    (answered, left_at)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_in_etcd_stays_bounded_while_thousands_of_requests_flow() {
    let c = Cluster::start_snapshotting(POLICY).await;
    c.leader(None).await;
    let load = c.load();
    let sending = tokio::spawn(async move { load.append_many("a", 2000, 8).await });
    let mut most = 0;
    while !sending.is_finished() {
        most = most.max(c.count_keys("log/").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answered = sending.await.unwrap();
    assert_eq!(answered.len(), 2000);
    // A snapshot every 50, 20 kept below it, and followers report their LPI at most every
    // 200 ms: a few hundred entries at most, never the 2000 sent.
    eprintln!("at most {most} log entries were in etcd at once");
    assert!(most <= 400, "up to {most} log entries were in etcd at once");
    converged_on(&c, &[0, 1, 2], &answered).await;
    // The leader snapshots between groups: its last one is within a group or two of the
    // end, and the log is kept from 20 below it.
    eventually("the log is compacted up to the latest snapshots", async || {
        c.count_keys("log/").await <= 150 && c.count_keys("rs/").await <= 150
    })
    .await;
    let l = c.leader(None).await;
    let status = c.replicas[l].status();
    assert!(status.first_index > 1850, "{status:?}");
    assert!(status.snapshot_index >= 1870, "{status:?}");
    assert!(status.db_size > 0 && status.db_size_in_use > 0 && status.db_size_in_use <= status.db_size, "{status:?}");
    assert_eq!(status.quota, Some(2 * 1024 * 1024 * 1024), "etcd's default quota, read from its metrics");
    assert!(status.etcd_alarms.is_empty());

    // etcd's history is compacted too: an old revision of a key is gone.
    let mut etcd = c.etcd_client(0).await;
    let old = etcd
        .get(format!("/br2k/{SERVICE}/ssi"), Some(etcd_client::GetOptions::new().with_revision(10)))
        .await
        .unwrap_err();
    assert!(old.to_string().contains("compacted"), "{old}");

    // The first request's entry is long gone, yet its retry gets the stored answer.
    let response = c.post(l, "/append", "a0", Some("key-a-0")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["br2k-replayed"], "true");
    let first = answered.iter().find(|(_, text)| text == "a0").unwrap().0;
    assert_eq!(response.headers()["br2k-index"], first.to_string().as_str());
    assert!(first < status.first_index, "the entry was compacted");
    assert_eq!(c.replicas[l].state.entries().len(), 2000, "nothing executed twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_follower_does_not_stop_compaction_and_catches_up_from_a_snapshot_much_later() {
    let mut c = Cluster::start_snapshotting(POLICY).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    let (mut answered, left_at) = leave_behind(&mut c, f, 150, 500).await;

    c.restart_replica(f).await;
    converged_on(&c, &[0, 1, 2], &answered).await;
    assert_eq!(c.replicas[f].state.restores.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The app's state is restored a moment before the status says so (the record and the
    // lineage file are written in between): wait for the status, do not sample it.
    eventually(&format!("r{f}'s status shows a restore past {left_at}"), async || {
        c.replicas[f].status().state_version > left_at
    })
    .await;
    let status = c.replicas[f].status();
    assert_eq!(status.role, Role::Follower);
    // And it follows from there: new requests reach it.
    answered.extend(c.load().append_many("c", 20, 2).await);
    converged_on(&c, &[0, 1, 2], &answered).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_wiped_mid_run_restores_a_snapshot_and_ends_identical() {
    let mut c = Cluster::start_snapshotting(POLICY).await;
    let l = c.leader(None).await;
    let f = (l + 2) % 3;
    let load = c.load();
    let sending = tokio::spawn(async move { load.append_many("a", 600, 4).await });
    eventually("the log is compacted", async || first_index(&c) > 100).await;
    c.wipe_replica(f);
    c.restart_replica(f).await;
    let answered = sending.await.unwrap();
    converged_on(&c, &[0, 1, 2], &answered).await;
    assert!(c.replicas[f].state.restores.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    eventually("the wiped follower's status shows its restore", async || c.replicas[f].status().state_version > 0)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_or_truncated_snapshot_is_refused_and_the_replica_tries_again() {
    let mut c = Cluster::start_snapshotting(POLICY).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    let (answered, _) = leave_behind(&mut c, f, 100, 300).await;
    let journal_before = c.replicas[f].state.entries();
    let peers: Vec<usize> = (0..3).filter(|&i| i != f).collect();
    // Each peer has applied everything and taken the snapshots that were due (there is no
    // more traffic, so it takes no other).
    let total = answered.len() as u64;
    eventually("the peers applied everything", async || peers.iter().all(|&p| c.replicas[p].status().lpi == total))
        .await;
    let snapshots = || peers.iter().map(|&p| c.replicas[p].status().snapshot_index).collect::<Vec<_>>();
    let mut last = snapshots();
    eventually("the peers' snapshots settle", async || {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = snapshots();
        std::mem::replace(&mut last, now.clone()) == now
    })
    .await;

    // Damage every peer's latest snapshot: one cut short, one with a byte changed.
    let mut originals = Vec::new();
    for (k, &p) in peers.iter().enumerate() {
        let path = c.snapshot_dir(p).join(format!("{:020}.snap", c.replicas[p].status().snapshot_index));
        let bytes = std::fs::read(&path).unwrap();
        let mut damaged = bytes.clone();
        if k == 0 {
            damaged.truncate(bytes.len() / 2);
        } else {
            let middle = damaged.len() / 2;
            damaged[middle] ^= 0x20;
        }
        std::fs::write(&path, damaged).unwrap();
        originals.push((path, bytes));
    }
    c.restart_replica(f).await;
    let started = Instant::now();
    let error = loop {
        if let Some(error) = c.replicas[f].status().last_error {
            break error;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no error reported: {:?}", c.statuses());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The cut-short one is refused by its own replica (its length is not its record's);
    // the changed byte is caught by the digest.
    let refused = ["does not match its digest", "is damaged here"];
    assert!(refused.iter().any(|r| error.contains(r)), "{error}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.replicas[f].state.entries(), journal_before, "the state is untouched until a snapshot passes");
    assert_eq!(c.replicas[f].state.restores.load(std::sync::atomic::Ordering::SeqCst), 0);

    for (path, bytes) in originals {
        std::fs::write(path, bytes).unwrap();
    }
    converged_on(&c, &[0, 1, 2], &answered).await;
    assert_eq!(c.replicas[f].state.restores.load(std::sync::atomic::Ordering::SeqCst), 1);
    eventually("the error clears", async || c.replicas[f].status().last_error.is_none()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_services_replicas_can_fetch_a_snapshot() {
    let c = Cluster::start_snapshotting(POLICY).await;
    c.leader(None).await;
    let answered = c.load().append_many("a", 120, 4).await;
    c.converged(&answered).await;
    let i = 0;
    eventually("replica 0 holds a snapshot", async || c.replicas[i].status().snapshot_index > 0).await;
    let index = c.replicas[i].status().snapshot_index;
    let url = format!("{}/br2k/snapshot?index={index}", c.replicas[i].url);

    let anonymous = c.http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let guessed = c.http.get(&url).header("Br2k-Peer-Token", "0".repeat(64)).send().await.unwrap();
    assert_eq!(guessed.status(), 403);

    let mut etcd = c.etcd_client(0).await;
    let token =
        etcd.get(format!("/br2k/{SERVICE}/peer_token"), None).await.unwrap().kvs()[0].value_str().unwrap().to_owned();
    let status = c.http.get(format!("{}/br2k/status", c.replicas[i].url)).send().await.unwrap().text().await.unwrap();
    assert!(!status.contains(&token), "the token never leaves the replicas");
    let peer = c.http.get(&url).header("Br2k-Peer-Token", &token).send().await.unwrap();
    assert_eq!(peer.status(), 200);
    let digest = peer.headers()["br2k-snapshot-digest"].to_str().unwrap().to_owned();
    let bytes = peer.bytes().await.unwrap();
    let journal: Vec<(u64, String)> =
        serde_json::from_slice(br2k_replication::snapshot_app_bytes(&bytes).unwrap()).unwrap();
    assert!(journal.len() as u64 <= index && !journal.is_empty());
    use sha2::Digest as _;
    let hex: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, format!("sha256:{hex}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_while_compacting_leaves_a_whole_log_and_the_next_one_carries_on() {
    let mut c = Cluster::start_snapshotting(POLICY).await;
    let l = c.leader(None).await;
    let load = c.load();
    let sending = tokio::spawn(async move { load.append_many("a", 900, 6).await });
    // Kill the leader (app and etcd member) right after it compacted, while it keeps
    // snapshotting and compacting under load.
    eventually("the leader compacts", async || c.replicas[l].status().first_index > 150).await;
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    let l2 = c.leader(Some(l)).await;
    let answered = sending.await.unwrap();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    converged_on(&c, &survivors, &answered).await;
    eventually("the new leader compacts further", async || c.replicas[l2].status().first_index > 600).await;

    // Every entry from the first index to LS is there, and indexes never restarted.
    let records =
        br2k_replication::inspect::read_records(&c.etcd.endpoint(l2), SERVICE, Duration::from_secs(5)).await.unwrap();
    assert_eq!(records.entries.len() as u64, records.log_size - records.compacted.first_index + 1);
    assert_eq!(records.entries.first().unwrap().index, records.compacted.first_index);
    let retained = records.entries.iter().filter(|e| e.state.state == ProcessState::Success).count() as u64;
    assert_eq!(
        records.compacted.replication_success + retained,
        answered.len() as u64,
        "every answered append executed once, compacted or not"
    );
    assert!(records.terms >= 2);

    // The dead leader returns, behind the compacted log, and catches up.
    c.etcd.restart(l).unwrap();
    c.restart_replica(l).await;
    converged_on(&c, &[0, 1, 2], &answered).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_interrupted_by_a_crash_is_finished_at_the_next_start() {
    let mut c = Cluster::start_snapshotting(POLICY).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    let answered = c.load().append_many("a", 120, 4).await;
    c.converged(&answered).await;
    eventually("the follower holds a snapshot", async || c.replicas[f].status().snapshot_index > 0).await;
    c.replicas[f].crash();
    // What a crash in the middle of restoring leaves: the lineage says a restore of the
    // latest snapshot began, and the app state is something else entirely.
    let dir = c.snapshot_dir(f);
    let index = c.replicas[f].status().snapshot_index;
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{index:020}.json"))).unwrap()).unwrap();
    std::fs::write(dir.join("lineage.json"), serde_json::json!({ "state_version": 0, "restoring": meta }).to_string())
        .unwrap();
    std::fs::write(c.snapshot_dir(f).parent().unwrap().join("journal.json"), r#"[[1,"half-restored"]]"#).unwrap();
    c.restart_replica(f).await;
    c.converged(&answered).await;
    eventually("the finished restore shows in the status", async || c.replicas[f].status().state_version == index)
        .await;
}
