//! Runs the app's code (handlers, rollbacks, reconcile hooks) so that a panic or a hang in
//! it becomes an error the runtime acts on, instead of a task that dies or waits for ever
//! while the replica still looks healthy (a zombie leader).
//!
//! The code runs in place, not on a task of its own: when a term is stopped, an execution
//! in progress is dropped with it, exactly as a crash would interrupt it, and nothing of it
//! keeps running beside the next step. The price is that a handler which blocks its thread
//! (instead of awaiting) cannot be timed out; handlers must use `spawn_blocking` for
//! blocking work, as any async code must.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;

use crate::error::Error;

/// What went wrong with a piece of app code.
#[derive(Debug)]
pub(crate) enum Fault {
    Panicked(String),
    TimedOut(Duration),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Panicked(message) => write!(f, "panicked: {message}"),
            Self::TimedOut(after) => write!(f, "did not finish within {after:?} (the handler timeout)"),
        }
    }
}

impl Fault {
    /// The error for `hook` of the request at `index`.
    pub(crate) fn at(&self, hook: &'static str, index: u64, method: &str, path: &str) -> Error {
        Error::Handler { hook, index, method: method.to_owned(), path: path.to_owned(), fault: self.to_string() }
    }
}

/// Awaits `future`, turning a panic or more than `timeout` into a [`Fault`].
pub(crate) async fn guarded<T>(future: impl Future<Output = T>, timeout: Duration) -> Result<T, Fault> {
    match tokio::time::timeout(timeout, AssertUnwindSafe(future).catch_unwind()).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(panic)) => Err(Fault::Panicked(panic_message(&*panic))),
        Err(_) => Err(Fault::TimedOut(timeout)),
    }
}

/// The text a panic was raised with.
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn panics_and_hangs_become_faults() {
        let second = Duration::from_secs(1);
        assert_eq!(guarded(async { 7 }, second).await.unwrap(), 7);
        let panicked = guarded(async { panic!("boom {}", 1) }, second).await.unwrap_err();
        assert_eq!(panicked.to_string(), "panicked: boom 1");
        let hung = guarded(std::future::pending::<()>(), Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(hung, Fault::TimedOut(_)), "{hung}");
    }
}
