//! The idempotency table: which `Idempotency-Key` was logged at which index, for which
//! request, and what it was answered. It lives in the replicated state, the way the Raft
//! dissertation keeps client sessions (section 6.3), not in a key per request in etcd:
//!
//! - **built from the log, in log order.** Every replica applies each entry it passes
//!   ([`IdempotencyTable::apply`]): a keyed entry whose outcome is final adds its record
//!   with the recorded answer; one left in doubt adds its record without one (the leader
//!   reads its state from etcd when a retry comes, see [`crate::leader`]); an ignored one
//!   adds nothing. So every replica holds the same table at the same index.
//! - **expired deterministically.** The leader stamps each keyed entry with the time it
//!   logged it and the index below which records are dropped ([`Stamp`]), computed from its
//!   own table, its retention and its byte cap ([`IdempotencyTable::stamp`]). Replicas obey
//!   the stamp and never read their own clock, so they drop the same records at the same
//!   index whatever their configuration says.
//! - **durable with the replica's snapshots.** A snapshot carries the table as it was at
//!   the snapshot's index ([`IdempotencyTable::encode`]), so catch-up, restores from
//!   backup and a restarted replica all start from it and replay the retained log. A
//!   replica reports as its LPI no more than its latest snapshot's index, so compaction
//!   keeps every entry its table may need to replay after a crash.
//!
//! What etcd still holds per key: nothing while a request is logged and answered in the
//! usual way. Only a request a dead leader left in doubt, and that a later leader settled
//! after every replica had passed its entry, gets a leased `idem/<key>` record with its
//! answer (its table record has none); that happens only after a leader crash, and the
//! record expires with the retention.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::data::Stamp;
use crate::data::{EntryState, LogEntry, ProcessState, RequestKind, StoredReply};

/// A SHA-256 of a request's method, path, query and body (see [`fingerprint`]).
pub(crate) type Fingerprint = [u8; 32];

/// The path of the entry a leader logs to move idempotency records of an older format
/// (one `idem/<key>` record in etcd per request) into the table. Its kind is
/// External_TXN, whose entries are logged and never executed, and `/br2k/` paths are never
/// an app's route, so no app sees it.
pub(crate) const IMPORT_PATH: &str = "/br2k/idempotency/import";

/// One record carried by an import entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Imported {
    pub(crate) key: String,
    pub(crate) index: u64,
    /// Hex, as the older records hold it.
    pub(crate) fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) response: Option<StoredReply>,
}

/// What the table knows of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableRecord {
    /// The index its request was logged at.
    pub(crate) index: u64,
    /// When the leader logged it (milliseconds since the Unix epoch).
    pub(crate) at: u64,
    pub(crate) fingerprint: Fingerprint,
    /// The recorded answer; `None` while the request is in doubt.
    pub(crate) answer: Option<Arc<StoredReply>>,
}

/// What a record costs in memory beyond its key's and answer's bytes: the two maps'
/// entries, the index, the time, the fingerprint, and the allocations of the key, the
/// answer and its content type. Measured: 500,000 records of the soak's shape (an 11-byte
/// key, a 40-byte JSON answer) grew a process by 416 bytes each, so that the byte cap
/// bounds the memory the table really takes.
const RECORD_OVERHEAD: u64 = 304;

impl TableRecord {
    /// A hash of the record and its key: the table's digest is the XOR of its records',
    /// so adding and dropping one is cheap and two tables with the same records match.
    fn hash(&self, key: &str) -> u128 {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        hash.update((key.len() as u64).to_be_bytes());
        hash.update(key);
        hash.update(self.index.to_be_bytes());
        hash.update(self.at.to_be_bytes());
        hash.update(self.fingerprint);
        if let Some(answer) = &self.answer {
            hash.update(answer.status.to_be_bytes());
            hash.update(answer.content_type.as_deref().unwrap_or("").as_bytes());
            hash.update(&answer.body);
        }
        let digest: [u8; 32] = hash.finalize().into();
        u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
    }

    fn bytes(&self, key: &str) -> u64 {
        let answer = self.answer.as_ref().map_or(0, |a| {
            a.body.len() + a.content_type.as_ref().map_or(0, String::len) + std::mem::size_of::<StoredReply>()
        });
        RECORD_OVERHEAD + key.len() as u64 + answer as u64
    }
}

/// The table's figures, for the status, metrics and the dashboard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStatus {
    /// Keys held.
    pub records: u64,
    /// What they take, bytes (keys, answers and bookkeeping).
    pub bytes: u64,
    /// When the oldest key held was logged (milliseconds since the Unix epoch): a retry of
    /// any key logged since is answered from its record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_at: Option<u64>,
    /// The log index the table has applied.
    pub applied: u64,
    /// Records below this index have been dropped.
    pub keep_from: u64,
    /// Records dropped since this replica started, by age or by the byte cap.
    pub evicted: u64,
    /// A digest of every record held (hex): two replicas' tables at the same `applied`
    /// index hold the same records exactly when their digests match.
    #[serde(default)]
    pub digest: String,
}

#[derive(Default)]
struct Table {
    by_key: HashMap<Arc<str>, TableRecord>,
    /// Oldest first: what eviction walks.
    by_index: BTreeMap<u64, Arc<str>>,
    bytes: u64,
    /// The XOR of the records' hashes ([`TableRecord::hash`]).
    digest: u128,
    applied: u64,
    keep_from: u64,
    evicted: u64,
}

impl Table {
    fn insert(&mut self, key: &str, record: TableRecord) {
        self.remove(key);
        let key: Arc<str> = Arc::from(key);
        self.bytes += record.bytes(&key);
        self.digest ^= record.hash(&key);
        if let Some(other) = self.by_index.insert(record.index, key.clone()) {
            // One entry carries one key; an import may name an index the log also gave.
            self.remove_record(&other);
            self.by_index.insert(record.index, key.clone());
        }
        self.by_key.insert(key, record);
    }

    fn remove(&mut self, key: &str) {
        if let Some(record) = self.by_key.remove(key) {
            self.bytes -= record.bytes(key);
            self.digest ^= record.hash(key);
            if self.by_index.get(&record.index).is_some_and(|k| &**k == key) {
                self.by_index.remove(&record.index);
            }
        }
    }

    fn remove_record(&mut self, key: &str) {
        if let Some(record) = self.by_key.remove(key) {
            self.bytes -= record.bytes(key);
            self.digest ^= record.hash(key);
        }
    }

    fn evict_below(&mut self, keep_from: u64) {
        if keep_from <= self.keep_from {
            return;
        }
        self.keep_from = keep_from;
        while let Some(entry) = self.by_index.first_entry() {
            if *entry.key() >= keep_from {
                break;
            }
            let key = entry.remove();
            self.remove_record(&key);
            self.evicted += 1;
        }
    }
}

/// The idempotency table of one replica (see the module's documentation).
#[derive(Default)]
pub(crate) struct IdempotencyTable {
    table: Mutex<Table>,
}

impl IdempotencyTable {
    /// Applies the entry at `index`, as it was decided (`state`), if the table has not yet.
    /// Entries must come in index order; an index already applied changes nothing.
    pub(crate) fn apply(&self, index: u64, entry: &LogEntry, state: &EntryState) {
        let mut table = crate::sync::lock(&self.table);
        if index <= table.applied {
            return;
        }
        table.applied = index;
        let Some(stamp) = entry.stamp else {
            // Logged before entries carried stamps (or by hand): its record, if any, takes
            // the time of the newest record, and nothing is dropped.
            if let Some(key) = &entry.idempotency_key {
                let at = table.by_index.last_key_value().and_then(|(_, k)| table.by_key.get(k)).map_or(0, |r| r.at);
                add(&mut table, index, key, entry, state, at);
            }
            return;
        };
        table.evict_below(stamp.keep_from.min(index));
        if state.kind == RequestKind::ExternalTxn && entry.path == IMPORT_PATH {
            import(&mut table, entry, stamp.at);
        }
        if let Some(key) = &entry.idempotency_key {
            add(&mut table, index, key, entry, state, stamp.at);
        }
    }

    /// The record of `key`, if the table holds one.
    pub(crate) fn get(&self, key: &str) -> Option<TableRecord> {
        crate::sync::lock(&self.table).by_key.get(key).cloned()
    }

    /// The stamp for the next keyed entry a leader logs at `now_ms`: records logged more
    /// than `retention` before it, and then the oldest ones until the rest fit in
    /// `max_bytes`, are dropped.
    pub(crate) fn stamp(&self, now_ms: u64, retention: Duration, max_bytes: u64) -> Stamp {
        let table = crate::sync::lock(&self.table);
        let expired_before = now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        let mut bytes = table.bytes;
        let mut keep_from = table.applied + 1;
        for (&index, key) in &table.by_index {
            let record = &table.by_key[key];
            if record.at >= expired_before && bytes <= max_bytes {
                keep_from = index;
                break;
            }
            bytes -= record.bytes(key);
        }
        Stamp { at: now_ms, keep_from: keep_from.max(table.keep_from) }
    }

    /// The log index the table has applied.
    pub(crate) fn applied(&self) -> u64 {
        crate::sync::lock(&self.table).applied
    }

    pub(crate) fn status(&self) -> TableStatus {
        let table = crate::sync::lock(&self.table);
        let oldest_at = table.by_index.first_key_value().map(|(_, key)| table.by_key[key].at);
        TableStatus {
            records: table.by_key.len() as u64,
            bytes: table.bytes,
            oldest_at,
            applied: table.applied,
            keep_from: table.keep_from,
            evicted: table.evicted,
            digest: format!("{:032x}", table.digest),
        }
    }

    /// The whole table, as of now, for a snapshot: records in index order (cheap: answers
    /// are shared, not copied).
    pub(crate) fn capture(&self) -> Captured {
        let table = crate::sync::lock(&self.table);
        let records = table.by_index.values().map(|key| (key.clone(), table.by_key[key].clone())).collect();
        Captured { applied: table.applied, keep_from: table.keep_from, records }
    }

    /// Replaces the table with a decoded one.
    pub(crate) fn replace(&self, captured: Captured) {
        let mut table = Table { applied: captured.applied, keep_from: captured.keep_from, ..Table::default() };
        for (key, record) in captured.records {
            table.insert(&key, record);
        }
        let evicted = crate::sync::lock(&self.table).evicted;
        table.evicted = evicted;
        *crate::sync::lock(&self.table) = table;
    }

    /// Empties the table at `applied` (a snapshot of an older format, which had none).
    pub(crate) fn reset(&self, applied: u64) {
        self.replace(Captured { applied, keep_from: 0, records: Vec::new() });
    }
}

fn add(table: &mut Table, index: u64, key: &str, entry: &LogEntry, state: &EntryState, at: u64) {
    let answer = match state.state {
        // Never executed: a retry is a new request.
        ProcessState::Ignore => return table.remove(key),
        ProcessState::Success | ProcessState::Fail => state.response.clone().map(Arc::new),
        ProcessState::Null | ProcessState::InProcess => None,
    };
    let fingerprint = fingerprint(entry);
    table.insert(key, TableRecord { index, at, fingerprint, answer });
}

fn import(table: &mut Table, entry: &LogEntry, at: u64) {
    let records: Vec<Imported> = match serde_json::from_slice(&entry.body) {
        Ok(records) => records,
        Err(e) => {
            // Every replica reads the same bytes: all skip them alike.
            tracing::error!(error = %e, "an idempotency import entry does not decode; its records are skipped");
            return;
        }
    };
    for record in records {
        let Some(fingerprint) = from_hex(&record.fingerprint) else {
            tracing::warn!(key = %record.key, "an imported idempotency record has no valid fingerprint; skipped");
            continue;
        };
        let answer = record.response.map(Arc::new);
        table.insert(&record.key, TableRecord { index: record.index, at, fingerprint, answer });
    }
}

/// A fingerprint as older records and logs show it.
pub(crate) fn to_hex(fingerprint: &Fingerprint) -> String {
    fingerprint.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn from_hex(text: &str) -> Option<Fingerprint> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// The table at one index, as a snapshot holds it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Captured {
    pub(crate) applied: u64,
    pub(crate) keep_from: u64,
    /// Oldest first.
    pub(crate) records: Vec<(Arc<str>, TableRecord)>,
}

/// What starts an encoded table.
const TABLE_MAGIC: &[u8; 8] = b"br2kIDT1";

impl Captured {
    /// The table's bytes: the same table always gives the same bytes (records in index
    /// order), so two replicas' snapshots at one index are identical.
    pub(crate) fn encode(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        out.write_all(TABLE_MAGIC)?;
        for n in [self.applied, self.keep_from, self.records.len() as u64] {
            out.write_all(&n.to_be_bytes())?;
        }
        for (key, record) in &self.records {
            out.write_all(&record.index.to_be_bytes())?;
            out.write_all(&record.at.to_be_bytes())?;
            out.write_all(&record.fingerprint)?;
            write_bytes(out, key.as_bytes())?;
            match &record.answer {
                None => out.write_all(&[0])?,
                Some(answer) => {
                    out.write_all(&[1])?;
                    out.write_all(&answer.status.to_be_bytes())?;
                    write_bytes(out, answer.content_type.as_deref().unwrap_or("").as_bytes())?;
                    write_bytes(out, &answer.body)?;
                }
            }
        }
        Ok(())
    }

    /// How many bytes [`Self::encode`] writes.
    pub(crate) fn encoded_len(&self) -> u64 {
        let records: usize = self
            .records
            .iter()
            .map(|(key, record)| {
                let answer = record
                    .answer
                    .as_ref()
                    .map_or(0, |a| 2 + 4 + a.content_type.as_ref().map_or(0, String::len) + 4 + a.body.len());
                8 + 8 + 32 + 4 + key.len() + 1 + answer
            })
            .sum();
        (TABLE_MAGIC.len() + 3 * 8 + records) as u64
    }

    /// Reads a table [`Self::encode`] wrote.
    ///
    /// # Errors
    /// What is wrong with the bytes, when they are not such a table.
    pub(crate) fn decode(input: &mut dyn std::io::Read) -> Result<Self, String> {
        let mut magic = [0u8; 8];
        read_exact(input, &mut magic)?;
        if &magic != TABLE_MAGIC {
            return Err("not an idempotency table (wrong magic)".into());
        }
        let (applied, keep_from, count) = (read_u64(input)?, read_u64(input)?, read_u64(input)?);
        let mut records = Vec::with_capacity(usize::try_from(count.min(1 << 20)).unwrap_or(0));
        for _ in 0..count {
            let (index, at) = (read_u64(input)?, read_u64(input)?);
            let mut fingerprint = [0u8; 32];
            read_exact(input, &mut fingerprint)?;
            let key = String::from_utf8(read_bytes(input)?).map_err(|_| "a key is not UTF-8".to_owned())?;
            let mut tag = [0u8; 1];
            read_exact(input, &mut tag)?;
            let answer = match tag[0] {
                0 => None,
                1 => {
                    let mut status = [0u8; 2];
                    read_exact(input, &mut status)?;
                    let content_type =
                        String::from_utf8(read_bytes(input)?).map_err(|_| "a content type is not UTF-8".to_owned())?;
                    let body = read_bytes(input)?;
                    let content_type = (!content_type.is_empty()).then_some(content_type);
                    Some(Arc::new(StoredReply { status: u16::from_be_bytes(status), content_type, body }))
                }
                other => return Err(format!("a record has answer tag {other}, expected 0 or 1")),
            };
            records.push((Arc::from(key), TableRecord { index, at, fingerprint, answer }));
        }
        Ok(Self { applied, keep_from, records })
    }
}

/// The largest key, content type or answer a table holds (answers are capped far lower).
const MAX_FIELD: u32 = 16 << 20;

fn write_bytes(out: &mut dyn std::io::Write, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("a table field is over 4 GiB"))?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(bytes)
}

fn read_exact(input: &mut dyn std::io::Read, buf: &mut [u8]) -> Result<(), String> {
    input.read_exact(buf).map_err(|e| format!("cut short: {e}"))
}

fn read_u64(input: &mut dyn std::io::Read) -> Result<u64, String> {
    let mut buf = [0u8; 8];
    read_exact(input, &mut buf)?;
    Ok(u64::from_be_bytes(buf))
}

fn read_bytes(input: &mut dyn std::io::Read) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    read_exact(input, &mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_FIELD {
        return Err(format!("a field claims {len} bytes, over the {MAX_FIELD}-byte limit"));
    }
    let mut buf = vec![0u8; len as usize];
    read_exact(input, &mut buf)?;
    Ok(buf)
}

/// Identifies a request's content, so that a reused idempotency key is noticed.
pub(crate) fn fingerprint(entry: &LogEntry) -> crate::idempotency::Fingerprint {
    let mut hash = Sha256::new();
    for part in [entry.method.as_bytes(), entry.path.as_bytes(), entry.query.as_deref().unwrap_or("").as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(&entry.body);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: Option<&str>, body: &str, stamp: Option<Stamp>) -> LogEntry {
        LogEntry {
            method: "POST".into(),
            path: "/append".into(),
            query: None,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            idempotency_key: key.map(str::to_owned),
            stamp,
        }
    }

    fn answered(body: &str) -> EntryState {
        let response = Some(StoredReply { status: 200, content_type: None, body: body.as_bytes().to_vec() });
        EntryState { kind: RequestKind::Replication, state: ProcessState::Success, epoch: 1, response }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// A leader logging `n` keyed requests one second apart, and a follower applying the
    /// same entries: both tables stay identical, whatever the follower's own settings.
    fn run(leader: &IdempotencyTable, follower: &IdempotencyTable, from: u64, n: u64, max_bytes: u64) {
        for index in from..from + n {
            let stamp = leader.stamp(index * 1000, HOUR, max_bytes);
            let e = entry(Some(&format!("k{index}")), &format!("b{index}"), Some(stamp));
            let state = answered(&format!("answer {index}"));
            leader.apply(index, &e, &state);
            follower.apply(index, &e, &state);
        }
    }

    #[test]
    fn records_expire_by_the_leaders_stamp_and_every_replica_drops_the_same() {
        let (leader, follower) = (IdempotencyTable::default(), IdempotencyTable::default());
        run(&leader, &follower, 1, 3600 + 10, u64::MAX);
        let status = leader.status();
        // Logged at 1..=3610 s; the last stamp (3610 s) drops what is older than 3610 - 3600 = 10 s.
        assert_eq!(status.keep_from, 10);
        assert_eq!(status.records, 3601);
        assert_eq!(status.oldest_at, Some(10_000));
        assert!(leader.get("k9").is_none() && leader.get("k10").is_some());
        assert_eq!(leader.capture(), follower.capture(), "identical at the same index");
        assert_eq!(leader.status().digest, follower.status().digest);
        let other = IdempotencyTable::default();
        run(&other, &IdempotencyTable::default(), 1, 3600 + 9, u64::MAX);
        assert_ne!(other.status().digest, leader.status().digest, "one record fewer: another digest");
        let mut a = Vec::new();
        leader.capture().encode(&mut a).unwrap();
        let mut b = Vec::new();
        follower.capture().encode(&mut b).unwrap();
        assert_eq!(a, b, "the same bytes in a snapshot");
    }

    #[test]
    fn the_byte_cap_drops_oldest_first_and_holds() {
        let (leader, follower) = (IdempotencyTable::default(), IdempotencyTable::default());
        let cap = 20_000;
        run(&leader, &follower, 1, 1000, cap);
        let status = leader.status();
        // One record over the cap at most: the newest is added after the stamp's eviction.
        let one = RECORD_OVERHEAD + 200;
        assert!(status.bytes <= cap + one, "{status:?}");
        assert!(status.bytes > cap - 2 * one, "evicts no more than it must: {status:?}");
        let kept = leader.capture();
        let indexes: Vec<u64> = kept.records.iter().map(|(_, r)| r.index).collect();
        assert_eq!(indexes, (status.keep_from..=1000).collect::<Vec<_>>(), "a suffix of the newest");
        assert_eq!(kept, follower.capture());
        assert!(status.evicted > 0);
    }

    #[test]
    fn in_doubt_records_have_no_answer_and_ignored_entries_none_at_all() {
        let table = IdempotencyTable::default();
        let stamp = Some(Stamp { at: 5, keep_from: 0 });
        let in_doubt =
            EntryState { kind: RequestKind::Normal, state: ProcessState::InProcess, epoch: 1, response: None };
        table.apply(1, &entry(Some("a"), "x", stamp), &in_doubt);
        let record = table.get("a").unwrap();
        assert_eq!((record.index, record.answer.clone()), (1, None));
        let ignored = EntryState { state: ProcessState::Ignore, ..in_doubt };
        table.apply(2, &entry(Some("b"), "y", stamp), &ignored);
        assert!(table.get("b").is_none());
        // Applied again (a replica replaying from a lower LPI): nothing changes.
        table.apply(1, &entry(Some("a"), "other", stamp), &answered("late"));
        assert_eq!(table.get("a").unwrap().answer, None);
        assert_eq!(table.applied(), 2);
    }

    #[test]
    fn an_import_entry_moves_older_records_in() {
        let table = IdempotencyTable::default();
        let fingerprint = fingerprint(&entry(Some("old"), "body", None));
        let records = vec![Imported {
            key: "old".into(),
            index: 3,
            fingerprint: to_hex(&fingerprint),
            response: Some(StoredReply { status: 201, content_type: None, body: b"done".to_vec() }),
        }];
        let mut import = entry(None, "", Some(Stamp { at: 77, keep_from: 0 }));
        import.path = IMPORT_PATH.into();
        import.body = serde_json::to_vec(&records).unwrap();
        let state = EntryState { kind: RequestKind::ExternalTxn, ..answered("") };
        table.apply(10, &import, &state);
        let record = table.get("old").unwrap();
        assert_eq!((record.index, record.at, record.fingerprint), (3, 77, fingerprint));
        assert_eq!(record.answer.unwrap().body, b"done");
    }

    #[test]
    fn a_table_round_trips_and_bad_bytes_are_named() {
        let (leader, follower) = (IdempotencyTable::default(), IdempotencyTable::default());
        run(&leader, &follower, 1, 50, u64::MAX);
        let mut bytes = Vec::new();
        leader.capture().encode(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, leader.capture().encoded_len());
        let decoded = Captured::decode(&mut bytes.as_slice()).unwrap();
        assert_eq!(decoded, leader.capture());
        let restored = IdempotencyTable::default();
        restored.replace(decoded);
        assert_eq!(restored.status(), leader.status());
        let err = Captured::decode(&mut &bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.contains("cut short"), "{err}");
        let err = Captured::decode(&mut &b"something else entirely"[..]).unwrap_err();
        assert!(err.contains("wrong magic"), "{err}");
    }

    #[test]
    fn fingerprints_print_and_parse_back() {
        let fingerprint = fingerprint(&entry(None, "b", None));
        assert_eq!(from_hex(&to_hex(&fingerprint)), Some(fingerprint));
        assert_eq!(from_hex("zz"), None);
    }
}
