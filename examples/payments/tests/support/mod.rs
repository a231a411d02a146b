//! What both payment-service test files start from.

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, U256};
use alloy::providers::ProviderBuilder;
use br2k_payments::PaymentToken;
use br2k_test_utils::{Anvil, EtcdCluster};

/// anvil's key the service pays from.
pub(crate) const SERVICE_KEY: usize = 5;

/// An anvil mining a block every `block_time` seconds, with the token deployed (by key 0)
/// and a million units minted to the service's key; and a 3-member etcd cluster.
pub(crate) async fn chain_and_etcd(block_time: u64) -> (Anvil, Address, EtcdCluster) {
    let anvil = Anvil::builder()
        .arg("--block-time")
        .arg(block_time.to_string())
        .spawn()
        .expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let etcd = EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)");
    let deployer = ProviderBuilder::new()
        .wallet(EthereumWallet::from(anvil.key(0)))
        .connect_http(anvil.endpoint().parse().unwrap());
    let token = PaymentToken::deploy(&deployer).await.unwrap();
    token.mint(anvil.address(SERVICE_KEY), U256::from(1_000_000)).send().await.unwrap().get_receipt().await.unwrap();
    (anvil, *token.address(), etcd)
}
