//! `br2k members`, `br2k scale` and `br2k replace`: a running service's etcd members, and
//! changes to them one member at a time (the `br2k-membership` crate does the change; the
//! runner that owns the replicas starts, stops and retires them through its control
//! socket).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use br2k_deploy::local::control::RunnerHost;
use br2k_deploy::local::run_file::RunFile;
use br2k_membership::{Change, ChangeKind, ChangeOptions, Cluster, MemberView, Membership};
use br2k_replication::Status;
use clap::Args;
use serde_json::json;

use super::GlobalOpts;
use crate::output::Output;

const MEMBERS_EXAMPLES: &str = "\
Examples:
  br2k members logserver
  br2k members logserver --json | jq '.members[] | select(.learner)'

A change left half done (its command killed, its machine lost) shows as \"in progress\"
with its next step; `br2k scale` or `br2k replace` run again finishes it first.";

const SCALE_EXAMPLES: &str = "\
Examples:
  br2k scale logserver --replicas 5     # add n4, then n5: each a learner first, promoted in sync
  br2k scale logserver --replicas 3     # back to 3: followers leave first, the leader last

Refused, with the reason: fewer than 3 voters after it (unless --allow-below-3); a change
while another is in progress (run the command again to finish that one first); a removal
that would lose the quorum with the members that are down now.";

const REPLACE_EXAMPLES: &str = "\
Examples:
  br2k replace logserver n2     # n2 (dead or alive) leaves; a fresh replica joins in its place

The leaving replica goes first (its etcd member removed, its processes stopped, its data
deleted), then the new one joins as a learner, is promoted once in sync and catches up.";

/// Where the service runs and what a change is told.
#[derive(Args, Debug)]
pub(crate) struct TargetOpts {
    /// The state directory given to `br2k up` [default: <tmp>/br2k-UID/up/NAME].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Where the service runs. Only this machine's runners (`local`) can be changed yet.
    #[arg(long, default_value = br2k_deploy::context::LOCAL)]
    context: String,
}

/// How a change runs.
#[derive(Args, Debug)]
pub(crate) struct ChangeOpts {
    /// Allow fewer than 3 voters after the change: the service then no longer survives
    /// the loss of one replica.
    #[arg(long)]
    allow_below_3: bool,

    /// The longest one step may wait (a learner catching up, etcd allowing a
    /// reconfiguration); a step that takes longer stops the change, which stays journaled.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(5..=3600))]
    step_timeout: u64,
}

/// Each etcd member of a running service: voter or learner, its replica's role, health,
/// LPI and how far it lags; and the membership change in progress, if any.
#[derive(Args, Debug)]
#[command(after_help = MEMBERS_EXAMPLES)]
pub(crate) struct MembersArgs {
    /// The service.
    #[arg(value_name = "NAME", value_parser = crate::opts::parse_service_name)]
    service: String,

    #[command(flatten)]
    target: TargetOpts,
}

/// Grow or shrink a running service to N replicas, one etcd member at a time.
#[derive(Args, Debug)]
#[command(after_help = SCALE_EXAMPLES)]
pub(crate) struct ScaleArgs {
    /// The service.
    #[arg(value_name = "NAME", value_parser = crate::opts::parse_service_name)]
    service: String,

    /// The replica count to reach.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=9))]
    replicas: u32,

    #[command(flatten)]
    target: TargetOpts,

    #[command(flatten)]
    change: ChangeOpts,
}

/// Replace one replica of a running service (dead or alive) by a fresh one.
#[derive(Args, Debug)]
#[command(after_help = REPLACE_EXAMPLES)]
pub(crate) struct ReplaceArgs {
    /// The service.
    #[arg(value_name = "NAME", value_parser = crate::opts::parse_service_name)]
    service: String,

    /// The replica that leaves (as `br2k members` names it, e.g. n2).
    #[arg(value_name = "REPLICA")]
    replica: String,

    #[command(flatten)]
    target: TargetOpts,

    #[command(flatten)]
    change: ChangeOpts,
}

/// A service run by a local runner, reached for a membership change.
struct LocalTarget {
    service: String,
    dir: PathBuf,
    run: RunFile,
    host: RunnerHost,
}

impl LocalTarget {
    async fn open(service: &str, target: &TargetOpts) -> Result<Self> {
        if target.context != br2k_deploy::context::LOCAL {
            bail!(
                "membership changes of services on Kubernetes (context {:?}) are not built yet; only services run on this machine (`br2k up`, `br2k deploy --context local`) can be changed",
                target.context
            );
        }
        let dir = super::up::state_dir(service, target.state_dir.clone())?;
        let run = Self::read_run(service, &dir)?;
        let host = RunnerHost::new(&dir, &run);
        Ok(Self { service: service.to_owned(), dir, run, host })
    }

    fn read_run(service: &str, dir: &std::path::Path) -> Result<RunFile> {
        let run = RunFile::read(dir)?.with_context(|| {
            format!("{service:?} is not up here (no run file in {}); `br2k up --detach --name {service}` starts it, --state-dir names another directory", dir.display())
        })?;
        if !run.runner_alive() {
            bail!(
                "the runner of {service:?} (pid {}) is gone, and its replicas with it; start it again on its data with `br2k up --keep-data --name {service}`",
                run.pid
            );
        }
        if run.service != service {
            bail!("{} is the state directory of {:?}, not {service:?}", dir.display(), run.service);
        }
        Ok(run)
    }

    /// The run file as the runner last wrote it (nodes added or retired since).
    fn refresh(&mut self) -> Result<()> {
        self.run = Self::read_run(&self.service, &self.dir)?;
        Ok(())
    }

    fn cluster(&self) -> Result<Cluster> {
        Ok(br2k_deploy::local::control::runner_cluster(&self.run)?)
    }

    /// The name the next added replica gets: after every node and member there was.
    fn next_replica(&self, members: &[MemberView]) -> String {
        let index = |name: &str| name.strip_prefix('n').and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
        let highest = self
            .run
            .nodes
            .iter()
            .map(|n| index(&n.name))
            .chain(members.iter().map(|m| index(&m.name)))
            .max()
            .unwrap_or(0);
        format!("n{}", highest + 1)
    }

    /// Each live node's `/br2k/status`, by replica name.
    async fn statuses(&self) -> Vec<(String, Option<Status>)> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(1))
            .no_proxy()
            .build()
            .expect("a plain HTTP client builds");
        let asks = self.run.nodes.iter().filter(|n| !n.retired).map(|node| {
            let http = http.clone();
            async move {
                let url = format!("{}/br2k/status", node.app_url);
                let status = match http.get(&url).send().await {
                    Ok(response) => response.json::<Status>().await.ok(),
                    Err(_) => None,
                };
                (node.name.clone(), status)
            }
        });
        futures::future::join_all(asks).await
    }
}

fn options(change: &ChangeOpts, run: &RunFile) -> ChangeOptions {
    ChangeOptions {
        allow_below_3: change.allow_below_3,
        step_timeout: Duration::from_secs(change.step_timeout),
        ..br2k_deploy::local::control::change_options(run)
    }
}

fn change_json(change: &Change) -> serde_json::Value {
    serde_json::to_value(change).unwrap_or_default()
}

impl MembersArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let target = LocalTarget::open(&self.service, &self.target).await?;
        let quiet = |_: &str| {};
        let membership =
            Membership::new(&self.service, target.cluster()?, &target.host, ChangeOptions::default(), &quiet);
        let members = membership.members().await?;
        let in_progress = membership.in_progress().await?;
        let statuses = target.statuses().await;
        let ssi = statuses.iter().filter_map(|(_, s)| s.as_ref().map(|s| s.ssi)).max().unwrap_or(0);
        let mut lines = vec![format!(
            "{:<8} {:<8} {:<8} {:<9} {:<10} {:>8} {:>6}  ETCD MEMBER",
            "REPLICA", "KIND", "HEALTH", "ETCD", "ROLE", "LPI", "LAG"
        )];
        let mut rows = Vec::new();
        for member in &members {
            let status = statuses.iter().find(|(name, _)| *name == member.name).and_then(|(_, s)| s.as_ref());
            let kind = if member.learner { "learner" } else { "voter" };
            let health = if member.healthy { "healthy" } else { "down" };
            let etcd_role = if member.leader { "leader" } else { "follower" };
            let role = status.map_or("-".to_owned(), |s| format!("{:?}", s.role).to_lowercase());
            let lpi = status.map(|s| s.lpi);
            let lag = lpi.map(|lpi| ssi.saturating_sub(lpi));
            let name = if member.name.is_empty() { "(not started)" } else { member.name.as_str() };
            lines.push(format!(
                "{name:<8} {kind:<8} {health:<8} {etcd_role:<9} {role:<10} {:>8} {:>6}  {:x} {}",
                lpi.map_or("-".into(), |v| v.to_string()),
                lag.map_or("-".into(), |v| v.to_string()),
                member.id,
                member.peer_urls.join(",")
            ));
            rows.push(json!({
                "replica": member.name, "etcdMember": format!("{:x}", member.id), "learner": member.learner,
                "healthy": member.healthy, "etcdLeader": member.leader, "peerUrls": member.peer_urls,
                "role": status.map(|s| format!("{:?}", s.role).to_lowercase()), "lpi": lpi, "lag": lag,
                "removedFromEtcd": status.is_some_and(|s| s.removed_from_etcd),
            }));
        }
        let voters = members.iter().filter(|m| m.is_voter()).count();
        lines.push(format!("{voters} voters, {} learners; SSI {ssi}", members.len() - voters));
        match &in_progress {
            Some(change) => lines.push(format!(
                "in progress: {} (next step: {}; {} steps done); `br2k {}` again finishes it",
                change.kind,
                change.next,
                change.done.len(),
                match change.kind {
                    ChangeKind::Replace { .. } =>
                        format!("replace {} {}", self.service, change.kind.leaving().unwrap_or("")),
                    _ => format!("scale {} --replicas {}", self.service, change.replicas_after),
                }
            )),
            None => lines.push("no membership change in progress".into()),
        }
        out.result(
            &lines.join("\n"),
            &json!({
                "service": self.service, "members": rows, "voters": voters, "ssi": ssi,
                "inProgress": in_progress.as_ref().map(change_json),
            }),
        )
    }
}

/// The progress callback a change reports to.
fn progress_to(out: Output, command: &'static str) -> impl Fn(&str) + Sync {
    move |line: &str| out.progress(format_args!("{command}: {line}"))
}

/// Finishes the change a stopped command left, if any.
async fn finish_stopped(membership: &Membership<'_, RunnerHost>, out: Output) -> Result<Option<Change>> {
    let Some(journaled) = membership.in_progress().await? else { return Ok(None) };
    out.progress(format_args!(
        "a membership change was left half done ({}; next step: {}): finishing it first",
        journaled.kind, journaled.next
    ));
    Ok(membership.resume().await?)
}

impl ScaleArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let progress = progress_to(out, "scale");
        let mut target = LocalTarget::open(&self.service, &self.target).await?;
        target.host.ping().await?;
        let options = options(&self.change, &target.run);
        let mut changes = Vec::new();
        {
            let membership =
                Membership::new(&self.service, target.cluster()?, &target.host, options.clone(), &progress);
            changes.extend(finish_stopped(&membership, out).await?);
        }
        loop {
            target.refresh()?;
            let membership =
                Membership::new(&self.service, target.cluster()?, &target.host, options.clone(), &progress);
            let members = membership.members().await?;
            let voters: Vec<&MemberView> = members.iter().filter(|m| m.is_voter()).collect();
            let have = u32::try_from(voters.len()).unwrap_or(u32::MAX);
            if have == self.replicas {
                break;
            }
            let kind = if have < self.replicas {
                let room = br2k_deploy::local::MAX_NODES.saturating_sub(target.run.nodes.len());
                if room == 0 {
                    bail!(
                        "this local service has used all {} node addresses a local service has (retired nodes keep theirs); it cannot grow further here",
                        br2k_deploy::local::MAX_NODES
                    );
                }
                ChangeKind::Add { replica: target.next_replica(&members) }
            } else {
                ChangeKind::Remove { replica: leaving_first(&voters, &target.run) }
            };
            out.progress(format_args!("scale: {have} voters, {} wanted: {kind}", self.replicas));
            changes.push(membership.change(kind).await?);
        }
        target.refresh()?;
        let summary: Vec<String> = changes.iter().map(|c| c.kind.to_string()).collect();
        let human = if summary.is_empty() {
            format!("{} already has {} replicas; nothing to change", self.service, self.replicas)
        } else {
            format!("{} now has {} replicas ({})", self.service, self.replicas, summary.join(", "))
        };
        out.result(
            &human,
            &json!({ "service": self.service, "replicas": self.replicas, "changes": changes.iter().map(change_json).collect::<Vec<_>>() }),
        )
    }
}

/// Which voter a shrink removes first: one that is down (its loss costs nothing), else
/// the follower added last, and the leader only when nothing else is left.
fn leaving_first(voters: &[&MemberView], run: &RunFile) -> String {
    let leads =
        |m: &MemberView| m.leader || run.nodes.iter().any(|n| n.name == m.name && n.role.as_deref() == Some("leader"));
    let index = |m: &MemberView| m.name.strip_prefix('n').and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    voters.iter().max_by_key(|m| (!m.healthy, !leads(m), index(m))).map(|m| m.name.clone()).unwrap_or_default()
}

impl ReplaceArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let progress = progress_to(out, "replace");
        let mut target = LocalTarget::open(&self.service, &self.target).await?;
        target.host.ping().await?;
        let options = options(&self.change, &target.run);
        {
            let membership =
                Membership::new(&self.service, target.cluster()?, &target.host, options.clone(), &progress);
            if let Some(journaled) = membership.in_progress().await?
                && journaled.kind.leaving() == Some(self.replica.as_str())
                && matches!(journaled.kind, ChangeKind::Replace { .. })
            {
                // This very replacement, stopped: finish it rather than start another.
                let done = membership.change(journaled.kind.clone()).await?;
                return report_replace(out, &self.service, &done);
            }
            finish_stopped(&membership, out).await?;
        }
        target.refresh()?;
        let membership = Membership::new(&self.service, target.cluster()?, &target.host, options, &progress);
        let members = membership.members().await?;
        if br2k_deploy::local::MAX_NODES <= target.run.nodes.len() {
            bail!(
                "this local service has used all {} node addresses a local service has; {} cannot be replaced here",
                br2k_deploy::local::MAX_NODES,
                self.replica
            );
        }
        let kind = ChangeKind::Replace { old: self.replica.clone(), new: target.next_replica(&members) };
        let done = membership.change(kind).await?;
        report_replace(out, &self.service, &done)
    }
}

fn report_replace(out: Output, service: &str, change: &Change) -> Result<()> {
    out.result(
        &format!("{service}: {} ({} replicas)", change.kind, change.replicas_after),
        &json!({ "service": service, "change": change_json(change) }),
    )
}
