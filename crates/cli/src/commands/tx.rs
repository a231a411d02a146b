//! `br2k tx ls NAME` and `br2k tx cancel NAME INDEX`: a way out for a stuck payout.
//!
//! A transaction the chain does not mine (fees too low for a spike, a chain that stalls)
//! keeps its request in doubt, and the requests behind it wait. The operator lists what is
//! unsettled and may cancel one: the leader signs a zero-value transfer to the service's
//! own address at the same nonce with higher fees (the usual cancel) and broadcasts it.
//! Whichever is mined first decides: the cancel, and the request is recorded failed
//! ("cancelled by the operator"); the original, and it is recorded paid. Both routes are
//! the replica's admin routes: they take the admin token the replicas were started with.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use br2k_replication::UnsettledTx;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::GlobalOpts;
use crate::opts::AdminTokenArg;

#[derive(Subcommand, Debug)]
pub(crate) enum TxCommand {
    /// List the service's in-doubt requests and unsettled transactions (from its leader).
    Ls(TxArgs),
    /// Cancel request INDEX's unsettled transaction: the leader replaces it with a
    /// zero-value transfer to the service's own address at the same nonce and higher fees;
    /// waits until the chain decides which one counts.
    Cancel(CancelArgs),
}

#[derive(Args, Debug)]
pub(crate) struct TxArgs {
    /// The service name.
    name: String,
    #[command(flatten)]
    admin: AdminTokenArg,
}

#[derive(Args, Debug)]
pub(crate) struct CancelArgs {
    #[command(flatten)]
    service: TxArgs,
    /// The log index of the request whose transaction to cancel (`br2k tx ls` lists them).
    index: u64,
    /// How long to wait for the chain to mine the cancel or the original.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    timeout: u64,
}

impl TxCommand {
    pub(crate) async fn run(self, global: &GlobalOpts) -> Result<()> {
        match self {
            Self::Ls(args) => args.list(global).await,
            Self::Cancel(args) => args.run(global).await,
        }
    }
}

/// The service's leader's admin routes.
struct Admin {
    http: reqwest::Client,
    location: String,
    token: String,
    registry: br2k_resolver::RegistryClient,
    name: String,
}

impl Admin {
    async fn of(args: &TxArgs, global: &GlobalOpts) -> Result<Self> {
        let token = args.admin.require()?;
        let registry = global.open_registry().await?;
        let location = registry.service_location(&args.name).await?.location;
        if location.is_empty() {
            bail!("{:?} has no published location: is it running?", args.name);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { http, location, token, registry, name: args.name.clone() })
    }

    /// Sends `request` to the leader, following one `Br2k-Leader` redirect (the published
    /// location may lag a leader change); the status and the JSON body.
    async fn ask(&mut self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        for _ in 0..2 {
            let url = format!("{}{path}", self.location.trim_end_matches('/'));
            let mut request = self.http.request(method.clone(), &url).bearer_auth(&self.token);
            if let Some(body) = body {
                request = request.json(body);
            }
            let answer = request.send().await.with_context(|| format!("asking {url}"))?;
            let status = answer.status().as_u16();
            let leader = answer.headers().get(br2k_replication::LEADER_HEADER).and_then(|v| v.to_str().ok());
            if status == 503
                && let Some(leader) = leader.filter(|l| !l.is_empty() && *l != self.location)
            {
                // The admin token goes only where the registry published the service.
                let published = self.registry.published_locations(&self.name).await?;
                if !published.iter().any(|p| p.trim_end_matches('/') == leader.trim_end_matches('/')) {
                    bail!(
                        "{url} is not the leader and names {leader}, where the registry never published {:?}; the \
                         admin token is not sent there (try again once the new leader is published)",
                        self.name
                    );
                }
                self.location = leader.to_owned();
                continue;
            }
            let body: Value = answer.json().await.unwrap_or_default();
            return Ok((status, body));
        }
        bail!("the leader moved twice while asking; try again")
    }
}

fn refused(status: u16, body: &Value) -> anyhow::Error {
    let reason = body["error"].as_str().unwrap_or("(no reason given)");
    match status {
        401 | 403 => {
            anyhow::anyhow!("{status}: {reason} (the replicas' admin token: BR2K_ADMIN_TOKEN or --admin-token-file)")
        }
        _ => anyhow::anyhow!("{status}: {reason}"),
    }
}

fn describe(tx: &UnsettledTx) -> String {
    let mut flags = Vec::new();
    if tx.broadcast {
        flags.push("broadcast");
    }
    if tx.cancel_signed {
        flags.push("cancel signed");
    } else if tx.cancel_requested {
        flags.push("cancel asked");
    }
    format!(
        "  request {:>8}/{}  nonce {:>6}  to {}  value {}  {} version(s), latest {}  {}",
        tx.index,
        tx.seq,
        tx.nonce,
        tx.to,
        tx.value,
        tx.attempts,
        tx.latest,
        flags.join(", ")
    )
}

impl TxArgs {
    async fn list(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let mut admin = Admin::of(&self, global).await?;
        let (status, body) = admin.ask(reqwest::Method::GET, "/br2k/tx", None).await?;
        if status != 200 {
            return Err(refused(status, &body));
        }
        let transactions: Vec<UnsettledTx> =
            serde_json::from_value(body["transactions"].clone()).context("the leader's list of transactions")?;
        let in_doubt = body["in_doubt"].as_array().map(Vec::len).unwrap_or_default();
        let mut text = format!(
            "{:?} (from {}): {in_doubt} request(s) in doubt, {} unsettled transaction(s)\n",
            self.name,
            body["replica"].as_str().unwrap_or("?"),
            transactions.len()
        );
        for tx in &transactions {
            text.push_str(&describe(tx));
            text.push('\n');
        }
        out.result(
            text.trim_end(),
            &json!({ "service": self.name, "in_doubt": body["in_doubt"], "transactions": transactions }),
        )
    }
}

impl CancelArgs {
    async fn run(self, global: &GlobalOpts) -> Result<()> {
        let out = global.output();
        let name = self.service.name.clone();
        let mut admin = Admin::of(&self.service, global).await?;
        let ask = json!({ "index": self.index });
        let (status, body) = admin.ask(reqwest::Method::POST, "/br2k/tx/cancel", Some(&ask)).await?;
        if status != 202 {
            return Err(refused(status, &body));
        }
        out.progress(format_args!(
            "the leader cancels request {}'s transaction: a zero-value transfer to the service's own address at the \
             same nonce; waiting for the chain ...",
            self.index
        ));
        // Settled (either way) once it leaves the unsettled list.
        let deadline = Instant::now() + Duration::from_secs(self.timeout);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (status, body) = admin.ask(reqwest::Method::GET, "/br2k/tx", None).await?;
            if status != 200 {
                return Err(refused(status, &body));
            }
            let pending =
                body["transactions"].as_array().is_some_and(|txs| txs.iter().any(|tx| tx["index"] == self.index));
            if !pending {
                return out.result(
                    &format!(
                        "request {}'s transaction is settled: the chain took the cancel (recorded failed, nothing \
                         paid) or the original (recorded paid); the request's answer says which",
                        self.index
                    ),
                    &json!({ "service": name, "index": self.index, "settled": true }),
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the chain mined neither the cancel nor the original within {} s; `br2k tx ls {name}` shows it \
                     (the cancel stays in the pools and may still be mined)",
                    self.timeout
                );
            }
        }
    }
}
