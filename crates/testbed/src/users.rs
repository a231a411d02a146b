//! The paper's users: each has its own id and sends its requests one after another at
//! a steady rate, through the resolver's FailoverClient (so it finds the leader in the
//! registry and follows it through leader changes), keeping every acknowledged answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use br2k_resolver::{FailoverClient, FailoverConfig, Request, Resolver};
use serde::Serialize;

/// One acknowledged request: what the user sent and what the service answered.
#[derive(Clone, Debug, Serialize)]
pub struct Ack {
    /// The user.
    pub user: u64,
    /// The user's sequence number for the request.
    pub seq: u64,
    /// The log index the service answered.
    pub index: u64,
    /// The position in the list the service answered.
    pub position: u64,
    /// When the answer arrived, from the start of the run (milliseconds).
    pub at_ms: u64,
    /// How long the request took, retries included (milliseconds).
    pub latency_ms: u64,
}

/// A request the user gave up on, or that the service refused.
#[derive(Clone, Debug, Serialize)]
pub struct Unacknowledged {
    /// The user.
    pub user: u64,
    /// Its sequence number.
    pub seq: u64,
    /// Why.
    pub reason: String,
}

/// What one user saw.
#[derive(Debug, Default)]
pub struct UserLog {
    /// Acknowledged requests.
    pub acks: Vec<Ack>,
    /// The others.
    pub unacknowledged: Vec<Unacknowledged>,
    /// Claims this user's client filed.
    pub claims: u64,
}

/// Counters shared with the progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Answers received so far.
    pub acked: AtomicU64,
    /// Requests given up so far.
    pub failed: AtomicU64,
}

/// How a user behaves.
#[derive(Clone, Debug)]
pub struct UserPlan {
    /// Its id.
    pub user: u64,
    /// How many requests.
    pub requests: u64,
    /// Requests per second.
    pub rate: f64,
    /// Give up on one request after this long.
    pub give_up_after: Duration,
    /// Key prefix that makes this run's idempotency keys unique.
    pub run_id: String,
    /// Failed attempts within a minute after which the user files a claim; 0 never claims.
    pub claim_after: u32,
}

/// The failover settings users run with: attempts bounded to a second, so a request
/// stuck on a leader that was cut off fails over quickly; a claim after `claim_after`
/// failed attempts within a minute (0: never; the testbed measures replication, not
/// recovery).
pub fn failover_config(give_up_after: Duration, claim_after: u32) -> FailoverConfig {
    FailoverConfig {
        attempt_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_millis(500),
        deadline: give_up_after,
        max_attempts: u32::MAX,
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(250),
        claim_after,
        claim_window: Duration::from_secs(60),
    }
}

/// Runs one user to the end.
pub async fn run_user(
    plan: UserPlan,
    resolver: Resolver,
    service: String,
    start: Instant,
    progress: Arc<Progress>,
) -> UserLog {
    let mut log = UserLog::default();
    let client = match FailoverClient::new(resolver, service, failover_config(plan.give_up_after, plan.claim_after)) {
        Ok(client) => client,
        Err(e) => {
            log.unacknowledged.push(Unacknowledged { user: plan.user, seq: 0, reason: e.to_string() });
            return log;
        }
    };
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    let mut next = Instant::now();
    for seq in 1..=plan.requests {
        tokio::time::sleep_until(next.into()).await;
        next = (next + period).max(Instant::now());
        let body = serde_json::json!({ "user": plan.user, "seq": seq }).to_string();
        let request = Request::post("/log", body)
            .header(reqwest::header::CONTENT_TYPE, reqwest::header::HeaderValue::from_static("application/json"))
            .idempotency_key(format!("{}-u{}-{seq}", plan.run_id, plan.user));
        let sent = Instant::now();
        match send(&client, &request).await {
            Ok((index, position)) => {
                let now = Instant::now();
                log.acks.push(Ack {
                    user: plan.user,
                    seq,
                    index,
                    position,
                    at_ms: millis(now - start),
                    latency_ms: millis(now - sent),
                });
                progress.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                tracing::warn!(user = plan.user, seq, "request not acknowledged: {reason}");
                log.unacknowledged.push(Unacknowledged { user: plan.user, seq, reason });
                progress.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    log.claims = client.claims_filed();
    log
}

async fn send(client: &FailoverClient, request: &Request) -> Result<(u64, u64), String> {
    #[derive(serde::Deserialize)]
    struct Appended {
        index: u64,
        position: u64,
    }
    let response = client.send(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.bytes().await.map_err(|e| format!("reading the answer: {e}"))?;
    if !status.is_success() {
        return Err(format!("answered {status}: {}", String::from_utf8_lossy(&body)));
    }
    let appended: Appended = serde_json::from_slice(&body)
        .map_err(|e| format!("answer is not {{index, position}}: {e}: {}", String::from_utf8_lossy(&body)))?;
    Ok((appended.index, appended.position))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
