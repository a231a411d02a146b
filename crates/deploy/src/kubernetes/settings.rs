//! How a deployment on a Kubernetes context is made beyond what the recovery info on chain
//! records (context, replica count, image): the etcd image, volume sizes, container
//! resources, the chain as the Pods reach it. `br2k deploy` takes them from its flags and
//! records them in the cluster (ConfigMap `s-deployment`); the manager's recovery applies
//! what is recorded there, never its own flags, so a recovered service has the shape its
//! team gave it.

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

use crate::backup_schedule::BackupSchedule;
use crate::error::{DeployError, Result};

/// The etcd image the replicas run next to the app, unless told otherwise.
pub const DEFAULT_ETCD_IMAGE: &str = "quay.io/coreos/etcd:v3.5.21";

/// etcd's largest space quota: etcd warns above 8 GiB, and its database is mapped into
/// memory, so a bigger one mostly buys longer snapshots and restarts.
const MAX_ETCD_QUOTA: u64 = 8 << 30;

/// What a deployment declares beyond the recovery info.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSettings {
    /// The etcd image next to each app container.
    pub etcd_image: String,
    /// Each replica's etcd volume; etcd's space quota is half of it ([`Self::etcd_quota_bytes`]).
    pub etcd_volume_size: String,
    /// Each replica's app data volume.
    pub data_volume_size: String,
    /// CPU and memory of each replica's app container.
    pub app_resources: ContainerResources,
    /// CPU and memory of each replica's etcd container.
    pub etcd_resources: ContainerResources,
    /// The PriorityClass of the replicas' Pods (the cluster's default when `None`).
    pub priority_class: Option<String>,
    /// The chain as the Pods reach it.
    pub rpc_url: String,
    /// The service registry.
    pub registry: Address,
    /// How often a deployed service backs up, and what it keeps.
    pub backup: BackupSchedule,
    /// TLS for etcd's client and peer traffic, from a Secret of certificates made at deploy.
    pub etcd_tls: bool,
}

/// A container's CPU and memory. Requests equal limits, so that a Pod whose containers all
/// say so is in the Guaranteed QoS class: the last a node under pressure evicts, and
/// never throttled below what it asked for. A quorum member evicted first (BestEffort)
/// is a quorum lost first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerResources {
    /// CPU, a Kubernetes quantity (`500m`, `2`).
    pub cpu: String,
    /// Memory, a Kubernetes quantity (`512Mi`, `2Gi`).
    pub memory: String,
}

impl ContainerResources {
    /// The app's default: enough for the log server under the paper's load.
    pub fn app_default() -> Self {
        Self { cpu: "500m".into(), memory: "512Mi".into() }
    }

    /// etcd's default: its database (the quota) is memory-mapped, so memory follows the quota.
    pub fn etcd_default() -> Self {
        Self { cpu: "1".into(), memory: "2Gi".into() }
    }
}

impl ClusterSettings {
    /// etcd's space quota for this etcd volume: half of it, at most 8 GiB. The other half
    /// holds the write-ahead log, etcd's own snapshots and the copy a defragmentation
    /// makes, so a member reaches `NOSPACE` (which it survives) before its disk fills
    /// (which it may not).
    ///
    /// # Errors
    /// A volume size that is not a quantity, or under 256 MiB.
    pub fn etcd_quota_bytes(&self) -> Result<u64> {
        let volume = quantity_bytes(&self.etcd_volume_size)
            .ok_or_else(|| bad_quantity("--etcd-volume-size", &self.etcd_volume_size))?;
        if volume < 256 << 20 {
            return Err(DeployError::Invalid(format!(
                "--etcd-volume-size {} is too small for an etcd member: give at least 256Mi (etcd's quota is half the volume)",
                self.etcd_volume_size
            )));
        }
        Ok((volume / 2).min(MAX_ETCD_QUOTA))
    }

    /// Checks every quantity, so that a bad flag is refused before anything is applied.
    ///
    /// # Errors
    /// The first quantity that is not one, named with its flag.
    pub fn check(&self) -> Result<()> {
        self.etcd_quota_bytes()?;
        quantity_bytes(&self.data_volume_size)
            .ok_or_else(|| bad_quantity("--data-volume-size", &self.data_volume_size))?;
        for (flag, value) in [("--app-cpu", &self.app_resources.cpu), ("--etcd-cpu", &self.etcd_resources.cpu)] {
            if !is_cpu_quantity(value) {
                return Err(DeployError::Invalid(format!(
                    "{flag} {value:?} is not a CPU quantity: give cores (1, 0.5) or millicores (500m)"
                )));
            }
        }
        for (flag, value) in
            [("--app-memory", &self.app_resources.memory), ("--etcd-memory", &self.etcd_resources.memory)]
        {
            quantity_bytes(value).ok_or_else(|| bad_quantity(flag, value))?;
        }
        if let Some(class) = &self.priority_class
            && !is_dns_subdomain(class)
        {
            return Err(DeployError::Invalid(format!(
                "--priority-class {class:?} cannot name a PriorityClass: lowercase letters, digits, '-' and '.'"
            )));
        }
        Ok(())
    }
}

fn bad_quantity(flag: &str, value: &str) -> DeployError {
    DeployError::Invalid(format!("{flag} {value:?} is not a size: give a Kubernetes quantity like 4Gi or 500Mi"))
}

/// The bytes a Kubernetes memory or storage quantity (`4Gi`, `500Mi`, `2G`, `1048576`)
/// stands for; `None` for anything else, zero included.
pub fn quantity_bytes(text: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (number, unit) =
        SUFFIXES.iter().find_map(|(suffix, unit)| text.strip_suffix(suffix).map(|n| (n, *unit))).unwrap_or((text, 1));
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse::<u64>().ok()?.checked_mul(unit).filter(|&n| n > 0)
}

fn is_cpu_quantity(text: &str) -> bool {
    let number = text.strip_suffix('m').unwrap_or(text);
    let mut parts = number.splitn(2, '.');
    let whole = parts.next().unwrap_or_default();
    let fraction = parts.next();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let valid = digits(whole) && fraction.is_none_or(digits) && !(text.ends_with('m') && fraction.is_some());
    valid && number.bytes().any(|b| b.is_ascii_digit() && b != b'0')
}

fn is_dns_subdomain(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 253
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && text.as_bytes()[0].is_ascii_alphanumeric()
        && text.as_bytes()[text.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::tests::settings;

    #[test]
    fn quantities_are_read_as_kubernetes_reads_them() {
        assert_eq!(quantity_bytes("4Gi"), Some(4 << 30));
        assert_eq!(quantity_bytes("500Mi"), Some(500 << 20));
        assert_eq!(quantity_bytes("2G"), Some(2_000_000_000));
        assert_eq!(quantity_bytes("1048576"), Some(1 << 20));
        for bad in ["", "Gi", "0", "0Gi", "1.5Gi", "-1Gi", "lots", "4GB", "4gi"] {
            assert_eq!(quantity_bytes(bad), None, "{bad:?}");
        }
        for good in ["1", "0.5", "500m", "2", "1.25"] {
            assert!(is_cpu_quantity(good), "{good:?}");
        }
        for bad in ["", "m", "0", "0m", "1.5m", "one", "1 core", "-1"] {
            assert!(!is_cpu_quantity(bad), "{bad:?}");
        }
    }

    #[test]
    fn etcds_quota_is_half_its_volume_at_most_8_gib() {
        let mut s = settings();
        assert_eq!(s.etcd_quota_bytes().unwrap(), 2 << 30, "the 4Gi default keeps etcd's own 2 GiB default");
        s.etcd_volume_size = "40Gi".into();
        assert_eq!(s.etcd_quota_bytes().unwrap(), 8 << 30);
        s.etcd_volume_size = "100Mi".into();
        assert!(s.etcd_quota_bytes().unwrap_err().to_string().contains("at least 256Mi"));
    }

    #[test]
    fn every_bad_setting_is_named_with_its_flag() {
        type Spoil = fn(&mut ClusterSettings);
        let cases: [(Spoil, &str); 5] = [
            (|s| s.data_volume_size = "big".into(), "--data-volume-size \"big\""),
            (|s| s.app_resources.cpu = "fast".into(), "--app-cpu \"fast\""),
            (|s| s.etcd_resources.memory = "2GB".into(), "--etcd-memory \"2GB\""),
            (|s| s.priority_class = Some("High_Priority".into()), "--priority-class"),
            (|s| s.etcd_volume_size = "x".into(), "--etcd-volume-size"),
        ];
        for (spoil, wanted) in cases {
            let mut s = settings();
            spoil(&mut s);
            let err = s.check().unwrap_err().to_string();
            assert!(err.contains(wanted), "{err}");
        }
        settings().check().unwrap();
    }

    #[test]
    fn settings_round_trip_through_their_record() {
        let s = ClusterSettings { priority_class: Some("br2k-critical".into()), ..settings() };
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"etcdVolumeSize\":\"4Gi\""), "{text}");
        assert_eq!(serde_json::from_str::<ClusterSettings>(&text).unwrap(), s);
    }
}
