//! The register role: Follower -> Register (paper Fig. 2). A replica whose etcd member
//! became the Raft leader takes `cl`, restores the newest backup when every member lost its
//! data ([`recovery`]), runs Prepare Service (paper Table 1: each entry's action decided
//! by [`prepare`], a pure function), settles what a dead leader left in doubt, and
//! publishes its location. It also runs Check for pending process after a restart or a
//! step-down.

mod recovery;

use std::sync::Arc;

use tracing::{error, info, warn};

use crate::app::{AppState, Recorded, Reply, Request};
use crate::config::Config;
use crate::data::{self, EntryState, Keys, LeaderRecord, LogEntry, ProcessState, RequestKind, Step};
use crate::error::{Error, Result};
use crate::executor::{Executor, outcome_ops};
use crate::faults::Faults;
use crate::follower::{Follower, Following, PAGE};
use crate::idempotency::IdempotencyTable;
use crate::reporter::Reporter;
use crate::settle::Settler;
use crate::state_transfer::Snapshots;
use crate::status::Role;
use crate::store::{Op, Store, StoredEntry, Term};

/// What the register role works with.
pub(crate) struct Registrar<S> {
    config: Config,
    keys: Keys,
    store: Store,
    executor: Arc<Executor<S>>,
    snapshots: Arc<Snapshots<S>>,
    idempotency: Arc<IdempotencyTable>,
    faults: Arc<Faults>,
    settler: Arc<Settler<S>>,
    follower: Arc<Follower<S>>,
    reporter: Arc<Reporter>,
}

impl<S: AppState> Registrar<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        keys: Keys,
        store: Store,
        executor: Arc<Executor<S>>,
        snapshots: Arc<Snapshots<S>>,
        idempotency: Arc<IdempotencyTable>,
        faults: Arc<Faults>,
        settler: Arc<Settler<S>>,
        follower: Arc<Follower<S>>,
        reporter: Arc<Reporter>,
    ) -> Self {
        Self { config, keys, store, executor, snapshots, idempotency, faults, settler, follower, reporter }
    }

    /// Check for pending process: after a step-down or a restart, undo what an
    /// interrupted execution may have left, so that following brings this replica to
    /// exactly the service state.
    ///
    /// The paper executes the interrupted request at once. That is only right if the new
    /// leader keeps it; if the InProcess write did not land, the new leader marks it
    /// Ignore. So this replica only restores "not executed" here, and executes the
    /// request when following, if and only if its final state is Success.
    pub(crate) async fn check_pending(&self) -> Result<()> {
        let Some(record) = self.executor.record.read()? else { return Ok(()) };
        match record.step {
            Step::BeforeExecution => {
                info!(index = record.index, "pending process: interrupted before execution; nothing to undo");
            }
            Step::Executed => {
                info!(index = record.index, "pending process: interrupted after execution; the effect stays");
            }
            Step::Executing => {
                let entry = self.store.entries(record.index, record.index).await?.pop();
                let Some(entry) = entry else {
                    return Err(Error::MissingRecord { key: self.keys.log(record.index) });
                };
                let route = self.executor.route_of(&entry.request.method, &entry.request.path);
                match route.and_then(|r| r.rollback.clone()) {
                    Some(rollback) => {
                        info!(index = record.index, "pending process: interrupted during execution; rolling back");
                        self.executor.roll_back(&rollback, entry.index, entry.request).await?;
                        self.executor.state.persist().await.map_err(Error::Persist)?;
                    }
                    None => warn!(
                        index = record.index,
                        "pending process: interrupted during execution and the route has no rollback; \
                         trusting the app state's applied index"
                    ),
                }
            }
        }
        self.executor.record.clear()?;
        let applied = self.executor.state.applied_index();
        self.reporter.set_status(|s| {
            s.applied_index = applied;
            s.lpi = s.lpi.min(applied);
        });
        Ok(())
    }

    /// Follower -> Register: take `cl`, run Prepare Service, publish the location.
    /// Returns the term and LS; the node then starts the leader's term.
    pub(crate) async fn register(self: &Arc<Self>, following: &mut Following) -> Result<(Term, u64)> {
        self.reporter.set_role(Role::Register, None, "leader condition holds");
        let store = &self.store;
        // Every member lost its data: the backup recorded on chain is the service.
        if let Some(index) = self.restore_from_backup().await? {
            following.lpi = index;
        }
        let first_index = store.compacted().await?.first_index.max(1);
        self.reporter.set_status(|s| s.first_index = first_index);
        // Prepare Service replays the log from this replica's LPI: get a snapshot first.
        self.follower.catch_up_if_behind(following, first_index).await?;
        let base = store.epoch_base(self.chain_epoch()).await?;
        let me = LeaderRecord { replica: self.config.replica.clone(), location: self.config.public_url.clone() };
        let term = store.take_leadership(&me, base).await?;
        info!(replica = %self.config.replica, epoch = term.epoch, "took the current-leader record");
        self.reporter.set_status(|s| {
            s.epoch = Some(term.epoch);
            s.leader = Some(me);
        });

        let ls = self.prepare_service(&term, following).await?;
        self.snapshots.maybe_take(ls);
        self.publish_location(term.epoch).await;
        Ok((term, ls))
    }

    /// The on-chain epoch, the base for fresh etcd data (0 without a registry, or when
    /// the chain cannot be asked).
    async fn chain_epoch(&self) -> u64 {
        let Some(publisher) = &self.config.publisher else { return 0 };
        match publisher.registry.service_location(&self.config.service).await {
            Ok(resolved) => resolved.epoch,
            Err(e) => {
                warn!(error = %e, "could not read the on-chain epoch for fresh etcd data; starting from 0");
                0
            }
        }
    }

    /// Prepare Service (Table 1, lines 1-16): from this replica's LPI to LS, Null entries
    /// become Ignore; Replication entries that did not Fail are executed (InProcess ones
    /// too, and their outcome recorded); Normal entries left InProcess are in doubt.
    /// Returns LS.
    async fn prepare_service(&self, term: &Term, following: &mut Following) -> Result<u64> {
        let store = &self.store;
        // Counts this term (for the paper's Table 2, which etcd's compacted history no
        // longer tells) and confirms the fence before anything else.
        let terms = store.get_index(&self.keys.terms()).await?;
        store.authority_write(term, vec![Op::counter(self.keys.terms(), terms + 1)]).await?;
        let ls = store.get_index(&self.keys.ls()).await?;
        let ssi = store.get_index(&self.keys.ssi()).await?;
        // Everything above SSI is still to be decided, whatever this replica applied.
        following.lpi = following.lpi.min(ssi);
        self.undo_unrecorded(ssi, ls).await?;
        let last_record = self.executor.record.read()?;
        while following.lpi < ls {
            let page = store.entries(following.lpi + 1, ls.min(following.lpi + PAGE)).await?;
            let to = page.last().map_or(ls, |e| e.index);
            let mut ops = Vec::new();
            // Each entry as decided here, for the idempotency table once it is recorded.
            let mut passed = Vec::with_capacity(page.len());
            for entry in page {
                let index = entry.index;
                let kind = entry.state.kind;
                let decide = |state, response| EntryState { kind, state, epoch: term.epoch, response };
                let applied_here = index <= self.executor.state.applied_index();
                let settles = kind == RequestKind::Normal
                    && entry.state.state == ProcessState::InProcess
                    && self
                        .executor
                        .route_of(&entry.request.method, &entry.request.path)
                        .is_some_and(|r| r.apply.is_some());
                let decided = match prepare(entry.state.state, kind, applied_here, settles) {
                    Prepare::Ignore => Some(decide(ProcessState::Ignore, None)),
                    Prepare::Execute { record } => {
                        let route = self.executor.replication_route(&entry)?;
                        let request = Request::from_entry(index, entry.request.clone());
                        let outcome = self.executor.execute(index, route, request, false).await?;
                        if record {
                            Some(recorded_state(kind, term.epoch, &outcome))
                        } else {
                            let recorded = entry.state.response.as_ref();
                            self.faults.check_answer(index, &entry.request, recorded, &outcome)?;
                            None
                        }
                    }
                    Prepare::RecordKeptAnswer => {
                        // This replica executed it as leader and lost leadership before
                        // recording the outcome: the answer is in the record file.
                        let reply = last_record.as_ref().filter(|r| r.index == index).and_then(|r| r.reply.clone());
                        let outcome = Ok(reply.map_or_else(|| crate::faults::lost_answer(index), Reply::from_stored));
                        Some(recorded_state(kind, term.epoch, &outcome))
                    }
                    Prepare::Settle => {
                        // Its effect comes before everything after it: settle it now.
                        let route =
                            self.executor.route_of(&entry.request.method, &entry.request.path).expect("settles");
                        info!(index, "settling a payment a dead leader left unrecorded before going on");
                        let outcome = self.settler.settle_until_decided(route, term, index, &entry.request).await?;
                        // Recorded, then applied, before the entries after it run.
                        let record = outcome_ops(&self.keys, index, kind, term.epoch, &outcome, &entry.request, None);
                        store.authority_write(term, record).await?;
                        let settled = recorded_state(kind, term.epoch, &outcome);
                        if let Ok(reply) = outcome {
                            self.executor.apply_recorded(route, index, &entry.request, reply).await?;
                        }
                        passed.push((index, entry.request, settled));
                        continue;
                    }
                    Prepare::InDoubt => {
                        warn!(index, path = %entry.request.path, "Normal request left InProcess by a dead leader: in doubt");
                        ops.push(Op::Put(self.keys.doubt(index), Vec::new()));
                        None
                    }
                    Prepare::ApplyRecorded => {
                        self.executor.apply_if_recorded(index, &entry.state, &entry.request).await?;
                        None
                    }
                    Prepare::Pass => None,
                };
                if let Some(decided) = &decided {
                    ops.push(Op::Put(self.keys.rs(index), crate::codec::encode(decided)));
                }
                passed.push((index, entry.request, decided.unwrap_or(entry.state)));
            }
            self.executor.state.persist().await.map_err(Error::Persist)?;
            ops.push(Op::counter(self.keys.lpi(&self.config.replica), self.snapshots.recoverable_lpi(to)));
            ops.push(Op::counter(self.keys.ssi(), to));
            store.authority_write(term, ops).await?;
            for (index, request, state) in &passed {
                self.idempotency.apply(*index, request, state);
            }
            self.executor.record.clear()?;
            following.lpi = to;
        }
        // Confirms the fence and that SSI reaches LS even when there was nothing to do.
        store
            .authority_write(
                term,
                vec![
                    Op::counter(self.keys.lpi(&self.config.replica), self.snapshots.recoverable_lpi(ls)),
                    Op::counter(self.keys.ssi(), ls),
                ],
            )
            .await?;
        // Requests the outbox settles wait for the settler: the chain may take a while.
        let in_doubt = self.settler.reconcile_in_doubt(term, false).await?;
        let ls = self.import_idempotency_records(term, ls).await?;
        following.lpi = ls;
        let applied = self.executor.state.applied_index();
        self.reporter.set_status(|s| {
            s.ls = ls;
            s.ssi = ls;
            s.lpi = ls;
            s.applied_index = applied;
            s.in_doubt = in_doubt;
        });
        Ok(ls)
    }

    /// Moves the `idem/` records in etcd into the idempotency table (records of a service
    /// from before the table, and late answers of requests left in doubt): each batch as an
    /// import entry in the log, logged in the same transaction that deletes its records,
    /// so a record is always in one place or the other. Every replica adds them to its
    /// table when it passes the entry. Returns LS after them.
    async fn import_idempotency_records(&self, term: &Term, mut ls: u64) -> Result<u64> {
        use crate::idempotency::{IMPORT_PATH, Imported};
        /// Records per import entry: with the entry's own writes, one etcd transaction.
        const BATCH: i64 = 100;
        /// The most an import entry's body holds, bytes (answers are at most 512 KiB).
        const BODY: usize = 384 * 1024;
        let (from, to) = self.keys.idem_range();
        let mut start = from;
        loop {
            let page = self.store.values_in_page(&start, &to, BATCH).await?;
            let Some((last_key, _)) = page.last() else { return Ok(ls) };
            let mut next = last_key.clone();
            next.push(0);
            let (mut records, mut deletes, mut bytes) = (Vec::new(), Vec::new(), 0);
            for (key, value) in page {
                let client_key = self.keys.idem_key_of(&key).map(str::to_owned).ok_or_else(|| Error::CorruptRecord {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: "not an idempotency record's key".into(),
                });
                let imported = client_key.and_then(|client_key| {
                    let record: data::IdempotencyRecord = crate::codec::decode(&key, &value)?;
                    Ok(Imported {
                        key: client_key,
                        index: record.index,
                        fingerprint: record.fingerprint,
                        response: record.response,
                    })
                });
                match imported {
                    Ok(record) => {
                        let size = record.response.as_ref().map_or(0, |r| r.body.len()) + record.key.len() + 128;
                        if !records.is_empty() && bytes + size > BODY {
                            next = key;
                            break;
                        }
                        bytes += size;
                        records.push(record);
                        deletes.push(Op::Delete(String::from_utf8_lossy(&key).into_owned()));
                    }
                    // Left for an operator: a retry with its key is a new request.
                    Err(e) => error!(error = %e, "an unreadable idempotency record is not imported; it stays in etcd"),
                }
            }
            start = String::from_utf8_lossy(&next).into_owned();
            if records.is_empty() {
                continue;
            }
            let index = ls + 1;
            let count = records.len();
            let entry = LogEntry {
                method: "POST".into(),
                path: IMPORT_PATH.into(),
                query: None,
                headers: Vec::new(),
                body: crate::codec::encode(&records),
                idempotency_key: None,
                stamp: Some(self.idempotency.stamp(
                    data::unix_millis(),
                    self.config.idempotency_retention,
                    self.config.idempotency_max_bytes,
                )),
            };
            let answer = Reply::json(200, &serde_json::json!({ "imported": count }));
            let state = recorded_state(RequestKind::ExternalTxn, term.epoch, &Ok(answer));
            let mut ops = vec![
                Op::Put(self.keys.log(index), crate::codec::encode(&entry)),
                Op::Put(self.keys.rs(index), crate::codec::encode(&state)),
                Op::counter(self.keys.ls(), index),
                Op::counter(self.keys.ssi(), index),
                Op::counter(self.keys.lpi(&self.config.replica), self.snapshots.recoverable_lpi(index)),
            ];
            ops.extend(deletes);
            self.store.authority_write(term, ops).await?;
            self.idempotency.apply(index, &entry, &state);
            info!(index, records = count, "moved idempotency records from etcd into the idempotency table");
            ls = index;
        }
    }

    /// Rolls back what this replica executed above SSI without its outcome being
    /// recorded: a group it executed as leader just before losing leadership (or
    /// crashing). Prepare Service then executes those entries again and records their
    /// real answers; without this it would see them as already applied and leave them
    /// InProcess, answered to nobody and applied on this replica only.
    ///
    /// From the first such entry on, every Replication entry up to the applied index is
    /// rolled back, newest first (a later one may depend on it). A route without a
    /// rollback stops the undo there; its entries keep their effect, and Prepare Service
    /// records them with the answer from the record file when it has it.
    async fn undo_unrecorded(&self, ssi: u64, ls: u64) -> Result<()> {
        let applied = self.executor.state.applied_index().min(ls);
        if applied <= ssi {
            return Ok(());
        }
        let mut executed = Vec::new();
        let mut from = ssi + 1;
        while from <= applied {
            let page = self.store.entries(from, applied).await?;
            from = page.last().map_or(applied, |e| e.index) + 1;
            executed.extend(page);
        }
        let unrecorded = |e: &StoredEntry| {
            e.state.kind == RequestKind::Replication
                && !matches!(e.state.state, ProcessState::Success | ProcessState::Fail)
        };
        let Some(first) = executed.iter().position(unrecorded) else { return Ok(()) };
        for entry in executed[first..].iter().rev() {
            if entry.state.kind != RequestKind::Replication {
                continue;
            }
            let route = self.executor.route_of(&entry.request.method, &entry.request.path);
            let Some(rollback) = route.and_then(|r| r.rollback.clone()) else {
                warn!(
                    index = entry.index,
                    "executed without a recorded outcome and the route has no rollback: keeping its effect"
                );
                break;
            };
            info!(index = entry.index, "rolling back an execution whose outcome was never recorded");
            self.executor.roll_back(&rollback, entry.index, entry.request.clone()).await?;
        }
        self.executor.state.persist().await.map_err(Error::Persist)
    }

    /// Publishes `updateLocation(id, location, epoch)` before serving; if the chain cannot
    /// be reached, serves anyway and keeps trying in the background while this term lasts.
    async fn publish_location(self: &Arc<Self>, epoch: u64) {
        let Some(publisher) = self.config.publisher.clone() else {
            info!("no registry configured: the leader's location is not published");
            return;
        };
        let this = self.clone();
        let attempt = move || {
            let (publisher, this) = (publisher.clone(), this.clone());
            async move {
                let result =
                    publisher.registry.update_location(&this.config.service, &this.config.public_url, epoch).await;
                match result {
                    Ok(tx) => {
                        info!(epoch, location = %this.config.public_url, tx = %tx.hash, "location published");
                        this.reporter.set_status(|s| s.published_epoch = Some(epoch));
                        true
                    }
                    Err(e) if e.is_unreachable() => {
                        warn!(epoch, error = %e, "chain unreachable: serving anyway, will retry publishing");
                        false
                    }
                    Err(e) => {
                        error!(epoch, error = %e, "the registry refused the location; clients follow the Br2k-Leader hints");
                        true
                    }
                }
            }
        };
        if attempt().await {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(this.config.timings.publish_retry).await;
                if this.reporter.status.borrow().epoch != Some(epoch) || attempt().await {
                    break;
                }
            }
        });
    }
}

/// The final state that records `outcome`.
fn recorded_state(kind: RequestKind, epoch: u64, outcome: &Recorded) -> EntryState {
    let (state, reply) = match outcome {
        Ok(reply) => (ProcessState::Success, reply),
        Err(reply) => (ProcessState::Fail, reply),
    };
    EntryState { kind, state, epoch, response: Some(reply.to_stored()) }
}

/// What Prepare Service does with one entry between this replica's LPI and LS: the
/// paper's Table 1, with br2k's additions (the outbox's settling, idempotent effects).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prepare {
    /// A Null entry (never processed), or an External_TXN or read left InProcess: mark it
    /// Ignore, so no replica ever runs it.
    Ignore,
    /// A Replication entry this replica has not applied: execute it. `record`: it was
    /// InProcess, and its outcome here is recorded; otherwise it was a Success, and the
    /// answer here is checked against the recorded one.
    Execute { record: bool },
    /// A Replication entry left InProcess that this replica already executed, as the
    /// leader that then lost leadership: record the answer its record file kept.
    RecordKeptAnswer,
    /// A Normal request left InProcess whose route applies an effect to the replicated
    /// state (its transactions go through the outbox): settle it before going on, because
    /// the effects after it depend on it.
    Settle,
    /// Any other Normal request left InProcess: it may or may not have run; it stays in
    /// doubt until reconciled.
    InDoubt,
    /// A recorded Success of a Normal or External_TXN request: apply its effect here if
    /// this replica has not.
    ApplyRecorded,
    /// Nothing to do: already applied, failed, or ignored.
    Pass,
}

/// The action for an entry in `state` of `kind`; `applied_here`: this replica's app has
/// applied its index; `settles`: its route applies an effect settled through the outbox.
pub(crate) fn prepare(state: ProcessState, kind: RequestKind, applied_here: bool, settles: bool) -> Prepare {
    match (state, kind) {
        (ProcessState::Null, _) | (ProcessState::InProcess, RequestKind::ExternalTxn | RequestKind::Read) => {
            Prepare::Ignore
        }
        (ProcessState::Success | ProcessState::InProcess, RequestKind::Replication) => {
            let in_process = state == ProcessState::InProcess;
            match (applied_here, in_process) {
                (false, record) => Prepare::Execute { record },
                (true, true) => Prepare::RecordKeptAnswer,
                (true, false) => Prepare::Pass,
            }
        }
        (ProcessState::InProcess, RequestKind::Normal) if settles => Prepare::Settle,
        (ProcessState::InProcess, RequestKind::Normal) => Prepare::InDoubt,
        (ProcessState::Success, RequestKind::Normal | RequestKind::ExternalTxn) => Prepare::ApplyRecorded,
        _ => Prepare::Pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use ProcessState::{Fail, Ignore, InProcess, Null, Success};
    use RequestKind::{ExternalTxn, Normal, Read, Replication};

    #[test]
    fn prepare_service_follows_table_1_for_every_state_and_kind() {
        let kinds = [Replication, Normal, ExternalTxn, Read];
        // Null: never processed by anyone, whatever its kind, so never run.
        for kind in kinds {
            for (applied, settles) in [(false, false), (true, true)] {
                assert_eq!(prepare(Null, kind, applied, settles), Prepare::Ignore, "{kind:?}");
            }
        }
        // Replication: executed here unless applied; InProcess ones get their outcome recorded.
        assert_eq!(prepare(Success, Replication, false, false), Prepare::Execute { record: false });
        assert_eq!(prepare(InProcess, Replication, false, false), Prepare::Execute { record: true });
        assert_eq!(prepare(InProcess, Replication, true, false), Prepare::RecordKeptAnswer);
        assert_eq!(prepare(Success, Replication, true, false), Prepare::Pass);
        assert_eq!(prepare(Fail, Replication, false, false), Prepare::Pass);
        // Normal left InProcess: settled first when its effect is applied, else in doubt.
        assert_eq!(prepare(InProcess, Normal, false, true), Prepare::Settle);
        assert_eq!(prepare(InProcess, Normal, true, false), Prepare::InDoubt);
        // External_TXN and reads left InProcess never ran: ignored.
        assert_eq!(prepare(InProcess, ExternalTxn, false, false), Prepare::Ignore);
        assert_eq!(prepare(InProcess, Read, false, false), Prepare::Ignore);
        // Recorded Successes of Normal and External_TXN requests: their effect applied here.
        assert_eq!(prepare(Success, Normal, false, true), Prepare::ApplyRecorded);
        assert_eq!(prepare(Success, ExternalTxn, true, false), Prepare::ApplyRecorded);
        // Final states: nothing to do.
        for kind in kinds {
            for state in [Fail, Ignore] {
                assert_eq!(prepare(state, kind, false, false), Prepare::Pass, "{state:?} {kind:?}");
            }
        }
    }
}
