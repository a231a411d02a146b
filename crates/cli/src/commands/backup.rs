//! `br2k backup ls NAME` and `br2k backup now NAME`: a service's backups in its container
//! registry, and the one the chain records.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_deploy::deployment::DeploymentRecord;
use br2k_oci::registry::{RegistryClient, RegistryList};
use br2k_resolver::RegistryClient as ServiceRegistry;
use clap::{Args, Subcommand};
use serde_json::json;

use super::GlobalOpts;
use super::image::StoreArg;

/// The tag prefix the leader pushes backups under (`br2k-backup-<index>`).
const TAG_PREFIX: &str = "br2k-backup-";

#[derive(Subcommand, Debug)]
pub(crate) enum BackupCommand {
    /// List the service's backups in its container registry, newest first, marking the one
    /// recorded on chain (the one a restore uses).
    Ls(BackupArgs),
    /// Ask the service's leader for a backup now, and wait until the chain records one
    /// that reaches the leader's service state at the time of asking.
    Now(NowArgs),
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
    /// How long to wait for the backup to be recorded on chain.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
}

impl BackupCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        match self {
            Self::Ls(args) => args.run(global).await,
            Self::Now(args) => args.run(global).await,
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
        for tag in client.tags(&record.image.repository).await? {
            let Some(index) = tag.strip_prefix(TAG_PREFIX).and_then(|i| i.parse::<u64>().ok()) else { continue };
            let digest = client.manifest_digest(&record.image.repository, &tag).await?;
            backups.push((index, digest));
        }
        backups.sort_by_key(|(index, _)| std::cmp::Reverse(*index));
        let mut text = format!("backups of {:?} in {}/{}:\n", self.name, client.host(), record.image.repository);
        if backups.is_empty() {
            text.push_str("  none\n");
        }
        for (index, digest) in &backups {
            let mark = if Some(digest) == recorded_digest.as_ref() { "  <- recorded on chain" } else { "" };
            text.push_str(&format!("  index {index:>10}  {digest}{mark}\n"));
        }
        match &recorded {
            Some(b) => text.push_str(&format!("recorded on chain: index {} at {}\n", b.index, b.artifact)),
            None => text.push_str("recorded on chain: none\n"),
        }
        let json = json!({
            "service": self.name,
            "repository": format!("{}/{}", client.host(), record.image.repository),
            "backups": backups.iter().map(|(index, digest)| json!({
                "index": index, "digest": digest, "recorded": Some(digest) == recorded_digest.as_ref(),
            })).collect::<Vec<_>>(),
            "recorded": recorded.as_ref().map(|b| json!({
                "index": b.index, "digest": recorded_digest, "artifact": b.artifact, "recordedAt": b.recorded_at,
            })),
        });
        out.result(text.trim_end(), &json)
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
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let ssi = request_backup(&http, &location).await?;
        out.progress(format_args!("the leader backs up its state at index {ssi} ..."));
        let deadline = Instant::now() + Duration::from_secs(self.timeout);
        let recorded = wait_recorded(&registry, &self.name, ssi, deadline).await?;
        out.result(
            &format!("backup at index {} recorded on chain: {}", recorded.index, recorded.artifact),
            &json!({ "service": self.name, "index": recorded.index, "artifact": recorded.artifact }),
        )
    }
}

/// Asks the leader at `location` for a backup now (`POST /br2k/backup`); the SSI it backs
/// up its state at. `br2k backup now` and the dashboard's action both ask this way.
pub(crate) async fn request_backup(http: &reqwest::Client, location: &str) -> Result<u64> {
    let url = format!("{}/br2k/backup", location.trim_end_matches('/'));
    let answer = http.post(&url).send().await.with_context(|| format!("asking {url}"))?;
    let status = answer.status();
    let body: serde_json::Value = answer.json().await.unwrap_or_default();
    if status.as_u16() != 202 {
        bail!("{url} answered {status}: {}", body["error"].as_str().unwrap_or("(no reason given)"));
    }
    Ok(body["ssi"].as_u64().unwrap_or(0))
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
