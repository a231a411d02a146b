//! A service's traffic over time, from its leader's `/metrics`: requests per second and
//! latency, computed between two scrapes of the same replica (as Prometheus's `rate` and
//! `histogram_quantile` would).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Points kept per service: at the default refresh, the last five minutes.
const POINTS: usize = 300;

/// How long a scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// One point of the chart.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct Point {
    /// Unix seconds.
    pub(super) at: u64,
    pub(super) requests_per_second: f64,
    /// Mean latency of the requests answered since the previous point, milliseconds.
    pub(super) mean_ms: Option<f64>,
    /// Their 99th percentile, estimated from the histogram's buckets, milliseconds.
    pub(super) p99_ms: Option<f64>,
}

/// What one scrape of a leader said.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Sample {
    replica: String,
    requests: f64,
    seconds_sum: f64,
    seconds_count: f64,
    /// Cumulative bucket counts by upper bound (`le`), in ascending order of bound.
    buckets: Vec<(f64, f64)>,
}

/// A service's traffic series.
/// The most of a leader's `/metrics` read: a replica's is a few tens of KiB, and a
/// location is whatever was published on chain.
const MAX_SCRAPE_BYTES: usize = 1024 * 1024;

/// The answer's body as text, refused past [`MAX_SCRAPE_BYTES`].
async fn bounded_text(mut response: reqwest::Response) -> Result<String, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_SCRAPE_BYTES {
            return Err(format!("its metrics are over {MAX_SCRAPE_BYTES} bytes; not read"));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| "its metrics are not UTF-8 text".to_owned())
}

#[derive(Debug, Default)]
pub(super) struct Traffic {
    points: VecDeque<Point>,
    last: Option<(Instant, Sample)>,
    /// Why the last scrape failed, if it did.
    pub(super) error: Option<String>,
}

impl Traffic {
    /// The points so far, oldest first.
    pub(super) fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }

    /// Scrapes `location`'s `/metrics` and adds a point when the previous scrape was of the
    /// same replica (a new leader's counters start again, so its first scrape is a baseline).
    pub(super) async fn scrape(&mut self, http: &reqwest::Client, location: &str, now_unix: u64) {
        if location.is_empty() {
            self.error = Some("no location published: nothing to scrape".into());
            self.last = None;
            return;
        }
        let url = format!("{}/metrics", location.trim_end_matches('/'));
        let answer = async {
            let response = http.get(&url).timeout(SCRAPE_TIMEOUT).send().await.map_err(|e| e.to_string())?;
            if !response.status().is_success() {
                return Err(format!("answered {}", response.status()));
            }
            let text = bounded_text(response).await?;
            parse(&text)
        }
        .await;
        match answer {
            Ok(sample) => {
                self.error = None;
                self.add(Instant::now(), sample, now_unix);
            }
            Err(e) => {
                self.error = Some(format!("{url}: {e}"));
                self.last = None;
            }
        }
    }

    fn add(&mut self, now: Instant, sample: Sample, now_unix: u64) {
        if let Some((then, before)) = &self.last
            && before.replica == sample.replica
            && sample.requests >= before.requests
        {
            let elapsed = now.duration_since(*then).as_secs_f64();
            if elapsed > 0.0 {
                let answered = sample.seconds_count - before.seconds_count;
                let point = Point {
                    at: now_unix,
                    requests_per_second: (sample.requests - before.requests) / elapsed,
                    mean_ms: (answered > 0.0).then(|| (sample.seconds_sum - before.seconds_sum) / answered * 1e3),
                    p99_ms: quantile(0.99, &before.buckets, &sample.buckets).map(|s| s * 1e3),
                };
                if self.points.len() == POINTS {
                    self.points.pop_front();
                }
                self.points.push_back(point);
            }
        }
        self.last = Some((now, sample));
    }
}

/// The `q` quantile of the observations between two cumulative bucket lists, interpolated
/// linearly inside its bucket; `None` without observations in between.
fn quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let earlier: BTreeMap<u64, f64> = before.iter().map(|(le, n)| (le.to_bits(), *n)).collect();
    let deltas: Vec<(f64, f64)> =
        after.iter().map(|(le, n)| (*le, n - earlier.get(&le.to_bits()).copied().unwrap_or(0.0))).collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, cumulative) in &deltas {
        if cumulative >= rank {
            if le.is_infinite() {
                return Some(lower.0); // above the last finite bound: that bound is all we know
            }
            let inside = cumulative - lower.1;
            let fraction = if inside > 0.0 { (rank - lower.1) / inside } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, cumulative);
    }
    None
}

/// Reads what the chart needs from a replica's Prometheus text: its requests (all routes,
/// classes and codes) and its request latency histogram (all routes summed).
fn parse(text: &str) -> Result<Sample, String> {
    let mut sample = Sample::default();
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let mut seen = false;
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l.trim_end_matches('}')));
        let labels = labels_of(labels);
        let label = |key: &str| labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        match name {
            "br2k_requests_total" => sample.requests += value,
            "br2k_request_duration_seconds_sum" => sample.seconds_sum += value,
            "br2k_request_duration_seconds_count" => sample.seconds_count += value,
            "br2k_request_duration_seconds_bucket" => {
                let Some(le) = label("le").and_then(|le| le.replace("+Inf", "inf").parse::<f64>().ok()) else {
                    continue;
                };
                // Order by bound: f64 bits order as the numbers do for non-negative values.
                buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += value;
            }
            "br2k_role" => {}
            _ => continue,
        }
        seen = true;
        if sample.replica.is_empty()
            && let Some(replica) = label("replica")
        {
            sample.replica = replica.to_owned();
        }
    }
    if !seen {
        return Err("no br2k metrics in the answer (is this a br2k replica?)".into());
    }
    sample.buckets = buckets.into_values().collect();
    Ok(sample)
}

/// `key="value",...` with the text format's escapes (`\\`, `\"`, `\n`).
fn labels_of(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() || chars.next() != Some('"') {
            return labels;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"# HELP br2k_requests_total Client requests answered.
# TYPE br2k_requests_total counter
br2k_requests_total{service="s",replica="n2",route="POST /append",class="normal",code="200"} 10
br2k_requests_total{service="s",replica="n2",route="GET /entries",class="query",code="200"} 5
br2k_request_duration_seconds_sum{service="s",replica="n2",route="POST /append",class="normal"} 0.03
br2k_request_duration_seconds_count{service="s",replica="n2",route="POST /append",class="normal"} 15
br2k_request_duration_seconds_bucket{service="s",replica="n2",route="POST /append",class="normal",le="0.001"} 5
br2k_request_duration_seconds_bucket{service="s",replica="n2",route="POST /append",class="normal",le="0.002"} 10
br2k_request_duration_seconds_bucket{service="s",replica="n2",route="POST /append",class="normal",le="+Inf"} 15
# EOF
"#;

    #[test]
    fn a_scrape_sums_every_route_and_keeps_the_buckets_in_order() {
        let sample = parse(SCRAPE).unwrap();
        assert_eq!(sample.replica, "n2");
        assert!((sample.requests - 15.0).abs() < 1e-9);
        assert_eq!(sample.buckets, vec![(0.001, 5.0), (0.002, 10.0), (f64::INFINITY, 15.0)]);
        assert!(parse("<html>not metrics</html>").is_err());
    }

    #[test]
    fn rates_come_from_two_scrapes_of_the_same_replica_only() {
        let mut traffic = Traffic::default();
        let start = Instant::now();
        let first = parse(SCRAPE).unwrap();
        traffic.add(start, first.clone(), 100);
        assert_eq!(traffic.points().count(), 0, "a first scrape is a baseline");
        let later = Sample {
            requests: 35.0,
            seconds_sum: 0.07,
            seconds_count: 35.0,
            buckets: vec![(0.001, 5.0), (0.002, 30.0), (f64::INFINITY, 35.0)],
            ..first.clone()
        };
        traffic.add(start + Duration::from_secs(2), later, 102);
        let point = traffic.points().next().unwrap().clone();
        assert!((point.requests_per_second - 10.0).abs() < 1e-9, "{point:?}");
        assert!((point.mean_ms.unwrap() - 2.0).abs() < 1e-9, "{point:?}");
        // 20 new observations, all between 1 and 2 ms: p99 interpolates inside that bucket.
        let p99 = point.p99_ms.unwrap();
        assert!(p99 > 1.9 && p99 <= 2.0, "{p99}");
        // A new leader's counters start again: its first scrape is only a baseline.
        traffic.add(start + Duration::from_secs(3), Sample { replica: "n3".into(), ..first }, 103);
        assert_eq!(traffic.points().count(), 1);
    }
}
