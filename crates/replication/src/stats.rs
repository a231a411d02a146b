//! Where a replica's time goes: every etcd call by what it was for, and the leader
//! pipeline's stages, counted since the replica started. Served in `/br2k/status` as
//! `pipeline`, so a benchmark (or a person wondering why a service is slow) can see how
//! many etcd round trips a request costs and which stage takes the time, without a
//! profiler. Counting costs a lock per call: nothing next to an etcd round trip.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::{Deserialize, Serialize};

/// How often something happened, and the time it took in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// How many times.
    pub calls: u64,
    /// Their time in all, microseconds.
    pub micros: u64,
}

impl Tally {
    /// What happened between `earlier` and `self` (counters only grow).
    #[must_use]
    pub const fn since(self, earlier: Self) -> Self {
        Self { calls: self.calls.saturating_sub(earlier.calls), micros: self.micros.saturating_sub(earlier.micros) }
    }
}

/// The leader pipeline's stages, timed once per group (or per request where it says so).
pub(crate) mod stage {
    /// Requests the HTTP front handed to the leader's queue: `calls` counts them, no time.
    pub(crate) const QUEUED: &str = "leader: requests queued";
    /// Idempotency keys whose state was read from etcd: only retries of a request the
    /// idempotency table holds without an answer (left in doubt by a dead leader); every
    /// other key is settled against the table in memory.
    pub(crate) const KEY_LOOKUP: &str = "leader: idempotency key lookups";
    /// A group's Replicate Request write (RLEs, RS, LS) in a
    /// transaction of its own: the processor held no group to carry it.
    pub(crate) const REPLICATE: &str = "leader: replicate write";
    /// A group's replicate write carried by the outcome write of the group before it (in
    /// the same transaction when both fit etcd's limits, else right after it): the time
    /// counts from the offer to the answer, the earlier group's execution included.
    pub(crate) const CARRIED: &str = "leader: replicate carried by an outcome write";
    /// A group's RS=InProcess write.
    pub(crate) const IN_PROCESS: &str = "leader: in-process write";
    /// Handlers run, one call per request.
    pub(crate) const EXECUTE: &str = "leader: execute";
    /// The app state made durable.
    pub(crate) const PERSIST: &str = "leader: persist app state";
    /// A group's outcomes, LPI and SSI.
    pub(crate) const OUTCOME: &str = "leader: outcome write";
    /// Requests logged: `calls` counts them, no time.
    pub(crate) const REQUESTS: &str = "leader: requests logged";
    /// Groups processed (requests / groups is the mean group size): no time.
    pub(crate) const GROUPS: &str = "leader: groups processed";
    /// Entries a follower took from its watch rather than reading them (`calls` counts
    /// them, no time).
    pub(crate) const FOLLOW_WATCHED: &str = "follower: entries taken from the watch";
    /// A follower's rounds of applying what SSI covers.
    pub(crate) const FOLLOW: &str = "follower: apply rounds";
}

/// The counters of one replica.
#[derive(Debug)]
pub(crate) struct Stats {
    tallies: Mutex<BTreeMap<&'static str, Tally>>,
    /// etcd calls, by the action the store names them with.
    etcd: Mutex<BTreeMap<&'static str, Tally>>,
    /// The same calls' latencies, for `/metrics`.
    pub(crate) etcd_seconds: EtcdHistograms,
}

impl Default for Stats {
    fn default() -> Self {
        Self { tallies: Mutex::default(), etcd: Mutex::default(), etcd_seconds: etcd_histograms() }
    }
}

impl Stats {
    /// Counts one etcd call for `action` (as the store names it in errors).
    pub(crate) fn add_etcd(&self, action: &'static str, took: Duration) {
        count(&self.etcd, action, 1, took);
        self.etcd_seconds.get_or_create(&ActionLabels { action }).observe(took.as_secs_f64());
    }

    /// Counts one `what` that took `took`.
    pub(crate) fn add(&self, what: &'static str, took: Duration) {
        self.add_many(what, 1, took);
    }

    /// Counts `calls` of `what` that took `took` in all.
    pub(crate) fn add_many(&self, what: &'static str, calls: u64, took: Duration) {
        count(&self.tallies, what, calls, took);
    }

    /// Runs `work` and counts it as one `what`.
    pub(crate) async fn time<T>(&self, what: &'static str, work: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = work.await;
        self.add(what, started.elapsed());
        out
    }

    /// Every tally so far, by name; etcd calls as `etcd: <action>`.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, Tally> {
        let mut out: BTreeMap<String, Tally> =
            crate::sync::lock(&self.tallies).iter().map(|(name, tally)| ((*name).to_owned(), *tally)).collect();
        for (action, tally) in crate::sync::lock(&self.etcd).iter() {
            out.insert(format!("etcd: {action}"), *tally);
        }
        out
    }
}

/// Adds `calls` that took `took` in all to `what`'s tally in `tallies`.
fn count(tallies: &Mutex<BTreeMap<&'static str, Tally>>, what: &'static str, calls: u64, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    let mut tallies = crate::sync::lock(tallies);
    let tally = tallies.entry(what).or_default();
    tally.calls += calls;
    tally.micros = tally.micros.saturating_add(micros);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ActionLabels {
    /// What the etcd call was for (`write as leader`, `read log entries`, ...).
    pub(crate) action: &'static str,
}

/// etcd calls' latency by action (kept with the other etcd counters in
/// [`crate::stats::Stats`], which the store has).
pub(crate) type EtcdHistograms = Family<ActionLabels, Histogram, fn() -> Histogram>;

pub(crate) fn etcd_histograms() -> EtcdHistograms {
    fn histogram() -> Histogram {
        Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
    }
    Family::new_with_constructor(histogram)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tallies_add_up_by_name() {
        let stats = Stats::default();
        stats.add_etcd("get", Duration::from_micros(300));
        stats.add_etcd("get", Duration::from_micros(200));
        stats.add_many(stage::REQUESTS, 16, Duration::ZERO);
        let answer = stats.time(stage::EXECUTE, async { 7 }).await;
        assert_eq!(answer, 7);
        let seen = stats.snapshot();
        assert_eq!(seen["etcd: get"], Tally { calls: 2, micros: 500 });
        assert_eq!(seen[stage::REQUESTS].calls, 16);
        assert_eq!(seen[stage::EXECUTE].calls, 1);
        let later = Tally { calls: 5, micros: 900 };
        assert_eq!(later.since(seen["etcd: get"]), Tally { calls: 3, micros: 400 });
    }
}
