//! The runner's control socket: how a command in another process (`br2k scale`, `br2k
//! replace`, the manager) has a `br2k up` runner start, stop, retire and record the
//! replicas it owns during a membership change.
//!
//! The runner owns the replicas' processes (they die with it, by the parent-death
//! signal), so only it can start a new one or stop one for good. Everything else in a
//! change (the journal, etcd's membership, the catch-up gate) runs in the command that
//! asked for it, against etcd: if that command is killed, the journal in etcd says where
//! the change stopped and the next command or the manager finishes it.
//!
//! The socket is `control.sock` in the runner's state directory (private to its user,
//! the socket itself 0600). One request per connection, one JSON line each way.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use br2k_membership::{ChangeOptions, Cluster, HostError, Membership, ReplicaHost};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::run_file::{Layout, RunFile};
use super::{ETCD_PEER_PORT, LocalNetwork, LocalReplicaHost, MAX_NODES, Sandbox};
use crate::deployment::DeploymentRecord;
use crate::error::{DeployError, Result};

/// The control socket's name in a state directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The longest request line either side accepts.
const MAX_LINE: u64 = 64 * 1024;

/// What a command asks the runner to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Whether the runner listens (a command asks before it journals a change).
    Ping,
    /// Start `replica` fresh, its etcd member joining with `initial_cluster`.
    Start {
        /// The replica (node name).
        replica: String,
        /// The membership it joins (`--initial-cluster`).
        initial_cluster: String,
    },
    /// Stop `replica`'s processes.
    Stop {
        /// The replica.
        replica: String,
    },
    /// Delete `replica`'s data and retire its node for good.
    DeleteData {
        /// The replica.
        replica: String,
    },
    /// Record that the service has `replicas` replicas: in the layout a later start
    /// reads, and in the registry's recovery info when the service was deployed there.
    Record {
        /// The replica count.
        replicas: u32,
    },
}

/// The runner's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ControlAnswer {
    /// Why the request failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What was done, in words (for the command's progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The runner's end: a listening socket in its state directory.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Listens at `dir/control.sock`, replacing a socket a crashed runner left (the caller
    /// holds the directory's runner claim, so no live runner listens there).
    ///
    /// # Errors
    /// When the socket cannot be made.
    pub fn bind(dir: &Path) -> Result<Self> {
        let path = dir.join(CONTROL_SOCKET);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(DeployError::io(format!("remove the old {}", path.display()), e));
            }
            _ => {}
        }
        let listener =
            UnixListener::bind(&path).map_err(|e| DeployError::io(format!("listen at {}", path.display()), e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| DeployError::io(format!("make {} private", path.display()), e))?;
        Ok(Self { listener, path })
    }

    /// The next connection.
    ///
    /// # Errors
    /// When accepting fails.
    pub async fn accept(&self) -> std::io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    /// Reads one request from `stream`, carries it out on `sandbox` (whose state
    /// directory is `dir`) and answers. Returns the request, for the runner's log.
    pub async fn serve(stream: UnixStream, sandbox: &mut Sandbox, dir: &Path) -> Option<ControlRequest> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_LINE)).read_line(&mut line),
        )
        .await;
        let (request, answer) = match read {
            Ok(Ok(_)) => match serde_json::from_str::<ControlRequest>(&line) {
                Ok(request) => {
                    let answer = carry_out(&request, sandbox, dir).await;
                    (Some(request), answer)
                }
                Err(e) => (None, failed(format!("not a control request: {e}"))),
            },
            Ok(Err(e)) => (None, failed(format!("reading the request: {e}"))),
            Err(_) => (None, failed("no request within 10 s".into())),
        };
        let mut text = serde_json::to_string(&answer).expect("plain data serialises");
        text.push('\n');
        // The asker may have gone (killed mid-change): what was done stays done.
        let _ = write.write_all(text.as_bytes()).await;
        request
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn failed(error: String) -> ControlAnswer {
    ControlAnswer { error: Some(error), ..ControlAnswer::default() }
}

async fn carry_out(request: &ControlRequest, sandbox: &mut Sandbox, dir: &Path) -> ControlAnswer {
    let result = match request {
        ControlRequest::Ping => Ok("listening".to_owned()),
        ControlRequest::Start { replica, initial_cluster } => {
            let host = LocalReplicaHost::new(sandbox.service_mut(), |_| {});
            let started = host.start(replica, initial_cluster).await;
            drop(host);
            started
                .map_err(|e| e.to_string())
                .and_then(|()| note_nodes(sandbox, dir).map(|()| format!("{replica} runs")))
        }
        ControlRequest::Stop { replica } => {
            let host = LocalReplicaHost::new(sandbox.service_mut(), |_| {});
            host.stop(replica).await.map(|()| format!("{replica} stopped")).map_err(|e| e.to_string())
        }
        ControlRequest::DeleteData { replica } => {
            let host = LocalReplicaHost::new(sandbox.service_mut(), |_| {});
            let deleted = host.delete_data(replica).await;
            drop(host);
            deleted.map_err(|e| e.to_string()).and_then(|()| {
                note_nodes(sandbox, dir).map(|()| format!("{replica}'s data deleted; its node is retired"))
            })
        }
        ControlRequest::Record { replicas } => record(sandbox, dir, *replicas).await,
    };
    match result {
        Ok(detail) => ControlAnswer { detail: Some(detail), ..ControlAnswer::default() },
        Err(error) => failed(error),
    }
}

/// Keeps the layout's nodes in step with the service's (an added node, a retired one), so
/// that a start on the kept data brings up exactly the nodes that are members.
fn note_nodes(sandbox: &Sandbox, dir: &Path) -> std::result::Result<(), String> {
    let Some(mut layout) = Layout::read(dir).map_err(|e| e.to_string())? else { return Ok(()) };
    let service = sandbox.service();
    layout.nodes = service.len();
    layout.retired = (0..service.len()).filter(|&i| service.is_retired(i)).collect();
    layout.write(dir).map_err(|e| e.to_string())
}

/// Records the count in the layout, and in the recovery info when it holds a deployment
/// (a service `br2k up` registered itself has none: its layout is its record).
///
/// The chain first: a start on kept data accepts the count of either record or of the
/// live nodes (see [`Layout::check_reuse`]), so a crash between the two writes leaves a
/// redeploy that still starts.
async fn record(sandbox: &Sandbox, dir: &Path, replicas: u32) -> std::result::Result<String, String> {
    let name = sandbox.service().name();
    let registry = sandbox.registry();
    let info = registry.info(name).await.map_err(|e| format!("reading {name:?}'s recovery info: {e}"))?;
    let on_chain = match DeploymentRecord::from_body(&info.recovery) {
        Err(_) => "no deployment is recorded on chain",
        Ok(deployment) if deployment.replicas == replicas => "the recovery info on chain already says so",
        Ok(mut deployment) => {
            deployment.replicas = replicas;
            crate::deployment::record(registry, name, &deployment, info.manager)
                .await
                .map_err(|e| format!("recording {replicas} replicas in {name:?}'s recovery info: {e}"))?;
            "and in the recovery info on chain"
        }
    };
    note_nodes(sandbox, dir)?;
    if let Some(mut layout) = Layout::read(dir).map_err(|e| e.to_string())? {
        layout.replicas = replicas as usize;
        layout.write(dir).map_err(|e| e.to_string())?;
    }
    Ok(format!("{replicas} replicas recorded in the layout ({on_chain})"))
}

/// A command's end: the runner of one state directory, as a membership change's
/// [`ReplicaHost`].
#[derive(Debug)]
pub struct RunnerHost {
    path: PathBuf,
    peer_urls: Vec<String>,
    /// How long a start may take (etcd and the app each up to the runner's startup timeout).
    start_timeout: Duration,
}

impl RunnerHost {
    /// The runner whose state directory is `dir` and whose run file is `run`. Nothing is
    /// asked of it until a step needs it ([`Self::ping`] checks that it listens).
    pub fn new(dir: &Path, run: &RunFile) -> Self {
        let scheme = if uses_tls(run) { "https" } else { "http" };
        let peer_urls = (0..MAX_NODES)
            .map(|i| {
                let address = LocalNetwork::address_of(run.namespaces, run.slot, i);
                format!("{scheme}://{}", super::socket(address, ETCD_PEER_PORT))
            })
            .collect();
        Self { path: dir.join(CONTROL_SOCKET), peer_urls, start_timeout: Duration::from_secs(120) }
    }

    /// Checks that the runner listens, before a change is journaled that needs it.
    ///
    /// # Errors
    /// No runner listens there (none runs, or one from before membership changes).
    pub async fn ping(&self) -> Result<()> {
        self.ask(&ControlRequest::Ping, Duration::from_secs(30)).await.map(drop).map_err(DeployError::Invalid)
    }

    async fn ask(&self, request: &ControlRequest, timeout: Duration) -> std::result::Result<ControlAnswer, String> {
        let exchange = async {
            let mut stream = UnixStream::connect(&self.path).await.map_err(|e| {
                format!(
                    "no runner answers at {} ({e}); is the service up (`br2k up --detach`)? A runner started by an older br2k has no control socket: restart it with `br2k up --keep-data`",
                    self.path.display()
                )
            })?;
            let mut text = serde_json::to_string(request).expect("plain data serialises");
            text.push('\n');
            stream.write_all(text.as_bytes()).await.map_err(|e| format!("sending to the runner: {e}"))?;
            let mut line = String::new();
            BufReader::new(tokio::io::AsyncReadExt::take(stream, MAX_LINE))
                .read_line(&mut line)
                .await
                .map_err(|e| format!("reading the runner's answer: {e}"))?;
            serde_json::from_str::<ControlAnswer>(&line)
                .map_err(|e| format!("the runner's answer {line:?} is not one: {e} (did it exit?)"))
        };
        let answer = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("the runner did not answer within {timeout:?}"))??;
        match answer.error {
            Some(error) => Err(format!("the runner: {error}")),
            None => Ok(answer),
        }
    }

    async fn act(&self, request: ControlRequest, timeout: Duration) -> std::result::Result<(), HostError> {
        self.ask(&request, timeout).await.map(drop).map_err(HostError::from)
    }
}

impl ReplicaHost for RunnerHost {
    fn peer_url(&self, replica: &str) -> String {
        let index = replica.strip_prefix('n').and_then(|n| n.parse::<usize>().ok()).and_then(|n| n.checked_sub(1));
        index.and_then(|i| self.peer_urls.get(i)).cloned().unwrap_or_else(|| format!("not-a-local-node://{replica}"))
    }

    async fn start(&self, replica: &str, initial_cluster: &str) -> std::result::Result<(), HostError> {
        let request =
            ControlRequest::Start { replica: replica.to_owned(), initial_cluster: initial_cluster.to_owned() };
        self.act(request, self.start_timeout).await
    }

    async fn stop(&self, replica: &str) -> std::result::Result<(), HostError> {
        self.act(ControlRequest::Stop { replica: replica.to_owned() }, Duration::from_secs(60)).await
    }

    async fn delete_data(&self, replica: &str) -> std::result::Result<(), HostError> {
        self.act(ControlRequest::DeleteData { replica: replica.to_owned() }, Duration::from_secs(60)).await
    }

    async fn record_replicas(&self, replicas: u32) -> std::result::Result<(), HostError> {
        self.act(ControlRequest::Record { replicas }, Duration::from_secs(120)).await
    }
}

/// The etcd cluster of the runner whose run file is `run`, as a membership change
/// reaches it (its live nodes' members). With etcd TLS the change presents a live node's
/// certificate, which whoever may read the runner's private state directory may use.
///
/// # Errors
/// With etcd TLS, when no live node's certificate files are there.
pub fn runner_cluster(run: &RunFile) -> Result<Cluster> {
    let live: Vec<_> = run.nodes.iter().filter(|n| !n.retired).collect();
    let endpoints: Vec<String> = live.iter().map(|n| n.etcd_url.clone()).collect();
    let tls = if uses_tls(run) {
        let node = live
            .iter()
            .find(|n| n.dir.join("tls/member.key").is_file())
            .ok_or_else(|| DeployError::Invalid("the service's etcd asks for TLS and no live node's certificate files are in its state directory (n<i>/tls/)".into()))?;
        let tls = node.dir.join("tls");
        Some(br2k_replication::EtcdTls {
            ca: tls.join("ca.crt"),
            cert: tls.join("member.crt"),
            key: tls.join("member.key"),
        })
    } else {
        None
    };
    Ok(Cluster { endpoints, tls, timeout: Duration::from_secs(3) })
}

/// Whether the runner's etcd members talk TLS.
fn uses_tls(run: &RunFile) -> bool {
    run.nodes.iter().any(|n| n.etcd_url.starts_with("https://"))
}

/// The options a change of the runner whose run file is `run` runs with.
pub fn change_options(run: &RunFile) -> ChangeOptions {
    ChangeOptions {
        catch_up_window: run.catch_up_window.unwrap_or_else(|| ChangeOptions::default().catch_up_window),
        ..ChangeOptions::default()
    }
}

/// Finishes the membership change of `service` (run from `dir`) that nobody runs now.
pub(super) async fn finish_abandoned_change(
    service: &str,
    dir: &Path,
    progress: crate::backend::Progress<'_>,
) -> Result<Option<String>> {
    let Some(run) = RunFile::read(dir)?.filter(RunFile::runner_alive) else { return Ok(None) };
    let cluster = runner_cluster(&run)?;
    let host = RunnerHost::new(dir, &run);
    let report = |line: &str| progress(line);
    let membership = Membership::new(service, cluster, &host, change_options(&run), &report);
    match membership.finish_abandoned().await {
        Ok(finished) => {
            Ok(finished.map(|change| format!("{} finished ({} replicas)", change.kind, change.replicas_after)))
        }
        Err(e) => Err(DeployError::Invalid(format!("finishing {service:?}'s membership change: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_named_by_op() {
        let request = ControlRequest::Start { replica: "n4".into(), initial_cluster: "n1=http://a:2380".into() };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"op":"start","replica":"n4","initial_cluster":"n1=http://a:2380"}"#);
        assert_eq!(serde_json::from_str::<ControlRequest>(&text).unwrap(), request);
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"format_disk"}"#).is_err());
    }

    fn run_file(namespaces: bool) -> RunFile {
        RunFile {
            pid: 1,
            service: "s".into(),
            rpc_url: String::new(),
            registry: String::new(),
            location: None,
            epoch: None,
            slot: 4,
            namespaces,
            nodes: Vec::new(),
            catch_up_window: None,
        }
    }

    #[tokio::test]
    async fn a_command_without_a_runner_is_told_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let err = RunnerHost::new(dir.path(), &run_file(true)).ping().await.unwrap_err().to_string();
        assert!(err.contains("no runner answers") && err.contains("br2k up"), "{err}");
    }

    #[test]
    fn an_added_node_has_its_address_before_it_exists() {
        let dir = tempfile::tempdir().unwrap();
        let host = RunnerHost::new(dir.path(), &run_file(true));
        assert_eq!(host.peer_url("n4"), "http://10.213.4.14:2380");
        let host = RunnerHost::new(dir.path(), &run_file(false));
        assert_eq!(host.peer_url("n9"), "http://127.213.4.19:2380");
        assert!(host.peer_url("n10").starts_with("not-a-local-node://"), "a local service has 9 nodes at most");
        assert!(host.peer_url("x").starts_with("not-a-local-node://"));
    }
}
