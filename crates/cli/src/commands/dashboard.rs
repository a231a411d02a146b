//! `br2k dashboard NAME...`: a live web page of services, served on loopback by default.
//!
//! A poller reads each service as `br2k status` does (the registry's header and claims,
//! the backend's replicas, each replica's `/br2k/status`) every `--refresh`, and the page
//! receives every change as a server-sent event: nobody presses refresh. The page and its
//! script are embedded in the binary (no CDN; it works offline). Only public facts reach
//! the browser: what `br2k status` prints, never a key, token or password.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use clap::Args;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::GlobalOpts;
use super::context::DirArg;
use super::manager::parse_duration;

/// The page: HTML, CSS and script in one file, embedded.
const PAGE: &str = include_str!("dashboard.html");

/// How long one service's reading may take before it shows as an error.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Serve a live web dashboard of services: each one's state, leader, epoch and replicas
/// (role, LPI, lag behind SSI, health, etcd size), requests in doubt, backup and open
/// claims, updated on the page as they change.
///
/// Open the printed URL in a browser. It listens on loopback unless told otherwise; it
/// shows no secret, but what runs where is an operator's business.
#[derive(Args, Debug)]
pub(crate) struct DashboardArgs {
    /// The services to show.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,

    /// Where to serve the page.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8300")]
    listen: SocketAddr,

    /// How often to read the registry and the replicas (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    refresh: Duration,

    #[command(flatten)]
    config: DirArg,
}

impl DashboardArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let registry = global.open_registry().await?;
        let listener = tokio::net::TcpListener::bind(self.listen).await.with_context(|| {
            format!("cannot serve the dashboard on {}: choose another address with --listen", self.listen)
        })?;
        let address = listener.local_addr()?;
        let (views, page_views) = watch::channel(json!({ "services": [], "updated": 0 }));
        let refresh = self.refresh.max(Duration::from_millis(100));
        let names = self.names.join(", ");
        let poller = async move {
            loop {
                let mut services = Vec::with_capacity(self.names.len());
                for name in &self.names {
                    let view = tokio::time::timeout(
                        READ_TIMEOUT,
                        super::status::service_view(&registry, name, None, &self.config),
                    )
                    .await;
                    services.push(match view {
                        Ok(Ok((_, view))) => without_counters(view),
                        Ok(Err(e)) => json!({ "name": name, "error": super::describe(&e) }),
                        Err(_) => json!({ "name": name, "error": format!("no answer within {READ_TIMEOUT:?}") }),
                    });
                }
                let services = Value::Array(services);
                views.send_if_modified(|current| {
                    let changed = current["services"] != services;
                    if changed {
                        *current = json!({ "services": services, "updated": unix_seconds() });
                    }
                    changed
                });
                tokio::time::sleep(refresh).await;
            }
        };
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { Html(PAGE) }))
            .route(
                "/api/services",
                axum::routing::get({
                    let views = page_views.clone();
                    move || async move { ([("content-type", "application/json")], views.borrow().to_string()) }
                }),
            )
            .route("/api/events", axum::routing::get(move || events(page_views.clone())));
        eprintln!("br2k dashboard: http://{address}/ (services: {names})");
        tokio::select! {
            served = axum::serve(listener, app) => served.context("the dashboard's server stopped"),
            () = poller => Ok(()),
        }
    }
}

/// `GET /api/events`: the current view at once, then every change, as `services` events.
async fn events(views: watch::Receiver<Value>) -> impl IntoResponse {
    let stream = futures::stream::unfold((views, true), |(mut views, first)| async move {
        if !first {
            views.changed().await.ok()?;
        }
        let data = views.borrow_and_update().to_string();
        Some((Ok::<_, Infallible>(Event::default().event("services").data(data)), (views, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A service view without the replicas' pipeline counters: they move with every read
/// (the dashboard's own included), so every poll would look like a change.
fn without_counters(mut view: Value) -> Value {
    if let Some(replicas) = view["replicas"].as_array_mut() {
        for replica in replicas {
            if let Some(status) = replica["status"].as_object_mut() {
                status.remove("pipeline");
            }
        }
    }
    view
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
