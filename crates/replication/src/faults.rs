//! A replica that cannot apply an entry stops; it never diverges quietly.
//!
//! Two ways a replica's state can part from the service's are caught where they start:
//! - **A local fault.** The app could not do its part: a full disk, an I/O error, a failed
//!   fsync. That is this replica's problem, never the request's answer (handlers say so
//!   with [`crate::Failure::Fault`], hooks with an `Err`). The entry does not count as
//!   processed: LPI stays below it, in memory and in etcd, so compaction keeps what the
//!   replica still needs. The replica says why in its health, status and metrics, rolls
//!   back what the attempt left (Check for pending process) and tries the entry again
//!   with backoff until it passes. A leader ends its term instead, hands leadership on,
//!   and another replica executes the request; the client's retry gets that answer.
//! - **A divergence.** The replica applied an entry and answered differently from the
//!   answer the leader recorded (status, or the body's SHA-256): a handler that is not
//!   deterministic, or a state that was already different. Either way this replica's
//!   state is not the service's. It stops for good: the mark survives restarts (in
//!   `br2k-divergence.json` beside the app's data), it never leads, serves no snapshot,
//!   holds back no compaction, and says so until it is rebuilt from its peers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::error;

use std::sync::Arc;

use crate::app::Recorded;
use crate::data::{Divergence, LogEntry, StoppedAt, StoredReply};
use crate::error::{Error, Result};
use crate::membership::Membership;
use crate::reporter::Reporter;

/// The file that marks a replica as diverged, in its data directory.
const DIVERGENCE_FILE: &str = "br2k-divergence.json";

/// The wait between attempts at an entry a local fault stopped: doubling from 100 ms to
/// 5 s, so a full disk is not hammered and a freed one is noticed within seconds.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    delay: Duration,
    next: Option<Instant>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const LONGEST: Duration = Duration::from_secs(5);

    /// Whether the next attempt must wait still.
    pub(crate) fn waiting(&self) -> bool {
        self.next.is_some_and(|at| Instant::now() < at)
    }

    /// An attempt failed: wait longer before the next.
    pub(crate) fn failed(&mut self) {
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::LONGEST);
        self.next = Some(Instant::now() + self.delay);
    }

    /// An attempt passed.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The content type of an answer the runtime recorded for a request whose handler's own
/// answer was lost: the replica that executed it lost leadership before recording it, and
/// only the record file's last step keeps an answer. Nothing to compare answers with.
const LOST_ANSWER: &str = "application/vnd.br2k.answer-lost+json";

/// What is recorded as the answer to the Replication request at `index` when the replica
/// that executed it kept its effect but not its answer.
pub(crate) fn lost_answer(index: u64) -> crate::Reply {
    let note = "executed by a leader that lost its answer before recording it; the request took effect once";
    let body = serde_json::json!({ "index": index, "note": note });
    crate::Reply { content_type: Some(LOST_ANSWER.into()), ..crate::Reply::json(200, &body) }
}

/// An answer as the divergence check compares and shows it: Success or Fail, status, and
/// the body's SHA-256 (the bodies themselves may be large, or private).
pub(crate) fn describe_answer(success: bool, status: u16, body: &[u8]) -> String {
    let digest: String = Sha256::digest(body).iter().map(|b| format!("{b:02x}")).collect();
    let outcome = if success { "success" } else { "refusal" };
    format!("{outcome} {status} (body sha256 {digest}, {} bytes)", body.len())
}

/// Where this replica's local faults and divergence are noted: the status, the membership
/// record, and the divergence mark on disk.
pub(crate) struct Faults {
    replica: String,
    /// The divergence mark.
    path: PathBuf,
    reporter: Arc<Reporter>,
    membership: Arc<Membership>,
}

impl Faults {
    pub(crate) fn new(
        replica: &str,
        data_dir: &std::path::Path,
        reporter: Arc<Reporter>,
        membership: Arc<Membership>,
    ) -> Self {
        Self { replica: replica.to_owned(), path: data_dir.join(DIVERGENCE_FILE), reporter, membership }
    }

    fn divergence_path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Reads the divergence mark a previous run left, if any: the replica then starts
    /// stopped, as it ended.
    ///
    /// # Errors
    /// When the mark exists but cannot be read; the replica does not start on a state it
    /// cannot vouch for.
    pub(crate) fn load_divergence(&self) -> Result<()> {
        let path = self.divergence_path();
        let divergence: Divergence = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::RecordFile {
                path: path.display().to_string(),
                reason: format!("undecodable divergence mark ({e}); the replica diverged earlier: rebuild it"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::RecordFile { path: path.display().to_string(), reason: e.to_string() }),
        };
        let error = self.divergence_error(&divergence);
        error!(replica = %self.replica, "{error}");
        self.stop_diverged(divergence, &error);
        Ok(())
    }

    /// Whether this replica has diverged (it then neither follows nor leads).
    pub(crate) fn diverged(&self) -> bool {
        self.reporter.status.borrow().divergence.is_some()
    }

    /// Checks this replica's answer to the Replication entry at `index` against `recorded`,
    /// the answer the leader recorded with its Success.
    ///
    /// # Errors
    /// [`Error::Diverged`] when they differ; the replica has then stopped for good.
    pub(crate) fn check_answer(
        &self,
        index: u64,
        entry: &LogEntry,
        recorded: Option<&StoredReply>,
        here: &Recorded,
    ) -> Result<()> {
        // Entries recorded before answers were kept with their state, and answers the
        // executing leader lost, have nothing to check against.
        let Some(recorded) = recorded.filter(|r| r.content_type.as_deref() != Some(LOST_ANSWER)) else {
            return Ok(());
        };
        let (success, reply) = match here {
            Ok(reply) => (true, reply),
            Err(reply) => (false, reply),
        };
        // Compared in place: this runs for every Replication entry a follower applies.
        if success && reply.status == recorded.status && reply.body.as_ref() == recorded.body.as_slice() {
            return Ok(());
        }
        let divergence = Divergence {
            index,
            route: format!("{} {}", entry.method, entry.path),
            recorded: describe_answer(true, recorded.status, &recorded.body),
            here: describe_answer(success, reply.status, &reply.body),
            at: crate::data::unix_seconds(),
        };
        if let Err(e) = crate::durable::write_atomically(&self.divergence_path(), &crate::codec::encode(&divergence)) {
            error!(replica = %self.replica, error = %e,
                "could not write the divergence mark: the replica stops now, but a restart would not know it diverged");
        }
        let error = self.divergence_error(&divergence);
        error!(replica = %self.replica, "{error}");
        self.stop_diverged(divergence, &error);
        Err(error)
    }

    fn divergence_error(&self, divergence: &Divergence) -> Error {
        Error::Diverged { replica: self.replica.clone(), divergence: Box::new(divergence.clone()) }
    }

    fn stop_diverged(&self, divergence: Divergence, error: &Error) {
        let index = divergence.index;
        self.membership.set(|m| m.diverged = Some(index));
        let reason = error.to_string();
        self.reporter.set_status(|s| {
            // It applied the entry, but differently: it has not processed it as the
            // service did.
            s.lpi = s.lpi.min(index - 1);
            s.divergence = Some(divergence);
            s.fault = None;
            s.last_error = Some(reason);
        });
    }

    /// A local fault stopped this replica at the entry at `index`: says so in the status
    /// (keeping when it first stopped there) and counts it.
    pub(crate) fn note_fault(&self, index: u64, error: &Error) {
        self.reporter.metrics.count_local_fault();
        // Says which replica, as an alert quoting it out of context must.
        let mut reason = error.to_string();
        if !reason.starts_with(&format!("{}: ", self.replica)) {
            reason = format!("{}: {reason}", self.replica);
        }
        self.reporter.set_status(|s| {
            s.fault = Some(match s.fault.take() {
                Some(stopped) if stopped.index == index => {
                    StoppedAt { reason, retries: stopped.retries + 1, ..stopped }
                }
                _ => StoppedAt { index, reason, since: crate::data::unix_seconds(), retries: 0 },
            });
        });
    }

    /// The entry a local fault stopped this replica at has passed.
    pub(crate) fn clear_fault(&self) {
        let Some(stopped) = self.reporter.status.borrow().fault.clone() else { return };
        tracing::info!(replica = %self.replica, index = stopped.index, retries = stopped.retries,
            seconds = crate::data::unix_seconds().saturating_sub(stopped.since), "the local fault cleared: the replica goes on");
        self.reporter.set_status(|s| s.fault = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut backoff = Backoff::default();
        assert!(!backoff.waiting());
        let mut delays = Vec::new();
        for _ in 0..8 {
            backoff.failed();
            delays.push(backoff.delay);
        }
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(*delays.last().unwrap(), Duration::from_secs(5));
        assert!(backoff.waiting());
        backoff.reset();
        assert!(!backoff.waiting());
    }

    #[test]
    fn answers_are_described_by_outcome_status_and_digest() {
        let text = describe_answer(true, 200, b"{}");
        assert!(text.starts_with("success 200 (body sha256 44136fa3"), "{text}");
        assert!(text.ends_with("2 bytes)"), "{text}");
        assert_ne!(text, describe_answer(false, 200, b"{}"));
    }
}
