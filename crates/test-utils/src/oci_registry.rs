//! A real OCI distribution registry (Debian's `docker-registry`, the CNCF distribution
//! engine Harbor builds on) on a free loopback port, optionally behind htpasswd basic auth.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{KillOnDrop, OutputTail, ToolNotFound, locate};
use crate::token_service::{ISSUER, TokenService};

/// Why a registry fixture could not start.
#[derive(Debug, thiserror::Error)]
pub enum OciRegistryError {
    /// `docker-registry` is not installed.
    #[error(transparent)]
    NotFound(#[from] ToolNotFound),
    /// A file or process operation failed.
    #[error("could not {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It did not answer `/v2/` in time.
    #[error("docker-registry did not answer /v2/ within {timeout:?}; its output:\n{output}")]
    StartupTimeout {
        /// The timeout.
        timeout: Duration,
        /// What it printed.
        output: String,
    },
}

/// How a test registry authenticates clients.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Basic(&'a str, &'a str),
    Token(&'a str),
    TokenService(&'a str, &'a str),
}

/// A running registry, killed and its storage removed when dropped.
#[derive(Debug)]
pub struct OciRegistry {
    child: Option<KillOnDrop>,
    program: PathBuf,
    config: PathBuf,
    port: u16,
    _dir: TempDir,
    output: OutputTail,
    token_service: Option<TokenService>,
}

impl OciRegistry {
    /// Starts a registry; with `auth`, it requires that user name and password (basic auth).
    ///
    /// # Errors
    /// [`OciRegistryError`] when it is not installed or does not start.
    pub fn spawn(auth: Option<(&str, &str)>) -> Result<Self, OciRegistryError> {
        Self::start(auth.map_or(Auth::None, |(user, password)| Auth::Basic(user, password)))
    }

    /// Starts a registry that asks for bearer tokens from the token service at `realm`
    /// (wherever that is: a registry may name any host), signed by a key nobody has.
    ///
    /// # Errors
    /// [`OciRegistryError`] when it is not installed or does not start.
    pub fn spawn_with_token_realm(realm: &str) -> Result<Self, OciRegistryError> {
        Self::start(Auth::Token(realm))
    }

    /// Starts a registry that takes bearer tokens only, from a token service of its own
    /// on the same host that accepts `user` with `password` (as Harbor's core does for
    /// its registry).
    ///
    /// # Errors
    /// [`OciRegistryError`] when it is not installed or does not start.
    pub fn spawn_with_token_service(user: &str, password: &str) -> Result<Self, OciRegistryError> {
        Self::start(Auth::TokenService(user, password))
    }

    /// How many tokens its token service has handed out (none without one).
    pub fn tokens_issued(&self) -> usize {
        self.token_service.as_ref().map_or(0, TokenService::issued)
    }

    fn start(auth: Auth<'_>) -> Result<Self, OciRegistryError> {
        let program = locate("docker-registry", "BR2K_DOCKER_REGISTRY", &[PathBuf::from("/usr/bin/docker-registry")])?;
        let io = |action: &str| {
            let action = action.to_owned();
            move |source| OciRegistryError::Io { action, source }
        };
        let dir = tempfile::Builder::new().prefix("br2k-oci-").tempdir().map_err(io("create a directory"))?;
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").map_err(io("find a free port"))?;
            listener.local_addr().map_err(io("find a free port"))?.port()
        };
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("storage").display()
        );
        let mut token_service = None;
        match auth {
            Auth::None => {}
            Auth::Basic(user, password) => {
                let hash = bcrypt::hash(password, 5).map_err(|e| OciRegistryError::Io {
                    action: "hash the test password".into(),
                    source: std::io::Error::other(e),
                })?;
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).map_err(io("write htpasswd"))?;
                config
                    .push_str(&format!("auth:\n  htpasswd:\n    realm: br2k-test\n    path: {}\n", htpasswd.display()));
            }
            Auth::Token(realm) => {
                let certificate = token_certificate()?;
                token_auth(&mut config, realm, &certificate.cert.pem(), &dir)?;
            }
            Auth::TokenService(user, password) => {
                let certificate = token_certificate()?;
                let service =
                    TokenService::start(user, password, &certificate.key_pair.serialize_der(), certificate.cert.der())
                        .map_err(io("start the token service"))?;
                token_auth(&mut config, &service.realm, &certificate.cert.pem(), &dir)?;
                token_service = Some(service);
            }
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(io("write the registry config"))?;
        let output = OutputTail::default();
        let child = launch(&program, &config_path, port, &output)?;
        Ok(Self { child: Some(child), program, config: config_path, port, _dir: dir, output, token_service })
    }

    /// Stops the registry (as if it went down); [`Self::start_again`] brings it back on
    /// the same port and storage.
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Starts the registry again after [`Self::stop`].
    ///
    /// # Errors
    /// [`OciRegistryError`] when it does not start.
    pub fn start_again(&mut self) -> Result<(), OciRegistryError> {
        self.child = None;
        self.child = Some(launch(&self.program, &self.config, self.port, &self.output)?);
        Ok(())
    }

    /// Its base URL, e.g. `http://127.0.0.1:41235`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `host:port`, as image references and Docker's config.json name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its storage root on disk (`docker/registry/v2/...` below it), for tests that
    /// alter what it serves.
    pub fn storage(&self) -> std::path::PathBuf {
        self._dir.path().join("storage")
    }

    /// The bytes of every blob it stores (layers, configs and manifests alike: the
    /// `data` files under `blobs/`), as its disk holds them.
    pub fn blob_bytes(&self) -> u64 {
        fn walk(dir: &std::path::Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
            entries
                .flatten()
                .map(|entry| {
                    let path = entry.path();
                    if path.is_dir() {
                        walk(&path)
                    } else if path.file_name().is_some_and(|n| n == "data") {
                        entry.metadata().map_or(0, |m| m.len())
                    } else {
                        0
                    }
                })
                .sum()
        }
        walk(&self.storage().join("docker/registry/v2/blobs"))
    }

    /// Runs the registry's own garbage collection (`docker-registry garbage-collect`),
    /// which deletes the blobs no manifest names. The registry is stopped meanwhile, as
    /// distribution asks, and started again on the same port.
    ///
    /// # Errors
    /// [`OciRegistryError`] when the collection fails or the registry does not start again.
    pub fn garbage_collect(&mut self) -> Result<String, OciRegistryError> {
        self.stop();
        let output =
            Command::new(&self.program).arg("garbage-collect").arg(&self.config).output().map_err(|source| {
                OciRegistryError::Io { action: "run docker-registry garbage-collect".into(), source }
            })?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            return Err(OciRegistryError::Io {
                action: "run docker-registry garbage-collect".into(),
                source: std::io::Error::other(text),
            });
        }
        self.start_again()?;
        Ok(text)
    }

    /// What it printed, for diagnostics.
    pub fn output(&self) -> String {
        self.output.text()
    }
}

/// A self-signed certificate (and its key) to sign registry tokens with.
fn token_certificate() -> Result<rcgen::CertifiedKey, OciRegistryError> {
    rcgen::generate_simple_self_signed(vec![ISSUER.to_owned()]).map_err(|e| OciRegistryError::Io {
        action: "make a token-signing certificate".into(),
        source: std::io::Error::other(e),
    })
}

/// Configures token auth: tokens from `realm`, signed by the key of `certificate` (PEM).
fn token_auth(config: &mut String, realm: &str, certificate: &str, dir: &TempDir) -> Result<(), OciRegistryError> {
    let bundle = dir.path().join("token-root.pem");
    std::fs::write(&bundle, certificate)
        .map_err(|source| OciRegistryError::Io { action: "write the token certificate".into(), source })?;
    config.push_str(&format!(
        "auth:\n  token:\n    realm: {realm}\n    service: {ISSUER}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
        bundle.display()
    ));
    Ok(())
}

/// Starts `docker-registry` with `config` and waits until it answers on `port`.
fn launch(program: &PathBuf, config: &PathBuf, port: u16, output: &OutputTail) -> Result<KillOnDrop, OciRegistryError> {
    let mut child = KillOnDrop(
        Command::new(program)
            .arg("serve")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| OciRegistryError::Io { action: "start docker-registry".into(), source })?,
    );
    output.follow(child.0.stdout.take().expect("stdout is piped"), None);
    output.follow(child.0.stderr.take().expect("stderr is piped"), None);
    let timeout = Duration::from_secs(10);
    let deadline = Instant::now() + timeout;
    while !answers(port) {
        if Instant::now() >= deadline {
            return Err(OciRegistryError::StartupTimeout { timeout, output: output.text() });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// Whether something answers HTTP on `/v2/`.
fn answers(port: u16) -> bool {
    let timeout = Duration::from_millis(500);
    let Ok(mut stream) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout) else { return false };
    let _ = stream.set_read_timeout(Some(timeout));
    if stream.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/")
}
