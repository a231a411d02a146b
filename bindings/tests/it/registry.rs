//! The contract through the bindings: deploy, register, operators, epoch-fenced location
//! updates, claims, and typed decoding of reverts.

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, FixedBytes, keccak256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use br2k_bindings::IServiceRegistry::Body;
use br2k_bindings::ServiceRegistry::{self, ServiceRegistryErrors, ServiceRegistryInstance};
use br2k_bindings::ServiceState;
use br2k_test_utils::Anvil;

const COOLDOWN: u64 = 300;
const NAME: &str = "logserver";

/// A provider that signs with `key`.
pub(crate) fn provider(anvil: &Anvil, key: PrivateKeySigner) -> DynProvider {
    ProviderBuilder::new()
        .wallet(EthereumWallet::from(key))
        .connect_http(anvil.endpoint().parse().expect("anvil's endpoint is a URL"))
        .erased()
}

fn body(deployer: Address) -> Body {
    Body {
        deployer,
        context: "local".into(),
        replicas: 3,
        containerRegistry: "http://127.0.0.1:5000".into(),
        image: "br2k/logserver:0.1.0".into(),
        imageDigest: keccak256("image"),
    }
}

/// The decoded custom error of a failed contract call.
fn revert(err: &alloy::contract::Error) -> ServiceRegistryErrors {
    err.as_decoded_interface_error::<ServiceRegistryErrors>()
        .unwrap_or_else(|| panic!("not a ServiceRegistry custom error: {err}"))
}

/// One deployed registry with `logserver` registered by the manager (anvil account 0)
/// and account 1 allowed as operator.
struct Fixture {
    anvil: Anvil,
    manager: ServiceRegistryInstance<DynProvider>,
    operator: ServiceRegistryInstance<DynProvider>,
    operator_address: Address,
    id: B256,
}

async fn fixture() -> Fixture {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let manager_provider = provider(&anvil, anvil.key(0));
    let manager = ServiceRegistry::deploy(manager_provider, COOLDOWN).await.expect("registry deploys");
    let operator = ServiceRegistry::new(*manager.address(), provider(&anvil, anvil.key(1)));
    let operator_address = anvil.address(1);

    let receipt = manager
        .register(NAME.into(), body(anvil.address(0)))
        .send()
        .await
        .expect("register is accepted")
        .get_receipt()
        .await
        .expect("register is mined");
    assert!(receipt.status(), "register succeeded");
    let registered = receipt.decoded_log::<ServiceRegistry::ServiceRegistered>().expect("ServiceRegistered emitted");
    let id = registered.id;
    assert_eq!(id, keccak256(NAME), "the id is keccak256(name)");
    assert_eq!(registered.name, NAME);
    assert_eq!(registered.manager, anvil.address(0));

    let receipt = manager.setOperator(id, operator_address, true).send().await.unwrap().get_receipt().await.unwrap();
    assert!(receipt.status(), "setOperator succeeded");
    let set = receipt.decoded_log::<ServiceRegistry::OperatorSet>().expect("OperatorSet emitted");
    assert_eq!((set.id, set.operator, set.allowed), (id, operator_address, true));

    Fixture { anvil, manager, operator, operator_address, id }
}

#[tokio::test]
async fn registry_round_trip_through_the_bindings() {
    let Fixture { anvil, manager, operator, operator_address, id } = fixture().await;
    assert!(manager.isOperator(id, operator_address).call().await.unwrap());
    assert_eq!(manager.getRecoveryInfo(id).call().await.unwrap(), body(anvil.address(0)));

    // The operator (a replica's key) publishes itself as leader.
    let location = "http://10.0.0.7:8080";
    let receipt = operator.updateLocation(id, location.into(), 7).send().await.unwrap().get_receipt().await.unwrap();
    assert!(receipt.status(), "updateLocation by the operator succeeded");
    let published = receipt.decoded_log::<ServiceRegistry::NewLocation>().expect("NewLocation emitted");
    assert_eq!((published.id, published.location.as_str(), published.epoch), (id, location, 7));
    eprintln!(
        "gas: updateLocation (operator, {} bytes) = {} for the whole transaction",
        location.len(),
        receipt.gas_used
    );
    assert!(receipt.gas_used <= 40_000, "updateLocation used {} gas, goal is at most 40,000", receipt.gas_used);

    // getServiceLocation returns what was written.
    let current = manager.getServiceLocation(id).call().await.unwrap();
    assert_eq!((current.location.as_str(), current.epoch), (location, 7));
    assert_eq!(ServiceState::try_from(current.state), Ok(ServiceState::Registered));

    // A stale leader (same or lower epoch) is refused, and the Rust side gets the typed error.
    for stale in [7, 3] {
        let err = operator.updateLocation(id, "http://10.0.0.9:8080".into(), stale).send().await.unwrap_err();
        match revert(&err) {
            ServiceRegistryErrors::ServiceRegistryStaleEpoch(e) => {
                assert_eq!((e.id, e.epoch, e.currentEpoch), (id, stale, 7));
            }
            other => panic!("expected ServiceRegistryStaleEpoch, got {other:?}"),
        }
    }
    let current = manager.getServiceLocation(id).call().await.unwrap();
    assert_eq!((current.location.as_str(), current.epoch), (location, 7), "a stale update changes nothing");

    // A caller that is neither manager nor operator is refused with the decoded error.
    let stranger = ServiceRegistry::new(*manager.address(), provider(&anvil, anvil.key(2)));
    let err = stranger.updateLocation(id, "http://evil:80".into(), 8).send().await.unwrap_err();
    match revert(&err) {
        ServiceRegistryErrors::ServiceRegistryNotManagerOrOperator(e) => {
            assert_eq!((e.id, e.caller), (id, anvil.address(2)));
        }
        other => panic!("expected ServiceRegistryNotManagerOrOperator, got {other:?}"),
    }
    let err = stranger.setState(id, ServiceState::Stopped.into()).send().await.unwrap_err();
    assert!(matches!(revert(&err), ServiceRegistryErrors::ServiceRegistryNotManager(_)), "{err}");
}

#[tokio::test]
async fn claims_are_emitted_read_back_and_rate_limited() {
    let Fixture { anvil, manager, id, .. } = fixture().await;
    let client = ServiceRegistry::new(*manager.address(), provider(&anvil, anvil.key(3)));

    let receipt = client.sendClaim(id, "no answer for 30 s".into()).send().await.unwrap().get_receipt().await.unwrap();
    assert!(receipt.status(), "sendClaim succeeded");
    eprintln!("gas: sendClaim (first claim of this claimant) = {} for the whole transaction", receipt.gas_used);

    // Read the event back from the chain, as the manager daemon will.
    let claims = manager.Claim_filter().from_block(0).query().await.unwrap();
    assert_eq!(claims.len(), 1);
    let (claim, log) = &claims[0];
    assert_eq!((claim.id, claim.claimant, claim.reason.as_str()), (id, anvil.address(3), "no answer for 30 s"));
    assert_eq!(log.transaction_hash, Some(receipt.transaction_hash));
    // Filtering by the indexed id finds it too.
    let by_id = manager.Claim_filter().topic1(id).from_block(0).query().await.unwrap();
    assert_eq!(by_id.len(), 1);

    // The same claimant within the cooldown is refused with the time it may claim again.
    let err = client.sendClaim(id, "still down".into()).send().await.unwrap_err();
    match revert(&err) {
        ServiceRegistryErrors::ServiceRegistryClaimTooSoon(e) => {
            assert_eq!((e.id, e.claimant), (id, anvil.address(3)));
            let next = manager.nextClaimAt(id, anvil.address(3)).call().await.unwrap();
            assert_eq!(e.nextClaimAt, next);
        }
        other => panic!("expected ServiceRegistryClaimTooSoon, got {other:?}"),
    }

    // A claim for a service that does not exist names the id.
    let unknown: FixedBytes<32> = keccak256("unknown");
    let err = client.sendClaim(unknown, "down".into()).send().await.unwrap_err();
    match revert(&err) {
        ServiceRegistryErrors::ServiceRegistryUnknownService(e) => assert_eq!(e.id, unknown),
        other => panic!("expected ServiceRegistryUnknownService, got {other:?}"),
    }
}
