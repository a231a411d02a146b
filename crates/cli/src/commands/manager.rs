//! `br2k manager run`: the recovery daemon, run with the services' manager key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use br2k_manager::{Manager, ManagerConfig, Metrics};
use br2k_oci::registry::RegistryList;
use clap::{Args, Subcommand};

use super::GlobalOpts;
use super::context::DirArg;
use super::image::StoreArg;
use crate::backends::{BackendOpts, ContextBackends};

const MANAGER_EXAMPLES: &str = "\
Examples:
  br2k manager run                                   # every service this key manages
  br2k manager run --service logserver --probe-interval 0s   # claims only, one service
  curl -s http://127.0.0.1:9464/metrics              # claims seen, recoveries, their duration

The key (ETH_PRIVATE_KEY or --keystore) must be the services' manager (`br2k service info`).
Each step is logged on stderr with the service's name and the reason.";

#[derive(Subcommand, Debug)]
pub(crate) enum ManagerCommand {
    /// Follow claims and recover the services this key manages when they stop serving.
    Run(RunArgs),
}

impl ManagerCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        match self {
            Self::Run(args) => args.run(global).await,
        }
    }
}

/// Follow the registry's claims against the services this key manages; check each claimed
/// service (its location's health, then its replicas) and, when nothing serves it,
/// redeploy it from its recovery info (image pulled by digest, on the backend its context
/// names), wait for a new location, and mark it Running. Also probes the services on its
/// own schedule. Its block cursor and any recovery under way are kept in --state-dir, so a
/// restarted manager misses nothing and repeats nothing.
#[derive(Args, Debug)]
#[command(after_help = MANAGER_EXAMPLES)]
pub(crate) struct RunArgs {
    /// A service to look after (repeatable) [default: every service this key manages].
    #[arg(long = "service", value_name = "NAME")]
    services: Vec<String>,

    /// The journal (block cursor, recoveries under way) [default: CONFIG_DIR/manager].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// How often to probe each service without a claim; 0s turns probing off.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    probe_interval: Duration,

    /// How long replicas may run without a leader that answers before they count as dead.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,

    /// How long a redeployed service may take to answer at a new location.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    recovery_timeout: Duration,

    /// How often to read new blocks.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    poll_interval: Duration,

    /// Where a manager without a journal starts reading claims [default: the registry's
    /// deployment block].
    #[arg(long, value_name = "BLOCK")]
    from_block: Option<u64>,

    /// Serve Prometheus metrics on this address (`off` for none).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464", value_parser = parse_metrics)]
    metrics: MetricsAddr,

    #[command(flatten)]
    backend: BackendOpts,

    #[command(flatten)]
    store: StoreArg,

    #[command(flatten)]
    config: DirArg,
}

/// `--metrics`: an address, or off.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MetricsAddr(Option<SocketAddr>);

fn parse_metrics(text: &str) -> Result<MetricsAddr, String> {
    if text == "off" {
        return Ok(MetricsAddr(None));
    }
    text.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{text:?} is not an address like 127.0.0.1:9464 (or `off`): {e}"))
}

/// `90s`, `500ms`, `2m`, or a number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) =
        text.find(|c: char| !(c.is_ascii_digit() || c == '.')).map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 15s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

impl RunArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let key = global.wallet.require_signer("running the manager (it sends setState)")?;
        let registry = global.registry.open(&global.chain.connect(Some(key.clone())).await?, &out).await?;
        let registries = RegistryList::new(self.store.store.join("registry.json"));
        let config_dir = self.config.dir()?;
        let backends = ContextBackends {
            local: Arc::new(self.backend.local(&global.chain.rpc_url, &registry, &key, &registries)?),
            contexts: self.config.contexts()?,
            config_dir: config_dir.clone(),
            registries,
            opts: self.backend.clone(),
            rpc_url: global.chain.rpc_url.clone(),
            registry: registry.clone(),
            made: Mutex::new(HashMap::new()),
        };
        let mut config = ManagerConfig::new(self.state_dir.clone().unwrap_or_else(|| config_dir.join("manager")));
        config.services = self.services;
        config.probe_interval = (!self.probe_interval.is_zero()).then_some(self.probe_interval);
        config.grace = self.grace;
        config.recovery_timeout = self.recovery_timeout;
        config.poll_interval = self.poll_interval.max(Duration::from_millis(100));
        config.from_block = self.from_block;
        let metrics = Metrics::default();
        let state_dir = config.state_dir.clone();
        let manager = Manager::open(config, registry, backends, metrics.clone()).await?;
        if let MetricsAddr(Some(address)) = self.metrics {
            let listener = Metrics::bind(address).await?;
            out.progress(format_args!("manager: metrics on http://{address}/metrics"));
            tokio::spawn(async move {
                if let Err(e) = metrics.serve(listener).await {
                    tracing::warn!("the metrics server stopped: {e}");
                }
            });
        }
        out.progress(format_args!(
            "manager: key {}, journal in {}; Ctrl-C stops it",
            manager.address(),
            state_dir.display()
        ));
        let shutdown = async {
            let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler can be installed");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        };
        manager.run(shutdown).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_the_way_people_write_them() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").unwrap_err().contains("not a duration"));
        assert!(parse_metrics("off").unwrap().0.is_none());
        assert!(parse_metrics("nowhere").is_err());
    }
}
