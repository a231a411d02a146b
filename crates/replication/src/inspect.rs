//! Read-only access to a service's records in etcd, for tools that check a run after the
//! fact (the testbed's checker, operators): every log entry still in etcd with its state,
//! the counters, what compaction deleted, and how many leadership terms there were.
//! Nothing here writes.

use std::time::Duration;

use crate::data::{CompactedLog, EntryState, Keys, LogEntry};
use crate::error::{Error, Result};
use crate::store::Store;

/// One index of the log: its state and the request stored under it.
#[derive(Clone, Debug)]
pub struct InspectedEntry {
    /// The log index.
    pub index: u64,
    /// Its RS record.
    pub state: EntryState,
    /// The request (RLE).
    pub request: LogEntry,
}

/// Everything a checker needs from etcd.
#[derive(Clone, Debug)]
pub struct Records {
    /// LS: the highest index stored.
    pub log_size: u64,
    /// SSI: the highest index whose outcome is final.
    pub service_state_index: u64,
    /// Where the log starts after compaction, and what the deleted entries were
    /// (`first_index` 0 when it was never compacted).
    pub compacted: CompactedLog,
    /// The entries still in etcd (`first_index..=log_size`), in order.
    pub entries: Vec<InspectedEntry>,
    /// Leadership terms started (each Register counts itself before preparing).
    pub terms: u64,
}

/// Reads `service`'s records through the etcd member at `endpoint`, every call bounded by
/// `timeout`; an etcd that cannot answer yet (a leader election after a partition heals)
/// is asked again until `timeout` has passed once more.
///
/// # Errors
/// When etcd cannot be reached, or a record is missing or does not decode.
pub async fn read_records(endpoint: &str, service: &str, timeout: Duration) -> Result<Records> {
    read_records_with(endpoint, service, timeout, None).await
}

/// [`read_records`] from a member that asks for TLS (`tls`: the files a replica uses).
///
/// # Errors
/// As [`read_records`], and a TLS file that cannot be read.
pub async fn read_records_with(
    endpoint: &str,
    service: &str,
    timeout: Duration,
    tls: Option<&crate::config::EtcdTls>,
) -> Result<Records> {
    crate::codec::check_name("service", service)?;
    let keys = Keys::new(service);
    let store = Store::connect(endpoint, keys.clone(), timeout, std::sync::Arc::default(), tls).await?;
    // The leader may compact between the reads: a missing entry means reading again.
    // And a cluster that was just healed may still be electing its leader ("etcdserver:
    // leader changed"): such an answer means asking again, for up to `timeout` more.
    let mut attempts = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match read_once(&store, &keys).await {
            Err(Error::MissingRecord { .. }) if attempts < 3 => attempts += 1,
            Err(e) if e.is_etcd_unavailable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            result => return result,
        }
    }
}

async fn read_once(store: &Store, keys: &Keys) -> Result<Records> {
    let log_size = store.get_index(&keys.ls()).await?;
    let service_state_index = store.get_index(&keys.ssi()).await?;
    let compacted = store.compacted().await?;
    let terms = store.get_index(&keys.terms()).await?;
    let mut entries = Vec::new();
    let mut from = compacted.first_index.max(1);
    while from <= log_size {
        let page = store.entries(from, log_size).await?;
        from = page.last().map_or(log_size, |e| e.index) + 1;
        entries.extend(page.into_iter().map(|e| InspectedEntry { index: e.index, state: e.state, request: e.request }));
    }
    Ok(Records { log_size, service_state_index, compacted, entries, terms })
}

/// How far the service, and one replica, have got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// SSI: the highest index whose outcome is final (0 for a service with no log yet).
    pub service_state_index: u64,
    /// The replica's LPI: the highest index it has processed (0 when it has recorded none).
    pub processed: u64,
}

/// Reads SSI and `replica`'s LPI through the etcd member at `endpoint` (a membership change
/// waits with them for a new replica to catch up before it becomes a voter).
///
/// # Errors
/// When etcd cannot be reached, or a record does not decode.
pub async fn read_progress(
    endpoint: &str,
    service: &str,
    replica: &str,
    timeout: Duration,
    tls: Option<&crate::config::EtcdTls>,
) -> Result<Progress> {
    crate::codec::check_name("service", service)?;
    crate::codec::check_name("replica", replica)?;
    let keys = Keys::new(service);
    let store = Store::connect(endpoint, keys.clone(), timeout, std::sync::Arc::default(), tls).await?;
    Ok(Progress {
        service_state_index: store.get_index(&keys.ssi()).await?,
        processed: store.get_index(&keys.lpi(replica)).await?,
    })
}
