//! The objects a BR2K service is made of on Kubernetes (paper III.3), built
//! from a [`KubernetesSpec`]. For replica `i` of service `s`:
//!
//! - StatefulSet `s-i` of one Pod (`s-i-0`) with two containers, the app and its etcd
//!   member, after an init container (the app's image) that decides how the member
//!   starts: from its data, founding the cluster, or replacing a member whose volume was
//!   lost (`br2k_replica_cli::etcd_init`). Kubernetes recreates the Pod after an eviction, a preemption, a deletion or
//!   the loss of its node, without the manager. One StatefulSet per replica, not one for
//!   all: the paper places replica `i` on worker node `i` and gives it its own endpoint,
//!   br2k rolls replicas out one at a time gated on the *service* having a leader (which a
//!   StatefulSet's own controller cannot see), and a membership change adds or removes
//!   one replica's objects without renumbering the others;
//! - Service `s-i`, a stable name for the Pod: the etcd peer URLs are built from these
//!   names, and clients inside the cluster reach the app through it;
//! - PersistentVolumeClaims `s-i-etcd` and `s-i-data` (sized separately), declared
//!   without a node so that a `WaitForFirstConsumer` storage class binds them where the
//!   scheduler puts the Pod.
//!
//! Plus, for the service: Secret `s-operator` (the key the replicas publish the leader's
//! location with, mounted as a 0400 file), Secret `s-pull` when the container registry
//! needs credentials (used by the kubelet only), Secret `s-backup-push` when the backups
//! get a push credential of their own, ConfigMap `s-deployment` (the settings the
//! manager redeploys with), ConfigMap `s-etcd-bootstrap` (whether the etcd cluster may
//! still be founded), NetworkPolicy `s` (only the service's own Pods reach the etcd
//! ports, anyone reaches the app's), and PodDisruptionBudget `s`, which never lets a
//! drain take more replicas than the service can lose and keep its quorum.
//!
//! Everything is deterministic (sorted maps, no timestamps), so applying the same spec
//! twice sends the same objects and server-side apply changes nothing.

mod pod;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, PersistentVolumeClaimSpec, Secret, Service, ServicePort, ServiceSpec,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::settings::ClusterSettings;
use crate::context::WorkerNode;
use crate::error::{DeployError, Result};
use br2k_oci::registry::Credentials;

/// The label br2k selects worker nodes by when a node was given without labels.
pub const NODE_LABEL: &str = "br2k.io/node";
/// The label naming a Pod's replica (`s-i`).
pub const REPLICA_LABEL: &str = "br2k.io/replica";
/// The well-known zone label: where the context's nodes carry it, replicas spread over zones.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The ConfigMap key holding the recorded [`ClusterSettings`] (JSON).
pub const SETTINGS_KEY: &str = "settings.json";
/// The key of the etcd bootstrap hint: `new` until the service first has a leader, then
/// `existing` for good (the etcd init step founds a cluster only while it says `new`).
pub const ETCD_BOOTSTRAP_KEY: &str = "etcd-cluster-state";

const APP_PORT: i32 = 8080;
const ETCD_CLIENT_PORT: i32 = 2379;
const ETCD_PEER_PORT: i32 = 2380;

/// What to deploy on a cluster.
#[derive(Clone, Debug)]
pub struct KubernetesSpec {
    /// The service name; it names every object, so it must be a DNS label.
    pub service: String,
    /// The namespace (the context's).
    pub namespace: String,
    /// How many replicas; at most as many as `nodes`.
    pub replicas: usize,
    /// The app image, pinned by digest: `host/repository@sha256:...`.
    pub image: String,
    /// Worker nodes (the context's); replica `i` prefers node `i` and may move to another
    /// listed node when its own is lost.
    pub nodes: Vec<WorkerNode>,
    /// Public endpoints (the context's), one per replica in order; without them each
    /// replica publishes its in-cluster Service URL.
    pub endpoints: Vec<String>,
    /// The storage class for the volumes (the cluster's default when `None`).
    pub storage_class: Option<String>,
    /// Images, sizes, resources, the chain.
    pub settings: ClusterSettings,
    /// Where the leader backs up (the registry and repository of its image); `None`: no backups.
    pub backup: Option<BackupTarget>,
}

/// Where a deployed service's leader backs it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupTarget {
    /// The container registry's URL.
    pub registry_url: String,
    /// The repository.
    pub repository: String,
}

impl KubernetesSpec {
    /// What deploying `service` as `record` on `context` declares.
    pub fn new(
        service: &str,
        context: &crate::context::ContextInfo,
        record: &crate::deployment::DeploymentRecord,
        settings: &ClusterSettings,
    ) -> Self {
        Self {
            service: service.to_owned(),
            namespace: context.namespace.clone(),
            replicas: record.replicas as usize,
            image: record.image.pull_reference(),
            nodes: context.resources.nodes.clone(),
            endpoints: context.resources.endpoints.clone(),
            storage_class: context.resources.storage_class.clone(),
            settings: settings.clone(),
            backup: Some(BackupTarget {
                registry_url: record.image.registry_url.clone(),
                repository: record.image.repository.clone(),
            }),
        }
    }
}

/// The values of the Secrets. Left out of what `--dry-run` prints.
#[derive(Clone, Debug, Default)]
pub struct SecretValues {
    /// The replicas' operator key (0x hex).
    pub operator_key: Option<String>,
    /// The container registry's host and credentials, when it needs them: for the kubelet
    /// to pull the image, never given to the app.
    pub pull: Option<(String, Credentials)>,
    /// The registry's host and a credential that may push to the backup repository only
    /// (`BR2K_BACKUP_PUSH_USERNAME` and `_PASSWORD` where the deploy runs), mounted into
    /// the app for its backups.
    pub backup_push: Option<(String, Credentials)>,
    /// The etcd certificates, with `--etcd-tls` (made at the first deploy, kept after).
    pub etcd_tls: Option<crate::etcd_tls::EtcdCertificates>,
    /// The replicas' admin token (`BR2K_ADMIN_TOKEN` where the deploy runs), for their
    /// admin routes (`br2k backup now`, `br2k tx`); without it those stay closed.
    pub admin_token: Option<String>,
}

/// Every object of one deployment, in the order they are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifests {
    /// The operator key and, when needed, the pull and backup-push credentials and the
    /// etcd certificates.
    pub secrets: Vec<Secret>,
    /// The recorded settings (`s-deployment`).
    pub settings: ConfigMap,
    /// The etcd bootstrap hint (`s-etcd-bootstrap`) as a first deployment creates it
    /// (`new`); the rollout creates it only where it is missing, and turns it to
    /// `existing` once the service has a leader.
    pub etcd_bootstrap: ConfigMap,
    /// Two volumes per replica.
    pub claims: Vec<PersistentVolumeClaim>,
    /// One per replica.
    pub services: Vec<Service>,
    /// Who may reach the Pods' ports.
    pub network_policy: NetworkPolicy,
    /// How many replicas a drain may take at once.
    pub disruption_budget: PodDisruptionBudget,
    /// One per replica, in replica order: what a rollout applies one at a time.
    pub stateful_sets: Vec<StatefulSet>,
}

/// The name of each of a service's objects, in one place (the rollout and teardown find
/// them by these).
pub mod names {
    /// Replica `i`'s StatefulSet, Service and etcd member: `s-i`.
    pub fn replica(service: &str, i: usize) -> String {
        format!("{service}-{i}")
    }

    /// The one Pod of replica `i`'s StatefulSet.
    pub fn pod(service: &str, i: usize) -> String {
        format!("{service}-{i}-0")
    }

    /// The recorded settings' ConfigMap.
    pub fn settings(service: &str) -> String {
        format!("{service}-deployment")
    }

    /// The etcd bootstrap hint's ConfigMap.
    pub fn etcd_bootstrap(service: &str) -> String {
        format!("{service}-etcd-bootstrap")
    }

    /// The label selector of every object of `service` br2k made.
    pub fn selector(service: &str) -> String {
        format!("app.kubernetes.io/name={service},app.kubernetes.io/managed-by=br2k")
    }
}

impl Manifests {
    /// Builds the objects for `spec`; `secrets` fills in the Secrets' data.
    ///
    /// # Errors
    /// A service name that cannot name Kubernetes objects, fewer worker nodes than
    /// replicas, a bad size, resource or image reference.
    pub fn build(spec: &KubernetesSpec, secrets: &SecretValues) -> Result<Self> {
        check_spec(spec)?;
        let operator_secret = format!("{}-operator", spec.service);
        let pull_secret = secrets.pull.as_ref().map(|_| format!("{}-pull", spec.service));
        let push_secret = secrets.backup_push.as_ref().map(|_| format!("{}-backup-push", spec.service));
        let mut out = Self {
            secrets: Vec::new(),
            settings: spec.settings_map()?,
            etcd_bootstrap: spec.etcd_bootstrap_map("new"),
            claims: Vec::new(),
            services: Vec::new(),
            network_policy: spec.network_policy(),
            disruption_budget: spec.disruption_budget(),
            stateful_sets: Vec::new(),
        };

        let mut operator =
            Secret { metadata: spec.meta(&operator_secret, None), type_: Some("Opaque".into()), ..Secret::default() };
        if let Some(key) = &secrets.operator_key {
            let mut data = BTreeMap::from([("ETH_PRIVATE_KEY".into(), ByteString(key.clone().into_bytes()))]);
            if let Some(token) = &secrets.admin_token {
                data.insert("BR2K_ADMIN_TOKEN".into(), ByteString(token.clone().into_bytes()));
            }
            operator.data = Some(data);
        }
        out.secrets.push(operator);
        for (name, credentials) in [(&pull_secret, &secrets.pull), (&push_secret, &secrets.backup_push)] {
            if let (Some(name), Some((host, credentials))) = (name, credentials) {
                out.secrets.push(spec.docker_config_secret(name, host, credentials));
            }
        }
        if spec.settings.etcd_tls {
            let mut tls = Secret {
                metadata: spec.meta(&format!("{}-etcd-tls", spec.service), None),
                type_: Some("Opaque".into()),
                ..Secret::default()
            };
            if let Some(certificates) = &secrets.etcd_tls {
                let mut data =
                    BTreeMap::from([("ca.crt".to_owned(), ByteString(certificates.ca.clone().into_bytes()))]);
                for (i, member) in certificates.members.iter().enumerate() {
                    let replica = spec.replica(i + 1);
                    data.insert(format!("{replica}.crt"), ByteString(member.cert.clone().into_bytes()));
                    data.insert(format!("{replica}.key"), ByteString(member.key.clone().into_bytes()));
                }
                tls.data = Some(data);
            }
            out.secrets.push(tls);
        }
        let peers: Vec<String> =
            (1..=spec.replicas).map(|i| format!("{}={}", spec.replica(i), spec.peer_url(i))).collect();
        let secret_names = pod::SecretNames {
            operator: &operator_secret,
            pull: pull_secret.as_deref(),
            backup_push: push_secret.as_deref(),
        };
        for i in 1..=spec.replicas {
            out.claims.push(spec.claim(i, "etcd", &spec.settings.etcd_volume_size));
            out.claims.push(spec.claim(i, "data", &spec.settings.data_volume_size));
            out.services.push(spec.service_for(i));
            out.stateful_sets.push(spec.stateful_set(i, &peers.join(","), &secret_names)?);
        }
        Ok(out)
    }

    /// Every object as YAML documents separated by `---`, Secrets without their data (a
    /// comment says so): what `--dry-run` prints.
    pub fn to_yaml(&self) -> String {
        let mut docs = Vec::new();
        for secret in &self.secrets {
            let mut shown = secret.clone();
            let keys: Vec<String> = shown.data.take().map(|d| d.into_keys().collect()).unwrap_or_default();
            let note = if keys.is_empty() {
                "# its data is written at deploy time and never printed\n".to_owned()
            } else {
                format!("# data ({}) is written at deploy time and never printed\n", keys.join(", "))
            };
            docs.push(note + &yaml(&shown));
        }
        docs.push(yaml(&self.settings));
        docs.push(yaml(&self.etcd_bootstrap));
        docs.extend(self.claims.iter().map(yaml));
        docs.extend(self.services.iter().map(yaml));
        docs.push(yaml(&self.network_policy));
        docs.push(yaml(&self.disruption_budget));
        docs.extend(self.stateful_sets.iter().map(yaml));
        docs.join("---\n")
    }

    /// How many objects there are.
    pub fn len(&self) -> usize {
        self.secrets.len() + 2 + self.claims.len() + self.services.len() + 2 + self.stateful_sets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn yaml<T: Serialize>(object: &T) -> String {
    serde_saphyr::to_string(object).expect("Kubernetes objects serialize to YAML")
}

impl KubernetesSpec {
    /// `s-i`: the replica's StatefulSet, Service and etcd member name.
    pub(crate) fn replica(&self, i: usize) -> String {
        names::replica(&self.service, i)
    }

    /// The in-cluster DNS name of replica `i`'s Service.
    fn host(&self, i: usize) -> String {
        format!("{}.{}.svc", self.replica(i), self.namespace)
    }

    fn peer_url(&self, i: usize) -> String {
        format!("{}://{}:{ETCD_PEER_PORT}", self.etcd_scheme(), self.host(i))
    }

    /// Where the other members' init steps reach member `i` (its Service).
    fn client_url(&self, i: usize) -> String {
        format!("{}://{}:{ETCD_CLIENT_PORT}", self.etcd_scheme(), self.host(i))
    }

    const fn etcd_scheme(&self) -> &'static str {
        if self.settings.etcd_tls { "https" } else { "http" }
    }

    /// How many replicas must run for the service to keep its etcd quorum.
    pub const fn quorum(&self) -> usize {
        self.replicas / 2 + 1
    }

    /// Every name member `i` is reached by (its Service's, short and qualified): what its
    /// certificate names.
    pub fn member_hosts(&self, i: usize) -> Vec<String> {
        let short = self.replica(i);
        vec![
            short.clone(),
            format!("{short}.{}", self.namespace),
            format!("{short}.{}.svc", self.namespace),
            format!("{short}.{}.svc.cluster.local", self.namespace),
        ]
    }

    /// Where replica `i` tells clients to send requests when it leads.
    pub fn public_url(&self, i: usize) -> String {
        self.endpoints.get(i - 1).cloned().unwrap_or_else(|| format!("http://{}:{APP_PORT}", self.host(i)))
    }

    /// The labels every object of the service carries.
    fn own_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), self.service.clone()),
            ("app.kubernetes.io/managed-by".to_owned(), "br2k".to_owned()),
        ])
    }

    fn labels(&self, replica: Option<usize>) -> BTreeMap<String, String> {
        let mut labels = self.own_labels();
        if let Some(i) = replica {
            labels.insert(REPLICA_LABEL.into(), self.replica(i));
        }
        labels
    }

    fn own_selector(&self) -> LabelSelector {
        LabelSelector { match_labels: Some(self.own_labels()), ..LabelSelector::default() }
    }

    fn meta(&self, name: &str, replica: Option<usize>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(replica)),
            ..ObjectMeta::default()
        }
    }

    fn docker_config_secret(&self, name: &str, host: &str, credentials: &Credentials) -> Secret {
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", credentials.username, credentials.password));
        let config = serde_json::json!({ "auths": { host: { "auth": auth } } });
        Secret {
            metadata: self.meta(name, None),
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(".dockerconfigjson".into(), ByteString(config.to_string().into_bytes()))])),
            ..Secret::default()
        }
    }

    /// The settings as recorded for the manager's redeploys; nothing secret is in them.
    fn settings_map(&self) -> Result<ConfigMap> {
        let json = serde_json::to_string_pretty(&self.settings)
            .map_err(|e| DeployError::Invalid(format!("the settings do not serialize: {e}")))?;
        Ok(ConfigMap {
            metadata: self.meta(&names::settings(&self.service), None),
            data: Some(BTreeMap::from([(SETTINGS_KEY.to_owned(), json)])),
            ..ConfigMap::default()
        })
    }

    /// The etcd bootstrap hint saying `state` (`new` or `existing`).
    pub(crate) fn etcd_bootstrap_map(&self, state: &str) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(&names::etcd_bootstrap(&self.service), None),
            data: Some(BTreeMap::from([(ETCD_BOOTSTRAP_KEY.to_owned(), state.to_owned())])),
            ..ConfigMap::default()
        }
    }

    /// A volume claim without a node or a volume: the storage class binds it where the
    /// Pod lands (`WaitForFirstConsumer`) or at once (`Immediate`), as it is configured.
    fn claim(&self, i: usize, volume: &str, size: &str) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: self.meta(&format!("{}-{volume}", self.replica(i)), Some(i)),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: self.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".into(), Quantity(size.to_owned()))])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }
    }

    /// Ingress to the service's Pods: etcd's ports from the service's own Pods only, the
    /// app's port from anywhere; nothing else.
    fn network_policy(&self) -> NetworkPolicy {
        let port = |number: i32| NetworkPolicyPort {
            port: Some(IntOrString::Int(number)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        };
        NetworkPolicy {
            metadata: self.meta(&self.service, None),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(self.own_selector()),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![
                    NetworkPolicyIngressRule {
                        from: Some(vec![NetworkPolicyPeer {
                            pod_selector: Some(self.own_selector()),
                            ..NetworkPolicyPeer::default()
                        }]),
                        ports: Some(vec![port(ETCD_PEER_PORT), port(ETCD_CLIENT_PORT)]),
                    },
                    NetworkPolicyIngressRule { from: None, ports: Some(vec![port(APP_PORT)]) },
                ]),
                ..NetworkPolicySpec::default()
            }),
        }
    }

    /// At least a quorum of replicas stays available through voluntary disruptions
    /// (drains, upgrades of nodes): with 3 replicas a drain takes one at a time, with 1 it
    /// waits for the operator. A replica that is not ready may still be evicted
    /// (`AlwaysAllow`): it is already not part of what serves, and a stuck drain helps nobody.
    fn disruption_budget(&self) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(&self.service, None),
            spec: Some(PodDisruptionBudgetSpec {
                min_available: Some(IntOrString::Int(i32::try_from(self.quorum()).unwrap_or(i32::MAX))),
                selector: Some(self.own_selector()),
                unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        }
    }

    fn service_for(&self, i: usize) -> Service {
        let port = |name: &str, number: i32| ServicePort {
            name: Some(name.into()),
            port: number,
            target_port: Some(IntOrString::Int(number)),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        };
        Service {
            metadata: self.meta(&self.replica(i), Some(i)),
            spec: Some(ServiceSpec {
                selector: Some(pod::selector_labels(self, i)),
                ports: Some(vec![
                    port("app", APP_PORT),
                    port("etcd-client", ETCD_CLIENT_PORT),
                    port("etcd-peer", ETCD_PEER_PORT),
                ]),
                // etcd members must find each other before any of them is ready.
                publish_not_ready_addresses: Some(true),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }
}

fn check_spec(spec: &KubernetesSpec) -> Result<()> {
    let label_ok = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && s.as_bytes()[0].is_ascii_lowercase()
            && !s.ends_with('-')
    };
    // `s-i-etcd` must stay a DNS label (63) for every i up to 9, and the Pod's `s-i-0`
    // its hostname (a StatefulSet's name takes 52 at most for its revision label).
    if !label_ok(&spec.service, 48) {
        return Err(DeployError::Invalid(format!(
            "service name {:?} cannot name Kubernetes objects: use at most 48 lowercase letters, digits and '-', starting with a letter",
            spec.service
        )));
    }
    if !label_ok(&spec.namespace, 63) {
        return Err(DeployError::Invalid(format!("namespace {:?} is not a DNS label", spec.namespace)));
    }
    if spec.replicas == 0 || spec.replicas > 9 {
        return Err(DeployError::Invalid(format!("{} replicas: give 1 to 9", spec.replicas)));
    }
    if spec.nodes.len() < spec.replicas {
        return Err(DeployError::Invalid(format!(
            "{} replicas need {} worker nodes, one per replica (no two replicas share a node), but the context lists {}: add nodes with `br2k context add ... --node NAME` (and label them `{NODE_LABEL}=NAME`)",
            spec.replicas,
            spec.replicas,
            spec.nodes.len()
        )));
    }
    if !spec.image.contains("@sha256:") {
        return Err(DeployError::Invalid(format!(
            "image {:?} is not pinned by digest (host/repository@sha256:...)",
            spec.image
        )));
    }
    spec.settings.check()
}
