//! Which replicas are live, the secret they share, and whether this one's etcd member
//! is still in the cluster.
//!
//! Each replica keeps `members/<replica>` in etcd, attached to a lease it renews every
//! third of [`crate::Timings::member_ttl`]: the record says where its snapshot can be
//! fetched and which one it holds. A replica that dies, freezes or is cut off stops
//! renewing, and its record vanishes when the lease expires, so the leader's compaction
//! never waits for it (it catches up from a snapshot when it returns).
//!
//! Snapshots are the whole state of the service, so peers fetch them with a token kept in
//! etcd (`peer_token`), which only the replicas reach; the HTTP front refuses anyone else.
//!
//! A member removed from the cluster by a membership change shuts itself down, which
//! from here looks like a member that merely stopped answering. So while the local
//! member answers, this replica remembers its member ID and the other members, and once
//! it stops answering asks them whether it is still listed: a removed replica says so in
//! its health, and serves nothing.

use std::sync::Mutex;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, EtcdTls, Timings};
use crate::data::{Keys, MemberRecord};
use crate::error::Result;
use crate::reporter::Reporter;
use crate::secret::random_token;
use crate::store::Store;
use crate::sync::lock;

/// This replica's membership: the record it keeps in etcd, and the peer token.
pub(crate) struct Membership {
    replica: String,
    timings: Timings,
    /// `members/<replica>`.
    key: String,
    /// What the record should say.
    record: watch::Sender<MemberRecord>,
    /// The peer token, once read from etcd.
    peer_token: Mutex<Option<String>>,
    /// How the other members are reached, to ask whether this one is still listed.
    keys: Keys,
    tls: Option<EtcdTls>,
}

/// The service's members as one replica sees them (`GET /br2k/members`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Roster {
    /// Every etcd member.
    pub members: Vec<RosterMember>,
    /// The membership change in progress as journaled (`membership/change`), if any.
    #[serde(default)]
    pub change: Option<serde_json::Value>,
}

/// One etcd member of a [`Roster`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RosterMember {
    /// Its replica (empty while an added member has not started).
    pub replica: String,
    /// etcd's member ID, in hex as etcdctl prints it.
    pub etcd_member: String,
    /// A learner: it receives the log but does not vote.
    pub learner: bool,
    /// Where its replica is reached, from the record it keeps while it lives; `None`
    /// when it keeps none (stopped, cut off, not started).
    pub url: Option<String>,
}

/// How often the membership of the local etcd member is checked.
const REMOVAL_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

impl Membership {
    /// A replica of `config` reachable at its public URL, holding no snapshot yet.
    pub(crate) fn new(config: &Config, keys: &Keys) -> Self {
        let record =
            MemberRecord { url: config.public_url.clone(), snapshot: None, catching_up: false, diverged: None };
        Self {
            replica: config.replica.clone(),
            timings: config.timings,
            key: keys.member(&config.replica),
            record: watch::Sender::new(record),
            peer_token: Mutex::default(),
            keys: keys.clone(),
            tls: config.etcd_tls.clone(),
        }
    }

    /// Keeps this replica's membership record in etcd while the replica runs: grants a
    /// lease, writes the record, renews the lease and rewrites the record when it changes;
    /// after any failure (a lease that expired while the member was frozen, etcd down),
    /// starts over.
    pub(crate) async fn keep(&self, store: &Store) {
        let ttl = self.timings.member_ttl;
        let key = &self.key;
        let mut changes = self.record.subscribe();
        let mut was_live = false;
        loop {
            let registered = async {
                let lease = store.grant_lease(ttl).await?;
                let record = changes.borrow_and_update().clone();
                store.put_leased(key, crate::codec::encode(&record), lease).await?;
                Ok::<_, crate::error::Error>(lease)
            }
            .await;
            let lease = match registered {
                Ok(lease) => lease,
                Err(e) => {
                    if was_live {
                        warn!(error = %e, "could not renew this replica's membership; compaction no longer waits for it");
                        was_live = false;
                    }
                    tokio::time::sleep(self.timings.follow_poll).await;
                    continue;
                }
            };
            if !was_live {
                info!(replica = %self.replica, ttl_s = ttl.as_secs(), "membership registered");
                was_live = true;
            }
            loop {
                tokio::select! {
                    () = tokio::time::sleep(ttl / 3) => {
                        if !matches!(store.renew(lease).await, Ok(true)) {
                            break;
                        }
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let record = changes.borrow_and_update().clone();
                        if store.put_leased(key, crate::codec::encode(&record), lease).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Watches whether the local etcd member is still in the cluster (see the module's
    /// description), saying so in the status.
    pub(crate) async fn watch_removal(&self, store: &Store, reporter: &Reporter) {
        // The local member's ID and the others' client URLs, as it last listed them.
        let mut known: Option<(u64, Vec<String>)> = None;
        loop {
            tokio::time::sleep(REMOVAL_CHECK).await;
            let listed = match store.cluster_members().await {
                Ok((me, members)) => {
                    let listed = members.iter().any(|m| m.id == me);
                    let others = members.into_iter().filter(|m| m.id != me).flat_map(|m| m.client_urls).collect();
                    known = Some((me, others));
                    Some(listed)
                }
                Err(_) => match &known {
                    Some((me, others)) => self.listed_by_others(*me, others, store).await,
                    None => None,
                },
            };
            let Some(listed) = listed else { continue };
            if reporter.status.borrow().removed_from_etcd == listed {
                if listed {
                    info!(replica = %self.replica, "this replica's etcd member is in the cluster again");
                } else {
                    warn!(replica = %self.replica,
                        "this replica's etcd member was removed from the cluster (a membership change): it serves nothing any more");
                }
                reporter.set_status(|s| s.removed_from_etcd = !listed);
            }
        }
    }

    /// Whether member `me` is listed by the first of `others` that answers.
    async fn listed_by_others(&self, me: u64, others: &[String], store: &Store) -> Option<bool> {
        for endpoint in others {
            let timeout = self.timings.etcd_timeout;
            let Ok(other) =
                Store::connect(endpoint, self.keys.clone(), timeout, store.stats(), self.tls.as_ref()).await
            else {
                continue;
            };
            if let Ok((_, members)) = other.cluster_members().await {
                return Some(members.iter().any(|m| m.id == me));
            }
        }
        None
    }

    /// The service's etcd members with the URLs their replicas' live records give, and the
    /// membership change in progress: what `GET /br2k/members` answers, so that a view of
    /// the service (the dashboard, `br2k status`) finds every replica from any one of them,
    /// wherever they run.
    pub(crate) async fn roster(store: &Store, service: &str) -> Result<Roster> {
        let (_, listed) = store.cluster_members().await?;
        let records = store.members().await?;
        let members = listed
            .into_iter()
            .map(|m| RosterMember {
                url: records.iter().find(|(replica, _)| *replica == m.name).map(|(_, r)| r.url.clone()),
                replica: m.name,
                etcd_member: format!("{:x}", m.id),
                learner: m.learner,
            })
            .collect();
        let key = crate::data::membership_change_key(service);
        let change = match store.get(&key).await? {
            Some(kv) => serde_json::from_slice(kv.value()).ok(),
            None => None,
        };
        Ok(Roster { members, change })
    }

    /// Changes what this replica's membership record says.
    pub(crate) fn set(&self, change: impl FnOnce(&mut MemberRecord)) {
        self.record.send_if_modified(|record| {
            let before = record.clone();
            change(record);
            *record != before
        });
    }

    /// The peer token, made by the first replica that asks and cached.
    pub(crate) async fn peer_token(&self, store: &Store) -> Result<String> {
        if let Some(token) = lock(&self.peer_token).clone() {
            return Ok(token);
        }
        let token = store.peer_token(&random_token()).await?;
        *lock(&self.peer_token) = Some(token.clone());
        Ok(token)
    }
}
