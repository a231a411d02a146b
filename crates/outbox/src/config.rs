//! How the outbox sends a service's transactions.

use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;

/// How the runtime sends a service's transactions.
#[derive(Clone)]
pub struct OutboxConfig {
    /// The chain's RPC endpoints (`http(s)://`), at least one: broadcasts go to all of
    /// them, reads to the first healthy one in this order.
    pub rpc_urls: Vec<String>,
    /// The service's transaction key. Use a key of its own: the outbox owns its nonces,
    /// and another sender with the same key would take them.
    pub signer: PrivateKeySigner,
    /// Blocks a transaction must be under before it counts as settled (1: mined).
    pub confirmations: u64,
    /// How long a transaction may stay unmined before it is replaced at the same nonce
    /// with higher fees.
    pub bump_after: Duration,
    /// The most a replacement may pay, as a multiple of the first version's fees. A
    /// transaction whose fees reached it is rebroadcast as it is, never bumped again: a
    /// fee spike (or a chain that mines nothing) cannot drain the service's key, and the
    /// request waits in doubt, shown in `/br2k/status`, until the chain takes it.
    pub max_fee_multiple: u32,
    /// How long one send waits for its receipt before the request is left in doubt (the
    /// runtime then tries again in the background). Keep it under the handler timeout.
    pub settle_within: Duration,
    /// Bound on one RPC request (to one endpoint).
    pub rpc_timeout: Duration,
    /// How many blocks after it settled a transaction is still watched for a reorg deeper
    /// than `confirmations` (a finality violation): past it, the chain is taken as final.
    pub finality_window: u64,
    /// How often the leader checks that settled transactions are still on chain.
    pub finality_check_every: Duration,
    /// The gas limit given to a call whose limit is estimated, in percent of the estimate.
    /// The estimate holds for the state it was made in; by the time the transaction runs,
    /// the state may differ (a token transfer to an account its owner emptied meanwhile
    /// pays 17,100 gas more to store a balance from zero: +50% of the transfer), and a
    /// transaction out of gas is mined reverted, its nonce spent. Only the gas used is paid.
    pub gas_limit_percent: u64,
}

impl std::fmt::Debug for OutboxConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxConfig")
            .field("rpc_urls", &self.rpc_urls.iter().map(|u| br2k_resolver::shown_endpoint(u)).collect::<Vec<_>>())
            .field("sender", &self.signer.address())
            .field("confirmations", &self.confirmations)
            .field("bump_after", &self.bump_after)
            .field("max_fee_multiple", &self.max_fee_multiple)
            .field("settle_within", &self.settle_within)
            .finish_non_exhaustive()
    }
}

impl OutboxConfig {
    /// An outbox on `rpc_url` signing with `signer`: settled at 1 confirmation, bumped
    /// after 15 s unmined up to 4 times the first fees, in doubt after 20 s, watched for
    /// deep reorgs for 64 blocks (two Ethereum epochs, after which it is finalized),
    /// estimated gas limits given 60% more room.
    /// Push more endpoints onto `rpc_urls` to send through several.
    pub fn new(rpc_url: impl Into<String>, signer: PrivateKeySigner) -> Self {
        Self {
            rpc_urls: vec![rpc_url.into()],
            signer,
            confirmations: 1,
            bump_after: Duration::from_secs(15),
            max_fee_multiple: 4,
            settle_within: Duration::from_secs(20),
            rpc_timeout: Duration::from_secs(10),
            finality_window: 64,
            finality_check_every: Duration::from_secs(5),
            gas_limit_percent: 160,
        }
    }
}

#[cfg(test)]
mod tests {
    use alloy::signers::local::PrivateKeySigner;

    use super::*;

    #[test]
    fn the_outbox_config_never_prints_its_endpoints_key() {
        let config = OutboxConfig::new("https://eth.example.io/v3/0123456789abcdef", PrivateKeySigner::random());
        let printed = format!("{config:?}");
        assert!(printed.contains("https://eth.example.io") && !printed.contains("0123456789abcdef"), "{printed}");
    }
}
