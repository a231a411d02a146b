//! The transaction outbox (the `br2k-outbox` crate: nonces, stored signed transactions,
//! broadcast, bump, settle, finality, the on-chain verifier), with its records kept in this
//! runtime's etcd: `EtcdTxStore` is the storage trait's implementation, every write
//! fenced by the leader's term, so a stale leader can never reserve a nonce or store a
//! transaction.

pub use br2k_outbox::{
    CancelError, Chain, EndpointHealth, Expected, FinalityViolation, MemoryStore, Outbox, OutboxConfig, OutboxKeys,
    OutboxStatus, Records, StoreError, TxAttempt, TxCall, TxError, TxObserver, TxReceipt, TxRecord, TxSettled, TxStep,
    TxStore, UnsettledTx, VerifiedTx, Verifier, VerifyError, Write,
};
use futures::future::BoxFuture;

use crate::error::Error;
use crate::store::{Op, Store, Term};

/// The outbox's records in etcd. Reads go to the local member; writes are fenced by the
/// term, and without one (an operator's listing, the finality watch) nothing is written.
pub(crate) struct EtcdTxStore {
    store: Store,
    term: Option<Term>,
}

impl EtcdTxStore {
    /// Reads and fenced writes, for the requests of `term`.
    pub(crate) const fn fenced(store: Store, term: Term) -> Self {
        Self { store, term: Some(term) }
    }

    /// Reads only.
    pub(crate) const fn reading(store: Store) -> Self {
        Self { store, term: None }
    }
}

fn failed(error: &Error) -> StoreError {
    StoreError::Failed(error.to_string())
}

impl TxStore for EtcdTxStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        Box::pin(async move {
            let found = self.store.get(key).await.map_err(|e| failed(&e))?;
            Ok(found.map(|kv| kv.value().to_vec()))
        })
    }

    fn range<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, Result<Records, StoreError>> {
        Box::pin(async move {
            let found = self.store.values_in(from, to).await.map_err(|e| failed(&e))?;
            Ok(found.into_iter().map(|(key, value)| (String::from_utf8_lossy(&key).into_owned(), value)).collect())
        })
    }

    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let Some(term) = &self.term else {
                return Err(StoreError::Failed("this view of the outbox's records is read-only".into()));
            };
            let ops = writes
                .into_iter()
                .map(|write| match write {
                    Write::Put(key, value) => Op::Put(key, value),
                    Write::Delete(key) => Op::Delete(key),
                })
                .collect();
            match self.store.authority_write(term, ops).await {
                Ok(_) => Ok(()),
                Err(e) if e.ends_term() => Err(StoreError::Fenced),
                Err(e) => Err(failed(&e)),
            }
        })
    }
}
