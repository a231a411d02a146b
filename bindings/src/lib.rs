#![doc = include_str!("../README.md")]

mod state;

pub use state::{ServiceState, UnknownState};

/// The contract's ABI expanded by alloy's `sol!`. The generated items' documentation is
/// the contract's NatSpec in `contracts/interfaces/IServiceRegistry.sol`.
#[allow(missing_docs)]
mod generated {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        ServiceRegistry,
        "artifacts/ServiceRegistry.json"
    );
}

pub use generated::*;
