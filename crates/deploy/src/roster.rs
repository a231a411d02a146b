//! What runs of a service, seen from the service itself: its published location's
//! `/br2k/members` (every etcd member, its replica's URL, the membership change in
//! progress) and each member's `/br2k/status`. It needs no backend, so it finds a
//! service wherever it runs (`br2k up` on any machine, Kubernetes, a deployment this
//! machine knows nothing of); a backend's own view is the fallback when the service does
//! not answer at all.

use std::time::Duration;

use br2k_replication::{Roster, Status};

use crate::backend::ReplicaView;
use crate::error::{DeployError, Result};

/// A service's members as its replicas report them.
#[derive(Clone, Debug)]
pub struct ServiceMembers {
    /// One view per etcd member, in the order the members are listed.
    pub views: Vec<ReplicaView>,
    /// The membership change in progress, as journaled.
    pub change: Option<serde_json::Value>,
}

/// Asks the replica at `location` for the members, then each member for its status.
///
/// # Errors
/// When the location does not answer with a roster.
pub async fn service_members(location: &str) -> Result<ServiceMembers> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(1))
        .no_proxy()
        .build()
        .map_err(|e| DeployError::Invalid(format!("cannot build an HTTP client: {e}")))?;
    let base = location.trim_end_matches('/');
    let url = format!("{base}/br2k/members");
    let answer = http.get(&url).send().await.map_err(|e| DeployError::Invalid(format!("{url}: {e}")))?;
    if !answer.status().is_success() {
        let code = answer.status();
        let text = answer.text().await.unwrap_or_default();
        return Err(DeployError::Invalid(format!("{url} answered {code}: {}", text.trim())));
    }
    let mut roster: Roster =
        answer.json().await.map_err(|e| DeployError::Invalid(format!("{url} did not answer a member list: {e}")))?;
    // By replica number (n2 before n10); members not started yet (no name) last.
    roster.members.sort_by_key(|m| {
        let number: u64 = m.replica.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(u64::MAX);
        (m.replica.is_empty(), number, m.replica.clone())
    });
    let views = roster.members.iter().map(|member| {
        let http = http.clone();
        async move {
            let name = if member.replica.is_empty() {
                format!("etcd member {}", member.etcd_member)
            } else {
                member.replica.clone()
            };
            let learner = member.learner;
            let Some(url) = &member.url else {
                return ReplicaView {
                    name,
                    running: false,
                    status: None,
                    detail: Some(
                        "its replica keeps no membership record: stopped, cut off, or a learner (which cannot write one)"
                            .into(),
                    ),
                    learner,
                };
            };
            let status_url = format!("{}/br2k/status", url.trim_end_matches('/'));
            match http.get(&status_url).send().await {
                Ok(response) => match response.json::<Status>().await {
                    Ok(status) => ReplicaView { name, running: true, status: Some(status), detail: None, learner },
                    Err(e) => ReplicaView {
                        name,
                        running: true,
                        status: None,
                        detail: Some(format!("{status_url}: {e}")),
                    learner,
                    },
                },
                Err(e) => ReplicaView {
                    name,
                    running: false,
                    status: None,
                    detail: Some(format!("{status_url}: {e}")),
                    learner,
                },
            }
        }
    });
    Ok(ServiceMembers { views: futures::future::join_all(views).await, change: roster.change })
}
