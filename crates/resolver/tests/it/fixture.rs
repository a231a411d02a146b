//! One anvil with a deployed registry and a registered service.

use std::time::{Duration, Instant};

use alloy::primitives::Address;
use br2k_bindings::IServiceRegistry::Body;
use br2k_resolver::{Chain, RegistryClient, Resolver, ResolverConfig, Timeouts};
use br2k_test_utils::Anvil;

pub(crate) const NAME: &str = "logserver";

/// anvil, the registry, `logserver` registered by account 0 with account 1 as operator.
pub(crate) struct Fixture {
    pub(crate) anvil: Anvil,
    pub(crate) manager: RegistryClient,
    pub(crate) operator: RegistryClient,
}

pub(crate) fn timeouts() -> Timeouts {
    Timeouts { rpc: Duration::from_secs(5), tx: Duration::from_secs(30) }
}

impl Fixture {
    pub(crate) async fn new(claim_cooldown: u64) -> Self {
        let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
        let chain = Chain::connect(&anvil.endpoint(), Some(anvil.key(0)), timeouts()).await.expect("anvil answers");
        let deployment = chain.deploy_registry(claim_cooldown).await.expect("the registry deploys");
        let manager = chain.registry(deployment.address).await.expect("the registry is there");
        manager.register(NAME, body(anvil.address(0))).await.expect("register");
        manager.set_operator(NAME, anvil.address(1), true).await.expect("setOperator");
        let operator = Self::client(&anvil, deployment.address, 1).await;
        Self { anvil, manager, operator }
    }

    /// A registry client signing with anvil account `index`, over HTTP.
    pub(crate) async fn client(anvil: &Anvil, registry: Address, index: usize) -> RegistryClient {
        let chain = Chain::connect(&anvil.endpoint(), Some(anvil.key(index)), timeouts()).await.unwrap();
        chain.registry(registry).await.unwrap()
    }

    /// A resolver over HTTP (log polling) or WebSocket (subscription), signing claims with
    /// account `key`, once its watcher is live.
    pub(crate) async fn resolver(&self, websocket: bool, key: usize) -> Resolver {
        let url = if websocket { self.anvil.ws_endpoint() } else { self.anvil.endpoint() };
        let config = ResolverConfig {
            timeouts: timeouts(),
            poll_interval: Duration::from_millis(50),
            ..ResolverConfig::default()
        };
        let resolver = Resolver::connect_with(&url, self.manager.address(), Some(self.anvil.key(key)), config)
            .await
            .expect("the resolver connects");
        let resolver_ = resolver.clone();
        eventually("the resolver's watcher is live", move || resolver_.is_live()).await;
        resolver
    }

    pub(crate) async fn publish(&self, location: &str, epoch: u64) {
        self.operator.update_location(NAME, location, epoch).await.expect("updateLocation");
    }
}

pub(crate) fn body(deployer: Address) -> Body {
    Body {
        deployer,
        context: "local".into(),
        replicas: 3,
        containerRegistry: String::new(),
        image: String::new(),
        imageDigest: Default::default(),
    }
}

/// Waits (up to 10 s) until `condition` holds.
pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
