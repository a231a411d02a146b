//! The manager's counters, served in Prometheus' text format on `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the recovery-duration histogram's buckets, in seconds.
const BUCKETS: [f64; 10] = [1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    service: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    service: String,
    outcome: &'static str,
}

struct Inner {
    registry: Registry,
    claims: Family<ServiceLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    probes: Family<ResultLabels, Counter>,
    recoveries: Family<OutcomeLabels, Counter>,
    membership_changes: Family<OutcomeLabels, Counter>,
    durations: Histogram,
    next_block: Gauge,
}

/// The counters. Cloning shares them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("br2k_manager");
        let inner = Inner {
            claims: Family::default(),
            dropped: Family::default(),
            probes: Family::default(),
            recoveries: Family::default(),
            membership_changes: Family::default(),
            durations: Histogram::new(BUCKETS),
            next_block: Gauge::default(),
            registry: Registry::default(),
        };
        // prometheus-client ends each help text with a period itself.
        registry.register(
            "claims_seen",
            "Claim events seen against the services this manager manages",
            inner.claims.clone(),
        );
        registry.register("claims_dropped", "Claims that caused no recovery, by reason", inner.dropped.clone());
        registry.register("probes", "The manager's own health probes, by result", inner.probes.clone());
        registry.register(
            "recoveries",
            "Recoveries started, succeeded and failed (a failed attempt is retried)",
            inner.recoveries.clone(),
        );
        registry.register(
            "membership_changes_finished",
            "Membership changes left half done by their command that the manager finished or failed to",
            inner.membership_changes.clone(),
        );
        registry.register(
            "recovery_duration_seconds",
            "From a recovery's start to the recovered service answering",
            inner.durations.clone(),
        );
        registry.register("next_block", "The first block whose events are not handled yet", inner.next_block.clone());
        Self { inner: Arc::new(Inner { registry, ..inner }) }
    }
}

impl Metrics {
    /// A claim against `service` was seen.
    pub fn claim_seen(&self, service: &str) {
        self.inner.claims.get_or_create(&ServiceLabels { service: service.to_owned() }).inc();
    }

    /// A claim against `service` was dropped, for `why` (`healthy`, `recovering`, ...).
    pub fn claim_dropped(&self, service: &str, why: &'static str) {
        self.inner.dropped.get_or_create(&ReasonLabels { service: service.to_owned(), reason: why }).inc();
    }

    /// The manager's own probe of `service` found `result` (`healthy`, `unhealthy`).
    pub fn probed(&self, service: &str, result: &'static str) {
        self.inner.probes.get_or_create(&ResultLabels { service: service.to_owned(), result }).inc();
    }

    /// A recovery of `service` ended with `outcome` (`started`, `succeeded`, `failed`).
    pub fn recovery(&self, service: &str, outcome: &'static str) {
        self.inner.recoveries.get_or_create(&OutcomeLabels { service: service.to_owned(), outcome }).inc();
    }

    /// A membership change of `service` left half done ended with `outcome` in the
    /// manager's hands (`finished`, `failed`).
    pub fn membership_change(&self, service: &str, outcome: &'static str) {
        self.inner.membership_changes.get_or_create(&OutcomeLabels { service: service.to_owned(), outcome }).inc();
    }

    /// A recovery took `seconds`, from its start to the service answering again.
    pub fn recovery_took(&self, seconds: f64) {
        self.inner.durations.observe(seconds);
    }

    /// The block cursor.
    pub fn cursor(&self, next_block: u64) {
        self.inner.next_block.set(i64::try_from(next_block).unwrap_or(i64::MAX));
    }

    /// Everything, in Prometheus' text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Serves `/metrics` on `listener` until the task is dropped.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = self.clone();
                async move {
                    let content_type = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
                    ([("content-type", content_type)], metrics.render())
                }
            }),
        );
        axum::serve(listener, app).await
    }

    /// Binds `address` for [`Self::serve`].
    ///
    /// # Errors
    /// When the address cannot be bound (in use, no permission), saying which.
    pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener, crate::Error> {
        tokio::net::TcpListener::bind(address).await.map_err(|e| {
            crate::Error::Invalid(format!("cannot serve /metrics on {address}: {e} (choose another --metrics address)"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_counts_what_happened() {
        let metrics = Metrics::default();
        metrics.claim_seen("a");
        metrics.claim_seen("a");
        metrics.claim_dropped("a", "healthy");
        metrics.recovery("a", "started");
        metrics.recovery("a", "succeeded");
        metrics.recovery_took(4.2);
        metrics.recovery_took(12.0);
        metrics.cursor(99);
        let text = metrics.render();
        assert!(text.contains("br2k_manager_claims_seen_total{service=\"a\"} 2\n"), "{text}");
        assert!(text.contains("br2k_manager_claims_dropped_total{service=\"a\",reason=\"healthy\"} 1\n"), "{text}");
        assert!(text.contains("br2k_manager_recoveries_total{service=\"a\",outcome=\"succeeded\"} 1\n"), "{text}");
        assert!(text.contains("br2k_manager_recovery_duration_seconds_bucket{le=\"5\"} 1\n"), "{text}");
        assert!(text.contains("br2k_manager_recovery_duration_seconds_bucket{le=\"15\"} 2\n"), "{text}");
        assert!(text.contains("br2k_manager_recovery_duration_seconds_count 2\n"), "{text}");
        assert!(text.contains("br2k_manager_next_block 99\n"), "{text}");
    }
}
