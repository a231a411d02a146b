#![doc = include_str!("../README.md")]

mod app;
pub mod backup;
mod builder;
mod codec;
mod compaction;
mod config;
mod data;
mod durable;
mod error;
pub mod etcd_flags;
mod executor;
mod faults;
mod feed;
mod follower;
mod guard;
mod http;
mod idempotency;
pub mod inspect;
mod leader;
mod line_file;
mod membership;
mod metrics;
pub mod outbox;
mod record_file;
mod register;
mod reporter;
mod runtime;
mod secret;
mod server;
mod settle;
mod snapshot;
mod state_transfer;
mod stats;
mod status;
mod store;
mod sync;

pub use app::{AppState, BoxFuture, Failure, FilePrefix, Outcome, Reply, Request, SnapshotBuilder, bearer_token};
pub use builder::Builder;
pub use builder::Replicated;
pub use config::{AdminToken, Config, EtcdTls, Limits, Publisher, SnapshotPolicy, Timings};
pub use data::{
    CompactedLog, Divergence, EntryState, IdempotencyRecord, LeaderRecord, LogEntry, MemberRecord, NAME_RULE,
    ProcessState, RequestKind, SnapshotMeta, Stamp, Step, StoppedAt, StoredReply, is_valid_name, membership_change_key,
    membership_lock_key, replica_record_keys,
};
pub use error::{Error, EtcdFailure, Result};
pub use http::{IDEMPOTENCY_KEY_HEADER, INDEX_HEADER, LEADER_HEADER, REPLAYED_HEADER};
pub use idempotency::TableStatus;
pub use line_file::LineFile;
pub use membership::{Roster, RosterMember};
pub use outbox::{
    CancelError, EndpointHealth, Expected, FinalityViolation, Outbox, OutboxConfig, OutboxStatus, TxCall, TxError,
    TxReceipt, TxStep, UnsettledTx, VerifiedTx, Verifier, VerifyError,
};
pub use secret::{random_token, same_secret};
pub use snapshot::app_bytes as snapshot_app_bytes;
pub use stats::Tally;
pub use status::{Role, Status};
