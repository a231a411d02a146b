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
    /// LS, the log's last index (`log_last_index` in the metrics), as last seen.
    pub ls: u64,
    /// SSI, the service state index: the last index whose outcome is recorded
    /// (`service_state_index`), as last seen.
    pub ssi: u64,
    /// LPI, this replica's latest processed index (`processed_index`).
    pub lpi: u64,
    /// What the app state says it has applied.
    pub applied_index: u64,
    /// Normal requests a dead leader left InProcess that are not yet reconciled (as last
    /// listed by this replica when it became leader).
    pub in_doubt: Vec<u64>,
    /// Whether the local etcd member answered the last leader-condition check.
    pub etcd_reachable: bool,
    /// The local etcd member is a learner: a membership change is adding it, and it
    /// does not vote (nor can it lead) until it is promoted.
    #[serde(default)]
    pub etcd_learner: bool,
    /// The other members say the local etcd member was removed from the cluster (a
    /// membership change): this replica serves nothing any more.
    #[serde(default)]
    pub removed_from_etcd: bool,
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
    pub backup: BackupStatus,
    /// The local fault (a full disk, an I/O error) that stops this replica at a log entry,
    /// while it lasts: it retries the entry with backoff and goes on once it passes.
    #[serde(default)]
    pub fault: Option<StoppedAt>,
    /// Where this replica's answer differed from the one the leader recorded, if it did:
    /// it has stopped for good and must be rebuilt (see [`crate::Error::Diverged`]).
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

/// What `/br2k/status` says of backups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStatus {
    /// The index the latest backup reaches (0: none yet): signed, and linked to the anchor.
    pub index: u64,
    /// Its manifest's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// When it was pushed, seconds since the Unix epoch.
    #[serde(default)]
    pub at: u64,
    /// How long reading, pushing (and recording) it took, milliseconds.
    #[serde(default)]
    pub took_ms: u64,
    /// Its size: its snapshot and segments, bytes.
    #[serde(default)]
    pub bytes: u64,
    /// What pushing it uploaded (the blobs the registry lacked, and its manifests), bytes.
    #[serde(default)]
    pub pushed_bytes: u64,
    /// How many log segments it names.
    #[serde(default)]
    pub segments: u64,
    /// Why the last attempt failed, if it did and none has succeeded since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The backup interval, milliseconds (0: this replica does not back up): what a total
    /// disaster may lose of what was acknowledged.
    #[serde(default)]
    pub interval_ms: u64,
    /// The backup recorded on chain, and what recording costs.
    #[serde(default)]
    pub anchor: AnchorStatus,
    /// Backups in the registry after the last retention pass, and deleted by this replica.
    #[serde(default)]
    pub kept: u64,
    /// Backups this replica deleted under the retention policy.
    #[serde(default)]
    pub deleted: u64,
    /// What an operator must fix for backups to protect the service again (the chain's
    /// record pinned above the service's index, a backup too large to restore); `None`
    /// when nothing. It shows on the status, the dashboard, `/br2k/health` and
    /// `br2k_backup_alert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<String>,
}

/// The backup recorded on chain (the anchor) and the gas recording costs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorStatus {
    /// The index it reaches (0: none yet).
    pub index: u64,
    /// Its manifest's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// When the chain recorded it, seconds since the Unix epoch (block time).
    #[serde(default)]
    pub at: u64,
    /// How often one is recorded, milliseconds.
    #[serde(default)]
    pub interval_ms: u64,
    /// Anchors this replica recorded.
    #[serde(default)]
    pub count: u64,
    /// Gas they used.
    #[serde(default)]
    pub gas_total: u64,
    /// Gas the latest used.
    #[serde(default)]
    pub gas_last: u64,
    /// Gas a day at this rate: the latest anchor's gas times anchors a day at the record
    /// interval, while requests keep coming (an idle service records at most one more).
    /// 0 until a second anchor: a service's first costs about three times the others.
    #[serde(default)]
    pub gas_per_day: u64,
}
