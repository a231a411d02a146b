//! Soak benchmark: a million requests through 3 log server replicas at 16 clients with
//! br2k's default snapshot policy (a snapshot every 10,000 entries, 5,000 kept below it).
//! It prints each etcd member's database size and memory as the requests flow, and the
//! throughput of every 100,000 requests. The baseline, in the same run on a fresh
//! cluster: the first 100,000 requests with snapshots and compaction off, which shows the
//! growth compaction removes.
//!
//! Run with `bash tools/bench-soak.sh [REQUESTS] [--keyed] [--idempotency-max-bytes=SIZE]`
//! (builds in release first; default 1,000,000 requests, about 20 minutes here). Requests
//! are `POST /log`; with `--keyed` each carries a fresh `Idempotency-Key`, as the failover
//! client sends them (kept with its retries), and the run also shows the leader's
//! idempotency table (keys, bytes) and, at the end, retries a sample of keys: the last
//! ones sent, some well inside the window, and the first ones. `--idempotency-*=VALUE`
//! flags are passed on to the replicas.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_test_utils::EtcdCluster;
use support::Replicas;

const CLIENTS: usize = 16;
const BLOCK: u64 = 100_000;
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// A row is printed each time this many more requests are done.
const ROW_EVERY: u64 = 50_000;

/// One look at the cluster.
#[derive(Clone, Debug)]
struct Sample {
    /// The leader's idempotency table: keys, bytes, and the index it starts at.
    table_keys: u64,
    table_bytes: u64,
    table_from: u64,
    done: u64,
    at: Duration,
    /// Largest member database file, and the largest part in use, bytes.
    db_size: u64,
    db_in_use: u64,
    /// Largest etcd member and replica resident memory, bytes.
    etcd_rss: u64,
    app_rss: u64,
    /// Log entries in etcd, and where the log starts.
    log_keys: i64,
    first_index: u64,
}

struct Phase {
    samples: Vec<Sample>,
    /// Requests per second of each block of 100,000.
    blocks: Vec<f64>,
    elapsed: Duration,
    done: u64,
    /// How a sample of retries was answered at the end (keyed runs).
    retries: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut requests = 1_000_000;
    let mut keyed = false;
    // Passed on to the replicas (e.g. `--idempotency-max-bytes=512MiB`).
    let mut replica_args: Vec<String> = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--keyed" => keyed = true,
            flag if flag.starts_with("--idempotency-") => replica_args.push(flag.to_owned()),
            text => {
                requests = text.replace(['_', ','], "").parse().with_context(|| {
                    format!("{text:?}: expected REQUESTS (a whole number), --keyed or --idempotency-*=VALUE")
                })?;
            }
        }
    }
    if requests < BLOCK {
        bail!("REQUESTS must be at least {BLOCK}");
    }
    let binary = support::logserver_binary()?;
    let what = if keyed { "each with a fresh Idempotency-Key" } else { "without idempotency keys" };
    eprintln!("soak: baseline: snapshots and compaction off, the first {BLOCK} requests, {what}");
    let args: Vec<&str> = replica_args.iter().map(String::as_str).collect();
    let baseline = run_phase(&binary, &[&args[..], &["--snapshot-interval", "0"]].concat(), BLOCK, keyed).await?;
    eprintln!("soak: br2k's defaults (snapshot every 10,000 entries, 5,000 trailing): {requests} requests, {what}");
    let soak = run_phase(&binary, &args, requests, keyed).await?;
    println!("Requests {what}; replicas given {replica_args:?}.\n");

    println!("### Baseline: snapshots and compaction off (etcd grows with every request)\n");
    print_samples(&baseline);
    println!("\n### br2k's defaults: a snapshot every 10,000 entries, 5,000 entries kept below it\n");
    print_samples(&soak);
    println!("\n### Throughput per {BLOCK} requests (16 clients)\n");
    println!("| requests | compaction off, req/s | br2k defaults, req/s |");
    println!("|---:|---:|---:|");
    for (k, rate) in soak.blocks.iter().enumerate() {
        let base = baseline.blocks.get(k).map_or_else(|| "-".to_owned(), |r| format!("{r:.0}"));
        println!("| {}-{} | {base} | {rate:.0} |", k as u64 * BLOCK + 1, (k as u64 + 1) * BLOCK);
    }
    summary(&baseline, &soak);
    Ok(())
}

async fn run_phase(binary: &std::path::Path, args: &[&str], requests: u64, keyed: bool) -> Result<Phase> {
    // The members run as br2k's backends run them.
    let etcd = EtcdCluster::builder().default_timings().args(br2k_replication::etcd_flags::recommended()).spawn()?;
    let dir = tempfile::tempdir()?;
    let replicas = Replicas::start(binary, &etcd, dir.path(), args)?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(64).build()?;
    let leader = Arc::new(AtomicUsize::new(replicas.wait_for_leader(&http).await?));
    let ports = Arc::new(replicas.ports.clone());
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let marks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, leader, ports, next, done, marks) =
                (http.clone(), leader.clone(), ports.clone(), next.clone(), done.clone(), marks.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        return anyhow::Ok(());
                    }
                    post(&http, &ports, &leader, n, keyed).await?;
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if finished % BLOCK == 0 {
                        marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Instant::now());
                    }
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    let mut next_row = 0;
    while !clients.iter().all(tokio::task::JoinHandle::is_finished) {
        tokio::time::sleep(SAMPLE_EVERY).await;
        let sample = sample(&etcd, &replicas, &http, &leader, done.load(Ordering::Relaxed), started).await;
        if sample.done >= next_row {
            eprintln!(
                "soak: {:>9} requests in {:>6.0} s: etcd db {} ({} in use), etcd RSS {}, {} log entries in etcd",
                sample.done,
                sample.at.as_secs_f64(),
                mb(sample.db_size),
                mb(sample.db_in_use),
                mb(sample.etcd_rss),
                sample.log_keys
            );
            next_row = sample.done / ROW_EVERY * ROW_EVERY + ROW_EVERY;
        }
        samples.push(sample);
    }
    for client in clients {
        client.await??;
    }
    let elapsed = started.elapsed();
    // After the last compaction has had time to run.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let last = sample(&etcd, &replicas, &http, &leader, requests, started).await;
    let retries = if keyed { retry_sample(&http, &ports, &leader, requests, &last).await? } else { String::new() };
    samples.push(last);
    let marks = marks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut blocks = Vec::new();
    let mut from = started;
    for mark in marks {
        blocks.push(BLOCK as f64 / mark.duration_since(from).as_secs_f64());
        from = mark;
    }
    Ok(Phase { samples, blocks, elapsed, done: requests, retries })
}

/// Retries keys already answered, at the end of a keyed run: the last ones sent, some
/// well inside the leader's table's window, and the first ones. Says how each group was
/// answered: as a replay of its stored answer, or (past the window) as a new request.
async fn retry_sample(
    http: &reqwest::Client,
    ports: &[u16],
    leader: &AtomicUsize,
    requests: u64,
    last: &Sample,
) -> Result<String> {
    use std::fmt::Write as _;
    // Indexes follow the order requests were taken, give or take the 16 clients racing.
    // The last keys and keys well inside the window first: a retry past the window is a
    // new request, whose own key pushes the oldest ones out when the table is at its cap.
    let inside = last.table_from + requests.saturating_sub(last.table_from) / 10;
    let groups = [
        ("the last 50 keys sent", requests - 50..requests),
        ("50 keys a tenth of the way into the window", inside..inside + 50),
        ("the first 50 keys sent", 0..50),
    ];
    let mut out = String::new();
    let _ = writeln!(out, "Retries at the end (the leader's table then starts at index {}):\n", last.table_from);
    let _ = writeln!(out, "| keys | answered as replays | executed as new requests (past the window) |");
    let _ = writeln!(out, "|---|---:|---:|");
    for (what, range) in groups {
        let (mut replayed, mut new) = (0, 0);
        for n in range.clone() {
            if post(http, ports, leader, n, true).await? {
                replayed += 1;
            } else {
                new += 1;
            }
        }
        let _ = writeln!(out, "| {what} (requests {}-{}) | {replayed} | {new} |", range.start, range.end - 1);
    }
    Ok(out)
}

/// One request, sent again to whichever replica leads until it is answered; with `keyed`
/// it carries the key `soak-N`, the same on every retry. Whether it was answered as a
/// replay of a stored answer.
async fn post(http: &reqwest::Client, ports: &[u16], leader: &AtomicUsize, n: u64, keyed: bool) -> Result<bool> {
    let started = Instant::now();
    loop {
        let port = ports[leader.load(Ordering::Relaxed)];
        let mut request = http
            .post(format!("http://127.0.0.1:{port}/log"))
            .header("Content-Type", "application/json")
            .body(format!("{{\"user\":{},\"seq\":{n}}}", n % CLIENTS as u64));
        if keyed {
            request = request.header("Idempotency-Key", format!("soak-{n}"));
        }
        let response = request.send().await;
        if let Ok(r) = &response
            && r.status().is_success()
        {
            return Ok(r.headers().get("br2k-replayed").is_some());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("request {n} not answered within 60 s: {response:?}");
        }
        // Find the leader again (the first replica that says it leads).
        for (i, port) in ports.iter().enumerate() {
            let url = format!("http://127.0.0.1:{port}/br2k/status");
            if let Ok(r) = http.get(url).send().await
                && let Ok(status) = r.json::<serde_json::Value>().await
                && status["role"] == "leader"
            {
                leader.store(i, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sample(
    etcd: &EtcdCluster,
    replicas: &Replicas,
    http: &reqwest::Client,
    leader: &AtomicUsize,
    done: u64,
    started: Instant,
) -> Sample {
    let mut s = Sample {
        done,
        at: started.elapsed(),
        db_size: 0,
        db_in_use: 0,
        etcd_rss: 0,
        app_rss: 0,
        log_keys: 0,
        first_index: 1,
        table_keys: 0,
        table_bytes: 0,
        table_from: 0,
    };
    for i in 0..etcd.len() {
        if let Ok(mut client) = etcd_client::Client::connect([etcd.endpoint(i)], None).await
            && let Ok(status) = client.status().await
        {
            s.db_size = s.db_size.max(status.db_size().unsigned_abs());
            s.db_in_use = s.db_in_use.max(status.raft_used_db_size().unsigned_abs());
            if i == 0 {
                let options = etcd_client::GetOptions::new().with_prefix().with_count_only();
                if let Ok(response) = client.get("/br2k/logserver/log/", Some(options)).await {
                    s.log_keys = response.count();
                }
            }
        }
        s.etcd_rss = s.etcd_rss.max(etcd.pid(i).map_or(0, rss));
        s.app_rss = s.app_rss.max(rss(replicas.pid(i)));
    }
    let url = format!("http://127.0.0.1:{}/br2k/status", replicas.ports[leader.load(Ordering::Relaxed)]);
    if let Ok(response) = http.get(url).send().await
        && let Ok(status) = response.json::<serde_json::Value>().await
    {
        s.first_index = status["first_index"].as_u64().unwrap_or(1);
        let table = &status["idempotency"];
        s.table_keys = table["records"].as_u64().unwrap_or(0);
        s.table_bytes = table["bytes"].as_u64().unwrap_or(0);
        s.table_from = table["keep_from"].as_u64().unwrap_or(0);
    }
    s
}

/// Resident memory of process `pid`, bytes (0 when it cannot be read).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok());
    kb.unwrap_or(0) * 1024
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn print_samples(phase: &Phase) {
    println!(
        "| requests | time | etcd database (largest member) | of it in use | etcd memory (largest) | log server memory (largest) | log entries in etcd | first index | keys in the leader's table | table bytes |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut next_row = 0;
    let last = phase.samples.len().saturating_sub(1);
    for (k, s) in phase.samples.iter().enumerate() {
        if s.done < next_row && k != last {
            continue;
        }
        next_row = s.done / ROW_EVERY * ROW_EVERY + ROW_EVERY;
        println!(
            "| {} | {:.0} s | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.done,
            s.at.as_secs_f64(),
            mb(s.db_size),
            mb(s.db_in_use),
            mb(s.etcd_rss),
            mb(s.app_rss),
            s.log_keys,
            s.first_index,
            s.table_keys,
            mb(s.table_bytes)
        );
    }
    println!(
        "\n{} requests in {:.0} s: {:.0} requests/s overall",
        phase.done,
        phase.elapsed.as_secs_f64(),
        phase.done as f64 / phase.elapsed.as_secs_f64()
    );
    if !phase.retries.is_empty() {
        println!("\n{}", phase.retries);
    }
}

fn summary(baseline: &Phase, soak: &Phase) {
    let at = |phase: &Phase, done: u64| phase.samples.iter().find(|s| s.done >= done).cloned();
    let last = |phase: &Phase| phase.samples.last().cloned();
    let (Some(base_end), Some(soak_start), Some(soak_end)) = (last(baseline), at(soak, BLOCK), last(soak)) else {
        println!("\nnot enough samples for a summary");
        return;
    };
    let after_first: Vec<&Sample> = soak.samples.iter().filter(|s| s.done >= BLOCK).collect();
    let max_db = after_first.iter().map(|s| s.db_size).max().unwrap_or(0);
    let max_rss = after_first.iter().map(|s| s.etcd_rss).max().unwrap_or(0);
    let per_request = |s: &Sample| s.db_size as f64 / s.done.max(1) as f64;
    println!("\n### Summary\n");
    println!(
        "- without compaction, the largest etcd database grew to {} after {} requests ({:.0} bytes per request) and its member to {} of memory; with br2k's defaults it was {} at the same point",
        mb(base_end.db_size),
        base_end.done,
        per_request(&base_end),
        mb(base_end.etcd_rss),
        at(soak, base_end.done).map_or_else(|| "-".into(), |s| mb(s.db_size))
    );
    println!(
        "- with compaction, from {} requests to {}: etcd database {} -> {} (largest seen {}), etcd memory {} -> {} (largest seen {}), log entries in etcd at the end {}",
        soak_start.done,
        soak_end.done,
        mb(soak_start.db_size),
        mb(soak_end.db_size),
        mb(max_db),
        mb(soak_start.etcd_rss),
        mb(soak_end.etcd_rss),
        mb(max_rss),
        soak_end.log_keys
    );
    let flat = max_db as f64 <= soak_start.db_size as f64 * 1.2 && max_db < 100_000_000;
    println!(
        "- goal (database flat after the first snapshot, well under 100 MB per member): {}",
        if flat { "met" } else { "not met" }
    );
    let memory_flat = max_rss as f64 <= soak_start.etcd_rss as f64 * 1.2 && max_rss < 100_000_000;
    println!("- goal (etcd memory flat, under 100 MB per member): {}", if memory_flat { "met" } else { "not met" });
    if let (Some(first), Some(final_block)) = (soak.blocks.first(), soak.blocks.last()) {
        let ratio = final_block / first;
        println!(
            "- throughput, first {BLOCK} vs last {BLOCK}: {first:.0} vs {final_block:.0} requests/s ({ratio:.2}x); goal (not degrading): {}",
            if ratio >= 0.9 { "met" } else { "not met" }
        );
    }
    if let Some(first) = baseline.blocks.first() {
        println!("- the baseline's first {BLOCK} (compaction off) ran at {first:.0} requests/s");
    }
}
