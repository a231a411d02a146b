//! The Kubernetes backend: a service's [`Manifests`] applied to the cluster a
//! context names, with server-side apply through kube-rs. Server-side apply makes a
//! deployment idempotent: the objects are declared, the API server merges them under
//! br2k's field manager, and applying the same objects again changes nothing.
//!
//! No cluster runs on the machines this is developed on: the objects are checked against
//! the official schemas, and [`apply`] against kube's mocked API service (see the tests).

mod backend;
mod manifests;

use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Config, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use backend::{KubernetesBackend, pod_views};
pub use kube::Client;
pub use manifests::{
    BackupTarget, ClusterSettings, DEFAULT_ETCD_IMAGE, KubernetesSpec, Manifests, NODE_LABEL, SecretValues,
};

use crate::context::Contexts;
use crate::error::{DeployError, Result};

/// The field manager br2k applies as: the owner of every field it sets.
pub const FIELD_MANAGER: &str = "br2k";

/// How long to wait to connect to the API server, and for one answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for the cluster of context `name` in `contexts`, with its token read from the
/// token file the context names.
///
/// # Errors
/// An unknown context, an unreadable kubeconfig or token file, a bad server URL or CA.
pub async fn connect(contexts: &Contexts, name: &str) -> Result<Client> {
    let path = contexts.kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .map_err(|e| DeployError::Invalid(format!("cannot read the kubeconfig {}: {e}", path.display())))?;
    let options = KubeConfigOptions { context: Some(name.to_owned()), ..KubeConfigOptions::default() };
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| DeployError::Invalid(format!("context {name:?} in {}: {e}", path.display())))?;
    // Read the token file here, trimmed: kube sends the file's text as is, and a token
    // file written by hand usually ends in a newline, which is not valid in a header.
    if let Some(file) = config.auth_info.token_file.take() {
        let token = std::fs::read_to_string(&file)
            .map_err(|e| DeployError::io(format!("read the token file {file} of context {name:?}"), e))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(DeployError::Invalid(format!("the token file {file} of context {name:?} is empty")));
        }
        config.auth_info.token = Some(secrecy::SecretString::from(token.to_owned()));
    }
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(REQUEST_TIMEOUT);
    config.write_timeout = Some(REQUEST_TIMEOUT);
    Client::try_from(config)
        .map_err(|e| DeployError::Invalid(format!("cannot build a client for context {name:?}: {e}")))
}

/// One object as applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its kind (`Pod`, `Service`, ...).
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its resource version after the apply (unchanged by an apply that changed nothing).
    pub resource_version: Option<String>,
}

/// Applies every object of `manifests` in `namespace` (Secrets, volumes, Services, then
/// Pods), reporting each to `progress`.
///
/// # Errors
/// The first object the API server refuses, with its answer; the objects before it stay
/// applied, and applying again continues where this stopped.
pub async fn apply(
    client: &Client,
    namespace: &str,
    manifests: &Manifests,
    progress: &(dyn Fn(&Applied) + Sync),
) -> Result<Vec<Applied>> {
    let mut applied = Vec::with_capacity(manifests.len());
    for secret in &manifests.secrets {
        applied.push(apply_one(client, namespace, secret, progress).await?);
    }
    for claim in &manifests.claims {
        applied.push(apply_one(client, namespace, claim, progress).await?);
    }
    for service in &manifests.services {
        applied.push(apply_one(client, namespace, service, progress).await?);
    }
    applied.push(apply_one(client, namespace, &manifests.network_policy, progress).await?);
    for pod in &manifests.pods {
        applied.push(apply_one(client, namespace, pod, progress).await?);
    }
    Ok(applied)
}

async fn apply_one<K>(
    client: &Client,
    namespace: &str,
    object: &K,
    progress: &(dyn Fn(&Applied) + Sync),
) -> Result<Applied>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let kind = K::kind(&()).into_owned();
    let name = object.name_any();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    // `force`: br2k owns these objects; a field someone changed by hand is taken back.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let answer = api.patch(&name, &params, &Patch::Apply(object)).await.map_err(|e| match e {
        kube::Error::Api(_) => {
            DeployError::Invalid(format!("the cluster refused {kind} {namespace}/{name}: {}", describe_kube_error(&e)))
        }
        other => DeployError::Invalid(format!(
            "could not apply {kind} {namespace}/{name}: {other} (is the context's server right and reachable from here?)"
        )),
    })?;
    let applied = Applied { kind, name, resource_version: answer.resource_version() };
    progress(&applied);
    Ok(applied)
}

/// A kube error in words, with what to do for the usual ones.
fn describe_kube_error(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) if status.code == 401 => {
            format!("{} (401: the token was refused; ask the administrator for a new token file)", status.message)
        }
        kube::Error::Api(status) if status.code == 403 => format!(
            "{} (403: the token may not do this in this namespace; the administrator must grant it)",
            status.message
        ),
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests;

/// The key the replicas of `service` on context `context` publish the leader's location
/// with: created once, kept in `dir/operators/<context>/<service>.key` (0600), and reused
/// by every later deployment so the Secret holding it does not change.
///
/// # Errors
/// A key file that others can read, that holds no key, or that cannot be written.
pub fn operator_key(
    dir: &std::path::Path,
    context: &str,
    service: &str,
) -> Result<alloy::signers::local::PrivateKeySigner> {
    crate::operator_key::load_or_create(&dir.join("operators").join(context).join(format!("{service}.key")))
}
