//! Check for pending process: a leader cut off before, during and after executing a
//! request ends with exactly the service state, and the client's retry gets the answer.

use std::sync::atomic::Ordering;

use br2k_replication::{ProcessState, Step};

use crate::harness::{Cluster, entries};

/// Stops the leader at `step` while it processes `path`, cuts its etcd member off, and
/// checks that every replica converges.
async fn leader_cut_off(step: Option<Step>, path: &str) {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "a1", Some("k1")).await.status(), 200);
    c.converged(&entries(&[(1, "a1")])).await;

    let replica = &c.replicas[l];
    match step {
        Some(step) => {
            replica.interrupt.arm(step);
        }
        None => replica.state.slow_armed.store(true, Ordering::SeqCst),
    }
    let (http, url) = (c.http.clone(), format!("{}{path}", replica.url));
    let request = tokio::spawn(async move { http.post(url).header("Idempotency-Key", "k2").body("a2").send().await });
    match step {
        Some(_) => replica.interrupt.reached.notified().await,
        None => replica.state.slow_reached.notified().await,
    }
    if step == Some(Step::BeforeExecution) {
        // A Replication request is InProcess from the write that logged it: no write of
        // its own marks it (the next leader executes it all the same).
        assert_eq!(c.rs(2).await.unwrap().state, ProcessState::InProcess);
        let pipeline = c.pipeline(l).await;
        assert!(!pipeline.contains_key("leader: in-process write"), "{pipeline:?}");
    }

    c.etcd.pause(l).unwrap();
    let answer = request.await.unwrap().unwrap();
    assert_eq!(answer.status(), 503, "the interrupted request is not acknowledged");
    c.leader(Some(l)).await;
    c.etcd.resume(l).unwrap();

    // The new leader re-executed the InProcess entry; the retry gets that answer.
    let retry = c.post_to_leader(path, "a2", Some("k2")).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["br2k-index"], "2");
    assert_eq!(retry.headers()["br2k-replayed"], "true");
    assert_eq!(c.rs(2).await.unwrap().state, ProcessState::Success);
    // The old leader ends with exactly the others' state (no partial entry, no double).
    c.converged(&entries(&[(1, "a1"), (2, "a2")])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_before_execution() {
    leader_cut_off(Some(Step::BeforeExecution), "/append").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_during_execution_is_rolled_back() {
    leader_cut_off(None, "/slow").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_after_execution() {
    leader_cut_off(Some(Step::Executed), "/append").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_that_crashed_mid_execution_rolls_back_on_restart() {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "a1", None).await.status(), 200);
    c.converged(&entries(&[(1, "a1")])).await;
    // The leader dies half-way through /slow; its process restarts on the same data.
    c.replicas[l].state.slow_armed.store(true, Ordering::SeqCst);
    let (http, url) = (c.http.clone(), format!("{}/slow", c.replicas[l].url));
    let request = tokio::spawn(async move { http.post(url).body("a2").send().await });
    c.replicas[l].state.slow_reached.notified().await;
    assert_eq!(c.replicas[l].state.entries().last().unwrap().1, "partial:a2");
    c.restart_replica(l).await;
    if let Ok(answer) = request.await.unwrap() {
        assert_eq!(answer.status(), 503, "a crashed leader's request is never acknowledged");
    }
    c.leader(None).await;
    c.converged(&entries(&[(1, "a1"), (2, "a2")])).await;
}

/// A busy leader logs the next group in the outcome write of the group it holds. That
/// carried group's leader is then cut off at `step` (before executing it, or after): the
/// next leader executes it again from its InProcess record, and the client's retry gets
/// that answer.
async fn carried_group_cut_off(step: Step) {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "a1", Some("k1")).await.status(), 200);
    c.converged(&entries(&[(1, "a1")])).await;

    // The processor holds "a2", executed and not yet recorded, while "a3" arrives.
    let replica = &c.replicas[l];
    replica.interrupt.arm(Step::Executed);
    let send = |body: &'static str, key: &'static str| c.send_in_background(l, "/append", body, key);
    let first = send("a2", "k2");
    replica.interrupt.reached.notified().await;
    let second = send("a3", "k3");
    // "a3" waits for "a2"'s outcome write to log it: nothing of it is in etcd meanwhile.
    c.eventually_queued(l, 3).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(c.rs(3).await.is_none(), "a busy leader's next group rides the outcome write");
    replica.interrupt.arm(step);
    replica.interrupt.release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    replica.interrupt.reached.notified().await;
    // One transaction recorded "a2" and logged "a3", InProcess.
    assert_eq!(c.rs(2).await.unwrap().state, ProcessState::Success);
    assert_eq!(c.rs(3).await.unwrap().state, ProcessState::InProcess);
    let pipeline = c.pipeline(l).await;
    let carried = pipeline.get("leader: replicate carried by an outcome write").map_or(0, |t| t.calls);
    assert_eq!(carried, 1, "{pipeline:?}");

    c.etcd.pause(l).unwrap();
    assert_eq!(second.await.unwrap().unwrap().status(), 503, "the cut-off request is not acknowledged");
    c.leader(Some(l)).await;
    c.etcd.resume(l).unwrap();
    let retry = c.post_to_leader("/append", "a3", Some("k3")).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["br2k-index"], "3");
    assert_eq!(retry.headers()["br2k-replayed"], "true");
    assert_eq!(c.rs(3).await.unwrap().state, ProcessState::Success);
    c.converged(&entries(&[(1, "a1"), (2, "a2"), (3, "a3")])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_carried_group_interrupted_before_execution() {
    carried_group_cut_off(Step::BeforeExecution).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_carried_group_interrupted_after_execution() {
    carried_group_cut_off(Step::Executed).await;
}

/// A retry of an answered key and a new request, sent while the leader holds a group:
/// the retry is answered from the idempotency table at once, without an etcd read, and
/// only the new request rides the held group's outcome write, logged once.
#[tokio::test(flavor = "multi_thread")]
async fn a_known_key_in_a_carried_group_is_answered_from_its_record() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "a1", Some("k1")).await.status(), 200);
    let replica = &c.replicas[l];
    replica.interrupt.arm(Step::Executed);
    let send = |body: &'static str, key: &'static str| c.send_in_background(l, "/append", body, key);
    let held = send("a2", "k2");
    replica.interrupt.reached.notified().await;
    let (retry, fresh) = (send("a1", "k1"), send("a3", "k3"));
    c.eventually_queued(l, 4).await;
    replica.interrupt.release.notify_one();
    assert_eq!(held.await.unwrap().unwrap().status(), 200);
    let retry = retry.await.unwrap().unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["br2k-index"], "1");
    assert_eq!(retry.headers()["br2k-replayed"], "true");
    let fresh = fresh.await.unwrap().unwrap();
    assert_eq!(fresh.status(), 200);
    assert_eq!(fresh.headers()["br2k-index"], "3");
    let pipeline = c.pipeline(l).await;
    let calls = |stage: &str| pipeline.get(stage).map_or(0, |t| t.calls);
    assert!(calls("leader: replicate carried by an outcome write") >= 1, "{pipeline:?}");
    assert_eq!(calls("leader: idempotency key lookups"), 0, "k1 answered from the table: {pipeline:?}");
    c.converged(&entries(&[(1, "a1"), (2, "a2"), (3, "a3")])).await;
}

/// A group too large to share a transaction with the held group's outcomes (etcd counts
/// a nested transaction's operations with the outer one's) is logged on its own, after
/// them, and every request is answered once.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_too_large_to_carry_is_logged_on_its_own() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "a1", Some("k1")).await.status(), 200);
    let replica = &c.replicas[l];
    replica.interrupt.arm(Step::Executed);
    let send = |body: String| {
        let (http, url) = (c.http.clone(), format!("{}/append", replica.url));
        tokio::spawn(async move {
            let response = http.post(url).header("Idempotency-Key", &body).body(body.clone()).send().await.unwrap();
            assert_eq!(response.status(), 200, "{body}");
            let index: u64 = response.headers()["br2k-index"].to_str().unwrap().parse().unwrap();
            (index, body)
        })
    };
    let held = send("a2".into());
    replica.interrupt.reached.notified().await;
    let many: Vec<_> = (0..60).map(|i| send(format!("b{i}"))).collect();
    c.eventually_queued(l, 62).await;
    replica.interrupt.release.notify_one();
    let mut expected = vec![(1, "a1".to_owned()), held.await.unwrap()];
    for request in many {
        expected.push(request.await.unwrap());
    }
    expected.sort();
    assert_eq!(expected.iter().map(|(index, _)| *index).collect::<Vec<_>>(), (1..=62).collect::<Vec<_>>());
    c.converged(&expected).await;
}

async fn wait_role(c: &Cluster, i: usize, role: br2k_replication::Role) {
    crate::harness::eventually(&format!("replica {i} becomes {role:?}"), async || c.replicas[i].status().role == role)
        .await;
}

/// A leader that executed a request and lost leadership before recording its outcome,
/// then becomes leader again itself: Prepare Service must not take the entry as done
/// because its own app applied it. It rolls it back and executes it again, so the entry
/// ends Success with its answer (not InProcess for ever, which would answer the client's
/// retry 409 and leave the entry applied on this replica only).
#[tokio::test(flavor = "multi_thread")]
async fn the_same_leader_elected_again_records_what_it_executed_before_losing_leadership() {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/slow", "a1", Some("k1")).await.status(), 200);
    c.converged(&entries(&[(1, "a1")])).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();

    // Only replica l may lead again: the others' apps stop (their etcd members stay).
    for &o in &others {
        c.replicas[o].crash();
    }
    let replica = &c.replicas[l];
    replica.interrupt.arm(Step::Executed);
    let (http, url) = (c.http.clone(), format!("{}/slow", replica.url));
    let request = tokio::spawn(async move { http.post(url).header("Idempotency-Key", "k2").body("a2").send().await });
    replica.interrupt.reached.notified().await;
    assert_eq!(c.replicas[l].state.entries().last().unwrap().1, "a2", "executed, outcome not yet recorded");

    // Raft leadership moves away (l steps down) and comes back to l's member.
    let (mine, other) = (c.member_id(l).await, c.member_id(others[0]).await);
    c.etcd_client(l).await.move_leader(other).await.unwrap();
    wait_role(&c, l, br2k_replication::Role::Follower).await;
    if let Ok(answer) = request.await.unwrap() {
        assert_eq!(answer.status(), 503, "the interrupted request is not acknowledged");
    }
    c.etcd_client(others[0]).await.move_leader(mine).await.unwrap();
    wait_role(&c, l, br2k_replication::Role::Leader).await;

    let retry = c.post(l, "/slow", "a2", Some("k2")).await;
    assert_eq!(retry.status(), 200, "{:?}", retry.text().await);
    assert_eq!(retry.headers()["br2k-index"], "2");
    assert_eq!(retry.headers()["br2k-replayed"], "true");
    assert_eq!(c.rs(2).await.unwrap().state, ProcessState::Success);
    for &o in &others {
        c.restart_replica(o).await;
    }
    c.converged(&entries(&[(1, "a1"), (2, "a2")])).await;
}
