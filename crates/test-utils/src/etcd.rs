//! A real etcd cluster of N members on loopback, each with its own data directory and
//! ports, whose members can be killed, paused, resumed and restarted one at a time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{KillOnDrop, OutputTail, ToolNotFound, locate};

/// The environment variable naming the etcd binary the tests run (default: Debian's
/// `/usr/bin/etcd`, 3.4). `BR2K_ETCD_BIN=tools/.venv/bin/etcd-3.5` runs them on etcd 3.5,
/// the version the Kubernetes backend deploys. (Not `BR2K_ETCD`: that is a replica's
/// etcd endpoint.)
pub const ETCD_BIN_ENV: &str = "BR2K_ETCD_BIN";

/// Why an etcd cluster fixture could not start or change.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The etcd binary is not installed.
    #[error(transparent)]
    NotFound(#[from] ToolNotFound),
    /// A member or a signal could not be started, or a directory could not be made.
    #[error("could not {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// Why the OS refused.
        #[source]
        source: std::io::Error,
    },
    /// The cluster did not report healthy within the startup timeout.
    #[error("etcd member {member} was not healthy within {timeout:?}; its output:\n{output}")]
    StartupTimeout {
        /// The member that did not come up.
        member: usize,
        /// The timeout that passed.
        timeout: Duration,
        /// What the member printed.
        output: String,
    },
    /// The member index is out of range or the member is not in the needed state.
    #[error("etcd member {member}: {reason}")]
    BadMember {
        /// The member index.
        member: usize,
        /// What was wrong.
        reason: String,
    },
}

/// Configures and starts an [`EtcdCluster`].
#[derive(Clone, Debug)]
pub struct EtcdClusterBuilder {
    members: usize,
    heartbeat_ms: u64,
    election_ms: u64,
    startup_timeout: Duration,
    quota_bytes: Option<u64>,
    extra_args: Vec<String>,
}

impl Default for EtcdClusterBuilder {
    fn default() -> Self {
        // Fast elections by default: tests wait for leader changes, and etcd's defaults
        // (100 ms / 1000 ms) make every failover test a second slower.
        Self {
            members: 3,
            heartbeat_ms: 50,
            election_ms: 300,
            startup_timeout: Duration::from_secs(30),
            quota_bytes: None,
            extra_args: Vec::new(),
        }
    }
}

impl EtcdClusterBuilder {
    /// The number of members (default 3).
    pub const fn members(mut self, members: usize) -> Self {
        self.members = members;
        self
    }

    /// Raft heartbeat interval and election timeout in milliseconds (default 50 / 300;
    /// etcd's own defaults are 100 / 1000).
    pub const fn timings(mut self, heartbeat_ms: u64, election_ms: u64) -> Self {
        self.heartbeat_ms = heartbeat_ms;
        self.election_ms = election_ms;
        self
    }

    /// Each member's space quota (`--quota-backend-bytes`; etcd's default is 2 GiB). A small
    /// one makes the `NOSPACE` alarm quick to reach.
    pub const fn quota_bytes(mut self, bytes: u64) -> Self {
        self.quota_bytes = Some(bytes);
        self
    }

    /// More flags for every member (after the fixture's own, so they win).
    #[must_use]
    pub fn args(mut self, args: impl IntoIterator<Item = String>) -> Self {
        self.extra_args.extend(args);
        self
    }

    /// etcd's default election timings (100 ms heartbeat, 1000 ms election timeout).
    pub const fn default_timings(self) -> Self {
        self.timings(100, 1000)
    }

    /// Starts every member and waits until each one answers `/health` with a leader.
    ///
    /// # Errors
    /// [`EtcdError`] when etcd is not installed or a member does not become healthy.
    pub fn spawn(self) -> Result<EtcdCluster, EtcdError> {
        let program = etcd_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("br2k-etcd-")
            .tempdir()
            .map_err(|source| EtcdError::Io { action: "create a data directory".into(), source })?;
        let token = dir.path().file_name().map_or_else(|| "br2k".into(), |n| n.to_string_lossy().into_owned());
        let ports = free_ports(self.members * 2)?;
        let mut members: Vec<Member> = (0..self.members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
                output: OutputTail::default(),
                paused: false,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let args = ClusterArgs {
            program,
            initial_cluster,
            token,
            heartbeat_ms: self.heartbeat_ms,
            election_ms: self.election_ms,
            quota_bytes: self.quota_bytes,
            extra_args: self.extra_args,
        };
        for member in &mut members {
            member.start(&args)?;
        }
        let cluster = EtcdCluster { members, args, startup_timeout: self.startup_timeout, _dir: dir };
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }
}

#[derive(Clone, Debug)]
struct ClusterArgs {
    program: PathBuf,
    initial_cluster: String,
    token: String,
    heartbeat_ms: u64,
    election_ms: u64,
    quota_bytes: Option<u64>,
    extra_args: Vec<String>,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    child: Option<KillOnDrop>,
    output: OutputTail,
    paused: bool,
}

impl Member {
    fn start(&mut self, args: &ClusterArgs) -> Result<(), EtcdError> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&args.program);
        // With an existing data directory etcd ignores the --initial-* flags, so the
        // same command line both creates and restarts a member.
        command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &args.initial_cluster, "--initial-cluster-token", &args.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", &args.heartbeat_ms.to_string()])
            .args(["--election-timeout", &args.election_ms.to_string()])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(args.quota_bytes.map(|q| format!("--quota-backend-bytes={q}")))
            .args(&args.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = KillOnDrop(
            command
                .spawn()
                .map_err(|source| EtcdError::Io { action: format!("start {}", args.program.display()), source })?,
        );
        self.output.follow(child.0.stdout.take().expect("stdout is piped"), None);
        self.output.follow(child.0.stderr.take().expect("stderr is piped"), None);
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }
}

/// A running etcd cluster; every member is killed and its data removed when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    args: ClusterArgs,
    startup_timeout: Duration,
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts a 3-member cluster with fast election timings.
    ///
    /// # Errors
    /// See [`EtcdClusterBuilder::spawn`].
    pub fn spawn() -> Result<Self, EtcdError> {
        EtcdClusterBuilder::default().spawn()
    }

    /// A builder for a cluster with non-default settings.
    pub fn builder() -> EtcdClusterBuilder {
        EtcdClusterBuilder::default()
    }

    /// The number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never, once spawned).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s client endpoint, e.g. `http://127.0.0.1:41235`.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client endpoint, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s name (`m<i>`).
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Member `i`'s peer URL.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].peer_port)
    }

    /// The flags of its Raft timings, for a member that joins the cluster later.
    pub fn timing_args(&self) -> [String; 2] {
        [
            format!("--heartbeat-interval={}", self.args.heartbeat_ms),
            format!("--election-timeout={}", self.args.election_ms),
        ]
    }

    /// Member `i`'s data directory.
    ///
    /// # Panics
    /// If `i` is out of range.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.members[i].data_dir
    }

    /// The process id of member `i`, if it is running.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.child.as_ref().map(|c| c.0.id())
    }

    /// The last lines member `i` printed, for diagnostics.
    pub fn output(&self, i: usize) -> String {
        self.members.get(i).map(|m| m.output.text()).unwrap_or_default()
    }

    /// Kills member `i` with SIGKILL (its data directory stays for [`Self::restart`]).
    ///
    /// # Errors
    /// [`EtcdError::BadMember`] if there is no such running member.
    pub fn kill(&mut self, i: usize) -> Result<(), EtcdError> {
        let member = self.member_mut(i)?;
        let Some(child) = member.child.take() else {
            return Err(EtcdError::BadMember { member: i, reason: "is not running".into() });
        };
        drop(child); // KillOnDrop: SIGKILL and reap.
        member.paused = false;
        Ok(())
    }

    /// Stops member `i` with SIGSTOP: it keeps its sockets but answers nothing.
    ///
    /// # Errors
    /// [`EtcdError::BadMember`] if the member is not running, or the signal fails.
    pub fn pause(&mut self, i: usize) -> Result<(), EtcdError> {
        self.signal(i, "STOP")?;
        self.members[i].paused = true;
        Ok(())
    }

    /// Continues member `i` after [`Self::pause`] with SIGCONT.
    ///
    /// # Errors
    /// [`EtcdError::BadMember`] if the member is not running, or the signal fails.
    pub fn resume(&mut self, i: usize) -> Result<(), EtcdError> {
        self.signal(i, "CONT")?;
        self.members[i].paused = false;
        Ok(())
    }

    /// Starts member `i` again from its data directory (after [`Self::kill`], or kills it
    /// first if it runs) and waits until it is healthy.
    ///
    /// # Errors
    /// [`EtcdError`] if it cannot start or does not become healthy.
    pub fn restart(&mut self, i: usize) -> Result<(), EtcdError> {
        let args = self.args.clone();
        let member = self.member_mut(i)?;
        drop(member.child.take());
        member.start(&args)?;
        self.wait_healthy(i)
    }

    fn member_mut(&mut self, i: usize) -> Result<&mut Member, EtcdError> {
        self.members.get_mut(i).ok_or(EtcdError::BadMember { member: i, reason: "no such member".into() })
    }

    fn signal(&self, i: usize, signal: &str) -> Result<(), EtcdError> {
        let pid = self.pid(i).ok_or(EtcdError::BadMember { member: i, reason: "is not running".into() })?;
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .map_err(|source| EtcdError::Io { action: format!("send SIG{signal} to {pid}"), source })?;
        if status.success() {
            Ok(())
        } else {
            Err(EtcdError::BadMember { member: i, reason: format!("kill -{signal} {pid} failed ({status})") })
        }
    }

    /// Waits until member `i` answers `/health` with `"health":"true"` (which etcd only
    /// says once the cluster has a leader).
    fn wait_healthy(&self, i: usize) -> Result<(), EtcdError> {
        let port = self.members[i].client_port;
        let deadline = Instant::now() + self.startup_timeout;
        while Instant::now() < deadline {
            if health(port).is_some_and(|body| body.contains("\"health\":\"true\"")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(EtcdError::StartupTimeout { member: i, timeout: self.startup_timeout, output: self.output(i) })
    }
}

/// The body of `GET /health` on a client port, or `None` when it does not answer.
fn health(port: u16) -> Option<String> {
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    Some(answer)
}

/// The etcd binary the tests run: [`ETCD_BIN_ENV`]'s, else Debian's, else `etcd` on `PATH`
/// (for tests that start etcd members themselves, such as the init step's).
///
/// # Errors
/// [`ToolNotFound`] when there is none (`bash tools/setup.sh` installs it).
pub fn etcd_binary() -> Result<PathBuf, ToolNotFound> {
    locate("etcd", ETCD_BIN_ENV, &[PathBuf::from("/usr/bin/etcd")])
}

/// `count` distinct free loopback ports. The OS picks each by binding port 0; they are
/// held until all are chosen so that none repeats.
///
/// # Errors
/// When the OS gives no port.
pub fn free_loopback_ports(count: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..count).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

fn free_ports(count: usize) -> Result<Vec<u16>, EtcdError> {
    free_loopback_ports(count).map_err(|source| EtcdError::Io { action: "find a free port".into(), source })
}
