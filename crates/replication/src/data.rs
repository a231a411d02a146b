//! The etcd data of a service (paper Fig. 4), under `/br2k/<service>/`:
//!
//! | key | value |
//! |---|---|
//! | `log/<index>` | RLE: the request ([`LogEntry`], JSON) |
//! | `rs/<index>` | RS: type, state, writer's epoch and, once final, the response ([`EntryState`]) |
//! | `ls` | LS, decimal |
//! | `ssi` | SSI, decimal |
//! | `lpi/<replica>` | LPI of that replica, decimal |
//! | `cl` | CL: the leader's replica id and public location ([`LeaderRecord`]); its mod_revision is the epoch |
//! | `epoch_base` | the on-chain epoch when this etcd data was created, decimal |
//! | `doubt/<index>` | beyond: a Normal request left InProcess by a dead leader, until it is reconciled (empty value) |
//! | `idem/<key>` | the answer of a keyed request a dead leader left in doubt and a later leader settled after every replica had passed it ([`IdempotencyRecord`], leased); keys live in each replica's idempotency table ([`crate::idempotency`]), not here. Records of an older format are moved into the table by the first leader that finds them |
//! | `compacted` | where the log now starts and what the deleted entries were ([`CompactedLog`]); absent until the first compaction |
//! | `terms` | how many leadership terms have started (each Register counts itself in its first fenced write), decimal |
//! | `members/<replica>` | a live replica: where peers fetch its snapshot, and which one it holds ([`MemberRecord`]); leased, so it vanishes when the replica stops renewing |
//! | `peer_token` | the secret replicas show each other to fetch snapshots; clients never reach etcd |
//! | `outbox/tx/<index>/<k>` | the `k`-th blockchain transaction the only-once request at `index` sent: nonce, every signed version, the receipt ([`crate::outbox::TxRecord`]) |
//! | `outbox/next_nonce` | the next nonce of the service's transaction key the outbox has not reserved, decimal |
//! | `membership/change` | the membership change in progress (grow, shrink, replace), step by step, so that whoever runs next finishes it; written by `br2k-membership` only ([`membership_change_key`]) |
//! | `membership/lock` | who runs that change now (leased; [`membership_lock_key`]) |
//! | `outbox/free/<nonce>` | a reserved nonce whose transaction the chain refused, reused by the next transaction (empty value) |
//!
//! Indexes are zero-padded to 20 digits so that key order is index order and a range read
//! returns entries in order.

use serde::{Deserialize, Serialize};

/// The two records of a log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EntryRecord {
    /// `log/<index>`: the request (RLE).
    Request,
    /// `rs/<index>`: its state (RS).
    State,
}

/// An etcd member as the member list gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EtcdMember {
    pub(crate) id: u64,
    /// The replica it belongs to (empty while an added member has not started).
    pub(crate) name: String,
    pub(crate) learner: bool,
    pub(crate) client_urls: Vec<String>,
}

impl From<&etcd_client::Member> for EtcdMember {
    fn from(m: &etcd_client::Member) -> Self {
        Self { id: m.id(), name: m.name().to_owned(), learner: m.is_learner(), client_urls: m.client_urls().to_vec() }
    }
}

/// Where `service`'s membership change in progress is journaled (see the table above).
pub fn membership_change_key(service: &str) -> String {
    format!("{}membership/change", Keys::new(service).prefix)
}

/// The records replica `replica` of `service` keeps in etcd (its LPI and membership
/// record): a membership change that removes the replica deletes them.
pub fn replica_record_keys(service: &str, replica: &str) -> [String; 2] {
    let keys = Keys::new(service);
    [keys.lpi(replica), keys.member(replica)]
}

/// The lock whoever runs `service`'s membership change holds (leased: it vanishes with
/// its holder), so that two never run one at once.
pub fn membership_lock_key(service: &str) -> String {
    format!("{}membership/lock", Keys::new(service).prefix)
}

/// Builds the keys of one service (all under `/br2k/<service>/`).
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(service: &str) -> Self {
        Self { prefix: format!("/br2k/{service}/") }
    }

    pub(crate) fn log(&self, index: u64) -> String {
        format!("{}log/{index:020}", self.prefix)
    }

    pub(crate) fn rs(&self, index: u64) -> String {
        format!("{}rs/{index:020}", self.prefix)
    }

    pub(crate) fn ls(&self) -> String {
        format!("{}ls", self.prefix)
    }

    pub(crate) fn ssi(&self) -> String {
        format!("{}ssi", self.prefix)
    }

    pub(crate) fn cl(&self) -> String {
        format!("{}cl", self.prefix)
    }

    pub(crate) fn epoch_base(&self) -> String {
        format!("{}epoch_base", self.prefix)
    }

    pub(crate) fn lpi(&self, replica: &str) -> String {
        format!("{}lpi/{replica}", self.prefix)
    }

    pub(crate) fn doubt(&self, index: u64) -> String {
        format!("{}doubt/{index:020}", self.prefix)
    }

    pub(crate) fn doubt_prefix(&self) -> String {
        format!("{}doubt/", self.prefix)
    }

    pub(crate) fn idem(&self, key: &str) -> String {
        format!("{}idem/{key}", self.prefix)
    }

    /// Where the `idem/` records are, `[from, to)`.
    pub(crate) fn idem_range(&self) -> (String, String) {
        (format!("{}idem/", self.prefix), format!("{}idem0", self.prefix))
    }

    /// The client's key in an `idem/` record's key.
    pub(crate) fn idem_key_of<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?.strip_prefix("idem/")
    }

    /// The outbox's keys, under this service's prefix (their layout is the outbox's).
    pub(crate) fn outbox(&self) -> br2k_outbox::OutboxKeys {
        br2k_outbox::OutboxKeys::new(self.prefix.clone())
    }

    pub(crate) fn compacted(&self) -> String {
        format!("{}compacted", self.prefix)
    }

    pub(crate) fn terms(&self) -> String {
        format!("{}terms", self.prefix)
    }

    pub(crate) fn member(&self, replica: &str) -> String {
        format!("{}members/{replica}", self.prefix)
    }

    pub(crate) fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }

    pub(crate) fn peer_token(&self) -> String {
        format!("{}peer_token", self.prefix)
    }

    /// The replica id in a `members/` key.
    pub(crate) fn member_of<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?.strip_prefix("members/")
    }

    /// Which of an entry's two records `key` is, and the entry's index.
    pub(crate) fn entry_record(&self, key: &[u8]) -> Option<(EntryRecord, u64)> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let (record, digits) = match key.strip_prefix("log/") {
            Some(digits) => (EntryRecord::Request, digits),
            None => (EntryRecord::State, key.strip_prefix("rs/")?),
        };
        Some((record, digits.parse().ok()?))
    }

    /// The keys a follower's watch covers, `[from, to)`: `log/` up to and with `ssi`
    /// (entries, states, LS, LPIs, SSI; the idempotency records sort before it).
    pub(crate) fn feed_range(&self) -> (String, String) {
        (format!("{}log/", self.prefix), format!("{}\0", self.ssi()))
    }

    /// The index in a `log/`, `rs/` or `doubt/` key.
    pub(crate) fn index_of(&self, key: &[u8]) -> Option<u64> {
        let key = std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)?;
        let digits = key
            .strip_prefix("log/")
            .or_else(|| key.strip_prefix("rs/"))
            .or_else(|| key.strip_prefix("doubt/"))
            .or_else(|| key.strip_prefix("outbox/free/"))?;
        digits.parse().ok()
    }
}

/// What a service or replica name may be: it names etcd keys, files and URL paths.
pub const NAME_RULE: &str = "1-64 characters of letters, digits, '-', '_' or '.' (not only dots)";

/// Whether `name` follows [`NAME_RULE`]. Every name a user gives is checked with it
/// before anything is started or registered, and every name read from the chain before
/// it names a file or a URL path (`.` and `..` would name a directory).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.bytes().all(|b| b == b'.')
}

/// The paper's request types (Fig. 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// Executed by every replica, in index order.
    Replication,
    /// Executed once, by the leader that processes it.
    Normal,
    /// A record of a transaction the client made on chain: logged, answered, never executed.
    ExternalTxn,
    /// Beyond the paper: answered from the leader's state, never logged.
    Read,
}

/// The processing state of a log entry (Fig. 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    /// Replicated, not started.
    Null,
    /// A leader started executing it; its outcome is not recorded.
    InProcess,
    /// Executed; the outcome is final.
    Success,
    /// Executed and failed (the app state is unchanged); the outcome is final.
    Fail,
    /// Replicated but never started by the leader that logged it; never executed.
    Ignore,
}

impl ProcessState {
    /// Whether no later leader will change this state.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Success | Self::Fail | Self::Ignore)
    }
}

/// RLE: a client request as logged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// HTTP method, upper case.
    pub method: String,
    /// Request path, without the query.
    pub path: String,
    /// The query string, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The request headers the runtime keeps (content type and the configured ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The body.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    /// The client's `Idempotency-Key`, if it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// What the leader wrote into a keyed entry for the idempotency table: when it logged
    /// it, and which older records every replica drops now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<crate::data::Stamp>,
}

/// RS: the type and processing state of one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryState {
    /// The request type.
    pub kind: RequestKind,
    /// Its processing state.
    pub state: ProcessState,
    /// The epoch of the leader that wrote this state.
    pub epoch: u64,
    /// The response, once the state is Success or Fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<StoredReply>,
}

/// A response as stored with a final RS, returned again to a retried idempotent request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReply {
    /// HTTP status.
    pub status: u16,
    /// Content type, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The body.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
}

/// CL: who holds leadership, and where clients reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// The replica id.
    pub replica: String,
    /// Its public location (the URL published in the registry).
    pub location: String,
}

/// What `idem/<key>` holds: today only the late answer of a request left in doubt; in
/// services from before the idempotency table, one per keyed request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The index the request was logged at.
    pub index: u64,
    /// A hash of the method, path, query and body, to refuse a reused key.
    pub fingerprint: String,
    /// The answer, once the request's outcome is final. Kept here (not only in `rs/`) so
    /// that a retry is answered even after log compaction deleted the entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<StoredReply>,
}

/// What `compacted` holds: the first index still in etcd, and a tally of the entries
/// compaction deleted below it, so that counts over the whole log (the paper's Table 2)
/// survive compaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactedLog {
    /// The first log index still in etcd; every entry below it was deleted.
    pub first_index: u64,
    /// Deleted entries per final state.
    pub success: u64,
    /// Deleted entries that failed.
    pub fail: u64,
    /// Deleted entries that were ignored.
    pub ignore: u64,
    /// Deleted Replication entries that succeeded: the number of effects every replica's
    /// state holds from below `first_index`.
    pub replication_success: u64,
}

impl CompactedLog {
    /// Adds one entry's state to the tally; false, adding nothing, when it is not final.
    pub(crate) fn count(&mut self, state: &EntryState) -> bool {
        match state.state {
            ProcessState::Success => {
                self.success += 1;
                self.replication_success += u64::from(state.kind == RequestKind::Replication);
            }
            ProcessState::Fail => self.fail += 1,
            ProcessState::Ignore => self.ignore += 1,
            ProcessState::Null | ProcessState::InProcess => return false,
        }
        true
    }
}

/// A snapshot of the app state as its replica describes it, in `members/<replica>` and
/// beside the snapshot file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The log index the snapshot is at: every entry up to it is applied, none after.
    pub index: u64,
    /// The state version of the replica that took it: the index of the snapshot its state
    /// was last restored from, 0 when it was built by replaying the log from the start.
    pub state_version: u64,
    /// `sha256:<hex>` of the snapshot's bytes.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// The replica that took it.
    pub replica: String,
    /// When it was taken, in seconds since the Unix epoch.
    pub created_at: u64,
}

/// What `members/<replica>` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Where the replica's HTTP front is reached (its snapshot is at `/br2k/snapshot`).
    pub url: String,
    /// The latest snapshot it holds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotMeta>,
    /// Whether it is restoring a snapshot to catch up (then it neither counts for nor
    /// holds back compaction).
    #[serde(default)]
    pub catching_up: bool,
    /// The log index at which it diverged from the service, if it did: it has stopped,
    /// its snapshots are not the service's state (never fetched), and it does not hold
    /// back compaction (it must be rebuilt from a snapshot anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged: Option<u64>,
}

/// A log entry a replica cannot get past because of a local fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedAt {
    /// The entry's index (the replica's LPI stays below it).
    pub index: u64,
    /// What went wrong, as the error says it.
    pub reason: String,
    /// When the replica first stopped there (seconds since the Unix epoch).
    pub since: u64,
    /// How many times it has tried the entry again.
    pub retries: u64,
}

/// A replica's answer to a Replication entry that differs from the recorded one: the
/// online form of the testbed's "answers that disagree" check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// The entry's index.
    pub index: u64,
    /// Its route, `METHOD /path`.
    pub route: String,
    /// The answer the leader recorded: status and the body's SHA-256.
    pub recorded: String,
    /// This replica's answer, the same way.
    pub here: String,
    /// When it was found (seconds since the Unix epoch).
    pub at: u64,
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since the Unix epoch (0 on a clock set before it): the leader's stamp on
/// keyed entries.
pub(crate) fn unix_millis() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Seconds since the Unix epoch (0 on a clock set before it), for times shown in status
/// and records.
pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The largest state (a snapshot, or a backup's snapshot and segments together) a replica
/// accepts from elsewhere, 1 GiB: what a peer or a registry names beyond it is never fetched.
pub(crate) const MAX_STATE_BYTES: u64 = 1024 * 1024 * 1024;

/// The steps of Process Request at which the runtime records where it is (the paper's
/// local record file), and at which an observer given to
/// [`crate::Builder::on_step`] is awaited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The entry's RS is InProcess; its handler has not started.
    BeforeExecution,
    /// The handler is running.
    Executing,
    /// The handler returned; the outcome is not yet in etcd.
    Executed,
}

/// What the leader writes into each keyed entry it logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// When the leader logged it, milliseconds since the Unix epoch (its clock; replicas
    /// never use their own).
    pub at: u64,
    /// Records of entries below this index are dropped before this entry's is added.
    pub keep_from: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_in_index_order_and_parse_back() {
        let keys = Keys::new("svc");
        assert!(keys.log(9) < keys.log(10));
        assert_eq!(keys.log(42), "/br2k/svc/log/00000000000000000042");
        assert_eq!(keys.index_of(keys.rs(7).as_bytes()), Some(7));
        assert_eq!(keys.index_of(b"/br2k/other/rs/1"), None);
    }
}
