//! Leader election, the registry's location and epoch, fencing of a stale leader.

use br2k_replication::{ProcessState, Role};

use crate::harness::{Cluster, SERVICE, entries, eventually};

#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_publishes_itself_with_a_higher_epoch_and_replicas_agree() {
    let mut c = Cluster::start(true).await;
    let l = c.leader(None).await;
    let registry = c.registry.as_ref().unwrap().manager.clone();
    let leader_url = c.replicas[l].url.clone();
    eventually("the leader's location is published", async || {
        registry.service_location(SERVICE).await.unwrap().location == leader_url
    })
    .await;
    let first = registry.service_location(SERVICE).await.unwrap();
    assert_eq!(Some(first.epoch), c.replicas[l].status().epoch);

    for k in 1..=3u64 {
        let response = c.post(l, "/append", &format!("a{k}"), None).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["br2k-index"], k.to_string().as_str());
    }
    c.converged(&entries(&[(1, "a1"), (2, "a2"), (3, "a3")])).await;
    for k in 1..=3 {
        assert_eq!(c.rs(k).await.unwrap().state, ProcessState::Success);
    }
    assert_eq!((c.counter("ls").await, c.counter("ssi").await), (3, 3));
    // The status says where the time went: one group each, two fenced writes per group
    // (replicate, outcome: Replication requests are written InProcess with the log, so
    // there is no in-process write), each counted as an etcd call too.
    let pipeline = c.pipeline(l).await;
    assert_eq!(pipeline["leader: requests logged"].calls, 3, "{pipeline:?}");
    assert_eq!(pipeline["leader: groups processed"].calls, 3, "{pipeline:?}");
    assert_eq!(pipeline["leader: replicate write"].calls, 3, "{pipeline:?}");
    assert_eq!(pipeline["leader: execute"].calls, 3, "{pipeline:?}");
    assert!(pipeline["etcd: write as leader"].calls >= 6, "{pipeline:?}");
    assert!(!pipeline.contains_key("leader: in-process write"), "{pipeline:?}");
    assert!(pipeline["leader: outcome write"].micros > 0, "{pipeline:?}");
    for i in 0..3 {
        let name = format!("lpi/r{i}");
        eventually("every replica's LPI reaches 3", async || c.counter(&name).await == 3).await;
    }

    // A follower sends clients to the leader.
    let follower = (l + 1) % 3;
    let response = c.post(follower, "/append", "x", None).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["br2k-leader"], leader_url.as_str());

    // The leader dies with its etcd member; another takes over and publishes itself.
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    let l2 = c.leader(Some(l)).await;
    let new_url = c.replicas[l2].url.clone();
    eventually("the new leader's location is published", async || {
        registry.service_location(SERVICE).await.unwrap().location == new_url
    })
    .await;
    let second = registry.service_location(SERVICE).await.unwrap();
    assert!(second.epoch > first.epoch, "epoch {} after {}", second.epoch, first.epoch);
    assert_eq!(Some(second.epoch), c.replicas[l2].status().epoch);

    let response = c.post(l2, "/append", "a4", None).await;
    assert_eq!(response.status(), 200);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    c.converged_on(&survivors, &entries(&[(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4")])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_leaders_write_fails_and_it_steps_down() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "a1", None).await.status(), 200);
    let old_epoch = c.replicas[l].status().epoch.unwrap();

    // Another replica takes leadership as far as etcd is concerned.
    let mut etcd = c.etcd_client(l).await;
    etcd.put(format!("/br2k/{SERVICE}/cl"), r#"{"replica":"r9","location":"http://127.0.0.1:9"}"#, None).await.unwrap();

    // The stale leader's replicate transaction is refused: nothing is stored, the client
    // is told to retry, and the replica steps down.
    let response = c.post(l, "/append", "stale", None).await;
    assert_eq!(response.status(), 503);
    assert_eq!(c.counter("ls").await, 1);

    // Its member still leads, so it registers again, with a higher epoch.
    let mut status = c.replicas[l].status.clone();
    let again =
        status.wait_for(|s| s.role == Role::Leader && s.epoch.is_some_and(|e| e > old_epoch)).await.unwrap().clone();
    assert!(again.epoch.unwrap() > old_epoch);
    assert_eq!(c.post(l, "/append", "a2", None).await.status(), 200);
    c.converged(&entries(&[(1, "a1"), (2, "a2")])).await;
}
