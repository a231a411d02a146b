//! Operator keys: the keys replicas publish the leader's location with. Each deployment
//! gets keys of its own, never the manager's: the app binary holds its key, and a key
//! that can only `updateLocation` cannot hand the service to anyone (`transferManager`)
//! or change its recovery info.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use br2k_resolver::RegistryClient;

use crate::error::{DeployError, Result};

/// The key kept in `path` (mode 0600), made and written there the first time, so that
/// later deployments reuse it.
///
/// # Errors
/// A key file that others can read, that holds no key, or that cannot be written.
pub fn load_or_create(path: &Path) -> Result<PrivateKeySigner> {
    match std::fs::metadata(path) {
        Ok(metadata) => {
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(DeployError::Invalid(format!(
                    "the operator key {} is readable by others (mode {mode:03o}): run `chmod 600 {}`",
                    path.display(),
                    path.display()
                )));
            }
            let text =
                std::fs::read_to_string(path).map_err(|e| DeployError::io(format!("read {}", path.display()), e))?;
            text.trim().parse().map_err(|_| {
                DeployError::Invalid(format!(
                    "{} holds no private key; remove it to have a new one made",
                    path.display()
                ))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKeySigner::random();
            br2k_oci::private_file::write(
                path,
                format!("{}\n", alloy::hex::encode_prefixed(key.to_bytes())).as_bytes(),
            )?;
            Ok(key)
        }
        Err(e) => Err(DeployError::io(format!("read {}", path.display()), e)),
    }
}

/// Makes `key` an operator of `service` (if it is not one yet) and keeps it funded for the
/// gas of publishing: below half of `funds` it is topped up to `funds` from the registry
/// client's signing key (the manager's). `funds` of 0 sends nothing.
///
/// # Errors
/// The registry's or the chain's errors.
pub async fn allow_and_fund(
    registry: &RegistryClient,
    service: &str,
    key: &PrivateKeySigner,
    funds: U256,
    progress: impl Fn(&str),
) -> Result<()> {
    let address = key.address();
    if !registry.operators(service).await?.contains(&address) {
        progress(&format!("allowing the replica key {address} to publish locations"));
        registry.set_operator(service, address, true).await?;
    }
    let chain = registry.chain();
    let balance = chain.balance(address).await?;
    if funds > U256::ZERO && balance < funds / U256::from(2) {
        let top_up = funds - balance;
        progress(&format!(
            "sending {} ETH to the replica key {address} for gas",
            alloy::primitives::utils::format_ether(top_up)
        ));
        chain.send_value(address, top_up).await?;
    }
    Ok(())
}
