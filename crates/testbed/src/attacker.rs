//! The paper's attacker: at random intervals it picks a node (the leader, or any node)
//! and breaks it for a while, for real: cuts its network link, freezes its processes,
//! kills them, fills its disk, or replaces it by a fresh node.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use br2k_deploy::local::{DiskLimits, LocalService, Part};
use serde::Serialize;

/// The size of each node's app data directory in disk-full runs: far more than a run
/// writes, so the disk is full only when the attacker fills it.
const APP_DISK_BYTES: u64 = 64 << 20;
/// The size of each node's etcd data directory in etcd-disk-full runs (etcd preallocates
/// its write-ahead log in 64 MB segments).
const ETCD_DISK_BYTES: u64 = 512 << 20;

/// What the attacker does to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Cut the node's network link (its namespace's veth down), then link it back.
    Partition,
    /// SIGSTOP the node's app and etcd member, then SIGCONT.
    Pause,
    /// SIGKILL the node's app and etcd member, then start them again on the same data.
    Kill,
    /// SIGKILL the node's app and etcd member and delete all their data, then start them
    /// again empty: the member rejoins etcd as a new one, the app catches up from a peer's
    /// snapshot.
    Wipe,
    /// Fill the node's app data directory (a tmpfs of its own) until writes fail with
    /// ENOSPC, then give it room again: the replica must stop at the entry it cannot apply,
    /// never skip it, and converge once it has room.
    DiskFull,
    /// The same for the node's etcd data directory.
    EtcdDiskFull,
    /// Replace the node by a fresh one, while it runs: a membership change (the old
    /// node's etcd member leaves, leadership moved off it first, and it is retired; a new
    /// node joins as a learner, catches up from a snapshot and is promoted). Nothing to heal.
    Replace,
    /// The scale drill (`--scale-drill`): grow by one node, again (3 to 5), then shrink by
    /// one node, again (back to 3), one membership change after each wait; the node that
    /// leaves is the target (the leader, or a random node).
    ScaleDrill,
    /// No faults: a baseline run.
    None,
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "partition" => Ok(Self::Partition),
            "pause" => Ok(Self::Pause),
            "kill" => Ok(Self::Kill),
            "wipe" => Ok(Self::Wipe),
            "disk-full" => Ok(Self::DiskFull),
            "etcd-disk-full" => Ok(Self::EtcdDiskFull),
            "replace" => Ok(Self::Replace),
            "scale-drill" => Ok(Self::ScaleDrill),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "unknown fault {s:?}: expected partition, pause, kill, wipe, disk-full, etcd-disk-full, replace, scale-drill or none"
            )),
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Partition => "partition",
            Self::Pause => "pause",
            Self::Kill => "kill",
            Self::Wipe => "wipe",
            Self::DiskFull => "disk-full",
            Self::EtcdDiskFull => "etcd-disk-full",
            Self::Replace => "replace",
            Self::ScaleDrill => "scale-drill",
            Self::None => "none",
        })
    }
}

impl FaultKind {
    /// The size-limited data directories the nodes need for this fault.
    pub const fn disks(self) -> DiskLimits {
        match self {
            Self::DiskFull => DiskLimits { app: Some(APP_DISK_BYTES), etcd: None },
            Self::EtcdDiskFull => DiskLimits { app: None, etcd: Some(ETCD_DISK_BYTES) },
            _ => DiskLimits { app: None, etcd: None },
        }
    }

    /// Whether it fills a disk (the report then says how long the node was unhealthy).
    pub const fn fills_a_disk(self) -> bool {
        matches!(self, Self::DiskFull | Self::EtcdDiskFull)
    }
}

/// Which node the attacker breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The current leader (the paper's leader test).
    Leader,
    /// Any node, uniformly (the paper's random test).
    Random,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "leader" => Ok(Self::Leader),
            "random" => Ok(Self::Random),
            _ => Err(format!("unknown target {s:?}: expected leader or random")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Leader => "leader",
            Self::Random => "random",
        })
    }
}

/// One fault as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct FaultEvent {
    /// The node (1-based).
    pub node: usize,
    /// Whether it led when it was hit.
    pub was_leader: bool,
    /// When it was hit, from the start of the run (milliseconds); a membership change:
    /// when it began.
    pub at_ms: u64,
    /// When it was healed (milliseconds), if it was; a membership change: when it was
    /// done.
    pub healed_ms: Option<u64>,
    /// For a full disk: how long the node answered unhealthy, from its first unhealthy
    /// health answer after the disk filled to its first healthy one after it had room
    /// again (milliseconds); `None` if it never became healthy again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_ms: Option<u64>,
}

/// Breaks node `i`.
///
/// # Errors
/// What the backend reported.
pub async fn inject(service: &mut LocalService, kind: FaultKind, i: usize) -> br2k_deploy::Result<()> {
    match kind {
        FaultKind::Partition => service.cut(i),
        FaultKind::Pause => service.pause(i),
        FaultKind::Kill => service.kill(i).await,
        FaultKind::Wipe => service.wipe(i).await,
        FaultKind::DiskFull => service.fill_disk(i, Part::App).map(drop),
        FaultKind::EtcdDiskFull => service.fill_disk(i, Part::Etcd).map(drop),
        FaultKind::Replace | FaultKind::ScaleDrill => Err(br2k_deploy::DeployError::Invalid(
            "a membership change is made by attacker::replace and attacker::scale_step".into(),
        )),
        FaultKind::None => Ok(()),
    }
}

/// Replaces node `i` by a fresh node (see [`FaultKind::Replace`]); `window`: how far
/// behind SSI the new one may record its LPI and count as caught up
/// ([`br2k_membership::catch_up_window`]).
/// Returns the new node's name.
///
/// # Errors
/// When the membership change is refused or stops (it is then left journaled).
pub async fn replace(service: &mut LocalService, i: usize, window: u64) -> br2k_deploy::Result<String> {
    let (old, new) = (service.node_name(i).to_owned(), service.next_node_name());
    change(service, br2k_membership::ChangeKind::Replace { old, new: new.clone() }, window).await?;
    Ok(new)
}

/// Step `step` of the scale drill: 0 and 1 add a node, 2 and 3 remove node `leaving`;
/// later steps do nothing. The node added or removed.
///
/// # Errors
/// When the membership change is refused or stops.
pub async fn scale_step(
    service: &mut LocalService,
    step: usize,
    leaving: usize,
    window: u64,
) -> br2k_deploy::Result<Option<usize>> {
    match step {
        0 | 1 => {
            let replica = service.next_node_name();
            change(service, br2k_membership::ChangeKind::Add { replica: replica.clone() }, window).await?;
            Ok(service.node_index(&replica))
        }
        2 | 3 => {
            let replica = service.node_name(leaving).to_owned();
            change(service, br2k_membership::ChangeKind::Remove { replica }, window).await?;
            Ok(Some(leaving))
        }
        _ => Ok(None),
    }
}

/// Carries out one membership change of the testbed's service through the local backend.
async fn change(service: &mut LocalService, kind: br2k_membership::ChangeKind, window: u64) -> br2k_deploy::Result<()> {
    let cluster = service.membership_cluster()?;
    let host = br2k_deploy::local::LocalReplicaHost::new(service, |_| {});
    let options = br2k_membership::ChangeOptions {
        step_timeout: Duration::from_secs(120),
        catch_up_window: window,
        ..Default::default()
    };
    let progress = |line: &str| tracing::info!("membership: {line}");
    br2k_membership::Membership::new(crate::SERVICE, cluster, &host, options, &progress)
        .change(kind.clone())
        .await
        .map(drop)
        .map_err(|e| br2k_deploy::DeployError::Invalid(format!("{kind}: {e}")))
}

/// Undoes [`inject`] on node `i`.
///
/// # Errors
/// What the backend reported.
pub async fn heal(service: &mut LocalService, kind: FaultKind, i: usize) -> br2k_deploy::Result<()> {
    match kind {
        FaultKind::Partition => service.rejoin(i),
        FaultKind::Pause => service.resume(i),
        FaultKind::Kill | FaultKind::Wipe => service.restart(i).await,
        FaultKind::DiskFull => service.free_disk(i, Part::App),
        // etcd exits when it cannot write its log: start it again once there is room.
        FaultKind::EtcdDiskFull => {
            service.free_disk(i, Part::Etcd)?;
            service.restart(i).await
        }
        FaultKind::Replace | FaultKind::ScaleDrill | FaultKind::None => Ok(()),
    }
}

/// Follows one node's `/br2k/health` through a fault, to say how long it was unhealthy.
pub struct HealthWatch {
    healed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Option<Duration>>,
}

impl HealthWatch {
    /// How long after the heal the node may take to become healthy before the watch gives up.
    const GIVE_UP_AFTER_HEAL: Duration = Duration::from_secs(120);

    /// Starts polling `url` (the node's app URL) every 100 ms.
    pub fn start(url: &str) -> Self {
        let healed = Arc::new(AtomicBool::new(false));
        let (flag, url) = (healed.clone(), format!("{url}/br2k/health"));
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).no_proxy().build().ok()?;
            let mut unhealthy_since = None;
            let mut healed_at = None;
            loop {
                let healthy = http.get(&url).send().await.is_ok_and(|r| r.status().is_success());
                match (healthy, unhealthy_since) {
                    (false, None) => unhealthy_since = Some(Instant::now()),
                    (true, Some(since)) if healed_at.is_some() => return Some(since.elapsed()),
                    _ => {}
                }
                if flag.load(Ordering::SeqCst) {
                    let at = *healed_at.get_or_insert_with(Instant::now);
                    if unhealthy_since.is_none() && healthy {
                        return Some(Duration::ZERO);
                    }
                    if at.elapsed() > Self::GIVE_UP_AFTER_HEAL {
                        return None;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { healed, task }
    }

    /// The fault was healed: the watch ends at the node's next healthy answer.
    pub fn healed(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }

    /// How long the node was unhealthy (`None`: still unhealthy when the watch gave up).
    pub async fn unhealthy_for(self) -> Option<Duration> {
        self.healed();
        self.task.await.ok().flatten()
    }
}

/// A small seeded generator (SplitMix64): the same seed gives the same intervals and
/// random targets, so a run can be repeated.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub const fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % n as u64).unwrap_or(0)
    }

    /// Uniform in `lo..=hi`, at millisecond resolution.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo_ms, hi_ms) = (lo.as_millis() as u64, hi.as_millis() as u64);
        let span = hi_ms.saturating_sub(lo_ms) + 1;
        Duration::from_millis(lo_ms + self.next_u64() % span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_repeatable_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let d = a.between(Duration::from_secs(2), Duration::from_secs(3));
            assert_eq!(d, b.between(Duration::from_secs(2), Duration::from_secs(3)));
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(3));
            assert!(a.below(3) < 3);
            b.below(3);
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn names_parse() {
        assert_eq!("pause".parse::<FaultKind>(), Ok(FaultKind::Pause));
        assert!("cut".parse::<FaultKind>().unwrap_err().contains("partition, pause, kill"));
        for kind in [FaultKind::DiskFull, FaultKind::EtcdDiskFull] {
            assert_eq!(kind.to_string().parse::<FaultKind>(), Ok(kind));
            assert!(kind.fills_a_disk());
        }
        assert_eq!(FaultKind::DiskFull.disks().app, Some(APP_DISK_BYTES));
        assert_eq!(FaultKind::Kill.disks(), DiskLimits::default());
        assert_eq!("leader".parse::<Target>(), Ok(Target::Leader));
    }
}
