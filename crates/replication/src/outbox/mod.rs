//! The transaction outbox: how an only-once handler sends Ethereum transactions so that a
//! request pays at most once through any number of leader changes (Chainlink's
//! transaction manager and the OpenZeppelin Relayer work the same way).
//!
//! For the `k`-th transaction a request's handler sends, the leader, under its fence:
//! 1. picks the next nonce of the service's transaction key (the larger of what etcd
//!    reserved last and what the chain has mined), signs the transaction, and stores it
//!    (nonce, signed bytes, hash) in etcd at `outbox/<index>/<k>` *together with* the
//!    nonce reservation, in one fenced transaction: a nonce is never reserved without its
//!    transaction, and a leader cut off before that write never broadcasts anything;
//! 2. only then broadcasts it, and waits for its receipt at the configured confirmation
//!    depth, rebroadcasting the stored bytes now and then;
//! 3. when it is not mined for a while, signs a replacement at the same nonce with fees
//!    raised by a quarter, stores it next to the first, broadcasts it: whichever is mined,
//!    the nonce is spent once;
//! 4. records the receipt in the same record.
//!
//! A handler that runs again for the same request (a new leader finishing it, a retry)
//! finds its records and gets the stored transactions back: it rebroadcasts the same bytes
//! and settles from receipts, and never signs another transaction for the request with a
//! new nonce. The chain accepts one transaction per nonce, so even a stale leader that
//! wakes up and broadcasts what it stored cannot make a request pay twice.
//!
//! A chain that does not answer leaves the transaction, and so the request, in doubt: the
//! handler gets [`TxError::InDoubt`], the runtime answers `503` without recording an
//! outcome, lists the request in `/br2k/status`, and runs the handler again until the
//! chain settles it.
//!
//! A real chain adds three things, each handled in its own place:
//! - **Depth.** A receipt of one of the record's attempts, however shallow, means ours was
//!   mined ([`Mined::Shallow`]): the nonce is never taken for a stranger's, nothing is
//!   bumped, and a reorg that drops it before it is deep enough sends the same bytes
//!   again.
//! - **Deep reorgs.** A transaction already recorded settled can still leave the chain:
//!   the leader's finality checker ([`finality`]) finds it, counts it and broadcasts it
//!   again.
//! - **Several endpoints.** Broadcasts go to all of them, reads fail over ([`endpoints`]).

mod endpoints;
mod finality;

pub use endpoints::EndpointHealth;
pub use finality::FinalityViolation;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::consensus::TxEnvelope;
use alloy::eips::eip2718::Encodable2718;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

pub use crate::config::OutboxConfig;
use crate::data::Keys;
use crate::error::{Error, Result};
use crate::store::{Op, Store, Term};
use endpoints::{Endpoints, RpcFailure};

/// The first wait for a receipt after a broadcast: a chain that mines at once (anvil's
/// automine, a rollup's sequencer) answers within milliseconds. Doubled after each
/// poll, up to [`POLL_EVERY`].
const FIRST_POLL: Duration = Duration::from_millis(20);
/// The wait between receipt polls of a transaction that was not mined at once.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// What the chain says of a record's attempts.
enum Mined {
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
const FOREIGN_SPEND_AFTER: Duration = Duration::from_secs(3);

/// A transaction a handler asks for: a call (or a plain transfer) from the service's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxCall {
    /// The recipient or contract.
    pub to: Address,
    /// Wei sent along.
    pub value: U256,
    /// Call data.
    pub input: Bytes,
    /// A gas limit; estimated when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gas_limit: Option<u64>,
}

impl TxCall {
    /// A call of `to` with `input` and no value.
    pub fn call(to: Address, input: impl Into<Bytes>) -> Self {
        Self { to, value: U256::ZERO, input: input.into(), gas_limit: None }
    }
}

/// One signed transaction of a record, stored before it was broadcast.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxAttempt {
    /// Its hash.
    pub hash: B256,
    /// The signed bytes (EIP-2718), as broadcast.
    pub raw: Bytes,
    /// Its `maxFeePerGas`, wei.
    pub max_fee_per_gas: u128,
    /// Its `maxPriorityFeePerGas`, wei.
    pub max_priority_fee_per_gas: u128,
    /// Its gas limit.
    pub gas_limit: u64,
    /// Whether it is the operator's cancel (`br2k tx cancel`): a zero-value transfer to the
    /// service's own address at the record's nonce, not the handler's call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// How a transaction ended on chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxSettled {
    /// The attempt that was mined.
    pub hash: B256,
    /// Its block.
    pub block: u64,
    /// Whether it succeeded (a reverted transaction still spent its nonce).
    pub success: bool,
    /// Gas it used.
    pub gas_used: u64,
}

/// `outbox/<index>/<k>`: the `k`-th transaction of the request at `index`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxRecord {
    /// The nonce it holds.
    pub nonce: u64,
    /// What the handler asked for.
    pub call: TxCall,
    /// Every signed version, in order; later ones replace earlier ones at the same nonce
    /// with higher fees.
    pub attempts: Vec<TxAttempt>,
    /// The receipt, once settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<TxSettled>,
    /// Why the chain refused it, when no version was ever accepted: it is never broadcast
    /// again, and its nonce went back to `outbox/free/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Whether it was ever broadcast. Marked (in a fenced write) before the first
    /// broadcast: a pool may hold it from then on, so its nonce is never given back, and a
    /// leader that meets a node's error on it keeps the request in doubt, never refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub broadcast: bool,
}

impl TxRecord {
    /// The operator's cancel, when that is what settled the record.
    pub fn cancelled_by(&self) -> Option<&TxAttempt> {
        let settled = self.settled.as_ref()?;
        self.attempts.iter().find(|a| a.hash == settled.hash && a.cancel)
    }

    /// Why the request failed, when the operator's cancel took its nonce.
    fn cancel_reason(&self) -> Option<String> {
        self.cancelled_by().map(|cancel| {
            format!(
                "cancelled by the operator: nonce {} went to {}, a zero-value transfer to the service's own \
                 address; nothing was paid",
                self.nonce, cancel.hash
            )
        })
    }
}

/// An unsettled transaction, as `GET /br2k/tx` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnsettledTx {
    /// The request's log index.
    pub index: u64,
    /// Which of its transactions.
    pub seq: u32,
    /// Its nonce.
    pub nonce: u64,
    /// Where the handler's call goes, and the wei it sends.
    pub to: Address,
    /// Wei sent along.
    pub value: U256,
    /// Signed versions so far (replacements and a cancel included).
    pub attempts: usize,
    /// The latest version's hash.
    pub latest: B256,
    /// Whether it was ever broadcast.
    pub broadcast: bool,
    /// Whether the operator's cancel is signed and stored (it then races the original).
    pub cancel_signed: bool,
    /// Whether the operator asked this leader to cancel it (signed at its next settle).
    pub cancel_requested: bool,
}

/// Why a cancel cannot be asked for.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// The request has no transaction that is still unsettled.
    #[error("request {0} has no unsettled transaction (`br2k tx ls` lists those that do)")]
    NothingToCancel(u64),
    /// It is settled already.
    #[error("request {index}'s transaction is settled already: {hash} in block {block}")]
    Settled {
        /// The request.
        index: u64,
        /// What settled it.
        hash: B256,
        /// Where.
        block: u64,
    },
    /// etcd could not be read.
    #[error("cannot read the outbox: {0}")]
    Store(String),
}

/// A settled transaction, as a handler gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxReceipt {
    /// The transaction that was mined.
    pub hash: B256,
    /// Its nonce.
    pub nonce: u64,
    /// Its block.
    pub block: u64,
    /// Whether it succeeded.
    pub success: bool,
    /// Gas it used.
    pub gas_used: u64,
    /// The gas limit it was signed with: a reverted transaction that used all of it ran
    /// out of gas.
    pub gas_limit: u64,
    /// Whether the outbox held it from an earlier run of the handler (a new leader, a retry).
    pub replayed: bool,
}

impl TxReceipt {
    /// Whether it reverted by running out of its gas limit (rather than by the call's own
    /// refusal).
    pub fn out_of_gas(&self) -> bool {
        !self.success && self.gas_limit > 0 && self.gas_used >= self.gas_limit
    }
}

/// Why a send did not settle.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The transaction may still be mined: the chain did not answer or did not mine it in
    /// time. The runtime leaves the request in doubt and runs it again later; the handler
    /// should return at once (what it returns is not recorded).
    #[error("transaction in doubt: {0}")]
    InDoubt(String),
    /// It can never be mined: the chain refused it (`reason`) before any version of it
    /// was accepted, or the call would revert. Nothing was spent; the handler decides.
    #[error("transaction refused: {0}")]
    Refused(String),
    /// This replica is no longer the leader: the request is someone else's now.
    #[error("leadership lost while sending a transaction")]
    LeadershipLost,
}

/// Points of a send a test can stop at (the replica is then crashed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TxStep {
    /// About to reserve a nonce: nothing stored yet.
    Reserving,
    /// Signed and stored in etcd, not yet broadcast.
    Stored,
    /// Broadcast, its receipt not yet seen.
    Broadcast,
    /// Mined and recorded in the outbox; the request's outcome is not yet recorded.
    Settled,
}

impl TxStep {
    /// Every step, in the order a send reaches them.
    pub const ALL: [Self; 4] = [Self::Reserving, Self::Stored, Self::Broadcast, Self::Settled];

    /// Its name: `reserving`, `stored`, `broadcast`, `settled`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Reserving => "reserving",
            Self::Stored => "stored",
            Self::Broadcast => "broadcast",
            Self::Settled => "settled",
        }
    }
}

impl std::str::FromStr for TxStep {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|step| step.name() == s).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|step| step.name()).collect();
            format!("`{s}` is not a transaction step; one of: {}", names.join(", "))
        })
    }
}

pub(crate) type TxObserver =
    Arc<dyn Fn(TxStep, u64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What `/br2k/status` says of the outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStatus {
    /// Each RPC endpoint's health, in the order reads prefer them.
    pub endpoints: Vec<EndpointHealth>,
    /// Settled transactions the finality checker found gone from the chain (the latest
    /// 100), and whether they are back.
    pub finality_violations: Vec<FinalityViolation>,
    /// Every finality violation found since the replica started.
    pub finality_violations_total: u64,
    /// Times a reorg dropped a mined, not yet deep enough transaction and the outbox
    /// broadcast it again.
    pub reorg_rebroadcasts: u64,
}

/// The chain side of the outbox, shared by every request of a replica.
pub(crate) struct Chain {
    config: OutboxConfig,
    endpoints: Endpoints,
    wallet: EthereumWallet,
    /// Read from the endpoint at the first send.
    chain_id: tokio::sync::OnceCell<u64>,
    /// Serializes nonce reservations of this leader (the fence orders them across leaders).
    reserving: Mutex<()>,
    observer: Option<TxObserver>,
    finality: std::sync::Mutex<finality::FinalityLog>,
    reorg_rebroadcasts: AtomicU64,
    /// Requests the operator asked to cancel: the settle loop signs their cancel.
    cancels: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl Chain {
    /// Clients of the configured endpoints (nothing is asked of them yet).
    pub(crate) fn new(config: OutboxConfig, observer: Option<TxObserver>) -> Result<Self, String> {
        if config.finality_check_every.is_zero() {
            return Err("the outbox's finality_check_every must be more than zero".into());
        }
        let endpoints = Endpoints::new(&config.rpc_urls, config.rpc_timeout)?;
        let wallet = EthereumWallet::from(config.signer.clone());
        Ok(Self {
            config,
            endpoints,
            wallet,
            chain_id: tokio::sync::OnceCell::new(),
            reserving: Mutex::new(()),
            observer,
            finality: std::sync::Mutex::default(),
            reorg_rebroadcasts: AtomicU64::new(0),
            cancels: std::sync::Mutex::default(),
        })
    }

    fn cancels(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.cancels.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The transactions of requests that are not settled (nor refused), oldest first.
    pub(crate) async fn unsettled(&self, store: &Store, keys: &Keys) -> Result<Vec<UnsettledTx>, String> {
        let records = store.values_in(&keys.outbox_start(), &keys.outbox_end()).await.map_err(|e| e.to_string())?;
        let cancels = self.cancels().clone();
        let mut found = Vec::new();
        for (key, value) in records {
            let Some((index, seq)) = keys.parse_outbox(&key) else { continue };
            let record: TxRecord = crate::codec::decode(&key, &value).map_err(|e| e.to_string())?;
            if record.settled.is_some() || record.refused.is_some() {
                continue;
            }
            let latest = record.attempts.last().map(|a| a.hash).unwrap_or_default();
            found.push(UnsettledTx {
                index,
                seq,
                nonce: record.nonce,
                to: record.call.to,
                value: record.call.value,
                attempts: record.attempts.len(),
                latest,
                broadcast: record.broadcast,
                cancel_signed: record.attempts.iter().any(|a| a.cancel),
                cancel_requested: cancels.contains(&index),
            });
        }
        Ok(found)
    }

    /// Asks this leader to cancel the unsettled transactions of the request at `index`:
    /// the next time its settle loop runs (within a second or so), it signs a zero-value
    /// transfer to the service's own address at the same nonce with higher fees, stores it
    /// (fenced) and broadcasts it. Whichever is mined first decides: the cancel, and the
    /// request is recorded failed ("cancelled by the operator"); the original, and it is
    /// recorded paid. The request is forgotten by a leader change before the cancel is
    /// stored: ask again.
    pub(crate) async fn request_cancel(
        &self,
        store: &Store,
        keys: &Keys,
        index: u64,
    ) -> Result<Vec<UnsettledTx>, CancelError> {
        let records = store
            .values_in(&keys.outbox(index, 0), &keys.outbox(index + 1, 0))
            .await
            .map_err(|e| CancelError::Store(e.to_string()))?;
        let mut unsettled = Vec::new();
        for (key, value) in records {
            let record: TxRecord = crate::codec::decode(&key, &value).map_err(|e| CancelError::Store(e.to_string()))?;
            if let Some(settled) = &record.settled
                && record.cancelled_by().is_none()
            {
                return Err(CancelError::Settled { index, hash: settled.hash, block: settled.block });
            }
            if record.settled.is_none() && record.refused.is_none() {
                unsettled.push(record);
            }
        }
        if unsettled.is_empty() {
            return Err(CancelError::NothingToCancel(index));
        }
        self.cancels().insert(index);
        warn!(index, "the operator asked to cancel this request's transaction");
        let listed = self.unsettled(store, keys).await.map_err(CancelError::Store)?;
        Ok(listed.into_iter().filter(|tx| tx.index == index).collect())
    }

    /// What `/br2k/status` shows of the outbox.
    pub(crate) fn status(&self) -> OutboxStatus {
        let finality = self.finality.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        OutboxStatus {
            endpoints: self.endpoints.health(),
            finality_violations: finality.violations.clone(),
            finality_violations_total: finality.total,
            reorg_rebroadcasts: self.reorg_rebroadcasts.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn sender(&self) -> Address {
        self.config.signer.address()
    }

    async fn observe(&self, step: TxStep, index: u64) {
        if let Some(observer) = &self.observer {
            observer(step, index).await;
        }
    }

    /// The chain's head block.
    async fn head(&self) -> Result<u64, RpcFailure> {
        self.endpoints.read("read the block number", |p| async move { p.get_block_number().await }).await
    }

    /// How many transactions of the service's key the chain has mined: the next nonce.
    async fn mined_nonces(&self) -> Result<u64, RpcFailure> {
        let sender = self.sender();
        self.endpoints.read("read the nonce", |p| async move { p.get_transaction_count(sender).latest().await }).await
    }

    /// The fees the chain asks now.
    async fn fees(&self) -> Result<alloy::eips::eip1559::Eip1559Estimation, RpcFailure> {
        self.endpoints.read("estimate the fees", |p| async move { p.estimate_eip1559_fees().await }).await
    }
}

/// A request's view of the outbox: what its handler sends transactions through
/// ([`crate::Request::outbox`]).
#[derive(Clone)]
pub struct Outbox {
    chain: Arc<Chain>,
    store: Store,
    keys: Keys,
    term: Term,
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

impl Chain {
    /// Broadcasts again every stored, unsettled transaction of the requests after `index`
    /// (errors ignored: "already known" is the usual answer). A leader that died between
    /// storing a later request's transaction and broadcasting it left its nonce unused;
    /// until it is mined, no transaction with a higher nonce can be, and the request at
    /// `index`, which the later ones wait for, would never settle.
    pub(crate) async fn rebroadcast_after(&self, store: &Store, keys: &Keys, index: u64) {
        let Ok(records) = store.values_in(&keys.outbox(index + 1, 0), &keys.outbox_end()).await else { return };
        for (key, value) in records {
            let Ok(record) = crate::codec::decode::<TxRecord>(&key, &value) else { continue };
            if record.settled.is_some() || record.refused.is_some() {
                continue;
            }
            if let Some(latest) = record.attempts.last()
                && self.endpoints.broadcast(&latest.raw).await.is_ok()
            {
                debug!(nonce = record.nonce, hash = %latest.hash, "broadcast a later request's stored transaction to fill its nonce");
            }
        }
    }
}

impl Outbox {
    pub(crate) fn new(chain: Arc<Chain>, store: Store, keys: Keys, term: Term, index: u64) -> Self {
        Self {
            chain,
            store,
            keys,
            term,
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
    pub(crate) fn leadership_lost(&self) -> bool {
        self.leadership_lost.load(Ordering::SeqCst)
    }

    /// Whether a send of this request ended in doubt (the runtime then records nothing).
    pub(crate) fn unsettled(&self) -> bool {
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

    async fn send_seq(&self, seq: u32, call: TxCall) -> Result<TxReceipt, TxError> {
        let key = self.keys.outbox(self.index, seq);
        let stored = self.store.get(&key).await.map_err(in_doubt)?;
        let (mut record, replayed) = match stored {
            Some(kv) => {
                let record: TxRecord = crate::codec::decode(kv.key(), kv.value()).map_err(in_doubt)?;
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
    async fn sign_and_store(&self, key: &str, call: TxCall) -> Result<TxRecord, TxError> {
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
        let free = self.store.indexes_under(&self.keys.outbox_free_prefix()).await.map_err(in_doubt)?;
        let reserved = self.store.get_index(&self.keys.outbox_next_nonce()).await.map_err(in_doubt)?;
        let (nonce, mut ops) = match free.iter().find(|&&n| n >= mined) {
            Some(&n) => (n, vec![Op::Delete(self.keys.outbox_free(n))]),
            None => {
                let n = reserved.max(mined);
                (n, vec![Op::counter(self.keys.outbox_next_nonce(), n + 1)])
            }
        };
        // Free nonces the chain has spent meanwhile are gone for good.
        ops.extend(free.iter().filter(|&&n| n < mined).map(|&n| Op::Delete(self.keys.outbox_free(n))));
        let attempt = self
            .sign(&call, nonce, gas_limit, fees.max_fee_per_gas, fees.max_priority_fee_per_gas)
            .await
            .map_err(TxError::Refused)?;
        let record = TxRecord { nonce, call, attempts: vec![attempt], settled: None, refused: None, broadcast: false };
        ops.push(Op::Put(key.to_owned(), crate::codec::encode(&record)));
        self.fenced(ops).await?;
        info!(index = self.index, nonce, hash = %record.attempts[0].hash, "transaction signed and stored");
        Ok(record)
    }

    async fn sign(
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
    async fn chain_id(&self) -> Result<u64, RpcFailure> {
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
    async fn settle(&self, key: &str, record: &mut TxRecord) -> Result<TxSettled, TxError> {
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
    fn cancel_call(&self) -> TxCall {
        TxCall { to: self.chain.sender(), value: U256::ZERO, input: Bytes::new(), gas_limit: Some(21_000) }
    }

    /// Signs the operator's cancel at the record's nonce, with fees above the latest
    /// version's by more than pools ask of a replacement (and at least what the chain asks
    /// now; the fee cap does not hold it back: the operator asked), and stores it before it
    /// is broadcast.
    async fn sign_cancel(&self, key: &str, record: &mut TxRecord) -> Result<(), TxError> {
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
    async fn mark_broadcast(&self, key: &str, record: &mut TxRecord) -> Result<(), TxError> {
        let mut marked = record.clone();
        marked.broadcast = true;
        self.store_record(key, &marked).await?;
        *record = marked;
        Ok(())
    }

    /// Stores `record` at `key` under this leader's fence.
    async fn store_record(&self, key: &str, record: &TxRecord) -> Result<(), TxError> {
        self.fenced(vec![Op::Put(key.to_owned(), crate::codec::encode(record))]).await
    }

    /// Writes `ops` under this leader's fence: a lost fence is [`TxError::LeadershipLost`],
    /// any other failure leaves the transaction in doubt.
    async fn fenced(&self, ops: Vec<Op>) -> Result<(), TxError> {
        match self.store.authority_write(&self.term, ops).await {
            Ok(_) => Ok(()),
            Err(Error::LeadershipLost { .. }) => Err(TxError::LeadershipLost),
            Err(e) => Err(in_doubt(e)),
        }
    }

    /// Marks a record refused and frees its nonce, in one fenced write.
    async fn refuse(&self, key: &str, record: &mut TxRecord, reason: &str) -> Result<(), TxError> {
        record.refused = Some(reason.to_owned());
        // Refused at its first broadcast: no pool ever took it.
        record.broadcast = false;
        let ops = vec![
            Op::Put(key.to_owned(), crate::codec::encode(&*record)),
            Op::Put(self.keys.outbox_free(record.nonce), Vec::new()),
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
    async fn mined(&self, record: &TxRecord) -> Result<Mined, String> {
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
    async fn nonce_spent(&self, nonce: u64) -> Option<bool> {
        let count = self.chain.mined_nonces().await.ok()?;
        Some(count > nonce)
    }

    /// Signs a replacement at the same nonce with fees a quarter higher (at least what the
    /// chain asks now, at most `max_fee_multiple` times the first version's), and stores it
    /// before it is broadcast. `false`: the fees are at the cap, nothing was replaced.
    async fn bump(&self, key: &str, record: &mut TxRecord) -> Result<bool, TxError> {
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
fn is_harmless(reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    ["already known", "already imported", "known transaction", "nonce too low", "underpriced", "replacement"]
        .iter()
        .any(|known| reason.contains(known))
}

fn in_doubt(error: impl std::fmt::Display) -> TxError {
    TxError::InDoubt(error.to_string())
}

fn receipt(record: &TxRecord, settled: &TxSettled, replayed: bool) -> TxReceipt {
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

/// What a client's own transaction must be for an External_TXN request to record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The contract (or recipient) it must have been sent to.
    pub to: Address,
    /// An event it must have emitted from `to` (its topic 0, e.g. `Transfer::SIGNATURE_HASH`),
    /// if any.
    pub event: Option<B256>,
    /// Blocks it must be under (1: mined).
    pub confirmations: u64,
}

/// A client's transaction as the chain holds it, verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedTx {
    /// Its hash.
    pub hash: B256,
    /// Who sent it.
    pub from: Address,
    /// Its block.
    pub block: u64,
    /// The logs `to` emitted in it with the expected event's topic (all of `to`'s logs
    /// when no event was asked for).
    pub logs: Vec<alloy::primitives::Log>,
}

/// Why a client's transaction is not recorded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// No receipt yet (unknown, or still in the pool): the client may try again later.
    #[error("transaction {0} is not mined yet (or unknown to the chain)")]
    NotMined(B256),
    /// Mined, but not yet under enough blocks.
    #[error("transaction {hash} is under {have} of the {need} blocks asked for; try again shortly")]
    Unconfirmed {
        /// The transaction.
        hash: B256,
        /// Blocks over it, its own included.
        have: u64,
        /// Blocks asked for.
        need: u64,
    },
    /// It reverted.
    #[error("transaction {0} reverted")]
    Reverted(B256),
    /// It went elsewhere.
    #[error("transaction {hash} was sent to {to:?}, not {expected}")]
    WrongRecipient {
        /// The transaction.
        hash: B256,
        /// Where it went (`None`: it created a contract).
        to: Option<Address>,
        /// Where it had to go.
        expected: Address,
    },
    /// The expected event is not among its logs.
    #[error("transaction {hash} emitted no event {event} from {contract}")]
    NoEvent {
        /// The transaction.
        hash: B256,
        /// The event's topic 0.
        event: B256,
        /// The contract that had to emit it.
        contract: Address,
    },
    /// The chain did not answer.
    #[error("the chain could not be asked about transaction {hash}: {reason}")]
    Unreachable {
        /// The transaction.
        hash: B256,
        /// What went wrong.
        reason: String,
    },
}

impl VerifyError {
    /// The HTTP status a handler answers with: 409 for "not yet" (try again), 422 for a
    /// transaction that will never qualify, 503 when the chain did not answer.
    pub const fn status(&self) -> u16 {
        match self {
            Self::NotMined(_) | Self::Unconfirmed { .. } => 409,
            Self::Unreachable { .. } => 503,
            Self::Reverted(_) | Self::WrongRecipient { .. } | Self::NoEvent { .. } => 422,
        }
    }
}

/// Checks clients' own transactions on chain for External_TXN requests
/// ([`crate::Request::verifier`]).
#[derive(Clone)]
pub struct Verifier {
    chain: Arc<Chain>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("rpc_url", &self.chain.endpoints.first_shown()).finish()
    }
}

impl Verifier {
    pub(crate) const fn new(chain: Arc<Chain>) -> Self {
        Self { chain }
    }

    /// Whether transaction `hash` is mined under `expected.confirmations` blocks,
    /// succeeded, went to `expected.to` and (if asked) emitted `expected.event` from it.
    ///
    /// # Errors
    /// [`VerifyError`], saying which check failed.
    pub async fn verify(&self, hash: B256, expected: &Expected) -> Result<VerifiedTx, VerifyError> {
        let unreachable = |failure: RpcFailure| VerifyError::Unreachable { hash, reason: failure.to_string() };
        let receipt = (self.chain.endpoints)
            .read("read a receipt", |p| async move { p.get_transaction_receipt(hash).await })
            .await
            .map_err(unreachable)?
            .ok_or(VerifyError::NotMined(hash))?;
        let block = receipt.block_number.ok_or(VerifyError::NotMined(hash))?;
        let head = self.chain.head().await.map_err(unreachable)?;
        let have = (head + 1).saturating_sub(block);
        if have < expected.confirmations {
            return Err(VerifyError::Unconfirmed { hash, have, need: expected.confirmations });
        }
        if !receipt.status() {
            return Err(VerifyError::Reverted(hash));
        }
        if receipt.to != Some(expected.to) {
            return Err(VerifyError::WrongRecipient { hash, to: receipt.to, expected: expected.to });
        }
        let logs: Vec<alloy::primitives::Log> = receipt
            .inner
            .logs()
            .iter()
            .filter(|log| log.address() == expected.to)
            .filter(|log| expected.event.is_none_or(|event| log.topics().first() == Some(&event)))
            .map(|log| log.inner.clone())
            .collect();
        if let Some(event) = expected.event
            && logs.is_empty()
        {
            return Err(VerifyError::NoEvent { hash, event, contract: expected.to });
        }
        Ok(VerifiedTx { hash, from: receipt.from, block, logs })
    }
}

#[cfg(test)]
mod tests {
    use alloy::signers::local::PrivateKeySigner;

    use super::*;

    #[test]
    fn the_outbox_config_never_prints_its_endpoints_key() {
        let config = OutboxConfig::new("https://eth.example.io/v3/0123456789abcdef", PrivateKeySigner::random());
        let printed = format!("{config:?}");
        assert!(printed.contains("https://eth.example.io") && !printed.contains("0123456789abcdef"), "{printed}");
    }
}
