//! script/Deploy.s.sol run by the real forge against a real anvil.

use std::process::Command;

use alloy::primitives::Address;
use br2k_bindings::ServiceRegistry;
use br2k_test_utils::{Anvil, foundry_binary, workspace_root};

use crate::registry::provider;

#[tokio::test]
async fn forge_script_broadcast_deploys_a_working_registry() {
    let anvil = Anvil::spawn().expect("anvil starts");
    let forge = foundry_binary("forge").expect("forge is installed");
    let key = anvil.key(0);

    // The key goes on the command line because that is how forge takes it; it is anvil's
    // public dev key 0, not a secret.
    let output = Command::new(forge)
        .current_dir(workspace_root())
        .env("BR2K_CLAIM_COOLDOWN", "42")
        .args(["script", "script/Deploy.s.sol", "--broadcast", "--json", "--rpc-url", &anvil.endpoint()])
        .args(["--private-key", &format!("{:#x}", key.to_bytes())])
        .output()
        .expect("forge runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "forge script failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));

    // forge --json prints one JSON object per line; the broadcast receipt carries the address.
    let address: Address = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find_map(|v| (v["status"] == "success").then(|| v["contract_address"].as_str()?.parse().ok()).flatten())
        .unwrap_or_else(|| panic!("no deployed contract address in forge's output:\n{stdout}"));

    let registry = ServiceRegistry::new(address, provider(&anvil, key));
    assert_eq!(registry.claimCooldown().call().await.unwrap(), 42, "BR2K_CLAIM_COOLDOWN reached the constructor");
    assert_eq!(registry.MAX_LOCATION_LENGTH().call().await.unwrap(), alloy::primitives::U256::from(256));
}
