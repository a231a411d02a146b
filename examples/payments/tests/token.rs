//! The token on a real anvil, through its bindings: deployed, minted, moved, and each
//! move visible as the `Transfer` event the service verifies deposits by.

use alloy::network::EthereumWallet;
use alloy::primitives::U256;
use alloy::providers::ProviderBuilder;
use alloy::sol_types::SolEvent;
use br2k_payments::PaymentToken;
use br2k_test_utils::Anvil;

#[tokio::test]
async fn the_token_mints_moves_and_reports_each_move() {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let (owner, service, user) = (anvil.key(0), anvil.address(1), anvil.address(2));
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(owner.clone()))
        .connect_http(anvil.endpoint().parse().unwrap());
    let token = PaymentToken::deploy(&provider).await.unwrap();
    token.mint(service, U256::from(1_000)).send().await.unwrap().get_receipt().await.unwrap();
    assert_eq!(token.balanceOf(service).call().await.unwrap(), U256::from(1_000));

    // The service pays a user: one Transfer event, from the service to the user.
    let as_service = ProviderBuilder::new()
        .wallet(EthereumWallet::from(anvil.key(1)))
        .connect_http(anvil.endpoint().parse().unwrap());
    let paid = PaymentToken::new(*token.address(), &as_service)
        .transfer(user, U256::from(250))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(paid.status());
    let transfers: Vec<_> =
        paid.inner.logs().iter().filter_map(|log| PaymentToken::Transfer::decode_log(&log.inner).ok()).collect();
    assert_eq!(transfers.len(), 1);
    assert_eq!((transfers[0].from, transfers[0].to, transfers[0].value), (service, user, U256::from(250)));
    assert_eq!(token.balanceOf(user).call().await.unwrap(), U256::from(250));

    // Only the owner mints; the revert decodes to the contract's error.
    let err = PaymentToken::new(*token.address(), &as_service).mint(user, U256::from(1)).call().await.unwrap_err();
    let decoded = err.as_decoded_interface_error::<PaymentToken::PaymentTokenErrors>();
    assert!(matches!(decoded, Some(PaymentToken::PaymentTokenErrors::NotOwner(ref e)) if e.caller == service), "{err}");
}
