//! This replica's snapshots on its own disk, and the lineage of its state.
//!
//! `DATA_DIR/br2k-snapshots/` holds:
//! - `<index>.snap`: the replica's state at that log index: a header, the idempotency
//!   table ([`crate::idempotency`]) and then the bytes the app's [`SnapshotBuilder`] wrote
//!   ([`Envelope`]). Snapshots from before the table are the app's bytes alone, and are
//!   still read;
//! - `<index>.json`: its [`SnapshotMeta`], written only once those bytes are durable, so a
//!   meta file always means a complete snapshot (a crash mid-build leaves a `.tmp` file,
//!   removed at the next start);
//! - `lineage.json`: the state version (the index of the snapshot the state was last
//!   restored from), and a restore in progress, if any, so that a crash during a restore
//!   is finished at the next start instead of leaving the state half-replaced.
//!
//! The two latest snapshots are kept: a peer may still be fetching the older one when a
//! newer one completes.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::app::SnapshotBuilder;
use crate::data::SnapshotMeta;
use crate::durable::write_atomically;
use crate::error::{Error, Result};

/// How many complete snapshots are kept.
const KEPT: usize = 2;

/// Where this replica's state comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lineage {
    /// The index of the snapshot the state was last restored from (0: built from the log).
    pub(crate) state_version: u64,
    /// A restore that started and may not have finished: redone at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) restoring: Option<SnapshotMeta>,
}

/// What starts a snapshot that carries the idempotency table.
const ENVELOPE_MAGIC: &[u8; 16] = b"br2k-snapshot-2\n";

/// A replica's state for a snapshot: the idempotency table, then the app's state. The
/// table goes first, with its length, so a reader takes it without knowing the app's format.
pub(crate) struct Envelope {
    pub(crate) table: crate::idempotency::Captured,
    pub(crate) app: Box<dyn SnapshotBuilder>,
}

impl SnapshotBuilder for Envelope {
    fn build_snapshot(self: Box<Self>, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(ENVELOPE_MAGIC)?;
        out.write_all(&self.table.encoded_len().to_be_bytes())?;
        // Streamed: a large table is never held twice in memory.
        self.table.encode(out)?;
        drop(self.table);
        self.app.build_snapshot(out)
    }
}

/// A snapshot file opened for a restore: its table, and where the app's bytes are.
pub(crate) struct Opened {
    /// `None` for a snapshot from before the table (the file is the app's bytes alone).
    pub(crate) table: Option<crate::idempotency::Captured>,
    /// A file holding only the app's bytes (removed when this is dropped, if it was made).
    pub(crate) app: PathBuf,
    made: bool,
}

impl Drop for Opened {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_file(&self.app);
        }
    }
}

/// Splits the snapshot at `path` into its table and its app bytes (copied to a file of
/// their own beside it, for the app's [`crate::AppState::restore`]).
pub(crate) fn open_envelope(path: &Path) -> Result<Opened> {
    let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| fail(path, e))?);
    let Some(table) = read_table_from(path, &mut file)? else {
        return Ok(Opened { table: None, app: path.to_owned(), made: false });
    };
    let app = path.with_extension("app.tmp");
    let copied = (|| {
        let mut out = std::fs::File::create(&app)?;
        std::io::copy(&mut file, &mut out)?;
        out.sync_all()
    })();
    let opened = Opened { table: Some(table), app, made: true };
    copied.map_err(|e| fail(&opened.app, format!("cannot copy the app's part of the snapshot: {e}")))?;
    Ok(opened)
}

/// The app's part of a snapshot's bytes (as a peer serves them or a backup's `state`
/// layer holds them): what the app's [`SnapshotBuilder`] wrote, without the idempotency
/// table before it. A snapshot from before the table is the app's bytes alone.
///
/// # Errors
/// When the bytes start like a snapshot with a table but are cut short.
pub fn app_bytes(bytes: &[u8]) -> std::result::Result<&[u8], String> {
    let Some(rest) = bytes.strip_prefix(ENVELOPE_MAGIC.as_slice()) else { return Ok(bytes) };
    let (len, rest) = rest.split_at_checked(8).ok_or("cut short in its header")?;
    let len = u64::from_be_bytes(len.try_into().expect("8 bytes"));
    let len = usize::try_from(len).map_err(|_| "its table length does not fit in memory")?;
    rest.get(len..).ok_or_else(|| format!("cut short: its table claims {len} bytes, {} follow", rest.len()))
}

/// The idempotency table of the snapshot at `path`; `None` for a snapshot from before
/// the table.
pub(crate) fn read_table(path: &Path) -> Result<Option<crate::idempotency::Captured>> {
    let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(|e| fail(path, e))?);
    read_table_from(path, &mut file)
}

fn read_table_from(path: &Path, file: &mut impl std::io::Read) -> Result<Option<crate::idempotency::Captured>> {
    let mut magic = [0u8; 16];
    match file.read_exact(&mut magic) {
        Ok(()) if &magic == ENVELOPE_MAGIC => {}
        Ok(()) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(fail(path, e)),
    }
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| fail(path, format!("cut short in its header: {e}")))?;
    let len = u64::from_be_bytes(len);
    let mut section = std::io::Read::take(file, len);
    let table = crate::idempotency::Captured::decode(&mut section)
        .map_err(|e| fail(path, format!("its idempotency table does not decode: {e}")))?;
    if section.limit() != 0 {
        return Err(fail(path, format!("its idempotency table ends {} bytes before its header says", section.limit())));
    }
    Ok(Some(table))
}

#[derive(Clone, Debug)]
pub(crate) struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    pub(crate) fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("br2k-snapshots") }
    }

    /// Creates the directory and removes what an interrupted build, download or install
    /// left: temporary files, and snapshot data without its description.
    pub(crate) fn open(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| fail(&self.dir, format!("cannot create: {e}")))?;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| fail(&self.dir, e))? {
            let path = entry.map_err(|e| fail(&self.dir, e))?.path();
            let unfinished = path.extension().is_some_and(|e| e == "tmp")
                || (path.extension().is_some_and(|e| e == "snap") && !path.with_extension("json").exists());
            if unfinished {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    pub(crate) fn data_path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:020}.snap"))
    }

    fn meta_path(&self, index: u64) -> PathBuf {
        self.dir.join(format!("{index:020}.json"))
    }

    /// A file name for a snapshot being downloaded from a peer.
    pub(crate) fn incoming_path(&self) -> PathBuf {
        self.dir.join("incoming.snap.tmp")
    }

    /// Every complete snapshot, oldest first.
    fn all(&self) -> Result<Vec<SnapshotMeta>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(fail(&self.dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| fail(&self.dir, e))?.path();
            let is_meta = path.extension().is_some_and(|e| e == "json")
                && path.file_stem().is_some_and(|s| s.to_string_lossy().bytes().all(|b| b.is_ascii_digit()));
            if !is_meta {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| fail(&path, e))?;
            let meta: SnapshotMeta = serde_json::from_slice(&bytes)
                .map_err(|e| fail(&path, format!("undecodable snapshot description ({e}); remove it")))?;
            out.push(meta);
        }
        out.sort_by_key(|m| m.index);
        Ok(out)
    }

    /// The latest complete snapshot, if any.
    pub(crate) fn latest(&self) -> Result<Option<SnapshotMeta>> {
        Ok(self.all()?.pop())
    }

    /// The complete snapshot at `index`, if it is still kept.
    pub(crate) fn get(&self, index: u64) -> Result<Option<SnapshotMeta>> {
        Ok(self.all()?.into_iter().find(|m| m.index == index))
    }

    /// Writes a snapshot with `builder` (blocking: run it on a blocking thread), makes it
    /// durable, records it, and drops all but the latest ones.
    pub(crate) fn save(
        &self,
        builder: Box<dyn SnapshotBuilder>,
        index: u64,
        state_version: u64,
        replica: &str,
    ) -> Result<SnapshotMeta> {
        let temp = self.dir.join(format!("{index:020}.snap.tmp"));
        let file = std::fs::File::create(&temp).map_err(|e| fail(&temp, e))?;
        let mut out = HashingWriter::new(std::io::BufWriter::new(file));
        let built = builder.build_snapshot(&mut out).and_then(|()| out.inner.flush());
        if let Err(e) = built {
            let _ = std::fs::remove_file(&temp);
            return Err(fail(&temp, format!("the app could not write its snapshot: {e}")));
        }
        let (digest, size) = (out.digest(), out.size);
        let file = out.inner.into_inner().map_err(|e| fail(&temp, e.error()))?;
        file.sync_all().map_err(|e| fail(&temp, e))?;
        drop(file);
        let meta = SnapshotMeta {
            index,
            state_version,
            digest,
            size,
            replica: replica.to_owned(),
            created_at: crate::data::unix_seconds(),
        };
        self.install(&temp, &meta)?;
        Ok(meta)
    }

    /// Puts complete snapshot bytes (written here, or downloaded and checked against
    /// `meta`) in place as this replica's own snapshot, described by `meta`.
    pub(crate) fn install(&self, temp: &Path, meta: &SnapshotMeta) -> Result<()> {
        let data = self.data_path(meta.index);
        std::fs::rename(temp, &data).map_err(|e| fail(&data, e))?;
        write_atomically(&self.meta_path(meta.index), &serde_json::to_vec_pretty(meta).expect("metas serialize"))
            .map_err(|e| fail(&self.meta_path(meta.index), e))?;
        self.prune()
    }

    fn prune(&self) -> Result<()> {
        let all = self.all()?;
        for old in all.iter().take(all.len().saturating_sub(KEPT)) {
            // The meta first: without it the data file is no snapshot.
            let _ = std::fs::remove_file(self.meta_path(old.index));
            let _ = std::fs::remove_file(self.data_path(old.index));
        }
        Ok(())
    }

    pub(crate) fn lineage(&self) -> Result<Lineage> {
        let path = self.dir.join("lineage.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| fail(&path, format!("undecodable ({e}); check the app state before removing it"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Lineage::default()),
            Err(e) => Err(fail(&path, e)),
        }
    }

    pub(crate) fn set_lineage(&self, lineage: &Lineage) -> Result<()> {
        let path = self.dir.join("lineage.json");
        write_atomically(&path, &serde_json::to_vec_pretty(lineage).expect("lineages serialize"))
            .map_err(|e| fail(&path, e))
    }
}

/// `sha256:<hex>` of `bytes`.
pub(crate) fn digest_of(hash: Sha256) -> String {
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Counts and hashes what passes through.
pub(crate) struct HashingWriter<W> {
    pub(crate) inner: W,
    hash: Sha256,
    pub(crate) size: u64,
}

impl<W> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self { inner, hash: Sha256::new(), size: 0 }
    }

    pub(crate) fn digest(&self) -> String {
        digest_of(self.hash.clone())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn fail(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Snapshot { path: path.display().to_string(), reason: reason.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes(Vec<u8>);

    impl SnapshotBuilder for Bytes {
        fn build_snapshot(self: Box<Self>, out: &mut dyn Write) -> std::io::Result<()> {
            out.write_all(&self.0)
        }
    }

    struct Broken;

    impl SnapshotBuilder for Broken {
        fn build_snapshot(self: Box<Self>, out: &mut dyn Write) -> std::io::Result<()> {
            out.write_all(b"half")?;
            Err(std::io::Error::other("disk on fire"))
        }
    }

    #[test]
    fn saves_keeps_the_latest_two_and_digests_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path());
        store.open().unwrap();
        assert_eq!(store.latest().unwrap(), None);
        for index in [10, 20, 30] {
            store.save(Box::new(Bytes(format!("state at {index}").into_bytes())), index, 0, "r1").unwrap();
        }
        let latest = store.latest().unwrap().unwrap();
        assert_eq!((latest.index, latest.size), (30, 11));
        let mut hash = Sha256::new();
        hash.update(b"state at 30");
        assert_eq!(latest.digest, digest_of(hash));
        assert_eq!(std::fs::read(store.data_path(30)).unwrap(), b"state at 30");
        assert!(store.get(20).unwrap().is_some());
        assert!(store.get(10).unwrap().is_none(), "only the two latest are kept");
        assert!(!store.data_path(10).exists());
    }

    #[test]
    fn a_failed_build_leaves_no_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path());
        store.open().unwrap();
        let err = store.save(Box::new(Broken), 5, 0, "r1").unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(store.latest().unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path().join("br2k-snapshots")).unwrap().count(), 0);
    }

    #[test]
    fn what_a_crash_left_is_cleared_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path());
        store.open().unwrap();
        store.save(Box::new(Bytes(b"kept".to_vec())), 7, 0, "r1").unwrap();
        let snapshots = dir.path().join("br2k-snapshots");
        std::fs::write(snapshots.join("00000000000000000009.snap.tmp"), b"half a snapshot").unwrap();
        std::fs::write(store.data_path(8), b"installed without its description").unwrap();
        store.open().unwrap();
        let left: Vec<_> = std::fs::read_dir(&snapshots).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(store.latest().unwrap().unwrap().index, 7);
    }

    #[test]
    fn an_envelope_carries_the_table_before_the_apps_bytes_and_old_snapshots_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path());
        store.open().unwrap();
        let table = crate::idempotency::IdempotencyTable::default();
        let entry = crate::data::LogEntry {
            method: "POST".into(),
            path: "/a".into(),
            query: None,
            headers: Vec::new(),
            body: b"x".to_vec(),
            idempotency_key: Some("k".into()),
            stamp: Some(crate::data::Stamp { at: 9, keep_from: 0 }),
        };
        let state = crate::data::EntryState {
            kind: crate::data::RequestKind::Replication,
            state: crate::data::ProcessState::Success,
            epoch: 1,
            response: None,
        };
        table.apply(4, &entry, &state);
        let envelope = Envelope { table: table.capture(), app: Box::new(Bytes(b"app state".to_vec())) };
        store.save(Box::new(envelope), 4, 0, "r1").unwrap();
        let opened = open_envelope(&store.data_path(4)).unwrap();
        assert_eq!(opened.table.as_ref(), Some(&table.capture()));
        assert_eq!(std::fs::read(&opened.app).unwrap(), b"app state");
        let app = opened.app.clone();
        drop(opened);
        assert!(!app.exists(), "the app's copy is removed once restored");
        assert_eq!(read_table(&store.data_path(4)).unwrap(), Some(table.capture()));

        store.save(Box::new(Bytes(b"an app snapshot of before".to_vec())), 5, 0, "r1").unwrap();
        let opened = open_envelope(&store.data_path(5)).unwrap();
        assert!(opened.table.is_none());
        assert_eq!(opened.app, store.data_path(5));
        drop(opened);
        assert!(store.data_path(5).exists(), "an old snapshot is read in place, never removed");

        let mut cut = std::fs::read(store.data_path(4)).unwrap();
        cut.truncate(40);
        std::fs::write(store.data_path(6), cut).unwrap();
        let err = open_envelope(&store.data_path(6)).err().unwrap().to_string();
        assert!(err.contains("idempotency table does not decode"), "{err}");
    }

    #[test]
    fn lineage_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path());
        store.open().unwrap();
        assert_eq!(store.lineage().unwrap(), Lineage::default());
        let lineage = Lineage { state_version: 42, restoring: None };
        store.set_lineage(&lineage).unwrap();
        assert_eq!(store.lineage().unwrap(), lineage);
    }
}
