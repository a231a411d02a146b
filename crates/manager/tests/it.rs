//! The manager on a real chain (anvil) with the real local backend: which services it
//! follows, and that one service it cannot check does not hold up the others.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::B256;
use br2k_bindings::IServiceRegistry::Body;
use br2k_deploy::backend::Backend;
use br2k_deploy::local::{LocalBackend, NetworkMode};
use br2k_manager::{Backends, Error, Manager, ManagerConfig, Metrics};
use br2k_oci::registry::RegistryList;
use br2k_resolver::{Chain, RegistryClient, Timeouts};
use br2k_test_utils::Anvil;
use futures::future::BoxFuture;

/// The local backend, and no other context: a service whose recovery info names another
/// one cannot be checked here (as with a Kubernetes context this manager has no
/// kubeconfig for).
struct LocalOnly(Arc<LocalBackend>);

impl Backends for LocalOnly {
    fn backend<'a>(&'a self, context: &'a str) -> BoxFuture<'a, Result<Arc<dyn Backend>, Error>> {
        Box::pin(async move {
            match context {
                "local" => Ok(self.0.clone() as Arc<dyn Backend>),
                other => Err(Error::Invalid(format!("no context {other:?} is configured here"))),
            }
        })
    }
}

fn body(context: &str) -> Body {
    Body {
        deployer: alloy::primitives::Address::ZERO,
        context: context.into(),
        replicas: 3,
        // Nothing listens there: a recovery's pull fails, and is retried later.
        containerRegistry: "http://127.0.0.1:9".into(),
        image: "br2k/app:1".into(),
        imageDigest: B256::repeat_byte(7),
    }
}

async fn registry_as(anvil: &Anvil, key: usize, address: alloy::primitives::Address) -> RegistryClient {
    let timeouts = Timeouts { rpc: Duration::from_secs(5), tx: Duration::from_secs(30) };
    Chain::connect(&anvil.endpoint(), Some(anvil.key(key)), timeouts).await.unwrap().registry(address).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_manager_follows_only_its_services_and_one_failing_service_holds_up_no_other() {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let timeouts = Timeouts { rpc: Duration::from_secs(5), tx: Duration::from_secs(30) };
    let chain = Chain::connect(&anvil.endpoint(), Some(anvil.key(0)), timeouts).await.unwrap();
    let address = chain.deploy_registry(0).await.unwrap().address;
    let mine = chain.registry(address).await.unwrap();
    let stranger = registry_as(&anvil, 1, address).await;
    let client = registry_as(&anvil, 2, address).await;

    let dir = tempfile::tempdir().unwrap();
    let backend = LocalBackend {
        runner: PathBuf::from("/nonexistent/br2k"),
        state_root: dir.path().join("up"),
        image_root: dir.path().join("deploy"),
        registries: RegistryList::new(dir.path().join("registry.json")),
        network: NetworkMode::Loopback,
        election_ms: 1000,
        rpc_url: anvil.endpoint(),
        registry: address,
        key: anvil.key(0),
        backup: br2k_deploy::backup_schedule::BackupSchedule::default(),
        etcd_tls: false,
    };
    let config = ManagerConfig { probe_interval: None, ..ManagerConfig::new(dir.path().join("manager")) };
    let mut manager =
        Manager::open(config, mine.clone(), LocalOnly(Arc::new(backend)), Metrics::default()).await.unwrap();

    // "broken" sorts first: its claim is handled first, and fails.
    mine.register("broken", body("elsewhere")).await.unwrap();
    mine.register("dead", body("local")).await.unwrap();
    stranger.register("foreign", body("local")).await.unwrap();
    for name in ["broken", "dead", "foreign"] {
        client.send_claim(name, "no answer").await.unwrap();
    }
    let claimed_at = chain.block_number().await.unwrap();
    manager.step().await.unwrap();

    let journal = manager.journal();
    let mut followed: Vec<&str> = journal.services.values().map(String::as_str).collect();
    followed.sort_unstable();
    assert_eq!(followed, ["broken", "dead"], "a stranger's service is not followed");
    let failure = &journal.failures["broken"];
    assert!(failure.last_error.contains("no context \"elsewhere\""), "{failure:?}");
    assert!(journal.recoveries.contains_key("dead"), "the other service's claim was acted on: {journal:?}");
    assert!(journal.next_block > claimed_at, "the cursor moved past every claim");

    // A service handed to this key is followed from then on.
    stranger.transfer_manager("foreign", anvil.address(0)).await.unwrap();
    mine.accept_manager("foreign").await.unwrap();
    manager.step().await.unwrap();
    assert!(manager.journal().services.values().any(|n| n == "foreign"), "{:?}", manager.journal());
    assert!(manager.journal().failures.contains_key("broken"), "still failing, still recorded");
}
