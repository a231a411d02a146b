//! Which replicas are live, and the secret they share.
//!
//! Each replica keeps `members/<replica>` in etcd, attached to a lease it renews every
//! third of [`crate::Timings::member_ttl`]: the record says where its snapshot can be
//! fetched and which one it holds. A replica that dies, freezes or is cut off stops
//! renewing, and its record vanishes when the lease expires, so the leader's compaction
//! never waits for it (it catches up from a snapshot when it returns).
//!
//! Snapshots are the whole state of the service, so peers fetch them with a token kept in
//! etcd (`peer_token`), which only the replicas reach; the HTTP front refuses anyone else.

use std::sync::Arc;

use tracing::{info, warn};

use crate::app::AppState;
use crate::data::MemberRecord;
use crate::error::Result;
use crate::runtime::Runtime;
use crate::secret::random_token;
use crate::sync::lock;

impl<S: AppState> Runtime<S> {
    /// Keeps this replica's membership record in etcd while the replica runs: grants a
    /// lease, writes the record, renews the lease and rewrites the record when it changes;
    /// after any failure (a lease that expired while the member was frozen, etcd down),
    /// starts over.
    pub(crate) async fn keep_membership(self: Arc<Self>) {
        let ttl = self.config.timings.member_ttl;
        let key = self.keys.member(&self.config.replica);
        let mut changes = self.member.subscribe();
        let mut was_live = false;
        loop {
            let registered = async {
                let lease = self.store().grant_lease(ttl).await?;
                let record = changes.borrow_and_update().clone();
                self.store().put_leased(&key, crate::codec::encode(&record), lease).await?;
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
                    tokio::time::sleep(self.config.timings.follow_poll).await;
                    continue;
                }
            };
            if !was_live {
                info!(replica = %self.config.replica, ttl_s = ttl.as_secs(), "membership registered");
                was_live = true;
            }
            loop {
                tokio::select! {
                    () = tokio::time::sleep(ttl / 3) => {
                        if !matches!(self.store().renew(lease).await, Ok(true)) {
                            break;
                        }
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let record = changes.borrow_and_update().clone();
                        if self.store().put_leased(&key, crate::codec::encode(&record), lease).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Changes what this replica's membership record says.
    pub(crate) fn set_member(&self, change: impl FnOnce(&mut MemberRecord)) {
        self.member.send_if_modified(|record| {
            let before = record.clone();
            change(record);
            *record != before
        });
    }

    /// The peer token, made by the first replica that asks and cached.
    pub(crate) async fn peer_token(&self) -> Result<String> {
        if let Some(token) = lock(&self.peer_token).clone() {
            return Ok(token);
        }
        let token = self.store().peer_token(&random_token()).await?;
        *lock(&self.peer_token) = Some(token.clone());
        Ok(token)
    }
}
