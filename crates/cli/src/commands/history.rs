//! The registry's event history: read from the registry's first block once, then followed
//! block by block. `br2k status` takes a service's open claims from it; the dashboard also
//! shows each service's timeline (locations, claims, recoveries, backups) and lists the
//! services the registry knows.

use std::collections::{BTreeMap, HashMap, VecDeque};

use alloy::primitives::{Address, B256};
use alloy::rpc::types::Log;
use alloy::sol_types::SolEvent;
use br2k_bindings::ServiceRegistry::{
    BackupRecorded, Claim, LocationReset, ManagerTransferred, NewLocation, RecoveryInfoUpdated, ServiceRegistered,
    StateChanged,
};
use br2k_bindings::ServiceState;
use br2k_resolver::{RegistryClient, printable};
use serde::Serialize;

/// At most this many blocks per log query: public nodes refuse wider ranges.
const BLOCKS_PER_QUERY: u64 = 5_000;

/// Timeline entries kept per service (the oldest are dropped first).
const TIMELINE_LENGTH: usize = 200;

/// The events followed.
const SIGNATURES: [B256; 8] = [
    ServiceRegistered::SIGNATURE_HASH,
    NewLocation::SIGNATURE_HASH,
    LocationReset::SIGNATURE_HASH,
    Claim::SIGNATURE_HASH,
    StateChanged::SIGNATURE_HASH,
    RecoveryInfoUpdated::SIGNATURE_HASH,
    BackupRecorded::SIGNATURE_HASH,
    ManagerTransferred::SIGNATURE_HASH,
];

/// One thing that happened to a service, in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Happening {
    /// Unix seconds: the block's time for what the chain recorded, the moment it was seen
    /// for what the dashboard saw itself (a leader change).
    pub(crate) at: u64,
    /// The block that recorded it, when the chain did.
    pub(crate) block: Option<u64>,
    /// `location`, `claim`, `state`, `recovery-info`, `backup`, `manager`, `registered`,
    /// `leader` (seen by the dashboard), `unreadable` (a log that did not decode).
    pub(crate) kind: &'static str,
    pub(crate) text: String,
}

/// A claim filed since the service's last new location: nobody has answered it yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OpenClaim {
    pub(crate) block: u64,
    pub(crate) claimant: Address,
    pub(crate) reason: String,
}

#[derive(Debug, Default)]
struct ServiceHistory {
    timeline: VecDeque<Happening>,
    open_claims: Vec<OpenClaim>,
}

/// What the registry's events say, up to the last block read.
#[derive(Debug)]
pub(crate) struct RegistryHistory {
    next_block: u64,
    /// Every service registered under a name br2k accepts (see
    /// `br2k_replication::is_valid_name`): its name (in name order) and id. Anyone can
    /// register any name; one that could name a file or a URL path is never followed.
    names: BTreeMap<String, B256>,
    /// Each service's manager, as the events say.
    managers: HashMap<B256, Address>,
    services: HashMap<B256, ServiceHistory>,
    /// The last block whose time was read, and that time: logs come in block order.
    last_block_time: Option<(u64, u64)>,
}

impl RegistryHistory {
    /// Nothing read yet; [`Self::follow`] reads from the registry's first block.
    pub(crate) fn new(registry: &RegistryClient) -> Self {
        Self {
            next_block: registry.first_block(),
            names: BTreeMap::new(),
            managers: HashMap::new(),
            services: HashMap::new(),
            last_block_time: None,
        }
    }

    /// Reads the blocks made since the last call (all of them, the first time).
    ///
    /// # Errors
    /// RPC and timeout errors; what was read before the error is kept, and the next call
    /// goes on from there.
    pub(crate) async fn follow(&mut self, registry: &RegistryClient) -> anyhow::Result<()> {
        let latest = registry.chain().block_number().await?;
        while self.next_block <= latest {
            let to = latest.min(self.next_block + BLOCKS_PER_QUERY - 1);
            let logs = registry.logs(SIGNATURES.to_vec(), self.next_block, to).await?;
            for log in &logs {
                let at = self.time_of(registry, log).await?;
                self.record(log, at);
            }
            self.next_block = to + 1;
        }
        Ok(())
    }

    /// The names of the services registered, in name order.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    /// The names of the services `manager` manages now, in name order.
    pub(crate) fn managed_by(&self, manager: Address) -> impl Iterator<Item = &str> {
        self.names.iter().filter(move |(_, id)| self.managers.get(*id) == Some(&manager)).map(|(n, _)| n.as_str())
    }

    /// Service `id`'s claims since its last new location.
    pub(crate) fn open_claims(&self, id: B256) -> &[OpenClaim] {
        self.services.get(&id).map_or(&[], |s| &s.open_claims)
    }

    /// Service `id`'s timeline, oldest first.
    pub(crate) fn timeline(&self, id: B256) -> impl Iterator<Item = &Happening> {
        self.services.get(&id).into_iter().flat_map(|s| s.timeline.iter())
    }

    /// Adds what the caller saw itself (not on chain) to service `id`'s timeline.
    pub(crate) fn note(&mut self, id: B256, happening: Happening) {
        push(&mut self.services.entry(id).or_default().timeline, happening);
    }

    async fn time_of(&mut self, registry: &RegistryClient, log: &Log) -> anyhow::Result<u64> {
        let block = log.block_number.unwrap_or(0);
        if let Some(at) = log.block_timestamp {
            return Ok(at);
        }
        if let Some((known, at)) = self.last_block_time
            && known == block
        {
            return Ok(at);
        }
        let at = registry.chain().block_timestamp(block).await?.unwrap_or(0);
        self.last_block_time = Some((block, at));
        Ok(at)
    }

    fn record(&mut self, log: &Log, at: u64) {
        let Some(&id) = log.topics().get(1) else { return };
        let block = log.block_number;
        let (kind, text) = match describe(log) {
            Ok(Described::Registered(name)) => {
                if br2k_replication::is_valid_name(&name) {
                    self.names.insert(name.clone(), id);
                    ("registered", format!("registered as {name:?}"))
                } else {
                    ("registered", format!("registered as {:?}, a name br2k does not follow", printable(&name)))
                }
            }
            Ok(Described::Manager(manager, text)) => {
                self.managers.insert(id, manager);
                ("manager", text)
            }
            Ok(Described::Claim(claim)) => {
                let text = format!("claim by {}: {}", claim.claimant, claim.reason);
                self.services.entry(id).or_default().open_claims.push(OpenClaim { block: block.unwrap_or(0), ..claim });
                ("claim", text)
            }
            Ok(Described::Location(text)) => {
                self.services.entry(id).or_default().open_claims.clear();
                ("location", text)
            }
            Ok(Described::Other(kind, text)) => (kind, text),
            Err(e) => ("unreadable", format!("a log in transaction {:?} did not decode: {e}", log.transaction_hash)),
        };
        push(&mut self.services.entry(id).or_default().timeline, Happening { at, block, kind, text });
    }
}

fn push(timeline: &mut VecDeque<Happening>, happening: Happening) {
    if timeline.len() == TIMELINE_LENGTH {
        timeline.pop_front();
    }
    timeline.push_back(happening);
}

enum Described {
    Registered(String),
    Claim(OpenClaim),
    /// A new location: it answers every claim before it.
    Location(String),
    /// A new manager.
    Manager(Address, String),
    Other(&'static str, String),
}

fn describe(log: &Log) -> Result<Described, alloy::sol_types::Error> {
    let topic = log.topic0().copied().unwrap_or_default();
    Ok(match topic {
        ServiceRegistered::SIGNATURE_HASH => {
            Described::Registered(log.log_decode::<ServiceRegistered>()?.inner.data.name)
        }
        NewLocation::SIGNATURE_HASH => {
            let e = log.log_decode::<NewLocation>()?.inner.data;
            Described::Location(format!("new location {} (epoch {})", printable(&e.location), e.epoch))
        }
        LocationReset::SIGNATURE_HASH => {
            let e = log.log_decode::<LocationReset>()?.inner.data;
            Described::Location(format!(
                "location reset to {} (epoch {}, was {})",
                printable(&e.location),
                e.epoch,
                e.previousEpoch
            ))
        }
        Claim::SIGNATURE_HASH => {
            let e = log.log_decode::<Claim>()?.inner.data;
            // Anyone can claim with any text: shown escaped wherever it is printed.
            Described::Claim(OpenClaim { block: 0, claimant: e.claimant, reason: printable(&e.reason).into_owned() })
        }
        StateChanged::SIGNATURE_HASH => {
            let state = log.log_decode::<StateChanged>()?.inner.data.state;
            let text = match ServiceState::try_from(state) {
                Ok(ServiceState::Recovering) => "recovery started: the manager redeploys it".to_owned(),
                Ok(state) => format!("state {state}"),
                Err(unknown) => format!("state unknown to this version ({})", unknown.0),
            };
            Described::Other("state", text)
        }
        RecoveryInfoUpdated::SIGNATURE_HASH => {
            log.log_decode::<RecoveryInfoUpdated>()?;
            Described::Other("recovery-info", "recovery info updated".to_owned())
        }
        BackupRecorded::SIGNATURE_HASH => {
            let e = log.log_decode::<BackupRecorded>()?.inner.data;
            Described::Other("backup", format!("backup at index {} recorded", e.index))
        }
        ManagerTransferred::SIGNATURE_HASH => {
            let e = log.log_decode::<ManagerTransferred>()?.inner.data;
            let text = if e.from == Address::ZERO {
                format!("managed by {}", e.to)
            } else {
                format!("manager {} handed over to {}", e.from, e.to)
            };
            Described::Manager(e.to, text)
        }
        _ => Described::Other("unreadable", format!("an event this version does not know ({topic})")),
    })
}

#[cfg(test)]
mod tests {
    use alloy::primitives::keccak256;

    use super::*;

    fn log(event: &impl alloy::sol_types::SolEvent, block: u64) -> Log {
        Log {
            inner: alloy::primitives::Log { address: Address::repeat_byte(1), data: event.encode_log_data() },
            block_number: Some(block),
            ..Log::default()
        }
    }

    fn registered(name: &str, manager: Address) -> Log {
        log(&ServiceRegistered { id: keccak256(name), name: name.into(), manager }, 1)
    }

    fn managed(name: &str, from: Address, to: Address) -> Log {
        log(&ManagerTransferred { id: keccak256(name), from, to }, 1)
    }

    #[test]
    fn a_name_br2k_would_not_accept_is_never_followed_and_managers_are_tracked() {
        let (me, other) = (Address::repeat_byte(0xA), Address::repeat_byte(0xB));
        let mut history = RegistryHistory {
            next_block: 0,
            names: BTreeMap::new(),
            managers: HashMap::new(),
            services: HashMap::new(),
            last_block_time: None,
        };
        for (name, manager) in [("ledger", me), ("payments", other), ("../../etc", me), ("evil\nline", me)] {
            history.record(&registered(name, manager), 1);
            history.record(&managed(name, Address::ZERO, manager), 1);
        }
        assert_eq!(history.names().collect::<Vec<_>>(), ["ledger", "payments"], "only names br2k accepts");
        assert_eq!(history.managed_by(me).collect::<Vec<_>>(), ["ledger"]);
        history.record(&managed("payments", other, me), 2);
        assert_eq!(history.managed_by(me).collect::<Vec<_>>(), ["ledger", "payments"], "a transfer counts");
        let id: B256 = keccak256("evil\nline");
        let shown: Vec<String> = history.timeline(id).map(|h| h.text.clone()).collect();
        assert!(shown.iter().all(|t| !t.contains('\n')), "its name is shown escaped: {shown:?}");
    }
}
