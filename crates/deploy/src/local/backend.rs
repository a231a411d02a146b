//! The local backend behind the [`Backend`] interface: a service's replicas run on this
//! machine under a detached runner (`br2k up --detach --use-chain --keep-data`), from the
//! image pulled by digest and unpacked into a directory of their own.
//!
//! The runner is a process of its own so the replicas outlive whoever deployed them (the
//! `br2k deploy` command, or a manager daemon that may restart). Its state directory
//! (`STATE_ROOT/SERVICE`) keeps the replicas' data and the layout it was made with, so a
//! redeploy after every replica died starts on the same data, at the same addresses.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use futures::future::BoxFuture;

use super::run_file::{RunFile, running_pid};
use super::{NetworkMode, stop_runner};
use crate::backend::{Backend, Deployed, Progress, ReplicaView};
use crate::context::LOCAL;
use crate::deployment::DeploymentRecord;
use crate::error::{DeployError, Result};
use br2k_oci::image::ImageStore;
use br2k_oci::registry::RegistryList;

/// How to run a service's replicas on this machine.
#[derive(Clone, Debug)]
pub struct LocalBackend {
    /// The `br2k` executable whose `up` command runs the replicas.
    pub runner: PathBuf,
    /// Where each service's state directory goes (`br2k up`'s default: `<tmp>/br2k-<uid>/up`).
    pub state_root: PathBuf,
    /// Where each service's pulled image and unpacked files go (`<tmp>/br2k-<uid>/deploy`).
    pub image_root: PathBuf,
    /// The project's container registries (for plain-HTTP and credentials by URL).
    pub registries: RegistryList,
    /// Network placement of the nodes.
    pub network: NetworkMode,
    /// etcd's election timeout, milliseconds.
    pub election_ms: u64,
    /// The chain the leader publishes to, as the nodes reach it.
    pub rpc_url: String,
    /// The service registry.
    pub registry: Address,
    /// The service's manager key: it registers the replicas' own operator keys.
    pub key: PrivateKeySigner,
    /// How often a deployed service backs up (to the registry its image is in), records a
    /// backup on chain, and which backups it keeps.
    pub backup: crate::backup_schedule::BackupSchedule,
    /// TLS for the replicas' etcd traffic (`br2k up --etcd-tls`).
    pub etcd_tls: bool,
}

/// How long a runner may take to put the replicas up and publish a leader.
const START_TIMEOUT: Duration = Duration::from_secs(180);

impl LocalBackend {
    /// The defaults `br2k up` and `br2k deploy` use for `state_root` and `image_root`, in
    /// the user's private [`super::work_root`].
    ///
    /// # Errors
    /// When the private directory cannot be made or is not private.
    pub fn default_roots() -> Result<(PathBuf, PathBuf)> {
        let root = super::work_root()?;
        Ok((root.join("up"), root.join("deploy")))
    }

    /// The state directory of `service`'s runner.
    pub fn state_dir(&self, service: &str) -> PathBuf {
        self.state_root.join(service)
    }

    /// Where `service`'s image is unpacked (its app binary is below `rootfs/`).
    pub fn image_dir(&self, service: &str) -> PathBuf {
        self.image_root.join(service)
    }

    async fn deploy_now(&self, service: &str, record: &DeploymentRecord, progress: Progress<'_>) -> Result<Deployed> {
        let state = self.state_dir(service);
        if let Some(pid) = running_pid(&state) {
            progress(&format!("stopping the runner that is there (pid {pid}); the replicas' data stays"));
            stop_runner(pid, Duration::from_secs(30)).await?;
        }
        let dir = self.image_dir(service);
        let entry = self.registries.entry_for_url(&record.image.registry_url)?;
        let pulled = ImageStore::new(dir.join("store"));
        progress(&format!("pulling {} (every blob checked against its digest)", record.image.pull_reference()));
        let image = entry
            .client()?
            .pull(&pulled, &record.image.repository, &record.image.digest, &record.image.repository, "deployed")
            .await?;
        let rootfs = dir.join("rootfs");
        if rootfs.exists() {
            std::fs::remove_dir_all(&rootfs)
                .map_err(|e| DeployError::io(format!("remove the old {}", rootfs.display()), e))?;
        }
        let app = pulled.extract(&image, &rootfs)?;
        progress(&format!("unpacked {} to {}", image.entrypoint, app.display()));

        progress(&format!("starting {} replicas under a runner (state in {})", record.replicas, state.display()));
        let mut command = tokio::process::Command::new(&self.runner);
        command
            .args(["--json", "--quiet", "up", "--detach", "--use-chain", "--keep-data", "--name", service])
            .arg("--state-dir")
            .arg(&state)
            .arg("--app")
            .arg(&app)
            .args(["--replicas", &record.replicas.to_string()])
            .args(["--network", &self.network.to_string()])
            .args(["--election-timeout", &self.election_ms.to_string()])
            .args(["--rpc-url", &self.rpc_url, "--registry", &self.registry.to_string()])
            // The leader backs up to the registry the image came from, in its repository.
            .args(["--backup-registry", &record.image.registry_url, "--backup-repository", &record.image.repository])
            .args(["--backup-interval", &self.backup.interval.to_string()])
            .args(["--backup-record-interval", &self.backup.record_interval.to_string()])
            .args(["--backup-keep-last", &self.backup.keep_last.to_string()])
            .args(["--backup-keep-daily", &self.backup.keep_daily.to_string()])
            .args(entry.plain_http.then_some("--backup-plain-http"))
            .args(self.etcd_tls.then_some("--etcd-tls"))
            // The key travels in the environment, never on argv (the process list shows argv).
            .env("ETH_PRIVATE_KEY", alloy::hex::encode_prefixed(self.key.to_bytes()))
            .env_remove("ETH_KEYSTORE")
            .env_remove("ETH_PASSWORD_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(START_TIMEOUT, command.output())
            .await
            .map_err(|_| DeployError::NotReady {
                what: format!("the runner of {service:?}"),
                timeout: START_TIMEOUT,
                log: Some(self.state_root.join(format!("{service}.log"))),
            })?
            .map_err(|e| DeployError::io(format!("start {}", self.runner.display()), e))?;
        if !output.status.success() {
            return Err(DeployError::Exited {
                what: format!("`br2k up` for {service:?}: {}", String::from_utf8_lossy(&output.stderr).trim()),
                status: output.status.to_string(),
                log: Some(self.state_root.join(format!("{service}.log"))),
            });
        }
        let up: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        let location = up["location"].as_str().map(str::to_owned);
        Ok(Deployed {
            summary: format!(
                "{} replicas of {service} on {LOCAL} from {} (runner pid {})",
                record.replicas,
                record.image.pull_reference(),
                up["pid"].as_u64().map_or_else(|| "?".into(), |p| p.to_string())
            ),
            location,
        })
    }
}

/// What runs of the service whose runner keeps its state in `state`: one entry per node
/// (its processes, and its `/br2k/status` when it answers), one entry for a runner still
/// starting, none when nothing was deployed there.
///
/// # Errors
/// A damaged run file.
pub async fn replica_views(state: &Path) -> Result<Vec<ReplicaView>> {
    let Some(run) = RunFile::read(state)? else {
        return Ok(match running_pid(state) {
            // A runner that has not written its first run file yet is starting them.
            Some(pid) => vec![starting(pid)],
            None => Vec::new(),
        });
    };
    if !run.runner_alive() {
        if let Some(pid) = running_pid(state) {
            return Ok(vec![starting(pid)]); // a new runner, still on the old run file
        }
        // The runner's children die with it (parent-death signal): nothing runs.
        return Ok(run
            .nodes
            .iter()
            .filter(|node| !node.retired)
            .map(|node| ReplicaView {
                name: node.name.clone(),
                running: false,
                status: None,
                detail: Some(format!("its runner (pid {}) is gone", run.pid)),
                learner: false,
            })
            .collect());
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_millis(500))
        .no_proxy()
        .build()
        .map_err(|e| DeployError::Invalid(format!("cannot build an HTTP client: {e}")))?;
    let views = run.nodes.iter().filter(|node| !node.retired).map(|node| {
        let http = http.clone();
        async move {
            let running = [node.app_pid, node.etcd_pid].iter().flatten().any(|pid| super::process_exists(*pid));
            let url = format!("{}/br2k/status", node.app_url);
            let answer = match http.get(&url).send().await {
                Ok(response) => response.json::<br2k_replication::Status>().await.map_err(|e| e.to_string()),
                Err(e) => Err(innermost_cause(&e)),
            };
            let (status, detail) = match answer {
                Ok(status) => (Some(status), None),
                Err(e) => (None, Some(format!("{url}: {e}"))),
            };
            ReplicaView { name: node.name.clone(), running, status, detail, learner: false }
        }
    });
    Ok(futures::future::join_all(views).await)
}

/// Why a request failed, in words a person can act on: reqwest's own message only says
/// that sending failed; its innermost cause says why (connection refused, timed out).
fn innermost_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    if std::ptr::addr_eq(cause, err) { err.to_string() } else { format!("{err}: {cause}") }
}

/// The one entry shown for a runner that is still starting its replicas.
fn starting(pid: u32) -> ReplicaView {
    ReplicaView {
        name: "runner".into(),
        running: true,
        status: None,
        detail: Some(format!("runner pid {pid} is starting the replicas")),
        learner: false,
    }
}

impl Backend for LocalBackend {
    fn context(&self) -> &str {
        LOCAL
    }

    fn deploy<'a>(
        &'a self,
        service: &'a str,
        record: &'a DeploymentRecord,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Deployed>> {
        Box::pin(self.deploy_now(service, record, progress))
    }

    fn replicas<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<ReplicaView>>> {
        Box::pin(async move { replica_views(&self.state_dir(service)).await })
    }

    fn finish_membership_change<'a>(
        &'a self,
        service: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        let (name, dir) = (service.to_owned(), self.state_dir(service));
        Box::pin(async move {
            // A change's future is not `Send` (etcd calls through async closures, which
            // the compiler cannot yet prove Send for every lifetime): it runs on a thread
            // of its own, its progress sent back line by line.
            let (lines, mut received) = tokio::sync::mpsc::unbounded_channel::<String>();
            let runtime = tokio::runtime::Handle::current();
            let mut task = tokio::task::spawn_blocking(move || {
                let report = move |line: &str| drop(lines.send(line.to_owned()));
                runtime.block_on(super::control::finish_abandoned_change(&name, &dir, &report))
            });
            loop {
                tokio::select! {
                    Some(line) = received.recv() => progress(&line),
                    finished = &mut task => {
                        while let Ok(line) = received.try_recv() {
                            progress(&line);
                        }
                        return finished.map_err(|e| DeployError::Invalid(format!("the membership change's task failed: {e}")))?;
                    }
                }
            }
        })
    }
}
