//! The resolver's benchmark, each figure next to a baseline measured in the same run (the
//! machines are shared and noisy, so ratios mean more than absolute numbers):
//!
//! - cached resolve vs. a bare `HashMap` lookup and clone (the least a cache can cost);
//! - uncached resolve vs. the raw `getServiceLocation` `eth_call` through alloy;
//! - propagation: from the `updateLocation` receipt to a subscribed resolver's cache
//!   holding the new location, vs. a raw `eth_subscribe` log subscription receiving the
//!   event, and vs. a raw connection that, like the resolver, also follows new heads (the
//!   resolver does, to notice a silent reconnect; on anvil that costs a ~40 ms tail, which
//!   this second baseline shows comes from the node's socket, not from the resolver).
//!
//! Run it with `bash tools/bench-resolver.sh` (builds in release mode against a fresh anvil).
//! Prints a Markdown table on stdout, progress on stderr.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use anyhow::{Context, Result};
use br2k_bindings::IServiceRegistry::Body;
use br2k_bindings::ServiceRegistry::{self, NewLocation};
use br2k_resolver::{Chain, Resolved, Resolver, ResolverConfig, Timeouts, service_id};
use br2k_test_utils::Anvil;
use futures::{Stream, StreamExt};

const NAME: &str = "bench-service";
const CACHED_ITERATIONS: u32 = 2_000_000;
const UNCACHED_SAMPLES: usize = 2_000;
const PROPAGATION_SAMPLES: u64 = 100;

struct Row {
    what: &'static str,
    br2k: String,
    baseline_name: &'static str,
    baseline: String,
    ratio: f64,
    goal: &'static str,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-12)
}

type Arrivals = Arc<Mutex<HashMap<u64, Instant>>>;

/// Stamps the time each epoch arrives on `epochs`, in a task of its own.
fn record_arrivals(epochs: impl Stream<Item = u64> + Send + 'static) -> (Arrivals, tokio::task::JoinHandle<()>) {
    let arrivals = Arrivals::default();
    let stamped = Arc::clone(&arrivals);
    let task = tokio::spawn(async move {
        let mut epochs = std::pin::pin!(epochs);
        while let Some(epoch) = epochs.next().await {
            stamped.lock().expect("not poisoned").insert(epoch, Instant::now());
        }
    });
    (arrivals, task)
}

#[tokio::main]
async fn main() -> Result<()> {
    eprintln!("starting anvil ...");
    let anvil = Anvil::spawn().context("anvil (run `bash tools/setup.sh`)")?;
    let timeouts = Timeouts::default();
    let manager = Chain::connect(&anvil.endpoint(), Some(anvil.key(0)), timeouts).await?;
    let deployment = manager.deploy_registry(300).await?;
    let registry = manager.registry(deployment.address).await?;
    let body = Body {
        deployer: anvil.address(0),
        context: "local".into(),
        replicas: 3,
        containerRegistry: String::new(),
        image: String::new(),
        imageDigest: Default::default(),
    };
    registry.register(NAME, body).await?;
    registry.set_operator(NAME, anvil.address(1), true).await?;
    let operator =
        Chain::connect(&anvil.endpoint(), Some(anvil.key(1)), timeouts).await?.registry(deployment.address).await?;
    operator.update_location(NAME, "http://127.0.0.1:9000", 1).await?;

    let config = ResolverConfig { timeouts, ..ResolverConfig::default() };
    let resolver = Resolver::connect_with(&anvil.ws_endpoint(), deployment.address, None, config.clone()).await?;
    while !resolver.is_live() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut rows = Vec::new();

    // 1. Cached resolve vs. a bare map lookup.
    eprintln!("cached resolve: {CACHED_ITERATIONS} iterations ...");
    let expected = resolver.resolve(NAME).await?;
    assert_eq!(resolver.cached(NAME).as_ref(), Some(&expected), "the entry is cached");
    let started = Instant::now();
    for _ in 0..CACHED_ITERATIONS {
        black_box(resolver.resolve(black_box(NAME)).await?);
    }
    let cached = started.elapsed() / CACHED_ITERATIONS;
    let map: HashMap<String, Resolved> = HashMap::from([(NAME.to_owned(), expected.clone())]);
    let started = Instant::now();
    for _ in 0..CACHED_ITERATIONS {
        black_box(map.get(black_box(NAME)).cloned());
    }
    let bare = started.elapsed() / CACHED_ITERATIONS;
    rows.push(Row {
        what: "cached resolve (mean)",
        br2k: format!("{} ns", cached.as_nanos()),
        baseline_name: "HashMap get + clone",
        baseline: format!("{} ns", bare.as_nanos()),
        ratio: ratio(cached, bare),
        goal: "< 1 µs",
    });

    // 2. Uncached resolve vs. the raw eth_call, over HTTP, interleaved so both see the same noise.
    eprintln!("uncached resolve: {UNCACHED_SAMPLES} samples each ...");
    let http = Resolver::connect_with(&anvil.endpoint(), deployment.address, None, config).await?;
    let raw_provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse()?);
    let raw = ServiceRegistry::new(deployment.address, raw_provider);
    let id = service_id(NAME);
    let (mut ours, mut theirs) = (Vec::with_capacity(UNCACHED_SAMPLES), Vec::with_capacity(UNCACHED_SAMPLES));
    for _ in 0..UNCACHED_SAMPLES {
        let started = Instant::now();
        black_box(http.refresh(NAME).await?);
        ours.push(started.elapsed());
        let started = Instant::now();
        black_box(raw.getServiceLocation(id).call().await?);
        theirs.push(started.elapsed());
    }
    ours.sort();
    theirs.sort();
    for (what, p, goal) in [("uncached resolve p50", 0.5, "< 2 ms"), ("uncached resolve p99", 0.99, "")] {
        let (a, b) = (percentile(&ours, p), percentile(&theirs, p));
        rows.push(Row {
            what,
            br2k: micros(a),
            baseline_name: "raw eth_call (alloy)",
            baseline: micros(b),
            ratio: ratio(a, b),
            goal,
        });
    }

    // 3. Propagation. Arrival times are stamped by three listeners: a `watch` stream of the
    // resolver (it yields right after the watcher wrote the event into the cache, so its
    // stamp is an upper bound of the cache's), a raw log subscription, and a raw log
    // subscription sharing its connection with a new-heads one.
    eprintln!("propagation: {PROPAGATION_SAMPLES} location updates ...");
    let ws = ProviderBuilder::new().connect_ws(WsConnect::new(anvil.ws_endpoint())).await?;
    let filter = Filter::new().address(deployment.address).event_signature(NewLocation::SIGNATURE_HASH);
    let epochs =
        |log: alloy::rpc::types::Log| async move { log.log_decode::<NewLocation>().ok().map(|e| e.inner.data.epoch) };
    let (raw_arrivals, raw_recorder) =
        record_arrivals(ws.subscribe_logs(&filter).await?.into_stream().filter_map(epochs));
    // A second raw listener that, like the resolver, also follows new heads on the same
    // connection: it tells whether a tail comes from the resolver or from the node's socket.
    let ws_with_heads = ProviderBuilder::new().connect_ws(WsConnect::new(anvil.ws_endpoint())).await?;
    let heads = ws_with_heads.subscribe_blocks().await?.into_stream();
    let heads_drain = tokio::spawn(heads.for_each(|_| async {}));
    let (with_heads_arrivals, with_heads_recorder) =
        record_arrivals(ws_with_heads.subscribe_logs(&filter).await?.into_stream().filter_map(epochs));
    let (cache_arrivals, cache_recorder) =
        record_arrivals(resolver.watch(NAME).filter_map(|change| async move { change.ok().map(|c| c.epoch) }));
    let wait_for = async |arrivals: &Mutex<HashMap<u64, Instant>>, epoch: u64| -> Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(at) = arrivals.lock().expect("not poisoned").get(&epoch) {
                return Ok(*at);
            }
            anyhow::ensure!(Instant::now() < deadline, "epoch {epoch} did not arrive within 5 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut cache_after_receipt, mut raw_after_receipt) = (Vec::new(), Vec::new());
    let (mut cache_after_send, mut raw_after_send, mut receipts) = (Vec::new(), Vec::new(), Vec::new());
    let mut with_heads_after_send = Vec::new();
    let mut before_receipt = 0;
    for epoch in 2..2 + PROPAGATION_SAMPLES {
        let location = format!("http://127.0.0.1:{}", 9000 + epoch);
        let sent_at = Instant::now();
        operator.update_location(NAME, &location, epoch).await?;
        let receipt_at = Instant::now();
        let cache_at = wait_for(&cache_arrivals, epoch).await?;
        let raw_at = wait_for(&raw_arrivals, epoch).await?;
        let with_heads_at = wait_for(&with_heads_arrivals, epoch).await?;
        with_heads_after_send.push(with_heads_at - sent_at);
        anyhow::ensure!(resolver.cached(NAME).is_some_and(|r| r.epoch == epoch), "the cache holds epoch {epoch}");
        if cache_at <= receipt_at {
            before_receipt += 1;
        }
        receipts.push(receipt_at - sent_at);
        cache_after_receipt.push(cache_at.saturating_duration_since(receipt_at));
        raw_after_receipt.push(raw_at.saturating_duration_since(receipt_at));
        cache_after_send.push(cache_at - sent_at);
        raw_after_send.push(raw_at - sent_at);
    }
    for task in [raw_recorder, with_heads_recorder, cache_recorder, heads_drain] {
        task.abort();
    }
    for samples in [
        &mut cache_after_receipt,
        &mut raw_after_receipt,
        &mut cache_after_send,
        &mut raw_after_send,
        &mut receipts,
        &mut with_heads_after_send,
    ] {
        samples.sort();
    }
    let series = [
        ("propagation after receipt p50", &cache_after_receipt, &raw_after_receipt, 0.5, "< 50 ms"),
        ("propagation after receipt max", &cache_after_receipt, &raw_after_receipt, 1.0, ""),
        ("send -> cache p50", &cache_after_send, &raw_after_send, 0.5, ""),
        ("send -> cache p99", &cache_after_send, &raw_after_send, 0.99, ""),
    ];
    for (what, ours, theirs, p, goal) in series {
        let (a, b) = (percentile(ours, p), percentile(theirs, p));
        rows.push(Row {
            what,
            br2k: micros(a),
            baseline_name: "raw logs subscription",
            baseline: micros(b),
            ratio: ratio(a, b),
            goal,
        });
    }
    for (what, p) in [("send -> cache p50", 0.5), ("send -> cache p99", 0.99)] {
        let (a, b) = (percentile(&cache_after_send, p), percentile(&with_heads_after_send, p));
        rows.push(Row {
            what,
            br2k: micros(a),
            baseline_name: "raw logs + newHeads subscriptions (as the resolver)",
            baseline: micros(b),
            ratio: ratio(a, b),
            goal: "",
        });
    }
    let receipt_p50 = percentile(&receipts, 0.5);

    println!("| measure | br2k | baseline | baseline value | br2k / baseline | goal |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        // A ratio to a baseline under a microsecond says nothing.
        let ratio = if row.baseline.starts_with("0.") { "-".to_owned() } else { format!("{:.2}", row.ratio) };
        println!("| {} | {} | {} | {} | {ratio} | {} |", row.what, row.br2k, row.baseline_name, row.baseline, row.goal);
    }
    println!(
        "\nanvil on loopback; {CACHED_ITERATIONS} cached resolves; {UNCACHED_SAMPLES} uncached samples each; \
         {PROPAGATION_SAMPLES} updateLocation transactions over WebSocket (send -> receipt p50 {}), \
         of which the event was in the cache before the receipt reached the sender {before_receipt} times \
         (counted as 0 after the receipt).",
        micros(receipt_p50)
    );
    Ok(())
}
