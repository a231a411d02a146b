//! The objects a BR2K service is made of on Kubernetes (paper III.3), built
//! from a [`KubernetesSpec`]. For replica `i` of service `s`:
//!
//! - Pod `s-i`, placed by a node selector on its worker node's labels (by default the br2k
//!   label `br2k.io/node=<node name>`), with two containers: the app, and an etcd member
//!   whose client port listens on localhost only (only its own app talks to it);
//! - Service `s-i`, a stable name for the Pod: the etcd peer URLs are built from these
//!   names, and clients inside the cluster reach the app through it;
//! - PersistentVolumeClaims `s-i-etcd` and `s-i-data`, so a Pod started again keeps its
//!   etcd member and its app data.
//!
//! Plus Secret `s-operator` (the key the replicas publish the leader's location with),
//! when the container registry needs credentials Secret `s-pull` (a Docker config), and
//! NetworkPolicy `s`: only the service's own Pods reach the etcd ports (the peer port is
//! the only one open beyond the Pod; the client port listens on localhost), while anyone
//! may reach the app's port, its clients' way in. The replicas' peer routes share that
//! port (a NetworkPolicy sees ports, not paths): the peer token guards them.
//!
//! Everything is deterministic (sorted maps, no timestamps), so applying the same spec
//! twice sends the same objects and server-side apply changes nothing.

use std::collections::BTreeMap;

use alloy::primitives::Address;
use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, LocalObjectReference,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSpec, Probe, Secret,
    SecretKeySelector, SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::context::WorkerNode;
use crate::error::{DeployError, Result};
use br2k_oci::registry::Credentials;

/// The label br2k selects worker nodes by when a node was given without labels.
pub const NODE_LABEL: &str = "br2k.io/node";
/// The etcd image the replicas run next to the app, unless told otherwise.
pub const DEFAULT_ETCD_IMAGE: &str = "quay.io/coreos/etcd:v3.5.21";

const APP_PORT: i32 = 8080;
const ETCD_CLIENT_PORT: i32 = 2379;
const ETCD_PEER_PORT: i32 = 2380;
const APP_DATA: &str = "/var/lib/br2k";
const ETCD_DATA: &str = "/var/lib/etcd";
/// Where the app reads the registry credentials for its backups (Docker's config.json).
const REGISTRY_AUTH: &str = "/var/run/br2k/registry";
/// Where both containers find the member's etcd certificate, with `--etcd-tls`.
const ETCD_TLS: &str = "/var/run/br2k/etcd-tls";
/// etcd's metrics and health, plain HTTP on localhost (the app reads its quota there).
const ETCD_METRICS_PORT: i32 = 2381;

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
    /// The etcd image.
    pub etcd_image: String,
    /// Worker nodes (the context's), one per replica in order.
    pub nodes: Vec<WorkerNode>,
    /// Public endpoints (the context's), one per replica in order; without them each
    /// replica publishes its in-cluster Service URL.
    pub endpoints: Vec<String>,
    /// The storage class for the volumes (the cluster's default when `None`).
    pub storage_class: Option<String>,
    /// The size of each volume, e.g. `1Gi`.
    pub volume_size: String,
    /// The chain RPC endpoint, as the Pods reach it.
    pub rpc_url: String,
    /// The service registry.
    pub registry: Address,
    /// Where the leader backs up (the registry and repository of its image).
    pub backup: Option<BackupTarget>,
    /// TLS for etcd's client and peer traffic, from Secret `s-etcd-tls`.
    pub etcd_tls: bool,
}

/// Where a deployed service's leader backs it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupTarget {
    /// The container registry's URL.
    pub registry_url: String,
    /// The repository.
    pub repository: String,
    /// How often it backs up and records a backup on chain, and what it keeps.
    pub schedule: crate::backup_schedule::BackupSchedule,
}

/// How a deployment on a Kubernetes context is made, beyond what the recovery info records.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// The etcd image next to each app container.
    pub etcd_image: String,
    /// Each replica's etcd and data volume size.
    pub volume_size: String,
    /// The chain as the Pods reach it.
    pub rpc_url: String,
    /// The service registry.
    pub registry: Address,
    /// How often a deployed service backs up, and what it keeps.
    pub backup: crate::backup_schedule::BackupSchedule,
    /// TLS for etcd's client and peer traffic, from a Secret of certificates made at deploy.
    pub etcd_tls: bool,
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
            etcd_image: settings.etcd_image.clone(),
            nodes: context.resources.nodes.clone(),
            endpoints: context.resources.endpoints.clone(),
            storage_class: context.resources.storage_class.clone(),
            volume_size: settings.volume_size.clone(),
            rpc_url: settings.rpc_url.clone(),
            registry: settings.registry,
            backup: Some(BackupTarget {
                registry_url: record.image.registry_url.clone(),
                repository: record.image.repository.clone(),
                schedule: settings.backup,
            }),
            etcd_tls: settings.etcd_tls,
        }
    }
}

/// The values of the Secrets. Left out of what `--dry-run` prints.
#[derive(Clone, Debug, Default)]
pub struct SecretValues {
    /// The replicas' operator key (0x hex).
    pub operator_key: Option<String>,
    /// The container registry's host and credentials, when it needs them.
    pub pull: Option<(String, Credentials)>,
    /// The etcd certificates, with `--etcd-tls` (made at the first deploy, kept after).
    pub etcd_tls: Option<crate::etcd_tls::EtcdCertificates>,
    /// The replicas' admin token (`BR2K_ADMIN_TOKEN` where the deploy runs), for their
    /// admin routes (`br2k backup now`, `br2k tx`); without it those stay closed.
    pub admin_token: Option<String>,
}

/// Every object of one deployment, in the order they are applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifests {
    /// The operator key and, when needed, the pull credentials.
    pub secrets: Vec<Secret>,
    /// Two volumes per replica.
    pub claims: Vec<PersistentVolumeClaim>,
    /// One per replica.
    pub services: Vec<Service>,
    /// One per replica.
    pub pods: Vec<Pod>,
    /// Who may reach the Pods' ports.
    pub network_policy: NetworkPolicy,
}

impl Manifests {
    /// Builds the objects for `spec`; `secrets` fills in the Secrets' data.
    ///
    /// # Errors
    /// A service name that cannot name Kubernetes objects, fewer worker nodes than
    /// replicas, a bad volume size or image reference.
    pub fn build(spec: &KubernetesSpec, secrets: &SecretValues) -> Result<Self> {
        check_spec(spec)?;
        let operator_secret = format!("{}-operator", spec.service);
        let pull_secret = secrets.pull.as_ref().map(|_| format!("{}-pull", spec.service));
        let mut out = Self {
            secrets: Vec::new(),
            claims: Vec::new(),
            services: Vec::new(),
            pods: Vec::new(),
            network_policy: spec.network_policy(),
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
        if let (Some(name), Some((host, credentials))) = (&pull_secret, &secrets.pull) {
            let auth = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", credentials.username, credentials.password));
            let config = serde_json::json!({ "auths": { host: { "auth": auth } } });
            out.secrets.push(Secret {
                metadata: spec.meta(name, None),
                type_: Some("kubernetes.io/dockerconfigjson".into()),
                data: Some(BTreeMap::from([(".dockerconfigjson".into(), ByteString(config.to_string().into_bytes()))])),
                ..Secret::default()
            });
        }

        if spec.etcd_tls {
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
        for i in 1..=spec.replicas {
            for volume in ["etcd", "data"] {
                out.claims.push(spec.claim(i, volume));
            }
            out.services.push(spec.service_for(i));
            out.pods.push(spec.pod(i, &peers.join(","), &operator_secret, pull_secret.as_deref()));
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
        docs.extend(self.claims.iter().map(yaml));
        docs.extend(self.services.iter().map(yaml));
        docs.push(yaml(&self.network_policy));
        docs.extend(self.pods.iter().map(yaml));
        docs.join("---\n")
    }

    /// How many objects there are.
    pub fn len(&self) -> usize {
        self.secrets.len() + self.claims.len() + self.services.len() + 1 + self.pods.len()
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
    /// `s-i`: the replica's Pod, Service and etcd member name.
    pub(crate) fn replica(&self, i: usize) -> String {
        format!("{}-{i}", self.service)
    }

    /// The in-cluster DNS name of replica `i`'s Service.
    fn host(&self, i: usize) -> String {
        format!("{}.{}.svc", self.replica(i), self.namespace)
    }

    fn peer_url(&self, i: usize) -> String {
        format!("{}://{}:{ETCD_PEER_PORT}", self.etcd_scheme(), self.host(i))
    }

    const fn etcd_scheme(&self) -> &'static str {
        if self.etcd_tls { "https" } else { "http" }
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

    fn labels(&self, replica: Option<usize>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), self.service.clone()),
            ("app.kubernetes.io/managed-by".to_owned(), "br2k".to_owned()),
        ]);
        if let Some(i) = replica {
            labels.insert("br2k.io/replica".into(), self.replica(i));
        }
        labels
    }

    fn meta(&self, name: &str, replica: Option<usize>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(replica)),
            ..ObjectMeta::default()
        }
    }

    fn claim(&self, i: usize, volume: &str) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: self.meta(&format!("{}-{volume}", self.replica(i)), Some(i)),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: self.storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".into(), Quantity(self.volume_size.clone()))])),
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
        let own = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), self.service.clone()),
            ("app.kubernetes.io/managed-by".to_owned(), "br2k".to_owned()),
        ]);
        let port = |number: i32| NetworkPolicyPort {
            port: Some(IntOrString::Int(number)),
            protocol: Some("TCP".into()),
            ..NetworkPolicyPort::default()
        };
        let selector = LabelSelector { match_labels: Some(own), ..LabelSelector::default() };
        NetworkPolicy {
            metadata: self.meta(&self.service, None),
            spec: Some(NetworkPolicySpec {
                pod_selector: Some(selector.clone()),
                policy_types: Some(vec!["Ingress".into()]),
                ingress: Some(vec![
                    NetworkPolicyIngressRule {
                        from: Some(vec![NetworkPolicyPeer {
                            pod_selector: Some(selector),
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

    fn service_for(&self, i: usize) -> Service {
        let port = |name: &str, number: i32| ServicePort {
            name: Some(name.into()),
            port: number,
            target_port: Some(IntOrString::Int(number)),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        };
        let mut selector = BTreeMap::from([("br2k.io/replica".to_owned(), self.replica(i))]);
        selector.insert("app.kubernetes.io/name".into(), self.service.clone());
        Service {
            metadata: self.meta(&self.replica(i), Some(i)),
            spec: Some(ServiceSpec {
                selector: Some(selector),
                ports: Some(vec![port("app", APP_PORT), port("etcd-peer", ETCD_PEER_PORT)]),
                // etcd members must find each other before any of them is ready.
                publish_not_ready_addresses: Some(true),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn pod(&self, i: usize, initial_cluster: &str, operator_secret: &str, pull_secret: Option<&str>) -> Pod {
        let name = self.replica(i);
        let env = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..EnvVar::default() };
        let mut app_env = vec![
            env("BR2K_SERVICE", self.service.clone()),
            env("BR2K_REPLICA", name.clone()),
            env("BR2K_ETCD", format!("{}://127.0.0.1:{ETCD_CLIENT_PORT}", self.etcd_scheme())),
            env("BR2K_ETCD_METRICS", format!("http://127.0.0.1:{ETCD_METRICS_PORT}")),
            env("BR2K_LISTEN", format!("0.0.0.0:{APP_PORT}")),
            env("BR2K_PUBLIC_URL", self.public_url(i)),
            env("BR2K_DATA_DIR", APP_DATA.into()),
            env("BR2K_REGISTRY", self.registry.to_string()),
            env("ETH_RPC_URL", self.rpc_url.clone()),
        ];
        if let Some(backup) = &self.backup {
            app_env.push(env("BR2K_BACKUP_REGISTRY", backup.registry_url.clone()));
            app_env.push(env("BR2K_BACKUP_REPOSITORY", backup.repository.clone()));
            app_env.extend(backup.schedule.env().into_iter().map(|(name, value)| env(&name, value)));
            app_env.push(env("BR2K_BACKUP_PLAIN_HTTP", backup.registry_url.starts_with("http://").to_string()));
            if pull_secret.is_some() {
                // The registry's credentials, from the pull Secret mounted as Docker's config.
                app_env.push(env("DOCKER_CONFIG", REGISTRY_AUTH.into()));
            }
        }
        if self.etcd_tls {
            app_env.push(env("BR2K_ETCD_CA_FILE", format!("{ETCD_TLS}/ca.crt")));
            app_env.push(env("BR2K_ETCD_CERT_FILE", format!("{ETCD_TLS}/member.crt")));
            app_env.push(env("BR2K_ETCD_KEY_FILE", format!("{ETCD_TLS}/member.key")));
        }
        // The admin token, when the deploy was given one (optional: the routes stay closed).
        app_env.push(EnvVar {
            name: "BR2K_ADMIN_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: operator_secret.into(),
                    key: "BR2K_ADMIN_TOKEN".into(),
                    optional: Some(true),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
        app_env.push(EnvVar {
            name: "ETH_PRIVATE_KEY".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: operator_secret.into(),
                    key: "ETH_PRIVATE_KEY".into(),
                    ..SecretKeySelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
        let mount = |volume: &str, path: &str| VolumeMount {
            name: volume.into(),
            mount_path: path.into(),
            ..VolumeMount::default()
        };
        let app = Container {
            name: "app".into(),
            image: Some(self.image.clone()),
            env: Some(app_env),
            ports: Some(vec![ContainerPort {
                name: Some("app".into()),
                container_port: APP_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/br2k/health".into()),
                    port: IntOrString::Int(APP_PORT),
                    ..HTTPGetAction::default()
                }),
                period_seconds: Some(2),
                ..Probe::default()
            }),
            volume_mounts: Some(
                std::iter::once(mount("data", APP_DATA))
                    .chain(
                        self.registry_auth(pull_secret)
                            .map(|_| VolumeMount { read_only: Some(true), ..mount("registry-auth", REGISTRY_AUTH) }),
                    )
                    .chain(self.etcd_tls.then(|| VolumeMount { read_only: Some(true), ..mount("etcd-tls", ETCD_TLS) }))
                    .collect(),
            ),
            ..Container::default()
        };
        let mut etcd_args = vec![
            format!("--name={name}"),
            format!("--data-dir={ETCD_DATA}"),
            // Client port on localhost only: the app next to it is its one client.
            format!("--listen-client-urls={}://127.0.0.1:{ETCD_CLIENT_PORT}", self.etcd_scheme()),
            format!("--advertise-client-urls={}://127.0.0.1:{ETCD_CLIENT_PORT}", self.etcd_scheme()),
            format!("--listen-peer-urls={}://0.0.0.0:{ETCD_PEER_PORT}", self.etcd_scheme()),
            format!("--listen-metrics-urls=http://127.0.0.1:{ETCD_METRICS_PORT}"),
            format!("--initial-advertise-peer-urls={}", self.peer_url(i)),
            format!("--initial-cluster={initial_cluster}"),
            format!("--initial-cluster-token={}", self.service),
            "--initial-cluster-state=new".into(),
            // A member back from a partition must not depose a healthy leader.
            "--pre-vote=true".into(),
        ];
        etcd_args.extend(br2k_replication::etcd_flags::recommended());
        if self.etcd_tls {
            let mounted = std::path::Path::new(ETCD_TLS);
            let files = crate::etcd_tls::EtcdTlsFiles {
                ca: mounted.join("ca.crt"),
                cert: mounted.join("member.crt"),
                key: mounted.join("member.key"),
            };
            etcd_args.extend(files.etcd_flags());
        }
        let etcd = Container {
            name: "etcd".into(),
            image: Some(self.etcd_image.clone()),
            command: Some(vec!["etcd".into()]),
            args: Some(etcd_args),
            ports: Some(vec![ContainerPort {
                name: Some("etcd-peer".into()),
                container_port: ETCD_PEER_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]),
            volume_mounts: Some(
                std::iter::once(mount("etcd", ETCD_DATA))
                    .chain(self.etcd_tls.then(|| VolumeMount { read_only: Some(true), ..mount("etcd-tls", ETCD_TLS) }))
                    .collect(),
            ),
            ..Container::default()
        };
        let node = &self.nodes[i - 1];
        let selector = if node.labels.is_empty() {
            BTreeMap::from([(NODE_LABEL.to_owned(), node.name.clone())])
        } else {
            node.labels.clone()
        };
        let volume = |volume: &str| Volume {
            name: volume.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: format!("{name}-{volume}"),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        };
        Pod {
            metadata: self.meta(&name, Some(i)),
            spec: Some(PodSpec {
                containers: vec![app, etcd],
                node_selector: Some(selector),
                image_pull_secrets: pull_secret.map(|s| vec![LocalObjectReference { name: s.into() }]),
                volumes: Some(
                    [volume("etcd"), volume("data")]
                        .into_iter()
                        .chain(self.registry_auth(pull_secret))
                        .chain(self.etcd_tls.then(|| self.etcd_tls_volume(&name)))
                        .collect(),
                ),
                restart_policy: Some("Always".into()),
                enable_service_links: Some(false),
                termination_grace_period_seconds: Some(10),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }
}

impl KubernetesSpec {
    /// Replica `name`'s files of the etcd TLS Secret, under the names etcd and the app use.
    fn etcd_tls_volume(&self, name: &str) -> Volume {
        let item = |key: String, path: &str, mode: i32| KeyToPath { key, path: path.into(), mode: Some(mode) };
        Volume {
            name: "etcd-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(format!("{}-etcd-tls", self.service)),
                items: Some(vec![
                    item("ca.crt".into(), "ca.crt", 0o444),
                    item(format!("{name}.crt"), "member.crt", 0o444),
                    item(format!("{name}.key"), "member.key", 0o400),
                ]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }
    }

    /// The pull Secret as a volume holding Docker's `config.json`, for the app's backups.
    fn registry_auth(&self, pull_secret: Option<&str>) -> Option<Volume> {
        let secret = pull_secret.filter(|_| self.backup.is_some())?;
        Some(Volume {
            name: "registry-auth".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                items: Some(vec![KeyToPath {
                    key: ".dockerconfigjson".into(),
                    path: "config.json".into(),
                    mode: None,
                }]),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        })
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
    // `s-i-etcd` must stay a DNS label (63) for every i up to 9.
    if !label_ok(&spec.service, 50) {
        return Err(DeployError::Invalid(format!(
            "service name {:?} cannot name Kubernetes objects: use at most 50 lowercase letters, digits and '-', starting with a letter",
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
            "{} replicas need {} worker nodes, one per replica, but the context lists {}: add nodes with `br2k context add ... --node NAME` (and label them `{NODE_LABEL}=NAME`)",
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
    let size_ok = spec.volume_size.trim_end_matches(['K', 'M', 'G', 'T', 'i']).parse::<u64>().is_ok_and(|n| n > 0);
    if !size_ok {
        return Err(DeployError::Invalid(format!(
            "volume size {:?} is not a Kubernetes quantity like 1Gi or 500Mi",
            spec.volume_size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::tests::spec;

    #[test]
    fn one_pod_per_node_with_etcd_on_localhost_and_peers_by_service_name() {
        let manifests = Manifests::build(&spec(), &SecretValues::default()).unwrap();
        assert_eq!((manifests.pods.len(), manifests.services.len(), manifests.claims.len()), (3, 3, 6));
        assert_eq!(manifests.secrets.len(), 1, "no pull secret without registry credentials");
        let pod = &manifests.pods[1];
        let pod_spec = pod.spec.as_ref().unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("logserver-2"));
        assert_eq!(pod_spec.node_selector, Some(BTreeMap::from([(NODE_LABEL.to_owned(), "w2".to_owned())])));
        let etcd = pod_spec.containers.iter().find(|c| c.name == "etcd").unwrap();
        let args = etcd.args.as_ref().unwrap();
        assert!(args.contains(&"--listen-client-urls=http://127.0.0.1:2379".to_owned()));
        assert!(args.contains(
            &"--initial-cluster=logserver-1=http://logserver-1.team-a.svc:2380,logserver-2=http://logserver-2.team-a.svc:2380,logserver-3=http://logserver-3.team-a.svc:2380".to_owned()
        ));
        let app = pod_spec.containers.iter().find(|c| c.name == "app").unwrap();
        let key = app.env.as_ref().unwrap().iter().find(|e| e.name == "ETH_PRIVATE_KEY").unwrap();
        assert!(key.value.is_none(), "the key comes from the Secret, never inline");
    }

    #[test]
    fn secrets_carry_their_data_but_the_yaml_never_does() {
        let credentials = Credentials { username: "robot".into(), password: "pull-secret-value".into() };
        let values = SecretValues {
            operator_key: Some("0xsecret-operator-key".into()),
            pull: Some(("harbor.example.org".into(), credentials)),
            etcd_tls: None,
            admin_token: Some("an-admin-token-value".into()),
        };
        let manifests = Manifests::build(&spec(), &values).unwrap();
        assert_eq!(manifests.secrets.len(), 2);
        assert!(manifests.secrets.iter().all(|s| s.data.is_some()));
        let pod_spec = manifests.pods[0].spec.as_ref().unwrap();
        assert_eq!(pod_spec.image_pull_secrets.as_ref().unwrap()[0].name, "logserver-pull");
        // The leader backs up with the same credentials, read from the mounted pull Secret.
        let app = &pod_spec.containers[0];
        let env = |name: &str| app.env.as_ref().unwrap().iter().find(|e| e.name == name).and_then(|e| e.value.clone());
        assert_eq!(env("BR2K_BACKUP_REGISTRY").as_deref(), Some("https://harbor.example"));
        assert_eq!(env("BR2K_BACKUP_REPOSITORY").as_deref(), Some("br2k/logserver"));
        assert_eq!(env("DOCKER_CONFIG").as_deref(), Some(REGISTRY_AUTH));
        let auth = pod_spec.volumes.as_ref().unwrap().iter().find(|v| v.name == "registry-auth").unwrap();
        assert_eq!(auth.secret.as_ref().unwrap().secret_name.as_deref(), Some("logserver-pull"));
        let mount = app.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "registry-auth").unwrap();
        assert_eq!((mount.mount_path.as_str(), mount.read_only), (REGISTRY_AUTH, Some(true)));
        let yaml = manifests.to_yaml();
        assert!(!yaml.contains("secret-operator-key") && !yaml.contains("cm9ib3"), "{yaml}");
        assert!(!yaml.contains("an-admin-token-value"), "{yaml}");
        assert!(yaml.contains("data (BR2K_ADMIN_TOKEN, ETH_PRIVATE_KEY) is written at deploy time"), "{yaml}");
        let operator = &manifests.secrets[0];
        assert_eq!(operator.data.as_ref().unwrap()["BR2K_ADMIN_TOKEN"].0, b"an-admin-token-value");
        let admin = pod_spec.containers[0].env.as_ref().unwrap().iter().find(|e| e.name == "BR2K_ADMIN_TOKEN").unwrap();
        let from = admin.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!(
            (from.name.as_str(), from.optional),
            ("logserver-operator", Some(true)),
            "from the Secret, optional"
        );
        assert_eq!(yaml.matches("\n---\n").count() + 1, manifests.len());
    }

    #[test]
    fn only_the_services_own_pods_reach_etcd_and_anyone_reaches_the_app() {
        let manifests = Manifests::build(&spec(), &SecretValues::default()).unwrap();
        let policy = serde_json::to_value(&manifests.network_policy).unwrap();
        let own = serde_json::json!({ "app.kubernetes.io/name": "logserver", "app.kubernetes.io/managed-by": "br2k" });
        assert_eq!(policy["spec"]["podSelector"]["matchLabels"], own, "it covers the service's Pods");
        assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        let rules = policy["spec"]["ingress"].as_array().unwrap();
        assert_eq!(rules.len(), 2, "{policy}");
        assert_eq!(rules[0]["from"][0]["podSelector"]["matchLabels"], own, "etcd only from the service's Pods");
        assert_eq!(
            rules[0]["ports"],
            serde_json::json!([{ "port": 2380, "protocol": "TCP" }, { "port": 2379, "protocol": "TCP" }])
        );
        assert!(rules[1].get("from").is_none_or(serde_json::Value::is_null), "the app from anywhere: {policy}");
        assert_eq!(rules[1]["ports"], serde_json::json!([{ "port": 8080, "protocol": "TCP" }]));
        // Every Pod the policy covers carries its labels.
        for pod in &manifests.pods {
            let labels = pod.metadata.labels.as_ref().unwrap();
            assert!(labels.get("app.kubernetes.io/name").is_some_and(|n| n == "logserver"));
            assert!(labels.get("app.kubernetes.io/managed-by").is_some_and(|n| n == "br2k"));
        }
    }

    #[test]
    fn with_etcd_tls_every_member_serves_and_asks_for_certificates_of_the_deployments_authority() {
        let tls_spec = KubernetesSpec { etcd_tls: true, ..spec() };
        let hosts: Vec<Vec<String>> = (1..=3).map(|i| tls_spec.member_hosts(i)).collect();
        assert_eq!(hosts[1][2], "logserver-2.team-a.svc", "named as peers reach it");
        let certificates = crate::etcd_tls::EtcdCertificates::make("logserver", &hosts).unwrap();
        let values = SecretValues { etcd_tls: Some(certificates.clone()), ..SecretValues::default() };
        let manifests = Manifests::build(&tls_spec, &values).unwrap();
        let tls = manifests.secrets.iter().find(|s| s.metadata.name.as_deref() == Some("logserver-etcd-tls")).unwrap();
        let data = tls.data.as_ref().unwrap();
        assert_eq!(data["ca.crt"].0, certificates.ca.as_bytes());
        assert_eq!(data["logserver-2.key"].0, certificates.members[1].key.as_bytes());
        assert!(!manifests.to_yaml().contains("PRIVATE KEY"), "the dry run never prints a key");
        let pod = serde_json::to_value(&manifests.pods[1]).unwrap();
        let etcd = &pod["spec"]["containers"][1];
        let args: Vec<&str> = etcd["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        for wanted in [
            "--listen-client-urls=https://127.0.0.1:2379",
            "--initial-advertise-peer-urls=https://logserver-2.team-a.svc:2380",
            "--client-cert-auth=true",
            "--peer-client-cert-auth=true",
            "--peer-trusted-ca-file=/var/run/br2k/etcd-tls/ca.crt",
            "--listen-metrics-urls=http://127.0.0.1:2381",
        ] {
            assert!(args.contains(&wanted), "{wanted} missing from {args:?}");
        }
        assert!(args.iter().any(|a| a.starts_with("--initial-cluster=logserver-1=https://")), "{args:?}");
        let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
        let value = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
        assert_eq!(value("BR2K_ETCD"), Some(serde_json::json!("https://127.0.0.1:2379")));
        assert_eq!(value("BR2K_ETCD_KEY_FILE"), Some(serde_json::json!("/var/run/br2k/etcd-tls/member.key")));
        let volume = pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "etcd-tls").unwrap();
        let items = &volume["secret"]["items"];
        assert_eq!(items[1], serde_json::json!({ "key": "logserver-2.crt", "path": "member.crt", "mode": 0o444 }));
        assert_eq!(items[2], serde_json::json!({ "key": "logserver-2.key", "path": "member.key", "mode": 0o400 }));
        // Without it, nothing of this.
        let plain = Manifests::build(&spec(), &SecretValues::default()).unwrap();
        assert!(!plain.to_yaml().contains("etcd-tls") && plain.to_yaml().contains("http://127.0.0.1:2379"));
    }

    #[test]
    fn the_same_spec_gives_the_same_objects() {
        let a = Manifests::build(&spec(), &SecretValues::default()).unwrap();
        let b = Manifests::build(&spec(), &SecretValues::default()).unwrap();
        assert_eq!(a.to_yaml(), b.to_yaml());
    }

    #[test]
    fn bad_specs_are_refused_with_what_to_do() {
        let mut bad = spec();
        bad.service = "Log_Server".into();
        assert!(
            Manifests::build(&bad, &SecretValues::default())
                .unwrap_err()
                .to_string()
                .contains("cannot name Kubernetes objects")
        );
        let mut bad = spec();
        bad.replicas = 4;
        let err = Manifests::build(&bad, &SecretValues::default()).unwrap_err().to_string();
        assert!(err.contains("4 replicas need 4 worker nodes") && err.contains("--node"), "{err}");
        let mut bad = spec();
        bad.image = "logserver:latest".into();
        assert!(Manifests::build(&bad, &SecretValues::default()).unwrap_err().to_string().contains("pinned by digest"));
        let mut bad = spec();
        bad.volume_size = "lots".into();
        assert!(Manifests::build(&bad, &SecretValues::default()).unwrap_err().to_string().contains("quantity"));
    }
}
