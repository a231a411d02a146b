//! The Kubernetes backend behind the [`Backend`] interface: the replicas' manifests
//! rolled out with server-side apply ([`roll_out`]), after making sure the replicas'
//! operator key may publish and has gas. Applying again recreates what is missing and
//! changes nothing else, so a redeploy is the same call as a first deployment; the
//! volumes keep the data.

use alloy::primitives::U256;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::{
    Client, ClusterSettings, KubernetesSpec, Manifests, RolloutOptions, SETTINGS_KEY, SecretValues, names,
    operator_key, roll_out,
};
use crate::backend::{Backend, Deployed, Progress, ReplicaView};
use crate::context::ContextInfo;
use crate::deployment::DeploymentRecord;
use crate::error::{DeployError, Result};
use br2k_oci::registry::{Credentials, RegistryList};

/// How to deploy to one Kubernetes context.
#[derive(Clone)]
pub struct KubernetesBackend {
    /// The context (cluster, namespace, worker nodes, storage).
    pub context: ContextInfo,
    /// A client for its API server ([`super::connect`]).
    pub client: Client,
    /// br2k's configuration directory (the operator keys live under it).
    pub config_dir: std::path::PathBuf,
    /// The project's container registries (for pull credentials by URL).
    pub registries: RegistryList,
    /// Images, volumes, resources, the chain and the registry as the Pods see them.
    pub settings: ClusterSettings,
    /// Whether `settings` or those recorded in the cluster by the last deployment win.
    pub settings_source: SettingsSource,
    /// How long the rollout waits for each replica.
    pub rollout: RolloutOptions,
    /// Keep the operator key funded with at least half this (wei); 0 sends nothing.
    pub operator_funds: U256,
    /// The service registry, with the manager's key (it allows and funds the operator key).
    pub registry: br2k_resolver::RegistryClient,
}

/// Where a deployment's [`ClusterSettings`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingsSource {
    /// The backend's own (`br2k deploy`'s flags): what a team deploys is what it asked for.
    Given,
    /// Those the last deployment recorded in the cluster (ConfigMap `s-deployment`), the
    /// backend's own only when none is recorded: the manager's recovery, which must
    /// redeploy the shape the team gave the service, not the manager's defaults.
    Recorded,
}

/// The settings the last deployment of `service` recorded in `namespace`, if any.
///
/// # Errors
/// When the API server does not answer, or the record is not settings (then it says so,
/// rather than redeploying with other ones).
pub async fn recorded_settings(client: &Client, namespace: &str, service: &str) -> Result<Option<ClusterSettings>> {
    use k8s_openapi::api::core::v1::ConfigMap;
    let name = names::settings(service);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let map = maps
        .get_opt(&name)
        .await
        .map_err(|e| DeployError::Invalid(format!("could not read ConfigMap {namespace}/{name}: {e}")))?;
    let Some(text) = map.and_then(|m| m.data).and_then(|mut d| d.remove(SETTINGS_KEY)) else { return Ok(None) };
    serde_json::from_str(&text).map(Some).map_err(|e| {
        DeployError::Invalid(format!(
            "ConfigMap {namespace}/{name} does not hold br2k's deployment settings ({e}): deploy the service again with `br2k deploy {service} --context ...` to record them"
        ))
    })
}

/// The settings a deployment of `service` applies: `given`, or with
/// [`SettingsSource::Recorded`] those the last deployment recorded (`given` only when
/// none is recorded), saying which to `progress`.
///
/// # Errors
/// See [`recorded_settings`].
pub async fn deployment_settings(
    client: &Client,
    namespace: &str,
    service: &str,
    source: SettingsSource,
    given: &ClusterSettings,
    progress: Progress<'_>,
) -> Result<ClusterSettings> {
    if source == SettingsSource::Given {
        return Ok(given.clone());
    }
    Ok(match recorded_settings(client, namespace, service).await? {
        Some(recorded) => {
            progress(&format!(
                "using the settings the last deployment recorded (ConfigMap {})",
                names::settings(service)
            ));
            recorded
        }
        None => {
            progress("no settings recorded in the cluster: deploying with this manager's own");
            given.clone()
        }
    })
}

impl std::fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesBackend").field("context", &self.context.name).finish_non_exhaustive()
    }
}

impl KubernetesBackend {
    /// The etcd certificates of `spec`'s service: those its Secret already holds (a
    /// redeploy must not hand running members a new authority), else new ones.
    async fn etcd_certificates(&self, spec: &KubernetesSpec) -> Result<crate::etcd_tls::EtcdCertificates> {
        use k8s_openapi::api::core::v1::Secret;
        let name = format!("{}-etcd-tls", spec.service);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.context.namespace);
        let existing = secrets.get_opt(&name).await.map_err(|e| {
            DeployError::Invalid(format!("could not read Secret {}/{name}: {e}", self.context.namespace))
        })?;
        let data = existing.and_then(|s| s.data).unwrap_or_default();
        let text = |key: &str| data.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok());
        let members: Option<Vec<crate::etcd_tls::MemberCertificate>> = (1..=spec.replicas)
            .map(|i| {
                let replica = spec.replica(i);
                Some(crate::etcd_tls::MemberCertificate {
                    cert: text(&format!("{replica}.crt"))?,
                    key: text(&format!("{replica}.key"))?,
                })
            })
            .collect();
        if let (Some(ca), Some(members)) = (text("ca.crt"), members) {
            return Ok(crate::etcd_tls::EtcdCertificates { ca, members });
        }
        let hosts: Vec<Vec<String>> = (1..=spec.replicas).map(|i| spec.member_hosts(i)).collect();
        crate::etcd_tls::EtcdCertificates::make(&spec.service, &hosts)
    }

    async fn deploy_now(&self, service: &str, record: &DeploymentRecord, progress: Progress<'_>) -> Result<Deployed> {
        let settings = deployment_settings(
            &self.client,
            &self.context.namespace,
            service,
            self.settings_source,
            &self.settings,
            progress,
        )
        .await?;
        let mut spec = KubernetesSpec::new(service, &self.context, record, &settings);
        Manifests::build(&spec, &SecretValues::default())?; // refuse a bad spec before any transaction
        let entry = self.registries.entry_for_url(&record.image.registry_url)?;
        let pull = Credentials::find(&entry.host())?.map(|c| (entry.host(), c));
        let backup_push = super::backup_push_credentials()?.map(|c| (entry.host(), c));
        if pull.is_some() && backup_push.is_none() {
            progress(&format!(
                "backups off: {} needs credentials, and the replicas never get the deployer's; give them a push-only one for {} with {} and {}",
                entry.host(),
                record.image.repository,
                super::BACKUP_PUSH_USERNAME_ENV,
                super::BACKUP_PUSH_PASSWORD_ENV
            ));
            spec.backup = None;
        }
        let operator = operator_key(&self.config_dir, &self.context.name, service)?;
        crate::operator_key::allow_and_fund(&self.registry, service, &operator, self.operator_funds, progress).await?;
        let etcd_tls = if spec.settings.etcd_tls { Some(self.etcd_certificates(&spec).await?) } else { None };
        let admin_token = std::env::var("BR2K_ADMIN_TOKEN").ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        let values = SecretValues {
            operator_key: Some(alloy::hex::encode_prefixed(operator.to_bytes())),
            pull,
            backup_push,
            etcd_tls,
            admin_token,
        };
        let manifests = Manifests::build(&spec, &values)?;
        progress(&format!(
            "applying {} objects to {} (namespace {}) as field manager {}",
            manifests.len(),
            self.context.server,
            self.context.namespace,
            super::FIELD_MANAGER
        ));
        let applied =
            roll_out(&self.client, &self.context.namespace, service, &manifests, self.rollout, &|line| progress(line))
                .await?;
        Ok(Deployed {
            summary: format!(
                "{} replicas of {service} on {} from {} ({} objects applied; the replicas publish with {})",
                spec.replicas,
                self.context.name,
                spec.image,
                applied.len(),
                operator.address()
            ),
            location: None,
        })
    }
}

/// The Pods of `service` in `context`'s namespace, as replicas.
///
/// # Errors
/// When the API server refuses or does not answer.
pub async fn pod_views(client: &Client, context: &ContextInfo, service: &str) -> Result<Vec<ReplicaView>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &context.namespace);
    let selector = names::selector(service);
    let list = pods.list(&ListParams::default().labels(&selector)).await.map_err(|e| {
        DeployError::Invalid(format!(
            "listing the Pods of {service} in {} (namespace {}): {e}",
            context.server, context.namespace
        ))
    })?;
    Ok(list
        .items
        .into_iter()
        .map(|pod| {
            let name = pod.metadata.name.unwrap_or_default();
            let status = pod.status.unwrap_or_default();
            let phase = status.phase.unwrap_or_else(|| "Unknown".into());
            let ready = status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True");
            let deleting = pod.metadata.deletion_timestamp.is_some();
            ReplicaView {
                name,
                running: !deleting && matches!(phase.as_str(), "Pending" | "Running"),
                // The Pods' addresses are the cluster's; readiness is the app's health.
                status: None,
                detail: Some(format!(
                    "Pod {phase}{}{}",
                    if ready { ", ready" } else { ", not ready" },
                    if deleting { ", being deleted" } else { "" }
                )),
                learner: false,
            }
        })
        .collect())
}

impl Backend for KubernetesBackend {
    fn context(&self) -> &str {
        &self.context.name
    }

    fn deploy<'a>(
        &'a self,
        service: &'a str,
        record: &'a DeploymentRecord,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Deployed>> {
        Box::pin(self.deploy_now(service, record, progress))
    }

    fn replicas<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<ReplicaView>>> {
        Box::pin(pod_views(&self.client, &self.context, service))
    }
}
