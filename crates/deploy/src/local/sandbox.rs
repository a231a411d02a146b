//! A whole service up on this machine in one call: its network, a chain holding the
//! service registry (a local anvil unless one is given), the service registered with its
//! replicas' operator keys, and the replicas themselves. What `br2k up` and the testbed
//! stand on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use br2k_bindings::IServiceRegistry::Body;
use br2k_resolver::{Chain, RegistryClient, Resolved, Timeouts};

use super::{
    DiskLimits, EtcdTimings, LocalChain, LocalChainOptions, LocalNetwork, LocalService, NetworkMode, Publishing,
    ServiceSpec,
};
use crate::error::{DeployError, Result};

/// Which chain the registry lives on.
#[derive(Clone, Debug)]
pub enum ChainChoice {
    /// Start a throwaway anvil (mining as the options say), deploy a registry on it,
    /// register the service, and give each replica its own funded dev key as operator.
    Local(LocalChainOptions),
    /// An existing chain. `key` is the service's manager key; it registers the service and
    /// funds one operator key per replica, kept 0600 in the work directory's `operators/`
    /// (the replicas never hold the manager's key). Without `registry`, a new registry is
    /// deployed.
    Existing {
        /// JSON-RPC URL (must be reachable from the nodes).
        rpc_url: String,
        /// The registry, if there already is one.
        registry: Option<Address>,
        /// The manager's key (boxed: it is large next to the other variant).
        key: Box<PrivateKeySigner>,
        /// Each replica key is topped up to this (wei) when below half of it.
        operator_funds: U256,
    },
}

/// What to put up.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// The service name.
    pub service: String,
    /// How many nodes: one per replica, plus the retired ones of kept data.
    pub replicas: usize,
    /// The nodes of kept data that membership changes retired (0-based): not started.
    pub retired: Vec<usize>,
    /// The app binary.
    pub app: PathBuf,
    /// Extra app arguments.
    pub app_args: Vec<String>,
    /// Extra app environment.
    pub app_env: Vec<(String, String)>,
    /// Where data and logs go.
    pub work_dir: PathBuf,
    /// Network placement.
    pub network: NetworkMode,
    /// The local slot to take (the one kept data was made with); `None` takes the first free.
    pub slot: Option<u8>,
    /// etcd timings.
    pub etcd: EtcdTimings,
    /// The chain.
    pub chain: ChainChoice,
    /// How long each process may take to start.
    pub startup_timeout: Duration,
    /// Size-limited data directories, if any (the testbed's disk-full faults).
    pub disks: DiskLimits,
    /// TLS for etcd's client and peer traffic (see [`ServiceSpec::etcd_tls`]).
    pub etcd_tls: bool,
}

/// A running service with its chain. Dropping it stops everything.
#[derive(Debug)]
pub struct Sandbox {
    // Drop order: the replicas go before the chain they publish to.
    service: LocalService,
    registry: RegistryClient,
    rpc_url: String,
    chain: Option<LocalChain>,
}

/// The claim cooldown of a registry deployed for a sandbox (seconds).
const CLAIM_COOLDOWN: u64 = 60;

impl Sandbox {
    /// Puts everything up, reporting each step to `progress`.
    ///
    /// # Errors
    /// Any step that fails; what was started is stopped again.
    pub async fn start(spec: SandboxSpec, progress: &dyn Fn(&str)) -> Result<Self> {
        Self::start_then(spec, progress, |_, _| Ok(Vec::new())).await
    }

    /// [`Sandbox::start`], with `before_replicas` called once the chain is up and before
    /// the replicas start, with the chain's RPC URL and the host's address the nodes
    /// reach; the arguments it returns are added to the app's (the testbed puts relays in
    /// front of the chain there, and gives the apps their URLs).
    ///
    /// # Errors
    /// Any step that fails, `before_replicas` included; what was started is stopped again.
    pub async fn start_then(
        mut spec: SandboxSpec,
        progress: &dyn Fn(&str),
        before_replicas: impl FnOnce(&str, std::net::IpAddr) -> Result<Vec<String>>,
    ) -> Result<Self> {
        let network = match spec.slot {
            Some(slot) => LocalNetwork::reclaim(spec.network, spec.replicas, slot)?,
            None => LocalNetwork::claim(spec.network, spec.replicas)?,
        };
        let mut funds = U256::ZERO;
        let (chain, rpc_url, manager, registry) = match spec.chain.clone() {
            ChainChoice::Local(options) => {
                progress(&format!("starting a local chain (anvil) on {}", network.host_address()));
                let chain = LocalChain::start(
                    network.host_address(),
                    spec.replicas + 1,
                    &spec.work_dir,
                    &options,
                    spec.startup_timeout,
                )
                .await?;
                let url = chain.url().to_owned();
                let key = chain.key(0);
                (Some(chain), url, key, None)
            }
            ChainChoice::Existing { rpc_url, registry, key, operator_funds } => {
                funds = operator_funds;
                if network.uses_namespaces() && is_loopback_url(&rpc_url) {
                    return Err(DeployError::Invalid(format!(
                        "the nodes run in their own network namespaces and cannot reach {rpc_url} (loopback); \
                         give an address of this machine they can reach, or --network loopback"
                    )));
                }
                (None, rpc_url, *key, registry)
            }
        };
        let operators: Vec<PrivateKeySigner> = match &chain {
            Some(chain) => (1..=spec.replicas).map(|i| chain.key(i)).collect(),
            None => (0..spec.replicas)
                .map(|i| {
                    let path = spec.work_dir.join("operators").join(format!("node-{i}.key"));
                    crate::operator_key::load_or_create(&path)
                })
                .collect::<Result<_>>()?,
        };
        let client = Chain::connect(&rpc_url, Some(manager.clone()), Timeouts::default()).await?;
        let registry = match registry {
            Some(address) => client.registry(address).await?,
            None => {
                progress("deploying the service registry");
                let deployment = client.deploy_registry(CLAIM_COOLDOWN).await?;
                client.registry(deployment.address).await?
            }
        };
        register(&registry, &spec, manager.address(), progress).await?;
        for key in &operators {
            crate::operator_key::allow_and_fund(&registry, &spec.service, key, funds, progress).await?;
        }
        spec.app_args.extend(before_replicas(&rpc_url, network.host_address())?);
        let service_spec = ServiceSpec {
            service: spec.service.clone(),
            app: spec.app,
            app_args: spec.app_args,
            app_env: spec.app_env,
            work_dir: spec.work_dir,
            etcd: spec.etcd,
            publishing: Some(Publishing {
                rpc_url: rpc_url.clone(),
                registry: registry.address(),
                operator_keys: operators,
            }),
            startup_timeout: spec.startup_timeout,
            disks: spec.disks,
            etcd_tls: spec.etcd_tls,
        };
        let service = LocalService::start_kept(network, service_spec, &spec.retired, progress).await?;
        Ok(Self { service, registry, rpc_url, chain })
    }

    /// The replicas.
    pub const fn service(&self) -> &LocalService {
        &self.service
    }

    /// The replicas, for faults.
    pub const fn service_mut(&mut self) -> &mut LocalService {
        &mut self.service
    }

    /// The chain's JSON-RPC URL (reachable from this machine and the nodes).
    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// The registry the service is in.
    pub const fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// The local chain, when the sandbox started one.
    pub const fn chain(&self) -> Option<&LocalChain> {
        self.chain.as_ref()
    }

    /// Stops the local chain (the replicas keep running, without it), writing its state
    /// when its options asked for that; returns where ([`LocalChain::stop`]).
    ///
    /// # Errors
    /// What [`LocalChain::stop`] reports.
    pub async fn stop_chain(&mut self, timeout: Duration) -> Result<Option<PathBuf>> {
        match self.chain.take() {
            Some(chain) => chain.stop(timeout).await,
            None => Ok(None),
        }
    }

    /// Waits until the registry holds a location with an epoch of at least `min_epoch`.
    ///
    /// # Errors
    /// [`DeployError::NotReady`] when none is published within `timeout`.
    pub async fn wait_published(&self, min_epoch: u64, timeout: Duration) -> Result<Resolved> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(resolved) = self.registry.service_location(self.service.name()).await
                && resolved.epoch >= min_epoch
            {
                return Ok(resolved);
            }
            if Instant::now() >= deadline {
                return Err(DeployError::NotReady {
                    what: format!("a published location for {:?} (epoch >= {min_epoch})", self.service.name()),
                    timeout,
                    log: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the replicas in order, then the chain.
    pub async fn shutdown(self) {
        let Self { service, chain, .. } = self;
        service.shutdown().await;
        drop(chain);
    }
}

/// Registers the service (or checks that this key manages it).
async fn register(
    registry: &RegistryClient,
    spec: &SandboxSpec,
    manager: Address,
    progress: &dyn Fn(&str),
) -> Result<()> {
    match registry.info(&spec.service).await {
        Ok(info) if info.manager != manager => {
            return Err(DeployError::Invalid(format!(
                "service {:?} is already registered in {} with manager {}, not this key ({manager})",
                spec.service,
                registry.address(),
                info.manager
            )));
        }
        Ok(_) => {}
        Err(br2k_resolver::Error::UnknownService { .. }) => {
            progress(&format!("registering {:?} with {} replicas", spec.service, spec.replicas));
            let body = Body {
                deployer: manager,
                context: "local".into(),
                replicas: u32::try_from(spec.replicas).unwrap_or(u32::MAX),
                containerRegistry: String::new(),
                image: spec.app.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                imageDigest: B256::ZERO,
            };
            registry.register(&spec.service, body).await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Whether `url`'s host is a loopback address (unreachable from another network namespace or machine).
pub fn is_loopback_url(url: &str) -> bool {
    let host = url.split("://").nth(1).unwrap_or(url).split(['/', ':']).next().unwrap_or("");
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_urls_are_recognised() {
        assert!(super::is_loopback_url("http://127.0.0.1:8545"));
        assert!(super::is_loopback_url("http://localhost:8545/"));
        assert!(!super::is_loopback_url("http://10.0.0.5:8545"));
    }
}
