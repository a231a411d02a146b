//! An HTTP client that follows a br2k service's leader (the paper's client behaviour).
//!
//! Each request goes to the leader's location as the [`Resolver`] knows it. When that
//! fails (no connection, no answer in time, or `503` from a replica that is not the
//! leader) the client reports the location dead to the resolver, waits a backoff, and tries
//! again where the `Br2k-Leader` hint or a fresh resolve points, always with the same
//! `Idempotency-Key`, so a request the old leader did execute is answered from its stored
//! response instead of running twice. Failures are counted per window; the one that
//! reaches the threshold files a claim (once per window) so the service's manager hears
//! that its service is down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use br2k_bindings::ServiceState;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};

use crate::error::Error;
use crate::resolver::{Backoff, Resolver};
use crate::{IDEMPOTENCY_KEY_HEADER, LEADER_HEADER};

/// The registry caps a claim's reason at this many bytes.
const MAX_REASON_BYTES: usize = 256;

/// Bounds and thresholds of a [`FailoverClient`].
#[derive(Clone, Debug)]
pub struct FailoverConfig {
    /// Bound on one attempt: connecting, sending, and receiving the whole answer.
    pub attempt_timeout: Duration,
    /// Bound on opening the TCP connection of one attempt.
    pub connect_timeout: Duration,
    /// Bound on one `send`, all attempts and waits included.
    pub deadline: Duration,
    /// Most attempts of one `send`.
    pub max_attempts: u32,
    /// First wait between two attempts; doubles each time up to `max_backoff`.
    pub first_backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// Failures within one `claim_window` that file a claim; 0 never claims.
    pub claim_after: u32,
    /// Length of a claim window: at most one claim is filed per window.
    pub claim_window: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(30),
            max_attempts: 10,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            claim_after: 5,
            claim_window: Duration::from_secs(60),
        }
    }
}

/// One HTTP request to a service, with the idempotency key all its attempts share.
#[derive(Clone, Debug)]
pub struct Request {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    idempotency_key: String,
}

impl Request {
    /// A request for `path` (which must start with `/`; a query string may follow) with a
    /// fresh random idempotency key.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            idempotency_key: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// A `GET` request.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    /// A `POST` request with a body.
    pub fn post(path: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self::new(Method::POST, path).body(body)
    }

    /// Sets the body.
    #[must_use]
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Uses `key` as the idempotency key instead of a random one (to continue a request
    /// an earlier process started).
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }

    /// The idempotency key every attempt of this request carries.
    pub fn key(&self) -> &str {
        &self.idempotency_key
    }
}

/// Why one attempt did not reach the leader.
#[derive(Debug, thiserror::Error)]
pub enum AttemptFailure {
    /// The service has no location to send to.
    #[error("the service has no location yet (state {0})")]
    NoLocation(ServiceState),
    /// The registry holds a location that is not an http(s) URL.
    #[error("the registered location {0:?} is not an http(s) URL")]
    BadLocation(String),
    /// The connection failed.
    #[error("could not send to {location}: {source}")]
    Connect {
        /// Where the request went.
        location: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// No answer within the attempt timeout.
    #[error("{location} did not answer within {after:?}")]
    Timeout {
        /// Where the request went.
        location: String,
        /// The attempt timeout.
        after: Duration,
    },
    /// A replica answered that it is not the leader.
    #[error("{location} answered 503: not the leader{}", .leader.as_ref().map(|l| format!(" (leader: {l})")).unwrap_or_default())]
    NotLeader {
        /// Where the request went.
        location: String,
        /// The leader it named in `Br2k-Leader`, if any.
        leader: Option<String>,
    },
    /// The registry announced a new leader while this attempt waited on the old one.
    #[error("the registry moved the service away from {location} while waiting for its answer")]
    Moved {
        /// Where the request went.
        location: String,
    },
    /// The chain could not be asked where the service is.
    #[error("could not resolve the service: {0}")]
    Resolve(#[source] Error),
}

impl AttemptFailure {
    /// What this failure says on chain, in a claim: the kind of failure and the registered
    /// location (already public), never the request's path, query or the HTTP client's
    /// own message (which carries the full request URL).
    pub fn claim_summary(&self) -> String {
        match self {
            Self::NoLocation(state) => format!("no location is published (state {state})"),
            Self::BadLocation(_) => "the registered location is not an http(s) URL".into(),
            Self::Connect { location, source } => {
                let kind = if source.is_connect() { "could not connect to" } else { "the request failed at" };
                format!("{kind} {}", origin(location))
            }
            Self::Timeout { location, after } => format!("{} did not answer within {after:?}", origin(location)),
            Self::NotLeader { location, .. } => format!("{} answered 503: not the leader", origin(location)),
            Self::Moved { location } => format!("the registry moved the service away from {}", origin(location)),
            Self::Resolve(_) => "could not resolve the service on chain".into(),
        }
    }
}

/// The scheme, host and port of a location (anything after them left out).
fn origin(location: &str) -> String {
    crate::shown_endpoint(location).unwrap_or_else(|| "the registered location".into())
}

/// Why a [`FailoverClient::send`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The request itself is malformed (bad path or header).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The registry cannot say where the service is (unknown service, bad registry).
    #[error(transparent)]
    Resolve(Error),
    /// Every attempt failed, or the deadline passed.
    #[error("service {service:?} did not answer after {attempts} attempt(s) in {elapsed:?}; last failure: {last}")]
    Exhausted {
        /// The service.
        service: String,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last attempt's failure.
        #[source]
        last: Box<AttemptFailure>,
    },
}

#[derive(Debug, Default)]
struct ClaimWindow {
    started: Option<Instant>,
    failures: u32,
    claimed: bool,
}

#[derive(Debug)]
struct Inner {
    resolver: Resolver,
    service: String,
    http: reqwest::Client,
    config: FailoverConfig,
    window: std::sync::Mutex<ClaimWindow>,
    claims_filed: AtomicU64,
}

impl Inner {
    /// The claim window; a counter left by a panicking holder is still a valid counter.
    fn window(&self) -> std::sync::MutexGuard<'_, ClaimWindow> {
        self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sends HTTP requests to a br2k service's current leader, following it through leader
/// changes. Cloning is cheap; clones share the claim window.
#[derive(Clone, Debug)]
pub struct FailoverClient {
    inner: Arc<Inner>,
}

impl FailoverClient {
    /// A client for the service `service`, found through `resolver`.
    ///
    /// # Errors
    /// `InvalidRequest` when the HTTP client cannot be built (no TLS backend).
    pub fn new(resolver: Resolver, service: impl Into<String>, config: FailoverConfig) -> Result<Self, FailoverError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Replicas close a connection that sends nothing for 10 s (their head timeout);
            // dropping idle ones first keeps a request from meeting one being closed.
            .pool_idle_timeout(Duration::from_secs(5))
            // A redirect is the service's answer, handed to the caller: followed here it
            // would carry the request, its key and headers to a host the chain never named.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| FailoverError::InvalidRequest(format!("cannot build the HTTP client: {e}")))?;
        let inner = Inner {
            resolver,
            service: service.into(),
            http,
            config,
            window: std::sync::Mutex::default(),
            claims_filed: AtomicU64::new(0),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The service this client talks to.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// Claims this client has seen accepted by the registry.
    pub fn claims_filed(&self) -> u64 {
        self.inner.claims_filed.load(Ordering::Relaxed)
    }

    /// Sends `request` to the leader, failing over as the module docs describe, and returns
    /// the first answer that is not "not the leader" (any status, 4xx and 5xx included:
    /// those are the application's answers).
    ///
    /// # Errors
    /// `InvalidRequest`, `Resolve` when the registry does not know the service, `Exhausted`
    /// when no attempt reached the leader within the bounds.
    pub async fn send(&self, request: &Request) -> Result<reqwest::Response, FailoverError> {
        if !request.path.starts_with('/') {
            return Err(FailoverError::InvalidRequest(format!("the path {:?} must start with '/'", request.path)));
        }
        let key = HeaderValue::from_str(&request.idempotency_key).map_err(|_| {
            FailoverError::InvalidRequest(format!(
                "the idempotency key {:?} is not a header value",
                request.idempotency_key
            ))
        })?;
        let config = &self.inner.config;
        let started = Instant::now();
        let deadline = started + config.deadline;
        let mut backoff = Backoff::new(config.first_backoff, config.max_backoff);
        let mut hint: Option<String> = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.attempt(request, &key, hint.take(), deadline).await {
                Ok(response) => {
                    self.inner.window().failures = 0;
                    return Ok(response);
                }
                Err(AttemptFailure::Resolve(e)) if !e.is_unreachable() => return Err(FailoverError::Resolve(e)),
                Err(failure) => failure,
            };
            tracing::info!(service = %self.inner.service, attempt = attempts, key = %request.idempotency_key, "request failed: {failure}");
            if let AttemptFailure::NotLeader { leader: Some(leader), .. } = &failure {
                // Anyone can answer 503 with any hint: only a location the registry
                // published for the service is followed (the chain is asked again
                // otherwise), so a request and its headers never go where the chain
                // did not name.
                if self.inner.resolver.was_published(&self.inner.service, leader).await {
                    hint = Some(leader.clone());
                } else {
                    tracing::warn!(service = %self.inner.service, hint = %leader,
                        "a Br2k-Leader hint names a location the registry never published; asking the chain instead");
                }
            }
            let moved = matches!(failure, AttemptFailure::Moved { .. });
            // A move is not a failure of the service: the cache already holds the new
            // location, and the retry goes there at once.
            if !moved && !matches!(failure, AttemptFailure::Resolve(_)) {
                self.inner.resolver.report_failure(&self.inner.service);
                self.count_failure(&failure);
            }
            let now = Instant::now();
            if attempts >= config.max_attempts || now >= deadline {
                return Err(FailoverError::Exhausted {
                    service: self.inner.service.clone(),
                    attempts,
                    elapsed: now - started,
                    last: Box::new(failure),
                });
            }
            if !moved {
                tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
            }
        }
    }

    async fn attempt(
        &self,
        request: &Request,
        key: &HeaderValue,
        hint: Option<String>,
        deadline: Instant,
    ) -> Result<reqwest::Response, AttemptFailure> {
        let location = match hint {
            Some(location) => location,
            None => {
                // The resolver bounds its own calls; the deadline of this send bounds them too.
                let remaining = deadline.saturating_duration_since(Instant::now());
                let resolving = self.inner.resolver.resolve(&self.inner.service);
                let resolved = tokio::time::timeout(remaining, resolving)
                    .await
                    .map_err(|_| {
                        AttemptFailure::Resolve(Error::Timeout {
                            url: crate::error::shown_rpc(self.inner.resolver.registry().chain().url()),
                            action: "resolve the service within the request's deadline".into(),
                            after: remaining,
                        })
                    })?
                    .map_err(AttemptFailure::Resolve)?;
                if resolved.location.is_empty() {
                    return Err(AttemptFailure::NoLocation(resolved.state));
                }
                resolved.location
            }
        };
        let base = location.trim_end_matches('/');
        let url = reqwest::Url::parse(&format!("{base}{}", request.path))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| AttemptFailure::BadLocation(location.clone()))?;
        let after = self.inner.config.attempt_timeout.min(deadline.saturating_duration_since(Instant::now()));
        // A leader that was cut off does not answer; once the registry names its
        // successor there is no point waiting for it (the idempotency key makes the retry
        // safe whether or not the old leader executed the request).
        let moved = self.inner.resolver.moved_from(&self.inner.service, base);
        let sending = self
            .inner
            .http
            .request(request.method.clone(), url)
            .headers(request.headers.clone())
            .header(IDEMPOTENCY_KEY_HEADER, key.clone())
            .body(request.body.clone())
            .timeout(after)
            .send();
        let sent = tokio::select! {
            sent = sending => sent,
            () = moved => return Err(AttemptFailure::Moved { location }),
        };
        match sent {
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                let leader = response
                    .headers()
                    .get(LEADER_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .filter(|l| !l.is_empty() && l.trim_end_matches('/') != base);
                Err(AttemptFailure::NotLeader { location, leader })
            }
            Ok(response) => Ok(response),
            Err(e) if e.is_timeout() => Err(AttemptFailure::Timeout { location, after }),
            Err(source) => Err(AttemptFailure::Connect { location, source }),
        }
    }

    /// Counts a failure in the current window and, when it reaches the threshold, files
    /// the window's one claim in the background (the request keeps failing over meanwhile).
    fn count_failure(&self, failure: &AttemptFailure) {
        let config = &self.inner.config;
        let now = Instant::now();
        let mut window = self.inner.window();
        if window.started.is_none_or(|started| now - started >= config.claim_window) {
            *window = ClaimWindow { started: Some(now), failures: 0, claimed: false };
        }
        window.failures += 1;
        if config.claim_after == 0 || window.claimed || window.failures < config.claim_after {
            return;
        }
        window.claimed = true;
        let failures = window.failures;
        drop(window);

        let mut reason =
            format!("{failures} failed requests within {:?}; last: {}", config.claim_window, failure.claim_summary());
        truncate_at_char_boundary(&mut reason, MAX_REASON_BYTES);
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            match inner.resolver.claim(&inner.service, &reason).await {
                Ok(tx) => {
                    inner.claims_filed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %inner.service, tx = %tx.hash, "filed a claim: {reason}");
                }
                Err(Error::ClaimTooSoon { next_claim_at, .. }) => {
                    tracing::info!(service = %inner.service, next_claim_at, "not claiming: this key claimed recently");
                }
                Err(e) => tracing::warn!(service = %inner.service, "could not file a claim: {e}"),
            }
        });
    }
}

fn truncate_at_char_boundary(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut text = "é".repeat(200); // 400 bytes
        truncate_at_char_boundary(&mut text, 255);
        assert_eq!(text.len(), 254);
        assert!(text.chars().all(|c| c == 'é'));
        let mut short = String::from("short");
        truncate_at_char_boundary(&mut short, 255);
        assert_eq!(short, "short");
    }

    #[test]
    fn claim_summaries_name_no_request_path_or_query() {
        let location = "http://10.0.0.7:8080/base?token=abc".to_owned();
        let failures = [
            AttemptFailure::Timeout { location: location.clone(), after: Duration::from_secs(5) },
            AttemptFailure::NotLeader { location: location.clone(), leader: Some("http://x/?q=1".into()) },
            AttemptFailure::Moved { location: location.clone() },
            AttemptFailure::BadLocation("ftp://secret?x".into()),
        ];
        for failure in failures {
            let summary = failure.claim_summary();
            assert!(!summary.contains('?') && !summary.contains("token") && !summary.contains("/base"), "{summary}");
        }
        let summary = AttemptFailure::Timeout { location, after: Duration::from_secs(5) }.claim_summary();
        assert_eq!(summary, "http://10.0.0.7:8080 did not answer within 5s");
    }

    #[tokio::test]
    async fn a_connection_failure_is_summarised_without_the_request_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let source = reqwest::get(format!("http://127.0.0.1:{port}/log?user=42&token=secret")).await.unwrap_err();
        assert!(source.to_string().contains("token=secret"), "reqwest's own message has the URL: {source}");
        let failure = AttemptFailure::Connect { location: format!("http://127.0.0.1:{port}"), source };
        assert_eq!(failure.claim_summary(), format!("could not connect to http://127.0.0.1:{port}"));
    }

    #[test]
    fn requests_keep_their_key() {
        let request = Request::post("/log", "{}");
        let again = request.clone();
        assert_eq!(request.key(), again.key());
        assert_ne!(request.key(), Request::post("/log", "{}").key(), "each new request gets its own key");
        assert_eq!(Request::get("/x").idempotency_key("k-1").key(), "k-1");
    }
}
