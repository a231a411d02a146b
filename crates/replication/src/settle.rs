//! Settling the only-once requests a leader left in doubt (InProcess with no outcome): by
//! their route's reconcile hook, or, for routes whose only effects are transactions through
//! the outbox, by running them again (the outbox hands back what it stored). Prepare Service
//! settles what it can before serving; while a replica leads, this runs soon after a
//! request is left in doubt and every few seconds.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::app::{AppState, Recorded, Request, Route};
use crate::config::Config;
use crate::data::{Keys, LogEntry};
use crate::error::Result;
use crate::executor::{Executor, IdempotencyLease, outcome_ops};
use crate::guard::guarded;
use crate::outbox::{Chain, EtcdTxStore};
use crate::reporter::Reporter;
use crate::store::{Op, Store, Term};

/// What settling works with.
pub(crate) struct Settler<S> {
    retention: Duration,
    handler_timeout: Duration,
    keys: Keys,
    store: Store,
    executor: Arc<Executor<S>>,
    reporter: Arc<Reporter>,
    chain: Option<Arc<Chain>>,
    /// Woken when a request was left in doubt, to settle it soon.
    pub(crate) now: Notify,
}

impl<S: AppState> Settler<S> {
    pub(crate) fn new(
        config: &Config,
        keys: Keys,
        store: Store,
        executor: Arc<Executor<S>>,
        reporter: Arc<Reporter>,
    ) -> Self {
        Self {
            retention: config.idempotency_retention,
            handler_timeout: config.limits.handler_timeout,
            keys,
            store,
            chain: executor.chain.clone(),
            executor,
            reporter,
            now: Notify::new(),
        }
    }

    /// The idempotency lease when `request` has a key: a request settled after every
    /// replica passed it in doubt has its answer written into a leased record too.
    async fn lease_for(&self, lease: &IdempotencyLease, request: &LogEntry) -> Result<Option<i64>> {
        match request.idempotency_key {
            Some(_) => Ok(Some(lease.get(&self.store, self.retention).await?)),
            None => Ok(None),
        }
    }

    /// While this replica leads: settles the requests left in doubt whose route sends
    /// transactions through the outbox, by running them again (the outbox hands back
    /// what it stored), soon after one is left in doubt and every few seconds.
    pub(crate) async fn settle_while_leading(self: Arc<Self>, term: Term) -> Result<()> {
        if self.chain.is_none() {
            return Ok(());
        }
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
                () = self.now.notified() => {}
            }
            match self.reconcile_in_doubt(&term, true).await {
                Ok(left) => self.reporter.set_status(|s| s.in_doubt = left),
                Err(e) if e.ends_term() => return Err(e),
                Err(e) => warn!(error = %e, "could not settle the requests in doubt; trying again"),
            }
        }
    }

    /// Settles in-doubt Normal requests whose route has a reconcile hook and, when
    /// `replay`, those whose route sends transactions through the outbox (by running them
    /// again); returns the ones still in doubt.
    pub(crate) async fn reconcile_in_doubt(&self, term: &Term, replay: bool) -> Result<Vec<u64>> {
        let store = &self.store;
        let mut left = Vec::new();
        let lease = IdempotencyLease::default();
        for index in store.indexes_under(&self.keys.doubt_prefix()).await? {
            let Some(entry) = store.entries(index, index).await?.pop() else { continue };
            let route = self.executor.route_of(&entry.request.method, &entry.request.path);
            let answer = match route {
                Some(route) if route.reconcile.is_some() => {
                    let reconcile = route.reconcile.clone().expect("checked");
                    let asked =
                        reconcile(self.executor.state.clone(), Request::from_entry(index, entry.request.clone()));
                    let (method, path) = (&entry.request.method, &entry.request.path);
                    match guarded(asked, self.handler_timeout).await {
                        Ok(answer) => answer.and_then(|outcome| {
                            self.executor
                                .recordable(outcome, "reconcile hook", index, method, path)
                                .inspect_err(|error| warn!(%error, "the request stays in doubt"))
                                .ok()
                        }),
                        Err(fault) => {
                            let error = fault.at("reconcile hook", index, &entry.request.method, &entry.request.path);
                            warn!(%error, "the request stays in doubt");
                            None
                        }
                    }
                }
                Some(route) if replay && route.replayable => {
                    self.executor.run_again(&self.store, route, term, index, &entry.request).await?
                }
                _ => None,
            };
            match answer {
                Some(outcome) => {
                    info!(index, success = outcome.is_ok(), "in-doubt request reconciled");
                    let lease = self.lease_for(&lease, &entry.request).await?;
                    let mut ops =
                        outcome_ops(&self.keys, index, entry.state.kind, term.epoch, &outcome, &entry.request, lease);
                    ops.push(Op::Delete(self.keys.doubt(index)));
                    store.authority_write(term, ops).await?;
                }
                None => left.push(index),
            }
        }
        if !left.is_empty() {
            warn!(in_doubt = ?left, "Normal requests remain in doubt; see /br2k/status");
        }
        Ok(left)
    }

    /// Runs an only-once request whose effect later requests wait for until the outbox
    /// settles it (the chain answering again, a lingering transaction mined), checking
    /// between attempts that this replica still leads.
    pub(crate) async fn settle_until_decided(
        &self,
        route: &Route<S>,
        term: &Term,
        index: u64,
        entry: &LogEntry,
    ) -> Result<Recorded> {
        let mut attempts = 0u32;
        loop {
            // A later request's stored transaction may hold a lower nonce that was never
            // broadcast (its leader died), or that a reorg dropped while no leader ran:
            // this one cannot be mined before it. Broadcast those first, not only after a
            // whole settle_within of waiting (the testbed's reorgs under leader kills
            // held a payout 30 s behind such a gap).
            if let Some(chain) = &self.chain {
                chain.rebroadcast_after(&EtcdTxStore::reading(self.store.clone()), index).await;
            }
            if let Some(outcome) = self.executor.run_again(&self.store, route, term, index, entry).await? {
                return Ok(outcome);
            }
            attempts += 1;
            if attempts == 1 {
                warn!(index, "a payment is not settled yet; the requests after it wait for it");
                self.reporter.set_status(|s| {
                    if !s.in_doubt.contains(&index) {
                        s.in_doubt.push(index);
                    }
                });
            }
            // Still the leader? (A write fenced by the term, with nothing in it.)
            self.store.authority_write(term, Vec::new()).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
