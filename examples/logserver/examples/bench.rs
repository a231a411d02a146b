//! Replication benchmark: raw etcd puts next to br2k's replicated `POST /log`, on the same
//! 3-member etcd cluster, in one run, at 1 and 16 concurrent clients.
//!
//! Run with `bash tools/bench-replication.sh` (builds in release first). Environment:
//! `BENCH_SECONDS` (per measurement, default 5).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use br2k_test_utils::EtcdCluster;
use support::Replicas;

const CONCURRENCY: [usize; 2] = [1, 16];

struct Measurement {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
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
}

/// Runs `clients` tasks calling `op` back to back for `duration`.
async fn measure<F, Fut>(clients: usize, duration: Duration, op: F) -> Result<Measurement>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
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
    Ok(Measurement { ops: latencies.len(), elapsed: started.elapsed(), latencies })
}

#[tokio::main]
async fn main() -> Result<()> {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let duration = Duration::from_secs(seconds);
    let binary = support::logserver_binary()?;

    eprintln!("bench: starting 3 etcd members (etcd's default 100 ms heartbeat / 1 s election timeout)");
    let etcd = EtcdCluster::builder().default_timings().spawn()?;
    let leader_member = leader_member(&etcd).await?;
    let dir = tempfile::tempdir()?;
    eprintln!("bench: starting 3 logserver replicas ({})", binary.display());
    let replicas = Replicas::start(&binary, &etcd, dir.path(), &[])?;
    let ports = replicas.ports.clone();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).pool_max_idle_per_host(64).build()?;
    let leader = replicas.wait_for_leader(&http).await?;
    eprintln!("bench: replica n{leader} leads; etcd member m{leader_member} was the Raft leader at start");

    let raw = etcd_client::Client::connect([etcd.endpoint(leader)], None).await?;
    let url = format!("http://127.0.0.1:{}/log", ports[leader]);
    let mut rows = Vec::new();
    for clients in CONCURRENCY {
        eprintln!("bench: raw etcd put, {clients} client(s), {seconds} s");
        let client = raw.clone();
        let etcd_m = measure(clients, duration, move |c, n| {
            let mut client = client.clone();
            async move {
                client.put(format!("/bench/{c}/{n}"), format!("{{\"user\":{c}}}"), None).await?;
                Ok(())
            }
        })
        .await?;
        eprintln!("bench: br2k POST /log, {clients} client(s), {seconds} s");
        let (http, url) = (http.clone(), url.clone());
        let br2k = measure(clients, duration, move |c, n| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http
                    .post(url)
                    .header("Idempotency-Key", format!("bench-{clients}-{c}-{n}"))
                    .header("Content-Type", "application/json")
                    .body(format!("{{\"user\":{c}}}"))
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!("POST /log answered {}", response.status());
                }
                Ok(())
            }
        })
        .await?;
        rows.push((clients, etcd_m, br2k));
    }

    println!(
        "| clients | raw etcd put/s | raw etcd p50 | br2k POST /log/s | br2k p50 | br2k p99 | throughput ratio | p50 ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (clients, raw, br2k) in &rows {
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
    let (_, raw16, br2k16) = &rows[1];
    let (_, raw1, br2k1) = &rows[0];
    println!();
    println!(
        "goal 1 (16 clients: br2k throughput >= 1.0x raw etcd put): {:.2}x -> {}",
        br2k16.throughput() / raw16.throughput(),
        if br2k16.throughput() >= raw16.throughput() { "met" } else { "not met" }
    );
    let p50_ratio = ms(br2k1.percentile(0.5)) / ms(raw1.percentile(0.5));
    println!(
        "goal 2 (1 client: br2k p50 <= 3x raw etcd put p50): {p50_ratio:.2}x -> {}",
        if p50_ratio <= 3.0 { "met" } else { "not met" }
    );
    Ok(())
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
