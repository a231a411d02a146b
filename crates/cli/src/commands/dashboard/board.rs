//! What the dashboard knows of its services between two reads: the registry's history
//! (followed, not read again), each service's traffic series and the leader it last saw.

use std::collections::HashMap;
use std::time::Duration;

use alloy::primitives::B256;
use br2k_resolver::RegistryClient;
use futures::StreamExt as _;
use serde_json::{Value, json};

use super::traffic::Traffic;
use super::{Endpoint, unix_seconds, view};
use crate::commands::context::DirArg;
use crate::commands::history::{Happening, RegistryHistory};
use crate::commands::status::service_view;

/// How long one service's reading may take before it shows as an error.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Timeline entries sent to the page per service, newest first.
const TIMELINE_SHOWN: usize = 50;

/// Services read (and leaders scraped) at once: a registry with thousands of services
/// must not open thousands of connections each refresh.
const CONCURRENT_READS: usize = 16;

/// Which services the board follows.
#[derive(Clone, Debug)]
pub(super) enum Follow {
    /// These, by name.
    Named(Vec<String>),
    /// Those this key manages now (as `br2k manager` follows them).
    ManagedBy(alloy::primitives::Address),
    /// Every service registered under a name br2k accepts.
    All,
}

impl Follow {
    pub(super) fn describe(&self) -> String {
        match self {
            Self::Named(names) => names.join(", "),
            Self::ManagedBy(manager) => format!("those {manager} manages"),
            Self::All => "every registered service".to_owned(),
        }
    }
}

#[derive(Default)]
struct Tracked {
    traffic: Traffic,
    /// The leader (replica, epoch) last seen; `None` before the first reading.
    leader: Option<Option<(String, u64)>>,
}

pub(super) struct Board {
    /// The services followed.
    follow: Follow,
    config: DirArg,
    actions: bool,
    history: RegistryHistory,
    tracked: HashMap<String, Tracked>,
    http: reqwest::Client,
    endpoint: Endpoint,
}

impl Board {
    pub(super) fn new(registry: &RegistryClient, follow: Follow, config: DirArg, actions: bool) -> Self {
        Self {
            follow,
            config,
            actions,
            history: RegistryHistory::new(registry),
            tracked: HashMap::new(),
            // A location is whatever was published on chain: never follow it elsewhere.
            http: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            endpoint: Endpoint::of(registry),
        }
    }

    /// The view before the first reading.
    pub(super) fn empty_view(&self) -> Value {
        view(Vec::new(), json!({ "endpoint": self.endpoint.shown(), "error": null }), self.actions)
    }

    /// Reads everything once and returns the page's view. Services are read at once, and
    /// then their leaders' metrics: one that does not answer (up to its timeout) must not
    /// hold up the news of the others.
    pub(super) async fn poll(&mut self, registry: &RegistryClient) -> Value {
        let history_error = self.history.follow(registry).await.err().map(|e| crate::commands::describe(&e));
        let names: Vec<String> = match &self.follow {
            Follow::Named(names) => names.clone(),
            Follow::ManagedBy(manager) => self.history.managed_by(*manager).map(str::to_owned).collect(),
            Follow::All => self.history.names().map(str::to_owned).collect(),
        };
        let reads: Vec<Result<Value, String>> = futures::stream::iter(names.iter().map(|name| async {
            let read = service_view(registry, &self.history, name, None, &self.config);
            match tokio::time::timeout(READ_TIMEOUT, read).await {
                Ok(Ok((_, view))) => Ok(view),
                Ok(Err(e)) => Err(crate::commands::describe(&e)),
                Err(_) => Err(format!("no answer within {READ_TIMEOUT:?}")),
            }
        }))
        .buffered(CONCURRENT_READS)
        .collect()
        .await;

        // Each service's traffic series is taken out while its leader is scraped, and put back.
        let mut series: Vec<Traffic> = names
            .iter()
            .map(|name| std::mem::take(&mut self.tracked.entry(name.clone()).or_default().traffic))
            .collect();
        let http = &self.http;
        futures::stream::iter(series.iter_mut().zip(&reads).map(|(traffic, read)| async move {
            if let Ok(view) = read {
                traffic.scrape(http, view["location"].as_str().unwrap_or(""), unix_seconds()).await;
            }
        }))
        .buffer_unordered(CONCURRENT_READS)
        .collect::<Vec<()>>()
        .await;

        let mut services = Vec::with_capacity(names.len());
        for ((name, read), traffic) in names.iter().zip(reads).zip(series) {
            let tracked = self.tracked.entry(name.clone()).or_default();
            tracked.traffic = traffic;
            services.push(match read {
                Ok(view) => self.with_leader_traffic_and_timeline(name, view),
                Err(error) => json!({ "name": name, "error": error }),
            });
        }
        let registry =
            json!({ "address": registry.address(), "endpoint": self.endpoint.shown(), "error": history_error });
        let mut view = view(services, registry, self.actions);
        self.endpoint.redact(&mut view);
        view
    }

    fn with_leader_traffic_and_timeline(&mut self, name: &str, mut view: Value) -> Value {
        let id: Option<B256> = view["id"].as_str().and_then(|id| id.parse().ok());
        let tracked = self.tracked.entry(name.to_owned()).or_default();

        // A leader change the dashboard saw: it goes on the timeline beside the chain's.
        let leader = view["replicas"].as_array().and_then(|replicas| {
            replicas
                .iter()
                .find(|r| r["status"]["role"] == "leader")
                .map(|r| (r["name"].as_str().unwrap_or("?").to_owned(), r["status"]["epoch"].as_u64().unwrap_or(0)))
        });
        if let (Some(id), Some(before)) = (id, &tracked.leader)
            && *before != leader
        {
            let text = match (&leader, before) {
                (Some((now, epoch)), Some((was, _))) => format!("{now} leads now (epoch {epoch}); {was} led before"),
                (Some((now, epoch)), None) => format!("{now} leads (epoch {epoch})"),
                (None, Some((was, _))) => format!("no replica leads ({was} led before)"),
                (None, None) => String::new(), // not a change: never reached
            };
            self.history.note(id, Happening { at: unix_seconds(), block: None, kind: "leader", text });
        }
        tracked.leader = Some(leader);

        view["traffic"] = json!({
            "points": tracked.traffic.points().collect::<Vec<_>>(),
            "error": tracked.traffic.error,
        });
        let timeline: Vec<&Happening> = id.map(|id| self.history.timeline(id).collect()).unwrap_or_default();
        view["timeline"] = json!(timeline.into_iter().rev().take(TIMELINE_SHOWN).collect::<Vec<_>>());
        without_counters(view)
    }
}

/// A service view without the replicas' pipeline counters: they move with every read
/// (the dashboard's own included), and the chart shows traffic already.
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
