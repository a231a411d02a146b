//! A short testbed for each fault kind and both targets: every one must lose no
//! acknowledged request, duplicate none, and end with identical replicas.

use crate::{br2k, logserver, one_at_a_time, payments};

#[test]
fn every_fault_kind_on_both_targets_loses_and_duplicates_nothing() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let mut seed = 11;
    for fault in ["partition", "pause", "kill", "wipe"] {
        for target in ["leader", "random"] {
            seed += 1;
            let json = dir.path().join(format!("{fault}-{target}.json"));
            // Small snapshot intervals, so that a short run compacts its log and a wiped
            // node must catch up from a peer's snapshot.
            let output = br2k()
                .args(["testbed", "--users", "3", "--requests", "30", "--rate", "5", "--interval", "1.5..2.5"])
                .args(["--duration", "2", "--election-timeout", "500", "--fault", fault, "--target", target])
                .args(["--seed", &seed.to_string(), "--give-up-after", "60"])
                .args(["--snapshot-interval", "20", "--trailing-entries", "5"])
                .arg("--app")
                .arg(logserver())
                .arg("--json-out")
                .arg(&json)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{fault}/{target} failed:\n{stdout}\n{stderr}");
            let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
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
        let json = dir.path().join(format!("disk-full-{target}.json"));
        // A fault of 8 s: what is left of the log file's last page takes a few seconds of
        // appends before the first one fails, as on any full disk.
        let output = br2k()
            .args(["testbed", "--users", "3", "--requests", "60", "--rate", "5", "--interval", "1..2"])
            .args(["--duration", "8", "--election-timeout", "500", "--fault", "disk-full", "--target", target])
            .args(["--seed", seed, "--give-up-after", "60", "--snapshot-interval", "20", "--trailing-entries", "5"])
            .arg("--app")
            .arg(logserver())
            .arg("--json-out")
            .arg(&json)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "disk-full/{target} failed:\n{stdout}\n{stderr}");
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
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
fn bad_flags_are_refused_with_the_reason() {
    let output = br2k().args(["testbed", "--interval", "40..20"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("LO must not be above HI"), "{stderr}");

    let output = br2k().args(["testbed", "--fault", "cut"]).output().unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("expected partition, pause, kill, wipe, disk-full, etcd-disk-full or none")
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

#[test]
fn payouts_under_leader_kills_are_each_paid_once_and_every_ledger_equals_the_chain() {
    let _turn = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("payments.json");
    let output = br2k()
        .args(["testbed", "--workload", "payments", "--users", "2", "--requests", "20", "--rate", "4"])
        .args(["--interval", "1.5..2.5", "--duration", "1", "--election-timeout", "500", "--fault", "kill"])
        .args(["--target", "leader", "--seed", "5", "--give-up-after", "60", "--network", "loopback"])
        .arg("--app")
        .arg(payments())
        .arg("--json-out")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["double_payments"], 0, "{stdout}");
    assert_eq!(report["lost_payouts"], 0, "{stdout}");
    assert_eq!(report["balance_mismatches"], 0, "{stdout}");
    assert_eq!(report["ledgers_identical"], true, "{stdout}");
    let acknowledged =
        report["payouts_acknowledged"].as_u64().unwrap() + report["deposits_acknowledged"].as_u64().unwrap();
    assert_eq!(acknowledged, 40, "every request acknowledged in the end: {stdout}");
    assert_eq!(report["transfers_on_chain"], report["payouts_acknowledged"], "one transfer per payout: {stdout}");
    assert!(stdout.contains("faults injected") && !stdout.contains("| faults injected | 0 |"), "{stdout}");
}
