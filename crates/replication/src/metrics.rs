//! `GET /metrics`: the replica in Prometheus' text format (version 0.0.4), for alerting
//! on leader changes, lagging followers, etcd nearing its quota, requests in doubt and
//! backups falling behind.
//!
//! Counters and histograms are kept as things happen (requests, groups, etcd calls,
//! leader changes); the gauges are set from the replica's status when scraped, so they
//! are never stale and cost nothing between scrapes. Every name has the `br2k_` prefix;
//! every series carries the service and replica as labels.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::data::RequestKind;
use crate::status::{Role, Status};
use crate::sync::lock;

/// The `Content-Type` of what [`Metrics::render`] returns.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A request's class, as a label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Class {
    replication,
    only_once,
    external_txn,
    read,
}

impl From<RequestKind> for Class {
    fn from(kind: RequestKind) -> Self {
        match kind {
            RequestKind::Replication => Self::replication,
            RequestKind::Normal => Self::only_once,
            RequestKind::ExternalTxn => Self::external_txn,
            RequestKind::Read => Self::read,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The declared route, `METHOD /path`.
    route: String,
    class: Class,
    /// The HTTP status code answered.
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    class: Class,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    /// `scheme://host:port`: never a path, which may hold an API key.
    endpoint: String,
}

/// The outbox's series, set from its status at each scrape (counters are moved up to the
/// totals the status holds).
#[derive(Default)]
struct OutboxSeries {
    rpc_up: Family<EndpointLabels, Gauge>,
    rpc_errors: Family<EndpointLabels, Counter>,
    finality_violations: Counter,
    finality_violations_open: Gauge,
    reorg_rebroadcasts: Counter,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The gauges set from the status at each scrape.
#[derive(Default)]
struct Gauges {
    role: Family<RoleLabels, Gauge>,
    epoch: Gauge,
    /// LS.
    log_last_index: Gauge,
    /// SSI.
    service_state_index: Gauge,
    /// LPI.
    processed_index: Gauge,
    applied: Gauge,
    lag: Gauge,
    in_doubt: Gauge,
    etcd_reachable: Gauge,
    snapshot_index: Gauge,
    first_index: Gauge,
    db_size: Gauge,
    db_in_use: Gauge,
    quota: Gauge,
    alarms: Gauge,
    backup_index: Gauge,
    backup_lag: Gauge,
    backup_age: FloatGauge,
    backup_pushed_bytes: Gauge,
    backup_segments: Gauge,
    backup_anchor_index: Gauge,
    backup_anchor_gas: Gauge,
    backup_anchor_gas_per_day: Gauge,
    backups_deleted: Gauge,
    backup_alert: Gauge,
    stopped_at: Gauge,
    diverged_at: Gauge,
    idempotency_records: Gauge,
    idempotency_bytes: Gauge,
    idempotency_window: FloatGauge,
    idempotency_evicted: Gauge,
}

/// One replica's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<RouteLabels, Histogram>,
    group_size: Histogram,
    leader_changes: Counter,
    terms_led: Counter,
    local_faults: Counter,
    gauges: Gauges,
    outbox: OutboxSeries,
    /// Encoding reads every metric: one scrape at a time.
    rendering: Mutex<()>,
}

impl Metrics {
    pub(crate) fn new(service: &str, replica: &str, stats: &crate::stats::Stats) -> Self {
        let labels = [("service".into(), service.to_owned().into()), ("replica".into(), replica.to_owned().into())];
        let mut root = Registry::with_prefix_and_labels("br2k", labels.into_iter());
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
        });
        let group_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        let (leader_changes, terms_led, local_faults) = (Counter::default(), Counter::default(), Counter::default());
        let gauges = Gauges::default();
        let outbox = OutboxSeries::default();
        let registry = &mut root;
        // prometheus-client ends each help text with a period itself.
        registry.register(
            "requests",
            "Client requests answered, by route, class and HTTP status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From a request's arrival to its answer (logged requests: until the outcome is durable in etcd)",
            request_seconds.clone(),
        );
        registry.register("group_size_requests", "Requests per group the leader processed", group_size.clone());
        registry.register(
            "etcd_request_duration_seconds",
            "This replica's etcd calls, by what they were for (a timed-out call counts its timeout)",
            stats.etcd_seconds.clone(),
        );
        registry.register(
            "leader_changes",
            "Times this replica saw the service's leader become another replica",
            leader_changes.clone(),
        );
        registry.register("leadership_terms", "Times this replica became the leader", terms_led.clone());
        registry.register(
            "local_faults",
            "Local faults (a full disk, an I/O error, app code that panicked) that stopped this replica at a log \
             entry or ended its term",
            local_faults.clone(),
        );
        registry.register(
            "stopped_at_index",
            "The log entry a local fault stops this replica at, while it lasts (0: none)",
            gauges.stopped_at.clone(),
        );
        registry.register(
            "diverged_at_index",
            "The log entry at which this replica's answer differed from the recorded one (0: none); it has stopped",
            gauges.diverged_at.clone(),
        );
        registry.register(
            "role",
            "1 for this replica's role (follower, register, leader), 0 for the others",
            gauges.role.clone(),
        );
        registry.register("epoch", "The epoch this replica leads in (0 when it does not lead)", gauges.epoch.clone());
        registry.register(
            "log_last_index",
            "LS: the last index logged, as this replica knows it",
            gauges.log_last_index.clone(),
        );
        registry.register(
            "service_state_index",
            "SSI: the last index whose outcome is recorded",
            gauges.service_state_index.clone(),
        );
        registry.register(
            "processed_index",
            "LPI: the last index this replica processed",
            gauges.processed_index.clone(),
        );
        registry.register("applied_index", "The last index in this replica's app state", gauges.applied.clone());
        registry.register("lag_entries", "How far this replica's LPI is behind SSI", gauges.lag.clone());
        registry.register(
            "requests_in_doubt",
            "Only-once requests whose blockchain transaction is not settled (listed in /br2k/status)",
            gauges.in_doubt.clone(),
        );
        registry.register("etcd_reachable", "1 when the local etcd member answers", gauges.etcd_reachable.clone());
        registry.register(
            "snapshot_index",
            "The index of this replica's latest snapshot",
            gauges.snapshot_index.clone(),
        );
        registry.register(
            "log_first_index",
            "The first index still in etcd (the log is compacted below it)",
            gauges.first_index.clone(),
        );
        registry.register("etcd_db_size_bytes", "The local etcd member's database file", gauges.db_size.clone());
        registry.register(
            "etcd_db_size_in_use_bytes",
            "The part of it in use (the rest is free pages)",
            gauges.db_in_use.clone(),
        );
        registry.register(
            "etcd_quota_bytes",
            "The member's space quota (0 when unknown); past it etcd refuses writes with NOSPACE",
            gauges.quota.clone(),
        );
        registry.register("etcd_alarms", "Alarms the local member reports (NOSPACE, CORRUPT)", gauges.alarms.clone());
        registry.register(
            "backup_index",
            "The index the latest backup reaches (0: none yet)",
            gauges.backup_index.clone(),
        );
        registry.register("backup_lag_entries", "How far the latest backup is behind SSI", gauges.backup_lag.clone());
        registry.register(
            "backup_age_seconds",
            "Seconds since the latest backup was taken (0: none yet)",
            gauges.backup_age.clone(),
        );
        registry.register(
            "backup_pushed_bytes",
            "What the latest backup uploaded: the blobs the registry lacked and its manifests, bytes",
            gauges.backup_pushed_bytes.clone(),
        );
        registry.register(
            "backup_segments",
            "Log segments the latest backup names (they merge eight to one as they pile up)",
            gauges.backup_segments.clone(),
        );
        registry.register(
            "backup_anchor_index",
            "The index of the backup recorded on chain, which restores link back to (0: none yet)",
            gauges.backup_anchor_index.clone(),
        );
        registry.register(
            "backup_anchor_gas",
            "Gas this replica spent recording backups on chain",
            gauges.backup_anchor_gas.clone(),
        );
        registry.register(
            "backup_anchor_gas_per_day",
            "Gas a day recording backups costs at the record interval (the latest anchor's gas times anchors a day)",
            gauges.backup_anchor_gas_per_day.clone(),
        );
        registry.register(
            "backups_deleted",
            "Backups this replica deleted under the retention policy",
            gauges.backups_deleted.clone(),
        );
        registry.register(
            "backup_alert",
            "1 while backups need an operator (the chain's record pinned above the service's index, a backup too large \
             to restore; /br2k/status says which), else 0",
            gauges.backup_alert.clone(),
        );
        registry.register(
            "idempotency_keys",
            "Idempotency keys in this replica's table (a retry with one gets its stored answer)",
            gauges.idempotency_records.clone(),
        );
        registry.register(
            "idempotency_table_bytes",
            "What the idempotency table holds, bytes (capped by --idempotency-max-bytes)",
            gauges.idempotency_bytes.clone(),
        );
        registry.register(
            "idempotency_window_seconds",
            "Age of the oldest key in the idempotency table: a retry of any key logged since is answered from its record",
            gauges.idempotency_window.clone(),
        );
        registry.register(
            "idempotency_evicted_keys",
            "Keys dropped from the idempotency table since this replica started (by age or by the byte cap)",
            gauges.idempotency_evicted.clone(),
        );
        registry.register(
            "outbox_rpc_up",
            "1 while the outbox's RPC endpoint answers, 0 while it fails (reads go to the next one)",
            outbox.rpc_up.clone(),
        );
        registry.register(
            "outbox_rpc_errors",
            "Calls to the outbox's RPC endpoint that failed (transport or HTTP errors, timeouts)",
            outbox.rpc_errors.clone(),
        );
        registry.register(
            "outbox_finality_violations",
            "Transactions recorded as settled that later left the chain (a reorg deeper than the confirmation depth)",
            outbox.finality_violations.clone(),
        );
        registry.register(
            "outbox_finality_violations_open",
            "Finality violations whose transaction is not back on chain yet",
            outbox.finality_violations_open.clone(),
        );
        registry.register(
            "outbox_reorg_rebroadcasts",
            "Times a reorg dropped a mined, not yet confirmed transaction and the outbox broadcast it again",
            outbox.reorg_rebroadcasts.clone(),
        );
        Self {
            registry: root,
            requests,
            request_seconds,
            group_size,
            leader_changes,
            terms_led,
            local_faults,
            gauges,
            outbox,
            rendering: Mutex::new(()),
        }
    }

    /// A client request to a declared route was answered with `code`.
    pub(crate) fn request(&self, method: &str, path: &str, kind: RequestKind, code: u16, took: Duration) {
        let (route, class) = (format!("{method} {path}"), Class::from(kind));
        self.requests.get_or_create(&RequestLabels { route: route.clone(), class, code }).inc();
        self.request_seconds.get_or_create(&RouteLabels { route, class }).observe(took.as_secs_f64());
    }

    /// The leader processed a group of `requests`.
    pub(crate) fn group(&self, requests: usize) {
        self.group_size.observe(requests as f64);
    }

    /// A local fault stopped this replica at an entry or ended its term.
    pub(crate) fn count_local_fault(&self) {
        self.local_faults.inc();
    }

    /// Counts what a status change shows: another replica leading than `leader` before,
    /// or this one leading now.
    pub(crate) fn status_changed(&self, leader: Option<&str>, role: Role, now: &Status) {
        let leads_now = now.leader.as_ref().map(|l| l.replica.as_str());
        if leader.is_some() && leads_now.is_some() && leader != leads_now {
            self.leader_changes.inc();
        }
        if role != Role::Leader && now.role == Role::Leader {
            self.terms_led.inc();
        }
    }

    /// Everything, in Prometheus' text format, the gauges set from `status` first.
    pub(crate) fn render(&self, status: &Status, now_secs: u64) -> String {
        let _one_at_a_time = lock(&self.rendering);
        let g = &self.gauges;
        for (role, name) in [(Role::Follower, "follower"), (Role::Register, "register"), (Role::Leader, "leader")] {
            g.role.get_or_create(&RoleLabels { role: name }).set(i64::from(status.role == role));
        }
        let set = |gauge: &Gauge, value: u64| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        set(&g.epoch, status.epoch.unwrap_or(0));
        set(&g.log_last_index, status.ls);
        set(&g.service_state_index, status.ssi);
        set(&g.processed_index, status.lpi);
        set(&g.applied, status.applied_index);
        set(&g.lag, status.ssi.saturating_sub(status.lpi));
        set(&g.in_doubt, status.in_doubt.len() as u64);
        set(&g.etcd_reachable, u64::from(status.etcd_reachable));
        set(&g.snapshot_index, status.snapshot_index);
        set(&g.first_index, status.first_index);
        set(&g.db_size, status.db_size);
        set(&g.db_in_use, status.db_size_in_use);
        set(&g.quota, status.quota.unwrap_or(0));
        set(&g.alarms, status.etcd_alarms.len() as u64);
        let backup = &status.backup;
        set(&g.backup_index, backup.index);
        set(&g.backup_lag, if backup.index == 0 { 0 } else { status.ssi.saturating_sub(backup.index) });
        g.backup_age.set(if backup.at == 0 { 0.0 } else { now_secs.saturating_sub(backup.at) as f64 });
        set(&g.backup_pushed_bytes, backup.pushed_bytes);
        set(&g.backup_segments, backup.segments);
        set(&g.backup_anchor_index, backup.anchor.index);
        set(&g.backup_anchor_gas, backup.anchor.gas_total);
        set(&g.backup_anchor_gas_per_day, backup.anchor.gas_per_day);
        set(&g.backups_deleted, backup.deleted);
        set(&g.backup_alert, u64::from(backup.alert.is_some()));
        set(&g.stopped_at, status.fault.as_ref().map_or(0, |f| f.index));
        set(&g.diverged_at, status.divergence.as_ref().map_or(0, |d| d.index));
        let table = &status.idempotency;
        set(&g.idempotency_records, table.records);
        set(&g.idempotency_bytes, table.bytes);
        set(&g.idempotency_evicted, table.evicted);
        let window_ms = table.oldest_at.map_or(0, |at| (now_secs * 1000).saturating_sub(at));
        g.idempotency_window.set(window_ms as f64 / 1000.0);
        if let Some(outbox) = &status.outbox {
            let o = &self.outbox;
            let catch_up = |counter: &Counter, total: u64| counter.inc_by(total.saturating_sub(counter.get()));
            for endpoint in &outbox.endpoints {
                let labels = EndpointLabels { endpoint: endpoint.endpoint.clone() };
                o.rpc_up.get_or_create(&labels).set(i64::from(endpoint.healthy));
                catch_up(&o.rpc_errors.get_or_create(&labels), endpoint.errors);
            }
            catch_up(&o.finality_violations, outbox.finality_violations_total);
            let open = outbox.finality_violations.iter().filter(|v| v.back_in_block.is_none()).count();
            set(&o.finality_violations_open, open as u64);
            catch_up(&o.reorg_rebroadcasts, outbox.reorg_rebroadcasts);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}
