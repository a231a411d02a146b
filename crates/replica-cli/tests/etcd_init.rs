//! The etcd init step against real etcd members started from the configuration files it
//! writes, with TLS as on Kubernetes: founding the cluster, keeping a member's data, and
//! replacing a member whose volume was lost (remove, add, start `existing`). Runs on
//! Debian's etcd 3.4 by default and on 3.5 with `BR2K_ETCD_BIN=tools/.venv/bin/etcd-3.5`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use br2k_deploy::etcd_tls::{EtcdCertificates, EtcdTlsFiles};
use br2k_replica_cli::etcd_init::{Decision, EtcdInit};
use br2k_replication::EtcdTls;
use br2k_test_utils::{KillOnDrop, etcd_binary, free_loopback_ports};

const QUOTA: u64 = 96 * 1024 * 1024;

/// One member: its ports, directories, certificate and (while it runs) its process.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    metrics: u16,
    dir: PathBuf,
    tls: EtcdTlsFiles,
    process: Option<KillOnDrop>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client)
    }
    fn peer_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.peer)
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    fn config_file(&self) -> PathBuf {
        self.dir.join("scratch/etcd.json")
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    members: Vec<Member>,
    hint: PathBuf,
}

impl Cluster {
    fn new(size: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_loopback_ports(3 * size).unwrap();
        let certificates = EtcdCertificates::make("svc", &vec![vec!["127.0.0.1".to_owned()]; size]).unwrap();
        let members = (0..size)
            .map(|i| {
                let member_dir = dir.path().join(format!("svc-{}", i + 1));
                std::fs::create_dir_all(member_dir.join("tls")).unwrap();
                Member {
                    name: format!("svc-{}", i + 1),
                    client: ports[3 * i],
                    peer: ports[3 * i + 1],
                    metrics: ports[3 * i + 2],
                    tls: certificates.write_member(i, &member_dir.join("tls")).unwrap(),
                    dir: member_dir,
                    process: None,
                }
            })
            .collect();
        let hint = dir.path().join("etcd-cluster-state");
        std::fs::write(&hint, "new").unwrap();
        Self { _dir: dir, members, hint }
    }

    /// Member `i`'s init step, as the manifest gives it its flags.
    fn init(&self, i: usize, wait: Duration) -> EtcdInit {
        let m = &self.members[i];
        let initial_cluster =
            self.members.iter().map(|o| format!("{}={}", o.name, o.peer_url())).collect::<Vec<_>>().join(",");
        let mut flags: BTreeMap<String, String> = [
            ("name", m.name.clone()),
            ("data-dir", m.data_dir().display().to_string()),
            ("listen-client-urls", m.client_url()),
            ("advertise-client-urls", m.client_url()),
            ("listen-peer-urls", m.peer_url()),
            ("initial-advertise-peer-urls", m.peer_url()),
            ("listen-metrics-urls", format!("http://127.0.0.1:{}", m.metrics)),
            ("initial-cluster", initial_cluster),
            ("initial-cluster-token", "svc".into()),
            ("pre-vote", "true".into()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        // The flags the backends give every member, and TLS as on Kubernetes.
        for flag in br2k_replication::etcd_flags::with_quota(QUOTA).into_iter().chain(m.tls.etcd_flags()) {
            let (name, value) = flag.trim_start_matches("--").split_once('=').unwrap();
            flags.insert(name.to_owned(), value.to_owned());
        }
        EtcdInit {
            flags,
            peers: self.members.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, o)| o.client_url()).collect(),
            bootstrap_file: self.hint.clone(),
            wait,
        }
    }

    /// Runs member `i`'s init step, starts etcd from the file it wrote, and returns the decision.
    async fn init_and_start(&mut self, i: usize) -> Decision {
        let init = self.init(i, Duration::from_secs(60));
        let decision = init.decide().await.unwrap();
        init.write_config(&self.members[i].config_file(), &decision).unwrap();
        self.start(i);
        decision
    }

    fn start(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::File::options().create(true).append(true).open(m.dir.join("etcd.log")).unwrap();
        let child = Command::new(etcd_binary().expect("etcd is installed (run `bash tools/setup.sh`)"))
            .arg(format!("--config-file={}", m.config_file().display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        m.process = Some(KillOnDrop(child));
    }

    fn kill(&mut self, i: usize) {
        drop(self.members[i].process.take());
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].dir.join("etcd.log")).unwrap_or_default()
    }

    async fn client(&self, i: usize) -> etcd_client::Client {
        let m = &self.members[i];
        let tls = EtcdTls { ca: m.tls.ca.clone(), cert: m.tls.cert.clone(), key: m.tls.key.clone() };
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(2))
            .with_tls(tls.options().unwrap());
        etcd_client::Client::connect([m.client_url()], Some(options)).await.unwrap()
    }

    /// Waits until member `i` serves a linearizable read of `key` with `value`.
    async fn wait_serves(&self, i: usize, key: &str, value: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(3), async {
                let mut client = self.client(i).await;
                client.get(key, None).await
            })
            .await;
            if let Ok(Ok(answer)) = answer
                && answer.kvs().first().is_some_and(|kv| kv.value() == value.as_bytes())
            {
                return;
            }
            assert!(Instant::now() < deadline, "member {} never served {key}; its log:\n{}", i + 1, self.log(i));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn members(&self, i: usize) -> Vec<(u64, String, Vec<String>)> {
        let mut client = self.client(i).await;
        let list = client.member_list().await.unwrap();
        list.members().iter().map(|m| (m.id(), m.name().to_owned(), m.peer_urls().to_vec())).collect()
    }

    fn id_of(members: &[(u64, String, Vec<String>)], peer_url: &str) -> Option<u64> {
        members.iter().find(|(_, _, urls)| urls.iter().any(|u| u == peer_url)).map(|(id, _, _)| *id)
    }
}

/// What etcd's metrics listener says `metric` is.
fn metric(metrics_port: u16, metric: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.lines().find_map(|line| line.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_keeps_its_data_and_one_whose_volume_was_lost_is_replaced_by_a_new_member() {
    let mut cluster = Cluster::new(3);

    // The first deploy: nobody answers yet and the hint says `new`.
    for i in 0..3 {
        assert_eq!(cluster.init_and_start(i).await, Decision::New);
    }
    let mut client = cluster.client(0).await;
    let put = async {
        loop {
            if client.put("k", "v1", None).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), put).await.expect("the founded cluster takes a write");
    for i in 0..3 {
        cluster.wait_serves(i, "k", "v1").await;
    }
    // The file's settings took effect (etcd ignores keys it does not know): the quota,
    // the metrics listener, and TLS on the client port (the client above used it).
    for m in &cluster.members {
        assert_eq!(metric(m.metrics, "etcd_server_quota_backend_bytes"), Some(QUOTA as f64), "{}", m.name);
    }
    let plain = format!("http://127.0.0.1:{}", cluster.members[0].client);
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        let mut client = etcd_client::Client::connect([plain.as_str()], None).await?;
        client.get("k", None).await
    })
    .await;
    assert!(!matches!(refused, Ok(Ok(_))), "the client port answers without TLS");
    // The service has had a leader: the deployment's hint now says the cluster exists.
    std::fs::write(&cluster.hint, "existing").unwrap();
    let founded = cluster.members(0).await;

    // A restarted member keeps its data and its ID.
    cluster.kill(1);
    assert_eq!(cluster.init_and_start(1).await, Decision::Keep);
    cluster.wait_serves(1, "k", "v1").await;
    assert_eq!(cluster.members(1).await, founded);

    // A member whose volume was lost: removed, added anew (a new ID), started `existing`,
    // and brought up to date by the others.
    cluster.kill(2);
    std::fs::remove_dir_all(cluster.members[2].data_dir()).unwrap();
    let Decision::Join { initial_cluster } = cluster.init_and_start(2).await else { panic!("not a join") };
    for m in &cluster.members {
        assert!(initial_cluster.contains(&format!("{}={}", m.name, m.peer_url())), "{initial_cluster}");
    }
    cluster.wait_serves(2, "k", "v1").await;
    let replaced = cluster.members(0).await;
    let peer_url = cluster.members[2].peer_url();
    assert_eq!(replaced.len(), 3, "{replaced:?}");
    assert_ne!(
        Cluster::id_of(&replaced, &peer_url),
        Cluster::id_of(&founded, &peer_url),
        "the lost member's ID is reused"
    );

    // Lost again, and this time its init step stops after adding it (the Pod deleted
    // before etcd started): the next run joins as that added member, adding none more.
    cluster.kill(2);
    std::fs::remove_dir_all(cluster.members[2].data_dir()).unwrap();
    let init = cluster.init(2, Duration::from_secs(60));
    let first = init.decide().await.unwrap();
    let added = cluster.members(0).await;
    assert_eq!(added.len(), 3, "{added:?}");
    let again = init.decide().await.unwrap();
    assert_eq!(again, first, "the second run joins as the member the first added");
    assert_eq!(cluster.members(0).await, added, "the second run changed the membership");
    init.write_config(&cluster.members[2].config_file(), &again).unwrap();
    cluster.start(2);
    let mut client = cluster.client(0).await;
    client.put("k", "v2", None).await.unwrap();
    for i in 0..3 {
        cluster.wait_serves(i, "k", "v2").await;
    }
}

#[tokio::test]
async fn a_member_with_no_data_never_founds_a_second_cluster_once_the_service_exists() {
    let cluster = Cluster::new(3);
    std::fs::write(&cluster.hint, "existing").unwrap();
    let started = Instant::now();
    let error = cluster.init(0, Duration::from_secs(2)).decide().await.unwrap_err().to_string();
    assert!(started.elapsed() >= Duration::from_secs(2), "it gave up before its wait");
    assert!(error.contains("could not join its cluster"), "{error}");
    assert!(error.contains("restore the service from its backup"), "{error}");
    for peer in &cluster.members[1..] {
        assert!(error.contains(&peer.client_url()), "the error names {}: {error}", peer.client_url());
    }

    std::fs::write(&cluster.hint, "maybe").unwrap();
    let error = cluster.init(0, Duration::from_secs(1)).decide().await.unwrap_err().to_string();
    assert!(error.contains("expected new or existing"), "{error}");
    assert!(!Path::new(&cluster.members[0].config_file()).exists());
}
