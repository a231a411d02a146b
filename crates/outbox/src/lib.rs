#![doc = include_str!("../README.md")]
//!
//! ## How it works, in detail
//!
//! The transaction outbox: how an only-once handler sends Ethereum transactions so that a
//! request pays at most once through any number of leader changes (Chainlink's
//! transaction manager and the OpenZeppelin Relayer work the same way).
//!
//! For the `k`-th transaction a request's handler sends, the leader, under its fence:
//! 1. picks the next nonce of the service's transaction key (the larger of what etcd
//!    reserved last and what the chain has mined), signs the transaction, and stores it
//!    (nonce, signed bytes, hash) in etcd at `outbox/<index>/<k>` *together with* the
//!    nonce reservation, in one fenced transaction: a nonce is never reserved without its
//!    transaction, and a leader cut off before that write never broadcasts anything;
//! 2. only then broadcasts it, and waits for its receipt at the configured confirmation
//!    depth, rebroadcasting the stored bytes now and then;
//! 3. when it is not mined for a while, signs a replacement at the same nonce with fees
//!    raised by a quarter, stores it next to the first, broadcasts it: whichever is mined,
//!    the nonce is spent once;
//! 4. records the receipt in the same record.
//!
//! A handler that runs again for the same request (a new leader finishing it, a retry)
//! finds its records and gets the stored transactions back: it rebroadcasts the same bytes
//! and settles from receipts, and never signs another transaction for the request with a
//! new nonce. The chain accepts one transaction per nonce, so even a stale leader that
//! wakes up and broadcasts what it stored cannot make a request pay twice.
//!
//! A chain that does not answer leaves the transaction, and so the request, in doubt: the
//! handler gets [`TxError::InDoubt`], the runtime answers `503` without recording an
//! outcome, lists the request in `/br2k/status`, and runs the handler again until the
//! chain settles it.
//!
//! A real chain adds three things, each handled in its own place:
//! - **Depth.** A receipt of one of the record's attempts, however shallow, means ours was
//!   mined (`Mined::Shallow`): the nonce is never taken for a stranger's, nothing is
//!   bumped, and a reorg that drops it before it is deep enough sends the same bytes
//!   again.
//! - **Deep reorgs.** A transaction already recorded settled can still leave the chain:
//!   the leader's finality checker ([`Chain::watch_finality`]) finds it, counts it and broadcasts it
//!   again.
//! - **Several endpoints.** Broadcasts go to all of them, reads fail over ([`EndpointHealth`] says how each does).

mod chain;
mod config;
mod endpoints;
mod finality;
mod keys;
mod records;
mod send;
mod store;
mod verifier;

pub use chain::Chain;
pub use config::OutboxConfig;
pub use endpoints::EndpointHealth;
pub use finality::FinalityViolation;
pub use keys::OutboxKeys;
pub use records::{
    CancelError, OutboxStatus, TxAttempt, TxCall, TxError, TxObserver, TxReceipt, TxRecord, TxSettled, TxStep,
    UnsettledTx,
};
pub use send::Outbox;
pub use store::{MemoryStore, Records, StoreError, TxStore, Write};
pub use verifier::{Expected, VerifiedTx, Verifier, VerifyError};

/// Seconds since the Unix epoch (what the status shows).
pub(crate) fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
