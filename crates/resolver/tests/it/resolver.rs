//! The cache, its invalidation by events (subscription and polling) and by reported
//! failures, the watch stream, and claims.

use std::time::Duration;

use br2k_bindings::ServiceState;
use br2k_resolver::{Error, Resolved};
use futures::StreamExt;

use crate::fixture::{Fixture, NAME, eventually};

fn resolved(location: &str, epoch: u64, state: ServiceState) -> Resolved {
    Resolved { location: location.into(), epoch, state }
}

async fn cached_then_updated_by_event(websocket: bool) {
    let f = Fixture::new(300).await;
    f.publish("http://127.0.0.1:9001", 1).await;
    let resolver = f.resolver(websocket, 2).await;

    assert_eq!(resolver.cached(NAME), None, "nothing is cached before the first resolve");
    let first = resolver.resolve(NAME).await.unwrap();
    assert_eq!(first, resolved("http://127.0.0.1:9001", 1, ServiceState::Registered));
    assert_eq!(resolver.cached(NAME), Some(first.clone()), "the answer is cached");
    assert_eq!(resolver.resolve(NAME).await.unwrap(), first, "a second resolve answers from the cache");

    // The event alone brings the new location into the cache: `cached` never asks the chain.
    f.publish("http://127.0.0.1:9002", 2).await;
    let r = resolver.clone();
    eventually("the NewLocation event reaches the cache", move || {
        r.cached(NAME).is_some_and(|c| c.location == "http://127.0.0.1:9002" && c.epoch == 2)
    })
    .await;
    f.manager.set_state(NAME, ServiceState::Running).await.unwrap();
    let r = resolver.clone();
    eventually("the StateChanged event reaches the cache", move || {
        r.cached(NAME).is_some_and(|c| c.state == ServiceState::Running)
    })
    .await;

    resolver.report_failure(NAME);
    assert_eq!(resolver.cached(NAME), None, "a reported failure drops the entry");
    assert_eq!(resolver.resolve(NAME).await.unwrap(), resolved("http://127.0.0.1:9002", 2, ServiceState::Running));
}

#[tokio::test]
async fn polling_resolver_is_cached_and_follows_events() {
    cached_then_updated_by_event(false).await;
}

#[tokio::test]
async fn subscribed_resolver_is_cached_and_follows_events() {
    cached_then_updated_by_event(true).await;
}

async fn watch_yields_each_change(websocket: bool) {
    let f = Fixture::new(300).await;
    let resolver = f.resolver(websocket, 2).await;
    let mut changes = std::pin::pin!(resolver.watch(NAME));
    let next = async |changes: &mut std::pin::Pin<&mut _>| {
        let item: Option<br2k_resolver::Result<Resolved>> =
            tokio::time::timeout(Duration::from_secs(10), StreamExt::next(changes))
                .await
                .expect("a change within 10 s");
        item.expect("the stream goes on").expect("no error")
    };
    assert_eq!(next(&mut changes).await, resolved("", 0, ServiceState::Registered), "first the current state");
    f.publish("http://10.0.0.1:8080", 3).await;
    assert_eq!(next(&mut changes).await, resolved("http://10.0.0.1:8080", 3, ServiceState::Registered));
    f.manager.set_state(NAME, ServiceState::Recovering).await.unwrap();
    assert_eq!(next(&mut changes).await, resolved("http://10.0.0.1:8080", 3, ServiceState::Recovering));
    f.publish("http://10.0.0.2:8080", 7).await;
    assert_eq!(next(&mut changes).await, resolved("http://10.0.0.2:8080", 7, ServiceState::Recovering));
}

#[tokio::test]
async fn polling_watch_yields_each_change() {
    watch_yields_each_change(false).await;
}

#[tokio::test]
async fn subscribed_watch_yields_each_change() {
    watch_yields_each_change(true).await;
}

#[tokio::test]
async fn a_second_claim_within_the_cooldown_is_a_typed_error() {
    let f = Fixture::new(300).await;
    let resolver = f.resolver(false, 3).await;
    resolver.claim(NAME, "no answer").await.expect("the first claim is accepted");
    match resolver.claim(NAME, "still no answer").await {
        Err(Error::ClaimTooSoon { name, claimant, next_claim_at }) => {
            assert_eq!((name.as_str(), claimant), (NAME, f.anvil.address(3)));
            assert!(next_claim_at > 0);
        }
        other => panic!("expected ClaimTooSoon, got {other:?}"),
    }
    assert!(matches!(resolver.claim("ghost", "x").await, Err(Error::UnknownService { .. })));
}

#[tokio::test]
async fn the_cache_is_not_trusted_while_the_watcher_is_down() {
    let f = Fixture::new(300).await;
    let resolver = f.resolver(false, 2).await;
    resolver.resolve(NAME).await.unwrap();
    assert!(resolver.cached(NAME).is_some());

    // Kill the chain: the watcher's polls fail, so it can no longer see events.
    let killed = std::process::Command::new("kill").args(["-KILL", &f.anvil.pid().to_string()]).status().unwrap();
    assert!(killed.success());
    let r = resolver.clone();
    eventually("the watcher notices", move || !r.is_live()).await;
    assert_eq!(resolver.cached(NAME), None, "no cached answer once events may be missed");
    assert!(resolver.resolve(NAME).await.unwrap_err().is_unreachable(), "resolving now asks the (dead) chain");
}
