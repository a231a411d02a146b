//! Sending one request's transactions exactly once: reserve a nonce with the signed
//! transaction in one fenced write, broadcast, wait for the receipt at depth, bump a
//! lingering one at the same nonce, record the receipt.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use alloy::consensus::TxEnvelope;
use alloy::eips::eip2718::Encodable2718;
use alloy::network::{NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use tracing::{debug, info, warn};

use crate::chain::Chain;
use crate::endpoints::RpcFailure;
use crate::records::*;
use crate::store::{StoreError, TxStore, Write, decode, encode, get_counter};

/// The first wait for a receipt after a broadcast: a chain that mines at once (anvil's
/// automine, a rollup's sequencer) answers within milliseconds. Doubled after each
/// poll, up to [`POLL_EVERY`].
pub(crate) const FIRST_POLL: Duration = Duration::from_millis(20);
/// The wait between receipt polls of a transaction that was not mined at once.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(250);

/// What the chain says of a record's attempts.
pub(crate) enum Mined {
    /// None has a receipt (none mined, or its block was reorganised away).
    No,
    /// One was mined, in `block`, but is not yet `confirmations` deep: it is ours, so the
    /// nonce is never taken for a stranger's.
    Shallow {
        /// The mined attempt.
        hash: B256,
        /// Its block.
        block: u64,
    },
    /// One is mined `confirmations` deep: settled.
    Confirmed(TxSettled),
}

/// How long the record's nonce must look spent with no receipt of any of its versions
/// before the outbox believes a transaction it did not send took the nonce.
pub(crate) const FOREIGN_SPEND_AFTER: Duration = Duration::from_secs(3);

/// A request's view of the outbox: what its handler sends transactions through
/// (`br2k_replication::Request::outbox`).
#[derive(Clone)]
pub struct Outbox {
    chain: Arc<Chain>,
    store: Arc<dyn TxStore>,
    index: u64,
    next_seq: Arc<AtomicU32>,
    unsettled: Arc<AtomicBool>,
    leadership_lost: Arc<AtomicBool>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("index", &self.index).field("sender", &self.chain.sender()).finish()
    }
}

impl Outbox {
    /// The outbox of the request at `index`, keeping its records in `store` (whose writes
    /// are fenced by the term this leader runs the request in).
    pub fn new(chain: Arc<Chain>, store: Arc<dyn TxStore>, index: u64) -> Self {
        Self {
            chain,
            store,
            index,
            next_seq: Arc::new(AtomicU32::new(0)),
            unsettled: Arc::new(AtomicBool::new(false)),
            leadership_lost: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The address transactions are sent from.
    pub fn sender(&self) -> Address {
        self.chain.sender()
    }

    /// Whether a send found this replica no longer the leader.
    pub fn leadership_lost(&self) -> bool {
        self.leadership_lost.load(Ordering::SeqCst)
    }

    /// Whether a send of this request ended in doubt (the runtime then records nothing).
    pub fn unsettled(&self) -> bool {
        self.unsettled.load(Ordering::SeqCst)
    }

    /// Sends `call` once for this request (the next of its transactions, in the order the
    /// handler sends them) and waits until it is settled.
    ///
    /// # Errors
    /// [`TxError::InDoubt`] when the chain did not settle it in time (return at once: the
    /// request stays in doubt and runs again later), [`TxError::Refused`] when it can never
    /// be mined, [`TxError::LeadershipLost`].
    pub async fn send(&self, call: TxCall) -> Result<TxReceipt, TxError> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let result = self.send_seq(seq, call).await;
        if matches!(result, Err(TxError::InDoubt(_) | TxError::LeadershipLost)) {
            self.unsettled.store(true, Ordering::SeqCst);
        }
        if matches!(result, Err(TxError::LeadershipLost)) {
            self.leadership_lost.store(true, Ordering::SeqCst);
        }
        result
    }

    pub(crate) async fn send_seq(&self, seq: u32, call: TxCall) -> Result<TxReceipt, TxError> {
        let key = self.chain.keys.tx(self.index, seq);
        let stored = self.store.get(&key).await.map_err(in_doubt)?;
        let (mut record, replayed) = match stored {
            Some(value) => {
                let record: TxRecord = decode(&key, &value).map_err(in_doubt)?;
                if record.call != call {
                    warn!(
                        index = self.index,
                        seq, "the handler asked for another transaction than it stored; settling the stored one"
                    );
                }
                (record, true)
            }
            None => (self.sign_and_store(&key, call).await?, false),
        };
        if let Some(reason) = record.cancel_reason() {
            return Err(TxError::Refused(reason));
        }
        if let Some(settled) = &record.settled {
            return Ok(receipt(&record, settled, true));
        }
        if let Some(reason) = &record.refused {
            return Err(TxError::Refused(reason.clone()));
        }
        self.chain.observe(TxStep::Stored, self.index).await;
        let settled = self.settle(&key, &mut record).await?;
        if let Some(reason) = record.cancel_reason() {
            self.chain.cancels().remove(&self.index);
            return Err(TxError::Refused(reason));
        }
        self.chain.observe(TxStep::Settled, self.index).await;
        Ok(receipt(&record, &settled, replayed))
    }

    /// Reserves the next nonce and stores the signed transaction with it, in one fenced
    /// write.
    pub(crate) async fn sign_and_store(&self, key: &str, call: TxCall) -> Result<TxRecord, TxError> {
        let chain = &self.chain;
        let request = TransactionRequest::default()
            .with_from(chain.sender())
            .with_to(call.to)
            .with_value(call.value)
            .with_input(call.input.clone());
        // Nothing is stored yet: a chain that does not answer leaves the request in doubt
        // (it runs again later), a node that answers "no" refuses it.
        let failed = |failure: RpcFailure| match failure {
            RpcFailure::Answered(reason) => TxError::Refused(reason),
            RpcFailure::Unreachable(reason) => TxError::InDoubt(reason),
        };
        let gas_limit = match call.gas_limit {
            Some(limit) => limit,
            None => {
                // At the latest block, not the pending one: a node's pending state holds
                // this sender's transactions in the pool, which may run after this one.
                let estimate = |p: DynProvider| {
                    let request = request.clone();
                    async move { p.estimate_gas(request).block(alloy::eips::BlockId::latest()).await }
                };
                let estimated = chain.endpoints.read("estimate the gas", estimate).await.map_err(failed)?;
                estimated.saturating_mul(chain.config.gas_limit_percent.max(100)) / 100
            }
        };
        let fees = chain.fees().await.map_err(failed)?;
        self.chain_id().await.map_err(failed)?;
        chain.observe(TxStep::Reserving, self.index).await;
        let _reserving = chain.reserving.lock().await;
        let mined = chain.mined_nonces().await.map_err(failed)?;
        // A nonce a refused transaction gave back comes first (it would block every later
        // one); then the next one never reserved, or the chain's if someone else used the key.
        let keys = &chain.keys;
        let free: Vec<u64> = self
            .store
            .range(&keys.free_start(), &keys.free_end())
            .await
            .map_err(in_doubt)?
            .iter()
            .filter_map(|(key, _)| keys.parse_free(key))
            .collect();
        let reserved = get_counter(self.store.as_ref(), &keys.next_nonce()).await.map_err(in_doubt)?;
        let (nonce, mut ops) = match free.iter().find(|&&n| n >= mined) {
            Some(&n) => (n, vec![Write::Delete(keys.free(n))]),
            None => {
                let n = reserved.max(mined);
                (n, vec![Write::counter(keys.next_nonce(), n + 1)])
            }
        };
        // Free nonces the chain has spent meanwhile are gone for good.
        ops.extend(free.iter().filter(|&&n| n < mined).map(|&n| Write::Delete(keys.free(n))));
        let attempt = self
            .sign(&call, nonce, gas_limit, fees.max_fee_per_gas, fees.max_priority_fee_per_gas)
            .await
            .map_err(TxError::Refused)?;
        let record = TxRecord { nonce, call, attempts: vec![attempt], settled: None, refused: None, broadcast: false };
        ops.push(Write::Put(key.to_owned(), encode(&record)));
        self.fenced(ops).await?;
        info!(index = self.index, nonce, hash = %record.attempts[0].hash, "transaction signed and stored");
        Ok(record)
    }

    pub(crate) async fn sign(
        &self,
        call: &TxCall,
        nonce: u64,
        gas_limit: u64,
        max_fee_per_gas: u128,
        max_priority_fee_per_gas: u128,
    ) -> Result<TxAttempt, String> {
        let chain_id = self.chain_id().await.map_err(|e| e.to_string())?;
        let request = TransactionRequest::default()
            .with_from(self.chain.sender())
            .with_to(call.to)
            .with_value(call.value)
            .with_input(call.input.clone())
            .with_nonce(nonce)
            .with_chain_id(chain_id)
            .with_gas_limit(gas_limit)
            .with_max_fee_per_gas(max_fee_per_gas)
            .with_max_priority_fee_per_gas(max_priority_fee_per_gas);
        let envelope: TxEnvelope = request.build(&self.chain.wallet).await.map_err(|e| format!("signing: {e}"))?;
        debug!(nonce, hash = %envelope.tx_hash(), "signed");
        Ok(TxAttempt {
            hash: *envelope.tx_hash(),
            raw: envelope.encoded_2718().into(),
            max_fee_per_gas,
            max_priority_fee_per_gas,
            gas_limit,
            cancel: false,
        })
    }

    /// The chain's id, read once.
    pub(crate) async fn chain_id(&self) -> Result<u64, RpcFailure> {
        let id = self
            .chain
            .chain_id
            .get_or_try_init(|| {
                self.chain.endpoints.read("read the chain id", |p| async move { p.get_chain_id().await })
            })
            .await?;
        Ok(*id)
    }

    /// Broadcasts the record's latest attempt and waits until one of its attempts is
    /// mined and confirmed, replacing it with higher fees when it lingers.
    pub(crate) async fn settle(&self, key: &str, record: &mut TxRecord) -> Result<TxSettled, TxError> {
        let config = &self.chain.config;
        let deadline = Instant::now() + config.settle_within;
        let mut last_broadcast: Option<Instant> = None;
        let mut last_attempt_at = Instant::now();
        let mut last_error = String::from("not mined yet");
        let mut poll = FIRST_POLL;
        let mut spent_without_receipt: Option<Instant> = None;
        // The attempt last seen mined (not yet deep enough), if one was.
        let mut seen_mined: Option<B256> = None;
        // Broadcast by an earlier run (a dead leader, an earlier attempt of this one): a
        // pool may hold it, whatever a node answers now.
        let broadcast_before = record.broadcast;
        loop {
            // Any version mined? While one of ours is, however shallow, nothing is bumped
            // or resent.
            let read = self.mined(record).await;
            let mined_shallow = matches!(read, Ok(Mined::Shallow { .. }));
            match read {
                Ok(Mined::Confirmed(settled)) => {
                    record.settled = Some(settled.clone());
                    self.store_record(key, record).await?;
                    info!(index = self.index, nonce = record.nonce, hash = %settled.hash, success = settled.success, "transaction settled");
                    return Ok(settled);
                }
                Ok(Mined::Shallow { hash, block }) => {
                    // Ours was mined: the nonce is spent by us, whatever happens next. It
                    // counts once it is deep enough; a reorg that drops it sends us back to
                    // rebroadcasting the same stored bytes. Nothing to bump or resend now.
                    spent_without_receipt = None;
                    seen_mined = Some(hash);
                    // A bump is due only once it has lingered unmined that long again.
                    last_attempt_at = Instant::now();
                    debug!(index = self.index, nonce = record.nonce, %hash, block, "mined, waiting for confirmations");
                    last_error = format!("{hash} mined in block {block}, not yet {} deep", config.confirmations);
                }
                Ok(Mined::No) => {
                    if let Some(hash) = seen_mined.take() {
                        // Its block was reorganised away before it was deep enough: send
                        // the same stored bytes again, now (the same nonce, the same
                        // transaction), until one of its attempts is deep enough again.
                        warn!(index = self.index, nonce = record.nonce, %hash,
                            "a reorg dropped the block holding the transaction; broadcasting it again");
                        self.chain.reorg_rebroadcasts.fetch_add(1, Ordering::Relaxed);
                        last_broadcast = None;
                    }
                    // Spent, by a transaction that is none of ours: ours can never be mined.
                    // Only believed once it has held for a while: a node shows the
                    // account's new nonce a moment before the receipt of the block that
                    // spent it (anvil does, under load), and nodes behind one endpoint
                    // disagree; taking our own mined transaction for a stranger's would
                    // answer a paid request as refused.
                    if self.nonce_spent(record.nonce).await == Some(true) {
                        let since = *spent_without_receipt.get_or_insert_with(Instant::now);
                        if since.elapsed() >= FOREIGN_SPEND_AFTER {
                            return Err(TxError::Refused(format!(
                                "nonce {} was spent by a transaction the outbox did not send (for {:?} no receipt of \
                                 ours): is another process using the service's transaction key?",
                                record.nonce, FOREIGN_SPEND_AFTER
                            )));
                        }
                    } else {
                        spent_without_receipt = None;
                    }
                }
                Err(reason) => last_error = reason,
            }
            // The operator's cancel, once: it races the original at the same nonce.
            if !mined_shallow && !record.attempts.iter().any(|a| a.cancel) && self.chain.cancels().contains(&self.index)
            {
                self.sign_cancel(key, record).await?;
                last_broadcast = None;
                last_attempt_at = Instant::now();
            }
            if Instant::now() >= deadline {
                return Err(TxError::InDoubt(format!(
                    "nonce {} not settled within {:?}: {last_error}",
                    record.nonce, config.settle_within
                )));
            }
            // Replace a lingering one at the same nonce with higher fees (until the cap).
            if !mined_shallow && last_broadcast.is_some() && last_attempt_at.elapsed() >= config.bump_after {
                if self.bump(key, record).await? {
                    last_broadcast = None;
                    poll = FIRST_POLL;
                }
                last_attempt_at = Instant::now();
            }
            if !mined_shallow && last_broadcast.is_none_or(|at| at.elapsed() >= Duration::from_secs(5)) {
                if !record.broadcast {
                    self.mark_broadcast(key, record).await?;
                }
                let latest = record.attempts.last().expect("a record holds at least one attempt");
                match self.chain.endpoints.broadcast(&latest.raw).await {
                    Ok(_) => debug!(index = self.index, nonce = record.nonce, hash = %latest.hash, "broadcast"),
                    // Already in the pool, or the nonce already spent (by an attempt of
                    // ours, which the receipts will show): nothing to do.
                    Err(RpcFailure::Answered(reason)) if is_harmless(&reason) => {}
                    Err(RpcFailure::Answered(reason))
                        if record.attempts.len() == 1 && last_broadcast.is_none() && !broadcast_before =>
                    {
                        // The only version, refused at its very first broadcast: it was
                        // never in any pool. Mark it so it is never broadcast again, and
                        // give its nonce back. (Once broadcast, a node's "no" now proves
                        // nothing: another pool may hold it, so it stays in doubt.)
                        if self.nonce_spent(record.nonce).await == Some(false) {
                            self.refuse(key, record, &reason).await?;
                            return Err(TxError::Refused(reason));
                        }
                    }
                    Err(e) => last_error = e.to_string(),
                }
                if last_broadcast.is_none() {
                    self.chain.observe(TxStep::Broadcast, self.index).await;
                }
                last_broadcast = Some(Instant::now());
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(POLL_EVERY);
        }
    }

    /// The operator's cancel: nothing sent, to the service's own address.
    pub(crate) fn cancel_call(&self) -> TxCall {
        TxCall { to: self.chain.sender(), value: U256::ZERO, input: Bytes::new(), gas_limit: Some(21_000) }
    }

    /// Signs the operator's cancel at the record's nonce, with fees above the latest
    /// version's by more than pools ask of a replacement (and at least what the chain asks
    /// now; the fee cap does not hold it back: the operator asked), and stores it before it
    /// is broadcast.
    pub(crate) async fn sign_cancel(&self, key: &str, record: &mut TxRecord) -> Result<(), TxError> {
        let last = record.attempts.last().expect("a record holds at least one attempt").clone();
        let raised = |fee: u128| fee + fee / 4 + 1;
        let (mut max_fee, mut priority) = (raised(last.max_fee_per_gas), raised(last.max_priority_fee_per_gas));
        if let Ok(now) = self.chain.fees().await {
            max_fee = max_fee.max(now.max_fee_per_gas);
            priority = priority.max(now.max_priority_fee_per_gas);
        }
        let mut attempt = self
            .sign(&self.cancel_call(), record.nonce, 21_000, max_fee, priority.min(max_fee))
            .await
            .map_err(in_doubt)?;
        attempt.cancel = true;
        let mut cancelling = record.clone();
        cancelling.attempts.push(attempt.clone());
        self.store_record(key, &cancelling).await?;
        warn!(index = self.index, nonce = record.nonce, hash = %attempt.hash, max_fee,
            "the operator's cancel is signed and stored: it races the original at the same nonce");
        *record = cancelling;
        Ok(())
    }

    /// Marks a record broadcast, in a fenced write, before it is: from then on its nonce is
    /// never given back.
    pub(crate) async fn mark_broadcast(&self, key: &str, record: &mut TxRecord) -> Result<(), TxError> {
        let mut marked = record.clone();
        marked.broadcast = true;
        self.store_record(key, &marked).await?;
        *record = marked;
        Ok(())
    }

    /// Stores `record` at `key` under this leader's fence.
    pub(crate) async fn store_record(&self, key: &str, record: &TxRecord) -> Result<(), TxError> {
        self.fenced(vec![Write::Put(key.to_owned(), encode(record))]).await
    }

    /// Writes `ops` under this leader's fence: a lost fence is [`TxError::LeadershipLost`],
    /// any other failure leaves the transaction in doubt.
    pub(crate) async fn fenced(&self, ops: Vec<Write>) -> Result<(), TxError> {
        match self.store.write(ops).await {
            Ok(()) => Ok(()),
            Err(StoreError::Fenced) => Err(TxError::LeadershipLost),
            Err(e) => Err(in_doubt(e)),
        }
    }

    /// Marks a record refused and frees its nonce, in one fenced write.
    pub(crate) async fn refuse(&self, key: &str, record: &mut TxRecord, reason: &str) -> Result<(), TxError> {
        record.refused = Some(reason.to_owned());
        // Refused at its first broadcast: no pool ever took it.
        record.broadcast = false;
        let ops = vec![
            Write::Put(key.to_owned(), encode(&*record)),
            Write::Put(self.chain.keys.free(record.nonce), Vec::new()),
        ];
        self.fenced(ops).await?;
        warn!(
            index = self.index,
            nonce = record.nonce,
            reason,
            "transaction refused by the chain; its nonce is free again"
        );
        Ok(())
    }

    /// Whether one of the record's attempts has a receipt, and how deep it is.
    pub(crate) async fn mined(&self, record: &TxRecord) -> Result<Mined, String> {
        for attempt in &record.attempts {
            let hash = attempt.hash;
            let found: Option<TransactionReceipt> = self
                .chain
                .endpoints
                .read("read a receipt", |p| async move { p.get_transaction_receipt(hash).await })
                .await
                .map_err(|e| e.to_string())?;
            let Some(found) = found else { continue };
            let Some(block) = found.block_number else { continue };
            let head = self.chain.head().await.map_err(|e| e.to_string())?;
            if head + 1 < block + self.chain.config.confirmations {
                return Ok(Mined::Shallow { hash: attempt.hash, block });
            }
            return Ok(Mined::Confirmed(TxSettled {
                hash: attempt.hash,
                block,
                success: found.status(),
                gas_used: found.gas_used,
            }));
        }
        Ok(Mined::No)
    }

    /// Whether the chain has mined a transaction at `nonce` (`None`: it did not answer).
    pub(crate) async fn nonce_spent(&self, nonce: u64) -> Option<bool> {
        let count = self.chain.mined_nonces().await.ok()?;
        Some(count > nonce)
    }

    /// Signs a replacement at the same nonce with fees a quarter higher (at least what the
    /// chain asks now, at most `max_fee_multiple` times the first version's), and stores it
    /// before it is broadcast. `false`: the fees are at the cap, nothing was replaced.
    pub(crate) async fn bump(&self, key: &str, record: &mut TxRecord) -> Result<bool, TxError> {
        let last = record.attempts.last().expect("a record holds at least one attempt").clone();
        let first = &record.attempts[0];
        let multiple = u128::from(self.chain.config.max_fee_multiple.max(1));
        let (fee_cap, priority_cap) =
            (first.max_fee_per_gas.saturating_mul(multiple), first.max_priority_fee_per_gas.saturating_mul(multiple));
        let raised = |fee: u128| fee + fee / 4 + 1;
        let (mut max_fee, mut priority) = (raised(last.max_fee_per_gas), raised(last.max_priority_fee_per_gas));
        if let Ok(now) = self.chain.fees().await {
            max_fee = max_fee.max(now.max_fee_per_gas);
            priority = priority.max(now.max_priority_fee_per_gas);
        }
        let (max_fee, priority) = (max_fee.min(fee_cap), priority.min(priority_cap));
        // Pools take a replacement only if it pays a tenth more in both fees (geth's
        // default price bump); one the cap keeps below that would be refused.
        if max_fee < last.max_fee_per_gas + last.max_fee_per_gas / 10 + 1
            || priority < last.max_priority_fee_per_gas + last.max_priority_fee_per_gas / 10
        {
            warn!(
                index = self.index,
                nonce = record.nonce,
                max_fee = last.max_fee_per_gas,
                cap = fee_cap,
                "a lingering transaction's fees are at the cap (max_fee_multiple); rebroadcasting it as it is"
            );
            return Ok(false);
        }
        // The earlier version may still be mined: whatever fails here leaves it in doubt.
        // A cancel is replaced by a cancel, never by the payment it cancels.
        let call = if last.cancel { self.cancel_call() } else { record.call.clone() };
        let mut attempt =
            self.sign(&call, record.nonce, last.gas_limit, max_fee, priority.min(max_fee)).await.map_err(in_doubt)?;
        attempt.cancel = last.cancel;
        let mut bumped = record.clone();
        bumped.attempts.push(attempt.clone());
        self.store_record(key, &bumped).await?;
        info!(index = self.index, nonce = record.nonce, hash = %attempt.hash, max_fee, "replacing a lingering transaction with higher fees");
        *record = bumped;
        Ok(true)
    }
}

/// Node answers to a broadcast that mean the transaction (or one at its nonce) is known.
pub(crate) fn is_harmless(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    ["already known", "already imported", "known transaction", "nonce too low", "underpriced", "replacement"]
        .iter()
        .any(|known| reason.contains(known))
}

pub(crate) fn in_doubt(error: impl std::fmt::Display) -> TxError {
    TxError::InDoubt(error.to_string())
}

pub(crate) fn receipt(record: &TxRecord, settled: &TxSettled, replayed: bool) -> TxReceipt {
    TxReceipt {
        hash: settled.hash,
        nonce: record.nonce,
        block: settled.block,
        success: settled.success,
        gas_used: settled.gas_used,
        gas_limit: record.attempts.iter().find(|a| a.hash == settled.hash).map_or(0, |a| a.gas_limit),
        replayed,
    }
}
