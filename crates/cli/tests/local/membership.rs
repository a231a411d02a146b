//! Membership changes on the local backend with real replicas: the log server on 3 nodes
//! grows to 5 and shrinks back to 3 (its leader leaving first) while a client keeps
//! sending requests with idempotency keys and failing over; at the end every live
//! replica holds the same log, with every acknowledged request once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use br2k_deploy::local::{EtcdTimings, LocalNetwork, LocalReplicaHost, LocalService, NetworkMode, ServiceSpec};
use br2k_membership::{ChangeKind, ChangeOptions, Membership};
use br2k_replication::Role;
use tokio::sync::Mutex;

/// Sends `POST /log` requests one after another to whichever node leads, each with its
/// own Idempotency-Key and retried (on any node) until acknowledged; returns the
/// acknowledged sequence numbers.
async fn client(urls: Arc<Mutex<Vec<String>>>, stop: Arc<AtomicBool>) -> BTreeSet<u64> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    let mut acknowledged = BTreeSet::new();
    let mut seq = 0;
    let mut next = 0;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let started = Instant::now();
        loop {
            let targets = urls.lock().await.clone();
            let url = &targets[next % targets.len()];
            let sent = http
                .post(format!("{url}/log"))
                .header("Idempotency-Key", format!("member-test-{seq}"))
                .body(format!(r#"{{"user":7,"seq":{seq}}}"#))
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                acknowledged.insert(seq);
                break;
            }
            next += 1; // fail over to the next node
            assert!(started.elapsed() < Duration::from_secs(60), "request {seq} never acknowledged");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    acknowledged
}

#[test]
fn grow_to_five_and_shrink_to_three_under_requests_loses_and_repeats_nothing() {
    let _turn = crate::one_at_a_time();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(grow_and_shrink());
}

async fn grow_and_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::claim(NetworkMode::Loopback, 3).unwrap();
    let spec = ServiceSpec {
        service: "members".into(),
        app: crate::logserver(),
        app_args: Vec::new(),
        app_env: br2k_deploy::local::snapshot_env(&br2k_replication::SnapshotPolicy { interval: 40, trailing: 10 }),
        work_dir: dir.path().to_owned(),
        etcd: EtcdTimings::default(),
        publishing: None,
        startup_timeout: Duration::from_secs(30),
        disks: br2k_deploy::local::DiskLimits::default(),
        etcd_tls: false,
    };
    let mut service = LocalService::start(network, spec, &|_| {}).await.unwrap();
    service.wait_for_leader(Duration::from_secs(30)).await.unwrap();
    let urls = Arc::new(Mutex::new(service.live_nodes().iter().map(|&i| service.app_url(i)).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn(client(urls.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let recorded = std::sync::Mutex::new(Vec::new());
    let lines = std::sync::Mutex::new(Vec::<String>::new());
    let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
    let options = ChangeOptions { step_timeout: Duration::from_secs(90), ..ChangeOptions::default() };
    let mut took = Vec::new();
    for _ in 0..2 {
        let cluster = service.membership_cluster().unwrap();
        let replica = service.next_node_name();
        let host = LocalReplicaHost::new(&mut service, |n| recorded.lock().unwrap().push(n));
        let started = Instant::now();
        Membership::new("members", cluster, &host, options.clone(), &progress)
            .change(ChangeKind::Add { replica: replica.clone() })
            .await
            .unwrap_or_else(|e| panic!("adding {replica}: {e}\n{}", lines.lock().unwrap().join("\n")));
        took.push((format!("add {replica}"), started.elapsed()));
        drop(host);
        let index = service.node_index(&replica).unwrap();
        urls.lock().await.push(service.app_url(index));
    }
    assert_eq!(service.live_nodes().len(), 5);
    // Shrink back: the leader first, then another.
    for _ in 0..2 {
        let (leader, _) = service.leader().await.expect("a leader");
        let leaving = service.node_name(leader).to_owned();
        let cluster = service.membership_cluster().unwrap();
        let host = LocalReplicaHost::new(&mut service, |n| recorded.lock().unwrap().push(n));
        let started = Instant::now();
        Membership::new("members", cluster, &host, options.clone(), &progress)
            .change(ChangeKind::Remove { replica: leaving.clone() })
            .await
            .unwrap_or_else(|e| panic!("removing {leaving}: {e}\n{}", lines.lock().unwrap().join("\n")));
        took.push((format!("remove {leaving} (the leader)"), started.elapsed()));
        drop(host);
        let url = service.app_url(leader);
        urls.lock().await.retain(|u| *u != url);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let acknowledged = sender.await.unwrap();
    assert_eq!(*recorded.lock().unwrap(), [4, 5, 4, 3]);
    let live = service.live_nodes();
    assert_eq!(live.len(), 3);
    assert!(acknowledged.len() > 20, "only {} requests went through", acknowledged.len());

    // Every live replica converges on the same log, holding every acknowledged request once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs: Vec<Vec<(u64, Option<u64>)>> = live
            .iter()
            .map(|&i| {
                br2k_logserver::read_log(&service.app_data_dir(i))
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.index, e.seq))
                    .collect()
            })
            .collect();
        let statuses = service.statuses().await;
        let leaders = live.iter().filter(|&&i| statuses[i].as_ref().is_ok_and(|s| s.role == Role::Leader)).count();
        if leaders == 1 && logs.iter().all(|l| *l == logs[0]) && logs[0].len() >= acknowledged.len() {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "the live replicas did not converge: {:?}",
            logs.iter().map(Vec::len).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let seqs: Vec<u64> = logs[0].iter().filter_map(|(_, seq)| *seq).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(seqs.len(), unique.len(), "a request was applied twice");
    let lost: Vec<&u64> = acknowledged.difference(&unique).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    eprintln!("{} requests acknowledged; {took:?}", acknowledged.len());
    service.shutdown().await;
}
