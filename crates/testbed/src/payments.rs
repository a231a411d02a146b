//! The payments workload (`br2k testbed --workload payments`): the payment service
//! (`examples/payments`) under the same attacker, with users paid out and paying back,
//! and a checker that reads the chain itself: every acknowledged payout is exactly one
//! transfer on chain, no payout was paid twice, every acknowledged deposit is recorded,
//! and every replica's ledger equals the chain's token balances.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use br2k_deploy::local::{ChainChoice, EtcdTimings, LocalChain, LocalChainOptions, Sandbox, SandboxSpec};
use br2k_payments::{Effect, PaymentToken, read_ledger};
use br2k_resolver::{FailoverClient, Request, Resolver, ResolverConfig};
use serde::Serialize;

use crate::chain::{ChainAttacker, ChainFaultEvent, Endpoints};
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
    /// The user.
    user: Address,
    /// Acknowledged payouts: the request's sequence number and the transaction its answer
    /// named.
    payouts: Vec<(u64, B256)>,
    /// Acknowledged deposits: the user's transaction.
    deposits: Vec<B256>,
    /// Requests given up on or refused, with why.
    failed: Vec<String>,
    /// Latency of each acknowledged request (ms).
    latencies: Vec<u64>,
    /// Latency of each acknowledged payout (ms).
    payout_latencies: Vec<u64>,
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
    /// The same of payouts alone (a deposit also waits for the user's own transfer).
    pub payout_latency_ms: (u64, u64),
    /// Time users went without an answer after each fault.
    pub gaps: Gaps,
    /// The chain: its block time, the confirmation depth, the outbox's endpoints, and what
    /// was done to it.
    pub chain: ChainFindings,
}

/// What the chain was like, what was done to it, and what the service saw of it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChainFindings {
    /// Seconds between blocks (`None`: a block per transaction).
    pub block_time: Option<u64>,
    /// The confirmation depth payouts waited for.
    pub confirmations: u64,
    /// The outbox's RPC endpoints.
    pub endpoints: usize,
    /// The lowest a payout's latency can be: confirmations x block time (ms).
    pub latency_floor_ms: u64,
    /// The chain faults struck.
    pub faults: Vec<ChainFaultEvent>,
    /// The service's transactions the reorgs dropped from the chain.
    pub service_transactions_reorged_out: u64,
    /// Rebroadcasts of a dropped, not yet deep enough transaction, counted by the replicas
    /// running at the end (a killed replica's count is lost with it: a lower bound).
    pub reorg_rebroadcasts: u64,
    /// Finality violations the replicas running at the end detected (a payout answered as
    /// paid that left the chain).
    pub finality_violations_detected: u64,
    /// Of them, still not back on chain at the end.
    pub finality_violations_open: u64,
    /// Where the chain's final state was dumped (`anvil --load-state` loads it again).
    pub state_file: Option<String>,
    /// Where every acknowledged payout's hash was written.
    pub payouts_file: Option<String>,
    /// Whether the chain checks ran on a fresh chain loaded from that dump.
    pub checked_from_dump: bool,
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
            && self.chain.finality_violations_open == 0
            && self.chain.checked_from_dump
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
        let (p50, p99) = self.payout_latency_ms;
        let _ = writeln!(out, "| payout latency p50 / p99 | {p50} ms / {p99} ms |");
        if self.gaps.faults > 0 {
            let seconds = |ms: u64| format!("{:.2} s", ms as f64 / 1000.0);
            let _ = writeln!(
                out,
                "| failover gap, median / max | {} / {} |",
                seconds(self.gaps.median_ms),
                seconds(self.gaps.max_ms)
            );
        }
        let chain = &self.chain;
        let block_time = chain.block_time.map_or_else(|| "a block per transaction".into(), |t| format!("{t} s"));
        let _ = writeln!(
            out,
            "| block time / confirmations / RPC endpoints | {block_time} / {} / {} |",
            chain.confirmations, chain.endpoints
        );
        let _ = writeln!(out, "| payout latency floor (confirmations x block time) | {} ms |", chain.latency_floor_ms);
        if !chain.faults.is_empty() {
            let _ = writeln!(
                out,
                "| chain faults struck | {} |",
                chain.faults.iter().filter(|f| f.error.is_none()).count()
            );
            let _ =
                writeln!(out, "| service transactions reorganised out | {} |", chain.service_transactions_reorged_out);
            let _ = writeln!(
                out,
                "| rebroadcasts after a reorg (replicas running at the end) | {} |",
                chain.reorg_rebroadcasts
            );
            let _ = writeln!(
                out,
                "| finality violations detected / still open | {} / {} |",
                chain.finality_violations_detected, chain.finality_violations_open
            );
        }
        let _ = writeln!(
            out,
            "| chain checked from its dumped state | {} |",
            if chain.checked_from_dump { "yes" } else { "NO" }
        );
        for reason in &self.unacknowledged_reasons {
            let _ = writeln!(out, "\nnot acknowledged: {reason}");
        }
        let _ = writeln!(out, "\nVerdict: {}", if self.passed() { "PASSED" } else { "FAILED" });
        out
    }
}

/// Runs the payments workload under `config`'s attacker (and its chain's, if any); returns
/// the findings and how many node faults were injected.
///
/// # Errors
/// When the run could not be carried out.
pub async fn run(config: TestbedConfig, progress: &(dyn Fn(&str) + Sync)) -> Result<(PaymentFindings, usize), Error> {
    config.check()?;
    if matches!(config.fault, crate::FaultKind::Replace | crate::FaultKind::ScaleDrill) {
        return Err(Error::Config(
            "--fault replace and --scale-drill run with the log server workload only, for now".into(),
        ));
    }
    let settings = config.chain.clone();
    // Keys made now, so the replicas can be told them before the chain exists: the
    // service's (it pays), the token's deployer (the token's address is its first
    // contract's), and the users'.
    let service_key = PrivateKeySigner::random();
    let deployer = PrivateKeySigner::random();
    let token = deployer.address().create(0);
    let operator = format!("op-{}", alloy::hex::encode(PrivateKeySigner::random().address()));
    let users: Vec<PrivateKeySigner> = (0..config.users).map(|_| PrivateKeySigner::random()).collect();
    let timing = OutboxTiming::for_chain(settings.block_time.unwrap_or(0), settings.confirmations);
    let spec = SandboxSpec {
        service: SERVICE.into(),
        replicas: config.replicas,
        retired: Vec::new(),
        app: config.app.clone(),
        app_args: timing.app_args(settings.confirmations),
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
        chain: ChainChoice::Local(LocalChainOptions {
            block_time: settings.block_time.map(Duration::from_secs),
            dump_state: true,
            load_state: None,
        }),
        startup_timeout: Duration::from_secs(30),
        disks: config.fault.disks(),
        etcd_tls: false,
    };
    // The outbox's endpoints are relays to the chain, started once the chain is up.
    let mut endpoints = None;
    let mut sandbox = Sandbox::start_then(spec, progress, |chain_url, host| {
        let started = Endpoints::start(settings.endpoints, host, chain_url).map_err(|source| {
            br2k_deploy::DeployError::Io { action: "starting the RPC endpoints' relays".into(), source }
        })?;
        let args = started.app_args();
        endpoints = Some(Arc::new(started));
        Ok(args)
    })
    .await?;
    let endpoints = endpoints.expect("set before the replicas start");
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
                // A payout is answered once it is deep enough: an attempt waits that long.
                attempt_timeout: timing.settle_within + Duration::from_secs(5),
            };
            tokio::spawn(payer.run(resolver.clone(), config.clone(), Arc::clone(&counters), start))
        })
        .collect();
    let total = config.users as u64 * config.requests_per_user;
    progress(&format!(
        "{} users x {} requests (payouts, every {DEPOSIT_EVERY}th a deposit) at {}/s, {} in flight each; attacker: {} \
         on {} every {:?}..{:?} for {:?}; chain: {}, {} confirmations, {} RPC endpoints, fault {} (seed {})",
        config.users,
        config.requests_per_user,
        config.rate,
        config.in_flight,
        config.fault,
        config.target,
        config.interval.0,
        config.interval.1,
        config.duration,
        settings.block_time.map_or_else(|| "a block per transaction".into(), |t| format!("a block every {t} s")),
        settings.confirmations,
        settings.endpoints,
        settings.fault.map_or_else(|| "none".into(), |f| f.to_string()),
        config.seed
    ));
    let chain_attacker = ChainAttacker {
        chain: chain.funder.clone(),
        endpoints: Arc::clone(&endpoints),
        service: service_key.address(),
        settings: settings.clone(),
        duration: config.duration,
        seed: config.seed,
    };
    let stop_chain_faults = Arc::new(AtomicBool::new(false));
    let (faults, chain_faults) = tokio::join!(
        async {
            let faults = crate::attack(&mut sandbox, &config, &tasks, start, &counters, total, progress).await;
            stop_chain_faults.store(true, Ordering::SeqCst);
            faults
        },
        chain_attacker.run(Arc::clone(&stop_chain_faults), start, progress),
    );
    let faults = faults?;
    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await.map_err(|e| Error::User(e.to_string()))?);
    }
    // Its registry watch would only complain once the chain is stopped below.
    drop(resolver);
    let end_ms = millis(start.elapsed());
    progress(&format!(
        "users done in {:.1} s; healing every node and waiting for the ledgers to agree",
        start.elapsed().as_secs_f64()
    ));
    sandbox.service_mut().heal_all().await?;
    let payouts_file = config.work_dir.join("payouts.jsonl");
    write_payouts(&payouts_file, &logs)
        .map_err(|e| Error::Config(format!("writing {}: {e}", payouts_file.display())))?;
    let settled = settle(&sandbox, &chain, service_key.address()).await?;
    // The chain checks run on the chain's dumped state, loaded into a fresh anvil: what
    // anyone can load again from the work directory and check.
    progress("stopping the chain (its state dumped) and loading that state into a fresh chain to check it");
    let state = sandbox.stop_chain(Duration::from_secs(60)).await?;
    let reloaded = match &state {
        Some(state) => Some(
            LocalChain::start(
                std::net::Ipv4Addr::LOCALHOST.into(),
                1,
                &config.work_dir.join("reloaded-chain"),
                &LocalChainOptions { block_time: None, dump_state: false, load_state: Some(state.clone()) },
                Duration::from_secs(60),
            )
            .await?,
        ),
        None => None,
    };
    let checking = match &reloaded {
        Some(reloaded) => Chain::new(reloaded.url(), &funder)?,
        None => chain,
    };
    let mut findings = check(&settled, &checking, token, service_key.address(), &users, &logs).await?;
    findings.gaps = gaps(logs.iter().flat_map(|l| l.answered_at.iter().copied()).collect(), &faults, end_ms);
    findings.chain = ChainFindings {
        block_time: settings.block_time,
        confirmations: settings.confirmations,
        endpoints: settings.endpoints,
        latency_floor_ms: settings.confirmations * settings.block_time.unwrap_or(0) * 1000,
        service_transactions_reorged_out: chain_faults.iter().map(|f| f.service_transactions_dropped).sum(),
        faults: chain_faults,
        reorg_rebroadcasts: settled.reorg_rebroadcasts,
        finality_violations_detected: settled.violations_detected,
        finality_violations_open: settled.violations_open,
        state_file: state.as_ref().map(|s| s.display().to_string()),
        payouts_file: Some(payouts_file.display().to_string()),
        checked_from_dump: reloaded.is_some(),
    };
    drop(reloaded);
    sandbox.shutdown().await;
    Ok((findings, faults.len()))
}

/// The outbox's timing on a chain of `block_time` seconds (0: a block per transaction)
/// at `confirmations`: a payout may take a few blocks to be mined and `confirmations`
/// more to be deep enough.
#[derive(Clone, Copy, Debug)]
struct OutboxTiming {
    bump_after: Duration,
    settle_within: Duration,
    handler_timeout: Duration,
}

impl OutboxTiming {
    fn for_chain(block_time: u64, confirmations: u64) -> Self {
        let settle_within = Duration::from_secs(10 + 2 * confirmations * block_time);
        Self {
            bump_after: Duration::from_secs((2 * block_time).max(5)),
            settle_within,
            handler_timeout: settle_within + Duration::from_secs(20),
        }
    }

    fn app_args(self, confirmations: u64) -> Vec<String> {
        [
            ("--settle-within", self.settle_within.as_secs()),
            ("--bump-after", self.bump_after.as_secs()),
            ("--handler-timeout", self.handler_timeout.as_secs()),
            ("--confirmations", confirmations),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_owned(), value.to_string()])
        .collect()
    }
}

/// Every acknowledged payout, a JSON line each (user, sequence number, transaction), for
/// checking against the dumped chain afterwards.
fn write_payouts(path: &std::path::Path, logs: &[PayerLog]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for log in logs {
        for (seq, hash) in &log.payouts {
            let line = serde_json::json!({ "user": log.user, "seq": seq, "hash": hash });
            writeln!(file, "{line}")?;
        }
    }
    file.flush()
}

/// One payments user: it sends its requests at its rate, with up to `in_flight` of them
/// waiting for their answers at once (a payout is answered only once it is deep enough).
struct Payer {
    key: PrivateKeySigner,
    token: Address,
    service: Address,
    operator: String,
    rpc_url: String,
    run_id: String,
    attempt_timeout: Duration,
}

/// What one of a user's requests came to.
enum Answered {
    Payout { hash: B256, resumed: bool },
    Deposit(B256),
}

impl Payer {
    async fn run(self, resolver: Resolver, config: TestbedConfig, progress: Arc<Progress>, start: Instant) -> PayerLog {
        use futures::StreamExt as _;
        let user = self.key.address();
        let mut log = PayerLog { user, ..PayerLog::default() };
        let failover = br2k_resolver::FailoverConfig {
            attempt_timeout: self.attempt_timeout,
            ..failover_config(config.give_up_after, 0)
        };
        let client = match FailoverClient::new(resolver, SERVICE, failover) {
            Ok(client) => client,
            Err(e) => {
                log.failed.push(e.to_string());
                return log;
            }
        };
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
        // Deposits one at a time (the wallet takes each nonce from the chain), each once
        // the user holds a unit more than it has paid back.
        let depositing = tokio::sync::Mutex::new(0u64);
        let paid = AtomicU64::new(0);
        let period = Duration::from_secs_f64(1.0 / config.rate);
        let first = Instant::now();
        let (this, client, token, depositing, paid) = (&self, &client, &token, &depositing, &paid);
        let mut answers = futures::stream::iter(1..=config.requests_per_user)
            .map(|seq| async move {
                tokio::time::sleep_until((first + period * u32::try_from(seq - 1).unwrap_or(u32::MAX)).into()).await;
                let sent = Instant::now();
                let result = if seq % DEPOSIT_EVERY == 0 {
                    this.deposit(client, token, seq, depositing, paid, config.give_up_after)
                        .await
                        .map(Answered::Deposit)
                } else {
                    this.payout(client, user, seq).await.inspect(|_| {
                        paid.fetch_add(1, Ordering::SeqCst);
                    })
                };
                (seq, sent.elapsed(), result)
            })
            .buffer_unordered(config.in_flight.max(1));
        while let Some((seq, took, result)) = answers.next().await {
            match result {
                Ok(answer) => {
                    match answer {
                        Answered::Payout { hash, resumed } => {
                            log.payouts.push((seq, hash));
                            log.resumed += u64::from(resumed);
                            log.payout_latencies.push(millis(took));
                        }
                        Answered::Deposit(hash) => log.deposits.push(hash),
                    }
                    log.latencies.push(millis(took));
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

    /// A payout of one unit, until answered.
    async fn payout(&self, client: &FailoverClient, user: Address, seq: u64) -> Result<Answered, String> {
        let answer = answered(client, &self.signed_payout(user, seq).await?).await?;
        let hash = serde_json::from_value::<B256>(answer["payout"]["hash"].clone())
            .map_err(|e| format!("the payout's answer names no transaction: {e}: {answer}"))?;
        Ok(Answered::Payout { hash, resumed: answer["resumed"] == true })
    }

    /// Transfers one token unit back to the service, as a wallet does: the transaction is
    /// signed once and its bytes sent again every 10 s until it is mined (a reorg may drop
    /// it from the chain, and a node's pool may lose it), until `deadline`. Returns its hash.
    async fn transfer_one_back(&self, chain: &impl Provider, deadline: Instant) -> Result<B256, String> {
        use alloy::eips::eip2718::Encodable2718;
        use alloy::network::{NetworkTransactionBuilder, TransactionBuilder};
        use alloy::sol_types::SolCall;
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("deposit transfer: {what}: {e}");
        let user = self.key.address();
        let nonce = chain.get_transaction_count(user).pending().await.map_err(|e| fail("nonce", &e))?;
        let fees = chain.estimate_eip1559_fees().await.map_err(|e| fail("fees", &e))?;
        let chain_id = chain.get_chain_id().await.map_err(|e| fail("chain id", &e))?;
        let call = PaymentToken::transferCall { to: self.service, value: U256::from(1) }.abi_encode();
        let envelope: alloy::consensus::TxEnvelope = alloy::rpc::types::TransactionRequest::default()
            .with_to(self.token)
            .with_input(call)
            .with_nonce(nonce)
            .with_chain_id(chain_id)
            // A transfer between two funded accounts needs about 35,000; a fixed limit, so
            // that the bytes sent again are the same transaction.
            .with_gas_limit(100_000)
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas)
            .build(&EthereumWallet::from(self.key.clone()))
            .await
            .map_err(|e| fail("signing", &e))?;
        let (raw, hash) = (envelope.encoded_2718(), *envelope.tx_hash());
        loop {
            // "Already known" (it is in the pool) is the usual answer to a resend.
            let _ = chain.send_raw_transaction(&raw).await;
            let resend_at = Instant::now() + Duration::from_secs(10);
            while Instant::now() < resend_at {
                if let Ok(Some(receipt)) = chain.get_transaction_receipt(hash).await {
                    return if receipt.status() { Ok(hash) } else { Err(format!("deposit transfer {hash} reverted")) };
                }
                if Instant::now() >= deadline {
                    return Err(format!("deposit transfer {hash}: not mined within the user's patience"));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
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
        depositing: &tokio::sync::Mutex<u64>,
        paid: &AtomicU64,
        give_up_after: Duration,
    ) -> Result<B256, String> {
        let mut deposited = depositing.lock().await;
        let deadline = Instant::now() + give_up_after;
        while paid.load(Ordering::SeqCst) <= *deposited {
            if Instant::now() >= deadline {
                return Err("deposit: the user was never paid a unit to pay back".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let hash = self.transfer_one_back(token.provider(), deadline).await?;
        *deposited += 1;
        drop(deposited);
        let body = serde_json::json!({ "hash": hash }).to_string();
        let record = Request::post("/deposits", body);
        // Not yet deep enough: the answer says so (409) and a new key asks again.
        let mut attempt = 0;
        loop {
            let key = if attempt == 0 {
                format!("{}-{seq}", self.run_id)
            } else {
                format!("{}-{seq}-{attempt}", self.run_id)
            };
            match answered(client, &record.clone().idempotency_key(key)).await {
                Ok(_) => return Ok(hash),
                // "not mined yet", or "under 1 of the 3 blocks asked for; try again shortly"
                Err(reason)
                    if reason.contains("409")
                        && (reason.contains("not mined") || reason.contains("try again shortly"))
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    attempt += 1;
                }
                Err(reason) => return Err(format!("deposit record: {reason}")),
            }
        }
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

/// The service once it has settled after the run: every replica's ledger, what the
/// leader still has in doubt, and the outbox's reorg counts.
struct Settled {
    ledgers: Vec<Vec<br2k_payments::Line>>,
    in_doubt: Vec<u64>,
    reorg_rebroadcasts: u64,
    violations_detected: u64,
    violations_open: u64,
}

/// Waits (up to 120 s) until the service has settled: a leader with nothing in doubt,
/// every replica at the same index with the same ledger, no payout off the chain that a
/// replica knows of, and nothing of the service's waiting in the chain's pool.
async fn settle(sandbox: &Sandbox, chain: &Chain, service: Address) -> Result<Settled, Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let statuses = sandbox.service().statuses().await;
        let ok: Vec<_> = statuses.iter().filter_map(|s| s.as_ref().ok()).collect();
        let leader = ok.iter().find(|s| s.role == br2k_replication::Role::Leader);
        let outboxes = || ok.iter().filter_map(|s| s.outbox.as_ref());
        let violations_open = outboxes()
            .flat_map(|o| &o.finality_violations)
            .filter(|v| v.back_in_block.is_none())
            .map(|v| (v.index, v.seq))
            .collect::<HashSet<_>>()
            .len() as u64;
        let pool_empty = {
            let latest = chain.funder.get_transaction_count(service).await.map_err(chain_error)?;
            let pending = chain.funder.get_transaction_count(service).pending().await.map_err(chain_error)?;
            latest == pending
        };
        let settled = leader.is_some_and(|l| l.in_doubt.is_empty())
            && ok.iter().all(|s| s.applied_index == ok[0].applied_index)
            && violations_open == 0
            && pool_empty;
        let mut ledgers = Vec::new();
        for i in 0..sandbox.service().len() {
            ledgers.push(
                read_ledger(&sandbox.service().app_data_dir(i))
                    .map_err(|e| Error::Log { node: i + 1, reason: format!("{e:#}") })?,
            );
        }
        let identical = ledgers.iter().all(|l| *l == ledgers[0]);
        if (settled && identical) || Instant::now() >= deadline {
            return Ok(Settled {
                ledgers,
                in_doubt: leader.map(|l| l.in_doubt.clone()).unwrap_or_default(),
                reorg_rebroadcasts: outboxes().map(|o| o.reorg_rebroadcasts).sum(),
                violations_detected: outboxes().map(|o| o.finality_violations_total).sum(),
                violations_open,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Compares the settled service and what the users saw with the chain.
async fn check(
    settled: &Settled,
    chain: &Chain,
    token: Address,
    service: Address,
    users: &[PrivateKeySigner],
    logs: &[PayerLog],
) -> Result<PaymentFindings, Error> {
    let (ledgers, in_doubt) = (&settled.ledgers, settled.in_doubt.clone());
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
    findings.latency_ms = median_and_p99(logs.iter().flat_map(|l| l.latencies.iter().copied()).collect());
    findings.payout_latency_ms = median_and_p99(logs.iter().flat_map(|l| l.payout_latencies.iter().copied()).collect());
    Ok(findings)
}

/// The median and the 99th percentile of `latencies` (0 for none).
fn median_and_p99(mut latencies: Vec<u64>) -> (u64, u64) {
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
    (at(0.5), at(0.99))
}
