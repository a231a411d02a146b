#![doc = include_str!("../README.md")]

pub mod artifact;
mod error;
pub mod image;
pub mod private_file;
pub mod registry;

pub use error::{OciError, Result};
