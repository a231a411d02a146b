//! Where the outbox keeps its records: a storage trait the service's runtime implements
//! over its replicated store (br2k's runtime: etcd, every write fenced by the leader's
//! term), the way Chainlink's transaction manager sits over its `TxStore`. The state
//! machine above it never knows which store it runs on; [`MemoryStore`] runs it in memory.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;

/// Records as a range read returns them: each key with its value, in key order.
pub type Records = Vec<(String, Vec<u8>)>;

/// One change to the outbox's records; a list of them is written atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Sets `key` to the bytes.
    Put(String, Vec<u8>),
    /// Removes `key`.
    Delete(String),
}

impl Write {
    /// Sets `key` to the decimal `value` (the outbox's counters).
    pub fn counter(key: String, value: u64) -> Self {
        Self::Put(key, value.to_string().into_bytes())
    }
}

/// Why the store did not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The write's fence failed: this replica no longer leads, another one does. Nothing of
    /// the write happened.
    #[error("leadership lost: the write's fence no longer holds")]
    Fenced,
    /// The store could not be read or written (unreachable, timed out, refused).
    #[error("{0}")]
    Failed(String),
}

/// The records of one service's outbox, in a store every replica shares.
///
/// Reads may be served by any replica's view; [`TxStore::write`] must be atomic and must
/// fail with [`StoreError::Fenced`] once the writer no longer leads: that is what makes a
/// nonce reserved at most once, and a stale leader's transaction never stored.
pub trait TxStore: Send + Sync {
    /// The value at `key`.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>>;
    /// Every key in `from..to` (byte order) with its value, in key order.
    fn range<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, Result<Records, StoreError>>;
    /// Applies `writes` atomically, under the leader's fence.
    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// A [`TxStore`] in memory, for tests of the state machine and of apps' handlers: one
/// leader, whose fence holds until [`MemoryStore::lose_leadership`].
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<String, Vec<u8>>>,
    fenced: AtomicBool,
}

impl MemoryStore {
    /// Every later write fails as a stale leader's would.
    pub fn lose_leadership(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    /// A copy of every record (for assertions).
    pub fn records(&self) -> BTreeMap<String, Vec<u8>> {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl TxStore for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StoreError>> {
        let value = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned();
        Box::pin(async move { Ok(value) })
    }

    fn range<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, Result<Records, StoreError>> {
        let records = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = records.range(from.to_owned()..to.to_owned()).map(|(k, v)| (k.clone(), v.clone())).collect();
        Box::pin(async move { Ok(found) })
    }

    fn write(&self, writes: Vec<Write>) -> BoxFuture<'_, Result<(), StoreError>> {
        let result = if self.fenced.load(Ordering::SeqCst) {
            Err(StoreError::Fenced)
        } else {
            let mut records = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for write in writes {
                match write {
                    Write::Put(key, value) => records.insert(key, value),
                    Write::Delete(key) => records.remove(&key),
                };
            }
            Ok(())
        };
        Box::pin(async move { result })
    }
}

/// Reads the decimal counter at `key` (0 when absent).
pub(crate) async fn get_counter(store: &dyn TxStore, key: &str) -> Result<u64, StoreError> {
    match store.get(key).await? {
        None => Ok(0),
        Some(bytes) => std::str::from_utf8(&bytes).ok().and_then(|text| text.parse().ok()).ok_or_else(|| {
            StoreError::Failed(format!("{key} holds {:?}, not a decimal counter", String::from_utf8_lossy(&bytes)))
        }),
    }
}

/// Decodes a JSON record, naming its key when it does not decode.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Failed(format!("undecodable record at {key}: {e}")))
}

/// Encodes a record as JSON.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}
