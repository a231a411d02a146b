//! The chain side of the outbox, shared by every request of a replica: endpoints, the
//! key, the nonce lock, the finality log, operators' cancels.

use std::sync::atomic::{AtomicU64, Ordering};

use alloy::network::EthereumWallet;
use alloy::primitives::Address;
use alloy::providers::Provider;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::config::OutboxConfig;
use crate::endpoints::{Endpoints, RpcFailure};
use crate::keys::OutboxKeys;
use crate::records::*;
use crate::store::{TxStore, decode};

/// The chain side of the outbox, shared by every request of a replica.
pub struct Chain {
    pub(crate) config: OutboxConfig,
    pub(crate) keys: OutboxKeys,
    pub(crate) endpoints: Endpoints,
    pub(crate) wallet: EthereumWallet,
    /// Read from the endpoint at the first send.
    pub(crate) chain_id: tokio::sync::OnceCell<u64>,
    /// Serializes nonce reservations of this leader (the fence orders them across leaders).
    pub(crate) reserving: Mutex<()>,
    pub(crate) observer: Option<TxObserver>,
    pub(crate) finality: std::sync::Mutex<crate::finality::FinalityLog>,
    pub(crate) reorg_rebroadcasts: AtomicU64,
    /// Requests the operator asked to cancel: the settle loop signs their cancel.
    pub(crate) cancels: std::sync::Mutex<std::collections::BTreeSet<u64>>,
}

impl Chain {
    /// Clients of the configured endpoints (nothing is asked of them yet).
    pub fn new(config: OutboxConfig, keys: OutboxKeys, observer: Option<TxObserver>) -> Result<Self, String> {
        if config.finality_check_every.is_zero() {
            return Err("the outbox's finality_check_every must be more than zero".into());
        }
        let endpoints = Endpoints::new(&config.rpc_urls, config.rpc_timeout)?;
        let wallet = EthereumWallet::from(config.signer.clone());
        Ok(Self {
            config,
            keys,
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

    pub(crate) fn cancels(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
        self.cancels.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The transactions of requests that are not settled (nor refused), oldest first.
    pub async fn unsettled(&self, store: &dyn TxStore) -> Result<Vec<UnsettledTx>, String> {
        let keys = &self.keys;
        let records = store.range(&keys.tx_start(), &keys.tx_end()).await.map_err(|e| e.to_string())?;
        let cancels = self.cancels().clone();
        let mut found = Vec::new();
        for (key, value) in records {
            let Some((index, seq)) = keys.parse_tx(&key) else { continue };
            let record: TxRecord = decode(&key, &value).map_err(|e| e.to_string())?;
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
    pub async fn request_cancel(&self, store: &dyn TxStore, index: u64) -> Result<Vec<UnsettledTx>, CancelError> {
        let keys = &self.keys;
        let records = store
            .range(&keys.tx(index, 0), &keys.tx(index + 1, 0))
            .await
            .map_err(|e| CancelError::Store(e.to_string()))?;
        let mut unsettled = Vec::new();
        for (key, value) in records {
            let record: TxRecord = decode(&key, &value).map_err(|e| CancelError::Store(e.to_string()))?;
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
        let listed = self.unsettled(store).await.map_err(CancelError::Store)?;
        Ok(listed.into_iter().filter(|tx| tx.index == index).collect())
    }

    /// What `/br2k/status` shows of the outbox.
    pub fn status(&self) -> OutboxStatus {
        let finality = self.finality.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        OutboxStatus {
            endpoints: self.endpoints.health(),
            finality_violations: finality.violations.clone(),
            finality_violations_total: finality.total,
            reorg_rebroadcasts: self.reorg_rebroadcasts.load(Ordering::Relaxed),
        }
    }

    /// The service's transaction address.
    pub fn sender(&self) -> Address {
        self.config.signer.address()
    }

    pub(crate) async fn observe(&self, step: TxStep, index: u64) {
        if let Some(observer) = &self.observer {
            observer(step, index).await;
        }
    }

    /// The chain's head block.
    pub(crate) async fn head(&self) -> Result<u64, RpcFailure> {
        self.endpoints.read("read the block number", |p| async move { p.get_block_number().await }).await
    }

    /// How many transactions of the service's key the chain has mined: the next nonce.
    pub(crate) async fn mined_nonces(&self) -> Result<u64, RpcFailure> {
        let sender = self.sender();
        self.endpoints.read("read the nonce", |p| async move { p.get_transaction_count(sender).latest().await }).await
    }

    /// The fees the chain asks now.
    pub(crate) async fn fees(&self) -> Result<alloy::eips::eip1559::Eip1559Estimation, RpcFailure> {
        self.endpoints.read("estimate the fees", |p| async move { p.estimate_eip1559_fees().await }).await
    }
}

impl Chain {
    /// Broadcasts again every stored, unsettled transaction of the requests after `index`
    /// (errors ignored: "already known" is the usual answer). A leader that died between
    /// storing a later request's transaction and broadcasting it left its nonce unused;
    /// until it is mined, no transaction with a higher nonce can be, and the request at
    /// `index`, which the later ones wait for, would never settle.
    pub async fn rebroadcast_after(&self, store: &dyn TxStore, index: u64) {
        let keys = &self.keys;
        let Ok(records) = store.range(&keys.tx(index + 1, 0), &keys.tx_end()).await else { return };
        for (key, value) in records {
            let Ok(record) = decode::<TxRecord>(&key, &value) else { continue };
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
