//! etcd's space quota: a `NOSPACE` alarm is reported on every replica's health with what
//! to do, nothing is answered as if written meanwhile, and the service carries on once an
//! operator has done it.

use br2k_test_utils::EtcdCluster;
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, CompactionOptions, DeleteOptions};

use crate::harness::{Cluster, entries, eventually};

const QUOTA: u64 = 16 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn a_nospace_alarm_is_reported_with_what_to_do_and_the_service_resumes_once_it_is_cleared() {
    let etcd = EtcdCluster::builder().quota_bytes(QUOTA).spawn().expect("etcd starts (run `bash tools/setup.sh`)");
    let c = Cluster::start_on(etcd).await;
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "before", None).await.status(), 200);

    // Something else fills etcd until it refuses writes.
    let mut etcd = c.etcd_client(0).await;
    let filler = vec![b'x'; 1024 * 1024];
    let mut puts = 0;
    let refusal = loop {
        match etcd.put(format!("/filler/{puts}"), filler.clone(), None).await {
            Ok(_) => puts += 1,
            Err(e) => break e.to_string(),
        }
        assert!(puts < 64, "etcd took {puts} MiB under a 16 MiB quota");
    };
    assert!(refusal.contains("database space exceeded"), "{refusal}");

    // Every replica's health says what happened and what to do.
    for i in 0..3 {
        let url = format!("{}/br2k/health", c.replicas[i].url);
        eventually("the replica reports the alarm", async || {
            let response = c.http.get(&url).send().await.unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            status == 503 && body.contains("NOSPACE") && body.contains("alarm disarm") && body.contains("defrag")
        })
        .await;
        let status = c.replicas[i].status();
        assert!(status.etcd_alarms.iter().any(|a| a.contains("NOSPACE")), "{status:?}");
        assert_eq!(status.quota, Some(QUOTA));
    }
    // Writes are refused, not answered as if stored.
    let refused = c.http.post(format!("{}/append", c.replicas[l].url)).body("during").send().await.unwrap();
    assert_ne!(refused.status(), 200);

    // What the advice says: free space, compact, defragment each member, disarm.
    etcd.delete("/filler/", Some(DeleteOptions::new().with_prefix())).await.unwrap();
    let revision = etcd.get("/", None).await.unwrap().header().unwrap().revision();
    etcd.compact(revision, Some(CompactionOptions::new().with_physical())).await.unwrap();
    for i in 0..3 {
        c.etcd_client(i).await.defragment().await.unwrap();
    }
    let alarms = etcd.alarm(AlarmAction::Get, AlarmType::None, None).await.unwrap();
    for alarm in alarms.alarms() {
        let mut options = AlarmOptions::new();
        options.with_member(alarm.member_id());
        etcd.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(options)).await.unwrap();
    }
    for i in 0..3 {
        let url = format!("{}/br2k/health", c.replicas[i].url);
        eventually("the replica is healthy again", async || c.http.get(&url).send().await.unwrap().status() == 200)
            .await;
    }
    let response = c.post_to_leader("/append", "after", None).await;
    assert_eq!(response.status(), 200);
    let index: u64 = response.headers()["br2k-index"].to_str().unwrap().parse().unwrap();
    c.converged(&entries(&[(1, "before"), (index, "after")])).await;
}
