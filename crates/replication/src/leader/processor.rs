//! The processor: takes replicated groups in order, executes each request in index order
//! (each step in the record file), records every outcome with LPI and SSI in one
//! transaction while the app state persists, and only then answers the clients.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::app::{AppState, Outcome, Recorded, Request};
use crate::data::Step;
use crate::data::{EntryState, ProcessState, RequestKind};
use crate::error::{Error, Result};
use crate::executor::outcome_ops;
use crate::guard::guarded;
use crate::stats::stage;
use crate::store::{MAX_TXN_OPS, Op, Term};

use super::*;

/// The processor: Process Request for each replicated group, in order.
pub(super) async fn process_groups<S: AppState>(
    leading: Arc<Leading<S>>,
    term: Term,
    mut groups: mpsc::Receiver<Vec<Logged>>,
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
        items: &[Logged],
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
            if let Some(CarriedWrite { ops, done }) = carrier.and_then(Carrier::take) {
                leading.reporter.stats.time(stage::REPLICATE, leading.store.authority_write(term, ops)).await?;
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
        ops.push(Op::counter(keys.lpi(&leading.config.replica), leading.snapshots.recoverable_lpi(last)));
        ops.push(Op::counter(keys.ssi(), last));
        let (next_log, done) = match carrier.and_then(Carrier::take) {
            Some(CarriedWrite { ops, done }) => (ops, Some(done)),
            None => (Vec::new(), None),
        };
        let (persisted, recorded) = tokio::join!(
            leading.reporter.stats.time(stage::PERSIST, leading.executor.state.persist()),
            leading.reporter.stats.time(stage::OUTCOME, leading.store.authority_write_carrying(term, ops, next_log)),
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
        if applied_any && let Err(e) = leading.executor.state.persist().await {
            return Err(persist_failed(leading, durable, e).await);
        }
        let applied = leading.executor.state.applied_index();
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
    if let Err(put) = leading.store.put(&key, leading.snapshots.recoverable_lpi(durable).to_string()).await {
        tracing::warn!(error = %put, "could not set this replica's LPI back after a failed persist");
    }
    Error::Persist(error)
}

async fn process<S: AppState>(
    leading: &Arc<Leading<S>>,
    term: &Term,
    items: Vec<Logged>,
    in_flight: &InFlight,
    carrier: &Carrier,
) -> Result<()> {
    let keys = &leading.keys;
    let store = &leading.store;
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
        let outbox = leading.executor.outbox_for(&leading.store, item.kind, term, item.index);
        request.outbox.clone_from(&outbox);
        segment.outboxes.push(outbox);
        if item.kind == RequestKind::ExternalTxn {
            request.verifier = leading.chain.clone().map(crate::outbox::Verifier::new);
        }
        if side_by_side {
            // External_TXN: recorded, not executed; the handler checks and answers.
            let (handler, state) = (route.handler.clone(), leading.executor.state.clone());
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
