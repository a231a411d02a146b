//! A real 3-member etcd cluster with one replica of a small journal app per member, and
//! (for the registry tests) a real anvil with a deployed registry.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use br2k_bindings::IServiceRegistry::Body;
use br2k_replication::backup::BackupConfig;
use br2k_replication::{
    AppState, Config, EntryState, Failure, Limits, OutboxConfig, Outcome, Publisher, Replicated, Reply, Request, Role,
    SnapshotBuilder, SnapshotPolicy, Status, Step, Timings, TxCall, TxError, TxStep,
};
use br2k_resolver::{Chain, RegistryClient, Timeouts};
use br2k_test_utils::{Anvil, EtcdCluster};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;

pub(crate) const SERVICE: &str = "journal";

/// Effects that happen outside the service (the Normal route's), shared by all replicas
/// like a real external system would be.
#[derive(Default)]
pub(crate) struct Outside {
    pub(crate) sent: Mutex<HashSet<u64>>,
    pub(crate) executions: AtomicU64,
}

/// The journal app: a list of (index, text), saved to a file on every change.
pub(crate) struct Journal {
    path: PathBuf,
    entries: Mutex<Vec<(u64, String)>>,
    outside: Arc<Outside>,
    /// While armed, `/slow` leaves a partial entry and never completes (one time).
    pub(crate) slow_armed: AtomicBool,
    pub(crate) slow_reached: Notify,
    /// How many snapshots were restored into this journal.
    pub(crate) restores: AtomicU64,
    /// While armed, the next `/append` panics here (one time).
    pub(crate) panic_armed: AtomicBool,
    /// While armed, the next `/append` never completes here (one time).
    pub(crate) hang_armed: AtomicBool,
    /// The journal's disk: how many more writes fit (`u64::MAX`: no limit). At 0 every
    /// write fails with ENOSPC, as on a full disk (the app double for tests that cannot
    /// mount a small filesystem).
    writes_left: AtomicU64,
    /// Writes refused for lack of room.
    pub(crate) refused_writes: AtomicU64,
    /// While set, `persist` fails with EIO, as an fsync on a failing disk does.
    pub(crate) fsync_fails: AtomicBool,
    /// While set, `/append` answers with this replica's own text (a handler that is not
    /// deterministic).
    pub(crate) nondeterministic: Mutex<Option<String>>,
}

impl Journal {
    pub(crate) fn open(dir: &std::path::Path, outside: Arc<Outside>) -> Self {
        let path = dir.join("journal.json");
        let entries = std::fs::read(&path).map(|b| serde_json::from_slice(&b).unwrap()).unwrap_or_default();
        Self {
            path,
            entries: Mutex::new(entries),
            outside,
            slow_armed: AtomicBool::new(false),
            slow_reached: Notify::new(),
            restores: AtomicU64::new(0),
            panic_armed: AtomicBool::new(false),
            hang_armed: AtomicBool::new(false),
            writes_left: AtomicU64::new(u64::MAX),
            refused_writes: AtomicU64::new(0),
            fsync_fails: AtomicBool::new(false),
            nondeterministic: Mutex::new(None),
        }
    }

    /// The disk fills after `writes` more writes of the journal.
    pub(crate) fn fill_disk_after(&self, writes: u64) {
        self.writes_left.store(writes, Ordering::SeqCst);
    }

    /// The disk has room again.
    pub(crate) fn free_disk(&self) {
        self.writes_left.store(u64::MAX, Ordering::SeqCst);
    }

    /// Takes room for one write, or fails as a full disk does.
    fn take_room(&self) -> std::io::Result<()> {
        let taken = self.writes_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| match left {
            0 => None,
            u64::MAX => Some(u64::MAX),
            left => Some(left - 1),
        });
        taken.map(drop).map_err(|_| {
            self.refused_writes.fetch_add(1, Ordering::SeqCst);
            std::io::Error::from_raw_os_error(28) // ENOSPC
        })
    }

    pub(crate) fn entries(&self) -> Vec<(u64, String)> {
        self.entries.lock().unwrap().clone()
    }

    /// Writes the whole journal; on failure, the file and memory are as before.
    fn save(&self, entries: &[(u64, String)]) -> std::io::Result<()> {
        self.take_room()?;
        std::fs::write(&self.path, serde_json::to_vec(entries).unwrap())
    }

    fn push(&self, index: u64, text: String) -> std::io::Result<()> {
        let mut entries = self.entries.lock().unwrap();
        let mut next = entries.clone();
        next.push((index, text));
        self.save(&next)?;
        *entries = next;
        Ok(())
    }
}

impl AppState for Journal {
    fn applied_index(&self) -> u64 {
        self.entries.lock().unwrap().last().map_or(0, |e| e.0)
    }

    async fn persist(&self) -> std::io::Result<()> {
        if self.fsync_fails.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }

    fn snapshot(&self) -> std::io::Result<Box<dyn SnapshotBuilder>> {
        Ok(Box::new(JournalSnapshot(self.entries())))
    }

    async fn restore(&self, file: &std::path::Path) -> std::io::Result<()> {
        let bytes = std::fs::read(file)?;
        let entries: Vec<(u64, String)> = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        let mut current = self.entries.lock().unwrap();
        self.save(&entries)?;
        *current = entries;
        self.restores.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The journal's entries as captured.
struct JournalSnapshot(Vec<(u64, String)>);

impl SnapshotBuilder for JournalSnapshot {
    fn build_snapshot(self: Box<Self>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        serde_json::to_writer(out, &self.0).map_err(std::io::Error::other)
    }
}

fn text(request: &Request) -> String {
    String::from_utf8_lossy(&request.body).into_owned()
}

async fn append(state: Arc<Journal>, request: Request) -> Outcome {
    assert!(!state.panic_armed.swap(false, Ordering::SeqCst), "injected panic at index {}", request.index);
    if state.hang_armed.swap(false, Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    let text = text(&request);
    if text == "fail" {
        return Err(Failure::refused(400, "asked to fail"));
    }
    state.push(request.index, text)?;
    match state.nondeterministic.lock().unwrap().clone() {
        Some(own) => Ok(Reply::json(200, &serde_json::json!({ "index": request.index, "by": own }))),
        None => Ok(Reply::json(200, &serde_json::json!({ "index": request.index }))),
    }
}

/// Appends in two steps; when armed, stops for ever between them (an execution that is
/// interrupted half-way).
async fn slow(state: Arc<Journal>, request: Request) -> Outcome {
    state.push(request.index, format!("partial:{}", text(&request)))?;
    if state.slow_armed.swap(false, Ordering::SeqCst) {
        state.slow_reached.notify_one();
        std::future::pending::<()>().await;
    }
    let mut entries = state.entries.lock().unwrap();
    entries.last_mut().unwrap().1 = text(&request);
    state.save(&entries)?;
    Ok(Reply::json(200, &serde_json::json!({ "index": request.index })))
}

async fn undo(state: Arc<Journal>, request: Request) -> std::io::Result<()> {
    let mut entries = state.entries.lock().unwrap();
    if entries.iter().any(|e| e.0 >= request.index) {
        let kept: Vec<_> = entries.iter().filter(|e| e.0 < request.index).cloned().collect();
        state.save(&kept)?;
        *entries = kept;
    }
    Ok(())
}

async fn once(state: Arc<Journal>, request: Request) -> Outcome {
    state.outside.executions.fetch_add(1, Ordering::SeqCst);
    state.outside.sent.lock().unwrap().insert(request.index);
    Ok(Reply::json(200, &serde_json::json!({ "sent": request.index })))
}

async fn reconcile(state: Arc<Journal>, request: Request) -> Option<Outcome> {
    let sent = state.outside.sent.lock().unwrap().contains(&request.index);
    sent.then(|| Ok(Reply::json(200, &serde_json::json!({ "sent": request.index, "reconciled": true }))))
}

/// The token `/guarded` asks for.
pub(crate) const TOKEN: &str = "s3cret-token";

/// `/guarded` takes only JSON strings (from a client with the token: checked before the
/// body is read).
fn admit_guarded(request: &Request) -> Result<(), Reply> {
    serde_json::from_slice::<String>(&request.body)
        .map(drop)
        .map_err(|e| Reply::error(422, &format!("the body must be a JSON string: {e}")))
}

async fn list(state: Arc<Journal>, _request: Request) -> Outcome {
    Ok(Reply::json(200, &state.entries()))
}

async fn external(_state: Arc<Journal>, request: Request) -> Outcome {
    Ok(Reply::json(201, &serde_json::json!({ "recorded": request.index })))
}

/// The token the replicas' admin routes (`/br2k/tx`) take.
pub(crate) const ADMIN_TOKEN: &str = "admin-token";

/// What `/pay` sends: wei to the address in the body.
pub(crate) const PAYMENT_WEI: u64 = 1_000;

/// An only-once payment through the outbox: `PAYMENT_WEI` to the address in the body.
async fn pay(_state: Arc<Journal>, request: Request) -> Outcome {
    let outbox = request.outbox().ok_or_else(|| Reply::error(500, "the runtime has no outbox"))?;
    let to = text(&request).trim().parse().map_err(|_| Reply::error(400, "the body must be an address"))?;
    let call = TxCall {
        to,
        value: alloy::primitives::U256::from(PAYMENT_WEI),
        input: alloy::primitives::Bytes::new(),
        gas_limit: Some(21_000),
    };
    match outbox.send(call).await {
        Ok(receipt) => Ok(Reply::json(
            200,
            &serde_json::json!({ "hash": receipt.hash, "nonce": receipt.nonce, "replayed": receipt.replayed }),
        )),
        Err(TxError::Refused(reason)) => Err(Failure::refused(502, &reason)),
        Err(e) => Err(Failure::refused(503, &e.to_string())),
    }
}

/// The effect of a recorded payment or deposit: an entry in every replica's journal.
async fn journal_it(state: Arc<Journal>, request: Request, reply: Reply) -> std::io::Result<()> {
    let answer: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let what = if request.path == "/deposit" {
        format!("deposit:{}", answer["from"].as_str().unwrap_or_default())
    } else {
        format!("paid:{}", text(&request))
    };
    state.push(request.index, what)
}

/// What `/deposit` checks: the client's transaction `hash`, sent to `to`, emitting
/// `event` from it.
#[derive(serde::Deserialize)]
struct DepositAsk {
    hash: alloy::primitives::B256,
    to: alloy::primitives::Address,
    event: Option<alloy::primitives::B256>,
}

/// An External_TXN route: records a client's own transaction once the chain shows it.
async fn deposit(_state: Arc<Journal>, request: Request) -> Outcome {
    let verifier = request.verifier().ok_or_else(|| Reply::error(500, "the runtime has no chain"))?;
    let ask: DepositAsk = request.json()?;
    let expected = br2k_replication::Expected { to: ask.to, event: ask.event, confirmations: 1 };
    match verifier.verify(ask.hash, &expected).await {
        Ok(tx) => {
            Ok(Reply::json(201, &serde_json::json!({ "from": tx.from, "block": tx.block, "logs": tx.logs.len() })))
        }
        Err(e) => Err(Failure::refused(e.status(), &e.to_string())),
    }
}

/// Where an outbox send should stop (for the payment tests).
#[derive(Default)]
pub(crate) struct TxInterrupt {
    pub(crate) armed: AtomicBool,
    pub(crate) step: Mutex<Option<TxStep>>,
    pub(crate) reached: Notify,
    /// Released to let a stopped send go on (a stale leader waking up).
    pub(crate) release: Notify,
    /// Sends of particular requests to stop, each once: (step, log index).
    pub(crate) at: Mutex<Vec<(TxStep, u64)>>,
}

impl TxInterrupt {
    pub(crate) fn arm(&self, step: TxStep) {
        *self.step.lock().unwrap() = Some(step);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Stops the send of the request at `index` at `step`.
    pub(crate) fn arm_at(&self, step: TxStep, index: u64) {
        self.at.lock().unwrap().push((step, index));
    }

    fn stops(&self, step: TxStep, index: u64) -> bool {
        if self.armed.load(Ordering::SeqCst) && *self.step.lock().unwrap() == Some(step) {
            self.armed.store(false, Ordering::SeqCst);
            return true;
        }
        let mut at = self.at.lock().unwrap();
        let found = at.iter().position(|&armed| armed == (step, index));
        found.map(|position| at.remove(position)).is_some()
    }
}

/// Where the leader's pipeline should stop (for the pending-process tests).
#[derive(Default)]
pub(crate) struct Interrupt {
    pub(crate) armed: AtomicBool,
    pub(crate) step: Mutex<Option<Step>>,
    pub(crate) reached: Notify,
    /// Lets the stopped request go on.
    pub(crate) release: Notify,
}

impl Interrupt {
    /// Stops the leader's pipeline the next time it reaches `step`.
    pub(crate) fn arm(&self, step: Step) {
        *self.step.lock().unwrap() = Some(step);
        self.armed.store(true, Ordering::SeqCst);
    }
}

/// One replica: its task, its app state and how to stop it.
pub(crate) struct Replica {
    pub(crate) url: String,
    pub(crate) state: Arc<Journal>,
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) tx_interrupt: Arc<TxInterrupt>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<br2k_replication::Result<()>>>,
}

impl Replica {
    pub(crate) fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Stops the replica as a crash would: the task is dropped wherever it is.
    pub(crate) fn crash(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    pub(crate) async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

pub(crate) struct Registry {
    pub(crate) anvil: Anvil,
    pub(crate) manager: RegistryClient,
}

pub(crate) struct Cluster {
    pub(crate) etcd: EtcdCluster,
    pub(crate) replicas: Vec<Replica>,
    pub(crate) registry: Option<Registry>,
    pub(crate) outside: Arc<Outside>,
    pub(crate) dirs: Vec<tempfile::TempDir>,
    ports: Vec<u16>,
    pub(crate) http: reqwest::Client,
    /// The snapshot policy replicas start with (off unless a test turns it on).
    pub(crate) snapshots: SnapshotPolicy,
    /// The limits replicas started from now on have (bodies of up to 1 KiB by default).
    pub(crate) limits: Limits,
    /// The timings replicas started from now on have (fast ones by default).
    pub(crate) timings: Timings,
    /// Where replicas started from now on back the service up (nowhere by default).
    pub(crate) backup: Option<BackupConfig>,
    /// The outbox replicas started from now on send `/pay` through (none by default).
    pub(crate) outbox: Option<OutboxConfig>,
    /// The idempotency retention and byte cap replicas started from now on have.
    pub(crate) idempotency: (Duration, u64),
}

pub(crate) fn timeouts() -> Timeouts {
    Timeouts { rpc: Duration::from_secs(5), tx: Duration::from_secs(30) }
}

impl Cluster {
    /// etcd and (optionally) a chain, without replicas yet.
    pub(crate) async fn new(with_registry: bool) -> Self {
        // `BR2K_TEST_LOG=info cargo test ... -- --nocapture` shows what the replicas say.
        if let Ok(filter) = std::env::var("BR2K_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let etcd = EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)");
        Self::on(etcd, with_registry).await
    }

    /// Three replicas on `etcd`, without snapshots.
    pub(crate) async fn start_on(etcd: EtcdCluster) -> Self {
        Self::on(etcd, false).await.with_replicas(SnapshotPolicy::disabled()).await
    }

    /// Three replicas with `limits` on `etcd`, without snapshots.
    pub(crate) async fn start_on_limited(etcd: EtcdCluster, limits: Limits) -> Self {
        Self::start_on_with(etcd, limits, None).await
    }

    /// Three replicas with `limits` (and `etcd_timeout`, if given) on `etcd`.
    pub(crate) async fn start_on_with(etcd: EtcdCluster, limits: Limits, etcd_timeout: Option<Duration>) -> Self {
        let mut cluster = Self::on(etcd, false).await;
        cluster.limits = limits;
        if let Some(timeout) = etcd_timeout {
            cluster.timings.etcd_timeout = timeout;
        }
        cluster.with_replicas(SnapshotPolicy::disabled()).await
    }

    async fn on(etcd: EtcdCluster, with_registry: bool) -> Self {
        let registry = if with_registry {
            let anvil = Anvil::spawn().expect("anvil starts (run `bash tools/setup.sh` if it is missing)");
            let chain = Chain::connect(&anvil.endpoint(), Some(anvil.key(0)), timeouts()).await.unwrap();
            let deployment = chain.deploy_registry(60).await.unwrap();
            let manager = chain.registry(deployment.address).await.unwrap();
            let body = Body {
                deployer: anvil.address(0),
                context: "local".into(),
                replicas: 3,
                containerRegistry: String::new(),
                image: String::new(),
                imageDigest: Default::default(),
            };
            manager.register(SERVICE, body).await.unwrap();
            for i in 1..=3 {
                manager.set_operator(SERVICE, anvil.address(i), true).await.unwrap();
            }
            Some(Registry { anvil, manager })
        } else {
            None
        };
        let ports =
            (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        Self {
            etcd,
            replicas: Vec::new(),
            registry,
            outside: Arc::default(),
            dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
            ports,
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            snapshots: SnapshotPolicy::disabled(),
            limits: Limits { max_body: 1024, ..Limits::default() },
            timings: Timings {
                check_interval: Duration::from_millis(50),
                etcd_timeout: Duration::from_millis(500),
                follow_poll: Duration::from_millis(200),
                publish_retry: Duration::from_millis(500),
                member_ttl: Duration::from_secs(2),
            },
            backup: None,
            outbox: None,
            idempotency: (Duration::from_secs(24 * 3600), 256 << 20),
        }
    }

    /// etcd, a chain if asked, and three replicas running.
    pub(crate) async fn start(with_registry: bool) -> Self {
        Self::new(with_registry).await.with_replicas(SnapshotPolicy::disabled()).await
    }

    /// etcd and three replicas that snapshot and compact the log by `policy`.
    pub(crate) async fn start_snapshotting(policy: SnapshotPolicy) -> Self {
        Self::new(false).await.with_replicas(policy).await
    }

    /// etcd and three replicas with `limits`.
    pub(crate) async fn start_limited(limits: Limits) -> Self {
        let etcd = EtcdCluster::spawn().expect("etcd starts (run `bash tools/setup.sh` if it is missing)");
        Self::start_on_limited(etcd, limits).await
    }

    /// Starts three replicas that snapshot by `policy`.
    pub(crate) async fn with_replicas(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = policy;
        for i in 0..3 {
            let replica = self.spawn_replica(i).await;
            self.replicas.push(replica);
        }
        self
    }

    /// Crashes replica `i` and gives it a new, empty data directory (a lost disk). The old
    /// directory is deleted: an aborted task can still finish a step it was in the middle
    /// of (a real crash would not), and must not write into the new one.
    pub(crate) fn wipe_replica(&mut self, i: usize) {
        self.replicas[i].crash();
        self.dirs[i] = tempfile::tempdir().unwrap();
    }

    /// Replica `i`'s snapshot directory.
    pub(crate) fn snapshot_dir(&self, i: usize) -> PathBuf {
        self.dirs[i].path().join("br2k-snapshots")
    }

    /// How many keys there are under `/br2k/journal/<prefix>`.
    pub(crate) async fn count_keys(&self, prefix: &str) -> i64 {
        let mut client = self.etcd_client(self.healthy_member()).await;
        let options = etcd_client::GetOptions::new().with_prefix().with_count_only();
        client.get(format!("/br2k/{SERVICE}/{prefix}"), Some(options)).await.unwrap().count()
    }

    /// A client that sends appends to whichever replica leads, for use while replicas
    /// crash and restart.
    pub(crate) fn load(&self) -> Load {
        Load { urls: self.replicas.iter().map(|r| r.url.clone()).collect(), http: self.http.clone() }
    }

    pub(crate) async fn spawn_replica(&self, i: usize) -> Replica {
        let port = self.ports[i];
        let url = format!("http://127.0.0.1:{port}");
        let mut config = Config::new(
            SERVICE,
            format!("r{i}"),
            self.etcd.endpoint(i),
            ([127, 0, 0, 1], port).into(),
            url.clone(),
            self.dirs[i].path(),
        );
        config.timings = self.timings;
        config.snapshots = self.snapshots;
        config.limits = self.limits;
        config.backup.clone_from(&self.backup);
        (config.idempotency_retention, config.idempotency_max_bytes) = self.idempotency;
        if let Some(registry) = &self.registry {
            let chain =
                Chain::connect(&registry.anvil.endpoint(), Some(registry.anvil.key(i + 1)), timeouts()).await.unwrap();
            config = config.with_publisher(Publisher::new(
                chain.registry(registry.manager.address()).await.unwrap(),
                registry.anvil.key(i + 1),
            ));
        }
        config.outbox.clone_from(&self.outbox);
        config.admin_token = Some(br2k_replication::AdminToken::new(ADMIN_TOKEN));
        let interrupt = Arc::new(Interrupt::default());
        let observer = interrupt.clone();
        let tx_interrupt = Arc::new(TxInterrupt::default());
        let state = Journal::open(self.dirs[i].path(), self.outside.clone());
        let mut builder = Replicated::builder(config)
            .replicate("POST", "/append", append)
            .replicate("POST", "/slow", slow)
            .rollback("POST", "/slow", undo)
            .only_once("POST", "/once", once)
            .reconcile("POST", "/once", reconcile)
            .external_txn("POST", "/ext", external)
            .read("GET", "/list", list)
            .replicate("POST", "/guarded", append)
            .authenticate("POST", "/guarded", br2k_replication::bearer_token(TOKEN))
            .admit("POST", "/guarded", admit_guarded)
            .on_step(move |step, _index| {
                let observer = observer.clone();
                async move {
                    let stop_here =
                        observer.armed.load(Ordering::SeqCst) && *observer.step.lock().unwrap() == Some(step);
                    if stop_here {
                        observer.armed.store(false, Ordering::SeqCst);
                        let released = observer.release.notified();
                        observer.reached.notify_one();
                        released.await;
                    }
                }
            });
        if self.outbox.is_some() {
            let observer = tx_interrupt.clone();
            builder = builder.external_txn("POST", "/deposit", deposit).apply("POST", "/deposit", journal_it);
            builder = builder.only_once_tx("POST", "/pay-recorded", pay).apply("POST", "/pay-recorded", journal_it);
            builder = builder.only_once_tx("POST", "/pay", pay).on_tx_step(move |step, index| {
                let observer = observer.clone();
                async move {
                    if observer.stops(step, index) {
                        let released = observer.release.notified();
                        observer.reached.notify_one();
                        released.await;
                    }
                }
            });
        }
        let service = builder.build(state).unwrap();
        let state = service.state();
        let status = service.subscribe();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(service.serve(async move {
            let _ = stopped.await;
        }));
        Replica { url, state, status, interrupt, tx_interrupt, stop: Some(stop), task: Some(task) }
    }

    /// Restarts replica `i` from its data directory.
    pub(crate) async fn restart_replica(&mut self, i: usize) {
        self.replicas[i].crash();
        // The crashed replica's HTTP task ends asynchronously; wait until its port is free.
        let started = Instant::now();
        while std::net::TcpListener::bind(("127.0.0.1", self.ports[i])).is_err() {
            assert!(started.elapsed() < Duration::from_secs(5), "the crashed replica's port stays bound");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.replicas[i] = self.spawn_replica(i).await;
    }

    /// Waits until some replica leads (other than `not`), and returns its index.
    pub(crate) async fn leader(&self, not: Option<usize>) -> usize {
        let started = Instant::now();
        loop {
            let leaders: Vec<usize> = (0..self.replicas.len())
                .filter(|&i| Some(i) != not && self.replicas[i].status().role == Role::Leader)
                .collect();
            if leaders.len() == 1 {
                return leaders[0];
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no single leader within 20 s: {:?}", self.statuses());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The member id of replica `i`'s etcd member.
    pub(crate) async fn member_id(&self, i: usize) -> u64 {
        let status = self.etcd_client(i).await.status().await.unwrap();
        status.header().unwrap().member_id()
    }

    /// Moves etcd leadership from replica `from`'s member to replica `to`'s, and waits
    /// until replica `to` leads.
    pub(crate) async fn hand_leadership(&self, from: usize, to: usize) {
        let target = self.member_id(to).await;
        self.etcd_client(from).await.move_leader(target).await.unwrap();
        eventually(&format!("replica {to} leads"), async || self.replicas[to].status().role == Role::Leader).await;
    }

    pub(crate) fn statuses(&self) -> Vec<Status> {
        self.replicas.iter().map(Replica::status).collect()
    }

    /// POSTs `body` to replica `i`'s `path`, with an idempotency key if given.
    pub(crate) async fn post(&self, i: usize, path: &str, body: &str, key: Option<&str>) -> reqwest::Response {
        let mut request = self.http.post(format!("{}{path}", self.replicas[i].url)).body(body.to_owned());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.unwrap()
    }

    /// A client for member `i` alone, to read and write records directly.
    pub(crate) async fn etcd_client(&self, i: usize) -> etcd_client::Client {
        etcd_client::Client::connect([self.etcd.endpoint(i)], None).await.unwrap()
    }

    /// The RS record at `index`, read from etcd.
    pub(crate) async fn rs(&self, index: u64) -> Option<EntryState> {
        let mut client = self.etcd_client(self.healthy_member()).await;
        let key = format!("/br2k/{SERVICE}/rs/{index:020}");
        let response = client.get(key, None).await.unwrap();
        response.kvs().first().map(|kv| serde_json::from_slice(kv.value()).unwrap())
    }

    /// POSTs `body` to replica `i`'s `path` with `key`, in the background: its answer may
    /// never come (the test holds the pipeline, or stops the replica, meanwhile).
    pub(crate) fn send_in_background(
        &self,
        i: usize,
        path: &str,
        body: impl std::fmt::Display,
        key: impl Into<String>,
    ) -> JoinHandle<reqwest::Result<reqwest::Response>> {
        let (http, url, body, key) =
            (self.http.clone(), format!("{}{path}", self.replicas[i].url), body.to_string(), key.into());
        tokio::spawn(async move { http.post(url).header("Idempotency-Key", key).body(body).send().await })
    }

    /// Replica `i`'s pipeline counters, as its `/br2k/status` serves them.
    pub(crate) async fn pipeline(&self, i: usize) -> std::collections::BTreeMap<String, br2k_replication::Tally> {
        let url = format!("{}/br2k/status", self.replicas[i].url);
        let status: Status = self.http.get(url).send().await.unwrap().json().await.unwrap();
        status.pipeline
    }

    /// Waits (up to 20 s) until leader `i` has queued `at_least` requests since it started.
    pub(crate) async fn eventually_queued(&self, i: usize, at_least: u64) {
        let started = Instant::now();
        while self.pipeline(i).await.get("leader: requests queued").map_or(0, |t| t.calls) < at_least {
            assert!(started.elapsed() < Duration::from_secs(20), "replica {i} did not queue {at_least} requests");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A decimal record (`ls`, `ssi`, `lpi/r0`), 0 when absent.
    pub(crate) async fn counter(&self, name: &str) -> u64 {
        let mut client = self.etcd_client(self.healthy_member()).await;
        let response = client.get(format!("/br2k/{SERVICE}/{name}"), None).await.unwrap();
        response.kvs().first().map_or(0, |kv| kv.value_str().unwrap().parse().unwrap())
    }

    /// The service's peer token, as a replica of it reads it from etcd (made here, as the
    /// first replica that needs it would, when none was made yet).
    pub(crate) async fn peer_token(&self) -> String {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let key = format!("/br2k/{SERVICE}/peer_token");
        let mut client = self.etcd_client(self.healthy_member()).await;
        let made = Txn::new()
            .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.clone(), "a-peer-token-made-by-the-test", None)]);
        client.txn(made).await.unwrap();
        let response = client.get(key, None).await.unwrap();
        response.kvs()[0].value_str().unwrap().to_owned()
    }

    pub(crate) fn healthy_member(&self) -> usize {
        (0..self.etcd.len()).find(|&i| self.etcd.pid(i).is_some()).unwrap()
    }

    /// Sends to whichever replica leads until one answers something other than 503 (a
    /// client failing over by hand).
    pub(crate) async fn post_to_leader(&self, path: &str, body: &str, key: Option<&str>) -> reqwest::Response {
        let started = Instant::now();
        loop {
            let leader = self.leader(None).await;
            let response = self.post(leader, path, body, key).await;
            if response.status() != 503 {
                return response;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no answer but 503 for 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every replica's journal equals `expected`.
    pub(crate) async fn converged(&self, expected: &[(u64, String)]) {
        self.converged_on(&[0, 1, 2], expected).await;
    }

    /// Waits until the journals of `replicas` equal `expected`.
    pub(crate) async fn converged_on(&self, replicas: &[usize], expected: &[(u64, String)]) {
        let started = Instant::now();
        loop {
            let states: Vec<_> = replicas.iter().map(|&i| self.replicas[i].state.entries()).collect();
            if states.iter().all(|s| s == expected) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "replicas did not converge to {expected:?}: {states:?}\n{:?}",
                self.statuses()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits (up to 20 s) until `condition` holds.
pub(crate) async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !condition().await {
        assert!(started.elapsed() < Duration::from_secs(20), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn entries(items: &[(u64, &str)]) -> Vec<(u64, String)> {
    items.iter().map(|(i, t)| (*i, (*t).to_owned())).collect()
}

/// Clients failing over by hand: each request goes to the replica that answered last, or
/// the one a `Br2k-Leader` hint names, or the next one, with the same idempotency key
/// until it is answered 200.
#[derive(Clone)]
pub(crate) struct Load {
    urls: Vec<String>,
    http: reqwest::Client,
}

impl Load {
    /// Sends `count` appends (`{tag}{n}`), `concurrency` at a time. Returns the
    /// (index, text) each was answered with, in index order.
    pub(crate) async fn append_many(&self, tag: &str, count: usize, concurrency: usize) -> Vec<(u64, String)> {
        let next = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (load, next, tag) = (self.clone(), next.clone(), tag.to_owned());
                tokio::spawn(async move {
                    let mut answered = Vec::new();
                    let mut target = 0;
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= count as u64 {
                            return answered;
                        }
                        let text = format!("{tag}{n}");
                        let index = load.append(&text, &format!("key-{tag}-{n}"), &mut target).await;
                        answered.push((index, text));
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort();
        all
    }

    /// One append, retried with the same key until answered 200; its index.
    pub(crate) async fn append(&self, text: &str, key: &str, target: &mut usize) -> u64 {
        let started = Instant::now();
        loop {
            let request = self
                .http
                .post(format!("{}/append", self.urls[*target]))
                .header("Idempotency-Key", key)
                .timeout(Duration::from_secs(3))
                .body(text.to_owned());
            match request.send().await {
                Ok(response) if response.status() == 200 => {
                    return response.headers()["br2k-index"].to_str().unwrap().parse().unwrap();
                }
                Ok(response) => {
                    let hint = response.headers().get("br2k-leader").and_then(|v| v.to_str().ok());
                    match hint.and_then(|h| self.urls.iter().position(|u| u == h)) {
                        Some(leader) => *target = leader,
                        None => *target = (*target + 1) % self.urls.len(),
                    }
                }
                Err(_) => *target = (*target + 1) % self.urls.len(),
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{text} not answered within 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
