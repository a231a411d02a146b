//! Name -> location, cached and kept fresh by the registry's own events.
//!
//! A [`Resolver`] owns a cache and one background task, the *watcher*, that follows the
//! registry's `NewLocation` and `StateChanged` events: through an `eth_subscribe` log
//! subscription when the endpoint is a WebSocket, by polling `eth_getLogs` otherwise. The
//! watcher writes each event into the cache (so a new leader is known without a further
//! call) and hands it to every [`Resolver::watch`] stream.
//!
//! The cache is trusted only while the watcher is *live*: subscribed, or polling without
//! errors. Whenever it is not (the socket dropped, the node stopped answering) the cache
//! is emptied and every resolve goes to the chain until the watcher is live again, because
//! events may have been missed in between. A caller that finds a location dead reports it
//! with [`Resolver::report_failure`], which drops that entry too.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use br2k_bindings::ServiceRegistry::{LocationReset, NewLocation, StateChanged};
use br2k_bindings::ServiceState;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::registry::{Chain, RegistryClient, Resolved, Timeouts, TxOutcome, service_id};

/// How a [`Resolver`] talks to the chain and keeps its cache.
#[derive(Clone, Debug)]
pub struct ResolverConfig {
    /// Timeouts of RPC calls and transactions.
    pub timeouts: Timeouts,
    /// How often the watcher polls for events on an HTTP endpoint.
    pub poll_interval: Duration,
    /// How long a cached entry is trusted at most, even with no event; a backstop against
    /// an event the node never delivered. `None`: until an event or a reported failure.
    pub max_age: Option<Duration>,
    /// Longest wait between two attempts of the watcher to (re)subscribe or poll again.
    pub max_retry_interval: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            timeouts: Timeouts::default(),
            poll_interval: Duration::from_secs(1),
            max_age: Some(Duration::from_secs(300)),
            max_retry_interval: Duration::from_secs(10),
        }
    }
}

/// An event of the registry as the watcher hands it on.
#[derive(Clone, Debug)]
enum Event {
    Location {
        id: B256,
        location: String,
        epoch: u64,
    },
    State {
        id: B256,
        state: ServiceState,
    },
    /// A log was removed by a reorganisation: what it said no longer holds.
    Invalidate {
        id: B256,
    },
    /// The watcher was not live for a while: anything may have changed.
    Resync,
}

struct Entry {
    resolved: Resolved,
    fetched_at: Instant,
}

#[derive(Default)]
struct Cache {
    by_name: HashMap<String, Entry>,
    names: HashMap<B256, String>,
    /// Whether the watcher is following events right now.
    live: bool,
    /// Bumped by every event applied, so a resolve that raced with an event does not
    /// write its older answer over the event's.
    generation: u64,
    /// Locations the registry published for each service (by id), the latest
    /// [`PUBLISHED_KEPT`]: a `Br2k-Leader` hint is followed only to one of them.
    published: HashMap<B256, Vec<String>>,
}

/// Locations remembered per service for checking hints: a few times any replica count.
const PUBLISHED_KEPT: usize = 32;

impl Cache {
    fn remember(&mut self, id: B256, location: &str) {
        let location = location.trim_end_matches('/');
        if location.is_empty() {
            return;
        }
        let kept = self.published.entry(id).or_default();
        kept.retain(|l| l != location);
        kept.push(location.to_owned());
        if kept.len() > PUBLISHED_KEPT {
            kept.remove(0);
        }
    }

    fn entry_mut(&mut self, id: &B256) -> Option<&mut Entry> {
        let name = self.names.get(id)?;
        self.by_name.get_mut(name)
    }
}

struct Shared {
    registry: RegistryClient,
    config: ResolverConfig,
    cache: RwLock<Cache>,
    events: broadcast::Sender<Event>,
}

/// Aborts the watcher when the last handle of a resolver is dropped.
struct WatcherGuard(JoinHandle<()>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves service names to their leader's location through the registry, with a cache
/// kept fresh by the registry's events. Cloning is cheap; clones share cache and watcher.
#[derive(Clone)]
pub struct Resolver {
    shared: Arc<Shared>,
    _watcher: Arc<WatcherGuard>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("registry", &self.shared.registry.address()).finish_non_exhaustive()
    }
}

impl Resolver {
    /// Connects to `rpc_url` and the registry at `registry` with the default config. A
    /// `signer` is needed only to file claims.
    ///
    /// # Errors
    /// Connection errors, `NoRegistry` when the address holds no contract.
    pub async fn connect(rpc_url: &str, registry: Address, signer: Option<PrivateKeySigner>) -> Result<Self> {
        Self::connect_with(rpc_url, registry, signer, ResolverConfig::default()).await
    }

    /// Like [`connect`](Self::connect), with an explicit config.
    ///
    /// # Errors
    /// Connection errors, `NoRegistry` when the address holds no contract.
    pub async fn connect_with(
        rpc_url: &str,
        registry: Address,
        signer: Option<PrivateKeySigner>,
        config: ResolverConfig,
    ) -> Result<Self> {
        let chain = Chain::connect(rpc_url, signer, config.timeouts).await?;
        let registry = chain.registry(registry).await?;
        Ok(Self::new(registry, config))
    }

    /// A resolver over an already connected registry; starts the watcher (needs a Tokio
    /// runtime).
    pub fn new(registry: RegistryClient, config: ResolverConfig) -> Self {
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared { registry, config, cache: RwLock::default(), events });
        let watcher = tokio::spawn(watch_registry(Arc::clone(&shared)));
        Self { shared, _watcher: Arc::new(WatcherGuard(watcher)) }
    }

    /// The registry this resolver reads.
    pub fn registry(&self) -> &RegistryClient {
        &self.shared.registry
    }

    /// Where `name` is served: from the cache when it holds a trusted entry, otherwise by
    /// one `eth_call` whose answer is then cached.
    ///
    /// # Errors
    /// `UnknownService`, RPC and timeout errors.
    pub async fn resolve(&self, name: &str) -> Result<Resolved> {
        match self.cached(name) {
            Some(resolved) => Ok(resolved),
            None => self.refresh(name).await,
        }
    }

    /// The cached entry of `name`, if there is one the resolver trusts.
    pub fn cached(&self, name: &str) -> Option<Resolved> {
        let cache = self.shared.read_cache();
        if !cache.live {
            return None;
        }
        let entry = cache.by_name.get(name)?;
        if self.shared.config.max_age.is_some_and(|max| entry.fetched_at.elapsed() > max) {
            return None;
        }
        Some(entry.resolved.clone())
    }

    /// Asks the chain (never the cache) where `name` is served and caches the answer.
    ///
    /// # Errors
    /// `UnknownService`, RPC and timeout errors.
    pub async fn refresh(&self, name: &str) -> Result<Resolved> {
        let generation = self.shared.read_cache().generation;
        let resolved = self.shared.registry.service_location(name).await?;
        let mut cache = self.shared.write_cache();
        cache.remember(service_id(name), &resolved.location);
        if cache.live && cache.generation == generation {
            cache.names.insert(service_id(name), name.to_owned());
            cache.by_name.insert(name.to_owned(), Entry { resolved: resolved.clone(), fetched_at: Instant::now() });
        }
        Ok(resolved)
    }

    /// Drops the cached entry of `name`: its location failed the caller, so the next
    /// resolve asks the chain.
    pub fn report_failure(&self, name: &str) {
        let mut cache = self.shared.write_cache();
        if cache.by_name.remove(name).is_some() {
            tracing::debug!(service = name, "dropped the cached location after a reported failure");
        }
    }

    /// A future that completes once the registry announces a location for `name` other
    /// than `current`: a request waiting on `current` can then be abandoned for the new
    /// leader. It listens from the moment this is called; without events (a watcher that
    /// is not live) it never completes.
    pub fn moved_from(&self, name: &str, current: &str) -> impl Future<Output = ()> + Send + 'static {
        let id = service_id(name);
        let current = current.trim_end_matches('/').to_owned();
        let mut events = self.shared.events.subscribe();
        async move {
            loop {
                match events.recv().await {
                    Ok(Event::Location { id: changed, location, .. })
                        if changed == id && location.trim_end_matches('/') != current =>
                    {
                        return;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        }
    }

    /// Whether the registry has published `location` for `name`: known from this
    /// resolver's resolves and the events it followed, else read from the registry's
    /// history (a failure to read it counts as no). A replica's `Br2k-Leader` hint is
    /// followed only to such a location: anyone can answer 503 with any hint.
    pub async fn was_published(&self, name: &str, location: &str) -> bool {
        let id = service_id(name);
        let location = location.trim_end_matches('/');
        let known = |cache: &Cache| cache.published.get(&id).is_some_and(|kept| kept.iter().any(|l| l == location));
        if known(&self.shared.read_cache()) {
            return true;
        }
        match self.shared.registry.published_locations(name).await {
            Ok(history) => {
                let mut cache = self.shared.write_cache();
                for published in &history {
                    cache.remember(id, published);
                }
                known(&cache)
            }
            Err(e) => {
                tracing::warn!(service = name, "cannot read where the registry published the service: {e}");
                false
            }
        }
    }

    /// Whether the watcher is following the registry's events right now (so cached
    /// entries are trusted).
    pub fn is_live(&self) -> bool {
        self.shared.read_cache().live
    }

    /// Files a claim that `name` is not serving, signed by the resolver's key.
    ///
    /// # Errors
    /// `ClaimTooSoon` within the registry's cooldown, `NoSigner`, `UnknownService`, RPC errors.
    pub async fn claim(&self, name: &str, reason: &str) -> Result<TxOutcome> {
        self.shared.registry.send_claim(name, reason).await
    }

    /// A stream of where `name` is served: first its current location, then each change
    /// (new location, new state) as the registry's events arrive. After the watcher lost
    /// events it asks the chain again and yields the answer if it differs. An error (the
    /// chain unreachable) is yielded and the stream goes on.
    pub fn watch(&self, name: &str) -> impl Stream<Item = Result<Resolved>> + Send + 'static {
        let state = WatchState {
            resolver: self.clone(),
            name: name.to_owned(),
            id: service_id(name),
            events: self.shared.events.subscribe(),
            last: None,
            must_ask: true,
        };
        futures::stream::unfold(state, WatchState::next)
    }
}

struct WatchState {
    resolver: Resolver,
    name: String,
    id: B256,
    events: broadcast::Receiver<Event>,
    last: Option<Resolved>,
    must_ask: bool,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<Resolved>, Self)> {
        loop {
            if self.must_ask {
                self.must_ask = false;
                match self.resolver.refresh(&self.name).await {
                    Ok(resolved) if self.last.as_ref() != Some(&resolved) => {
                        self.last = Some(resolved.clone());
                        return Some((Ok(resolved), self));
                    }
                    Ok(_) => {}
                    Err(e) => return Some((Err(e), self)),
                }
            }
            let event = match self.events.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.must_ask = true;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            let Some(last) = &self.last else {
                // Never resolved (the first attempt failed): any news is a reason to ask.
                self.must_ask = true;
                continue;
            };
            let next = match event {
                Event::Location { id, location, epoch } if id == self.id && epoch >= last.epoch => {
                    Resolved { location, epoch, state: last.state }
                }
                Event::State { id, state } if id == self.id => Resolved { state, ..last.clone() },
                Event::Invalidate { id } if id == self.id => {
                    self.must_ask = true;
                    continue;
                }
                Event::Resync => {
                    self.must_ask = true;
                    continue;
                }
                _ => continue,
            };
            if next != *last {
                self.last = Some(next.clone());
                return Some((Ok(next), self));
            }
        }
    }
}

impl Shared {
    // A panic while holding the lock cannot leave the cache worse than stale, and every
    // writer keeps it consistent, so a poisoned lock is used as is.
    fn read_cache(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_cache(&self) -> std::sync::RwLockWriteGuard<'_, Cache> {
        self.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the watcher live or not. Either way the cache starts afresh: going down, it can
    /// no longer be kept fresh; coming back, events may have been missed meanwhile.
    fn set_live(&self, live: bool) {
        {
            let mut cache = self.write_cache();
            if cache.live == live {
                return;
            }
            cache.live = live;
        }
        if live {
            tracing::debug!("resolver watcher live: the cache is in use");
        } else {
            tracing::warn!("resolver watcher lost the registry's events: resolving without the cache until it is back");
        }
        self.resync();
    }

    /// Forgets every cached entry and tells the watch streams to ask again: events may have
    /// been missed.
    fn resync(&self) {
        let mut cache = self.write_cache();
        cache.by_name.clear();
        cache.generation += 1;
        drop(cache);
        let _ = self.events.send(Event::Resync);
    }

    /// Applies one registry log to the cache and hands it to the watch streams.
    fn apply(&self, log: &Log) {
        let Some(event) = decode(log) else { return };
        let mut cache = self.write_cache();
        cache.generation += 1;
        match &event {
            Event::Location { id, location, epoch } => {
                cache.remember(*id, location);
                if let Some(entry) = cache.entry_mut(id)
                    && *epoch >= entry.resolved.epoch
                {
                    entry.resolved.location.clone_from(location);
                    entry.resolved.epoch = *epoch;
                }
            }
            Event::State { id, state } => {
                if let Some(entry) = cache.entry_mut(id) {
                    entry.resolved.state = *state;
                }
            }
            Event::Invalidate { id } => {
                if let Some(name) = cache.names.get(id).cloned() {
                    cache.by_name.remove(&name);
                }
            }
            Event::Resync => {}
        }
        drop(cache);
        let _ = self.events.send(event);
    }

    fn filter(&self) -> Filter {
        Filter::new().address(self.registry.address()).event_signature(vec![
            NewLocation::SIGNATURE_HASH,
            StateChanged::SIGNATURE_HASH,
            LocationReset::SIGNATURE_HASH,
        ])
    }
}

/// The cache-relevant meaning of a registry log; `None` for a log that does not decode (it
/// cannot come from the registry, so it is ignored with a warning).
fn decode(log: &Log) -> Option<Event> {
    let topic = log.topic0()?;
    let event = if *topic == NewLocation::SIGNATURE_HASH {
        let decoded = log.log_decode::<NewLocation>();
        decoded.map(|l| Event::Location { id: l.inner.id, location: l.inner.data.location, epoch: l.inner.data.epoch })
    } else if *topic == LocationReset::SIGNATURE_HASH {
        // The manager set the epoch outright, possibly lower: whatever is cached is wrong,
        // and a lower epoch would be refused as stale, so ask the chain again.
        return match log.log_decode::<LocationReset>() {
            Ok(l) => Some(Event::Invalidate { id: l.inner.id }),
            Err(e) => {
                tracing::warn!("ignoring a LocationReset log that does not decode: {e}");
                None
            }
        };
    } else if *topic == StateChanged::SIGNATURE_HASH {
        match log.log_decode::<StateChanged>() {
            Ok(l) => match ServiceState::try_from(l.inner.data.state) {
                Ok(state) => Ok(Event::State { id: l.inner.id, state }),
                Err(e) => {
                    tracing::warn!("ignoring a StateChanged log with a bad state: {e}");
                    return None;
                }
            },
            Err(e) => Err(e),
        }
    } else {
        return None;
    };
    match event {
        Ok(Event::Location { id, .. } | Event::State { id, .. }) if log.removed => Some(Event::Invalidate { id }),
        Ok(event) => Some(event),
        Err(e) => {
            tracing::warn!("ignoring a registry log that does not decode: {e}");
            None
        }
    }
}

/// The watcher: follows the registry's events for as long as the resolver lives.
async fn watch_registry(shared: Arc<Shared>) {
    if shared.registry.chain().is_pubsub() {
        subscribe_loop(&shared).await;
    } else {
        poll_loop(&shared).await;
    }
}

/// Follows the registry's logs through a subscription. The WebSocket transport reconnects
/// and re-subscribes on its own after a dropped connection, silently losing the events in
/// between, so the loop also follows new block headers: a gap in their numbers means the
/// connection was down, and the cache is dropped (a resync) rather than trusted.
async fn subscribe_loop(shared: &Shared) {
    let provider = shared.registry.chain().provider().clone();
    let mut retry = Backoff::new(Duration::from_millis(100), shared.config.max_retry_interval);
    loop {
        let subscribing = async {
            let (logs, heads) = (provider.subscribe_logs(&shared.filter()), provider.subscribe_blocks());
            futures::try_join!(logs.into_future(), heads.into_future())
        };
        match tokio::time::timeout(shared.config.timeouts.rpc, subscribing).await {
            Ok(Ok((logs, heads))) => {
                retry.reset();
                shared.set_live(true);
                let (mut logs, mut heads) = (logs.into_stream(), heads.into_stream());
                let mut tracker = HeadTracker::default();
                loop {
                    tokio::select! {
                        log = logs.next() => match log {
                            Some(log) => shared.apply(&log),
                            None => break,
                        },
                        head = heads.next() => match head {
                            Some(head) => {
                                if tracker.observe(head.number) {
                                    tracing::warn!(block = head.number, "blocks were missed (the connection dropped?): resolving afresh");
                                    shared.resync();
                                }
                            }
                            None => break,
                        },
                    }
                }
                tracing::warn!("the registry subscription ended; subscribing again");
            }
            Ok(Err(e)) => tracing::warn!("could not subscribe to the registry's logs: {e}"),
            Err(_) => tracing::warn!("subscribing to the registry's logs timed out"),
        }
        shared.set_live(false);
        tokio::time::sleep(retry.next_delay()).await;
    }
}

/// Notices gaps in a sequence of block numbers.
#[derive(Debug, Default)]
struct HeadTracker {
    last: Option<u64>,
}

impl HeadTracker {
    /// Records block `number`; true when blocks between the last one seen and it were missed.
    fn observe(&mut self, number: u64) -> bool {
        let gap = self.last.is_some_and(|last| number > last + 1);
        self.last = Some(self.last.map_or(number, |last| last.max(number)));
        gap
    }
}

async fn poll_loop(shared: &Shared) {
    let provider = shared.registry.chain().provider().clone();
    let rpc = shared.config.timeouts.rpc;
    let mut retry = Backoff::new(shared.config.poll_interval, shared.config.max_retry_interval);
    let mut cursor: Option<u64> = None;
    loop {
        let polled = async {
            let head =
                tokio::time::timeout(rpc, provider.get_block_number()).await.map_err(|_| "timed out".to_owned())?;
            let head = head.map_err(|e| e.to_string())?;
            let Some(from) = cursor.map(|c| c + 1) else {
                // First poll: events from here on; the cache starts empty.
                return Ok(head);
            };
            if head >= from {
                let filter = shared.filter().from_block(from).to_block(head);
                let logs =
                    tokio::time::timeout(rpc, provider.get_logs(&filter)).await.map_err(|_| "timed out".to_owned())?;
                for log in logs.map_err(|e| e.to_string())? {
                    shared.apply(&log);
                }
            }
            Ok::<_, String>(head.max(from.saturating_sub(1)))
        };
        match polled.await {
            Ok(head) => {
                cursor = Some(head);
                retry.reset();
                shared.set_live(true);
                tokio::time::sleep(shared.config.poll_interval).await;
            }
            Err(e) => {
                tracing::warn!("polling the registry's logs failed: {e}");
                shared.set_live(false);
                tokio::time::sleep(retry.next_delay()).await;
            }
        }
    }
}

/// Exponential backoff between `first` and `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) const fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, next: first }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub(crate) const fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_tracker_flags_only_gaps() {
        let mut tracker = HeadTracker::default();
        assert!(!tracker.observe(10), "the first head is no gap");
        assert!(!tracker.observe(11));
        assert!(!tracker.observe(11), "a repeated head is no gap");
        assert!(!tracker.observe(9), "an older head (reorg) is no gap");
        assert!(tracker.observe(14), "12 and 13 were missed");
        assert!(!tracker.observe(15));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [10, 20, 35, 35]);
        backoff.reset();
        assert_eq!(backoff.next_delay().as_millis(), 10);
    }
}
