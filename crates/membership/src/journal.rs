//! The membership change in progress, as it is kept in the service's own etcd
//! (`membership/change`): what the change is, which step runs next, and when each done
//! step finished.
//!
//! It lives in etcd, not beside the deployment record: it must be exactly as available
//! as the members it changes (a change that has lost its quorum cannot go on anyway),
//! every party that may finish it (the CLI on any machine, the manager) reads the same
//! record, and etcd's transactions let a step advance only from the record it was run
//! against, so that two runners never both advance it.

use serde::{Deserialize, Serialize};

/// What a change does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ChangeKind {
    /// Grow by one replica.
    Add {
        /// The new replica (its etcd member's name).
        replica: String,
    },
    /// Shrink by one replica.
    Remove {
        /// The replica that leaves.
        replica: String,
    },
    /// Swap a replica (dead or alive) for a fresh one: first the old one leaves, then
    /// the new one joins, so that a dead member never counts against the quorum the
    /// new one needs.
    Replace {
        /// The replica that leaves.
        old: String,
        /// The fresh one.
        new: String,
    },
}

impl ChangeKind {
    /// The replica that leaves, if one does.
    pub fn leaving(&self) -> Option<&str> {
        match self {
            Self::Remove { replica } | Self::Replace { old: replica, .. } => Some(replica),
            Self::Add { .. } => None,
        }
    }

    /// The replica that joins, if one does.
    pub fn joining(&self) -> Option<&str> {
        match self {
            Self::Add { replica } | Self::Replace { new: replica, .. } => Some(replica),
            Self::Remove { .. } => None,
        }
    }

    /// Its steps, in order.
    pub fn steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        if self.leaving().is_some() {
            steps.extend([Step::MoveLeadership, Step::RemoveMember, Step::StopReplica, Step::DeleteData]);
        }
        if self.joining().is_some() {
            // Promote before the app's catch-up gate: a learner's etcd member refuses
            // linearizable reads ("rpc not supported for learner"), so the new replica's
            // app can only follow once its member votes. etcd promotes it only when its
            // log is in sync with the leader's, so the quorum is never at risk; the change
            // is not done (nor the count recorded) until the app has caught up too.
            steps.extend([Step::AddLearner, Step::StartReplica, Step::Promote, Step::CatchUp]);
        }
        steps.push(Step::RecordCount);
        steps
    }
}

impl std::fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Add { replica } => write!(f, "add {replica}"),
            Self::Remove { replica } => write!(f, "remove {replica}"),
            Self::Replace { old, new } => write!(f, "replace {old} by {new}"),
        }
    }
}

/// One step of a change. Each can be run again after a crash at any point: it looks at
/// what etcd and the host say first, and does only what is not done yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The leaving replica's etcd member hands Raft leadership (and with it the
    /// service's) to another voter, if it leads.
    MoveLeadership,
    /// Its etcd member is removed from the cluster.
    RemoveMember,
    /// The replica (app and etcd member) is stopped.
    StopReplica,
    /// Its data is deleted (a volume kept, where the backend keeps volumes), and the
    /// records it kept in etcd (its LPI, its membership record).
    DeleteData,
    /// The joining replica's etcd member is added as a learner: it receives the log but
    /// does not vote, so the quorum does not change while it catches up.
    AddLearner,
    /// The joining replica is started (its etcd member joins `existing`; its app catches
    /// up from a peer's snapshot, then the log).
    StartReplica,
    /// The learner is promoted to a voter, once etcd's leader says it is in sync.
    Promote,
    /// Wait until its etcd member runs and its app's LPI is within the catch-up window
    /// of SSI.
    CatchUp,
    /// The new replica count is recorded where a recovery reads it.
    RecordCount,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::MoveLeadership => "move leadership",
            Self::RemoveMember => "remove the etcd member",
            Self::StopReplica => "stop the replica",
            Self::DeleteData => "delete its data",
            Self::AddLearner => "add the etcd member as a learner",
            Self::StartReplica => "start the replica",
            Self::CatchUp => "catch up",
            Self::Promote => "promote the learner to a voter",
            Self::RecordCount => "record the replica count",
        })
    }
}

/// The journaled change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// What it does.
    pub kind: ChangeKind,
    /// The step that runs next; the ones before it in [`ChangeKind::steps`] are done.
    pub next: Step,
    /// The voters once it is done: the count it records.
    pub replicas_after: u32,
    /// When it began (Unix seconds).
    pub started: u64,
    /// Each done step and when it finished (Unix seconds).
    pub done: Vec<(Step, u64)>,
}

impl Change {
    /// A change about to begin.
    pub fn new(kind: ChangeKind, replicas_after: u32) -> Self {
        let next = kind.steps()[0];
        Self { kind, next, replicas_after, started: now(), done: Vec::new() }
    }

    /// The step after `next`, if there is one.
    pub fn step_after_next(&self) -> Option<Step> {
        let steps = self.kind.steps();
        let at = steps.iter().position(|s| *s == self.next)?;
        steps.get(at + 1).copied()
    }

    /// `next` is done: moves on to the step after it.
    pub(crate) fn advance(&mut self, to: Step) {
        self.done.push((self.next, now()));
        self.next = to;
    }
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replacement_removes_the_old_replica_before_the_new_one_joins() {
        let kind = ChangeKind::Replace { old: "n2".into(), new: "n4".into() };
        assert_eq!(
            kind.steps(),
            [
                Step::MoveLeadership,
                Step::RemoveMember,
                Step::StopReplica,
                Step::DeleteData,
                Step::AddLearner,
                Step::StartReplica,
                Step::Promote,
                Step::CatchUp,
                Step::RecordCount
            ]
        );
        assert_eq!(ChangeKind::Add { replica: "n4".into() }.steps()[0], Step::AddLearner);
        assert_eq!(ChangeKind::Remove { replica: "n4".into() }.steps().last(), Some(&Step::RecordCount));
        let mut change = Change::new(kind, 3);
        assert_eq!((change.next, change.step_after_next()), (Step::MoveLeadership, Some(Step::RemoveMember)));
        change.advance(Step::RemoveMember);
        assert_eq!(change.done.len(), 1);
        let text = serde_json::to_string(&change).unwrap();
        assert!(text.contains(r#""kind":"replace""#) && text.contains(r#""next":"remove-member""#), "{text}");
        assert_eq!(serde_json::from_str::<Change>(&text).unwrap(), change);
    }
}
