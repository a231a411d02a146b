//! What an application gives the runtime: its state, and handlers over it.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use std::collections::HashMap;

use crate::data::RequestKind;
use crate::data::Step;
use crate::data::{LogEntry, StoredReply};
use crate::secret::bearer_credentials;

/// The application's state. It owns its durable storage; the runtime only asks where it is.
///
/// The contract that keeps replicas identical (modelled on dragonboat's on-disk state
/// machine and openraft's `RaftStateMachine`):
/// - a Replication handler's effect and [`AppState::applied_index`] change together (the
///   index is stored with the effect), so a restarted replica resumes from what it really
///   has;
/// - a handler that refuses ([`Failure::Refused`], the paper's Fail) or faults
///   ([`Failure::Fault`]) leaves the state unchanged;
/// - handlers are deterministic: the same request on the same state gives the same
///   outcome, answer included (each replica checks its answer against the one the leader
///   recorded, and stops if they differ: see [`crate::Status::divergence`]);
/// - a local fault (an I/O error, a full disk) is reported as an error, never turned
///   into an answer: [`Failure::Fault`] from handlers, `Err` from apply hooks, rollbacks,
///   [`AppState::persist`] and snapshots;
/// - a snapshot is point-in-time and deterministic: taken at the same applied index, two
///   replicas' snapshots hold the same bytes;
/// - [`AppState::restore`] discards all previous state.
pub trait AppState: Send + Sync + 'static {
    /// The highest log index whose effect is in this state (0 for a fresh state).
    fn applied_index(&self) -> u64;

    /// Makes every applied request durable (for example `fsync`). A leader calls it once
    /// per group of requests, while their outcomes are written to etcd and before clients
    /// are answered; a follower before it reports how far it has applied (about once per
    /// second) and before a snapshot. A crash in between loses nothing: the entries after
    /// the persisted state are executed again from etcd. The default does nothing.
    fn persist(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Captures the state as it is now, for a snapshot. The runtime calls it while no
    /// request executes and every applied request is persisted, so the capture must be
    /// quick (remember a file length, clone a small map, take a copy-on-write handle);
    /// the returned builder writes the captured state out later, on a blocking thread,
    /// possibly while later requests execute.
    ///
    /// # Errors
    /// When the state cannot be captured; the runtime tries again later.
    fn snapshot(&self) -> std::io::Result<Box<dyn SnapshotBuilder>>;

    /// Replaces the whole state with the snapshot in `file` (bytes a [`SnapshotBuilder`]
    /// of this app wrote, already checked against their digest). Atomic and durable: after
    /// a crash the state is either the old one or the restored one, and once it returns
    /// [`AppState::applied_index`] is the snapshot's.
    ///
    /// # Errors
    /// When the file cannot be read or is not a snapshot of this app; the state must then
    /// be unchanged.
    fn restore(&self, file: &Path) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// Writes out a state captured by [`AppState::snapshot`] (openraft's and dragonboat's
/// snapshot builder).
pub trait SnapshotBuilder: Send + 'static {
    /// Writes the captured state to `out`. Runs on a blocking thread.
    ///
    /// # Errors
    /// When the state cannot be read or `out` refuses it; the snapshot is then discarded.
    fn build_snapshot(self: Box<Self>, out: &mut dyn std::io::Write) -> std::io::Result<()>;
}

/// The snapshot of a state kept in an append-only file: its first `len` bytes, captured
/// as an open file and a length (what the log server and the payments ledger snapshot).
#[derive(Debug)]
pub struct FilePrefix {
    file: std::fs::File,
    len: u64,
}

impl FilePrefix {
    /// The first `len` bytes of the file at `path`, opened now (later appends and a
    /// rename over the path do not change what is captured).
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn capture(path: &Path, len: u64) -> std::io::Result<Self> {
        Ok(Self { file: std::fs::File::open(path)?, len })
    }
}

impl SnapshotBuilder for FilePrefix {
    fn build_snapshot(self: Box<Self>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        let copied = std::io::copy(&mut std::io::Read::take(self.file, self.len), out)?;
        if copied != self.len {
            return Err(std::io::Error::other(format!(
                "the file is {copied} bytes, shorter than the {} captured",
                self.len
            )));
        }
        Ok(())
    }
}

/// A client request as a handler sees it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The log index (for reads: the replica's latest processed index).
    pub index: u64,
    /// HTTP method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// The kept headers (lower-case names); in an admission check, every header sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
    /// The client's `Idempotency-Key`, if any.
    pub idempotency_key: Option<String>,
    /// The transaction outbox, for only-once requests of a runtime that has one.
    pub(crate) outbox: Option<crate::outbox::Outbox>,
    /// The on-chain checker, for External_TXN requests of a runtime that has an outbox.
    pub(crate) verifier: Option<crate::outbox::Verifier>,
}

impl Request {
    pub(crate) fn from_entry(index: u64, entry: LogEntry) -> Self {
        Self {
            index,
            method: entry.method,
            path: entry.path,
            query: entry.query,
            headers: entry.headers,
            body: Bytes::from(entry.body),
            idempotency_key: entry.idempotency_key,
            outbox: None,
            verifier: None,
        }
    }

    /// The outbox this request sends blockchain transactions through: only-once requests
    /// of a runtime configured with one ([`crate::Config::outbox`]) have it. Each
    /// transaction sent through it is sent at most once for this request, however many
    /// times the handler runs.
    pub fn outbox(&self) -> Option<&crate::outbox::Outbox> {
        self.outbox.as_ref()
    }

    /// What an External_TXN handler checks the client's own transaction with before the
    /// request is recorded: External_TXN requests of a runtime configured with an outbox
    /// have it (it uses the outbox's RPC endpoint, never its key).
    pub fn verifier(&self) -> Option<&crate::outbox::Verifier> {
        self.verifier.as_ref()
    }

    /// The body parsed as JSON.
    ///
    /// # Errors
    /// A `400 Bad Request` reply naming what was wrong, ready to return as a Fail.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Reply> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Reply::error(400, &format!("the request body is not the expected JSON: {e}")))
    }

    /// The value of header `name` (case-insensitive), if kept.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A handler's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Content type, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Bytes,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
        Self { status, content_type: Some("application/json".into()), body: body.into() }
    }

    /// A `{"error": message}` JSON answer.
    pub fn error(status: u16, message: &str) -> Self {
        Self::json(status, &serde_json::json!({ "error": message }))
    }

    pub(crate) fn to_stored(&self) -> StoredReply {
        StoredReply { status: self.status, content_type: self.content_type.clone(), body: self.body.to_vec() }
    }

    pub(crate) fn from_stored(stored: StoredReply) -> Self {
        Self { status: stored.status, content_type: stored.content_type, body: stored.body.into() }
    }
}

/// A handler's result: `Ok` is the paper's Success; `Err` is either a refusal (the
/// paper's Fail, recorded like a Success) or a local fault (never recorded); see
/// [`Failure`].
pub type Outcome = Result<Reply, Failure>;

/// What a handler gives instead of a Success. `?` picks the right one: a [`Reply`] (from
/// [`Request::json`], an admission check, `Reply::error`) is a refusal, an
/// [`std::io::Error`] (a write, an fsync, a rename) is a fault.
#[derive(Debug)]
pub enum Failure {
    /// A refusal every replica would give the same request on the same state (a malformed
    /// body, an account that does not cover a payout): the paper's Fail. It is the
    /// request's answer: recorded, replayed for retries, and the state must be unchanged.
    Refused(Reply),
    /// This replica could not do its part (an I/O error, a full disk, a failed fsync).
    /// It is never the request's answer and never recorded: a follower stops at the entry
    /// and retries it until it passes (unhealthy meanwhile), a leader ends its term and
    /// another replica executes the request. The handler must leave the state as it was
    /// before the request (a failed append cut back, no torn line), so the retry starts
    /// clean; the runtime runs the route's rollback, when it has one, before retrying.
    Fault(std::io::Error),
}

impl Failure {
    /// A refusal with a `{"error": message}` JSON body.
    pub fn refused(status: u16, message: &str) -> Self {
        Self::Refused(Reply::error(status, message))
    }
}

impl From<Reply> for Failure {
    fn from(reply: Reply) -> Self {
        Self::Refused(reply)
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Self::Fault(error)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(reply) => write!(f, "refused with {}", reply.status),
            Self::Fault(error) => write!(f, "local fault: {error}"),
        }
    }
}

/// An outcome as it is recorded in etcd: Success or Fail, each with its answer (a fault
/// has no place here).
pub(crate) type Recorded = Result<Reply, Reply>;

/// A boxed future, as handlers are stored.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pub(crate) type Handler<S> = Arc<dyn Fn(Arc<S>, Request) -> BoxFuture<Outcome> + Send + Sync>;
pub(crate) type Rollback<S> = Arc<dyn Fn(Arc<S>, Request) -> BoxFuture<std::io::Result<()>> + Send + Sync>;
pub(crate) type Apply<S> = Arc<dyn Fn(Arc<S>, Request, Reply) -> BoxFuture<std::io::Result<()>> + Send + Sync>;
pub(crate) type Reconcile<S> = Arc<dyn Fn(Arc<S>, Request) -> BoxFuture<Option<Outcome>> + Send + Sync>;

pub(crate) type Admission = Arc<dyn Fn(&Request) -> Result<(), Reply> + Send + Sync>;

/// An admission check for [`crate::Builder::admit`] that lets a request in only with
/// `Authorization: Bearer <token>`: 401 without it, 403 with another token (compared in
/// constant time). The token is never logged: credential headers cannot be kept.
pub fn bearer_token(token: impl Into<String>) -> impl Fn(&Request) -> Result<(), Reply> + Send + Sync + 'static {
    let token = token.into();
    move |request: &Request| match request.header("authorization").and_then(bearer_credentials) {
        None => Err(Reply::error(401, "this route needs `Authorization: Bearer <token>`")),
        Some(offered) if crate::secret::same_secret(offered.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Reply::error(403, "wrong bearer token")),
    }
}

pub(crate) type StepObserver = Arc<dyn Fn(Step, u64) -> BoxFuture<()> + Send + Sync>;

/// One route: its type and what runs for it.
pub(crate) struct Route<S> {
    pub(crate) kind: RequestKind,
    pub(crate) handler: Handler<S>,
    pub(crate) rollback: Option<Rollback<S>>,
    pub(crate) reconcile: Option<Reconcile<S>>,
    pub(crate) admission: Option<Admission>,
    /// The check of the request's head, run before its body is read.
    pub(crate) authentication: Option<Admission>,
    /// A Normal route whose only effects are transactions sent through the outbox: safe
    /// to run again for the same request (the outbox hands back what it stored).
    pub(crate) replayable: bool,
    /// What every replica does to the replicated state with a recorded Success of this
    /// (only-once or External_TXN) route.
    pub(crate) apply: Option<Apply<S>>,
}

/// Routes by (method, path); paths match exactly.
pub(crate) struct Routes<S> {
    pub(crate) by_key: HashMap<(String, String), Route<S>>,
}

impl<S> Routes<S> {
    pub(crate) fn get(&self, method: &str, path: &str) -> Option<&Route<S>> {
        self.by_key.get(&(method.to_owned(), path.to_owned()))
    }

    /// The methods a path has, for `405 Method Not Allowed`.
    pub(crate) fn methods_of(&self, path: &str) -> Vec<String> {
        let mut methods: Vec<String> = self.by_key.keys().filter(|(_, p)| p == path).map(|(m, _)| m.clone()).collect();
        methods.sort();
        methods
    }
}
