//! The paper's test application (section IV) on br2k-replication: a log of user ids.
//!
//! | route | type | what it does |
//! |---|---|---|
//! | `POST /log {"user": id, "seq": n}` | Replication | appends the id (and the optional sequence number the testbed uses to spot duplicates); answers `{"index", "position"}` |
//! | `GET /log` | read | the whole list |
//! | `POST /notify {"user": id, "message": text}` | Normal | "sends" a notification once, into the outbox directory |
//! | `POST /tx {"user": id, "tx_hash": "0x…"}` | External_TXN | records a transaction the user made on chain |
//!
//! The log is a file of JSON lines, one per entry, each with its log index, so the index
//! the app has applied is stored with the effect (what [`AppState::applied_index`] needs).
//! A snapshot is the log file's first bytes up to the applied index; restoring one
//! replaces the file.
//! The outbox stands for a system outside the service (mail, a chain): a notification is a
//! file named by its log index, so an in-doubt one can be reconciled by looking for it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use br2k_replication::{AppState, Builder, Config, LineFile, Outcome, Replicated, Reply, Request, SnapshotBuilder};
use serde::{Deserialize, Serialize};

/// One entry of the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The log index of the request that appended it.
    pub index: u64,
    /// The user id.
    pub user: u64,
    /// The user's own number for the request, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// Reads the log in `data_dir` without opening it for writing (for checkers; the replica
/// may be running). A torn last line is left out.
///
/// # Errors
/// When the file cannot be read or a complete line is not an entry.
pub fn read_log(data_dir: &Path) -> anyhow::Result<Vec<Entry>> {
    let path = data_dir.join(LOG_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    };
    Ok(parse_lines(&path, &text)?.into_iter().map(|(entry, _)| entry).collect())
}

const LOG_FILE: &str = "log.jsonl";

/// The complete lines of a log file, each entry with its line's length.
fn parse_lines(path: &Path, text: &str) -> anyhow::Result<Vec<(Entry, u64)>> {
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            break; // torn write
        }
        let entry: Entry = serde_json::from_str(line.trim_end())
            .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), out.len() + 1))?;
        out.push((entry, line.len() as u64));
    }
    Ok(out)
}

/// The log server's state: the entries, kept in memory and in a JSON-lines file.
#[derive(Debug)]
pub struct LogState {
    inner: Mutex<Inner>,
    outbox: PathBuf,
}

#[derive(Debug)]
struct Inner {
    /// The log file: it never holds half a line.
    file: LineFile,
    entries: Vec<Entry>,
    /// Byte offset where each entry's line starts, for rollback.
    offsets: Vec<u64>,
    applied: u64,
}

impl Inner {
    /// The state of `file`, whose whole lines are `text`.
    fn read(file: LineFile, text: &str) -> anyhow::Result<Self> {
        let (mut entries, mut offsets, mut len) = (Vec::new(), Vec::new(), 0u64);
        for (entry, line_len) in parse_lines(file.path(), text)? {
            offsets.push(len);
            len += line_len;
            entries.push(entry);
        }
        let applied = entries.last().map_or(0, |e| e.index);
        Ok(Self { file, entries, offsets, applied })
    }
}

impl LogState {
    /// Opens (or creates) the log in `data_dir`, with notifications going to `outbox`.
    ///
    /// # Errors
    /// When the files cannot be created or read, or a line of the log is not an entry
    /// (a torn last line, from a crash in the middle of a write, is cut off).
    pub fn open(data_dir: &Path, outbox: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        std::fs::create_dir_all(outbox)?;
        let path = data_dir.join(LOG_FILE);
        let (file, text) = LineFile::open(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Ok(Self { inner: Mutex::new(Inner::read(file, &text)?), outbox: outbox.to_owned() })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every entry, in order.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }

    /// Where the log file is.
    pub fn path(&self) -> PathBuf {
        self.lock().file.path().to_owned()
    }

    /// Appends `entry`. A write a full disk cuts off leaves the log as it was and returns
    /// the error (a local fault: the runtime applies the entry again once there is room).
    fn append(&self, entry: Entry) -> std::io::Result<usize> {
        let mut inner = self.lock();
        let index = entry.index;
        let mut line = serde_json::to_vec(&entry).expect("entries serialize");
        line.push(b'\n');
        let offset = inner.file.append(&line)?;
        inner.offsets.push(offset);
        inner.entries.push(entry);
        inner.applied = index;
        Ok(inner.entries.len() - 1)
    }

    /// Removes every entry appended by a request at `index` or later.
    fn truncate_from(&self, index: u64) -> std::io::Result<()> {
        let mut inner = self.lock();
        let keep = inner.entries.iter().position(|e| e.index >= index).unwrap_or(inner.entries.len());
        if keep == inner.entries.len() {
            return Ok(());
        }
        let len = inner.offsets[keep];
        inner.file.truncate(len)?;
        inner.entries.truncate(keep);
        inner.offsets.truncate(keep);
        inner.applied = inner.entries.last().map_or(0, |e| e.index);
        Ok(())
    }

    fn notification(&self, index: u64) -> PathBuf {
        self.outbox.join(format!("{index:020}.json"))
    }
}

impl AppState for LogState {
    fn applied_index(&self) -> u64 {
        self.lock().applied
    }

    async fn persist(&self) -> std::io::Result<()> {
        let file = self.lock().file.handle()?;
        tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(std::io::Error::other)?
    }

    /// The log is append-only below the applied index, so its first bytes are the state at
    /// that index for good: the capture is a length and an open file.
    fn snapshot(&self) -> std::io::Result<Box<dyn SnapshotBuilder>> {
        Ok(Box::new(self.lock().file.capture()?))
    }

    /// Checks that the snapshot is a whole log (complete lines, indexes increasing), then
    /// puts it in place of the log with a rename, so a crash leaves one log or the other.
    async fn restore(&self, snapshot: &Path) -> std::io::Result<()> {
        let path = self.path();
        let snapshot = snapshot.to_owned();
        let restored = tokio::task::spawn_blocking(move || restore_log(&snapshot, &path))
            .await
            .map_err(std::io::Error::other)??;
        *self.lock() = restored;
        Ok(())
    }
}

/// The log `snapshot` holds, checked, written in place of `log`.
fn restore_log(snapshot: &Path, log: &Path) -> std::io::Result<Inner> {
    let invalid = |reason: String| std::io::Error::new(std::io::ErrorKind::InvalidData, reason);
    let text = std::fs::read_to_string(snapshot)?;
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(invalid(format!("{} ends in the middle of a line", snapshot.display())));
    }
    let lines = parse_lines(snapshot, &text).map_err(|e| invalid(format!("{e:#}")))?;
    if let Some(pair) = lines.windows(2).find(|pair| pair[0].0.index >= pair[1].0.index) {
        return Err(invalid(format!("indexes out of order: {} then {}", pair[0].0.index, pair[1].0.index)));
    }
    Inner::read(LineFile::create(log, &text)?, &text).map_err(|e| invalid(format!("{e:#}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Append {
    user: u64,
    #[serde(default)]
    seq: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Notify {
    user: u64,
    message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExternalTx {
    user: u64,
    tx_hash: String,
}

/// Longest notification message accepted, bytes.
pub const MAX_MESSAGE: usize = 4096;

/// The checks every route's body passes before it is logged (the runtime's admission
/// hook) and again when it executes: a malformed request never takes a log index.
fn check_append(request: &Request) -> Result<Append, Reply> {
    request.json()
}

fn check_notify(request: &Request) -> Result<Notify, Reply> {
    let body: Notify = request.json()?;
    if body.message.len() > MAX_MESSAGE {
        return Err(Reply::error(400, &format!("message must be at most {MAX_MESSAGE} bytes")));
    }
    Ok(body)
}

fn check_tx(request: &Request) -> Result<ExternalTx, Reply> {
    let body: ExternalTx = request.json()?;
    let hash = body.tx_hash.strip_prefix("0x").unwrap_or("");
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Reply::error(400, "tx_hash must be 0x followed by 64 hex digits"));
    }
    Ok(body)
}

async fn append(state: Arc<LogState>, request: Request) -> Outcome {
    let body = check_append(&request)?;
    // An I/O error (a full disk) is this replica's fault, never the request's answer.
    let position = state.append(Entry { index: request.index, user: body.user, seq: body.seq })?;
    Ok(Reply::json(200, &serde_json::json!({ "index": request.index, "position": position })))
}

async fn undo_append(state: Arc<LogState>, request: Request) -> std::io::Result<()> {
    state.truncate_from(request.index)
}

async fn list(state: Arc<LogState>, _request: Request) -> Outcome {
    Ok(Reply::json(200, &serde_json::json!({ "entries": state.entries() })))
}

/// Sends the notification: writes it into the outbox under its index (atomically, so a
/// reconcile sees either nothing or the whole notification). A failed write is a fault,
/// not an answer: the request stays in doubt and the reconcile hook sends it later.
async fn notify(state: Arc<LogState>, request: Request) -> Outcome {
    let body = check_notify(&request)?;
    let path = state.notification(request.index);
    let temp = path.with_extension("tmp");
    let text = serde_json::json!({ "index": request.index, "user": body.user, "message": body.message }).to_string();
    if let Err(e) = std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, &path)) {
        let _ = std::fs::remove_file(&temp);
        return Err(e.into());
    }
    Ok(Reply::json(200, &serde_json::json!({ "index": request.index, "sent": true })))
}

/// Settles an in-doubt notification: if it is in the outbox it was sent; if not, it never
/// left, so it is sent now. Either way it is sent exactly once.
async fn reconcile_notify(state: Arc<LogState>, request: Request) -> Option<Outcome> {
    if state.notification(request.index).is_file() {
        return Some(Ok(Reply::json(200, &serde_json::json!({ "index": request.index, "sent": true }))));
    }
    Some(notify(state, request).await)
}

/// Records a transaction the user made: checks it looks like a transaction hash.
async fn record_tx(_state: Arc<LogState>, request: Request) -> Outcome {
    let body = check_tx(&request)?;
    Ok(Reply::json(201, &serde_json::json!({ "index": request.index, "user": body.user, "tx_hash": body.tx_hash })))
}

/// The log server's routes on `config`. With a `client_token`, every route asks for
/// `Authorization: Bearer <token>` before anything is logged or read.
pub fn service(config: Config, client_token: Option<String>) -> Builder<LogState> {
    let token = client_token.map(br2k_replication::bearer_token);
    let token = std::sync::Arc::new(token);
    let admit = move |check: fn(&Request) -> Result<(), Reply>| {
        let token = token.clone();
        move |request: &Request| {
            if let Some(token) = token.as_ref() {
                token(request)?;
            }
            check(request)
        }
    };
    Replicated::builder(config)
        .replicate("POST", "/log", append)
        .rollback("POST", "/log", undo_append)
        .admit("POST", "/log", admit(|r| check_append(r).map(drop)))
        .read("GET", "/log", list)
        .admit("GET", "/log", admit(|_| Ok(())))
        .only_once("POST", "/notify", notify)
        .reconcile("POST", "/notify", reconcile_notify)
        .admit("POST", "/notify", admit(|r| check_notify(r).map(drop)))
        .external_txn("POST", "/tx", record_tx)
        .admit("POST", "/tx", admit(|r| check_tx(r).map(drop)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_survives_reopen_and_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("outbox");
        let log = LogState::open(dir.path(), &outbox).unwrap();
        let entry = |index, user| Entry { index, user, seq: None };
        log.append(entry(1, 10)).unwrap();
        log.append(entry(3, 30)).unwrap();
        log.append(entry(4, 40)).unwrap();
        log.truncate_from(3).unwrap();
        assert_eq!(log.applied_index(), 1);
        log.append(Entry { index: 5, user: 50, seq: Some(7) }).unwrap();
        drop(log);
        // A torn last line (a crash mid-write) is dropped on reopen.
        let path = dir.path().join("log.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"index\":6,");
        std::fs::write(&path, text).unwrap();
        let log = LogState::open(dir.path(), &outbox).unwrap();
        let expected = vec![entry(1, 10), Entry { index: 5, user: 50, seq: Some(7) }];
        assert_eq!(log.entries(), expected);
        assert_eq!(log.applied_index(), 5);
        assert_eq!(read_log(dir.path()).unwrap(), expected, "the read-only reader sees the same");
    }

    #[test]
    fn an_append_a_full_disk_cuts_off_is_cut_back_to_the_last_whole_entry() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("disk");
        let disk = br2k_deploy::local::LimitedDisk::mount(&dir, 64 * 1024)
            .expect("a small tmpfs mounts (the tests run as root, as CI does)");
        let log = LogState::open(&dir, &root.path().join("outbox")).unwrap();
        let entry = |index| Entry { index, user: index * 10, seq: Some(index) };
        log.append(entry(1)).unwrap();
        disk.fill().unwrap();
        // What is left of the file's last page takes a few more; then one is cut off.
        let mut index = 2;
        let refused = loop {
            match log.append(entry(index)) {
                Ok(_) => index += 1,
                Err(e) => break e,
            }
            assert!(index < 1000, "a full disk took {index} appends");
        };
        assert_eq!(refused.kind(), std::io::ErrorKind::StorageFull, "{refused}");
        let text = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap();
        assert!(text.ends_with('\n'), "a torn line was left: {:?}", &text[text.len().saturating_sub(40)..]);
        assert_eq!(read_log(&dir).unwrap(), log.entries(), "the file holds exactly what memory holds");
        assert_eq!(log.applied_index(), index - 1);

        // Room again: the same entry goes in, after the last whole one.
        disk.free().unwrap();
        log.append(entry(index)).unwrap();
        drop(log);
        let reopened = LogState::open(&dir, &root.path().join("outbox")).unwrap();
        assert_eq!(reopened.entries(), (1..=index).map(entry).collect::<Vec<_>>());
    }

    fn snapshot_bytes(log: &LogState) -> Vec<u8> {
        let mut out = Vec::new();
        log.snapshot().unwrap().build_snapshot(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn a_snapshot_is_point_in_time_and_restore_replaces_everything() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogState::open(dir.path(), &dir.path().join("outbox")).unwrap();
        let entry = |index, user| Entry { index, user, seq: Some(index) };
        log.append(entry(1, 10)).unwrap();
        log.append(entry(2, 20)).unwrap();
        // Captured now, written after another append: the append is not in it.
        let builder = log.snapshot().unwrap();
        log.append(entry(3, 30)).unwrap();
        let mut at_two = Vec::new();
        builder.build_snapshot(&mut at_two).unwrap();
        let snapshot = dir.path().join("at-two.snap");
        std::fs::write(&snapshot, &at_two).unwrap();

        // Deterministic: another replica with the same entries writes the same bytes.
        let other_dir = tempfile::tempdir().unwrap();
        let other = LogState::open(other_dir.path(), &other_dir.path().join("outbox")).unwrap();
        other.append(entry(1, 10)).unwrap();
        other.append(entry(2, 20)).unwrap();
        assert_eq!(snapshot_bytes(&other), at_two);

        // A replica with a different history restores it and holds exactly that state.
        other.append(entry(4, 99)).unwrap();
        other.restore(&snapshot).await.unwrap();
        assert_eq!(other.entries(), vec![entry(1, 10), entry(2, 20)]);
        assert_eq!(other.applied_index(), 2);
        other.append(entry(3, 30)).unwrap();
        drop(other);
        let reopened = LogState::open(other_dir.path(), &other_dir.path().join("outbox")).unwrap();
        assert_eq!(reopened.entries(), log.entries(), "the restored log is durable and appendable");

        // Torn or garbled snapshots are refused and leave the state alone.
        for bad in [&at_two[..at_two.len() - 3], b"not json\n".as_slice()] {
            std::fs::write(&snapshot, bad).unwrap();
            let err = reopened.restore(&snapshot).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
            assert_eq!(reopened.applied_index(), 3);
        }
    }
}
