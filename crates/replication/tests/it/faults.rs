//! A replica that cannot apply an entry stops rather than diverge: a follower whose disk
//! fills stops at the entry (LPI kept below it, unhealthy, compaction waiting for it) and
//! converges once it has room; a leader whose disk fills ends its term without answering
//! the fault; a replica whose answer differs from the recorded one stops for good.
//!
//! The full disk here is the journal app's double (every write fails with ENOSPC), so
//! these tests need no privilege; the log server's and the ledger's tests fill a real
//! small tmpfs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use br2k_replication::{SnapshotPolicy, Status};

use crate::harness::{Cluster, SERVICE, eventually};
use crate::metrics::{scrape, value};

/// Replica `i`'s health: its HTTP status and body.
async fn health(c: &Cluster, i: usize) -> (u16, String) {
    let response = c.http.get(format!("{}/br2k/health", c.replicas[i].url)).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The index a 200 answer carries.
fn index_of(response: &reqwest::Response) -> u64 {
    response.headers()["br2k-index"].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_whose_disk_fills_stops_at_that_entry_and_converges_once_it_has_room() {
    // Snapshots and compaction on, so that a follower that stops could lose entries it
    // still needs if its LPI said more than it applied.
    let c = Cluster::start_snapshotting(SnapshotPolicy { interval: 10, trailing: 2 }).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    // Five more writes fit on the follower's disk; then every write fails.
    c.replicas[f].state.fill_disk_after(5);
    let load = c.load();
    let mut expected = load.append_many("a", 60, 4).await;
    eventually("the follower stops at an entry", async || c.replicas[f].status().fault.is_some()).await;
    let stopped = c.replicas[f].status();
    let fault = stopped.fault.clone().unwrap_or_else(|| panic!("the follower says nothing of its fault: {stopped:?}"));
    assert_eq!(fault.index, 6, "it stops at the first entry it could not apply: {fault:?}");
    assert!(fault.reason.contains("disk full") && fault.reason.contains("log entry 6"), "{}", fault.reason);
    assert!(c.replicas[f].state.refused_writes.load(Ordering::SeqCst) > 0);
    assert_eq!(c.replicas[f].state.entries(), expected[..5], "it applied what fit, nothing skipped");
    assert!(stopped.lpi <= 5 && stopped.applied_index == 5, "{stopped:?}");
    // It keeps retrying, and stays stopped: LPI in etcd never passes what it applied,
    // and compaction keeps the entries it still needs.
    eventually("the follower has retried the entry", async || {
        c.replicas[f].status().fault.is_some_and(|fault| fault.retries >= 3)
    })
    .await;
    assert!(c.counter(&format!("lpi/r{f}")).await <= 5, "LPI in etcd passed what the follower applied");
    assert_eq!(c.replicas[f].state.entries().len(), 5);
    let first_index = c.replicas[l].status().first_index;
    assert!(first_index <= 6, "compaction deleted entries the stopped follower needs: first index {first_index}");
    let (code, body) = health(&c, f).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&format!("r{f}: disk full")) && body.contains("log entry 6"), "{body}");
    let metrics = scrape(&c, f).await;
    assert_eq!(value(&metrics, "br2k_stopped_at_index", &[]), 6.0);
    assert!(value(&metrics, "br2k_local_faults_total", &[]) >= 1.0);
    // The rest of the service never noticed.
    assert_eq!(health(&c, l).await.0, 200);

    // Room again: the follower resumes from that same entry and converges.
    c.replicas[f].state.free_disk();
    expected.extend(load.append_many("b", 10, 2).await);
    c.converged(&expected).await;
    eventually("the follower is healthy again", async || health(&c, f).await.0 == 200).await;
    let resumed = c.replicas[f].status();
    assert!(resumed.fault.is_none() && resumed.last_error.is_none(), "{resumed:?}");
    assert_eq!(value(&scrape(&c, f).await, "br2k_stopped_at_index", &[]), 0.0);
    let ls = c.counter("ls").await;
    eventually("the follower's LPI reaches the log's end", async || c.counter(&format!("lpi/r{f}")).await == ls).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_whose_disk_fills_ends_its_term_and_no_answer_is_the_fault() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let before = c.post(l, "/append", "before", Some("k-before")).await;
    assert_eq!(before.status(), 200);
    c.replicas[l].state.fill_disk_after(0);

    let first = c.post(l, "/append", "full", Some("k-full")).await;
    let (code, body) = (first.status(), first.text().await.unwrap());
    assert_eq!(code, 503, "{body}");
    assert!(!body.contains("space") && body.contains("retry with the same Idempotency-Key"), "{body}");
    let l2 = c.leader(Some(l)).await;
    assert_ne!(l2, l, "leadership moved to a replica that can apply");
    let retry = c.post_to_leader("/append", "full", Some("k-full")).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(index_of(&retry), 2, "the request the fault interrupted was executed by the next leader");
    let mut expected = vec![(1, "before".to_owned()), (2, "full".to_owned())];
    c.converged_on(&[l2, 3 - l - l2], &expected).await;

    // The old leader, a follower now, stops at that entry until it has room.
    eventually("the old leader says it is stopped at entry 2", async || {
        c.replicas[l].status().fault.is_some_and(|fault| fault.index == 2)
    })
    .await;
    assert_eq!(c.replicas[l].state.entries(), expected[..1]);
    assert!(health(&c, l).await.1.contains("disk full"));
    // More load meanwhile, then room again: every acknowledged request is applied exactly
    // once on every replica.
    let load = c.load();
    expected.extend(load.append_many("c", 20, 4).await);
    c.replicas[l].state.free_disk();
    c.converged(&expected).await;
    eventually("the old leader is healthy again", async || health(&c, l).await.0 == 200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_whose_fsync_fails_ends_its_term_and_its_lpi_says_no_more_than_it_made_durable() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "durable", Some("k-1")).await.status(), 200);
    c.replicas[l].state.fsync_fails.store(true, Ordering::SeqCst);

    // The outcome is recorded while the state is persisted: it stands, but the client is
    // not answered by a leader that could not make it durable.
    let first = c.post(l, "/append", "unsynced", Some("k-2")).await;
    assert_eq!(first.status(), 503, "{}", first.text().await.unwrap());
    let l2 = c.leader(Some(l)).await;
    assert_ne!(l2, l);
    let retry = c.post_to_leader("/append", "unsynced", Some("k-2")).await;
    assert_eq!((retry.status().as_u16(), index_of(&retry)), (200, 2), "the retry gets the recorded answer");
    assert!(c.counter(&format!("lpi/r{l}")).await <= 1, "the old leader's LPI says more than it made durable");
    eventually("the old leader says its state cannot be persisted", async || {
        c.replicas[l].status().fault.is_some_and(|f| f.reason.contains("could not persist"))
    })
    .await;

    c.replicas[l].state.fsync_fails.store(false, Ordering::SeqCst);
    let expected = crate::harness::entries(&[(1, "durable"), (2, "unsynced")]);
    c.converged(&expected).await;
    eventually("the old leader's LPI reaches the log's end once it persists", async || {
        c.counter(&format!("lpi/r{l}")).await == 2
    })
    .await;
    eventually("the old leader is healthy again", async || health(&c, l).await.0 == 200).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_answer_differs_from_the_recorded_one_raises_the_divergence_alarm_and_stops() {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    let other = 3 - l - f;
    // Follower f's `/append` answers with its own name: not what the leader recorded.
    *c.replicas[f].state.nondeterministic.lock().unwrap() = Some(format!("r{f}"));
    for n in 1..=3 {
        assert_eq!(c.post(l, "/append", &format!("d{n}"), None).await.status(), 200);
    }
    let expected = crate::harness::entries(&[(1, "d1"), (2, "d2"), (3, "d3")]);
    c.converged_on(&[l, other], &expected).await;

    eventually("the follower raises the divergence alarm", async || c.replicas[f].status().divergence.is_some()).await;
    let status: Status = c.replicas[f].status();
    let divergence = status.divergence.clone().unwrap();
    assert_eq!((divergence.index, divergence.route.as_str()), (1, "POST /append"));
    assert!(divergence.recorded.starts_with("success 200 (body sha256 "), "{divergence:?}");
    assert_ne!(divergence.recorded, divergence.here);
    let (code, body) = health(&c, f).await;
    assert_eq!(code, 503);
    assert!(body.contains("diverged at log entry 1") && body.contains("Rebuild it"), "{body}");
    assert_eq!(value(&scrape(&c, f).await, "br2k_diverged_at_index", &[]), 1.0);
    // It stopped there: its LPI does not move, here or in etcd.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.replicas[f].status().lpi, 0);
    assert_eq!(c.counter(&format!("lpi/r{f}")).await, 0);

    // The mark survives a restart: it comes back stopped.
    c.restart_replica(f).await;
    eventually("the restarted replica still says it diverged", async || {
        c.replicas[f].status().divergence.as_ref().is_some_and(|d| d.index == 1)
    })
    .await;
    let mut etcd = c.etcd_client(l).await;
    let member = etcd.get(format!("/br2k/{SERVICE}/members/r{f}"), None).await.unwrap();
    let record: serde_json::Value = serde_json::from_slice(member.kvs()[0].value()).unwrap();
    assert_eq!(record["diverged"], 1, "its membership says so: no snapshot is fetched from it");

    // It never leads: with the leader gone, the other replica takes over.
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    let next = c.leader(Some(l)).await;
    assert_eq!(next, other, "the diverged replica led");
    let after = c.post(next, "/append", "after", None).await;
    assert_eq!(after.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(c.replicas[f].status().role, br2k_replication::Role::Leader);
    assert_eq!(c.replicas[f].status().lpi, 0);
}
