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

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::app::{AppState, Outcome, Recorded, Reply, Request};
use crate::backup::Backups;
use crate::config::Config;
use crate::data::Keys;
use crate::data::Step;
use crate::data::{EntryState, IdempotencyRecord, LogEntry, ProcessState, RequestKind};
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::executor::outcome_ops;
use crate::guard::{guarded, panic_message};
use crate::idempotency::Fingerprint;
use crate::idempotency::IdempotencyTable;
use crate::outbox::Chain;
use crate::reporter::Reporter;
use crate::settle::Settler;
use crate::state_transfer::Snapshots;
use crate::stats::stage;
use crate::store::Store;
use crate::store::{MAX_TXN_BYTES, MAX_TXN_OPS, Op, Term};
use crate::sync::lock;

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
struct Fresh {
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
fn replicate_bytes(prefix: usize, fresh: &Fresh) -> usize {
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
struct Item {
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
struct Carried {
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
    carried: Option<Carried>,
}

impl Carrier {
    /// Hands the write over if the processor will carry it; gives it back otherwise.
    fn offer(&self, ops: Vec<Op>) -> std::result::Result<oneshot::Receiver<()>, Vec<Op>> {
        let mut slot = lock(&self.slot);
        if !slot.busy || slot.carried.is_some() {
            return Err(ops);
        }
        let (done, written) = oneshot::channel();
        slot.carried = Some(Carried { ops, done });
        Ok(written)
    }

    /// The processor took a group: its last outcome write will come.
    fn busy(&self) {
        lock(&self.slot).busy = true;
    }

    /// The processor's last write of a group takes what waits. It stays busy: a carried
    /// group comes to it next.
    fn take(&self) -> Option<Carried> {
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
    pub(crate) state: Arc<S>,
    pub(crate) reporter: Arc<Reporter>,
    pub(crate) executor: Arc<Executor<S>>,
    pub(crate) idempotency: Arc<IdempotencyTable>,
    pub(crate) snapshots: Arc<Snapshots<S>>,
    pub(crate) backups: Arc<Backups<S>>,
    pub(crate) settler: Arc<Settler<S>>,
    pub(crate) chain: Option<Arc<Chain>>,
}

impl<S: AppState> Leading<S> {
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The stamp the leader writes into the next keyed entries it logs (see
    /// [`crate::data::Stamp`]).
    pub(crate) fn stamp(&self) -> crate::data::Stamp {
        let now_ms = crate::data::unix_millis();
        self.idempotency.stamp(now_ms, self.config.idempotency_retention, self.config.idempotency_max_bytes)
    }

    fn recoverable_lpi(&self, lpi: u64) -> u64 {
        self.snapshots.recoverable_lpi(lpi)
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
                    leading.store().clone(),
                    leading.snapshots.clone(),
                    leading.reporter.clone(),
                )
                .run(term.clone()),
                failed_tx.clone(),
            )),
            tokio::spawn(report(leading.settler.clone().settle_while_leading(term.clone()), failed_tx.clone())),
            tokio::spawn(report(
                crate::backup::back_up_while_leading(leading.backups.clone(), leading.store().clone(), term),
                failed_tx,
            )),
        ];
        if let Some(chain) = leading.chain.clone() {
            // Best effort, never ending the term: it logs and counts what it finds.
            tasks.push(tokio::spawn(chain.watch_finality(leading.store().clone(), leading.keys.clone())));
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

struct Sequencer<S> {
    leading: Arc<Leading<S>>,
    term: Term,
    next_index: u64,
    in_flight: Arc<InFlight>,
    carrier: Arc<Carrier>,
}

/// What an idempotency key says about a new request.
enum KeyLookup {
    /// Never seen (or its earlier request was ignored): log it.
    New,
    /// Answered before (or refused now): answer this.
    Answer(Answer),
}

impl<S: AppState> Sequencer<S> {
    async fn run(mut self, mut requests: mpsc::Receiver<Submit>, groups: mpsc::Sender<Vec<Item>>) -> Result<()> {
        // Each request takes two puts (RLE, RS), plus LS.
        let max_group = (MAX_TXN_OPS - 1) / 2;
        while let Some(first) = requests.recv().await {
            let mut incoming = vec![first];
            while incoming.len() < max_group {
                match requests.try_recv() {
                    Ok(more) => incoming.push(more),
                    Err(_) => break,
                }
            }
            let fresh = self.settle_keys(incoming).await;
            // Split by size too, so that each group is one transaction under etcd's
            // --max-request-bytes (the front capped each request well under it).
            // A key's length beyond its last part: the service prefix (as `ls` has it).
            let prefix = self.leading.keys.ls().len();
            let mut group = Vec::new();
            let mut bytes = prefix + RECORD_BYTES;
            for fresh in fresh {
                let size = replicate_bytes(prefix, &fresh);
                if !group.is_empty() && bytes + size > MAX_TXN_BYTES {
                    self.replicate(std::mem::take(&mut group), &groups).await?;
                    bytes = prefix + RECORD_BYTES;
                }
                bytes += size;
                group.push(fresh);
            }
            if !group.is_empty() {
                self.replicate(group, &groups).await?;
            }
        }
        Ok(())
    }

    /// Settles the keys of `incoming` against the requests in flight and the idempotency
    /// table: a retry of a request in flight waits for its answer, a key the table holds
    /// is answered from its record (or refused, for a different request); returns what is
    /// left to log, in arrival order.
    async fn settle_keys(&self, incoming: Vec<Submit>) -> Vec<Fresh> {
        let mut fresh = Vec::with_capacity(incoming.len());
        // Keys whose table record has no answer (a request left in doubt): its state is in etcd.
        let mut in_doubt = Vec::new();
        {
            let mut by_key = lock(&self.in_flight.by_key);
            for submit in incoming {
                let reply = match &submit.entry.idempotency_key {
                    None => Some(submit.reply),
                    Some(key) => match by_key.get_mut(key) {
                        Some(waiting) if waiting.fingerprint == submit.fingerprint => {
                            waiting.waiters.push(submit.reply);
                            continue;
                        }
                        Some(_) => {
                            let _ = submit.reply.send(reused_key());
                            continue;
                        }
                        // Looked up while `by_key` is held: the processor adds a group to
                        // the table before it lets go of its keys here, so a key is always
                        // in one or the other.
                        None => match self.leading.idempotency.get(key) {
                            Some(record) if record.fingerprint != submit.fingerprint => {
                                let _ = submit.reply.send(reused_key());
                                continue;
                            }
                            Some(record) => {
                                if let Some(answer) = record.answer {
                                    let reply = Reply::from_stored((*answer).clone());
                                    let _ =
                                        submit.reply.send(Answer { reply, index: Some(record.index), replayed: true });
                                    continue;
                                }
                                // Its client waits here like a retry of a request in flight.
                                let waiting = Waiting { fingerprint: submit.fingerprint, waiters: vec![submit.reply] };
                                by_key.insert(key.clone(), waiting);
                                let Submit { kind, entry, encoded, queued, .. } = submit;
                                in_doubt.push((Fresh { kind, entry, encoded, reply: None, queued }, record.index));
                                continue;
                            }
                            None => {
                                let waiting = Waiting { fingerprint: submit.fingerprint, waiters: vec![submit.reply] };
                                by_key.insert(key.clone(), waiting);
                                None
                            }
                        },
                    },
                };
                fresh.push(Fresh {
                    kind: submit.kind,
                    entry: submit.entry,
                    encoded: submit.encoded,
                    reply,
                    queued: submit.queued,
                });
            }
        }
        // Rare (a leader died while executing it): look its state up, then log it only if
        // it was never executed.
        for (request, index) in in_doubt {
            let key = request.entry.idempotency_key.clone().expect("keyed");
            let started = Instant::now();
            let lookup = self.lookup_in_doubt(&key, index).await;
            self.leading.reporter.stats.add_many(stage::KEY_LOOKUP, 1, started.elapsed());
            let answer = match lookup {
                Ok(KeyLookup::New) => {
                    fresh.push(request);
                    continue;
                }
                Ok(KeyLookup::Answer(answer)) => answer,
                Err(e @ Error::CorruptRecord { .. }) => Answer::refusal(
                    500,
                    &format!(
                        "this Idempotency-Key's stored record is unreadable ({e}); nothing was done: an operator must \
                         repair or delete it, or send the request with a new key"
                    ),
                ),
                Err(e) => Answer::refusal(503, &format!("could not check the idempotency key, retry: {e}")),
            };
            self.in_flight.answer(&key, &answer);
        }
        fresh
    }

    /// Whether the entry at `index` is an only-once request the settler finishes (its
    /// route sends transactions through the outbox).
    async fn settled_by_outbox(&self, index: u64) -> Result<bool> {
        let store = self.leading.store();
        let Some(kv) = store.get_local(&self.leading.keys.log(index)).await? else { return Ok(false) };
        let entry: LogEntry = crate::codec::decode(kv.key(), kv.value())?;
        Ok(self.leading.executor.route_of(&entry.method, &entry.path).is_some_and(|route| route.replayable))
    }

    /// What a retry of the request at `index`, which the table holds without an answer
    /// (it was left in doubt), gets: its answer once its state is final, read from etcd.
    /// Local (serializable) reads are enough: every record that matters was written before
    /// this replica took `cl` through this member, or by this replica since.
    async fn lookup_in_doubt(&self, key: &str, index: u64) -> Result<KeyLookup> {
        let store = self.leading.store();
        let keys = &self.leading.keys;
        let replay = |response| {
            KeyLookup::Answer(Answer { reply: Reply::from_stored(response), index: Some(index), replayed: true })
        };
        let Some(kv) = store.get_local(&keys.rs(index)).await? else {
            // Compacted away, which only happens to final entries: it was settled after
            // every replica passed it, and its answer is in a leased record.
            let Some(kv) = store.get_local(&keys.idem(key)).await? else { return Ok(KeyLookup::New) };
            let record: IdempotencyRecord = crate::codec::decode(kv.key(), kv.value())?;
            return Ok(record.response.filter(|_| record.index == index).map_or(KeyLookup::New, replay));
        };
        let state: EntryState = crate::codec::decode(kv.key(), kv.value())?;
        Ok(match (state.state, state.response) {
            (ProcessState::Success | ProcessState::Fail, Some(response)) => replay(response),
            (ProcessState::Ignore, _) => KeyLookup::New,
            // The settler finishes it: the client retries until it has the answer.
            _ if self.settled_by_outbox(index).await? => {
                KeyLookup::Answer(Answer { reply: unsettled_reply(), index: Some(index), replayed: false })
            }
            _ => KeyLookup::Answer(Answer::refusal(
                409,
                &format!(
                    "the request with this Idempotency-Key (log index {index}) is in doubt: a leader died while \
                     executing it; it is listed in /br2k/status until it is reconciled"
                ),
            )),
        })
    }

    /// Replicate Request for a group: RLEs, RS (InProcess for Replication, else Null) and
    /// LS in one fenced transaction; then hands the group to the processor.
    async fn replicate(&mut self, mut group: Vec<Fresh>, groups: &mpsc::Sender<Vec<Item>>) -> Result<()> {
        let ops = self.replicate_ops(&mut group);
        if self.write_replicate(ops).await? {
            self.replicated(group, groups).await?;
        }
        Ok(())
    }

    /// Writes a group's replicate transaction, on the outcome write of the group the
    /// processor holds when there is one, else alone. `false` when the carrying write
    /// failed (the processor reports why, and the term ends).
    async fn write_replicate(&self, ops: Vec<Op>) -> Result<bool> {
        let stats = &self.leading.reporter.stats;
        let started = Instant::now();
        match self.carrier.offer(ops) {
            Ok(written) => {
                let written = written.await.is_ok();
                stats.add(stage::CARRIED, started.elapsed());
                Ok(written)
            }
            Err(ops) => {
                stats.time(stage::REPLICATE, self.leading.store().authority_write(&self.term, ops)).await?;
                Ok(true)
            }
        }
    }

    /// The replicate transaction's writes for `group`, at the next indexes. Keyed entries
    /// get their stamp here, so their logged bytes change.
    fn replicate_ops(&self, group: &mut [Fresh]) -> Vec<Op> {
        let keys = &self.leading.keys;
        let epoch = self.term.epoch;
        let stamp = group.iter().any(|f| f.entry.idempotency_key.is_some()).then(|| self.leading.stamp());
        let mut ops = Vec::with_capacity(group.len() * 2 + 1);
        for (offset, fresh) in group.iter_mut().enumerate() {
            let index = self.next_index + offset as u64;
            if let (Some(_), Some(stamp)) = (&fresh.entry.idempotency_key, stamp) {
                fresh.entry.stamp = Some(stamp);
                fresh.encoded = crate::codec::encode(&fresh.entry);
            }
            ops.push(Op::Put(keys.log(index), fresh.encoded.clone()));
            // Replication requests go straight to InProcess: a leader that dies after this
            // write leaves them for the next one to execute (the paper's rule for
            // InProcess Replication entries), which saves a write per group. Only-once
            // requests keep Null until the processor marks them, so that their InProcess
            // still means "may have run".
            let state = match fresh.kind {
                RequestKind::Replication => ProcessState::InProcess,
                _ => ProcessState::Null,
            };
            let state = EntryState { kind: fresh.kind, state, epoch, response: None };
            ops.push(Op::Put(keys.rs(index), crate::codec::encode(&state)));
        }
        let last = self.next_index + group.len() as u64 - 1;
        ops.push(Op::counter(keys.ls(), last));
        ops
    }

    /// After the replicate write: the group's indexes are taken; hands it to the processor.
    async fn replicated(&mut self, group: Vec<Fresh>, groups: &mpsc::Sender<Vec<Item>>) -> Result<()> {
        let mut items = Vec::with_capacity(group.len());
        for (offset, Fresh { kind, entry, reply, queued, .. }) in group.into_iter().enumerate() {
            let index = self.next_index + offset as u64;
            items.push(Item { index, kind, entry, reply, _queued: queued });
        }
        let last = self.next_index + items.len() as u64 - 1;
        self.leading.reporter.stats.add_many(stage::REQUESTS, items.len() as u64, Duration::ZERO);
        self.next_index = last + 1;
        self.leading.reporter.set_status(|s| s.ls = last);
        // The processor only ends with the term, and then so does this task.
        let _ = groups.send(items).await;
        Ok(())
    }
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

/// The processor: Process Request for each replicated group, in order.
async fn process_groups<S: AppState>(
    leading: Arc<Leading<S>>,
    term: Term,
    mut groups: mpsc::Receiver<Vec<Item>>,
    in_flight: Arc<InFlight>,
    carrier: Arc<Carrier>,
) -> Result<()> {
    let ended = async {
        while let Some(mut items) = groups.recv().await {
            carrier.busy();
            // Group commit across groups that queued up while the last one was processed.
            while items.len() < MAX_TXN_OPS - 2 {
                match groups.try_recv() {
                    Ok(more) => items.extend(more),
                    Err(_) => break,
                }
            }
            process(&leading, &term, items, &in_flight, &carrier).await?;
        }
        Ok(())
    }
    .await;
    // A replicate write waiting for a write that will not come is dropped (the sequencer
    // then ends too: the term is over).
    carrier.close();
    ended
}

/// The part of a group not yet recorded, as Process Request goes through it.
struct Segment {
    outcomes: Vec<Option<Recorded>>,
    outboxes: Vec<Option<crate::outbox::Outbox>>,
    /// Transaction sends and External_TXN checks running side by side.
    beside: tokio::task::JoinSet<(usize, Result<Outcome>)>,
    /// Requests left in doubt (their route applies no effect: nothing waits for them).
    in_doubt: Vec<u64>,
    /// How many of the group's requests are recorded.
    recorded: usize,
    /// Whether a request since the last record has an effect to apply from its record.
    effects_pending: bool,
}

impl Segment {
    /// Records the outcomes of the group's requests up to `to` (exclusive), with LPI and
    /// SSI, then applies the effects routes apply from their records, in index order.
    /// A request with such an effect whose transaction is not settled is settled first:
    /// the requests after it wait. The group's last record (`carrier` given) also writes
    /// the next group's log when the sequencer has it waiting.
    async fn record<S: AppState>(
        &mut self,
        leading: &Arc<Leading<S>>,
        term: &Term,
        items: &[Item],
        to: usize,
        carrier: Option<&Carrier>,
    ) -> Result<()> {
        while let Some(joined) = self.beside.join_next().await {
            let (position, answer) = joined.map_err(|e| Error::Panicked(e.to_string()))?;
            // A fault here (the term ends) leaves the request unrecorded, for the next
            // leader to settle.
            let item = &items[position];
            let recorded =
                leading.executor.recordable(answer?, "handler", item.index, &item.entry.method, &item.entry.path)?;
            self.outcomes[position] = Some(recorded);
        }
        self.effects_pending = false;
        let from = std::mem::replace(&mut self.recorded, to);
        if from >= to {
            if let Some(Carried { ops, done }) = carrier.and_then(Carrier::take) {
                leading.reporter.stats.time(stage::REPLICATE, leading.store().authority_write(term, ops)).await?;
                let _ = done.send(());
            }
            return Ok(());
        }
        let keys = &leading.keys;
        let mut ops = Vec::with_capacity(to - from + 2);
        for (position, item) in items.iter().enumerate().take(to).skip(from) {
            let unsettled = self.outboxes[position].as_ref().is_some_and(crate::outbox::Outbox::unsettled);
            let route = leading.executor.route_of(&item.entry.method, &item.entry.path).expect("declared");
            if unsettled && route.apply.is_some() {
                let outcome = leading.settler.settle_until_decided(route, term, item.index, &item.entry).await?;
                self.outcomes[position] = Some(outcome);
            } else if unsettled {
                // A transaction that may still be mined: nothing is recorded, the request
                // is in doubt until the settler runs it again.
                self.in_doubt.push(item.index);
                ops.push(Op::Put(keys.doubt(item.index), Vec::new()));
                continue;
            }
            let outcome = self.outcomes[position].as_ref().expect("ran");
            ops.extend(outcome_ops(keys, item.index, item.kind, term.epoch, outcome, &item.entry, None));
        }
        // (4.4-6) outcomes, LPI and SSI; durable before anyone is answered. The app state
        // is made durable at the same time, not before: etcd holds the log, so either
        // order of a crash is recovered. Outcomes recorded but the state not persisted:
        // the replica's applied index is below SSI and it replays the entries from etcd.
        // The state persisted but no outcome: Prepare Service (or the pending-process
        // check) rolls back what it executed above SSI.
        let last = items[to - 1].index;
        ops.push(Op::counter(keys.lpi(&leading.config.replica), leading.recoverable_lpi(last)));
        ops.push(Op::counter(keys.ssi(), last));
        let (next_log, done) = match carrier.and_then(Carrier::take) {
            Some(Carried { ops, done }) => (ops, Some(done)),
            None => (Vec::new(), None),
        };
        let (persisted, recorded) = tokio::join!(
            leading.reporter.stats.time(stage::PERSIST, leading.state.persist()),
            leading.reporter.stats.time(stage::OUTCOME, leading.store().authority_write_carrying(term, ops, next_log)),
        );
        recorded?;
        if let Some(done) = done {
            let _ = done.send(());
        }
        // Recorded: the group's keys go into the table, in log order, before their
        // clients are answered (and before their keys leave the in-flight table).
        for (position, item) in items.iter().enumerate().take(to).skip(from) {
            let (state, response) = match &self.outcomes[position] {
                _ if self.in_doubt.contains(&item.index) => (ProcessState::InProcess, None),
                Some(Ok(reply)) => (ProcessState::Success, Some(reply.to_stored())),
                Some(Err(reply)) => (ProcessState::Fail, Some(reply.to_stored())),
                None => unreachable!("every request up to `to` ran"),
            };
            let state = EntryState { kind: item.kind, state, epoch: term.epoch, response };
            leading.idempotency.apply(item.index, &item.entry, &state);
        }
        // The state is durable up to the segment before this one (its persist passed).
        let durable = items[from].index - 1;
        if let Err(e) = persisted {
            return Err(persist_failed(leading, durable, e).await);
        }
        let mut applied_any = false;
        for (position, item) in items.iter().enumerate().take(to).skip(from) {
            let route = leading.executor.route_of(&item.entry.method, &item.entry.path).expect("declared");
            if let (Some(_), Some(Ok(reply))) = (&route.apply, &self.outcomes[position])
                && !self.in_doubt.contains(&item.index)
            {
                leading.executor.apply_recorded(route, item.index, &item.entry, reply.clone()).await?;
                applied_any = true;
            }
        }
        if applied_any && let Err(e) = leading.state.persist().await {
            return Err(persist_failed(leading, durable, e).await);
        }
        let applied = leading.state.applied_index();
        leading.reporter.set_status(|s| {
            s.ssi = last;
            s.lpi = last;
            s.applied_index = applied;
        });
        Ok(())
    }
}

/// A leader's persist failed: the outcomes it recorded stand (another replica applies
/// them), but its state is durable only up to `durable`, so its LPI record says no more
/// (compaction reads it once another replica leads). The error ends the term.
async fn persist_failed<S: AppState>(leading: &Leading<S>, durable: u64, error: std::io::Error) -> Error {
    let key = leading.keys.lpi(&leading.config.replica);
    if let Err(put) = leading.store().put(&key, leading.recoverable_lpi(durable).to_string()).await {
        tracing::warn!(error = %put, "could not set this replica's LPI back after a failed persist");
    }
    Error::Persist(error)
}

async fn process<S: AppState>(
    leading: &Arc<Leading<S>>,
    term: &Term,
    items: Vec<Item>,
    in_flight: &InFlight,
    carrier: &Carrier,
) -> Result<()> {
    let keys = &leading.keys;
    let store = leading.store();
    let first = items.first().map_or(0, |i| i.index);
    leading.executor.record.write(first, Step::BeforeExecution, None)?;
    // (4.2) RS = InProcess, for the only-once requests (Replication ones were written
    // InProcess with the log; External_TXN ones are checked, not executed).
    let in_process: Vec<Op> = items
        .iter()
        .filter(|i| i.kind == RequestKind::Normal)
        .map(|i| {
            let state = EntryState { kind: i.kind, state: ProcessState::InProcess, epoch: term.epoch, response: None };
            Op::Put(keys.rs(i.index), crate::codec::encode(&state))
        })
        .collect();
    leading.reporter.stats.add_many(stage::GROUPS, 1, Duration::ZERO);
    leading.reporter.metrics.group(items.len());
    if !in_process.is_empty() {
        leading.reporter.stats.time(stage::IN_PROCESS, store.authority_write(term, in_process)).await?;
    }
    // (4.3) execute. Replication and plain Normal requests run one after another in index
    // order. Transaction sends and External_TXN checks touch no replicated state and
    // mostly wait for the chain: they run side by side meanwhile, so a group waits for
    // one block, not one per payment. The effect a route applies from its record (a
    // payment's, a deposit's) is applied, in index order, before anything after it runs.
    let mut segment = Segment {
        outcomes: vec![None; items.len()],
        outboxes: Vec::with_capacity(items.len()),
        beside: tokio::task::JoinSet::new(),
        in_doubt: Vec::new(),
        recorded: 0,
        effects_pending: false,
    };
    for (position, item) in items.iter().enumerate() {
        let route = leading
            .executor
            .route_of(&item.entry.method, &item.entry.path)
            .expect("the front only submits requests for declared routes");
        let side_by_side = item.kind == RequestKind::ExternalTxn || route.replayable;
        if segment.effects_pending && !side_by_side {
            segment.record(leading, term, &items, position, None).await?;
        }
        let mut request = Request::from_entry(item.index, item.entry.clone());
        let outbox = leading.executor.outbox_for(leading.store(), item.kind, term, item.index);
        request.outbox.clone_from(&outbox);
        segment.outboxes.push(outbox);
        if item.kind == RequestKind::ExternalTxn {
            request.verifier = leading.chain.clone().map(crate::outbox::Verifier::new);
        }
        if side_by_side {
            // External_TXN: recorded, not executed; the handler checks and answers.
            let (handler, state) = (route.handler.clone(), leading.state.clone());
            let timeout = leading.config.limits.handler_timeout;
            let index = item.index;
            segment.beside.spawn(async move {
                let (method, path) = (request.method.clone(), request.path.clone());
                let answer = guarded(handler(state, request), timeout)
                    .await
                    .map_err(|fault| fault.at("handler", index, &method, &path));
                (position, answer)
            });
            segment.effects_pending |= route.apply.is_some();
            continue;
        }
        leading.executor.observe(Step::BeforeExecution, item.index).await;
        let outcome = leading
            .reporter
            .stats
            .time(stage::EXECUTE, leading.executor.execute(item.index, route, request, true))
            .await?;
        segment.outcomes[position] = Some(outcome);
    }
    segment.record(leading, term, &items, items.len(), Some(carrier)).await?;
    leading.executor.record.clear()?;
    let (last, in_doubt) = (items.last().map_or(0, |i| i.index), segment.in_doubt);
    let outcomes: Vec<Recorded> = segment.outcomes.into_iter().map(|o| o.expect("every request ran")).collect();
    leading.reporter.set_status(|s| s.in_doubt.extend(&in_doubt));
    if !in_doubt.is_empty() {
        leading.settler.now.notify_one();
    }
    // Between groups nothing executes and everything up to `last` is final.
    leading.snapshots.maybe_take(last);
    for (item, outcome) in items.into_iter().zip(outcomes) {
        let reply = match outcome {
            _ if in_doubt.contains(&item.index) => unsettled_reply(),
            Ok(reply) | Err(reply) => reply,
        };
        let answer = Answer { reply, index: Some(item.index), replayed: false };
        match (item.reply, &item.entry.idempotency_key) {
            (Some(sender), _) => {
                let _ = sender.send(answer);
            }
            (None, Some(key)) => in_flight.answer(key, &answer),
            (None, None) => {}
        }
    }
    Ok(())
}
