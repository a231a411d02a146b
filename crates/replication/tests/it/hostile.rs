//! Clients that try to stall a replica, depose the leader or fill the log with what they
//! send, and app code and stored values that misbehave. Each test ends with the service
//! answering, every replica identical and no acknowledged request lost.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use br2k_replication::{Limits, SnapshotPolicy};
use br2k_test_utils::EtcdCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Cluster, SERVICE, TOKEN, eventually};

/// The index a 200 answer carries.
fn index_of(response: &reqwest::Response) -> u64 {
    response.headers()["br2k-index"].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_behind_a_burst_of_large_requests_catches_up() {
    // 20 bodies of 250 KB are about 6.7 MB of log once encoded: more than one read of
    // 256 entries may carry (etcd-client refuses answers over 4 MiB by default).
    let mut c = Cluster::start_limited(Limits { max_body: 256 * 1024, ..Limits::default() }).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    c.replicas[f].crash();
    let big = "x".repeat(250_000);
    let mut expected = Vec::new();
    for k in 0..30 {
        let text = if k % 3 == 2 { format!("small{k}") } else { format!("{big}{k}") };
        let response = c.post(l, "/append", &text, None).await;
        assert_eq!(response.status(), 200);
        expected.push((index_of(&response), text));
    }
    c.restart_replica(f).await;
    c.converged(&expected).await;
    eventually("the follower reports no error", async || c.replicas[f].status().last_error.is_none()).await;

    // A new leader's Prepare Service reads the same log the same way.
    c.replicas[l].crash();
    c.etcd.kill(l).unwrap();
    let l2 = c.leader(Some(l)).await;
    let response = c.post(l2, "/append", "after", None).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_requests_are_refused_and_large_ones_never_depose_the_leader() {
    // etcd's own election timings and the runtime's own etcd timeout (2 s): with the
    // tests' fast ones (300 ms, 500 ms) a loaded machine writing megabytes can miss a
    // heartbeat or a deadline, and then etcd, not a request, changes the leader.
    let etcd = EtcdCluster::builder().default_timings().spawn().expect("etcd starts (run `bash tools/setup.sh`)");
    let limits = Limits { max_body: 256 * 1024, ..Limits::default() };
    let c = Cluster::start_on_with(etcd, limits, Some(Duration::from_secs(2))).await;
    let l = c.leader(None).await;
    let epoch = c.replicas[l].status().epoch;
    let url = format!("{}/append", c.replicas[l].url);

    let body = c.http.post(&url).body("x".repeat(300_000)).send().await.unwrap();
    assert_eq!(body.status(), 413);
    assert!(body.text().await.unwrap().contains("over 262144 bytes"));
    let head = c.http.post(&url).header("content-type", "t".repeat(20_000)).body("a").send().await.unwrap();
    assert_eq!(head.status(), 431);
    assert!(head.text().await.unwrap().contains("over the 16384 limit"), "the front says which limit");
    let mut many = c.http.post(&url).body("a");
    for n in 0..150 {
        many = many.header(format!("x-h{n}"), "v");
    }
    assert_eq!(many.send().await.unwrap().status(), 431, "more than 100 headers");
    let huge = c.http.post(&url).header("x-huge", "h".repeat(300_000)).body("a").send().await;
    assert!(huge.is_err() || huge.unwrap().status() == 431, "a head of 300 KB is refused");
    assert_eq!(c.counter("ls").await, 0, "nothing refused was logged");

    // Requests just within the limits, many at once: each is about 350 KB once logged
    // (a body in base64 and a head of JSON-escaped quotes, which double), so groups must
    // be sized by what is really written.
    let quotes = "\"".repeat(7_000);
    let sends = (0..12).map(|n| {
        let (http, url, quotes) = (c.http.clone(), url.clone(), quotes.clone());
        async move {
            let text = format!("{n}:{}", "y".repeat(250_000));
            let response = http
                .post(&url)
                .header("content-type", format!("text/plain; q={quotes}"))
                .header("Idempotency-Key", format!("big-{n}"))
                .body(text.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
            (index_of(&response), text)
        }
    });
    let mut expected = futures::future::join_all(sends).await;
    expected.sort();
    c.converged(&expected).await;
    assert_eq!(c.leader(None).await, l, "the leader kept its role");
    assert_eq!(c.replicas[l].status().epoch, epoch, "and its term");
    assert_eq!(c.counter("terms").await, 1, "no other term started");
}

/// Opens a connection to `url` and sends `bytes`, then nothing more.
async fn trickle(url: &str, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Reads what the server sends until it closes the connection (or 10 s pass).
async fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the server kept a slow connection open for 10 s");
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_loris_connections_are_dropped_and_cannot_exhaust_the_front() {
    let limits = Limits {
        max_connections: 8,
        header_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let c = Cluster::start_limited(limits).await;
    let l = c.leader(None).await;
    let url = c.replicas[l].url.clone();

    // Eight connections that never finish their heads fill the front...
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(trickle(&url, b"POST /append HTTP/1.1\r\nhost: x\r\nx-slow: ").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a ninth is told so at once, instead of waiting in the backlog.
    let mut ninth = trickle(&url, b"").await;
    let (answer, _) = until_closed(&mut ninth).await;
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("too many open connections"), "{answer}");
    // The slow ones are dropped after the header timeout.
    for stream in &mut slow {
        let (_, after) = until_closed(stream).await;
        assert!(after < Duration::from_secs(5), "a slow head was dropped only after {after:?}");
    }
    // A body that stops coming is answered 408, and nothing is logged.
    let mut stalled =
        trickle(&url, b"POST /append HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly-a-part").await;
    let (answer, _) = until_closed(&mut stalled).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(c.counter("ls").await, 0);

    let response = c.post(l, "/append", "after", None).await;
    assert_eq!(response.status(), 200);
    c.converged(&[(index_of(&response), "after".to_owned())]).await;
}

/// A leader whose handler fails at a keyed request (armed by `arm`): the client's first
/// try gets a 503, its retry with the same key is answered by another replica, and the
/// request took effect exactly once, everywhere.
async fn leader_fails_in_its_handler(c: &Cluster, arm: impl Fn(usize)) {
    let l = c.leader(None).await;
    assert_eq!(c.post(l, "/append", "before", Some("k-before")).await.status(), 200);
    arm(l);
    let first = c.post(l, "/append", "poisoned", Some("k-poisoned")).await;
    assert_eq!(first.status(), 503, "{}", first.text().await.unwrap());
    let l2 = c.leader(Some(l)).await;
    assert_ne!(l2, l, "another replica took over");
    let retry = c.post_to_leader("/append", "poisoned", Some("k-poisoned")).await;
    assert_eq!(retry.status(), 200);
    let after = c.post_to_leader("/append", "after", Some("k-after")).await;
    assert_eq!(after.status(), 200);
    let expected = vec![(1, "before".to_owned()), (2, "poisoned".to_owned()), (index_of(&after), "after".to_owned())];
    assert_eq!(index_of(&retry), 2);
    c.converged(&expected).await;
    eventually("the old leader is healthy again", async || c.replicas[l].status().last_error.is_none()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_ends_the_term_and_another_replica_takes_over() {
    let c = Cluster::start(false).await;
    leader_fails_in_its_handler(&c, |l| c.replicas[l].state.panic_armed.store(true, Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_handler_ends_the_term_and_another_replica_takes_over() {
    let c =
        Cluster::start_limited(Limits { max_body: 1024, handler_timeout: Duration::from_secs(1), ..Limits::default() })
            .await;
    leader_fails_in_its_handler(&c, |l| c.replicas[l].state.hang_armed.store(true, Ordering::SeqCst)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admission_check_runs_before_logging_and_credentials_are_never_stored() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let url = format!("{}/guarded", c.replicas[l].url);
    let send = |token: Option<&str>, body: &str| {
        let mut request = c.http.post(&url).body(body.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(send(None, "\"hi\"").await.unwrap().status(), 401);
    assert_eq!(send(Some("guess"), "\"hi\"").await.unwrap().status(), 403);
    let invalid = send(Some(TOKEN), "not json").await.unwrap();
    assert_eq!(invalid.status(), 422);
    assert!(invalid.text().await.unwrap().contains("must be a JSON string"));
    assert_eq!(c.counter("ls").await, 0, "refused requests are never logged");

    let accepted = send(Some(TOKEN), "\"hi\"").await.unwrap();
    assert_eq!(accepted.status(), 200);
    // The scheme's name in any case (RFC 6750): a client's library may write it so.
    let shouted = c.http.post(&url).header("authorization", format!("BEARER {TOKEN}")).body("\"ho\"").send();
    assert_eq!(shouted.await.unwrap().status(), 200);
    c.converged(&[(1, "\"hi\"".to_owned()), (2, "\"ho\"".to_owned())]).await;
    let mut etcd = c.etcd_client(l).await;
    let all = etcd.get(format!("/br2k/{SERVICE}/"), Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
    for kv in all.kvs() {
        let value = String::from_utf8_lossy(kv.value());
        assert!(!value.contains(TOKEN) && !value.to_lowercase().contains("authorization"), "{value}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_in_etcd_values_never_stops_the_service() {
    let c = Cluster::new(false).await;
    let key = |name: &str| format!("/br2k/{SERVICE}/{name}");
    // An idempotency record of the older format nobody can read: the first leader's import
    // (the only reader of `idem/` records) leaves it for an operator and serves.
    let mut etcd = c.etcd_client(0).await;
    etcd.put(key("idem/k-garbled"), "\u{0}\u{1}", None).await.unwrap();
    let c = c.with_replicas(SnapshotPolicy { interval: 10, trailing: 5 }).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    // A membership record nobody can read, and a follower's LPI.
    etcd.put(key("members/ghost"), "{not json", None).await.unwrap();
    etcd.put(key(&format!("lpi/r{f}")), "[]", None).await.unwrap();

    let garbled = c.post(l, "/append", "g", Some("k-garbled")).await;
    assert_eq!(garbled.status(), 200, "the unreadable record is no answer: the key is a new request");
    assert_eq!(c.counter("ls").await, 1);

    let mut expected = vec![(1, "g".to_owned())];
    expected.extend(c.load().append_many("m", 40, 4).await);
    c.converged(&expected).await;
    eventually("the log is compacted despite the unreadable records", async || c.replicas[l].status().first_index > 1)
        .await;
    for i in 0..3 {
        let health = c.http.get(format!("{}/br2k/health", c.replicas[i].url)).send().await.unwrap();
        assert_eq!(health.status(), 200, "replica {i}: {}", health.text().await.unwrap());
    }
    let stored = etcd.get(key("idem/k-garbled"), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"\0\x01", "the unreadable idempotency record is left for an operator too");
    let stored = etcd.get(key("members/ghost"), None).await.unwrap();
    assert_eq!(stored.kvs()[0].value(), b"{not json", "an unreadable record is left for an operator, not overwritten");
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_on_demand_need_the_admin_or_peer_token_and_come_at_most_once_an_interval() {
    let oci = br2k_test_utils::OciRegistry::spawn(None)
        .expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let c = crate::backup::backed_up_cluster(&oci, None).await;
    let appended = c.load().append_many("k", 3, 1).await;
    let l = c.leader(None).await;
    let url = format!("{}/br2k/backup", c.replicas[l].url);
    let ask = |authorization: Option<&str>| {
        let mut request = c.http.post(&url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request.send()
    };
    // Each one pushes an artifact and pays for a transaction: not for anyone who reaches
    // a replica.
    assert_eq!(ask(None).await.unwrap().status(), 401);
    assert_eq!(ask(Some("Bearer guess")).await.unwrap().status(), 403);
    assert_eq!(ask(Some("Basic YWRtaW46YWRtaW4=")).await.unwrap().status(), 401);
    let chain = &c.registry.as_ref().unwrap().manager;
    // The scheme's name in any case (RFC 6750), then a second ask within the interval.
    let token = crate::harness::ADMIN_TOKEN;
    assert_eq!(ask(Some(&format!("bearer {token}"))).await.unwrap().status(), 202);
    let again = ask(Some(&format!("BEARER {token}"))).await.unwrap();
    assert_eq!(again.status(), 429, "{}", again.text().await.unwrap());
    let wait: u64 = again.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1).contains(&wait), "Retry-After within the 1 s interval: {wait}");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(ask(Some(&format!("Bearer {token}"))).await.unwrap().status(), 202, "after Retry-After");
    // Another replica of the service may ask with the peer token (it never leaves etcd).
    let peer = c.peer_token().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let by_peer = c.http.post(&url).header("br2k-peer-token", peer).send().await.unwrap();
    assert_eq!(by_peer.status(), 202);
    let last = appended.last().unwrap().0;
    eventually("the asked-for backups are recorded", async || {
        chain.backup(SERVICE).await.unwrap().is_some_and(|b| b.index >= last)
    })
    .await;
}

/// A listener that answers every request with `answer` and counts the connections that
/// reach it.
async fn trap(answer: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, hits)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_catching_up_replica_never_follows_a_redirect_nor_fetches_a_snapshot_record_it_cannot_trust() {
    let mut c = Cluster::start_snapshotting(SnapshotPolicy { interval: 50, trailing: 20 }).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    let mut answered = c.load().append_many("a", 60, 4).await;
    c.converged(&answered).await;
    c.replicas[f].crash();
    let left_at = c.replicas[f].state.entries().last().unwrap().0;
    answered.extend(c.load().append_many("b", 250, 4).await);
    eventually("compaction passes the dead follower", async || {
        c.statuses().iter().map(|s| s.first_index).max().unwrap_or(1) > left_at + 100
    })
    .await;

    // Records planted in etcd (by whoever can write there): one whose front redirects
    // elsewhere, one past the service's SSI, one larger than a replica takes, one whose
    // URL carries a path. Only the first may be asked at all, and its redirect is never
    // followed: nothing, and no peer token, reaches the other listener.
    let (elsewhere, reached_elsewhere) = trap("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into()).await;
    let redirect = format!("HTTP/1.1 302 Found\r\nlocation: {elsewhere}/stolen\r\ncontent-length: 0\r\n\r\n");
    let (redirecting, _) = trap(redirect).await;
    let ssi = c.counter("ssi").await;
    let mut etcd = c.etcd_client(l).await;
    let plant = |url: &str, index: u64, size: u64| {
        serde_json::json!({ "url": url, "snapshot": {
            "index": index, "state_version": index, "digest": format!("sha256:{}", "00".repeat(32)),
            "size": size, "replica": "planted", "created_at": 1 } })
        .to_string()
    };
    let planted = [
        ("redirecting", plant(&redirecting, ssi, 10)),
        ("above-ssi", plant(&elsewhere, ssi + 1000, 10)),
        ("too-large", plant(&elsewhere, ssi, 1 << 40)),
        ("with-a-path", plant(&format!("{elsewhere}/x?y"), ssi, 10)),
    ];
    for (name, record) in &planted {
        etcd.put(format!("/br2k/{SERVICE}/members/{name}"), record.as_str(), None).await.unwrap();
    }
    c.restart_replica(f).await;
    c.converged_on(&[0, 1, 2], &answered).await;
    assert_eq!(reached_elsewhere.load(Ordering::SeqCst), 0, "a redirect or an untrusted record reached elsewhere");
    for (name, _) in &planted {
        etcd.delete(format!("/br2k/{SERVICE}/members/{name}"), None).await.unwrap();
    }
}

/// Sends a request head announcing a body of `length` bytes and none of it; the answer's
/// status line and how long it took.
async fn head_only(url: &str, path: &str, extra: &str, length: usize) -> (String, Duration) {
    let authority = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(authority).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nHost: {authority}\r\n{extra}Content-Length: {length}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut answer = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await;
    let n = read.map_or(0, Result::unwrap);
    let text = String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or("(no answer within 5 s)").to_owned();
    (text, started.elapsed())
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_and_leadership_are_checked_before_a_body_is_read() {
    let c = Cluster::start(false).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    // A client without the token announces a body and sends none: refused at once, not
    // after the body timeout (the replica never waits for, or holds, that body).
    let (answer, took) = head_only(&c.replicas[l].url, "/guarded", "", 1000).await;
    assert!(answer.contains(" 401 "), "{answer}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    let (answer, _) = head_only(&c.replicas[l].url, "/guarded", "Authorization: bearer wrong\r\n", 1000).await;
    assert!(answer.contains(" 403 "), "{answer}");
    // A follower sends the client on before reading its body.
    let (answer, took) = head_only(&c.replicas[f].url, "/append", "", 1000).await;
    assert!(answer.contains(" 503 "), "{answer}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    // With the token, the body is awaited (and here never comes): no answer at once.
    let (answer, _) =
        head_only(&c.replicas[l].url, "/guarded", &format!("Authorization: Bearer {TOKEN}\r\n"), 1000).await;
    assert!(answer.contains("no answer"), "{answer}");
}
