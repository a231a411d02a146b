//! `/metrics` on every replica: Prometheus text that parses, and counters that move with
//! traffic and with a leader change.

use crate::harness::{Cluster, entries};

/// One scrape of replica `i`, checked line by line as the text format (0.0.4) wants it,
/// then parsed.
pub(crate) async fn scrape(c: &Cluster, i: usize) -> prometheus_parse::Scrape {
    let response = c.http.get(format!("{}/metrics", c.replicas[i].url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = response.text().await.unwrap();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.strip_prefix("TYPE ").map(|rest| rest.rsplit(' ').next().unwrap());
            assert!(
                comment.starts_with("HELP br2k_") || matches!(kind, Some("counter" | "gauge" | "histogram")),
                "an unexpected comment line: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "not a number in {line}");
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with("br2k_"), "{line}");
        assert!(name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'), "{line}");
        if let Some(labels) = series.strip_prefix(name) {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            assert!(labels.contains("service=\"") && labels.contains("replica=\""), "{line}");
        }
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the series `name` whose labels include `labels` (0 when there is none).
pub(crate) fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample =
        scrape.samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    match sample.map(|s| &s.value) {
        Some(prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v)) => *v,
        Some(prometheus_parse::Value::Histogram(buckets)) => buckets.last().map_or(0.0, |b| b.count),
        Some(other) => panic!("{name} is {other:?}"),
        None => 0.0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_replica_serves_metrics_that_move_with_traffic_and_a_leader_change() {
    let mut c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let before = scrape(&c, l).await;
    let append = [("route", "POST /append"), ("class", "replication"), ("code", "200")];
    assert_eq!(value(&before, "br2k_requests_total", &append), 0.0);
    assert_eq!(value(&before, "br2k_role", &[("role", "leader")]), 1.0);

    for (n, key) in ["k1", "k2", "k3", "k4", "k5"].into_iter().enumerate() {
        assert_eq!(c.post(l, "/append", &format!("a{}", n + 1), Some(key)).await.status(), 200);
    }
    c.converged(&entries(&[(1, "a1"), (2, "a2"), (3, "a3"), (4, "a4"), (5, "a5")])).await;
    let after = scrape(&c, l).await;
    assert_eq!(value(&after, "br2k_requests_total", &append), 5.0);
    let duration = [("route", "POST /append"), ("class", "replication")];
    assert_eq!(value(&after, "br2k_request_duration_seconds", &duration), 5.0);
    assert!(value(&after, "br2k_group_size_requests", &[]) >= 1.0);
    let writes = [("action", "write as leader")];
    assert!(
        value(&after, "br2k_etcd_request_duration_seconds", &writes)
            > value(&before, "br2k_etcd_request_duration_seconds", &writes)
    );
    assert_eq!(value(&after, "br2k_service_state_index", &[]), 5.0);
    for i in 0..3 {
        let scraped = scrape(&c, i).await;
        let role = if i == l { "leader" } else { "follower" };
        assert_eq!(value(&scraped, "br2k_role", &[("role", role), ("replica", &format!("r{i}"))]), 1.0);
        assert_eq!(value(&scraped, "br2k_applied_index", &[]), 5.0, "replica {i}");
        assert!(value(&scraped, "br2k_etcd_db_size_bytes", &[]) > 0.0);
    }

    // The leader dies: the new one counts its term, the other follower a leader change.
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    let n = c.leader(Some(l)).await;
    let other = (0..3).find(|&i| i != l && i != n).unwrap();
    let led = scrape(&c, n).await;
    assert_eq!(value(&led, "br2k_leadership_terms_total", &[]), 1.0);
    assert_eq!(value(&led, "br2k_role", &[("role", "leader")]), 1.0);
    assert!(value(&led, "br2k_epoch", &[]) > 0.0);
    crate::harness::eventually("the other follower counts the leader change", async || {
        value(&scrape(&c, other).await, "br2k_leader_changes_total", &[]) >= 1.0
    })
    .await;
}
