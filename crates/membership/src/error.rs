//! Why a membership change stopped or was refused.

use std::time::Duration;

use crate::journal::{Change, Step};

/// What a host (a backend) reports when it cannot do its part.
pub type HostError = Box<dyn std::error::Error + Send + Sync>;

/// Why a membership change stopped or was refused. A stopped change stays journaled:
/// running it again resumes it at the step that stopped.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The change would be unsafe, or makes no sense, now.
    #[error("refused: {0}")]
    Refused(String),
    /// Another change is journaled: it must be finished first.
    #[error(
        "another membership change is in progress ({}, next step: {}): finish it first (running `br2k scale` or `br2k replace` again resumes it)",
        .0.kind, .0.next
    )]
    InProgress(Box<Change>),
    /// Someone else runs a change of this service right now.
    #[error("someone else is running a membership change of this service now ({0}); wait for it")]
    Busy(String),
    /// No member answered, or etcd refused a call.
    #[error("etcd: could not {what}: {reason}")]
    Etcd {
        /// What was being done.
        what: String,
        /// Why it failed, endpoint by endpoint where there were several.
        reason: String,
    },
    /// The backend could not do its part of a step.
    #[error("{step} ({replica}): {source}")]
    Host {
        /// The step.
        step: Step,
        /// The replica it was for.
        replica: String,
        /// The backend's reason.
        #[source]
        source: HostError,
    },
    /// A step waited too long.
    #[error("{step}: {what} within {after:?}; the change stays journaled and resumes when run again")]
    Timeout {
        /// The step.
        step: Step,
        /// What did not happen.
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// The journal in etcd is not what this version writes.
    #[error("the journaled membership change cannot be read ({0}); inspect it with etcdctl before going on")]
    Journal(String),
}

/// The crate's results.
pub type Result<T, E = MembershipError> = std::result::Result<T, E>;
