//! The failover client between real HTTP servers: it follows the registry's location,
//! `Br2k-Leader` hints and dead servers, never re-sends a body under a new key, and files
//! one claim per window.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use br2k_resolver::{FailoverClient, FailoverConfig, FailoverError, Request, service_id};
use tokio::sync::oneshot;

use crate::fixture::{Fixture, NAME, eventually};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Behaviour {
    /// 200 with the server's name.
    Answer,
    /// 503, optionally naming a leader in `Br2k-Leader`.
    NotLeader(Option<String>),
    /// Accept the request, never answer.
    Hang,
}

struct State {
    name: &'static str,
    behaviour: Mutex<Behaviour>,
    /// (Idempotency-Key, body) of every request received.
    seen: Mutex<Vec<(String, String)>>,
}

/// A real HTTP server on loopback standing in for one replica.
struct Server {
    url: String,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    async fn start(name: &'static str) -> Self {
        let state = Arc::new(State { name, behaviour: Mutex::new(Behaviour::Answer), seen: Mutex::default() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handler_state = Arc::clone(&state);
        let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let state = Arc::clone(&handler_state);
            async move { handle(&state, &headers, &body).await }
        });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async { stopped.await.ok().unwrap_or(()) })
                .await
                .unwrap();
        });
        Self { url, state, stop: Some(stop) }
    }

    fn behave(&self, behaviour: Behaviour) {
        *self.state.behaviour.lock().unwrap() = behaviour;
    }

    fn seen(&self) -> Vec<(String, String)> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Stops listening: later connections are refused.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn handle(state: &State, headers: &HeaderMap, body: &Bytes) -> Response {
    let key = headers.get("idempotency-key").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    state.seen.lock().unwrap().push((key, String::from_utf8_lossy(body).into_owned()));
    let behaviour = state.behaviour.lock().unwrap().clone();
    match behaviour {
        Behaviour::Answer => (StatusCode::OK, state.name).into_response(),
        Behaviour::NotLeader(leader) => {
            let mut response = StatusCode::SERVICE_UNAVAILABLE.into_response();
            if let Some(leader) = leader {
                response.headers_mut().insert("br2k-leader", leader.parse().unwrap());
            }
            response
        }
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
    }
}

fn config() -> FailoverConfig {
    FailoverConfig {
        attempt_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        deadline: Duration::from_secs(15),
        max_attempts: 50,
        first_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        claim_after: 0,
        claim_window: Duration::from_secs(60),
    }
}

async fn body_text(response: reqwest::Response) -> String {
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// Every copy of `body` any server received carried `key`.
fn assert_one_key(servers: &[&Server], body: &str, key: &str) {
    for server in servers {
        for (seen_key, _) in server.seen().into_iter().filter(|(_, seen)| seen == body) {
            assert_eq!(seen_key, key, "{} received {body:?} under another key", server.state.name);
        }
    }
}

#[tokio::test]
async fn follows_a_new_location_after_not_leader_answers() {
    let f = Fixture::new(300).await;
    let (a, b) = (Server::start("a").await, Server::start("b").await);
    f.publish(&a.url, 1).await;
    let client = FailoverClient::new(f.resolver(false, 2).await, NAME, config()).unwrap();
    assert_eq!(body_text(client.send(&Request::post("/log", "warm-up")).await.unwrap()).await, "a");

    // A is demoted: it answers 503 until the registry names B.
    a.behave(Behaviour::NotLeader(None));
    let request = Request::post("/log", r#"{"user":1}"#);
    let sending = tokio::spawn({
        let (client, request) = (client.clone(), request.clone());
        async move { client.send(&request).await }
    });
    eventually("A has refused the request", || a.seen().iter().any(|(_, body)| body.contains("user"))).await;
    f.publish(&b.url, 2).await;
    let response = sending.await.unwrap().expect("the request reaches B");
    assert_eq!(body_text(response).await, "b");

    assert_eq!(b.seen().len(), 1, "B executed it once");
    assert_one_key(&[&a, &b], r#"{"user":1}"#, request.key());
}

#[tokio::test]
async fn follows_the_leader_hint_before_the_registry_changes() {
    let f = Fixture::new(300).await;
    let (a, b) = (Server::start("a").await, Server::start("b").await);
    // B led before A (the registry published it): a hint back to it is followed at once.
    f.publish(&b.url, 1).await;
    f.publish(&a.url, 2).await;
    a.behave(Behaviour::NotLeader(Some(b.url.clone())));
    let client = FailoverClient::new(f.resolver(true, 2).await, NAME, config()).unwrap();
    let request = Request::post("/log", "hinted");
    assert_eq!(body_text(client.send(&request).await.unwrap()).await, "b");
    assert_eq!(a.seen().len(), 1);
    assert_eq!(b.seen().len(), 1);
    assert_one_key(&[&a, &b], "hinted", request.key());
}

#[tokio::test]
async fn a_hint_to_a_location_the_registry_never_published_is_not_followed() {
    let f = Fixture::new(300).await;
    let (a, b, elsewhere) = (Server::start("a").await, Server::start("b").await, Server::start("elsewhere").await);
    f.publish(&a.url, 1).await;
    // Anyone who can answer at A's address can name any hint: the client asks the chain.
    a.behave(Behaviour::NotLeader(Some(elsewhere.url.clone())));
    let client = FailoverClient::new(f.resolver(false, 2).await, NAME, config()).unwrap();
    let request = Request::post("/log", "secret")
        .header(reqwest::header::AUTHORIZATION, reqwest::header::HeaderValue::from_static("Bearer the-users-token"));
    let sending = tokio::spawn({
        let (client, request) = (client.clone(), request.clone());
        async move { client.send(&request).await }
    });
    eventually("A has refused the request", || !a.seen().is_empty()).await;
    f.publish(&b.url, 2).await;
    assert_eq!(body_text(sending.await.unwrap().expect("the request reaches B")).await, "b");
    assert!(elsewhere.seen().is_empty(), "nothing went where the chain never pointed: {:?}", elsewhere.seen());
    assert_one_key(&[&a, &b], "secret", request.key());
}

#[tokio::test]
async fn moves_on_when_the_leader_stops_answering() {
    let f = Fixture::new(300).await;
    let (mut a, b) = (Server::start("a").await, Server::start("b").await);
    f.publish(&a.url, 1).await;
    let client = FailoverClient::new(f.resolver(false, 2).await, NAME, config()).unwrap();

    // A hangs on the request (it may have executed it): the attempt times out, the client
    // re-resolves and repeats the same request, same key, at B.
    a.behave(Behaviour::Hang);
    let request = Request::post("/log", "hung");
    let sending = tokio::spawn({
        let (client, request) = (client.clone(), request.clone());
        async move { client.send(&request).await }
    });
    eventually("A holds the request", || !a.seen().is_empty()).await;
    f.publish(&b.url, 2).await;
    assert_eq!(body_text(sending.await.unwrap().unwrap()).await, "b");
    assert_one_key(&[&a, &b], "hung", request.key());
    assert_eq!(b.seen().len(), 1);

    // Then A goes away altogether and B is demoted to A's old role: connection refused at
    // A is a failure like any other, and the client ends up at whoever the registry names.
    a.stop();
    f.publish(&a.url, 3).await;
    let request = Request::post("/log", "refused");
    let sending = tokio::spawn({
        let (client, request) = (client.clone(), request.clone());
        async move { client.send(&request).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.publish(&b.url, 4).await;
    assert_eq!(body_text(sending.await.unwrap().unwrap()).await, "b");
    assert_one_key(&[&b], "refused", request.key());
    assert_eq!(b.seen().iter().filter(|(_, body)| body == "refused").count(), 1, "B executed it once");
    assert_eq!(a.seen().iter().filter(|(_, body)| body == "refused").count(), 0, "A was gone");
}

#[tokio::test]
async fn abandons_a_silent_leader_as_soon_as_the_registry_names_another() {
    let f = Fixture::new(300).await;
    let (a, b) = (Server::start("a").await, Server::start("b").await);
    f.publish(&a.url, 1).await;
    // An attempt may wait 30 s: only the registry's event can end it early.
    let config = FailoverConfig { attempt_timeout: Duration::from_secs(30), ..config() };
    let client = FailoverClient::new(f.resolver(false, 2).await, NAME, config).unwrap();
    assert_eq!(body_text(client.send(&Request::post("/log", "warm-up")).await.unwrap()).await, "a");

    a.behave(Behaviour::Hang);
    let request = Request::post("/log", "silent");
    let sending = tokio::spawn({
        let (client, request) = (client.clone(), request.clone());
        async move { client.send(&request).await }
    });
    eventually("A holds the request", || a.seen().iter().any(|(_, body)| body == "silent")).await;
    let published = std::time::Instant::now();
    f.publish(&b.url, 2).await;
    assert_eq!(body_text(sending.await.unwrap().unwrap()).await, "b");
    let waited = published.elapsed();
    assert!(waited < Duration::from_secs(5), "the client left A when B was published, not after {waited:?}");
    assert_one_key(&[&a, &b], "silent", request.key());
    assert_eq!(client.claims_filed(), 0);
}

async fn claims_by(f: &Fixture, claimant: alloy::primitives::Address) -> usize {
    let logs = f
        .manager
        .instance()
        .Claim_filter()
        .topic1(service_id(NAME))
        .topic2(claimant)
        .from_block(0)
        .query()
        .await
        .unwrap();
    logs.len()
}

#[tokio::test]
async fn files_one_claim_per_window_of_failures() {
    // Cooldown 0: the registry would accept every claim, so only the client limits them.
    let f = Fixture::new(0).await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    f.publish(&dead, 1).await;
    let window = Duration::from_secs(3);
    let config = FailoverConfig { max_attempts: 4, claim_after: 3, claim_window: window, ..config() };
    let client = FailoverClient::new(f.resolver(false, 4).await, NAME, config).unwrap();
    let claimant = f.anvil.address(4);

    let window_started = std::time::Instant::now();
    for _ in 0..2 {
        match client.send(&Request::get("/log")).await {
            Err(FailoverError::Exhausted { attempts, .. }) => assert_eq!(attempts, 4),
            other => panic!("expected Exhausted, got {other:?}"),
        }
    }
    let c = client.clone();
    eventually("the window's claim is mined", move || c.claims_filed() == 1).await;
    assert!(window_started.elapsed() < window, "the test's sends fit in one window");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(claims_by(&f, claimant).await, 1, "8 failures in one window: one claim");

    tokio::time::sleep(window.saturating_sub(window_started.elapsed()) + Duration::from_millis(100)).await;
    assert!(client.send(&Request::get("/log")).await.is_err());
    let c = client.clone();
    eventually("the next window's claim is mined", move || c.claims_filed() == 2).await;
    assert_eq!(claims_by(&f, claimant).await, 2, "a new window: one more claim");
}
