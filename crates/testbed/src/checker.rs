//! The checker: compares every replica's log, every user's acknowledged answers and
//! every RS record, and counts what the paper's Table 2 counts plus what it could not
//! see (lost and duplicated requests, failover gaps).

use std::collections::{BTreeMap, HashMap};

use br2k_logserver::Entry;
use br2k_replication::inspect::Records;
use br2k_replication::{ProcessState, RequestKind};
use serde::Serialize;

use crate::attacker::FaultEvent;
use crate::users::{Ack, Unacknowledged};

/// The paper's Table 2 rows for one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Table2 {
    /// Leadership terms after the first.
    pub leader_changes: u64,
    /// Entries a new leader found unprocessed (Null) and ignored.
    pub ignore: u64,
    /// Entries executed.
    pub success: u64,
    /// Entries left InProcess.
    pub in_process: u64,
    /// Entries whose execution failed (the app refused them).
    pub fail: u64,
    /// Entries still Null (not yet processed).
    pub null: u64,
    /// All entries (LS).
    pub total: u64,
    /// Of these, entries log compaction deleted from etcd (counted from its tally).
    pub compacted: u64,
}

/// What happened to the users' requests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestCounts {
    /// Requests the users sent.
    pub sent: u64,
    /// Acknowledged.
    pub acknowledged: u64,
    /// Given up on or refused.
    pub unacknowledged: u64,
    /// Acknowledged, but not in the replicas' log where the answer said.
    pub lost: u64,
    /// Extra copies of a request in the log (a (user, seq) appearing more than once).
    pub duplicates: u64,
    /// Acknowledged with a position that the log does not have the request at.
    pub wrong_answers: u64,
    /// Acknowledged after the newest backup before a total disaster, and gone
    /// after the restore: what the backup interval allows to be lost. Those acknowledged
    /// more than an interval before the disaster count as `lost` too.
    pub lost_in_disaster: u64,
}

/// A total disaster brought about during the run: every replica killed and every disk lost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Disaster {
    /// When it struck, from the start of the run (milliseconds).
    pub at_ms: u64,
    /// The log index the newest backup reached just before (signed by the leader and
    /// linked to the one recorded on chain, or that one): every request acknowledged at or
    /// below it must survive.
    pub recovery_point: u64,
    /// The service's backup interval (milliseconds): nothing acknowledged longer than this
    /// before the disaster may be lost.
    pub backup_interval_ms: u64,
    /// The processes killed (runner, apps and etcd members).
    pub killed: usize,
}

/// Whether the replicas agree.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Replication {
    /// All replicas' logs identical, and equal to the Success entries in etcd.
    pub identical: bool,
    /// Entries in each replica's log, in node order.
    pub entries_per_replica: Vec<usize>,
    /// The first difference found, if any.
    pub difference: Option<String>,
    /// Each replica's state version at the end, in node order: above 0, the replica
    /// caught up from a peer's snapshot taken at that index.
    pub state_versions: Vec<u64>,
}

/// Time users spent without any successful answer after each fault.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Gaps {
    /// Faults measured.
    pub faults: usize,
    /// Median gap (milliseconds).
    pub median_ms: u64,
    /// Longest gap (milliseconds).
    pub max_ms: u64,
    /// Median gap after faults that hit the leader (milliseconds).
    pub leader_median_ms: Option<u64>,
    /// Each fault's gap, in order (milliseconds).
    pub each_ms: Vec<u64>,
}

/// The checker's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Findings {
    /// Table 2.
    pub table2: Table2,
    /// Request counts.
    pub requests: RequestCounts,
    /// Replica agreement.
    pub replication: Replication,
    /// Failover gaps.
    pub gaps: Gaps,
    /// The total disaster of the run, if one was brought about.
    pub disaster: Option<Disaster>,
}

impl Findings {
    /// Whether the run kept every promise: no acknowledged request lost or answered
    /// wrongly, no duplicate, replicas identical.
    pub const fn passed(&self) -> bool {
        self.requests.lost == 0
            && self.requests.duplicates == 0
            && self.requests.wrong_answers == 0
            && self.replication.identical
    }
}

/// Checks a finished run.
pub fn check(
    records: &Records,
    logs: &[Vec<Entry>],
    acks: &[Ack],
    unacknowledged: &[Unacknowledged],
    faults: &[FaultEvent],
    disaster: Option<&Disaster>,
    end_ms: u64,
) -> Findings {
    let table2 = table2(records);
    let replication = compare_replicas(records, logs);
    let reference = logs.first().map(Vec::as_slice).unwrap_or_default();
    let requests = count_requests(reference, acks, unacknowledged, disaster);
    let gaps = gaps(acks.iter().map(|a| a.at_ms).collect(), faults, end_ms);
    Findings { table2, requests, replication, gaps, disaster: disaster.cloned() }
}

fn table2(records: &Records) -> Table2 {
    let deleted = &records.compacted;
    let mut t = Table2 {
        leader_changes: records.terms.saturating_sub(1),
        total: records.log_size,
        compacted: deleted.first_index.saturating_sub(1),
        success: deleted.success,
        ignore: deleted.ignore,
        fail: deleted.fail,
        ..Table2::default()
    };
    for entry in &records.entries {
        match entry.state.state {
            ProcessState::Success => t.success += 1,
            ProcessState::Ignore => t.ignore += 1,
            ProcessState::InProcess => t.in_process += 1,
            ProcessState::Fail => t.fail += 1,
            ProcessState::Null => t.null += 1,
        }
    }
    t
}

/// Every replica's log must equal every other's and the Success Replication entries of
/// etcd (index, user and seq taken from the stored request). Below the first index still
/// in etcd, compaction's tally says how many effects each log must hold there.
fn compare_replicas(records: &Records, logs: &[Vec<Entry>]) -> Replication {
    let first_index = records.compacted.first_index.max(1);
    let below = usize::try_from(records.compacted.replication_success).unwrap_or(usize::MAX);
    let mut expected = Vec::new();
    let mut difference = None;
    for entry in &records.entries {
        if entry.state.kind != RequestKind::Replication || entry.state.state != ProcessState::Success {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(&entry.request.body) {
            Ok(body) => expected.push(Entry {
                index: entry.index,
                user: body["user"].as_u64().unwrap_or(u64::MAX),
                seq: body["seq"].as_u64(),
            }),
            Err(e) => {
                difference
                    .get_or_insert_with(|| format!("etcd entry {} has a body that is not JSON: {e}", entry.index));
            }
        }
    }
    for (node, log) in logs.iter().enumerate() {
        if difference.is_some() {
            break;
        }
        let compacted_part = log.iter().take_while(|e| e.index < first_index).count();
        if log.len() != below + expected.len() {
            difference = Some(format!(
                "node {} holds {} entries, etcd has {} Success entries ({} of them compacted)",
                node + 1,
                log.len(),
                below + expected.len(),
                below
            ));
        } else if compacted_part != below {
            difference = Some(format!(
                "node {} holds {compacted_part} entries below index {first_index}, compaction counted {below}",
                node + 1
            ));
        } else if let Some((got, want)) = log[below..].iter().zip(&expected).find(|(got, want)| got != want) {
            difference = Some(format!("node {} holds {got:?} where etcd says {want:?}", node + 1));
        }
    }
    // Below the first index etcd keeps only counts: the replicas must agree with each other.
    if difference.is_none()
        && let Some((node, _)) = logs.iter().enumerate().skip(1).find(|(_, log)| Some(*log) != logs.first())
    {
        difference = Some(format!("nodes 1 and {} hold different logs", node + 1));
    }
    Replication {
        identical: difference.is_none() && !logs.is_empty(),
        entries_per_replica: logs.iter().map(Vec::len).collect(),
        difference,
        state_versions: Vec::new(),
    }
}

fn count_requests(
    log: &[Entry],
    acks: &[Ack],
    unacknowledged: &[Unacknowledged],
    disaster: Option<&Disaster>,
) -> RequestCounts {
    let by_index: HashMap<u64, (usize, &Entry)> = log.iter().enumerate().map(|(pos, e)| (e.index, (pos, e))).collect();
    let mut copies: HashMap<(u64, u64), u64> = HashMap::new();
    for entry in log {
        if let Some(seq) = entry.seq {
            *copies.entry((entry.user, seq)).or_default() += 1;
        }
    }
    let mut counts = RequestCounts {
        sent: (acks.len() + unacknowledged.len()) as u64,
        acknowledged: acks.len() as u64,
        unacknowledged: unacknowledged.len() as u64,
        duplicates: copies.values().map(|n| n - 1).sum(),
        ..RequestCounts::default()
    };
    for ack in acks {
        match by_index.get(&ack.index) {
            Some((position, entry)) if entry.user == ack.user && entry.seq == Some(ack.seq) => {
                if *position as u64 != ack.position {
                    counts.wrong_answers += 1;
                }
            }
            // Gone: after a disaster, its index may hold a later request now.
            _ => match disaster {
                Some(d) if ack.index > d.recovery_point && ack.at_ms <= d.at_ms => {
                    counts.lost_in_disaster += 1;
                    if ack.at_ms + d.backup_interval_ms < d.at_ms {
                        counts.lost += 1;
                    }
                }
                _ => counts.lost += 1,
            },
        }
    }
    counts
}

/// For each fault: the longest time without a successful answer from the moment it hit
/// until the next fault (or the end): the first answer after it counts from the fault
/// itself. `times`: when each successful answer arrived, from the start of the run (ms).
pub(crate) fn gaps(mut times: Vec<u64>, faults: &[FaultEvent], end_ms: u64) -> Gaps {
    times.sort_unstable();
    let mut each = Vec::new();
    let mut leader = Vec::new();
    for (k, fault) in faults.iter().enumerate() {
        let until = faults.get(k + 1).map_or(end_ms, |next| next.at_ms);
        let start = times.partition_point(|&t| t <= fault.at_ms);
        let stop = times.partition_point(|&t| t <= until);
        let mut previous = fault.at_ms;
        let mut longest = 0;
        for &t in &times[start..stop] {
            longest = longest.max(t - previous);
            previous = t;
        }
        if start == stop {
            longest = until - fault.at_ms; // no answer at all before the next fault
        }
        each.push(longest);
        if fault.was_leader {
            leader.push(longest);
        }
    }
    Gaps {
        faults: each.len(),
        median_ms: median(&each).unwrap_or(0),
        max_ms: each.iter().copied().max().unwrap_or(0),
        leader_median_ms: median(&leader),
        each_ms: each,
    }
}

fn median(values: &[u64]) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

/// Per-user acknowledged counts, for the report.
pub fn acks_per_user(acks: &[Ack]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for ack in acks {
        *out.entry(ack.user).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(user: u64, seq: u64, index: u64, position: u64, at_ms: u64) -> Ack {
        Ack { user, seq, index, position, at_ms, latency_ms: 1 }
    }

    fn entry(index: u64, user: u64, seq: u64) -> Entry {
        Entry { index, user, seq: Some(seq) }
    }

    #[test]
    fn counts_lost_duplicate_and_wrong_answers() {
        let log = vec![entry(1, 1, 1), entry(3, 2, 1), entry(4, 1, 1)];
        let acks = vec![
            ack(1, 1, 1, 0, 10), // fine
            ack(2, 1, 3, 5, 20), // right entry, wrong position
            ack(2, 2, 9, 2, 30), // index 9 is not in the log: lost
            ack(1, 2, 4, 2, 40), // index 4 holds (1, 1): lost
        ];
        let counts = count_requests(&log, &acks, &[], None);
        assert_eq!((counts.lost, counts.duplicates, counts.wrong_answers), (2, 1, 1));
        assert_eq!((counts.sent, counts.acknowledged), (4, 4));
    }

    #[test]
    fn after_a_disaster_only_what_the_backup_interval_allows_may_be_gone() {
        // The backup recorded before the disaster (at 10 s, interval 3 s) reached index 4;
        // the restored log goes on from there, and index 5 now holds a later request.
        let log = vec![entry(1, 1, 1), entry(2, 1, 2), entry(3, 2, 1), entry(4, 2, 2), entry(5, 3, 9)];
        let disaster = Disaster { at_ms: 10_000, recovery_point: 4, backup_interval_ms: 3_000, killed: 7 };
        let acks = vec![
            ack(1, 1, 1, 0, 2_000),  // covered by the backup: kept
            ack(1, 2, 2, 1, 4_000),  // covered
            ack(2, 1, 3, 2, 5_000),  // covered
            ack(2, 2, 4, 3, 6_000),  // covered
            ack(1, 3, 5, 4, 9_000),  // after the backup, within the interval: may be lost
            ack(2, 3, 6, 5, 6_500),  // after the backup, older than the interval: a loss
            ack(3, 9, 5, 4, 12_000), // after the restore: kept
        ];
        let counts = count_requests(&log, &acks, &[], Some(&disaster));
        assert_eq!((counts.lost_in_disaster, counts.lost, counts.wrong_answers), (2, 1, 0));
        // Below the recovery point nothing may go, however recent.
        let short = vec![entry(1, 1, 1), entry(2, 1, 2), entry(3, 2, 1), entry(5, 3, 9)];
        let counts = count_requests(&short, &acks[..4], &[], Some(&disaster));
        assert_eq!((counts.lost_in_disaster, counts.lost), (0, 1));
    }

    fn records(compacted: br2k_replication::CompactedLog, entries: &[(u64, u64, u64)]) -> Records {
        use br2k_replication::inspect::InspectedEntry;
        use br2k_replication::{EntryState, LogEntry};
        let entries: Vec<InspectedEntry> = entries
            .iter()
            .map(|&(index, user, seq)| InspectedEntry {
                index,
                state: EntryState {
                    kind: RequestKind::Replication,
                    state: ProcessState::Success,
                    epoch: 1,
                    response: None,
                },
                request: LogEntry {
                    method: "POST".into(),
                    path: "/log".into(),
                    query: None,
                    headers: Vec::new(),
                    body: format!("{{\"user\":{user},\"seq\":{seq}}}").into_bytes(),
                    idempotency_key: None,
                    stamp: None,
                },
            })
            .collect();
        Records {
            log_size: entries.last().map_or(0, |e| e.index),
            service_state_index: entries.last().map_or(0, |e| e.index),
            compacted,
            entries,
            terms: 2,
        }
    }

    #[test]
    fn a_compacted_log_is_checked_against_the_compaction_tally() {
        // Entries 1-3 were compacted: 1 and 2 appended, 3 ignored.
        let compacted =
            br2k_replication::CompactedLog { first_index: 4, success: 2, fail: 0, ignore: 1, replication_success: 2 };
        let records = records(compacted, &[(4, 7, 3), (5, 7, 4)]);
        let full = vec![entry(1, 7, 1), entry(2, 7, 2), entry(4, 7, 3), entry(5, 7, 4)];
        let agree = compare_replicas(&records, &[full.clone(), full.clone(), full.clone()]);
        assert!(agree.identical, "{:?}", agree.difference);
        let table = table2(&records);
        assert_eq!((table.success, table.ignore, table.compacted, table.leader_changes), (4, 1, 3, 1));

        // A replica that lost an effect from the compacted part is caught by the count...
        let short = vec![entry(1, 7, 1), entry(4, 7, 3), entry(5, 7, 4)];
        let found = compare_replicas(&records, &[full.clone(), short, full.clone()]);
        assert!(found.difference.unwrap().contains("node 2 holds 3 entries"));
        // ...and one that holds a different one there by the comparison of the replicas.
        let other = vec![entry(1, 7, 1), entry(2, 9, 9), entry(4, 7, 3), entry(5, 7, 4)];
        let found = compare_replicas(&records, &[full.clone(), full, other]);
        assert!(found.difference.unwrap().contains("hold different logs"));
    }

    #[test]
    fn gap_is_the_longest_silence_after_each_fault() {
        let answers = vec![100, 200, 1900, 2000, 2100, 5000, 5100];
        let faults = vec![
            FaultEvent { node: 1, was_leader: true, at_ms: 250, healed_ms: Some(1000), unhealthy_ms: None },
            FaultEvent { node: 2, was_leader: false, at_ms: 4000, healed_ms: Some(4500), unhealthy_ms: None },
        ];
        let gaps = gaps(answers, &faults, 6000);
        // 250 -> 1900 is the first fault's; the quiet after 2100 runs into the next fault.
        assert_eq!(gaps.each_ms, vec![1650, 1000]);
        assert_eq!(gaps.leader_median_ms, Some(1650));
        assert_eq!(gaps.max_ms, 1650);
    }
}
