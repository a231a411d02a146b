//! Read-only access to a service's records in etcd, for tools that check a run after the
//! fact (the testbed's checker, operators): every log entry with its state, the counters,
//! and the history of leadership takeovers. Nothing here writes.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, WatchOptions};

use crate::data::{self, EntryState, Keys, LeaderRecord, LogEntry};
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

/// One takeover of `cl`: who became leader, and at which etcd revision.
#[derive(Clone, Debug)]
pub struct Takeover {
    /// The new leader.
    pub leader: LeaderRecord,
    /// The etcd revision of the `cl` write (the epoch is the service's base plus this).
    pub revision: i64,
}

/// Everything a checker needs from etcd.
#[derive(Clone, Debug)]
pub struct Records {
    /// LS: the highest index stored.
    pub log_size: u64,
    /// SSI: the highest index whose outcome is final.
    pub service_state_index: u64,
    /// Entries `1..=log_size`, in order.
    pub entries: Vec<InspectedEntry>,
    /// Every write of `cl` still in etcd's history, oldest first.
    pub takeovers: Vec<Takeover>,
}

/// How many entries one read asks for (two range reads in one transaction).
const PAGE: u64 = 1000;

/// Reads `service`'s records through the etcd member at `endpoint`, every call bounded by
/// `timeout`.
///
/// # Errors
/// When etcd cannot be reached, a record is missing or does not decode, or the history
/// of `cl` has been compacted away.
pub async fn read_records(endpoint: &str, service: &str, timeout: Duration) -> Result<Records> {
    data::check_name("service", service)?;
    let keys = Keys::new(service);
    let store = Store::connect(endpoint, keys.clone(), timeout).await?;
    let log_size = store.get_index(&keys.ls()).await?;
    let service_state_index = store.get_index(&keys.ssi()).await?;
    let mut entries = Vec::new();
    let mut from = 1;
    while from <= log_size {
        let to = (from + PAGE - 1).min(log_size);
        entries.extend(store.entries(from, to).await?.into_iter().map(|e| InspectedEntry {
            index: e.index,
            state: e.state,
            request: e.request,
        }));
        from = to + 1;
    }
    let takeovers = takeovers(endpoint, &keys.cl(), timeout).await?;
    Ok(Records { log_size, service_state_index, entries, takeovers })
}

/// The history of `cl`, replayed by a watch from revision 1 up to its latest write.
async fn takeovers(endpoint: &str, cl: &str, timeout: Duration) -> Result<Vec<Takeover>> {
    let fail = |action: &'static str, e: &etcd_client::Error| Error::etcd(endpoint, action, e);
    let late = |action: &'static str| Error::EtcdTimeout { endpoint: endpoint.into(), action, timeout };
    let options = ConnectOptions::new().with_connect_timeout(timeout).with_timeout(timeout);
    let mut client = Client::connect([endpoint], Some(options)).await.map_err(|e| fail("connect", &e))?;
    let latest = tokio::time::timeout(timeout, client.get(cl, None))
        .await
        .map_err(|_| late("read cl"))?
        .map_err(|e| fail("read cl", &e))?;
    let Some(last) = latest.kvs().first().map(etcd_client::KeyValue::mod_revision) else {
        return Ok(Vec::new()); // nobody has led yet
    };
    let mut stream = tokio::time::timeout(timeout, client.watch(cl, Some(WatchOptions::new().with_start_revision(1))))
        .await
        .map_err(|_| late("watch cl"))?
        .map_err(|e| fail("watch cl", &e))?;
    let mut out = Vec::new();
    'replay: loop {
        let message = tokio::time::timeout(timeout, stream.message())
            .await
            .map_err(|_| late("replay the history of cl"))?
            .map_err(|e| fail("replay the history of cl", &e))?;
        let Some(message) = message else { break };
        if message.compact_revision() > 0 {
            return Err(Error::Etcd {
                endpoint: endpoint.into(),
                action: "replay the history of cl",
                reason: format!("etcd compacted its history up to revision {}", message.compact_revision()),
            });
        }
        for event in message.events() {
            let Some(kv) = event.kv() else { continue };
            if event.event_type() == EventType::Put {
                out.push(Takeover { leader: data::decode(kv.key(), kv.value())?, revision: kv.mod_revision() });
            }
            if kv.mod_revision() >= last {
                break 'replay;
            }
        }
    }
    // Dropping the stream cancels the watch.
    Ok(out)
}
