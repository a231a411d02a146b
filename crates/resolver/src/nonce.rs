//! Nonces for a key that more than one process may send with.
//!
//! alloy's default nonce manager reads an account's transaction count once and counts up
//! locally from there. That breaks as soon as another process sends with the same key (a
//! service's manager daemon and the replicas it deployed on this machine both sign with
//! the manager key): every later transaction of the long-lived process then fails with
//! "nonce too low" until it restarts. Reading the pending count for every transaction
//! fixes that but hands two concurrent sends of one process the same nonce. This manager
//! does both: the chain's pending count, but never less than one past the last nonce this
//! process handed out in the last few seconds (a transaction is broadcast milliseconds
//! after its nonce is filled; a nonce whose transaction was never accepted must not leave
//! a gap that stalls every later one, so an old reservation gives way to the chain).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::network::Network;
use alloy::primitives::Address;
use alloy::providers::Provider;
use alloy::providers::fillers::NonceManager;
use alloy::transports::TransportResult;
use tokio::sync::Mutex;

/// How long a nonce this process handed out outranks the chain's pending count.
const RESERVATION: Duration = Duration::from_secs(5);

/// Pending count from the chain, kept above what this process just used.
#[derive(Clone, Debug, Default)]
pub(crate) struct SharedKeyNonces {
    next: Arc<Mutex<HashMap<Address, (u64, Instant)>>>,
}

#[async_trait::async_trait]
impl NonceManager for SharedKeyNonces {
    async fn get_next_nonce<P, N>(&self, provider: &P, address: Address) -> TransportResult<u64>
    where
        P: Provider<N>,
        N: Network,
    {
        // Held across the read so two sends of this process are ordered.
        let mut next = self.next.lock().await;
        let on_chain = provider.get_transaction_count(address).pending().await?;
        let reserved = next.get(&address).filter(|(_, at)| at.elapsed() < RESERVATION).map_or(0, |(n, _)| *n);
        let nonce = on_chain.max(reserved);
        next.insert(address, (nonce + 1, Instant::now()));
        Ok(nonce)
    }
}
