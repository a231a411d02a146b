//! The README's first command, for now: start a local anvil, deploy the service registry,
//! register a demo service, publish a leader's location as a replica's operator key would,
//! and resolve it the way a client does. Progress goes to stderr, the result to stdout.
//!
//! Run it with `bash tools/demo.sh` (which installs the toolchain first).

use alloy::network::EthereumWallet;
use alloy::primitives::keccak256;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, Result};
use br2k_bindings::IServiceRegistry::Body;
use br2k_bindings::{ServiceRegistry, ServiceState};
use br2k_test_utils::Anvil;

const SERVICE: &str = "demo-logserver";
const LEADER_LOCATION: &str = "http://127.0.0.1:8080";

fn provider(anvil: &Anvil, key: PrivateKeySigner) -> Result<DynProvider> {
    let url = anvil.endpoint().parse().context("anvil's endpoint is not a URL")?;
    Ok(ProviderBuilder::new().wallet(EthereumWallet::from(key)).connect_http(url).erased())
}

#[tokio::main]
async fn main() -> Result<()> {
    eprintln!("starting anvil ...");
    let anvil = Anvil::spawn().context("could not start anvil")?;
    eprintln!("anvil listens on {}", anvil.endpoint());

    // Account 0 deploys and manages; account 1 plays a replica's operator key.
    let manager = ServiceRegistry::deploy(provider(&anvil, anvil.key(0))?, 300)
        .await
        .context("could not deploy the ServiceRegistry")?;
    eprintln!("deployed ServiceRegistry at {}", manager.address());

    let body = Body {
        deployer: anvil.address(0),
        context: "local".into(),
        replicas: 3,
        containerRegistry: String::new(),
        image: String::new(),
        imageDigest: Default::default(),
    };
    manager.register(SERVICE.into(), body).send().await?.get_receipt().await.context("register")?;
    let id = keccak256(SERVICE);
    eprintln!("registered {SERVICE:?} (id {id}), manager {}", anvil.address(0));

    manager.setOperator(id, anvil.address(1), true).send().await?.get_receipt().await.context("setOperator")?;
    eprintln!("allowed operator {}", anvil.address(1));

    let operator = ServiceRegistry::new(*manager.address(), provider(&anvil, anvil.key(1))?);
    let receipt = operator
        .updateLocation(id, LEADER_LOCATION.into(), 1)
        .send()
        .await?
        .get_receipt()
        .await
        .context("updateLocation")?;
    eprintln!("operator published {LEADER_LOCATION} at epoch 1 ({} gas)", receipt.gas_used);

    // Resolve as a client: one eth_call.
    let resolved = manager.getServiceLocation(id).call().await.context("getServiceLocation")?;
    let state = ServiceState::try_from(resolved.state)?;
    println!("{SERVICE} -> {} (epoch {}, state {state})", resolved.location, resolved.epoch);
    Ok(())
}
