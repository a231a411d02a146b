//! The transaction outbox on a real anvil: a payment (`/pay`, an only-once route sending
//! a transfer through the outbox) is sent at most once whatever happens to the leader,
//! and every client retry with the same key gets the one answer.

use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use br2k_replication::outbox::TxRecord;
use br2k_replication::{OutboxConfig, TxStep};
use br2k_test_utils::{Anvil, Relay};

use crate::harness::{Cluster, PAYMENT_WEI, SERVICE};

/// The anvil key the service sends from (the registry tests use 0-3).
const SERVICE_KEY: usize = 5;

/// Three replicas paying through an outbox on `anvil` (`tweak` adjusts its settings).
async fn paying_cluster(anvil: &Anvil, tweak: impl FnOnce(&mut OutboxConfig)) -> Cluster {
    let mut outbox = OutboxConfig::new(anvil.endpoint(), anvil.key(SERVICE_KEY));
    outbox.settle_within = Duration::from_secs(4);
    outbox.rpc_timeout = Duration::from_secs(2);
    tweak(&mut outbox);
    let mut cluster = Cluster::new(false).await;
    cluster.outbox = Some(outbox);
    cluster.with_replicas(br2k_replication::SnapshotPolicy::disabled()).await
}

fn block_time_anvil(seconds: u64) -> Anvil {
    Anvil::builder()
        .arg("--block-time")
        .arg(seconds.to_string())
        .spawn()
        .expect("anvil starts (run `bash tools/setup.sh` if it is missing)")
}

/// An anvil that mines nothing until told (`evm_mine`): transactions wait in its pool.
fn unmined_anvil() -> Anvil {
    Anvil::builder().arg("--no-mining").spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)")
}

/// What the chain says: the balance of `who`, and how many transactions `from` sent.
async fn on_chain(anvil: &Anvil, who: Address, from: Address) -> (U256, u64) {
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    (provider.get_balance(who).await.unwrap(), provider.get_transaction_count(from).await.unwrap())
}

/// Sends `/pay` for `to` with `key` to whichever replica leads until one answers with
/// something other than 503 (in doubt, or not the leader); returns status and body.
async fn pay_until_answered(c: &Cluster, to: Address, key: &str, within: Duration) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + within;
    loop {
        for replica in &c.replicas {
            let sent = c
                .http
                .post(format!("{}/pay", replica.url))
                .header("Idempotency-Key", key)
                .body(to.to_string())
                .send()
                .await;
            if let Ok(answer) = sent {
                let status = answer.status().as_u16();
                if status != 503 {
                    return (status, answer.json().await.unwrap_or_default());
                }
            }
        }
        assert!(Instant::now() < deadline, "no answer to the payment within {within:?}: {:?}", c.statuses());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The outbox records of the request at `index`.
async fn records(c: &Cluster, index: u64) -> Vec<TxRecord> {
    let mut client = c.etcd_client(c.healthy_member()).await;
    let options = etcd_client::GetOptions::new().with_prefix();
    let answer = client.get(format!("/br2k/{SERVICE}/outbox/tx/{index:020}/"), Some(options)).await.unwrap();
    answer.kvs().iter().map(|kv| serde_json::from_slice(kv.value()).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_is_sent_once_and_a_retry_gets_the_same_answer() {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let c = paying_cluster(&anvil, |_| {}).await;
    let service = anvil.address(SERVICE_KEY);
    let to = PrivateKeySigner::random().address();
    let (status, body) = pay_until_answered(&c, to, "pay-1", Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replayed"], false);
    let (again, replayed) = pay_until_answered(&c, to, "pay-1", Duration::from_secs(30)).await;
    assert_eq!((again, &replayed["hash"]), (200, &body["hash"]), "the retry gets the same transaction");
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 1));

    // Another key is another payment, at the next nonce.
    let (status, second) = pay_until_answered(&c, to, "pay-2", Duration::from_secs(30)).await;
    assert_eq!((status, second["nonce"].as_u64()), (200, Some(1)));
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(2 * PAYMENT_WEI), 2));
}

/// Stops the leader's send of a payment at `step`, then kills the leader (its task and
/// its etcd member); the client retries with its key until answered.
async fn leader_killed_at(step: TxStep) {
    let anvil = block_time_anvil(1);
    let mut c = paying_cluster(&anvil, |_| {}).await;
    let service = anvil.address(SERVICE_KEY);
    let to = PrivateKeySigner::random().address();
    let l = c.leader(None).await;
    c.replicas[l].tx_interrupt.arm(step);
    let first = c.send_in_background(l, "/pay", to, "k");
    c.replicas[l].tx_interrupt.reached.notified().await;
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    if let Ok(answer) = first.await.unwrap() {
        assert_eq!(answer.status(), 503, "a request whose leader died is never acknowledged");
    }
    let (status, body) = pay_until_answered(&c, to, "k", Duration::from_secs(60)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        on_chain(&anvil, to, service).await,
        (U256::from(PAYMENT_WEI), 1),
        "paid once, and the service key sent one transaction"
    );
    let index = c.replicas[c.leader(Some(l)).await].status().ssi;
    let stored = records(&c, index).await;
    assert_eq!(stored.len(), 1, "one transaction for the request");
    assert_eq!(stored[0].nonce, 0);
    assert!(stored[0].settled.as_ref().is_some_and(|s| s.success));
    // The dead leader comes back and agrees.
    c.etcd.restart(l).unwrap();
    c.restart_replica(l).await;
    let (again, replayed) = pay_until_answered(&c, to, "k", Duration::from_secs(30)).await;
    assert_eq!((again, &replayed["hash"]), (200, &body["hash"]));
    assert_eq!(on_chain(&anvil, to, service).await.0, U256::from(PAYMENT_WEI));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_after_storing_before_broadcasting_pays_once() {
    leader_killed_at(TxStep::Stored).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_after_broadcasting_before_the_receipt_pays_once() {
    leader_killed_at(TxStep::Broadcast).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_killed_after_the_receipt_before_recording_pays_once() {
    leader_killed_at(TxStep::Settled).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_that_meets_a_node_error_on_a_broadcast_payment_keeps_it_in_doubt_and_its_nonce() {
    let anvil = unmined_anvil();
    let mut c = paying_cluster(&anvil, |_| {}).await;
    let service = anvil.address(SERVICE_KEY);
    let (to, other) = (PrivateKeySigner::random().address(), PrivateKeySigner::random().address());
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let l = c.leader(None).await;
    c.replicas[l].tx_interrupt.arm(TxStep::Broadcast);
    let first = c.send_in_background(l, "/pay", to, "k1");
    c.replicas[l].tx_interrupt.reached.notified().await;
    // Broadcast, in the pool. From now on the node refuses it: the service's account
    // cannot pay for it. Then its leader dies.
    let funds = provider.get_balance(service).await.unwrap();
    let _: serde_json::Value = provider.raw_request("anvil_setBalance".into(), (service, U256::ZERO)).await.unwrap();
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    if let Ok(answer) = first.await.unwrap() {
        assert_eq!(answer.status(), 503);
    }
    // The next leader sends it again and the node answers "insufficient funds": a pool may
    // still hold it, so it stays in doubt, its nonce kept.
    let l2 = c.leader(Some(l)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.replicas[l2].status().in_doubt.contains(&1) {
        assert!(Instant::now() < deadline, "the payment was not left in doubt: {:?}", records(&c, 1).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await; // the settler meets the error again
    let stored = records(&c, 1).await.remove(0);
    assert!(stored.broadcast && stored.refused.is_none(), "a broadcast payment was refused: {stored:?}");
    // Funds again, and another payment: it takes the next nonce, never the kept one.
    let _: serde_json::Value = provider.raw_request("anvil_setBalance".into(), (service, funds)).await.unwrap();
    let second = c.send_in_background(l2, "/pay", other, "k2");
    let mining = tokio::spawn({
        let provider = provider.clone();
        async move {
            loop {
                let _: Result<serde_json::Value, _> = provider.raw_request("evm_mine".into(), ()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let (status, paid) = pay_until_answered(&c, to, "k1", Duration::from_secs(60)).await;
    assert_eq!((status, paid["nonce"].as_u64()), (200, Some(0)), "{paid}");
    let answer = second.await.unwrap().unwrap();
    let (status, other_paid) = (answer.status(), answer.json::<serde_json::Value>().await.unwrap());
    assert_eq!((status.as_u16(), other_paid["nonce"].as_u64()), (200, Some(1)), "{other_paid}");
    mining.abort();
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 2), "each paid once, one nonce each");
    assert_eq!(on_chain(&anvil, other, service).await.0, U256::from(PAYMENT_WEI));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_leader_woken_after_a_new_one_took_over_cannot_pay_twice() {
    let anvil = block_time_anvil(1);
    let mut c = paying_cluster(&anvil, |_| {}).await;
    let service = anvil.address(SERVICE_KEY);
    let (to, other) = (PrivateKeySigner::random().address(), PrivateKeySigner::random().address());
    let l = c.leader(None).await;
    // The leader stores the payment, then is cut off (its etcd member frozen) before it
    // broadcasts.
    c.replicas[l].tx_interrupt.arm(TxStep::Stored);
    let stale = c.send_in_background(l, "/pay", to, "k");
    c.replicas[l].tx_interrupt.reached.notified().await;
    c.etcd.pause(l).unwrap();
    // Another leader finishes it, and pays someone else meanwhile.
    let (status, paid) = pay_until_answered(&c, to, "k", Duration::from_secs(60)).await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(pay_until_answered(&c, other, "k2", Duration::from_secs(30)).await.0, 200);
    // The stale leader wakes and goes on with what it stored: it broadcasts it, and can
    // neither record nor sign anything (its writes are fenced).
    c.etcd.resume(l).unwrap();
    c.replicas[l].tx_interrupt.release.notify_one();
    if let Ok(answer) = stale.await.unwrap() {
        assert_ne!(answer.status(), 200, "the stale leader acknowledges nothing");
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // blocks for anything it sent to be mined
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 2), "paid once; two payments in all");
    assert_eq!(on_chain(&anvil, other, service).await.0, U256::from(PAYMENT_WEI));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lingering_transaction_is_replaced_at_the_same_nonce_up_to_the_fee_cap_and_settles_once() {
    // Nothing is mined until the test says so.
    let anvil = unmined_anvil();
    let c = paying_cluster(&anvil, |outbox| {
        outbox.bump_after = Duration::from_secs(1);
        outbox.max_fee_multiple = 2;
        outbox.settle_within = Duration::from_secs(30);
    })
    .await;
    let service = anvil.address(SERVICE_KEY);
    let to = PrivateKeySigner::random().address();
    let l = c.leader(None).await;
    let paying = c.send_in_background(l, "/pay", to, "k");
    let deadline = Instant::now() + Duration::from_secs(20);
    while records(&c, 1).await.first().is_none_or(|r| r.attempts.len() < 2) {
        assert!(Instant::now() < deadline, "no replacement within 20 s: {:?}", records(&c, 1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A quarter more each second, up to twice the first fees: 1, 1.25, 1.56, 1.95 times;
    // a fifth version could not pay a tenth more than the fourth under the cap. Six more
    // seconds (six more chances to bump) add none.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let capped = records(&c, 1).await.remove(0);
    assert_eq!(capped.attempts.len(), 4, "bumped until the cap, then rebroadcast as it is: {capped:?}");
    let cap = capped.attempts[0].max_fee_per_gas * 2;
    assert!(capped.attempts.iter().all(|a| a.max_fee_per_gas <= cap), "no version pays over the cap: {capped:?}");
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let _: serde_json::Value = provider.raw_request("evm_mine".into(), ()).await.unwrap();
    let answer = paying.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    let stored = records(&c, 1).await.remove(0);
    let (first, latest) = (&stored.attempts[0], stored.attempts.last().unwrap());
    assert!(latest.max_fee_per_gas > first.max_fee_per_gas, "the replacement pays more: {stored:?}");
    assert!(stored.attempts.iter().all(|a| a.hash != first.hash || a == first), "each version is its own transaction");
    let settled = stored.settled.expect("settled");
    assert!(stored.attempts.iter().any(|a| a.hash == settled.hash));
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 1), "one of the versions, once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payment_whose_block_is_reorganised_away_before_it_is_deep_enough_is_sent_again_and_paid_once() {
    let anvil = unmined_anvil();
    // Shallow for longer than the outbox waits before it believes a stranger spent the
    // nonce, and than it waits before it replaces a lingering transaction: neither may
    // happen to a transaction of ours that was mined.
    let c = paying_cluster(&anvil, |outbox| {
        outbox.confirmations = 3;
        outbox.settle_within = Duration::from_secs(60);
        outbox.bump_after = Duration::from_secs(3);
    })
    .await;
    let service = anvil.address(SERVICE_KEY);
    let to = PrivateKeySigner::random().address();
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let mine = async |blocks: u64| {
        for _ in 0..blocks {
            let _: serde_json::Value = provider.raw_request("evm_mine".into(), ()).await.unwrap();
        }
    };
    let l = c.leader(None).await;
    let paying = c.send_in_background(l, "/pay", to, "reorg");
    // Stored, then broadcast: in the pool.
    let deadline = Instant::now() + Duration::from_secs(20);
    let hash = loop {
        if let Some(record) = records(&c, 1).await.first() {
            let hash = record.attempts[0].hash;
            if provider.get_transaction_by_hash(hash).await.unwrap().is_some() {
                break hash;
            }
        }
        assert!(Instant::now() < deadline, "the payment never reached the pool");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Mined one block deep, then that block is reorganised away (replaced by an empty one).
    mine(1).await;
    assert!(provider.get_transaction_receipt(hash).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _: serde_json::Value = provider.raw_request("anvil_reorg".into(), (1u64, Vec::<()>::new())).await.unwrap();
    assert!(provider.get_transaction_receipt(hash).await.unwrap().is_none(), "the reorg dropped it");
    assert_eq!(on_chain(&anvil, to, service).await, (U256::ZERO, 0));
    // The outbox sends the same stored transaction again; three blocks settle it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while provider.get_transaction_by_hash(hash).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the dropped transaction was not broadcast again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mine(3).await;
    let answer = paying.await.unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["hash"], serde_json::json!(hash), "the same transaction, not a new one: {body}");
    let (again, replayed) = pay_until_answered(&c, to, "reorg", Duration::from_secs(10)).await;
    assert_eq!((again, &replayed["hash"]), (200, &body["hash"]), "answered once: the retry gets that answer");
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 1), "paid once");
    let stored = records(&c, 1).await.remove(0);
    assert_eq!(stored.attempts.len(), 1, "no replacement was signed: {stored:?}");
}

/// A relay to anvil on loopback: the chain unreachable, for real, from the replicas' side.
fn relay_to(anvil: &Anvil) -> Relay {
    Relay::start(std::net::Ipv4Addr::LOCALHOST.into(), &anvil.endpoint()).expect("a relay binds loopback")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chain_unreachable_leaves_a_payment_in_doubt_until_it_answers_again() {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let relay = relay_to(&anvil);
    let service = anvil.address(SERVICE_KEY);
    let mut outbox = OutboxConfig::new(relay.url().to_owned(), anvil.key(SERVICE_KEY));
    outbox.settle_within = Duration::from_secs(3);
    outbox.rpc_timeout = Duration::from_secs(1);
    let mut c = Cluster::new(false).await;
    c.outbox = Some(outbox);
    let c = c.with_replicas(br2k_replication::SnapshotPolicy::disabled()).await;
    let l = c.leader(None).await;

    // Unreachable before anything is sent: in doubt, listed, answered 503 meanwhile.
    let to = PrivateKeySigner::random().address();
    relay.cut();
    let answer = c.post(l, "/pay", &to.to_string(), Some("a")).await;
    assert_eq!(answer.status(), 503, "{}", answer.text().await.unwrap());
    assert_eq!(c.replicas[l].status().in_doubt, vec![1]);
    assert_eq!(c.post(l, "/pay", &to.to_string(), Some("a")).await.status(), 503, "a retry too, while in doubt");
    relay.mend();
    let (status, body) = pay_until_answered(&c, to, "a", Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{body}");
    assert!(c.replicas[l].status().in_doubt.is_empty());

    // Unreachable after the broadcast: the receipt cannot be read; settled once it can.
    let other = PrivateKeySigner::random().address();
    c.replicas[l].tx_interrupt.arm(TxStep::Broadcast);
    let paying = c.send_in_background(l, "/pay", other, "b");
    c.replicas[l].tx_interrupt.reached.notified().await;
    relay.cut();
    c.replicas[l].tx_interrupt.release.notify_one();
    assert_eq!(paying.await.unwrap().unwrap().status(), 503, "in doubt, not failed");
    relay.mend();
    let (status, body) = pay_until_answered(&c, other, "b", Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 2));
    assert_eq!(on_chain(&anvil, other, service).await.0, U256::from(PAYMENT_WEI));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_own_transaction_is_recorded_only_as_the_chain_shows_it() {
    use alloy::network::{EthereumWallet, TransactionBuilder};
    use alloy::sol_types::{SolCall, SolEvent};
    use br2k_bindings::ServiceRegistry;

    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let c = paying_cluster(&anvil, |_| {}).await;
    // The client's own transaction: registering a service (it emits ServiceRegistered).
    let client = anvil.key(7);
    let chain = br2k_resolver::Chain::connect(&anvil.endpoint(), Some(client.clone()), crate::harness::timeouts())
        .await
        .unwrap();
    let registry = chain.deploy_registry(60).await.unwrap().address;
    let body = br2k_bindings::IServiceRegistry::Body {
        deployer: client.address(),
        context: "local".into(),
        replicas: 3,
        containerRegistry: String::new(),
        image: String::new(),
        imageDigest: Default::default(),
    };
    let registered = chain.registry(registry).await.unwrap().register("client-service", body.clone()).await.unwrap();
    let event = ServiceRegistry::ServiceRegistered::SIGNATURE_HASH;
    let ask = |hash: alloy::primitives::B256, to: Address, event: Option<alloy::primitives::B256>| {
        serde_json::json!({ "hash": hash, "to": to, "event": event }).to_string()
    };
    let l = c.leader(None).await;
    let recorded = c.post(l, "/deposit", &ask(registered.hash, registry, Some(event)), Some("d1")).await;
    assert_eq!(recorded.status(), 201);
    let recorded: serde_json::Value = recorded.json().await.unwrap();
    assert_eq!(recorded["from"], serde_json::json!(client.address()));
    assert_eq!(recorded["logs"], 1);

    // Each refusal says why, with a status telling "never" (422) from "not yet" (409).
    let refused = async |body: String, key: &str, status: u16, why: &str| {
        let answer = c.post(l, "/deposit", &body, Some(key)).await;
        let (got, text) = (answer.status().as_u16(), answer.text().await.unwrap());
        assert!(got == status && text.contains(why), "{got} {text}");
    };
    refused(ask(registered.hash, anvil.address(9), None), "d2", 422, "not 0x").await;
    let other_event = ServiceRegistry::NewLocation::SIGNATURE_HASH;
    refused(ask(registered.hash, registry, Some(other_event)), "d3", 422, "emitted no event").await;
    refused(ask(alloy::primitives::B256::repeat_byte(7), registry, None), "d4", 409, "not mined yet").await;

    // A transaction that reverted (the name is taken) is never recorded.
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(client.clone()))
        .connect_http(anvil.endpoint().parse().unwrap());
    let again = ServiceRegistry::registerCall { name: "client-service".into(), body }.abi_encode();
    let request =
        alloy::rpc::types::TransactionRequest::default().with_to(registry).with_input(again).with_gas_limit(500_000);
    let reverted = provider.send_transaction(request).await.unwrap().get_receipt().await.unwrap();
    assert!(!reverted.status());
    refused(ask(reverted.transaction_hash, registry, None), "d5", 422, "reverted").await;
    // Only the verified deposit has an effect, applied by every replica from its record
    // (the others are recorded as Fail and change nothing).
    let from = format!("deposit:{}", client.address()).to_lowercase();
    let journals: Vec<_> = c.replicas.iter().map(|r| r.state.entries()).collect();
    c.converged(&[(1, journals[l][0].1.clone())]).await;
    assert_eq!(journals[l][0].1.to_lowercase(), from);
}

/// Sends `/pay-recorded` (a payment whose effect every replica applies from its record)
/// for `to` with `key` until answered.
async fn pay_recorded(c: &Cluster, to: Address, key: &str) -> (u16, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for replica in &c.replicas {
            let sent = c
                .http
                .post(format!("{}/pay-recorded", replica.url))
                .header("Idempotency-Key", key)
                .body(to.to_string())
                .send()
                .await;
            if let Ok(answer) = sent
                && answer.status() != 503
            {
                return (answer.status().as_u16(), answer.json().await.unwrap_or_default());
            }
        }
        assert!(Instant::now() < deadline, "no answer to the payment: {:?}", c.statuses());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_recorded_payments_effect_is_applied_by_every_replica_in_log_order_even_across_a_dead_leader() {
    let anvil = block_time_anvil(1);
    let mut c = paying_cluster(&anvil, |_| {}).await;
    let service = anvil.address(SERVICE_KEY);
    let (first, second) = (PrivateKeySigner::random().address(), PrivateKeySigner::random().address());
    assert_eq!(pay_recorded(&c, first, "p1").await.0, 200);
    assert_eq!(c.post_to_leader("/append", "after", Some("a1")).await.status(), 200);
    let paid = |to: Address| format!("paid:{to}");
    c.converged(&[(1, paid(first)), (2, "after".into())]).await;

    // The leader dies after broadcasting the next payment: the new leader settles it
    // before anything else, then every replica applies it once, before what follows.
    let l = c.leader(None).await;
    c.replicas[l].tx_interrupt.arm(TxStep::Broadcast);
    let dying = c.send_in_background(l, "/pay-recorded", second, "p2");
    c.replicas[l].tx_interrupt.reached.notified().await;
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    let _ = dying.await;
    let (status, body) = pay_recorded(&c, second, "p2").await;
    assert_eq!(status, 200, "{body}");
    let new_leader = c.leader(Some(l)).await;
    assert_eq!(c.post(new_leader, "/append", "later", Some("a2")).await.status(), 200);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let expected = [(1, paid(first)), (2, "after".into()), (3, paid(second)), (4, "later".into())];
    c.converged_on(&survivors, &expected).await;
    c.etcd.restart(l).unwrap();
    c.restart_replica(l).await;
    c.converged(&expected).await;
    assert_eq!(on_chain(&anvil, second, service).await, (U256::from(PAYMENT_WEI), 2), "each paid once");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_payments_each_pay_once_at_consecutive_nonces() {
    let anvil = block_time_anvil(1);
    let c = paying_cluster(&anvil, |outbox| outbox.settle_within = Duration::from_secs(20)).await;
    let service = anvil.address(SERVICE_KEY);
    let recipients: Vec<Address> = (0..12).map(|_| PrivateKeySigner::random().address()).collect();
    let c = std::sync::Arc::new(c);
    let payments: Vec<_> = recipients
        .iter()
        .enumerate()
        .map(|(n, &to)| {
            let c = c.clone();
            tokio::spawn(async move { pay_until_answered(&c, to, &format!("c{n}"), Duration::from_secs(60)).await })
        })
        .collect();
    let mut nonces = Vec::new();
    for payment in payments {
        let (status, body) = payment.await.unwrap();
        assert_eq!(status, 200, "{body}");
        nonces.push(body["nonce"].as_u64().unwrap());
    }
    nonces.sort_unstable();
    assert_eq!(nonces, (0..12).collect::<Vec<u64>>(), "no nonce twice, none skipped");
    for &to in &recipients {
        assert_eq!(on_chain(&anvil, to, service).await.0, U256::from(PAYMENT_WEI));
    }
    assert_eq!(on_chain(&anvil, recipients[0], service).await.1, 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_payments_unbroadcast_nonce_never_blocks_an_earlier_one() {
    let anvil = block_time_anvil(1);
    // Long enough that waiting out a settle before filling the gap shows (the testbed's
    // reorgs under leader kills held a payout 30 s behind one).
    let mut c = paying_cluster(&anvil, |outbox| outbox.settle_within = Duration::from_secs(20)).await;
    let service = anvil.address(SERVICE_KEY);
    let (first, second) = (PrivateKeySigner::random().address(), PrivateKeySigner::random().address());
    let l = c.leader(None).await;
    // An append (index 1) holds the pipeline and a second one (index 2) waits to be logged
    // with its outcome, so that both payouts queue meanwhile and are logged and processed
    // as one group, side by side: the first (index 3) stops before reserving a nonce, the
    // second (index 4) after storing its transaction at nonce 0. The leader then dies:
    // nonce 0 is reserved for the later request and was never broadcast.
    c.replicas[l].interrupt.arm(br2k_replication::Step::BeforeExecution);
    c.replicas[l].tx_interrupt.arm_at(TxStep::Reserving, 3);
    c.replicas[l].tx_interrupt.arm_at(TxStep::Stored, 4);
    let holding = c.send_in_background(l, "/append", "hold", "h");
    c.replicas[l].interrupt.reached.notified().await;
    let waiting = c.send_in_background(l, "/append", "wait", "w");
    c.eventually_queued(l, 2).await;
    let a = c.send_in_background(l, "/pay-recorded", first, "a");
    let b = c.send_in_background(l, "/pay-recorded", second, "b");
    c.eventually_queued(l, 4).await;
    c.replicas[l].interrupt.release.notify_one();
    c.replicas[l].tx_interrupt.reached.notified().await;
    c.replicas[l].tx_interrupt.reached.notified().await;
    assert_eq!(records(&c, 4).await[0].nonce, 0, "the later payout holds nonce 0");
    assert!(records(&c, 3).await.is_empty(), "the earlier one reserved nothing");
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    for request in [holding, waiting, a, b] {
        let _ = request.await;
    }
    // The new leader settles the earlier payout first; it can only be mined once the
    // later one's stored transaction fills nonce 0, which the new leader broadcasts before
    // it waits for the earlier one, not after a whole settle_within.
    let killed = Instant::now();
    assert_eq!(pay_recorded(&c, first, "a").await.0, 200);
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "the earlier payout waited {took:?} behind the gap");
    assert_eq!(pay_recorded(&c, second, "b").await.0, 200);
    assert_eq!(on_chain(&anvil, first, service).await, (U256::from(PAYMENT_WEI), 2));
    assert_eq!(on_chain(&anvil, second, service).await.0, U256::from(PAYMENT_WEI));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nonce_taken_by_another_sender_of_the_key_is_refused_only_once_that_has_held() {
    // Nothing is mined until the test says so: the outbox's transaction waits in the pool
    // while another process with the service's key replaces it at the same nonce.
    let anvil = unmined_anvil();
    let c = paying_cluster(&anvil, |outbox| {
        outbox.bump_after = Duration::from_secs(60);
        outbox.settle_within = Duration::from_secs(30);
    })
    .await;
    let service = anvil.address(SERVICE_KEY);
    let to = PrivateKeySigner::random().address();
    let l = c.leader(None).await;
    let paying = c.send_in_background(l, "/pay", to, "k");
    let deadline = Instant::now() + Duration::from_secs(20);
    let ours = loop {
        if let Some(record) = records(&c, 1).await.pop() {
            break record;
        }
        assert!(Instant::now() < deadline, "the payment was not stored within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Another sender with the same key: a transfer to someone else at the same nonce,
    // paying more, so the pool takes it instead; then a block.
    let stranger = ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(anvil.key(SERVICE_KEY)))
        .connect_http(anvil.endpoint().parse().unwrap());
    let first = &ours.attempts[0];
    let theirs = alloy::rpc::types::TransactionRequest::default()
        .to(PrivateKeySigner::random().address())
        .value(U256::from(1))
        .nonce(ours.nonce)
        .gas_limit(21_000)
        .max_fee_per_gas(first.max_fee_per_gas * 2)
        .max_priority_fee_per_gas(first.max_priority_fee_per_gas * 2);
    let pending = alloy::providers::Provider::send_transaction(&stranger, theirs).await.unwrap();
    let mined_at = Instant::now();
    let _: serde_json::Value = stranger.raw_request("evm_mine".into(), ()).await.unwrap();
    pending.get_receipt().await.unwrap();
    let answer = paying.await.unwrap().unwrap();
    let waited = mined_at.elapsed();
    assert_eq!(answer.status(), 502, "refused: the nonce is gone");
    let text = answer.text().await.unwrap();
    assert!(text.contains("another process"), "{text}");
    assert!(waited >= Duration::from_secs(3), "believed only after it held for 3 s, not at once: {waited:?}");
    assert_eq!(on_chain(&anvil, to, service).await, (U256::ZERO, 1), "not paid; the stranger's transaction only");
}

/// Replica `i`'s `/br2k/status`, as served (with the outbox's endpoints and checks).
async fn served_status(c: &Cluster, i: usize) -> br2k_replication::Status {
    c.http.get(format!("{}/br2k/status", c.replicas[i].url)).send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reorg_deeper_than_the_confirmations_is_caught_counted_shown_and_the_payment_put_back_on_chain() {
    use alloy::primitives::B256;
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let c = paying_cluster(&anvil, |outbox| outbox.finality_check_every = Duration::from_millis(300)).await;
    let service = anvil.address(SERVICE_KEY);
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let l = c.leader(None).await;
    let to = PrivateKeySigner::random().address();
    let (status, body) = pay_until_answered(&c, to, "deep", Duration::from_secs(20)).await;
    assert_eq!(status, 200, "{body}");
    let hash: B256 = serde_json::from_value(body["hash"].clone()).unwrap();
    let block = provider.get_transaction_receipt(hash).await.unwrap().unwrap().block_number.unwrap();

    // Two blocks over it (three deep, confirmations 1), then those three blocks are
    // replaced by three empty ones: the recorded payment is gone from the chain.
    for _ in 0..2 {
        let _: serde_json::Value = provider.raw_request("evm_mine".into(), ()).await.unwrap();
    }
    let _: serde_json::Value = provider.raw_request("anvil_reorg".into(), (3u64, Vec::<()>::new())).await.unwrap();
    assert!(provider.get_transaction_receipt(hash).await.unwrap().is_none(), "the reorg dropped it");
    assert_eq!(on_chain(&anvil, to, service).await, (U256::ZERO, 0));

    // Found, shown with its request and hash, and broadcast again until it is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let violation = loop {
        let outbox = served_status(&c, l).await.outbox.expect("the status shows the outbox");
        if let Some(v) = outbox.finality_violations.iter().find(|v| v.back_in_block.is_some()) {
            assert_eq!(outbox.finality_violations_total, 1, "{outbox:?}");
            break v.clone();
        }
        assert!(Instant::now() < deadline, "the violation was not caught and mended: {outbox:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (violation.index, violation.seq, violation.nonce, violation.hash, violation.block),
        (1, 0, 0, hash, block)
    );
    let again = provider.get_transaction_receipt(hash).await.unwrap().expect("the same transaction is back on chain");
    assert_eq!(violation.back_in_block, again.block_number);
    let metrics = crate::metrics::scrape(&c, l).await;
    assert_eq!(crate::metrics::value(&metrics, "br2k_outbox_finality_violations_total", &[]), 1.0);
    assert_eq!(crate::metrics::value(&metrics, "br2k_outbox_finality_violations_open", &[]), 0.0);
    // Paid once, by the transaction the request was answered with; a retry still gets it.
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 1));
    let (status, replayed) = pay_until_answered(&c, to, "deep", Duration::from_secs(10)).await;
    assert_eq!((status, &replayed["hash"]), (200, &body["hash"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn with_three_endpoints_one_cut_mid_run_nothing_is_lost_and_the_status_says_which() {
    let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
    let relays = [relay_to(&anvil), relay_to(&anvil), relay_to(&anvil)];
    let c = paying_cluster(&anvil, |outbox| {
        outbox.rpc_urls = relays.iter().map(|relay| relay.url().to_owned()).collect();
        outbox.rpc_timeout = Duration::from_secs(1);
    })
    .await;
    let service = anvil.address(SERVICE_KEY);
    let l = c.leader(None).await;
    let payees: Vec<Address> = (0..12).map(|_| PrivateKeySigner::random().address()).collect();
    let mut hashes = std::collections::BTreeSet::new();
    for (n, to) in payees.iter().enumerate() {
        if n == 4 {
            relays[0].cut(); // the endpoint reads prefer
        }
        let (status, body) = pay_until_answered(&c, *to, &format!("p{n}"), Duration::from_secs(30)).await;
        assert_eq!(status, 200, "payment {n}: {body}");
        hashes.insert(body["hash"].as_str().unwrap().to_owned());
    }
    assert_eq!(hashes.len(), 12, "twelve transactions");
    for to in &payees {
        assert_eq!(on_chain(&anvil, *to, service).await.0, U256::from(PAYMENT_WEI), "each paid once");
    }
    assert_eq!(on_chain(&anvil, payees[0], service).await.1, 12, "twelve nonces, none twice");

    let outbox = served_status(&c, l).await.outbox.expect("the status shows the outbox");
    let health: Vec<_> = outbox.endpoints.iter().map(|e| (e.endpoint.clone(), e.healthy)).collect();
    let urls: Vec<_> = relays.iter().map(|relay| relay.url().to_owned()).collect();
    assert_eq!(health, [(urls[0].clone(), false), (urls[1].clone(), true), (urls[2].clone(), true)]);
    let cut = &outbox.endpoints[0];
    assert!(cut.errors > 0 && cut.last_error.is_some() && cut.down_since.is_some(), "{cut:?}");
    let metrics = crate::metrics::scrape(&c, l).await;
    let up = |url: &str| crate::metrics::value(&metrics, "br2k_outbox_rpc_up", &[("endpoint", url)]);
    assert_eq!((up(&urls[0]), up(&urls[1]), up(&urls[2])), (0.0, 1.0, 1.0));

    // Mended: a probe finds it answering again.
    relays[0].mend();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Reads start the probes of rested endpoints: keep paying meanwhile.
        let to = PrivateKeySigner::random().address();
        let (status, _) = pay_until_answered(&c, to, &format!("after-{to}"), Duration::from_secs(30)).await;
        assert_eq!(status, 200);
        if served_status(&c, l).await.outbox.unwrap().endpoints[0].healthy {
            break;
        }
        assert!(Instant::now() < deadline, "the mended endpoint was never found healthy again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_cancels_a_payment_held_unmined_it_is_recorded_failed_nothing_is_paid_and_the_next_goes_through() {
    use crate::harness::ADMIN_TOKEN;
    let anvil = unmined_anvil();
    let c = paying_cluster(&anvil, |outbox| {
        outbox.settle_within = Duration::from_secs(2);
        outbox.bump_after = Duration::from_secs(600);
    })
    .await;
    let service = anvil.address(SERVICE_KEY);
    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    let l = c.leader(None).await;
    let to = PrivateKeySigner::random().address();
    // Held unmined: in doubt.
    let (status, body) = {
        let answer = c.post(l, "/pay", &to.to_string(), Some("stuck")).await;
        (answer.status().as_u16(), answer.text().await.unwrap())
    };
    assert_eq!(status, 503, "{body}");
    let original = records(&c, 1).await.remove(0).attempts[0].hash;

    // The admin routes want the admin token.
    let url = |path: &str| format!("{}{path}", c.replicas[l].url);
    let cancel = serde_json::json!({ "index": 1 });
    assert_eq!(c.http.get(url("/br2k/tx")).send().await.unwrap().status(), 401);
    assert_eq!(c.http.post(url("/br2k/tx/cancel")).json(&cancel).send().await.unwrap().status(), 401);
    let wrong = c.http.post(url("/br2k/tx/cancel")).bearer_auth("guess").json(&cancel).send().await.unwrap();
    assert_eq!(wrong.status(), 403);
    let listed: serde_json::Value =
        c.http.get(url("/br2k/tx")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["in_doubt"], serde_json::json!([1]), "{listed}");
    assert_eq!(listed["transactions"][0]["index"], 1, "{listed}");
    assert_eq!(listed["transactions"][0]["nonce"], 0, "{listed}");
    assert!(c.replicas[l].status().in_doubt.contains(&1));
    let asked = c.http.post(url("/br2k/tx/cancel")).bearer_auth(ADMIN_TOKEN).json(&cancel).send().await.unwrap();
    assert_eq!(asked.status(), 202, "{}", asked.text().await.unwrap());
    let nothing = serde_json::json!({ "index": 99 });
    let none = c.http.post(url("/br2k/tx/cancel")).bearer_auth(ADMIN_TOKEN).json(&nothing).send().await.unwrap();
    assert_eq!(none.status(), 404);

    // The cancel is signed and stored next to the original, at its nonce.
    let deadline = Instant::now() + Duration::from_secs(20);
    let cancel_hash = loop {
        let record = records(&c, 1).await.remove(0);
        if let Some(cancel) = record.attempts.iter().find(|a| a.cancel) {
            assert_eq!(record.nonce, 0);
            break cancel.hash;
        }
        assert!(Instant::now() < deadline, "the cancel was never signed: {record:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Mining resumes: the cancel (higher fees) takes the nonce.
    let miner = tokio::spawn({
        let provider = provider.clone();
        async move {
            loop {
                let _: Result<serde_json::Value, _> = provider.raw_request("evm_mine".into(), ()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    let (status, failed) = pay_until_answered(&c, to, "stuck", Duration::from_secs(30)).await;
    assert_eq!(status, 502, "recorded failed: {failed}");
    assert!(failed["error"].as_str().unwrap().contains("cancelled by the operator"), "{failed}");
    assert!(provider.get_transaction_receipt(cancel_hash).await.unwrap().is_some(), "the cancel is on chain");
    assert!(provider.get_transaction_receipt(original).await.unwrap().is_none(), "the original is not");
    assert_eq!(on_chain(&anvil, to, service).await, (U256::ZERO, 1), "nothing paid; the nonce spent by the cancel");
    // The retry gets the same answer, and the next payment goes through at the next nonce.
    assert_eq!(pay_until_answered(&c, to, "stuck", Duration::from_secs(10)).await, (502, failed));
    let (status, paid) = pay_until_answered(&c, to, "next", Duration::from_secs(30)).await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(paid["nonce"], 1);
    assert_eq!(on_chain(&anvil, to, service).await, (U256::from(PAYMENT_WEI), 2));
    let settled = c.post(l, "/pay", &to.to_string(), Some("next")).await;
    assert_eq!(settled.status(), 200);
    let done = c.http.post(url("/br2k/tx/cancel")).bearer_auth(ADMIN_TOKEN).json(&cancel).send().await.unwrap();
    assert_eq!(done.status(), 404, "nothing left to cancel for a cancelled request");
    miner.abort();
}
