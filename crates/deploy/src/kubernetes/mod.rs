//! The Kubernetes backend: a service's [`Manifests`] applied to the cluster a
//! context names, with server-side apply through kube-rs. Server-side apply makes a
//! deployment idempotent: the objects are declared, the API server merges them under
//! br2k's field manager, and applying the same objects again changes nothing.
//!
//! No cluster runs on the machines this is developed on: the objects are checked against
//! the official schemas, and the rollout and teardown against a fake API server (the
//! tests' `fake` module) that keeps objects and plays the StatefulSet controller.

mod backend;
mod manifests;
mod rollout;
mod settings;
mod teardown;

use std::time::Duration;

use kube::Config;
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use backend::{KubernetesBackend, SettingsSource, deployment_settings, pod_views, recorded_settings};
pub use kube::Client;
pub use manifests::{
    BackupTarget, ETCD_BOOTSTRAP_KEY, KubernetesSpec, Manifests, NODE_LABEL, REPLICA_LABEL, SETTINGS_KEY, SecretValues,
    ZONE_LABEL, names,
};
pub use rollout::{RolloutOptions, roll_out};
pub use settings::{ClusterSettings, ContainerResources, DEFAULT_ETCD_IMAGE, quantity_bytes};
pub use teardown::{TakenDown, take_down};

use crate::context::Contexts;
use crate::error::{DeployError, Result};

/// The field manager br2k applies as: the owner of every field it sets.
pub const FIELD_MANAGER: &str = "br2k";

/// The push-only credential the replicas back up with, read where the deploy runs; never
/// the deployer's own registry credentials, which may do far more than push backups.
pub const BACKUP_PUSH_USERNAME_ENV: &str = "BR2K_BACKUP_PUSH_USERNAME";
/// Its password (or token).
pub const BACKUP_PUSH_PASSWORD_ENV: &str = "BR2K_BACKUP_PUSH_PASSWORD";

/// The backups' push-only credential from [`BACKUP_PUSH_USERNAME_ENV`] and
/// [`BACKUP_PUSH_PASSWORD_ENV`], when both are set.
///
/// # Errors
/// Only one of the two set, or either empty.
pub fn backup_push_credentials() -> Result<Option<br2k_oci::registry::Credentials>> {
    let read = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned());
    match (read(BACKUP_PUSH_USERNAME_ENV), read(BACKUP_PUSH_PASSWORD_ENV)) {
        (None, None) => Ok(None),
        (Some(username), Some(password)) if !username.is_empty() && !password.is_empty() => {
            Ok(Some(br2k_oci::registry::Credentials { username, password }))
        }
        _ => Err(DeployError::Invalid(format!(
            "the backups' push credential needs both {BACKUP_PUSH_USERNAME_ENV} and {BACKUP_PUSH_PASSWORD_ENV}, neither empty"
        ))),
    }
}

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

/// "could not WHAT of SERVICE in NAMESPACE: why" for a refused or failed call.
fn call_failed(service: &str, namespace: &str, what: &str, error: &kube::Error) -> DeployError {
    DeployError::Invalid(format!("could not {what} of {service} in {namespace}: {}", describe_kube_error(error)))
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
mod fake;
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
