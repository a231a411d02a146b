//! What the outbox stores and answers: the calls handlers ask for, the records of their
//! transactions, receipts, errors, the steps tests observe, and the status it shows.

use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes, U256};
use serde::{Deserialize, Serialize};

use crate::endpoints::EndpointHealth;
use crate::finality::FinalityViolation;

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
    pub(crate) fn cancel_reason(&self) -> Option<String> {
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

/// Awaited at each step of a transaction (tests use it to stop a leader between steps).
pub type TxObserver = Arc<dyn Fn(TxStep, u64) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

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
