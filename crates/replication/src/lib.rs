#![doc = include_str!("../README.md")]

mod app;
mod builder;
mod config;
mod data;
mod error;
mod http;
pub mod inspect;
mod leader;
mod record_file;
mod runtime;
mod store;

pub use app::{AppState, BoxFuture, Outcome, Reply, Request, Step};
pub use builder::Builder;
pub use config::{Config, Publisher, Timings};
pub use data::{EntryState, IdempotencyRecord, LeaderRecord, LogEntry, ProcessState, RequestKind, StoredReply};
pub use error::{Error, Result};
pub use http::{IDEMPOTENCY_KEY_HEADER, INDEX_HEADER, LEADER_HEADER, REPLAYED_HEADER};
pub use runtime::{Replicated, Role, Status};
