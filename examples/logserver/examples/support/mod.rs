//! What the log server's benchmarks share: three `br2k-logserver` processes on an etcd
//! cluster, and finding which of them leads.

// Each benchmark uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_test_utils::{EtcdCluster, KillOnDrop};

/// The release `br2k-logserver` next to this example.
pub(crate) fn logserver_binary() -> Result<PathBuf> {
    let binary = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("br2k-logserver"))
        .context("cannot locate the target directory")?;
    if !binary.is_file() {
        bail!("{} is missing: run `cargo build --release -p br2k-logserver` first", binary.display());
    }
    Ok(binary)
}

/// Three replicas, one per member of `etcd`, with their data under `dir`.
pub(crate) struct Replicas {
    /// Their HTTP ports, in member order.
    pub(crate) ports: Vec<u16>,
    /// The processes (killed when dropped).
    children: Vec<KillOnDrop>,
}

impl Replicas {
    /// Starts one replica per member of `etcd`, each given `args` as well.
    pub(crate) fn start(binary: &Path, etcd: &EtcdCluster, dir: &Path, args: &[&str]) -> Result<Self> {
        Self::start_each(binary, etcd, dir, args, &|_| Vec::new())
    }

    /// Like [`Self::start`], replica `i` also given the environment `env(i)`.
    pub(crate) fn start_each(
        binary: &Path,
        etcd: &EtcdCluster,
        dir: &Path,
        args: &[&str],
        env: &dyn Fn(usize) -> Vec<(String, String)>,
    ) -> Result<Self> {
        let ports: Vec<u16> = (0..etcd.len())
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        let mut children = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let child = Command::new(binary)
                .args(["--replica", &format!("n{i}"), "--etcd", &etcd.endpoint(i)])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .arg("--data-dir")
                .arg(dir.join(format!("n{i}")))
                .args(args)
                .env("RUST_LOG", "warn")
                .env_remove("BR2K_REGISTRY")
                .envs(env(i))
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", binary.display()))?;
            children.push(KillOnDrop(child));
        }
        Ok(Self { ports, children })
    }

    /// Replica `i`'s process id.
    pub(crate) fn pid(&self, i: usize) -> u32 {
        self.children[i].0.id()
    }

    /// Polls each replica's `/br2k/status` until one leads; its position.
    pub(crate) async fn wait_for_leader(&self, http: &reqwest::Client) -> Result<usize> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            for (i, port) in self.ports.iter().enumerate() {
                let url = format!("http://127.0.0.1:{port}/br2k/status");
                if let Ok(response) = http.get(url).send().await
                    && let Ok(status) = response.json::<serde_json::Value>().await
                    && status["role"] == "leader"
                {
                    return Ok(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("no logserver replica became leader within 30 s")
    }
}
