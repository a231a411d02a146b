//! `br2k dashboard [NAME...]`: a live web page of services, served on loopback by default.
//!
//! A poller ([`board`]) reads every service each `--refresh` as `br2k status` does (the
//! registry's header, its event history followed block by block, the backend's replicas,
//! each replica's `/br2k/status`) and scrapes its leader's `/metrics` for the traffic
//! chart. The page receives every change as a server-sent event: nobody presses refresh.
//! Page, style and script are embedded in the binary (no CDN; it works offline). Only
//! public facts reach the browser: never a key, token or password, and the RPC endpoint
//! only as scheme, host and port (its path often carries an API key).

mod actions;
mod board;
mod guard;
mod traffic;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use clap::Args;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::GlobalOpts;

const DASHBOARD_EXAMPLES: &str = "\
Examples:
  br2k dashboard                         # the services your key manages, on 127.0.0.1:8300
  br2k dashboard ledger payments         # these two
  br2k dashboard --all                   # every service registered (anyone can register one)
  br2k dashboard --allow-actions         # claims and backups from the page (loopback)
  br2k dashboard --listen 0.0.0.0:8300 --allowed-host ops.example:8300 \\
      --allow-actions --action-token-file ~/.br2k/dashboard-token";
use super::context::DirArg;
use super::manager::parse_duration;

/// The page, its style and its script, embedded.
const PAGE: &str = include_str!("page.html");
const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// Serve a live web dashboard of services: an overview (state, leader, epoch, healthy
/// replicas, requests/s, last recovery) and a page per service (each replica's role, LPI,
/// lag, health and etcd size; requests/s and latency over time; the timeline of leader
/// changes, locations, claims, recoveries and backups), updated on the page as they change.
///
/// Open the printed URL in a browser. It listens on loopback unless told otherwise; it
/// shows no secret, but what runs where is an operator's business. With --allow-actions
/// the page can also file a claim (the manager then redeploys a dead service) and ask the
/// leader for a backup, each after a confirmation and with the run's action token;
/// claims are signed with your key (--private-key, ETH_PRIVATE_KEY or --keystore), which
/// never leaves this process.
#[derive(Args, Debug)]
#[command(after_help = DASHBOARD_EXAMPLES)]
pub(crate) struct DashboardArgs {
    /// The services to show [default: those the given key manages, as `br2k manager`
    /// follows them; --all for every service registered].
    #[arg(value_name = "NAME", value_parser = crate::opts::parse_service_name)]
    names: Vec<String>,

    /// Show every service registered in the registry (anyone can register one).
    #[arg(long, conflicts_with = "names")]
    all: bool,

    /// Where to serve the page.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8300")]
    listen: SocketAddr,

    /// How often to read the registry, the replicas and the leaders' metrics (e.g. 1s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    refresh: Duration,

    /// Let the page file claims and ask for backups (each behind a confirmation and the
    /// action token). Needs a key. On loopback the token is made for the run and carried
    /// by the page; on any other address give it with --action-token-file.
    #[arg(long)]
    allow_actions: bool,

    /// A file (mode 0600) holding the action token the page's user must type in: required
    /// for --allow-actions on an address other than loopback.
    #[arg(long, value_name = "PATH", requires = "allow_actions")]
    action_token_file: Option<std::path::PathBuf>,

    /// A Host a browser may reach the dashboard by (e.g. `dash.example:8300`), besides
    /// the --listen address: every request with another Host is refused (DNS rebinding).
    /// Needed when listening on 0.0.0.0 or [::].
    #[arg(long = "allowed-host", value_name = "HOST[:PORT]")]
    allowed_hosts: Vec<String>,

    /// The replicas' admin token, for the page's "Back up now" (with --allow-actions).
    #[command(flatten)]
    admin: crate::opts::AdminTokenArg,

    #[command(flatten)]
    config: DirArg,
}

impl DashboardArgs {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        let loopback = self.listen.ip().is_loopback();
        if self.allow_actions && !loopback && self.action_token_file.is_none() {
            anyhow::bail!(
                "--allow-actions on {} (not loopback) lets whoever reaches it file claims signed with your key: give \
                 the action token people must type in with --action-token-file (mode 0600), or listen on 127.0.0.1",
                self.listen
            );
        }
        if self.listen.ip().is_unspecified() && self.allowed_hosts.is_empty() {
            anyhow::bail!(
                "listening on {} needs the name browsers reach it by: add --allowed-host HOST:PORT (every request \
                 naming another Host is refused, against DNS rebinding)",
                self.listen
            );
        }
        let follow = if !self.names.is_empty() {
            board::Follow::Named(self.names.clone())
        } else if self.all {
            board::Follow::All
        } else {
            let manager = global.wallet.signer()?.map(|s| s.address()).context(
                "name the services to show, give the manager's key (ETH_PRIVATE_KEY, --private-key or --keystore) to \
                 show the services it manages, or pass --all for every registered service",
            )?;
            board::Follow::ManagedBy(manager)
        };
        let registry = if self.allow_actions {
            global.open_registry_signed("file claims from the dashboard (--allow-actions)").await?
        } else {
            global.open_registry().await?
        };
        let listener = tokio::net::TcpListener::bind(self.listen).await.with_context(|| {
            format!("cannot serve the dashboard on {}: choose another address with --listen", self.listen)
        })?;
        let address = listener.local_addr()?;
        let shown = follow.describe();
        let admin_token = if self.allow_actions { self.admin.token()? } else { None };
        // Every action carries the run's action token: Host, Origin and the confirmation
        // header stop browsers, not curl.
        let (action_token, carried) = match &self.action_token_file {
            Some(path) => (crate::opts::read_secret_file(path, "action token")?.trim().to_owned(), false),
            None => (br2k_replication::random_token(), true),
        };
        let page: &'static str = Box::leak(
            PAGE.replace("{{ACTION_TOKEN}}", if self.allow_actions && carried { &action_token } else { "" })
                .into_boxed_str(),
        );
        let actions = self.allow_actions.then(|| {
            Arc::new(actions::Actions::new(
                registry.clone(),
                Endpoint::of(&registry),
                admin_token,
                action_token.clone(),
            ))
        });
        let mut hosts = vec![address.to_string()];
        if loopback {
            hosts.push(format!("localhost:{}", address.port()));
        }
        hosts.extend(self.allowed_hosts.iter().cloned());
        let guard = Arc::new(guard::Guard::new(hosts));
        let mut board = board::Board::new(&registry, follow, self.config, self.allow_actions);
        let (views, page_views) = watch::channel(board.empty_view());
        let refresh = self.refresh.max(Duration::from_millis(100));
        let poller = async move {
            loop {
                let view = board.poll(&registry).await;
                views.send_if_modified(|current| {
                    let changed = current["services"] != view["services"] || current["registry"] != view["registry"];
                    if changed {
                        *current = view;
                    }
                    changed
                });
                tokio::time::sleep(refresh).await;
            }
        };
        let app = axum::Router::new()
            .route("/", get(move || async move { Html(page) }))
            .route("/page.css", get(|| async { ([("content-type", "text/css; charset=utf-8")], STYLE) }))
            .route("/page.js", get(|| async { ([("content-type", "text/javascript; charset=utf-8")], SCRIPT) }))
            .route(
                "/api/services",
                get({
                    let views = page_views.clone();
                    move || async move { ([("content-type", "application/json")], views.borrow().to_string()) }
                }),
            )
            .route("/api/events", get(move || events(page_views.clone())))
            .route("/api/services/{name}/{action}", post(actions::handle).with_state(actions))
            .layer(axum::middleware::from_fn(move |request, next| {
                let guard = Arc::clone(&guard);
                async move { guard.check(request, next).await }
            }));
        eprintln!("br2k dashboard: http://{address}/ (services: {shown})");
        if self.allow_actions && carried {
            eprintln!(
                "br2k dashboard: actions need this run's token (the page served here carries it): {action_token}"
            );
        }
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

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `json!` for the view the page starts from.
fn view(services: Vec<Value>, registry: Value, actions: bool) -> Value {
    let mut view = json!({ "actions": actions, "updated": unix_seconds() });
    view["services"] = Value::Array(services);
    view["registry"] = registry;
    view
}

/// The RPC endpoint as the page may see it: scheme, host and port. Hosted endpoints carry
/// their API key in the path or query (`https://host/v3/KEY`), or credentials before the
/// host, and errors quote the URL they failed on.
#[derive(Clone, Debug)]
struct Endpoint {
    url: String,
    shown: String,
}

impl Endpoint {
    fn of(registry: &br2k_resolver::RegistryClient) -> Self {
        Self::new(registry.chain().url())
    }

    fn new(url: &str) -> Self {
        let shown = br2k_resolver::shown_endpoint(url).unwrap_or_else(|| "(the RPC endpoint)".to_owned());
        Self { url: url.trim_end_matches('/').to_owned(), shown }
    }

    fn shown(&self) -> &str {
        &self.shown
    }

    /// Replaces the full URL by what may be shown, in every string of `value`.
    fn redact(&self, value: &mut Value) {
        if self.url == self.shown {
            return;
        }
        match value {
            Value::String(text) if text.contains(&self.url) => *text = text.replace(&self.url, &self.shown),
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact(v)),
            Value::Object(fields) => fields.values_mut().for_each(|v| self.redact(v)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_with_a_key_in_its_path_is_shown_without_it() {
        let url = "https://user:pw@mainnet.example.io:8443/v3/0123456789abcdef?key=secret";
        let endpoint = Endpoint::new(url);
        assert_eq!(endpoint.shown(), "https://mainnet.example.io:8443");
        let mut view = json!({ "services": [{ "error": format!("cannot reach {url}: refused") }], "n": 1 });
        endpoint.redact(&mut view);
        let text = view.to_string();
        assert!(!text.contains("0123456789abcdef") && !text.contains("secret") && !text.contains("pw@"), "{text}");
        assert!(text.contains("cannot reach https://mainnet.example.io:8443: refused"), "{text}");
    }
}
