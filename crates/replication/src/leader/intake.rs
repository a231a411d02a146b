//! The leader's intake: the queue the front submits logged requests to while this replica
//! leads (closed while it does not), and the byte budget of what waits or is being
//! processed ([`crate::Limits::max_queued_bytes`]), so a flood of requests is refused with
//! `503` instead of exhausting memory.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::Submit;

/// How long the front waits on a full request queue before answering 503.
pub(crate) const QUEUE_WAIT: Duration = Duration::from_millis(500);

/// One replica's intake.
pub(crate) struct Intake {
    /// The term's request queue while this replica leads.
    submit: RwLock<Option<mpsc::Sender<Submit>>>,
    /// The byte budget of logged requests waiting or being processed.
    queue_bytes: Arc<Semaphore>,
}

impl Intake {
    /// Closed, with a budget of `max_queued_bytes`.
    pub(crate) fn new(max_queued_bytes: usize) -> Self {
        Self {
            submit: RwLock::new(None),
            queue_bytes: Arc::new(Semaphore::new(max_queued_bytes.min(Semaphore::MAX_PERMITS))),
        }
    }

    /// Opens (a term started) or closes (it ended) the queue.
    pub(crate) fn set(&self, queue: Option<mpsc::Sender<Submit>>) {
        *self.submit.write().unwrap_or_else(std::sync::PoisonError::into_inner) = queue;
    }

    /// The queue, while this replica leads.
    pub(crate) fn queue(&self) -> Option<mpsc::Sender<Submit>> {
        self.submit.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Takes `bytes` of the budget for a request to log, waiting up to [`QUEUE_WAIT`] for
    /// earlier requests to be answered; `None` when the queue stays full.
    pub(crate) async fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes).ok()?;
        tokio::time::timeout(QUEUE_WAIT, self.queue_bytes.clone().acquire_many_owned(bytes)).await.ok()?.ok()
    }
}
