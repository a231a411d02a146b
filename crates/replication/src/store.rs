//! The replica's access to its local etcd member: typed reads of the service's records,
//! fenced leader-authority writes, and the leader condition. Every call is bounded by a
//! timeout (etcd-client would otherwise wait on a paused member for ever).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse,
};
use tracing::warn;

use crate::data::{CompactedLog, EntryState, Keys, LeaderRecord, LogEntry, MemberRecord};
use crate::error::{Error, Result};
use crate::stats::Stats;

/// etcd's default `--max-txn-ops` is 128; stay below it with room for the counters.
pub(crate) const MAX_TXN_OPS: usize = 120;
/// etcd's default `--max-request-bytes` is 1.5 MiB; keep each transaction well under it.
pub(crate) const MAX_TXN_BYTES: usize = 1024 * 1024;
/// About how many bytes of log one read asks for: large entries make short pages, so a
/// follower or a Register never asks for more than etcd and the client will carry.
pub(crate) const READ_BUDGET: u64 = 2 * 1024 * 1024;
/// The largest answer a read accepts (etcd-client's default is 4 MiB; a single entry may
/// be 1.5 MiB, and a page is sized to [`READ_BUDGET`]).
const MAX_READ_BYTES: usize = 64 * 1024 * 1024;

/// Leadership as this replica took it: writes are fenced on `cl` still holding exactly
/// this value at exactly this revision.
#[derive(Clone, Debug)]
pub(crate) struct Term {
    pub(crate) cl_value: Vec<u8>,
    pub(crate) cl_revision: i64,
    pub(crate) epoch: u64,
}

/// One write of a leader-authority transaction.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Put(String, Vec<u8>),
    /// A put attached to a lease (late answers of requests left in doubt, which expire).
    PutLeased(String, Vec<u8>, i64),
    Delete(String),
    /// Deletes every key in `[from, to)`.
    DeleteRange(String, String),
}

impl Op {
    /// Sets a decimal counter (`ls`, `ssi`, `lpi/*`).
    pub(crate) fn counter(key: String, value: u64) -> Self {
        Self::Put(key, value.to_string().into_bytes())
    }

    fn size(&self) -> usize {
        match self {
            Self::Put(k, v) | Self::PutLeased(k, v, _) => k.len() + v.len(),
            Self::Delete(k) => k.len(),
            Self::DeleteRange(from, to) => from.len() + to.len(),
        }
    }

    fn into_txn_op(self) -> TxnOp {
        match self {
            Self::Put(k, v) => TxnOp::put(k, v, None),
            Self::PutLeased(k, v, lease) => TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease))),
            Self::Delete(k) => TxnOp::delete(k, None),
            Self::DeleteRange(from, to) => TxnOp::delete(from, Some(DeleteOptions::new().with_range(to))),
        }
    }
}

/// What the local member says of itself.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemberStatus {
    /// Whether it is the Raft leader (the paper's leader condition).
    pub(crate) leads: bool,
    /// Its database file's size, bytes.
    pub(crate) db_size: u64,
    /// The part of it in use (the rest is free pages left by compaction), bytes.
    pub(crate) db_size_in_use: u64,
    /// Its space quota, bytes, when the member reports it (etcd 3.6 and later; 0 otherwise).
    pub(crate) quota: u64,
    /// The errors it reports, among them raised alarms (`NOSPACE`, `CORRUPT`).
    pub(crate) alarms: Vec<String>,
    /// A learner: it receives the log but does not vote (a membership change adding it).
    pub(crate) learner: bool,
}

/// How a read is served.
#[derive(Clone, Copy, Debug)]
enum Read {
    /// After a quorum round (etcd's default): sees every write acknowledged before it.
    Linearizable,
    /// By the local member from what it has applied (etcd's serializable read).
    Local,
}

impl Read {
    fn options(self) -> GetOptions {
        match self {
            Self::Linearizable => GetOptions::new(),
            Self::Local => GetOptions::new().with_serializable(),
        }
    }
}

/// One entry of the log as read back: its state and, where it exists, its request.
#[derive(Clone, Debug)]
pub(crate) struct StoredEntry {
    pub(crate) index: u64,
    pub(crate) state: EntryState,
    pub(crate) request: LogEntry,
}

#[derive(Clone)]
pub(crate) struct Store {
    client: Client,
    /// A connection of its own for the leader condition, so that the check never queues
    /// behind large writes and reads on the main connection (HTTP/2 shares one TCP
    /// stream): a burst of large requests must not make a busy leader look dead.
    probe: Client,
    keys: Keys,
    endpoint: String,
    timeout: Duration,
    /// The average size of a log entry (request and state) in the last read, bytes.
    entry_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Every call counted and timed, by action.
    stats: std::sync::Arc<Stats>,
}

impl Store {
    /// A client for one member only: with several endpoints etcd-client keeps calling a
    /// dead member, and the leader condition must be asked of the local member anyway.
    pub(crate) async fn connect(
        endpoint: &str,
        keys: Keys,
        timeout: Duration,
        stats: Arc<Stats>,
        tls: Option<&crate::config::EtcdTls>,
    ) -> Result<Self> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        if let Some(tls) = tls {
            options = options.with_tls(tls.options()?);
        }
        let connect = || async {
            Client::connect([endpoint], Some(options.clone())).await.map_err(|e| Error::etcd(endpoint, "connect", e))
        };
        let (client, probe) = (connect().await?, connect().await?);
        Ok(Self {
            client,
            probe,
            keys,
            endpoint: endpoint.into(),
            timeout,
            entry_bytes: std::sync::Arc::new(1024.into()),
            stats,
        })
    }

    async fn bounded<T>(
        &self,
        action: &'static str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, call).await;
        self.stats.add_etcd(action, started.elapsed());
        match answer {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::etcd(&self.endpoint, action, e)),
            Err(_) => Err(Error::EtcdTimeout { endpoint: self.endpoint.clone(), action, timeout: self.timeout }),
        }
    }

    /// The paper's leader condition: the local member says it is the Raft leader.
    pub(crate) async fn leader_condition(&self) -> Result<bool> {
        Ok(self.member_status().await?.leads)
    }

    /// The local member's answer to `status`: whether it leads, its database, its alarms.
    pub(crate) async fn member_status(&self) -> Result<MemberStatus> {
        let mut client = self.probe.clone();
        let status = self.bounded("status", client.status()).await?;
        let member = status.header().map(etcd_client::ResponseHeader::member_id);
        Ok(MemberStatus {
            leads: member.is_some_and(|m| m != 0 && m == status.leader()),
            db_size: status.db_size().max(0).unsigned_abs(),
            db_size_in_use: status.raft_used_db_size().max(0).unsigned_abs(),
            quota: status.db_size_quota().max(0).unsigned_abs(),
            alarms: status.errors().iter().map(|e| e.trim().to_owned()).collect(),
            learner: status.is_learner(),
        })
    }

    /// The tallies this store's calls are counted in (shared with stores it opens).
    pub(crate) fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The local member's ID, and every member as it lists them.
    pub(crate) async fn cluster_members(&self) -> Result<(u64, Vec<crate::data::EtcdMember>)> {
        let mut client = self.probe.clone();
        let list = self.bounded("list members", client.member_list()).await?;
        let me = list.header().map_or(0, etcd_client::ResponseHeader::member_id);
        Ok((me, list.members().iter().map(crate::data::EtcdMember::from).collect()))
    }

    /// Hands the local member's Raft leadership to another voting member (the paper's
    /// leader condition moves with it), trying each until one takes it. Returns the new
    /// leader's member id, or `None` when there is no other member to take it.
    pub(crate) async fn hand_off_leadership(&self) -> Result<Option<u64>> {
        let mut client = self.client.clone();
        let status = self.bounded("status", client.status()).await?;
        let me = status.header().map_or(0, etcd_client::ResponseHeader::member_id);
        let members = self.bounded("list members", client.member_list()).await?;
        let mut refused = None;
        for member in members.members() {
            // A member that never started has no name yet and cannot lead.
            if member.id() == me || member.is_learner() || member.name().is_empty() {
                continue;
            }
            match self.bounded("move leadership", client.move_leader(member.id())).await {
                Ok(_) => return Ok(Some(member.id())),
                Err(e) => refused = Some(e),
            }
        }
        refused.map_or(Ok(None), Err)
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut client = self.client.clone();
        let mut response = self.bounded("get", client.get(key, None)).await?;
        Ok(response.take_kvs().into_iter().next())
    }

    /// A read served by the local member without a quorum round. Only for keys this
    /// replica wrote itself as leader, or that an earlier leader wrote before this
    /// replica's own `cl` write (which the member has applied by the time it answered).
    pub(crate) async fn get_local(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut client = self.client.clone();
        let mut response = self.bounded("get", client.get(key, Some(GetOptions::new().with_serializable()))).await?;
        Ok(response.take_kvs().into_iter().next())
    }

    /// The indexes under a `doubt/`-style prefix, in order.
    pub(crate) async fn indexes_under(&self, prefix: &str) -> Result<Vec<u64>> {
        let mut client = self.client.clone();
        let options = GetOptions::new().with_prefix().with_keys_only();
        let response = self.bounded("list", client.get(prefix, Some(options))).await?;
        response
            .kvs()
            .iter()
            .map(|kv| self.keys.index_of(kv.key()).ok_or_else(|| corrupt(kv, "not an index key")))
            .collect()
    }

    /// Every key and value in `[from, to)`, in key order.
    pub(crate) async fn values_in(&self, from: &str, to: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.values_in_page(from, to, 0).await
    }

    /// The first `limit` keys and values in `[from, to)` (all of them for 0), in key order.
    pub(crate) async fn values_in_page(&self, from: &str, to: &str, limit: i64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut client = self.client.clone();
        let options = GetOptions::new().with_range(to).with_limit(limit);
        let response = self.bounded("read a range", client.get(from, Some(options))).await?;
        Ok(response.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect())
    }

    /// A decimal counter; 0 when the key does not exist yet.
    pub(crate) async fn get_index(&self, key: &str) -> Result<u64> {
        match self.get(key).await? {
            Some(kv) => crate::codec::decode_index(kv.key(), kv.value()),
            None => Ok(0),
        }
    }

    pub(crate) async fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<()> {
        let mut client = self.client.clone();
        self.bounded("put", client.put(key, value, None)).await.map(drop)
    }

    pub(crate) async fn leader(&self) -> Result<Option<(LeaderRecord, i64)>> {
        match self.get(&self.keys.cl()).await? {
            Some(kv) => Ok(Some((crate::codec::decode(kv.key(), kv.value())?, kv.mod_revision()))),
            None => Ok(None),
        }
    }

    /// The entries from `from` on, up to `to` and within about [`READ_BUDGET`] bytes:
    /// `from..=last` for some `last <= to` (at least `from` itself when `from <= to`).
    /// Callers carry on from `last + 1`. How many entries fit is estimated from the sizes
    /// seen so far; a read the client still finds too large is halved and tried again.
    pub(crate) async fn entries(&self, from: u64, to: u64) -> Result<Vec<StoredEntry>> {
        self.entries_as(from, to, Read::Linearizable).await
    }

    /// [`Self::entries`] as the local member has them, without a quorum round: for a
    /// follower reading below an SSI it read from the same member (which applied every
    /// entry up to it first), where a lagging member only delays it.
    pub(crate) async fn entries_local(&self, from: u64, to: u64) -> Result<Vec<StoredEntry>> {
        self.entries_as(from, to, Read::Local).await
    }

    async fn entries_as(&self, from: u64, to: u64, read: Read) -> Result<Vec<StoredEntry>> {
        if from > to {
            return Ok(Vec::new());
        }
        let average = self.entry_bytes.load(std::sync::atomic::Ordering::Relaxed).max(1);
        let mut count = (READ_BUDGET / average).clamp(1, to - from + 1);
        loop {
            match self.read_entries(from, from + count - 1, read).await {
                Ok((entries, bytes)) => {
                    let average = bytes / entries.len().max(1) as u64;
                    self.entry_bytes.store(average.max(1), std::sync::atomic::Ordering::Relaxed);
                    return Ok(entries);
                }
                Err(e) if count > 1 && e.is_too_large() => count /= 2,
                Err(e) => return Err(e),
            }
        }
    }

    /// Entries `from..=to` (both logs and states, two range reads at one revision), and
    /// their size in bytes.
    async fn read_entries(&self, from: u64, to: u64, read: Read) -> Result<(Vec<StoredEntry>, u64)> {
        let range = |start: String, end: String| TxnOp::get(start, Some(read.options().with_range(end)));
        let txn = Txn::new().and_then(vec![
            range(self.keys.rs(from), self.keys.rs(to + 1)),
            range(self.keys.log(from), self.keys.log(to + 1)),
        ]);
        // etcd answers up to 2 GiB; etcd-client's default 4 MiB limit is lifted for reads.
        let mut reader = self.client.kv_client().max_decoding_message_size(MAX_READ_BYTES);
        let response = self.bounded("read log entries", reader.txn(txn)).await?;
        let mut gets = response.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (Some(states), Some(logs)) = (gets.next(), gets.next()) else {
            return Err(Error::EtcdAnswer {
                endpoint: self.endpoint.clone(),
                action: "read log entries",
                reason: "a transaction without its two range reads".into(),
            });
        };
        let mut bytes = 0u64;
        let mut requests = std::collections::BTreeMap::new();
        for kv in logs.kvs() {
            bytes += (kv.key().len() + kv.value().len()) as u64;
            let index = self.keys.index_of(kv.key()).ok_or_else(|| corrupt(kv, "not a log index"))?;
            requests.insert(index, crate::codec::decode::<LogEntry>(kv.key(), kv.value())?);
        }
        let mut out = Vec::with_capacity(requests.len());
        let mut expected = from;
        for kv in states.kvs() {
            bytes += (kv.key().len() + kv.value().len()) as u64;
            let index = self.keys.index_of(kv.key()).ok_or_else(|| corrupt(kv, "not a log index"))?;
            if index != expected {
                return Err(Error::MissingRecord { key: self.keys.rs(expected) });
            }
            let state = crate::codec::decode::<EntryState>(kv.key(), kv.value())?;
            let request = requests.remove(&index).ok_or_else(|| Error::MissingRecord { key: self.keys.log(index) })?;
            out.push(StoredEntry { index, state, request });
            expected += 1;
        }
        if expected <= to {
            return Err(Error::MissingRecord { key: self.keys.rs(expected) });
        }
        Ok((out, bytes))
    }

    /// Takes `cl` for `record` and returns the term it fences later writes on. The write
    /// is unconditional: etcd orders competing writes, and the loser's later fenced
    /// writes fail, so it steps down.
    pub(crate) async fn take_leadership(&self, record: &LeaderRecord, epoch_base: u64) -> Result<Term> {
        let value = crate::codec::encode(record);
        let mut client = self.client.clone();
        let response = self.bounded("take leadership", client.put(self.keys.cl(), value.clone(), None)).await?;
        let revision = response.header().map(etcd_client::ResponseHeader::revision).unwrap_or_default();
        if revision <= 0 {
            return Err(Error::EtcdAnswer {
                endpoint: self.endpoint.clone(),
                action: "take leadership",
                reason: "no revision".into(),
            });
        }
        Ok(Term { cl_value: value, cl_revision: revision, epoch: epoch_base + revision.unsigned_abs() })
    }

    /// The epoch base of this etcd data, recording `proposed` if none is recorded yet.
    pub(crate) async fn epoch_base(&self, proposed: impl Future<Output = u64>) -> Result<u64> {
        let key = self.keys.epoch_base();
        if let Some(kv) = self.get(&key).await? {
            return crate::codec::decode_index(kv.key(), kv.value());
        }
        let base = proposed.await;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.clone(), base.to_string(), None)]);
        let mut client = self.client.clone();
        self.bounded("record the epoch base", client.txn(txn)).await?;
        // Another replica may have recorded its own first; everyone uses the recorded one.
        match self.get(&key).await? {
            Some(kv) => crate::codec::decode_index(kv.key(), kv.value()),
            None => Err(Error::MissingRecord { key }),
        }
    }

    /// Whether this etcd holds no log at all (no LS, no compaction record): a new
    /// service, or one whose every member lost its data.
    pub(crate) async fn holds_no_log(&self) -> Result<bool> {
        Ok(self.get(&self.keys.ls()).await?.is_none() && self.get(&self.keys.compacted()).await?.is_none())
    }

    /// Seeds an etcd that holds no log with a service restored from a backup reaching
    /// `index`: the log starts after it (`compacted`), LS, SSI and `replica`'s LPI are it, and the
    /// terms go on from `terms`.
    /// Only if there is still no log (two Registers cannot both seed). Returns whether
    /// this call seeded it.
    pub(crate) async fn seed_restored(
        &self,
        index: u64,
        compacted: &CompactedLog,
        terms: u64,
        replica: &str,
    ) -> Result<bool> {
        let txn = Txn::new()
            .when(vec![
                Compare::create_revision(self.keys.ls(), CompareOp::Equal, 0),
                Compare::create_revision(self.keys.compacted(), CompareOp::Equal, 0),
            ])
            .and_then(vec![
                TxnOp::put(self.keys.compacted(), crate::codec::encode(compacted), None),
                TxnOp::put(self.keys.ls(), index.to_string(), None),
                TxnOp::put(self.keys.ssi(), index.to_string(), None),
                TxnOp::put(self.keys.lpi(replica), index.to_string(), None),
                TxnOp::put(self.keys.terms(), terms.to_string(), None),
            ]);
        let mut client = self.client.clone();
        Ok(self.bounded("seed the restored service", client.txn(txn)).await?.succeeded())
    }

    /// A leader-authority write: `ops` applied only if `cl` is still `term`'s, split into
    /// transactions that respect etcd's limits (the counters go last, in the last one).
    ///
    /// # Errors
    /// [`Error::LeadershipLost`] when the fence fails; etcd errors otherwise.
    pub(crate) async fn authority_write(&self, term: &Term, ops: Vec<Op>) -> Result<i64> {
        let mut revision = 0;
        for chunk in chunks(ops) {
            revision = self.authority_write_one(term, chunk).await?;
        }
        Ok(revision)
    }

    /// [`Self::authority_write`] that also writes `next_log` (a group's replicate write)
    /// in the last transaction when both fit etcd's limits, so that a busy leader records
    /// one group and logs the next in one round trip; else right after it.
    ///
    /// # Errors
    /// [`Error::LeadershipLost`] when the fence fails (nothing of the last transaction was
    /// written); etcd errors otherwise.
    pub(crate) async fn authority_write_carrying(&self, term: &Term, ops: Vec<Op>, next_log: Vec<Op>) -> Result<()> {
        let mut parts = chunks(ops);
        let last = parts.pop().expect("chunks are never empty");
        let bytes = |ops: &[Op]| ops.iter().map(Op::size).sum::<usize>();
        let fits = last.len() + next_log.len() <= MAX_TXN_OPS && bytes(&last) + bytes(&next_log) <= MAX_TXN_BYTES;
        parts.push(last);
        if fits {
            let mut last = parts.pop().expect("pushed");
            last.extend(next_log);
            parts.push(last);
        } else {
            parts.push(next_log);
        }
        for part in parts {
            self.authority_write_one(term, part).await?;
        }
        Ok(())
    }

    /// One fenced transaction of `ops` (the caller keeps it within etcd's limits).
    async fn authority_write_one(&self, term: &Term, ops: Vec<Op>) -> Result<i64> {
        let txn = Txn::new().when(self.fence(term)).and_then(ops.into_iter().map(Op::into_txn_op).collect::<Vec<_>>());
        let mut client = self.client.clone();
        let response = self.bounded("write as leader", client.txn(txn)).await?;
        if !response.succeeded() {
            return Err(Error::LeadershipLost { epoch: term.epoch });
        }
        Ok(response.header().map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// The conditions of a leader-authority write: `cl` is still `term`'s.
    fn fence(&self, term: &Term) -> Vec<Compare> {
        vec![
            Compare::value(self.keys.cl(), CompareOp::Equal, term.cl_value.clone()),
            Compare::mod_revision(self.keys.cl(), CompareOp::Equal, term.cl_revision),
        ]
    }

    pub(crate) async fn grant_lease(&self, ttl: Duration) -> Result<i64> {
        let mut client = self.client.clone();
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        Ok(self.bounded("grant a lease", client.lease_grant(ttl, None)).await?.id())
    }

    /// SSI and the compaction record, read together in one round trip, as the local
    /// member has them (no quorum round: a follower polls them after every group, and a
    /// lagging member only delays it).
    pub(crate) async fn progress_local(&self) -> Result<(u64, CompactedLog)> {
        let local = || Some(Read::Local.options());
        let txn =
            Txn::new().and_then(vec![TxnOp::get(self.keys.ssi(), local()), TxnOp::get(self.keys.compacted(), local())]);
        let mut client = self.client.clone();
        let response = self.bounded("read ssi", client.txn(txn)).await?;
        let mut values = response.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
            _ => None,
        });
        let ssi = match values.next().flatten() {
            Some(kv) => crate::codec::decode_index(kv.key(), kv.value())?,
            None => 0,
        };
        let compacted = match values.next().flatten() {
            Some(kv) => crate::codec::decode(kv.key(), kv.value())?,
            None => CompactedLog::default(),
        };
        Ok((ssi, compacted))
    }

    /// The compaction record (first index 0 when the log was never compacted).
    pub(crate) async fn compacted(&self) -> Result<CompactedLog> {
        match self.get(&self.keys.compacted()).await? {
            Some(kv) => crate::codec::decode(kv.key(), kv.value()),
            None => Ok(CompactedLog::default()),
        }
    }

    /// The live replicas' records (every replica whose lease is still renewed). A record
    /// that does not decode is left out, with a warning: it names no replica this runtime
    /// could fetch from or wait for, and a live replica rewrites its own record within a
    /// few seconds.
    pub(crate) async fn members(&self) -> Result<Vec<(String, MemberRecord)>> {
        let mut client = self.client.clone();
        let response = self
            .bounded("list members", client.get(self.keys.members_prefix(), Some(GetOptions::new().with_prefix())))
            .await?;
        let mut out = Vec::new();
        for kv in response.kvs() {
            let record = self
                .keys
                .member_of(kv.key())
                .ok_or_else(|| corrupt(kv, "not a member key"))
                .and_then(|replica| Ok((replica.to_owned(), crate::codec::decode(kv.key(), kv.value())?)));
            match record {
                Ok(record) => out.push(record),
                Err(e) => warn!(error = %e, "ignoring an unreadable membership record"),
            }
        }
        Ok(out)
    }

    /// The states of entries from `from` on, below `to`, within about [`READ_BUDGET`]
    /// bytes (no requests), for counting what compaction deletes. Callers carry on after
    /// the last one returned.
    pub(crate) async fn states(&self, from: u64, to: u64) -> Result<Vec<(u64, EntryState)>> {
        let average = self.entry_bytes.load(std::sync::atomic::Ordering::Relaxed).max(1);
        let mut count = (READ_BUDGET / average).clamp(1, to.saturating_sub(from).max(1));
        loop {
            let options = GetOptions::new().with_range(self.keys.rs(from + count));
            let mut reader = self.client.kv_client().max_decoding_message_size(MAX_READ_BYTES);
            match self.bounded("read entry states", reader.get(self.keys.rs(from), Some(options))).await {
                Ok(response) => {
                    return response
                        .kvs()
                        .iter()
                        .map(|kv| {
                            let index = self.keys.index_of(kv.key()).ok_or_else(|| corrupt(kv, "not a log index"))?;
                            Ok((index, crate::codec::decode(kv.key(), kv.value())?))
                        })
                        .collect();
                }
                Err(e) if count > 1 && e.is_too_large() => count /= 2,
                Err(e) => return Err(e),
            }
        }
    }

    /// A put attached to `lease` (not a leader-authority write: each replica writes its own
    /// record).
    pub(crate) async fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<()> {
        let mut client = self.client.clone();
        self.bounded("put", client.put(key, value, Some(PutOptions::new().with_lease(lease)))).await.map(drop)
    }

    /// Renews `lease` once; `false` when etcd says it has expired.
    pub(crate) async fn renew(&self, lease: i64) -> Result<bool> {
        let mut client = self.client.clone();
        let (mut keeper, mut answers) = self.bounded("renew a lease", client.lease_keep_alive(lease)).await?;
        self.bounded("renew a lease", keeper.keep_alive()).await?;
        let answer = self.bounded("renew a lease", answers.message()).await?;
        Ok(answer.is_some_and(|a| a.ttl() > 0))
    }

    /// The secret replicas show each other to fetch snapshots, made by the first replica
    /// that asks.
    pub(crate) async fn peer_token(&self, proposed: &str) -> Result<String> {
        let key = self.keys.peer_token();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.clone(), proposed, None)])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let mut client = self.client.clone();
        let response = self.bounded("read the peer token", client.txn(txn)).await?;
        if response.succeeded() {
            return Ok(proposed.to_owned());
        }
        let stored = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next(),
            _ => None,
        });
        match stored {
            Some(kv) if !kv.value().is_empty() => Ok(String::from_utf8_lossy(kv.value()).into_owned()),
            _ => Err(Error::MissingRecord { key }),
        }
    }

    /// Compacts etcd's history up to `revision`: older versions of every key are dropped
    /// and their space reused. Already compacted further is fine.
    pub(crate) async fn compact_history(&self, revision: i64) -> Result<()> {
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.compact(revision, Some(CompactionOptions::new()))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if crate::error::EtcdFailure::of(&e) == crate::error::EtcdFailure::Compacted => Ok(()),
            Ok(Err(e)) => Err(Error::etcd(&self.endpoint, "compact history", e)),
            Err(_) => Err(Error::EtcdTimeout {
                endpoint: self.endpoint.clone(),
                action: "compact history",
                timeout: self.timeout,
            }),
        }
    }

    /// Two watches: the log's range up to SSI ([`Keys::feed_range`], for the follower's
    /// [`crate::feed::Feed`]), and `cl`.
    pub(crate) async fn watch_changes(&self) -> Result<(etcd_client::WatchStream, etcd_client::WatchStream)> {
        let mut client = self.client.clone();
        let (from, to) = self.keys.feed_range();
        let options = etcd_client::WatchOptions::new().with_range(to);
        let log = self.bounded("watch the log", client.watch(from, Some(options))).await?;
        let cl = self.bounded("watch cl", client.watch(self.keys.cl(), None)).await?;
        Ok((log, cl))
    }
}

fn corrupt(kv: &KeyValue, reason: &str) -> Error {
    Error::CorruptRecord { key: String::from_utf8_lossy(kv.key()).into_owned(), reason: reason.into() }
}

/// Splits puts into groups under etcd's op-count and size limits, keeping their order.
fn chunks(ops: Vec<Op>) -> Vec<Vec<Op>> {
    let mut out = vec![Vec::new()];
    let mut bytes = 0;
    for op in ops {
        let size = op.size();
        let current = out.last_mut().expect("never empty");
        if !current.is_empty() && (current.len() == MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES) {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        out.last_mut().expect("never empty").push(op);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_limits_and_order() {
        let ops: Vec<_> = (0..250).map(|i| Op::Put(format!("k{i}"), vec![0; 10])).collect();
        let parts = chunks(ops);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![120, 120, 10]);
        assert!(matches!(&parts[2][9], Op::Put(k, _) if k == "k249"));
        let big: Vec<_> = (0..3).map(|i| Op::Put(format!("k{i}"), vec![0; MAX_TXN_BYTES / 2])).collect();
        assert_eq!(chunks(big).len(), 3);
    }
}
