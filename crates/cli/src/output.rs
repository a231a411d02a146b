//! Where results and progress go: results (and only results) on stdout, in words or, with
//! `--json`, as one JSON document per result; progress on stderr unless `--quiet`.

use std::fmt;
use std::io::Write;

use anyhow::{Context, Result};
use br2k_resolver::{Resolved, TxOutcome};
use serde_json::{Value, json};

/// The command's output channels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Output {
    json: bool,
    quiet: bool,
}

impl Output {
    pub(crate) const fn new(json: bool, quiet: bool) -> Self {
        Self { json, quiet }
    }

    /// A progress line on stderr.
    pub(crate) fn progress(self, message: fmt::Arguments<'_>) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    /// One result on stdout: `human` in words, or `json`.
    pub(crate) fn result(self, human: &str, json: &Value) -> Result<()> {
        let mut stdout = std::io::stdout().lock();
        if self.json { writeln!(stdout, "{json}") } else { writeln!(stdout, "{human}") }
            .and_then(|()| stdout.flush())
            .context("cannot write to stdout")
    }

    /// The result of a mined transaction: `what` happened, plus the transaction.
    pub(crate) fn transaction(self, what: &str, tx: TxOutcome, mut fields: Value) -> Result<()> {
        if let Value::Object(map) = &mut fields {
            map.insert("txHash".into(), json!(tx.hash));
            map.insert("block".into(), json!(tx.block));
            map.insert("gasUsed".into(), json!(tx.gas_used));
        }
        let human = format!("{what}\ntransaction {} (block {}, gas {})", tx.hash, tx.block, tx.gas_used);
        self.result(&human, &fields)
    }
}

/// Where a service is served, as `resolve --json` and `watch --json` print it.
pub(crate) fn resolved_json(resolved: &Resolved) -> Value {
    json!({ "location": resolved.location, "epoch": resolved.epoch, "state": resolved.state.as_str() })
}
