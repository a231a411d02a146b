//! A real anvil on a free loopback port.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use tempfile::TempDir;

use crate::process::{KillOnDrop, NoLine, OutputTail, ToolNotFound, first_line, foundry_binary};

/// Why an anvil fixture could not start.
#[derive(Debug, thiserror::Error)]
pub enum AnvilError {
    /// The anvil binary is not installed.
    #[error(transparent)]
    NotFound(#[from] ToolNotFound),
    /// The process could not be started at all.
    #[error("could not start {program}: {source}")]
    Spawn {
        /// The program that was started.
        program: PathBuf,
        /// Why the OS refused.
        #[source]
        source: std::io::Error,
    },
    /// anvil did not report that it listens within the startup timeout; it was killed.
    #[error("anvil did not start listening within {timeout:?}; its output:\n{output}")]
    StartupTimeout {
        /// The timeout that passed.
        timeout: Duration,
        /// What anvil printed.
        output: String,
    },
    /// anvil exited before it listened.
    #[error("anvil exited ({status}) before it listened; its output:\n{output}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// What anvil printed.
        output: String,
    },
    /// anvil listened, but what it reported could not be read.
    #[error("anvil started but its {what} could not be read: {detail}")]
    BadReport {
        /// What was being read.
        what: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// Configures and starts an [`Anvil`].
#[derive(Clone, Debug)]
pub struct AnvilBuilder {
    program: Option<PathBuf>,
    startup_timeout: Duration,
    chain_id: Option<u64>,
    args: Vec<String>,
}

impl Default for AnvilBuilder {
    fn default() -> Self {
        Self { program: None, startup_timeout: Duration::from_secs(10), chain_id: None, args: Vec::new() }
    }
}

impl AnvilBuilder {
    /// Runs this program instead of the anvil installed by `tools/setup.sh`.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// How long to wait for anvil to listen before giving up (default 10 s).
    pub const fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Chain id (anvil's default is 31337).
    pub const fn chain_id(mut self, chain_id: u64) -> Self {
        self.chain_id = Some(chain_id);
        self
    }

    /// Passes an extra argument to anvil (e.g. `--block-time`, `--accounts`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts anvil on a free loopback port and waits until it listens.
    ///
    /// # Errors
    /// [`AnvilError`] when anvil is not installed, does not start, or does not listen in time.
    pub fn spawn(self) -> Result<Anvil, AnvilError> {
        let program = match self.program {
            Some(program) if program.is_file() => program,
            Some(program) => {
                return Err(ToolNotFound { program: "anvil".into(), searched: program.display().to_string() }.into());
            }
            None => foundry_binary("anvil")?,
        };
        let dir = tempfile::Builder::new()
            .prefix("br2k-anvil-")
            .tempdir()
            .map_err(|source| AnvilError::Spawn { program: program.clone(), source })?;
        let config_path = dir.path().join("config.json");

        let mut command = Command::new(&program);
        // Port 0: anvil binds a free port itself and reports it, so there is no race
        // between choosing a port and binding it.
        command.args(["--host", "127.0.0.1", "--port", "0", "--config-out"]).arg(&config_path);
        if let Some(chain_id) = self.chain_id {
            command.args(["--chain-id", &chain_id.to_string()]);
        }
        command.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = KillOnDrop(
            crate::process::spawn_retrying_busy(&mut command)
                .map_err(|source| AnvilError::Spawn { program: program.clone(), source })?,
        );

        let output = OutputTail::default();
        let (lines_tx, lines_rx) = mpsc::channel();
        output.follow(child.0.stdout.take().expect("stdout is piped"), Some(lines_tx));
        output.follow(child.0.stderr.take().expect("stderr is piped"), None);

        let deadline = Instant::now() + self.startup_timeout;
        let port = match first_line(&lines_rx, deadline, listening_port) {
            Ok(port) => port,
            // Dropping `child` kills it.
            Err(NoLine::Timeout) => {
                return Err(AnvilError::StartupTimeout { timeout: self.startup_timeout, output: output.text() });
            }
            Err(NoLine::Ended) => {
                let status = child.0.wait().map_err(|source| AnvilError::Spawn { program, source })?;
                return Err(AnvilError::Exited { status, output: output.text() });
            }
        };

        let keys = read_dev_keys(&config_path)?;
        Ok(Anvil { child, port, keys, _dir: dir, output })
    }
}

/// A running anvil, killed when dropped.
#[derive(Debug)]
pub struct Anvil {
    child: KillOnDrop,
    port: u16,
    keys: Vec<PrivateKeySigner>,
    _dir: TempDir,
    output: OutputTail,
}

impl Anvil {
    /// Starts an anvil with default settings.
    ///
    /// # Errors
    /// See [`AnvilBuilder::spawn`].
    pub fn spawn() -> Result<Self, AnvilError> {
        AnvilBuilder::default().spawn()
    }

    /// A builder for an anvil with non-default settings.
    pub fn builder() -> AnvilBuilder {
        AnvilBuilder::default()
    }

    /// The port anvil listens on.
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// Its HTTP JSON-RPC endpoint, e.g. `http://127.0.0.1:41235`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its WebSocket JSON-RPC endpoint.
    pub fn ws_endpoint(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// The funded dev accounts' keys, in anvil's order.
    pub fn keys(&self) -> &[PrivateKeySigner] {
        &self.keys
    }

    /// The key of dev account `index`.
    ///
    /// # Panics
    /// If anvil has fewer accounts (it has 10 by default).
    pub fn key(&self, index: usize) -> PrivateKeySigner {
        self.keys[index].clone()
    }

    /// The address of dev account `index`.
    ///
    /// # Panics
    /// If anvil has fewer accounts (it has 10 by default).
    pub fn address(&self, index: usize) -> Address {
        self.keys[index].address()
    }

    /// The process id of the anvil process.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The last lines anvil printed, for diagnostics.
    pub fn output(&self) -> String {
        self.output.text()
    }
}

/// The port in anvil's `Listening on 127.0.0.1:PORT` line.
fn listening_port(line: &str) -> Option<u16> {
    line.trim().strip_prefix("Listening on ")?.rsplit(':').next()?.parse().ok()
}

/// The dev accounts' private keys from anvil's `--config-out` file, written before it
/// listens.
fn read_dev_keys(path: &std::path::Path) -> Result<Vec<PrivateKeySigner>, AnvilError> {
    #[derive(serde::Deserialize)]
    struct Config {
        private_keys: Vec<String>,
    }
    let bad = |detail: String| AnvilError::BadReport { what: "dev keys (--config-out)", detail };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let config: Config = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    config.private_keys.iter().map(|key| key.parse().map_err(|e| bad(format!("{e}")))).collect()
}

#[cfg(test)]
mod tests {
    use super::listening_port;

    #[test]
    fn reads_the_port_from_anvils_listening_line() {
        assert_eq!(listening_port("Listening on 127.0.0.1:45055"), Some(45055));
        assert_eq!(listening_port("  Listening on 127.0.0.1:8545 "), Some(8545));
        assert_eq!(listening_port("Listening on 127.0.0.1:notaport"), None);
        assert_eq!(listening_port("Private Keys"), None);
    }
}
