//! A replicated service that moves value on chain, on br2k-replication: the example that
//! proves the transaction outbox (a payout is paid at most once through any leader
//! change) and External_TXN verification (a deposit is recorded only as the chain shows it).
//!
//! | route | type | what it does |
//! |---|---|---|
//! | `POST /grants {"user", "amount"}` | Replication (operator token) | credits a user's account |
//! | `POST /payouts {"user", "amount"}` | only-once, through the outbox, applied from its record (operator token or the user's signature) | transfers `amount` tokens from the service to the user, if the account covers it; answers the transaction |
//! | `POST /deposits {"hash"}` | External_TXN, applied from its record | records the user's own token transfer to the service, once the chain shows it, and credits the sender |
//! | `GET /accounts` | read | every account: granted, deposited, paid out, balance |
//!
//! Amounts are token base units as JSON strings: answers give them in hex (`"0x1f4"`);
//! requests may give them in hex or decimal (`"500"`).
//!
//! The ledger is a file of JSON lines, one per effect, each with its log index (so the
//! index the app has applied is stored with the effect). A snapshot is the file's bytes up
//! to the applied index. Tokens only move through the service, so for every user the
//! chain's `balanceOf` equals what the ledger paid out minus what it recorded as
//! deposited: the testbed's check.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use alloy::primitives::{Address, B256, Signature, U256};
use alloy::sol_types::{SolCall, SolEvent};
use br2k_replication::{
    AppState, Builder, Config, Expected, Failure, LineFile, Outcome, Replicated, Reply, Request, SnapshotBuilder,
    TxCall, TxError,
};
use serde::{Deserialize, Serialize};

/// The token's ABI and bytecode expanded by alloy's `sol!`; the items' documentation is
/// the contract's NatSpec (`contracts/examples/PaymentToken.sol`; the committed artifact
/// `artifacts/PaymentToken.json` is kept true to it by `bash tools/bindings.sh --check`).
#[allow(missing_docs)]
mod generated {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug, PartialEq, Eq)]
        PaymentToken,
        "artifacts/PaymentToken.json"
    );
}

pub use generated::*;

/// What the service moves, and how sure a deposit must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The token contract.
    pub token: Address,
    /// The service's own address (its transaction key's): payouts come from it, deposits
    /// go to it.
    pub service: Address,
    /// Blocks a deposit must be under before it is recorded.
    pub confirmations: u64,
}

/// One change to the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    /// An operator credited `user`.
    Grant {
        /// The account.
        user: Address,
        /// How much.
        amount: U256,
    },
    /// `user` sent `amount` tokens to the service on chain, in transaction `hash`.
    Deposit {
        /// The account.
        user: Address,
        /// How much.
        amount: U256,
        /// The user's transaction.
        hash: B256,
    },
    /// The service sent `amount` tokens to `user`, in transaction `hash`.
    Payout {
        /// The account.
        user: Address,
        /// How much.
        amount: U256,
        /// The service's transaction.
        hash: B256,
    },
}

/// One line of the ledger file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The log index of the request whose effect it is.
    pub index: u64,
    /// The effect.
    #[serde(flatten)]
    pub effect: Effect,
}

/// One user's account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Credited by operators.
    pub granted: U256,
    /// Recorded deposits.
    pub deposited: U256,
    /// Paid out.
    pub paid_out: U256,
}

impl Account {
    /// What the user may still be paid.
    pub fn balance(&self) -> U256 {
        (self.granted + self.deposited).saturating_sub(self.paid_out)
    }
}

const LEDGER_FILE: &str = "ledger.jsonl";

/// Reads the ledger in `data_dir` without opening it for writing (for checkers; the
/// replica may be running). A torn last line is left out.
///
/// # Errors
/// When the file cannot be read or a complete line is not an effect.
pub fn read_ledger(data_dir: &Path) -> anyhow::Result<Vec<Line>> {
    let path = data_dir.join(LEDGER_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    };
    Ok(parse_lines(&path, &text)?.into_iter().map(|(line, _)| line).collect())
}

/// The service's state: the ledger, in memory and in a JSON-lines file.
#[derive(Debug)]
pub struct Ledger {
    inner: Mutex<Inner>,
    settings: Settings,
    /// Payouts being sent by this replica as leader, by log index: what they hold back
    /// of their user's balance until their effect is applied (never replicated: a new
    /// leader settles every unrecorded payout before it takes new ones).
    reserved: Mutex<HashMap<u64, (Address, U256)>>,
}

#[derive(Debug)]
struct Inner {
    /// The ledger file: it never holds half a line.
    file: LineFile,
    /// Byte offset and log index of each line, for rollback.
    lines: Vec<(u64, u64)>,
    applied: u64,
    accounts: BTreeMap<Address, Account>,
    deposits: HashSet<B256>,
}

impl Inner {
    /// The ledger `file` holds, whose whole lines are `text`.
    fn read(file: LineFile, text: &str) -> anyhow::Result<Self> {
        let parsed = parse_lines(file.path(), text)?;
        let mut inner =
            Self { file, lines: Vec::new(), applied: 0, accounts: BTreeMap::new(), deposits: HashSet::new() };
        inner.rebuild(&parsed);
        Ok(inner)
    }

    fn apply(&mut self, line: &Line) {
        match &line.effect {
            Effect::Grant { user, amount } => self.accounts.entry(*user).or_default().granted += *amount,
            Effect::Deposit { user, amount, hash } => {
                self.accounts.entry(*user).or_default().deposited += *amount;
                self.deposits.insert(*hash);
            }
            Effect::Payout { user, amount, .. } => self.accounts.entry(*user).or_default().paid_out += *amount,
        }
        self.applied = line.index;
    }

    /// Rebuilds the view from `lines` of `text`.
    fn rebuild(&mut self, parsed: &[(Line, u64)]) {
        self.accounts.clear();
        self.deposits.clear();
        self.lines.clear();
        self.applied = 0;
        let mut len = 0;
        for (line, line_len) in parsed {
            self.lines.push((len, line.index));
            len += line_len;
            self.apply(line);
        }
    }
}

/// The complete lines of a ledger file, each with its length; a torn last line (a crash
/// in the middle of a write) is left out.
fn parse_lines(path: &Path, text: &str) -> anyhow::Result<Vec<(Line, u64)>> {
    let mut out: Vec<(Line, u64)> = Vec::new();
    for raw in text.split_inclusive('\n') {
        if !raw.ends_with('\n') {
            break;
        }
        let line: Line = serde_json::from_str(raw.trim_end())
            .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), out.len() + 1))?;
        if out.last().is_some_and(|(last, _)| last.index >= line.index) {
            anyhow::bail!("{} line {}: log indexes must increase", path.display(), out.len() + 1);
        }
        out.push((line, raw.len() as u64));
    }
    Ok(out)
}

impl Ledger {
    /// Opens (or creates) the ledger in `data_dir`.
    ///
    /// # Errors
    /// When the file cannot be created or read, or a complete line is not an effect.
    pub fn open(data_dir: &Path, settings: Settings) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(LEDGER_FILE);
        let (file, text) = LineFile::open(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let inner = Inner::read(file, &text)?;
        Ok(Self { inner: Mutex::new(inner), settings, reserved: Mutex::new(HashMap::new()) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every account.
    pub fn accounts(&self) -> BTreeMap<Address, Account> {
        self.lock().accounts.clone()
    }

    /// What the service moves.
    pub const fn settings(&self) -> Settings {
        self.settings
    }

    /// Appends `line` and applies it. A write a full disk cuts off leaves the ledger as it
    /// was and returns the error (a local fault: the runtime tries again once there is
    /// room).
    fn push(&self, line: &Line) -> std::io::Result<()> {
        let mut inner = self.lock();
        let mut bytes = serde_json::to_vec(line).expect("lines serialize");
        bytes.push(b'\n');
        let offset = inner.file.append(&bytes)?;
        inner.lines.push((offset, line.index));
        inner.apply(line);
        Ok(())
    }

    /// Removes every effect of the request at `index` or later, and rebuilds the view.
    fn truncate_from(&self, index: u64) -> std::io::Result<()> {
        let mut inner = self.lock();
        let Some(keep) = inner.lines.iter().position(|&(_, i)| i >= index) else { return Ok(()) };
        let len = inner.lines[keep].0;
        inner.file.truncate(len)?;
        let text = std::fs::read_to_string(inner.file.path())?;
        let parsed = parse_lines(inner.file.path(), &text).map_err(std::io::Error::other)?;
        inner.rebuild(&parsed);
        Ok(())
    }

    /// Holds `amount` of `user`'s balance back for the payout at `index`, if the balance
    /// covers it and every other payout in flight.
    fn reserve(&self, index: u64, user: Address, amount: U256) -> Result<(), Reply> {
        let balance = self.lock().accounts.get(&user).map(Account::balance).unwrap_or_default();
        let mut reserved = self.reserved.lock().unwrap_or_else(PoisonError::into_inner);
        if reserved.contains_key(&index) {
            return Ok(()); // the same payout, run again
        }
        let held: U256 = reserved.values().filter(|(u, _)| *u == user).map(|(_, a)| *a).sum();
        if balance < held + amount {
            return Err(Reply::error(
                409,
                &format!(
                    "the account of {user} holds {balance}, {held} of it for payouts in flight: it cannot pay {amount}"
                ),
            ));
        }
        reserved.insert(index, (user, amount));
        Ok(())
    }

    fn release(&self, index: u64) {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner).remove(&index);
    }
}

impl AppState for Ledger {
    fn applied_index(&self) -> u64 {
        self.lock().applied
    }

    async fn persist(&self) -> std::io::Result<()> {
        let file = self.lock().file.handle()?;
        tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(std::io::Error::other)?
    }

    /// The file is append-only below the applied index: its first `len` bytes are the
    /// state at that index for good.
    fn snapshot(&self) -> std::io::Result<Box<dyn SnapshotBuilder>> {
        Ok(Box::new(self.lock().file.capture()?))
    }

    async fn restore(&self, file: &Path) -> std::io::Result<()> {
        let text = std::fs::read_to_string(file)?;
        let invalid = |e: anyhow::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string());
        if !text.is_empty() && !text.ends_with('\n') {
            return Err(invalid(anyhow::anyhow!("the snapshot ends with a torn line")));
        }
        parse_lines(file, &text).map_err(invalid)?;
        let mut inner = self.lock();
        let replaced = LineFile::create(inner.file.path(), &text)?;
        *inner = Inner::read(replaced, &text).map_err(invalid)?;
        Ok(())
    }
}

/// `POST /grants` and `POST /payouts`.
#[derive(Debug, Deserialize)]
struct AccountAsk {
    user: Address,
    amount: U256,
}

fn account_ask(request: &Request) -> Result<AccountAsk, Reply> {
    let ask: AccountAsk = request.json()?;
    if ask.amount.is_zero() {
        return Err(Reply::error(400, "the amount must be above 0"));
    }
    if ask.user.is_zero() {
        return Err(Reply::error(400, "the user must not be the zero address"));
    }
    Ok(ask)
}

async fn grant(state: std::sync::Arc<Ledger>, request: Request) -> Outcome {
    let ask = account_ask(&request)?;
    let line = Line { index: request.index, effect: Effect::Grant { user: ask.user, amount: ask.amount } };
    // An I/O error (a full disk) is this replica's fault, never the request's answer.
    state.push(&line)?;
    let balance = state.accounts().get(&ask.user).map(Account::balance).unwrap_or_default();
    Ok(Reply::json(200, &serde_json::json!({ "index": request.index, "user": ask.user, "balance": balance })))
}

async fn undo_grant(state: std::sync::Arc<Ledger>, request: Request) -> std::io::Result<()> {
    state.truncate_from(request.index)
}

/// What a payout's or a deposit's recorded answer says, from which every replica applies it.
#[derive(Debug, Serialize, Deserialize)]
struct Moved {
    user: Address,
    amount: U256,
    hash: B256,
}

async fn payout(state: std::sync::Arc<Ledger>, request: Request) -> Outcome {
    let ask = account_ask(&request)?;
    let outbox = request.outbox().ok_or_else(|| Reply::error(500, "the service has no transaction outbox"))?;
    state.reserve(request.index, ask.user, ask.amount)?;
    let input = PaymentToken::transferCall { to: ask.user, value: ask.amount }.abi_encode();
    let call = TxCall::call(state.settings.token, input);
    match outbox.send(call).await {
        Ok(receipt) if receipt.success => {
            let moved = Moved { user: ask.user, amount: ask.amount, hash: receipt.hash };
            Ok(Reply::json(
                200,
                // `resumed`: a leader that died had sent it; this one finished it from
                // the stored transaction.
                &serde_json::json!({
                    "payout": moved,
                    "nonce": receipt.nonce,
                    "block": receipt.block,
                    "resumed": receipt.replayed,
                }),
            ))
        }
        Ok(receipt) => {
            state.release(request.index);
            let why = if receipt.out_of_gas() {
                format!("it ran out of its gas limit ({})", receipt.gas_limit)
            } else {
                "the service may lack tokens".to_owned()
            };
            Err(Failure::refused(502, &format!("the transfer {} reverted: {why}", receipt.hash)))
        }
        Err(TxError::Refused(reason)) => {
            state.release(request.index);
            Err(Failure::refused(502, &format!("the chain refused the transfer: {reason}")))
        }
        // In doubt: the runtime settles it and answers then; the reservation stays.
        Err(e) => Err(Failure::refused(503, &e.to_string())),
    }
}

/// Every replica's effect of a recorded payout. A failed write is a fault: the replica
/// applies it again once it can (it is released only then).
async fn apply_payout(state: std::sync::Arc<Ledger>, request: Request, reply: Reply) -> std::io::Result<()> {
    let recorded: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    match serde_json::from_value::<Moved>(recorded["payout"].clone()) {
        Ok(Moved { user, amount, hash }) => {
            state.push(&Line { index: request.index, effect: Effect::Payout { user, amount, hash } })?;
        }
        // The same on every replica (it is the recorded answer): nothing to apply.
        Err(e) => tracing::error!(index = request.index, error = %e, "a recorded payout says no payout"),
    }
    state.release(request.index);
    Ok(())
}

#[derive(Debug, Deserialize)]
struct DepositAsk {
    hash: B256,
}

async fn deposit(state: std::sync::Arc<Ledger>, request: Request) -> Outcome {
    let DepositAsk { hash } = request.json()?;
    if state.lock().deposits.contains(&hash) {
        return Err(Failure::refused(409, &format!("the deposit {hash} is already recorded")));
    }
    let verifier = request.verifier().ok_or_else(|| Reply::error(500, "the service has no chain to verify on"))?;
    let settings = state.settings;
    let expected = Expected {
        to: settings.token,
        event: Some(PaymentToken::Transfer::SIGNATURE_HASH),
        confirmations: settings.confirmations,
    };
    let tx = verifier.verify(hash, &expected).await.map_err(|e| Reply::error(e.status(), &e.to_string()))?;
    let amount: U256 = tx
        .logs
        .iter()
        .filter_map(|log| PaymentToken::Transfer::decode_log(log).ok())
        .filter(|transfer| transfer.to == settings.service && transfer.from == tx.from)
        .map(|transfer| transfer.value)
        .sum();
    if amount.is_zero() {
        return Err(Failure::refused(
            422,
            &format!("transaction {hash} moves none of the sender's tokens to the service"),
        ));
    }
    Ok(Reply::json(201, &serde_json::json!({ "deposit": Moved { user: tx.from, amount, hash } })))
}

/// Every replica's effect of a recorded deposit. A failed write is a fault: the replica
/// applies it again once it can.
async fn apply_deposit(state: std::sync::Arc<Ledger>, request: Request, reply: Reply) -> std::io::Result<()> {
    let recorded: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let Ok(Moved { user, amount, hash }) = serde_json::from_value::<Moved>(recorded["deposit"].clone()) else {
        // The same on every replica (it is the recorded answer): nothing to apply.
        tracing::error!(index = request.index, "a recorded deposit says no deposit");
        return Ok(());
    };
    // Two requests for one transaction verified side by side: the first credits it.
    if state.lock().deposits.contains(&hash) {
        return Ok(());
    }
    state.push(&Line { index: request.index, effect: Effect::Deposit { user, amount, hash } })
}

async fn accounts(state: std::sync::Arc<Ledger>, _request: Request) -> Outcome {
    let accounts: BTreeMap<Address, serde_json::Value> = state
        .accounts()
        .into_iter()
        .map(|(user, account)| {
            let view = serde_json::json!({
                "granted": account.granted, "deposited": account.deposited,
                "paid_out": account.paid_out, "balance": account.balance(),
            });
            (user, view)
        })
        .collect();
    Ok(Reply::json(200, &serde_json::json!({ "applied_index": state.applied_index(), "accounts": accounts })))
}

/// The header a user's payout signature travels in: see [`payout_message`].
pub const PAYOUT_SIGNATURE_HEADER: &str = "Br2k-Payout-Signature";

/// The text a user signs, with the key of `user` (EIP-191 `personal_sign`, as
/// `cast wallet sign` and every wallet do), to ask the service whose transaction key is
/// `service` for a payout of `amount` (decimal base units) under `idempotency_key`. The
/// signature covers the key, so it cannot be sent again as another payout, and the
/// service, so it cannot be taken to another service.
pub fn payout_message(service: Address, user: Address, amount: U256, idempotency_key: &str) -> String {
    format!(
        "br2k-payments payout\nservice: {service}\nuser: {user}\namount: {amount}\nidempotency-key: {idempotency_key}"
    )
}

/// Who may ask for a payout: an operator (the operator token, as for grants), or the user
/// whose credit it pays out, by signing [`payout_message`]. Without it anyone who reaches
/// the service could push any user's credit out in tiny transfers, spending the service's
/// gas. Refused requests are answered 401/403 and never logged.
/// A payout's head carries the operator's token (checked here) or a user's signature
/// (checked with the body, by [`payout_admission`]): anything else is refused before the
/// body is read.
fn payout_credentials(
    operator: impl Fn(&Request) -> Result<(), Reply> + Send + Sync + 'static,
) -> impl Fn(&Request) -> Result<(), Reply> + Send + Sync + 'static {
    move |request: &Request| {
        if request.header("authorization").is_some() {
            return operator(request);
        }
        if request.header(PAYOUT_SIGNATURE_HEADER).is_none() {
            return Err(Reply::error(
                401,
                "a payout needs the operator's token (Authorization: Bearer) or the user's signature of the payout \
                 (Br2k-Payout-Signature): see the payments README",
            ));
        }
        Ok(())
    }
}

fn payout_admission(
    service: Address,
    operator: impl Fn(&Request) -> Result<(), Reply> + Send + Sync + 'static,
) -> impl Fn(&Request) -> Result<(), Reply> + Send + Sync + 'static {
    move |request: &Request| {
        if request.header("authorization").is_some() {
            return operator(request);
        }
        let Some(signature) = request.header(PAYOUT_SIGNATURE_HEADER) else {
            return Err(Reply::error(
                401,
                "a payout needs the operator's token (Authorization: Bearer) or the user's signature of the payout \
                 (Br2k-Payout-Signature): see the payments README",
            ));
        };
        let ask = account_ask(request)?;
        let Some(key) = request.idempotency_key.as_deref() else {
            return Err(Reply::error(400, "a signed payout needs an Idempotency-Key: the signature covers it"));
        };
        let signature: Signature = signature
            .trim()
            .parse()
            .map_err(|_| Reply::error(401, "Br2k-Payout-Signature is not a signature (65 bytes of hex)"))?;
        let message = payout_message(service, ask.user, ask.amount, key);
        match signature.recover_address_from_msg(message) {
            Ok(signer) if signer == ask.user => Ok(()),
            Ok(signer) => Err(Reply::error(
                403,
                &format!(
                    "the payout is signed by {signer}, not by the user {}: sign the payout's text (user, amount, \
                     Idempotency-Key, service {service}) with the user's key",
                    ask.user
                ),
            )),
            Err(_) => Err(Reply::error(401, "Br2k-Payout-Signature does not recover to any address")),
        }
    }
}

/// The payment service's routes on `config` (which must have an outbox: payouts are
/// sent through it, deposits verified on its chain). `operator_token` guards grants, and
/// payouts, which the users may also sign themselves ([`payout_message`]).
pub fn service(config: Config, operator_token: String) -> Builder<Ledger> {
    let service = config.outbox.as_ref().map(|outbox| outbox.signer.address()).unwrap_or_default();
    Replicated::builder(config)
        .replicate("POST", "/grants", grant)
        .rollback("POST", "/grants", undo_grant)
        .authenticate("POST", "/grants", br2k_replication::bearer_token(operator_token.clone()))
        .only_once_tx("POST", "/payouts", payout)
        .authenticate("POST", "/payouts", payout_credentials(br2k_replication::bearer_token(operator_token.clone())))
        .admit("POST", "/payouts", payout_admission(service, br2k_replication::bearer_token(operator_token)))
        .apply("POST", "/payouts", apply_payout)
        .external_txn("POST", "/deposits", deposit)
        .apply("POST", "/deposits", apply_deposit)
        .read("GET", "/accounts", accounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings { token: Address::repeat_byte(1), service: Address::repeat_byte(2), confirmations: 1 }
    }

    #[test]
    fn the_ledger_survives_reopen_and_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), settings()).unwrap();
        let user = Address::repeat_byte(9);
        let grant = |index, amount: u64| Line { index, effect: Effect::Grant { user, amount: U256::from(amount) } };
        ledger.push(&grant(1, 100)).unwrap();
        let paid =
            Line { index: 2, effect: Effect::Payout { user, amount: U256::from(30), hash: B256::repeat_byte(3) } };
        ledger.push(&paid).unwrap();
        ledger.push(&grant(4, 5)).unwrap();
        assert_eq!(ledger.accounts()[&user].balance(), U256::from(75));
        ledger.truncate_from(3).unwrap();
        assert_eq!((ledger.applied_index(), ledger.accounts()[&user].balance()), (2, U256::from(70)));
        drop(ledger);
        let path = dir.path().join(LEDGER_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"index\":5,\"kind\":");
        std::fs::write(&path, text).unwrap();
        let ledger = Ledger::open(dir.path(), settings()).unwrap();
        assert_eq!((ledger.applied_index(), ledger.accounts()[&user].paid_out), (2, U256::from(30)));
    }

    #[test]
    fn a_write_a_full_disk_cuts_off_is_cut_back_to_the_last_whole_line() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("disk");
        let disk = br2k_deploy::local::LimitedDisk::mount(&dir, 64 * 1024)
            .expect("a small tmpfs mounts (the tests run as root, as CI does)");
        let ledger = Ledger::open(&dir, settings()).unwrap();
        let user = Address::repeat_byte(9);
        let grant = |index| Line { index, effect: Effect::Grant { user, amount: U256::from(index) } };
        ledger.push(&grant(1)).unwrap();
        disk.fill().unwrap();
        let mut index = 2;
        let refused = loop {
            match ledger.push(&grant(index)) {
                Ok(()) => index += 1,
                Err(e) => break e,
            }
            assert!(index < 1000, "a full disk took {index} writes");
        };
        assert_eq!(refused.kind(), std::io::ErrorKind::StorageFull, "{refused}");
        let text = std::fs::read_to_string(dir.join(LEDGER_FILE)).unwrap();
        assert!(text.ends_with('\n'), "a torn line was left: {:?}", &text[text.len().saturating_sub(40)..]);
        let granted: u64 = (1..index).sum();
        assert_eq!(ledger.accounts()[&user].granted, U256::from(granted), "the view is what the file holds");
        assert_eq!(read_ledger(&dir).unwrap().len() as u64, index - 1);

        disk.free().unwrap();
        ledger.push(&grant(index)).unwrap();
        drop(ledger);
        let reopened = Ledger::open(&dir, settings()).unwrap();
        assert_eq!(reopened.applied_index(), index);
        assert_eq!(reopened.accounts()[&user].granted, U256::from(granted + index));
    }

    #[test]
    fn payouts_in_flight_hold_their_amount_back() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), settings()).unwrap();
        let user = Address::repeat_byte(9);
        ledger.push(&Line { index: 1, effect: Effect::Grant { user, amount: U256::from(100) } }).unwrap();
        assert!(ledger.reserve(2, user, U256::from(60)).is_ok());
        assert!(ledger.reserve(2, user, U256::from(60)).is_ok(), "the same payout again");
        let refused = ledger.reserve(3, user, U256::from(60)).unwrap_err();
        assert_eq!(refused.status, 409);
        ledger.release(2);
        assert!(ledger.reserve(3, user, U256::from(60)).is_ok());
    }

    #[tokio::test]
    async fn a_snapshot_restores_the_same_ledger_and_torn_ones_are_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ledger = Ledger::open(a.path(), settings()).unwrap();
        let user = Address::repeat_byte(9);
        ledger.push(&Line { index: 1, effect: Effect::Grant { user, amount: U256::from(7) } }).unwrap();
        let hash = B256::repeat_byte(4);
        ledger.push(&Line { index: 3, effect: Effect::Deposit { user, amount: U256::from(5), hash } }).unwrap();
        let mut bytes = Vec::new();
        ledger.snapshot().unwrap().build_snapshot(&mut bytes).unwrap();
        let snapshot = a.path().join("snap");
        std::fs::write(&snapshot, &bytes).unwrap();
        let other = Ledger::open(b.path(), settings()).unwrap();
        other.restore(&snapshot).await.unwrap();
        assert_eq!((other.applied_index(), other.accounts()), (3, ledger.accounts()));
        assert!(other.lock().deposits.contains(&hash));
        std::fs::write(&snapshot, &bytes[..bytes.len() - 2]).unwrap();
        assert_eq!(other.restore(&snapshot).await.unwrap_err().kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(other.applied_index(), 3);
    }
}
