//! The chain under a payments run, made to behave like a real one: a block every few
//! seconds, payouts settled only N blocks deep, several RPC endpoints (each behind a
//! [`Relay`]), and the chain's own faults, struck beside the attacker's node faults:
//! reorganisations below and above the confirmation depth, and an endpoint that stops
//! answering.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::{DynProvider, Provider};
use br2k_test_utils::Relay;
use serde::Serialize;

use crate::attacker::Rng;
use crate::millis;

/// What the chain is like, and what is done to it.
#[derive(Clone, Debug)]
pub struct ChainSettings {
    /// Seconds between blocks; `None`: a block per transaction, at once (anvil's automine).
    pub block_time: Option<u64>,
    /// How deep a payout must be to count as paid (the payment service's --confirmations).
    pub confirmations: u64,
    /// RPC endpoints the payment service's outbox is given, each a relay to the chain; 1:
    /// the chain itself.
    pub endpoints: usize,
    /// The chain's fault, if any.
    pub fault: Option<ChainFault>,
    /// The wait before each chain fault is drawn anew from this range.
    pub interval: (Duration, Duration),
}

impl Default for ChainSettings {
    fn default() -> Self {
        Self {
            block_time: None,
            confirmations: 1,
            endpoints: 1,
            fault: None,
            interval: (Duration::from_secs(20), Duration::from_secs(40)),
        }
    }
}

impl ChainSettings {
    /// Whether these settings are other than a plain automining chain, which only the
    /// payments workload has a use for.
    pub fn is_default(&self) -> bool {
        self.block_time.is_none() && self.confirmations == 1 && self.endpoints == 1 && self.fault.is_none()
    }

    /// Why these settings cannot be run, if they cannot.
    pub fn problem(&self) -> Option<String> {
        if self.block_time.is_some_and(|t| t == 0 || t > 60) {
            return Some("the block time must be 1 to 60 seconds".into());
        }
        if self.confirmations == 0 || self.confirmations > 64 {
            return Some(format!("confirmations must be 1 to 64, not {}", self.confirmations));
        }
        if self.endpoints == 0 || self.endpoints > 8 {
            return Some(format!("RPC endpoints must be 1 to 8, not {}", self.endpoints));
        }
        match self.fault {
            Some(ChainFault::Reorg) if self.confirmations < 2 => Some(
                "a reorg below the confirmation depth needs --confirmations 2 or more (at 1, every reorg is deeper \
                 than a settled payout: use deep-reorg)"
                    .into(),
            ),
            Some(ChainFault::Rpc) if self.endpoints < 2 => {
                Some("the rpc fault cuts one of several endpoints: give --rpc-endpoints 2 or more".into())
            }
            _ if self.interval.0.is_zero() || self.interval.0 > self.interval.1 => Some(format!(
                "the chain fault interval {:?}..{:?} must be non-empty and above zero",
                self.interval.0, self.interval.1
            )),
            _ => None,
        }
    }

    /// How many blocks a reorg of `kind` replaces.
    pub const fn depth(&self, kind: ChainFault) -> u64 {
        match kind {
            // One block short of a settled payout: what was shallow is dropped, nothing
            // settled is.
            ChainFault::Reorg => self.confirmations - 1,
            // Past the depth: payouts answered as paid leave the chain.
            ChainFault::DeepReorg => self.confirmations + 1,
            ChainFault::Rpc => 0,
        }
    }
}

/// A fault of the chain rather than of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChainFault {
    /// The last `confirmations - 1` blocks are replaced by empty ones (`anvil_reorg`):
    /// transactions mined but not yet deep enough leave the chain.
    Reorg,
    /// The last `confirmations + 1` blocks are replaced: a payout already answered as paid
    /// leaves the chain (a finality violation the service must detect and repair).
    DeepReorg,
    /// One of the outbox's RPC endpoints stops answering (its relay holds every
    /// connection unanswered) for the fault's duration.
    Rpc,
}

impl std::str::FromStr for ChainFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reorg" => Ok(Self::Reorg),
            "deep-reorg" => Ok(Self::DeepReorg),
            "rpc" => Ok(Self::Rpc),
            _ => Err(format!("unknown chain fault {s:?}: expected reorg, deep-reorg or rpc")),
        }
    }
}

impl std::fmt::Display for ChainFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reorg => "reorg",
            Self::DeepReorg => "deep-reorg",
            Self::Rpc => "rpc",
        })
    }
}

/// One chain fault as it happened.
#[derive(Clone, Debug, Serialize)]
pub struct ChainFaultEvent {
    /// What.
    pub kind: ChainFault,
    /// When, from the start of the run (milliseconds).
    pub at_ms: u64,
    /// For a reorg: how many blocks were replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub depth: Option<u64>,
    /// For a reorg: the service's transactions in the replaced blocks (the outbox must
    /// broadcast them again).
    pub service_transactions_dropped: u64,
    /// For a reorg: other senders' transactions in the replaced blocks, given back to the
    /// pool as real nodes do (anvil drops them).
    pub others_put_back: u64,
    /// For the rpc fault: which endpoint (0-based, in the order the outbox prefers them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<usize>,
    /// Why the fault could not be struck, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The outbox's RPC endpoints: relays to the chain, on the host's address the nodes
/// reach. Dropped: they stop.
pub struct Endpoints {
    relays: Vec<Relay>,
}

impl Endpoints {
    /// `n` relays to `chain_url` on `host`; none for `n == 1` (the outbox then uses the
    /// chain's own URL, as the replicas do).
    ///
    /// # Errors
    /// A relay's port cannot be bound.
    pub fn start(n: usize, host: IpAddr, chain_url: &str) -> std::io::Result<Self> {
        let relays =
            if n < 2 { Vec::new() } else { (0..n).map(|_| Relay::start(host, chain_url)).collect::<Result<_, _>>()? };
        Ok(Self { relays })
    }

    /// The payment service's arguments that give it these endpoints.
    pub fn app_args(&self) -> Vec<String> {
        self.relays.iter().flat_map(|relay| ["--payments-rpc-url".to_owned(), relay.url().to_owned()]).collect()
    }

    fn mend_all(&self) {
        for relay in &self.relays {
            relay.mend();
        }
    }
}

/// Strikes the chain faults until told to stop.
pub struct ChainAttacker {
    /// The chain itself (not through a relay).
    pub chain: DynProvider,
    /// The outbox's endpoints.
    pub endpoints: Arc<Endpoints>,
    /// The service's address: its transactions are the outbox's to bring back.
    pub service: Address,
    /// What to strike and how often.
    pub settings: ChainSettings,
    /// How long an rpc fault lasts.
    pub duration: Duration,
    /// Seed of its choices.
    pub seed: u64,
}

impl ChainAttacker {
    /// Strikes a fault after every wait drawn from the interval, until `stop` is set;
    /// returns what it did. Every endpoint answers again when it returns.
    pub async fn run(
        self,
        stop: Arc<AtomicBool>,
        start: Instant,
        progress: &(dyn Fn(&str) + Sync),
    ) -> Vec<ChainFaultEvent> {
        let mut events = Vec::new();
        let Some(kind) = self.settings.fault else { return events };
        // Its own stream of choices, apart from the node attacker's.
        let mut rng = Rng::new(self.seed ^ 0x00C4_A1F0_0000_0001);
        let stopped = || stop.load(Ordering::SeqCst);
        loop {
            if sleep_unless(rng.between(self.settings.interval.0, self.settings.interval.1), &stopped).await {
                break;
            }
            let at_ms = millis(start.elapsed());
            let mut event = ChainFaultEvent {
                kind,
                at_ms,
                depth: None,
                service_transactions_dropped: 0,
                others_put_back: 0,
                endpoint: None,
                error: None,
            };
            match kind {
                ChainFault::Reorg | ChainFault::DeepReorg => {
                    let depth = self.settings.depth(kind);
                    event.depth = Some(depth);
                    match self.reorg(depth).await {
                        Ok((dropped, put_back)) => {
                            event.service_transactions_dropped = dropped;
                            event.others_put_back = put_back;
                            progress(&format!(
                                "{:>6.1} s: {kind} of {depth} blocks dropped {dropped} of the service's transactions",
                                start.elapsed().as_secs_f64()
                            ));
                        }
                        Err(reason) => {
                            progress(&format!("{kind} not struck: {reason}"));
                            event.error = Some(reason);
                        }
                    }
                }
                ChainFault::Rpc => {
                    let which = rng.below(self.endpoints.relays.len());
                    event.endpoint = Some(which);
                    self.endpoints.relays[which].cut();
                    progress(&format!(
                        "{:>6.1} s: RPC endpoint {} stops answering for {:?}",
                        start.elapsed().as_secs_f64(),
                        which + 1,
                        self.duration
                    ));
                    let _ = sleep_unless(self.duration, &stopped).await;
                    self.endpoints.relays[which].mend();
                }
            }
            tracing::info!(?event, "chain fault");
            events.push(event);
        }
        self.endpoints.mend_all();
        events
    }

    /// Replaces the last `depth` blocks with empty ones. Mining is held meanwhile, so
    /// the blocks read are the blocks replaced. The service's transactions in them are
    /// left out (the outbox must notice and broadcast them again); everyone else's go
    /// back to the pool, as a real node's do after a reorg (anvil drops them).
    async fn reorg(&self, depth: u64) -> Result<(u64, u64), String> {
        let rpc = |e: alloy::transports::TransportError| e.to_string();
        let call = |method: &'static str, params: serde_json::Value| async move {
            self.chain.raw_request::<_, serde_json::Value>(method.into(), params).await.map_err(rpc)
        };
        match self.settings.block_time {
            Some(seconds) => {
                call("evm_setIntervalMining", serde_json::json!([0])).await?;
                let result = self.replace_blocks(depth).await;
                call("evm_setIntervalMining", serde_json::json!([seconds])).await?;
                result
            }
            None => {
                call("evm_setAutomine", serde_json::json!([false])).await?;
                let result = self.replace_blocks(depth).await;
                call("evm_setAutomine", serde_json::json!([true])).await?;
                // What arrived meanwhile waits in the pool: mine it.
                call("evm_mine", serde_json::json!([])).await?;
                result
            }
        }
    }

    async fn replace_blocks(&self, depth: u64) -> Result<(u64, u64), String> {
        let rpc = |e: alloy::transports::TransportError| e.to_string();
        let head = self.chain.get_block_number().await.map_err(rpc)?;
        // Never below the token and the registry the run stands on.
        if head < depth + 10 {
            return Err(format!("the chain is only {head} blocks long"));
        }
        let (mut dropped, mut others) = (0, Vec::new());
        for number in head + 1 - depth..=head {
            let block: serde_json::Value = self
                .chain
                .raw_request("eth_getBlockByNumber".into(), (format!("{number:#x}"), true))
                .await
                .map_err(rpc)?;
            for tx in block["transactions"].as_array().into_iter().flatten() {
                let from: Address = serde_json::from_value(tx["from"].clone()).map_err(|e| e.to_string())?;
                let hash: B256 = serde_json::from_value(tx["hash"].clone()).map_err(|e| e.to_string())?;
                if from == self.service {
                    dropped += 1;
                } else {
                    let raw: Bytes =
                        self.chain.raw_request("eth_getRawTransactionByHash".into(), (hash,)).await.map_err(rpc)?;
                    others.push(raw);
                }
            }
        }
        let _: serde_json::Value =
            self.chain.raw_request("anvil_reorg".into(), (depth, Vec::<()>::new())).await.map_err(rpc)?;
        let mut put_back = 0;
        for raw in others {
            if self.chain.send_raw_transaction(&raw).await.is_ok() {
                put_back += 1;
            }
        }
        Ok((dropped, put_back))
    }
}

/// Sleeps `wait`, returning early (true) once `stopped` says so.
async fn sleep_unless(wait: Duration, stopped: &dyn Fn() -> bool) -> bool {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if stopped() {
            return true;
        }
        tokio::time::sleep((until - Instant::now()).min(Duration::from_millis(100))).await;
    }
    stopped()
}
