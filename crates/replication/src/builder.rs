//! Declaring a replicated service (its routes, their request types, and their hooks) and
//! running it: [`Replicated`] runs the node loop and the HTTP front until shut down.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::app::{
    AppState, Apply, BoxFuture, Handler, Outcome, Reconcile, Reply, Request, Rollback, Route, Routes, StepObserver,
};
use crate::codec::check_name;
use crate::config::Config;
use crate::data::RequestKind;
use crate::data::Step;
use crate::error::{Error, Result};
use crate::outbox::{Chain, TxObserver, TxStep};
use crate::runtime::{Parts, Runtime};
use crate::status::Status;
use tokio::sync::watch;
use tracing::info;

/// Headers that carry credentials: never logged.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// Builds a [`Replicated`] service; see [`Replicated::builder`].
pub struct Builder<S> {
    config: Config,
    routes: HashMap<(String, String), Route<S>>,
    problems: Vec<String>,
    observer: Option<StepObserver>,
    tx_observer: Option<TxObserver>,
}

impl<S: AppState> Builder<S> {
    pub(crate) fn new(config: Config) -> Self {
        Self { config, routes: HashMap::new(), problems: Vec::new(), observer: None, tx_observer: None }
    }

    fn add<F, Fut>(mut self, kind: RequestKind, method: &str, path: &str, handler: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let method = method.to_ascii_uppercase();
        if !path.starts_with('/') || path.starts_with("/br2k/") || path == "/metrics" || path.contains('?') {
            self.problems.push(format!(
                "route path {path:?} must start with '/', have no query and not be /metrics or under /br2k/ \
                     (the runtime serves those)"
            ));
        }
        let handler: Handler<S> = Arc::new(move |state, request| Box::pin(handler(state, request)));
        let route = Route {
            kind,
            handler,
            rollback: None,
            reconcile: None,
            admission: None,
            authentication: None,
            replayable: false,
            apply: None,
        };
        if self.routes.insert((method.clone(), path.to_owned()), route).is_some() {
            self.problems.push(format!("route {method} {path} is declared twice"));
        }
        self
    }

    /// A Replication route: every replica executes it, in log order.
    #[must_use]
    pub fn replicate<F, Fut>(self, method: &str, path: &str, handler: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.add(RequestKind::Replication, method, path, handler)
    }

    /// A Normal route: only the leader that processes it executes it, once. Its handler
    /// must not change the replicated state (followers never run it); it is for effects
    /// outside the service, such as sending a transaction.
    #[must_use]
    pub fn only_once<F, Fut>(self, method: &str, path: &str, handler: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.add(RequestKind::Normal, method, path, handler)
    }

    /// A Normal route whose only effects outside the service are blockchain transactions
    /// sent through the request's outbox ([`Request::outbox`]; give the runtime one with
    /// [`Config::outbox`]). Only the leader runs it, and a request it leaves in doubt (a
    /// leader that died while it ran, a chain that did not answer) is finished by running
    /// it again: the outbox hands back the transactions it stored, so nothing is sent
    /// twice. Like a Replication handler it must be deterministic: the same request must
    /// send the same transactions in the same order.
    #[must_use]
    pub fn only_once_tx<F, Fut>(self, method: &str, path: &str, handler: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let key = (method.to_ascii_uppercase(), path.to_owned());
        let mut this = self.add(RequestKind::Normal, method, path, handler);
        if let Some(route) = this.routes.get_mut(&key) {
            route.replayable = true;
        }
        if this.config.outbox.is_none() {
            this.problems
                .push(format!("route {method} {path} sends transactions: give the runtime an outbox (Config::outbox)"));
        }
        this
    }

    /// Gives an [`only_once_tx`](Self::only_once_tx) or External_TXN route an effect on
    /// the replicated state: once the leader has recorded a request's Success (the
    /// payment mined, the client's transaction verified), every replica calls `apply`
    /// with the request and the recorded answer, in log order like a Replication handler
    /// (so, like one, it must be deterministic, and must advance
    /// [`AppState::applied_index`] with its effect). It cannot refuse (the leader decided);
    /// an `Err` is a local fault: the replica stops at the request and applies it again
    /// once it can, as with a handler's [`crate::Failure::Fault`]. A request left in doubt holds back
    /// the requests after it until the outbox settles it: the replicas never apply a
    /// payment's effect out of order.
    #[must_use]
    pub fn apply<F, Fut>(mut self, method: &str, path: &str, apply: F) -> Self
    where
        F: Fn(Arc<S>, Request, Reply) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let apply: Apply<S> = Arc::new(move |state, request, reply| Box::pin(apply(state, request, reply)));
        match self.routes.get_mut(&(method.to_ascii_uppercase(), path.to_owned())) {
            Some(route) if route.replayable || route.kind == RequestKind::ExternalTxn => route.apply = Some(apply),
            Some(_) => self.problems.push(format!(
                "apply for {method} {path}: only only_once_tx and External_TXN routes have effects applied from their record"
            )),
            None => self.problems.push(format!("apply for {method} {path}: declare the route first")),
        }
        self
    }

    /// An External_TXN route: the request records a transaction the client made itself.
    /// It is logged and answered by `handler` on the leader (which validates it and
    /// builds the answer, without side effects); no replica executes it.
    #[must_use]
    pub fn external_txn<F, Fut>(self, method: &str, path: &str, handler: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.add(RequestKind::ExternalTxn, method, path, handler)
    }

    /// A read route: answered by a confirmed leader from its state, not logged.
    #[must_use]
    pub fn read<F, Fut>(self, method: &str, path: &str, handler: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        self.add(RequestKind::Read, method, path, handler)
    }

    /// Gives a declared Replication or Normal route a rollback: it undoes whatever part
    /// of the request's effect an interrupted execution left (the paper's Check for
    /// pending process, and a handler that faulted), and must be harmless when there is
    /// nothing to undo. An `Err` is a local fault: the replica retries before going on.
    #[must_use]
    pub fn rollback<F, Fut>(mut self, method: &str, path: &str, rollback: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::io::Result<()>> + Send + 'static,
    {
        let rollback: Rollback<S> = Arc::new(move |state, request| Box::pin(rollback(state, request)));
        match self.routes.get_mut(&(method.to_ascii_uppercase(), path.to_owned())) {
            Some(route) if matches!(route.kind, RequestKind::Replication | RequestKind::Normal) => {
                route.rollback = Some(rollback);
            }
            Some(_) => {
                self.problems.push(format!("rollback for {method} {path}: only Replication and Normal routes execute"));
            }
            None => self.problems.push(format!("rollback for {method} {path}: declare the route first")),
        }
        self
    }

    /// Gives a declared Normal route a reconcile hook: for a request a dead leader left
    /// InProcess (in doubt), it finds out what happened (for a blockchain transaction:
    /// look it up on chain) and answers the outcome, or `None` if it still cannot tell.
    #[must_use]
    pub fn reconcile<F, Fut>(mut self, method: &str, path: &str, reconcile: F) -> Self
    where
        F: Fn(Arc<S>, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<Outcome>> + Send + 'static,
    {
        let reconcile: Reconcile<S> = Arc::new(move |state, request| Box::pin(reconcile(state, request)));
        match self.routes.get_mut(&(method.to_ascii_uppercase(), path.to_owned())) {
            Some(route) if route.kind == RequestKind::Normal => route.reconcile = Some(reconcile),
            Some(_) => self.problems.push(format!("reconcile for {method} {path}: only Normal routes can be in doubt")),
            None => self.problems.push(format!("reconcile for {method} {path}: declare the route first")),
        }
        self
    }

    /// Gives a declared route a check of the request's head (its method, path, query and
    /// every header; the body is empty when it runs), run on the leader before the body
    /// is read: where credentials are checked ([`crate::bearer_token`]), so that a client
    /// without them cannot make a replica hold its body (up to `max_body` per connection).
    /// Its refusal is answered at once; the admission check ([`Self::admit`]) runs after it,
    /// with the body.
    #[must_use]
    pub fn authenticate<F>(mut self, method: &str, path: &str, check: F) -> Self
    where
        F: Fn(&Request) -> Result<(), Reply> + Send + Sync + 'static,
    {
        match self.routes.get_mut(&(method.to_ascii_uppercase(), path.to_owned())) {
            Some(route) => route.authentication = Some(Arc::new(check)),
            None => self.problems.push(format!("authentication for {method} {path}: declare the route first")),
        }
        self
    }

    /// Gives a declared route an admission check, run on the leader before the request is
    /// logged: a request it refuses is answered with its reply and never stored, executed
    /// or counted. It sees every header the client sent (handlers see only the kept ones),
    /// so it is where a route checks credentials ([`crate::bearer_token`]) or validates a
    /// body, without the check's input ending up in etcd. Keep it quick and free of side
    /// effects: it runs on every request, before the request has an index.
    #[must_use]
    pub fn admit<F>(mut self, method: &str, path: &str, check: F) -> Self
    where
        F: Fn(&Request) -> Result<(), Reply> + Send + Sync + 'static,
    {
        match self.routes.get_mut(&(method.to_ascii_uppercase(), path.to_owned())) {
            Some(route) => route.admission = Some(Arc::new(check)),
            None => self.problems.push(format!("admission for {method} {path}: declare the route first")),
        }
        self
    }

    /// Awaits `observer` at each [`Step`] of Process Request, with the entry's index.
    /// For tracing, and for tests that interrupt a leader at an exact point.
    #[must_use]
    pub fn on_step<F, Fut>(mut self, observer: F) -> Self
    where
        F: Fn(Step, u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let observer: StepObserver = Arc::new(move |step, index| -> BoxFuture<()> { Box::pin(observer(step, index)) });
        self.observer = Some(observer);
        self
    }

    /// Awaits `observer` at each [`TxStep`] of an outbox send, with the request's index.
    /// For tests that interrupt a leader at an exact point.
    #[must_use]
    pub fn on_tx_step<F, Fut>(mut self, observer: F) -> Self
    where
        F: Fn(TxStep, u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let observer: TxObserver = Arc::new(move |step, index| -> BoxFuture<()> { Box::pin(observer(step, index)) });
        self.tx_observer = Some(observer);
        self
    }

    /// Checks the declarations and the configuration.
    ///
    /// # Errors
    /// [`Error::Config`] listing every problem found.
    pub fn build(self, state: S) -> Result<Replicated<S>> {
        let mut problems = self.problems;
        for (what, name) in [("service", &self.config.service), ("replica", &self.config.replica)] {
            if let Err(e) = check_name(what, name) {
                problems.push(e.to_string().trim_start_matches("invalid configuration: ").to_owned());
            }
        }
        if !(self.config.public_url.starts_with("http://") || self.config.public_url.starts_with("https://")) {
            problems.push(format!("public URL {:?} must start with http:// or https://", self.config.public_url));
        }
        if !self.config.etcd_endpoint.starts_with("http://") && !self.config.etcd_endpoint.starts_with("https://") {
            problems.push(format!("etcd endpoint {:?} must start with http:// or https://", self.config.etcd_endpoint));
        }
        if let Some(backup) = &self.config.backup {
            if self.config.publisher.is_none() {
                problems.push(
                    "backups are recorded on chain: give the replica a registry to publish with (a Publisher)".into(),
                );
            }
            if backup.interval < Duration::from_secs(1) {
                problems.push(format!("the backup interval {:?} must be at least 1 s", backup.interval));
            }
        }
        if let Err(limits) = self.config.limits.check() {
            problems.extend(limits);
        }
        for header in &self.config.kept_headers {
            if CREDENTIAL_HEADERS.iter().any(|c| c.eq_ignore_ascii_case(header)) {
                problems.push(format!(
                    "header {header:?} carries credentials and cannot be kept: logged requests stay in etcd and in \
                     every replica's state; check it in an admission hook (Builder::admit) instead"
                ));
            }
        }
        if let Err(problem) = self.config.snapshots.check() {
            problems.push(problem);
        }
        if self.config.timings.member_ttl < Duration::from_secs(2) {
            problems.push(format!(
                "member TTL {:?} must be at least 2 s (etcd leases are granted in whole seconds)",
                self.config.timings.member_ttl
            ));
        }
        if self.routes.is_empty() {
            problems.push("no routes declared".into());
        }
        let outbox_keys = crate::data::Keys::new(&self.config.service).outbox();
        let chain = match self.config.outbox.clone().map(|outbox| Chain::new(outbox, outbox_keys, self.tx_observer)) {
            Some(Ok(chain)) => Some(Arc::new(chain)),
            Some(Err(problem)) => {
                problems.push(problem);
                None
            }
            None => None,
        };
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("; ")));
        }
        Ok(Replicated { parts: Parts::new(self.config, state, Routes { by_key: self.routes }, self.observer, chain) })
    }
}

/// A replicated service, ready to serve. Built with [`Replicated::builder`].
pub struct Replicated<S> {
    parts: Parts<S>,
}

impl<S: AppState> Replicated<S> {
    /// Starts declaring a service for `config`.
    pub fn builder(config: Config) -> crate::Builder<S> {
        crate::Builder::new(config)
    }

    /// The app state.
    pub fn state(&self) -> Arc<S> {
        self.parts.state.clone()
    }

    /// This replica's current status.
    pub fn status(&self) -> Status {
        self.parts.current_status()
    }

    /// A receiver that sees every status change (for waiting on a role change).
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.parts.reporter.status.subscribe()
    }

    /// Runs the replica until `shutdown` completes: the HTTP front on the configured
    /// address and the role loop on the local etcd member. A leader stops taking requests,
    /// and requests in flight are answered 503 (clients retry elsewhere with their
    /// idempotency key).
    ///
    /// # Errors
    /// [`Error::Listen`] if the address cannot be bound; [`Error::RecordFile`] if the data
    /// directory cannot be used. An unreachable etcd is not an error: the replica waits
    /// for it, reporting unhealthy.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let runtime = Arc::new(Runtime::open(self.parts).await?);
        let listener = tokio::net::TcpListener::bind(runtime.config.listen)
            .await
            .map_err(|source| Error::Listen { addr: runtime.config.listen, source })?;
        info!(service = %runtime.config.service, replica = %runtime.config.replica,
            listen = %runtime.config.listen, public = %runtime.config.public_url, "replica serving as follower");

        let (stop_tx, mut stop_rx) = watch::channel(false);
        let app = crate::http::router(runtime.clone());
        let limits = runtime.config.limits;
        let mut server = crate::sync::AbortOnDrop(tokio::spawn(async move {
            let stopped = async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            };
            crate::server::serve(listener, app, limits, stopped).await;
        }));
        runtime.clone().run(shutdown).await;
        let _ = stop_tx.send(true);
        let _ = (&mut server.0).await;
        Ok(())
    }
}
