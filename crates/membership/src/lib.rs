//! Growing, shrinking and replacing the replicas of a running br2k service, one etcd
//! member at a time, with nothing lost.
//!
//! etcd's own guidance is the order: add a member as a *learner* (it receives the log but
//! does not vote, so the quorum does not change while it catches up), start it, promote
//! it once the leader says it is in sync, one change at a time, never below a quorum;
//! remove a dead member before adding its replacement; move leadership off a member
//! before removing it. br2k adds its own gate (the new replica's LPI within the trailing
//! window of SSI before the change is done; after the promotion, because a learner's
//! member refuses the linearizable reads the app follows with) and its own last step
//! (the new replica count recorded where a recovery reads it).
//!
//! A change is a journaled state machine ([`journal`]): the change and its next step are
//! kept in the service's etcd, every step is idempotent (it looks at etcd and the host
//! before it acts), and the journal advances only after a step is done, by a
//! transaction on the revision it was run against. A crash at any point (of the CLI, the
//! manager, a replica) leaves a change that the next run of it, by anyone, finishes;
//! a lease-bound lock keeps two runners from running it at once.
//!
//! The backend's part (start and stop a replica, delete its data, record the count) is a
//! [`ReplicaHost`]; the cluster is reached through [`Cluster`].

mod change;
mod cluster;
mod error;
pub mod journal;

pub use change::{ChangeOptions, Membership, ReplicaHost, catch_up_window};
pub use cluster::{Cluster, MemberView, quorum};
pub use error::{HostError, MembershipError, Result};
pub use journal::{Change, ChangeKind, Step};
