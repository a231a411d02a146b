//! Where a replica runs and how it behaves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Largest request body accepted, in bytes (default 256 KiB).
    pub max_body: usize,
    /// How long idempotency records are kept (default 24 h).
    pub idempotency_retention: Duration,
    /// Request headers logged with each request besides `content-type` (lower case).
    pub kept_headers: Vec<String>,
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
            max_body: 256 * 1024,
            idempotency_retention: Duration::from_secs(24 * 3600),
            kept_headers: Vec::new(),
        }
    }

    /// Publishes the leader's location through `publisher`.
    #[must_use]
    pub fn with_publisher(mut self, publisher: Publisher) -> Self {
        self.publisher = Some(publisher);
        self
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
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_millis(100),
            etcd_timeout: Duration::from_secs(2),
            follow_poll: Duration::from_secs(1),
            publish_retry: Duration::from_secs(2),
        }
    }
}

/// Publishes the leader's location in the service registry with the replica's operator key.
#[derive(Clone, Debug)]
pub struct Publisher {
    pub(crate) registry: RegistryClient,
}

impl Publisher {
    /// Publishes through `registry`, whose chain connection carries the operator's signer.
    pub fn new(registry: RegistryClient) -> Self {
        Self { registry }
    }
}
