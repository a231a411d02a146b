//! Backup benchmark (issue 17): REQUESTS (default 100,000) `POST /log` requests through 3
//! log server replicas that back up every 5 s into a real OCI registry and record each
//! backup on a real chain (anvil); then every replica and every etcd member lose their
//! data, and the replicas restore from the backup recorded on chain.
//!
//! Prints the backup's size (state and log layers), how long the leader took to read,
//! push and record it, how long after the last acknowledged request a backup reaching it
//! was recorded, and the restore time (until a leader answers with every entry, and until
//! all three replicas hold it). Baseline in the same run: pushing the same bytes to the
//! same registry as plain blobs, so the ratio is br2k's cost over the registry's own.
//!
//! Run with `bash tools/bench-backup.sh [REQUESTS]` (release build first).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use anyhow::{Result, bail};
use br2k_oci::registry::RegistryClient;
use br2k_replication::backup::{BACKUP_TYPE, LOG_MEDIA_TYPE, STATE_MEDIA_TYPE};
use br2k_resolver::{Chain, Timeouts};
use br2k_test_utils::{Anvil, EtcdCluster, OciRegistry};
use support::Replicas;

const CLIENTS: usize = 16;
const REPOSITORY: &str = "br2k/logserver";

#[tokio::main]
async fn main() -> Result<()> {
    let requests: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(100_000);
    let binary = support::logserver_binary()?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(64).build()?;

    eprintln!("backup: starting anvil with a service registry, a docker-registry, 3 etcd members");
    let anvil = Anvil::spawn()?;
    let oci = OciRegistry::spawn(None)?;
    let chain = Chain::connect(&anvil.endpoint(), Some(anvil.key(0)), Timeouts::default()).await?;
    let address = chain.deploy_registry(60).await?.address;
    let registry = chain.registry(address).await?;
    let body = br2k_bindings::IServiceRegistry::Body {
        deployer: anvil.address(0),
        context: "local".into(),
        replicas: 3,
        containerRegistry: oci.url(),
        image: format!("{REPOSITORY}:bench"),
        imageDigest: B256::repeat_byte(1),
    };
    registry.register("logserver", body).await?;
    for i in 1..=3 {
        registry.set_operator("logserver", anvil.address(i), true).await?;
    }
    let args = [
        "--registry".to_owned(),
        address.to_string(),
        "--rpc-url".to_owned(),
        anvil.endpoint(),
        "--backup-registry".to_owned(),
        oci.url(),
        "--backup-repository".to_owned(),
        REPOSITORY.to_owned(),
        "--backup-plain-http".to_owned(),
        "--backup-interval".to_owned(),
        "5".to_owned(),
        // Every backup recorded on chain, as the benchmark waits for the chain's record.
        "--backup-record-interval".to_owned(),
        "5".to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let keys: Vec<String> = (1..=3).map(|i| alloy::hex::encode_prefixed(anvil.key(i).to_bytes())).collect();
    let env = |i: usize| vec![("ETH_PRIVATE_KEY".to_owned(), keys[i].clone())];

    let etcd = EtcdCluster::builder().default_timings().spawn()?;
    let dir = tempfile::tempdir()?;
    let replicas = Replicas::start_each(&binary, &etcd, dir.path(), &args, &env)?;
    let leader = replicas.wait_for_leader(&http).await?;
    let url = format!("http://127.0.0.1:{}/log", replicas.ports[leader]);

    eprintln!("backup: sending {requests} requests at {CLIENTS} clients to replica n{leader}");
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let last_index = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, url, next, last_index) = (http.clone(), url.clone(), next.clone(), last_index.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests {
                        return anyhow::Ok(());
                    }
                    let body = format!("{{\"user\": {client}, \"seq\": {n}}}");
                    let response = http.post(&url).body(body).send().await?;
                    if !response.status().is_success() {
                        bail!("POST /log answered {}", response.status());
                    }
                    let answer: serde_json::Value = response.json().await?;
                    last_index.fetch_max(answer["index"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let acked = Instant::now();
    let last = last_index.load(Ordering::Relaxed);
    eprintln!(
        "backup: {requests} acknowledged in {:.1} s ({:.0} req/s); waiting for a backup reaching {last}",
        started.elapsed().as_secs_f64(),
        requests as f64 / started.elapsed().as_secs_f64()
    );
    let recorded = loop {
        if let Some(b) = registry.backup("logserver").await?.filter(|b| b.index >= last) {
            break b;
        }
        if acked.elapsed() > Duration::from_secs(300) {
            bail!("no backup reaching {last} within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let recorded_after = acked.elapsed();
    let status: serde_json::Value =
        http.get(format!("http://127.0.0.1:{}/br2k/status", replicas.ports[leader])).send().await?.json().await?;
    let took_ms = status["backup"]["took_ms"].as_u64().unwrap_or(0);

    let client = RegistryClient::new(&oci.url(), true, None)?;
    let digest = format!("sha256:{}", alloy::hex::encode(recorded.digest));
    let pulled = Instant::now();
    let artifact = client.pull_artifact(REPOSITORY, &digest, BACKUP_TYPE).await?;
    let pull_time = pulled.elapsed();
    let size = |media: &str| artifact.layers.iter().filter(|l| l.media_type == media).map(|l| l.bytes.len()).sum();
    let (state_bytes, log_bytes): (usize, usize) = (size(STATE_MEDIA_TYPE), size(LOG_MEDIA_TYPE));

    // Baseline: the same bytes pushed as plain blobs to a fresh repository.
    let baseline = Instant::now();
    for layer in &artifact.layers {
        let digest = br2k_oci::image::sha256_digest(&layer.bytes);
        client.push_blob("baseline/blobs", &digest, layer.bytes.clone()).await?;
    }
    let baseline_time = baseline.elapsed();

    eprintln!("backup: disaster: every replica and etcd member loses its data");
    drop(replicas);
    drop(etcd);
    let etcd = EtcdCluster::builder().default_timings().spawn()?;
    let dir = tempfile::tempdir()?;
    let restarted = Instant::now();
    let replicas = Replicas::start_each(&binary, &etcd, dir.path(), &args, &env)?;
    let leader = replicas.wait_for_leader(&http).await?;
    wait_lpi(&http, &replicas, &[leader], last).await?;
    let leader_time = restarted.elapsed();
    wait_lpi(&http, &replicas, &[0, 1, 2], last).await?;
    let all_time = restarted.elapsed();
    let entries: serde_json::Value =
        http.get(format!("http://127.0.0.1:{}/log", replicas.ports[leader])).send().await?.json().await?;
    let held = entries["entries"].as_array().map_or(0, Vec::len) as u64;
    if held < requests {
        bail!("the restored service holds {held} entries, not {requests}");
    }

    println!("| what | figure |");
    println!("|---|---|");
    println!("| requests acknowledged before the disaster | {requests} (last index {last}) |");
    println!("| backup recorded on chain | index {} |", recorded.index);
    println!("| backup size | {} (state {state_bytes} B, log {log_bytes} B) |", mib(state_bytes + log_bytes));
    println!("| the leader's read + push + record of that backup | {took_ms} ms |");
    println!("| baseline: the same bytes pushed as plain blobs | {} ms |", baseline_time.as_millis());
    println!("| ratio (backup / baseline) | {:.2}x |", took_ms as f64 / baseline_time.as_millis().max(1) as f64);
    println!("| last acknowledgement to a backup reaching it recorded | {:.1} s |", recorded_after.as_secs_f64());
    println!("| pulling and checking the backup | {} ms |", pull_time.as_millis());
    println!("| restore: start to a leader holding every entry | {:.1} s |", leader_time.as_secs_f64());
    println!("| restore: start to all three replicas holding it | {:.1} s |", all_time.as_secs_f64());
    println!("| entries the restored service holds | {held} |");
    Ok(())
}

fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

/// Waits until every replica in `which` reports an LPI of at least `index`.
async fn wait_lpi(http: &reqwest::Client, replicas: &Replicas, which: &[usize], index: u64) -> Result<()> {
    let started = Instant::now();
    loop {
        let mut all = true;
        for &i in which {
            let url = format!("http://127.0.0.1:{}/br2k/status", replicas.ports[i]);
            let lpi = match http.get(&url).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|s| s["lpi"].as_u64()).unwrap_or(0),
                Err(_) => 0,
            };
            all &= lpi >= index;
        }
        if all {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("replicas {which:?} did not reach {index} within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
