//! Where a replica runs and how it behaves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use br2k_outbox::OutboxConfig;
use br2k_resolver::RegistryClient;

/// One replica's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The service name (as registered in the service registry).
    pub service: String,
    /// This replica's id, unique within the service.
    pub replica: String,
    /// The client URL of this replica's own etcd member, e.g. `http://127.0.0.1:2379`.
    pub etcd_endpoint: String,
    /// Where the HTTP front listens.
    pub listen: SocketAddr,
    /// The URL clients reach this replica at, published in the registry when it leads.
    pub public_url: String,
    /// A directory of this replica's own (the local record file lives there).
    pub data_dir: PathBuf,
    /// Where to publish the leader's location; `None` runs without a registry.
    pub publisher: Option<Publisher>,
    /// Timings.
    pub timings: Timings,
    /// What one client may send and hold.
    pub limits: Limits,
    /// How long a key is kept in the idempotency table after its request was logged
    /// (default 24 h): a retry within it gets the stored answer. Measured on the times the
    /// leader writes into the log, and applied by whichever replica leads.
    pub idempotency_retention: Duration,
    /// The most the idempotency table may hold, bytes (keys, answers and bookkeeping;
    /// default 256 MiB): past it the oldest keys are dropped first, before their
    /// retention. Each replica holds the table in memory and in its snapshots.
    pub idempotency_max_bytes: u64,
    /// Request headers logged with each request besides `content-type` (lower case).
    /// Credentials (`authorization`, `cookie`, `proxy-authorization`) are refused: a logged
    /// request stays in etcd and in every replica's state; check them in an admission hook
    /// ([`crate::Builder::admit`]) instead.
    pub kept_headers: Vec<String>,
    /// Snapshots and log compaction.
    pub snapshots: SnapshotPolicy,
    /// Backups to the service's container registry, recorded on chain; `None`: none.
    pub backup: Option<BackupConfig>,
    /// The transaction outbox only-once handlers send blockchain transactions through
    /// ([`crate::Request::outbox`]); `None`: they have none.
    pub outbox: Option<OutboxConfig>,
    /// The token operators' commands present (`Authorization: Bearer`) on the replica's
    /// own admin routes (`GET /br2k/tx`, `POST /br2k/tx/cancel`); `None` closes them.
    pub admin_token: Option<AdminToken>,
    /// TLS to this replica's etcd member (`https://` endpoint, a client certificate);
    /// `None`: plain `http://`.
    pub etcd_tls: Option<EtcdTls>,
    /// Where etcd's metrics are read (its `--listen-metrics-urls`, plain HTTP: metrics and
    /// health only); `None`: the client endpoint, which only works without TLS.
    pub etcd_metrics_endpoint: Option<String>,
}

/// The files a replica talks TLS to its etcd member with: the authority it trusts, and
/// the certificate and key it presents (etcd asks clients for one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// The certificate authority's certificate (PEM).
    pub ca: PathBuf,
    /// This replica's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM; keep it mode 0600).
    pub key: PathBuf,
}

impl EtcdTls {
    /// The options an etcd client connects with.
    ///
    /// # Errors
    /// A file that cannot be read.
    pub fn options(&self) -> crate::error::Result<etcd_client::TlsOptions> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                crate::error::Error::Config(format!("the etcd TLS file {} cannot be read: {e}", path.display()))
            })
        };
        let (ca, cert, key) = (read(&self.ca)?, read(&self.cert)?, read(&self.key)?);
        Ok(etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca))
            .identity(etcd_client::Identity::from_pem(cert, key)))
    }
}

/// A secret that never prints: its `Debug` says only that it is set.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Wraps `token`.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// Whether `offered` is this token (compared in constant time).
    pub(crate) fn accepts(&self, offered: &str) -> bool {
        crate::secret::same_secret(offered.trim().as_bytes(), self.0.as_bytes())
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(set)")
    }
}

/// When replicas snapshot their state and how much log the leader keeps in etcd.
///
/// Every `interval` applied entries each replica snapshots its own state. The leader then
/// deletes the entries below `its snapshot's index - trailing` that every live replica has
/// applied, and compacts etcd's history, so etcd's size stays flat. A replica that falls
/// below the first index still in etcd (a wiped disk, a new node, a long partition)
/// restores a peer's snapshot and replays the log from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Applied entries between two snapshots of a replica (default 10,000); 0 turns
    /// snapshots and compaction off, and the log then grows for ever.
    pub interval: u64,
    /// Entries kept in etcd below the leader's latest snapshot (default 5,000), so that a
    /// replica a little behind replays them instead of fetching a whole snapshot. Smaller
    /// than `interval`.
    pub trailing: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self { interval: 10_000, trailing: 5_000 }
    }
}

impl SnapshotPolicy {
    /// Snapshots and compaction turned off.
    pub const fn disabled() -> Self {
        Self { interval: 0, trailing: 0 }
    }

    /// Whether snapshots are taken at all.
    pub const fn enabled(&self) -> bool {
        self.interval > 0
    }

    /// Checks the policy.
    ///
    /// # Errors
    /// A sentence saying what is wrong, when `trailing` is not smaller than `interval`.
    pub fn check(&self) -> Result<(), String> {
        if self.enabled() && self.trailing >= self.interval {
            return Err(format!(
                "trailing entries ({}) must be smaller than the snapshot interval ({}): the leader deletes the log \
                 below its snapshot's index minus the trailing entries",
                self.trailing, self.interval
            ));
        }
        Ok(())
    }
}

impl Config {
    /// A configuration with default timings and limits.
    pub fn new(
        service: impl Into<String>,
        replica: impl Into<String>,
        etcd_endpoint: impl Into<String>,
        listen: SocketAddr,
        public_url: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            service: service.into(),
            replica: replica.into(),
            etcd_endpoint: etcd_endpoint.into(),
            listen,
            public_url: public_url.into(),
            data_dir: data_dir.into(),
            publisher: None,
            timings: Timings::default(),
            limits: Limits::default(),
            idempotency_retention: Duration::from_secs(24 * 3600),
            idempotency_max_bytes: 256 << 20,
            kept_headers: Vec::new(),
            snapshots: SnapshotPolicy::default(),
            backup: None,
            outbox: None,
            admin_token: None,
            etcd_tls: None,
            etcd_metrics_endpoint: None,
        }
    }

    /// Publishes the leader's location through `publisher`.
    #[must_use]
    pub fn with_publisher(mut self, publisher: Publisher) -> Self {
        self.publisher = Some(publisher);
        self
    }
}

/// What one client may send and hold, so that no client can stall a replica, depose the
/// leader or fill the log. Every limit answers with a status that says which was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body, bytes (default 256 KiB; at most 512 KiB). Over it: 413.
    pub max_body: usize,
    /// Largest request head (request line and every header), bytes (default 16 KiB; 1 KiB
    /// to 64 KiB). Over it: 431.
    pub max_head: usize,
    /// Largest answer of a logged request's handler that is stored for retries, bytes
    /// (default 256 KiB; at most 512 KiB). A larger answer is replaced, for the client and
    /// for retries, by its status and a note that it was too large; the outcome stands.
    pub max_reply: usize,
    /// Open client connections (default 1024). Beyond it a new connection is answered
    /// 503 and closed.
    pub max_connections: usize,
    /// Bytes of logged requests waiting in the leader's queue or being processed (default
    /// 64 MiB). Beyond it new requests wait up to 500 ms, then get 503.
    pub max_queued_bytes: usize,
    /// Time a client has to send a request's head, from the moment the connection is
    /// ready for it (default 10 s); a slower client is disconnected.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its head is in (default 30 s).
    /// Over it: 408.
    pub body_timeout: Duration,
    /// Time a handler (or rollback or reconcile hook) may take for one request (default
    /// 30 s). A logged request's handler that takes longer, or panics, ends the leader's
    /// term: the replica steps down and hands etcd leadership to another member.
    pub handler_timeout: Duration,
    /// Largest snapshot this replica takes from a peer when catching up, bytes (default
    /// 1 GiB, the most a backup holds too): a record that announces more is refused before
    /// a byte is fetched, and a download that runs past what its record announced is cut.
    pub max_snapshot_bytes: u64,
    /// Time an answer's bytes may wait for the client to read them (default 30 s): a
    /// client that stops reading cannot hold a connection slot for longer.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 256 * 1024,
            max_head: 16 * 1024,
            max_reply: 256 * 1024,
            max_connections: 1024,
            max_queued_bytes: 64 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            handler_timeout: Duration::from_secs(30),
            max_snapshot_bytes: crate::data::MAX_STATE_BYTES,
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// Checks the limits against what etcd and the runtime can carry.
    ///
    /// # Errors
    /// Every problem found, one sentence each.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut within = |name: &str, value: usize, min: usize, max: usize, why: &str| {
            if !(min..=max).contains(&value) {
                problems.push(format!("{name} {value} must be between {min} and {max} bytes{why}"));
            }
        };
        let etcd = " (a logged request and its answer must fit etcd's 1.5 MiB request limit)";
        within("max body", self.max_body, 1, 512 * 1024, etcd);
        within("max head", self.max_head, 1024, 64 * 1024, etcd);
        within("max reply", self.max_reply, 1, 512 * 1024, etcd);
        within("max queued bytes", self.max_queued_bytes, 1024 * 1024, usize::MAX, " (at least 1 MiB)");
        if self.max_connections == 0 {
            problems.push("max connections must be at least 1".into());
        }
        for (name, value) in
            [("header", self.header_timeout), ("body", self.body_timeout), ("handler", self.handler_timeout)]
        {
            if value < Duration::from_millis(100) {
                problems.push(format!("the {name} timeout {value:?} must be at least 100 ms"));
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }
}

/// How often the runtime looks, and how long it waits.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// How often Check role asks the local member whether it leads (default 100 ms).
    pub check_interval: Duration,
    /// Bound on every etcd call (default 2 s). A leader condition that cannot be read in
    /// this time counts as false.
    pub etcd_timeout: Duration,
    /// How often a follower re-reads SSI even without a watch event (default 1 s).
    pub follow_poll: Duration,
    /// Pause between attempts to publish the location when the chain is unreachable
    /// (default 2 s).
    pub publish_retry: Duration,
    /// How long a replica that stops renewing its membership (dead, paused, cut off)
    /// still counts as live for compaction (default 10 s).
    pub member_ttl: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_millis(100),
            etcd_timeout: Duration::from_secs(2),
            follow_poll: Duration::from_secs(1),
            publish_retry: Duration::from_secs(2),
            member_ttl: Duration::from_secs(10),
        }
    }
}

/// Publishes the leader's location in the service registry with the replica's operator
/// key, and signs its backups with the same key.
#[derive(Clone, Debug)]
pub struct Publisher {
    pub(crate) registry: RegistryClient,
    pub(crate) signer: alloy::signers::local::PrivateKeySigner,
}

impl Publisher {
    /// Publishes through `registry`, whose chain connection carries `signer`, the
    /// operator's key (which also signs the backups this replica makes as leader).
    pub fn new(registry: RegistryClient, signer: alloy::signers::local::PrivateKeySigner) -> Self {
        Self { registry, signer }
    }
}

/// How many segments of one level merge into one of the next, by default: a manifest
/// then names at most 7 segments per level, and an entry is uploaded again once per level.
pub const MERGE_FANOUT: usize = 8;

/// Where and how often the leader backs the service up.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// The service's container registry, with its credentials (from the environment or
    /// Docker's config.json, never from etcd or the chain).
    pub registry: Arc<br2k_oci::registry::RegistryClient>,
    /// The repository backups go to (the service's image repository).
    pub repository: String,
    /// How often the leader pushes a backup (default 30 s): what a total disaster can lose
    /// is bounded by it.
    pub interval: Duration,
    /// How often a backup is recorded on chain (default 10 min): what backups cost in gas.
    pub record_interval: Duration,
    /// Which backups stay in the registry.
    pub retention: Retention,
    /// How many segments of one level merge into one of the next (at least 2).
    pub merge_fanout: usize,
    /// The least time between two backups asked for with `POST /br2k/backup` (`None`:
    /// the backup interval). Each pushes an artifact and pays for a transaction.
    pub on_demand_spacing: Option<Duration>,
}

impl BackupConfig {
    /// Backups into `repository` of `registry` at the defaults: every 30 s, one in twenty
    /// recorded on chain (every 10 min), the last 48 and 7 daily kept.
    pub fn new(registry: Arc<br2k_oci::registry::RegistryClient>, repository: impl Into<String>) -> Self {
        Self {
            registry,
            repository: repository.into(),
            interval: Duration::from_secs(30),
            record_interval: Duration::from_secs(600),
            retention: Retention::default(),
            merge_fanout: MERGE_FANOUT,
            on_demand_spacing: None,
        }
    }

    /// The least time between two backups asked for on demand.
    pub(crate) fn on_demand_spacing(&self) -> Duration {
        self.on_demand_spacing.unwrap_or(self.interval)
    }
}

/// How many backups to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The newest backups kept, whatever their age (default 48).
    pub keep_last: usize,
    /// Days (UTC) whose newest backup is kept, counting back from the newest day that has
    /// one (default 7).
    pub keep_daily: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self { keep_last: 48, keep_daily: 7 }
    }
}
