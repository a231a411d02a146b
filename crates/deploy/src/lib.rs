//! br2k's deployment backends (the images they run are `br2k-oci`'s). The **local**
//! backend (DESIGN §7): a service's
//! replicas run as processes on this machine, each node an etcd member plus the app
//! binary with its own data directory, and, when running as root, each node in its own
//! network namespace so that it can really be cut off the network.
//!
//! [`local::Sandbox`] puts a whole service up in one call (network, a local chain with
//! the service registry, the replicas), for `br2k up` and the testbed.

pub mod backend;
pub mod backup_schedule;
pub mod context;
pub mod deployment;
mod error;
pub mod etcd_tls;
pub mod kubernetes;
pub mod local;
pub mod operator_key;

pub use error::{DeployError, Result};
