//! A typed client of one chain and the `ServiceRegistry` on it: every call bounded by a
//! timeout, every revert decoded into the bindings' error enum, every transaction waited
//! for until mined. The resolver, the command line and the manager all talk to the
//! registry through this one place.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::network::{Ethereum, EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, B256, U256, keccak256};
use alloy::providers::{
    DynProvider, PendingTransactionBuilder, PendingTransactionError, Provider, ProviderBuilder, WsConnect,
};
use alloy::rpc::client::{ClientBuilder, RpcClient};
use alloy::rpc::types::{Filter, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use br2k_bindings::IServiceRegistry::Body;
use br2k_bindings::ServiceRegistry::{self, ServiceRegistryErrors, ServiceRegistryInstance};
use br2k_bindings::ServiceState;

use crate::error::{Error, Result, from_transport};

/// How long the client waits for the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Bound on one RPC request (a call, a send, a log query).
    pub rpc: Duration,
    /// Bound on waiting for a sent transaction to be mined.
    pub tx: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { rpc: Duration::from_secs(10), tx: Duration::from_secs(120) }
    }
}

/// The service id the registry uses for a name: `keccak256(bytes(name))`.
pub fn service_id(name: &str) -> B256 {
    keccak256(name.as_bytes())
}

/// A connection to one chain's RPC endpoint, optionally with a key to send transactions.
#[derive(Clone, Debug)]
pub struct Chain {
    url: String,
    provider: DynProvider,
    chain_id: u64,
    sender: Option<Address>,
    timeouts: Timeouts,
    pubsub: bool,
}

/// How often a sent transaction's receipt is polled for (HTTP; a WebSocket is told).
pub const RECEIPT_POLL: Duration = Duration::from_millis(250);

impl Chain {
    /// Connects to `url` (`http(s)://` or `ws(s)://`) and reads the chain id, signing with
    /// `signer` when one is given.
    ///
    /// # Errors
    /// `InvalidRpcUrl` for a malformed URL, `Unreachable`/`Timeout` when the node does not answer.
    pub async fn connect(url: &str, signer: Option<PrivateKeySigner>, timeouts: Timeouts) -> Result<Self> {
        let parsed =
            url.parse::<reqwest::Url>().map_err(|e| Error::InvalidRpcUrl { url: url.into(), reason: e.to_string() })?;
        let sender = signer.as_ref().map(PrivateKeySigner::address);
        let pubsub = matches!(parsed.scheme(), "ws" | "wss");
        let client = match parsed.scheme() {
            "http" | "https" => {
                let http = reqwest::Client::builder()
                    .timeout(timeouts.rpc)
                    .connect_timeout(timeouts.rpc)
                    .build()
                    .map_err(|e| Error::InvalidRpcUrl { url: url.into(), reason: e.to_string() })?;
                RpcClient::new_http_with_client(http, parsed)
            }
            "ws" | "wss" => {
                let connect = WsConnect::new(url).with_max_retries(3).with_retry_interval(Duration::from_millis(500));
                bounded(url, "open a WebSocket", timeouts.rpc, ClientBuilder::default().ws(connect))
                    .await?
                    .map_err(|e| from_transport(url, "open a WebSocket", e))?
            }
            other => {
                return Err(Error::InvalidRpcUrl {
                    url: url.into(),
                    reason: format!("scheme {other:?} is not one of http, https, ws, wss"),
                });
            }
        };
        // alloy polls a node that is not on localhost every 7 s for a pending transaction's
        // receipt, so a new leader's location could wait 7 s to be seen published (found
        // by the payments testbed, whose chain is on a bridge address): poll as often as
        // for a local node.
        let client = client.with_poll_interval(RECEIPT_POLL);
        let provider = match signer {
            // Not the default cached nonces: another process may send with the same key.
            Some(key) => ProviderBuilder::default()
                .with_gas_estimation()
                .with_nonce_management(crate::nonce::SharedKeyNonces::default())
                .fetch_chain_id()
                .wallet(EthereumWallet::from(key))
                .connect_client(client)
                .erased(),
            None => ProviderBuilder::new().connect_client(client).erased(),
        };
        let chain_id = bounded(url, "read the chain id", timeouts.rpc, provider.get_chain_id())
            .await?
            .map_err(|e| from_transport(url, "read the chain id", e))?;
        Ok(Self { url: url.into(), provider, chain_id, sender, timeouts, pubsub })
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The latest block's number.
    ///
    /// # Errors
    /// RPC and timeout errors.
    pub async fn block_number(&self) -> Result<u64> {
        let action = "read the latest block number";
        self.bounded(action, self.provider.get_block_number()).await?.map_err(|e| self.transport(action, e))
    }

    /// When block `number` was made, unix seconds; `None` when the node has no such block.
    ///
    /// # Errors
    /// RPC and timeout errors.
    pub async fn block_timestamp(&self, number: u64) -> Result<Option<u64>> {
        let action = "read a block's time";
        let block = self
            .bounded(action, self.provider.get_block_by_number(number.into()))
            .await?
            .map_err(|e| self.transport(action, e))?;
        Ok(block.map(|b| b.header.timestamp))
    }

    /// The chain id the endpoint reported.
    pub const fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// The address transactions are sent from, if the connection has a key.
    pub const fn sender(&self) -> Option<Address> {
        self.sender
    }

    /// Whether the endpoint is a WebSocket (subscriptions available).
    pub const fn is_pubsub(&self) -> bool {
        self.pubsub
    }

    /// The timeouts in force.
    pub const fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The underlying provider.
    pub const fn provider(&self) -> &DynProvider {
        &self.provider
    }

    /// Deploys a new `ServiceRegistry` with the given claim cooldown (seconds).
    ///
    /// # Errors
    /// `NoSigner` without a key; RPC and timeout errors.
    pub async fn deploy_registry(&self, claim_cooldown: u64) -> Result<Deployment> {
        let action = "deploy the ServiceRegistry";
        let call = ServiceRegistry::deploy_builder(self.provider.clone(), claim_cooldown);
        let tx = self.transact(action, None, &call).await?;
        let receipt_address = tx.contract_address.ok_or_else(|| Error::BadChainData {
            registry: Address::ZERO,
            action: action.into(),
            detail: format!("the receipt of {} names no contract address", tx.outcome.hash),
        })?;
        Ok(Deployment { address: receipt_address, chain_id: self.chain_id, claim_cooldown, tx: tx.outcome })
    }

    /// The registry at `address`, after checking that a contract is there.
    ///
    /// # Errors
    /// `NoRegistry` when the address holds no code; RPC and timeout errors.
    pub async fn registry(&self, address: Address) -> Result<RegistryClient> {
        let action = "read the registry's code";
        let code =
            self.bounded(action, self.provider.get_code_at(address)).await?.map_err(|e| self.transport(action, e))?;
        if code.is_empty() {
            return Err(Error::NoRegistry { address, chain_id: self.chain_id });
        }
        Ok(RegistryClient {
            instance: ServiceRegistry::new(address, self.provider.clone()),
            chain: self.clone(),
            first_block: 0,
            claims: Arc::default(),
        })
    }

    /// Runs `fut` under the RPC timeout.
    pub(crate) async fn bounded<T>(&self, action: &str, fut: impl IntoFuture<Output = T>) -> Result<T> {
        bounded(&self.url, action, self.timeouts.rpc, fut).await
    }

    pub(crate) fn transport(&self, action: &str, err: alloy::transports::TransportError) -> Error {
        from_transport(&self.url, action, err)
    }

    /// Maps a contract error: a decodable revert, a transport failure, or undecodable data.
    fn contract_error(&self, registry: Address, action: &str, err: alloy::contract::Error) -> Error {
        if let Some(revert) = err.as_decoded_interface_error::<ServiceRegistryErrors>() {
            return Error::Reverted { action: action.into(), service: None, revert };
        }
        match err {
            alloy::contract::Error::TransportError(e) => self.transport(action, e),
            other => Error::BadChainData { registry, action: action.into(), detail: other.to_string() },
        }
    }

    /// Sends a transaction and waits until it is mined.
    async fn transact<P: Provider, D: CallDecoder>(
        &self,
        action: &str,
        registry: Option<Address>,
        call: &CallBuilder<P, D>,
    ) -> Result<Mined> {
        if self.sender.is_none() {
            return Err(Error::NoSigner { action: action.into() });
        }
        let registry = registry.unwrap_or_default();
        let pending = self.bounded(action, call.send()).await?.map_err(|e| self.contract_error(registry, action, e))?;
        self.wait_mined(action, registry, pending).await
    }

    /// The balance of `address`, in wei.
    ///
    /// # Errors
    /// RPC and timeout errors.
    pub async fn balance(&self, address: Address) -> Result<U256> {
        let action = "read a balance";
        self.bounded(action, self.provider.get_balance(address)).await?.map_err(|e| self.transport(action, e))
    }

    /// Sends `wei` to `to` from the signing key and waits until it is mined.
    ///
    /// # Errors
    /// `NoSigner` without a key; RPC, timeout and failed-transaction errors.
    pub async fn send_value(&self, to: Address, wei: U256) -> Result<TxOutcome> {
        let action = "send funds";
        if self.sender.is_none() {
            return Err(Error::NoSigner { action: action.into() });
        }
        let request = TransactionRequest::default().with_to(to).with_value(wei);
        let pending = self
            .bounded(action, self.provider.send_transaction(request))
            .await?
            .map_err(|e| self.transport(action, e))?;
        Ok(self.wait_mined(action, Address::ZERO, pending).await?.outcome)
    }

    /// Waits (under the transaction timeout) until `pending` is mined and succeeded.
    async fn wait_mined(
        &self,
        action: &str,
        registry: Address,
        pending: PendingTransactionBuilder<Ethereum>,
    ) -> Result<Mined> {
        let hash = *pending.tx_hash();
        tracing::debug!(%hash, "sent a transaction to {action}");
        let receipt = match pending.with_timeout(Some(self.timeouts.tx)).get_receipt().await {
            Ok(receipt) => receipt,
            Err(PendingTransactionError::TxWatcher(_)) => {
                return Err(Error::Timeout {
                    url: crate::error::shown_rpc(&self.url),
                    action: format!("{action} (transaction {hash} not mined)"),
                    after: self.timeouts.tx,
                });
            }
            Err(PendingTransactionError::TransportError(e)) => return Err(self.transport(action, e)),
            Err(other) => {
                return Err(Error::BadChainData { registry, action: action.into(), detail: other.to_string() });
            }
        };
        let block = receipt.block_number.unwrap_or_default();
        if !receipt.status() {
            return Err(Error::TxFailed { action: action.into(), hash, block });
        }
        Ok(Mined {
            contract_address: receipt.contract_address,
            outcome: TxOutcome { hash, block, gas_used: receipt.gas_used },
        })
    }
}

async fn bounded<T>(url: &str, action: &str, after: Duration, fut: impl IntoFuture<Output = T>) -> Result<T> {
    let timed_out = |_| Error::Timeout { url: crate::error::shown_rpc(url), action: action.into(), after };
    tokio::time::timeout(after, fut).await.map_err(timed_out)
}

/// A mined transaction with its receipt.
struct Mined {
    contract_address: Option<Address>,
    outcome: TxOutcome,
}

/// What a mined transaction cost and where it landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxOutcome {
    /// Transaction hash.
    pub hash: B256,
    /// Block it was mined in.
    pub block: u64,
    /// Gas it used.
    pub gas_used: u64,
}

/// A freshly deployed registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deployment {
    /// The registry's address.
    pub address: Address,
    /// The chain it lives on.
    pub chain_id: u64,
    /// Its claim cooldown in seconds.
    pub claim_cooldown: u64,
    /// The deployment transaction.
    pub tx: TxOutcome,
}

/// Where a service's clients should send requests, as the registry says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The leader's location (a URL); empty until a leader publishes itself.
    pub location: String,
    /// The epoch the location was published with.
    pub epoch: u64,
    /// The service's state.
    pub state: ServiceState,
}

/// Everything the registry holds about one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The service name.
    pub name: String,
    /// Its id, `keccak256(name)`.
    pub id: B256,
    /// The leader's location.
    pub location: String,
    /// The location's epoch.
    pub epoch: u64,
    /// The service's state.
    pub state: ServiceState,
    /// The manager.
    pub manager: Address,
    /// A manager-to-be that has not accepted yet (zero when none).
    pub pending_manager: Address,
    /// When the header last changed (unix seconds, block time).
    pub updated_at: u64,
    /// The recovery info.
    pub recovery: Body,
}

/// The latest backup of a service as the registry records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedBackup {
    /// The log index it reaches.
    pub index: u64,
    /// The sha256 digest of its OCI manifest.
    pub digest: B256,
    /// Where to fetch it (`host/repository@sha256:…`).
    pub artifact: String,
    /// When it was recorded (unix seconds, block time).
    pub recorded_at: u64,
}

/// The `ServiceRegistry` at one address on a [`Chain`].
#[derive(Clone, Debug)]
pub struct RegistryClient {
    chain: Chain,
    instance: ServiceRegistryInstance<DynProvider>,
    /// Where the registry's event history starts (its deployment block, when known).
    first_block: u64,
    /// Held while a claim is checked, sent and mined: a second claim of this client then
    /// sees the first's cooldown instead of being sent to revert (and pay gas) behind it.
    claims: Arc<tokio::sync::Mutex<()>>,
}

impl RegistryClient {
    /// The registry's address.
    pub fn address(&self) -> Address {
        *self.instance.address()
    }

    /// The same client, told that the registry was deployed in `block`, so reading its
    /// event history starts there instead of at genesis.
    #[must_use]
    pub const fn deployed_in(mut self, block: u64) -> Self {
        self.first_block = block;
        self
    }

    /// The chain connection.
    pub const fn chain(&self) -> &Chain {
        &self.chain
    }

    /// The block its event history starts at (see [`Self::deployed_in`]).
    pub const fn first_block(&self) -> u64 {
        self.first_block
    }

    /// The registry's logs of the events `signatures` in blocks `from..=to`, in order.
    ///
    /// # Errors
    /// RPC and timeout errors (a node may refuse too wide a range: ask for less).
    pub async fn logs(&self, signatures: Vec<B256>, from: u64, to: u64) -> Result<Vec<alloy::rpc::types::Log>> {
        let action = "read the registry's events";
        let filter = Filter::new().address(self.address()).event_signature(signatures).from_block(from).to_block(to);
        self.chain
            .bounded(action, self.chain.provider.get_logs(&filter))
            .await?
            .map_err(|e| self.chain.transport(action, e))
    }

    /// The name service `id` was registered under, read from its `ServiceRegistered`
    /// event (the contract keeps only ids); `None` when no such service was registered.
    ///
    /// # Errors
    /// RPC and timeout errors, `BadChainData` for a log that does not decode.
    pub async fn service_name(&self, id: B256) -> Result<Option<String>> {
        let action = "read a service's name";
        let logs = self.service_events(action, id, vec![ServiceRegistry::ServiceRegistered::SIGNATURE_HASH]).await?;
        let Some(log) = logs.first() else { return Ok(None) };
        let event = log.log_decode::<ServiceRegistry::ServiceRegistered>().map_err(|e| self.bad_log(action, &e))?;
        Ok(Some(event.inner.data.name.clone()))
    }

    /// Every location the registry published for `name` (`NewLocation` and `LocationReset`
    /// events since its deployment block), oldest first.
    ///
    /// # Errors
    /// RPC and timeout errors (a node may refuse a range this wide), `BadChainData`.
    pub async fn published_locations(&self, name: &str) -> Result<Vec<String>> {
        let action = "read where a service was published";
        let signatures =
            vec![ServiceRegistry::NewLocation::SIGNATURE_HASH, ServiceRegistry::LocationReset::SIGNATURE_HASH];
        let logs = self.service_events(action, service_id(name), signatures).await?;
        let mut locations = Vec::with_capacity(logs.len());
        for log in &logs {
            let location = if let Ok(event) = log.log_decode::<ServiceRegistry::NewLocation>() {
                event.inner.data.location.clone()
            } else {
                let event = log.log_decode::<ServiceRegistry::LocationReset>().map_err(|e| self.bad_log(action, &e))?;
                event.inner.data.location.clone()
            };
            locations.push(location);
        }
        Ok(locations)
    }

    /// The events with `signatures` about service `id` (their first indexed topic) since
    /// the registry's deployment block.
    async fn service_events(
        &self,
        action: &str,
        id: B256,
        signatures: Vec<B256>,
    ) -> Result<Vec<alloy::rpc::types::Log>> {
        let filter =
            Filter::new().address(self.address()).event_signature(signatures).topic1(id).from_block(self.first_block);
        self.chain
            .bounded(action, self.chain.provider.get_logs(&filter))
            .await?
            .map_err(|e| self.chain.transport(action, e))
    }

    fn bad_log(&self, action: &str, error: &impl std::fmt::Display) -> Error {
        Error::BadChainData { registry: self.address(), action: action.into(), detail: error.to_string() }
    }

    /// The bindings' instance, for calls this client does not wrap.
    pub const fn instance(&self) -> &ServiceRegistryInstance<DynProvider> {
        &self.instance
    }

    fn error(&self, action: &str, err: alloy::contract::Error) -> Error {
        self.chain.contract_error(self.address(), action, err)
    }

    /// Turns the reverts that concern a named service into their named variants.
    fn named(&self, name: &str, err: Error) -> Error {
        match err {
            Error::Reverted { revert: ServiceRegistryErrors::ServiceRegistryUnknownService(_), .. } => {
                Error::UnknownService { name: name.into(), registry: self.address() }
            }
            Error::Reverted { revert: ServiceRegistryErrors::ServiceRegistryClaimTooSoon(e), .. } => {
                Error::ClaimTooSoon { name: name.into(), claimant: e.claimant, next_claim_at: e.nextClaimAt }
            }
            Error::Reverted { action, revert, .. } => Error::Reverted { action, service: Some(name.into()), revert },
            other => other,
        }
    }

    async fn send<D: CallDecoder>(
        &self,
        name: &str,
        action: &str,
        call: CallBuilder<&DynProvider, D>,
    ) -> Result<TxOutcome> {
        let mined = self.chain.transact(action, Some(self.address()), &call).await.map_err(|e| self.named(name, e))?;
        Ok(mined.outcome)
    }

    /// The registry's claim cooldown in seconds.
    ///
    /// # Errors
    /// RPC and timeout errors.
    pub async fn claim_cooldown(&self) -> Result<u64> {
        let action = "read the claim cooldown";
        let call = self.instance.claimCooldown();
        self.chain.bounded(action, call.call()).await?.map_err(|e| self.error(action, e))
    }

    /// The location, epoch and state of a service: one `eth_call`, never cached.
    ///
    /// # Errors
    /// `UnknownService`, `BadChainData` for a state the contract never writes, RPC errors.
    pub async fn service_location(&self, name: &str) -> Result<Resolved> {
        let action = "resolve the service";
        let call = self.instance.getServiceLocation(service_id(name));
        let answer =
            self.chain.bounded(action, call.call()).await?.map_err(|e| self.named(name, self.error(action, e)))?;
        Ok(Resolved { location: answer.location, epoch: answer.epoch, state: self.state(action, answer.state)? })
    }

    fn state(&self, action: &str, state: u8) -> Result<ServiceState> {
        ServiceState::try_from(state).map_err(|e| Error::BadChainData {
            registry: self.address(),
            action: action.into(),
            detail: e.to_string(),
        })
    }

    /// The header, pending manager and recovery info of a service.
    ///
    /// # Errors
    /// `UnknownService`, RPC and timeout errors.
    pub async fn info(&self, name: &str) -> Result<ServiceInfo> {
        let action = "read the service";
        let id = service_id(name);
        let (header, pending, body) =
            (self.instance.getHeader(id), self.instance.pendingManager(id), self.instance.getRecoveryInfo(id));
        let (header, pending, body) = self
            .chain
            .bounded(action, async {
                futures::try_join!(header.call().into_future(), pending.call().into_future(), body.call().into_future())
            })
            .await?
            .map_err(|e| self.named(name, self.error(action, e)))?;
        Ok(ServiceInfo {
            name: name.into(),
            id,
            location: header.location,
            epoch: header.epoch,
            state: self.state(action, header.state)?,
            manager: header.manager,
            pending_manager: pending,
            updated_at: header.updatedAt,
            recovery: body,
        })
    }

    /// The addresses currently allowed as operators of a service, replayed from its
    /// `OperatorSet` and `OperatorsCleared` events (a manager transfer clears them all)
    /// since the registry's deployment block (see [`Self::deployed_in`]).
    ///
    /// # Errors
    /// RPC and timeout errors, `BadChainData` for a log that does not decode.
    pub async fn operators(&self, name: &str) -> Result<Vec<Address>> {
        let action = "read the operators";
        let signatures =
            vec![ServiceRegistry::OperatorSet::SIGNATURE_HASH, ServiceRegistry::OperatorsCleared::SIGNATURE_HASH];
        let logs = self.service_events(action, service_id(name), signatures).await?;
        let mut operators: Vec<Address> = Vec::new();
        for log in logs {
            if log.topic0() == Some(&ServiceRegistry::OperatorsCleared::SIGNATURE_HASH) {
                operators.clear();
                continue;
            }
            let set = log.log_decode::<ServiceRegistry::OperatorSet>().map_err(|e| self.bad_log(action, &e))?;
            let set = set.inner.data;
            operators.retain(|a| *a != set.operator);
            if set.allowed {
                operators.push(set.operator);
            }
        }
        Ok(operators)
    }

    /// Whether `address` is one of `name`'s operators now (the registry's `isOperator`):
    /// one read, where [`Self::operators`] reads the event history.
    ///
    /// # Errors
    /// RPC and timeout errors.
    pub async fn is_operator(&self, name: &str, address: Address) -> Result<bool> {
        let action = "read whether an address is an operator";
        let call = self.instance.isOperator(service_id(name), address);
        self.chain
            .bounded(action, call.call().into_future())
            .await?
            .map_err(|e| self.named(name, self.error(action, e)))
    }

    /// When `claimant` may next claim against a service (unix seconds; 0 = now).
    ///
    /// # Errors
    /// `UnknownService`, RPC and timeout errors.
    pub async fn next_claim_at(&self, name: &str, claimant: Address) -> Result<u64> {
        let action = "read the next claim time";
        let call = self.instance.nextClaimAt(service_id(name), claimant);
        self.chain.bounded(action, call.call()).await?.map_err(|e| self.named(name, self.error(action, e)))
    }

    /// Registers a service; the sender becomes its manager.
    ///
    /// # Errors
    /// `NoSigner`, `Reverted` (e.g. already registered, name too long), RPC and timeout errors.
    pub async fn register(&self, name: &str, body: Body) -> Result<TxOutcome> {
        self.send(name, "register the service", self.instance.register(name.into(), body)).await
    }

    /// Replaces the recovery info of a service (manager only).
    ///
    /// # Errors
    /// `NoSigner`, `Reverted`, RPC and timeout errors.
    pub async fn set_recovery_info(&self, name: &str, body: Body) -> Result<TxOutcome> {
        self.send(name, "set the recovery info", self.instance.setRecoveryInfo(service_id(name), body)).await
    }

    /// Allows or disallows an operator (manager only).
    ///
    /// # Errors
    /// `NoSigner`, `Reverted`, RPC and timeout errors.
    pub async fn set_operator(&self, name: &str, operator: Address, allowed: bool) -> Result<TxOutcome> {
        let action = if allowed { "add the operator" } else { "remove the operator" };
        self.send(name, action, self.instance.setOperator(service_id(name), operator, allowed)).await
    }

    /// Publishes a leader location with its epoch (manager or operator).
    ///
    /// # Errors
    /// `NoSigner`, `Reverted` (stale epoch, not allowed), RPC and timeout errors.
    pub async fn update_location(&self, name: &str, location: &str, epoch: u64) -> Result<TxOutcome> {
        self.send(name, "publish the location", self.instance.updateLocation(service_id(name), location.into(), epoch))
            .await
    }

    /// Sets the location and epoch outright, lowering the epoch if need be (manager only):
    /// for an epoch stuck where no leader can exceed it.
    ///
    /// # Errors
    /// `NoSigner`, `Reverted` (not the manager, bad location), RPC and timeout errors.
    pub async fn reset_location(&self, name: &str, location: &str, epoch: u64) -> Result<TxOutcome> {
        self.send(name, "reset the location", self.instance.resetLocation(service_id(name), location.into(), epoch))
            .await
    }

    /// Records `name`'s latest backup (manager or operator): `index` must be above the
    /// recorded one.
    ///
    /// # Errors
    /// `NoSigner`, `Reverted` (stale index, not allowed, empty artifact), RPC and timeout errors.
    pub async fn record_backup(&self, name: &str, index: u64, digest: B256, artifact: &str) -> Result<TxOutcome> {
        let call = self.instance.recordBackup(service_id(name), index, digest, artifact.into());
        self.send(name, "record the backup", call).await
    }

    /// Clears `name`'s backup record (manager only): for an index pinned where no leader
    /// can exceed it, or a record naming an artifact no one should restore.
    ///
    /// # Errors
    /// `NoSigner`, `Reverted` (not the manager), RPC and timeout errors.
    pub async fn reset_backup(&self, name: &str) -> Result<TxOutcome> {
        self.send(name, "reset the backup record", self.instance.resetBackup(service_id(name))).await
    }

    /// `name`'s latest recorded backup; `None` before the first.
    ///
    /// # Errors
    /// `UnknownService`, RPC and timeout errors.
    pub async fn backup(&self, name: &str) -> Result<Option<RecordedBackup>> {
        let action = "read the backup";
        let call = self.instance.getBackup(service_id(name));
        let backup = self
            .chain
            .bounded(action, call.call().into_future())
            .await?
            .map_err(|e| self.named(name, self.error(action, e)))?;
        Ok((backup.index > 0).then_some(RecordedBackup {
            index: backup.index,
            digest: backup.digest,
            artifact: backup.artifact,
            recorded_at: backup.recordedAt,
        }))
    }

    /// Sets the state (manager only).
    ///
    /// # Errors
    /// `NoSigner`, `Reverted`, RPC and timeout errors.
    pub async fn set_state(&self, name: &str, state: ServiceState) -> Result<TxOutcome> {
        self.send(name, "set the state", self.instance.setState(service_id(name), state.as_u8())).await
    }

    /// Starts handing the service to `next` (manager only).
    ///
    /// # Errors
    /// `NoSigner`, `Reverted`, RPC and timeout errors.
    pub async fn transfer_manager(&self, name: &str, next: Address) -> Result<TxOutcome> {
        self.send(name, "start the manager transfer", self.instance.transferManager(service_id(name), next)).await
    }

    /// Accepts a pending manager transfer (the pending manager only).
    ///
    /// # Errors
    /// `NoSigner`, `Reverted`, RPC and timeout errors.
    pub async fn accept_manager(&self, name: &str) -> Result<TxOutcome> {
        self.send(name, "accept the manager transfer", self.instance.acceptManager(service_id(name))).await
    }

    /// Files a claim that the service is not serving.
    ///
    /// # Errors
    /// `ClaimTooSoon` within the cooldown, `UnknownService`, `NoSigner`, RPC and timeout errors.
    pub async fn send_claim(&self, name: &str, reason: &str) -> Result<TxOutcome> {
        let action = "file the claim";
        let claimant = self.chain.sender().ok_or_else(|| Error::NoSigner { action: action.into() })?;
        let _one_at_a_time = self.claims.lock().await;
        // A claim inside the cooldown would revert when mined, and the gas is paid then:
        // it is not sent. (Gas estimation alone does not catch it on a chain with block
        // times: a claim still pending when the next is estimated has not set it yet.)
        let check = "read when the registry accepts the next claim";
        let next_claim_at = self
            .chain
            .bounded(check, self.instance.nextClaimAt(service_id(name), claimant).call())
            .await?
            .map_err(|e| self.named(name, self.error(check, e)))?;
        if next_claim_at > 0 {
            let latest = self.chain.block_number().await?;
            let now = self.chain.block_timestamp(latest).await?.unwrap_or(0);
            if now < next_claim_at {
                return Err(Error::ClaimTooSoon { name: name.into(), claimant, next_claim_at });
            }
        }
        self.send(name, action, self.instance.sendClaim(service_id(name), reason.into())).await
    }
}
