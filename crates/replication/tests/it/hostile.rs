//! Clients that try to stall a replica with what they send.

use crate::harness::{Cluster, eventually};

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_behind_a_burst_of_large_requests_catches_up() {
    // 20 bodies of 250 KB are about 6.7 MB of log once encoded: more than one read of
    // 256 entries may carry (etcd-client refuses answers over 4 MiB by default).
    let mut c = Cluster::start_accepting(256 * 1024).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    c.replicas[f].crash();
    let big = "x".repeat(250_000);
    let mut expected = Vec::new();
    for k in 0..30 {
        let text = if k % 3 == 2 { format!("small{k}") } else { format!("{big}{k}") };
        let response = c.post(l, "/append", &text, None).await;
        assert_eq!(response.status(), 200);
        let index: u64 = response.headers()["br2k-index"].to_str().unwrap().parse().unwrap();
        expected.push((index, text));
    }
    c.restart_replica(f).await;
    c.converged(&expected).await;
    eventually("the follower reports no error", async || c.replicas[f].status().last_error.is_none()).await;

    // A new leader's Prepare Service reads the same log the same way.
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    let l2 = c.leader(Some(l)).await;
    let response = c.post(l2, "/append", "after", None).await;
    assert_eq!(response.status(), 200);
}
