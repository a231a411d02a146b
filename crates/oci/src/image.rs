//! OCI images built straight from a service's compiled binary, with no Docker daemon
//!: one layer holding the binary and the shared libraries it loads (found
//! with `ldd`, so the image runs without a base image), an image config naming it as the
//! entrypoint with its port, and a manifest. Blobs go into a content-addressed store and
//! every build is recorded in `images.json`.
//!
//! **Reproducible**: every tar header has fixed owner, mode and time, entries are in a
//! fixed order, gzip carries no time or name, and the config holds no build time, so the
//! same binary (and libraries) give the same manifest digest. The build time is kept in
//! `images.json` only.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{OciError, Result};

/// OCI media types used here.
pub mod media_type {
    /// An image manifest.
    pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// An image config.
    pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// A gzip-compressed tar layer.
    pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
}

/// Where the binary goes inside the image.
const BIN_DIR: &str = "usr/local/bin";
/// The user and group an image's entrypoint runs as: not root (the Kubernetes backend's
/// Pods run as the same ids).
pub const IMAGE_USER: &str = "65532:65532";

/// What to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    /// The service's compiled binary.
    pub binary: PathBuf,
    /// Image name (lowercase letters, digits, '.', '_', '-', '/').
    pub name: String,
    /// Tag.
    pub tag: String,
    /// The port the app listens on (exposed in the config).
    pub port: u16,
}

/// One built image, as `images.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Name.
    pub name: String,
    /// Tag.
    pub tag: String,
    /// The manifest's digest (`sha256:...`): the image's identity.
    pub digest: String,
    /// The manifest's size in bytes.
    pub manifest_size: u64,
    /// Manifest, config and layer together, in bytes.
    pub size: u64,
    /// The config blob's digest.
    pub config_digest: String,
    /// The layer blob's digest.
    pub layer_digest: String,
    /// When it was built (seconds since the Unix epoch; not part of the image).
    pub created: u64,
    /// The sha256 of the binary it was built from.
    pub binary_sha256: String,
    /// The path inside the image of the entrypoint.
    pub entrypoint: String,
}

impl ImageRecord {
    /// `name:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}

/// A directory holding `images.json` and the blobs (`blobs/sha256/<hex>`).
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

#[derive(Default, Serialize, Deserialize)]
struct ImagesFile {
    images: Vec<ImageRecord>,
}

impl ImageStore {
    /// The store at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The path of the blob with `digest`.
    ///
    /// # Errors
    /// When `digest` is not `sha256:` followed by 64 lowercase hex digits.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .ok_or_else(|| OciError::Invalid(format!("{digest:?} is not a sha256 digest (sha256:<64 hex digits>)")))?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    /// Reads a blob, checking that its content still has its digest.
    ///
    /// # Errors
    /// A missing blob, or one whose bytes no longer match (the store was tampered with).
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let bytes = std::fs::read(&path).map_err(|e| OciError::io(format!("read {}", path.display()), e))?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(OciError::Invalid(format!(
                "blob {} holds {actual}, not {digest}: the image store is damaged; build the image again",
                path.display()
            )));
        }
        Ok(bytes)
    }

    /// Every recorded image.
    ///
    /// # Errors
    /// An `images.json` that cannot be read or parsed (the error names the file).
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        Ok(self.load()?.images)
    }

    /// The image `name:tag`, if recorded.
    ///
    /// # Errors
    /// See [`Self::list`].
    pub fn find(&self, name: &str, tag: &str) -> Result<Option<ImageRecord>> {
        Ok(self.list()?.into_iter().find(|i| i.name == name && i.tag == tag))
    }

    /// Builds `spec` into this store and records it (replacing an older `name:tag`).
    ///
    /// # Errors
    /// A bad name or tag, an unreadable binary, `ldd` failing on a dynamic binary, or a
    /// store that cannot be written.
    pub fn build(&self, spec: &ImageSpec) -> Result<ImageRecord> {
        check_name(&spec.name)?;
        check_tag(&spec.tag)?;
        let binary = std::fs::read(&spec.binary)
            .map_err(|e| OciError::io(format!("read the binary {}", spec.binary.display()), e))?;
        let file_name = spec
            .binary
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| OciError::Invalid(format!("{} has no usable file name", spec.binary.display())))?;
        let binary_sha256 = sha256_digest(&binary);
        let entrypoint = format!("/{BIN_DIR}/{file_name}");
        let mut files = vec![(entrypoint.trim_start_matches('/').to_owned(), binary.clone(), 0o755)];
        for library in shared_libraries(&spec.binary)? {
            let bytes = std::fs::read(&library)
                .map_err(|e| OciError::io(format!("read the library {}", library.display()), e))?;
            let inside = library.to_string_lossy().trim_start_matches('/').to_owned();
            files.push((inside, bytes, 0o755));
        }
        let tar = layer_tar(&files)?;
        let diff_id = sha256_digest(&tar);
        let layer = gzip(&tar)?;
        let layer_digest = sha256_digest(&layer);
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": [entrypoint],
                // Not root: a hardened cluster (Pod Security "restricted") admits only
                // containers that run as another user; 65532 is distroless' `nonroot`.
                "User": IMAGE_USER,
                "ExposedPorts": { format!("{}/tcp", spec.port): {} },
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created_by": format!("br2k image build (binary {binary_sha256})") }],
        }))
        .expect("a JSON value serializes");
        let config_digest = sha256_digest(&config);
        let descriptor = |media_type: &str, digest: &str, size: usize| OciDescriptor {
            media_type: media_type.to_owned(),
            digest: digest.to_owned(),
            size: i64::try_from(size).expect("a blob held in memory is smaller than 2^63 bytes"),
            ..OciDescriptor::default()
        };
        let manifest = serde_json::to_vec(&OciImageManifest {
            schema_version: 2,
            media_type: Some(media_type::MANIFEST.to_owned()),
            config: descriptor(media_type::CONFIG, &config_digest, config.len()),
            layers: vec![descriptor(media_type::LAYER, &layer_digest, layer.len())],
            subject: None,
            artifact_type: None,
            annotations: None,
        })
        .expect("a manifest serializes");
        let digest = sha256_digest(&manifest);
        for (blob_digest, bytes) in [(&layer_digest, &layer), (&config_digest, &config), (&digest, &manifest)] {
            self.write_blob(blob_digest, bytes)?;
        }
        let record = ImageRecord {
            name: spec.name.clone(),
            tag: spec.tag.clone(),
            digest,
            manifest_size: manifest.len() as u64,
            size: (manifest.len() + config.len() + layer.len()) as u64,
            config_digest,
            layer_digest,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            binary_sha256,
            entrypoint,
        };
        self.record(&record)?;
        Ok(record)
    }

    /// Records `record` in images.json, replacing an older entry of the same `name:tag`.
    pub(crate) fn record(&self, record: &ImageRecord) -> Result<()> {
        let mut file = self.load()?;
        file.images.retain(|i| !(i.name == record.name && i.tag == record.tag));
        file.images.push(record.clone());
        file.images.sort_by(|a, b| (&a.name, &a.tag).cmp(&(&b.name, &b.tag)));
        self.save(&file)
    }

    /// Removes `name:tag` from images.json and deletes the blobs no other image uses.
    /// Returns the removed record, or `None` when there was no such image.
    ///
    /// # Errors
    /// An unreadable or unwritable store.
    pub fn remove(&self, name: &str, tag: &str) -> Result<Option<ImageRecord>> {
        let mut file = self.load()?;
        let Some(index) = file.images.iter().position(|i| i.name == name && i.tag == tag) else { return Ok(None) };
        let removed = file.images.remove(index);
        // images.json first: a crash between the two steps leaves unused blobs, never a
        // record whose blobs are gone.
        self.save(&file)?;
        let still_used: BTreeSet<&str> = file
            .images
            .iter()
            .flat_map(|i| [i.digest.as_str(), i.config_digest.as_str(), i.layer_digest.as_str()])
            .collect();
        for digest in [&removed.digest, &removed.config_digest, &removed.layer_digest] {
            if still_used.contains(digest.as_str()) {
                continue;
            }
            let path = self.blob_path(digest)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(OciError::io(format!("remove {}", path.display()), e)),
            }
        }
        Ok(Some(removed))
    }

    /// Unpacks `record`'s layer (checked against its digest) into `dir` and returns the
    /// path of its entrypoint there. Only regular files and directories are unpacked, and
    /// only below `dir`: a layer that names anything else is refused.
    ///
    /// # Errors
    /// A damaged blob, a layer that is not a gzip tar or names an unsafe path, an
    /// entrypoint the layer lacks, or files that cannot be written.
    pub fn extract(&self, record: &ImageRecord, dir: &Path) -> Result<PathBuf> {
        let layer = self.read_blob(&record.layer_digest)?;
        let bad = |detail: String| {
            OciError::Invalid(format!("layer {} of {}: {detail}", record.layer_digest, record.reference()))
        };
        std::fs::create_dir_all(dir).map_err(|e| OciError::io(format!("create {}", dir.display()), e))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer.as_slice()));
        let entries = archive.entries().map_err(|e| bad(format!("not a gzip tar: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("not a gzip tar: {e}")))?;
            let path = entry.path().map_err(|e| bad(format!("bad entry name: {e}")))?.into_owned();
            let safe = path.components().all(|c| matches!(c, std::path::Component::Normal(_)));
            if !safe {
                return Err(bad(format!("entry {} leaves the image root", path.display())));
            }
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                return Err(bad(format!("entry {} is neither a file nor a directory", path.display())));
            }
            let unpacked = entry
                .unpack_in(dir)
                .map_err(|e| OciError::io(format!("unpack {} into {}", path.display(), dir.display()), e))?;
            if !unpacked {
                return Err(bad(format!("entry {} leaves the image root", path.display())));
            }
        }
        let entrypoint = dir.join(record.entrypoint.trim_start_matches('/'));
        if !entrypoint.is_file() {
            return Err(bad(format!("the entrypoint {} is not in it", record.entrypoint)));
        }
        Ok(entrypoint)
    }

    fn images_path(&self) -> PathBuf {
        self.root.join("images.json")
    }

    fn load(&self) -> Result<ImagesFile> {
        let path = self.images_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                OciError::Invalid(format!("{} is not a br2k image list: {e}; fix or remove it", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ImagesFile::default()),
            Err(e) => Err(OciError::io(format!("read {}", path.display()), e)),
        }
    }

    fn save(&self, file: &ImagesFile) -> Result<()> {
        let path = self.images_path();
        let text = serde_json::to_string_pretty(file).expect("records serialize") + "\n";
        write_atomically(&path, text.as_bytes())
    }

    /// Stores `bytes` under `digest`, refusing bytes that do not have that digest.
    pub(crate) fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let path = self.blob_path(digest)?;
        let actual = sha256_digest(bytes);
        if actual != digest {
            return Err(OciError::Invalid(format!("content with digest {actual} offered as {digest}")));
        }
        if path.is_file() {
            return Ok(()); // content-addressed: already there is already right
        }
        write_atomically(&path, bytes)
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| OciError::io(format!("create {}", dir.display()), e))?;
    let temp = path.with_extension("partial");
    std::fs::write(&temp, bytes)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| OciError::io(format!("write {}", path.display()), e))
}

/// The shared libraries `binary` loads, as `ldd` lists them (none for a static binary).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            OciError::ToolNotFound { program: "ldd (libc-bin)".into(), searched: "PATH".into() }
        } else {
            OciError::io("run ldd", e)
        }
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("not a dynamic executable") {
        let err = String::from_utf8_lossy(&output.stderr);
        if text.contains("not a dynamic executable") || err.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        return Err(OciError::Invalid(format!("ldd {} failed: {}", binary.display(), err.trim())));
    }
    Ok(parse_ldd(&text))
}

/// Library paths from `ldd` output: `name => /path (0x...)` and `/path (0x...)` lines.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let target = line.split_once("=>").map_or(line, |(_, right)| right).trim();
        let path = target.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            out.insert(PathBuf::from(path));
        }
    }
    out.into_iter().collect()
}

/// A tar of `files` (path inside the image, bytes, mode) and their parent directories,
/// in path order, with fixed owner and time.
fn layer_tar(files: &[(String, Vec<u8>, u32)]) -> Result<Vec<u8>> {
    let mut dirs = BTreeSet::new();
    for (path, ..) in files {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(format!("{}/", dir.display()));
            parent = dir.parent();
        }
    }
    let mut sorted: Vec<&(String, Vec<u8>, u32)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut builder = tar::Builder::new(Vec::new());
    let fail = |e: std::io::Error| OciError::io("write the image layer", e);
    for dir in dirs {
        let mut header = fixed_header(tar::EntryType::Directory, 0o755, 0);
        builder.append_data(&mut header, &dir, std::io::empty()).map_err(fail)?;
    }
    for (path, bytes, mode) in sorted {
        let mut header = fixed_header(tar::EntryType::Regular, *mode, bytes.len() as u64);
        builder.append_data(&mut header, path, bytes.as_slice()).map_err(fail)?;
    }
    builder.into_inner().map_err(fail)
}

fn fixed_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

/// gzip with no name and time in its header, so equal input gives equal output.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::new(6));
    encoder.write_all(bytes).map_err(|e| OciError::io("compress the image layer", e))?;
    encoder.finish().map_err(|e| OciError::io("compress the image layer", e))
}

/// Image names as OCI distribution allows them (lowercase path components).
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
                && part.as_bytes()[0].is_ascii_alphanumeric()
        });
    if ok {
        Ok(())
    } else {
        Err(OciError::Invalid(format!(
            "image name {name:?} must be lowercase letters, digits, '.', '_', '-' in '/'-separated parts, each starting with a letter or digit"
        )))
    }
}

fn check_tag(tag: &str) -> Result<()> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.as_bytes()[0] != b'.'
        && tag.as_bytes()[0] != b'-'
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(OciError::Invalid(format!(
            "tag {tag:?} must be 1-128 letters, digits, '.', '_', '-', not starting with '.' or '-'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn spec(binary: &Path) -> ImageSpec {
        ImageSpec { binary: binary.to_owned(), name: "br2k/demo".into(), tag: "v1".into(), port: 8080 }
    }

    /// A dynamically linked binary every Debian machine has.
    const SAMPLE: &str = "/bin/true";

    #[test]
    fn the_same_binary_gives_the_same_digest() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = ImageStore::new(a.path()).build(&spec(Path::new(SAMPLE))).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100)); // a later build time
        let second = ImageStore::new(b.path()).build(&spec(Path::new(SAMPLE))).unwrap();
        assert_eq!(first.digest, second.digest);
        assert_eq!(first.layer_digest, second.layer_digest);
        assert!(first.digest.starts_with("sha256:") && first.digest.len() == 71);
    }

    #[test]
    fn extract_gives_back_the_binary_byte_for_byte_and_remove_keeps_shared_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("store"));
        let first = store.build(&spec(Path::new(SAMPLE))).unwrap();
        let mut other = spec(Path::new(SAMPLE));
        other.tag = "second".into();
        store.build(&other).unwrap(); // the same blobs under another tag

        let entrypoint = store.extract(&first, &dir.path().join("root")).unwrap();
        assert_eq!(std::fs::read(&entrypoint).unwrap(), std::fs::read(SAMPLE).unwrap());
        assert!(entrypoint.starts_with(dir.path().join("root/usr/local/bin")));

        assert_eq!(store.remove(&first.name, &first.tag).unwrap().map(|r| r.digest), Some(first.digest.clone()));
        assert!(store.read_blob(&first.layer_digest).is_ok(), "blobs still used by :second stay");
        assert!(store.remove(&first.name, &first.tag).unwrap().is_none());
        store.remove(&other.name, &other.tag).unwrap();
        assert!(store.read_blob(&first.layer_digest).is_err(), "unused blobs go");
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_different_binary_gives_a_different_digest() {
        let dir = tempfile::tempdir().unwrap();
        let changed = dir.path().join("true");
        let mut bytes = std::fs::read(SAMPLE).unwrap();
        bytes.push(0);
        std::fs::write(&changed, bytes).unwrap();
        let store = ImageStore::new(dir.path().join("store"));
        let original = store.build(&spec(Path::new(SAMPLE))).unwrap();
        let other = store.build(&ImageSpec { tag: "v2".into(), ..spec(&changed) }).unwrap();
        assert_ne!(original.digest, other.digest);
        assert_eq!(store.list().unwrap().len(), 2, "both recorded");
    }

    #[test]
    fn the_layer_holds_the_binary_and_its_libraries_and_the_manifest_names_the_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path());
        let record = store.build(&spec(Path::new(SAMPLE))).unwrap();
        assert_eq!(store.find("br2k/demo", "v1").unwrap(), Some(record.clone()));

        let manifest: serde_json::Value = serde_json::from_slice(&store.read_blob(&record.digest).unwrap()).unwrap();
        assert_eq!(manifest["mediaType"], media_type::MANIFEST);
        assert_eq!(manifest["config"]["digest"], record.config_digest.as_str());
        assert_eq!(manifest["layers"][0]["digest"], record.layer_digest.as_str());
        let config: serde_json::Value =
            serde_json::from_slice(&store.read_blob(&record.config_digest).unwrap()).unwrap();
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/local/bin/true");
        assert_eq!(config["config"]["User"], "65532:65532", "not root");
        assert!(config["config"]["ExposedPorts"]["8080/tcp"].is_object());

        let layer = store.read_blob(&record.layer_digest).unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(layer.as_slice()).read_to_end(&mut tar).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256_digest(&tar).as_str());
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut paths = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            assert_eq!(entry.header().mtime().unwrap(), 0);
            if path == "usr/local/bin/true" {
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                assert_eq!(bytes, std::fs::read(SAMPLE).unwrap(), "the binary, byte for byte");
            }
            paths.push(path);
        }
        assert!(paths.contains(&"usr/local/bin/true".to_owned()), "{paths:?}");
        assert!(paths.iter().any(|p| p.contains("libc.so")), "its C library travels with it: {paths:?}");
    }

    #[test]
    fn bad_names_tags_and_damaged_blobs_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path());
        let err = store.build(&ImageSpec { name: "Br2k".into(), ..spec(Path::new(SAMPLE)) }).unwrap_err();
        assert!(err.to_string().contains("lowercase"), "{err}");
        let err = store.build(&ImageSpec { tag: "-x".into(), ..spec(Path::new(SAMPLE)) }).unwrap_err();
        assert!(err.to_string().contains("not starting with"), "{err}");
        let err = store.build(&spec(&dir.path().join("missing"))).unwrap_err();
        assert!(err.to_string().contains("read the binary"), "{err}");

        let record = store.build(&spec(Path::new(SAMPLE))).unwrap();
        std::fs::write(store.blob_path(&record.config_digest).unwrap(), b"{}").unwrap();
        let err = store.read_blob(&record.config_digest).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
        assert!(store.blob_path("sha256:xyz").is_err());
    }

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }
}
