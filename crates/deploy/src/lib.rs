//! br2k's deployment backends and the images they run ([`image`]: OCI images built from a
//! service's binary). For now the **local** backend (DESIGN §7): a service's
//! replicas run as processes on this machine, each node an etcd member plus the app
//! binary with its own data directory, and, when running as root, each node in its own
//! network namespace so that it can really be cut off the network.
//!
//! [`local::Sandbox`] puts a whole service up in one call (network, a local chain with
//! the service registry, the replicas), for `br2k up` and the testbed.

pub mod backend;
pub mod container_registry;
pub mod context;
pub mod deployment;
mod error;
pub mod image;
pub mod kubernetes;
pub mod local;
pub mod operator_key;
mod private_file;

pub use error::{DeployError, Result};
