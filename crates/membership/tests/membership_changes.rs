//! Membership changes on a real etcd cluster: the fixture's three members (`m0`..`m2`)
//! and members the test host starts as a backend would (their own etcd processes,
//! joining `existing`). The replicas' apps are left out here (the backends' tests run
//! them); the catch-up gate is shown with SSI and LPI records as the runtime writes them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use br2k_membership::{
    ChangeKind, ChangeOptions, Cluster, HostError, MemberView, Membership, MembershipError, ReplicaHost, Step,
};
use br2k_test_utils::{EtcdCluster, KillOnDrop, etcd_binary, free_loopback_ports};

const SERVICE: &str = "svc";

/// A member the host started.
struct Joined {
    client: u16,
    peer: u16,
    dir: PathBuf,
    process: Option<KillOnDrop>,
}

/// The backend's part, for etcd members only.
struct Host {
    fixture: Mutex<EtcdCluster>,
    joined: Mutex<BTreeMap<String, Joined>>,
    dir: tempfile::TempDir,
    recorded: Mutex<Vec<u32>>,
    /// Starting a replica fails (a backend that cannot place it).
    refuse_start: AtomicBool,
}

impl Host {
    fn new() -> Self {
        Self {
            fixture: Mutex::new(
                EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)"),
            ),
            joined: Mutex::default(),
            dir: tempfile::tempdir().unwrap(),
            recorded: Mutex::default(),
            refuse_start: AtomicBool::new(false),
        }
    }

    fn fixture_index(&self, replica: &str) -> Option<usize> {
        let fixture = self.fixture.lock().unwrap();
        (0..fixture.len()).find(|&i| fixture.name(i) == replica)
    }

    fn cluster(&self) -> Cluster {
        Cluster { endpoints: self.fixture.lock().unwrap().endpoints(), tls: None, timeout: Duration::from_secs(2) }
    }

    fn client_url(&self, replica: &str) -> String {
        match self.fixture_index(replica) {
            Some(i) => self.fixture.lock().unwrap().endpoint(i),
            None => format!("http://127.0.0.1:{}", self.joined.lock().unwrap()[replica].client),
        }
    }

    fn running(&self, replica: &str) -> bool {
        match self.fixture_index(replica) {
            Some(i) => self.fixture.lock().unwrap().pid(i).is_some(),
            None => self.joined.lock().unwrap().get(replica).is_some_and(|j| j.process.is_some()),
        }
    }

    fn data_exists(&self, replica: &str) -> bool {
        match self.fixture_index(replica) {
            Some(i) => self.fixture.lock().unwrap().data_dir(i).exists(),
            None => self.joined.lock().unwrap().get(replica).is_some_and(|j| j.dir.exists()),
        }
    }
}

impl ReplicaHost for Host {
    fn peer_url(&self, replica: &str) -> String {
        if let Some(i) = self.fixture_index(replica) {
            return self.fixture.lock().unwrap().peer_url(i);
        }
        let mut joined = self.joined.lock().unwrap();
        let member = joined.entry(replica.to_owned()).or_insert_with(|| {
            let ports = free_loopback_ports(2).unwrap();
            Joined { client: ports[0], peer: ports[1], dir: self.dir.path().join(replica), process: None }
        });
        format!("http://127.0.0.1:{}", member.peer)
    }

    async fn start(&self, replica: &str, initial_cluster: &str) -> Result<(), HostError> {
        if self.refuse_start.load(Ordering::SeqCst) {
            return Err("no node can take it".into());
        }
        self.peer_url(replica);
        let timing = self.fixture.lock().unwrap().timing_args();
        let mut joined = self.joined.lock().unwrap();
        let member = joined.get_mut(replica).ok_or("not a replica this host made")?;
        if member.process.is_some() {
            return Ok(());
        }
        let (client, peer) =
            (format!("http://127.0.0.1:{}", member.client), format!("http://127.0.0.1:{}", member.peer));
        let log = std::fs::File::create(self.dir.path().join(format!("{replica}.log")))?;
        let child = Command::new(etcd_binary()?)
            .args(["--name", replica, "--data-dir"])
            .arg(&member.dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", initial_cluster, "--initial-cluster-state", "existing"])
            .args(timing)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        member.process = Some(KillOnDrop(child));
        Ok(())
    }

    async fn stop(&self, replica: &str) -> Result<(), HostError> {
        match self.fixture_index(replica) {
            Some(i) => {
                let mut fixture = self.fixture.lock().unwrap();
                if fixture.pid(i).is_some() {
                    fixture.kill(i)?;
                }
            }
            None => drop(self.joined.lock().unwrap().get_mut(replica).and_then(|j| j.process.take())),
        }
        Ok(())
    }

    async fn delete_data(&self, replica: &str) -> Result<(), HostError> {
        let dir = match self.fixture_index(replica) {
            Some(i) => self.fixture.lock().unwrap().data_dir(i).to_owned(),
            None => self.joined.lock().unwrap()[replica].dir.clone(),
        };
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn record_replicas(&self, replicas: u32) -> Result<(), HostError> {
        self.recorded.lock().unwrap().push(replicas);
        Ok(())
    }
}

fn options() -> ChangeOptions {
    ChangeOptions {
        step_timeout: Duration::from_secs(60),
        lock_ttl: Duration::from_secs(2),
        ..ChangeOptions::default()
    }
}

fn quiet(_: &str) {}

async fn client(url: &str) -> etcd_client::Client {
    etcd_client::Client::connect([url], None).await.unwrap()
}

/// Waits until `replica`'s own member serves `key` = `value` from its own copy.
async fn serves(host: &Host, replica: &str, key: &str, value: &str) {
    let url = host.client_url(replica);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read = async {
            let mut c = etcd_client::Client::connect([url.as_str()], None).await?;
            c.get(key, Some(etcd_client::GetOptions::new().with_serializable())).await
        };
        if let Ok(Ok(answer)) = tokio::time::timeout(Duration::from_secs(2), read).await
            && answer.kvs().first().is_some_and(|kv| kv.value() == value.as_bytes())
        {
            return;
        }
        assert!(Instant::now() < deadline, "{replica} never served {key}={value}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn voters(members: &[MemberView]) -> Vec<String> {
    let mut names: Vec<String> = members.iter().filter(|m| m.is_voter()).map(|m| m.name.clone()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_and_shrink_back_moving_leadership_off_a_leaving_leader() {
    let host = Host::new();
    let lines = Mutex::new(Vec::<String>::new());
    let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
    let membership = Membership::new(SERVICE, host.cluster(), &host, options(), &progress);
    let mut first = client(&host.client_url("m0")).await;
    first.put("k", "before", None).await.unwrap();
    // Each replica's LPI, as the runtime keeps it.
    for i in 0..5 {
        first.put(format!("/br2k/{SERVICE}/lpi/m{i}"), "0", None).await.unwrap();
    }

    for replica in ["m3", "m4"] {
        let change = membership.change(ChangeKind::Add { replica: replica.into() }).await.unwrap();
        assert_eq!(change.done.len(), ChangeKind::Add { replica: replica.into() }.steps().len());
    }
    let members = membership.members().await.unwrap();
    assert_eq!(voters(&members), ["m0", "m1", "m2", "m3", "m4"]);
    assert!(members.iter().all(|m| m.healthy && !m.learner), "{members:?}");
    serves(&host, "m4", "k", "before").await;
    assert_eq!(*host.recorded.lock().unwrap(), [4, 5]);
    assert!(membership.in_progress().await.unwrap().is_none(), "the journal is closed");
    let said = lines.lock().unwrap().join("\n");
    for step in ["add the etcd member as a learner", "catch up", "promote the learner to a voter"] {
        assert!(said.contains(step), "{step} not reported:\n{said}");
    }

    // Shrink back, the etcd leader first: leadership moves off it before it leaves.
    let leader = members.iter().find(|m| m.leader).unwrap().name.clone();
    membership.change(ChangeKind::Remove { replica: leader.clone() }).await.unwrap();
    let members = membership.members().await.unwrap();
    assert!(members.iter().all(|m| m.name != leader), "{leader} is still a member: {members:?}");
    assert!(members.iter().any(|m| m.leader), "another member leads");
    assert!(!host.running(&leader) && !host.data_exists(&leader), "{leader} is stopped and its data deleted");
    let records =
        client(&members[0].client_urls[0]).await.get(format!("/br2k/{SERVICE}/lpi/{leader}"), None).await.unwrap();
    assert!(records.kvs().is_empty(), "{leader}'s LPI record is deleted with it");
    assert!(lines.lock().unwrap().iter().any(|l| l.contains(&format!("etcd leadership moved from {leader}"))));
    let next = voters(&members).into_iter().find(|m| *m != leader).unwrap();
    membership.change(ChangeKind::Remove { replica: next }).await.unwrap();
    let members = membership.members().await.unwrap();
    assert_eq!(voters(&members).len(), 3, "{members:?}");
    assert_eq!(*host.recorded.lock().unwrap(), [4, 5, 4, 3]);
    // Still one cluster that takes writes and that every remaining member serves.
    let writer = members.iter().find(|m| m.healthy).unwrap().client_urls[0].clone();
    client(&writer).await.put("k", "after", None).await.unwrap();
    for m in &members {
        serves(&host, &m.name, "k", "after").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_changes_are_refused_and_a_stopped_one_must_be_finished_first() {
    let host = Host::new();
    let membership = Membership::new(SERVICE, host.cluster(), &host, options(), &quiet);

    let refused = membership.change(ChangeKind::Remove { replica: "m2".into() }).await.unwrap_err().to_string();
    assert!(refused.contains("fewer than 3") && refused.contains("--allow-below-3"), "{refused}");
    let refused = membership.change(ChangeKind::Remove { replica: "m9".into() }).await.unwrap_err().to_string();
    assert!(refused.contains("m9 is not a member"), "{refused}");
    let refused = membership.change(ChangeKind::Add { replica: "m1".into() }).await.unwrap_err().to_string();
    assert!(refused.contains("m1 is already a member"), "{refused}");

    // With m1 down, replacing m2 would leave m0 alone: no quorum.
    host.fixture.lock().unwrap().kill(1).unwrap();
    let refused =
        membership.change(ChangeKind::Replace { old: "m2".into(), new: "m3".into() }).await.unwrap_err().to_string();
    assert!(refused.contains("1 answer now") && refused.contains("m1"), "{refused}");
    assert!(membership.in_progress().await.unwrap().is_none(), "a refusal journals nothing");
    host.fixture.lock().unwrap().restart(1).unwrap();

    // A change the backend cannot finish stays journaled at its step ...
    host.refuse_start.store(true, Ordering::SeqCst);
    let stopped = membership.change(ChangeKind::Add { replica: "m3".into() }).await.unwrap_err();
    assert!(matches!(stopped, MembershipError::Host { step: Step::StartReplica, .. }), "{stopped}");
    let journaled = membership.in_progress().await.unwrap().unwrap();
    assert_eq!(journaled.next, Step::StartReplica);
    // ... and another one is refused until it is finished.
    let refused = membership.change(ChangeKind::Add { replica: "m4".into() }).await.unwrap_err().to_string();
    assert!(refused.contains("another membership change is in progress (add m3"), "{refused}");
    host.refuse_start.store(false, Ordering::SeqCst);
    let resumed = membership.resume().await.unwrap().unwrap();
    assert_eq!(resumed.kind, ChangeKind::Add { replica: "m3".into() });
    let members = membership.members().await.unwrap();
    assert_eq!(voters(&members), ["m0", "m1", "m2", "m3"], "the learner was added once and promoted");
}

/// Each attempt is cancelled after a longer while, anywhere in a step or between a step
/// and its journal entry, as a `kill -9` of the CLI would stop it; the next attempt
/// resumes. In the end the change is whole: one member added, a voter, recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_interrupted_anywhere_is_finished_by_the_next_run() {
    let host = Host::new();
    let membership = Membership::new(SERVICE, host.cluster(), &host, options(), &quiet);
    let kind = ChangeKind::Replace { old: "m1".into(), new: "m3".into() };
    // etcd refuses to remove a voter ("unhealthy cluster") until its peers have been
    // connected for its health interval (5 s); a cluster this new would spend the first
    // attempts' budgets on those retries and be interrupted at one step only.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let mut budget = Duration::from_millis(20);
    let mut interrupted_at = Vec::new();
    loop {
        match tokio::time::timeout(budget, membership.change(kind.clone())).await {
            Ok(Ok(_)) => break,
            Ok(Err(e)) => panic!("the change failed: {e}"),
            Err(_) => {
                let at = membership.in_progress().await.unwrap().map(|c| c.next);
                // Cancelled after its last step cleared the journal: the change is whole
                // (and a new run of it would be refused, its replica being a member now).
                let begun = interrupted_at.iter().any(Option::is_some);
                interrupted_at.push(at);
                if at.is_none() && begun {
                    break;
                }
                budget = budget.mul_f64(1.25);
                // A killed CLI's process is gone, so the next run takes its lock over at
                // once; the run cancelled here shares this test's pid, so its lock is let
                // go as that takeover would, or every attempt would wait out its TTL.
                let_go_of_the_lock(&host).await;
            }
        }
        assert!(budget < Duration::from_secs(120), "never finished");
    }
    let steps: std::collections::BTreeSet<String> =
        interrupted_at.iter().map(|at| at.map_or_else(|| "not begun".into(), |s| s.to_string())).collect();
    assert!(steps.len() >= 3, "interrupted at only {steps:?}");
    let members = membership.members().await.unwrap();
    assert_eq!(voters(&members), ["m0", "m2", "m3"], "{members:?}");
    assert!(members.iter().all(|m| m.healthy), "{members:?}");
    assert!(!host.running("m1") && !host.data_exists("m1"));
    let recorded = host.recorded.lock().unwrap().clone();
    assert!(recorded.iter().all(|&n| n == 3) && !recorded.is_empty(), "{recorded:?}");
}

/// Revokes the lease of the change lock, if it is held.
async fn let_go_of_the_lock(host: &Host) {
    let mut c = client(&host.client_url("m0")).await;
    let key = br2k_replication::membership_lock_key(SERVICE);
    let held = c.get(key, None).await.unwrap();
    if let Some(kv) = held.kvs().first() {
        // It may have lapsed on its own meanwhile.
        if let Err(e) = c.lease_revoke(kv.lease()).await {
            assert!(e.to_string().contains("not found"), "revoking the lock's lease: {e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_done_only_once_the_new_replicas_lpi_is_within_the_window_of_ssi() {
    let host = Host::new();
    let options = ChangeOptions { catch_up_window: 10, ..options() };
    let lines = Mutex::new(Vec::<String>::new());
    let progress = |line: &str| lines.lock().unwrap().push(line.to_owned());
    let membership = Membership::new(SERVICE, host.cluster(), &host, options, &progress);
    let mut c = client(&host.client_url("m0")).await;
    c.put(format!("/br2k/{SERVICE}/ssi"), "500", None).await.unwrap();
    // The new replica's app reports its LPI a while after its member was added.
    let m0 = host.client_url("m0");
    let writer = tokio::spawn(async move {
        while !client(&m0).await.member_list().await.unwrap().members().iter().any(|m| m.name() == "m3") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        c.put(format!("/br2k/{SERVICE}/lpi/m3"), "480", None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        c.put(format!("/br2k/{SERVICE}/lpi/m3"), "495", None).await.unwrap();
        Instant::now()
    });
    membership.change(ChangeKind::Add { replica: "m3".into() }).await.unwrap();
    let finished = Instant::now();
    assert!(finished >= writer.await.unwrap(), "done before it caught up");
    let members = membership.members().await.unwrap();
    assert!(members.iter().any(|m| m.name == "m3" && m.is_voter()), "{members:?}");
    let said = lines.lock().unwrap().join("\n");
    assert!(said.contains("20 entries behind SSI 500"), "{said}");
    assert!(said.contains("m3 is caught up: LPI 495 of SSI 500"), "{said}");
}
