//! What the page may do, with `--allow-actions` only: file a claim against a service (its
//! manager then checks it and redeploys a dead service) and ask a service's leader for a
//! backup now.
//!
//! Each action is a `POST` carrying the header `x-br2k-confirm: <service name>`, which the
//! page sends only after its confirmation dialog, and the run's action token
//! (`x-br2k-action-token`, compared in constant time): the page carries it on loopback,
//! the person types it in otherwise. A custom header also keeps other web sites out: a
//! browser sends one cross-origin only after a preflight this server never grants. The
//! `Host` is checked on every route ([`super::guard`]), and an `Origin`, when sent, must be
//! that host too.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use br2k_resolver::RegistryClient;
use serde_json::{Value, json};

use super::Endpoint;
use crate::commands::backup::Asked;

/// The header the page sends, naming the service the person confirmed the action on.
pub(super) const CONFIRM_HEADER: &str = "x-br2k-confirm";

/// The header carrying the run's action token.
pub(super) const TOKEN_HEADER: &str = "x-br2k-action-token";

/// How long the leader may take to accept a backup request.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Actions {
    /// Signed with the operator's key.
    registry: RegistryClient,
    http: reqwest::Client,
    endpoint: Endpoint,
    /// The replicas' admin token, for asking a leader for a backup.
    admin_token: Option<String>,
    /// What every action must carry.
    action_token: String,
}

impl Actions {
    pub(super) fn new(
        registry: RegistryClient,
        endpoint: Endpoint,
        admin_token: Option<String>,
        action_token: String,
    ) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(BACKUP_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        Self { registry, http, endpoint, admin_token, action_token }
    }
}

/// `POST /api/services/{name}/{claim|backup}`.
pub(super) async fn handle(
    State(actions): State<Option<Arc<Actions>>>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(actions) = actions else {
        return answer(
            StatusCode::FORBIDDEN,
            &json!({ "error": "actions are off: start the dashboard with --allow-actions (and a key) to allow them" }),
        );
    };
    if let Err(why) = actions.check_request(&name, &headers) {
        return answer(StatusCode::FORBIDDEN, &json!({ "error": why }));
    }
    match action.as_str() {
        "claim" => actions.claim(&name, &body).await,
        "backup" => actions.backup(&name).await,
        other => answer(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("no action {other:?}: the actions are claim and backup") }),
        ),
    }
}

impl Actions {
    fn check_request(&self, name: &str, headers: &HeaderMap) -> Result<(), String> {
        let header = |key: &str| headers.get(key).and_then(|v| v.to_str().ok());
        if header(CONFIRM_HEADER) != Some(name) {
            return Err(format!(
                "an action needs the header {CONFIRM_HEADER}: {name} (the page sends it once confirmed)"
            ));
        }
        let offered = header(TOKEN_HEADER).unwrap_or_default().trim();
        if !br2k_replication::same_secret(offered.as_bytes(), self.action_token.as_bytes()) {
            return Err(format!(
                "an action needs this run's action token in {TOKEN_HEADER} (printed when the dashboard started, or \
                 the one in its --action-token-file)"
            ));
        }
        // The guard let only a served Host in: the page's origin is that host.
        let host = header("host").unwrap_or_default();
        if let Some(origin) = header("origin")
            && !origin.eq_ignore_ascii_case(&format!("http://{host}"))
        {
            return Err(format!("actions are taken only from the page at http://{host}/, not from {origin}"));
        }
        Ok(())
    }

    async fn claim(&self, name: &str, body: &[u8]) -> Response {
        let reason = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|b| b["reason"].as_str().map(str::trim).map(str::to_owned))
            .unwrap_or_default();
        if reason.is_empty() {
            return answer(
                StatusCode::BAD_REQUEST,
                &json!({ "error": "a claim needs a reason: send {\"reason\": \"...\"} (it goes on chain for all to read)" }),
            );
        }
        match self.registry.send_claim(name, &reason).await {
            Ok(tx) => answer(
                StatusCode::OK,
                &json!({
                    "message": format!("claim filed against {name:?} in block {}: its manager checks it and redeploys it if it is dead", tx.block),
                    "transaction": tx.hash, "block": tx.block, "claimant": self.registry.chain().sender(),
                }),
            ),
            Err(e) => self.failed(&e.to_string()),
        }
    }

    async fn backup(&self, name: &str) -> Response {
        let location = match self.registry.service_location(name).await {
            Ok(resolved) if !resolved.location.is_empty() => resolved.location,
            Ok(_) => {
                return answer(
                    StatusCode::CONFLICT,
                    &json!({ "error": format!("{name:?} has no published location: no leader to back up") }),
                );
            }
            Err(e) => return self.failed(&e.to_string()),
        };
        let Some(token) = &self.admin_token else {
            return answer(
                StatusCode::FORBIDDEN,
                &json!({ "error": "asking for a backup needs the replicas' admin token: start the dashboard with BR2K_ADMIN_TOKEN or --admin-token-file" }),
            );
        };
        match crate::commands::backup::request_backup(&self.http, &location, token).await {
            Ok(Asked::Taken(ssi)) => answer(
                StatusCode::ACCEPTED,
                &json!({ "message": format!("the leader backs up its state at index {ssi}; the timeline shows it once recorded on chain") }),
            ),
            Ok(Asked::RetryAfter(wait)) => answer(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({ "error": format!("the leader took a backup on demand less than a backup interval ago; ask again in {} s", wait.as_secs()) }),
            ),
            Err(e) => answer(StatusCode::BAD_GATEWAY, &json!({ "error": crate::commands::describe(&e) })),
        }
    }
}

impl Actions {
    /// A 502 with `error`, the RPC endpoint's key taken out of it.
    fn failed(&self, error: &str) -> Response {
        let mut body = json!({ "error": error });
        self.endpoint.redact(&mut body);
        answer(StatusCode::BAD_GATEWAY, &body)
    }
}

fn answer(status: StatusCode, body: &Value) -> Response {
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}
