//! How `br2k deploy` and `br2k manager run` reach the deployment backends: the options
//! that shape a deployment beyond what the recovery info records, and the lookup of the
//! backend a context names.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, Result};
use br2k_deploy::backend::Backend;
use br2k_deploy::context::{Contexts, LOCAL};
use br2k_deploy::kubernetes::{
    self, ClusterSettings, ContainerResources, DEFAULT_ETCD_IMAGE, KubernetesBackend, RolloutOptions, SettingsSource,
};
use br2k_deploy::local::{LocalBackend, NetworkMode};
use br2k_oci::registry::RegistryList;
use br2k_resolver::RegistryClient;
use clap::Args;
use futures::future::BoxFuture;

/// How replicas are deployed, beyond what the recovery info records.
#[derive(Args, Debug, Clone)]
pub(crate) struct BackendOpts {
    /// The etcd image next to each app container.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_ETCD_IMAGE, help_heading = "Kubernetes")]
    pub(crate) etcd_image: String,

    /// The size of each replica's etcd volume. etcd's space quota is half of it (at most
    /// 8 GiB): the rest holds its write-ahead log, snapshots and a defragmentation's copy.
    #[arg(long, value_name = "QUANTITY", default_value = "4Gi", help_heading = "Kubernetes")]
    pub(crate) etcd_volume_size: String,

    /// The size of each replica's app data volume (its snapshots and record file).
    #[arg(long, value_name = "QUANTITY", default_value = "1Gi", help_heading = "Kubernetes")]
    pub(crate) data_volume_size: String,

    /// CPU of each app container (requested and its limit: the Pods are Guaranteed QoS).
    #[arg(long, value_name = "QUANTITY", default_value = "500m", help_heading = "Kubernetes")]
    pub(crate) app_cpu: String,

    /// Memory of each app container (requested and its limit).
    #[arg(long, value_name = "QUANTITY", default_value = "512Mi", help_heading = "Kubernetes")]
    pub(crate) app_memory: String,

    /// CPU of each etcd container (requested and its limit).
    #[arg(long, value_name = "QUANTITY", default_value = "1", help_heading = "Kubernetes")]
    pub(crate) etcd_cpu: String,

    /// Memory of each etcd container (requested and its limit); etcd maps its database
    /// (up to the quota) into memory.
    #[arg(long, value_name = "QUANTITY", default_value = "2Gi", help_heading = "Kubernetes")]
    pub(crate) etcd_memory: String,

    /// The PriorityClass of the replicas' Pods, so that the scheduler preempts others
    /// before them [default: the cluster's].
    #[arg(long, value_name = "NAME", help_heading = "Kubernetes")]
    pub(crate) priority_class: Option<String>,

    /// How long a rollout waits for each changed replica to be ready again, with a leader,
    /// before it stops (the replicas after it are left as they were).
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=86_400), help_heading = "Kubernetes")]
    pub(crate) rollout_timeout: u64,

    /// Keep the replicas' operator key funded with at least half this much ETH for the gas
    /// of publishing locations; below that, it is topped up to this from the signing key.
    /// 0 sends nothing.
    #[arg(long, value_name = "ETH", default_value = "0.05", value_parser = parse_ether, help_heading = "Kubernetes")]
    pub(crate) operator_funds: U256,

    /// Where the local nodes run: auto (namespaces as root, loopback otherwise), namespaces, loopback.
    #[arg(long, default_value = "auto", help_heading = "Local")]
    pub(crate) network: NetworkMode,

    #[command(flatten)]
    pub(crate) backup: crate::opts::BackupScheduleOpts,

    /// etcd's election timeout in milliseconds, for local nodes.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=50_000), help_heading = "Local")]
    pub(crate) election_timeout: u64,

    /// TLS for etcd's client and peer traffic, with certificates the deploy step makes (a
    /// Secret on Kubernetes, files in each node's directory locally); every member asks
    /// its clients and peers for a certificate of that authority.
    #[arg(long)]
    pub(crate) etcd_tls: bool,
}

impl BackendOpts {
    /// What a Kubernetes deployment declares beyond the recovery info.
    pub(crate) fn cluster_settings(&self, rpc_url: &str, registry: alloy::primitives::Address) -> ClusterSettings {
        ClusterSettings {
            etcd_image: self.etcd_image.clone(),
            etcd_volume_size: self.etcd_volume_size.clone(),
            data_volume_size: self.data_volume_size.clone(),
            app_resources: ContainerResources { cpu: self.app_cpu.clone(), memory: self.app_memory.clone() },
            etcd_resources: ContainerResources { cpu: self.etcd_cpu.clone(), memory: self.etcd_memory.clone() },
            priority_class: self.priority_class.clone(),
            rpc_url: rpc_url.to_owned(),
            registry,
            backup: self.backup.schedule(),
            etcd_tls: self.etcd_tls,
        }
    }

    /// How long a Kubernetes rollout waits for each replica.
    pub(crate) fn rollout(&self) -> RolloutOptions {
        RolloutOptions { timeout: std::time::Duration::from_secs(self.rollout_timeout), ..RolloutOptions::default() }
    }

    /// The local backend, publishing with `key` to `registry` at `rpc_url`.
    pub(crate) fn local(
        &self,
        rpc_url: &str,
        registry: &RegistryClient,
        key: &PrivateKeySigner,
        registries: &RegistryList,
    ) -> Result<LocalBackend> {
        let (state_root, image_root) = LocalBackend::default_roots()?;
        Ok(LocalBackend {
            runner: std::env::current_exe().context("finding this executable")?,
            state_root,
            image_root,
            registries: registries.clone(),
            network: self.network,
            election_ms: self.election_timeout,
            rpc_url: rpc_url.to_owned(),
            registry: registry.address(),
            key: key.clone(),
            backup: self.backup.schedule(),
            etcd_tls: self.etcd_tls,
        })
    }
}

/// The backend of each context, made on first use: `local`, or a Kubernetes context
/// connected through its kubeconfig.
pub(crate) struct ContextBackends {
    pub(crate) local: Arc<LocalBackend>,
    pub(crate) contexts: Contexts,
    pub(crate) config_dir: PathBuf,
    pub(crate) registries: RegistryList,
    pub(crate) opts: BackendOpts,
    pub(crate) rpc_url: String,
    pub(crate) registry: RegistryClient,
    pub(crate) made: Mutex<HashMap<String, Arc<dyn Backend>>>,
}

impl ContextBackends {
    async fn make(&self, context: &str) -> Result<Arc<dyn Backend>, br2k_manager::Error> {
        if context == LOCAL {
            return Ok(self.local.clone());
        }
        if let Some(made) = self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(context) {
            return Ok(made.clone());
        }
        let info = self.contexts.get(context)?;
        let client = kubernetes::connect(&self.contexts, context).await?;
        let backend: Arc<dyn Backend> = Arc::new(KubernetesBackend {
            context: info,
            client,
            config_dir: self.config_dir.clone(),
            registries: self.registries.clone(),
            settings: self.opts.cluster_settings(&self.rpc_url, self.registry.address()),
            // A recovery redeploys the shape the team gave the service, not this manager's flags.
            settings_source: SettingsSource::Recorded,
            rollout: self.opts.rollout(),
            operator_funds: self.opts.operator_funds,
            registry: self.registry.clone(),
        });
        self.made.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(context.to_owned(), backend.clone());
        Ok(backend)
    }
}

impl br2k_manager::Backends for ContextBackends {
    fn backend<'a>(&'a self, context: &'a str) -> BoxFuture<'a, Result<Arc<dyn Backend>, br2k_manager::Error>> {
        Box::pin(self.make(context))
    }
}

/// Parses an amount of ETH (`0.05`) into wei.
pub(crate) fn parse_ether(text: &str) -> Result<U256, String> {
    alloy::primitives::utils::parse_ether(text.trim())
        .map_err(|e| format!("{text:?} is not an amount of ETH (e.g. 0.05): {e}"))
}
