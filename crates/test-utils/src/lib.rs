#![doc = include_str!("../README.md")]

mod anvil;
mod browser;
mod etcd;
mod oci_registry;
mod process;
mod relay;
mod token_service;

pub use anvil::{Anvil, AnvilBuilder, AnvilError};
pub use browser::{Browser, BrowserError, Page};
pub use etcd::{ETCD_BIN_ENV, EtcdCluster, EtcdClusterBuilder, EtcdError, etcd_binary, free_loopback_ports};
pub use oci_registry::{OciRegistry, OciRegistryError};
pub use process::{KillOnDrop, ToolNotFound, foundry_binary, workspace_root};
pub use relay::Relay;

/// The command that installs every tool the fixtures need.
pub const SETUP_COMMAND: &str = "bash tools/setup.sh";
