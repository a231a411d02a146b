//! A short testbed for each fault kind and both targets: every one must lose no
//! acknowledged request, duplicate none, and end with identical replicas.

use crate::{br2k, logserver, one_at_a_time, payments};

/// A short `br2k testbed` of 3 users sending `requests` each at 5/s, with `fault` on
/// `target` after every wait in `timing[0]` for `timing[1]` seconds, snapshots every 20
/// entries; asserts it passed and returns its JSON report and its stdout.
fn testbed(
    dir: &std::path::Path,
    fault: &str,
    target: &str,
    seed: &str,
    requests: &str,
    timing: [&str; 2],
) -> (serde_json::Value, String) {
    let json = dir.join(format!("{fault}-{target}.json"));
    let output = br2k()
        .args(["testbed", "--users", "3", "--requests", requests, "--rate", "5", "--interval", timing[0]])
        .args(["--duration", timing[1], "--election-timeout", "500", "--fault", fault, "--target", target])
        .args(["--seed", seed, "--give-up-after", "60", "--snapshot-interval", "20", "--trailing-entries", "5"])
        .arg("--app")
        .arg(logserver())
        .arg("--json-out")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{fault}/{target} failed:\n{stdout}\n{stderr}");
    (serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap(), stdout)
}

#[test]
fn every_fault_kind_on_both_targets_loses_and_duplicates_nothing() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 11;
    for fault in ["partition", "pause", "kill", "wipe", "replace"] {
        for target in ["leader", "random"] {
            seed += 1;
            // Small snapshot intervals, so that a short run compacts its log and a wiped
            // node must catch up from a peer's snapshot.
            let (report, stdout) = testbed(dir.path(), fault, target, &seed.to_string(), "30", ["1.5..2.5", "2"]);
            let context = format!("{fault}/{target}:\n{stdout}");
            assert_eq!(report["passed"], true, "{context}");
            assert_eq!(report["requests"]["lost"], 0, "{context}");
            assert_eq!(report["requests"]["duplicates"], 0, "{context}");
            assert_eq!(report["requests"]["wrong_answers"], 0, "{context}");
            assert_eq!(report["replication"]["identical"], true, "{context}");
            assert_eq!(report["requests"]["acknowledged"], 90, "every request is acknowledged in the end: {context}");
            assert_eq!(report["replication"]["entries_per_replica"], serde_json::json!([90, 90, 90]), "{context}");
            let faults = report["faults"].as_array().unwrap();
            assert!(!faults.is_empty(), "the attacker struck at least once: {context}");
            if target == "leader" {
                assert!(faults.iter().all(|f| f["was_leader"] == true), "{context}");
                assert!(report["table2"]["leader_changes"].as_u64().unwrap() >= 1, "{context}");
            }
            assert!(stdout.contains("| # of leader changes |"), "Table 2 on stdout: {context}");
            assert!(report["table2"]["compacted"].as_u64().unwrap() > 0, "the log was compacted: {context}");
            if fault == "wipe" {
                let versions = report["replication"]["state_versions"].as_array().unwrap();
                assert!(
                    versions.iter().any(|v| v.as_u64().unwrap() > 0),
                    "a wiped node caught up from a snapshot: {context}"
                );
            }
        }
    }
}

#[test]
fn a_disk_that_fills_on_either_target_loses_nothing_and_the_report_says_how_long_the_node_was_unhealthy() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    for (target, seed) in [("leader", "31"), ("random", "32")] {
        // A fault of 8 s: what is left of the log file's last page takes a few seconds of
        // appends before the first one fails, as on any full disk.
        let (report, stdout) = testbed(dir.path(), "disk-full", target, seed, "60", ["1..2", "8"]);
        let context = format!("disk-full/{target}:\n{stdout}");
        assert_eq!(report["passed"], true, "{context}");
        assert_eq!(report["requests"]["lost"], 0, "{context}");
        assert_eq!(report["requests"]["duplicates"], 0, "{context}");
        assert_eq!(report["replication"]["entries_per_replica"], serde_json::json!([180, 180, 180]), "{context}");
        let faults = report["faults"].as_array().unwrap();
        assert!(
            faults.iter().any(|f| f["unhealthy_ms"].as_u64().is_some_and(|ms| ms > 0)),
            "a filled node stopped and said so: {context}"
        );
        assert!(stdout.contains("| time the full node was unhealthy"), "{context}");
    }
}

#[test]
fn the_scale_drill_grows_to_five_and_back_to_three_under_requests_and_loses_nothing() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    // `--fault scale-drill` is what `--scale-drill` sets; the leader leaves each time.
    let (report, stdout) = testbed(dir.path(), "scale-drill", "leader", "41", "100", ["0.5..1", "1"]);
    let context = format!("scale-drill:\n{stdout}");
    assert_eq!(report["passed"], true, "{context}");
    assert_eq!(report["requests"]["lost"], 0, "{context}");
    assert_eq!(report["requests"]["duplicates"], 0, "{context}");
    let faults = report["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 4, "two nodes added, two removed: {context}");
    let nodes: Vec<u64> = faults.iter().map(|f| f["node"].as_u64().unwrap()).collect();
    assert_eq!(&nodes[..2], [4, 5], "n4 and n5 were added: {context}");
    assert!(faults[2..].iter().all(|f| f["was_leader"] == true), "the leader left each time: {context}");
    assert_eq!(report["replication"]["entries_per_replica"], serde_json::json!([300, 300, 300]), "{context}");
}

#[test]
fn bad_flags_are_refused_with_the_reason() {
    let output = br2k().args(["testbed", "--interval", "40..20"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("LO must not be above HI"), "{stderr}");

    let output = br2k().args(["testbed", "--scale-drill", "--fault", "kill"]).output().unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot be used with"),
        "--scale-drill is the run's fault"
    );
    let output = br2k().args(["testbed", "--fault", "cut"]).output().unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("expected partition, pause, kill, wipe, disk-full, etcd-disk-full, replace, scale-drill or none")
    );

    let output = br2k().args(["testbed", "--snapshot-interval", "20", "--trailing-entries", "20"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("trailing entries (20) must be smaller than the snapshot interval (20)"), "{stderr}");

    let output = br2k()
        .args(["testbed", "--replicas", "2", "--fault", "kill"])
        .arg("--app")
        .arg(crate::logserver())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("use at least 3"));
}

/// A short payments testbed (2 users x 20 requests at 4/s, on loopback) with `args`
/// (separated by spaces);
/// asserts it passed and what every payments run must hold (nothing paid twice or lost,
/// ledgers equal to each other and to the chain, every request acknowledged in the end);
/// returns its JSON report and its stdout.
fn payments_testbed(work: &std::path::Path, args: &str) -> (serde_json::Value, String) {
    let json = work.with_extension("json");
    let output = br2k()
        .args(["testbed", "--workload", "payments", "--users", "2", "--requests", "20", "--rate", "4"])
        .args(["--election-timeout", "500", "--network", "loopback"])
        .args(args.split_whitespace())
        .arg("--app")
        .arg(payments())
        .arg("--json-out")
        .arg(&json)
        .arg("--work-dir")
        .arg(work)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["double_payments"], 0, "{stdout}");
    assert_eq!(report["lost_payouts"], 0, "{stdout}");
    assert_eq!(report["balance_mismatches"], 0, "{stdout}");
    assert_eq!(report["ledgers_identical"], true, "{stdout}");
    let payouts = report["payouts_acknowledged"].as_u64().unwrap();
    assert_eq!(payouts + report["deposits_acknowledged"].as_u64().unwrap(), 40, "every request acknowledged: {stdout}");
    assert_eq!(report["transfers_on_chain"], payouts, "one transfer per payout: {stdout}");
    (report, stdout)
}

#[test]
fn payouts_under_leader_kills_are_each_paid_once_and_every_ledger_equals_the_chain() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (_, stdout) = payments_testbed(
        &dir.path().join("work"),
        "--interval 1.5..2.5 --duration 1 --fault kill --target leader --seed 5",
    );
    assert!(stdout.contains("faults injected") && !stdout.contains("| faults injected | 0 |"), "{stdout}");
}

#[test]
fn payouts_on_a_chain_with_block_times_reorgs_and_two_endpoints_are_each_paid_once_checked_from_the_dump() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let (report, stdout) = payments_testbed(
        &work,
        "--in-flight 4 --block-time 1 --confirmations 2 --rpc-endpoints 2 --chain-fault reorg --chain-interval 3..5 \
         --interval 4..6 --duration 1 --fault kill --target leader --seed 6 --give-up-after 90",
    );
    let payouts = report["payouts_acknowledged"].as_u64().unwrap();
    // The chain was checked from its dump, which stays in the work directory with every
    // acknowledged payout's hash.
    let chain = &report["chain"];
    assert_eq!(chain["checked_from_dump"], true, "{stdout}");
    assert_eq!((chain["block_time"].as_u64(), chain["confirmations"].as_u64()), (Some(1), Some(2)), "{stdout}");
    let state = std::fs::read_to_string(chain["state_file"].as_str().unwrap()).unwrap();
    assert!(serde_json::from_str::<serde_json::Value>(&state).unwrap()["blocks"].is_array(), "anvil's dump");
    let lines = std::fs::read_to_string(work.join("payouts.jsonl")).unwrap();
    assert_eq!(lines.lines().count() as u64, payouts, "a line per acknowledged payout");
    let reorgs = chain["faults"].as_array().unwrap();
    assert!(reorgs.iter().any(|f| f["kind"] == "reorg" && f["depth"] == 1 && f["error"].is_null()), "{stdout}");
    assert_eq!(chain["finality_violations_open"], 0, "{stdout}");
    assert!(stdout.contains("| chain checked from its dumped state | yes |"), "{stdout}");
}
