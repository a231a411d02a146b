//! The typed registry client: reads, transactions, decoded reverts, connection errors.

use br2k_bindings::ServiceRegistry::ServiceRegistryErrors;
use br2k_bindings::ServiceState;
use br2k_resolver::{Chain, Error};

use br2k_test_utils::Anvil;

use crate::fixture::{Fixture, NAME, timeouts};

#[tokio::test]
async fn reads_what_was_written() {
    let f = Fixture::new(300).await;
    f.publish("http://127.0.0.1:8080", 4).await;
    let resolved = f.manager.service_location(NAME).await.unwrap();
    assert_eq!(
        (resolved.location.as_str(), resolved.epoch, resolved.state),
        ("http://127.0.0.1:8080", 4, ServiceState::Registered)
    );

    f.manager.set_state(NAME, ServiceState::Running).await.unwrap();
    let info = f.manager.info(NAME).await.unwrap();
    assert_eq!(info.state, ServiceState::Running);
    assert_eq!(info.manager, f.anvil.address(0));
    assert_eq!(info.recovery.replicas, 3);
    assert_eq!(f.manager.operators(NAME).await.unwrap(), vec![f.anvil.address(1)]);
    f.manager.set_operator(NAME, f.anvil.address(1), false).await.unwrap();
    assert!(f.manager.operators(NAME).await.unwrap().is_empty(), "a removed operator is gone");
}

#[tokio::test]
async fn reverts_are_decoded() {
    let f = Fixture::new(300).await;
    f.publish("http://a", 5).await;
    match f.operator.update_location(NAME, "http://b", 5).await {
        Err(Error::Reverted { revert: ServiceRegistryErrors::ServiceRegistryStaleEpoch(e), service, .. }) => {
            assert_eq!((e.epoch, e.currentEpoch), (5, 5));
            assert_eq!(service.as_deref(), Some(NAME));
        }
        other => panic!("expected a stale-epoch revert, got {other:?}"),
    }
    match f.operator.set_state(NAME, ServiceState::Stopped).await {
        Err(e @ Error::Reverted { revert: ServiceRegistryErrors::ServiceRegistryNotManager(_), .. }) => {
            let text = e.to_string();
            assert!(text.contains("is not the manager of service \"logserver\""), "{text}");
        }
        other => panic!("expected NotManager, got {other:?}"),
    }
    match f.manager.service_location("nope").await {
        Err(Error::UnknownService { name, .. }) => assert_eq!(name, "nope"),
        other => panic!("expected UnknownService, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_problems_are_typed() {
    let f = Fixture::new(300).await;
    match Chain::connect("http://127.0.0.1:1", None, timeouts()).await {
        Err(e @ Error::Unreachable { .. }) => assert!(e.is_unreachable()),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(matches!(Chain::connect("ftp://x", None, timeouts()).await, Err(Error::InvalidRpcUrl { .. })));
    let chain = Chain::connect(&f.anvil.endpoint(), None, timeouts()).await.unwrap();
    match chain.registry(f.anvil.address(5)).await {
        Err(Error::NoRegistry { chain_id, .. }) => assert_eq!(chain_id, 31337),
        other => panic!("expected NoRegistry, got {other:?}"),
    }
    let registry = chain.registry(f.manager.address()).await.unwrap();
    assert!(
        matches!(registry.send_claim(NAME, "x").await, Err(Error::NoSigner { .. })),
        "a keyless client cannot send"
    );
}

#[tokio::test]
async fn funds_are_sent_and_balances_read() {
    let f = Fixture::new(300).await;
    let fresh = alloy::primitives::Address::repeat_byte(0x42);
    let chain = f.manager.chain();
    assert_eq!(chain.balance(fresh).await.unwrap(), alloy::primitives::U256::ZERO);
    let wei = alloy::primitives::U256::from(123_456_789_u64);
    let outcome = chain.send_value(fresh, wei).await.unwrap();
    assert_eq!(outcome.gas_used, 21_000, "a plain transfer");
    assert_eq!(chain.balance(fresh).await.unwrap(), wei);
}

#[tokio::test]
async fn backups_are_recorded_read_back_and_never_go_back() {
    let f = Fixture::new(300).await;
    assert_eq!(f.manager.backup(NAME).await.unwrap(), None, "no backup before the first");
    let digest = alloy::primitives::B256::repeat_byte(0xab);
    let artifact = "127.0.0.1:5000/logserver@sha256:abab";
    let recorded = f.operator.record_backup(NAME, 10_000, digest, artifact).await.unwrap();
    let backup = f.manager.backup(NAME).await.unwrap().expect("recorded");
    assert_eq!((backup.index, backup.digest, backup.artifact.as_str()), (10_000, digest, artifact));
    assert!(backup.recorded_at > 0);
    // A second record (the steady state a leader is in) costs less than the first.
    let again = f.operator.record_backup(NAME, 20_000, digest, artifact).await.unwrap();
    assert!(again.gas_used < recorded.gas_used, "{} then {}", recorded.gas_used, again.gas_used);
    match f.operator.record_backup(NAME, 15_000, digest, artifact).await {
        Err(e @ Error::Reverted { revert: ServiceRegistryErrors::ServiceRegistryStaleBackup(_), .. }) => {
            let text = e.to_string();
            assert!(text.contains("backup index 15000 is not above the recorded backup index 20000"), "{text}");
        }
        other => panic!("expected a stale-backup revert, got {other:?}"),
    }
    assert_eq!(f.manager.backup(NAME).await.unwrap().unwrap().index, 20_000, "the newer backup stays");
}

/// On a chain with block times, a user's two claims in a row: the second used to pass gas
/// estimation (the first still pending) and revert once mined, paying its gas. It is now
/// refused before anything is sent, and the claimant's nonce shows a single transaction.
#[tokio::test]
async fn a_claim_inside_the_cooldown_is_never_sent_even_behind_a_pending_one() {
    let anvil = Anvil::builder()
        .arg("--block-time")
        .arg("2")
        .spawn()
        .expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let chain = Chain::connect(&anvil.endpoint(), Some(anvil.key(0)), timeouts()).await.unwrap();
    let deployment = chain.deploy_registry(300).await.unwrap();
    let manager = chain.registry(deployment.address).await.unwrap();
    manager.register(NAME, crate::fixture::body(anvil.address(0))).await.unwrap();
    let user = Fixture::client(&anvil, deployment.address, 4).await;
    let claimant = anvil.address(4);
    let provider = alloy::providers::ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let nonce = || async { alloy::providers::Provider::get_transaction_count(&provider, claimant).await.unwrap() };
    let before = nonce().await;
    let (first, second) = tokio::join!(user.send_claim(NAME, "down"), user.send_claim(NAME, "still down"));
    let outcomes = [first, second];
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| matches!(o, Err(Error::ClaimTooSoon { next_claim_at, .. }) if *next_claim_at > 0)),
        "{outcomes:?}"
    );
    assert_eq!(nonce().await, before + 1, "one transaction sent, none to revert");
}
