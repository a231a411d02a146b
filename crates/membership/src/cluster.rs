//! The etcd cluster as a membership change sees it: every call bounded, tried on each
//! endpoint until one answers, and each member's own view (health, who leads).

use std::time::Duration;

use br2k_replication::EtcdTls;
use etcd_client::{Client, ConnectOptions};

use crate::error::{MembershipError, Result};

/// One etcd member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// etcd's member ID.
    pub id: u64,
    /// Its name: the replica's id (empty while a member that was added has not started).
    pub name: String,
    /// Where its peers reach it.
    pub peer_urls: Vec<String>,
    /// Where clients reach it.
    pub client_urls: Vec<String>,
    /// A learner: it receives the log but does not vote.
    pub learner: bool,
    /// It answered a status request just now.
    pub healthy: bool,
    /// It leads the etcd cluster (and so its replica leads the service).
    pub leader: bool,
}

impl MemberView {
    /// A voter that has started.
    pub fn is_voter(&self) -> bool {
        !self.learner
    }

    /// Whether this is `replica`'s member: by name, or (added but never started) by the
    /// peer URL the replica's member is added with.
    pub fn is_replica(&self, replica: &str, peer_url: Option<&str>) -> bool {
        self.name == replica || peer_url.is_some_and(|url| self.peer_urls.iter().any(|u| u == url))
    }
}

/// How many voters must agree in a cluster of `voters`.
pub const fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Where the cluster is reached, and how.
#[derive(Clone, Debug)]
pub struct Cluster {
    /// Client URLs of members, tried in order.
    pub endpoints: Vec<String>,
    /// The certificate a client shows, when the members ask for TLS.
    pub tls: Option<EtcdTls>,
    /// Bound on each call.
    pub timeout: Duration,
}

impl Cluster {
    pub(crate) async fn connect(&self, endpoint: &str) -> std::result::Result<Client, String> {
        let mut options = ConnectOptions::new().with_connect_timeout(self.timeout).with_timeout(self.timeout);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.options().map_err(|e| e.to_string())?);
        }
        match tokio::time::timeout(self.timeout, Client::connect([endpoint], Some(options))).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Runs `call` on the first endpoint of `endpoints` that answers it.
    pub(crate) async fn on_any<T>(
        &self,
        what: &str,
        endpoints: &[String],
        call: impl AsyncFn(&mut Client) -> std::result::Result<T, etcd_client::Error>,
    ) -> Result<T> {
        let mut reasons = Vec::new();
        for endpoint in endpoints {
            let mut client = match self.connect(endpoint).await {
                Ok(client) => client,
                Err(reason) => {
                    reasons.push((endpoint.as_str(), reason));
                    continue;
                }
            };
            match tokio::time::timeout(self.timeout, call(&mut client)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => reasons.push((endpoint.as_str(), e.to_string())),
                Err(_) => reasons.push((endpoint.as_str(), format!("no answer within {:?}", self.timeout))),
            }
        }
        Err(MembershipError::Etcd { what: what.into(), reason: summarise(&reasons) })
    }

    /// Runs `call` on any member.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        call: impl AsyncFn(&mut Client) -> std::result::Result<T, etcd_client::Error>,
    ) -> Result<T> {
        self.on_any(what, &self.endpoints, call).await
    }

    /// Renews lease `lease` once, through the first member that answers.
    pub(crate) async fn renew_lease(&self, lease: i64) -> std::result::Result<(), String> {
        let mut reasons = Vec::new();
        for endpoint in &self.endpoints {
            let renewed = async {
                let mut client = self.connect(endpoint).await?;
                let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(|e| e.to_string())?;
                keeper.keep_alive().await.map_err(|e| e.to_string())?;
                answers.message().await.map(drop).map_err(|e| e.to_string())
            };
            match tokio::time::timeout(self.timeout, renewed).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(reason)) => reasons.push(format!("{endpoint}: {reason}")),
                Err(_) => reasons.push(format!("{endpoint}: no answer within {:?}", self.timeout)),
            }
        }
        Err(reasons.join("; "))
    }

    /// Every member, each asked for its own status.
    ///
    /// # Errors
    /// When no endpoint answers the member list.
    pub async fn members(&self) -> Result<Vec<MemberView>> {
        let list = self.call("list the members", async |c| c.member_list().await).await?;
        let mut views = Vec::new();
        let mut leader = None;
        for member in list.members() {
            let status = match member.client_urls().first() {
                Some(url) => self.on_any("status", std::slice::from_ref(url), async |c| c.status().await).await.ok(),
                None => None,
            };
            if let Some(status) = &status
                && status.leader() != 0
            {
                leader = Some(status.leader());
            }
            views.push(MemberView {
                id: member.id(),
                name: member.name().to_owned(),
                peer_urls: member.peer_urls().to_vec(),
                client_urls: member.client_urls().to_vec(),
                learner: member.is_learner(),
                healthy: status.is_some(),
                leader: false,
            });
        }
        for view in &mut views {
            view.leader = leader == Some(view.id);
        }
        views.sort_by_key(replica_order);
        Ok(views)
    }
}

/// Why every endpoint failed, in one line: once when they all said the same.
fn summarise(reasons: &[(&str, String)]) -> String {
    match reasons {
        [] => "no endpoint to ask".into(),
        [(endpoint, reason)] => format!("{endpoint}: {reason}"),
        [(_, first), rest @ ..] if rest.iter().all(|(_, r)| r == first) => {
            format!("all {} members asked: {first}", reasons.len())
        }
        _ => reasons.iter().map(|(e, r)| format!("{e}: {r}")).collect::<Vec<_>>().join("; "),
    }
}

/// The order members are shown in: by replica number (`n2` before `n10`), members not
/// started yet (no name) last.
fn replica_order(view: &MemberView) -> (bool, usize, String) {
    let number = view.name.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(usize::MAX);
    (view.name.is_empty(), number, view.name.clone())
}

/// Whether etcd's answer means "not now" rather than "no": a cluster that is not yet
/// healthy for a reconfiguration, a learner not yet in sync, a leader election, a member
/// that did not answer.
pub(crate) fn worth_retrying(reason: &str) -> bool {
    [
        "unhealthy cluster",
        "in sync with leader",
        "not ready",
        "too many learner",
        "not enough started members",
        "leader changed",
        "no leader",
        "no answer within",
        "transport",
        "Unavailable",
        "timed out",
    ]
    .iter()
    .any(|needle| reason.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_refusal_from_every_member_is_said_once() {
        let same =
            [("http://a:2379", "unhealthy cluster".to_owned()), ("http://b:2379", "unhealthy cluster".to_owned())];
        assert_eq!(summarise(&same), "all 2 members asked: unhealthy cluster");
        let differ = [("http://a:2379", "unhealthy cluster".to_owned()), ("http://b:2379", "refused".to_owned())];
        assert_eq!(summarise(&differ), "http://a:2379: unhealthy cluster; http://b:2379: refused");
        assert_eq!(summarise(&[]), "no endpoint to ask");
    }
}
