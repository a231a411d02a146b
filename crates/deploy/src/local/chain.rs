//! A throwaway local chain (anvil) for a local service, listening where the nodes can
//! reach it. Its funded dev keys come from the file anvil writes, never from this
//! project's files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use super::{sys, tools};
use crate::error::{DeployError, Result};

/// How a local chain mines and what it keeps.
#[derive(Clone, Debug, Default)]
pub struct LocalChainOptions {
    /// A block every this long (anvil's interval mining), as on a real chain; `None`: a
    /// block per transaction, at once.
    pub block_time: Option<Duration>,
    /// Write the chain's state (accounts, blocks, transactions and receipts) to
    /// [`LocalChain::STATE_FILE`] in its directory when stopped with [`LocalChain::stop`],
    /// so it can be loaded again ([`LocalChainOptions::load_state`]) and checked.
    pub dump_state: bool,
    /// Start from a state an earlier chain dumped.
    pub load_state: Option<PathBuf>,
}

/// A running anvil, killed when dropped.
#[derive(Debug)]
pub struct LocalChain {
    child: Child,
    url: String,
    keys: Vec<PrivateKeySigner>,
    log: PathBuf,
    state: Option<PathBuf>,
}

impl LocalChain {
    /// The file in the chain's directory its state is dumped to.
    pub const STATE_FILE: &str = "chain-state.json";

    /// Starts anvil on `host` (a free port) with `accounts` funded dev accounts, its
    /// output going to `dir/anvil.log`.
    ///
    /// # Errors
    /// anvil missing, not starting, or not listening within `timeout`.
    pub async fn start(
        host: IpAddr,
        accounts: usize,
        dir: &Path,
        options: &LocalChainOptions,
        timeout: Duration,
    ) -> Result<Self> {
        let program = tools::locate("anvil", "BR2K_ANVIL", &tools::installed_foundry("anvil"))?;
        std::fs::create_dir_all(dir).map_err(|e| DeployError::io(format!("create {}", dir.display()), e))?;
        let config = dir.join("anvil-accounts.json");
        let log = dir.join("anvil.log");
        let mut command = Command::new(&program);
        command
            .args(["--host", &host.to_string(), "--port", "0", "--accounts", &accounts.max(10).to_string()])
            .arg("--config-out")
            .arg(&config)
            .args(options.block_time.map(|t| format!("--block-time={}", t.as_secs_f64())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let state = options.dump_state.then(|| dir.join(Self::STATE_FILE));
        if let Some(state) = &state {
            command.arg("--dump-state").arg(state);
        }
        if let Some(load) = &options.load_state {
            command.arg("--load-state").arg(load);
        }
        sys::prepare_child(&mut command, None);
        let mut child = command.spawn().map_err(|e| DeployError::io(format!("start {}", program.display()), e))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut file =
            tokio::fs::File::create(&log).await.map_err(|e| DeployError::io(format!("create {}", log.display()), e))?;
        let (port_tx, port_rx) = tokio::sync::oneshot::channel();
        // One task copies anvil's output into its log and reports the port once.
        tokio::spawn(async move {
            let mut port_tx = Some(port_tx);
            let mut out = BufReader::new(stdout).lines();
            let mut err = BufReader::new(stderr).lines();
            let (mut out_open, mut err_open) = (true, true);
            while out_open || err_open {
                let line = tokio::select! {
                    line = out.next_line(), if out_open => line.ok().flatten().or_else(|| { out_open = false; None }),
                    line = err.next_line(), if err_open => line.ok().flatten().or_else(|| { err_open = false; None }),
                };
                let Some(line) = line else { continue };
                if let Some(port) = listening_port(&line)
                    && let Some(tx) = port_tx.take()
                {
                    let _ = tx.send(port);
                }
                let _ = file.write_all(line.as_bytes()).await;
                let _ = file.write_all(b"\n").await;
            }
        });
        let port = match tokio::time::timeout(timeout, port_rx).await {
            Ok(Ok(port)) => port,
            Ok(Err(_)) => {
                let status = child.wait().await.map_or_else(|e| e.to_string(), |s| s.to_string());
                return Err(DeployError::Exited { what: "anvil".into(), status, log: Some(log) });
            }
            Err(_) => return Err(DeployError::NotReady { what: "anvil".into(), timeout, log: Some(log) }),
        };
        let keys = read_keys(&config)?;
        let url = format!("http://{host}:{port}");
        Ok(Self { child, url, keys, log, state })
    }

    /// Stops the chain as anvil is meant to be stopped (SIGTERM), so that it writes its
    /// state when asked to ([`LocalChainOptions::dump_state`]); returns where.
    ///
    /// # Errors
    /// anvil did not exit within `timeout`, or the state file is missing after it did.
    pub async fn stop(mut self, timeout: Duration) -> Result<Option<PathBuf>> {
        if let Some(pid) = self.child.id() {
            sys::send(pid, sys::Signal::Terminate).map_err(|e| DeployError::io("stopping anvil", e))?;
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => return Err(DeployError::NotReady { what: "anvil to exit".into(), timeout, log: Some(self.log) }),
        }
        if let Some(state) = &self.state
            && !state.exists()
        {
            return Err(DeployError::Invalid(format!(
                "anvil exited without writing its state to {} (see {})",
                state.display(),
                self.log.display()
            )));
        }
        Ok(self.state.take())
    }

    /// Its JSON-RPC URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Dev account `i`'s key (funded).
    ///
    /// # Panics
    /// If there are not that many accounts (there are at least 10).
    pub fn key(&self, i: usize) -> PrivateKeySigner {
        self.keys[i].clone()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// The port in anvil's `Listening on HOST:PORT` line.
fn listening_port(line: &str) -> Option<u16> {
    line.trim().strip_prefix("Listening on ")?.rsplit(':').next()?.parse().ok()
}

fn read_keys(path: &Path) -> Result<Vec<PrivateKeySigner>> {
    #[derive(serde::Deserialize)]
    struct Accounts {
        private_keys: Vec<String>,
    }
    let bad = |detail: String| DeployError::Invalid(format!("anvil's account file {}: {detail}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let accounts: Accounts = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    accounts.private_keys.iter().map(|k| k.parse().map_err(|e| bad(format!("{e}")))).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_port() {
        assert_eq!(super::listening_port("Listening on 10.213.4.1:41235"), Some(41235));
        assert_eq!(super::listening_port("Private Keys"), None);
    }
}
