//! The resolver's errors: one variant per way talking to the registry can fail, each with
//! a message that says what went wrong and what to do about it.

use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::transports::{RpcError, TransportError, TransportErrorKind};
use br2k_bindings::ServiceRegistry::ServiceRegistryErrors;
use br2k_bindings::ServiceState;

/// The resolver's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between a br2k client and the service registry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The RPC URL could not be parsed or has a scheme other than http, https, ws or wss.
    #[error("invalid RPC URL {url:?}: {reason} (expected e.g. http://127.0.0.1:8545 or ws://127.0.0.1:8545)")]
    InvalidRpcUrl {
        /// The URL as given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The RPC endpoint could not be reached (connection refused, DNS, TLS, closed socket).
    #[error(
        "could not reach the RPC endpoint {url} while trying to {action} ({reason}): is the node running? check --rpc-url or ETH_RPC_URL"
    )]
    Unreachable {
        /// The endpoint, as it may be shown ([`shown_endpoint`]).
        url: String,
        /// What the client was doing.
        action: String,
        /// The innermost cause, in words (e.g. "Connection refused (os error 111)").
        reason: String,
        /// The transport's error.
        #[source]
        source: Box<TransportError>,
    },
    /// An RPC call or a transaction did not finish within its bound.
    #[error("timed out after {after:?} while trying to {action} (endpoint {url})")]
    Timeout {
        /// The endpoint, as it may be shown ([`shown_endpoint`]).
        url: String,
        /// What the client was doing.
        action: String,
        /// The bound that was exceeded.
        after: Duration,
    },
    /// The node answered with an error that is not a registry revert.
    #[error("the RPC endpoint {url} refused to {action}: {source}")]
    Rpc {
        /// The endpoint, as it may be shown ([`shown_endpoint`]).
        url: String,
        /// What the client was doing.
        action: String,
        /// The node's error.
        #[source]
        source: Box<TransportError>,
    },
    /// The registry address holds no contract on this chain.
    #[error(
        "no contract at {address} on chain {chain_id}: it is not a ServiceRegistry (deploy one with `br2k service-registry deploy` or pass the right --registry)"
    )]
    NoRegistry {
        /// The address that was given.
        address: Address,
        /// The chain it was looked up on.
        chain_id: u64,
    },
    /// The service is not registered.
    #[error(
        "service {name:?} is not registered in the registry at {registry} (register it with `br2k service register {name}`)"
    )]
    UnknownService {
        /// The service name.
        name: String,
        /// The registry that was asked.
        registry: Address,
    },
    /// The claimant filed a claim for this service less than the cooldown ago.
    #[error(
        "{claimant} already claimed against {name:?} recently: the registry accepts its next claim at unix time {next_claim_at}"
    )]
    ClaimTooSoon {
        /// The service name.
        name: String,
        /// The address that tried to claim.
        claimant: Address,
        /// When the next claim is accepted (unix seconds, block time).
        next_claim_at: u64,
    },
    /// The registry reverted the call with one of its custom errors.
    #[error("the registry refused to {action}: {}", describe_revert(.revert, .service.as_deref()))]
    Reverted {
        /// What the client was doing.
        action: String,
        /// The service's name, when the call was about one.
        service: Option<String>,
        /// The decoded custom error.
        revert: ServiceRegistryErrors,
    },
    /// A transaction was mined but failed.
    #[error("transaction {hash} to {action} was mined in block {block} but reverted")]
    TxFailed {
        /// What the client was doing.
        action: String,
        /// The transaction hash.
        hash: B256,
        /// The block it was mined in.
        block: u64,
    },
    /// A call returned data the registry cannot have produced (wrong contract, corrupt node).
    #[error(
        "the registry at {registry} returned data that does not decode while trying to {action}: {detail}; is that address really a ServiceRegistry?"
    )]
    BadChainData {
        /// The registry.
        registry: Address,
        /// What the client was doing.
        action: String,
        /// What was wrong.
        detail: String,
    },
    /// A transaction was asked of a client that has no key.
    #[error("cannot {action} without a key: pass --private-key (or ETH_PRIVATE_KEY) or --keystore")]
    NoSigner {
        /// What the client was doing.
        action: String,
    },
    /// The service has no location to send requests to.
    #[error("service {name:?} has no location yet (state {state}): no leader has published itself")]
    NoLocation {
        /// The service name.
        name: String,
        /// Its registry state.
        state: ServiceState,
    },
}

impl Error {
    /// Whether the error is a failure to reach the chain (worth retrying later), as opposed
    /// to an answer the chain gave.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }
}

/// `text` from the chain (a claim's reason, a location, a service's name), fit to print in
/// a log line or a terminal: control characters (newlines, ANSI escapes) are shown escaped
/// (`\n`, `\u{1b}`), so that nobody who can send a transaction can forge log lines or
/// drive the operator's terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown)
}

#[cfg(test)]
mod printable_tests {
    #[test]
    fn chain_text_cannot_forge_a_log_line_or_drive_a_terminal() {
        assert_eq!(super::printable("dead since 10:00"), "dead since 10:00");
        let forged = "down\n2026-12-03T10:00:00Z INFO manager: recovered\u{1b}[2J";
        let shown = super::printable(forged);
        assert!(!shown.contains('\n') && !shown.contains('\u{1b}'), "{shown}");
        assert_eq!(shown, "down\\n2026-12-03T10:00:00Z INFO manager: recovered\\u{1b}[2J");
    }
}

/// An endpoint as it may be shown (in errors, logs, answers and records): its scheme,
/// host and port, nothing else. Hosted RPC endpoints carry an API key in their path or
/// query, and a URL may hold a password before its host; none of that may leave the
/// process. `None` when `url` is not a URL.
pub fn shown_endpoint(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?;
    Some(match parsed.port() {
        Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
        None => format!("{}://{host}", parsed.scheme()),
    })
}

/// [`shown_endpoint`], or words for an endpoint that is not a URL.
pub(crate) fn shown_rpc(url: &str) -> String {
    shown_endpoint(url).unwrap_or_else(|| "(the RPC endpoint)".into())
}

/// Turns a transport error into `Unreachable` (the request never got an answer) or `Rpc`
/// (the node answered with an error).
pub(crate) fn from_transport(url: &str, action: &str, source: TransportError) -> Error {
    let (url, action) = (shown_rpc(url), action.to_owned());
    match &source {
        RpcError::Transport(TransportErrorKind::HttpError(_)) => Error::Rpc { url, action, source: Box::new(source) },
        RpcError::Transport(_) => {
            Error::Unreachable { url, action, reason: innermost_cause(&source), source: Box::new(source) }
        }
        _ => Error::Rpc { url, action, source: Box::new(source) },
    }
}

/// The text of the last error in `err`'s source chain.
fn innermost_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// Says in words what a registry custom error means, naming the service by `name` when
/// known (by its id otherwise).
pub fn describe_revert(revert: &ServiceRegistryErrors, name: Option<&str>) -> String {
    use ServiceRegistryErrors as E;
    let service = |id: &B256| name.map_or_else(|| format!("service {id}"), |name| format!("service {name:?}"));
    match revert {
        E::ServiceRegistryEmptyName(_) => "the service name is empty".into(),
        E::ServiceRegistryTooLong(e) => format!("a string is {} bytes long, the limit is {}", e.length, e.max),
        E::ServiceRegistryAlreadyRegistered(e) => format!("{} is already registered", service(&e.id)),
        E::ServiceRegistryUnknownService(e) => format!("{} is not registered", service(&e.id)),
        E::ServiceRegistryNotManager(e) => {
            format!("{} is not the manager of {} (ServiceRegistryNotManager)", e.caller, service(&e.id))
        }
        E::ServiceRegistryNotManagerOrOperator(e) => format!(
            "{} is neither the manager nor an operator of {} (ServiceRegistryNotManagerOrOperator)",
            e.caller,
            service(&e.id)
        ),
        E::ServiceRegistryNotPendingManager(e) => {
            format!("{} is not the pending manager of {} (ServiceRegistryNotPendingManager)", e.caller, service(&e.id))
        }
        E::ServiceRegistryStaleEpoch(e) => format!(
            "epoch {} is not above the stored epoch {} of {} (ServiceRegistryStaleEpoch)",
            e.epoch,
            e.currentEpoch,
            service(&e.id)
        ),
        E::ServiceRegistryStaleBackup(e) => format!(
            "backup index {} is not above the recorded backup index {} of {} (ServiceRegistryStaleBackup)",
            e.index,
            e.currentIndex,
            service(&e.id)
        ),
        E::ServiceRegistryInvalidBackup(e) => {
            format!("the backup for {} has a zero digest or no artifact reference", service(&e.id))
        }
        E::ServiceRegistryEmptyLocation(e) => format!("the location for {} is empty", service(&e.id)),
        E::ServiceRegistryZeroAddress(_) => "the address is the zero address".into(),
        E::ServiceRegistryInvalidState(e) => {
            let state = ServiceState::try_from(e.state).map_or_else(|u| u.0.to_string(), |s| s.to_string());
            format!("state {state} cannot be set by hand (ServiceRegistryInvalidState)")
        }
        E::ServiceRegistryClaimTooSoon(e) => format!(
            "{} claimed against {} recently; next claim accepted at unix time {} (ServiceRegistryClaimTooSoon)",
            e.claimant,
            service(&e.id),
            e.nextClaimAt
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_is_shown_without_its_path_query_or_password() {
        let hosted = "https://user:pw@mainnet.example.io:8443/v3/0123456789abcdef?key=secret";
        assert_eq!(shown_endpoint(hosted).as_deref(), Some("https://mainnet.example.io:8443"));
        assert_eq!(shown_endpoint("http://127.0.0.1:8545").as_deref(), Some("http://127.0.0.1:8545"));
        assert_eq!(shown_endpoint("wss://node.example/ws/KEY").as_deref(), Some("wss://node.example"));
        assert_eq!(shown_endpoint("not a url"), None);
        let timeout = Error::Timeout { url: shown_rpc(hosted), action: "read".into(), after: Duration::from_secs(1) };
        let text = timeout.to_string();
        assert!(!text.contains("0123456789abcdef") && !text.contains("secret") && !text.contains("pw@"), "{text}");
    }
}
