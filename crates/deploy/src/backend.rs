//! The one interface both deployment backends offer: deploy a service's
//! replicas from its image pinned by digest, and say what runs of it. `br2k deploy` and
//! the manager's recovery go through it, so a redeploy after a disaster is the very path
//! a first deployment takes.

use futures::future::BoxFuture;

use crate::deployment::DeploymentRecord;
use crate::error::Result;

/// One replica as the backend sees it.
#[derive(Clone, Debug)]
pub struct ReplicaView {
    /// The replica's name (its replica id: `n1`, or a Pod name).
    pub name: String,
    /// Whether its processes (or Pod) exist. A replica can run and not answer yet.
    pub running: bool,
    /// What its app said of itself (`/br2k/status`), when it answered.
    pub status: Option<br2k_replication::Status>,
    /// Why it does not answer, or what the backend knows of it beyond its status.
    pub detail: Option<String>,
    /// Its etcd member is a learner (a replica being added: it receives the log but does
    /// not vote yet). Known from the member list even when the replica does not answer.
    pub learner: bool,
}

impl ReplicaView {
    /// Whether it answered as the leader.
    pub fn leads(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.role == br2k_replication::Role::Leader)
    }
}

/// What a deployment did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deployed {
    /// What was started or applied, in words (for logs and people).
    pub summary: String,
    /// The leader's location when the backend waited for one.
    pub location: Option<String>,
}

/// Progress lines a backend reports while it works.
pub type Progress<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// A place replicas run: this machine, or a Kubernetes cluster.
pub trait Backend: Send + Sync {
    /// The context this backend deploys to (`local`, or a Kubernetes context's name).
    fn context(&self) -> &str;

    /// Deploys (or deploys again) `service` as `record` says: pulls the image by digest,
    /// checks it, and starts the replicas on the data an earlier deployment left, so a
    /// redeploy keeps what the service had acknowledged. Replicas that still run are
    /// replaced.
    fn deploy<'a>(
        &'a self,
        service: &'a str,
        record: &'a DeploymentRecord,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Deployed>>;

    /// What runs of `service`: one entry per replica the backend knows of (none when
    /// nothing was ever deployed or everything is gone).
    fn replicas<'a>(&'a self, service: &'a str) -> BoxFuture<'a, Result<Vec<ReplicaView>>>;

    /// Finishes a membership change of `service` that the command running it left half
    /// done (killed, its machine lost), when nobody runs it now: what it did, or `None`
    /// when there was none to finish. Backends without membership changes have none.
    fn finish_membership_change<'a>(
        &'a self,
        service: &'a str,
        progress: Progress<'a>,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        let _ = (service, progress);
        Box::pin(async { Ok(None) })
    }
}
