#![doc = include_str!("../README.md")]

pub mod backend;
pub mod backup_schedule;
pub mod context;
pub mod deployment;
mod error;
pub mod etcd_tls;
pub mod kubernetes;
pub mod local;
pub mod operator_key;
pub mod roster;

pub use error::{DeployError, Result};
