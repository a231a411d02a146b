//! What a replica says about itself: its role and the status `/br2k/status` serves, gathered
//! from every layer below (the store's counters, the lifecycle's backups, the outbox).

use serde::{Deserialize, Serialize};

use crate::data::{Divergence, LeaderRecord, StoppedAt};

/// A replica's role (paper Fig. 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Follows the leader's service state.
    Follower,
    /// Won the leader condition; catching up (Prepare Service) before it serves.
    Register,
    /// Serves clients.
    Leader,
}

/// What `/br2k/status` shows: one replica's view of itself and the service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    /// The service name.
    pub service: String,
    /// This replica's id.
    pub replica: String,
    /// Its role.
    pub role: Role,
    /// The epoch it leads with, when it leads.
    pub epoch: Option<u64>,
    /// The current leader as last read from `cl`.
    pub leader: Option<LeaderRecord>,
    /// LS as last seen.
    pub ls: u64,
    /// SSI as last seen.
    pub ssi: u64,
    /// This replica's latest processed index.
    pub lpi: u64,
    /// What the app state says it has applied.
    pub applied_index: u64,
    /// Normal requests a dead leader left InProcess that are not yet reconciled (as last
    /// listed by this replica when it became leader).
    pub in_doubt: Vec<u64>,
    /// Whether the local etcd member answered the last leader-condition check.
    pub etcd_reachable: bool,
    /// The epoch whose location is published in the registry, if any.
    pub published_epoch: Option<u64>,
    /// Where this replica's time went since it started: etcd calls by action
    /// (`etcd: <action>`) and the leader pipeline's stages (`leader: ...`).
    #[serde(default)]
    pub pipeline: std::collections::BTreeMap<String, crate::stats::Tally>,
    /// The last error that stopped progress, if it has not cleared.
    pub last_error: Option<String>,
    /// The index of this replica's latest snapshot (0: none yet).
    #[serde(default)]
    pub snapshot_index: u64,
    /// The index of the snapshot this replica's state was last restored from (0: built by
    /// replaying the log from its start).
    #[serde(default)]
    pub state_version: u64,
    /// The first log index still in etcd (entries below it were compacted away).
    #[serde(default = "one")]
    pub first_index: u64,
    /// The local etcd member's database file size, bytes.
    #[serde(default)]
    pub db_size: u64,
    /// The part of that file in use (the rest is free space compaction left), bytes.
    #[serde(default)]
    pub db_size_in_use: u64,
    /// The local etcd member's space quota, bytes, when known: past it etcd raises a
    /// `NOSPACE` alarm and refuses every write.
    #[serde(default)]
    pub quota: Option<u64>,
    /// Alarms the local etcd member reports (`NOSPACE`, `CORRUPT`).
    #[serde(default)]
    pub etcd_alarms: Vec<String>,
    /// The latest backup, as this replica last saw or made it.
    #[serde(default)]
    pub backup: crate::backup::BackupStatus,
    /// The local fault (a full disk, an I/O error) that stops this replica at a log entry,
    /// while it lasts: it retries the entry with backoff and goes on once it passes.
    #[serde(default)]
    pub fault: Option<StoppedAt>,
    /// Where this replica's answer differed from the one the leader recorded, if it did:
    /// it has stopped for good and must be rebuilt (see [`Error::Diverged`]).
    #[serde(default)]
    pub divergence: Option<Divergence>,
    /// The transaction outbox's endpoints and finality checks, when the service has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<crate::outbox::OutboxStatus>,
    /// The idempotency table: its keys, bytes, and the time its oldest key was logged.
    #[serde(default)]
    pub idempotency: crate::idempotency::TableStatus,
}

const fn one() -> u64 {
    1
}
