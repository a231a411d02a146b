//! `br2k-logserver`: one replica of the paper's log server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use br2k_logserver::{LogState, service};
use br2k_replica_cli::{ReplicaArgs, init_logging, shutdown_signal};
use clap::Parser;

/// One replica of the BR2K log server. Run one per node, each next to its own etcd member;
/// the replica whose etcd member leads serves clients and publishes itself in the registry.
///
/// Example (3 replicas, one of them):
///   br2k-logserver --replica n1 --etcd http://127.0.0.1:2379 --listen 127.0.0.1:8081
///   --data-dir /var/lib/logserver/n1 --registry 0x5FbD… --rpc-url http://127.0.0.1:8545
///   (with the operator key in ETH_PRIVATE_KEY)
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Service name, as registered in the service registry.
    #[arg(long, env = "BR2K_SERVICE", default_value = "logserver")]
    service: String,
    /// Directory notifications are "sent" to (shared by the replicas) [default: DATA_DIR/outbox].
    #[arg(long, env = "BR2K_OUTBOX")]
    outbox: Option<PathBuf>,
    #[command(flatten)]
    replica: ReplicaArgs,
}

#[tokio::main]
async fn main() -> Result<()> {
    init_logging();
    // On Kubernetes this image also runs the etcd member's init step (its init container).
    if br2k_replica_cli::etcd_init::run_if_requested().await? {
        return Ok(());
    }
    let args = Args::parse();
    let config = args.replica.config(&args.service).await?;
    let data_dir = &args.replica.data_dir;
    let outbox = args.outbox.clone().unwrap_or_else(|| data_dir.join("outbox"));
    let state =
        LogState::open(data_dir, &outbox).with_context(|| format!("cannot open the log in {}", data_dir.display()))?;
    let token = args.replica.client_token()?;
    if token.is_none() {
        tracing::warn!(
            "no client token (--client-token-file or BR2K_CLIENT_TOKEN): anyone who reaches the log server can use it"
        );
    }
    let replica = service(config, token).build(state)?;
    replica.serve(shutdown_signal()).await?;
    Ok(())
}
