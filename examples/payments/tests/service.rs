//! The payment service on three replicas, a real 3-member etcd cluster and a real anvil
//! mining a block a second: grants, payouts through the outbox, deposits verified on
//! chain, and every replica's ledger agreeing with the chain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, ProviderBuilder};
use br2k_payments::{Ledger, PAYOUT_SIGNATURE_HEADER, PaymentToken, Settings, payout_message, service};
use br2k_replication::{Config, OutboxConfig, Timings, TxStep};
use br2k_test_utils::{Anvil, EtcdCluster};

const OPERATOR: &str = "operator-token";
/// anvil keys: 0 deploys the token, 5 is the service's, 6 a user's.
mod support;
use support::SERVICE_KEY;
const USER_KEY: usize = 6;

struct Payments {
    anvil: Anvil,
    _etcd: EtcdCluster,
    urls: Vec<String>,
    ledgers: Vec<Arc<Ledger>>,
    token: Address,
    http: reqwest::Client,
    _dirs: Vec<tempfile::TempDir>,
    _replicas: Vec<tokio::task::JoinHandle<br2k_replication::Result<()>>>,
    /// Holds the next payout once its gas is estimated, before its nonce is reserved.
    pause: Arc<Pause>,
}

/// A payout held between its gas estimate and its nonce (armed once).
#[derive(Default)]
struct Pause {
    armed: std::sync::atomic::AtomicBool,
    reached: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl Payments {
    async fn start() -> Self {
        Self::on_chain(1, 1).await
    }

    /// Three replicas on an anvil mining a block every `block_time` seconds, payouts and
    /// deposits settled `confirmations` blocks deep.
    async fn on_chain(block_time: u64, confirmations: u64) -> Self {
        let (anvil, token, etcd) = support::chain_and_etcd(block_time).await;
        let settings = Settings { token, service: anvil.address(SERVICE_KEY), confirmations };
        let (mut urls, mut ledgers, mut dirs, mut replicas) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let pause = Arc::new(Pause::default());
        for i in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let url = format!("http://127.0.0.1:{port}");
            let mut config = Config::new(
                "payments",
                format!("p{i}"),
                etcd.endpoint(i),
                ([127, 0, 0, 1], port).into(),
                &url,
                dir.path(),
            );
            config.timings = Timings {
                check_interval: Duration::from_millis(50),
                etcd_timeout: Duration::from_millis(500),
                follow_poll: Duration::from_millis(200),
                ..Timings::default()
            };
            let mut outbox = OutboxConfig::new(anvil.endpoint(), anvil.key(SERVICE_KEY));
            outbox.confirmations = confirmations;
            config.outbox = Some(outbox);
            let ledger = Ledger::open(&dir.path().join("ledger"), settings).unwrap();
            let hold = pause.clone();
            let replica = service(config, OPERATOR.into())
                .on_tx_step(move |step, _| {
                    let hold = hold.clone();
                    async move {
                        if step == TxStep::Reserving && hold.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            hold.reached.notify_one();
                            hold.release.notified().await;
                        }
                    }
                })
                .build(ledger)
                .unwrap();
            ledgers.push(replica.state());
            replicas.push(tokio::spawn(replica.serve(std::future::pending())));
            urls.push(url);
            dirs.push(dir);
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Self { anvil, _etcd: etcd, urls, ledgers, token: settings.token, http, _dirs: dirs, _replicas: replicas, pause }
    }

    /// Sends to whichever replica leads until one answers something other than 503.
    async fn send(&self, path: &str, body: serde_json::Value, key: &str, token: bool) -> (u16, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for url in &self.urls {
                let mut request = self.http.post(format!("{url}{path}")).header("Idempotency-Key", key).json(&body);
                if token {
                    request = request.bearer_auth(OPERATOR);
                }
                if let Ok(answer) = request.send().await
                    && answer.status() != 503
                {
                    return (answer.status().as_u16(), answer.json().await.unwrap_or_default());
                }
            }
            assert!(Instant::now() < deadline, "no replica answered {path} within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A payout of `amount` to `user` under `key`, signed with `signer` (the user's key,
    /// or another's), sent like [`Self::send`].
    async fn signed_payout(
        &self,
        signer: &alloy::signers::local::PrivateKeySigner,
        user: Address,
        amount: u64,
        key: &str,
    ) -> (u16, serde_json::Value) {
        use alloy::signers::Signer;
        let message = payout_message(self.anvil.address(SERVICE_KEY), user, U256::from(amount), key);
        let signature = alloy::hex::encode_prefixed(signer.sign_message(message.as_bytes()).await.unwrap().as_bytes());
        let body = serde_json::json!({ "user": user, "amount": amount.to_string() });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for url in &self.urls {
                let request = self.http.post(format!("{url}/payouts")).header("Idempotency-Key", key);
                let request = request.header(PAYOUT_SIGNATURE_HEADER, &signature).json(&body);
                if let Ok(answer) = request.send().await
                    && answer.status() != 503
                {
                    return (answer.status().as_u16(), answer.json().await.unwrap_or_default());
                }
            }
            assert!(Instant::now() < deadline, "no replica answered the payout within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The replica that leads, and its status.
    async fn leading(&self) -> (usize, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, url) in self.urls.iter().enumerate() {
                let answer = self.http.get(format!("{url}/br2k/status")).send().await.unwrap();
                let status: serde_json::Value = answer.json().await.unwrap();
                if status["role"] == "leader" {
                    return (i, status);
                }
            }
            assert!(Instant::now() < deadline, "no replica leads");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn leader(&self) -> usize {
        self.leading().await.0
    }

    /// The log's last index, as the leader says.
    async fn logged(&self) -> u64 {
        self.leading().await.1["ls"].as_u64().unwrap()
    }

    async fn balance_of(&self, who: Address) -> U256 {
        let provider = ProviderBuilder::new().connect_http(self.anvil.endpoint().parse().unwrap());
        PaymentToken::new(self.token, &provider).balanceOf(who).call().await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_payouts_and_deposits_keep_every_ledger_equal_to_the_chain() {
    let p = Payments::start().await;
    let user = p.anvil.address(USER_KEY);
    let amount = |n: u64| serde_json::json!(U256::from(n));

    // Grants need the operator's token.
    // Amounts in decimal or hex.
    let ask = serde_json::json!({ "user": user, "amount": "500" });
    assert_eq!(p.send("/grants", ask.clone(), "g0", false).await.0, 401);
    assert_eq!(p.send("/grants", ask, "g1", true).await.0, 200);

    // A payout needs the operator's token or the user's signature: without either, or
    // signed by another key, or signed for another amount, it is refused and never logged.
    let payout = serde_json::json!({ "user": user, "amount": amount(200) });
    let logged = p.logged().await;
    let (status, refused) = p.send("/payouts", payout.clone(), "p1", false).await;
    assert_eq!(status, 401, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("Br2k-Payout-Signature"), "{refused}");
    let stranger = p.anvil.key(7);
    let (status, refused) = p.signed_payout(&stranger, user, 200, "p1").await;
    assert_eq!(status, 403, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains(&stranger.address().to_string()), "{refused}");
    assert_eq!(p.logged().await, logged, "refused payouts are never logged");
    assert_eq!(p.balance_of(user).await, U256::ZERO);

    // Signed by the user: a payout moves tokens on chain, once, whatever the retries.
    let user_key = p.anvil.key(USER_KEY);
    let (status, paid) = p.signed_payout(&user_key, user, 200, "p1").await;
    assert_eq!(status, 200, "{paid}");
    assert_eq!(p.signed_payout(&user_key, user, 200, "p1").await.1, paid, "the retry gets the same payout");
    assert_eq!(p.balance_of(user).await, U256::from(200));
    // The signature covers the Idempotency-Key: sent again under another key, it is not
    // the user's signature of that payout, and pays nothing more.
    let message = payout_message(p.anvil.address(SERVICE_KEY), user, U256::from(200), "p1");
    let signature = alloy::signers::Signer::sign_message(&user_key, message.as_bytes()).await.unwrap();
    let replayed = p
        .http
        .post(format!("{}/payouts", p.urls[p.leader().await]))
        .header("Idempotency-Key", "p1-again")
        .header(PAYOUT_SIGNATURE_HEADER, alloy::hex::encode_prefixed(signature.as_bytes()))
        .json(&payout)
        .send()
        .await
        .unwrap();
    assert_eq!(replayed.status(), 403);
    assert_eq!(p.balance_of(user).await, U256::from(200));
    // More than the account holds is refused before anything is sent (operator token).
    let (status, refused) =
        p.send("/payouts", serde_json::json!({ "user": user, "amount": amount(1000) }), "p2", true).await;
    assert_eq!(status, 409, "{refused}");

    // The user sends 50 back on chain and records the deposit; a second record is refused.
    let as_user = ProviderBuilder::new()
        .wallet(EthereumWallet::from(p.anvil.key(USER_KEY)))
        .connect_http(p.anvil.endpoint().parse().unwrap());
    let sent = PaymentToken::new(p.token, &as_user)
        .transfer(p.anvil.address(SERVICE_KEY), U256::from(50))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let deposit = serde_json::json!({ "hash": sent.transaction_hash });
    let (status, recorded) = p.send("/deposits", deposit.clone(), "d1", false).await;
    assert_eq!(status, 201, "{recorded}");
    assert_eq!(recorded["deposit"]["user"], serde_json::json!(user));
    assert_eq!(p.send("/deposits", deposit, "d2", false).await.0, 409, "recorded once");
    // The payout is a Transfer from the service, not to it: not a deposit.
    assert_eq!(paid["resumed"], false, "sent and settled by one leader: {paid}");
    let payout_hash = paid["payout"]["hash"].clone();
    let (status, refused) = p.send("/deposits", serde_json::json!({ "hash": payout_hash }), "d3", false).await;
    assert_eq!(status, 422, "{refused}");

    // Every replica's ledger: granted 500, deposited 50, paid out 200, balance 350; and the
    // chain holds what the ledger paid out minus what it recorded as deposited.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let views: Vec<_> = p.ledgers.iter().map(|l| l.accounts().get(&user).copied()).collect();
        if views.iter().all(|v| v.is_some_and(|a| a.paid_out == U256::from(200) && a.deposited == U256::from(50))) {
            let account = views[0].unwrap();
            assert_eq!((account.granted, account.balance()), (U256::from(500), U256::from(350)));
            assert!(views.iter().all(|v| *v == views[0]), "{views:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the replicas' ledgers did not converge: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(p.balance_of(user).await, U256::from(150));
    // The read route: the leader answers (followers say 503 and name it).
    let mut read = None;
    for url in &p.urls {
        let answer = p.http.get(format!("{url}/accounts")).send().await.unwrap();
        if answer.status() == 200 {
            read = Some(answer.json::<serde_json::Value>().await.unwrap());
        }
    }
    let read = read.expect("the leader answers /accounts");
    assert_eq!(read["accounts"][format!("{user:#x}")]["balance"], amount(350), "{read}");
    let provider = ProviderBuilder::new().connect_http(p.anvil.endpoint().parse().unwrap());
    assert_eq!(
        provider.get_transaction_count(p.anvil.address(SERVICE_KEY)).await.unwrap(),
        1,
        "one payout, one transaction"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn payouts_on_a_chain_of_two_second_blocks_at_three_confirmations_are_each_paid_once_and_answered() {
    // A chain like a real one: a payout is mined a block or two after it is sent, and
    // counts as settled only 3 blocks deep. Mined-but-shallow is ours, never a stranger's.
    let p = Payments::on_chain(2, 3).await;
    let user = p.anvil.address(USER_KEY);
    let grant = serde_json::json!({ "user": user, "amount": "1000" });
    assert_eq!(p.send("/grants", grant, "g", true).await.0, 200);
    let payouts = (0..10).map(|n| {
        let payout = serde_json::json!({ "user": user, "amount": "10" });
        let key = format!("deep-{n}");
        let p = &p;
        async move { p.send("/payouts", payout, &key, true).await }
    });
    let answers = futures::future::join_all(payouts).await;
    let mut hashes = std::collections::HashSet::new();
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        hashes.insert(answer["payout"]["hash"].as_str().unwrap().to_owned());
    }
    assert_eq!(hashes.len(), 10, "ten payouts, ten transactions");
    let provider = ProviderBuilder::new().connect_http(p.anvil.endpoint().parse().unwrap());
    for hash in &hashes {
        let receipt = provider.get_transaction_receipt(hash.parse().unwrap()).await.unwrap().unwrap();
        assert!(receipt.status(), "{hash} succeeded on chain");
    }
    assert_eq!(provider.get_transaction_count(p.anvil.address(SERVICE_KEY)).await.unwrap(), 10);
    assert_eq!(p.balance_of(user).await, U256::from(100), "ten transfers of 10 on chain");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.ledgers.iter().all(|l| l.accounts().get(&user).is_some_and(|a| a.paid_out == U256::from(100))) {
        assert!(Instant::now() < deadline, "the ledgers do not show the chain's 100 paid out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_payout_estimated_while_the_user_still_held_tokens_is_not_mined_out_of_gas_after_the_user_emptied_them() {
    // A transfer's gas depends on the state it runs in: to an account holding tokens it
    // stores a balance over a balance, to an emptied one a balance from zero (17,100 gas
    // more). A payout is estimated while the user still holds its last unit; before it is
    // sent, the user pays that unit back with a high tip, so that it runs first.
    let p = Payments::on_chain(2, 1).await;
    let user = p.anvil.address(USER_KEY);
    assert_eq!(p.send("/grants", serde_json::json!({ "user": user, "amount": "10" }), "g", true).await.0, 200);
    let one = serde_json::json!({ "user": user, "amount": "1" });
    let (status, first) = p.send("/payouts", one.clone(), "first", true).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(p.balance_of(user).await, U256::from(1));

    let as_user = ProviderBuilder::new()
        .wallet(EthereumWallet::from(p.anvil.key(USER_KEY)))
        .connect_http(p.anvil.endpoint().parse().unwrap());
    p.pause.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let emptying = async {
        p.pause.reached.notified().await;
        let pending = PaymentToken::new(p.token, &as_user)
            .transfer(p.anvil.address(SERVICE_KEY), U256::from(1))
            .max_priority_fee_per_gas(50_000_000_000)
            .max_fee_per_gas(100_000_000_000)
            .send()
            .await
            .unwrap();
        p.pause.release.notify_one();
        pending.get_receipt().await.unwrap()
    };
    let ((status, second), emptied) = tokio::join!(p.send("/payouts", one, "second", true), emptying);
    assert!(emptied.status(), "the user's transfer went through");
    assert_eq!(status, 200, "the payout ran out of gas or failed otherwise: {second}");
    assert_eq!(p.balance_of(user).await, U256::from(1), "emptied, then paid one unit");
}
