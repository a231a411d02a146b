//! Backups: the leader pushes the service's state to a real OCI registry and records each
//! backup on a real chain; a registry that goes down never stops the service.

use std::sync::Arc;
use std::time::Duration;

use br2k_oci::registry::RegistryClient;
use br2k_replication::SnapshotPolicy;
use br2k_replication::backup::{BACKUP_TYPE, BackupConfig, LOG_MEDIA_TYPE, STATE_MEDIA_TYPE, SegmentEntry};
use br2k_replication::{ProcessState, RequestKind};
use br2k_test_utils::{EtcdCluster, OciRegistry};

use crate::harness::{Cluster, SERVICE, eventually};

const REPOSITORY: &str = "br2k/journal";

/// The journal a backup holds: its snapshot's entries, then the Replication requests
/// that succeeded after it.
async fn restored_journal(client: &RegistryClient, digest: &str) -> Vec<(u64, String)> {
    let artifact = client.pull_artifact(REPOSITORY, digest, BACKUP_TYPE).await.unwrap();
    let mut journal: Vec<(u64, String)> = Vec::new();
    for layer in &artifact.layers {
        match layer.media_type.as_str() {
            STATE_MEDIA_TYPE => {
                journal = serde_json::from_slice(br2k_replication::snapshot_app_bytes(&layer.bytes).unwrap()).unwrap();
            }
            LOG_MEDIA_TYPE => {
                for line in layer.bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let entry: SegmentEntry = serde_json::from_slice(line).unwrap();
                    if entry.state.kind == RequestKind::Replication && entry.state.state == ProcessState::Success {
                        journal.push((entry.index, String::from_utf8(entry.request.body).unwrap()));
                    }
                }
            }
            other => panic!("unexpected layer {other}"),
        }
    }
    journal
}

/// Three replicas on a chain that back up every second into `oci` (with `credentials`),
/// snapshotting every 10 entries.
async fn backed_up_cluster(oci: &OciRegistry, credentials: Option<br2k_oci::registry::Credentials>) -> Cluster {
    let mut cluster = Cluster::new(true).await;
    cluster.backup = Some(BackupConfig {
        registry: Arc::new(RegistryClient::new(&oci.url(), true, credentials).unwrap()),
        repository: REPOSITORY.into(),
        interval: Duration::from_secs(1),
    });
    cluster.with_replicas(SnapshotPolicy { interval: 10, trailing: 5 }).await
}

/// Waits until the chain records a backup reaching `index`; returns it and its manifest
/// digest as the registry names it.
async fn recorded_reaching(c: &Cluster, index: u64) -> (br2k_resolver::RecordedBackup, String) {
    let chain = &c.registry.as_ref().unwrap().manager;
    eventually("a backup reaching the last request is recorded on chain", async || {
        chain.backup(SERVICE).await.unwrap().is_some_and(|b| b.index >= index)
    })
    .await;
    let recorded = chain.backup(SERVICE).await.unwrap().unwrap();
    let digest = format!("sha256:{}", alloy::hex::encode(recorded.digest));
    (recorded, digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_are_pushed_recorded_on_chain_and_catch_up_after_a_registry_outage() {
    let mut oci =
        OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let c = backed_up_cluster(&oci, None).await;

    let expected = c.load().append_many("b", 25, 4).await;
    let (recorded, digest) = recorded_reaching(&c, expected.last().unwrap().0).await;
    assert_eq!(recorded.artifact, format!("{}/{REPOSITORY}@{digest}", oci.host()));
    assert_eq!(restored_journal(&client, &digest).await, expected, "the backup holds every acknowledged request");

    // The registry goes down: the service keeps answering, and says backups are behind.
    oci.stop();
    let l = c.leader(None).await;
    let during = c.load().append_many("c", 10, 2).await;
    eventually("the leader reports the failing backups", async || c.replicas[l].status().backup.last_error.is_some())
        .await;
    oci.start_again().unwrap();
    let (_, digest) = recorded_reaching(&c, during.last().unwrap().0).await;
    let all: Vec<_> = expected.into_iter().chain(during).collect();
    assert_eq!(restored_journal(&client, &digest).await, all);
    assert!(c.replicas[l].status().backup.last_error.is_none(), "the error clears once a backup passes");
}

/// Every replica and every etcd member lose their data; the replicas start again on an
/// empty etcd.
async fn disaster(c: &mut Cluster) {
    for i in 0..3 {
        c.wipe_replica(i);
    }
    c.etcd = EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)");
    for i in 0..3 {
        c.restart_replica(i).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_every_disk_is_lost_the_service_comes_back_from_the_backup_recorded_on_chain() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let mut c = backed_up_cluster(&oci, None).await;
    let expected = c.load().append_many("d", 25, 4).await;
    let last = expected.last().unwrap().0;
    recorded_reaching(&c, last).await;

    disaster(&mut c).await;
    let l = c.leader(None).await;
    c.converged(&expected).await;
    assert!(c.replicas[l].status().epoch.unwrap() > 0);
    // A client whose answer the disaster swallowed retries: it gets that answer again,
    // for keys in the backup's snapshot (its idempotency table) as for those in its log.
    for (index, text) in &expected {
        let key = format!("key-d-{}", text.trim_start_matches('d'));
        let retried = c.post_to_leader("/append", text, Some(&key)).await;
        assert_eq!(retried.status(), 200);
        assert_eq!(retried.headers()["br2k-replayed"], "true", "{key} answered from the restored idempotency table");
        assert_eq!(retried.headers()["br2k-index"].to_str().unwrap(), index.to_string());
    }
    let after = c.post_to_leader("/append", "after", Some("k-after")).await;
    assert_eq!(after.status(), 200);
    assert_eq!(after.headers()["br2k-index"].to_str().unwrap(), (last + 1).to_string(), "indexes go on");
    let mut all = expected.clone();
    all.push((last + 1, "after".into()));
    c.converged(&all).await;
    // Table 2's counts go on over the restore: the snapshot-covered entries too.
    let records =
        br2k_replication::inspect::read_records(&c.etcd.endpoint(l), SERVICE, Duration::from_secs(5)).await.unwrap();
    let retained = records.entries.iter().filter(|e| e.state.state == ProcessState::Success).count() as u64;
    assert_eq!(records.compacted.first_index, last + 1);
    assert_eq!(records.compacted.replication_success + retained, all.len() as u64, "{:?}", records.compacted);
    assert_eq!(records.compacted.success, last, "{:?}", records.compacted);
    assert!(records.terms >= 2, "the terms before the disaster and the one after: {}", records.terms);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_backup_is_refused_and_nothing_serves_from_it() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let mut c = backed_up_cluster(&oci, None).await;
    let expected = c.load().append_many("t", 12, 2).await;
    let (_, digest) = recorded_reaching(&c, expected.last().unwrap().0).await;
    // Stop backups (a new leader would record a new one), then alter the recorded one's
    // log in the registry's storage.
    for i in 0..3 {
        c.replicas[i].crash();
    }
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let artifact = client.pull_artifact(REPOSITORY, &digest, BACKUP_TYPE).await.unwrap();
    let log = artifact.layers.iter().find(|l| l.media_type == LOG_MEDIA_TYPE).unwrap();
    let hex = br2k_oci::image::sha256_digest(&log.bytes).trim_start_matches("sha256:").to_owned();
    let path = oci.storage().join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(&hex).join("data");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&path, bytes).unwrap();

    disaster(&mut c).await;
    eventually("a replica says the backup does not match", async || {
        c.statuses().iter().any(|s| s.last_error.as_deref().is_some_and(|e| e.contains("does not match that digest")))
    })
    .await;
    assert!(c.statuses().iter().all(|s| s.role != br2k_replication::Role::Leader), "nothing serves from it");
    assert!(c.replicas.iter().all(|r| r.state.entries().is_empty()), "no replica restored anything from it");
}

/// Collects everything the replicas log (br2k's crates at every level, the HTTP client
/// at debug), for the test that looks for credentials in it.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_credentials_never_reach_etcd_the_chain_or_a_log_line() {
    const PASSWORD: &str = "hunter2-correct-horse";
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter("br2k_replication=trace,br2k_oci=trace,br2k_resolver=debug,reqwest=debug,warn")
        .with_writer(move || writer.clone())
        .try_init()
        .expect("this test installs the only log subscriber of the test binary (unset BR2K_TEST_LOG)");
    let oci = OciRegistry::spawn(Some(("backup-bot", PASSWORD)))
        .expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let credentials =
        Some(br2k_oci::registry::Credentials { username: "backup-bot".into(), password: PASSWORD.into() });
    let c = backed_up_cluster(&oci, credentials).await;
    let expected = c.load().append_many("p", 15, 2).await;
    let (recorded, _) = recorded_reaching(&c, expected.last().unwrap().0).await;

    let mut etcd = c.etcd_client(0).await;
    let all = etcd.get("", Some(etcd_client::GetOptions::new().with_all_keys())).await.unwrap();
    for kv in all.kvs() {
        let value = String::from_utf8_lossy(kv.value());
        assert!(!value.contains(PASSWORD) && !value.contains("backup-bot"), "in etcd at {:?}", kv.key_str());
    }
    assert!(!recorded.artifact.contains(PASSWORD) && !recorded.artifact.contains("backup-bot"), "{recorded:?}");
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(logged.contains("backup pushed and recorded"), "the logs were captured");
    assert!(!logged.contains(PASSWORD), "the password is in the logs");
    let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("backup-bot:{PASSWORD}"));
    assert!(!logged.contains(&basic), "the Authorization header is in the logs");
}
