//! `br2k-payments`: one replica of the payment service.

use std::path::PathBuf;
use std::time::Duration;

use alloy::primitives::Address;
use anyhow::{Context, Result, bail};
use br2k_payments::{Ledger, Settings, service};
use br2k_replica_cli::{
    CRASH_AT_ENV, ReplicaArgs, crash_at_tx_step, init_logging, keystore_key, parse_key, secret, shutdown_signal,
    sigkill_self,
};
use br2k_replication::OutboxConfig;
use clap::Parser;

const AFTER_HELP: &str = "\
Routes: POST /grants {\"user\", \"amount\"} (operator token), POST /payouts {\"user\", \"amount\"}
(operator token, or the user's signature in Br2k-Payout-Signature), POST /deposits {\"hash\"},
GET /accounts. See examples/payments/README.md.

Keys: the service's transaction key (it holds the tokens and pays) comes from
BR2K_OUTBOX_KEY, --outbox-key-file (mode 0600) or --outbox-keystore with
--outbox-password-file: the same on every replica, used by nothing else (the outbox owns
its nonces). The replica's operator key (to publish its location in the registry) comes
from ETH_PRIVATE_KEY or --keystore with --password-file. Grants need the operator token
(BR2K_OPERATOR_TOKEN or --operator-token-file).

Fault tests: BR2K_CRASH_AT=stored (or reserving, broadcast, settled) makes the process
SIGKILL itself the first time a payout's transaction reaches that step. Never in production.

Example (3 replicas, one of them):
  br2k-payments --replica n1 --etcd http://127.0.0.1:2379 --listen 127.0.0.1:8081 \\
    --data-dir /var/lib/payments/n1 --token 0x5FbD... --outbox-key-file /etc/payments/key \\
    --operator-token-file /etc/payments/operator --registry 0xe7f1... --rpc-url http://127.0.0.1:8545";

/// One replica of the br2k payment service: grants (Replication), payouts (only-once,
/// sent through the transaction outbox: paid at most once through any leader change) and
/// deposits (External_TXN, verified on chain), over a token contract. Run one per node,
/// each next to its own etcd member.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, after_help = AFTER_HELP)]
struct Args {
    /// Service name, as registered in the service registry.
    #[arg(long, env = "BR2K_SERVICE", default_value = "payments")]
    service: String,
    /// The token contract the service pays and takes deposits in.
    #[arg(long, env = "BR2K_TOKEN")]
    token: Address,
    /// A file (mode 0600) holding the service's transaction key (hex); or set BR2K_OUTBOX_KEY.
    #[arg(long, value_name = "PATH", conflicts_with = "outbox_keystore")]
    outbox_key_file: Option<PathBuf>,
    /// The service's transaction key from an encrypted JSON keystore (`cast wallet import`,
    /// geth), instead of BR2K_OUTBOX_KEY or --outbox-key-file.
    #[arg(long, value_name = "PATH")]
    outbox_keystore: Option<PathBuf>,
    /// A file (mode 0600) holding --outbox-keystore's password.
    #[arg(long, value_name = "PATH", requires = "outbox_keystore")]
    outbox_password_file: Option<PathBuf>,
    /// A file (mode 0600) holding the token operators send to grant credit; or set
    /// BR2K_OPERATOR_TOKEN.
    #[arg(long, value_name = "PATH")]
    operator_token_file: Option<PathBuf>,
    /// An RPC endpoint of the chain payouts are sent on and deposits verified on; give it
    /// several times (or comma-separated in the variable) for several providers of that
    /// chain: payouts are broadcast to all of them, reads go to the first healthy one and
    /// fail over [default: --rpc-url].
    #[arg(long, env = "BR2K_PAYMENTS_RPC_URL", value_name = "URL", value_delimiter = ',', hide_env_values = true)]
    payments_rpc_url: Vec<String>,
    /// Blocks a payout or a deposit must be under before it counts.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    confirmations: u64,
    /// Seconds a payout may stay unmined before it is replaced with higher fees (same nonce).
    #[arg(long, value_name = "SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    bump_after: u64,
    /// The most a replacement may pay, as a multiple of the first version's fees; at the cap
    /// a lingering payout is rebroadcast as it is and stays in doubt until the chain takes it.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    max_fee_multiple: u32,
    /// Seconds a payout waits for its receipt before it is left in doubt (and settled later);
    /// keep it under --handler-timeout.
    #[arg(long, value_name = "SECONDS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    settle_within: u64,
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
    if args.settle_within >= args.replica.handler_timeout {
        bail!(
            "--settle-within ({} s) must be under --handler-timeout ({} s): a payout waiting for its receipt must not \
             count as a stuck handler",
            args.settle_within,
            args.replica.handler_timeout
        );
    }
    let signer = match &args.outbox_keystore {
        Some(keystore) => keystore_key(keystore, args.outbox_password_file.as_deref(), "--outbox-keystore")?,
        None => {
            let Some(key) = secret("BR2K_OUTBOX_KEY", args.outbox_key_file.as_deref(), "outbox key")? else {
                bail!(
                    "the service's transaction key is missing: set BR2K_OUTBOX_KEY, or pass --outbox-key-file (mode \
                     0600) or --outbox-keystore with --outbox-password-file"
                );
            };
            parse_key(&key, "the outbox key (BR2K_OUTBOX_KEY / --outbox-key-file)")?
        }
    };
    let Some(operator_token) = secret("BR2K_OPERATOR_TOKEN", args.operator_token_file.as_deref(), "operator token")?
    else {
        bail!("the operator token is missing: set BR2K_OPERATOR_TOKEN or pass --operator-token-file (mode 0600)");
    };
    let mut config = args.replica.config(&args.service).await?;
    let settings = Settings { token: args.token, service: signer.address(), confirmations: args.confirmations };
    let mut outbox = OutboxConfig::new(args.replica.rpc_url.clone(), signer);
    if !args.payments_rpc_url.is_empty() {
        outbox.rpc_urls.clone_from(&args.payments_rpc_url);
    }
    outbox.confirmations = args.confirmations;
    outbox.bump_after = Duration::from_secs(args.bump_after);
    outbox.max_fee_multiple = args.max_fee_multiple;
    outbox.settle_within = Duration::from_secs(args.settle_within);
    config.outbox = Some(outbox);
    let data_dir = &args.replica.data_dir;
    let ledger = Ledger::open(data_dir, settings)
        .with_context(|| format!("cannot open the ledger in {}", data_dir.display()))?;
    tracing::info!(service = %settings.service, token = %settings.token, "paying from the service's key");
    let mut builder = service(config, operator_token);
    if let Some(crash_at) = crash_at_tx_step()? {
        builder = builder.on_tx_step(move |step, index| async move {
            if step == crash_at {
                tracing::warn!(index, step = step.name(), "{CRASH_AT_ENV}: SIGKILL");
                sigkill_self();
            }
        });
    }
    let replica = builder.build(ledger)?;
    replica.serve(shutdown_signal()).await?;
    Ok(())
}
