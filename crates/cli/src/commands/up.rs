//! `br2k up` and `br2k down`: a service's replicas on this machine (the local backend).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_deploy::local::control::{ControlRequest, ControlSocket};
use br2k_deploy::local::run_file::{Layout, NodeEntry, RunFile, RunnerClaim};
use br2k_deploy::local::{ChainChoice, DiskLimits, EtcdTimings, LocalChainOptions, Part, Sandbox, SandboxSpec};
use br2k_replication::Role;
use clap::Args;

use super::GlobalOpts;
use crate::opts::LocalReplicaOpts;
use crate::output::Output;

const UP_EXAMPLES: &str = "\
Examples:
  br2k up                          # 3 logserver replicas, a local anvil and registry; Ctrl-C stops
  br2k up --detach                 # the same in the background; `br2k down` stops it
  br2k up --replicas 5 --app ./target/release/my-service --name my-service
  br2k up --use-chain --rpc-url http://10.0.0.5:8545 --registry 0x... (ETH_PRIVATE_KEY: manager key)

Try a failover: kill the leader's processes by hand (`kill -9 APP_PID ETCD_PID` of the node
whose role is \"leader\" in STATE_DIR/run.json) and watch `br2k up` report a new leader and
its new location in the registry within seconds.";

/// Run a service's replicas on this machine: each node an etcd member plus the app, in its
/// own network namespace when run as root. Starts a local anvil with a service registry
/// (unless --use-chain), registers the service and one operator key per replica, then
/// stays in the foreground printing role changes and the leader's published location.
/// Dead processes are started again after a few seconds.
#[derive(Args, Debug)]
#[command(after_help = UP_EXAMPLES)]
pub(crate) struct UpArgs {
    /// The service name (1-64 letters, digits, '-', '_', '.').
    #[arg(long, default_value = "logserver", value_parser = crate::opts::parse_service_name)]
    name: String,

    /// Data, logs and run.json go here; wiped at each `up` unless --keep-data
    /// [default: <tmp>/br2k-UID/up/NAME].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Start the replicas on the data an earlier `up` of this service left in the state
    /// directory (same replica count and network mode), as a redeploy after a crash does;
    /// without earlier data, start afresh.
    #[arg(long)]
    keep_data: bool,

    /// TLS for etcd's client and peer traffic: certificates of an authority made for this
    /// start (one per node, in n<i>/tls/), and every member asks its clients and peers
    /// for one. Without it they talk plain HTTP on the nodes' addresses.
    #[arg(long)]
    etcd_tls: bool,

    /// Use the chain at --rpc-url (and --registry, or a new one) with the wallet key as the
    /// service's manager, instead of starting a local anvil.
    #[arg(long)]
    use_chain: bool,

    /// With --use-chain: each replica's own operator key (kept 0600 in the state
    /// directory's operators/) is topped up to this much ETH from the wallet key when below
    /// half of it, for the gas of publishing locations. 0 sends nothing.
    #[arg(long, value_name = "ETH", default_value = "0.05", value_parser = crate::backends::parse_ether)]
    operator_funds: alloy::primitives::U256,

    /// With --use-chain: the container registry the leader backs the service up to (the
    /// one its recovery info names); its credentials come from the environment or Docker's
    /// config.json. A replica that starts where every member lost its data restores the
    /// backup recorded on chain.
    #[arg(long, value_name = "URL", requires_all = ["use_chain", "backup_repository"])]
    backup_registry: Option<String>,

    /// The repository backups go to (the service's image repository).
    #[arg(long, value_name = "REPOSITORY")]
    backup_repository: Option<String>,

    #[command(flatten)]
    backup: crate::opts::BackupScheduleOpts,

    /// The backup registry is plain HTTP (allowed for it in the project's registry list).
    #[arg(long)]
    backup_plain_http: bool,

    /// Run in the background; returns once the service is up. Stop it with `br2k down`.
    #[arg(long)]
    detach: bool,

    /// Do not start dead processes again.
    #[arg(long)]
    no_restart: bool,

    #[command(flatten)]
    local: LocalReplicaOpts,
}

impl UpArgs {
    /// The environment that tells the app where to back up (as the log server reads it).
    fn backup_env(&self) -> Vec<(String, String)> {
        let (Some(registry), Some(repository)) = (&self.backup_registry, &self.backup_repository) else {
            return Vec::new();
        };
        let mut env = vec![
            ("BR2K_BACKUP_REGISTRY".into(), registry.clone()),
            ("BR2K_BACKUP_REPOSITORY".into(), repository.clone()),
            ("BR2K_BACKUP_PLAIN_HTTP".into(), self.backup_plain_http.to_string()),
        ];
        env.extend(self.backup.schedule().env());
        env
    }
}

/// Stop a service that `br2k up --detach` runs (its processes, namespaces and chain), or
/// with --context remove a service `br2k deploy` put on Kubernetes (its volumes stay
/// unless --delete-data).
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  br2k down logserver\n  br2k down logserver --context prod\n  br2k down logserver --context prod --delete-data"
)]
pub(crate) struct DownArgs {
    /// The service name (as NAME or --name).
    #[arg(value_name = "NAME", value_parser = crate::opts::parse_service_name, conflicts_with = "name")]
    service: Option<String>,

    /// The service name.
    #[arg(long, default_value = "logserver", value_parser = crate::opts::parse_service_name)]
    name: String,

    /// The state directory given to `br2k up` [default: <tmp>/br2k-UID/up/NAME].
    #[arg(long, value_name = "DIR", conflicts_with = "context")]
    state_dir: Option<PathBuf>,

    /// A Kubernetes context: remove what `br2k deploy` created there (StatefulSets, their
    /// Pods, Services, the disruption budget, the network policy, settings and Secrets),
    /// keeping the volumes and so every acknowledged request [default: this machine's
    /// `br2k up`].
    #[arg(long)]
    context: Option<String>,

    /// With --context: delete the volumes too. The service's data is gone for good, save
    /// for its backups.
    #[arg(long, requires = "context")]
    delete_data: bool,

    #[command(flatten)]
    config: super::context::DirArg,
}

/// The environment variable a detached child is started with (so it knows to write its
/// readiness into run.json rather than print to a terminal nobody reads).
const DETACHED_ENV: &str = "BR2K_UP_DETACHED";

/// The state directory: the one given, or `NAME` in the user's private `<tmp>/br2k-<uid>/up`.
pub(crate) fn state_dir(name: &str, given: Option<PathBuf>) -> Result<PathBuf> {
    // A name read from the chain must not climb out of the work root (`../x`).
    if given.is_none() && !br2k_replication::is_valid_name(name) {
        bail!("{name:?} is not a service name br2k runs (it must be {})", br2k_replication::NAME_RULE);
    }
    match given {
        Some(dir) => Ok(dir),
        None => Ok(br2k_deploy::local::work_root()?.join("up").join(name)),
    }
}

impl UpArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let dir = state_dir(&self.name, self.state_dir.clone())?;
        if let Some(pid) = running_pid(&dir) {
            bail!(
                "{:?} is already up (runner pid {pid}, state in {}); stop it with `br2k down --name {}`",
                self.name,
                dir.display(),
                self.name
            );
        }
        if self.detach {
            return detach(&dir, &out).await;
        }
        let app = self.local.app()?;
        let snapshots = self.local.snapshots()?;
        let catch_up_window = br2k_membership::catch_up_window(&snapshots);
        let chain = if self.use_chain {
            let key = global.wallet.require_signer("publishing the service")?;
            ChainChoice::Existing {
                rpc_url: global.chain.rpc_url.clone(),
                registry: global.registry.registry,
                key: Box::new(key),
                operator_funds: self.operator_funds,
            }
        } else {
            ChainChoice::Local(LocalChainOptions::default())
        };
        let kept = if self.keep_data { Layout::read(&dir)? } else { None };
        if let Some(layout) = &kept {
            layout.check_reuse(&self.name, self.local.count(), self.local.network.uses_namespaces(), &dir)?;
        } else if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("wiping the old state in {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let _claim = RunnerClaim::take(&dir)?;
        let spec = SandboxSpec {
            service: self.name.clone(),
            // Kept data whose membership changed has more nodes than replicas.
            replicas: kept.as_ref().map_or(self.local.count(), Layout::node_count),
            retired: kept.as_ref().map(|layout| layout.retired.clone()).unwrap_or_default(),
            app,
            app_args: Vec::new(),
            app_env: [("BR2K_OUTBOX".into(), dir.join("outbox").display().to_string())]
                .into_iter()
                .chain(br2k_deploy::local::snapshot_env(&snapshots))
                .chain(self.backup_env())
                .collect(),
            work_dir: dir.clone(),
            network: self.local.network,
            slot: kept.as_ref().map(|layout| layout.slot),
            etcd: EtcdTimings::with_election_ms(self.local.election_timeout),
            chain,
            startup_timeout: Duration::from_secs(30),
            disks: DiskLimits::default(),
            etcd_tls: self.etcd_tls,
        };
        let progress = |line: &str| out.progress(format_args!("up: {line}"));
        let mut sandbox = tokio::select! {
            sandbox = Sandbox::start(spec, &progress) => sandbox?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted while starting; everything started was stopped"),
        };
        let network = sandbox.service().network();
        let service = sandbox.service();
        Layout {
            service: self.name.clone(),
            replicas: self.local.count(),
            nodes: service.len(),
            retired: (0..service.len()).filter(|&i| service.is_retired(i)).collect(),
            slot: network.slot(),
            namespaces: network.uses_namespaces(),
        }
        .write(&dir)?;
        let control = ControlSocket::bind(&dir)?;
        if kept.is_some() {
            progress(&format!("started on the data kept in {}", dir.display()));
        }
        let mode =
            if network.uses_namespaces() { "network namespaces" } else { "loopback addresses (partitions need root)" };
        progress(&format!(
            "{} replicas of {:?} on {mode}; registry {} on {}",
            sandbox.service().len(),
            self.name,
            sandbox.registry().address(),
            sandbox.rpc_url()
        ));
        for i in sandbox.service().live_nodes() {
            progress(&format!(
                "  {}: app {}  etcd {}  logs {}",
                sandbox.service().node_name(i),
                sandbox.service().app_url(i),
                sandbox.service().etcd_url(i),
                sandbox.service().node_dir(i).display()
            ));
        }
        let runner = Runner { dir: &dir, control: &control, restart: !self.no_restart, catch_up_window };
        let result = supervise(&mut sandbox, &runner, &out).await;
        progress("stopping");
        sandbox.shutdown().await;
        let _ = std::fs::remove_file(dir.join("run.json"));
        progress("stopped");
        result
    }
}

/// Prints role and location changes until Ctrl-C or SIGTERM; keeps run.json current.
/// What the supervising loop keeps besides the sandbox.
struct Runner<'a> {
    dir: &'a Path,
    control: &'a ControlSocket,
    /// Start dead processes again.
    restart: bool,
    /// Written to run.json for membership changes.
    catch_up_window: u64,
}

async fn supervise(sandbox: &mut Sandbox, runner: &Runner<'_>, out: &Output) -> Result<()> {
    let Runner { dir, control, restart, .. } = *runner;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut roles: HashMap<usize, Option<Role>> = HashMap::new();
    let mut location: Option<(String, u64)> = None;
    let mut dead_since: HashMap<usize, Instant> = HashMap::new();
    let mut ready_announced = false;
    let mut last_written = String::new();
    loop {
        for (i, part, how) in sandbox.service_mut().exited() {
            out.progress(format_args!("{}: {part} exited ({how})", sandbox.service().node_name(i)));
            dead_since.entry(i).or_insert_with(Instant::now);
        }
        if restart {
            let due: Vec<usize> =
                dead_since.iter().filter(|(_, t)| t.elapsed() >= Duration::from_secs(3)).map(|(i, _)| *i).collect();
            for i in due {
                dead_since.remove(&i);
                out.progress(format_args!("{}: starting it again", sandbox.service().node_name(i)));
                if let Err(e) = sandbox.service_mut().restart(i).await {
                    out.progress(format_args!("{}: could not start it again: {e}", sandbox.service().node_name(i)));
                }
            }
        }
        let statuses = sandbox.service().statuses().await;
        for (i, status) in statuses.iter().enumerate() {
            let role = status.as_ref().ok().map(|s| s.role);
            if roles.get(&i) != Some(&role) {
                let name = sandbox.service().node_name(i);
                match status {
                    Ok(s) if s.role == Role::Leader => {
                        out.progress(format_args!("{name}: leader (epoch {})", s.epoch.unwrap_or(0)));
                    }
                    Ok(s) => out.progress(format_args!("{name}: {}", role_word(s.role))),
                    Err(_) if roles.contains_key(&i) => out.progress(format_args!("{name}: not answering")),
                    Err(_) => {}
                }
                roles.insert(i, role);
            }
        }
        if let Ok(resolved) = sandbox.registry().service_location(sandbox.service().name()).await
            && !resolved.location.is_empty()
            && location.as_ref().is_none_or(|(_, epoch)| *epoch != resolved.epoch)
        {
            out.progress(format_args!(
                "registry: {} is served at {} (epoch {})",
                sandbox.service().name(),
                resolved.location,
                resolved.epoch
            ));
            location = Some((resolved.location, resolved.epoch));
        }
        write_run_file(sandbox, runner, &statuses, location.as_ref(), &mut last_written)?;
        if !ready_announced && location.is_some() {
            ready_announced = true;
            out.progress(format_args!(
                "up: ready; Ctrl-C (or `br2k down --name {}`) stops it",
                sandbox.service().name()
            ));
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            // A membership change asks for a replica started, stopped or retired: done
            // here, between polls, since this loop owns the processes.
            Ok(stream) = control.accept() => {
                if let Some(request) = ControlSocket::serve(stream, sandbox, dir).await
                    && request != ControlRequest::Ping
                {
                    out.progress(format_args!("control: {}", describe_request(&request)));
                    for i in 0..sandbox.service().len() {
                        if sandbox.service().is_retired(i) {
                            dead_since.remove(&i); // nothing of a retired node is started again
                        }
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
    }
}

/// A control request as the runner's output reports it.
fn describe_request(request: &ControlRequest) -> String {
    match request {
        ControlRequest::Ping => "asked whether it listens".into(),
        ControlRequest::Start { replica, .. } => format!("{replica} started, joining the etcd cluster"),
        ControlRequest::Stop { replica } => format!("{replica} stopped"),
        ControlRequest::DeleteData { replica } => format!("{replica}'s data deleted; the node is retired"),
        ControlRequest::Record { replicas } => format!("{replicas} replicas recorded"),
    }
}

/// The role as run.json names it (as `/br2k/status` does).
const fn role_name(role: Role) -> &'static str {
    match role {
        Role::Follower => "follower",
        Role::Register => "register",
        Role::Leader => "leader",
    }
}

const fn role_word(role: Role) -> &'static str {
    match role {
        Role::Follower => "follower",
        Role::Register => "taking over (register)",
        Role::Leader => "leader",
    }
}

fn write_run_file(
    sandbox: &Sandbox,
    runner: &Runner<'_>,
    statuses: &[Result<br2k_replication::Status, String>],
    location: Option<&(String, u64)>,
    last_written: &mut String,
) -> Result<()> {
    let service = sandbox.service();
    let run = RunFile {
        pid: std::process::id(),
        service: service.name().to_owned(),
        rpc_url: sandbox.rpc_url().to_owned(),
        registry: sandbox.registry().address().to_string(),
        location: location.map(|(l, _)| l.clone()),
        epoch: location.map(|(_, e)| *e),
        slot: service.network().slot(),
        namespaces: service.network().uses_namespaces(),
        nodes: (0..service.len())
            .map(|i| NodeEntry {
                name: service.node_name(i).to_owned(),
                app_url: service.app_url(i),
                etcd_url: service.etcd_url(i),
                app_pid: service.pid(i, Part::App),
                etcd_pid: service.pid(i, Part::Etcd),
                role: statuses.get(i).and_then(|s| s.as_ref().ok()).map(|s| role_name(s.role).to_owned()),
                dir: service.node_dir(i).to_owned(),
                retired: service.is_retired(i),
            })
            .collect(),
        catch_up_window: Some(runner.catch_up_window),
    };
    let text = serde_json::to_string_pretty(&run)?;
    if text == *last_written {
        return Ok(()); // nothing changed since the last poll
    }
    run.write(runner.dir)?;
    *last_written = text;
    Ok(())
}

/// The runner pid recorded in `dir`, if that runner still runs.
pub(crate) fn running_pid(dir: &Path) -> Option<u32> {
    br2k_deploy::local::run_file::running_pid(dir)
}

/// Starts this same command again in the background (without --detach), its output in
/// `dir/up.log`, and waits until it reports ready in run.json.
async fn detach(dir: &Path, out: &Output) -> Result<()> {
    if std::env::var_os(DETACHED_ENV).is_some() {
        bail!("--detach given to an already detached runner");
    }
    let log_dir = dir.parent().unwrap_or(dir).to_owned();
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let log_path = log_dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--detach").collect();
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut child = tokio::process::Command::new(exe)
        .args(&args)
        .env(DETACHED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the background runner")?;
    out.progress(format_args!("up: starting in the background (output in {})", log_path.display()));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the background runner exited ({status}) before the service was up; its output:\n{tail}");
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("run.json"))
            && let Ok(run) = serde_json::from_str::<RunFile>(&text)
            && Some(run.pid) == child.id() // not a stale file of a runner that crashed
            && let Some(location) = &run.location
            // Published, and the node there serves (a Register publishes just before).
            && run.nodes.iter().any(|n| &n.app_url == location && n.role.as_deref() == Some("leader"))
        {
            out.result(
                &format!(
                    "{} is up at {location} (runner pid {}; state in {}; `br2k down --name {}` stops it)",
                    run.service,
                    run.pid,
                    dir.display(),
                    run.service
                ),
                &serde_json::to_value(&run)?,
            )?;
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the service was not up within 180 s; see {}", log_path.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl DownArgs {
    pub(crate) async fn run(mut self, global: &GlobalOpts) -> Result<()> {
        if let Some(service) = self.service.take() {
            self.name = service;
        }
        if let Some(context) = self.context.clone().filter(|c| c != br2k_deploy::context::LOCAL) {
            return self.down_on_kubernetes(global, &context).await;
        }
        let out = global.output();
        let dir = state_dir(&self.name, self.state_dir)?;
        let path = dir.join("run.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "{:?} is not up here (no {}); `br2k up --detach --name {}` starts it",
                    self.name,
                    path.display(),
                    self.name
                )
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        };
        let run: RunFile =
            serde_json::from_str(&text).with_context(|| format!("{} is not a br2k run file", path.display()))?;
        out.progress(format_args!("down: stopping {:?} (runner pid {})", run.service, run.pid));
        let stopped = br2k_deploy::local::stop_runner(run.pid, Duration::from_secs(30)).await?;
        let _ = std::fs::remove_file(&path);
        let word = if stopped { "stopped" } else { "was not running (stale run file removed)" };
        out.result(
            &format!("{} {word}", run.service),
            &serde_json::json!({ "service": run.service, "stopped": stopped }),
        )
    }

    async fn down_on_kubernetes(&self, global: &GlobalOpts, context: &str) -> Result<()> {
        let out = global.output();
        let contexts = self.config.contexts()?;
        let info = contexts.get(context)?;
        let client = br2k_deploy::kubernetes::connect(&contexts, context).await?;
        out.progress(format_args!(
            "down: removing {} from {} (namespace {}){}",
            self.name,
            info.server,
            info.namespace,
            if self.delete_data { ", its volumes too" } else { "; its volumes stay" }
        ));
        let down =
            br2k_deploy::kubernetes::take_down(&client, &info.namespace, &self.name, self.delete_data, &|line| {
                out.progress(format_args!("down: {line}"));
            })
            .await?;
        let kept = if down.kept_volumes.is_empty() {
            String::new()
        } else {
            format!(
                "; kept {} volumes ({}): `br2k deploy {} --context {context}` starts it on them again, `--delete-data` removes them",
                down.kept_volumes.len(),
                down.kept_volumes.join(", "),
                self.name
            )
        };
        out.result(
            &format!("{} removed from {context}: {} objects deleted{kept}", self.name, down.deleted.len()),
            &serde_json::json!({ "service": self.name, "context": context, "deleted": down.deleted, "keptVolumes": down.kept_volumes }),
        )
    }
}
