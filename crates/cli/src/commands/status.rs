//! `br2k status NAME`: one view of a service: what the registry says, what runs, what is
//! unsettled.

use alloy::primitives::B256;
use anyhow::Result;
use br2k_deploy::backend::ReplicaView;
use br2k_deploy::context::LOCAL;
use clap::Args;
use serde_json::json;

use super::GlobalOpts;
use super::context::DirArg;
use super::history::RegistryHistory;

/// Show a service: the registry's header (location, epoch, state, manager) and recovery
/// info, each replica's role, LPI and health as its backend sees it, the requests a dead
/// leader left in doubt, and the claims filed since the last new location.
#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    /// The service name.
    name: String,

    /// The local runner's state directory [default: <tmp>/br2k-UID/up/NAME].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<std::path::PathBuf>,

    #[command(flatten)]
    config: DirArg,
}

impl StatusArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let registry = global.open_registry().await?;
        let mut history = RegistryHistory::new(&registry);
        history.follow(&registry).await?;
        let (text, json) = service_view(&registry, &history, &self.name, self.state_dir.clone(), &self.config).await?;
        global.output().result(text.trim_end(), &json)
    }
}

/// A service as `br2k status` shows it: text for a person and the same as JSON (which the
/// dashboard serves). Only public facts: the registry's records, the replicas' status and
/// the backends' views; never a key, token or password. Open claims come from `history`,
/// read up to the caller's last [`RegistryHistory::follow`].
pub(crate) async fn service_view(
    registry: &br2k_resolver::RegistryClient,
    history: &RegistryHistory,
    name: &str,
    state_dir: Option<std::path::PathBuf>,
    config: &DirArg,
) -> Result<(String, serde_json::Value)> {
    let info = registry.info(name).await?;
    let body = &info.recovery;
    // The service itself says who its members are, wherever it runs; when it does not
    // answer, the backend its deployment names says what runs.
    let from_service = match info.location.as_str() {
        "" => Err("no location is published".to_owned()),
        location => br2k_deploy::roster::service_members(location).await.map_err(|e| e.to_string()),
    };
    let (replicas, change) = match from_service {
        Ok(members) => (Ok(members.views), members.change),
        Err(unanswered) => {
            let views = match body.context.as_str() {
                "" => Err(format!("{unanswered}, and no deployment is recorded")),
                LOCAL => br2k_deploy::local::replica_views(&super::up::state_dir(name, state_dir)?)
                    .await
                    .map_err(|e| e.to_string()),
                context => match kubernetes(config, name, context).await {
                    Ok(views) => Ok(views),
                    Err(e) => Err(format!("{e:#}")),
                },
            };
            (views, None)
        }
    };
    let change_line = change.as_ref().map(|c| match serde_json::from_value::<br2k_membership::Change>(c.clone()) {
        Ok(c) => format!(
            "{} ({} of {} steps done, next: {}; `br2k scale`/`br2k replace` again or the manager finishes it)",
            c.kind,
            c.done.len(),
            c.kind.steps().len(),
            c.next
        ),
        Err(_) => format!("{c} (not a change this br2k reads)"),
    });

    // Claims since the last new location: what nobody has answered yet.
    let open_claims = history.open_claims(info.id);

    let digest = (body.imageDigest != B256::ZERO).then(|| format!("sha256:{}", alloy::hex::encode(body.imageDigest)));
    let or_dash = |t: &str| if t.is_empty() { "-".to_owned() } else { t.to_owned() };
    let mut text = format!(
        "{}  {}  epoch {}  at {}\nmanager {}\nrecovery info: {} replicas on {} from {}/{}@{}\n\nreplicas:\n",
        info.name,
        info.state,
        info.epoch,
        or_dash(&info.location),
        info.manager,
        body.replicas,
        or_dash(&body.context),
        or_dash(&body.containerRegistry),
        or_dash(&body.image),
        digest.clone().unwrap_or_else(|| "-".into()),
    );
    let mut in_doubt: Vec<u64> = Vec::new();
    match &replicas {
        Ok(views) if views.is_empty() => text.push_str("  none run\n"),
        Ok(views) => {
            for view in views {
                text.push_str(&format!("  {}\n", replica_line(view)));
                if let Some(status) = &view.status {
                    in_doubt.extend(&status.in_doubt);
                }
            }
        }
        Err(e) => text.push_str(&format!("  unknown: {e}\n")),
    }
    if let Some(line) = &change_line {
        text.push_str(&format!("membership change in progress: {line}\n"));
    }
    in_doubt.sort_unstable();
    in_doubt.dedup();
    text.push_str(&format!(
        "\nin-doubt requests: {}\n",
        if in_doubt.is_empty() { "none".into() } else { format!("{in_doubt:?}") }
    ));
    let recorded = registry.backup(name).await?;
    let leader =
        replicas.as_ref().ok().and_then(|views| views.iter().find(|v| v.leads())).and_then(|v| v.status.clone());
    text.push_str(&format!("backup: {}\n", backup_line(recorded.as_ref(), leader.as_ref())));
    if let Some(leader) = &leader {
        text.push_str(&format!("idempotency: {}\n", idempotency_line(&leader.idempotency, unix_millis())));
    }
    text.push_str(&format!("open claims (since the last new location): {}\n", open_claims.len()));
    for claim in open_claims {
        text.push_str(&format!("  block {}: {}: {}\n", claim.block, claim.claimant, claim.reason));
    }
    let json = json!({
        "name": info.name, "id": info.id, "state": info.state.as_str(), "location": info.location,
        "epoch": info.epoch, "manager": info.manager,
        "recoveryInfo": {
            "context": body.context, "replicas": body.replicas, "containerRegistry": body.containerRegistry,
            "image": body.image, "imageDigest": digest,
        },
        "replicas": match &replicas {
            Ok(views) => json!(views.iter().map(|v| json!({
                "name": v.name, "running": v.running, "status": v.status, "detail": v.detail, "learner": v.learner,
            })).collect::<Vec<_>>()),
            Err(e) => json!({ "error": e }),
        },
        "membershipChange": change,
        "membershipChangeText": change_line,
        "inDoubt": in_doubt,
        "backup": recorded.as_ref().map(|b| {
            let newest = leader.as_ref().map_or(b.index, |l| l.backup.index.max(b.index));
            json!({
                "index": newest,
                "recorded": {
                    "index": b.index, "digest": format!("sha256:{}", alloy::hex::encode(b.digest)),
                    "artifact": b.artifact, "recordedAt": b.recorded_at,
                },
                "behind": leader.as_ref().map(|l| l.ssi.saturating_sub(newest)),
                "segments": leader.as_ref().map(|l| l.backup.segments),
                "pushedBytes": leader.as_ref().map(|l| l.backup.pushed_bytes),
                "gasPerDay": leader.as_ref().map(|l| l.backup.anchor.gas_per_day),
                "recordIntervalMs": leader.as_ref().map(|l| l.backup.anchor.interval_ms),
            })
        }),
        "backupError": leader.as_ref().and_then(|l| l.backup.last_error.clone()),
        "backupAlert": leader.as_ref().and_then(|l| l.backup.alert.clone()),
        "idempotency": leader.as_ref().map(|l| &l.idempotency),
        "openClaims": open_claims.iter().map(|c| json!({ "block": c.block, "claimant": c.claimant, "reason": c.reason }))
            .collect::<Vec<_>>(),
    });
    Ok((text, json))
}

async fn kubernetes(config: &DirArg, name: &str, context: &str) -> Result<Vec<ReplicaView>> {
    let contexts = config.contexts()?;
    let info = contexts.get(context)?;
    let client = br2k_deploy::kubernetes::connect(&contexts, context).await?;
    Ok(br2k_deploy::kubernetes::pod_views(&client, &info, name).await?)
}

/// The newest backup (what a restore would use), the one recorded on chain, how far the
/// leader's service state is past them, and what recording costs.
fn backup_line(recorded: Option<&br2k_resolver::RecordedBackup>, leader: Option<&br2k_replication::Status>) -> String {
    let mut line = match recorded {
        None => "none recorded on chain".to_owned(),
        Some(b) => {
            let newest = leader.map_or(b.index, |l| l.backup.index.max(b.index));
            let behind = leader
                .map_or_else(String::new, |l| format!(", {} entries behind the leader", l.ssi.saturating_sub(newest)));
            let mut text = format!("index {newest}{behind}; index {} recorded on chain: {}", b.index, b.artifact);
            if let Some(anchor) = leader.map(|l| &l.backup.anchor).filter(|a| a.gas_per_day > 0) {
                text.push_str(&format!(
                    "; recording one every {} s costs about {} gas a day",
                    anchor.interval_ms / 1000,
                    thousands(anchor.gas_per_day)
                ));
            }
            text
        }
    };
    if let Some(alert) = leader.and_then(|l| l.backup.alert.as_ref()) {
        line.push_str(&format!("\n  ALERT: {alert}"));
    } else if let Some(error) = leader.and_then(|l| l.backup.last_error.as_ref()) {
        line.push_str(&format!("; the last attempt failed: {error}"));
    }
    line
}

/// `n` with its thousands grouped (`534,003,840`), as people read large counts.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// The leader's idempotency table: its keys, its bytes, and the window in which a retry
/// is answered from its stored answer.
fn idempotency_line(table: &br2k_replication::TableStatus, now_ms: u64) -> String {
    let window = match table.oldest_at {
        None => "no key held yet".to_owned(),
        Some(at) => {
            let secs = now_ms.saturating_sub(at) / 1000;
            format!(
                "a retry of a key logged in the last {}h{:02}m is answered from its record",
                secs / 3600,
                secs / 60 % 60
            )
        }
    };
    format!("{} keys, {} ({window})", table.records, bytes(table.bytes))
}

fn unix_millis() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// Snapshots, where the log starts, and the local etcd member's database.
fn storage_line(s: &br2k_replication::Status) -> String {
    let snapshot = match s.snapshot_index {
        0 => "no snapshot yet".to_owned(),
        index => format!("snapshot at {index}"),
    };
    let lineage = match s.state_version {
        0 => "state built from the log".to_owned(),
        version => format!("state version {version} (restored from that snapshot)"),
    };
    let quota = s.quota.map_or_else(String::new, |q| format!(" of a {} quota", bytes(q)));
    format!(
        "{snapshot}, {lineage}, log in etcd from {}; etcd database {}{quota} ({} in use)",
        s.first_index,
        bytes(s.db_size),
        bytes(s.db_size_in_use)
    )
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n => format!("{:.0} KiB", n as f64 / 1024.0),
    }
}

fn replica_line(view: &ReplicaView) -> String {
    let mut line = format!("{:<8}", view.name);
    match &view.status {
        Some(s) => line.push_str(&format!(
            "{:<9} LPI {:<6} SSI {:<6} {:<10} {}\n{:<8}{}",
            if s.etcd_learner || view.learner { "learner".to_owned() } else { format!("{:?}", s.role).to_lowercase() },
            s.lpi,
            s.ssi,
            // Only the leader keeps LS current.
            if s.role == br2k_replication::Role::Leader { format!("LS {}", s.ls) } else { String::new() },
            match (&s.last_error, s.etcd_alarms.first()) {
                (_, Some(alarm)) => format!("unhealthy: etcd alarm {alarm} (writes refused; see its log)"),
                (None, None) if s.etcd_reachable => "healthy".to_owned(),
                (None, None) => "unhealthy: its etcd member does not answer".to_owned(),
                (Some(e), None) => format!("unhealthy: {e}"),
            },
            "",
            storage_line(s)
        )),
        None => {
            if view.learner {
                line.push_str("learner, ");
            }
            line.push_str(if view.running { "running, not answering" } else { "not running" });
        }
    }
    if let Some(detail) = &view.detail
        && view.status.is_none()
    {
        line.push_str(&format!(" ({detail})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn large_counts_are_grouped_by_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(534_003_840), "534,003,840");
    }
}
