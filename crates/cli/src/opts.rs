//! Option groups shared by the commands, named as Foundry names them so a user's habits
//! carry over (`--rpc-url`/`ETH_RPC_URL`, `--private-key`, `--keystore`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, Result, bail};
use br2k_replication::SnapshotPolicy;
use br2k_resolver::{Chain, RegistryClient, Timeouts};
use clap::Args;

use crate::deployments::Deployments;
use crate::output::Output;

/// Which chain, and how long to wait for it.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Chain")]
pub(crate) struct ChainOpts {
    /// The RPC endpoint: http(s):// or ws(s):// (WebSocket makes `watch` push-based).
    #[arg(long, env = "ETH_RPC_URL", value_name = "URL", default_value = "http://127.0.0.1:8545", global = true)]
    pub(crate) rpc_url: String,

    /// Seconds to wait for one RPC request.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub(crate) rpc_timeout: u64,

    /// Seconds to wait for a sent transaction to be mined.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub(crate) tx_timeout: u64,
}

impl ChainOpts {
    fn timeouts(&self) -> Timeouts {
        Timeouts { rpc: Duration::from_secs(self.rpc_timeout), tx: Duration::from_secs(self.tx_timeout) }
    }

    /// Connects, signing with `signer` when given.
    pub(crate) async fn connect(&self, signer: Option<PrivateKeySigner>) -> Result<Chain> {
        Ok(Chain::connect(&self.rpc_url, signer, self.timeouts()).await?)
    }
}

/// The key that signs transactions. Read commands need none.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Wallet")]
pub(crate) struct WalletOpts {
    /// Raw private key (hex). Prefer the environment variable or a keystore: a flag is
    /// visible to other users of this machine in the process list.
    #[arg(long, env = "ETH_PRIVATE_KEY", value_name = "HEX", hide_env_values = true, global = true)]
    pub(crate) private_key: Option<String>,

    /// Encrypted JSON keystore (as written by `cast wallet import` or geth).
    #[arg(long, env = "ETH_KEYSTORE", value_name = "PATH", conflicts_with = "private_key", global = true)]
    pub(crate) keystore: Option<PathBuf>,

    /// File holding the keystore's password; it must not be readable by group or others (chmod 600).
    #[arg(long, env = "ETH_PASSWORD_FILE", value_name = "PATH", requires = "keystore", global = true)]
    pub(crate) password_file: Option<PathBuf>,
}

impl WalletOpts {
    /// The configured key, if any.
    pub(crate) fn signer(&self) -> Result<Option<PrivateKeySigner>> {
        if let Some(hex) = &self.private_key {
            // Never echo the value: it is a secret.
            let key = hex.trim().parse::<PrivateKeySigner>().map_err(|_| {
                anyhow::anyhow!("--private-key/ETH_PRIVATE_KEY is not a private key: expected 32 bytes of hex (64 hex digits, 0x optional)")
            })?;
            return Ok(Some(key));
        }
        let Some(keystore) = &self.keystore else { return Ok(None) };
        let Some(password_file) = &self.password_file else {
            bail!(
                "--keystore {} needs --password-file (or ETH_PASSWORD_FILE): a file holding its password, chmod 600",
                keystore.display()
            );
        };
        let password = read_secret_file(password_file, "password")?;
        let key =
            PrivateKeySigner::decrypt_keystore(keystore, password.trim_end_matches(['\r', '\n'])).map_err(|e| {
                anyhow::anyhow!("could not decrypt the keystore {}: {e} (wrong password file?)", keystore.display())
            })?;
        Ok(Some(key))
    }

    /// The configured key; an error naming the options when there is none.
    pub(crate) fn require_signer(&self, action: &str) -> Result<PrivateKeySigner> {
        self.signer()?.with_context(|| {
            format!("{action} sends a transaction and needs a key: set ETH_PRIVATE_KEY, or pass --private-key or --keystore with --password-file")
        })
    }
}

/// Reads a file holding a secret (`what`: "password", "admin token"), refusing one that
/// others can read.
pub(crate) fn read_secret_file(path: &Path, what: &str) -> Result<String> {
    let metadata =
        std::fs::metadata(path).with_context(|| format!("cannot read the {what} file {}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "the {what} file {} is readable by others (mode {mode:03o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} file {}", path.display()))
}

/// A service name as given on the command line: refused at once, before anything is
/// started or registered, unless it follows the rule replicas hold names to.
pub(crate) fn parse_service_name(name: &str) -> std::result::Result<String, String> {
    if br2k_replication::is_valid_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!("a service name must be {}", br2k_replication::NAME_RULE))
    }
}

/// The replicas' admin token, for their admin routes (`/br2k/tx`, `/br2k/backup`).
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct AdminTokenArg {
    /// A file (mode 0600) holding the replicas' admin token; or set BR2K_ADMIN_TOKEN.
    /// Replicas take it the same way; without one their admin routes are closed.
    #[arg(long, value_name = "PATH")]
    pub(crate) admin_token_file: Option<PathBuf>,
}

impl AdminTokenArg {
    /// The token, if one is given.
    ///
    /// # Errors
    /// The file cannot be read or others can read it.
    pub(crate) fn token(&self) -> Result<Option<String>> {
        match std::env::var("BR2K_ADMIN_TOKEN") {
            Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_owned())),
            _ => match &self.admin_token_file {
                Some(path) => Ok(Some(read_secret_file(path, "admin token")?.trim().to_owned())),
                None => Ok(None),
            },
        }
    }

    /// The token; an error saying how to give it when none is.
    ///
    /// # Errors
    /// None given, or the file cannot be read or others can read it.
    pub(crate) fn require(&self) -> Result<String> {
        self.token()?.with_context(|| {
            "the replicas' admin routes need their admin token: set BR2K_ADMIN_TOKEN or pass --admin-token-file \
             (mode 0600)"
        })
    }
}

/// Which registry.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Registry")]
pub(crate) struct RegistryOpts {
    /// The ServiceRegistry's address. Without it, the address recorded for the chain in
    /// the deployments directory by `br2k service-registry deploy`.
    #[arg(long, env = "BR2K_REGISTRY", value_name = "ADDRESS", value_parser = parse_address, global = true)]
    pub(crate) registry: Option<Address>,

    /// Where `br2k service-registry deploy` records registries, one `<chain-id>.json` per chain.
    #[arg(long, env = "BR2K_DEPLOYMENTS", value_name = "DIR", default_value = "deployments", global = true)]
    pub(crate) deployments: PathBuf,
}

impl RegistryOpts {
    /// The registry on `chain`: `--registry`, else the deployments file. When the file
    /// records that registry, its deployment block bounds the event history read later.
    pub(crate) async fn open(&self, chain: &Chain, out: &Output) -> Result<RegistryClient> {
        let chain_id = chain.chain_id();
        let deployments = Deployments::new(&self.deployments);
        let file = deployments.path(chain_id);
        let loaded = deployments.load(chain_id);
        let (address, recorded) = match self.registry {
            // A given address needs no file; a broken file only matters when it is needed.
            Some(address) => (address, loaded.ok().flatten()),
            None => {
                let recorded = loaded?.with_context(|| {
                    format!("no registry on chain {chain_id}: run `br2k service-registry deploy` or pass --registry (or set BR2K_REGISTRY)")
                })?;
                out.progress(format_args!("using the registry {} recorded in {}", recorded.address, file.display()));
                (recorded.address, Some(recorded))
            }
        };
        let registry = match chain.registry(address).await {
            Err(br2k_resolver::Error::NoRegistry { .. }) if self.registry.is_none() => bail!(
                "the registry {address} recorded in {} is not on chain {chain_id} (was the chain restarted?): deploy again with `br2k service-registry deploy`, or pass --registry",
                file.display()
            ),
            other => other?,
        };
        let deployed_in = recorded.filter(|r| r.address == address).map_or(0, |r| r.block);
        Ok(registry.deployed_in(deployed_in))
    }
}

/// Parses an Ethereum address, saying what one looks like when the text is not one.
pub(crate) fn parse_address(text: &str) -> Result<Address, String> {
    text.trim().parse::<Address>().map_err(|_| {
        format!("{text:?} is not an address: expected 0x followed by 40 hex digits, e.g. 0x5FbDB2315678afecb367f032d93F642f64180aa3")
    })
}

/// How often a service backs up, records a backup on chain, and which backups it keeps.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Backups")]
pub(crate) struct BackupScheduleOpts {
    /// Seconds between two backups the leader pushes to the service's container registry:
    /// what a total disaster can lose. Each uploads only the entries since the last one.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) backup_interval: u64,

    /// Seconds between two backups recorded on chain (one transaction each, about 64,000
    /// gas). Backups between two records are signed by the leader's operator key, and a
    /// restore takes the newest signed one that links back to the recorded one, so this
    /// sets the gas, not what a disaster can lose.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub(crate) backup_record_interval: u64,

    /// The newest backups kept in the registry; older ones are deleted (except the one the
    /// chain records and those after it). The registry's garbage collection frees their blobs.
    #[arg(long, value_name = "N", default_value_t = 48, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub(crate) backup_keep_last: u64,

    /// Days (counting back from the newest that has a backup) whose newest backup is kept.
    #[arg(long, value_name = "D", default_value_t = 7, value_parser = clap::value_parser!(u64).range(0..=3650))]
    pub(crate) backup_keep_daily: u64,
}

impl BackupScheduleOpts {
    /// The schedule handed to the replicas.
    pub(crate) const fn schedule(&self) -> br2k_deploy::backup_schedule::BackupSchedule {
        br2k_deploy::backup_schedule::BackupSchedule {
            interval: self.backup_interval,
            record_interval: self.backup_record_interval,
            keep_last: self.backup_keep_last,
            keep_daily: self.backup_keep_daily,
        }
    }
}

/// The replicas `br2k up` and `br2k testbed` run on this machine.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Local replicas")]
pub(crate) struct LocalReplicaOpts {
    /// How many replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub(crate) replicas: u64,

    /// The app binary, built on br2k-replication [default: br2k-logserver next to this br2k].
    #[arg(long, value_name = "PATH")]
    app: Option<PathBuf>,

    /// Where the nodes run: auto (namespaces as root, loopback otherwise), namespaces, loopback.
    #[arg(long, default_value = "auto")]
    pub(crate) network: br2k_deploy::local::NetworkMode,

    /// etcd's election timeout in milliseconds (etcd's default: 1000).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=50_000))]
    pub(crate) election_timeout: u64,

    /// Applied entries between two snapshots of each replica's state. The leader then
    /// deletes the log below its snapshot (minus --trailing-entries) from etcd, so etcd
    /// stays the same size for the life of the service. 0 turns snapshots and compaction off.
    #[arg(long, value_name = "ENTRIES", default_value_t = SnapshotPolicy::default().interval)]
    snapshot_interval: u64,

    /// Log entries kept in etcd below the leader's latest snapshot: a replica less than
    /// this far behind replays them instead of fetching a snapshot. Smaller than
    /// --snapshot-interval.
    #[arg(long, value_name = "ENTRIES", default_value_t = SnapshotPolicy::default().trailing)]
    trailing_entries: u64,
}

impl LocalReplicaOpts {
    /// The app binary: `--app`, else the log server built next to this `br2k`.
    pub(crate) fn app(&self) -> Result<PathBuf> {
        self.app_or("br2k-logserver")
    }

    /// The app binary: `--app`, else `name` built next to this `br2k`.
    pub(crate) fn app_or(&self, name: &str) -> Result<PathBuf> {
        match &self.app {
            Some(app) => Ok(app.clone()),
            None => br2k_deploy::local::sibling_binary(name).with_context(|| {
                format!("{name} is not next to this br2k: build it (`cargo build -p {name}`) or pass --app")
            }),
        }
    }

    /// `--replicas` as a count.
    pub(crate) fn count(&self) -> usize {
        usize::try_from(self.replicas).unwrap_or(usize::MAX)
    }

    /// `--snapshot-interval` and `--trailing-entries`, checked.
    pub(crate) fn snapshots(&self) -> Result<SnapshotPolicy> {
        let policy = SnapshotPolicy { interval: self.snapshot_interval, trailing: self.trailing_entries };
        policy.check().map_err(|e| anyhow::anyhow!("--trailing-entries: {e}"))?;
        Ok(policy)
    }
}
