//! The `br2k-payments` binary: three processes on a real etcd cluster and a real anvil
//! mining a block a second; the leader's process SIGKILLs itself (the `BR2K_CRASH_AT`
//! failpoint) at each step of a payout's transfer, and every payout is still paid
//! exactly once.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use br2k_payments::{Effect, PaymentToken, read_ledger};
use br2k_test_utils::{Anvil, EtcdCluster, KillOnDrop};

const OPERATOR: &str = "operator-token";
mod support;
use support::SERVICE_KEY;

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

struct Node {
    port: u16,
    dir: PathBuf,
    process: Option<KillOnDrop>,
}

struct Cluster {
    etcd: EtcdCluster,
    anvil: Anvil,
    token: Address,
    secrets: tempfile::TempDir,
    /// Where the nodes take the service's transaction key from (flags).
    key_args: Vec<std::ffi::OsString>,
    nodes: Vec<Node>,
    http: reqwest::Client,
    _data: tempfile::TempDir,
}

impl Cluster {
    /// A token minted to the service's key on an anvil mining a block a second, and three
    /// nodes (not started) that read that key from a 0600 file, or as `key_args` says
    /// (given the secrets directory).
    async fn new(key_args: impl FnOnce(&Path) -> Vec<std::ffi::OsString>) -> Self {
        let (anvil, token, etcd) = support::chain_and_etcd(1).await;
        let secrets = tempfile::tempdir().unwrap();
        let key_file = secrets.path().join("key");
        private_file(&key_file, &format!("{}\n", alloy::hex::encode(anvil.key(SERVICE_KEY).to_bytes())));
        private_file(&secrets.path().join("operator"), OPERATOR);
        let key_args = key_args(secrets.path());
        let data = tempfile::tempdir().unwrap();
        let nodes = (0..3)
            .map(|i| Node {
                port: std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port(),
                dir: data.path().join(format!("n{i}")),
                process: None,
            })
            .collect();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Self { etcd, anvil, token, secrets, key_args, nodes, http, _data: data }
    }

    fn start_node(&mut self, i: usize) {
        self.start_node_crashing_at(i, None);
    }

    /// Starts node `i`; with `crash_at`, its process SIGKILLs itself when a transaction
    /// reaches that step.
    fn start_node_crashing_at(&mut self, i: usize, crash_at: Option<&str>) {
        let node = &self.nodes[i];
        let mut command = Command::new(env!("CARGO_BIN_EXE_br2k-payments"));
        match crash_at {
            Some(step) => command.env("BR2K_CRASH_AT", step),
            None => command.env_remove("BR2K_CRASH_AT"),
        };
        let child = command
            .args(["--replica", &format!("n{i}"), "--etcd", &self.etcd.endpoint(i)])
            .args(["--listen", &format!("127.0.0.1:{}", node.port), "--check-interval-ms", "50"])
            .args(["--token", &self.token.to_string(), "--rpc-url", &self.anvil.endpoint()])
            .args(["--settle-within", "5", "--handler-timeout", "15"])
            .arg("--data-dir")
            .arg(&node.dir)
            .args(&self.key_args)
            .arg("--operator-token-file")
            .arg(self.secrets.path().join("operator"))
            .env_remove("BR2K_REGISTRY")
            .env_remove("BR2K_OUTBOX_KEY")
            .env_remove("BR2K_OPERATOR_TOKEN")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(KillOnDrop)
            .unwrap();
        self.nodes[i].process = Some(child);
    }

    /// The node whose process answers as leader.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for (i, node) in self.nodes.iter().enumerate() {
                let url = format!("http://127.0.0.1:{}/br2k/status", node.port);
                if node.process.is_some()
                    && let Ok(answer) = self.http.get(url).send().await
                    && answer.json::<serde_json::Value>().await.unwrap_or_default()["role"] == "leader"
                {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no leader within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends until a replica answers something other than 503 (or a dead connection).
    async fn send(&self, path: &str, body: serde_json::Value, key: &str) -> (u16, serde_json::Value) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            for node in self.nodes.iter().filter(|n| n.process.is_some()) {
                let sent = self
                    .http
                    .post(format!("http://127.0.0.1:{}{path}", node.port))
                    .header("Idempotency-Key", key)
                    .bearer_auth(OPERATOR)
                    .json(&body)
                    .send()
                    .await;
                if let Ok(answer) = sent
                    && answer.status() != 503
                {
                    return (answer.status().as_u16(), answer.json().await.unwrap_or_default());
                }
            }
            assert!(Instant::now() < deadline, "no answer to {path} within 90 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_process_sigkilled_at_each_step_of_a_payout_pays_it_exactly_once() {
    let mut c = Cluster::new(|secrets| vec!["--outbox-key-file".into(), secrets.join("key").into()]).await;
    let service = c.anvil.address(SERVICE_KEY);
    let token = PaymentToken::new(c.token, ProviderBuilder::new().connect_http(c.anvil.endpoint().parse().unwrap()));
    for i in 0..3 {
        c.start_node(i);
    }
    let users: Vec<Address> = (0..3).map(|_| PrivateKeySigner::random().address()).collect();
    for (n, user) in users.iter().enumerate() {
        let (status, body) =
            c.send("/grants", serde_json::json!({ "user": user, "amount": "1000" }), &format!("g{n}")).await;
        assert_eq!(status, 200, "{body}");
    }

    // Each round: the leader's process (the node whose etcd member leads etcd) is started
    // again with the failpoint and leads again; a payout goes out, and it SIGKILLs itself at exactly
    // one step of the transfer: signed and stored but not broadcast; broadcast but its
    // receipt not seen; mined but the request's outcome not recorded. The retry with the
    // same key gets the one answer from the next leader, which finished the transaction
    // the dead one had stored.
    for (round, (user, step)) in users.iter().zip(["stored", "broadcast", "settled"]).enumerate() {
        let l = c.leader().await;
        c.nodes[l].process = None;
        c.start_node_crashing_at(l, Some(step));
        assert_eq!(c.leader().await, l, "its etcd member still leads etcd");
        let ask = serde_json::json!({ "user": user, "amount": "300" });
        let key = format!("p{round}");
        let port = c.nodes[l].port;
        let first = c.http.post(format!("http://127.0.0.1:{port}/payouts")).header("Idempotency-Key", &key);
        let first = first.bearer_auth(OPERATOR).json(&ask);
        assert!(first.send().await.is_err(), "round {round}: the leader died before it answered");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = c.nodes[l].process.as_mut().unwrap().0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "round {round}: the leader did not crash at `{step}`");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(status.signal(), Some(9), "round {round}: SIGKILLed at `{step}`");
        c.nodes[l].process = None;
        // The whole node is gone: its etcd member too, so another node's member leads etcd
        // and its replica takes over (while the member lives, it keeps the lead for a
        // replica that is not there).
        c.etcd.kill(l).unwrap();
        let (status, body) = c.send("/payouts", ask, &key).await;
        assert_eq!(status, 200, "round {round} (`{step}`): {body}");
        assert_eq!(body["resumed"], true, "round {round} (`{step}`): finished from the stored transaction: {body}");
        c.etcd.restart(l).unwrap();
        c.start_node(l);
    }

    // The chain: each user paid once; the service sent one transaction per payout.
    let provider = ProviderBuilder::new().connect_http(c.anvil.endpoint().parse().unwrap());
    for user in &users {
        assert_eq!(token.balanceOf(*user).call().await.unwrap(), U256::from(300), "{user} paid once");
    }
    assert_eq!(provider.get_transaction_count(service).await.unwrap(), 3);
    // Every replica's ledger converges: three grants and three payouts, in the same order.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ledgers: Vec<_> = c.nodes.iter().map(|n| read_ledger(&n.dir).unwrap()).collect();
        let payouts =
            |l: &Vec<br2k_payments::Line>| l.iter().filter(|x| matches!(x.effect, Effect::Payout { .. })).count();
        if ledgers.iter().all(|l| l.len() == 6 && payouts(l) == 3) {
            assert!(ledgers.iter().all(|l| *l == ledgers[0]), "the replicas' ledgers differ");
            break;
        }
        assert!(Instant::now() < deadline, "the ledgers did not converge: {ledgers:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_key_from_an_encrypted_keystore_pays_and_a_wrong_password_is_refused_without_echo() {
    let mut c = Cluster::new(|secrets| {
        // Foundry's convention: `cast wallet import` writes the keystore, a 0600 file
        // holds its password.
        let cast = br2k_test_utils::foundry_binary("cast").expect("cast is installed (bash tools/setup.sh)");
        let key = std::fs::read_to_string(secrets.join("key")).unwrap();
        let imported = Command::new(cast)
            .args(["wallet", "import", "service", "--keystore-dir"])
            .arg(secrets.join("keys"))
            .args(["--unsafe-password", "correct horse", "--private-key", key.trim()])
            .output()
            .unwrap();
        assert!(imported.status.success(), "cast wallet import: {}", String::from_utf8_lossy(&imported.stderr));
        std::fs::remove_file(secrets.join("key")).unwrap(); // only the keystore holds it now
        private_file(&secrets.join("password"), "correct horse\n");
        let keystore = secrets.join("keys/service");
        vec![
            "--outbox-keystore".into(),
            keystore.into(),
            "--outbox-password-file".into(),
            secrets.join("password").into(),
        ]
    })
    .await;

    // A wrong password: the replica does not start, says why, and never repeats it.
    private_file(&c.secrets.path().join("wrong"), "battery staple\n");
    let refused = Command::new(env!("CARGO_BIN_EXE_br2k-payments"))
        .args(["--replica", "n0", "--etcd", &c.etcd.endpoint(0), "--token", &c.token.to_string()])
        .arg("--data-dir")
        .arg(c.secrets.path().join("unused"))
        .arg("--outbox-keystore")
        .arg(c.secrets.path().join("keys/service"))
        .arg("--outbox-password-file")
        .arg(c.secrets.path().join("wrong"))
        .env("BR2K_OPERATOR_TOKEN", OPERATOR)
        .env_remove("BR2K_OUTBOX_KEY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("--outbox-keystore") && stderr.contains("cannot decrypt"), "{stderr}");
    assert!(!stderr.contains("battery") && !stderr.contains("horse"), "{stderr}");

    // The right one: the three replicas pay from the keystore's key.
    for i in 0..3 {
        c.start_node(i);
    }
    let user = PrivateKeySigner::random().address();
    let (status, body) = c.send("/grants", serde_json::json!({ "user": user, "amount": "70" }), "g").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = c.send("/payouts", serde_json::json!({ "user": user, "amount": "70" }), "p").await;
    assert_eq!(status, 200, "{body}");
    let provider = ProviderBuilder::new().connect_http(c.anvil.endpoint().parse().unwrap());
    let token = PaymentToken::new(c.token, &provider);
    assert_eq!(token.balanceOf(user).call().await.unwrap(), U256::from(70));
    assert_eq!(provider.get_transaction_count(c.anvil.address(SERVICE_KEY)).await.unwrap(), 1, "sent from its key");
}
