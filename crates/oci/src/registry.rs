//! Pushing and pulling images to and from an OCI distribution registry (Harbor in
//! production; any registry speaking the distribution API works), by digest, checking
//! every byte against its digest. Basic auth, and bearer tokens as Harbor hands them out.
//! Credentials come from the environment or Docker's `config.json`, never from the
//! project's files, and are never logged.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use oci_client::client::ClientConfig;
use oci_client::client::ClientProtocol;
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, HeaderValue, WWW_AUTHENTICATE};
use serde::Deserialize;

use crate::error::{OciError, Result};
use crate::image::{ImageRecord, ImageStore, media_type};

/// A user name and password for a registry. Its `Debug` never shows the password.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// The environment variables credentials are read from first.
pub const USERNAME_ENV: &str = "BR2K_REGISTRY_USERNAME";
/// See [`USERNAME_ENV`].
pub const PASSWORD_ENV: &str = "BR2K_REGISTRY_PASSWORD";

impl Credentials {
    /// From `BR2K_REGISTRY_USERNAME` and `BR2K_REGISTRY_PASSWORD`, else from Docker's
    /// `config.json` (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`) for `host`.
    ///
    /// # Errors
    /// A `config.json` that exists but cannot be read or has a bad entry for `host`.
    pub fn find(host: &str) -> Result<Option<Self>> {
        if let (Ok(username), Ok(password)) = (std::env::var(USERNAME_ENV), std::env::var(PASSWORD_ENV)) {
            return Ok(Some(Self { username, password }));
        }
        let Some(path) = docker_config_path() else { return Ok(None) };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(OciError::io(format!("read {}", path.display()), e)),
        };
        Self::from_docker_config(&text, host)
            .map_err(|reason| OciError::Invalid(format!("{}: {reason}", path.display())))
    }

    /// Stores these credentials for `host` in Docker's `config.json` (as `docker login`
    /// does; other entries and settings are kept). The file is written 0600, through a
    /// temporary file, so a crash never leaves half of it. Returns its path.
    ///
    /// # Errors
    /// No `DOCKER_CONFIG` or `HOME`, an existing file that is not a Docker config, or
    /// files that cannot be written.
    pub fn save_to_docker_config(&self, host: &str) -> Result<std::path::PathBuf> {
        let path = docker_config_path().ok_or_else(|| {
            OciError::Invalid("neither DOCKER_CONFIG nor HOME is set: cannot find Docker's config.json".into())
        })?;
        let mut config = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .filter(serde_json::Value::is_object)
                .ok_or_else(|| {
                    OciError::Invalid(format!(
                        "{} is not a Docker config (a JSON object); fix it first",
                        path.display()
                    ))
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
            Err(e) => return Err(OciError::io(format!("read {}", path.display()), e)),
        };
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.username, self.password));
        if !config["auths"].is_object() {
            config["auths"] = serde_json::json!({});
        }
        config["auths"][host] = serde_json::json!({ "auth": auth });
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialize") + "\n";
        crate::private_file::write(&path, text.as_bytes())?;
        Ok(path)
    }

    /// The entry for `host` in the text of a Docker `config.json`.
    fn from_docker_config(text: &str, host: &str) -> Result<Option<Self>, String> {
        #[derive(Deserialize)]
        struct Config {
            #[serde(default)]
            auths: std::collections::HashMap<String, Auth>,
        }
        #[derive(Deserialize)]
        struct Auth {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let config: Config = serde_json::from_str(text).map_err(|e| format!("not a Docker config: {e}"))?;
        let entry = config.auths.iter().find(|(key, _)| {
            let key = key.trim_start_matches("https://").trim_start_matches("http://");
            key.trim_end_matches('/') == host
        });
        let Some((_, auth)) = entry else { return Ok(None) };
        if let (Some(username), Some(password)) = (&auth.username, &auth.password) {
            return Ok(Some(Self { username: username.clone(), password: password.clone() }));
        }
        let Some(encoded) = &auth.auth else { return Ok(None) };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| format!("the auth entry for {host} is not base64 of user:password"))?;
        let (username, password) =
            decoded.split_once(':').ok_or_else(|| format!("the auth entry for {host} is not user:password"))?;
        Ok(Some(Self { username: username.into(), password: password.into() }))
    }
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
fn docker_config_path() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".docker")))?;
    Some(dir.join("config.json"))
}

/// A client for one registry.
///
/// Blobs and manifests are pushed and pulled with `oci-client`. What it cannot do safely
/// stays here:
/// - answering the registry's authentication challenge: `oci-client` sends the basic
///   credentials to whatever token service the registry names, and br2k only to the
///   registry's own host or one the operator trusts ([`TOKEN_HOSTS_ENV`]); the token it
///   gets is then handed to `oci-client`;
/// - reading manifests and tag lists with a bound on their size (`oci-client` reads a
///   manifest whole, however much a registry sends).
pub struct RegistryClient {
    base: String,
    host: String,
    http: reqwest::Client,
    oci: oci_client::Client,
    credentials: Option<Credentials>,
    /// Hosts besides the registry's own trusted with its credentials as token services.
    token_hosts: Vec<String>,
    /// The largest image a pull accepts, bytes.
    max_image_bytes: u64,
    /// How to authorize each scope (`repository:NAME:pull`, …) until when: asked once,
    /// not on every request.
    grants: Mutex<HashMap<String, Grant>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .field("credentials", &self.credentials)
            .field("token_hosts", &self.token_hosts)
            .finish_non_exhaustive()
    }
}

/// How requests of one scope are authorized, and until when.
#[derive(Clone)]
struct Grant {
    auth: RegistryAuth,
    until: Instant,
}

/// Bound on one registry request (blobs can be large).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Bound on connecting to a registry or its token service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long basic or anonymous access is taken as settled before the registry is asked
/// again (a token lasts what the token service says).
const GRANT_LIFETIME: Duration = Duration::from_secs(300);

/// The largest manifest a pull accepts (real ones are a few kilobytes).
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// The largest image (manifest, config and layers together) a pull accepts: a registry
/// that streams without end must not fill the disk or the memory of the manager.
pub const MAX_IMAGE_BYTES: u64 = 1024 * 1024 * 1024;

/// Hosts other than a registry's own that may receive its credentials when the registry
/// names them as its token service (comma-separated, e.g. `auth.docker.io`).
pub const TOKEN_HOSTS_ENV: &str = "BR2K_REGISTRY_TOKEN_HOSTS";

impl RegistryClient {
    /// A client for the registry at `url` (`https://host[:port]`, or `http://` when
    /// `plain_http` is allowed for it).
    ///
    /// # Errors
    /// A URL that is not http(s), or plain HTTP not allowed.
    pub fn new(url: &str, plain_http: bool, credentials: Option<Credentials>) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base)
            .map_err(|e| OciError::Invalid(format!("registry URL {url:?} is not a URL: {e}")))?;
        let protocol = match parsed.scheme() {
            "https" => ClientProtocol::Https,
            "http" if plain_http => ClientProtocol::Http,
            "http" => {
                return Err(OciError::Invalid(format!(
                    "registry {url} is plain HTTP, which sends images and credentials unencrypted; allow it explicitly for this registry if that is intended"
                )));
            }
            other => {
                return Err(OciError::Invalid(format!("registry URL {url:?}: scheme {other:?} is not http(s)")));
            }
        };
        let host = host_of(&base).ok_or_else(|| OciError::Invalid(format!("registry URL {url:?} names no host")))?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| OciError::Invalid(format!("cannot build an HTTP client: {e}")))?;
        let oci = oci_client::Client::try_from(ClientConfig {
            protocol,
            // A blob that stops arriving fails; one that keeps arriving may take as long
            // as it needs (layers can be large).
            read_timeout: Some(Duration::from_secs(60)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            // br2k pulls by digest: an index is never what it asked for.
            platform_resolver: None,
            user_agent: concat!("br2k/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
        .map_err(|e| OciError::Invalid(format!("cannot build an OCI client: {e}")))?;
        Ok(Self {
            base,
            host,
            http,
            oci,
            credentials,
            token_hosts: Vec::new(),
            max_image_bytes: MAX_IMAGE_BYTES,
            grants: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts images of at most `bytes` (default [`MAX_IMAGE_BYTES`]) when pulling.
    #[must_use]
    pub const fn with_max_image_bytes(mut self, bytes: u64) -> Self {
        self.max_image_bytes = bytes;
        self
    }

    /// Also sends the credentials to token services on `hosts` (the registry's own host
    /// is always trusted). A registry may name any host as its token service, and a
    /// registry that was taken over, or a mirror, would otherwise collect them.
    #[must_use]
    pub fn trusting_token_hosts(mut self, hosts: impl IntoIterator<Item = String>) -> Self {
        self.token_hosts.extend(hosts.into_iter().map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()));
        self
    }

    /// Checks that the registry answers and accepts this client's credentials (the
    /// distribution API's version check, `GET /v2/`).
    ///
    /// # Errors
    /// An unreachable registry, missing or refused credentials, or an answer that is not
    /// a distribution registry's.
    pub async fn check_access(&self) -> Result<()> {
        let auth = self.authorize("").await?;
        let answer = self.get(&format!("{}/v2/", self.base), &auth, None).await?;
        expect(answer, StatusCode::OK, "answer the version check (is this an OCI registry?)").await?;
        Ok(())
    }

    /// Pushes `record`'s blobs (those the registry lacks) and manifest to `repository`,
    /// tagged with `record.tag`. Returns the manifest digest.
    ///
    /// # Errors
    /// Missing or damaged local blobs, refused credentials, or a registry error.
    pub async fn push(&self, store: &ImageStore, record: &ImageRecord, repository: &str) -> Result<String> {
        check_repository(repository)?;
        for digest in [&record.layer_digest, &record.config_digest] {
            if !self.has_blob(repository, digest).await? {
                self.push_blob(repository, digest, store.read_blob(digest)?).await?;
            }
        }
        let manifest = store.read_blob(&record.digest)?;
        self.push_manifest(repository, &record.tag, media_type::MANIFEST, manifest).await
    }

    /// Whether `repository` holds the blob `digest`.
    ///
    /// # Errors
    /// Refused credentials, or a registry error.
    pub async fn has_blob(&self, repository: &str, digest: &str) -> Result<bool> {
        check_digest(digest)?;
        let image = self.reference(repository, Some(digest), None, RegistryOperation::Pull).await?;
        self.oci.blob_exists(&image, digest).await.map_err(|e| self.failed("look for a blob", e))
    }

    /// Uploads `bytes` as the blob `digest` of `repository`.
    ///
    /// # Errors
    /// Bytes that do not hash to `digest`, refused credentials, or a registry error.
    pub async fn push_blob(&self, repository: &str, digest: &str, bytes: Vec<u8>) -> Result<()> {
        let actual = crate::image::sha256_digest(&bytes);
        if actual != digest {
            return Err(OciError::Invalid(format!("content with digest {actual} offered as {digest}")));
        }
        let image = self.reference(repository, Some(digest), None, RegistryOperation::Push).await?;
        self.oci.push_blob(&image, bytes, digest).await.map_err(|e| self.failed("upload a blob", e))?;
        Ok(())
    }

    /// Uploads the file at `path` as the blob `digest` of `size` bytes to `repository`,
    /// streaming it: a blob of any size takes a read buffer's worth of memory. The
    /// registry checks the digest as it commits the upload.
    ///
    /// # Errors
    /// The file cannot be opened, refused credentials, a registry error (a digest that
    /// does not match the bytes among them).
    pub async fn push_blob_file(
        &self,
        repository: &str,
        digest: &str,
        path: &std::path::Path,
        size: u64,
    ) -> Result<()> {
        check_digest(digest)?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| OciError::Invalid(format!("cannot read {} to upload it: {e}", path.display())))?;
        let stream = file_stream(file);
        let image = self.reference(repository, Some(digest), None, RegistryOperation::Push).await?;
        self.oci
            .push_blob_stream(&image, stream, digest, Some(size))
            .await
            .map_err(|e| self.failed("upload a blob", e))?;
        Ok(())
    }

    /// Pushes `manifest` (of `kind`, a media type) to `repository` under `tag`; returns
    /// its digest.
    ///
    /// # Errors
    /// Refused credentials, a registry error, or a registry that stored it under another
    /// digest.
    pub async fn push_manifest(&self, repository: &str, tag: &str, kind: &str, manifest: Vec<u8>) -> Result<String> {
        let digest = crate::image::sha256_digest(&manifest);
        let kind =
            HeaderValue::from_str(kind).map_err(|_| OciError::Invalid(format!("{kind:?} is not a media type")))?;
        let image = self.reference(repository, None, Some(tag), RegistryOperation::Push).await?;
        let location = self
            .oci
            .push_manifest_raw(&image, manifest, kind)
            .await
            .map_err(|e| self.failed("push the manifest", e))?;
        // Registries answer with the manifest's location by digest: another digest there
        // means it stored other bytes than were sent.
        if let Some(stored) = location.rsplit('/').next().filter(|last| last.starts_with("sha256:"))
            && stored != digest
        {
            return Err(registry_error(
                "push the manifest",
                &format!("the registry stored it as {stored}, not {digest}"),
            ));
        }
        Ok(digest)
    }

    /// The manifest `digest` of `repository` (asking for `accept` media types), refused
    /// unless its bytes hash to `digest`: whatever the registry says, content that does
    /// not is not what was asked for. `consequence` ends the refusal's message.
    ///
    /// # Errors
    /// Refused credentials, an unknown digest, a registry error, bytes that do not match.
    pub async fn fetch_manifest(
        &self,
        repository: &str,
        digest: &str,
        accept: &str,
        consequence: &str,
    ) -> Result<bytes::Bytes> {
        check_repository(repository)?;
        check_digest(digest)?;
        let auth = self.authorize(&scope(repository, RegistryOperation::Pull)).await?;
        let url = format!("{}/v2/{repository}/manifests/{digest}", self.base);
        let answer = self.get(&url, &auth, Some(accept)).await?;
        let answer = expect(answer, StatusCode::OK, "fetch the manifest").await?;
        let manifest = read_at_most(answer, MAX_MANIFEST_BYTES.min(self.max_image_bytes), "fetch the manifest").await?;
        let actual = crate::image::sha256_digest(&manifest);
        if actual != digest {
            return Err(OciError::Invalid(format!(
                "the manifest {} serves for {repository}@{digest} does not match that digest (its content hashes to \
                 {actual}): the registry's copy was altered or replaced; {consequence}",
                self.base
            )));
        }
        Ok(manifest)
    }

    /// The blob `digest` of `repository`, at most `max` bytes, refused unless its bytes
    /// hash to `digest`.
    ///
    /// # Errors
    /// Refused credentials, an unknown digest, a registry error, too many bytes, bytes
    /// that do not match.
    pub async fn fetch_blob(&self, repository: &str, digest: &str, max: u64) -> Result<bytes::Bytes> {
        let body = Bounded::new(
            Vec::new(),
            max,
            "the image is larger than br2k accepts: this answer alone passes what is left of the limit",
        );
        Ok(self.pull_blob_into(repository, digest, body).await?.into())
    }

    /// Pulls the blob `digest` of `repository` into `sink`, checked against its digest;
    /// the sink back.
    async fn pull_blob_into<W: tokio::io::AsyncWrite + Unpin + Send>(
        &self,
        repository: &str,
        digest: &str,
        mut sink: Bounded<W>,
    ) -> Result<W> {
        check_digest(digest)?;
        let image = self.reference(repository, Some(digest), None, RegistryOperation::Pull).await?;
        let descriptor = OciDescriptor { digest: digest.to_owned(), ..OciDescriptor::default() };
        match self.oci.pull_blob(&image, &descriptor, &mut sink).await {
            Ok(()) => Ok(sink.inner),
            Err(OciDistributionError::DigestError(DigestError::VerificationError { actual, .. })) => {
                Err(OciError::Invalid(format!(
                    "the blob {} serves for {repository}@{digest} does not match that digest (its content hashes to \
                     {actual}): the registry's copy was altered or replaced",
                    self.base
                )))
            }
            Err(e) => Err(self.failed("fetch a blob", e)),
        }
    }

    /// Downloads the blob `digest` of `repository` into the file at `path` (created or
    /// truncated), streaming it, checked against its digest and refused past `max` bytes.
    ///
    /// # Errors
    /// As [`Self::fetch_blob`], and a file that cannot be written.
    pub async fn fetch_blob_to_file(
        &self,
        repository: &str,
        digest: &str,
        max: u64,
        path: &std::path::Path,
    ) -> Result<()> {
        check_digest(digest)?;
        let written = |e: std::io::Error| OciError::Invalid(format!("cannot write {}: {e}", path.display()));
        let file = tokio::fs::File::create(path).await.map_err(written)?;
        let sink = Bounded::new(file, max, "the blob is larger than its manifest names");
        let mut file = self.pull_blob_into(repository, digest, sink).await?;
        use tokio::io::AsyncWriteExt as _;
        file.flush().await.map_err(written)
    }

    /// The tags of `repository` (none when the repository does not exist yet), every page
    /// of them.
    ///
    /// # Errors
    /// Refused credentials, or a registry error.
    pub async fn tags(&self, repository: &str) -> Result<Vec<String>> {
        /// Tags asked for per page (registries cap a page at their own limit, often 1000).
        const PAGE: usize = 1000;
        #[derive(Deserialize)]
        struct Tags {
            tags: Option<Vec<String>>,
        }
        check_repository(repository)?;
        let auth = self.authorize(&scope(repository, RegistryOperation::Pull)).await?;
        let mut all: Vec<String> = Vec::new();
        loop {
            let mut url = format!("{}/v2/{repository}/tags/list?n={PAGE}", self.base);
            if let Some(last) = all.last() {
                url.push_str(&format!("&last={last}"));
            }
            let answer = self.get(&url, &auth, None).await?;
            if answer.status() == StatusCode::NOT_FOUND {
                return Ok(all);
            }
            // A registry says there is another page with a `Link: <…>; rel="next"` header.
            let more = answer
                .headers()
                .get(reqwest::header::LINK)
                .is_some_and(|v| v.to_str().is_ok_and(|l| l.contains("rel=\"next\"")));
            let answer = expect(answer, StatusCode::OK, "list the tags").await?;
            let body = read_at_most(answer, MAX_MANIFEST_BYTES, "list the tags").await?;
            let page: Tags =
                serde_json::from_slice(&body).map_err(|e| registry_error("list the tags", &e.to_string()))?;
            let page = page.tags.unwrap_or_default();
            let before = all.len();
            // Pages follow in lexical order: anything not past the last tag is a repeat.
            let last = all.last().cloned();
            all.extend(page.into_iter().filter(|t| last.as_ref().is_none_or(|l| t > l)));
            if !more || all.len() == before {
                return Ok(all);
            }
        }
    }

    /// Deletes the manifest `digest` of `repository` and every tag naming it. Its blobs
    /// stay until the registry's own garbage collection removes those no manifest names
    /// (`docker-registry garbage-collect`, Harbor's GC).
    ///
    /// # Errors
    /// Refused credentials, a registry that does not allow deleting (distribution's
    /// `storage.delete.enabled`), or a registry error. A manifest already gone is not an
    /// error.
    pub async fn delete_manifest(&self, repository: &str, digest: &str) -> Result<()> {
        check_repository(repository)?;
        check_digest(digest)?;
        let auth = self.authorize(&format!("repository:{repository}:delete")).await?;
        let url = format!("{}/v2/{repository}/manifests/{digest}", self.base);
        let mut request = self.http.delete(&url);
        request = match &auth {
            RegistryAuth::Anonymous => request,
            RegistryAuth::Basic(user, password) => request.basic_auth(user, Some(password)),
            RegistryAuth::Bearer(token) => request.bearer_auth(token),
        };
        let answer = request.send().await.map_err(|e| OciError::Invalid(format!("registry {}: {e}", self.base)))?;
        match answer.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(self.refused_credentials()),
            StatusCode::METHOD_NOT_ALLOWED => Err(registry_error(
                "delete a manifest",
                "it does not allow deleting (for docker-registry, set storage.delete.enabled: true)",
            )),
            _ => expect(answer, StatusCode::ACCEPTED, "delete a manifest").await.map(drop),
        }
    }

    /// The digest of the manifest `repository:tag` names, as the registry reports it.
    ///
    /// # Errors
    /// Refused credentials, an unknown tag, or a registry error.
    pub async fn manifest_digest(&self, repository: &str, tag: &str) -> Result<String> {
        let image = self.reference(repository, None, Some(tag), RegistryOperation::Pull).await?;
        let auth = self.authorize(&scope(repository, RegistryOperation::Pull)).await?;
        self.oci.fetch_manifest_digest(&image, &auth).await.map_err(|e| self.failed("find the manifest", e))
    }

    /// `host[:port]` of the registry, as references name it.
    pub fn host(&self) -> String {
        self.host.clone()
    }

    /// The largest image or artifact a pull accepts, bytes.
    pub const fn max_image_bytes(&self) -> u64 {
        self.max_image_bytes
    }

    /// Pulls the image `digest` from `repository` into `store`, checking every blob, and
    /// records it there as `name:tag`.
    ///
    /// # Errors
    /// Refused credentials, an unknown digest, bytes that do not match their digest.
    pub async fn pull(
        &self,
        store: &ImageStore,
        repository: &str,
        digest: &str,
        name: &str,
        tag: &str,
    ) -> Result<ImageRecord> {
        store.blob_path(digest)?; // validates the digest's form
        // The digest is the image's identity (the recovery info records it).
        let consequence = "refusing to run it. Push the image again, or record the image that should run with \
                           `br2k deploy --image`";
        let manifest = self.fetch_manifest(repository, digest, media_type::MANIFEST, consequence).await?;
        store.write_blob(digest, &manifest)?;
        let parsed: OciImageManifest = serde_json::from_slice(&manifest)
            .map_err(|e| registry_error("read the manifest", &format!("not an OCI image manifest: {e}")))?;
        let mut size = manifest.len() as u64;
        let mut config_bytes = Vec::new();
        for blob in std::iter::once(&parsed.config).chain(&parsed.layers) {
            let bytes = self.fetch_blob(repository, &blob.digest, self.max_image_bytes.saturating_sub(size)).await?;
            store.write_blob(&blob.digest, &bytes)?;
            size += bytes.len() as u64;
            if blob.digest == parsed.config.digest {
                config_bytes = bytes.to_vec();
            }
        }
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| registry_error("read the image config", &e.to_string()))?;
        let history = config["history"][0]["created_by"].as_str().unwrap_or("");
        let record = ImageRecord {
            name: name.into(),
            tag: tag.into(),
            digest: digest.into(),
            manifest_size: manifest.len() as u64,
            size,
            config_digest: parsed.config.digest.clone(),
            layer_digest: parsed.layers.first().map(|l| l.digest.clone()).unwrap_or_default(),
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            binary_sha256: history
                .split("binary ")
                .nth(1)
                .map(|s| s.trim_end_matches(')').to_owned())
                .unwrap_or_default(),
            entrypoint: config["config"]["Entrypoint"][0].as_str().unwrap_or_default().to_owned(),
        };
        store.record(&record)?;
        Ok(record)
    }

    /// The reference `oci-client` addresses `repository` (at `digest` or `tag`) by, with
    /// the authorization for `operation` handed to it.
    async fn reference(
        &self,
        repository: &str,
        digest: Option<&str>,
        tag: Option<&str>,
        operation: RegistryOperation,
    ) -> Result<Reference> {
        check_repository(repository)?;
        let image = match (digest, tag) {
            (Some(digest), _) => Reference::with_digest(self.host.clone(), repository.to_owned(), digest.to_owned()),
            (None, tag) => {
                Reference::with_tag(self.host.clone(), repository.to_owned(), tag.unwrap_or("latest").to_owned())
            }
        };
        let auth = self.authorize(&scope(repository, operation)).await?;
        match &auth {
            RegistryAuth::Anonymous => {}
            // oci-client answers a basic challenge itself (it gets no other).
            RegistryAuth::Basic(..) => self.oci.store_auth_if_needed(&self.host, &auth).await,
            // A token is used as it is, for this repository and operation.
            RegistryAuth::Bearer(_) => {
                self.oci.auth(&image, &auth, operation).await.map_err(|e| self.failed("authenticate", e))?;
            }
        }
        Ok(image)
    }

    /// How requests of `scope` are authorized: anonymously, with the credentials (basic
    /// auth), or with a token from the registry's token service. Settled once per scope
    /// until the token expires.
    async fn authorize(&self, scope: &str) -> Result<RegistryAuth> {
        let now = Instant::now();
        if let Some(grant) = self.grants.lock().unwrap_or_else(PoisonError::into_inner).get(scope)
            && grant.until > now
        {
            return Ok(grant.auth.clone());
        }
        let answer = self
            .http
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .map_err(|e| OciError::Invalid(format!("registry {}: {e}", self.base)))?;
        let (auth, lifetime) = match answer.status() {
            StatusCode::OK => (RegistryAuth::Anonymous, GRANT_LIFETIME),
            StatusCode::UNAUTHORIZED => {
                let challenge =
                    answer.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                self.answer_challenge(&challenge, scope).await?
            }
            _ => {
                expect(answer, StatusCode::OK, "answer the version check (is this an OCI registry?)").await?;
                unreachable!("expect refuses any other status")
            }
        };
        let grant = Grant { auth: auth.clone(), until: now + lifetime };
        self.grants.lock().unwrap_or_else(PoisonError::into_inner).insert(scope.to_owned(), grant);
        Ok(auth)
    }

    fn needs_credentials(&self) -> OciError {
        OciError::Invalid(format!(
            "registry {} needs credentials: set {USERNAME_ENV} and {PASSWORD_ENV}, or log in with `docker login` (Docker's config.json is read)",
            self.base
        ))
    }

    fn refused_credentials(&self) -> OciError {
        let who = self.credentials.as_ref().map_or_else(String::new, |c| format!(" for user {:?}", c.username));
        OciError::Invalid(format!(
            "registry {} refused the credentials{who} (401): check the user name and password ({USERNAME_ENV}/{PASSWORD_ENV}, or `docker login`)",
            self.base
        ))
    }

    /// The authorization a challenge asks for, and how long it lasts.
    async fn answer_challenge(&self, challenge: &str, scope: &str) -> Result<(RegistryAuth, Duration)> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let credentials = self.credentials.as_ref().ok_or_else(|| self.needs_credentials())?;
            let auth = RegistryAuth::Basic(credentials.username.clone(), credentials.password.clone());
            return Ok((auth, GRANT_LIFETIME));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(registry_error("authenticate", &format!("unsupported challenge {challenge:?}")));
        }
        let params = parse_challenge(params);
        let realm =
            params.get("realm").ok_or_else(|| registry_error("authenticate", "the bearer challenge names no realm"))?;
        let mut token_url =
            reqwest::Url::parse(realm).map_err(|e| registry_error("authenticate", &format!("realm {realm:?}: {e}")))?;
        if let Some(service) = params.get("service") {
            token_url.query_pairs_mut().append_pair("service", service);
        }
        if !scope.is_empty() {
            token_url.query_pairs_mut().append_pair("scope", scope);
        }
        // The credentials go only where they belong: the registry's own host, or a token
        // host the operator named. Anywhere else a token is asked for anonymously (enough
        // for public images).
        let trusted = self.trusts_token_service(&token_url)?;
        let mut request = self.http.get(token_url.clone());
        let sent_credentials = match (&self.credentials, trusted) {
            (Some(credentials), true) => {
                request = request.basic_auth(&credentials.username, Some(&credentials.password));
                Some(credentials)
            }
            _ => None,
        };
        let answer = request.send().await.map_err(|e| OciError::Invalid(format!("token service {realm}: {e}")))?;
        if matches!(answer.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(match sent_credentials {
                Some(credentials) => OciError::Invalid(format!(
                    "the token service of registry {} refused the credentials for user {:?} ({}): check the user name and password",
                    self.base,
                    credentials.username,
                    answer.status().as_u16()
                )),
                None if self.credentials.is_some() => OciError::Invalid(format!(
                    "registry {} names a token service on another host ({}), which refused an anonymous request; \
                     br2k sends the registry's credentials only to the registry's own host. If that host is the \
                     registry's token service (as auth.docker.io is Docker Hub's), trust it with {TOKEN_HOSTS_ENV}={}",
                    self.base,
                    token_url.host_str().unwrap_or("?"),
                    token_url.host_str().unwrap_or("?")
                )),
                None => self.needs_credentials(),
            });
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let answer = expect(answer, StatusCode::OK, "get a token").await?;
        let body = read_at_most(answer, MAX_MANIFEST_BYTES, "get a token").await?;
        let token: Token = serde_json::from_slice(&body).map_err(|e| registry_error("get a token", &e.to_string()))?;
        // The distribution spec's default lifetime is 60 s; renew a little early.
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(60).saturating_sub(10).max(10));
        let token = token
            .token
            .or(token.access_token)
            .ok_or_else(|| registry_error("get a token", "the answer holds no token"))?;
        Ok((RegistryAuth::Bearer(token), lifetime))
    }

    /// Whether a token service at `url` may receive this registry's credentials: on the
    /// registry's own host (any port) or a host named with [`Self::trusting_token_hosts`],
    /// and never over plain HTTP from an HTTPS registry.
    fn trusts_token_service(&self, url: &reqwest::Url) -> Result<bool> {
        let base = reqwest::Url::parse(&self.base).map_err(|e| registry_error("authenticate", &e.to_string()))?;
        if base.scheme() == "https" && url.scheme() != "https" {
            return Err(registry_error(
                "authenticate",
                &format!("the HTTPS registry names a token service over plain HTTP ({url}); refusing to use it"),
            ));
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let own = base.host_str().unwrap_or_default().eq_ignore_ascii_case(&host);
        Ok(own || self.token_hosts.contains(&host))
    }

    /// A GET of br2k's own (bounded reads), authorized as `auth` says.
    async fn get(&self, url: &str, auth: &RegistryAuth, accept: Option<&str>) -> Result<reqwest::Response> {
        let mut request = self.http.get(url);
        request = match auth {
            RegistryAuth::Anonymous => request,
            RegistryAuth::Basic(user, password) => request.basic_auth(user, Some(password)),
            RegistryAuth::Bearer(token) => request.bearer_auth(token),
        };
        if let Some(kind) = accept {
            request = request.header(ACCEPT, kind);
        }
        let answer = request.send().await.map_err(|e| OciError::Invalid(format!("registry {}: {e}", self.base)))?;
        if answer.status() == StatusCode::UNAUTHORIZED {
            return Err(self.refused_credentials());
        }
        Ok(answer)
    }

    /// What an `oci-client` failure means, said in br2k's words.
    fn failed(&self, action: &str, error: OciDistributionError) -> OciError {
        match error {
            OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => {
                self.refused_credentials()
            }
            OciDistributionError::IoError(e) if e.kind() == std::io::ErrorKind::FileTooLarge => {
                registry_error(action, &e.to_string())
            }
            OciDistributionError::RequestError(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                self.refused_credentials()
            }
            OciDistributionError::RequestError(e) => OciError::Invalid(format!("registry {}: {e}", self.base)),
            OciDistributionError::ServerError { code, message, .. } => {
                registry_error(action, &format!("answered {code}: {}", message.chars().take(300).collect::<String>()))
            }
            other => registry_error(action, &other.to_string()),
        }
    }
}

/// The token scope of `operation` on `repository`.
fn scope(repository: &str, operation: RegistryOperation) -> String {
    match operation {
        RegistryOperation::Pull => format!("repository:{repository}:pull"),
        RegistryOperation::Push => format!("repository:{repository}:pull,push"),
    }
}

/// Where a pulled blob is written (memory or a file): refuses to take more than `max`
/// bytes, so a registry that streams without end is cut off as soon as it passes the limit.
struct Bounded<W> {
    inner: W,
    written: u64,
    max: u64,
    /// What the refusal says.
    too_large: &'static str,
}

impl<W> Bounded<W> {
    const fn new(inner: W, max: u64, too_large: &'static str) -> Self {
        Self { inner, written: 0, max, too_large }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        chunk: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.written + chunk.len() as u64 > self.max {
            let message = format!("{} ({} bytes at most)", self.too_large, self.max);
            return std::task::Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, message)));
        }
        let this = &mut *self;
        let written = std::pin::Pin::new(&mut this.inner).poll_write(cx, chunk);
        if let std::task::Poll::Ready(Ok(n)) = &written {
            this.written += *n as u64;
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The body of `answer`, read up to `max` bytes: a longer one is refused as it arrives,
/// never held whole.
async fn read_at_most(mut answer: reqwest::Response, max: u64, action: &str) -> Result<bytes::Bytes> {
    let too_large = || {
        registry_error(
            action,
            &format!(
                "the image is larger than br2k accepts (this answer alone would pass the {max} bytes left of the limit)"
            ),
        )
    };
    if answer.content_length().is_some_and(|length| length > max) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| registry_error(action, &e.to_string()))? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.into())
}

/// `key="value", key2="value2"` of a WWW-Authenticate challenge.
fn parse_challenge(params: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let mut rest = params.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            quoted.split_once('"').unwrap_or((quoted, ""))
        } else {
            after.split_once(',').unwrap_or((after, ""))
        };
        out.insert(key, value.to_owned());
        rest = next.trim_start_matches(',').trim();
    }
    out
}

/// `host[:port]` of a registry URL, as image references and Docker's config.json name
/// it; `None` for something that is not a URL with a host.
pub fn host_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    Some(url.port().map_or_else(|| host.to_owned(), |port| format!("{host}:{port}")))
}

fn check_digest(digest: &str) -> Result<()> {
    let ok = digest
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok { Ok(()) } else { Err(OciError::Invalid(format!("{digest:?} is not a sha256:<64 hex> digest"))) }
}

pub(crate) fn check_repository(repository: &str) -> Result<()> {
    let ok = !repository.is_empty()
        && repository.split('/').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(OciError::Invalid(format!("repository {repository:?} must be lowercase '/'-separated parts")))
    }
}

async fn expect(response: reqwest::Response, status: StatusCode, action: &str) -> Result<reqwest::Response> {
    if response.status() == status {
        return Ok(response);
    }
    let got = response.status();
    let body = response.text().await.unwrap_or_default();
    Err(registry_error(
        action,
        &format!("answered {got} (expected {status}): {}", body.chars().take(300).collect::<String>()),
    ))
}

fn registry_error(action: &str, detail: &str) -> OciError {
    OciError::Invalid(format!("the registry could not {action}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let p = parse_challenge(
            r#"realm="https://h/service/token",service="harbor-registry",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p["realm"], "https://h/service/token");
        assert_eq!(p["service"], "harbor-registry");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
    }

    #[test]
    fn docker_config_entries_are_read_and_secrets_not_debug_printed() {
        let text = r#"{"auths":{"https://reg.example:5000":{"auth":"dXNlcjpzM2NyZXQ="}}}"#;
        let c = Credentials::from_docker_config(text, "reg.example:5000").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(Credentials::from_docker_config(text, "other:1").unwrap().is_none());
        assert!(
            Credentials::from_docker_config(r#"{"auths":{"h":{"auth":"!!"}}}"#, "h").unwrap_err().contains("base64")
        );
    }

    #[test]
    fn plain_http_must_be_allowed() {
        let err = RegistryClient::new("http://127.0.0.1:5000", false, None).unwrap_err();
        assert!(err.to_string().contains("plain HTTP"), "{err}");
        assert!(RegistryClient::new("http://127.0.0.1:5000", true, None).is_ok());
        assert!(RegistryClient::new("ftp://x", true, None).is_err());
    }
}

/// One container registry the project deploys from, as `registry.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Its name in this project.
    pub name: String,
    /// Its base URL (`https://host[:port]`).
    pub url: String,
    /// Whether plain `http://` is allowed for it.
    pub plain_http: bool,
}

impl RegistryEntry {
    /// `host[:port]`, as image references and Docker's config.json name it.
    pub fn host(&self) -> String {
        host_of(&self.url).unwrap_or_default()
    }

    /// A client for it, with credentials from the environment or Docker's config.json, trusting
    /// the token hosts named in `BR2K_REGISTRY_TOKEN_HOSTS`.
    ///
    /// # Errors
    /// See [`RegistryClient::new`] and [`Credentials::find`].
    pub fn client(&self) -> Result<RegistryClient> {
        let token_hosts = std::env::var(TOKEN_HOSTS_ENV).unwrap_or_default();
        Ok(RegistryClient::new(&self.url, self.plain_http, Credentials::find(&self.host())?)?
            .trusting_token_hosts(token_hosts.split(',').map(str::to_owned)))
    }
}

/// The project's `registry.json`: its container registries (never their credentials).
#[derive(Clone, Debug)]
pub struct RegistryList {
    path: std::path::PathBuf,
}

#[derive(Default, serde::Serialize, Deserialize)]
struct RegistryFile {
    registries: Vec<RegistryEntry>,
}

impl RegistryList {
    /// The list in `path`.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The entry with `url`, or one made from the URL alone: recovery info names a
    /// registry by URL, and a plain-HTTP URL there was allowed when it was recorded.
    ///
    /// # Errors
    /// When the list cannot be read.
    pub fn entry_for_url(&self, url: &str) -> Result<RegistryEntry> {
        let same = |e: &RegistryEntry| e.url.trim_end_matches('/') == url.trim_end_matches('/');
        if let Some(entry) = self.list()?.into_iter().find(same) {
            return Ok(entry);
        }
        Ok(RegistryEntry { name: url.to_owned(), url: url.to_owned(), plain_http: url.starts_with("http://") })
    }

    /// Every registry.
    ///
    /// # Errors
    /// A file that cannot be read or parsed.
    pub fn list(&self) -> Result<Vec<RegistryEntry>> {
        Ok(self.load()?.registries)
    }

    /// The registry called `name`.
    ///
    /// # Errors
    /// An unknown name (the error lists the known ones), or an unreadable file.
    pub fn get(&self, name: &str) -> Result<RegistryEntry> {
        let all = self.list()?;
        all.iter().find(|r| r.name == name).cloned().ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
            OciError::Invalid(format!(
                "no container registry {name:?} in {} (known: {}); add it with `br2k image-registry add {name} URL`",
                self.path.display(),
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            ))
        })
    }

    /// Adds or replaces `entry`, after checking its name and URL.
    ///
    /// # Errors
    /// A bad name or URL, or a file that cannot be written.
    pub fn add(&self, entry: RegistryEntry) -> Result<()> {
        let name_ok = !entry.name.is_empty()
            && entry.name.len() <= 64
            && entry.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(OciError::Invalid(format!(
                "registry name {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                entry.name
            )));
        }
        RegistryClient::new(&entry.url, entry.plain_http, None)?; // validates the URL
        let mut file = self.load()?;
        file.registries.retain(|r| r.name != entry.name);
        file.registries.push(entry);
        file.registries.sort_by(|a, b| a.name.cmp(&b.name));
        self.save(&file)
    }

    /// Removes `name`; whether it was there.
    ///
    /// # Errors
    /// A file that cannot be read or written.
    pub fn remove(&self, name: &str) -> Result<bool> {
        let mut file = self.load()?;
        let before = file.registries.len();
        file.registries.retain(|r| r.name != name);
        let removed = file.registries.len() != before;
        if removed {
            self.save(&file)?;
        }
        Ok(removed)
    }

    fn load(&self) -> Result<RegistryFile> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                OciError::Invalid(format!("{} is not a br2k registry list: {e}; fix or remove it", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryFile::default()),
            Err(e) => Err(OciError::io(format!("read {}", self.path.display()), e)),
        }
    }

    fn save(&self, file: &RegistryFile) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| OciError::io(format!("create {}", dir.display()), e))?;
        }
        let text = serde_json::to_string_pretty(file).expect("entries serialize") + "\n";
        std::fs::write(&self.path, text).map_err(|e| OciError::io(format!("write {}", self.path.display()), e))
    }
}

/// A file as a stream of chunks for an upload.
fn file_stream(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static {
    use futures::StreamExt as _;
    tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(|chunk| chunk.map_err(Into::into))
}
