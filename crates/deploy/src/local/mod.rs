//! The local backend: a service's N replicas as processes on this machine.
//!
//! Node i (1-based, named `n<i>`) is an etcd member and the app binary, both started in
//! the node's own directory `WORK/n<i>/` (etcd data in `etcd/`, app data in `app/`,
//! their output in `etcd.log` and `app.log`), on the node's own address with the same
//! ports everywhere: etcd clients 2379, etcd peers 2380, the app 8080.
//!
//! ## What an app binary is given
//! Any binary built on br2k-replication that reads these variables can be run (the
//! logserver does): `BR2K_SERVICE`, `BR2K_REPLICA`, `BR2K_ETCD` (its own member),
//! `BR2K_LISTEN`, `BR2K_PUBLIC_URL`, `BR2K_DATA_DIR`, and when the leader is to publish
//! itself, `BR2K_REGISTRY`, `ETH_RPC_URL` and `ETH_PRIVATE_KEY` (the node's operator key:
//! in the environment, never on the command line where `ps` would show it). Callers may
//! add more, such as the snapshot policy ([`snapshot_env`]).
//!
//! ## Cleanup
//! Children are killed when the runner drops the service, exits, is interrupted, or
//! crashes (the kernel's parent-death signal); a crashed runner's namespaces and links
//! are removed by the next runner (see [`net`]).

mod backend;
mod chain;
pub mod control;
mod disk;
mod members;
mod net;
pub mod run_file;
mod sandbox;
mod sys;
mod tools;
mod work_root;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use br2k_replication::{Role, Status};
use tokio::process::{Child, Command};

/// The environment variable naming the etcd binary the local backend runs [default:
/// `/usr/bin/etcd`, else `etcd` on `PATH`]. Not `BR2K_ETCD`, which is a replica's etcd
/// endpoint.
pub const ETCD_BIN_ENV: &str = "BR2K_ETCD_BIN";

pub use backend::{LocalBackend, replica_views};
pub use chain::{LocalChain, LocalChainOptions};
pub use disk::LimitedDisk;
pub use members::LocalReplicaHost;
pub use net::{LocalNetwork, MAX_NODES, NetworkMode};
pub use sandbox::{ChainChoice, Sandbox, SandboxSpec, is_loopback_url};
pub use tools::sibling_binary;
pub use work_root::work_root;

use crate::error::{DeployError, Result};

/// etcd's client port on every node.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port on every node.
pub const ETCD_PEER_PORT: u16 = 2380;
/// etcd's metrics and health (plain HTTP, nothing of the records) on every node.
pub const ETCD_METRICS_PORT: u16 = 2381;
/// The app's port on every node.
pub const APP_PORT: u16 = 8080;

/// etcd's Raft timings for the service's members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EtcdTimings {
    /// Heartbeat interval, milliseconds.
    pub heartbeat_ms: u64,
    /// Election timeout, milliseconds (etcd's default is 1000; at least 5 heartbeats).
    pub election_ms: u64,
}

impl Default for EtcdTimings {
    fn default() -> Self {
        Self { heartbeat_ms: 100, election_ms: 1000 }
    }
}

impl EtcdTimings {
    /// Timings with the given election timeout and a heartbeat a tenth of it (etcd's
    /// own ratio).
    pub fn with_election_ms(election_ms: u64) -> Self {
        Self { heartbeat_ms: (election_ms / 10).max(10), election_ms }
    }

    fn check(self) -> Result<()> {
        if self.heartbeat_ms == 0 || self.election_ms < 5 * self.heartbeat_ms || self.election_ms > 50_000 {
            return Err(DeployError::Invalid(format!(
                "etcd election timeout {} ms must be at least 5 heartbeats ({} ms) and at most 50000 ms",
                self.election_ms, self.heartbeat_ms
            )));
        }
        Ok(())
    }
}

/// The environment that gives an app binary its snapshot policy
/// (`BR2K_SNAPSHOT_INTERVAL`, `BR2K_TRAILING_ENTRIES`, as the log server reads them).
pub fn snapshot_env(policy: &br2k_replication::SnapshotPolicy) -> Vec<(String, String)> {
    vec![
        ("BR2K_SNAPSHOT_INTERVAL".into(), policy.interval.to_string()),
        ("BR2K_TRAILING_ENTRIES".into(), policy.trailing.to_string()),
    ]
}

/// How the leader publishes itself in the service registry.
#[derive(Clone, Debug)]
pub struct Publishing {
    /// The chain's JSON-RPC URL as the nodes reach it.
    pub rpc_url: String,
    /// The registry.
    pub registry: Address,
    /// One operator key per node (node i uses key `i % len`).
    pub operator_keys: Vec<PrivateKeySigner>,
}

/// Data directories on filesystems of their own, of a fixed size (tmpfs mounts, which
/// need root), so that a fault can fill them ([`LocalService::fill_disk`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskLimits {
    /// Each node's app data directory, bytes.
    pub app: Option<u64>,
    /// Each node's etcd data directory, bytes.
    pub etcd: Option<u64>,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    /// The service name (letters, digits, '-', '_', '.').
    pub service: String,
    /// The app binary.
    pub app: PathBuf,
    /// Extra arguments for the app.
    pub app_args: Vec<String>,
    /// Extra environment for the app.
    pub app_env: Vec<(String, String)>,
    /// Where the nodes' directories go.
    pub work_dir: PathBuf,
    /// etcd timings.
    pub etcd: EtcdTimings,
    /// Registry publication, if any.
    pub publishing: Option<Publishing>,
    /// How long each process may take to become ready.
    pub startup_timeout: Duration,
    /// Size-limited data directories, if any.
    pub disks: DiskLimits,
    /// TLS for etcd's client and peer traffic, with certificates made here (one authority
    /// per start, one certificate per node in `n<i>/tls/`).
    pub etcd_tls: bool,
}

#[derive(Debug)]
struct Node {
    name: String,
    dir: PathBuf,
    etcd: Option<Child>,
    app: Option<Child>,
    paused: bool,
    cut: bool,
    /// Its data was wiped: its etcd member must join the cluster again as a new member.
    wiped: bool,
    /// Its size-limited data directories ([`DiskLimits`]), unmounted when it is dropped.
    disks: Vec<(Part, LimitedDisk)>,
    /// Its etcd member's certificate files, with `--etcd-tls`.
    tls: Option<crate::etcd_tls::EtcdTlsFiles>,
    /// Added by a membership change: its etcd member joins the running cluster with
    /// this membership (`--initial-cluster`) instead of founding it.
    join: Option<String>,
    /// Removed by a membership change: it runs nothing, and its address is not reused.
    retired: bool,
}

impl Node {
    /// Node `name`'s directories (size-limited ones mounted), nothing running yet.
    fn create(spec: &ServiceSpec, name: String) -> Result<Self> {
        let dir = spec.work_dir.join(&name);
        for sub in [dir.join("etcd"), dir.join("app")] {
            std::fs::create_dir_all(&sub).map_err(|e| DeployError::io(format!("create {}", sub.display()), e))?;
        }
        let mut disks = Vec::new();
        for (part, size) in [(Part::Etcd, spec.disks.etcd), (Part::App, spec.disks.app)] {
            if let Some(size) = size {
                disks.push((part, LimitedDisk::mount(&dir.join(part.to_string()), size)?));
            }
        }
        Ok(Self {
            name,
            dir,
            etcd: None,
            app: None,
            paused: false,
            cut: false,
            wiped: false,
            disks,
            tls: None,
            join: None,
            retired: false,
        })
    }
}

/// A process of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The etcd member.
    Etcd,
    /// The app.
    App,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Etcd => "etcd",
            Self::App => "app",
        })
    }
}

/// A running local service. Dropping it kills every process and removes its network.
#[derive(Debug)]
pub struct LocalService {
    // Field order is drop order: processes go before the network they live in.
    nodes: Vec<Node>,
    spec: ServiceSpec,
    etcd_program: PathBuf,
    http: reqwest::Client,
    network: LocalNetwork,
    /// With etcd TLS: the certificates of every node index (see [`Self::start_kept`]).
    certificates: Option<crate::etcd_tls::EtcdCertificates>,
}

impl LocalService {
    /// Starts one node per address of `network`: every etcd member first (they need each
    /// other to elect), then every app, and waits until each answers.
    ///
    /// # Errors
    /// Bad spec, missing programs, or a process that exits or does not answer in time
    /// (everything started is stopped again).
    pub async fn start(network: LocalNetwork, spec: ServiceSpec, progress: &dyn Fn(&str)) -> Result<Self> {
        Self::start_kept(network, spec, &[], progress).await
    }

    /// [`Self::start`] on the data a service left whose membership changed: the nodes in
    /// `retired` (0-based) were retired by a change and are not started.
    ///
    /// # Errors
    /// As [`Self::start`].
    pub async fn start_kept(
        network: LocalNetwork,
        mut spec: ServiceSpec,
        retired: &[usize],
        progress: &dyn Fn(&str),
    ) -> Result<Self> {
        spec.etcd.check()?;
        if !spec.app.is_file() {
            return Err(DeployError::Invalid(format!(
                "app binary {} does not exist (build it first, e.g. `cargo build -p br2k-logserver`)",
                spec.app.display()
            )));
        }
        // The nodes run in their own directories: a relative path would name nothing there.
        spec.app = std::path::absolute(&spec.app)
            .map_err(|e| DeployError::io(format!("resolve {}", spec.app.display()), e))?;
        let etcd_program = tools::locate("etcd", ETCD_BIN_ENV, &[PathBuf::from("/usr/bin/etcd")])?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .connect_timeout(Duration::from_millis(500))
            .no_proxy()
            .build()
            .map_err(|e| DeployError::Invalid(format!("cannot build an HTTP client: {e}")))?;
        let count = network.nodes();
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            let mut node = Node::create(&spec, format!("n{}", i + 1))?;
            node.retired = retired.contains(&i);
            nodes.push(node);
        }
        let live: Vec<usize> = (0..count).filter(|i| !retired.contains(i)).collect();
        // A certificate for every address a node of this service can ever have: a node a
        // membership change adds takes its own, and the authority's key is still dropped
        // at once (nobody can make another member later).
        let certificates = if spec.etcd_tls {
            let hosts: Vec<Vec<String>> =
                (0..MAX_NODES.max(count)).map(|i| vec![network.node_address(i).to_string()]).collect();
            let certificates = crate::etcd_tls::EtcdCertificates::make(&spec.service, &hosts)?;
            for (i, node) in nodes.iter_mut().enumerate() {
                node.tls = Some(certificates.write_member(i, &node.dir.join("tls"))?);
            }
            Some(certificates)
        } else {
            None
        };
        let mut service = Self { nodes, spec, etcd_program, http, network, certificates };
        progress(&format!("starting {} etcd members", live.len()));
        for &i in &live {
            service.spawn(i, Part::Etcd)?;
        }
        for &i in &live {
            service.wait_ready(i, Part::Etcd).await?;
        }
        progress(&format!("starting {} replicas of {}", live.len(), service.spec.app.display()));
        for &i in &live {
            service.spawn(i, Part::App)?;
        }
        for &i in &live {
            service.wait_ready(i, Part::App).await?;
        }
        Ok(service)
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The network the nodes live on.
    pub const fn network(&self) -> &LocalNetwork {
        &self.network
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.spec.service
    }

    /// Node `i`'s name (`n1`, `n2`, ...), which is also its replica id.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Node `i`'s app URL.
    pub fn app_url(&self, i: usize) -> String {
        format!("http://{}", socket(self.network.node_address(i), APP_PORT))
    }

    /// Node `i`'s etcd client URL (`https://` with `--etcd-tls`).
    pub fn etcd_url(&self, i: usize) -> String {
        format!("{}://{}", self.etcd_scheme(), socket(self.network.node_address(i), ETCD_CLIENT_PORT))
    }

    /// Node `i`'s etcd certificate files, with `--etcd-tls`: what a client of its member
    /// presents.
    pub fn etcd_tls(&self, i: usize) -> Option<br2k_replication::EtcdTls> {
        self.nodes[i].tls.as_ref().map(|f| br2k_replication::EtcdTls {
            ca: f.ca.clone(),
            cert: f.cert.clone(),
            key: f.key.clone(),
        })
    }

    /// Node `i`'s etcd metrics and health, plain HTTP on a port of their own (nothing of
    /// the service's records is there).
    pub fn etcd_metrics_url(&self, i: usize) -> String {
        format!("http://{}", socket(self.network.node_address(i), ETCD_METRICS_PORT))
    }

    const fn etcd_scheme(&self) -> &'static str {
        if self.spec.etcd_tls { "https" } else { "http" }
    }

    /// Node `i`'s app data directory.
    pub fn app_data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("app")
    }

    /// Node `i`'s directory (data and logs).
    pub fn node_dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    /// The pid of node `i`'s `part`, while it runs.
    pub fn pid(&self, i: usize, part: Part) -> Option<u32> {
        let node = &self.nodes[i];
        match part {
            Part::Etcd => node.etcd.as_ref(),
            Part::App => node.app.as_ref(),
        }
        .and_then(Child::id)
    }

    /// What node `i`'s app says of itself (`/br2k/status`), within a second.
    ///
    /// # Errors
    /// A description of why it did not answer.
    pub async fn status(&self, i: usize) -> Result<Status, String> {
        let url = format!("{}/br2k/status", self.app_url(i));
        let response = self.http.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
        response.json::<Status>().await.map_err(|e| format!("{url}: {e}"))
    }

    /// Every node's status, asked at once.
    pub async fn statuses(&self) -> Vec<Result<Status, String>> {
        futures::future::join_all((0..self.len()).map(|i| self.status(i))).await
    }

    /// The node that leads (with the highest epoch if, briefly, two think they do).
    pub async fn leader(&self) -> Option<(usize, Status)> {
        self.statuses()
            .await
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.ok().map(|s| (i, s)))
            .filter(|(_, s)| s.role == Role::Leader)
            .max_by_key(|(_, s)| s.epoch)
    }

    /// Waits until some node leads, up to `timeout`.
    ///
    /// # Errors
    /// [`DeployError::NotReady`] when none does in time.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<(usize, Status)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader().await {
                return Ok(leader);
            }
            if Instant::now() >= deadline {
                return Err(DeployError::NotReady { what: "a leader".into(), timeout, log: None });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills node `i`'s app and etcd member (SIGKILL); their data stays for
    /// [`Self::restart`].
    ///
    /// # Errors
    /// When the node is not running.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        let node = self.node_mut(i)?;
        if node.app.is_none() && node.etcd.is_none() {
            return Err(DeployError::Node { node: i + 1, reason: "is not running".into() });
        }
        for child in [node.app.take(), node.etcd.take()].into_iter().flatten() {
            kill_and_reap(child).await;
        }
        node.paused = false;
        Ok(())
    }

    /// Kills node `i`'s app and etcd member and deletes all their data, as a lost disk
    /// would. Its etcd member is removed from the cluster (through a live member), so that
    /// [`Self::restart`] can add it back as a new, empty member: etcd brings that member up
    /// to date, and the app catches up from a peer's snapshot.
    ///
    /// # Errors
    /// When no other member answers, etcd refuses the removal, or the data cannot be deleted.
    pub async fn wipe(&mut self, i: usize) -> Result<()> {
        self.node_mut(i)?;
        if self.nodes[i].app.is_some() || self.nodes[i].etcd.is_some() {
            self.kill(i).await?;
        }
        let name = self.nodes[i].name.clone();
        self.with_live_member(i, "remove the wiped member", async |client| {
            let members = client.member_list().await?;
            if let Some(member) = members.members().iter().find(|m| m.name() == name) {
                client.member_remove(member.id()).await?;
            }
            Ok(())
        })
        .await?;
        let node = &mut self.nodes[i];
        for sub in [node.dir.join("etcd"), node.dir.join("app")] {
            // What is in it, not the directory itself: it may be a size-limited disk's mount.
            empty_dir(&sub).map_err(|e| DeployError::io(format!("delete what {} holds", sub.display()), e))?;
        }
        node.wiped = true;
        // It joins again with the membership as it is then, not as it was when it was added.
        node.join = None;
        Ok(())
    }

    /// Fills node `i`'s `part` data directory, which must be size-limited ([`DiskLimits`]):
    /// from now on its writes that need room fail with ENOSPC, as on a full disk. Returns
    /// how many bytes the filler took.
    ///
    /// # Errors
    /// When that directory is not size-limited, or the filler cannot be written.
    pub fn fill_disk(&mut self, i: usize, part: Part) -> Result<u64> {
        self.disk(i, part)?.fill()
    }

    /// Gives node `i`'s `part` data directory its room back.
    ///
    /// # Errors
    /// When that directory is not size-limited, or the filler cannot be removed.
    pub fn free_disk(&mut self, i: usize, part: Part) -> Result<()> {
        self.disk(i, part)?.free()
    }

    fn disk(&self, i: usize, part: Part) -> Result<&LimitedDisk> {
        let node = self.nodes.get(i).ok_or(DeployError::Node { node: i + 1, reason: "does not exist".into() })?;
        node.disks.iter().find(|(p, _)| *p == part).map(|(_, disk)| disk).ok_or_else(|| DeployError::Node {
            node: i + 1,
            reason: format!("its {part} data directory is not size-limited (start the service with DiskLimits)"),
        })
    }

    /// Runs `action` on a client of the first other node whose etcd member answers.
    async fn with_live_member(
        &self,
        not: usize,
        what: &str,
        action: impl AsyncFn(&mut etcd_client::Client) -> std::result::Result<(), etcd_client::Error>,
    ) -> Result<()> {
        let timeout = Duration::from_secs(5);
        let mut reasons = Vec::new();
        for j in (0..self.len()).filter(|&j| j != not && self.nodes[j].etcd.is_some()) {
            let url = self.etcd_url(j);
            let mut options = etcd_client::ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
            if let Some(tls) = self.etcd_tls(j) {
                options = options.with_tls(tls.options().map_err(|e| DeployError::Invalid(e.to_string()))?);
            }
            let attempt = async {
                let mut client = etcd_client::Client::connect([url.as_str()], Some(options)).await?;
                action(&mut client).await
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => reasons.push(format!("{url}: {e}")),
                Err(_) => reasons.push(format!("{url}: no answer within {timeout:?}")),
            }
        }
        Err(DeployError::Node { node: not + 1, reason: format!("could not {what}: {}", reasons.join("; ")) })
    }

    /// Starts node `i`'s etcd member and app again (whichever is not running); a wiped
    /// node's member is first added to the cluster again.
    ///
    /// # Errors
    /// When a process cannot be started, or a wiped member cannot be added back.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        // A process that exited by itself (an etcd member whose disk filled) is started again.
        let node = self.node_mut(i)?;
        if node.retired {
            return Err(DeployError::Node { node: i + 1, reason: "was retired by a membership change".into() });
        }
        for slot in [&mut node.etcd, &mut node.app] {
            if slot.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(Some(_)))) {
                *slot = None;
            }
        }
        if self.nodes[i].etcd.is_none() {
            if self.nodes[i].wiped {
                let peer = format!("http://{}", socket(self.network.node_address(i), ETCD_PEER_PORT));
                // etcd refuses a new member ("unhealthy cluster") until every member has
                // been connected to the others for 5 s, as after a start or an election.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let added = self
                        .with_live_member(i, "add the wiped member back", async |client| {
                            client.member_add([peer.as_str()], None).await.map(drop)
                        })
                        .await;
                    match added {
                        Ok(()) => break,
                        Err(e) if Instant::now() >= deadline => return Err(e),
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
            }
            self.spawn(i, Part::Etcd)?;
            self.nodes[i].wiped = false;
        }
        if self.nodes[i].app.is_none() {
            self.spawn(i, Part::App)?;
        }
        Ok(())
    }

    /// Freezes node `i` (SIGSTOP to its app and etcd member).
    ///
    /// # Errors
    /// When it is not running or already paused.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        self.signal_node(i, sys::Signal::Stop, true)
    }

    /// Thaws node `i` (SIGCONT).
    ///
    /// # Errors
    /// When it is not paused.
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.signal_node(i, sys::Signal::Continue, false)
    }

    /// Cuts node `i` off the network (namespace mode only).
    ///
    /// # Errors
    /// Without namespaces, or when `ip` fails.
    pub fn cut(&mut self, i: usize) -> Result<()> {
        self.node_mut(i)?;
        self.network.cut(i)?;
        self.nodes[i].cut = true;
        Ok(())
    }

    /// Links node `i` back.
    ///
    /// # Errors
    /// Without namespaces, or when `ip` fails.
    pub fn rejoin(&mut self, i: usize) -> Result<()> {
        self.node_mut(i)?;
        self.network.rejoin(i)?;
        self.nodes[i].cut = false;
        Ok(())
    }

    /// Undoes every fault: rejoins cut nodes, resumes paused ones, gives filled disks
    /// their room back, restarts dead ones.
    ///
    /// # Errors
    /// The first action that failed.
    pub async fn heal_all(&mut self) -> Result<()> {
        for i in 0..self.len() {
            if self.nodes[i].retired {
                continue;
            }
            if self.nodes[i].cut {
                self.rejoin(i)?;
            }
            if self.nodes[i].paused {
                self.resume(i)?;
            }
            for (_, disk) in &self.nodes[i].disks {
                disk.free()?;
            }
            self.restart(i).await?;
        }
        Ok(())
    }

    /// Processes that have exited since the last call, as (node, part, how).
    pub fn exited(&mut self) -> Vec<(usize, Part, String)> {
        let mut out = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            for (part, slot) in [(Part::Etcd, &mut node.etcd), (Part::App, &mut node.app)] {
                if let Some(child) = slot
                    && let Ok(Some(status)) = child.try_wait()
                {
                    out.push((i, part, status.to_string()));
                    *slot = None;
                }
            }
        }
        out
    }

    /// Stops node `i`'s app gracefully (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop_app(&mut self, i: usize) {
        if let Some(child) = self.nodes.get_mut(i).and_then(|n| n.app.take()) {
            terminate(child, Duration::from_secs(5)).await;
        }
    }

    /// Stops everything gracefully: the apps first (so none sees its member vanish while
    /// it serves), then the etcd members; then removes the network.
    pub async fn shutdown(mut self) {
        // A frozen process would not see SIGTERM until thawed.
        for i in 0..self.len() {
            if self.nodes[i].paused {
                let _ = self.resume(i);
            }
        }
        for i in 0..self.len() {
            self.stop_app(i).await;
        }
        for node in &mut self.nodes {
            if let Some(child) = node.etcd.take() {
                terminate(child, Duration::from_secs(5)).await;
            }
        }
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node> {
        let count = self.nodes.len();
        self.nodes.get_mut(i).ok_or(DeployError::Node { node: i + 1, reason: format!("there are only {count} nodes") })
    }

    fn signal_node(&mut self, i: usize, signal: sys::Signal, pause: bool) -> Result<()> {
        let node = self.node_mut(i)?;
        if node.paused == pause {
            let reason = if pause { "is already paused" } else { "is not paused" };
            return Err(DeployError::Node { node: i + 1, reason: reason.into() });
        }
        let pids: Vec<u32> = [&node.app, &node.etcd].into_iter().flatten().filter_map(Child::id).collect();
        if pids.is_empty() {
            return Err(DeployError::Node { node: i + 1, reason: "is not running".into() });
        }
        for pid in pids {
            sys::send(pid, signal).map_err(|e| DeployError::io(format!("signal process {pid}"), e))?;
        }
        node.paused = pause;
        Ok(())
    }

    fn spawn(&mut self, i: usize, part: Part) -> Result<()> {
        let address = self.network.node_address(i);
        let node = &self.nodes[i];
        let log_path = node.dir.join(format!("{part}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| DeployError::io(format!("open {}", log_path.display()), e))?;
        let log_err = log.try_clone().map_err(|e| DeployError::io("duplicate a log handle", e))?;
        let mut command = match part {
            Part::Etcd => self.etcd_command(i, address),
            Part::App => self.app_command(i, address),
        };
        command
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a Ctrl-C at the terminal reaches the runner only,
            // which then stops the nodes in order.
            .process_group(0)
            .kill_on_drop(true);
        sys::prepare_child(&mut command, self.network.namespace(i)?);
        let program = match part {
            Part::Etcd => &self.etcd_program,
            Part::App => &self.spec.app,
        };
        let child = command.spawn().map_err(|e| DeployError::io(format!("start {}", program.display()), e))?;
        if let Some(pid) = child.id() {
            self.network.record_process(pid, &node.dir);
        }
        let node = &mut self.nodes[i];
        match part {
            Part::Etcd => node.etcd = Some(child),
            Part::App => node.app = Some(child),
        }
        Ok(())
    }

    fn etcd_command(&self, i: usize, address: IpAddr) -> Command {
        // A wiped member, and one a membership change added, joins the running cluster;
        // otherwise the flag is ignored once the data directory exists, so the same
        // command creates and restarts a member.
        let state = if self.nodes[i].wiped || self.nodes[i].join.is_some() { "existing" } else { "new" };
        let scheme = self.etcd_scheme();
        let url = |port| format!("{scheme}://{}", socket(address, port));
        // Retired nodes are not members any more: a joining member that named them would
        // not match the cluster.
        let cluster = self.nodes[i].join.clone().unwrap_or_else(|| {
            (0..self.len())
                .filter(|&j| !self.nodes[j].retired)
                .map(|j| format!("{}={}", self.nodes[j].name, self.peer_url(j)))
                .collect::<Vec<_>>()
                .join(",")
        });
        let token = format!("br2k-{}-{}", self.spec.service, self.network.slot());
        let mut command = Command::new(&self.etcd_program);
        command
            .args(["--name", &self.nodes[i].name, "--data-dir", "etcd"])
            .args(["--listen-client-urls", &url(ETCD_CLIENT_PORT), "--advertise-client-urls", &url(ETCD_CLIENT_PORT)])
            .args(["--listen-peer-urls", &url(ETCD_PEER_PORT), "--initial-advertise-peer-urls", &url(ETCD_PEER_PORT)])
            .args(["--initial-cluster", &cluster, "--initial-cluster-token", &token, "--initial-cluster-state", state])
            .args(["--heartbeat-interval", &self.spec.etcd.heartbeat_ms.to_string()])
            .args(["--election-timeout", &self.spec.etcd.election_ms.to_string()])
            // A member cut off for a while comes back with a higher term; without pre-vote
            // it would force an election on rejoining and depose a healthy leader (etcd
            // 3.5 and later enable it by default; Debian's 3.4 does not).
            .arg("--pre-vote")
            .args(br2k_replication::etcd_flags::recommended())
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(["--listen-metrics-urls", &format!("http://{}", socket(address, ETCD_METRICS_PORT))]);
        if let Some(tls) = &self.nodes[i].tls {
            command.args(tls.etcd_flags());
        }
        command
    }

    fn app_command(&self, i: usize, address: IpAddr) -> Command {
        let node = &self.nodes[i];
        let listen = socket(address, APP_PORT);
        let mut command = Command::new(&self.spec.app);
        command
            .args(&self.spec.app_args)
            .env("BR2K_SERVICE", &self.spec.service)
            .env("BR2K_REPLICA", &node.name)
            .env("BR2K_ETCD", format!("{}://{}", self.etcd_scheme(), socket(address, ETCD_CLIENT_PORT)))
            .env("BR2K_ETCD_METRICS", format!("http://{}", socket(address, ETCD_METRICS_PORT)))
            .env("BR2K_LISTEN", listen.to_string())
            .env("BR2K_PUBLIC_URL", format!("http://{listen}"))
            .env("BR2K_DATA_DIR", node.dir.join("app"));
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        if let Some(tls) = &node.tls {
            command
                .env("BR2K_ETCD_CA_FILE", &tls.ca)
                .env("BR2K_ETCD_CERT_FILE", &tls.cert)
                .env("BR2K_ETCD_KEY_FILE", &tls.key);
        } else {
            command.env_remove("BR2K_ETCD_CA_FILE").env_remove("BR2K_ETCD_CERT_FILE").env_remove("BR2K_ETCD_KEY_FILE");
        }
        if let Some(publishing) = &self.spec.publishing {
            let key = &publishing.operator_keys[i % publishing.operator_keys.len()];
            command
                .env("BR2K_REGISTRY", publishing.registry.to_string())
                .env("ETH_RPC_URL", &publishing.rpc_url)
                .env("ETH_PRIVATE_KEY", alloy::hex::encode_prefixed(key.to_bytes()));
        } else {
            command.env_remove("BR2K_REGISTRY").env_remove("ETH_PRIVATE_KEY");
        }
        for (name, value) in &self.spec.app_env {
            command.env(name, value);
        }
        command
    }

    async fn wait_ready(&mut self, i: usize, part: Part) -> Result<()> {
        let timeout = self.spec.startup_timeout;
        let deadline = Instant::now() + timeout;
        let url = match part {
            Part::Etcd => format!("{}/health", self.etcd_metrics_url(i)),
            Part::App => format!("{}/br2k/health", self.app_url(i)),
        };
        let what = format!("node {}'s {part} ({url})", i + 1);
        let log = Some(self.nodes[i].dir.join(format!("{part}.log")));
        loop {
            // Any HTTP answer means it serves; etcd's /health is 503 until it has a leader,
            // which needs the other members, so for etcd only a healthy answer counts.
            if let Ok(response) = self.http.get(&url).send().await
                && (part == Part::App || response.status().is_success())
            {
                return Ok(());
            }
            let node = &mut self.nodes[i];
            let child = match part {
                Part::Etcd => node.etcd.as_mut(),
                Part::App => node.app.as_mut(),
            };
            if let Some(child) = child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(DeployError::Exited { what, status: status.to_string(), log });
            }
            if Instant::now() >= deadline {
                return Err(DeployError::NotReady { what, timeout, log });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Removes everything `dir` holds, leaving `dir` itself.
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn socket(address: IpAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(address, port)
}

async fn kill_and_reap(mut child: Child) {
    let _ = child.kill().await;
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`.
async fn terminate(mut child: Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = sys::send(pid, sys::Signal::Terminate);
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    kill_and_reap(child).await;
}

/// Asks the runner process `pid` (a detached `br2k up`) to stop, and waits up to
/// `timeout` for it to exit (then kills it; its children die with it).
///
/// # Errors
/// When the process cannot be signalled (it belongs to another user).
pub async fn stop_runner(pid: u32, timeout: Duration) -> Result<bool> {
    if !sys::exists(pid) {
        return Ok(false);
    }
    sys::send(pid, sys::Signal::Terminate).map_err(|e| DeployError::io(format!("signal process {pid}"), e))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !sys::exists(pid) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sys::send(pid, sys::Signal::Kill);
    Ok(true)
}

/// Whether process `pid` runs (for a runner recorded in a state file).
pub fn process_exists(pid: u32) -> bool {
    sys::exists(pid)
}
