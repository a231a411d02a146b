//! What every answer of the dashboard goes through: the `Host` check and the headers that
//! keep the page out of other sites' frames.
//!
//! The `Host` must name the address served (or a host given with `--allowed-host`) on
//! every route, the page, `/api/*` and the event stream alike: a page on another site that
//! rebinds its own name to this address (DNS rebinding) would otherwise read the whole
//! view. The page may not be framed (`frame-ancestors 'none'`, `X-Frame-Options: DENY`),
//! so its confirmation dialog cannot be clickjacked, and it loads nothing but itself.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The page's Content-Security-Policy: its own script, style and data only, no frames, no
/// plugins, and no `<base>` that could point its relative URLs elsewhere.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

pub(super) struct Guard {
    /// The `Host` values accepted, lower-cased.
    hosts: Vec<String>,
}

impl Guard {
    pub(super) fn new(hosts: Vec<String>) -> Self {
        Self { hosts: hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect() }
    }

    /// Refuses a request whose `Host` is not one served; adds the security headers to
    /// every answer.
    pub(super) async fn check(&self, request: Request, next: Next) -> Response {
        let host = request.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
        let mut response = match host {
            Some(host) if self.hosts.contains(&host) => next.run(request).await,
            _ => (
                StatusCode::MISDIRECTED_REQUEST,
                [(header::CONTENT_TYPE, "application/json")],
                serde_json::json!({
                    "error": format!(
                        "this dashboard answers only to http://{}/ (start it with --allowed-host for another name)",
                        self.hosts[0]
                    )
                })
                .to_string(),
            )
                .into_response(),
        };
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        response
    }
}
