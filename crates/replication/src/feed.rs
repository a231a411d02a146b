//! What a follower's watch delivers of the log: new entries and SSI as etcd sends them,
//! so that a follower applies what the leader just recorded without reading it back
//! (two reads per group per follower before, which cost the busy etcd members CPU).
//!
//! One watch covers the keys from `log/` to `ssi` (the entries, their states, LS, LPIs
//! and SSI; not the idempotency records): etcd sends one stream's events in revision
//! order, a transaction's together, so by the time SSI reaches an index the entries up
//! to it have arrived, if they were written after the watch began. The feed is only a
//! cache: an entry is taken from it when both its records are there and its state is
//! final; anything else (written before the watch began, beyond the memory bound, or
//! not final yet) is read from etcd as before.

use std::collections::BTreeMap;
use std::sync::Mutex;

use etcd_client::{Event, EventType};

use crate::data::{self, EntryState, Keys, LogEntry, ProcessState};
use crate::store::StoredEntry;
use crate::sync::lock;

/// At most this many bytes of entries are held (a follower far behind reads from etcd).
const MAX_BYTES: usize = 16 * 1024 * 1024;

/// One key's change, as a watch event has it.
struct Change<'a> {
    deleted: bool,
    key: &'a [u8],
    value: &'a [u8],
}

#[derive(Default)]
pub(crate) struct Feed {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Entries are collected from this index on; 0 while not following (leading).
    from: u64,
    /// SSI as the watch last showed it; `None` until the watch runs.
    ssi: Option<u64>,
    requests: BTreeMap<u64, (LogEntry, usize)>,
    states: BTreeMap<u64, EntryState>,
    bytes: usize,
}

impl Inner {
    fn drop_below(&mut self, index: u64) {
        let kept = self.requests.split_off(&index);
        self.bytes -= std::mem::replace(&mut self.requests, kept).values().map(|(_, size)| size).sum::<usize>();
        self.states = self.states.split_off(&index);
    }
}

impl Feed {
    /// The watch (re)started at `ssi`: nothing it sent before is kept.
    pub(crate) fn restart(&self, ssi: Option<u64>) {
        let mut inner = lock(&self.inner);
        let from = inner.from;
        *inner = Inner { from, ssi, ..Inner::default() };
    }

    /// SSI as the watch showed it, while the watch runs.
    pub(crate) fn ssi(&self) -> Option<u64> {
        lock(&self.inner).ssi
    }

    /// A follower needs the entries from `index` on: those below are dropped.
    pub(crate) fn collect_from(&self, index: u64) {
        let mut inner = lock(&self.inner);
        inner.from = index;
        inner.drop_below(index);
    }

    /// A leader reads no entries: none are kept.
    pub(crate) fn stop_collecting(&self) {
        let mut inner = lock(&self.inner);
        inner.from = 0;
        inner.drop_below(u64::MAX);
    }

    /// Takes in one watch response's events; returns whether SSI moved. An event that
    /// does not decode is left out: reading the entry from etcd reports it.
    pub(crate) fn take_in(&self, keys: &Keys, events: &[Event]) -> bool {
        self.take(
            keys,
            events.iter().filter_map(|event| {
                let kv = event.kv()?;
                Some(Change { deleted: event.event_type() == EventType::Delete, key: kv.key(), value: kv.value() })
            }),
        )
    }

    fn take<'a>(&self, keys: &Keys, changes: impl Iterator<Item = Change<'a>>) -> bool {
        let ssi_key = keys.ssi();
        let mut inner = lock(&self.inner);
        let before = inner.ssi;
        for Change { deleted, key, value } in changes {
            if key == ssi_key.as_bytes() {
                if let (false, Ok(ssi)) = (deleted, crate::codec::decode_index(key, value)) {
                    inner.ssi = Some(inner.ssi.unwrap_or(0).max(ssi));
                }
                continue;
            }
            let Some((record, index)) = keys.entry_record(key) else { continue };
            if deleted {
                if let Some((_, size)) = inner.requests.remove(&index) {
                    inner.bytes -= size;
                }
                inner.states.remove(&index);
                continue;
            }
            if inner.from == 0 || index < inner.from {
                continue;
            }
            match record {
                data::EntryRecord::Request => {
                    let size = value.len();
                    if inner.bytes + size > MAX_BYTES {
                        continue;
                    }
                    if let Ok(request) = crate::codec::decode::<LogEntry>(key, value) {
                        inner.bytes += size;
                        if let Some((_, replaced)) = inner.requests.insert(index, (request, size)) {
                            inner.bytes -= replaced;
                        }
                    }
                }
                data::EntryRecord::State => {
                    if let Ok(state) = crate::codec::decode::<EntryState>(key, value) {
                        inner.states.insert(index, state);
                    }
                }
            }
        }
        inner.ssi != before
    }

    /// The entries `from..=to` the feed holds whole and final, from `from` on without a
    /// gap (possibly none).
    pub(crate) fn entries(&self, from: u64, to: u64) -> Vec<StoredEntry> {
        let inner = lock(&self.inner);
        let mut out = Vec::new();
        for index in from..=to {
            let (Some((request, _)), Some(state)) = (inner.requests.get(&index), inner.states.get(&index)) else {
                break;
            };
            if !matches!(state.state, ProcessState::Success | ProcessState::Fail | ProcessState::Ignore) {
                break;
            }
            out.push(StoredEntry { index, state: state.clone(), request: request.clone() });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::RequestKind;

    fn put<'a>(key: &'a str, value: &'a [u8]) -> Change<'a> {
        Change { deleted: false, key: key.as_bytes(), value }
    }

    fn request(body: &str) -> Vec<u8> {
        let entry = LogEntry {
            method: "POST".into(),
            path: "/log".into(),
            query: None,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            idempotency_key: None,
            stamp: None,
        };
        crate::codec::encode(&entry)
    }

    fn state(state: ProcessState) -> Vec<u8> {
        crate::codec::encode(&EntryState { kind: RequestKind::Replication, state, epoch: 1, response: None })
    }

    #[test]
    fn only_whole_final_entries_without_a_gap_are_taken_from_the_watch() {
        let keys = Keys::new("svc");
        let feed = Feed::default();
        feed.restart(Some(0));
        feed.collect_from(1);
        let (l1, l2, l3, r1, r2, r3) = (keys.log(1), keys.log(2), keys.log(3), keys.rs(1), keys.rs(2), keys.rs(3));
        let (a, b, c) = (request("a"), request("b"), request("c"));
        let (in_process, success) = (state(ProcessState::InProcess), state(ProcessState::Success));
        let ssi = keys.ssi();
        let moved = feed.take(
            &keys,
            [put(&l1, &a), put(&r1, &in_process), put(&l2, &b), put(&r2, &in_process), put(&l3, &c)].into_iter(),
        );
        assert!(!moved);
        assert!(feed.entries(1, 3).is_empty(), "not final yet");
        assert!(feed.take(&keys, [put(&r1, &success), put(&r2, &success), put(&ssi, b"2")].into_iter()));
        assert_eq!(feed.ssi(), Some(2));
        let taken = feed.entries(1, 3);
        assert_eq!(taken.iter().map(|e| e.index).collect::<Vec<_>>(), vec![1, 2], "3 has no state yet");
        assert_eq!(taken[1].request.body, b"b");
        // An older SSI never moves it back; deleted entries are gone.
        assert!(!feed.take(&keys, [put(&ssi, b"1")].into_iter()));
        feed.take(&keys, [Change { deleted: true, key: l1.as_bytes(), value: b"" }].into_iter());
        assert!(feed.entries(1, 3).is_empty());
        // Followed past 2: what is below is dropped; a leader keeps nothing.
        feed.collect_from(3);
        assert!(feed.entries(2, 2).is_empty());
        feed.stop_collecting();
        feed.take(&keys, [put(&r3, &success)].into_iter());
        assert!(feed.entries(3, 3).is_empty());
    }

    #[test]
    fn the_watched_range_holds_the_entries_and_ssi_but_not_the_idempotency_records() {
        let keys = Keys::new("svc");
        let (from, to) = keys.feed_range();
        let inside = |key: String| from <= key && key < to;
        for key in [keys.log(7), keys.rs(7), keys.ssi(), keys.ls(), keys.lpi("r1")] {
            assert!(inside(key.clone()), "{key}");
        }
        for key in [keys.idem("k"), keys.cl(), keys.compacted(), keys.terms(), keys.doubt(7)] {
            assert!(!inside(key.clone()), "{key}");
        }
    }
}
