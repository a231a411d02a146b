//! A leader's term: Replicate Request and Process Request, pipelined with group commit.
//!
//! The pipeline is two tasks of the term, joined by a channel:
//! - the **sequencer** takes client requests off the queue, settles idempotency keys
//!   against the replica's idempotency table ([`crate::idempotency`]), assigns indexes,
//!   stamps keyed entries, and writes each group's RLEs, RS records (InProcess for
//!   Replication requests, Null for the rest) and LS in one fenced transaction;
//! - the **processor** takes replicated groups in order, marks their only-once requests
//!   InProcess in one transaction (none for a group of Replication requests), executes
//!   each request in index order (recording every step in the local record file), writes
//!   every outcome with LPI and SSI in one transaction while it persists the app state,
//!   adds the group to the idempotency table, and only then answers the clients.
//!
//! While the processor holds one group, the sequencer's next replicate write waits to
//! ride that group's last outcome write ([`Carrier`]): the next group could not execute
//! before then anyway, and a busy leader does about one etcd transaction per group, not
//! three per request. An idle processor carries nothing: the sequencer writes alone.
//! Any failed authority write ends the term: the node loop steps down.
//!
//! Beside the pipeline the term runs three more tasks: one compacts the log
//! ([`crate::compaction`]), one settles requests left in doubt
//! (`Runtime::settle_while_leading`), one pushes backups ([`crate::backup`]); any of the
//! five failing ends the term. With an outbox, a sixth watches settled transactions for
//! reorgs deeper than their confirmations (`Chain::watch_finality`), best effort: it logs
//! and counts what it finds and never ends the term. The processor takes a snapshot
//! between groups when one is due.

mod intake;
mod processor;
mod sequencer;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::app::{AppState, Reply};
use crate::backup::Backups;
use crate::config::Config;
use crate::data::Keys;
use crate::data::{LogEntry, RequestKind};
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::guard::panic_message;
use crate::idempotency::Fingerprint;
use crate::idempotency::IdempotencyTable;
use crate::outbox::Chain;
use crate::reporter::Reporter;
use crate::settle::Settler;
use crate::state_transfer::Snapshots;
use crate::store::Store;
use crate::store::{Op, Term};
use crate::sync::lock;
pub(crate) use intake::{Intake, QUEUE_WAIT};
use processor::process_groups;
use sequencer::Sequencer;

/// Requests waiting for the sequencer.
const QUEUE: usize = 4096;

/// A client request handed to the leader by the HTTP front.
pub(crate) struct Submit {
    pub(crate) kind: RequestKind,
    pub(crate) entry: LogEntry,
    /// The entry as it is stored (encoded by the front, which also checked its size).
    pub(crate) encoded: Vec<u8>,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) reply: oneshot::Sender<Answer>,
    /// Its share of the queue's byte budget, held until it is answered.
    pub(crate) queued: OwnedSemaphorePermit,
}

/// A request to log: what the sequencer keeps of a [`Submit`] once its key is settled.
struct Unlogged {
    kind: RequestKind,
    entry: LogEntry,
    encoded: Vec<u8>,
    /// Unkeyed requests are answered here; keyed ones through the in-flight table.
    reply: Option<oneshot::Sender<Answer>>,
    queued: OwnedSemaphorePermit,
}

/// Room for a record's key and a small record (an RS or a counter) in the replicate
/// transaction, beyond the service prefix: generous, so that a group sized with it always
/// fits one transaction.
const RECORD_BYTES: usize = 256;

/// An upper bound on what logging `fresh` adds to the replicate transaction, in the sizes
/// etcd counts (keys and values): its RLE and its RS.
fn replicate_bytes(prefix: usize, fresh: &Unlogged) -> usize {
    fresh.encoded.len() + 2 * (prefix + RECORD_BYTES)
}

/// The leader's answer to one request.
#[derive(Clone, Debug)]
pub(crate) struct Answer {
    pub(crate) reply: Reply,
    /// The log index, when the request was logged.
    pub(crate) index: Option<u64>,
    /// Whether this is a stored answer to an earlier request with the same key.
    pub(crate) replayed: bool,
}

impl Answer {
    fn refusal(status: u16, message: &str) -> Self {
        Self { reply: Reply::error(status, message), index: None, replayed: false }
    }
}

/// A logged request on its way through the processor.
struct Logged {
    index: u64,
    kind: RequestKind,
    entry: LogEntry,
    /// Unkeyed requests are answered here; keyed ones through the in-flight table.
    reply: Option<oneshot::Sender<Answer>>,
    /// Released when the item is answered.
    _queued: OwnedSemaphorePermit,
}

/// Requests with an idempotency key that are logged but not yet answered, so that a
/// retry arriving meanwhile waits for the same answer instead of being logged twice.
#[derive(Default)]
struct InFlight {
    by_key: Mutex<HashMap<String, Waiting>>,
}

struct Waiting {
    fingerprint: Fingerprint,
    waiters: Vec<oneshot::Sender<Answer>>,
}

impl InFlight {
    fn answer(&self, key: &str, answer: &Answer) {
        if let Some(waiting) = lock(&self.by_key).remove(key) {
            for waiter in waiting.waiters {
                let _ = waiter.send(answer.clone());
            }
        }
    }
}

/// A group's replicate write waiting to ride the processor's next outcome write.
struct CarriedWrite {
    ops: Vec<Op>,
    /// Told when the write went in (dropped when it failed: the term ends).
    done: oneshot::Sender<()>,
}

/// Where the sequencer hands a group's replicate write to the processor, so that a busy
/// leader writes one fenced transaction per group (the outcomes of one group and the log
/// of the next) rather than two. Offered only while the processor holds a group, whose
/// last outcome write is sure to come and take it; an idle processor would never write,
/// so then the sequencer writes itself.
#[derive(Default)]
struct Carrier {
    slot: Mutex<CarrierSlot>,
}

#[derive(Default)]
struct CarrierSlot {
    /// The processor holds a group and will make an outcome write that takes `carried`.
    busy: bool,
    carried: Option<CarriedWrite>,
}

impl Carrier {
    /// Hands the write over if the processor will carry it; gives it back otherwise.
    fn offer(&self, ops: Vec<Op>) -> std::result::Result<oneshot::Receiver<()>, Vec<Op>> {
        let mut slot = lock(&self.slot);
        if !slot.busy || slot.carried.is_some() {
            return Err(ops);
        }
        let (done, written) = oneshot::channel();
        slot.carried = Some(CarriedWrite { ops, done });
        Ok(written)
    }

    /// The processor took a group: its last outcome write will come.
    fn busy(&self) {
        lock(&self.slot).busy = true;
    }

    /// The processor's last write of a group takes what waits. It stays busy: a carried
    /// group comes to it next.
    fn take(&self) -> Option<CarriedWrite> {
        let mut slot = lock(&self.slot);
        slot.busy = slot.carried.is_some();
        slot.carried.take()
    }

    /// The processor ended: nothing more is carried.
    fn close(&self) {
        let mut slot = lock(&self.slot);
        slot.busy = false;
        slot.carried = None;
    }
}

/// What a leader's term works with: the handles of the layers below, handed over by the
/// node when it registers. Nothing of the node loop is reachable from here.
pub(crate) struct Leading<S> {
    pub(crate) config: Config,
    pub(crate) keys: Keys,
    pub(crate) store: Store,
    pub(crate) reporter: Arc<Reporter>,
    pub(crate) executor: Arc<Executor<S>>,
    pub(crate) idempotency: Arc<IdempotencyTable>,
    pub(crate) snapshots: Arc<Snapshots<S>>,
    pub(crate) backups: Arc<Backups<S>>,
    pub(crate) settler: Arc<Settler<S>>,
    pub(crate) chain: Option<Arc<Chain>>,
}

impl<S: AppState> Leading<S> {
    /// The stamp the leader writes into the next keyed entries it logs (see
    /// [`crate::data::Stamp`]).
    pub(crate) fn stamp(&self) -> crate::data::Stamp {
        let now_ms = crate::data::unix_millis();
        self.idempotency.stamp(now_ms, self.config.idempotency_retention, self.config.idempotency_max_bytes)
    }
}

/// A running term; dropping the stop handle's tasks interrupts them.
pub(crate) struct LeaderTerm {
    pub(crate) failed: mpsc::Receiver<Error>,
    tasks: Vec<JoinHandle<()>>,
}

impl LeaderTerm {
    /// Starts the term's tasks over `leading`; returns the term and the queue the front
    /// submits requests to.
    pub(crate) fn start<S: AppState>(
        leading: &Arc<Leading<S>>,
        term: Term,
        next_index: u64,
    ) -> (Self, mpsc::Sender<Submit>) {
        let (submit_tx, submit_rx) = mpsc::channel(QUEUE);
        let (groups_tx, groups_rx) = mpsc::channel(64);
        let (failed_tx, failed) = mpsc::channel(4);
        let in_flight = Arc::new(InFlight::default());
        let carrier = Arc::new(Carrier::default());
        let sequencer = Sequencer {
            leading: leading.clone(),
            term: term.clone(),
            next_index,
            in_flight: in_flight.clone(),
            carrier: carrier.clone(),
        };
        let mut tasks = vec![
            tokio::spawn(report(sequencer.run(submit_rx, groups_tx), failed_tx.clone())),
            tokio::spawn(report(
                process_groups(leading.clone(), term.clone(), groups_rx, in_flight, carrier),
                failed_tx.clone(),
            )),
            tokio::spawn(report(
                crate::compaction::Compactor::new(
                    &leading.config,
                    leading.keys.clone(),
                    leading.store.clone(),
                    leading.snapshots.clone(),
                    leading.reporter.clone(),
                )
                .run(term.clone()),
                failed_tx.clone(),
            )),
            tokio::spawn(report(leading.settler.clone().settle_while_leading(term.clone()), failed_tx.clone())),
            tokio::spawn(report(
                crate::backup::back_up_while_leading(leading.backups.clone(), leading.store.clone(), term),
                failed_tx,
            )),
        ];
        if let Some(chain) = leading.chain.clone() {
            // Best effort, never ending the term: it logs and counts what it finds.
            tasks.push(tokio::spawn(
                chain.watch_finality(Arc::new(crate::outbox::EtcdTxStore::reading(leading.store.clone()))),
            ));
        }
        (Self { failed, tasks }, submit_tx)
    }

    /// Stops both tasks, wherever they are. Clients waiting on them see their answer
    /// channel close and get a 503.
    pub(crate) async fn stop(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for LeaderTerm {
    /// A term dropped without [`LeaderTerm::stop`] (the replica itself was dropped, as
    /// in a crash) still ends its tasks.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Runs one of the term's tasks and reports how it ended, a panic included: a task that
/// died silently would leave a zombie leader, healthy to look at and answering nobody.
async fn report(task: impl Future<Output = Result<()>>, failed: mpsc::Sender<Error>) {
    let error = match AssertUnwindSafe(task).catch_unwind().await {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(panic) => Error::Panicked(panic_message(&*panic)),
    };
    let _ = failed.send(error).await;
}

fn reused_key() -> Answer {
    Answer::refusal(
        422,
        "this Idempotency-Key was already used for a different request (method, path, query or body differ); use a new key",
    )
}

/// The answer to a request whose blockchain transaction is not settled yet: 503, so the
/// client retries with its key (and gets the answer once the settler has it).
pub(crate) fn unsettled_reply() -> Reply {
    Reply::error(
        503,
        "in doubt: the request's blockchain transaction is not settled yet (the chain did not answer or mine it in \
         time); retry with the same Idempotency-Key: the leader settles it and then answers, never paying twice",
    )
}
