//! Running a membership change: refusing what is unsafe, journaling it, and carrying it
//! out one idempotent step at a time, so that whoever runs it next (after a crash of the
//! CLI, the manager or a replica) finishes it.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, MemberAddOptions, PutOptions, Txn, TxnOp};
use tokio::time::Instant;

use crate::cluster::{Cluster, MemberView, quorum, worth_retrying};
use crate::error::{HostError, MembershipError, Result};
use crate::journal::{Change, ChangeKind, Step};

/// What a backend does for a membership change: start and stop a replica, delete its
/// data, and record the replica count where a recovery reads it.
pub trait ReplicaHost: Sync {
    /// The peer URL replica `replica`'s etcd member is added with (and advertises).
    fn peer_url(&self, replica: &str) -> String;

    /// Starts `replica` fresh, its etcd member joining the running cluster as
    /// `existing` with membership `initial_cluster`. Starting one that runs is no error.
    fn start(&self, replica: &str, initial_cluster: &str) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Stops `replica` (app and etcd member). Stopping one that does not run is no error.
    fn stop(&self, replica: &str) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Deletes `replica`'s data. Deleting what is gone is no error.
    fn delete_data(&self, replica: &str) -> impl Future<Output = Result<(), HostError>> + Send;

    /// Records that the service now has `replicas` replicas (the registry's recovery
    /// info, so that a recovery redeploys this shape).
    fn record_replicas(&self, replicas: u32) -> impl Future<Output = Result<(), HostError>> + Send;
}

/// How a change runs.
#[derive(Clone, Debug)]
pub struct ChangeOptions {
    /// Allow fewer than 3 voters after the change (no longer surviving a lost member).
    pub allow_below_3: bool,
    /// A joining replica is caught up when the LPI it records in etcd is at most this
    /// many entries behind SSI. What it records is what it has made durable: with
    /// snapshots on, up to its latest snapshot, so up to a snapshot interval behind what
    /// it applied. Hence the snapshot interval plus the trailing window (what a replica
    /// replays rather than fetching a snapshot).
    pub catch_up_window: u64,
    /// The longest one step may wait (for etcd to allow a reconfiguration, a learner to
    /// catch up, leadership to move).
    pub step_timeout: Duration,
    /// How long the lock outlives a runner that died.
    pub lock_ttl: Duration,
}

impl Default for ChangeOptions {
    fn default() -> Self {
        Self {
            allow_below_3: false,
            catch_up_window: catch_up_window(&br2k_replication::SnapshotPolicy::default()),
            step_timeout: Duration::from_secs(300),
            lock_ttl: Duration::from_secs(10),
        }
    }
}

/// The catch-up window for replicas that snapshot by `policy` (see
/// [`ChangeOptions::catch_up_window`]).
pub fn catch_up_window(policy: &br2k_replication::SnapshotPolicy) -> u64 {
    policy.interval.saturating_add(policy.trailing)
}

/// One service's membership, changed through `host`.
pub struct Membership<'a, H> {
    service: String,
    cluster: Cluster,
    host: &'a H,
    options: ChangeOptions,
    progress: &'a (dyn Fn(&str) + Sync),
}

impl<'a, H: ReplicaHost> Membership<'a, H> {
    /// The membership of `service`, reached through `cluster`, changed through `host`;
    /// each step is reported to `progress`.
    pub fn new(
        service: &str,
        cluster: Cluster,
        host: &'a H,
        options: ChangeOptions,
        progress: &'a (dyn Fn(&str) + Sync),
    ) -> Self {
        Self { service: service.to_owned(), cluster, host, options, progress }
    }

    /// The change in progress, if any.
    ///
    /// # Errors
    /// When etcd does not answer or the journal does not decode.
    pub async fn in_progress(&self) -> Result<Option<Change>> {
        Ok(self.read_journal().await?.map(|(change, _)| change))
    }

    /// Every etcd member, with its health.
    ///
    /// # Errors
    /// When no member answers.
    pub async fn members(&self) -> Result<Vec<MemberView>> {
        self.cluster.members().await
    }

    /// Checks `kind` against the members as they are now, journals it and carries it
    /// out. When the same change is journaled already it is resumed; another one is
    /// refused.
    ///
    /// # Errors
    /// A refusal (what would be unsafe, and why), or the step that stopped; a stopped
    /// change stays journaled.
    pub async fn change(&self, kind: ChangeKind) -> Result<Change> {
        let lock = self.lock().await?;
        let result = self.change_locked(kind).await;
        lock.release().await;
        result
    }

    async fn change_locked(&self, kind: ChangeKind) -> Result<Change> {
        if let Some((journaled, revision)) = self.read_journal().await? {
            if journaled.kind != kind {
                return Err(MembershipError::InProgress(Box::new(journaled)));
            }
            (self.progress)(&format!("resuming {} at: {}", journaled.kind, journaled.next));
            return self.run(journaled, revision).await;
        }
        let members = self.cluster.members().await?;
        let replicas_after = self.check(&kind, &members)?;
        let change = Change::new(kind, replicas_after);
        let revision = self.begin(&change).await?;
        (self.progress)(&format!(
            "{}: {} steps, {replicas_after} replicas after",
            change.kind,
            change.kind.steps().len()
        ));
        self.run(change, revision).await
    }

    /// Finishes the journaled change, if there is one.
    ///
    /// # Errors
    /// As [`Self::change`].
    pub async fn resume(&self) -> Result<Option<Change>> {
        let lock = self.lock().await?;
        self.run_journaled(lock, "resuming").await
    }

    /// Under `lock`: finishes the journaled change, if there still is one, then lets the
    /// lock go.
    async fn run_journaled(&self, lock: LockGuard, verb: &str) -> Result<Option<Change>> {
        let result = async {
            let Some((change, revision)) = self.read_journal().await? else { return Ok(None) };
            (self.progress)(&format!("{verb} {} at: {}", change.kind, change.next));
            self.run(change, revision).await.map(Some)
        }
        .await;
        lock.release().await;
        result
    }

    /// Finishes the journaled change if nobody is running it (its runner died or was
    /// killed): what a manager does on its rounds. `Ok(None)` when no change is journaled
    /// or a live runner holds the lock.
    ///
    /// # Errors
    /// As [`Self::change`].
    pub async fn finish_abandoned(&self) -> Result<Option<Change>> {
        if self.read_journal().await?.is_none() {
            return Ok(None);
        }
        let lock = match self.try_lock().await? {
            Ok(lock) => lock,
            Err((holder, lease)) if holder_is_gone(&holder) => {
                (self.progress)(&format!("the change lock was held by {holder}, which is gone: taking it over"));
                self.cluster.call("let go a dead runner's lock", async |c| c.lease_revoke(lease).await).await?;
                match self.try_lock().await? {
                    Ok(lock) => lock,
                    Err(_) => return Ok(None), // someone else was quicker
                }
            }
            Err(_) => return Ok(None),
        };
        self.run_journaled(lock, "finishing the abandoned").await
    }

    /// What would make `kind` unsafe now; the voters after it when nothing does.
    fn check(&self, kind: &ChangeKind, members: &[MemberView]) -> Result<u32> {
        let voters: Vec<&MemberView> = members.iter().filter(|m| m.is_voter()).collect();
        if let Some(learner) = members.iter().find(|m| m.learner) {
            return Err(MembershipError::Refused(format!(
                "etcd member {} ({}) is a learner that no journaled change owns; remove it (`etcdctl member remove {:x}`) or promote it first",
                learner.name,
                learner.peer_urls.join(","),
                learner.id
            )));
        }
        let mut after = voters.len();
        if let Some(joining) = kind.joining() {
            let peer_url = self.host.peer_url(joining);
            let leaving = kind.leaving();
            if let Some(taken) =
                members.iter().find(|m| m.is_replica(joining, Some(&peer_url)) && Some(m.name.as_str()) != leaving)
            {
                return Err(MembershipError::Refused(format!(
                    "{joining} is already a member (etcd member {:x}, {})",
                    taken.id,
                    taken.peer_urls.join(",")
                )));
            }
            after += 1;
        }
        if let Some(leaving) = kind.leaving() {
            let Some(member) = members.iter().find(|m| m.name == leaving) else {
                return Err(MembershipError::Refused(format!(
                    "{leaving} is not a member of the etcd cluster (members: {})",
                    members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                )));
            };
            after -= 1;
            // While it is gone and before a replacement votes, the others must keep a quorum.
            let others_up = voters.iter().filter(|v| v.id != member.id && v.healthy).count();
            if others_up < quorum(after) {
                let down: Vec<&str> = voters.iter().filter(|v| !v.healthy).map(|v| v.name.as_str()).collect();
                return Err(MembershipError::Refused(format!(
                    "removing {leaving} leaves {after} voters, of which {others_up} answer now ({} down: {}); they need {} to keep a quorum",
                    down.len(),
                    down.join(", "),
                    quorum(after)
                )));
            }
        }
        let final_count = match kind {
            ChangeKind::Replace { .. } => voters.len(),
            _ => after,
        };
        if final_count < 3 && !self.options.allow_below_3 {
            return Err(MembershipError::Refused(format!(
                "{kind} leaves {final_count} voters: fewer than 3 cannot survive the loss of one; pass --allow-below-3 to do it anyway"
            )));
        }
        if final_count == 0 {
            return Err(MembershipError::Refused(format!("{kind} leaves no voter")));
        }
        u32::try_from(final_count).map_err(|_| MembershipError::Refused("too many replicas".into()))
    }

    async fn run(&self, mut change: Change, mut revision: i64) -> Result<Change> {
        loop {
            let step = change.next;
            let started = Instant::now();
            (self.progress)(&format!("{}: {step} ...", change.kind));
            self.run_step(&change, step).await?;
            (self.progress)(&format!("{}: {step}: done ({:.1} s)", change.kind, started.elapsed().as_secs_f64()));
            match change.step_after_next() {
                Some(next) => {
                    change.advance(next);
                    revision = self.advance_journal(&change, revision).await?;
                }
                None => {
                    change.advance(step);
                    self.finish_journal(revision).await?;
                    (self.progress)(&format!("{}: done", change.kind));
                    return Ok(change);
                }
            }
        }
    }

    async fn run_step(&self, change: &Change, step: Step) -> Result<()> {
        let replica = match step {
            Step::MoveLeadership | Step::RemoveMember | Step::StopReplica | Step::DeleteData => change.kind.leaving(),
            _ => change.kind.joining(),
        }
        .unwrap_or_default()
        .to_owned();
        let host_failed = |source| MembershipError::Host { step, replica: replica.clone(), source };
        match step {
            Step::MoveLeadership => self.move_leadership(&replica).await,
            Step::RemoveMember => self.remove_member(&replica).await,
            Step::StopReplica => self.host.stop(&replica).await.map_err(host_failed),
            Step::DeleteData => {
                self.host.delete_data(&replica).await.map_err(host_failed)?;
                self.clear_records(&replica).await
            }
            Step::AddLearner => self.add_learner(&replica).await,
            Step::StartReplica => {
                let initial_cluster = self.initial_cluster(&replica).await?;
                self.host.start(&replica, &initial_cluster).await.map_err(host_failed)
            }
            Step::CatchUp => self.catch_up(&replica).await,
            Step::Promote => self.promote(&replica).await,
            Step::RecordCount => self.host.record_replicas(change.replicas_after).await.map_err(host_failed),
        }
    }

    /// Deletes the records the removed replica kept in etcd (its LPI, its membership
    /// record), so that nothing reads it as a replica any more.
    async fn clear_records(&self, replica: &str) -> Result<()> {
        for key in br2k_replication::replica_record_keys(&self.service, replica) {
            self.cluster.call("delete the replica's records", async |c| c.delete(key.as_str(), None).await).await?;
        }
        Ok(())
    }

    /// `replica`'s member, found by name or by the peer URL it is added with.
    async fn member_of(&self, replica: &str) -> Result<Option<MemberView>> {
        let peer_url = self.host.peer_url(replica);
        Ok(self.cluster.members().await?.into_iter().find(|m| m.is_replica(replica, Some(&peer_url))))
    }

    async fn move_leadership(&self, replica: &str) -> Result<()> {
        let deadline = Instant::now() + self.options.step_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            let members = self.cluster.members().await?;
            let Some(leaving) = members.iter().find(|m| m.name == replica) else { return Ok(()) };
            if !leaving.leader {
                return Ok(());
            }
            let Some(target) =
                members.iter().find(|m| m.is_voter() && m.healthy && m.id != leaving.id && !m.name.is_empty())
            else {
                return Err(MembershipError::Refused(format!(
                    "{replica} leads and no other voter answers to take over"
                )));
            };
            // Only the leader may hand its leadership on.
            let reason = match self
                .cluster
                .on_any("move leadership", &leaving.client_urls, async |c| c.move_leader(target.id).await)
                .await
            {
                Ok(_) => {
                    (self.progress)(&format!("etcd leadership moved from {replica} to {}", target.name));
                    continue;
                }
                Err(e) => e.to_string(),
            };
            self.wait_or_fail(Step::MoveLeadership, &reason, deadline, &mut delay).await?;
        }
    }

    async fn remove_member(&self, replica: &str) -> Result<()> {
        let deadline = Instant::now() + self.options.step_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            let Some(member) = self.member_of(replica).await? else { return Ok(()) };
            let reason = match self.cluster.call("remove the member", async |c| c.member_remove(member.id).await).await
            {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            self.wait_or_fail(Step::RemoveMember, &reason, deadline, &mut delay).await?;
        }
    }

    async fn add_learner(&self, replica: &str) -> Result<()> {
        let peer_url = self.host.peer_url(replica);
        let deadline = Instant::now() + self.options.step_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            if self.member_of(replica).await?.is_some() {
                return Ok(());
            }
            let added = self
                .cluster
                .call("add the learner", async |c| {
                    c.member_add([peer_url.as_str()], Some(MemberAddOptions::new().with_is_learner())).await
                })
                .await;
            let reason = match added {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            self.wait_or_fail(Step::AddLearner, &reason, deadline, &mut delay).await?;
        }
    }

    /// The membership `replica`'s etcd member joins with, as `etcdctl member add` prints it.
    async fn initial_cluster(&self, replica: &str) -> Result<String> {
        let peer_url = self.host.peer_url(replica);
        let members = self.cluster.members().await?;
        if !members.iter().any(|m| m.is_replica(replica, Some(&peer_url))) {
            return Err(MembershipError::Refused(format!(
                "{replica} is not a member (was it removed by hand?); remove the journaled change's learner step by running the change again"
            )));
        }
        Ok(members
            .iter()
            .flat_map(|m| {
                let name = if m.is_replica(replica, Some(&peer_url)) { replica } else { m.name.as_str() };
                m.peer_urls.iter().map(move |url| format!("{name}={url}"))
            })
            .collect::<Vec<_>>()
            .join(","))
    }

    async fn catch_up(&self, replica: &str) -> Result<()> {
        let deadline = Instant::now() + self.options.step_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            let member = self.member_of(replica).await?;
            let reason = match member {
                None => return Err(MembershipError::Refused(format!("{replica} is no longer an etcd member"))),
                Some(m) if m.name.is_empty() || !m.healthy => {
                    format!("its etcd member has not started yet ({replica})")
                }
                Some(_) => {
                    let progress = self.progress_of(replica).await?;
                    let behind = progress.service_state_index.saturating_sub(progress.processed);
                    if behind <= self.options.catch_up_window {
                        (self.progress)(&format!(
                            "{replica} is caught up: LPI {} of SSI {}",
                            progress.processed, progress.service_state_index
                        ));
                        return Ok(());
                    }
                    format!(
                        "LPI {} is {behind} entries behind SSI {} (window {})",
                        progress.processed, progress.service_state_index, self.options.catch_up_window
                    )
                }
            };
            if Instant::now() >= deadline {
                return Err(MembershipError::Timeout {
                    step: Step::CatchUp,
                    what: format!("{replica} did not catch up: {reason}"),
                    after: self.options.step_timeout,
                });
            }
            (self.progress)(&format!("{replica}: {reason}"));
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn progress_of(&self, replica: &str) -> Result<br2k_replication::inspect::Progress> {
        let mut reasons = Vec::new();
        for endpoint in &self.cluster.endpoints {
            match br2k_replication::inspect::read_progress(
                endpoint,
                &self.service,
                replica,
                self.cluster.timeout,
                self.cluster.tls.as_ref(),
            )
            .await
            {
                Ok(progress) => return Ok(progress),
                Err(e) => reasons.push(format!("{endpoint}: {e}")),
            }
        }
        Err(MembershipError::Etcd { what: format!("read {replica}'s progress"), reason: reasons.join("; ") })
    }

    async fn promote(&self, replica: &str) -> Result<()> {
        let deadline = Instant::now() + self.options.step_timeout;
        let mut delay = Duration::from_millis(200);
        loop {
            let Some(member) = self.member_of(replica).await? else {
                return Err(MembershipError::Refused(format!("{replica} is no longer an etcd member")));
            };
            if !member.learner {
                return Ok(());
            }
            let reason =
                match self.cluster.call("promote the learner", async |c| c.member_promote(member.id).await).await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                };
            self.wait_or_fail(Step::Promote, &reason, deadline, &mut delay).await?;
        }
    }

    /// After a refusal worth retrying: waits (backing off) unless the deadline passed.
    async fn wait_or_fail(&self, step: Step, reason: &str, deadline: Instant, delay: &mut Duration) -> Result<()> {
        if !worth_retrying(reason) {
            return Err(MembershipError::Etcd { what: step.to_string(), reason: reason.to_owned() });
        }
        if Instant::now() >= deadline {
            return Err(MembershipError::Timeout {
                step,
                what: format!("etcd kept answering: {reason}"),
                after: self.options.step_timeout,
            });
        }
        (self.progress)(&format!("{step}: etcd says {reason}; trying again in {delay:?}"));
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(Duration::from_secs(5));
        Ok(())
    }

    fn journal_key(&self) -> String {
        br2k_replication::membership_change_key(&self.service)
    }

    async fn read_journal(&self) -> Result<Option<(Change, i64)>> {
        let key = self.journal_key();
        let answer =
            self.cluster.call("read the membership journal", async |c| c.get(key.as_str(), None).await).await?;
        let Some(kv) = answer.kvs().first() else { return Ok(None) };
        let change = serde_json::from_slice(kv.value()).map_err(|e| MembershipError::Journal(format!("{key}: {e}")))?;
        Ok(Some((change, kv.mod_revision())))
    }

    async fn begin(&self, change: &Change) -> Result<i64> {
        let key = self.journal_key();
        let value = encode(change)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), value, None)]);
        let answer = self.cluster.call("journal the change", async |c| c.txn(txn.clone()).await).await?;
        if !answer.succeeded() {
            return match self.read_journal().await? {
                Some((other, _)) => Err(MembershipError::InProgress(Box::new(other))),
                None => Err(MembershipError::Busy("the journal changed while it was written".into())),
            };
        }
        Ok(answer.header().map_or(0, etcd_client::ResponseHeader::revision))
    }

    async fn advance_journal(&self, change: &Change, revision: i64) -> Result<i64> {
        let key = self.journal_key();
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)])
            .and_then([TxnOp::put(key.as_str(), encode(change)?, None)]);
        let answer = self.cluster.call("advance the journal", async |c| c.txn(txn.clone()).await).await?;
        if !answer.succeeded() {
            return Err(MembershipError::Busy("the journal was changed by someone else".into()));
        }
        Ok(answer.header().map_or(0, etcd_client::ResponseHeader::revision))
    }

    async fn finish_journal(&self, revision: i64) -> Result<()> {
        let key = self.journal_key();
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        let answer = self.cluster.call("close the journal", async |c| c.txn(txn.clone()).await).await?;
        if !answer.succeeded() {
            return Err(MembershipError::Busy("the journal was changed by someone else".into()));
        }
        Ok(())
    }

    /// Takes the change lock: a key bound to a lease this runner keeps alive, so that a
    /// runner that dies lets the next one in after the lease's TTL. A holder that is a
    /// process of this host that is gone (a command killed) is let go at once; one that
    /// may still run is waited for up to the TTL and a little, then refused.
    async fn lock(&self) -> Result<LockGuard> {
        let deadline = Instant::now() + self.options.lock_ttl + Duration::from_secs(5);
        let mut delay = Duration::from_millis(200);
        let mut announced = false;
        loop {
            let (holder, lease) = match self.try_lock().await? {
                Ok(guard) => return Ok(guard),
                Err(held) => held,
            };
            if holder_is_gone(&holder) {
                (self.progress)(&format!("the change lock was held by {holder}, which is gone: taking it over"));
                self.cluster.call("let go a dead runner's lock", async |c| c.lease_revoke(lease).await).await?;
                continue;
            }
            if Instant::now() + delay > deadline {
                return Err(MembershipError::Busy(holder));
            }
            if !announced {
                (self.progress)(&format!("waiting for the change lock, held by {holder}"));
                announced = true;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// One attempt at the lock: taken, or who holds it (and its lease).
    async fn try_lock(&self) -> Result<std::result::Result<LockGuard, (String, i64)>> {
        let key = br2k_replication::membership_lock_key(&self.service);
        let ttl = i64::try_from(self.options.lock_ttl.as_secs().max(2)).unwrap_or(10);
        let holder = format!("pid {} on {}", std::process::id(), hostname());
        let mut reasons = Vec::new();
        for endpoint in &self.cluster.endpoints {
            let mut client = match self.cluster.connect(endpoint).await {
                Ok(client) => client,
                Err(reason) => {
                    reasons.push(format!("{endpoint}: {reason}"));
                    continue;
                }
            };
            let timeout = self.cluster.timeout;
            let attempt = async {
                let lease = client.lease_grant(ttl, None).await?.id();
                let txn = Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.as_str(), holder.as_str(), Some(PutOptions::new().with_lease(lease)))])
                    .or_else([TxnOp::get(key.as_str(), None)]);
                Ok::<_, etcd_client::Error>((lease, client.txn(txn).await?))
            };
            let (lease, answer) = match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(taken)) => taken,
                Ok(Err(e)) => {
                    reasons.push(format!("{endpoint}: {e}"));
                    continue;
                }
                Err(_) => {
                    reasons.push(format!("{endpoint}: no answer within {timeout:?}"));
                    continue;
                }
            };
            if !answer.succeeded() {
                let _ = client.lease_revoke(lease).await;
                let held = answer
                    .op_responses()
                    .into_iter()
                    .find_map(|op| match op {
                        etcd_client::TxnOpResponse::Get(get) => {
                            get.kvs().first().map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
                        }
                        _ => None,
                    })
                    .unwrap_or_default();
                return Ok(Err(held));
            }
            let period = Duration::from_secs(u64::try_from(ttl).unwrap_or(10)) / 3;
            // Renewed through any member: the one it was taken through may be the one
            // the change removes.
            let cluster = self.cluster.clone();
            let keeper = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    if let Err(e) = cluster.renew_lease(lease).await {
                        tracing::warn!(error = %e, "could not renew the membership change's lock; trying again");
                    }
                }
            });
            return Ok(Ok(LockGuard { keeper, cluster: self.cluster.clone(), lease }));
        }
        Err(MembershipError::Etcd { what: "take the lock".into(), reason: reasons.join("; ") })
    }
}

/// Holds the change lock while it lives; the lease lapses within its TTL once dropped
/// (a runner that died), or at once when released.
struct LockGuard {
    keeper: tokio::task::JoinHandle<()>,
    cluster: Cluster,
    lease: i64,
}

impl LockGuard {
    async fn release(self) {
        self.keeper.abort();
        // Through any member (the one it was taken through may be the one just removed).
        // Best effort: a lease not revoked lapses by itself.
        let lease = self.lease;
        let _ = self.cluster.call("release the lock", async |c| c.lease_revoke(lease).await).await;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

fn encode(change: &Change) -> Result<String> {
    serde_json::to_string(change).map_err(|e| MembershipError::Journal(e.to_string()))
}

/// Whether the lock's holder (`pid P on HOST`) is a process of this host that no longer
/// runs (gone, or a zombie nobody reaped). A holder elsewhere, or a pid the kernel gave to
/// another process since, counts as running: waiting is the safe mistake.
fn holder_is_gone(holder: &str) -> bool {
    let Some((pid, host)) = holder.strip_prefix("pid ").and_then(|rest| rest.split_once(" on ")) else {
        return false;
    };
    if host != hostname() || pid.parse::<u32>().is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        // The state follows the command name's closing parenthesis.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "this host".into(), |h| h.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_process_of_this_host_lets_its_lock_go() {
        let here = hostname();
        assert!(!holder_is_gone(&format!("pid {} on {here}", std::process::id())), "this process runs");
        // Above the kernel's pid limit (2^22): no process has it.
        assert!(holder_is_gone(&format!("pid 4194305 on {here}")));
        assert!(!holder_is_gone("pid 4194305 on another-host"), "a holder elsewhere may run");
        assert!(!holder_is_gone("someone"), "a holder that does not say who it is may run");
    }
}
