//! OCI artifacts (image-spec 1.1): files that are not container images, kept in a
//! registry next to the images and addressed and checked by digest the same way. br2k
//! keeps its backups so (snapshots and log segments), each with an `artifactType` of its
//! own; any OCI client (`skopeo`, `oras`) can read them.

use std::collections::BTreeMap;

use oci_client::manifest::{OciDescriptor, OciImageManifest};

use crate::error::{OciError, Result};
use crate::image::{media_type, sha256_digest};
use crate::registry::RegistryClient;

/// The empty config of an artifact manifest (`{}`), as image-spec 1.1 defines it.
pub const EMPTY_CONFIG: &[u8] = b"{}";
/// Its media type.
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The annotation naming a layer's file.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// A file of an artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// Its media type.
    pub media_type: String,
    /// Its name (the `org.opencontainers.image.title` annotation).
    pub title: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// An artifact to push, or one pulled and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// What kind of artifact it is (`application/vnd.br2k.snapshot.v1`, …).
    pub artifact_type: String,
    /// Its files.
    pub layers: Vec<Layer>,
    /// Its annotations (what it holds, who made it, when).
    pub annotations: BTreeMap<String, String>,
}

impl Artifact {
    /// The manifest that describes it: deterministic (the same artifact always has the
    /// same digest).
    pub fn manifest(&self) -> Vec<u8> {
        self.descriptors().to_bytes()
    }

    /// Its manifest, each file named by its digest.
    pub fn descriptors(&self) -> ArtifactManifest {
        ArtifactManifest {
            artifact_type: self.artifact_type.clone(),
            layers: self
                .layers
                .iter()
                .map(|layer| Descriptor {
                    media_type: layer.media_type.clone(),
                    digest: sha256_digest(&layer.bytes),
                    size: layer.bytes.len() as u64,
                    annotations: BTreeMap::from([(TITLE_ANNOTATION.to_owned(), layer.title.clone())]),
                })
                .collect(),
            annotations: self.annotations.clone(),
            subject: None,
        }
    }
}

/// A file of an artifact as its manifest names it: pushed once, then referred to by
/// digest from any number of manifests (an incremental backup names the blobs earlier
/// backups pushed without sending them again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// Its digest, `sha256:…`.
    pub digest: String,
    /// Its size, bytes.
    pub size: u64,
    /// Its annotations (its title, and whatever its maker says of it).
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// Its title (the `org.opencontainers.image.title` annotation), if it has one.
    pub fn title(&self) -> Option<&str> {
        self.annotations.get(TITLE_ANNOTATION).map(String::as_str)
    }

    fn to_oci(&self) -> OciDescriptor {
        OciDescriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: i64::try_from(self.size).unwrap_or(i64::MAX),
            annotations: (!self.annotations.is_empty()).then(|| self.annotations.clone()),
            ..OciDescriptor::default()
        }
    }

    fn from_oci(descriptor: OciDescriptor) -> Self {
        Self {
            media_type: descriptor.media_type,
            digest: descriptor.digest,
            size: u64::try_from(descriptor.size).unwrap_or(0),
            annotations: descriptor.annotations.unwrap_or_default(),
        }
    }
}

/// An artifact's manifest, its files named by [`Descriptor`]s rather than held: what an
/// artifact built from blobs already in the registry is pushed as, and what a pull reads
/// before it fetches (and checks) each file on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactManifest {
    /// What kind of artifact it is.
    pub artifact_type: String,
    /// Its files.
    pub layers: Vec<Descriptor>,
    /// Its annotations.
    pub annotations: BTreeMap<String, String>,
    /// The manifest it refers to (image-spec 1.1's `subject`: a signature names what it
    /// signs so).
    pub subject: Option<Descriptor>,
}

impl ArtifactManifest {
    /// Its bytes: deterministic (the same manifest always has the same digest).
    pub fn to_bytes(&self) -> Vec<u8> {
        let manifest = OciImageManifest {
            schema_version: 2,
            media_type: Some(media_type::MANIFEST.into()),
            artifact_type: Some(self.artifact_type.clone()),
            config: OciDescriptor {
                media_type: EMPTY_MEDIA_TYPE.into(),
                digest: sha256_digest(EMPTY_CONFIG),
                size: EMPTY_CONFIG.len() as i64,
                ..OciDescriptor::default()
            },
            layers: self.layers.iter().map(Descriptor::to_oci).collect(),
            annotations: (!self.annotations.is_empty()).then(|| self.annotations.clone()),
            subject: self.subject.as_ref().map(Descriptor::to_oci),
        };
        serde_json::to_vec(&manifest).expect("a manifest serializes")
    }

    /// Its digest.
    pub fn digest(&self) -> String {
        sha256_digest(&self.to_bytes())
    }
}

/// The descriptor of the empty blob (`{}`), the one layer of an artifact whose content is
/// all in its annotations (image-spec 1.1's guidance for such artifacts).
pub fn empty_layer() -> Descriptor {
    Descriptor {
        media_type: EMPTY_MEDIA_TYPE.into(),
        digest: sha256_digest(EMPTY_CONFIG),
        size: EMPTY_CONFIG.len() as u64,
        annotations: BTreeMap::new(),
    }
}

impl RegistryClient {
    /// Uploads the file at `path`, whose bytes are `size` long and hash to `digest`, to
    /// `repository` unless it already holds them, streaming it (a snapshot of any size
    /// takes a read buffer's worth of memory); returns its descriptor, and whether it was
    /// uploaded.
    ///
    /// # Errors
    /// The file cannot be read, refused credentials, or a registry error (one that finds
    /// the bytes do not hash to `digest` among them).
    pub async fn push_file_layer(
        &self,
        repository: &str,
        media_type: &str,
        annotations: BTreeMap<String, String>,
        file: (&std::path::Path, &str, u64),
    ) -> Result<(Descriptor, bool)> {
        let (path, digest, size) = file;
        let descriptor = Descriptor { media_type: media_type.to_owned(), digest: digest.to_owned(), size, annotations };
        if self.has_blob(repository, digest).await? {
            return Ok((descriptor, false));
        }
        self.push_blob_file(repository, digest, path, size).await?;
        Ok((descriptor, true))
    }

    /// Uploads `bytes` to `repository` unless it already holds them (blobs are
    /// content-addressed); returns their descriptor, and whether they were uploaded.
    ///
    /// # Errors
    /// Refused credentials, or a registry error.
    pub async fn push_layer(
        &self,
        repository: &str,
        media_type: &str,
        annotations: BTreeMap<String, String>,
        bytes: Vec<u8>,
    ) -> Result<(Descriptor, bool)> {
        let digest = sha256_digest(&bytes);
        let descriptor = Descriptor {
            media_type: media_type.to_owned(),
            digest: digest.clone(),
            size: bytes.len() as u64,
            annotations,
        };
        if self.has_blob(repository, &digest).await? {
            return Ok((descriptor, false));
        }
        self.push_blob(repository, &digest, bytes).await?;
        Ok((descriptor, true))
    }

    /// Pushes `manifest` to `repository` under `tag` (every blob it names must be there
    /// already, the empty config is pushed if missing); returns its digest.
    ///
    /// # Errors
    /// Refused credentials, or a registry error (one that lacks a blob refuses it).
    pub async fn push_artifact_manifest(
        &self,
        repository: &str,
        tag: &str,
        manifest: &ArtifactManifest,
    ) -> Result<String> {
        let empty = sha256_digest(EMPTY_CONFIG);
        if !self.has_blob(repository, &empty).await? {
            self.push_blob(repository, &empty, EMPTY_CONFIG.to_vec()).await?;
        }
        self.push_manifest(repository, tag, media_type::MANIFEST, manifest.to_bytes()).await
    }

    /// The manifest `digest` of `repository`, refused unless it hashes to `digest` and is
    /// an artifact of one of `artifact_types` (a format's versions). Its files are not fetched: [`Self::fetch_blob`]
    /// fetches and checks each.
    ///
    /// # Errors
    /// Refused credentials, an unknown digest, a registry error, a manifest that does not
    /// match its digest or is of another type.
    pub async fn pull_artifact_manifest(
        &self,
        repository: &str,
        digest: &str,
        artifact_types: &[&str],
    ) -> Result<ArtifactManifest> {
        let bytes = self.fetch_manifest(repository, digest, media_type::MANIFEST, "refusing to use it").await?;
        let manifest: OciImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Invalid(format!("{repository}@{digest} is not an OCI artifact manifest: {e}")))?;
        let artifact_type = manifest.artifact_type.unwrap_or_default();
        if !artifact_types.contains(&artifact_type.as_str()) {
            return Err(OciError::Invalid(format!(
                "{repository}@{digest} is an artifact of type {artifact_type:?}, not {}",
                artifact_types.join(" or ")
            )));
        }
        Ok(ArtifactManifest {
            artifact_type,
            layers: manifest.layers.into_iter().map(Descriptor::from_oci).collect(),
            annotations: manifest.annotations.unwrap_or_default(),
            subject: manifest.subject.map(Descriptor::from_oci),
        })
    }

    /// Pushes `artifact` to `repository` (its blobs the registry lacks, then its manifest
    /// under `tag`); returns the manifest's digest.
    ///
    /// # Errors
    /// Refused credentials, or a registry error.
    pub async fn push_artifact(&self, repository: &str, tag: &str, artifact: &Artifact) -> Result<String> {
        let manifest = artifact.descriptors();
        for (layer, descriptor) in artifact.layers.iter().zip(&manifest.layers) {
            if !self.has_blob(repository, &descriptor.digest).await? {
                self.push_blob(repository, &descriptor.digest, layer.bytes.clone()).await?;
            }
        }
        self.push_artifact_manifest(repository, tag, &manifest).await
    }

    /// Pulls the artifact `digest` of `repository`, refusing it unless its manifest and
    /// every file hash to what they claim (the manifest to `digest`, which the caller got
    /// from somewhere it trusts, such as the chain) and it is of `artifact_type`.
    ///
    /// # Errors
    /// Refused credentials, an unknown digest, a registry error, anything altered, an
    /// artifact of another type, or one over the size limit.
    pub async fn pull_artifact(&self, repository: &str, digest: &str, artifact_type: &str) -> Result<Artifact> {
        let consequence = "refusing to restore from it";
        let bytes = self.fetch_manifest(repository, digest, media_type::MANIFEST, consequence).await?;
        let manifest: OciImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Invalid(format!("{repository}@{digest} is not an OCI artifact manifest: {e}")))?;
        if manifest.artifact_type.as_deref() != Some(artifact_type) {
            return Err(OciError::Invalid(format!(
                "{repository}@{digest} is an artifact of type {:?}, not {artifact_type:?}",
                manifest.artifact_type.unwrap_or_default()
            )));
        }
        let mut left = self.max_image_bytes().saturating_sub(bytes.len() as u64);
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for descriptor in manifest.layers {
            let size = u64::try_from(descriptor.size).unwrap_or(u64::MAX);
            if size > left {
                return Err(OciError::Invalid(format!(
                    "{repository}@{digest} is larger than br2k accepts ({} bytes)",
                    self.max_image_bytes()
                )));
            }
            let bytes = self.fetch_blob(repository, &descriptor.digest, size).await?;
            left -= bytes.len() as u64;
            let title = descriptor.annotations.and_then(|a| a.get(TITLE_ANNOTATION).cloned()).unwrap_or_default();
            layers.push(Layer { media_type: descriptor.media_type, title, bytes: bytes.to_vec() });
        }
        Ok(Artifact {
            artifact_type: artifact_type.to_owned(),
            layers,
            annotations: manifest.annotations.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_is_an_image_spec_artifact_and_deterministic() {
        let artifact = Artifact {
            artifact_type: "application/vnd.br2k.snapshot.v1".into(),
            layers: vec![Layer {
                media_type: "application/octet-stream".into(),
                title: "state".into(),
                bytes: b"x".to_vec(),
            }],
            annotations: BTreeMap::from([("io.br2k.index".to_owned(), "7".to_owned())]),
        };
        let manifest: serde_json::Value = serde_json::from_slice(&artifact.manifest()).unwrap();
        assert_eq!(manifest["artifactType"], "application/vnd.br2k.snapshot.v1");
        assert_eq!(manifest["config"]["mediaType"], EMPTY_MEDIA_TYPE);
        assert_eq!(
            manifest["config"]["digest"], "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "the digest image-spec gives the empty config"
        );
        assert_eq!(manifest["layers"][0]["annotations"][TITLE_ANNOTATION], "state");
        assert_eq!(manifest["annotations"]["io.br2k.index"], "7");
        assert_eq!(artifact.manifest(), artifact.manifest());
    }
}
