//! The outbox's RPC endpoints: several, because no single provider of a chain should be
//! trusted to reach it (hosted endpoints rate-limit, lag and go down).
//!
//! - **Broadcasts go to every endpoint at once.** A transaction in more pools is mined
//!   sooner, and one endpoint that drops it does not lose it. A broadcast counts as done
//!   as soon as one endpoint takes it; it is refused only when every endpoint answered
//!   "no" (one that did not answer may hold it).
//! - **Reads go to the first healthy endpoint in the order given** and fail over to the
//!   next on a transport error, an HTTP error or a timeout. An answer, even an error
//!   answer ("nonce too low"), is the chain's word and is not asked again elsewhere.
//! - **Health.** An endpoint that failed is skipped by reads (tried only when every
//!   healthy one fails too) and probed in the background every few seconds until it
//!   answers again. `/br2k/status`, the metrics and the dashboard show each endpoint's
//!   health, as `scheme://host:port` only: hosted endpoints keep their API key in the path.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::Bytes;
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;
use alloy::transports::TransportError;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// How long a failed endpoint rests before it is probed again.
const PROBE_AFTER: Duration = Duration::from_secs(3);

/// One endpoint as `/br2k/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointHealth {
    /// `scheme://host:port`: never its path or query (which may hold an API key).
    pub endpoint: String,
    /// Whether its last call (or probe) was answered.
    pub healthy: bool,
    /// Calls it failed (transport errors, HTTP errors, timeouts) since the replica started.
    pub errors: u64,
    /// The last of them, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Since when it has been failing (unix seconds), while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since: Option<u64>,
}

/// An RPC call that failed: an endpoint answered with an error (the chain's word), or
/// none answered.
#[derive(Debug)]
pub(crate) enum RpcFailure {
    Answered(String),
    Unreachable(String),
}

impl std::fmt::Display for RpcFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Answered(reason) | Self::Unreachable(reason) => f.write_str(reason),
        }
    }
}

#[derive(Default)]
struct Health {
    errors: u64,
    last_error: Option<String>,
    /// When it started failing: `Instant` to decide probes, unix seconds to show.
    down: Option<(Instant, u64)>,
    /// The last failure or probe: the next probe waits [`PROBE_AFTER`] from it.
    rested_from: Option<Instant>,
    probing: bool,
}

struct Endpoint {
    shown: String,
    provider: DynProvider,
    health: Mutex<Health>,
}

impl Endpoint {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn healthy(&self) -> bool {
        self.health().down.is_none()
    }

    fn answered(&self) {
        let mut health = self.health();
        if let Some((since, _)) = health.down.take() {
            info!(endpoint = %self.shown, down_for = ?since.elapsed(), "RPC endpoint answers again");
        }
    }

    fn failed(&self, reason: &str) {
        let mut health = self.health();
        health.errors += 1;
        health.last_error = Some(reason.to_owned());
        health.rested_from = Some(Instant::now());
        if health.down.is_none() {
            warn!(endpoint = %self.shown, reason, "RPC endpoint failed; reads go to the next one");
            health.down = Some((Instant::now(), crate::unix_seconds()));
        }
    }

    /// `call` on this endpoint alone, bounded by `timeout`; the outcome counts toward its
    /// health.
    async fn call<T, Fut>(&self, action: &str, timeout: Duration, call: Fut) -> Result<T, RpcFailure>
    where
        Fut: std::future::Future<Output = Result<T, TransportError>>,
    {
        let shown = &self.shown;
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => {
                self.answered();
                Ok(value)
            }
            // The node answered, with an error: the chain's word on the call.
            Ok(Err(e)) if e.is_error_resp() => {
                self.answered();
                Err(RpcFailure::Answered(format!("{shown} could not {action}: {e}")))
            }
            // Refused connections, HTTP errors (429, 502), answers that are not JSON-RPC:
            // they say nothing of the call, and another endpoint may do better.
            Ok(Err(e)) => {
                let reason = format!("{shown} could not {action}: {e}");
                self.failed(&reason);
                Err(RpcFailure::Unreachable(reason))
            }
            Err(_) => {
                let reason = format!("{shown} did not {action} within {timeout:?}");
                self.failed(&reason);
                Err(RpcFailure::Unreachable(reason))
            }
        }
    }
}

/// The endpoints of one chain, in the order reads prefer them.
pub(crate) struct Endpoints {
    list: Vec<Arc<Endpoint>>,
    timeout: Duration,
}

impl Endpoints {
    /// Clients of `urls` (nothing is asked of them yet), each call bounded by `timeout`.
    pub(crate) fn new(urls: &[String], timeout: Duration) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("the outbox needs at least one RPC endpoint".into());
        }
        let mut list = Vec::with_capacity(urls.len());
        for url in urls {
            let shown = br2k_resolver::shown_endpoint(url)
                .ok_or("an outbox RPC endpoint is not a URL (it is not repeated here: it may hold a key)")?;
            let parsed = url.parse::<reqwest::Url>().map_err(|e| format!("outbox RPC endpoint {shown}: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(format!("outbox RPC endpoint {shown} must be http:// or https://"));
            }
            if list.iter().any(|e: &Arc<Endpoint>| e.shown == shown) {
                return Err(format!("outbox RPC endpoint {shown} is given twice"));
            }
            let http = reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout)
                .build()
                .map_err(|e| format!("outbox HTTP client: {e}"))?;
            // No fillers: the outbox sets nonce, fees and gas itself.
            let provider =
                ProviderBuilder::default().connect_client(RpcClient::new_http_with_client(http, parsed)).erased();
            list.push(Arc::new(Endpoint { shown, provider, health: Mutex::new(Health::default()) }));
        }
        Ok(Self { list, timeout })
    }

    /// Each endpoint's health, in the order given.
    pub(crate) fn health(&self) -> Vec<EndpointHealth> {
        self.list
            .iter()
            .map(|endpoint| {
                let health = endpoint.health();
                EndpointHealth {
                    endpoint: endpoint.shown.clone(),
                    healthy: health.down.is_none(),
                    errors: health.errors,
                    last_error: health.last_error.clone(),
                    down_since: health.down.map(|(_, at)| at),
                }
            })
            .collect()
    }

    /// The first endpoint, as it may be shown (for the Debug of configs).
    pub(crate) fn first_shown(&self) -> &str {
        &self.list[0].shown
    }

    /// Asks `call` of the first healthy endpoint, failing over to the next when one does
    /// not answer; the failed ones are asked last, as a last resort.
    pub(crate) async fn read<T, F, Fut>(&self, action: &str, call: F) -> Result<T, RpcFailure>
    where
        F: Fn(DynProvider) -> Fut,
        Fut: std::future::Future<Output = Result<T, TransportError>>,
    {
        self.probe_rested();
        let (healthy, failed): (Vec<_>, Vec<_>) = self.list.iter().partition(|endpoint| endpoint.healthy());
        let mut last = None;
        for endpoint in healthy.into_iter().chain(failed) {
            match endpoint.call(action, self.timeout, call(endpoint.provider.clone())).await {
                Err(RpcFailure::Unreachable(reason)) => last = Some(reason),
                answered => return answered,
            }
        }
        Err(RpcFailure::Unreachable(last.unwrap_or_else(|| format!("no RPC endpoint could {action}"))))
    }

    /// Sends the signed bytes to every endpoint at once. `Ok` as soon as one takes them
    /// (the rest go on in the background, for their health and their pools); refused only
    /// when every endpoint answered with an error, else unreachable.
    pub(crate) async fn broadcast(&self, raw: &Bytes) -> Result<(), RpcFailure> {
        let mut sends = tokio::task::JoinSet::new();
        for endpoint in &self.list {
            let (endpoint, raw, timeout) = (endpoint.clone(), raw.clone(), self.timeout);
            sends.spawn(async move {
                let sent = endpoint.provider.send_raw_transaction(&raw);
                endpoint.call("broadcast", timeout, async { sent.await.map(|_| ()) }).await
            });
        }
        let (mut refusals, mut unreachable) = (Vec::new(), None);
        while let Some(joined) = sends.join_next().await {
            match joined {
                Ok(Ok(())) => {
                    sends.detach_all();
                    return Ok(());
                }
                Ok(Err(RpcFailure::Answered(reason))) => refusals.push(reason),
                Ok(Err(RpcFailure::Unreachable(reason))) => unreachable = Some(reason),
                Err(e) => unreachable = Some(format!("a broadcast task ended: {e}")),
            }
        }
        // An endpoint that did not answer may have taken it: refused only by all.
        match unreachable {
            Some(reason) if refusals.is_empty() => Err(RpcFailure::Unreachable(reason)),
            Some(reason) => Err(RpcFailure::Unreachable(format!("{reason}; and {}", refusals.join("; ")))),
            None => Err(RpcFailure::Answered(refusals.join("; "))),
        }
    }

    /// Starts a background probe of every failed endpoint that has rested long enough.
    fn probe_rested(&self) {
        for endpoint in &self.list {
            {
                let mut health = endpoint.health();
                let rested = health.rested_from.is_none_or(|at| at.elapsed() >= PROBE_AFTER);
                if health.down.is_none() || health.probing || !rested {
                    continue;
                }
                health.probing = true;
            }
            let (endpoint, timeout) = (endpoint.clone(), self.timeout);
            tokio::spawn(async move {
                let asked = endpoint.provider.get_block_number();
                let _ = endpoint.call("read the block number", timeout, asked.into_future()).await;
                let mut health = endpoint.health();
                health.probing = false;
                health.rested_from = Some(Instant::now());
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_never_shown_with_their_path() {
        let timeout = Duration::from_secs(1);
        let error = |urls: &[&str]| {
            let urls: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
            Endpoints::new(&urls, timeout).err().unwrap()
        };
        assert!(error(&[]).contains("at least one"));
        let not_a_url = error(&["not a url/secret-key"]);
        assert!(not_a_url.contains("not a URL") && !not_a_url.contains("secret-key"), "{not_a_url}");
        let twice = error(&["https://eth.example.io/v3/KEY1", "https://eth.example.io/v3/KEY2"]);
        assert!(twice.contains("https://eth.example.io is given twice") && !twice.contains("KEY"), "{twice}");
        assert!(error(&["ws://eth.example.io/v3/KEY"]).contains("http:// or https://"));
        let endpoints =
            Endpoints::new(&["https://a.example.io/v3/KEY".into(), "http://b.example.io:8545".into()], timeout)
                .unwrap();
        let shown: Vec<_> = endpoints.health().into_iter().map(|h| (h.endpoint, h.healthy)).collect();
        assert_eq!(shown, [("https://a.example.io".to_owned(), true), ("http://b.example.io:8545".to_owned(), true)]);
    }
}
