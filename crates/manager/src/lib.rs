#![doc = include_str!("../README.md")]

pub mod journal;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use alloy::primitives::Address;
use alloy::sol_types::SolEvent;
use br2k_bindings::ServiceRegistry::{Claim, ManagerTransferred, ServiceRegistered};
use br2k_bindings::ServiceState;
use br2k_deploy::backend::Backend;
use br2k_deploy::deployment::DeploymentRecord;
use br2k_resolver::{RegistryClient, Resolved, ServiceInfo, printable};
use futures::future::BoxFuture;
use tracing::{info, warn};

pub use journal::{Journal, Recovery, ServiceFailure};
pub use metrics::Metrics;

/// Why the manager could not do something.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration or arguments.
    #[error("{0}")]
    Invalid(String),
    /// The journal could not be read or written.
    #[error("manager journal {}: {reason}", path.display())]
    Journal {
        /// The file.
        path: PathBuf,
        /// What was wrong, and what to do.
        reason: String,
    },
    /// The chain or the registry failed.
    #[error(transparent)]
    Registry(#[from] br2k_resolver::Error),
    /// A backend failed (pulling, checking or starting the image).
    #[error(transparent)]
    Deploy(#[from] br2k_deploy::DeployError),
    /// A recovery step did not complete.
    #[error("{0}")]
    Recovery(String),
}

/// Finds the backend a context names.
pub trait Backends: Send + Sync {
    /// The backend for `context` (`local`, or a Kubernetes context).
    fn backend<'a>(&'a self, context: &'a str) -> BoxFuture<'a, Result<Arc<dyn Backend>, Error>>;
}

/// How the manager behaves.
#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Where the journal lives.
    pub state_dir: PathBuf,
    /// The services to look after; empty: every service this key manages.
    pub services: Vec<String>,
    /// How often to read new blocks.
    pub poll_interval: Duration,
    /// How often to probe each service on its own; `None`: only on claims.
    pub probe_interval: Option<Duration>,
    /// How long replicas may run without a leader answering before they count as dead.
    pub grace: Duration,
    /// How long a redeployed service may take to publish a new location that answers.
    pub recovery_timeout: Duration,
    /// Bound on one health request.
    pub health_timeout: Duration,
    /// Where a manager without a journal starts reading [default: the registry's
    /// deployment block].
    pub from_block: Option<u64>,
    /// The most blocks read in one request.
    pub max_block_range: u64,
}

impl ManagerConfig {
    /// The defaults, with the journal in `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            services: Vec::new(),
            poll_interval: Duration::from_secs(1),
            probe_interval: Some(Duration::from_secs(15)),
            grace: Duration::from_secs(30),
            recovery_timeout: Duration::from_secs(120),
            health_timeout: Duration::from_secs(2),
            from_block: None,
            max_block_range: 2_000,
        }
    }
}

/// What a check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It answers.
    Healthy(String),
    /// It does not answer yet, but its replicas run: a leader is being elected or
    /// published. Checked again later.
    Waiting(String),
    /// Nothing serves it: recover.
    Dead(String),
    /// Not the manager's to recover (stopped, not deployed, another manager).
    Ignored(String),
}

/// The daemon. [`Manager::run`] loops; [`Manager::step`] is one round of it.
pub struct Manager<B: Backends> {
    config: ManagerConfig,
    registry: RegistryClient,
    me: Address,
    backends: B,
    journal: Journal,
    metrics: Metrics,
    http: reqwest::Client,
    next_probe: HashMap<String, Instant>,
    unsettled_since: HashMap<String, Instant>,
    next_attempt: HashMap<String, Instant>,
}

impl<B: Backends> Manager<B> {
    /// Opens the journal in the state directory (or starts one) and checks the named
    /// services.
    ///
    /// # Errors
    /// No signing key, a journal of another registry, a named service that is not
    /// registered or that another key manages, an unreachable chain.
    pub async fn open(
        config: ManagerConfig,
        registry: RegistryClient,
        backends: B,
        metrics: Metrics,
    ) -> Result<Self, Error> {
        let me = registry.chain().sender().ok_or_else(|| {
            Error::Invalid("the manager needs the services' manager key (ETH_PRIVATE_KEY or --keystore)".into())
        })?;
        std::fs::create_dir_all(&config.state_dir).map_err(|e| Error::Journal {
            path: config.state_dir.clone(),
            reason: format!("cannot create the state directory: {e}"),
        })?;
        let chain_id = registry.chain().chain_id();
        let journal = match Journal::load(&config.state_dir)? {
            Some(journal) => {
                journal.check_belongs(&config.state_dir, chain_id, registry.address())?;
                journal
            }
            None => Journal::new(chain_id, registry.address(), config.from_block.unwrap_or(registry.first_block())),
        };
        let http = reqwest::Client::builder()
            .timeout(config.health_timeout)
            .connect_timeout(config.health_timeout)
            .no_proxy()
            .build()
            .map_err(|e| Error::Invalid(format!("cannot build an HTTP client: {e}")))?;
        let mut manager = Self {
            config,
            registry,
            me,
            backends,
            journal,
            metrics,
            http,
            next_probe: HashMap::new(),
            unsettled_since: HashMap::new(),
            next_attempt: HashMap::new(),
        };
        for name in manager.config.services.clone() {
            let info = manager.registry.info(&name).await?;
            if info.manager != me {
                return Err(Error::Invalid(format!(
                    "{name:?} is managed by {}, not by this key ({me}); run the manager with that key",
                    info.manager
                )));
            }
            manager.journal.services.insert(info.id, name);
        }
        // Services that failed before a restart are checked again at once.
        for name in manager.journal.failures.keys() {
            manager.next_probe.insert(name.clone(), Instant::now());
        }
        manager.journal.save(&manager.config.state_dir)?;
        manager.metrics.cursor(manager.journal.next_block);
        Ok(manager)
    }

    /// The journal as it stands.
    pub const fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The manager's key.
    pub const fn address(&self) -> Address {
        self.me
    }

    /// Runs until `shutdown` completes. A round that fails (the chain unreachable, say)
    /// is logged and tried again; nothing is lost, as the cursor only advances past
    /// handled blocks.
    ///
    /// # Errors
    /// Only when the journal cannot be written (continuing would lose track of work).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        info!(
            manager = %self.me,
            registry = %self.registry.address(),
            from_block = self.journal.next_block,
            "manager started; {}",
            if self.config.services.is_empty() {
                "looking after every service this key manages".to_owned()
            } else {
                format!("looking after {}", self.config.services.join(", "))
            }
        );
        for (name, recovery) in &self.journal.recoveries {
            info!(service = %name, "resuming the recovery that began for: {}", printable(&recovery.reason));
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                result = self.step() => match result {
                    Ok(()) => {}
                    Err(e @ Error::Journal { .. }) => return Err(e),
                    Err(e) => warn!("this round failed and will be tried again: {e}"),
                },
                () = &mut shutdown => break,
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.poll_interval) => {}
                () = &mut shutdown => break,
            }
        }
        info!("manager stopped at block {}", self.journal.next_block);
        Ok(())
    }

    /// One round: resumes recoveries that are due, handles the claims in new blocks, and
    /// probes the services that are due.
    ///
    /// # Errors
    /// The chain unreachable, or the journal not writable.
    pub async fn step(&mut self) -> Result<(), Error> {
        self.resume_due().await?;
        self.read_events().await?;
        self.probe_due().await
    }

    async fn resume_due(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let due: Vec<String> = self
            .journal
            .recoveries
            .keys()
            .filter(|name| self.next_attempt.get(*name).is_none_or(|at| *at <= now))
            .cloned()
            .collect();
        for name in due {
            self.drive(&name).await?;
        }
        Ok(())
    }

    async fn read_events(&mut self) -> Result<(), Error> {
        let latest = self.registry.chain().block_number().await?;
        let from = self.journal.next_block;
        if latest < from {
            return Ok(());
        }
        let to = latest.min(from.saturating_add(self.config.max_block_range - 1));
        let signatures =
            vec![Claim::SIGNATURE_HASH, ServiceRegistered::SIGNATURE_HASH, ManagerTransferred::SIGNATURE_HASH];
        let logs = self.registry.logs(signatures, from, to).await?;
        let mut claims: BTreeMap<String, Vec<(Address, String)>> = BTreeMap::new();
        let following_all = self.config.services.is_empty();
        for log in &logs {
            match log.topic0() {
                // Only services this key manages are followed: anyone can register a
                // service, and following them all would let strangers load the manager.
                Some(topic) if *topic == ServiceRegistered::SIGNATURE_HASH => {
                    match log.log_decode::<ServiceRegistered>() {
                        Ok(event) if following_all && event.inner.data.manager == self.me => {
                            self.journal.services.insert(event.inner.id, event.inner.data.name.clone());
                        }
                        Ok(_) => {}
                        Err(e) => warn!("ignoring a ServiceRegistered log that does not decode: {e}"),
                    }
                }
                Some(topic) if *topic == ManagerTransferred::SIGNATURE_HASH => {
                    match log.log_decode::<ManagerTransferred>() {
                        Ok(event) if following_all => self.transferred(event.inner.id, &event.inner.data).await?,
                        Ok(_) => {}
                        Err(e) => warn!("ignoring a ManagerTransferred log that does not decode: {e}"),
                    }
                }
                Some(topic) if *topic == Claim::SIGNATURE_HASH => match log.log_decode::<Claim>() {
                    Ok(event) => {
                        if let Some(name) = self.journal.services.get(&event.inner.id) {
                            let claim = &event.inner.data;
                            claims.entry(name.clone()).or_default().push((claim.claimant, claim.reason.clone()));
                        }
                    }
                    Err(e) => warn!("ignoring a Claim log that does not decode: {e}"),
                },
                _ => {}
            }
        }
        for (name, list) in claims {
            // One service's failure (its backend down, say) must not hold the cursor, and
            // with it every other service's claims: it is recorded, and the service is
            // checked again on its own until a check passes.
            let result = self.handle_claims(&name, &list).await;
            self.settle(&name, result)?;
        }
        self.journal.next_block = to + 1;
        self.journal.save(&self.config.state_dir)?;
        self.metrics.cursor(self.journal.next_block);
        Ok(())
    }

    /// A `ManagerTransferred` event: a service handed to this key is followed from now on,
    /// one handed away is not.
    async fn transferred(&mut self, id: alloy::primitives::B256, event: &ManagerTransferred) -> Result<(), Error> {
        if event.to == self.me {
            if let Some(name) = self.registry.service_name(id).await? {
                info!(service = %name, from = %event.from, "this key now manages the service: following it");
                self.journal.services.insert(id, name);
            }
        } else if event.from == self.me
            && let Some(name) = self.journal.services.remove(&id)
        {
            info!(service = %name, to = %event.to, "the service was handed to another manager: no longer following it");
            self.journal.failures.remove(&name);
        }
        Ok(())
    }

    /// Records how checking or acting on `name` went. A failure is kept in the journal
    /// (with how many in a row), logged, and the service is checked again after a pause
    /// that grows with the failures; only the journal's own failure is returned.
    fn settle(&mut self, name: &str, result: Result<(), Error>) -> Result<(), Error> {
        match result {
            Ok(()) => {
                if self.journal.failures.remove(name).is_some() {
                    info!(service = %name, "checks pass again");
                    self.journal.save(&self.config.state_dir)?;
                }
                Ok(())
            }
            Err(e @ Error::Journal { .. }) => Err(e),
            Err(e) => {
                let failure = self.journal.failures.entry(name.to_owned()).or_insert_with(|| ServiceFailure {
                    count: 0,
                    since_ms: unix_ms(),
                    last_error: String::new(),
                });
                failure.count += 1;
                failure.last_error = e.to_string();
                let pause = Duration::from_secs(2 << failure.count.min(7)).min(Duration::from_secs(300));
                warn!(service = %name, failures = failure.count, "could not check the service: {e}; checking it again in {pause:?}");
                self.metrics.probed(name, "failed");
                self.next_probe.insert(name.to_owned(), Instant::now() + pause);
                self.journal.save(&self.config.state_dir)
            }
        }
    }

    async fn handle_claims(&mut self, name: &str, claims: &[(Address, String)]) -> Result<(), Error> {
        let info = self.registry.info(name).await?;
        if info.manager != self.me {
            return Ok(()); // another manager's service
        }
        for (claimant, reason) in claims {
            self.metrics.claim_seen(name);
            info!(service = %name, %claimant, "claim: {}", printable(reason));
        }
        if self.journal.recoveries.contains_key(name) {
            for _ in claims {
                self.metrics.claim_dropped(name, "recovering");
            }
            info!(service = %name, "claim dropped: a recovery is already under way");
            return Ok(());
        }
        let verdict = self.assess(&info).await?;
        let (dropped, why) = match &verdict {
            Verdict::Healthy(why) => ("healthy", why),
            Verdict::Waiting(why) => ("waiting", why),
            Verdict::Ignored(why) => ("ignored", why),
            Verdict::Dead(why) => {
                let reason = format!("{} claim(s), last: {}; {why}", claims.len(), claims.last().map_or("", |c| &c.1));
                return self.recover(&info, reason).await;
            }
        };
        for _ in claims {
            self.metrics.claim_dropped(name, dropped);
        }
        info!(service = %name, "claim dropped: {why}");
        if matches!(verdict, Verdict::Waiting(_)) {
            // Look again soon even when probes are off: a grace period is running.
            self.next_probe.insert(name.to_owned(), Instant::now() + Duration::from_secs(2));
        }
        Ok(())
    }

    async fn probe_due(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        let names: Vec<String> = self.journal.services.values().cloned().collect();
        for name in names {
            if self.journal.recoveries.contains_key(&name) {
                continue;
            }
            let due = match (self.next_probe.get(&name), self.config.probe_interval) {
                (Some(at), _) => *at <= now,
                (None, Some(_)) => true,
                (None, None) => false,
            };
            if !due {
                continue;
            }
            self.next_probe.remove(&name);
            if let Some(every) = self.config.probe_interval {
                self.next_probe.insert(name.clone(), now + every);
            }
            let result = self.probe(&name, now).await;
            self.settle(&name, result)?;
        }
        Ok(())
    }

    async fn probe(&mut self, name: &str, now: Instant) -> Result<(), Error> {
        let info = self.registry.info(name).await?;
        if info.manager != self.me {
            // Handed away while this manager was not looking (or named by an old journal).
            info!(service = %name, manager = %info.manager, "not managed by this key: no longer following it");
            self.journal.services.retain(|_, n| n != name);
            self.journal.failures.remove(name);
            return Ok(());
        }
        match self.assess(&info).await? {
            Verdict::Healthy(_) => {
                self.metrics.probed(name, "healthy");
                self.finish_membership_change(name, &info).await;
            }
            Verdict::Ignored(_) => {}
            Verdict::Waiting(why) => {
                self.metrics.probed(name, "waiting");
                info!(service = %name, "probe: not answering yet: {why}");
                self.next_probe.insert(name.to_owned(), now + Duration::from_secs(2));
            }
            Verdict::Dead(why) => {
                self.metrics.probed(name, "dead");
                self.recover(&info, format!("probe: {why}")).await?;
            }
        }
        Ok(())
    }

    /// Finishes a membership change of a serving service that its command left half
    /// done (the journal in the service's etcd says so, and nobody holds its lock). A
    /// failure is logged and tried again at the next probe: the service serves meanwhile.
    async fn finish_membership_change(&self, name: &str, info: &ServiceInfo) {
        let Ok(record) = DeploymentRecord::from_body(&info.recovery) else { return };
        let backend = match self.backends.backend(&record.context).await {
            Ok(backend) => backend,
            Err(e) => return warn!(service = %name, "cannot look for an unfinished membership change: {e}"),
        };
        let service = name.to_owned();
        let progress = move |line: &str| info!(service = %service, "membership: {line}");
        match backend.finish_membership_change(name, &progress).await {
            Ok(None) => {}
            Ok(Some(done)) => {
                self.metrics.membership_change(name, "finished");
                info!(service = %name, "membership change left half done: {done}");
            }
            Err(e) => {
                self.metrics.membership_change(name, "failed");
                warn!(service = %name, "could not finish a membership change left half done (trying again at the next probe): {e}");
            }
        }
    }

    /// Checks a service: its location's health, then the backend's view of the replicas.
    ///
    /// # Errors
    /// When the backend cannot be asked.
    pub async fn assess(&mut self, info: &ServiceInfo) -> Result<Verdict, Error> {
        let name = &info.name;
        if info.state == ServiceState::Stopped {
            return Ok(Verdict::Ignored("its state is Stopped".into()));
        }
        let unanswered = if info.location.is_empty() {
            "no location is published".to_owned()
        } else {
            match self.health(&info.location).await {
                Ok(()) => {
                    self.unsettled_since.remove(name);
                    return Ok(Verdict::Healthy(format!("it answers at {} (epoch {})", info.location, info.epoch)));
                }
                Err(why) => why,
            }
        };
        let record = match DeploymentRecord::from_body(&info.recovery) {
            Ok(record) => record,
            Err(e) => return Ok(Verdict::Ignored(format!("{unanswered}, and there is nothing to redeploy: {e}"))),
        };
        let backend = self.backends.backend(&record.context).await?;
        let views = backend.replicas(name).await?;
        let running = views.iter().filter(|v| v.running).count();
        if running == 0 {
            self.unsettled_since.remove(name);
            let detail = views.iter().find_map(|v| v.detail.clone()).unwrap_or_else(|| "none deployed".into());
            return Ok(Verdict::Dead(format!("{unanswered}; no replica runs on {} ({detail})", record.context)));
        }
        let since = *self.unsettled_since.entry(name.clone()).or_insert_with(Instant::now);
        let what = match views.iter().find(|v| v.leads()) {
            Some(leader) => format!("{} leads but its location is not published or does not answer", leader.name),
            None => format!("{running} of {} replicas run, none leads", views.len()),
        };
        if since.elapsed() >= self.config.grace {
            self.unsettled_since.remove(name);
            return Ok(Verdict::Dead(format!("{unanswered}; {what}, for over {:?}", self.config.grace)));
        }
        Ok(Verdict::Waiting(format!("{unanswered}; {what} (waiting up to {:?})", self.config.grace)))
    }

    async fn health(&self, location: &str) -> Result<(), String> {
        let url = format!("{}/br2k/health", location.trim_end_matches('/'));
        match self.http.get(&url).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(format!("{url} answered {}", response.status())),
            Err(e) if e.is_timeout() => Err(format!("{url} did not answer within {:?}", self.config.health_timeout)),
            Err(e) if e.is_connect() => Err(format!("{url} refused or unreachable")),
            Err(e) => Err(format!("{url}: {e}")),
        }
    }

    async fn recover(&mut self, info: &ServiceInfo, reason: String) -> Result<(), Error> {
        let name = info.name.clone();
        info!(service = %name, "recovering: {}", printable(&reason));
        let recovery = Recovery {
            from_epoch: info.epoch,
            reason,
            started_ms: unix_ms(),
            deploy_started: false,
            attempts: 0,
            last_error: None,
        };
        // Journaled before the first step: a manager that dies from here on resumes it.
        self.journal.recoveries.insert(name.clone(), recovery);
        self.journal.save(&self.config.state_dir)?;
        self.metrics.recovery(&name, "started");
        self.drive(&name).await
    }

    /// One attempt at the recovery of `name` in the journal; a failure is recorded and
    /// retried later, never returned (except the journal's own).
    async fn drive(&mut self, name: &str) -> Result<(), Error> {
        match self.attempt(name).await {
            Ok(resolved) => {
                let Some(recovery) = self.journal.recoveries.remove(name) else { return Ok(()) };
                self.journal.save(&self.config.state_dir)?;
                let seconds = unix_ms().saturating_sub(recovery.started_ms) as f64 / 1000.0;
                self.metrics.recovery(name, "succeeded");
                self.metrics.recovery_took(seconds);
                self.next_attempt.remove(name);
                self.unsettled_since.remove(name);
                info!(
                    service = %name,
                    "recovered in {seconds:.1} s: answering at {} (epoch {}, was {}); state Running",
                    resolved.location, resolved.epoch, recovery.from_epoch
                );
                // A membership change the disaster interrupted is finished now, on the
                // shape the recovery brought back (the recorded count, the nodes kept).
                match self.registry.info(name).await {
                    Ok(info) => self.finish_membership_change(name, &info).await,
                    Err(e) => warn!(service = %name, "cannot look for an unfinished membership change: {e}"),
                }
                Ok(())
            }
            Err(e) => {
                let Some(recovery) = self.journal.recoveries.get_mut(name) else { return Ok(()) };
                recovery.attempts += 1;
                recovery.last_error = Some(e.to_string());
                let pause = Duration::from_secs(5 << recovery.attempts.min(6)).min(Duration::from_secs(300));
                let attempts = recovery.attempts;
                self.journal.save(&self.config.state_dir)?;
                self.metrics.recovery(name, "failed");
                self.next_attempt.insert(name.to_owned(), Instant::now() + pause);
                warn!(service = %name, "recovery attempt {attempts} failed: {e}; trying again in {pause:?}");
                Ok(())
            }
        }
    }

    async fn attempt(&mut self, name: &str) -> Result<Resolved, Error> {
        let recovery = self.journal.recoveries.get(name).cloned().expect("only journaled recoveries are driven");
        let info = self.registry.info(name).await?;
        if info.manager != self.me {
            return Err(Error::Recovery(format!(
                "this key no longer manages {name:?} (its manager is {})",
                info.manager
            )));
        }
        if info.epoch > recovery.from_epoch && self.health(&info.location).await.is_ok() {
            // An earlier attempt's replicas came up meanwhile (a manager restarted mid-recovery).
            info!(service = %name, "the replicas an earlier attempt started answer at {}", info.location);
            return self.finish(name, &info).await;
        }
        if info.state != ServiceState::Recovering {
            self.registry.set_state(name, ServiceState::Recovering).await?;
            info!(service = %name, "state Recovering");
        }
        let record = DeploymentRecord::from_body(&info.recovery)?;
        let backend = self.backends.backend(&record.context).await?;
        let running = backend.replicas(name).await?.iter().any(|v| v.running);
        if recovery.deploy_started && running {
            info!(service = %name, "the replicas an earlier attempt started are still coming up; waiting for them");
        } else {
            if let Some(entry) = self.journal.recoveries.get_mut(name) {
                entry.deploy_started = true;
            }
            self.journal.save(&self.config.state_dir)?;
            info!(
                service = %name,
                "redeploying {} ({} replicas) on {} from the recovery info",
                record.image.pull_reference(),
                record.replicas,
                record.context
            );
            let service = name.to_owned();
            let deployed = backend.deploy(name, &record, &move |line| info!(service = %service, "{line}")).await?;
            info!(service = %name, "deployed {}", deployed.summary);
        }
        let resolved = self.wait_answering(name, recovery.from_epoch).await?;
        let info = self.registry.info(name).await?;
        self.finish(name, &info).await?;
        Ok(resolved)
    }

    async fn finish(&self, name: &str, info: &ServiceInfo) -> Result<Resolved, Error> {
        if info.state != ServiceState::Running {
            self.registry.set_state(name, ServiceState::Running).await?;
        }
        Ok(Resolved { location: info.location.clone(), epoch: info.epoch, state: ServiceState::Running })
    }

    /// Waits for a location with an epoch above `from_epoch` whose health answers.
    async fn wait_answering(&self, name: &str, from_epoch: u64) -> Result<Resolved, Error> {
        let deadline = Instant::now() + self.config.recovery_timeout;
        let mut last = String::from("no new location yet");
        while Instant::now() < deadline {
            match self.registry.service_location(name).await {
                Ok(resolved) if resolved.epoch > from_epoch => match self.health(&resolved.location).await {
                    Ok(()) => return Ok(resolved),
                    Err(why) => last = format!("epoch {} at {}: {why}", resolved.epoch, resolved.location),
                },
                Ok(resolved) => last = format!("the registry still holds epoch {}", resolved.epoch),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(Error::Recovery(format!(
            "no location with an epoch above {from_epoch} answered within {:?} ({last})",
            self.config.recovery_timeout
        )))
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
