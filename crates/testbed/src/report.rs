//! A run's report: parameters, findings, faults; as JSON and as Markdown laid out like
//! the paper's Table 2.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

use crate::attacker::FaultEvent;
use crate::checker::{self, Findings};
use crate::users::{Ack, Unacknowledged};
use crate::{FaultKind, Target, TestbedConfig};

/// The parameters of a run, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct Parameters {
    /// Users.
    pub users: usize,
    /// Requests per user.
    pub requests_per_user: u64,
    /// Requests per second per user.
    pub rate: f64,
    /// The fault.
    pub fault: FaultKind,
    /// Its target.
    pub target: Target,
    /// The interval range between faults (seconds).
    pub interval_s: (f64, f64),
    /// How long each fault lasts (seconds).
    pub duration_s: f64,
    /// etcd's election timeout (milliseconds).
    pub election_ms: u64,
    /// The attacker's seed.
    pub seed: u64,
    /// Replicas.
    pub replicas: usize,
}

/// Everything a run found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The parameters.
    pub parameters: Parameters,
    /// When it started (seconds since the Unix epoch).
    pub started_unix_s: u64,
    /// How long the users ran (seconds).
    pub elapsed_s: f64,
    /// Whether every check passed.
    pub passed: bool,
    /// The findings.
    #[serde(flatten)]
    pub findings: Findings,
    /// Latency of acknowledged requests, retries included (milliseconds).
    pub latency_ms: Latency,
    /// Every fault.
    pub faults: Vec<FaultEvent>,
    /// Acknowledged requests per user.
    pub acknowledged_per_user: std::collections::BTreeMap<u64, u64>,
    /// Requests not acknowledged (at most the first 100).
    pub unacknowledged: Vec<Unacknowledged>,
}

/// Latency percentiles.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest.
    pub max: u64,
}

impl Latency {
    /// The percentiles of the acknowledged requests' latencies.
    pub fn of(acks: &[Ack]) -> Self {
        let mut latencies: Vec<u64> = acks.iter().map(|a| a.latency_ms).collect();
        latencies.sort_unstable();
        let at = |q: f64| latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0);
        Self { p50: at(0.5), p99: at(0.99), max: latencies.last().copied().unwrap_or(0) }
    }
}

impl Report {
    pub(crate) fn new(
        config: &TestbedConfig,
        started: SystemTime,
        end_ms: u64,
        findings: Findings,
        faults: Vec<FaultEvent>,
        acks: &[Ack],
        mut unacknowledged: Vec<Unacknowledged>,
    ) -> Self {
        unacknowledged.truncate(100);
        Self {
            parameters: Parameters {
                users: config.users,
                requests_per_user: config.requests_per_user,
                rate: config.rate,
                fault: config.fault,
                target: config.target,
                interval_s: (config.interval.0.as_secs_f64(), config.interval.1.as_secs_f64()),
                duration_s: config.duration.as_secs_f64(),
                election_ms: config.election_ms,
                seed: config.seed,
                replicas: config.replicas,
            },
            started_unix_s: started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            elapsed_s: end_ms as f64 / 1000.0,
            passed: findings.passed(),
            latency_ms: Latency::of(acks),
            acknowledged_per_user: checker::acks_per_user(acks),
            findings,
            faults,
            unacknowledged,
        }
    }

    /// The report as Markdown: Table 2's rows for this run, then what the paper did not
    /// measure.
    pub fn markdown(&self) -> String {
        let p = &self.parameters;
        let f = &self.findings;
        let mut out = String::new();
        let total = p.users as u64 * p.requests_per_user;
        let _ = writeln!(out, "### {} test, {} faults\n", capitalised(&p.target.to_string()), p.fault);
        // A replacement lasts as long as the membership change takes, not a set time.
        let lasting = if matches!(p.fault, crate::FaultKind::Replace | crate::FaultKind::ScaleDrill) {
            "each a membership change, done when it is".to_owned()
        } else {
            format!("lasting {} s", p.duration_s)
        };
        let _ = writeln!(
            out,
            "{} users x {} requests at {}/s each, {} replicas; a {} fault on {} after every wait of {}-{} s, \
             {lasting}; etcd election timeout {} ms; seed {}; users ran {:.0} s.\n",
            p.users,
            p.requests_per_user,
            p.rate,
            p.replicas,
            p.fault,
            match p.target {
                Target::Leader => "the leader",
                Target::Random => "a random node",
            },
            p.interval_s.0,
            p.interval_s.1,
            p.election_ms,
            p.seed,
            self.elapsed_s
        );
        tables(&mut out, f, total, Some((p.fault, p.interval_s)), &self.faults, &self.latency_ms);
        let _ = writeln!(out, "\nVerdict: {}", if self.passed { "PASSED" } else { "FAILED" });
        out
    }
}

/// Table 2's rows for findings `f` of `total` requests, then what the paper did not
/// measure; `fault` names the attacker's fault and its interval, when there was one.
pub(crate) fn tables(
    out: &mut String,
    f: &Findings,
    total: u64,
    fault: Option<(FaultKind, (f64, f64))>,
    faults: &[FaultEvent],
    latency: &Latency,
) {
    let t = &f.table2;
    let _ = writeln!(out, "| Table 2 row | this run |");
    let _ = writeln!(out, "|---|---:|");
    if let Some((fault, (lo, hi))) = fault {
        let _ = writeln!(out, "| Frequency of {fault} (wait between faults) | {lo}-{hi} s |");
    }
    let _ = writeln!(out, "| # of leader changes | {} |", t.leader_changes);
    let _ = writeln!(out, "| # of Ignore states (out of {total} requests) | {} |", t.ignore);
    let _ = writeln!(out, "| # of Success states (out of {total} requests) | {} |", t.success);
    let _ = writeln!(out, "| # of InProcess states (out of {total} requests) | {} |", t.in_process);
    let _ = writeln!(out, "| # of Fail states | {} |", t.fail);
    let _ = writeln!(out, "| State replication | {} |", if f.replication.identical { "success" } else { "FAILED" });
    let _ = writeln!(out);
    let _ = writeln!(out, "| beyond the paper | this run |");
    let _ = writeln!(out, "|---|---:|");
    let _ = writeln!(out, "| log entries (LS) | {} |", t.total);
    if t.compacted > 0 {
        let _ = writeln!(out, "| of which compacted out of etcd (counted by the compaction tally) | {} |", t.compacted);
    }
    let _ = writeln!(out, "| requests acknowledged | {} of {} |", f.requests.acknowledged, f.requests.sent);
    let _ = writeln!(out, "| acknowledged requests lost | {} |", f.requests.lost);
    if let Some(d) = &f.disaster {
        let _ = writeln!(
            out,
            "| total disaster (every replica killed, every disk deleted) | at {:.1} s, {} processes |",
            d.at_ms as f64 / 1000.0,
            d.killed
        );
        let _ = writeln!(
            out,
            "| recovery point: the newest backup just before (signed, linked to the one recorded on chain) | index {} |",
            d.recovery_point
        );
        let _ = writeln!(
            out,
            "| acknowledged after it and lost in the disaster (backup interval {:.1} s) | {} |",
            d.backup_interval_ms as f64 / 1000.0,
            f.requests.lost_in_disaster
        );
    }
    let _ = writeln!(out, "| duplicates in the log | {} |", f.requests.duplicates);
    let _ = writeln!(out, "| answers that disagree with the log | {} |", f.requests.wrong_answers);
    let _ = writeln!(out, "| entries per replica | {} |", join(&f.replication.entries_per_replica));
    if f.replication.state_versions.iter().any(|&v| v > 0) {
        let _ = writeln!(
            out,
            "| state version per replica (above 0: caught up from a snapshot at that index) | {} |",
            join(&f.replication.state_versions)
        );
    }
    // Faults the attacker injected (none when the faults came from outside).
    if fault.is_some() {
        let _ = writeln!(
            out,
            "| faults injected | {} ({} on the leader) |",
            faults.len(),
            faults.iter().filter(|x| x.was_leader).count()
        );
        let _ = writeln!(
            out,
            "| failover gap, median / max | {} / {} |",
            seconds(f.gaps.median_ms),
            seconds(f.gaps.max_ms)
        );
        if let Some(leader) = f.gaps.leader_median_ms {
            let _ = writeln!(out, "| failover gap after a leader fault, median | {} |", seconds(leader));
        }
        let mut unhealthy: Vec<u64> = faults.iter().filter_map(|x| x.unhealthy_ms).collect();
        // Only a full disk's node is watched until it is healthy again.
        let watched = fault.is_some_and(|(kind, _)| kind.fills_a_disk());
        if watched && (!unhealthy.is_empty() || faults.iter().any(|x| x.healed_ms.is_some())) {
            unhealthy.sort_unstable();
            let never = faults.iter().filter(|x| x.unhealthy_ms.is_none()).count();
            let _ = writeln!(
                out,
                "| time the full node was unhealthy (first unhealthy answer to healthy again), each | {}{} |",
                unhealthy.iter().map(|&ms| seconds(ms)).collect::<Vec<_>>().join(", "),
                if never > 0 { format!("; {never} never healthy again") } else { String::new() }
            );
        }
    }
    let _ = writeln!(
        out,
        "| request latency p50 / p99 / max | {} ms / {} ms / {} ms |",
        latency.p50, latency.p99, latency.max
    );
    if let Some(difference) = &f.replication.difference {
        let _ = writeln!(out, "\nReplicas differ: {difference}");
    }
}

fn capitalised(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

fn join(values: &[impl ToString]) -> String {
    values.iter().map(ToString::to_string).collect::<Vec<_>>().join(" / ")
}

fn seconds(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(kind: FaultKind, unhealthy_ms: Option<u64>) -> String {
        let faults = [FaultEvent { node: 1, was_leader: true, at_ms: 250, healed_ms: Some(1000), unhealthy_ms }];
        let mut out = String::new();
        tables(&mut out, &Findings::default(), 10, Some((kind, (20.0, 40.0))), &faults, &Latency::default());
        out
    }

    #[test]
    fn only_a_full_disks_node_is_reported_unhealthy_or_never_healthy_again() {
        // A killed leader is not watched: nothing about its health is claimed.
        assert!(!rows(FaultKind::Kill, None).contains("unhealthy"), "{}", rows(FaultKind::Kill, None));
        assert!(
            rows(FaultKind::DiskFull, Some(12_000)).contains("| 12.00 s |"),
            "{}",
            rows(FaultKind::DiskFull, Some(12_000))
        );
        assert!(rows(FaultKind::DiskFull, None).contains("1 never healthy again"));
    }
}
