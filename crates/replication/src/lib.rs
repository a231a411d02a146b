#![doc = include_str!("../README.md")]

mod app;
mod builder;
mod compaction;
mod config;
mod data;
mod error;
pub mod etcd_flags;
mod http;
pub mod inspect;
mod leader;
mod membership;
mod record_file;
mod runtime;
mod snapshot;
mod state_transfer;
mod store;

pub use app::{AppState, BoxFuture, Outcome, Reply, Request, SnapshotBuilder, Step};
pub use builder::Builder;
pub use config::{Config, Publisher, SnapshotPolicy, Timings};
pub use data::{
    CompactedLog, EntryState, IdempotencyRecord, LeaderRecord, LogEntry, MemberRecord, ProcessState, RequestKind,
    SnapshotMeta, StoredReply,
};
pub use error::{Error, Result};
pub use http::{IDEMPOTENCY_KEY_HEADER, INDEX_HEADER, LEADER_HEADER, REPLAYED_HEADER};
pub use runtime::{Replicated, Role, Status};
