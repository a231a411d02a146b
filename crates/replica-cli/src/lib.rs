#![doc = include_str!("../README.md")]

pub mod etcd_init;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, Result, bail};
use br2k_oci::registry::{Credentials, RegistryClient, TOKEN_HOSTS_ENV, host_of};
use br2k_replication::backup::{BackupConfig, Retention};
use br2k_replication::{Config, Limits, Publisher, SnapshotPolicy, Timings, TxStep};
use br2k_resolver::{Chain, Timeouts};

/// The flags of one replica.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplicaArgs {
    /// This replica's id (unique within the service; letters, digits, '-', '_', '.').
    #[arg(long, env = "BR2K_REPLICA")]
    pub replica: String,
    /// Client URL of this replica's own etcd member.
    #[arg(long, env = "BR2K_ETCD", default_value = "http://127.0.0.1:2379")]
    pub etcd: String,
    /// Address the HTTP front listens on.
    #[arg(long, env = "BR2K_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The certificate authority this replica trusts for its etcd member (PEM), for an
    /// `https://` BR2K_ETCD; with --etcd-cert-file and --etcd-key-file.
    #[arg(long, env = "BR2K_ETCD_CA_FILE", value_name = "PATH", requires_all = ["etcd_cert_file", "etcd_key_file"])]
    pub etcd_ca_file: Option<PathBuf>,
    /// The certificate this replica presents to its etcd member (PEM).
    #[arg(long, env = "BR2K_ETCD_CERT_FILE", value_name = "PATH", requires = "etcd_ca_file")]
    pub etcd_cert_file: Option<PathBuf>,
    /// Its key (PEM, mode 0600).
    #[arg(long, env = "BR2K_ETCD_KEY_FILE", value_name = "PATH", requires = "etcd_ca_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// Where etcd serves its metrics and health in plain HTTP (its --listen-metrics-urls),
    /// read for its quota [default: the client URL, which works only without TLS].
    #[arg(long, env = "BR2K_ETCD_METRICS", value_name = "URL")]
    pub etcd_metrics: Option<String>,
    /// URL clients reach this replica at (published when it leads) [default: http://LISTEN].
    #[arg(long, env = "BR2K_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Directory for this replica's state and record file.
    #[arg(long, env = "BR2K_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Service registry address; without it the leader's location is not published.
    #[arg(long, env = "BR2K_REGISTRY")]
    pub registry: Option<Address>,
    /// Ethereum JSON-RPC endpoint of the chain holding the registry.
    #[arg(long, env = "ETH_RPC_URL", default_value = "http://127.0.0.1:8545")]
    pub rpc_url: String,
    /// This replica's operator key (hex), allowed by the manager to publish locations.
    /// Prefer the variable or a keystore: a flag shows in the process list.
    #[arg(long, env = "ETH_PRIVATE_KEY", hide_env_values = true)]
    pub private_key: Option<String>,
    /// A file holding this replica's operator key (hex), readable by its owner only (or,
    /// as a Kubernetes Secret volume with the Pod's fsGroup makes it, by its owner and this
    /// process's own group): what `br2k deploy` mounts on Kubernetes.
    #[arg(long, env = "ETH_PRIVATE_KEY_FILE", value_name = "PATH", conflicts_with_all = ["private_key", "keystore"])]
    pub private_key_file: Option<PathBuf>,
    /// The operator key from an encrypted JSON keystore (Foundry's `cast wallet import`,
    /// geth), instead of ETH_PRIVATE_KEY.
    #[arg(long, env = "ETH_KEYSTORE", value_name = "PATH", conflicts_with = "private_key")]
    pub keystore: Option<PathBuf>,
    /// A file (mode 0600) holding the keystore's password.
    #[arg(long, env = "ETH_PASSWORD_FILE", value_name = "PATH", requires = "keystore")]
    pub password_file: Option<PathBuf>,
    /// How often the leader condition is checked, in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub check_interval_ms: u64,
    /// Bound on every etcd call, in milliseconds; an unanswered leader check counts as "not leader".
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub etcd_timeout_ms: u64,
    /// Largest request body accepted, in bytes (over it: 413).
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u64).range(1..=524_288))]
    pub max_body: u64,
    /// Largest request head (request line and headers), in bytes (over it: 431).
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u64).range(1024..=65_536))]
    pub max_head: u64,
    /// Open client connections; beyond it new ones are answered 503 and closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub max_connections: u64,
    /// Largest snapshot taken from a peer when catching up, in bytes: a peer's record that
    /// announces more is refused (default 1 GiB, what a backup may hold too).
    #[arg(long, default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_snapshot_bytes: u64,
    /// Seconds a handler may take for one request; a leader whose handler takes longer
    /// (or panics) steps down and hands leadership to another replica.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handler_timeout: u64,
    /// The container registry the leader backs the service up to (the one in its recovery
    /// info), e.g. `https://registry.example`; without it there are no backups.
    /// Credentials come from BR2K_REGISTRY_USERNAME/BR2K_REGISTRY_PASSWORD or Docker's
    /// config.json, never from etcd or the chain.
    #[arg(long, env = "BR2K_BACKUP_REGISTRY", value_name = "URL", requires = "backup_repository")]
    pub backup_registry: Option<String>,
    /// The repository backups go to (the service's image repository), e.g. `br2k/logserver`.
    #[arg(long, env = "BR2K_BACKUP_REPOSITORY", value_name = "REPOSITORY")]
    pub backup_repository: Option<String>,
    /// Seconds between two backups: what a total disaster can lose is bounded by it.
    #[arg(long, env = "BR2K_BACKUP_INTERVAL", value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub backup_interval: u64,
    /// Seconds between two backups recorded on chain (`recordBackup`, one transaction
    /// each). The backups between are signed by this replica's operator key and a restore
    /// takes the newest signed one linked to the recorded one: this sets the gas spent,
    /// not what a disaster can lose.
    #[arg(long, env = "BR2K_BACKUP_RECORD_INTERVAL", value_name = "SECONDS", default_value_t = 600,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub backup_record_interval: u64,
    /// The newest backups kept in the registry (besides the one recorded on chain and
    /// those after it); older ones are deleted, and the registry's garbage collection
    /// frees their blobs.
    #[arg(long, env = "BR2K_BACKUP_KEEP_LAST", value_name = "N", default_value_t = 48,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub backup_keep_last: u64,
    /// Days, counting back from the newest that has a backup, whose newest backup is kept.
    #[arg(long, env = "BR2K_BACKUP_KEEP_DAILY", value_name = "D", default_value_t = 7,
          value_parser = clap::value_parser!(u64).range(0..=3650))]
    pub backup_keep_daily: u64,
    /// Allow a backup registry reached over plain HTTP (a test or loopback registry).
    #[arg(long, env = "BR2K_BACKUP_PLAIN_HTTP")]
    pub backup_plain_http: bool,
    /// A file (mode 0600) holding the token clients must send as `Authorization: Bearer
    /// TOKEN`; without it the service is open to anyone who reaches it. Or set
    /// BR2K_CLIENT_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub client_token_file: Option<PathBuf>,
    /// A file (mode 0600) holding the token operators' commands present on this replica's
    /// admin routes (`br2k tx ls`, `br2k tx cancel`); or set BR2K_ADMIN_TOKEN. Without it
    /// those routes are closed.
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Applied entries between two snapshots of this replica's state; 0 turns snapshots
    /// and log compaction off (the log in etcd then grows for ever).
    #[arg(long, env = "BR2K_SNAPSHOT_INTERVAL", value_name = "ENTRIES", default_value_t = SnapshotPolicy::default().interval)]
    pub snapshot_interval: u64,
    /// Log entries kept in etcd below the leader's latest snapshot, so that a replica a
    /// little behind replays them instead of fetching a snapshot; smaller than the interval.
    #[arg(long, env = "BR2K_TRAILING_ENTRIES", value_name = "ENTRIES", default_value_t = SnapshotPolicy::default().trailing)]
    pub trailing_entries: u64,
    /// How long a retry is answered from its stored answer: the leader keeps each
    /// Idempotency-Key this long after the request was logged (e.g. 24h, 90m, 3600s; at
    /// least 1s). Past it (or past the byte cap) a retry is executed as a new request.
    #[arg(long, env = "BR2K_IDEMPOTENCY_RETENTION", value_name = "DURATION", default_value = "24h",
          value_parser = parse_duration)]
    pub idempotency_retention: Duration,
    /// The most the idempotency table may hold (keys and stored answers; e.g. 256MiB,
    /// 1GiB); past it the oldest keys go first. Every replica holds it in memory and in
    /// its snapshots: size the replicas' memory for it.
    #[arg(long, env = "BR2K_IDEMPOTENCY_MAX_BYTES", value_name = "BYTES", default_value = "256MiB",
          value_parser = parse_bytes)]
    pub idempotency_max_bytes: u64,
}

/// A duration as `24h`, `90m`, `3600s`, `2d` or a bare number of seconds.
fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 24h, 90m or 3600s"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use s, m, h or d")),
    };
    match number.checked_mul(seconds) {
        Some(0) => Err("must be at least 1s".into()),
        Some(secs) if secs <= 365 * 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err(format!("{text:?} is over a year")),
    }
}

/// A size as `256MiB`, `1GiB`, `512KiB` or a bare number of bytes.
fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a size such as 256MiB or 1GiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} in {text:?}: use B, KiB, MiB or GiB")),
    };
    match number.checked_mul(scale) {
        Some(bytes) if bytes >= 1 << 20 => Ok(bytes),
        Some(_) => Err(format!("{text:?} is under 1MiB: too small to hold a useful window of keys")),
        None => Err(format!("{text:?} is too large")),
    }
}

impl ReplicaArgs {
    /// The replica's configuration for `service`: timings, limits, snapshots, backups, and
    /// the registry publisher when a registry is given (connecting to its chain).
    ///
    /// # Errors
    /// Inconsistent flags, an unreadable operator key or registry credentials, a chain
    /// that does not answer.
    pub async fn config(&self, service: &str) -> Result<Config> {
        if std::env::var_os(etcd_init::INIT_ENV).is_some() {
            bail!(
                "{} is set: this process should be etcd's init step, but the app's main does not call \
                 br2k_replica_cli::etcd_init::run_if_requested() first",
                etcd_init::INIT_ENV
            );
        }
        let public_url = self.public_url.clone().unwrap_or_else(|| format!("http://{}", self.listen));
        let mut config = Config::new(service, &self.replica, &self.etcd, self.listen, public_url, &self.data_dir);
        config.timings = Timings {
            check_interval: Duration::from_millis(self.check_interval_ms),
            etcd_timeout: Duration::from_millis(self.etcd_timeout_ms),
            ..Timings::default()
        };
        let size = |value: u64| usize::try_from(value).unwrap_or(usize::MAX);
        config.limits = Limits {
            max_body: size(self.max_body),
            max_head: size(self.max_head),
            max_connections: size(self.max_connections),
            max_snapshot_bytes: self.max_snapshot_bytes,
            handler_timeout: Duration::from_secs(self.handler_timeout),
            ..Limits::default()
        };
        config.snapshots = SnapshotPolicy { interval: self.snapshot_interval, trailing: self.trailing_entries };
        config.snapshots.check().map_err(|e| anyhow::anyhow!("--snapshot-interval / --trailing-entries: {e}"))?;
        config.idempotency_retention = self.idempotency_retention;
        config.idempotency_max_bytes = self.idempotency_max_bytes;
        if let Some(publisher) = self.publisher().await? {
            config = config.with_publisher(publisher);
        }
        config.backup = self.backup()?;
        if let (Some(ca), Some(cert), Some(key)) = (&self.etcd_ca_file, &self.etcd_cert_file, &self.etcd_key_file) {
            if !self.etcd.starts_with("https://") {
                anyhow::bail!("--etcd-ca-file and friends need an https:// etcd URL, not {}", self.etcd);
            }
            config.etcd_tls = Some(br2k_replication::EtcdTls { ca: ca.clone(), cert: cert.clone(), key: key.clone() });
        }
        config.etcd_metrics_endpoint.clone_from(&self.etcd_metrics);
        config.admin_token = secret("BR2K_ADMIN_TOKEN", self.admin_token_file.as_deref(), "admin token")?
            .map(br2k_replication::AdminToken::new);
        Ok(config)
    }

    /// The token clients must present, from BR2K_CLIENT_TOKEN or the 0600 file.
    ///
    /// # Errors
    /// A file readable by others, unreadable or empty.
    pub fn client_token(&self) -> Result<Option<String>> {
        secret("BR2K_CLIENT_TOKEN", self.client_token_file.as_deref(), "client token")
    }

    /// Where the leader backs up, when a backup registry is given.
    fn backup(&self) -> Result<Option<BackupConfig>> {
        let (Some(url), Some(repository)) = (&self.backup_registry, &self.backup_repository) else { return Ok(None) };
        let host = host_of(url).with_context(|| format!("--backup-registry {url:?} is not a URL"))?;
        let credentials = Credentials::find(&host)?;
        let token_hosts = std::env::var(TOKEN_HOSTS_ENV).unwrap_or_default();
        let registry = RegistryClient::new(url, self.backup_plain_http, credentials)?
            .trusting_token_hosts(token_hosts.split(',').map(str::to_owned));
        Ok(Some(BackupConfig {
            interval: Duration::from_secs(self.backup_interval),
            record_interval: Duration::from_secs(self.backup_record_interval),
            retention: Retention {
                keep_last: usize::try_from(self.backup_keep_last).unwrap_or(usize::MAX),
                keep_daily: usize::try_from(self.backup_keep_daily).unwrap_or(usize::MAX),
            },
            ..BackupConfig::new(std::sync::Arc::new(registry), repository.clone())
        }))
    }

    /// The registry publisher, when a registry is given.
    async fn publisher(&self) -> Result<Option<Publisher>> {
        let Some(address) = self.registry else {
            tracing::warn!("no --registry (BR2K_REGISTRY): the leader's location will not be published");
            return Ok(None);
        };
        let signer = match (&self.private_key, &self.private_key_file, &self.keystore) {
            (Some(key), _, _) => parse_key(key, "ETH_PRIVATE_KEY / --private-key")?,
            (None, Some(file), _) => parse_key(&secret_file(file, "operator key")?, "the operator key file")?,
            (None, None, Some(keystore)) => keystore_key(keystore, self.password_file.as_deref(), "--keystore")?,
            (None, None, None) => bail!(
                "--registry needs the replica's operator key: set ETH_PRIVATE_KEY or ETH_PRIVATE_KEY_FILE, or pass \
                 --keystore with --password-file"
            ),
        };
        let chain = Chain::connect(&self.rpc_url, Some(signer.clone()), Timeouts::default()).await?;
        let registry = chain.registry(address).await?;
        Ok(Some(Publisher::new(registry, signer)))
    }
}

/// A hex private key; `what` names where it came from in the error.
///
/// # Errors
/// Text that is not a private key (the error never repeats it).
pub fn parse_key(text: &str, what: &str) -> Result<PrivateKeySigner> {
    text.trim().parse().map_err(|_| anyhow::anyhow!("{what} is not a hex private key"))
}

/// A key from an encrypted JSON keystore (Foundry's `cast wallet import`, geth's
/// `account new`), decrypted with the password in `password_file` (mode 0600); `what`
/// names the option in errors.
///
/// # Errors
/// No password file, a password file others can read, a keystore that is missing, not a
/// keystore, or not opened by that password (the error never repeats the password).
pub fn keystore_key(keystore: &Path, password_file: Option<&Path>, what: &str) -> Result<PrivateKeySigner> {
    let Some(password_file) = password_file else {
        bail!("{what} {} needs the file holding its password (mode 0600)", keystore.display());
    };
    let password = secret_file(password_file, "keystore password")?;
    PrivateKeySigner::decrypt_keystore(keystore, password).map_err(|e| {
        anyhow::anyhow!(
            "{what} {}: cannot decrypt it ({e}): is it a keystore, and the password file its own?",
            keystore.display()
        )
    })
}

/// A secret from the environment variable `env`, else from `file` (which must be mode
/// 0600: readable by its owner only); `what` names it in errors. `None` when neither is set.
///
/// # Errors
/// A file readable by others, unreadable or empty.
pub fn secret(env: &str, file: Option<&Path>, what: &str) -> Result<Option<String>> {
    if let Ok(value) = std::env::var(env) {
        return Ok(Some(value.trim().to_owned()).filter(|v| !v.is_empty()));
    }
    file.map(|path| secret_file(path, what)).transpose()
}

/// The secret in `path`, which must be mode 0600 (readable by its owner only), trimmed;
/// `what` names it in errors. One exception: a read-only file its group may read when
/// that group is this process's own, which is how Kubernetes mounts a Secret of mode 0400
/// into a Pod with an `fsGroup` (the Pod's user is the only member of that group there).
///
/// # Errors
/// A file readable by others, unreadable or empty.
pub fn secret_file(path: &Path, what: &str) -> Result<String> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    let mode = metadata.mode();
    // /proc/self belongs to this process's effective user and group.
    let own_group = std::fs::metadata("/proc/self").is_ok_and(|me| me.gid() == metadata.gid());
    let group_may_read = own_group && mode & 0o077 == 0o040 && mode & 0o200 == 0;
    if mode & 0o077 != 0 && !group_may_read {
        bail!(
            "the {what} file {} is readable by others (mode {:o}): run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let value = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value = value.trim();
    if value.is_empty() {
        bail!("the {what} file {} is empty", path.display());
    }
    Ok(value.to_owned())
}

/// The environment variable of the crash failpoint: see [`crash_at_tx_step`].
pub const CRASH_AT_ENV: &str = "BR2K_CRASH_AT";

/// The crash failpoint, for fault tests: with `BR2K_CRASH_AT=<step>` (`reserving`,
/// `stored`, `broadcast`, `settled`), a replica SIGKILLs its own process the first time
/// one of its outbox sends reaches that step, so a test kills a leader at an exact point
/// of a transaction, as a power cut would. Install it with [`Builder::on_tx_step`] and
/// [`sigkill_self`]. `None` when unset.
///
/// # Errors
/// A value that names no step.
///
/// [`Builder::on_tx_step`]: br2k_replication::Builder::on_tx_step
pub fn crash_at_tx_step() -> Result<Option<TxStep>> {
    match std::env::var(CRASH_AT_ENV) {
        Err(_) => Ok(None),
        Ok(value) => {
            let step = value.trim().parse::<TxStep>().map_err(|e| anyhow::anyhow!("{CRASH_AT_ENV}: {e}"))?;
            tracing::warn!(
                step = step.name(),
                "{CRASH_AT_ENV} is set: this replica SIGKILLs itself when a transaction reaches that step (fault \
                 tests only; unset it in production)"
            );
            Ok(Some(step))
        }
    }
}

/// Kills this process with SIGKILL: no destructor, no flush, no goodbye to etcd.
#[allow(unsafe_code)] // the crate's one `unsafe`: libc's kill(2) has no safe form in std
pub fn sigkill_self() -> ! {
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; this line is never reached while the signal is delivered.
    std::process::abort()
}

/// Logs to stderr, at `RUST_LOG`'s levels (default: info).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,br2k_replication=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_must_be_private_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let set_mode =
            |mode| std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        set_mode(0o644);
        let err = secret("BR2K_TEST_UNSET_SECRET", Some(&path), "test token").unwrap_err().to_string();
        assert!(err.contains("readable by others") && err.contains("chmod 600"), "{err}");
        set_mode(0o600);
        assert_eq!(secret("BR2K_TEST_UNSET_SECRET", Some(&path), "test token").unwrap().as_deref(), Some("s3cret"));
        std::fs::write(&path, "\n").unwrap();
        assert!(secret("BR2K_TEST_UNSET_SECRET", Some(&path), "test token").unwrap_err().to_string().contains("empty"));
        assert_eq!(secret("BR2K_TEST_UNSET_SECRET", None, "test token").unwrap(), None);
        // As Kubernetes mounts a 0400 Secret with the Pod's fsGroup (this test's file is in
        // this process's own group): read-only for the owner and that group, accepted.
        std::fs::write(&path, "s3cret\n").unwrap();
        set_mode(0o440);
        assert_eq!(secret_file(&path, "test token").unwrap(), "s3cret");
        for mode in [0o460, 0o444, 0o640] {
            set_mode(mode);
            let err = secret_file(&path, "test token").unwrap_err().to_string();
            assert!(err.contains("readable by others"), "{mode:o}: {err}");
        }
    }

    #[test]
    fn crash_steps_parse_by_name_and_a_wrong_one_lists_them() {
        for step in TxStep::ALL {
            assert_eq!(step.name().parse::<TxStep>().unwrap(), step);
        }
        let err = "stord".parse::<TxStep>().unwrap_err();
        assert!(err.contains("`stord`") && err.contains("reserving, stored, broadcast, settled"), "{err}");
    }

    #[test]
    fn retention_and_table_sizes_parse_with_units_and_bad_ones_say_why() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("0s").unwrap_err().contains("at least 1s"));
        assert!(parse_duration("3w").unwrap_err().contains("use s, m, h or d"));
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert!(parse_bytes("12KiB").unwrap_err().contains("under 1MiB"));
        assert!(parse_bytes("5MB").unwrap_err().contains("use B, KiB, MiB or GiB"));
    }

    #[test]
    fn a_bad_key_is_refused_without_repeating_it() {
        let err = parse_key("not-a-key-1234", "--outbox-key").unwrap_err().to_string();
        assert!(err.contains("--outbox-key") && !err.contains("1234"), "{err}");
    }
}
