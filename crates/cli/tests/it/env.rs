//! A temporary project directory and an anvil for `br2k` to run against.

use std::path::Path;

use alloy::signers::local::PrivateKeySigner;
use br2k_test_utils::Anvil;
use snapbox::cmd::Command;
use tempfile::TempDir;

/// The address `br2k service-registry deploy` gets on a fresh anvil (account 0, nonce 0).
pub(crate) const REGISTRY: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";

/// An anvil and a working directory (where `deployments/` is written).
pub(crate) struct TestEnv {
    pub(crate) anvil: Anvil,
    pub(crate) dir: TempDir,
}

impl TestEnv {
    pub(crate) fn new() -> Self {
        let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
        Self { anvil, dir: tempfile::tempdir().unwrap() }
    }

    /// A deployed registry and a registered `logserver` with account 1 as its operator.
    pub(crate) fn with_service() -> Self {
        let env = Self::new();
        env.br2k(Some(0)).args(["service-registry", "deploy"]).assert().success();
        env.br2k(Some(0)).args(["service", "register", "logserver"]).assert().success();
        env.br2k(Some(0)).args(["service", "operator", "add", "logserver", &env.address(1)]).assert().success();
        env
    }

    pub(crate) fn address(&self, index: usize) -> String {
        self.anvil.address(index).to_string()
    }

    /// `br2k` in the project directory, on this anvil, signing with account `key` (given
    /// through ETH_PRIVATE_KEY, as a user would), with none of the caller's br2k or
    /// Foundry environment.
    pub(crate) fn br2k(&self, key: Option<usize>) -> Command {
        let command = br2k_in(self.dir.path()).env("ETH_RPC_URL", self.anvil.endpoint());
        match key {
            Some(index) => command.env("ETH_PRIVATE_KEY", private_key_hex(&self.anvil.key(index))),
            None => command,
        }
    }
}

/// `br2k` in `dir` with a clean environment.
pub(crate) fn br2k_in(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_br2k")).current_dir(dir).env("NO_COLOR", "1");
    for variable in [
        "ETH_RPC_URL",
        "ETH_PRIVATE_KEY",
        "ETH_KEYSTORE",
        "ETH_PASSWORD_FILE",
        "BR2K_REGISTRY",
        "BR2K_DEPLOYMENTS",
        "RUST_LOG",
    ] {
        command = command.env_remove(variable);
    }
    command
}

pub(crate) fn private_key_hex(key: &PrivateKeySigner) -> String {
    format!("0x{}", alloy::hex::encode(key.to_bytes()))
}
