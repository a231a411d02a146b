//! The outbox's state machine over the in-memory store and a real chain (anvil): a request
//! pays once however often it runs, nonces are reserved only with their stored
//! transaction, and a leader whose fence fails stores and sends nothing. The same state
//! machine over etcd, under leader kills, is tested through the runtime
//! (`crates/replication/tests/it/outbox.rs`).

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::{Provider, ProviderBuilder};
use br2k_outbox::{Chain, MemoryStore, Outbox, OutboxConfig, OutboxKeys, TxCall, TxError, TxRecord, TxStore};
use br2k_test_utils::Anvil;

const PREFIX: &str = "/br2k/pay/";

fn chain(anvil: &Anvil) -> Arc<Chain> {
    let mut config = OutboxConfig::new(anvil.endpoint(), anvil.key(5));
    config.settle_within = Duration::from_secs(10);
    Arc::new(Chain::new(config, OutboxKeys::new(PREFIX), None).expect("a valid outbox configuration"))
}

fn pay(to: Address, wei: u64) -> TxCall {
    TxCall { to, value: U256::from(wei), input: Bytes::new(), gas_limit: Some(21_000) }
}

async fn balance_and_nonce(anvil: &Anvil, who: Address, sender: Address) -> (U256, u64) {
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    (provider.get_balance(who).await.unwrap(), provider.get_transaction_count(sender).await.unwrap())
}

fn stored(store: &MemoryStore, index: u64, seq: u32) -> Option<TxRecord> {
    let key = OutboxKeys::new(PREFIX).tx(index, seq);
    store.records().get(&key).map(|bytes| serde_json::from_slice(bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_runs_again_gets_its_stored_transaction_back_and_pays_once() {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let (chain, store) = (chain(&anvil), Arc::new(MemoryStore::default()));
    let (to, sender) = (Address::repeat_byte(0x42), anvil.address(5));
    let (before, nonce_before) = balance_and_nonce(&anvil, to, sender).await;

    let first = Outbox::new(chain.clone(), store.clone(), 7).send(pay(to, 1_000)).await.expect("paid");
    assert!(first.success && !first.replayed);
    // A new leader (or a retry) runs the same request again: the same transaction comes back.
    let again = Outbox::new(chain.clone(), store.clone(), 7).send(pay(to, 1_000)).await.expect("settled");
    assert!(again.replayed, "{again:?}");
    assert_eq!((again.hash, again.nonce), (first.hash, first.nonce));
    let (after, nonce_after) = balance_and_nonce(&anvil, to, sender).await;
    assert_eq!(after - before, U256::from(1_000), "paid once");
    assert_eq!(nonce_after, nonce_before + 1, "one nonce spent");

    let record = stored(&store, 7, 0).expect("the transaction is stored under its request");
    assert_eq!(record.nonce, first.nonce);
    assert!(record.settled.is_some() && record.broadcast);
    let next = store.get(&OutboxKeys::new(PREFIX).next_nonce()).await.unwrap().unwrap();
    assert_eq!(String::from_utf8(next).unwrap(), (first.nonce + 1).to_string(), "the reservation is stored with it");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_take_consecutive_nonces_and_a_fenced_out_leader_stores_and_sends_nothing() {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let (chain, store) = (chain(&anvil), Arc::new(MemoryStore::default()));
    let (to, sender) = (Address::repeat_byte(0x43), anvil.address(5));
    let a = Outbox::new(chain.clone(), store.clone(), 1).send(pay(to, 10)).await.unwrap();
    let b = Outbox::new(chain.clone(), store.clone(), 2).send(pay(to, 20)).await.unwrap();
    assert_eq!(b.nonce, a.nonce + 1);

    // Another replica took over: this one's fence fails.
    store.lose_leadership();
    let stale = Outbox::new(chain.clone(), store.clone(), 3);
    let sent = stale.send(pay(to, 30)).await;
    assert!(matches!(sent, Err(TxError::LeadershipLost)), "{sent:?}");
    assert!(stale.leadership_lost());
    assert!(stored(&store, 3, 0).is_none(), "nothing stored for the stale leader's request");
    let (balance, nonce) = balance_and_nonce(&anvil, to, sender).await;
    assert_eq!((balance, nonce), (U256::from(30), b.nonce + 1), "nothing sent after the fence failed");
    assert!(chain.unsettled(store.as_ref()).await.unwrap().is_empty());
}
