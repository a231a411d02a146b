#![doc = include_str!("../README.md")]

mod error;
mod failover;
mod nonce;
mod registry;
mod resolver;

pub use error::{Error, Result, describe_revert, printable, shown_endpoint};
pub use failover::{AttemptFailure, FailoverClient, FailoverConfig, FailoverError, Request};
pub use registry::{
    Chain, Deployment, RECEIPT_POLL, RecordedBackup, RegistryClient, Resolved, ServiceInfo, Timeouts, TxOutcome,
    service_id,
};
pub use resolver::{Resolver, ResolverConfig};

/// The header a br2k replica that is not the leader sets on its `503` answer, naming the
/// leader's location when it knows it.
pub const LEADER_HEADER: &str = "Br2k-Leader";

/// The header that makes a retried request idempotent.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";
