//! A real OCI distribution registry (Debian's `docker-registry`, the CNCF distribution
//! engine Harbor builds on) on a free loopback port, optionally behind htpasswd basic auth.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{KillOnDrop, OutputTail, ToolNotFound, locate};

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
                let certificate = rcgen::generate_simple_self_signed(vec!["br2k-test".to_owned()]).map_err(|e| {
                    OciRegistryError::Io {
                        action: "make a token-signing certificate".into(),
                        source: std::io::Error::other(e),
                    }
                })?;
                let bundle = dir.path().join("token-root.pem");
                std::fs::write(&bundle, certificate.cert.pem()).map_err(io("write the token certificate"))?;
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: br2k-test\n    issuer: br2k-test\n    rootcertbundle: {}\n",
                    bundle.display()
                ));
            }
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(io("write the registry config"))?;
        let output = OutputTail::default();
        let child = launch(&program, &config_path, port, &output)?;
        Ok(Self { child: Some(child), program, config: config_path, port, _dir: dir, output })
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

    /// What it printed, for diagnostics.
    pub fn output(&self) -> String {
        self.output.text()
    }
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
