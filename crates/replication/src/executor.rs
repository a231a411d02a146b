//! The app boundary's engine: runs the app's code for an entry (handler, rollback, apply and
//! reconcile hooks) guarded against panics and hangs, records each step in the local record
//! file, turns outcomes into what is recorded, and builds the writes that record them.
//! Roles call it; it knows nothing of roles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::app::{AppState, Failure, Outcome, Recorded, Reply, Request, Rollback, Route, Routes, StepObserver};
use crate::config::Limits;
use crate::data::{EntryState, IdempotencyRecord, Keys, LogEntry, ProcessState, RequestKind, Step};
use crate::error::{Error, Result};
use crate::guard::guarded;
use crate::outbox::{Chain, EtcdTxStore, Outbox};
use crate::record_file::RecordFile;
use crate::reporter::Reporter;
use crate::store::{Op, Store, StoredEntry, Term};

/// Runs the app's code for entries; one per replica.
pub(crate) struct Executor<S> {
    replica: String,
    limits: Limits,
    /// The app state.
    pub(crate) state: Arc<S>,
    /// The declared routes.
    pub(crate) routes: Routes<S>,
    observer: Option<StepObserver>,
    /// The local record file (the paper's): where Process Request stands.
    pub(crate) record: RecordFile,
    reporter: Arc<Reporter>,
    /// The transaction outbox's chain client, when the service has an outbox.
    pub(crate) chain: Option<Arc<Chain>>,
}

impl<S: AppState> Executor<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        replica: &str,
        limits: Limits,
        state: Arc<S>,
        routes: Routes<S>,
        observer: Option<StepObserver>,
        record: RecordFile,
        reporter: Arc<Reporter>,
        chain: Option<Arc<Chain>>,
    ) -> Self {
        Self { replica: replica.to_owned(), limits, state, routes, observer, record, reporter, chain }
    }

    pub(crate) fn route_of(&self, method: &str, path: &str) -> Option<&Route<S>> {
        self.routes.get(method, path)
    }

    pub(crate) fn replication_route(&self, entry: &StoredEntry) -> Result<&Route<S>> {
        self.route_of(&entry.request.method, &entry.request.path)
            .filter(|r| r.kind == RequestKind::Replication)
            .ok_or_else(|| Error::UnknownRoute {
                index: entry.index,
                method: entry.request.method.clone(),
                path: entry.request.path.clone(),
            })
    }

    /// Executes one entry through its handler, recording the step in the local record
    /// file around it; `observed` (Process Request only) also awaits the step observer.
    pub(crate) async fn execute(
        &self,
        index: u64,
        route: &Route<S>,
        request: Request,
        observed: bool,
    ) -> Result<Recorded> {
        self.record.write(index, Step::Executing, None)?;
        if observed {
            self.observe(Step::Executing, index).await;
        }
        let (method, path) = (request.method.clone(), request.path.clone());
        let outcome = guarded((route.handler)(self.state.clone(), request), self.limits.handler_timeout)
            .await
            .map_err(|fault| fault.at("handler", index, &method, &path))?;
        // A fault leaves the record file at Executing: Check for pending process rolls
        // the attempt back before anything else runs.
        let outcome = self.recordable(outcome, "handler", index, &method, &path)?;
        let reply = match &outcome {
            Ok(reply) | Err(reply) => reply.to_stored(),
        };
        self.record.write(index, Step::Executed, Some(reply))?;
        if observed {
            self.observe(Step::Executed, index).await;
        }
        Ok(outcome)
    }

    /// Runs a route's rollback for the entry at `index`, guarded like a handler.
    pub(crate) async fn roll_back(&self, rollback: &Rollback<S>, index: u64, entry: LogEntry) -> Result<()> {
        let (method, path) = (entry.method.clone(), entry.path.clone());
        guarded(rollback(self.state.clone(), Request::from_entry(index, entry)), self.limits.handler_timeout)
            .await
            .map_err(|fault| fault.at("rollback", index, &method, &path))?
            .map_err(|source| self.local_fault("rollback", index, &method, &path, source))
    }

    /// A handler's outcome as it is recorded (Success or Fail, the answer within the
    /// reply limit).
    ///
    /// # Errors
    /// [`Error::LocalFault`] for a [`Failure::Fault`]: never recorded.
    pub(crate) fn recordable(
        &self,
        outcome: Outcome,
        hook: &'static str,
        index: u64,
        method: &str,
        path: &str,
    ) -> Result<Recorded> {
        match outcome {
            Ok(reply) => Ok(self.storable(Ok(reply))),
            Err(Failure::Refused(reply)) => Ok(self.storable(Err(reply))),
            Err(Failure::Fault(source)) => Err(self.local_fault(hook, index, method, path, source)),
        }
    }

    /// The error for a local fault this replica's app reported in `hook`.
    pub(crate) fn local_fault(
        &self,
        hook: &'static str,
        index: u64,
        method: &str,
        path: &str,
        source: std::io::Error,
    ) -> Error {
        Error::LocalFault {
            replica: self.replica.clone(),
            hook,
            index,
            method: method.to_owned(),
            path: path.to_owned(),
            source,
        }
    }

    /// An outcome as it can be stored for retries: an answer over the reply limit keeps
    /// its status and says it was too large (etcd refuses requests over 1.5 MiB, and each
    /// answer is written with the entry's state and kept in every replica's idempotency
    /// table).
    pub(crate) fn storable(&self, outcome: Recorded) -> Recorded {
        let max = self.limits.max_reply;
        let shrink = |reply: Reply| {
            if reply.body.len() <= max {
                return reply;
            }
            warn!(status = reply.status, bytes = reply.body.len(), max, "a handler's answer is over the reply limit");
            let note = format!(
                "the answer was {} bytes, over the {max}-byte limit for answers of logged requests; \
                 the request's outcome stands, read its result through a read route",
                reply.body.len()
            );
            Reply {
                body: Reply::error(reply.status, &note).body,
                content_type: Some("application/json".into()),
                ..reply
            }
        };
        match outcome {
            Ok(reply) => Ok(shrink(reply)),
            Err(reply) => Err(shrink(reply)),
        }
    }

    pub(crate) async fn observe(&self, step: Step, index: u64) {
        if let Some(observer) = &self.observer {
            observer(step, index).await;
        }
    }

    /// The outbox of the request at `index` when it is an only-once request and the
    /// runtime has an outbox.
    pub(crate) fn outbox_for(&self, store: &Store, kind: RequestKind, term: &Term, index: u64) -> Option<Outbox> {
        let chain = self.chain.as_ref().filter(|_| kind == RequestKind::Normal)?;
        Some(Outbox::new(chain.clone(), Arc::new(EtcdTxStore::fenced(store.clone(), term.clone())), index))
    }

    /// Runs an in-doubt only-once request again with its outbox: its outcome, or `None`
    /// while a transaction is still unsettled (or the handler failed).
    pub(crate) async fn run_again(
        &self,
        store: &Store,
        route: &Route<S>,
        term: &Term,
        index: u64,
        entry: &LogEntry,
    ) -> Result<Option<Recorded>> {
        let mut request = Request::from_entry(index, entry.clone());
        let Some(outbox) = self.outbox_for(store, RequestKind::Normal, term, index) else { return Ok(None) };
        request.outbox = Some(outbox.clone());
        let ran = guarded((route.handler)(self.state.clone(), request), self.limits.handler_timeout).await;
        if outbox.leadership_lost() {
            return Err(Error::LeadershipLost { epoch: term.epoch });
        }
        Ok(match ran {
            Ok(_) if outbox.unsettled() => None,
            Ok(outcome) => match self.recordable(outcome, "handler", index, &entry.method, &entry.path) {
                Ok(recorded) => Some(recorded),
                Err(error) => {
                    warn!(%error, "the request stays in doubt");
                    None
                }
            },
            Err(fault) => {
                warn!(error = %fault.at("handler", index, &entry.method, &entry.path), "the request stays in doubt");
                None
            }
        })
    }

    /// Applies the entry at `index` from its record if it is an only-once or External_TXN
    /// Success this replica has not applied yet and its route has an effect (followers,
    /// Prepare Service and restores all go through here).
    pub(crate) async fn apply_if_recorded(&self, index: u64, state: &EntryState, entry: &LogEntry) -> Result<()> {
        let recorded = matches!(state.kind, RequestKind::Normal | RequestKind::ExternalTxn)
            && state.state == ProcessState::Success
            && index > self.state.applied_index();
        if recorded
            && let (Some(route), Some(response)) = (self.route_of(&entry.method, &entry.path), state.response.clone())
        {
            self.apply_recorded(route, index, entry, Reply::from_stored(response)).await?;
        }
        Ok(())
    }

    /// Applies a recorded Success of `route` (only-once or External_TXN) to the replicated
    /// state, as every replica does in log order.
    pub(crate) async fn apply_recorded(
        &self,
        route: &Route<S>,
        index: u64,
        entry: &LogEntry,
        reply: Reply,
    ) -> Result<()> {
        let Some(apply) = &route.apply else { return Ok(()) };
        let request = Request::from_entry(index, entry.clone());
        guarded(apply(self.state.clone(), request, reply), self.limits.handler_timeout)
            .await
            .map_err(|fault| fault.at("apply hook", index, &entry.method, &entry.path))?
            .map_err(|source| self.local_fault("apply hook", index, &entry.method, &entry.path, source))?;
        self.reporter.set_status(|s| s.in_doubt.retain(|&i| i != index));
        Ok(())
    }
}

/// The lease the late answers of requests left in doubt are written with (see
/// [`crate::idempotency`]): one lease per quarter of the retention, living a retention and
/// a quarter, so each record lasts at least the retention and etcd tracks only a few leases.
#[derive(Default)]
pub(crate) struct IdempotencyLease {
    current: tokio::sync::Mutex<Option<(i64, Instant)>>,
}

impl IdempotencyLease {
    pub(crate) async fn get(&self, store: &Store, retention: Duration) -> Result<i64> {
        let renew_after = retention / 4;
        let mut current = self.current.lock().await;
        match *current {
            Some((id, granted)) if granted.elapsed() < renew_after => Ok(id),
            _ => {
                let id = store.grant_lease(retention + renew_after.max(Duration::from_secs(1))).await?;
                *current = Some((id, Instant::now()));
                Ok(id)
            }
        }
    }
}

/// The writes that record an entry's final outcome: its RS with the answer and, given a
/// `lease` (a request settled after every replica passed it in doubt), the answer in a
/// leased idempotency record too, which outlives log compaction (the replicas' tables
/// hold the key without its answer).
pub(crate) fn outcome_ops(
    keys: &Keys,
    index: u64,
    kind: RequestKind,
    epoch: u64,
    outcome: &Recorded,
    entry: &LogEntry,
    lease: Option<i64>,
) -> Vec<Op> {
    let (state, reply) = match outcome {
        Ok(reply) => (ProcessState::Success, reply),
        Err(reply) => (ProcessState::Fail, reply),
    };
    let response = Some(reply.to_stored());
    let mut ops = vec![Op::Put(
        keys.rs(index),
        crate::codec::encode(&EntryState { kind, state, epoch, response: response.clone() }),
    )];
    if let (Some(key), Some(lease)) = (&entry.idempotency_key, lease) {
        let fingerprint = crate::idempotency::to_hex(&crate::idempotency::fingerprint(entry));
        let record = IdempotencyRecord { index, fingerprint, response };
        ops.push(Op::PutLeased(keys.idem(key), crate::codec::encode(&record), lease));
    }
    ops
}
