//! `br2k-logserver`: one replica of the paper's log server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, Result, bail};
use br2k_logserver::{LogState, service};
use br2k_oci::registry::{Credentials, RegistryClient, TOKEN_HOSTS_ENV, host_of};
use br2k_replication::backup::BackupConfig;
use br2k_replication::{Config, Limits, Publisher, SnapshotPolicy, Timings};
use br2k_resolver::{Chain, Timeouts};
use clap::Parser;

/// One replica of the BR2K log server. Run one per node, each next to its own etcd member;
/// the replica whose etcd member leads serves clients and publishes itself in the registry.
///
/// Example (3 replicas, one of them):
///   br2k-logserver --replica n1 --etcd http://127.0.0.1:2379 --listen 127.0.0.1:8081
///   --data-dir /var/lib/logserver/n1 --registry 0x5FbD… --rpc-url http://127.0.0.1:8545
///   (with the operator key in ETH_PRIVATE_KEY)
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Service name, as registered in the service registry.
    #[arg(long, env = "BR2K_SERVICE", default_value = "logserver")]
    service: String,
    /// This replica's id (unique within the service; letters, digits, '-', '_', '.').
    #[arg(long, env = "BR2K_REPLICA")]
    replica: String,
    /// Client URL of this replica's own etcd member.
    #[arg(long, env = "BR2K_ETCD", default_value = "http://127.0.0.1:2379")]
    etcd: String,
    /// Address the HTTP front listens on.
    #[arg(long, env = "BR2K_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// URL clients reach this replica at (published when it leads) [default: http://LISTEN].
    #[arg(long, env = "BR2K_PUBLIC_URL")]
    public_url: Option<String>,
    /// Directory for this replica's log and record file.
    #[arg(long, env = "BR2K_DATA_DIR")]
    data_dir: PathBuf,
    /// Directory notifications are "sent" to (shared by the replicas) [default: DATA_DIR/outbox].
    #[arg(long, env = "BR2K_OUTBOX")]
    outbox: Option<PathBuf>,
    /// Service registry address; without it the leader's location is not published.
    #[arg(long, env = "BR2K_REGISTRY")]
    registry: Option<Address>,
    /// Ethereum JSON-RPC endpoint of the chain holding the registry.
    #[arg(long, env = "ETH_RPC_URL", default_value = "http://127.0.0.1:8545")]
    rpc_url: String,
    /// This replica's operator key (hex), allowed by the manager to publish locations.
    #[arg(long, env = "ETH_PRIVATE_KEY", hide_env_values = true)]
    private_key: Option<String>,
    /// How often the leader condition is checked, in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    check_interval_ms: u64,
    /// Bound on every etcd call, in milliseconds; an unanswered leader check counts as "not leader".
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    etcd_timeout_ms: u64,
    /// Largest request body accepted, in bytes (over it: 413).
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1..=524_288))]
    max_body: u64,
    /// Largest request head (request line and headers), in bytes (over it: 431).
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u64).range(1024..=65_536))]
    max_head: u64,
    /// Open client connections; beyond it new ones are answered 503 and closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_connections: u64,
    /// Seconds a handler may take for one request; a leader whose handler takes longer
    /// (or panics) steps down and hands leadership to another replica.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    handler_timeout: u64,
    /// The container registry the leader backs the service up to (the one in its recovery
    /// info), e.g. `https://registry.example`; without it there are no backups.
    /// Credentials come from BR2K_REGISTRY_USERNAME/BR2K_REGISTRY_PASSWORD or Docker's
    /// config.json, never from etcd or the chain.
    #[arg(long, env = "BR2K_BACKUP_REGISTRY", value_name = "URL", requires = "backup_repository")]
    backup_registry: Option<String>,
    /// The repository backups go to (the service's image repository), e.g. `br2k/logserver`.
    #[arg(long, env = "BR2K_BACKUP_REPOSITORY", value_name = "REPOSITORY")]
    backup_repository: Option<String>,
    /// Seconds between two backups: what a total disaster can lose is bounded by it.
    #[arg(long, env = "BR2K_BACKUP_INTERVAL", value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    backup_interval: u64,
    /// Allow a backup registry reached over plain HTTP (a test or loopback registry).
    #[arg(long, env = "BR2K_BACKUP_PLAIN_HTTP")]
    backup_plain_http: bool,
    /// A file (mode 0600) holding the token clients must send as `Authorization: Bearer
    /// TOKEN`; without it the log server is open to anyone who reaches it. Or set
    /// BR2K_CLIENT_TOKEN.
    #[arg(long, value_name = "PATH")]
    client_token_file: Option<PathBuf>,
    /// Applied entries between two snapshots of this replica's state; 0 turns snapshots
    /// and log compaction off (the log in etcd then grows for ever).
    #[arg(long, env = "BR2K_SNAPSHOT_INTERVAL", value_name = "ENTRIES", default_value_t = SnapshotPolicy::default().interval)]
    snapshot_interval: u64,
    /// Log entries kept in etcd below the leader's latest snapshot, so that a replica a
    /// little behind replays them instead of fetching a snapshot; smaller than the interval.
    #[arg(long, env = "BR2K_TRAILING_ENTRIES", value_name = "ENTRIES", default_value_t = SnapshotPolicy::default().trailing)]
    trailing_entries: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,br2k_replication=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let public_url = args.public_url.clone().unwrap_or_else(|| format!("http://{}", args.listen));
    let mut config = Config::new(&args.service, &args.replica, &args.etcd, args.listen, public_url, &args.data_dir);
    config.timings = Timings {
        check_interval: Duration::from_millis(args.check_interval_ms),
        etcd_timeout: Duration::from_millis(args.etcd_timeout_ms),
        ..Timings::default()
    };
    let size = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
    config.limits = Limits {
        max_body: size(args.max_body),
        max_head: size(args.max_head),
        max_connections: size(args.max_connections),
        handler_timeout: Duration::from_secs(args.handler_timeout),
        ..Limits::default()
    };
    config.snapshots = SnapshotPolicy { interval: args.snapshot_interval, trailing: args.trailing_entries };
    config.snapshots.check().map_err(|e| anyhow::anyhow!("--snapshot-interval / --trailing-entries: {e}"))?;
    if let Some(publisher) = publisher(&args).await? {
        config = config.with_publisher(publisher);
    }

    let outbox = args.outbox.clone().unwrap_or_else(|| args.data_dir.join("outbox"));
    let state = LogState::open(&args.data_dir, &outbox)
        .with_context(|| format!("cannot open the log in {}", args.data_dir.display()))?;
    config.backup = backup(&args)?;
    let token = client_token(&args)?;
    if token.is_none() {
        tracing::warn!(
            "no client token (--client-token-file or BR2K_CLIENT_TOKEN): anyone who reaches the log server can use it"
        );
    }
    let replica = service(config, token).build(state)?;
    replica.serve(shutdown_signal()).await?;
    Ok(())
}

/// Where the leader backs up, when a backup registry is given.
fn backup(args: &Args) -> Result<Option<BackupConfig>> {
    let (Some(url), Some(repository)) = (&args.backup_registry, &args.backup_repository) else { return Ok(None) };
    let host = host_of(url).with_context(|| format!("--backup-registry {url:?} is not a URL"))?;
    let credentials = Credentials::find(&host)?;
    let token_hosts = std::env::var(TOKEN_HOSTS_ENV).unwrap_or_default();
    let registry = RegistryClient::new(url, args.backup_plain_http, credentials)?
        .trusting_token_hosts(token_hosts.split(',').map(str::to_owned));
    Ok(Some(BackupConfig {
        registry: std::sync::Arc::new(registry),
        repository: repository.clone(),
        interval: Duration::from_secs(args.backup_interval),
    }))
}

/// The token clients must present, from BR2K_CLIENT_TOKEN or a 0600 file.
fn client_token(args: &Args) -> Result<Option<String>> {
    if let Ok(token) = std::env::var("BR2K_CLIENT_TOKEN") {
        return Ok(Some(token.trim().to_owned()).filter(|t| !t.is_empty()));
    }
    let Some(path) = &args.client_token_file else { return Ok(None) };
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(path)
            .with_context(|| format!("cannot read the client token file {}", path.display()))?
            .permissions(),
    );
    if mode & 0o077 != 0 {
        bail!(
            "the client token file {} is readable by others (mode {:o}): run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let token = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        bail!("the client token file {} is empty", path.display());
    }
    Ok(Some(token.to_owned()))
}

/// The registry publisher, when a registry is given.
async fn publisher(args: &Args) -> Result<Option<Publisher>> {
    let Some(address) = args.registry else {
        tracing::warn!("no --registry (BR2K_REGISTRY): the leader's location will not be published");
        return Ok(None);
    };
    let Some(key) = &args.private_key else {
        bail!("--registry needs the replica's operator key: set ETH_PRIVATE_KEY (or pass --private-key)");
    };
    let signer: PrivateKeySigner =
        key.trim().parse().map_err(|_| anyhow::anyhow!("ETH_PRIVATE_KEY / --private-key is not a hex private key"))?;
    let chain = Chain::connect(&args.rpc_url, Some(signer), Timeouts::default()).await?;
    let registry = chain.registry(address).await?;
    Ok(Some(Publisher::new(registry)))
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
