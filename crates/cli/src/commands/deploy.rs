//! `br2k deploy`: a service's replicas from an image in a container registry, on the
//! backend its context names, with the deployment recorded on chain as the
//! service's recovery info.

use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, Result, bail};
use br2k_deploy::backend::Backend;
use br2k_deploy::context::{ContextInfo, LOCAL};
use br2k_deploy::deployment::{self, DeploymentRecord, PinnedImage, Recorded};
use br2k_deploy::kubernetes::{self, KubernetesBackend, KubernetesSpec, Manifests, SecretValues};
use br2k_deploy::local::LocalBackend;
use br2k_oci::image::{ImageRecord, ImageStore};
use br2k_oci::registry::{Credentials, RegistryEntry, RegistryList};
use br2k_resolver::RegistryClient;
use clap::Args;
use serde_json::json;

use super::GlobalOpts;
use super::context::DirArg;
use super::image::StoreArg;
use crate::backends::BackendOpts;
use crate::output::Output;

const DEPLOY_EXAMPLES: &str = "\
Examples:
  br2k image build target/release/br2k-logserver --name br2k/logserver --tag v1
  br2k image-registry add lab http://127.0.0.1:5000 --plain-http
  br2k deploy logserver --context local --image br2k/logserver:v1 --network loopback
  br2k deploy logserver --context prod --image br2k/logserver:v1 --dry-run > logserver.yaml
  br2k deploy logserver --context prod --image br2k/logserver:v1
  br2k deploy logserver --context prod       # again what the recovery info on chain records

The chain is --rpc-url with the registry (--registry or the deployments file); the
signing key (ETH_PRIVATE_KEY or --keystore) becomes the service's manager.";

/// Deploy a service from an image: on this machine (context `local`: each replica an etcd
/// member plus the app unpacked from the image pulled by digest) or on Kubernetes (one Pod
/// per worker node, applied with server-side apply). The deployment (context, replicas,
/// registry, image and digest) is recorded on chain as the service's recovery info first,
/// so its manager can always redeploy what should run.
#[derive(Args, Debug)]
#[command(after_help = DEPLOY_EXAMPLES)]
pub(crate) struct DeployArgs {
    /// The service name (1-64 letters, digits, '-', '_', '.').
    #[arg(value_parser = crate::opts::parse_service_name)]
    name: String,

    /// Where to deploy: a context (`br2k context ls`); `local` is this machine
    /// [default: the current context].
    #[arg(long)]
    context: Option<String>,

    /// The image: NAME[:TAG] from the image store (pushed to the registry first), or
    /// REPOSITORY@sha256:... already in the registry [default: what the service's
    /// recovery info on chain records].
    #[arg(long, value_name = "REF")]
    image: Option<String>,

    /// The container registry (`br2k image-registry ls`) [default: the only one there is].
    #[arg(long, value_name = "NAME")]
    image_registry: Option<String>,

    /// How many replicas [default: the recovery info's count, else 3].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=9))]
    replicas: Option<u32>,

    /// Show what would be deployed (Kubernetes: the manifests as YAML) and change nothing.
    #[arg(long)]
    dry_run: bool,

    #[command(flatten)]
    backend: BackendOpts,

    #[command(flatten)]
    store: StoreArg,

    #[command(flatten)]
    config: DirArg,
}

/// What a Kubernetes deployment applies, and the client to apply it with (none for a dry run).
struct KubernetesTarget {
    spec: KubernetesSpec,
    client: Option<kubernetes::Client>,
}

impl DeployArgs {
    /// Deploying `name` as the recovery info on chain records it (`br2k deploy NAME`), on
    /// `context` or the recorded one.
    pub(crate) const fn recorded(
        name: String,
        context: Option<String>,
        backend: BackendOpts,
        store: StoreArg,
        config: DirArg,
    ) -> Self {
        Self {
            name,
            context,
            image: None,
            image_registry: None,
            replicas: None,
            dry_run: false,
            backend,
            store,
            config,
        }
    }

    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let contexts = self.config.contexts()?;
        let context = match &self.context {
            Some(name) => contexts.get(name)?,
            None => contexts.list()?.into_iter().find(|c| c.current).context("no current context")?,
        };
        let registries = RegistryList::new(self.store.store.join("registry.json"));
        let store = ImageStore::new(&self.store.store);

        // The chain: a signing key unless this is a dry run (which only reads).
        // The signing key is read once (a keystore takes a while to decrypt).
        let signer = if self.dry_run { None } else { Some(global.wallet.require_signer("deploying a service")?) };
        let registry = match &signer {
            Some(key) => Some(global.registry.open(&global.chain.connect(Some(key.clone())).await?, &out).await?),
            None => None,
        };
        let recorded = match (&self.image, &registry) {
            (Some(_), _) => None,
            (None, Some(registry)) => Some(recorded_deployment(registry, &self.name).await?),
            (None, None) => Some(recorded_deployment(&global.open_registry().await?, &self.name).await?),
        };
        let (entry, image, to_push) = self.resolve_image(&registries, &store, recorded.as_ref())?;
        let replicas = self.replicas.or(recorded.as_ref().map(|r| r.replicas)).unwrap_or(3);
        let record = DeploymentRecord { context: context.name.clone(), replicas, image };

        // Everything that can be refused is refused before anything is pushed or recorded.
        let kubernetes = if context.name == LOCAL {
            if !self.dry_run
                && let Some(pid) = super::up::running_pid(&super::up::state_dir(&self.name, None)?)
            {
                bail!(
                    "{:?} already runs here (runner pid {pid}); stop it with `br2k down --name {}` and deploy again",
                    self.name,
                    self.name
                );
            }
            None
        } else {
            let registry_address = match (&registry, global.registry.registry) {
                (Some(registry), _) => registry.address(),
                (None, Some(address)) => address,
                (None, None) => global.open_registry().await?.address(),
            };
            let spec = KubernetesSpec::new(
                &self.name,
                &context,
                &record,
                &self.backend.cluster_settings(&global.chain.rpc_url, registry_address),
            );
            Manifests::build(&spec, &SecretValues::default())?;
            // Reads the kubeconfig and the token file (no request yet).
            let client = if self.dry_run { None } else { Some(kubernetes::connect(&contexts, &context.name).await?) };
            Some(KubernetesTarget { spec, client })
        };

        if let Some(local) = &to_push {
            if self.dry_run {
                out.progress(format_args!("deploy: would push {} to {}", local.reference(), entry.url));
            } else {
                out.progress(format_args!(
                    "deploy: pushing {} to {} ({} bytes)",
                    local.reference(),
                    entry.url,
                    local.size
                ));
                entry.client()?.push(&store, local, &record.image.repository).await?;
            }
        }
        if let (Some(registry), Some(key)) = (&registry, &signer) {
            let manager = key.address();
            out.progress(format_args!(
                "deploy: recording the deployment as {}'s recovery info in {}",
                self.name,
                registry.address()
            ));
            let recorded = deployment::record(registry, &self.name, &record, manager).await?;
            out.progress(format_args!(
                "deploy: recovery info {}",
                match recorded {
                    Recorded::Registered => "recorded (service registered; this key is its manager)",
                    Recorded::Updated => "updated",
                    Recorded::Unchanged => "unchanged (it already records this deployment)",
                }
            ));
        }
        match kubernetes {
            None => self.deploy_local(global, &record, &registries, registry.as_ref().zip(signer.as_ref()), &out).await,
            Some(target) => {
                self.deploy_kubernetes(global, &context, target, &record, &registries, registry.as_ref()).await
            }
        }
    }

    /// The registry entry, the image pinned by digest, and the local image to push first.
    fn resolve_image(
        &self,
        registries: &RegistryList,
        store: &ImageStore,
        recorded: Option<&DeploymentRecord>,
    ) -> Result<(RegistryEntry, PinnedImage, Option<ImageRecord>)> {
        let Some(reference) = &self.image else {
            let recorded = recorded.context("no image given and none recorded")?;
            let entry = match &self.image_registry {
                Some(name) => registries.get(name)?,
                None => registries.entry_for_url(&recorded.image.registry_url)?,
            };
            let mut image = recorded.image.clone();
            image.registry_url.clone_from(&entry.url);
            return Ok((entry, image, None));
        };
        let entry = self.pick_registry(registries)?;
        if let Some((repository, digest)) = reference.split_once('@') {
            let image = PinnedImage {
                registry_url: entry.url.clone(),
                repository: repository.to_owned(),
                tag: String::new(),
                digest: digest.to_owned(),
            };
            image.digest_bytes()?; // refuse a malformed digest before anything happens
            return Ok((entry, image, None));
        }
        let (name, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
        let local = store.find(name, tag)?.with_context(|| {
            format!(
                "no image {name}:{tag} in {} (`br2k image ls`); build it with `br2k image build`, or name one in the registry as REPOSITORY@sha256:...",
                self.store.store.display()
            )
        })?;
        let image = PinnedImage {
            registry_url: entry.url.clone(),
            repository: local.name.clone(),
            tag: local.tag.clone(),
            digest: local.digest.clone(),
        };
        Ok((entry, image, Some(local)))
    }

    fn pick_registry(&self, registries: &RegistryList) -> Result<RegistryEntry> {
        if let Some(name) = &self.image_registry {
            return Ok(registries.get(name)?);
        }
        let all = registries.list()?;
        match all.as_slice() {
            [only] => Ok(only.clone()),
            [] => bail!(
                "no container registry to deploy from: add one with `br2k image-registry add NAME URL` (see `br2k image-registry --help`)"
            ),
            many => bail!(
                "several container registries ({}): choose one with --image-registry",
                many.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Pulls the image by digest into this deployment's own store (never the build
    /// store), unpacks it, and runs the replicas under a detached `br2k up` from there.
    async fn deploy_local(
        &self,
        global: &GlobalOpts,
        record: &DeploymentRecord,
        registries: &RegistryList,
        signed: Option<(&RegistryClient, &PrivateKeySigner)>,
        out: &Output,
    ) -> Result<()> {
        let dir = LocalBackend::default_roots()?.1.join(&self.name);
        let Some((registry, key)) = signed else {
            let plan = json!({
                "service": self.name, "context": LOCAL, "replicas": record.replicas,
                "image": record.image.pull_reference(), "unpackedInto": dir.join("rootfs"),
            });
            return out.result(
                &format!(
                    "would pull {} and run {} local replicas of {} from it (unpacked in {})",
                    record.image.pull_reference(),
                    record.replicas,
                    self.name,
                    dir.join("rootfs").display()
                ),
                &plan,
            );
        };
        let backend = self.backend.local(&global.chain.rpc_url, registry, key, registries)?;
        let deployed = backend.deploy(&self.name, record, &|line| out.progress(format_args!("deploy: {line}"))).await?;
        out.result(
            &format!(
                "{} deployed: {}, served at {} (`br2k down --name {}` stops it)",
                self.name,
                deployed.summary,
                deployed.location.as_deref().unwrap_or("?"),
                self.name
            ),
            &json!({
                "service": self.name, "context": LOCAL, "replicas": record.replicas,
                "image": record.image.pull_reference(), "location": deployed.location,
                "stateDir": backend.state_dir(&self.name), "app": backend.image_dir(&self.name).join("rootfs"),
            }),
        )
    }

    async fn deploy_kubernetes(
        &self,
        global: &GlobalOpts,
        context: &ContextInfo,
        target: KubernetesTarget,
        record: &DeploymentRecord,
        registries: &RegistryList,
        registry: Option<&RegistryClient>,
    ) -> Result<()> {
        let out = global.output();
        let KubernetesTarget { spec, client } = target;
        if br2k_deploy::local::is_loopback_url(&global.chain.rpc_url) {
            out.progress(format_args!(
                "deploy: warning: the Pods cannot reach the chain at {} (loopback); pass an --rpc-url the cluster reaches",
                global.chain.rpc_url
            ));
        }
        let (Some(registry), Some(client)) = (registry, client) else {
            let entry = registries.entry_for_url(&record.image.registry_url)?;
            let pull = Credentials::find(&entry.host())?.map(|c| (entry.host(), c));
            let backup_push = kubernetes::backup_push_credentials()?.map(|c| (entry.host(), c));
            let mut spec = spec;
            if pull.is_some() && backup_push.is_none() {
                out.progress(format_args!(
                    "deploy: backups off: {} needs credentials and the replicas never get the deployer's; set {} and {} to a push-only credential for {}",
                    entry.host(),
                    kubernetes::BACKUP_PUSH_USERNAME_ENV,
                    kubernetes::BACKUP_PUSH_PASSWORD_ENV,
                    record.image.repository
                ));
                spec.backup = None;
            }
            let manifests = Manifests::build(&spec, &SecretValues { pull, backup_push, ..SecretValues::default() })?;
            print!("{}", manifests.to_yaml());
            return Ok(());
        };
        let backend = KubernetesBackend {
            context: context.clone(),
            client,
            config_dir: self.config.dir()?,
            registries: registries.clone(),
            settings: self.backend.cluster_settings(&global.chain.rpc_url, registry.address()),
            settings_source: br2k_deploy::kubernetes::SettingsSource::Given,
            rollout: self.backend.rollout(),
            operator_funds: self.backend.operator_funds,
            registry: registry.clone(),
        };
        let deployed = backend.deploy(&self.name, record, &|line| out.progress(format_args!("deploy: {line}"))).await?;
        out.result(
            &format!("{} deployed: {}", self.name, deployed.summary),
            &json!({
                "service": self.name, "context": context.name, "namespace": context.namespace,
                "replicas": spec.replicas, "image": spec.image,
            }),
        )
    }
}

/// The deployment the registry records for `service`.
async fn recorded_deployment(registry: &RegistryClient, service: &str) -> Result<DeploymentRecord> {
    let info = registry.info(service).await?;
    DeploymentRecord::from_body(&info.recovery)
        .with_context(|| format!("no --image given, and {service:?} has no deployment recorded to deploy again"))
}
