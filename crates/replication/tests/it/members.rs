//! The runtime and etcd's membership: a replica whose etcd member a membership change
//! removed says so in its health and status (its member shut itself down, which alone
//! would look like a member that merely stopped answering), while the others serve on.

use std::time::Duration;

use crate::harness::{Cluster, eventually};

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_etcd_member_was_removed_says_so_and_the_others_serve_on() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let removed = (l + 1) % 3;
    assert!(c.post(l, "/append", "before", None).await.status().is_success());
    eventually("every replica reports whether its member is a learner", async || {
        c.statuses().iter().all(|s| s.etcd_reachable && !s.etcd_learner && !s.removed_from_etcd)
    })
    .await;
    // Any replica lists every member, and the membership change journaled (none yet).
    let roster = |i: usize| {
        let url = format!("{}/br2k/members", c.replicas[i].url);
        let http = c.http.clone();
        async move { http.get(url).send().await.unwrap().json::<br2k_replication::Roster>().await.unwrap() }
    };
    let before = roster(removed).await;
    assert_eq!(before.members.len(), 3, "{before:?}");
    assert!(before.members.iter().all(|m| !m.learner && !m.replica.is_empty()), "{before:?}");
    assert_eq!(before.change, None);
    let id = c.member_id(removed).await;
    assert!(before.members.iter().any(|m| m.etcd_member == format!("{id:x}")), "{before:?}");
    let journal = br2k_replication::membership_change_key(crate::harness::SERVICE);
    c.etcd_client(l).await.put(journal.as_str(), r#"{"kind":{"kind":"remove","replica":"x"}}"#, None).await.unwrap();
    assert_eq!(roster(l).await.change.unwrap()["kind"]["replica"], "x");
    c.etcd_client(l).await.delete(journal.as_str(), None).await.unwrap();
    // etcd refuses a reconfiguration until its members have been connected for 5 s.
    eventually("etcd removes the member", async || {
        let removal = c.etcd_client(l).await.member_remove(id).await;
        if removal.is_err() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        removal.is_ok()
    })
    .await;
    eventually("the replica says it was removed", async || c.replicas[removed].status().removed_from_etcd).await;
    let response = c.http.get(format!("{}/br2k/health", c.replicas[removed].url)).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let health = response.text().await.unwrap();
    assert!(health.contains("removed from the cluster by a membership change"), "{health}");
    // The other two keep a quorum of the two-member cluster and serve.
    let answer = c.post_to_leader("/append", "after", None).await;
    assert!(answer.status().is_success(), "{}", answer.status());
    for i in (0..3).filter(|&i| i != removed) {
        assert!(!c.replicas[i].status().removed_from_etcd, "replica {i}");
    }
    let after = roster(l).await;
    assert_eq!(after.members.len(), 2, "{after:?}");
    assert!(after.members.iter().all(|m| m.etcd_member != format!("{id:x}")), "{after:?}");
}
