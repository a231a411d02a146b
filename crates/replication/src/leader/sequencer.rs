//! The sequencer: takes client requests off the queue, settles their idempotency keys,
//! assigns indexes and stamps, and writes each group's log, states and LS in one fenced
//! transaction (riding the processor's last outcome write when it can).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::app::{AppState, Reply};
use crate::data::{EntryState, IdempotencyRecord, LogEntry, ProcessState, RequestKind};
use crate::error::{Error, Result};
use crate::stats::stage;
use crate::store::{MAX_TXN_BYTES, MAX_TXN_OPS, Op, Term};
use crate::sync::lock;

use super::*;

pub(super) struct Sequencer<S> {
    pub(super) leading: Arc<Leading<S>>,
    pub(super) term: Term,
    pub(super) next_index: u64,
    pub(super) in_flight: Arc<InFlight>,
    pub(super) carrier: Arc<Carrier>,
}

/// What an idempotency key says about a new request.
enum KeyLookup {
    /// Never seen (or its earlier request was ignored): log it.
    New,
    /// Answered before (or refused now): answer this.
    Answer(Answer),
}

impl<S: AppState> Sequencer<S> {
    pub(super) async fn run(
        mut self,
        mut requests: mpsc::Receiver<Submit>,
        groups: mpsc::Sender<Vec<Logged>>,
    ) -> Result<()> {
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
    async fn settle_keys(&self, incoming: Vec<Submit>) -> Vec<Unlogged> {
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
                                in_doubt.push((Unlogged { kind, entry, encoded, reply: None, queued }, record.index));
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
                fresh.push(Unlogged {
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
        let store = &self.leading.store;
        let Some(kv) = store.get_local(&self.leading.keys.log(index)).await? else { return Ok(false) };
        let entry: LogEntry = crate::codec::decode(kv.key(), kv.value())?;
        Ok(self.leading.executor.route_of(&entry.method, &entry.path).is_some_and(|route| route.replayable))
    }

    /// What a retry of the request at `index`, which the table holds without an answer
    /// (it was left in doubt), gets: its answer once its state is final, read from etcd.
    /// Local (serializable) reads are enough: every record that matters was written before
    /// this replica took `cl` through this member, or by this replica since.
    async fn lookup_in_doubt(&self, key: &str, index: u64) -> Result<KeyLookup> {
        let store = &self.leading.store;
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
    async fn replicate(&mut self, mut group: Vec<Unlogged>, groups: &mpsc::Sender<Vec<Logged>>) -> Result<()> {
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
                stats.time(stage::REPLICATE, self.leading.store.authority_write(&self.term, ops)).await?;
                Ok(true)
            }
        }
    }

    /// The replicate transaction's writes for `group`, at the next indexes. Keyed entries
    /// get their stamp here, so their logged bytes change.
    fn replicate_ops(&self, group: &mut [Unlogged]) -> Vec<Op> {
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
    async fn replicated(&mut self, group: Vec<Unlogged>, groups: &mpsc::Sender<Vec<Logged>>) -> Result<()> {
        let mut items = Vec::with_capacity(group.len());
        for (offset, Unlogged { kind, entry, reply, queued, .. }) in group.into_iter().enumerate() {
            let index = self.next_index + offset as u64;
            items.push(Logged { index, kind, entry, reply, _queued: queued });
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
