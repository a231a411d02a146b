//! Log segments on their way to the registry, built on disk rather than in memory: a
//! segment is written line by line as etcd's pages are read (or as the segments it merges
//! are copied in), hashed as it is written, and streamed up from its file. A backup then
//! takes a page's worth of memory whatever the size of its segments.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

/// A segment written to disk: where, its digest and its size.
#[derive(Debug)]
pub(crate) struct Spooled {
    pub(crate) path: PathBuf,
    pub(crate) digest: String,
    pub(crate) size: u64,
}

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A segment being written.
pub(crate) struct SpoolWriter {
    file: BufWriter<tokio::fs::File>,
    hash: Sha256,
    size: u64,
    path: PathBuf,
}

impl SpoolWriter {
    /// Starts the file `name` in `dir` (made if missing).
    pub(crate) async fn create(dir: &Path, name: &str) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join(name);
        let file = tokio::fs::File::create(&path).await?;
        Ok(Self { file: BufWriter::new(file), hash: Sha256::new(), size: 0, path })
    }

    /// Appends `bytes`.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.size += bytes.len() as u64;
        self.file.write_all(bytes).await
    }

    /// Appends the whole file at `path`, a chunk at a time.
    pub(crate) async fn append_file(&mut self, path: &Path) -> std::io::Result<()> {
        let mut file = tokio::fs::File::open(path).await?;
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            self.write(&chunk[..n]).await?;
        }
    }

    /// The bytes written so far.
    pub(crate) const fn size(&self) -> u64 {
        self.size
    }

    /// Flushes the file; what it holds.
    pub(crate) async fn finish(mut self) -> std::io::Result<Spooled> {
        self.file.flush().await?;
        self.file.get_mut().sync_all().await?;
        Ok(Spooled { path: self.path, digest: crate::snapshot::digest_of(self.hash), size: self.size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spooled_segment_has_the_digest_of_its_bytes_and_is_removed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = SpoolWriter::create(dir.path(), "a").await.unwrap();
        writer.write(b"{\"index\":1}\n").await.unwrap();
        writer.write(b"{\"index\":2}\n").await.unwrap();
        let first = writer.finish().await.unwrap();
        let mut merged = SpoolWriter::create(dir.path(), "b").await.unwrap();
        merged.append_file(&first.path).await.unwrap();
        merged.append_file(&first.path).await.unwrap();
        let merged = merged.finish().await.unwrap();
        let bytes = std::fs::read(&merged.path).unwrap();
        assert_eq!(bytes, b"{\"index\":1}\n{\"index\":2}\n{\"index\":1}\n{\"index\":2}\n");
        let want: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(merged.digest, format!("sha256:{want}"));
        assert_eq!(merged.size, bytes.len() as u64);
        let path = first.path.clone();
        drop(first);
        assert!(!path.exists(), "a spooled file goes with its handle");
    }
}
