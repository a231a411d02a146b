//! br2k's images and container registries (DESIGN §2): one concept, used by the
//! deployment backends, the manager and (for backups) the replication runtime, none of
//! which needs the others for it.
//!
//! - [`image`]: OCI images of an app binary, built, stored and unpacked locally, every
//!   blob addressed by its sha256 digest;
//! - [`registry`]: a client for OCI distribution registries (push, pull by digest, basic
//!   and bearer auth that hands credentials only to the registry's own host), the
//!   project's list of registries, and where credentials come from;
//! - [`artifact`]: OCI artifacts (files that are not images, such as br2k's backups),
//!   pushed and pulled by digest;
//! - [`private_file`]: files that hold credentials or keys (0600, synced).

pub mod artifact;
mod error;
pub mod image;
pub mod private_file;
pub mod registry;

pub use error::{OciError, Result};
