//! What the dashboard knows of its services between two reads: the registry's history
//! (followed, not read again), each service's traffic series and the leader it last saw.

use std::collections::HashMap;
use std::time::Duration;

use alloy::primitives::B256;
use br2k_resolver::RegistryClient;
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

#[derive(Default)]
struct Tracked {
    traffic: Traffic,
    /// The leader (replica, epoch) last seen; `None` before the first reading.
    leader: Option<Option<(String, u64)>>,
}

pub(super) struct Board {
    /// The services asked for; empty: every service the registry knows.
    names: Vec<String>,
    config: DirArg,
    actions: bool,
    history: RegistryHistory,
    tracked: HashMap<String, Tracked>,
    http: reqwest::Client,
    endpoint: Endpoint,
}

impl Board {
    pub(super) fn new(registry: &RegistryClient, names: Vec<String>, config: DirArg, actions: bool) -> Self {
        Self {
            names,
            config,
            actions,
            history: RegistryHistory::new(registry),
            tracked: HashMap::new(),
            http: reqwest::Client::builder().no_proxy().build().unwrap_or_default(),
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
        let names: Vec<String> =
            if self.names.is_empty() { self.history.names().map(str::to_owned).collect() } else { self.names.clone() };
        let reads = futures::future::join_all(names.iter().map(|name| async {
            let read = service_view(registry, &self.history, name, None, &self.config);
            match tokio::time::timeout(READ_TIMEOUT, read).await {
                Ok(Ok((_, view))) => Ok(view),
                Ok(Err(e)) => Err(crate::commands::describe(&e)),
                Err(_) => Err(format!("no answer within {READ_TIMEOUT:?}")),
            }
        }))
        .await;

        // Each service's traffic series is taken out while its leader is scraped, and put back.
        let mut series: Vec<Traffic> = names
            .iter()
            .map(|name| std::mem::take(&mut self.tracked.entry(name.clone()).or_default().traffic))
            .collect();
        let http = &self.http;
        futures::future::join_all(series.iter_mut().zip(&reads).map(|(traffic, read)| async move {
            if let Ok(view) = read {
                traffic.scrape(http, view["location"].as_str().unwrap_or(""), unix_seconds()).await;
            }
        }))
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
