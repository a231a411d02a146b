//! Checking a client's own transaction on chain before its request is recorded
//! (External_TXN requests).

use std::sync::Arc;

use alloy::primitives::{Address, B256};
use alloy::providers::Provider;

use crate::chain::Chain;
use crate::endpoints::RpcFailure;

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
/// (`br2k_replication::Request::verifier`).
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
    /// A checker reading through `chain`'s endpoints.
    pub const fn new(chain: Arc<Chain>) -> Self {
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
