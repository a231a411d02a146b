//! `br2k backup ls|now|restore|reset NAME`: a service's backups in its container registry,
//! and the one the chain records.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_deploy::deployment::DeploymentRecord;
use br2k_oci::registry::{RegistryClient, RegistryList};
use br2k_resolver::RegistryClient as ServiceRegistry;
use clap::{Args, Subcommand};
use serde_json::json;

use super::GlobalOpts;
use super::image::StoreArg;

#[derive(Subcommand, Debug)]
pub(crate) enum BackupCommand {
    /// List the service's backups in its container registry, newest first, marking the one
    /// recorded on chain and those signed by the leader (a restore uses the newest signed
    /// one linked to the recorded one).
    Ls(BackupArgs),
    /// Ask the service's leader for a backup now, and wait until the chain records one
    /// that reaches the leader's service state at the time of asking.
    Now(NowArgs),
    /// Deploy a copy of the service as it was at a retained index, under a new name (to
    /// inspect the past, or to replace the original on purpose); the running service is
    /// never touched.
    #[command(after_help = RESTORE_EXAMPLES)]
    Restore(Box<RestoreArgs>),
    /// Clear the backup the chain records for the service (manager only). The way out when
    /// a leaked operator key recorded an index no leader can exceed (the status shows
    /// "backup index on chain above the service's") or an artifact no one should restore:
    /// remove that operator first, then reset; the leader records its next backup as usual.
    Reset(ResetArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ResetArgs {
    /// The service name.
    name: String,
}

impl ResetArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry_signed("resetting a backup record").await?;
        let before = registry.backup(&self.name).await?;
        out.progress(format_args!(
            "clearing {:?}'s backup record ({}) ...",
            self.name,
            before.as_ref().map_or("none recorded".to_owned(), |b| format!("index {}", b.index))
        ));
        let tx = registry.reset_backup(&self.name).await?;
        out.transaction(
            &format!("{:?} has no backup recorded; its leader records the next one", self.name),
            tx,
            json!({ "service": self.name, "previous_index": before.map(|b| b.index) }),
        )
    }
}

const RESTORE_EXAMPLES: &str = "\
Examples:
  br2k backup ls ledger                                   # which indexes are retained
  br2k backup restore ledger --to-index 1200 --as ledger-at-1200
  br2k down --name ledger-at-1200                         # when done looking

The copy is registered on chain with this key as its manager and the original's recovery
info (image, replicas; --context to put it elsewhere). Its first backup is the original's
at exactly --to-index, cut from the oldest kept backup that reaches it (signed by an
operator of the original); the copy's replicas start from it and go on from there.";

#[derive(Args, Debug)]
pub(crate) struct RestoreArgs {
    /// The service to copy.
    name: String,
    /// The index the copy holds everything up to, and nothing after.
    #[arg(long, value_name = "N")]
    to_index: u64,
    /// The copy's name (a new service: refused if the registry knows it).
    #[arg(long = "as", value_name = "NEW_NAME", value_parser = crate::opts::parse_service_name)]
    copy: String,
    /// Where the copy runs [default: where the original's recovery info says].
    #[arg(long)]
    context: Option<String>,
    #[command(flatten)]
    backend: crate::backends::BackendOpts,
    #[command(flatten)]
    store: StoreArg,
    #[command(flatten)]
    config: super::context::DirArg,
}

#[derive(Args, Debug)]
pub(crate) struct BackupArgs {
    /// The service name.
    name: String,
    #[command(flatten)]
    store: StoreArg,
}

#[derive(Args, Debug)]
pub(crate) struct NowArgs {
    /// The service name.
    name: String,
    /// How long to wait for the backup to be recorded on chain (and, when the leader took
    /// one on demand less than a backup interval ago, for the interval to pass).
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
    #[command(flatten)]
    admin: crate::opts::AdminTokenArg,
}

impl BackupCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        match self {
            Self::Ls(args) => args.run(global).await,
            Self::Now(args) => args.run(global).await,
            Self::Restore(args) => args.run(global).await,
            Self::Reset(args) => args.run(global).await,
        }
    }
}

impl BackupArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry().await?;
        let info = registry.info(&self.name).await?;
        let record = DeploymentRecord::from_body(&info.recovery)
            .with_context(|| format!("{:?} has no container registry in its recovery info", self.name))?;
        let registries = RegistryList::new(self.store.store.join("registry.json"));
        let client: RegistryClient = registries.entry_for_url(&record.image.registry_url)?.client()?;
        let recorded = registry.backup(&self.name).await?;
        let recorded_digest = recorded.as_ref().map(|b| format!("sha256:{}", alloy::hex::encode(b.digest)));
        let mut backups = Vec::new();
        let tags = client.tags(&record.image.repository).await?;
        for tag in &tags {
            let Some(index) = br2k_replication::backup::manifest::tag_index(&self.name, tag) else { continue };
            let digest = client.manifest_digest(&record.image.repository, tag).await?;
            // Whether it carries a signature (a restore checks whose it is).
            let types = [br2k_replication::backup::BACKUP_TYPE, br2k_replication::backup::BACKUP_TYPE_V1];
            let manifest = client.pull_artifact_manifest(&record.image.repository, &digest, &types).await?;
            let signed = manifest.annotations.contains_key("io.br2k.signature");
            backups.push((index, digest, signed));
        }
        backups.sort_by_key(|(index, ..)| std::cmp::Reverse(*index));
        let mut text = format!("backups of {:?} in {}/{}:\n", self.name, client.host(), record.image.repository);
        if backups.is_empty() {
            text.push_str("  none\n");
        }
        for (index, digest, signed) in &backups {
            let mark = if Some(digest) == recorded_digest.as_ref() {
                "  <- recorded on chain"
            } else if *signed {
                "  signed"
            } else {
                ""
            };
            text.push_str(&format!("  index {index:>10}  {digest}{mark}\n"));
        }
        match &recorded {
            Some(b) => text.push_str(&format!("recorded on chain: index {} at {}\n", b.index, b.artifact)),
            None => text.push_str("recorded on chain: none\n"),
        }
        let json = json!({
            "service": self.name,
            "repository": format!("{}/{}", client.host(), record.image.repository),
            "backups": backups.iter().map(|(index, digest, signed)| json!({
                "index": index, "digest": digest, "recorded": Some(digest) == recorded_digest.as_ref(),
                "signed": signed,
            })).collect::<Vec<_>>(),
            "recorded": recorded.as_ref().map(|b| json!({
                "index": b.index, "digest": recorded_digest, "artifact": b.artifact, "recordedAt": b.recorded_at,
            })),
        });
        out.result(text.trim_end(), &json)
    }
}

impl RestoreArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        if self.copy == self.name {
            bail!(
                "--as must name a new service, not {:?} itself: a restore never touches the running service",
                self.name
            );
        }
        let key = global.wallet.require_signer("registering the copy")?;
        let registry = global.registry.open(&global.chain.connect(Some(key.clone())).await?, &out).await?;
        if registry.info(&self.copy).await.is_ok() {
            bail!("{:?} is already a service in the registry: choose a name no service has", self.copy);
        }
        let info = registry.info(&self.name).await?;
        let mut record = DeploymentRecord::from_body(&info.recovery)
            .with_context(|| format!("{:?} has no container registry in its recovery info", self.name))?;
        let registries = RegistryList::new(self.store.store.join("registry.json"));
        let client: RegistryClient = registries.entry_for_url(&record.image.registry_url)?.client()?;
        out.progress(format_args!(
            "backup restore: cutting {}'s backups at index {} as {}'s first backup",
            self.name, self.to_index, self.copy
        ));
        let point = br2k_replication::backup::point::cut_for_copy(
            &client,
            &record.image.repository,
            &registry,
            &self.name,
            self.to_index,
            &self.copy,
        )
        .await?;
        out.progress(format_args!(
            "backup restore: from the backup at {} ({}): {}",
            point.source.0, point.source.1, point.artifact
        ));
        if let Some(context) = &self.context {
            record.context.clone_from(context);
        }
        br2k_deploy::deployment::record(&registry, &self.copy, &record, key.address()).await?;
        let hash = point
            .digest
            .strip_prefix("sha256:")
            .and_then(|h| h.parse().ok())
            .with_context(|| format!("the registry reported an odd digest {}", point.digest))?;
        registry.record_backup(&self.copy, self.to_index, hash, &point.artifact).await?;
        out.progress(format_args!(
            "backup restore: {} registered, its backup recorded on chain; deploying it",
            self.copy
        ));
        let deploy =
            super::deploy::DeployArgs::recorded(self.copy, self.context, self.backend, self.store, self.config);
        deploy.run(global).await
    }
}

impl NowArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let registry = global.open_registry().await?;
        let location = registry.service_location(&self.name).await?.location;
        if location.is_empty() {
            bail!("{:?} has no published location: is it running?", self.name);
        }
        let token = self.admin.require()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(self.timeout);
        let ssi = loop {
            match request_backup(&http, &location, &token).await? {
                Asked::Taken(ssi) => break ssi,
                Asked::RetryAfter(wait) if Instant::now() + wait < deadline => {
                    out.progress(format_args!(
                        "the leader took a backup on demand less than a backup interval ago; asking again in {} s ...",
                        wait.as_secs()
                    ));
                    tokio::time::sleep(wait).await;
                }
                Asked::RetryAfter(wait) => bail!(
                    "the leader takes one backup on demand per backup interval; the next in {} s, past --timeout",
                    wait.as_secs()
                ),
            }
        };
        out.progress(format_args!("the leader backs up its state at index {ssi} ..."));
        let recorded = wait_recorded(&registry, &self.name, ssi, deadline).await?;
        out.result(
            &format!("backup at index {} recorded on chain: {}", recorded.index, recorded.artifact),
            &json!({ "service": self.name, "index": recorded.index, "artifact": recorded.artifact }),
        )
    }
}

/// What the leader said to a backup asked for.
pub(crate) enum Asked {
    /// It backs up its state at this SSI.
    Taken(u64),
    /// It took one on demand within the backup interval: ask again after this.
    RetryAfter(Duration),
}

/// Asks the leader at `location` for a backup now (`POST /br2k/backup`, with the replicas'
/// admin `token`). `br2k backup now` and the dashboard's action both ask this way.
///
/// # Errors
/// The leader cannot be reached, or refuses (the token, no backups configured).
pub(crate) async fn request_backup(http: &reqwest::Client, location: &str, token: &str) -> Result<Asked> {
    let url = format!("{}/br2k/backup", location.trim_end_matches('/'));
    let answer = http.post(&url).bearer_auth(token).send().await.with_context(|| format!("asking {url}"))?;
    let status = answer.status();
    let retry_after = answer.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()?.parse().ok());
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    let reason = body["error"].as_str().unwrap_or("(no reason given)");
    match status.as_u16() {
        202 => Ok(Asked::Taken(body["ssi"].as_u64().unwrap_or(0))),
        429 => Ok(Asked::RetryAfter(Duration::from_secs(retry_after.unwrap_or(1)))),
        401 | 403 | 404 if reason.contains("admin") => bail!(
            "{url} answered {status}: {reason} (the replicas' admin token: BR2K_ADMIN_TOKEN or --admin-token-file)"
        ),
        _ => bail!("{url} answered {status}: {reason}"),
    }
}

async fn wait_recorded(
    registry: &ServiceRegistry,
    name: &str,
    index: u64,
    deadline: Instant,
) -> Result<br2k_resolver::RecordedBackup> {
    loop {
        if let Some(recorded) = registry.backup(name).await?.filter(|b| b.index >= index) {
            return Ok(recorded);
        }
        if Instant::now() >= deadline {
            bail!(
                "no backup reaching index {index} was recorded in time; `br2k status {name}` shows why the leader's \
                 backups fail"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
