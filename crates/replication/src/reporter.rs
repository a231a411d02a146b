//! Where every layer reports what it does: the status `/br2k/status` serves, and the
//! Prometheus metrics that follow it. The node, the roles and the storage lifecycle each
//! hold this one handle, never the runtime, to say what changed.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::stats::Stats;
use crate::status::{Role, Status};

/// The status sink: one per replica.
pub(crate) struct Reporter {
    /// This replica's id, for the log lines it writes.
    replica: String,
    /// The status as last changed (a `watch` so that tests and the front see changes).
    pub(crate) status: watch::Sender<Status>,
    /// What `/metrics` serves.
    pub(crate) metrics: Metrics,
    /// Where the time goes (served in the status).
    pub(crate) stats: Arc<Stats>,
}

impl Reporter {
    pub(crate) fn new(status: Status, metrics: Metrics, stats: Arc<Stats>) -> Self {
        Self { replica: status.replica.clone(), status: watch::Sender::new(status), metrics, stats }
    }

    /// Changes the status, and the metrics that follow it.
    pub(crate) fn set_status(&self, change: impl FnOnce(&mut Status)) {
        self.status.send_modify(|status| {
            let (leader, role) = (status.leader.as_ref().map(|l| l.replica.clone()), status.role);
            change(status);
            self.metrics.status_changed(leader.as_deref(), role, status);
        });
    }

    /// Shows `error` as what stops progress (logged once, not at every retry).
    pub(crate) fn note_error(&self, error: &Error) {
        let text = error.to_string();
        let changed = self.status.borrow().last_error.as_deref() != Some(text.as_str());
        if changed {
            warn!(replica = %self.replica, error = %text, "replica cannot make progress");
            self.set_status(|s| s.last_error = Some(text));
        }
    }

    /// Progress resumed: the last error no longer holds.
    pub(crate) fn clear_error(&self) {
        if self.status.borrow().last_error.is_some() {
            self.set_status(|s| s.last_error = None);
        }
    }

    /// Changes the role shown (and logs the change, with why).
    pub(crate) fn set_role(&self, role: Role, epoch: Option<u64>, reason: &str) {
        let before = self.status.borrow().role;
        if before != role {
            info!(service = %self.status.borrow().service, replica = %self.replica,
                from = ?before, to = ?role, epoch, reason, "role change");
        }
        self.set_status(|s| {
            s.role = role;
            s.epoch = epoch;
        });
    }
}
