//! The payments example: a replicated service that moves value on chain.
//!
//! This step holds the token it moves: [`PaymentToken`], a minimal ERC-20 (its source is
//! `contracts/examples/PaymentToken.sol`, its committed artifact
//! `artifacts/PaymentToken.json`, kept true to the source by `bash tools/bindings.sh
//! --check`).

/// The token's ABI and bytecode expanded by alloy's `sol!`; the items' documentation is
/// the contract's NatSpec.
#[allow(missing_docs)]
mod generated {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        PaymentToken,
        "artifacts/PaymentToken.json"
    );
}

pub use generated::*;
