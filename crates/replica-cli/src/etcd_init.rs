//! The etcd member's init step: before a replica's etcd member starts (on Kubernetes, as
//! the Pod's init container, run from the app's own image), decide whether it keeps its
//! data, founds the cluster, or joins the running one, and write the configuration file
//! etcd then starts from.
//!
//! etcd's `--initial-cluster-state` cannot be a constant in a manifest: `new` is right
//! only once, when the service is first deployed. A member whose volume was lost later
//! and that starts `new` again either crash-loops (the others know it under an ID whose
//! data it no longer has) or, worse, comes back under the same member ID, since IDs are
//! derived from the peer URLs and the cluster token, with none of the votes it cast: a
//! member that forgets its votes can vote twice in one term, and Raft's safety is gone.
//! So, as the local backend does for a wiped node, a member with no data is removed from
//! the cluster and added again as a new, empty one (a fresh ID), and starts `existing`:
//! etcd then sends it a snapshot and the log.
//!
//! The decision:
//! - a write-ahead log in the data directory: keep it (etcd ignores the initial flags);
//! - no data, and a peer answers: remove this member if it had started before, add it
//!   unless it is listed as added but never started, and join (`existing`) with the
//!   membership the cluster gave back, written the way `etcdctl member add` prints it;
//! - no data, and no peer answers: found the cluster (`new`) only while the deployment's
//!   bootstrap hint still says `new` (the first deploy, before the service first had a
//!   leader); after that, wait for a peer and in the end fail, so that Kubernetes tries
//!   again, rather than found a second, empty cluster.
//!
//! The inputs are environment variables, so the manifest can say everything:
//! [`INIT_ENV`] (the configuration file to write), [`FLAGS_ENV`] (etcd's flags, one
//! `--name=value` per line), [`PEERS_ENV`] (the other members' client URLs),
//! [`BOOTSTRAP_FILE_ENV`] (the file holding the hint) and [`WAIT_ENV`].
//!
//! etcd started with `--config-file` ignores its other flags and environment, and it
//! ignores keys it does not know without a word: the file is written with the types and
//! nesting etcd's own configuration structure has, and the tests check that each setting
//! took effect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_replication::EtcdTls;
use serde_json::{Map, Value};

/// Set: this process is the init step, and this is where it writes etcd's configuration.
pub const INIT_ENV: &str = "BR2K_ETCD_INIT";
/// etcd's flags, one `--name=value` per line, without `--initial-cluster-state` (the
/// init step decides it).
pub const FLAGS_ENV: &str = "BR2K_ETCD_INIT_FLAGS";
/// The other members' client URLs, comma-separated, asked for the current membership.
pub const PEERS_ENV: &str = "BR2K_ETCD_INIT_PEERS";
/// A file holding `new` while the service has never had a leader, `existing` after.
pub const BOOTSTRAP_FILE_ENV: &str = "BR2K_ETCD_INIT_BOOTSTRAP_FILE";
/// Seconds to keep trying before failing (default 120).
pub const WAIT_ENV: &str = "BR2K_ETCD_INIT_WAIT";

/// Bound on each call to a peer.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Flags etcd's configuration file holds as numbers and as booleans; the rest are strings.
const NUMBER_KEYS: &[&str] = &[
    "quota-backend-bytes",
    "snapshot-count",
    "heartbeat-interval",
    "election-timeout",
    "max-snapshots",
    "max-wals",
    "max-txn-ops",
    "max-request-bytes",
];
const BOOL_KEYS: &[&str] = &[
    "pre-vote",
    "strict-reconfig-check",
    "client-cert-auth",
    "peer-client-cert-auth",
    "auto-tls",
    "peer-auto-tls",
    "enable-v2",
    "force-new-cluster",
];
/// Flags that go under `client-transport-security` (as they are) and under
/// `peer-transport-security` (as `peer-` + them, the prefix dropped there).
const TLS_KEYS: &[&str] = &["cert-file", "key-file", "trusted-ca-file", "client-cert-auth", "auto-tls"];

/// What the member starts as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Its data directory holds a member: start from it.
    Keep,
    /// Found the cluster with the members the flags list.
    New,
    /// Join the running cluster, whose membership is this `--initial-cluster`.
    Join {
        /// This member included.
        initial_cluster: String,
    },
}

/// The init step's inputs.
#[derive(Clone, Debug)]
pub struct EtcdInit {
    /// etcd's flags as `name → value` (without the leading `--`).
    pub flags: BTreeMap<String, String>,
    /// The other members' client URLs.
    pub peers: Vec<String>,
    /// The file holding the bootstrap hint.
    pub bootstrap_file: PathBuf,
    /// How long to keep trying.
    pub wait: Duration,
}

/// Runs the init step when [`INIT_ENV`] is set, and says whether it ran: an app's `main`
/// calls it first and returns when it did.
///
/// # Errors
/// Bad inputs, or no decision within the wait (the message says why and what to do).
pub async fn run_if_requested() -> Result<bool> {
    let Some(config_file) = std::env::var_os(INIT_ENV) else { return Ok(false) };
    let init = EtcdInit::from_env()?;
    let decision = init.decide().await?;
    init.write_config(Path::new(&config_file), &decision)?;
    tracing::info!(?decision, config = %Path::new(&config_file).display(), "etcd's configuration is written");
    Ok(true)
}

impl EtcdInit {
    /// The inputs from [`FLAGS_ENV`], [`PEERS_ENV`], [`BOOTSTRAP_FILE_ENV`] and [`WAIT_ENV`].
    ///
    /// # Errors
    /// A missing variable or a malformed flag.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).with_context(|| format!("the etcd init step needs {name}"));
        let flags = parse_flags(&var(FLAGS_ENV)?)?;
        let peers = var(PEERS_ENV)?.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect();
        let wait = match std::env::var(WAIT_ENV) {
            Ok(secs) => Duration::from_secs(
                secs.trim().parse().with_context(|| format!("{WAIT_ENV}={secs:?} is not a number of seconds"))?,
            ),
            Err(_) => Duration::from_secs(120),
        };
        Ok(Self { flags, peers, bootstrap_file: var(BOOTSTRAP_FILE_ENV)?.into(), wait })
    }

    fn flag(&self, name: &str) -> Result<&str> {
        self.flags.get(name).map(String::as_str).with_context(|| format!("{FLAGS_ENV} has no --{name}"))
    }

    /// Decides how the member starts (see the module's description).
    ///
    /// # Errors
    /// No peer answered and the hint says the cluster exists, or the cluster refused to
    /// change its membership, until the wait ran out.
    pub async fn decide(&self) -> Result<Decision> {
        if has_member_data(Path::new(self.flag("data-dir")?))? {
            return Ok(Decision::Keep);
        }
        let name = self.flag("name")?.to_owned();
        let peer_url = self.flag("initial-advertise-peer-urls")?.to_owned();
        let deadline = Instant::now() + self.wait;
        let mut delay = Duration::from_millis(250);
        loop {
            let reasons = match self.join(&name, &peer_url).await {
                Ok(initial_cluster) => return Ok(Decision::Join { initial_cluster }),
                Err(JoinError::NoPeer(reasons)) => {
                    if self.bootstrap_hint()? == "new" {
                        return Ok(Decision::New);
                    }
                    reasons
                }
                Err(JoinError::Refused(reason)) => vec![reason],
            };
            if Instant::now() >= deadline {
                bail!(
                    "etcd member {name} has no data and could not join its cluster within {:?}: {}. If every \
                     replica's etcd volume was lost, the cluster is gone: restore the service from its backup",
                    self.wait,
                    reasons.join("; ")
                );
            }
            tracing::info!(reasons = %reasons.join("; "), "cannot join the etcd cluster yet; trying again");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn bootstrap_hint(&self) -> Result<String> {
        let hint = std::fs::read_to_string(&self.bootstrap_file)
            .with_context(|| format!("cannot read the bootstrap hint {}", self.bootstrap_file.display()))?;
        match hint.trim() {
            hint @ ("new" | "existing") => Ok(hint.to_owned()),
            other => {
                bail!("the bootstrap hint {} says {other:?}: expected new or existing", self.bootstrap_file.display())
            }
        }
    }

    /// Through the first peer that answers: removes this member if it had started
    /// before, adds it unless it is listed as never started, and returns the membership.
    async fn join(&self, name: &str, peer_url: &str) -> Result<String, JoinError> {
        let mut reasons = Vec::new();
        for peer in &self.peers {
            let mut client = match self.connect(peer).await {
                Ok(client) => client,
                Err(e) => {
                    reasons.push(format!("{peer}: {e:#}"));
                    continue;
                }
            };
            let members = match bounded(client.member_list()).await {
                Ok(list) => list.members().to_vec(),
                Err(e) => {
                    reasons.push(format!("{peer}: {e:#}"));
                    continue;
                }
            };
            let me = members.iter().find(|m| m.peer_urls().iter().any(|u| u == peer_url));
            let refused = |what: &str, e: anyhow::Error| JoinError::Refused(format!("{peer} refused to {what}: {e:#}"));
            let (members, my_id) = match me {
                // Added before (by an earlier run of this step) but never started: join as it.
                Some(member) if member.name().is_empty() => (members.clone(), member.id()),
                started => {
                    if let Some(old) = started {
                        tracing::warn!(member = old.id(), "this member's data is lost: removing it to add it anew");
                        bounded(client.member_remove(old.id()))
                            .await
                            .map_err(|e| refused("remove the lost member", e))?;
                    }
                    let added = bounded(client.member_add([peer_url], None))
                        .await
                        .map_err(|e| refused("add this member", e))?;
                    let id = added.member().map(etcd_client::Member::id).ok_or_else(|| {
                        JoinError::Refused(format!("{peer} added this member but did not say its ID"))
                    })?;
                    (added.member_list().to_vec(), id)
                }
            };
            // As `etcdctl member add` prints it: this member under its name, the others
            // under theirs (empty for one added but not yet started).
            let initial_cluster = members
                .iter()
                .flat_map(|m| {
                    let member_name = if m.id() == my_id { name.to_owned() } else { m.name().to_owned() };
                    m.peer_urls().iter().map(move |url| format!("{member_name}={url}")).collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .join(",");
            return Ok(initial_cluster);
        }
        Err(JoinError::NoPeer(reasons))
    }

    async fn connect(&self, peer: &str) -> Result<etcd_client::Client> {
        let mut options =
            etcd_client::ConnectOptions::new().with_connect_timeout(CALL_TIMEOUT).with_timeout(CALL_TIMEOUT);
        if let (Some(ca), Some(cert), Some(key)) =
            (self.flags.get("trusted-ca-file"), self.flags.get("cert-file"), self.flags.get("key-file"))
        {
            let tls = EtcdTls { ca: ca.into(), cert: cert.into(), key: key.into() };
            options = options.with_tls(tls.options()?);
        }
        bounded(etcd_client::Client::connect([peer], Some(options))).await
    }

    /// Writes etcd's configuration file for `decision`: the flags, typed and nested as
    /// etcd reads them, with the initial cluster state (and membership, to join).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write_config(&self, path: &Path, decision: &Decision) -> Result<()> {
        let mut config = config_map(&self.flags)?;
        let state = match decision {
            Decision::New => "new",
            Decision::Keep | Decision::Join { .. } => "existing",
        };
        config.insert("initial-cluster-state".into(), state.into());
        if let Decision::Join { initial_cluster } = decision {
            config.insert("initial-cluster".into(), initial_cluster.clone().into());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text =
            serde_json::to_string_pretty(&Value::Object(config)).context("cannot encode etcd's configuration")?;
        // Written whole or not at all: etcd restarted alone (the init step runs only when
        // the Pod starts) reads it again.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text).with_context(|| format!("cannot write {}", partial.display()))?;
        std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))
    }
}

#[derive(Debug)]
enum JoinError {
    /// No peer answered; why, peer by peer.
    NoPeer(Vec<String>),
    /// A peer answered but would not change the membership (yet).
    Refused(String),
}

async fn bounded<T>(call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => bail!("no answer within {CALL_TIMEOUT:?}"),
    }
}

/// Whether `data_dir` holds a member: a write-ahead log with at least one file.
fn has_member_data(data_dir: &Path) -> Result<bool> {
    let wal = data_dir.join("member").join("wal");
    match std::fs::read_dir(&wal) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", wal.display())),
    }
}

/// `--name=value` lines (blank lines skipped) as `name → value`.
fn parse_flags(text: &str) -> Result<BTreeMap<String, String>> {
    let mut flags = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.strip_prefix("--").and_then(|l| l.split_once('=')) else {
            bail!("{FLAGS_ENV}: {line:?} is not a --name=value flag");
        };
        if name == "initial-cluster-state" || name == "config-file" {
            bail!("{FLAGS_ENV}: --{name} is the init step's to decide; leave it out");
        }
        if flags.insert(name.to_owned(), value.to_owned()).is_some() {
            bail!("{FLAGS_ENV}: --{name} is given twice");
        }
    }
    Ok(flags)
}

/// The flags as etcd's configuration file has them.
fn config_map(flags: &BTreeMap<String, String>) -> Result<Map<String, Value>> {
    let typed = |name: &str, value: &str| -> Result<Value> {
        if NUMBER_KEYS.contains(&name) {
            let number: u64 = value.parse().with_context(|| format!("--{name}={value:?} is not a whole number"))?;
            Ok(number.into())
        } else if BOOL_KEYS.contains(&name) {
            let flag: bool = value.parse().with_context(|| format!("--{name}={value:?} is not true or false"))?;
            Ok(flag.into())
        } else {
            Ok(value.into())
        }
    };
    let (mut config, mut client_tls, mut peer_tls) = (Map::new(), Map::new(), Map::new());
    for (name, value) in flags {
        let value = typed(name, value)?;
        if TLS_KEYS.contains(&name.as_str()) {
            client_tls.insert(name.clone(), value);
        } else if let Some(tls) = name.strip_prefix("peer-").filter(|n| TLS_KEYS.contains(n)) {
            peer_tls.insert(tls.to_owned(), value);
        } else {
            config.insert(name.clone(), value);
        }
    }
    for (key, tls) in [("client-transport-security", client_tls), ("peer-transport-security", peer_tls)] {
        if !tls.is_empty() {
            config.insert(key.into(), Value::Object(tls));
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_etcds_typed_and_nested_configuration() {
        let flags = parse_flags(
            "--name=s-1\n--quota-backend-bytes=1024\n--pre-vote=true\n--cert-file=/t/m.crt\n\
             --peer-cert-file=/t/p.crt\n--peer-client-cert-auth=true\n\n--auto-compaction-retention=1h\n",
        )
        .unwrap();
        let config = Value::Object(config_map(&flags).unwrap());
        assert_eq!(config["name"], "s-1");
        assert_eq!(config["quota-backend-bytes"], 1024);
        assert_eq!(config["pre-vote"], true);
        assert_eq!(config["auto-compaction-retention"], "1h");
        assert_eq!(config["client-transport-security"]["cert-file"], "/t/m.crt");
        assert_eq!(config["peer-transport-security"]["cert-file"], "/t/p.crt");
        assert_eq!(config["peer-transport-security"]["client-cert-auth"], true);
        assert!(config.get("cert-file").is_none() && config.get("peer-cert-file").is_none());
    }

    #[test]
    fn malformed_flags_are_refused_with_the_reason() {
        for (text, says) in [
            ("name=s-1", "not a --name=value flag"),
            ("--name", "not a --name=value flag"),
            ("--initial-cluster-state=new", "the init step's to decide"),
            ("--name=a\n--name=b", "given twice"),
        ] {
            let error = parse_flags(text).unwrap_err().to_string();
            assert!(error.contains(says), "{text:?}: {error}");
        }
        let flags = parse_flags("--quota-backend-bytes=2GiB").unwrap();
        assert!(config_map(&flags).unwrap_err().to_string().contains("not a whole number"));
    }
}
