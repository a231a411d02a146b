//! Where a local service's nodes live on the network.
//!
//! Each running service claims a *slot* (1..=250), a directory under the slots root
//! holding the runner's pid and the pids it started. The slot number names everything
//! the service creates, so that what a crashed runner left behind can be found and
//! removed by the next one:
//!
//! | | network namespaces (root) | loopback (any user) |
//! |---|---|---|
//! | this machine, as the nodes see it | `10.213.S.1` on bridge `b2kS` | `127.0.0.1` |
//! | node i (1-based) | `10.213.S.(10+i)` in namespace `b2kSnI`, linked by veth `b2kSnI` | `127.213.S.(10+i)` |
//!
//! Cutting a node off (`ip link set b2kSnI down`) takes its only link away: it loses its
//! peers, its clients and the chain at once, which is what a network partition of a
//! machine looks like.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::sys;
use crate::error::{DeployError, Result};

/// How nodes are placed on the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetworkMode {
    /// Namespaces when running as root, loopback addresses otherwise.
    #[default]
    Auto,
    /// Each node in its own network namespace (needs root); partitions are possible.
    Namespaces,
    /// Every node on its own loopback address; no partitions.
    Loopback,
}

impl std::str::FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "namespaces" | "netns" => Ok(Self::Namespaces),
            "loopback" => Ok(Self::Loopback),
            _ => Err(format!("unknown network mode {s:?}: expected auto, namespaces or loopback")),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    /// The word `from_str` reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Namespaces => "namespaces",
            Self::Loopback => "loopback",
        })
    }
}

/// The most nodes one service may have here (addresses .11 to .19).
pub const MAX_NODES: usize = 9;
const LAST_SLOT: u8 = 250;

/// A claimed slot and, in namespace mode, the bridge and namespaces built for it.
/// Everything is removed when it is dropped.
#[derive(Debug)]
pub struct LocalNetwork {
    slot: u8,
    namespaces: bool,
    nodes: usize,
    dir: PathBuf,
}

impl NetworkMode {
    /// Whether nodes placed this way live in network namespaces (auto: when root).
    pub fn uses_namespaces(self) -> bool {
        match self {
            Self::Auto => sys::effective_uid() == 0,
            Self::Namespaces => true,
            Self::Loopback => false,
        }
    }
}

impl LocalNetwork {
    /// Claims a free slot for `nodes` nodes (first removing whatever crashed runners
    /// left behind) and, in namespace mode, builds the bridge and one namespace per node.
    ///
    /// # Errors
    /// Bad node count, namespaces asked for without root, `ip` failing, or no free slot.
    pub fn claim(mode: NetworkMode, nodes: usize) -> Result<Self> {
        Self::claim_in(mode, nodes, None)
    }

    /// Claims slot `slot` itself, for replicas whose kept data records that slot's
    /// addresses (etcd members know each other by address).
    ///
    /// # Errors
    /// As [`Self::claim`], and when another running service holds that slot.
    pub fn reclaim(mode: NetworkMode, nodes: usize, slot: u8) -> Result<Self> {
        Self::claim_in(mode, nodes, Some(slot))
    }

    fn claim_in(mode: NetworkMode, nodes: usize, slot: Option<u8>) -> Result<Self> {
        if !(1..=MAX_NODES).contains(&nodes) {
            return Err(DeployError::Invalid(format!("a local service has 1 to {MAX_NODES} nodes, not {nodes}")));
        }
        let root = sys::effective_uid() == 0;
        let namespaces = match mode {
            NetworkMode::Auto => root,
            NetworkMode::Namespaces if !root => {
                return Err(DeployError::NeedsNamespaces {
                    action: "--network namespaces".into(),
                    uid: sys::effective_uid(),
                });
            }
            NetworkMode::Namespaces => true,
            NetworkMode::Loopback => false,
        };
        let slots = slots_root();
        fs::create_dir_all(&slots).map_err(|e| DeployError::io(format!("create {}", slots.display()), e))?;
        if root {
            sweep_unowned(&slots);
        }
        let (slot, dir) = claim_slot(&slots, slot)?;
        let mut network = Self { slot, namespaces, nodes, dir };
        if namespaces {
            network.build()?; // on error, drop tears down what was built
        }
        Ok(network)
    }

    /// Whether nodes live in their own network namespaces (so they can be cut off).
    pub const fn uses_namespaces(&self) -> bool {
        self.namespaces
    }

    /// How many nodes it has room for.
    pub const fn nodes(&self) -> usize {
        self.nodes
    }

    /// The slot number.
    pub const fn slot(&self) -> u8 {
        self.slot
    }

    /// This machine's address as the nodes reach it (where a local chain must listen).
    pub const fn host_address(&self) -> IpAddr {
        if self.namespaces { IpAddr::V4(Ipv4Addr::new(10, 213, self.slot, 1)) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) }
    }

    /// Node `i`'s address (0-based).
    pub fn node_address(&self, i: usize) -> IpAddr {
        Self::address_of(self.namespaces, self.slot, i)
    }

    /// Node `i`'s address (0-based) in slot `slot`, in namespaces or on loopback: fixed
    /// by the two, so that a process other than the runner (a membership change) knows
    /// the address a node will have before it exists.
    pub fn address_of(namespaces: bool, slot: u8, i: usize) -> IpAddr {
        let host = 11 + u8::try_from(i).expect("at most MAX_NODES nodes");
        if namespaces {
            IpAddr::V4(Ipv4Addr::new(10, 213, slot, host))
        } else {
            IpAddr::V4(Ipv4Addr::new(127, 213, slot, host))
        }
    }

    /// A handle on node `i`'s namespace, for a child to enter; `None` in loopback mode.
    pub(crate) fn namespace(&self, i: usize) -> Result<Option<File>> {
        if !self.namespaces {
            return Ok(None);
        }
        let path = Path::new("/run/netns").join(self.node_name(i));
        File::open(&path).map(Some).map_err(|e| DeployError::io(format!("open {}", path.display()), e))
    }

    /// Cuts node `i` off the network.
    pub(crate) fn cut(&self, i: usize) -> Result<()> {
        self.require_namespaces("cutting a node off the network")?;
        ip(&["link", "set", &self.node_name(i), "down"])
    }

    /// Links node `i` back.
    pub(crate) fn rejoin(&self, i: usize) -> Result<()> {
        self.require_namespaces("rejoining a node to the network")?;
        ip(&["link", "set", &self.node_name(i), "up"])
    }

    /// Records a process this slot started, so that a later runner can stop it if this
    /// one crashes. `cwd` is its working directory, checked before it is ever signalled
    /// (pids are reused).
    pub(crate) fn record_process(&self, pid: u32, cwd: &Path) {
        let line = format!("{pid}\t{}\n", cwd.display());
        let path = self.dir.join("pids");
        if let Err(e) =
            OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| f.write_all(line.as_bytes()))
        {
            tracing::warn!(path = %path.display(), error = %e, "could not record a process for crash cleanup");
        }
    }

    fn require_namespaces(&self, action: &str) -> Result<()> {
        if self.namespaces {
            Ok(())
        } else {
            Err(DeployError::NeedsNamespaces { action: action.into(), uid: sys::effective_uid() })
        }
    }

    fn bridge(&self) -> String {
        format!("b2k{}", self.slot)
    }

    fn node_name(&self, i: usize) -> String {
        format!("b2k{}n{}", self.slot, i + 1)
    }

    fn build(&mut self) -> Result<()> {
        let bridge = self.bridge();
        let subnet = format!("{}/24", self.host_address());
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &subnet, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..self.nodes {
            self.build_node(i)?;
        }
        Ok(())
    }

    /// Makes room for one more node (a membership change adding a replica); its index.
    ///
    /// # Errors
    /// Past [`MAX_NODES`] nodes (retired ones count: their addresses are not reused),
    /// or when `ip` fails.
    pub fn add_node(&mut self) -> Result<usize> {
        if self.nodes >= MAX_NODES {
            return Err(DeployError::Invalid(format!(
                "a local service has room for {MAX_NODES} nodes in all, retired ones included (their addresses are never reused); this one has used them all"
            )));
        }
        if self.namespaces {
            self.build_node(self.nodes)?;
        }
        self.nodes += 1;
        Ok(self.nodes - 1)
    }

    /// Node `i`'s namespace and its link to the bridge.
    fn build_node(&self, i: usize) -> Result<()> {
        let (bridge, name) = (self.bridge(), self.node_name(i));
        let peer = format!("b2k{}c{}", self.slot, i + 1);
        let address = format!("{}/24", self.node_address(i));
        ip(&["netns", "add", &name])?;
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &name])?;
        ip(&["link", "set", &name, "master", &bridge, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        ip(&["-n", &name, "link", "set", &peer, "name", "eth0"])?;
        ip(&["-n", &name, "addr", "add", &address, "dev", "eth0"])?;
        ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        ip(&["-n", &name, "route", "add", "default", "via", &self.host_address().to_string()])
    }
}

impl Drop for LocalNetwork {
    fn drop(&mut self) {
        remove_slot(self.slot, &self.dir);
    }
}

/// Where slots are recorded: `/run/br2k/slots` for root, a per-user directory otherwise.
fn slots_root() -> PathBuf {
    if sys::effective_uid() == 0 {
        return PathBuf::from("/run/br2k/slots");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("br2k/slots"),
        None => std::env::temp_dir().join(format!("br2k-{}/slots", sys::effective_uid())),
    }
}

/// Cleans up after every runner that is gone, then takes `wanted`, or else the first
/// free slot.
fn claim_slot(slots: &Path, wanted: Option<u8>) -> Result<(u8, PathBuf)> {
    for slot in 1..=LAST_SLOT {
        let dir = slots.join(format!("slot-{slot}"));
        if !dir.exists() {
            continue;
        }
        let owner = fs::read_to_string(dir.join("owner")).ok().and_then(|s| s.trim().parse::<u32>().ok());
        let gone = match owner {
            Some(pid) => !sys::exists(pid),
            // No owner file yet: another runner is claiming it right now, or crashed in
            // the instant between; only an old one is abandoned.
            None => is_stale(&dir),
        };
        if gone {
            tracing::info!(slot, "cleaning up after a runner that did not exit cleanly");
            remove_slot(slot, &dir);
        }
    }
    let candidates = match wanted {
        Some(slot) if (1..=LAST_SLOT).contains(&slot) => slot..=slot,
        Some(slot) => return Err(DeployError::Invalid(format!("local slot {slot} is not in 1..={LAST_SLOT}"))),
        None => 1..=LAST_SLOT,
    };
    for slot in candidates {
        let dir = slots.join(format!("slot-{slot}"));
        match fs::create_dir(&dir) {
            Ok(()) => {
                let owner = dir.join("owner");
                fs::write(&owner, std::process::id().to_string())
                    .map_err(|e| DeployError::io(format!("write {}", owner.display()), e))?;
                return Ok((slot, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && wanted.is_some() => {
                let owner = fs::read_to_string(dir.join("owner")).unwrap_or_default();
                return Err(DeployError::Invalid(format!(
                    "local slot {slot}, whose addresses the kept data was made with, is in use by another running br2k service (runner pid {}); stop it first",
                    owner.trim()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(DeployError::io(format!("create {}", dir.display()), e)),
        }
    }
    Err(DeployError::Invalid(format!(
        "all {LAST_SLOT} local slots under {} are in use by running br2k services; stop some (`br2k down`)",
        slots.display()
    )))
}

fn is_stale(dir: &Path) -> bool {
    fs::metadata(dir).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 30))
}

/// Stops the processes a slot recorded, deletes its namespaces and bridge, and forgets it.
fn remove_slot(slot: u8, dir: &Path) {
    if let Ok(pids) = fs::read_to_string(dir.join("pids")) {
        for line in pids.lines() {
            let Some((pid, cwd)) = line.split_once('\t') else { continue };
            let Ok(pid) = pid.parse::<u32>() else { continue };
            // Only a process still running in the directory it was started in is ours.
            if pid != std::process::id() && fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|p| p == Path::new(cwd))
            {
                let _ = sys::send(pid, sys::Signal::Kill);
            }
        }
    }
    if sys::effective_uid() == 0 {
        remove_links(slot);
    }
    let _ = fs::remove_dir_all(dir);
}

/// Deletes slot `slot`'s veths, namespaces and bridge. The host ends of the veths are
/// deleted first and explicitly: a namespace's own cleanup, which would take them along,
/// runs asynchronously in the kernel, and a next `ip link add` of the same name may come
/// first.
fn remove_links(slot: u8) {
    let prefix = format!("b2k{slot}n");
    if let Ok(links) = fs::read_dir("/sys/class/net") {
        for link in links.flatten() {
            let Ok(name) = link.file_name().into_string() else { continue };
            if name.strip_prefix(&prefix).is_some_and(|n| n.parse::<u8>().is_ok()) {
                let _ = ip(&["link", "del", &name]);
            }
        }
    }
    for name in namespaces() {
        if name.strip_prefix(&prefix).is_some_and(|n| n.parse::<u8>().is_ok()) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
    let bridge = format!("b2k{slot}");
    if Path::new("/sys/class/net").join(&bridge).exists() {
        let _ = ip(&["link", "del", &bridge]);
    }
}

/// Removes namespaces and bridges of slots that have no directory at all (the slots root
/// was wiped, by a reboot of /run or by hand, while they stayed).
fn sweep_unowned(slots: &Path) {
    let mut seen = std::collections::BTreeSet::new();
    for name in namespaces() {
        if let Some(slot) = slot_of(&name) {
            seen.insert(slot);
        }
    }
    if let Ok(links) = fs::read_dir("/sys/class/net") {
        for link in links.flatten() {
            if let Some(slot) =
                link.file_name().to_str().and_then(|n| n.strip_prefix("b2k")).and_then(|s| s.parse().ok())
            {
                seen.insert(slot);
            }
        }
    }
    for slot in seen {
        if !slots.join(format!("slot-{slot}")).exists() {
            tracing::info!(slot, "removing network namespaces and links left without an owner");
            remove_links(slot);
        }
    }
}

/// `b2k12n3` -> 12.
fn slot_of(name: &str) -> Option<u8> {
    let rest = name.strip_prefix("b2k")?;
    let (slot, node) = rest.split_once('n')?;
    node.parse::<u8>().ok()?;
    slot.parse().ok()
}

fn namespaces() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|dir| dir.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

/// Runs `ip ARGS`.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DeployError::ToolNotFound { program: "ip (iproute2)".into(), searched: "PATH".into() }
        } else {
            DeployError::io("run ip", e)
        }
    })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(DeployError::Net {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::slot_of;

    #[test]
    fn names_map_back_to_their_slot() {
        assert_eq!(slot_of("b2k12n3"), Some(12));
        assert_eq!(slot_of("b2k250n9"), Some(250));
        assert_eq!(slot_of("b2k12"), None);
        assert_eq!(slot_of("b2kxn1"), None);
        assert_eq!(slot_of("other"), None);
    }
}
