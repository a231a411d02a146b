//! One replica's StatefulSet and the Pod it keeps: placement, the etcd init step and the
//! two containers, their resources, probes and security context.
//!
//! The Pod meets the Pod Security Standards' "restricted" profile, so a namespace that
//! enforces it admits it: both containers run as a non-root user with no privilege
//! escalation, no capabilities and the runtime's default seccomp profile, on a read-only
//! root filesystem (scratch space is an emptyDir), and no service-account token is
//! mounted (neither container talks to the API server).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, LocalObjectReference, NodeAffinity, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, PersistentVolumeClaimVolumeSource, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, PreferredSchedulingTerm, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, TCPSocketAction, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    APP_PORT, ETCD_BOOTSTRAP_KEY, ETCD_CLIENT_PORT, ETCD_PEER_PORT, KubernetesSpec, NODE_LABEL, ZONE_LABEL, names,
};
use crate::error::Result;

/// The user and group both containers run as (distroless' `nonroot`); the Pod's volumes
/// are given to this group (`fsGroup`) so the non-root user can write its data.
pub(crate) const RUN_AS: i64 = 65_532;

const APP_DATA: &str = "/var/lib/br2k";
const ETCD_DATA: &str = "/var/lib/etcd";
/// Where the app reads the backup repository's push credential (Docker's config.json).
const REGISTRY_AUTH: &str = "/var/run/br2k/registry";
/// Where both containers find the member's etcd certificate, with `--etcd-tls`.
const ETCD_TLS: &str = "/var/run/br2k/etcd-tls";
/// Where the app finds its operator key, one 0400 file.
const OPERATOR_KEY_DIR: &str = "/var/run/br2k/operator";
/// The scratch space of a read-only root filesystem.
const SCRATCH: &str = "/tmp";
/// The configuration file the init step writes and etcd starts from (in the scratch
/// space: an emptyDir outlives a container's restart, so etcd restarted alone finds it).
const ETCD_CONFIG: &str = "/tmp/etcd/etcd.json";
/// Where the init step reads the etcd bootstrap hint.
const ETCD_BOOTSTRAP: &str = "/var/run/br2k/etcd-bootstrap";
/// etcd's metrics and health in plain HTTP: the app reads its quota there (on
/// localhost), the kubelet probes it (on the Pod's address).
const ETCD_METRICS_PORT: i32 = 2381;

/// The Secrets a replica's Pod refers to by name.
pub(super) struct SecretNames<'a> {
    pub operator: &'a str,
    pub pull: Option<&'a str>,
    pub backup_push: Option<&'a str>,
}

/// The labels that select replica `i`'s Pod (its StatefulSet's selector, immutable once
/// applied, and its Service's).
pub(super) fn selector_labels(spec: &KubernetesSpec, i: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), spec.service.clone()),
        (super::REPLICA_LABEL.to_owned(), spec.replica(i)),
    ])
}

impl KubernetesSpec {
    /// Replica `i`: a StatefulSet of one Pod, on the replica's own volumes.
    pub(super) fn stateful_set(
        &self,
        i: usize,
        initial_cluster: &str,
        secrets: &SecretNames<'_>,
    ) -> Result<StatefulSet> {
        let name = self.replica(i);
        let quota = self.settings.etcd_quota_bytes()?;
        Ok(StatefulSet {
            metadata: self.meta(&name, Some(i)),
            spec: Some(StatefulSetSpec {
                replicas: Some(1),
                service_name: Some(name.clone()),
                selector: LabelSelector { match_labels: Some(selector_labels(self, i)), ..LabelSelector::default() },
                // A changed template replaces the Pod; br2k applies one StatefulSet at a
                // time and waits for it, so no two replicas restart together.
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("RollingUpdate".into()),
                    ..StatefulSetUpdateStrategy::default()
                }),
                pod_management_policy: Some("Parallel".into()),
                revision_history_limit: Some(3),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(self.labels(Some(i))), ..ObjectMeta::default() }),
                    spec: Some(self.pod_spec(i, initial_cluster, secrets, quota)),
                },
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        })
    }

    fn pod_spec(&self, i: usize, initial_cluster: &str, secrets: &SecretNames<'_>, quota: u64) -> PodSpec {
        let name = self.replica(i);
        let claim = |volume: &str| Volume {
            name: volume.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: format!("{name}-{volume}"),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        };
        let scratch = Volume {
            name: "scratch".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(Quantity("256Mi".into())),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        };
        let etcd_flags = self.etcd_flags(i, initial_cluster, quota);
        let bootstrap = Volume {
            name: "etcd-bootstrap".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::etcd_bootstrap(&self.service),
                items: Some(vec![KeyToPath {
                    key: ETCD_BOOTSTRAP_KEY.into(),
                    path: ETCD_BOOTSTRAP_KEY.into(),
                    mode: None,
                }]),
                default_mode: Some(0o444),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        };
        PodSpec {
            init_containers: Some(vec![self.etcd_init_container(i, &etcd_flags)]),
            containers: vec![self.app_container(i, secrets), self.etcd_container()],
            affinity: Some(self.affinity(i)),
            topology_spread_constraints: self.zone_spread(),
            image_pull_secrets: secrets.pull.map(|s| vec![LocalObjectReference { name: s.into() }]),
            volumes: Some(
                [claim("etcd"), claim("data"), scratch, self.operator_key_volume(secrets.operator), bootstrap]
                    .into_iter()
                    .chain(self.backup_push_volume(secrets.backup_push))
                    .chain(self.settings.etcd_tls.then(|| self.etcd_tls_volume(&name)))
                    .collect(),
            ),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                // Re-own a volume only when its top does not already belong to the group:
                // a large etcd volume is not walked at every start.
                fs_group_change_policy: Some("OnRootMismatch".into()),
                seccomp_profile: Some(runtime_default()),
                ..PodSecurityContext::default()
            }),
            automount_service_account_token: Some(false),
            priority_class_name: self.settings.priority_class.clone(),
            restart_policy: Some("Always".into()),
            enable_service_links: Some(false),
            // etcd flushes and leaves cleanly in well under this; the app hands leadership on.
            termination_grace_period_seconds: Some(30),
            ..PodSpec::default()
        }
    }

    /// Placement: only on the context's worker nodes, preferring replica `i`'s own (the
    /// paper's one replica per node), never two replicas on one node (required
    /// anti-affinity on the hostname). When a node is lost for good its replica may
    /// start on a spare listed node, if its volumes can follow it there.
    fn affinity(&self, i: usize) -> Affinity {
        let term = |labels: &BTreeMap<String, String>| NodeSelectorTerm {
            match_expressions: Some(
                labels
                    .iter()
                    .map(|(key, value)| NodeSelectorRequirement {
                        key: key.clone(),
                        operator: "In".into(),
                        values: Some(vec![value.clone()]),
                    })
                    .collect(),
            ),
            ..NodeSelectorTerm::default()
        };
        let node_labels: Vec<BTreeMap<String, String>> = self.nodes.iter().map(node_labels).collect();
        Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: node_labels.iter().map(term).collect(),
                }),
                preferred_during_scheduling_ignored_during_execution: Some(vec![PreferredSchedulingTerm {
                    weight: 100,
                    preference: term(&node_labels[i - 1]),
                }]),
            }),
            pod_anti_affinity: Some(PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                    label_selector: Some(self.own_selector()),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..PodAffinityTerm::default()
                }]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        }
    }

    /// Where the context's nodes name their zones: no zone holds more than one replica
    /// more than another, counting only nodes the replica may use and that are not
    /// tainted (a lost node's zone does not hold a replica hostage).
    fn zone_spread(&self) -> Option<Vec<TopologySpreadConstraint>> {
        self.nodes.iter().any(|n| n.labels.contains_key(ZONE_LABEL)).then(|| {
            vec![TopologySpreadConstraint {
                max_skew: 1,
                topology_key: ZONE_LABEL.into(),
                when_unsatisfiable: "DoNotSchedule".into(),
                label_selector: Some(self.own_selector()),
                node_affinity_policy: Some("Honor".into()),
                node_taints_policy: Some("Honor".into()),
                ..TopologySpreadConstraint::default()
            }]
        })
    }

    fn app_container(&self, i: usize, secrets: &SecretNames<'_>) -> Container {
        let env = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..EnvVar::default() };
        let mut app_env = vec![
            env("BR2K_SERVICE", self.service.clone()),
            env("BR2K_REPLICA", self.replica(i)),
            env("BR2K_ETCD", format!("{}://127.0.0.1:{ETCD_CLIENT_PORT}", self.etcd_scheme())),
            env("BR2K_ETCD_METRICS", format!("http://127.0.0.1:{ETCD_METRICS_PORT}")),
            env("BR2K_LISTEN", format!("0.0.0.0:{APP_PORT}")),
            env("BR2K_PUBLIC_URL", self.public_url(i)),
            env("BR2K_DATA_DIR", APP_DATA.into()),
            env("BR2K_REGISTRY", self.settings.registry.to_string()),
            env("ETH_RPC_URL", self.settings.rpc_url.clone()),
            env("ETH_PRIVATE_KEY_FILE", format!("{OPERATOR_KEY_DIR}/key")),
            env("TMPDIR", SCRATCH.into()),
        ];
        if let Some(backup) = &self.backup {
            app_env.push(env("BR2K_BACKUP_REGISTRY", backup.registry_url.clone()));
            app_env.push(env("BR2K_BACKUP_REPOSITORY", backup.repository.clone()));
            app_env.extend(self.settings.backup.env().into_iter().map(|(name, value)| env(&name, value)));
            app_env.push(env("BR2K_BACKUP_PLAIN_HTTP", backup.registry_url.starts_with("http://").to_string()));
            if self.backup_push_volume(secrets.backup_push).is_some() {
                // The push-only credential, mounted as Docker's config.
                app_env.push(env("DOCKER_CONFIG", REGISTRY_AUTH.into()));
            }
        }
        if self.settings.etcd_tls {
            app_env.push(env("BR2K_ETCD_CA_FILE", format!("{ETCD_TLS}/ca.crt")));
            app_env.push(env("BR2K_ETCD_CERT_FILE", format!("{ETCD_TLS}/member.crt")));
            app_env.push(env("BR2K_ETCD_KEY_FILE", format!("{ETCD_TLS}/member.key")));
        }
        // The admin token, when the deploy was given one (optional: the routes stay closed).
        app_env.push(EnvVar {
            name: "BR2K_ADMIN_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secrets.operator.into(),
                    key: "BR2K_ADMIN_TOKEN".into(),
                    optional: Some(true),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
        let tcp = TCPSocketAction { port: IntOrString::Int(APP_PORT), ..TCPSocketAction::default() };
        Container {
            name: "app".into(),
            image: Some(self.image.clone()),
            env: Some(app_env),
            ports: Some(vec![port("app", APP_PORT)]),
            resources: Some(resources(&self.settings.app_resources)),
            security_context: Some(restricted()),
            // Started: it listens (catching up from a peer's snapshot first may take minutes).
            startup_probe: Some(Probe {
                tcp_socket: Some(tcp.clone()),
                period_seconds: Some(5),
                failure_threshold: Some(120),
                ..Probe::default()
            }),
            // Alive: the process still accepts connections. Not its health, which follows
            // etcd's: restarting the app does not bring a lost quorum back.
            liveness_probe: Some(Probe {
                tcp_socket: Some(tcp),
                period_seconds: Some(10),
                timeout_seconds: Some(5),
                failure_threshold: Some(6),
                ..Probe::default()
            }),
            // Ready: healthy as it says itself (its etcd member answers, no fault).
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
                [
                    mount("data", APP_DATA, false),
                    mount("scratch", SCRATCH, false),
                    mount("operator-key", OPERATOR_KEY_DIR, true),
                ]
                .into_iter()
                .chain(
                    self.backup_push_volume(secrets.backup_push).map(|_| mount("registry-auth", REGISTRY_AUTH, true)),
                )
                .chain(self.settings.etcd_tls.then(|| mount("etcd-tls", ETCD_TLS, true)))
                .collect(),
            ),
            ..Container::default()
        }
    }

    /// etcd's flags for member `i`, but its initial cluster state: the init step decides
    /// that, and writes them all into the file etcd starts from.
    fn etcd_flags(&self, i: usize, initial_cluster: &str, quota: u64) -> Vec<String> {
        let scheme = self.etcd_scheme();
        let mut flags = vec![
            format!("--name={}", self.replica(i)),
            format!("--data-dir={ETCD_DATA}"),
            // The app next to it is its client (on localhost); the other members' init
            // steps ask it for the membership (through its Service; the NetworkPolicy
            // admits only the service's own Pods).
            format!("--listen-client-urls={scheme}://0.0.0.0:{ETCD_CLIENT_PORT}"),
            format!("--advertise-client-urls={}", self.client_url(i)),
            format!("--listen-peer-urls={scheme}://0.0.0.0:{ETCD_PEER_PORT}"),
            // On every address: the kubelet probes the Pod's; the NetworkPolicy admits
            // nobody else to this port.
            format!("--listen-metrics-urls=http://0.0.0.0:{ETCD_METRICS_PORT}"),
            format!("--initial-advertise-peer-urls={}", self.peer_url(i)),
            format!("--initial-cluster={initial_cluster}"),
            format!("--initial-cluster-token={}", self.service),
            // A member back from a partition must not depose a healthy leader.
            "--pre-vote=true".into(),
        ];
        flags.extend(br2k_replication::etcd_flags::with_quota(quota));
        if self.settings.etcd_tls {
            let mounted = std::path::Path::new(ETCD_TLS);
            let files = crate::etcd_tls::EtcdTlsFiles {
                ca: mounted.join("ca.crt"),
                cert: mounted.join("member.crt"),
                key: mounted.join("member.key"),
            };
            flags.extend(files.etcd_flags());
        }
        flags
    }

    /// The etcd member's init step, run from the app's image (`br2k_replica_cli::etcd_init`):
    /// it reads the member's data directory, asks the other members for the membership,
    /// and writes the file etcd starts from.
    fn etcd_init_container(&self, i: usize, etcd_flags: &[String]) -> Container {
        let env = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..EnvVar::default() };
        let peers: Vec<String> = (1..=self.replicas).filter(|&j| j != i).map(|j| self.client_url(j)).collect();
        Container {
            name: "etcd-init".into(),
            image: Some(self.image.clone()),
            env: Some(vec![
                env("BR2K_ETCD_INIT", ETCD_CONFIG.into()),
                env("BR2K_ETCD_INIT_FLAGS", etcd_flags.join("\n")),
                env("BR2K_ETCD_INIT_PEERS", peers.join(",")),
                env("BR2K_ETCD_INIT_BOOTSTRAP_FILE", format!("{ETCD_BOOTSTRAP}/{ETCD_BOOTSTRAP_KEY}")),
                // Two minutes for a peer to answer; then the init step fails and the
                // kubelet runs it again (with its back-off).
                env("BR2K_ETCD_INIT_WAIT", "120".into()),
                // For an app whose main does not run the init step: its replica flags
                // parse, and it says what is missing rather than which flag is.
                env("BR2K_REPLICA", self.replica(i)),
                env("BR2K_DATA_DIR", APP_DATA.into()),
                env("TMPDIR", SCRATCH.into()),
            ]),
            resources: Some(resources(&self.settings.app_resources)),
            security_context: Some(restricted()),
            volume_mounts: Some(
                [
                    mount("etcd", ETCD_DATA, true),
                    mount("scratch", SCRATCH, false),
                    mount("etcd-bootstrap", ETCD_BOOTSTRAP, true),
                ]
                .into_iter()
                .chain(self.settings.etcd_tls.then(|| mount("etcd-tls", ETCD_TLS, true)))
                .collect(),
            ),
            ..Container::default()
        }
    }

    fn etcd_container(&self) -> Container {
        // `serializable`: this member's own view, not the quorum's, so a member is not
        // restarted because another one is down; `exclude=NOSPACE`: a full quota needs an
        // operator, and a restart does not free space.
        let health = || HTTPGetAction {
            path: Some("/health?exclude=NOSPACE&serializable=true".into()),
            port: IntOrString::Int(ETCD_METRICS_PORT),
            ..HTTPGetAction::default()
        };
        Container {
            name: "etcd".into(),
            image: Some(self.settings.etcd_image.clone()),
            command: Some(vec!["etcd".into()]),
            // Every flag is in the file (etcd then ignores its command line).
            args: Some(vec![format!("--config-file={ETCD_CONFIG}")]),
            ports: Some(vec![
                port("etcd-client", ETCD_CLIENT_PORT),
                port("etcd-peer", ETCD_PEER_PORT),
                port("etcd-metrics", ETCD_METRICS_PORT),
            ]),
            resources: Some(resources(&self.settings.etcd_resources)),
            security_context: Some(restricted()),
            // Up to 5 minutes to start: replaying a long write-ahead log or receiving a
            // snapshot from the leader.
            startup_probe: Some(Probe {
                http_get: Some(health()),
                period_seconds: Some(10),
                timeout_seconds: Some(15),
                failure_threshold: Some(30),
                ..Probe::default()
            }),
            // Lenient: 8 failures 10 s apart, each allowed 15 s. A slow fsync stalls a
            // member for seconds; restarting it for that only makes it slower.
            liveness_probe: Some(Probe {
                http_get: Some(health()),
                initial_delay_seconds: Some(10),
                period_seconds: Some(10),
                timeout_seconds: Some(15),
                failure_threshold: Some(8),
                ..Probe::default()
            }),
            volume_mounts: Some(
                [mount("etcd", ETCD_DATA, false), mount("scratch", SCRATCH, false)]
                    .into_iter()
                    .chain(self.settings.etcd_tls.then(|| mount("etcd-tls", ETCD_TLS, true)))
                    .collect(),
            ),
            ..Container::default()
        }
    }

    /// The operator key as one file, readable by its owner only. (With the Pod's
    /// `fsGroup` the kubelet adds read for that group, which only this Pod's user is in.)
    fn operator_key_volume(&self, secret: &str) -> Volume {
        Volume {
            name: "operator-key".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                items: Some(vec![KeyToPath { key: "ETH_PRIVATE_KEY".into(), path: "key".into(), mode: Some(0o400) }]),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }
    }

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

    /// The backups' push-only credential as Docker's `config.json`, when there is one and
    /// the service backs up.
    fn backup_push_volume(&self, secret: Option<&str>) -> Option<Volume> {
        let secret = secret.filter(|_| self.backup.is_some())?;
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

/// A node's labels as the context gave them, else br2k's own label naming it.
fn node_labels(node: &crate::context::WorkerNode) -> BTreeMap<String, String> {
    if node.labels.is_empty() {
        BTreeMap::from([(NODE_LABEL.to_owned(), node.name.clone())])
    } else {
        node.labels.clone()
    }
}

/// The "restricted" Pod Security Standard, container by container.
fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    }
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }
}

/// Requests equal to limits: the Guaranteed QoS class.
fn resources(size: &crate::kubernetes::settings::ContainerResources) -> ResourceRequirements {
    let both = BTreeMap::from([
        ("cpu".to_owned(), Quantity(size.cpu.clone())),
        ("memory".to_owned(), Quantity(size.memory.clone())),
    ]);
    ResourceRequirements { limits: Some(both.clone()), requests: Some(both), ..ResourceRequirements::default() }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: number,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}
