//! Replication benchmark: raw etcd puts next to br2k's replicated `POST /log`, on the same
//! 3-member etcd cluster, in one run, at 1, 16, 64 and 256 concurrent clients; and where
//! br2k's time goes: CPU per process, etcd calls per request and the leader pipeline's
//! stages (from the leader's `/br2k/status`).
//!
//! Run with `bash tools/bench-replication.sh` (builds in release first). Environment:
//! `BENCH_SECONDS` (per measurement, default 5), `BENCH_CLIENTS` (a comma-separated list,
//! default `1,16,64,256`).

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_replication::Tally;
use br2k_test_utils::EtcdCluster;
use support::Replicas;

const CONCURRENCY: [usize; 4] = [1, 16, 64, 256];

struct Measurement {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// CPU time each process used during the measurement.
    cpu: Cpu,
}

impl Measurement {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    fn mean(&self) -> Duration {
        self.latencies.iter().sum::<Duration>() / u32::try_from(self.latencies.len().max(1)).unwrap_or(u32::MAX)
    }

    /// CPU milliseconds per 1,000 operations.
    fn cpu_per_1000(&self, ticks: u64) -> f64 {
        ticks as f64 * 10.0 * 1000.0 / self.ops.max(1) as f64
    }
}

/// CPU ticks (1/100 s: Linux's USER_HZ for /proc) of the processes that matter.
#[derive(Clone, Copy, Default)]
struct Cpu {
    etcd: u64,
    leader: u64,
    followers: u64,
    load: u64,
}

impl Cpu {
    fn since(self, earlier: Self) -> Self {
        Self {
            etcd: self.etcd.saturating_sub(earlier.etcd),
            leader: self.leader.saturating_sub(earlier.leader),
            followers: self.followers.saturating_sub(earlier.followers),
            load: self.load.saturating_sub(earlier.load),
        }
    }
}

/// The processes whose CPU time is read.
struct Processes {
    etcd: Vec<u32>,
    leader: u32,
    followers: Vec<u32>,
}

impl Processes {
    fn read(&self) -> Result<Cpu> {
        let sum = |pids: &[u32]| pids.iter().map(|&pid| ticks(&format!("/proc/{pid}/stat"))).sum::<Result<u64>>();
        Ok(Cpu {
            etcd: sum(&self.etcd)?,
            leader: ticks(&format!("/proc/{}/stat", self.leader))?,
            followers: sum(&self.followers)?,
            load: ticks("/proc/self/stat")?,
        })
    }
}

/// User plus system CPU ticks of the process whose `stat` file is `path`.
fn ticks(path: &str) -> Result<u64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may hold spaces: count fields after its closing ')'.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).context("a /proc stat line without ')'")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `after` starts at field 3.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok()).context("a short /proc stat line");
    Ok(field(14)? + field(15)?)
}

/// Runs `clients` tasks calling `op` back to back for `duration`.
async fn measure<F, Fut>(clients: usize, duration: Duration, processes: &Processes, op: F) -> Result<Measurement>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let cpu_before = processes.read()?;
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(client, n).await?;
                    latencies.push(t.elapsed());
                    n += 1;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let cpu = processes.read()?.since(cpu_before);
    Ok(Measurement { ops: latencies.len(), elapsed, latencies, cpu })
}

/// The pipeline counters of the replicas on `ports`, added up.
async fn counters(http: &reqwest::Client, ports: &[u16]) -> Result<BTreeMap<String, Tally>> {
    let mut sum = BTreeMap::<String, Tally>::new();
    for port in ports {
        let status: serde_json::Value =
            http.get(format!("http://127.0.0.1:{port}/br2k/status")).send().await?.json().await?;
        let counters: BTreeMap<String, Tally> = serde_json::from_value(status["pipeline"].clone())?;
        for (name, tally) in counters {
            let total = sum.entry(name).or_default();
            *total = Tally { calls: total.calls + tally.calls, micros: total.micros + tally.micros };
        }
    }
    Ok(sum)
}

/// What the counters grew by, leaving out those that did not move.
fn grown(before: &BTreeMap<String, Tally>, after: BTreeMap<String, Tally>) -> BTreeMap<String, Tally> {
    after
        .into_iter()
        .map(|(name, tally)| {
            let earlier = before.get(&name).copied().unwrap_or_default();
            (name, tally.since(earlier))
        })
        .filter(|(_, tally)| tally.calls > 0)
        .collect()
}

struct Row {
    clients: usize,
    raw: Measurement,
    /// Keys etcd put per raw put, and per br2k request (its own `etcd_mvcc_put_total`).
    puts_per_raw: f64,
    puts_per_request: f64,
    /// A transaction shaped like br2k's replicate write, on raw etcd: the floor of one
    /// fenced write.
    fenced: Measurement,
    br2k: Measurement,
    /// What the leader's counters grew by during the br2k measurement.
    pipeline: BTreeMap<String, Tally>,
    /// What the followers' counters (both added up) grew by.
    followers: BTreeMap<String, Tally>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let concurrency: Vec<usize> = match std::env::var("BENCH_CLIENTS") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse().with_context(|| format!("BENCH_CLIENTS: `{n}` is not a number of clients")))
            .collect::<Result<_>>()?,
        Err(_) => CONCURRENCY.to_vec(),
    };
    let duration = Duration::from_secs(seconds);
    let binary = support::logserver_binary()?;

    eprintln!("bench: starting 3 etcd members (etcd's default 100 ms heartbeat / 1 s election timeout)");
    let etcd = EtcdCluster::builder().default_timings().spawn()?;
    let leader_member = leader_member(&etcd).await?;
    let dir = tempfile::tempdir()?;
    eprintln!("bench: starting 3 logserver replicas ({})", binary.display());
    let replicas = Replicas::start(&binary, &etcd, dir.path(), &[])?;
    let ports = replicas.ports.clone();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(512).build()?;
    let leader = replicas.wait_for_leader(&http).await?;
    eprintln!("bench: replica n{leader} leads; etcd member m{leader_member} was the Raft leader at start");
    let processes = Processes {
        etcd: (0..etcd.len()).map(|i| etcd.pid(i).context("an etcd member is not running")).collect::<Result<_>>()?,
        leader: replicas.pid(leader),
        followers: (0..ports.len()).filter(|&i| i != leader).map(|i| replicas.pid(i)).collect(),
    };

    let raw = etcd_client::Client::connect([etcd.endpoint(leader)], None).await?;
    let fence = Fence::new(raw.clone()).await?;
    let url = format!("http://127.0.0.1:{}/log", ports[leader]);
    let follower_ports: Vec<u16> = (0..ports.len()).filter(|&i| i != leader).map(|i| ports[i]).collect();
    let mut rows = Vec::new();
    for clients in concurrency {
        eprintln!("bench: raw etcd put, {clients} client(s), {seconds} s");
        let client = raw.clone();
        let puts_before = etcd_puts(&http, &etcd.endpoint(leader_member)).await;
        let raw_m = measure(clients, duration, &processes, move |c, n| {
            let mut client = client.clone();
            async move {
                client.put(format!("/bench/{c}/{n}"), format!("{{\"user\":{c}}}"), None).await?;
                Ok(())
            }
        })
        .await?;
        let puts_per_raw = puts_since(&http, &etcd.endpoint(leader_member), puts_before, raw_m.ops).await;
        eprintln!("bench: raw etcd fenced transaction (br2k's replicate write), {clients} client(s), {seconds} s");
        let (client, fence) = (raw.clone(), fence.clone());
        let fenced = measure(clients, duration, &processes, move |c, n| {
            let (mut client, fence) = (client.clone(), fence.clone());
            async move {
                client.txn(fence.txn(c, n)).await?;
                Ok(())
            }
        })
        .await?;
        eprintln!("bench: br2k POST /log, {clients} client(s), {seconds} s");
        let before = counters(&http, &[ports[leader]]).await?;
        let followers_before = counters(&http, &follower_ports).await?;
        let puts_before = etcd_puts(&http, &etcd.endpoint(leader_member)).await;
        let (http2, url) = (http.clone(), url.clone());
        let br2k = measure(clients, duration, &processes, move |c, n| {
            let (http, url) = (http2.clone(), url.clone());
            async move {
                let response = http
                    .post(url)
                    .header("Idempotency-Key", format!("bench-{clients}-{c}-{n}"))
                    .header("Content-Type", "application/json")
                    .body(format!("{{\"user\":{c}}}"))
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("POST /log answered {}: {}", response.status(), response.text().await.unwrap_or_default());
                }
                Ok(())
            }
        })
        .await?;
        let puts_per_request = puts_since(&http, &etcd.endpoint(leader_member), puts_before, br2k.ops).await;
        let pipeline = grown(&before, counters(&http, &[ports[leader]]).await?);
        let followers = grown(&followers_before, counters(&http, &follower_ports).await?);
        rows.push(Row { clients, raw: raw_m, puts_per_raw, puts_per_request, fenced, br2k, pipeline, followers });
    }

    // The ceiling of br2k's data model on this etcd: its records alone, grouped, with no
    // replica running, as they are (each request's log entry and state twice) and as they
    // were before the idempotency table (plus its idempotency record twice), side by side.
    // Measured once, at 16 clients (the throughput goal's).
    let mut ceilings = Vec::new();
    if let Some(row) = rows.iter().find(|r| r.clients == 16) {
        for keyed_records in [false, true] {
            let what = if keyed_records { "with an idempotency record per request (before)" } else { "today's" };
            eprintln!("bench: raw etcd writing br2k's records ({what}) in groups of {CEILING_GROUP}, 16 clients");
            let (client, fence) = (raw.clone(), fence.clone());
            let groups = measure(16, duration, &processes, move |c, n| {
                let (mut client, fence) = (client.clone(), fence.clone());
                async move {
                    client.txn(fence.group_txn(c, n, CEILING_GROUP, keyed_records)).await?;
                    Ok(())
                }
            })
            .await?;
            let etcd_cpu = groups.cpu_per_1000(groups.cpu.etcd) / CEILING_GROUP as f64;
            ceilings.push((what, groups.throughput() * CEILING_GROUP as f64, row.raw.throughput(), etcd_cpu));
        }
    }
    print_results(&rows);
    print_breakdown(&rows);
    if !ceilings.is_empty() {
        println!();
        println!(
            "The ceiling of br2k's records on this etcd (16 clients, no replica running; each transaction fenced, \
             holding {CEILING_GROUP} requests' records with LS, LPI and SSI):"
        );
        println!();
        println!("| records per request | requests/s | vs raw etcd put | etcd CPU ms per 1,000 requests |");
        println!("|---|---:|---:|---:|");
        for (what, requests, puts, etcd_cpu) in &ceilings {
            let records = if what.starts_with("today") {
                "log entry, state twice (today)"
            } else {
                "log entry, state twice, idempotency record twice (before the idempotency table)"
            };
            println!("| {records} | {requests:.0} | {:.2}x | {etcd_cpu:.0} |", requests / puts);
        }
    }
    Ok(())
}

/// How many keys etcd's member at `endpoint` has put since it started
/// (`etcd_mvcc_put_total` in its metrics); `None` when it does not say.
async fn etcd_puts(http: &reqwest::Client, endpoint: &str) -> Option<f64> {
    let text = http.get(format!("{endpoint}/metrics")).send().await.ok()?.text().await.ok()?;
    let line = text.lines().find(|l| l.starts_with("etcd_mvcc_put_total "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Keys put per operation since `before`, over `ops` operations (NaN when unknown).
async fn puts_since(http: &reqwest::Client, endpoint: &str, before: Option<f64>, ops: usize) -> f64 {
    match (before, etcd_puts(http, endpoint).await) {
        (Some(before), Some(after)) => (after - before) / ops.max(1) as f64,
        _ => f64::NAN,
    }
}

/// Requests per transaction in the ceiling measurement: as many as fit etcd's default
/// 128 operations with five writes each and three counters.
const CEILING_GROUP: usize = 24;

/// A transaction with the shape of br2k's replicate write for one request: compared on a
/// leader record's value and revision, putting a log entry, its state and a counter (LS).
/// The lease is for the idempotency records of the ceiling's "before" shape.
#[derive(Clone)]
struct Fence {
    value: String,
    revision: i64,
    lease: i64,
}

impl Fence {
    async fn new(mut client: etcd_client::Client) -> Result<Self> {
        let value = "{\"replica\":\"bench\"}".to_owned();
        let put = client.put("/bench-fenced/cl", value.clone(), None).await?;
        let revision = put.header().map(etcd_client::ResponseHeader::revision).context("a put without a header")?;
        let lease = client.lease_grant(3600, None).await?.id();
        Ok(Self { value, revision, lease })
    }

    /// The fence: the leader record still holds its value at its revision.
    fn fenced(&self) -> etcd_client::Txn {
        use etcd_client::{Compare, CompareOp, Txn};
        Txn::new().when(vec![
            Compare::value("/bench-fenced/cl", CompareOp::Equal, self.value.clone()),
            Compare::mod_revision("/bench-fenced/cl", CompareOp::Equal, self.revision),
        ])
    }

    fn txn(&self, c: usize, n: u64) -> etcd_client::Txn {
        use etcd_client::TxnOp;
        let key = |what: &str| format!("/bench-fenced/{what}/{c}/{n:020}");
        self.fenced().and_then(vec![
            TxnOp::put(
                key("log"),
                format!("{{\"method\":\"POST\",\"path\":\"/log\",\"body\":\"{{\\\"user\\\":{c}}}\"}}"),
                None,
            ),
            TxnOp::put(key("rs"), "{\"kind\":\"Replication\",\"state\":\"InProcess\",\"epoch\":1}", None),
            TxnOp::put("/bench-fenced/ls", n.to_string(), None),
        ])
    }
}

impl Fence {
    /// Every record br2k writes for `size` requests, in one fenced transaction (the
    /// replicate and outcome writes merged, as a busy leader's are): per request its log
    /// entry and its state written twice (InProcess, then Success), and with
    /// `idempotency_records` its idempotency record written twice too (then with the
    /// answer), as before the idempotency table; as distinct keys (one transaction cannot
    /// put a key twice); then LS, LPI and SSI.
    fn group_txn(&self, c: usize, n: u64, size: usize, idempotency_records: bool) -> etcd_client::Txn {
        use etcd_client::{PutOptions, TxnOp};
        let leased = || Some(PutOptions::new().with_lease(self.lease));
        let mut ops = Vec::with_capacity(size * 5 + 3);
        for r in 0..size {
            let key = |what: &str| format!("/bench-grouped/{what}/{c}/{n:020}/{r:03}");
            let body = format!("{{\"method\":\"POST\",\"path\":\"/log\",\"body\":\"{{\\\"user\\\":{c}}}\"}}");
            ops.push(TxnOp::put(key("log"), body, None));
            ops.push(TxnOp::put(key("rs"), "{\"kind\":\"Replication\",\"state\":\"InProcess\",\"epoch\":1}", None));
            let answer = "{\"kind\":\"Replication\",\"state\":\"Success\",\"epoch\":1,\"response\":{\"status\":200,\"body\":\"eyJpbmRleCI6MX0=\"}}";
            ops.push(TxnOp::put(key("rs-final"), answer, None));
            if idempotency_records {
                ops.push(TxnOp::put(key("idem"), "{\"index\":1,\"fingerprint\":\"0123456789abcdef\"}", leased()));
                let record = "{\"index\":1,\"fingerprint\":\"0123456789abcdef\",\"response\":{\"status\":200,\"body\":\"eyJpbmRleCI6MX0=\"}}";
                ops.push(TxnOp::put(key("idem-final"), record, leased()));
            }
        }
        for counter in ["ls", "lpi", "ssi"] {
            ops.push(TxnOp::put(format!("/bench-grouped/{counter}"), n.to_string(), None));
        }
        self.fenced().and_then(ops)
    }
}

fn print_results(rows: &[Row]) {
    println!(
        "| clients | raw etcd put/s | raw etcd p50 | br2k POST /log/s | br2k p50 | br2k p99 | throughput ratio | p50 ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for Row { clients, raw, br2k, .. } in rows {
        println!(
            "| {clients} | {:.0} | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | {:.2}x | {:.2}x |",
            raw.throughput(),
            ms(raw.percentile(0.5)),
            br2k.throughput(),
            ms(br2k.percentile(0.5)),
            ms(br2k.percentile(0.99)),
            br2k.throughput() / raw.throughput(),
            ms(br2k.percentile(0.5)) / ms(raw.percentile(0.5)),
        );
    }
    println!();
    let at = |clients: usize| rows.iter().find(|r| r.clients == clients);
    let verdict = |met: bool| if met { "met" } else { "not met" };
    if let Some(Row { raw, br2k, .. }) = at(16) {
        let ratio = br2k.throughput() / raw.throughput();
        println!("goal (16 clients: br2k throughput >= 1.0x raw etcd put): {ratio:.2}x -> {}", verdict(ratio >= 1.0));
    }
    if let Some(Row { raw, br2k, .. }) = at(1) {
        let ratio = ms(br2k.percentile(0.5)) / ms(raw.percentile(0.5));
        println!("goal (1 client: br2k p50 <= 2.5x raw etcd put p50): {ratio:.2}x -> {}", verdict(ratio <= 2.5));
    }
    if let Some(Row { raw, br2k, .. }) = at(256) {
        let ratio = br2k.throughput() / raw.throughput();
        println!("goal (256 clients: br2k throughput >= 1.5x raw etcd put): {ratio:.2}x -> {}", verdict(ratio >= 1.5));
    }
}

/// Where the time goes, per concurrency: CPU per 1,000 requests by process, etcd calls
/// per request by action, and the leader's stages.
fn print_breakdown(rows: &[Row]) {
    println!();
    println!("The floor under br2k: raw etcd running br2k's replicate write (2 compares, 3 puts):");
    println!();
    println!("| clients | fenced txn/s | fenced txn p50 | p50 vs a put | br2k POST /log vs fenced txn/s |");
    println!("|---:|---:|---:|---:|---:|");
    for Row { clients, raw, fenced, br2k, .. } in rows {
        println!(
            "| {clients} | {:.0} | {:.2} ms | {:.2}x | {:.2}x |",
            fenced.throughput(),
            ms(fenced.percentile(0.5)),
            ms(fenced.percentile(0.5)) / ms(raw.percentile(0.5)),
            br2k.throughput() / fenced.throughput(),
        );
    }
    println!();
    println!(
        "Keys etcd put (its etcd_mvcc_put_total), per raw put and per br2k request with a fresh Idempotency-Key \
         (before the idempotency table a request also put its idempotency record twice):"
    );
    println!();
    println!("| clients | per raw etcd put | per br2k request |");
    println!("|---:|---:|---:|");
    for Row { clients, puts_per_raw, puts_per_request, .. } in rows {
        println!("| {clients} | {puts_per_raw:.2} | {puts_per_request:.2} |");
    }
    println!();
    println!("CPU ms per 1,000 requests (raw etcd put | br2k POST /log):");
    println!();
    println!("| clients | etcd (3 members) | leader replica | follower replicas | load generator |");
    println!("|---:|---:|---:|---:|---:|");
    for Row { clients, raw, br2k, .. } in rows {
        let pair = |r: u64, b: u64| format!("{:.0} \\| {:.0}", raw.cpu_per_1000(r), br2k.cpu_per_1000(b));
        println!(
            "| {clients} | {} | - \\| {:.0} | - \\| {:.0} | {} |",
            pair(raw.cpu.etcd, br2k.cpu.etcd),
            br2k.cpu_per_1000(br2k.cpu.leader),
            br2k.cpu_per_1000(br2k.cpu.followers),
            pair(raw.cpu.load, br2k.cpu.load),
        );
    }
    for Row { clients, br2k, pipeline, followers, .. } in rows {
        let requests = br2k.ops.max(1) as f64;
        let groups = pipeline.get("leader: groups processed").map_or(0, |t| t.calls).max(1);
        let logged = pipeline.get("leader: requests logged").map_or(0, |t| t.calls);
        println!();
        println!(
            "br2k at {clients} client(s): {} requests, {} groups (mean group {:.1} requests); mean latency {:.2} ms",
            br2k.ops,
            groups,
            logged as f64 / groups as f64,
            ms(br2k.mean())
        );
        println!();
        println!("| leader's counters | calls per request | µs per call | µs per request |");
        println!("|---|---:|---:|---:|");
        let mut stage_us_per_group = 0.0;
        for (name, tally) in pipeline {
            let per_call = tally.micros as f64 / tally.calls.max(1) as f64;
            println!(
                "| {name} | {:.2} | {:.0} | {:.0} |",
                tally.calls as f64 / requests,
                per_call,
                tally.micros as f64 / requests
            );
            if name.starts_with("leader: ") {
                stage_us_per_group += tally.micros as f64 / groups as f64;
            }
        }
        if *clients == 1 {
            // One request per group: what the stages do not account for is HTTP, the
            // queue between the HTTP front and the pipeline, and scheduling.
            let rest = ms(br2k.mean()) * 1000.0 - stage_us_per_group;
            println!("| HTTP, queues and scheduling (mean latency minus the stages) | | | {rest:.0} |");
        }
        println!();
        println!("| both followers' counters | calls per request | µs per call | µs per request |");
        println!("|---|---:|---:|---:|");
        for (name, tally) in followers {
            println!(
                "| {name} | {:.2} | {:.0} | {:.0} |",
                tally.calls as f64 / requests,
                tally.micros as f64 / tally.calls.max(1) as f64,
                tally.micros as f64 / requests
            );
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Which etcd member leads (by asking each for its status).
async fn leader_member(etcd: &EtcdCluster) -> Result<usize> {
    for i in 0..etcd.len() {
        let mut client = etcd_client::Client::connect([etcd.endpoint(i)], None).await?;
        let status = client.status().await?;
        if status.header().map(etcd_client::ResponseHeader::member_id) == Some(status.leader()) {
            return Ok(i);
        }
    }
    bail!("no etcd member says it leads")
}
