//! An append-only file of lines that never holds half a line: what an app keeps its state
//! in when its state is a journal (the log server's log, the payments ledger).
//!
//! A full disk can take part of a write before it fails, and a crash can stop one half
//! way. Either would leave a torn line that the next append writes after, and the file
//! would hold a corrupt record in the middle for ever. So an append that fails is cut back
//! to the last whole line (and if even the cut fails, the next append cuts first), and a
//! torn tail found at open is cut: the runtime then replays the entries after it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::app::FilePrefix;

/// An append-only file of whole lines: an append that fails is cut back to the last whole
/// line, and a torn tail found at open is cut (the runtime replays the entries after it).
#[derive(Debug)]
pub struct LineFile {
    file: File,
    path: PathBuf,
    /// The length of its whole lines: appends go here.
    len: u64,
    /// A failed append may have left part of a line after `len`, and cutting it failed
    /// too: cut before the next write.
    torn: bool,
}

impl LineFile {
    /// Opens (or creates) the file at `path`, cuts a torn last line off it (a crash in the
    /// middle of a write), and returns it with the text of its whole lines.
    ///
    /// # Errors
    /// When the file cannot be read, is not UTF-8, or cannot be cut.
    pub fn open(path: &Path) -> std::io::Result<(Self, String)> {
        let mut text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let whole = text.rfind('\n').map_or(0, |at| at + 1);
        if whole < text.len() {
            tracing::warn!(path = %path.display(), bytes = text.len() - whole, "cutting a torn last line");
            text.truncate(whole);
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        file.set_len(whole as u64)?;
        Ok((Self { file, path: path.to_owned(), len: whole as u64, torn: false }, text))
    }

    /// Writes `text` (whole lines) to `path` in place of what is there, so that a crash
    /// leaves the old file or the new one (a temporary file, fsynced, renamed over, the
    /// directory fsynced), and opens it. What a snapshot restore does.
    ///
    /// # Errors
    /// When `text` does not end with a whole line, or the file cannot be written.
    pub fn create(path: &Path, text: &str) -> std::io::Result<Self> {
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the text ends in the middle of a line"));
        }
        crate::durable::write_atomically(path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self { file, path: path.to_owned(), len: text.len() as u64, torn: false })
    }

    /// Appends `line`, which must end with `'\n'`, and returns the offset it starts at. On a
    /// full disk the write may take part of the line before it fails: the file is cut back
    /// to its last whole line and the error returned (a local fault: the runtime applies
    /// the entry again once there is room).
    ///
    /// # Errors
    /// The write's error; `InvalidInput` for a line without its newline.
    pub fn append(&mut self, line: &[u8]) -> std::io::Result<u64> {
        if line.last() != Some(&b'\n') {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a line must end with '\\n'"));
        }
        self.cut_torn_tail()?;
        if let Err(e) = self.file.write_all(line) {
            self.torn = true;
            if let Err(cut) = self.cut_torn_tail() {
                tracing::error!(path = %self.path.display(), error = %cut,
                    "could not cut a failed append back; the next append tries again");
            }
            return Err(e);
        }
        let offset = self.len;
        self.len += line.len() as u64;
        Ok(offset)
    }

    /// Cuts the file back to its first `len` bytes (a rollback; `len` is where a line
    /// starts, as [`LineFile::append`] returned it).
    ///
    /// # Errors
    /// When the file cannot be cut.
    pub fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.len = len;
        self.torn = false;
        Ok(())
    }

    /// The length of its whole lines, bytes.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no line.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle to fsync it with (on a blocking thread, outside the app's lock).
    ///
    /// # Errors
    /// When the handle cannot be duplicated.
    pub fn handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Its whole lines as they are now, for a snapshot (later appends are not in it).
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn capture(&self) -> std::io::Result<FilePrefix> {
        FilePrefix::capture(&self.path, self.len)
    }

    fn cut_torn_tail(&mut self) -> std::io::Result<()> {
        if self.torn {
            self.file.set_len(self.len)?;
            self.torn = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_tail_is_cut_at_open_and_appends_go_after_the_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lines");
        std::fs::write(&path, "one\ntwo\nthr").unwrap();
        let (mut file, text) = LineFile::open(&path).unwrap();
        assert_eq!(text, "one\ntwo\n");
        assert_eq!(file.len(), 8);
        assert_eq!(file.append(b"three\n").unwrap(), 8);
        assert!(file.append(b"no newline").is_err());
        file.truncate(4).unwrap();
        file.append(b"2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\n2\n");

        let replaced = LineFile::create(&path, "a\nb\n").unwrap();
        assert_eq!((replaced.len(), std::fs::read_to_string(&path).unwrap().as_str()), (4, "a\nb\n"));
        assert!(LineFile::create(&path, "a\nb").is_err(), "half a line is refused");
        let (_, text) = LineFile::open(&path).unwrap();
        assert_eq!(text, "a\nb\n", "a refused replacement leaves the file as it was");
    }
}
