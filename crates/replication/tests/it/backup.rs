//! Backups: the leader pushes the service's state to a real OCI registry and records each
//! backup on a real chain; a registry that goes down never stops the service.

use std::sync::Arc;
use std::time::Duration;

use br2k_oci::registry::RegistryClient;
use br2k_replication::SnapshotPolicy;
use br2k_replication::backup::{
    BACKUP_TYPE, BackupConfig, BackupManifest, Retention, SegmentEntry, SigningDomain, backup_tag, retention,
};
use br2k_replication::{ProcessState, RequestKind};
use br2k_test_utils::{EtcdCluster, OciRegistry};

use crate::harness::{Cluster, SERVICE, eventually};

const REPOSITORY: &str = "br2k/journal";

/// The backup `digest`'s manifest, read and checked.
async fn manifest_of(client: &RegistryClient, digest: &str) -> BackupManifest {
    let oci = client.pull_artifact_manifest(REPOSITORY, digest, &[BACKUP_TYPE]).await.unwrap();
    BackupManifest::from_oci(&oci).unwrap()
}

/// The journal a backup holds: its snapshot's entries, then the Replication requests
/// that succeeded after it.
async fn restored_journal(client: &RegistryClient, digest: &str) -> Vec<(u64, String)> {
    let backup = manifest_of(client, digest).await;
    let mut journal: Vec<(u64, String)> = Vec::new();
    if let Some(state) = &backup.state {
        let bytes = client.fetch_blob(REPOSITORY, &state.blob.digest, state.blob.size).await.unwrap();
        journal = serde_json::from_slice(br2k_replication::snapshot_app_bytes(&bytes).unwrap()).unwrap();
    }
    for segment in &backup.segments {
        let bytes = client.fetch_blob(REPOSITORY, &segment.blob.digest, segment.blob.size).await.unwrap();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let entry: SegmentEntry = serde_json::from_slice(line).unwrap();
            let replicated = entry.state.kind == RequestKind::Replication && entry.state.state == ProcessState::Success;
            if replicated && entry.index >= backup.log_from {
                journal.push((entry.index, String::from_utf8(entry.request.body).unwrap()));
            }
        }
    }
    journal
}

/// Three replicas on a chain that back up every second into `oci` (with `credentials`),
/// snapshotting every 10 entries; every backup recorded on chain.
pub(crate) async fn backed_up_cluster(
    oci: &OciRegistry,
    credentials: Option<br2k_oci::registry::Credentials>,
) -> Cluster {
    backed_up_cluster_with(oci, credentials, |_| {}, SnapshotPolicy { interval: 10, trailing: 5 }).await
}

/// Three replicas on a chain that back up into `oci` as `schedule` changes the default
/// (every second, each recorded on chain, the last 48 kept).
async fn backed_up_cluster_with(
    oci: &OciRegistry,
    credentials: Option<br2k_oci::registry::Credentials>,
    schedule: impl FnOnce(&mut BackupConfig),
    snapshots: SnapshotPolicy,
) -> Cluster {
    let mut cluster = Cluster::new(true).await;
    let registry = Arc::new(RegistryClient::new(&oci.url(), true, credentials).unwrap());
    let mut config = BackupConfig {
        interval: Duration::from_secs(1),
        record_interval: Duration::from_secs(1),
        ..BackupConfig::new(registry, REPOSITORY)
    };
    schedule(&mut config);
    cluster.backup = Some(config);
    cluster.with_replicas(snapshots).await
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

/// Waits until the leader's newest backup (signed, maybe not recorded) reaches `index`;
/// returns its status.
async fn backed_up_to(c: &Cluster, index: u64) -> br2k_replication::backup::BackupStatus {
    eventually("the leader's newest backup reaches the last request", async || {
        c.statuses().iter().any(|s| s.role == br2k_replication::Role::Leader && s.backup.index >= index)
    })
    .await;
    c.statuses().into_iter().find(|s| s.role == br2k_replication::Role::Leader).unwrap().backup
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
    // The newest backup, which a restore would use: no request comes after it.
    let digest = backed_up_to(&c, expected.last().unwrap().0).await.digest.unwrap();
    // Stop backups (a new leader would push a new one), then alter the newest one's last
    // segment in the registry's storage.
    for i in 0..3 {
        c.replicas[i].crash();
    }
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let backup = manifest_of(&client, &digest).await;
    let segment = backup.segments.last().unwrap();
    let hex = segment.blob.digest.trim_start_matches("sha256:").to_owned();
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
    assert!(logged.contains("backup recorded on chain"), "the logs were captured");
    assert!(!logged.contains(PASSWORD), "the password is in the logs");
    let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("backup-bot:{PASSWORD}"));
    assert!(!logged.contains(&basic), "the Authorization header is in the logs");
}

/// Asks the leader for a backup now (recorded on chain too) and waits until the chain
/// records one reaching `index`; its manifest digest.
async fn back_up_now(c: &Cluster, index: u64) -> String {
    ask_for_backup(c).await;
    recorded_reaching(c, index).await.1
}

/// Asks the leader for a backup now with the admin token, as `br2k backup now` does:
/// after the `Retry-After` it is told when one was asked for within the interval.
pub(crate) async fn ask_for_backup(c: &Cluster) {
    for _ in 0..10 {
        let l = c.leader(None).await;
        let url = format!("{}/br2k/backup", c.replicas[l].url);
        let answer = c.http.post(&url).bearer_auth(crate::harness::ADMIN_TOKEN).send().await.unwrap();
        match answer.status().as_u16() {
            202 => return,
            429 => {
                let wait: u64 = answer.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            503 => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("POST /br2k/backup answered {other}: {}", answer.text().await.unwrap()),
        }
    }
    panic!("the leader never took the backup request");
}

/// The bytes of the manifest `tag` of the repository names.
async fn manifest_bytes(client: &RegistryClient, tag: &str) -> u64 {
    let digest = client.manifest_digest(REPOSITORY, tag).await.unwrap();
    let media = br2k_oci::image::media_type::MANIFEST;
    client.fetch_manifest(REPOSITORY, &digest, media, "").await.unwrap().len() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_uploads_only_the_entries_since_the_last_one() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let hourly = |b: &mut BackupConfig| {
        b.interval = Duration::from_secs(3600);
        b.record_interval = Duration::from_secs(3600);
        b.on_demand_spacing = Some(Duration::from_secs(1));
    };
    let c = backed_up_cluster_with(&oci, None, hourly, SnapshotPolicy { interval: 1000, trailing: 100 }).await;
    let first = c.load().append_many("i", 20, 4).await;
    let d1 = back_up_now(&c, first.last().unwrap().0).await;
    let before = oci.blob_bytes();

    let more = c.load().append_many("j", 10, 2).await;
    let d2 = back_up_now(&c, more.last().unwrap().0).await;
    let grown = oci.blob_bytes() - before;

    let (b1, b2) = (manifest_of(&client, &d1).await, manifest_of(&client, &d2).await);
    assert_eq!(b2.previous.as_deref(), Some(d1.as_str()), "a backup names the one before it");
    assert_eq!(b2.segments[..b1.segments.len()], b1.segments[..], "the earlier segments are named, not sent again");
    let new = b2.segments.last().unwrap();
    assert_eq!((new.from, new.to), (b1.index + 1, b2.index), "one new segment: the 10 entries since the last backup");
    let manifest = manifest_bytes(&client, &backup_tag(SERVICE, b2.index)).await;
    assert!(b2.signed.is_some(), "the leader signed it");
    assert_eq!(grown, new.blob.size + manifest, "the registry grew by the new segment and a small manifest");
    let whole = b2.segments.iter().map(|s| s.blob.size).sum::<u64>();
    assert!(new.blob.size * 2 < whole, "10 of 30 entries' bytes, not the whole log: {} of {whole}", new.blob.size);
    assert_eq!(restored_journal(&client, &d2).await, first.into_iter().chain(more).collect::<Vec<_>>());
    eprintln!(
        "registry growth for a backup of 10 new entries: {grown} bytes ({} segment + {manifest} manifest); the \
         whole log since the snapshot (what each backup used to send): {whole} bytes",
        new.blob.size
    );
}

/// The backup indexes the repository's tags name, and whether each is signed.
async fn backups_in(client: &RegistryClient) -> Vec<(u64, bool)> {
    let tags = client.tags(REPOSITORY).await.unwrap();
    let mut backups = Vec::new();
    for index in tags.iter().filter_map(|t| br2k_replication::backup::manifest::tag_index(SERVICE, t)) {
        // Retention may delete a backup between the listing and this read: it is gone.
        let Ok(digest) = client.manifest_digest(REPOSITORY, &backup_tag(SERVICE, index)).await else { continue };
        let Ok(oci) = client.pull_artifact_manifest(REPOSITORY, &digest, &[BACKUP_TYPE]).await else { continue };
        backups.push((index, BackupManifest::from_oci(&oci).unwrap().signed.is_some()));
    }
    backups.sort_unstable();
    backups
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_deletes_what_its_policy_does_not_keep_never_the_anchor_and_gc_frees_their_blobs() {
    let mut oci =
        OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let keep_four = |b: &mut BackupConfig| {
        b.interval = Duration::from_secs(3600);
        b.record_interval = Duration::from_secs(3600);
        b.on_demand_spacing = Some(Duration::from_secs(1));
        b.retention = Retention { keep_last: 4, keep_daily: 0 };
    };
    let mut c = backed_up_cluster_with(&oci, None, keep_four, SnapshotPolicy { interval: 10, trailing: 5 }).await;
    let mut indexes = Vec::new();
    for round in 0..6 {
        let appended = c.load().append_many(&format!("r{round}-"), 3, 1).await;
        let index = appended.last().unwrap().0;
        back_up_now(&c, index).await;
        indexes.push(index);
    }
    // The leader prunes after each backup it records: the newest four stay, signed.
    let newest: Vec<(u64, bool)> = indexes[2..].iter().map(|i| (*i, true)).collect();
    eventually("the leader's retention keeps the newest four", async || backups_in(&client).await == newest).await;
    for i in 0..3 {
        c.replicas[i].crash();
    }

    // With the anchor at the oldest of them, keeping one keeps the anchor and what follows.
    let mut created = std::collections::BTreeMap::new();
    let lenient = Retention { keep_last: 1, keep_daily: 0 };
    let pruned = retention::prune(&client, REPOSITORY, SERVICE, lenient, indexes[2], &mut created).await.unwrap();
    assert_eq!((pruned.kept, pruned.deleted), (4, 0), "the anchor and everything after it stay");
    let strict = Retention { keep_last: 2, keep_daily: 0 };
    let pruned = retention::prune(&client, REPOSITORY, SERVICE, strict, indexes[5], &mut created).await.unwrap();
    assert_eq!((pruned.kept, pruned.deleted), (2, 2));
    assert_eq!(backups_in(&client).await, vec![(indexes[4], true), (indexes[5], true)]);

    // The registry's own garbage collection frees what only deleted backups named: what
    // stays is exactly the kept backups' blobs and manifests.
    let before = oci.blob_bytes();
    oci.garbage_collect().unwrap();
    let after = oci.blob_bytes();
    let mut referenced = std::collections::BTreeMap::new();
    let mut manifests = 0;
    for index in [indexes[4], indexes[5]] {
        let digest = client.manifest_digest(REPOSITORY, &backup_tag(SERVICE, index)).await.unwrap();
        for blob in manifest_of(&client, &digest).await.to_oci().layers {
            referenced.insert(blob.digest, blob.size);
        }
        manifests += manifest_bytes(&client, &backup_tag(SERVICE, index)).await;
    }
    let config = br2k_oci::artifact::EMPTY_CONFIG.len() as u64;
    let bound = referenced.values().sum::<u64>() + manifests + config;
    assert!(after < before, "garbage collection freed the deleted backups' blobs: {before} -> {after}");
    assert_eq!(after, bound, "the registry holds exactly what the kept backups name");
    eprintln!("registry blobs: {before} bytes before garbage collection, {after} after (2 backups kept)");
    drop(c);
}

/// A segment of `count` entries after `after`, made from `template` (a real entry) with
/// `text` bodies.
fn forged_segment(template: &SegmentEntry, after: u64, count: u64, text: &str) -> Vec<u8> {
    let mut lines = Vec::new();
    for n in 1..=count {
        let mut entry = template.clone();
        entry.index = after + n;
        entry.request.body = format!("{text}{n}").into_bytes();
        lines.extend(serde_json::to_vec(&entry).unwrap());
        lines.push(b'\n');
    }
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_takes_the_newest_signed_backup_past_the_anchor_and_refuses_forged_ones() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let rarely_recorded = |b: &mut BackupConfig| b.record_interval = Duration::from_secs(3600);
    let mut c = backed_up_cluster_with(&oci, None, rarely_recorded, SnapshotPolicy { interval: 10, trailing: 5 }).await;
    let early = c.load().append_many("e", 4, 1).await;
    recorded_reaching(&c, early.last().unwrap().0).await;
    let late = c.load().append_many("l", 8, 2).await;
    let expected: Vec<_> = early.into_iter().chain(late).collect();
    let last = expected.last().unwrap().0;
    let head = backed_up_to(&c, last).await.digest.unwrap();
    let registry = c.registry.as_ref().unwrap();
    let anchor = registry.manager.backup(SERVICE).await.unwrap().unwrap();
    assert!(anchor.index < last, "the chain records an older backup ({}) than the newest ({last})", anchor.index);
    for i in 0..3 {
        c.replicas[i].crash();
    }

    // Two newer backups continue the head: one signed by a key that is no operator, one
    // signed by an operator but with a gap in its log.
    let head_manifest = manifest_of(&client, &head).await;
    let tail = head_manifest.segments.last().unwrap();
    let bytes = client.fetch_blob(REPOSITORY, &tail.blob.digest, tail.blob.size).await.unwrap();
    let template: SegmentEntry =
        serde_json::from_slice(bytes.split(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let domain = SigningDomain {
        chain_id: registry.manager.chain().chain_id(),
        registry: registry.manager.address(),
        service: br2k_resolver::service_id(SERVICE),
    };
    let forge = async |from: u64, count: u64, signer: &alloy::signers::local::PrivateKeySigner| {
        let lines = forged_segment(&template, from - 1, count, "forged");
        let annotations = std::collections::BTreeMap::from([
            ("io.br2k.segment.from".to_owned(), from.to_string()),
            ("io.br2k.segment.to".to_owned(), (from + count - 1).to_string()),
        ]);
        let (blob, _) =
            client.push_layer(REPOSITORY, br2k_replication::backup::LOG_MEDIA_TYPE, annotations, lines).await.unwrap();
        let mut forged = head_manifest.clone();
        forged.index = from + count - 1;
        forged.previous = Some(head.clone());
        forged.segments.push(br2k_replication::backup::SegmentBlob { blob, from, to: forged.index, level: 0 });
        domain.sign(signer, &mut forged).unwrap();
        client.push_artifact_manifest(REPOSITORY, &backup_tag(SERVICE, forged.index), &forged.to_oci()).await.unwrap();
    };
    let stranger = registry.anvil.key(7);
    assert!(!registry.manager.is_operator(SERVICE, stranger.address()).await.unwrap());
    forge(last + 1, 5, &stranger).await;
    let operator = registry.anvil.key(1);
    forge(last + 2, 2, &operator).await;

    disaster(&mut c).await;
    c.converged(&expected).await;
    let after = c.post_to_leader("/append", "after", Some("k-after")).await;
    assert_eq!(after.status(), 200);
    assert_eq!(
        after.headers()["br2k-index"].to_str().unwrap(),
        (last + 1).to_string(),
        "restored to the newest signed backup ({last}), past the anchor ({}), not to a forged one",
        anchor.index
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn segments_merge_as_they_pile_up_and_a_restore_reads_through_the_merges() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let pairs = |b: &mut BackupConfig| {
        b.interval = Duration::from_secs(3600);
        b.record_interval = Duration::from_secs(3600);
        b.merge_fanout = 2;
        b.on_demand_spacing = Some(Duration::from_secs(1));
    };
    let mut c = backed_up_cluster_with(&oci, None, pairs, SnapshotPolicy { interval: 1000, trailing: 100 }).await;
    let mut expected = Vec::new();
    let mut digest = String::new();
    for round in 0..5 {
        expected.extend(c.load().append_many(&format!("m{round}-"), 2, 1).await);
        digest = back_up_now(&c, expected.last().unwrap().0).await;
    }
    // Five backups with a fan-out of two: 101 in binary, a segment of four backups'
    // entries merged twice, and the fifth's own.
    let backup = manifest_of(&client, &digest).await;
    let shape: Vec<(u64, u64, u32)> = backup.segments.iter().map(|s| (s.from, s.to, s.level)).collect();
    assert_eq!(shape, vec![(1, 8, 2), (9, 10, 0)], "{shape:?}");
    assert_eq!(restored_journal(&client, &digest).await, expected);

    disaster(&mut c).await;
    c.converged(&expected).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_continues_the_chain_and_records_nothing_until_the_interval_passes() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let rarely_recorded = |b: &mut BackupConfig| b.record_interval = Duration::from_secs(3600);
    let c = backed_up_cluster_with(&oci, None, rarely_recorded, SnapshotPolicy { interval: 1000, trailing: 100 }).await;
    let first = c.load().append_many("a", 4, 1).await;
    let (anchor, _) = recorded_reaching(&c, first.last().unwrap().0).await;
    let more = c.load().append_many("b", 4, 1).await;
    let old_head = backed_up_to(&c, more.last().unwrap().0).await.digest.unwrap();

    let from = c.leader(None).await;
    let to = (from + 1) % 3;
    c.hand_leadership(from, to).await;
    assert_eq!(c.leader(None).await, to);
    let after = c.load().append_many("c", 4, 1).await;
    let new_head = backed_up_to(&c, after.last().unwrap().0).await.digest.unwrap();

    // The new leader's backups name the old leader's newest: one chain, linked to the anchor.
    let mut at = manifest_of(&client, &new_head).await;
    let mut walked = vec![at.index];
    while at.previous.as_deref() != Some(old_head.as_str()) {
        let previous = at.previous.clone().expect("the chain reaches the old leader's newest backup");
        at = manifest_of(&client, &previous).await;
        walked.push(at.index);
        assert!(at.index > more.last().unwrap().0, "walked past the old head: {walked:?}");
    }
    let recorded = c.registry.as_ref().unwrap().manager.backup(SERVICE).await.unwrap().unwrap();
    assert_eq!(recorded.index, anchor.index, "a leader change records nothing on chain by itself");
    let all: Vec<_> = first.into_iter().chain(more).chain(after).collect();
    assert_eq!(restored_journal(&client, &new_head).await, all);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chain_catches_up_with_an_idle_services_newest_backup_within_a_record_interval() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let every_three = |b: &mut BackupConfig| b.record_interval = Duration::from_secs(3);
    let c = backed_up_cluster_with(&oci, None, every_three, SnapshotPolicy { interval: 1000, trailing: 100 }).await;
    let first = c.load().append_many("x", 2, 1).await;
    recorded_reaching(&c, first.last().unwrap().0).await;
    // Requests then stop: the newest backup is signed at once, recorded once the interval
    // has passed, and nothing more after that.
    let last = c.load().append_many("y", 6, 2).await.last().unwrap().0;
    let newest = backed_up_to(&c, last).await;
    let (recorded, digest) = recorded_reaching(&c, last).await;
    assert_eq!((recorded.index, Some(digest)), (newest.index, newest.digest));
    // The chain shows the second record a moment before the leader's status counts it.
    eventually("the leader's status counts the second anchor", async || {
        c.statuses().iter().any(|s| {
            s.role == br2k_replication::Role::Leader
                && s.backup.anchor.index >= recorded.index
                && s.backup.anchor.count >= 2
        })
    })
    .await;
    let leader = c.statuses().into_iter().find(|s| s.role == br2k_replication::Role::Leader).unwrap();
    assert!(leader.backup.anchor.gas_per_day > 0, "a second anchor gives the estimate: {:?}", leader.backup.anchor);
    let count = leader.backup.anchor.count;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let leader = c.statuses().into_iter().find(|s| s.role == br2k_replication::Role::Leader).unwrap();
    assert_eq!(leader.backup.anchor.count, count, "an idle service records nothing more");
}

/// The registry as a leaked operator key (the key of replica `i`) sees it.
async fn as_operator(c: &Cluster, i: usize) -> br2k_resolver::RegistryClient {
    let registry = c.registry.as_ref().unwrap();
    let chain = br2k_resolver::Chain::connect(
        &registry.anvil.endpoint(),
        Some(registry.anvil.key(i)),
        crate::harness::timeouts(),
    )
    .await
    .unwrap();
    chain.registry(registry.manager.address()).await.unwrap()
}

/// The value of the gauge `name` in a replica's metrics text.
fn gauge(metrics: &str, name: &str) -> f64 {
    let line = metrics
        .lines()
        .find(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .unwrap_or_else(|| panic!("no {name} in the metrics"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// What replica `i` answers on `path`, as text.
async fn text_of(c: &Cluster, i: usize, path: &str) -> String {
    c.http.get(format!("{}{path}", c.replicas[i].url)).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_index_pinned_on_chain_by_a_leaked_key_raises_an_alert_is_never_adopted_and_reset_clears_it() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let c = backed_up_cluster(&oci, None).await;
    let first = c.load().append_many("p", 5, 1).await;
    recorded_reaching(&c, first.last().unwrap().0).await;

    // A leaked operator key records an index no leader can exceed.
    let leaked = as_operator(&c, 1).await;
    let fake = format!("{}/{REPOSITORY}@sha256:{}", oci.host(), "ab".repeat(32));
    leaked.record_backup(SERVICE, u64::MAX, alloy::primitives::B256::repeat_byte(0xab), &fake).await.unwrap();
    c.load().append_many("q", 4, 1).await;
    let l = c.leader(None).await;
    eventually("the leader raises the alert", async || c.replicas[l].status().backup.alert.is_some()).await;
    let alert = c.replicas[l].status().backup.alert.unwrap();
    assert!(alert.contains("18446744073709551615") && alert.contains("br2k backup reset"), "{alert}");
    assert_eq!(gauge(&text_of(&c, l, "/metrics").await, "br2k_backup_alert"), 1.0, "the metric says so");
    let health: serde_json::Value = serde_json::from_str(&text_of(&c, l, "/br2k/health").await).unwrap();
    assert_eq!(health["healthy"], true, "it still serves: {health}");
    assert!(health["warning"].as_str().unwrap().contains("above the service's"), "{health}");

    // A new leader does not adopt the pinned index: it backs up what it holds and alerts.
    let n = (l + 1) % 3;
    c.hand_leadership(l, n).await;
    let after = c.load().append_many("r", 3, 1).await;
    let last = after.last().unwrap().0;
    let status = backed_up_to(&c, last).await;
    assert!(status.index <= c.replicas[n].status().ssi, "never the chain's {} as its own", u64::MAX);
    eventually("the new leader raises the alert", async || c.replicas[n].status().backup.alert.is_some()).await;

    // The manager clears the record: the leader records again and the alert goes.
    c.registry.as_ref().unwrap().manager.reset_backup(SERVICE).await.unwrap();
    let cleared = c.load().append_many("s", 3, 1).await;
    let (recorded, _) = recorded_reaching(&c, cleared.last().unwrap().0).await;
    assert!(recorded.index < u64::MAX && recorded.artifact != fake);
    eventually("the alert clears", async || c.replicas[n].status().backup.alert.is_none()).await;
    assert_eq!(gauge(&text_of(&c, n, "/metrics").await, "br2k_backup_alert"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_refuses_a_backup_recorded_in_another_repository_of_the_same_registry() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let mut c = backed_up_cluster(&oci, None).await;
    let expected = c.load().append_many("o", 6, 2).await;
    let last = expected.last().unwrap().0;
    let (_, digest) = recorded_reaching(&c, last).await;
    for i in 0..3 {
        c.replicas[i].crash();
    }
    // On the shared registry, someone pushes a restorable backup of their own making to a
    // repository of theirs, and a leaked operator key records it.
    const EVIL: &str = "someone/else";
    let real = manifest_of(&client, &digest).await;
    let mut forged = real.clone();
    for blob in forged.state.iter().map(|s| &s.blob).chain(forged.segments.iter().map(|s| &s.blob)) {
        let bytes = client.fetch_blob(REPOSITORY, &blob.digest, blob.size).await.unwrap();
        client.push_layer(EVIL, &blob.media_type, blob.annotations.clone(), bytes.to_vec()).await.unwrap();
    }
    let tail = real.segments.last().unwrap();
    let bytes = client.fetch_blob(REPOSITORY, &tail.blob.digest, tail.blob.size).await.unwrap();
    let template: SegmentEntry =
        serde_json::from_slice(bytes.split(|b| *b == b'\n').find(|l| !l.is_empty()).unwrap()).unwrap();
    let lines = forged_segment(&template, last, 3, "planted");
    let annotations = std::collections::BTreeMap::from([
        ("io.br2k.segment.from".to_owned(), (last + 1).to_string()),
        ("io.br2k.segment.to".to_owned(), (last + 3).to_string()),
    ]);
    let (blob, _) =
        client.push_layer(EVIL, br2k_replication::backup::LOG_MEDIA_TYPE, annotations, lines).await.unwrap();
    forged.segments.push(br2k_replication::backup::SegmentBlob { blob, from: last + 1, to: last + 3, level: 0 });
    forged.index = last + 3;
    forged.previous = Some(digest.clone());
    forged.signed = None;
    let planted = client.push_artifact_manifest(EVIL, "planted", &forged.to_oci()).await.unwrap();
    let hash: alloy::primitives::B256 = planted.trim_start_matches("sha256:").parse().unwrap();
    let artifact = format!("{}/{EVIL}@{planted}", oci.host());
    as_operator(&c, 1).await.record_backup(SERVICE, forged.index, hash, &artifact).await.unwrap();

    disaster(&mut c).await;
    eventually("a replica refuses the backup in another repository", async || {
        c.statuses()
            .iter()
            .any(|s| s.last_error.as_deref().is_some_and(|e| e.contains("not in the service's backup repository")))
    })
    .await;
    assert!(c.statuses().iter().all(|s| s.role != br2k_replication::Role::Leader), "nothing serves from it");
    assert!(c.replicas.iter().all(|r| r.state.entries().is_empty()), "no replica restored anything from it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_checks_what_a_backup_would_leave_before_it_changes_anything() {
    let oci = OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&oci.url(), true, None).unwrap();
    let mut c = backed_up_cluster(&oci, None).await;
    let expected = c.load().append_many("w", 25, 4).await;
    let (_, digest) = recorded_reaching(&c, expected.last().unwrap().0).await;
    for i in 0..3 {
        c.replicas[i].crash();
    }
    // A backup whose snapshot reaches past the index it claims (its parts fit otherwise:
    // no segment, the log starting right after the snapshot), recorded on chain by a
    // leaked operator key once the manager's reset let any index through.
    let real = manifest_of(&client, &digest).await;
    let state = real.state.clone().expect("the backup carries a snapshot");
    let mut forged = real.clone();
    forged.index = state.index - 3;
    forged.segments.clear();
    forged.signed = None;
    forged.check().expect("it fits, as far as its own parts go");
    let planted = client.push_artifact_manifest(REPOSITORY, "planted", &forged.to_oci()).await.unwrap();
    let hash: alloy::primitives::B256 = planted.trim_start_matches("sha256:").parse().unwrap();
    let registry = c.registry.as_ref().unwrap();
    registry.manager.reset_backup(SERVICE).await.unwrap();
    let artifact = format!("{}/{REPOSITORY}@{planted}", oci.host());
    as_operator(&c, 1).await.record_backup(SERVICE, forged.index, hash, &artifact).await.unwrap();

    disaster(&mut c).await;
    eventually("a replica refuses the backup before restoring any of it", async || {
        c.statuses().iter().any(|s| s.last_error.as_deref().is_some_and(|e| e.contains("past its own")))
    })
    .await;
    assert!(c.statuses().iter().all(|s| s.role != br2k_replication::Role::Leader), "nothing serves from it");
    assert!(c.replicas.iter().all(|r| r.state.entries().is_empty()), "no replica's state was touched");
}
