//! The finality checker: a payout recorded paid must stay paid.
//!
//! The outbox records a transaction settled once it is `confirmations` blocks deep. A
//! reorg deeper than that (rare on a chain with finality, routine on a badly run one)
//! can still take it out of the canonical chain: the request's answer says "paid with
//! hash H", and H is nowhere. Nothing in the request path would notice, so the leader
//! runs this task: for every settled record still in etcd whose block is less than
//! `finality_window` blocks below the head, it checks that one of the record's attempts
//! still has a receipt. One that has none in two rounds in a row (a lagging endpoint
//! can miss a receipt once) is a **finality violation**: logged, counted
//! (`br2k_outbox_finality_violations_total`), listed in `/br2k/status` and on the
//! dashboard with its request and hash, and its stored, signed bytes are broadcast again
//! every round until they are back on chain (the same nonce, the same transaction: it
//! pays what the request was answered with, never twice). Chainlink's transaction
//! manager runs the same kind of check ("finality violated") for the same reason.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use alloy::primitives::B256;
use alloy::providers::Provider;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::chain::Chain;
use crate::records::TxRecord;
use crate::store::{TxStore, decode};

/// Violations kept for `/br2k/status` (the oldest are dropped first; the counter keeps
/// counting).
const KEPT: usize = 100;

/// A settled transaction that left the canonical chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalityViolation {
    /// The request's log index.
    pub index: u64,
    /// Which of the request's transactions (0: its first).
    pub seq: u32,
    /// Its nonce.
    pub nonce: u64,
    /// The hash the request was answered with.
    pub hash: B256,
    /// The block it was recorded in.
    pub block: u64,
    /// When the checker found it gone (unix seconds).
    pub detected_at: u64,
    /// The block it is back in, once rebroadcast and mined again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_in_block: Option<u64>,
}

/// What the checker has found since the replica started.
#[derive(Default)]
pub(crate) struct FinalityLog {
    /// The latest violations, oldest first.
    pub(crate) violations: Vec<FinalityViolation>,
    /// Every violation found.
    pub(crate) total: u64,
    /// Records seen without a receipt once: a second round confirms.
    suspects: HashSet<(u64, u32)>,
    /// Every record of a request below this index is final (settled more than
    /// `finality_window` blocks ago, or refused): later rounds read from here on, so a
    /// round costs what the recent records weigh, not the whole outbox.
    watch_from: u64,
}

impl Chain {
    /// Checks settled transactions every `finality_check_every` while this replica leads
    /// (the task is aborted with the term).
    pub async fn watch_finality(self: Arc<Self>, store: Arc<dyn TxStore>) {
        let mut tick = tokio::time::interval(self.config.finality_check_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(reason) = self.check_finality(store.as_ref()).await {
                debug!(%reason, "finality check skipped this round");
            }
        }
    }

    async fn check_finality(&self, store: &dyn TxStore) -> Result<(), String> {
        let keys = &self.keys;
        let head = self
            .endpoints
            .read("read the block number", |p| async move { p.get_block_number().await })
            .await
            .map_err(|e| e.to_string())?;
        let from = keys.tx(self.finality().watch_from, 0);
        let records = store.range(&from, &keys.tx_end()).await.map_err(|e| e.to_string())?;
        let mut watched = BTreeMap::new();
        // The first request with a record that is not final yet, and the last one read.
        let (mut unfinished, mut last): (Option<u64>, Option<u64>) = (None, None);
        for (key, value) in records {
            let Some(at) = keys.parse_tx(&key) else { continue };
            last = Some(at.0);
            let Ok(record) = decode::<TxRecord>(&key, &value) else { continue };
            let recent =
                record.settled.as_ref().is_some_and(|s| head.saturating_sub(s.block) < self.config.finality_window);
            if recent {
                watched.insert(at, record);
            } else if record.settled.is_some() || record.refused.is_some() {
                continue;
            }
            // Recent, or not settled yet.
            unfinished.get_or_insert(at.0);
        }
        if let Some(from) = unfinished.or(last) {
            self.finality().watch_from = from;
        }
        for ((index, seq), record) in watched {
            let settled = record.settled.as_ref().expect("only settled records are watched");
            match self.on_chain(&record).await? {
                Some(block) => self.still_on_chain(index, seq, block),
                None => {
                    let newly = {
                        let mut log = self.finality();
                        if log.suspects.insert((index, seq)) {
                            continue; // once: ask again next round
                        }
                        !log.violations.iter().any(|v| (v.index, v.seq) == (index, seq) && v.back_in_block.is_none())
                    };
                    if newly {
                        warn!(index, seq, nonce = record.nonce, hash = %settled.hash, block = settled.block,
                            "finality violation: a transaction recorded as settled is no longer on chain (a reorg \
                             deeper than the confirmation depth); broadcasting it again");
                        let mut log = self.finality();
                        log.total += 1;
                        log.violations.push(FinalityViolation {
                            index,
                            seq,
                            nonce: record.nonce,
                            hash: settled.hash,
                            block: settled.block,
                            detected_at: crate::unix_seconds(),
                            back_in_block: None,
                        });
                        let excess = log.violations.len().saturating_sub(KEPT);
                        log.violations.drain(..excess);
                    }
                    // The bytes the request was answered with (a later replacement at the
                    // same nonce would pay too, but under another hash).
                    let mined = record.attempts.iter().find(|a| a.hash == settled.hash);
                    if let Some(attempt) = mined.or(record.attempts.last())
                        && let Err(e) = self.endpoints.broadcast(&attempt.raw).await
                    {
                        debug!(index, seq, error = %e, "rebroadcast after a finality violation not taken yet");
                    }
                }
            }
        }
        Ok(())
    }

    /// The block of the first of the record's attempts that has a receipt.
    async fn on_chain(&self, record: &TxRecord) -> Result<Option<u64>, String> {
        for attempt in &record.attempts {
            let hash = attempt.hash;
            let receipt = self
                .endpoints
                .read("read a receipt", |p| async move { p.get_transaction_receipt(hash).await })
                .await
                .map_err(|e| e.to_string())?;
            if let Some(block) = receipt.and_then(|r| r.block_number) {
                return Ok(Some(block));
            }
        }
        Ok(None)
    }

    fn still_on_chain(&self, index: u64, seq: u32, block: u64) {
        let mut log = self.finality();
        log.suspects.remove(&(index, seq));
        for violation in &mut log.violations {
            if (violation.index, violation.seq) == (index, seq) && violation.back_in_block.is_none() {
                info!(index, seq, hash = %violation.hash, block, "the transaction of a finality violation is back on chain");
                violation.back_in_block = Some(block);
            }
        }
    }

    fn finality(&self) -> std::sync::MutexGuard<'_, FinalityLog> {
        self.finality.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
