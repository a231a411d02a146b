//! The HTTP front: classifies each request by its route, answers `/br2k/health` and
//! `/br2k/status`, sends non-leaders' clients to the leader, and hands logged requests
//! to the leader's term.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::app::{AppState, Failure, Reply, Request};
use crate::data::{LogEntry, RequestKind};
use crate::guard::{Fault, guarded};
use crate::idempotency::fingerprint;
use crate::leader::QUEUE_WAIT;
use crate::leader::Submit;
use crate::runtime::Runtime;
use crate::secret::same_secret;
use crate::state_transfer::PEER_TOKEN_HEADER;
use crate::status::Role;

/// The header naming the leader's location on a 503 from a non-leader.
pub const LEADER_HEADER: &str = br2k_resolver::LEADER_HEADER;
/// The header a client sends to make a request idempotent.
pub const IDEMPOTENCY_KEY_HEADER: &str = br2k_resolver::IDEMPOTENCY_KEY_HEADER;
/// The header carrying a logged request's index on its answer.
pub const INDEX_HEADER: &str = "Br2k-Index";
/// Set to `true` on an answer replayed for a retried idempotency key.
pub const REPLAYED_HEADER: &str = "Br2k-Replayed";

/// The largest request, once encoded for the log (its body in base64), that the front
/// takes: with the limits' maxima a request is at most about 820 KiB, and a replicate
/// transaction must fit etcd's 1.5 MiB request limit with the request's records.
const MAX_ENTRY_BYTES: usize = 1024 * 1024 - 64 * 1024;

pub(crate) fn router<S: AppState>(runtime: Arc<Runtime<S>>) -> Router {
    Router::new().fallback(front::<S>).with_state(runtime)
}

async fn front<S: AppState>(State(runtime): State<Arc<Runtime<S>>>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    match (method.as_str(), path.as_str()) {
        ("GET", "/br2k/health") => return health(&runtime),
        ("GET", "/br2k/status") => return json(StatusCode::OK, &runtime.current_status()),
        ("GET", "/br2k/members") => return members(&runtime).await,
        ("GET", "/br2k/snapshot") => return snapshot(&runtime, &parts).await,
        ("POST", "/br2k/backup") => return backup_now(&runtime, &parts).await,
        ("GET", "/br2k/tx") => return unsettled_txs(&runtime, &parts).await,
        ("POST", "/br2k/tx/cancel") => return cancel_tx(&runtime, &parts, body).await,
        ("GET", "/metrics") => return metrics(&runtime),
        _ => {}
    }
    let Some(route) = runtime.executor.route_of(&method, &path) else {
        let methods = runtime.executor.routes.methods_of(&path);
        if methods.is_empty() {
            return error(StatusCode::NOT_FOUND, &format!("no route {method} {path}"));
        }
        let mut response = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{path} does not take {method}; it takes {}", methods.join(", ")),
        );
        if let Ok(allow) = HeaderValue::from_str(&methods.join(", ")) {
            response.headers_mut().insert(header::ALLOW, allow);
        }
        return response;
    };
    let started = std::time::Instant::now();
    let (kind, label_method, label_path) = (route.kind, method.clone(), path.clone());
    let response = serve_route(&runtime, route, parts, body, method, path).await;
    runtime.reporter.metrics.request(&label_method, &label_path, kind, response.status().as_u16(), started.elapsed());
    response
}

/// A request to a declared route, from its limits to its answer.
async fn serve_route<S: AppState>(
    runtime: &Arc<Runtime<S>>,
    route: &crate::app::Route<S>,
    parts: axum::http::request::Parts,
    body: axum::body::Body,
    method: String,
    path: String,
) -> Response {
    let limits = runtime.config.limits;
    let head = head_size(&parts);
    if head > limits.max_head {
        return error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!(
                "the request line and headers are {head} bytes, over the {} limit; nothing was stored",
                limits.max_head
            ),
        );
    }
    let idempotency_key = match idempotency_key(&parts.headers) {
        Ok(key) => key,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let query = parts.uri.query().map(str::to_owned);
    // Only the leader admits: elsewhere the client is sent on (its location is public),
    // before its body is read.
    let sender = runtime.intake.queue();
    let leads = match route.kind {
        RequestKind::Read => runtime.reporter.status.borrow().role == Role::Leader,
        _ => sender.is_some(),
    };
    if !leads {
        return not_leader(runtime);
    }
    // Checks of the head (credentials) run before the body is read too: a client that
    // cannot pass them cannot make a replica hold its body.
    let head_request = |body: Bytes| Request {
        index: 0,
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        headers: kept_headers(&parts.headers, |_| true),
        body,
        idempotency_key: idempotency_key.clone(),
        outbox: None,
        verifier: None,
    };
    if let Some(authentication) = &route.authentication
        && let Err(refusal) = authentication(&head_request(Bytes::new()))
    {
        return reply(refusal);
    }
    let max = limits.max_body;
    let body = match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, max)).await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is over {max} bytes (or was cut off); nothing was stored"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                &format!("the request body did not arrive within {:?}; nothing was stored", limits.body_timeout),
            );
        }
    };
    if let Some(admission) = &route.admission
        && let Err(refusal) = admission(&head_request(body.clone()))
    {
        return reply(refusal);
    }
    let kept = &runtime.config.kept_headers;
    let headers = kept_headers(&parts.headers, |name| {
        name == header::CONTENT_TYPE || kept.iter().any(|k| k.eq_ignore_ascii_case(name.as_str()))
    });
    let entry = LogEntry { method, path, query, headers, body: body.to_vec(), idempotency_key, stamp: None };
    if route.kind == RequestKind::Read {
        return read(runtime, &route.handler, entry, body).await;
    }
    let Some(sender) = sender else { return not_leader(runtime) };
    let encoded = crate::codec::encode(&entry);
    if encoded.len() > MAX_ENTRY_BYTES {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "the request is {} bytes once logged, over the {MAX_ENTRY_BYTES} limit; nothing was stored",
                encoded.len()
            ),
        );
    }
    let Some(queued) = runtime.intake.reserve(encoded.len()).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the leader's queue is full; retry shortly");
    };
    let fingerprint = fingerprint(&entry);
    let (reply_tx, reply_rx) = oneshot::channel();
    let submit = Submit { kind: route.kind, entry, encoded, fingerprint, reply: reply_tx, queued };
    match sender.send_timeout(submit, QUEUE_WAIT).await {
        Ok(()) => runtime.reporter.stats.add_many(crate::stats::stage::QUEUED, 1, std::time::Duration::ZERO),
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the leader's queue is full; retry shortly");
        }
        Err(mpsc::error::SendTimeoutError::Closed(_)) => return not_leader(runtime),
    }
    match reply_rx.await {
        Ok(answer) => {
            let mut response = reply(answer.reply);
            if let Some(index) = answer.index {
                response.headers_mut().insert(INDEX_HEADER, HeaderValue::from(index));
            }
            if answer.replayed {
                response.headers_mut().insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            }
            response
        }
        Err(_) => {
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "leadership changed before this request's outcome was recorded; retry with the same Idempotency-Key",
            );
            add_leader_hint(runtime, &mut response);
            response
        }
    }
}

/// A read: answered only by a leader that confirms its condition now.
async fn read<S: AppState>(
    runtime: &Runtime<S>,
    handler: &crate::app::Handler<S>,
    entry: LogEntry,
    body: Bytes,
) -> Response {
    if runtime.reporter.status.borrow().role != Role::Leader
        || !matches!(runtime.store().leader_condition().await, Ok(true))
    {
        return not_leader(runtime);
    }
    let index = runtime.reporter.status.borrow().lpi;
    let request = Request {
        index,
        method: entry.method,
        path: entry.path,
        query: entry.query,
        headers: entry.headers,
        body,
        idempotency_key: entry.idempotency_key,
        outbox: None,
        verifier: None,
    };
    let (method, path) = (request.method.clone(), request.path.clone());
    match guarded(handler(runtime.state.clone(), request), runtime.config.limits.handler_timeout).await {
        Ok(Ok(answer) | Err(Failure::Refused(answer))) => reply(answer),
        Ok(Err(Failure::Fault(fault))) => {
            warn!(%method, %path, %fault, "a read handler met a local fault");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the read could not be served here ({}: {fault}); retry", crate::error::fault_kind(&fault)),
            )
        }
        Err(fault) => {
            warn!(%method, %path, %fault, "a read handler failed");
            let status = match fault {
                Fault::Panicked(_) => StatusCode::INTERNAL_SERVER_ERROR,
                Fault::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            };
            error(status, &format!("the read handler {fault}"))
        }
    }
}

/// A snapshot of this replica's state, for a peer replica catching up: only with the
/// peer token, which clients never see. `?index=N` names the snapshot the peer's record
/// advertised; the two latest are kept.
async fn snapshot<S: AppState>(runtime: &Runtime<S>, parts: &axum::http::request::Parts) -> Response {
    let Some(offered) = parts.headers.get(PEER_TOKEN_HEADER) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "snapshots hold the service's whole state and are only for its own replicas (they send the peer token)",
        );
    };
    let token = match runtime.membership.peer_token(runtime.store()).await {
        Ok(token) => token,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("cannot check the peer token now: {e}")),
    };
    if !same_secret(offered.as_bytes(), token.as_bytes()) {
        return error(StatusCode::FORBIDDEN, "wrong peer token");
    }
    if let Some(divergence) = &runtime.reporter.status.borrow().divergence {
        return error(
            StatusCode::CONFLICT,
            &format!(
                "this replica diverged at log entry {}: its snapshots are not the service's state",
                divergence.index
            ),
        );
    }
    let index = parts.uri.query().and_then(|q| q.strip_prefix("index=")).and_then(|i| i.parse::<u64>().ok());
    let Some(index) = index else {
        return error(StatusCode::BAD_REQUEST, "name the snapshot: /br2k/snapshot?index=N");
    };
    let meta = match runtime.snapshots.disk.get(index) {
        Ok(Some(meta)) => meta,
        Ok(None) => {
            let latest = runtime.snapshots.latest().map_or(0, |m| m.index);
            return error(
                StatusCode::NOT_FOUND,
                &format!("snapshot {index} is no longer kept here; the latest is {latest}"),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let file = match tokio::fs::File::open(runtime.snapshots.disk.data_path(index)).await {
        Ok(file) => file,
        Err(e) => return error(StatusCode::NOT_FOUND, &format!("snapshot {index} cannot be read here: {e}")),
    };
    // A file whose length is not what its record announces (a torn write, a bad disk) is
    // refused with a reason, rather than cut off half-way through the answer.
    match file.metadata().await.map(|m| m.len()) {
        Ok(len) if len == meta.size => {}
        Ok(len) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("snapshot {index} is damaged here: {len} bytes, its record says {}; not served", meta.size),
            );
        }
        Err(e) => return error(StatusCode::NOT_FOUND, &format!("snapshot {index} cannot be read here: {e}")),
    }
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(file)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(digest) = HeaderValue::from_str(&meta.digest) {
        headers.insert("br2k-snapshot-digest", digest);
    }
    response
}

/// `POST /br2k/backup` (admin or peer token, leader): the leader backs up at once and
/// records that backup on chain (the answer does not wait for it; the backup recorded on
/// chain reaches at least the SSI answered). Each one pushes an artifact and pays for a
/// transaction, so at most one is taken per backup interval: a 429 with `Retry-After`
/// otherwise.
async fn backup_now<S: AppState>(runtime: &Runtime<S>, parts: &axum::http::request::Parts) -> Response {
    let Some(config) = &runtime.config.backup else {
        return error(StatusCode::NOT_FOUND, "this service has no backups configured (no backup registry)");
    };
    if !offers_peer_token(runtime, parts).await
        && let Some(refusal) = refuse_non_admin(runtime, parts)
    {
        return refusal;
    }
    let status = runtime.reporter.status.borrow().clone();
    if status.role != Role::Leader {
        return not_leader(runtime);
    }
    {
        let mut last = runtime.backups.asked_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let spacing = config.on_demand_spacing();
        if let Some(wait) = last.and_then(|at| spacing.checked_sub(at.elapsed())) {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "a backup was asked for less than {spacing:?} ago (one per backup interval); ask again in \
                     {seconds} s"
                ),
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
        *last = Some(std::time::Instant::now());
    }
    runtime.backups.forced.store(true, std::sync::atomic::Ordering::Relaxed);
    runtime.backups.now.notify_one();
    json(StatusCode::ACCEPTED, &serde_json::json!({ "requested": true, "ssi": status.ssi, "backup": status.backup }))
}

/// Lets an operator's command through: `Authorization: Bearer <admin token>`. `Some`: the
/// refusal to answer.
fn refuse_non_admin<S: AppState>(runtime: &Runtime<S>, parts: &axum::http::request::Parts) -> Option<Response> {
    let Some(token) = &runtime.config.admin_token else {
        return Some(error(
            StatusCode::NOT_FOUND,
            "this replica's admin routes are closed: start it with an admin token (--admin-token-file or \
             BR2K_ADMIN_TOKEN)",
        ));
    };
    let authorization = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match authorization.and_then(crate::secret::bearer_credentials) {
        None => Some(error(StatusCode::UNAUTHORIZED, "an admin route: send `Authorization: Bearer <admin token>`")),
        Some(offered) if token.accepts(offered) => None,
        Some(_) => Some(error(StatusCode::FORBIDDEN, "wrong admin token")),
    }
}

/// Whether the request carries this service's peer token (another replica of it asks).
async fn offers_peer_token<S: AppState>(runtime: &Runtime<S>, parts: &axum::http::request::Parts) -> bool {
    let Some(offered) = parts.headers.get(PEER_TOKEN_HEADER) else { return false };
    runtime
        .membership
        .peer_token(runtime.store())
        .await
        .is_ok_and(|token| same_secret(offered.as_bytes(), token.as_bytes()))
}

/// `GET /br2k/tx` (admin): the outbox's unsettled transactions and the requests in doubt.
async fn unsettled_txs<S: AppState>(runtime: &Runtime<S>, parts: &axum::http::request::Parts) -> Response {
    if let Some(refusal) = refuse_non_admin(runtime, parts) {
        return refusal;
    }
    let Some(chain) = &runtime.chain else {
        return error(StatusCode::NOT_FOUND, "this service has no transaction outbox");
    };
    match chain.unsettled(&crate::outbox::EtcdTxStore::reading(runtime.store().clone())).await {
        Ok(transactions) => json(
            StatusCode::OK,
            &serde_json::json!({
                "replica": runtime.config.replica,
                "in_doubt": runtime.reporter.status.borrow().in_doubt,
                "transactions": transactions,
            }),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("cannot read the outbox: {e}")),
    }
}

/// `POST /br2k/tx/cancel {"index": N}` (admin, leader): cancel request N's unsettled
/// transaction (see [`crate::outbox`]'s cancel).
async fn cancel_tx<S: AppState>(runtime: &Runtime<S>, parts: &axum::http::request::Parts, body: Body) -> Response {
    if let Some(refusal) = refuse_non_admin(runtime, parts) {
        return refusal;
    }
    let Some(chain) = &runtime.chain else {
        return error(StatusCode::NOT_FOUND, "this service has no transaction outbox");
    };
    if runtime.reporter.status.borrow().role != Role::Leader {
        return not_leader(runtime);
    }
    let Ok(bytes) = axum::body::to_bytes(body, 4096).await else {
        return error(StatusCode::BAD_REQUEST, "the body must be {\"index\": N}, under 4 KiB");
    };
    #[derive(serde::Deserialize)]
    struct Ask {
        index: u64,
    }
    let index = match serde_json::from_slice::<Ask>(&bytes) {
        Ok(ask) => ask.index,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the body must be {{\"index\": N}}: {e}")),
    };
    match chain.request_cancel(&crate::outbox::EtcdTxStore::reading(runtime.store().clone()), index).await {
        Ok(transactions) => {
            json(StatusCode::ACCEPTED, &serde_json::json!({ "index": index, "transactions": transactions }))
        }
        Err(e @ crate::outbox::CancelError::NothingToCancel(_)) => error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ crate::outbox::CancelError::Settled { .. }) => error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ crate::outbox::CancelError::Store(_)) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `GET /metrics`: the replica's metrics in Prometheus' text format.
fn metrics<S: AppState>(runtime: &Runtime<S>) -> Response {
    let text = runtime.reporter.metrics.render(&runtime.current_status(), crate::data::unix_seconds());
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

/// `GET /br2k/members`: the service's etcd members and the membership change in progress
/// (public facts: replica names, their public URLs, member IDs), read through this
/// replica's etcd member.
async fn members<S: AppState>(runtime: &Runtime<S>) -> Response {
    match crate::membership::Membership::roster(runtime.store(), &runtime.config.service).await {
        Ok(roster) => json(StatusCode::OK, &roster),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("cannot read the members from etcd: {e}")),
    }
}

fn health<S: AppState>(runtime: &Runtime<S>) -> Response {
    let status = runtime.reporter.status.borrow().clone();
    // A divergence outranks everything: nothing else this replica says can be trusted.
    let problem = if status.divergence.is_some() {
        status.last_error.clone()
    } else if status.removed_from_etcd {
        Some(
            "this replica's etcd member was removed from the cluster by a membership change: it serves nothing; \
             finish the change (`br2k scale` or `br2k replace` again), which stops it"
                .into(),
        )
    } else if !status.etcd_reachable {
        Some("local etcd member not answering".into())
    } else if let Some(alarm) = status.etcd_alarms.first() {
        Some(crate::runtime::alarm_advice(alarm, &runtime.config.etcd_endpoint))
    } else if let Some(stopped) = &status.fault {
        Some(format!("stopped at log entry {}: {}", stopped.index, stopped.reason))
    } else {
        status.last_error.clone()
    };
    match problem {
        // An alert (the chain's backup record pinned, a backup too large to restore) needs
        // an operator, not a restart: the replica serves, so it stays healthy to probes
        // and the manager, and says what is wrong.
        None => match &status.backup.alert {
            Some(alert) => {
                json(StatusCode::OK, &serde_json::json!({ "healthy": true, "role": status.role, "warning": alert }))
            }
            None => json(StatusCode::OK, &serde_json::json!({ "healthy": true, "role": status.role })),
        },
        Some(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "healthy": false, "role": status.role, "reason": reason }),
        ),
    }
}

fn not_leader<S: AppState>(runtime: &Runtime<S>) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "this replica is not the leader");
    add_leader_hint(runtime, &mut response);
    response
}

fn add_leader_hint<S: AppState>(runtime: &Runtime<S>, response: &mut Response) {
    let status = runtime.reporter.status.borrow();
    if let Some(leader) = &status.leader
        && leader.replica != runtime.config.replica
        && let Ok(value) = HeaderValue::from_str(&leader.location)
    {
        response.headers_mut().insert(LEADER_HEADER, value);
    }
}

/// The `Idempotency-Key` header, checked: 1 to 255 visible ASCII characters (it becomes
/// part of an etcd key).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else { return Ok(None) };
    let key =
        value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_owned()))
        .ok_or_else(|| "the Idempotency-Key header must be 1 to 255 visible ASCII characters".to_owned())
}

/// The headers `keep` selects, as (lower-case name, value); values that are not visible
/// ASCII are dropped.
fn kept_headers(headers: &HeaderMap, keep: impl Fn(&header::HeaderName) -> bool) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(name, _)| keep(name))
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect()
}

/// The size of a request's head as the client sent it: request line and every header.
fn head_size(parts: &axum::http::request::Parts) -> usize {
    let target = parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = parts.method.as_str().len() + target + 12;
    line + parts.headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>()
}

fn reply(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Body::from(reply.body)).into_response();
    if let Some(value) = reply.content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    reply(Reply::json(status.as_u16(), value))
}

fn error(status: StatusCode, message: &str) -> Response {
    reply(Reply::error(status.as_u16(), message))
}
