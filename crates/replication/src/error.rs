//! The runtime's errors. etcd-client's errors are strings inside gRPC statuses; they are
//! wrapped here into variants that say what happened and what it means for the replica.

use std::time::Duration;

/// The replication runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the replication runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or the route table is not usable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The local etcd member did not answer (down, paused, partitioned or overloaded).
    #[error("local etcd member {endpoint} did not answer {action} within {timeout:?}: is it running?")]
    EtcdTimeout {
        /// The member's client endpoint.
        endpoint: String,
        /// What was asked.
        action: &'static str,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The local etcd member refused or failed a call.
    #[error("local etcd member {endpoint} failed {action}: {source}")]
    Etcd {
        /// The member's client endpoint.
        endpoint: String,
        /// What was asked.
        action: &'static str,
        /// What kind of failure it was, as far as the runtime acts on it.
        kind: EtcdFailure,
        /// etcd's (or the client's) error.
        #[source]
        source: etcd_client::Error,
    },
    /// The local etcd member answered a call with something the runtime cannot use.
    #[error("local etcd member {endpoint} answered {action} with {reason}")]
    EtcdAnswer {
        /// The member's client endpoint.
        endpoint: String,
        /// What was asked.
        action: &'static str,
        /// What was wrong with the answer.
        reason: String,
    },
    /// A leader-authority write was refused because `cl` changed: another replica took
    /// leadership after this one. The replica steps down.
    #[error("leadership lost: current-leader record no longer matches epoch {epoch}")]
    LeadershipLost {
        /// The epoch this replica held.
        epoch: u64,
    },
    /// A value stored in etcd could not be decoded. Nothing is written over it; fix or
    /// remove the key (for example with `etcdctl`) and the replica carries on.
    #[error("undecodable etcd value at {key}: {reason}")]
    CorruptRecord {
        /// The key.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A record that must exist is missing (e.g. `rs/<i>` for an index at or below `ls`).
    #[error("missing etcd record {key} (the service's etcd data is incomplete)")]
    MissingRecord {
        /// The key.
        key: String,
    },
    /// A logged request names a route this build does not declare as Replication (the
    /// replicas run different versions of the app). The replica stops at that index.
    #[error(
        "log entry {index} is {method} {path}, which is not a Replication route of this build: run the same app version on every replica"
    )]
    UnknownRoute {
        /// The entry's index.
        index: u64,
        /// Its method.
        method: String,
        /// Its path.
        path: String,
    },
    /// The local record file could not be read or written.
    #[error("local record file {path}: {reason}")]
    RecordFile {
        /// Its path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A snapshot file (or the lineage file beside them) could not be written or read.
    #[error("snapshot file {path}: {reason}")]
    Snapshot {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A snapshot could not be fetched from a peer replica, or was refused after fetching
    /// (wrong digest, truncated). Nothing was restored; the replica tries again.
    #[error("snapshot {index} from replica {peer} ({url}): {reason}")]
    SnapshotFetch {
        /// The peer's replica id.
        peer: String,
        /// Where it was fetched from.
        url: String,
        /// The snapshot's index.
        index: u64,
        /// What went wrong.
        reason: String,
    },
    /// This replica is behind the first log index still in etcd and no live peer holds a
    /// snapshot it could catch up from yet (peers take one when they see the log compacted).
    #[error(
        "this replica needs a snapshot at index {needed} or later to catch up (the log in etcd starts at {first_index}), \
         and no live peer holds one yet; retrying"
    )]
    NoSnapshotSource {
        /// The first index still in etcd.
        first_index: u64,
        /// The lowest snapshot index that would do.
        needed: u64,
    },
    /// The app could not restore a snapshot; its state is unchanged.
    #[error("the app could not restore snapshot {index}: {source}")]
    Restore {
        /// The snapshot's index.
        index: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The app's code for a logged request panicked or did not finish in time. A leader's
    /// term ends (another replica takes over); a follower or a Register stops at that
    /// request and retries, unhealthy until it passes.
    #[error("the {hook} for log entry {index} ({method} {path}) {fault}")]
    Handler {
        /// Which piece of app code: "handler", "rollback" or "reconcile hook".
        hook: &'static str,
        /// The entry's index.
        index: u64,
        /// Its method.
        method: String,
        /// Its path.
        path: String,
        /// What happened: `panicked: <message>` or `did not finish within <timeout>`.
        fault: String,
    },
    /// The app's code for a logged request reported a local fault (an I/O error, a full
    /// disk): this replica could not do its part, which is never the request's answer. A
    /// leader's term ends (another replica executes the request); a follower or a Register
    /// stops at that entry, its LPI kept at what it applied, and retries it with backoff
    /// until it passes, unhealthy meanwhile.
    #[error("{replica}: {} in the {hook} of log entry {index} ({method} {path}): {source}", fault_kind(.source))]
    LocalFault {
        /// This replica's id.
        replica: String,
        /// Which piece of app code: "handler", "apply hook", "rollback" or "reconcile hook".
        hook: &'static str,
        /// The entry's index.
        index: u64,
        /// Its method.
        method: String,
        /// Its path.
        path: String,
        /// What the app reported.
        #[source]
        source: std::io::Error,
    },
    /// This replica's answer to a Replication entry differs from the answer the leader
    /// recorded: a handler that is not deterministic, or a state that was already
    /// different. The replica stops for good (its state is not the service's) and never
    /// leads; rebuild it from its peers.
    #[error(
        "{replica}: diverged at log entry {} ({}): the leader recorded {}, this replica answered {}; its state is \
         no longer the service's, so it stopped. Rebuild it: stop it, empty its data directory and start it again \
         (it catches up from a peer's snapshot)",
        divergence.index, divergence.route, divergence.recorded, divergence.here
    )]
    Diverged {
        /// This replica's id.
        replica: String,
        /// Where and how.
        divergence: Box<crate::data::Divergence>,
    },
    /// A task of the leader's term panicked (a bug in br2k or the app); the term ends.
    #[error("a task of the leader's term panicked: {0}")]
    Panicked(String),
    /// A backup could not be pushed or recorded; the service keeps answering and the
    /// leader tries again.
    #[error("backup: {0}")]
    Backup(String),
    /// The app state could not make its applied requests durable (a local fault: a
    /// leader's term ends; a follower does not report its LPI and tries again).
    #[error("{kind}: the app state could not persist its changes: {0}", kind = fault_kind(.0))]
    Persist(#[source] std::io::Error),
    /// The HTTP listener could not be bound.
    #[error("could not listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn etcd(endpoint: &str, action: &'static str, source: etcd_client::Error) -> Self {
        Self::Etcd { endpoint: endpoint.into(), action, kind: EtcdFailure::of(&source), source }
    }

    /// Whether the client refused an answer as too large (a read to make smaller).
    pub(crate) fn is_too_large(&self) -> bool {
        matches!(self, Self::Etcd { kind: EtcdFailure::TooLarge, .. })
    }

    /// Whether this error ends a leader's term: its fence failed, so another replica
    /// leads. Every task of the term returns it; any other error is retried.
    pub(crate) fn ends_term(&self) -> bool {
        matches!(self, Self::LeadershipLost { .. })
    }

    /// Whether this replica's app failed here (its code panicked or hung, or its storage
    /// failed: a full disk, an I/O error), rather than etcd or the data: another replica
    /// can do what this one could not, so it hands leadership on and holds off leading.
    pub fn is_local_fault(&self) -> bool {
        matches!(
            self,
            Self::Handler { .. }
                | Self::LocalFault { .. }
                | Self::Persist(_)
                | Self::RecordFile { .. }
                | Self::Restore { .. }
        )
    }

    /// Whether this error means the local etcd member could not be asked at all (as
    /// opposed to a refused write or bad data).
    pub fn is_etcd_unavailable(&self) -> bool {
        matches!(self, Self::EtcdTimeout { .. } | Self::Etcd { .. } | Self::EtcdAnswer { .. })
    }
}

/// What kind of failure an etcd call met, read from the client's typed error (the gRPC
/// status code, and for the two codes etcd shares between causes, the status message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtcdFailure {
    /// An answer over the client's size limit: the read is made smaller and tried again.
    TooLarge,
    /// The revision asked for was compacted away (for a history compaction: already done).
    Compacted,
    /// The member could not be reached or did not answer.
    Unavailable,
    /// Anything else etcd refused.
    Refused,
}

impl EtcdFailure {
    /// Classifies `error` once, where it is caught.
    pub fn of(error: &etcd_client::Error) -> Self {
        use tonic::Code;
        match error {
            etcd_client::Error::GRpcStatus(status) => match status.code() {
                // tonic's decoder refuses a message over the limit with OutOfRange; etcd
                // says a compacted revision with OutOfRange too.
                Code::OutOfRange if status.message().contains("message length too large") => Self::TooLarge,
                Code::OutOfRange if status.message().contains("compacted") => Self::Compacted,
                Code::ResourceExhausted if status.message().contains("message length too large") => Self::TooLarge,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Self::Unavailable,
                _ => Self::Refused,
            },
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => Self::Unavailable,
            _ => Self::Refused,
        }
    }
}

/// What kind of local fault an I/O error is, in the words an operator looks for.
pub(crate) fn fault_kind(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::StorageFull => "disk full",
        std::io::ErrorKind::QuotaExceeded => "disk quota exceeded",
        std::io::ErrorKind::ReadOnlyFilesystem => "read-only file system",
        _ => "I/O error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: tonic::Status) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(status)
    }

    #[test]
    fn etcd_failures_are_classified_from_the_typed_error_and_keep_it_as_their_source() {
        let too_large = status(tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        ));
        assert_eq!(EtcdFailure::of(&too_large), EtcdFailure::TooLarge);
        let compacted = status(tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted"));
        assert_eq!(EtcdFailure::of(&compacted), EtcdFailure::Compacted);
        assert_eq!(
            EtcdFailure::of(&status(tonic::Status::unavailable("connection refused"))),
            EtcdFailure::Unavailable
        );
        assert_eq!(EtcdFailure::of(&status(tonic::Status::invalid_argument("bad"))), EtcdFailure::Refused);

        let error = Error::etcd("http://127.0.0.1:2379", "read log entries", too_large);
        assert!(error.is_too_large() && error.is_etcd_unavailable() && !error.ends_term());
        let source = std::error::Error::source(&error).expect("the etcd error is kept");
        assert!(source.to_string().contains("message length too large"), "{source}");
        assert!(Error::LeadershipLost { epoch: 3 }.ends_term());
    }
}
