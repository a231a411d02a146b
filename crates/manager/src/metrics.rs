//! The manager's counters, served in Prometheus' text format on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Upper bounds of the recovery-duration histogram's buckets, in seconds.
const BUCKETS: [f64; 10] = [1.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0];

#[derive(Debug, Default)]
struct Inner {
    claims: BTreeMap<String, u64>,
    dropped: BTreeMap<(String, &'static str), u64>,
    probes: BTreeMap<(String, &'static str), u64>,
    recoveries: BTreeMap<(String, &'static str), u64>,
    durations: Vec<f64>,
    next_block: u64,
}

/// The counters. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding the lock leaves plain counters: still valid.
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut inner)
    }

    /// A claim against `service` was seen.
    pub fn claim_seen(&self, service: &str) {
        self.with(|m| *m.claims.entry(service.to_owned()).or_default() += 1);
    }

    /// A claim against `service` was dropped, for `why` (`healthy`, `recovering`, ...).
    pub fn claim_dropped(&self, service: &str, why: &'static str) {
        self.with(|m| *m.dropped.entry((service.to_owned(), why)).or_default() += 1);
    }

    /// The manager's own probe of `service` found `result` (`healthy`, `unhealthy`).
    pub fn probed(&self, service: &str, result: &'static str) {
        self.with(|m| *m.probes.entry((service.to_owned(), result)).or_default() += 1);
    }

    /// A recovery of `service` ended with `outcome` (`started`, `succeeded`, `failed`).
    pub fn recovery(&self, service: &str, outcome: &'static str) {
        self.with(|m| *m.recoveries.entry((service.to_owned(), outcome)).or_default() += 1);
    }

    /// A recovery took `seconds`, from its start to the service answering again.
    pub fn recovery_took(&self, seconds: f64) {
        self.with(|m| m.durations.push(seconds));
    }

    /// The block cursor.
    pub fn cursor(&self, next_block: u64) {
        self.with(|m| m.next_block = next_block);
    }

    /// Everything, in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut out = String::new();
            let mut counter = |name: &str, help: &str, rows: Vec<(String, u64)>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (labels, value) in rows {
                    let _ = writeln!(out, "{name}{{{labels}}} {value}");
                }
            };
            counter(
                "br2k_manager_claims_seen_total",
                "Claim events seen against the services this manager manages.",
                m.claims.iter().map(|(s, v)| (format!("service=\"{}\"", escape(s)), *v)).collect(),
            );
            counter(
                "br2k_manager_claims_dropped_total",
                "Claims that caused no recovery, by reason.",
                m.dropped.iter().map(|((s, r), v)| (format!("service=\"{}\",reason=\"{r}\"", escape(s)), *v)).collect(),
            );
            counter(
                "br2k_manager_probes_total",
                "The manager's own health probes, by result.",
                m.probes.iter().map(|((s, r), v)| (format!("service=\"{}\",result=\"{r}\"", escape(s)), *v)).collect(),
            );
            counter(
                "br2k_manager_recoveries_total",
                "Recoveries started, succeeded and failed (a failed attempt is retried).",
                m.recoveries
                    .iter()
                    .map(|((s, o), v)| (format!("service=\"{}\",outcome=\"{o}\"", escape(s)), *v))
                    .collect(),
            );
            let name = "br2k_manager_recovery_duration_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} From a recovery's start to the recovered service answering.\n# TYPE {name} histogram"
            );
            for bound in BUCKETS {
                let count = m.durations.iter().filter(|d| **d <= bound).count();
                let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
            }
            let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", m.durations.len());
            let _ = writeln!(out, "{name}_sum {}", m.durations.iter().sum::<f64>());
            let _ = writeln!(out, "{name}_count {}", m.durations.len());
            let name = "br2k_manager_next_block";
            let _ =
                writeln!(out, "# HELP {name} The first block whose events are not handled yet.\n# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {}", m.next_block);
            out
        })
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
                async move { ([("content-type", "text/plain; version=0.0.4")], metrics.render()) }
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

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
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
