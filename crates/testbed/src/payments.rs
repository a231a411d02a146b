//! The payments workload (`br2k testbed --workload payments`): the payment service
//! (`examples/payments`) under the same attacker, with users paid out and paying back,
//! and a checker that reads the chain itself: every acknowledged payout is exactly one
//! transfer on chain, no payout was paid twice, every acknowledged deposit is recorded,
//! and every replica's ledger equals the chain's token balances.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use br2k_deploy::local::{ChainChoice, EtcdTimings, Sandbox, SandboxSpec};
use br2k_payments::{Effect, PaymentToken, read_ledger};
use br2k_resolver::{FailoverClient, Request, Resolver, ResolverConfig};
use serde::Serialize;

use crate::checker::{Gaps, gaps};
use crate::users::{Progress, failover_config};
use crate::{Error, SERVICE, TestbedConfig, millis};

/// Tokens each user is granted at the start (base units): more than they can be paid.
const GRANT: u64 = 1_000_000_000;
/// Tokens the service is minted: what it pays out from.
const MINTED: u64 = 1_000_000_000_000;
/// Every `DEPOSIT_EVERY`-th request of a user is a deposit of one unit back to the service.
const DEPOSIT_EVERY: u64 = 10;

/// What one payments user saw.
#[derive(Debug, Default)]
struct PayerLog {
    /// Acknowledged payouts: the transaction each answer named.
    payouts: Vec<(u64, B256)>,
    /// Acknowledged deposits: the user's transaction.
    deposits: Vec<B256>,
    /// Requests given up on or refused, with why.
    failed: Vec<String>,
    /// Latency of each acknowledged request (ms).
    latencies: Vec<u64>,
    /// When each acknowledged request was answered, from the start of the run (ms).
    answered_at: Vec<u64>,
    /// Acknowledged payouts a dead leader had sent, finished by the next from the stored
    /// transaction.
    resumed: u64,
}

/// The payments run's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PaymentFindings {
    /// Payouts the users sent and got answered.
    pub payouts_acknowledged: u64,
    /// Deposits the users made on chain and got recorded.
    pub deposits_acknowledged: u64,
    /// Requests not acknowledged (given up or refused), with the first reasons.
    pub unacknowledged: u64,
    /// Why some were not (up to five).
    pub unacknowledged_reasons: Vec<String>,
    /// Acknowledged payouts whose transaction a leader had sent when it died, finished by
    /// the next leader from the transaction the outbox stored (rebroadcast or found mined).
    pub payouts_resumed: u64,
    /// Transfers of the token from the service on chain.
    pub transfers_on_chain: u64,
    /// Transactions the chain mined from the service's key (its nonce): one per payout
    /// when none was refused or reverted.
    pub service_transactions: u64,
    /// Payout effects in the leader's ledger.
    pub payouts_in_ledger: u64,
    /// Transfers on chain beyond the recorded payouts (double or unrecorded payments): 0.
    pub double_payments: u64,
    /// Acknowledged payouts whose transfer is not on chain or not in the ledger: 0.
    pub lost_payouts: u64,
    /// Acknowledged deposits not in the ledger: 0.
    pub lost_deposits: u64,
    /// Users whose ledger (paid out minus deposited) differs from their token balance: 0.
    pub balance_mismatches: u64,
    /// Whether every replica's ledger is the same.
    pub ledgers_identical: bool,
    /// Requests in doubt at the end (listed by the leader): settled ones are not.
    pub in_doubt_at_end: Vec<u64>,
    /// Median and 99th percentile of acknowledged requests' latency (ms).
    pub latency_ms: (u64, u64),
    /// Time users went without an answer after each fault.
    pub gaps: Gaps,
}

impl PaymentFindings {
    /// No double payment, nothing acknowledged lost, ledgers equal to the chain and to
    /// each other.
    pub fn passed(&self) -> bool {
        self.double_payments == 0
            && self.lost_payouts == 0
            && self.lost_deposits == 0
            && self.balance_mismatches == 0
            && self.ledgers_identical
            && self.in_doubt_at_end.is_empty()
    }

    /// The findings as a Markdown table.
    pub fn markdown(&self, faults: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| payments | this run |");
        let _ = writeln!(out, "|---|---:|");
        let _ = writeln!(out, "| faults injected | {faults} |");
        let _ = writeln!(out, "| payouts acknowledged | {} |", self.payouts_acknowledged);
        let _ = writeln!(out, "| deposits acknowledged | {} |", self.deposits_acknowledged);
        let _ = writeln!(out, "| requests not acknowledged | {} |", self.unacknowledged);
        let _ = writeln!(out, "| payouts a dead leader had sent, finished by the next | {} |", self.payouts_resumed);
        let _ = writeln!(out, "| token transfers from the service on chain | {} |", self.transfers_on_chain);
        let _ = writeln!(out, "| transactions mined from the service's key | {} |", self.service_transactions);
        let _ = writeln!(out, "| payouts in the ledger | {} |", self.payouts_in_ledger);
        let _ = writeln!(out, "| double payments | {} |", self.double_payments);
        let _ = writeln!(out, "| acknowledged payouts lost | {} |", self.lost_payouts);
        let _ = writeln!(out, "| acknowledged deposits lost | {} |", self.lost_deposits);
        let _ = writeln!(out, "| users whose ledger differs from the chain | {} |", self.balance_mismatches);
        let _ =
            writeln!(out, "| replicas' ledgers identical | {} |", if self.ledgers_identical { "yes" } else { "NO" });
        let _ = writeln!(out, "| in doubt at the end | {} |", self.in_doubt_at_end.len());
        let _ = writeln!(out, "| request latency p50 / p99 | {} ms / {} ms |", self.latency_ms.0, self.latency_ms.1);
        if self.gaps.faults > 0 {
            let seconds = |ms: u64| format!("{:.2} s", ms as f64 / 1000.0);
            let _ = writeln!(
                out,
                "| failover gap, median / max | {} / {} |",
                seconds(self.gaps.median_ms),
                seconds(self.gaps.max_ms)
            );
        }
        for reason in &self.unacknowledged_reasons {
            let _ = writeln!(out, "\nnot acknowledged: {reason}");
        }
        let _ = writeln!(out, "\nVerdict: {}", if self.passed() { "PASSED" } else { "FAILED" });
        out
    }
}

/// Runs the payments workload under `config`'s attacker; returns the findings and how
/// many faults were injected.
///
/// # Errors
/// When the run could not be carried out.
pub async fn run(config: TestbedConfig, progress: &(dyn Fn(&str) + Sync)) -> Result<(PaymentFindings, usize), Error> {
    config.check()?;
    // Keys made now, so the replicas can be told them before the chain exists: the
    // service's (it pays), the token's deployer (the token's address is its first
    // contract's), and the users'.
    let service_key = PrivateKeySigner::random();
    let deployer = PrivateKeySigner::random();
    let token = deployer.address().create(0);
    let operator = format!("op-{}", alloy::hex::encode(PrivateKeySigner::random().address()));
    let users: Vec<PrivateKeySigner> = (0..config.users).map(|_| PrivateKeySigner::random()).collect();
    let spec = SandboxSpec {
        service: SERVICE.into(),
        replicas: config.replicas,
        app: config.app.clone(),
        app_args: vec!["--settle-within".into(), "10".into(), "--bump-after".into(), "5".into()],
        app_env: [
            ("BR2K_TOKEN".into(), token.to_string()),
            ("BR2K_OUTBOX_KEY".into(), alloy::hex::encode(service_key.to_bytes())),
            ("BR2K_OPERATOR_TOKEN".into(), operator.clone()),
        ]
        .into_iter()
        .chain(br2k_deploy::local::snapshot_env(&config.snapshots))
        .collect(),
        work_dir: config.work_dir.clone(),
        network: config.network,
        slot: None,
        etcd: EtcdTimings::with_election_ms(config.election_ms),
        chain: ChainChoice::Local,
        startup_timeout: Duration::from_secs(30),
        disks: config.fault.disks(),
    };
    let mut sandbox = Sandbox::start(spec, progress).await?;
    sandbox.service().wait_for_leader(Duration::from_secs(30)).await?;
    sandbox.wait_published(1, Duration::from_secs(30)).await?;
    let funder =
        sandbox.chain().map(|c| c.key(0)).ok_or_else(|| Error::Config("the sandbox has no local chain".into()))?;
    let chain = Chain::new(sandbox.rpc_url(), &funder)?;
    progress("funding the service and the users, deploying and minting the token");
    for address in std::iter::once(service_key.address())
        .chain(std::iter::once(deployer.address()))
        .chain(users.iter().map(PrivateKeySigner::address))
    {
        chain.fund(address).await?;
    }
    let as_deployer = chain.as_key(&deployer)?;
    let deployed = PaymentToken::deploy(&as_deployer).await.map_err(chain_error)?;
    if *deployed.address() != token {
        return Err(Error::Config(format!("the token landed at {}, not {token}", deployed.address())));
    }
    let receipt = deployed.mint(service_key.address(), U256::from(MINTED)).send().await.map_err(chain_error)?;
    receipt.get_receipt().await.map_err(chain_error)?;

    let resolver = Resolver::new(
        sandbox.registry().clone(),
        ResolverConfig { poll_interval: Duration::from_millis(200), ..ResolverConfig::default() },
    );
    let start = Instant::now();
    let counters = Arc::new(Progress::default());
    let run_id = format!(
        "pay{}",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
    );
    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(n, key)| {
            let payer = Payer {
                key: key.clone(),
                token,
                service: service_key.address(),
                operator: operator.clone(),
                rpc_url: sandbox.rpc_url().to_owned(),
                run_id: format!("{run_id}-u{n}"),
            };
            tokio::spawn(payer.run(resolver.clone(), config.clone(), Arc::clone(&counters), start))
        })
        .collect();
    let total = config.users as u64 * config.requests_per_user;
    progress(&format!(
        "{} users x {} requests (payouts, every {DEPOSIT_EVERY}th a deposit) at {}/s; attacker: {} on {} every {:?}..{:?} for {:?} (seed {})",
        config.users,
        config.requests_per_user,
        config.rate,
        config.fault,
        config.target,
        config.interval.0,
        config.interval.1,
        config.duration,
        config.seed
    ));
    let faults = crate::attack(&mut sandbox, &config, &tasks, start, &counters, total, progress).await?;
    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await.map_err(|e| Error::User(e.to_string()))?);
    }
    let end_ms = millis(start.elapsed());
    progress(&format!(
        "users done in {:.1} s; healing every node and waiting for the ledgers to agree",
        start.elapsed().as_secs_f64()
    ));
    sandbox.service_mut().heal_all().await?;
    let mut findings = check(&sandbox, &chain, token, service_key.address(), &users, &logs).await?;
    findings.gaps = gaps(logs.iter().flat_map(|l| l.answered_at.iter().copied()).collect(), &faults, end_ms);
    sandbox.shutdown().await;
    Ok((findings, faults.len()))
}

/// One payments user.
struct Payer {
    key: PrivateKeySigner,
    token: Address,
    service: Address,
    operator: String,
    rpc_url: String,
    run_id: String,
}

impl Payer {
    async fn run(self, resolver: Resolver, config: TestbedConfig, progress: Arc<Progress>, start: Instant) -> PayerLog {
        let mut log = PayerLog::default();
        let client = match FailoverClient::new(resolver, SERVICE, failover_config(config.give_up_after, 0)) {
            Ok(client) => client,
            Err(e) => {
                log.failed.push(e.to_string());
                return log;
            }
        };
        let user = self.key.address();
        let json = |value: serde_json::Value| value.to_string();
        let grant = Request::post("/grants", json(serde_json::json!({ "user": user, "amount": GRANT.to_string() })))
            .header(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {}", self.operator).parse().expect("a header value"),
            )
            .idempotency_key(format!("{}-grant", self.run_id));
        if let Err(reason) = answered(&client, &grant).await {
            log.failed.push(format!("grant: {reason}"));
            return log;
        }
        let wallet = match wallet(&self.rpc_url, &self.key) {
            Ok(wallet) => wallet,
            Err(e) => {
                log.failed.push(e.to_string());
                return log;
            }
        };
        let token = PaymentToken::new(self.token, &wallet);
        let period = Duration::from_secs_f64(1.0 / config.rate);
        let mut next = Instant::now();
        for seq in 1..=config.requests_per_user {
            tokio::time::sleep_until(next.into()).await;
            next = (next + period).max(Instant::now());
            let sent = Instant::now();
            let result = if seq % DEPOSIT_EVERY == 0 && !log.payouts.is_empty() {
                self.deposit(&client, &token, seq).await.map(|hash| log.deposits.push(hash))
            } else {
                match self.signed_payout(user, seq).await {
                    Ok(payout) => answered(&client, &payout).await,
                    Err(e) => Err(e),
                }
                .and_then(|answer| {
                    let hash = serde_json::from_value::<B256>(answer["payout"]["hash"].clone())
                        .map_err(|e| format!("the payout's answer names no transaction: {e}: {answer}"))?;
                    log.payouts.push((seq, hash));
                    log.resumed += u64::from(answer["resumed"] == true);
                    Ok(())
                })
            };
            match result {
                Ok(()) => {
                    log.latencies.push(millis(sent.elapsed()));
                    log.answered_at.push(millis(start.elapsed()));
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(reason) => {
                    tracing::warn!(%user, seq, "request not acknowledged: {reason}");
                    log.failed.push(reason);
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        log
    }

    /// A payout of one unit to `user`, signed with the user's key as a wallet would: the
    /// service pays only what the operator or the user asked for.
    async fn signed_payout(&self, user: Address, seq: u64) -> Result<Request, String> {
        use alloy::signers::Signer;
        let key = format!("{}-{seq}", self.run_id);
        let message = br2k_payments::payout_message(self.service, user, U256::from(1), &key);
        let signature =
            self.key.sign_message(message.as_bytes()).await.map_err(|e| format!("signing the payout: {e}"))?;
        let value = reqwest::header::HeaderValue::from_str(&alloy::hex::encode_prefixed(signature.as_bytes()))
            .map_err(|e| format!("the payout's signature as a header: {e}"))?;
        let name = reqwest::header::HeaderName::from_static("br2k-payout-signature");
        let body = serde_json::json!({ "user": user, "amount": "1" }).to_string();
        Ok(Request::post("/payouts", body).idempotency_key(key).header(name, value))
    }

    /// Sends one unit back to the service on chain and records it.
    async fn deposit(
        &self,
        client: &FailoverClient,
        token: &PaymentToken::PaymentTokenInstance<impl Provider>,
        seq: u64,
    ) -> Result<B256, String> {
        let pending =
            token.transfer(self.service, U256::from(1)).send().await.map_err(|e| format!("deposit transfer: {e}"))?;
        let receipt = pending.get_receipt().await.map_err(|e| format!("deposit receipt: {e}"))?;
        let body = serde_json::json!({ "hash": receipt.transaction_hash }).to_string();
        let record = Request::post("/deposits", body).idempotency_key(format!("{}-{seq}", self.run_id));
        // Not mined under enough blocks yet: the answer says so (409) and a new key asks again.
        for attempt in 0..20 {
            let record = if attempt == 0 {
                record.clone()
            } else {
                record.clone().idempotency_key(format!("{}-{seq}-{attempt}", self.run_id))
            };
            match answered(client, &record).await {
                Ok(_) => return Ok(receipt.transaction_hash),
                Err(reason) if reason.contains("409") && reason.contains("not mined") => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(reason) => return Err(format!("deposit record: {reason}")),
            }
        }
        Err("deposit record: still not mined after 20 tries".into())
    }
}

/// Sends `request` until answered; the answer's JSON when it is a success.
async fn answered(client: &FailoverClient, request: &Request) -> Result<serde_json::Value, String> {
    let response = client.send(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| format!("reading the answer: {e}"))?;
    if !status.is_success() {
        return Err(format!("answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
}

/// The chain, as the testbed's funder and checker sees it.
struct Chain {
    url: String,
    funder: DynProvider,
}

impl Chain {
    fn new(url: &str, funder: &PrivateKeySigner) -> Result<Self, Error> {
        Ok(Self { url: url.to_owned(), funder: wallet(url, funder)? })
    }

    fn as_key(&self, key: &PrivateKeySigner) -> Result<DynProvider, Error> {
        wallet(&self.url, key)
    }

    /// Gives `address` 10 ETH for gas.
    async fn fund(&self, address: Address) -> Result<(), Error> {
        let request = alloy::rpc::types::TransactionRequest::default()
            .to(address)
            .value(U256::from(10u64) * U256::from(10u64).pow(U256::from(18u64)));
        let pending = self.funder.send_transaction(request).await.map_err(chain_error)?;
        pending.get_receipt().await.map_err(chain_error)?;
        Ok(())
    }
}

/// A provider on the sandbox's chain sending as `key`. Receipts are polled as the
/// registry's chain polls them, not at alloy's 7 s for a node off localhost (the sandbox's
/// chain is on a bridge address).
fn wallet(url: &str, key: &PrivateKeySigner) -> Result<DynProvider, Error> {
    let parsed = url.parse().map_err(|e| Error::Config(format!("the sandbox's RPC URL {url}: {e}")))?;
    let client = alloy::rpc::client::RpcClient::new_http(parsed).with_poll_interval(br2k_resolver::RECEIPT_POLL);
    Ok(ProviderBuilder::new().wallet(EthereumWallet::from(key.clone())).connect_client(client).erased())
}

fn chain_error(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("the testbed's chain: {e}"))
}

/// Reads the chain, every replica's ledger and the leader's status, and compares them
/// with what the users saw.
async fn check(
    sandbox: &Sandbox,
    chain: &Chain,
    token: Address,
    service: Address,
    users: &[PrivateKeySigner],
    logs: &[PayerLog],
) -> Result<PaymentFindings, Error> {
    // The ledgers agree once every replica applied everything (or 60 s passed).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ledgers, in_doubt) = loop {
        let statuses = sandbox.service().statuses().await;
        let ok: Vec<_> = statuses.iter().filter_map(|s| s.as_ref().ok()).collect();
        let leader = ok.iter().find(|s| s.role == br2k_replication::Role::Leader);
        let settled =
            leader.is_some_and(|l| l.in_doubt.is_empty() && ok.iter().all(|s| s.applied_index == ok[0].applied_index));
        let mut ledgers = Vec::new();
        for i in 0..sandbox.service().len() {
            ledgers.push(
                read_ledger(&sandbox.service().app_data_dir(i))
                    .map_err(|e| Error::Log { node: i + 1, reason: format!("{e:#}") })?,
            );
        }
        let identical = ledgers.iter().all(|l| *l == ledgers[0]);
        if (settled && identical) || Instant::now() >= deadline {
            break (ledgers, leader.map(|l| l.in_doubt.clone()).unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ledger = ledgers.iter().max_by_key(|l| l.len()).cloned().unwrap_or_default();
    let mut paid: BTreeMap<Address, U256> = BTreeMap::new();
    let mut deposited: BTreeMap<Address, U256> = BTreeMap::new();
    let (mut payout_hashes, mut deposit_hashes) = (HashSet::new(), HashSet::new());
    for line in &ledger {
        match &line.effect {
            Effect::Payout { user, amount, hash } => {
                *paid.entry(*user).or_default() += *amount;
                payout_hashes.insert(*hash);
            }
            Effect::Deposit { user, amount, hash } => {
                *deposited.entry(*user).or_default() += *amount;
                deposit_hashes.insert(*hash);
            }
            Effect::Grant { .. } => {}
        }
    }
    let filter = Filter::new()
        .address(token)
        .event_signature(PaymentToken::Transfer::SIGNATURE_HASH)
        .from_block(0)
        .topic1(service.into_word());
    let transfers = chain.funder.get_logs(&filter).await.map_err(chain_error)?;
    let on_chain: HashSet<B256> = transfers.iter().filter_map(|log| log.transaction_hash).collect();
    let mut findings = PaymentFindings {
        payouts_acknowledged: logs.iter().map(|l| l.payouts.len() as u64).sum(),
        deposits_acknowledged: logs.iter().map(|l| l.deposits.len() as u64).sum(),
        unacknowledged: logs.iter().map(|l| l.failed.len() as u64).sum(),
        unacknowledged_reasons: logs.iter().flat_map(|l| l.failed.iter().cloned()).take(5).collect(),
        payouts_resumed: logs.iter().map(|l| l.resumed).sum(),
        transfers_on_chain: transfers.len() as u64,
        service_transactions: chain.funder.get_transaction_count(service).await.map_err(chain_error)?,
        payouts_in_ledger: payout_hashes.len() as u64,
        ledgers_identical: ledgers.iter().all(|l| *l == ledgers[0]),
        in_doubt_at_end: in_doubt,
        ..PaymentFindings::default()
    };
    findings.double_payments = findings.transfers_on_chain.saturating_sub(findings.payouts_in_ledger);
    findings.lost_payouts = logs
        .iter()
        .flat_map(|l| &l.payouts)
        .filter(|(_, hash)| !on_chain.contains(hash) || !payout_hashes.contains(hash))
        .count() as u64;
    findings.lost_deposits =
        logs.iter().flat_map(|l| &l.deposits).filter(|hash| !deposit_hashes.contains(*hash)).count() as u64;
    let reader = PaymentToken::new(token, &chain.funder);
    for user in users.iter().map(PrivateKeySigner::address) {
        let balance = reader.balanceOf(user).call().await.map_err(chain_error)?;
        let expected = paid
            .get(&user)
            .copied()
            .unwrap_or_default()
            .saturating_sub(deposited.get(&user).copied().unwrap_or_default());
        if balance != expected {
            findings.balance_mismatches += 1;
        }
    }
    let mut latencies: Vec<u64> = logs.iter().flat_map(|l| l.latencies.iter().copied()).collect();
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    findings.latency_ms = (at(0.5), at(0.99));
    Ok(findings)
}
