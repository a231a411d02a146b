//! Applying a service's [`Manifests`] so that a running service never loses its quorum to
//! its own deployment.
//!
//! The service-wide objects (Secrets, settings, volumes, Services, NetworkPolicy,
//! PodDisruptionBudget) are applied first; they restart nothing. Then the replicas:
//!
//! - **A first deployment** (no replica of the service exists) applies every StatefulSet
//!   at once: etcd members bootstrap a cluster together, and a member waiting for quorum
//!   alone would never be ready. Then it waits for every replica to be ready and for a
//!   leader.
//! - **A redeployment** goes replica by replica. A replica whose StatefulSet the apply
//!   does not change is left alone. One it changes is changed only when every *other*
//!   replica is ready (so no two are ever down at once because of the rollout), and the
//!   next one waits until it is ready again at the new revision and the service has a
//!   leader. A replica whose objects cannot be changed in place (a Pod from a br2k that
//!   made bare Pods, or a StatefulSet whose immutable fields differ) is deleted, waited
//!   for, and made anew, one at a time the same way.
//! - **The etcd bootstrap hint** (ConfigMap `s-etcd-bootstrap`) is created saying `new`
//!   only where it is missing, and says `existing` from the moment the service has had a
//!   leader: from then on an etcd member with no data joins the running cluster and never
//!   founds another (see `br2k_replica_cli::etcd_init`).
//! - **A change of the replica count** is refused: adding or removing etcd members is a
//!   membership change, which a redeploy must not do behind the members' backs.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PropagationPolicy};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::manifests::{ETCD_BOOTSTRAP_KEY, Manifests, REPLICA_LABEL, names};
use super::{Applied, FIELD_MANAGER, describe_kube_error};
use crate::error::{DeployError, Result};

/// How long a rollout waits, and how often it looks.
#[derive(Clone, Copy, Debug)]
pub struct RolloutOptions {
    /// How long one replica (or, on a first deployment, the whole service) may take to be
    /// ready with a leader after its change.
    pub timeout: Duration,
    /// How often the cluster is asked.
    pub poll: Duration,
}

impl Default for RolloutOptions {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(600), poll: Duration::from_secs(2) }
    }
}

/// Applies `manifests` of `service` in `namespace` as the module doc says, reporting
/// each step to `progress`.
///
/// # Errors
/// A replica-count change; the first object the API server refuses; a replica that is not
/// ready (or a service without a leader) within the timeout. What was applied before
/// stays; running the deployment again continues from there.
pub async fn roll_out(
    client: &Client,
    namespace: &str,
    service: &str,
    manifests: &Manifests,
    options: RolloutOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<Applied>> {
    let rollout = Rollout { client, namespace, service, options, progress };
    let running = rollout.running_replicas().await?;
    let declared: BTreeSet<String> = manifests.stateful_sets.iter().map(ResourceExt::name_any).collect();
    if !running.is_empty() && running != declared {
        return Err(DeployError::Invalid(format!(
            "{service} runs {} replicas in {namespace} ({}) and this deployment declares {} ({}): changing the replica count of a running service is a membership change, which `br2k deploy` does not make; deploy with --replicas {}, or take the service down first (`br2k down {service} --context ...`, which keeps its volumes)",
            running.len(),
            running.iter().cloned().collect::<Vec<_>>().join(", "),
            declared.len(),
            declared.iter().cloned().collect::<Vec<_>>().join(", "),
            running.len()
        )));
    }

    let mut applied = Vec::with_capacity(manifests.len());
    for secret in &manifests.secrets {
        applied.push(rollout.apply(secret).await?);
    }
    applied.push(rollout.apply(&manifests.settings).await?);
    applied.extend(rollout.create_bootstrap_hint(manifests, !running.is_empty()).await?);
    for claim in &manifests.claims {
        applied.push(rollout.apply(claim).await?);
    }
    for object in &manifests.services {
        applied.push(rollout.apply(object).await?);
    }
    applied.push(rollout.apply(&manifests.network_policy).await?);
    applied.push(rollout.apply(&manifests.disruption_budget).await?);

    if running.is_empty() {
        progress("replicas: none runs yet, so all start together (their etcd members bootstrap one cluster)");
        for set in &manifests.stateful_sets {
            applied.push(rollout.apply(set).await?);
        }
        for set in &manifests.stateful_sets {
            rollout.wait_ready(&set.name_any()).await?;
        }
        rollout.wait_for_leader(manifests).await?;
        applied.extend(rollout.mark_cluster_founded(manifests).await?);
        return Ok(applied);
    }
    for (index, set) in manifests.stateful_sets.iter().enumerate() {
        applied.push(rollout.roll_replica(manifests, index, set).await?);
    }
    applied.extend(rollout.mark_cluster_founded(manifests).await?);
    Ok(applied)
}

struct Rollout<'a> {
    client: &'a Client,
    namespace: &'a str,
    service: &'a str,
    options: RolloutOptions,
    progress: &'a (dyn Fn(&str) + Sync),
}

impl Rollout<'_> {
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), self.namespace)
    }

    /// The replicas that run now: the service's StatefulSets, and the bare Pods an
    /// earlier br2k made (named like the replicas, owned by nothing).
    async fn running_replicas(&self) -> Result<BTreeSet<String>> {
        let params = ListParams::default().labels(&names::selector(self.service));
        let sets =
            self.api::<StatefulSet>().list(&params).await.map_err(|e| self.failed("list the StatefulSets", &e))?;
        let pods = self.api::<Pod>().list(&params).await.map_err(|e| self.failed("list the Pods", &e))?;
        Ok(sets
            .items
            .iter()
            .map(ResourceExt::name_any)
            .chain(pods.items.iter().filter(|p| is_bare(p)).map(ResourceExt::name_any))
            .collect())
    }

    async fn apply<K>(&self, object: &K) -> Result<Applied>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
    {
        let kind = K::kind(&()).into_owned();
        let name = object.name_any();
        // `force`: br2k owns these objects; a field someone changed by hand is taken back.
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let answer = self.api::<K>().patch(&name, &params, &Patch::Apply(object)).await.map_err(|e| match e {
            kube::Error::Api(_) => DeployError::Invalid(format!(
                "the cluster refused {kind} {}/{name}: {}",
                self.namespace,
                describe_kube_error(&e)
            )),
            other => DeployError::Invalid(format!(
                "could not apply {kind} {}/{name}: {other} (is the context's server right and reachable from here?)",
                self.namespace
            )),
        })?;
        let applied = Applied { kind, name, resource_version: answer.resource_version() };
        (self.progress)(&format!("  {} {}", applied.kind, applied.name));
        Ok(applied)
    }

    fn failed(&self, what: &str, error: &kube::Error) -> DeployError {
        super::call_failed(self.service, self.namespace, what, error)
    }

    /// What the etcd bootstrap hint says now, if it exists.
    async fn bootstrap_hint(&self, manifests: &Manifests) -> Result<Option<String>> {
        let name = manifests.etcd_bootstrap.name_any();
        let map = self.api::<ConfigMap>().get_opt(&name).await.map_err(|e| self.failed("read the ConfigMaps", &e))?;
        Ok(map.map(|m| m.data.and_then(|mut d| d.remove(ETCD_BOOTSTRAP_KEY)).unwrap_or_default()))
    }

    /// Creates the hint where it is missing: `new`, or `existing` for a service that runs
    /// with a leader already (deployed by a br2k from before the hint). Never turns
    /// `existing` back.
    async fn create_bootstrap_hint(&self, manifests: &Manifests, running: bool) -> Result<Option<Applied>> {
        if self.bootstrap_hint(manifests).await?.is_some() {
            return Ok(None);
        }
        if running && self.leader(manifests).await.is_some() {
            return self.apply(&cluster_exists(manifests)).await.map(Some);
        }
        self.apply(&manifests.etcd_bootstrap).await.map(Some)
    }

    /// Once the service has a leader its etcd cluster exists: the hint says `existing`
    /// from then on.
    async fn mark_cluster_founded(&self, manifests: &Manifests) -> Result<Option<Applied>> {
        if self.bootstrap_hint(manifests).await?.as_deref() == Some("existing") {
            return Ok(None);
        }
        self.wait_for_leader(manifests).await?;
        let applied = self.apply(&cluster_exists(manifests)).await?;
        (self.progress)(
            "etcd: the cluster exists; from now on a member that lost its data joins it as a new member and never founds another",
        );
        Ok(Some(applied))
    }

    /// Replica `index` of a running service: changed only if the apply changes it, and
    /// then only while every other replica is ready; done when it is ready again and the
    /// service has a leader.
    async fn roll_replica(&self, manifests: &Manifests, index: usize, set: &StatefulSet) -> Result<Applied> {
        let name = set.name_any();
        let pods: Api<Pod> = self.api();
        let sets: Api<StatefulSet> = self.api();
        if let Some(bare) = pods.get_opt(&name).await.map_err(|e| self.failed("read the Pods", &e))?
            && is_bare(&bare)
        {
            self.wait_others_ready(manifests, index).await?;
            (self.progress)(&format!(
                "replica {name}: a bare Pod (from an older br2k) is replaced by a StatefulSet; deleting it"
            ));
            self.delete_and_wait::<Pod>(&name).await?;
            let applied = self.apply(set).await?;
            self.settle(manifests, &name).await?;
            return Ok(applied);
        }
        let before = sets.get_opt(&name).await.map_err(|e| self.failed("read the StatefulSets", &e))?;
        if let Some(before) = &before
            && let Some(field) = immutable_change(before, set)
        {
            self.wait_others_ready(manifests, index).await?;
            (self.progress)(&format!(
                "replica {name}: its StatefulSet's {field} cannot change in place; replacing it (its volumes stay)"
            ));
            self.delete_and_wait::<StatefulSet>(&name).await?;
            let applied = self.apply(set).await?;
            self.settle(manifests, &name).await?;
            return Ok(applied);
        }
        if before.as_ref().is_some_and(|before| same_template(before, set)) {
            // Applying it changes no Pod: no restart, no wait.
            let applied = self.apply(set).await?;
            (self.progress)(&format!("replica {name}: unchanged"));
            return Ok(applied);
        }
        self.wait_others_ready(manifests, index).await?;
        (self.progress)(&format!("replica {name}: rolling to the new revision"));
        let applied = self.apply(set).await?;
        self.settle(manifests, &name).await?;
        Ok(applied)
    }

    async fn settle(&self, manifests: &Manifests, name: &str) -> Result<()> {
        self.wait_ready(name).await?;
        self.wait_for_leader(manifests).await
    }

    /// Waits until every replica but `index` is ready: changing one while another is
    /// down would take two at once.
    async fn wait_others_ready(&self, manifests: &Manifests, index: usize) -> Result<()> {
        let others: Vec<String> = manifests
            .stateful_sets
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != index)
            .map(|(_, set)| set.name_any())
            .collect();
        let deadline = Instant::now() + self.options.timeout;
        let mut said = String::new();
        loop {
            let mut waiting = Vec::new();
            for other in &others {
                if !self.replica_ready(other).await? {
                    waiting.push(other.clone());
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            let now = format!(
                "waiting for {} to be ready before changing {}: one replica at a time",
                waiting.join(", "),
                manifests.stateful_sets[index].name_any()
            );
            if now != said {
                (self.progress)(&now);
                said = now;
            }
            if Instant::now() >= deadline {
                return Err(DeployError::NotReady {
                    what: format!(
                        "{} (the rollout changes a replica only while all others are ready; nothing more was changed)",
                        waiting.join(", ")
                    ),
                    timeout: self.options.timeout,
                    log: None,
                });
            }
            tokio::time::sleep(self.options.poll).await;
        }
    }

    /// Whether replica `name` runs its latest revision and is ready (a bare Pod: ready).
    async fn replica_ready(&self, name: &str) -> Result<bool> {
        if let Some(set) =
            self.api::<StatefulSet>().get_opt(name).await.map_err(|e| self.failed("read the StatefulSets", &e))?
        {
            return Ok(rolled_out(&set));
        }
        let bare = self.api::<Pod>().get_opt(name).await.map_err(|e| self.failed("read the Pods", &e))?;
        Ok(bare.as_ref().is_some_and(pod_ready))
    }

    /// Waits until StatefulSet `name` has rolled out: its one Pod at the newest revision and ready.
    async fn wait_ready(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + self.options.timeout;
        (self.progress)(&format!("replica {name}: waiting for its Pod to be ready"));
        loop {
            if self.replica_ready(name).await? {
                (self.progress)(&format!("replica {name}: ready"));
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DeployError::NotReady {
                    what: format!(
                        "replica {name} (see `kubectl -n {} describe pod {name}-0` and its containers' logs; the replicas after it were not changed)",
                        self.namespace
                    ),
                    timeout: self.options.timeout,
                    log: None,
                });
            }
            tokio::time::sleep(self.options.poll).await;
        }
    }

    /// Waits until one of the service's replicas says it leads (its `/br2k/status`,
    /// through the API server's proxy to the Pod).
    async fn wait_for_leader(&self, manifests: &Manifests) -> Result<()> {
        let deadline = Instant::now() + self.options.timeout;
        loop {
            if let Some(replica) = self.leader(manifests).await {
                (self.progress)(&format!("service {}: {replica} leads", self.service));
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DeployError::NotReady {
                    what: format!("a leader of {} (every replica is ready, none says it leads)", self.service),
                    timeout: self.options.timeout,
                    log: None,
                });
            }
            tokio::time::sleep(self.options.poll).await;
        }
    }

    /// The replica that says it leads now, if one does.
    async fn leader(&self, manifests: &Manifests) -> Option<String> {
        for set in &manifests.stateful_sets {
            let replica = set.name_any();
            let Some(index) = replica.rsplit('-').next().and_then(|i| i.parse::<usize>().ok()) else { continue };
            if self.says_it_leads(&names::pod(self.service, index)).await {
                return Some(replica);
            }
        }
        None
    }

    async fn says_it_leads(&self, pod: &str) -> bool {
        let path = format!("/api/v1/namespaces/{}/pods/{pod}:8080/proxy/br2k/status", self.namespace);
        let Ok(request) = http::Request::get(path).body(Vec::new()) else { return false };
        let Ok(text) = self.client.request_text(request).await else { return false };
        serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|status| status["role"] == "leader")
    }

    /// Deletes `name` (its Pods first, for a StatefulSet) and waits until it is gone.
    async fn delete_and_wait<K>(&self, name: &str) -> Result<()>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned,
    {
        let kind = K::kind(&()).into_owned();
        let api = self.api::<K>();
        let params =
            DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..DeleteParams::default() };
        match api.delete(name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(self.failed(&format!("delete {kind} {name}"), &e)),
        }
        let deadline = Instant::now() + self.options.timeout;
        while api.get_opt(name).await.map_err(|e| self.failed(&format!("read {kind} {name}"), &e))?.is_some() {
            if Instant::now() >= deadline {
                return Err(DeployError::NotReady {
                    what: format!("the deletion of {kind} {}/{name}", self.namespace),
                    timeout: self.options.timeout,
                    log: None,
                });
            }
            tokio::time::sleep(self.options.poll).await;
        }
        (self.progress)(&format!("  {kind} {name} deleted"));
        Ok(())
    }
}

/// A Pod no controller owns: what br2k made before replicas were StatefulSets.
fn is_bare(pod: &Pod) -> bool {
    pod.metadata.owner_references.as_ref().is_none_or(Vec::is_empty) && pod.labels().contains_key(REPLICA_LABEL)
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a one-Pod StatefulSet's controller has seen its latest spec, and its Pod runs
/// that revision and is ready.
pub(super) fn rolled_out(set: &StatefulSet) -> bool {
    let Some(status) = &set.status else { return false };
    let generation = set.metadata.generation.unwrap_or(0);
    let want = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) >= want
        && status.ready_replicas.unwrap_or(0) >= want
        && status.update_revision.is_some()
        && status.current_revision == status.update_revision
}

/// The first field of `wanted` that differs from `running`'s and that Kubernetes does not
/// let an apply change.
fn immutable_change(running: &StatefulSet, wanted: &StatefulSet) -> Option<&'static str> {
    let (Some(a), Some(b)) = (&running.spec, &wanted.spec) else { return None };
    if a.selector != b.selector {
        return Some("selector");
    }
    if a.service_name != b.service_name {
        return Some("serviceName");
    }
    if a.pod_management_policy.as_deref().unwrap_or("OrderedReady")
        != b.pod_management_policy.as_deref().unwrap_or("OrderedReady")
    {
        return Some("podManagementPolicy");
    }
    if a.volume_claim_templates.as_ref().is_some_and(|t| !t.is_empty())
        != b.volume_claim_templates.as_ref().is_some_and(|t| !t.is_empty())
    {
        return Some("volumeClaimTemplates");
    }
    None
}

/// Whether the running StatefulSet already has the Pod template br2k would apply (its
/// metadata and spec, as far as br2k sets them): then the apply restarts nothing.
fn same_template(running: &StatefulSet, wanted: &StatefulSet) -> bool {
    let template = |set: &StatefulSet| set.spec.as_ref().map(|s| serde_json::to_value(&s.template).unwrap_or_default());
    match (template(running), template(wanted)) {
        (Some(running), Some(wanted)) => covers(&running, &wanted),
        _ => false,
    }
}

/// Whether every field `wanted` sets has the same value in `running` (which the API
/// server has filled with defaults br2k does not set).
fn covers(running: &serde_json::Value, wanted: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (running, wanted) {
        (Value::Object(running), Value::Object(wanted)) => {
            wanted.iter().all(|(key, value)| running.get(key).is_some_and(|r| covers(r, value)))
        }
        (Value::Array(running), Value::Array(wanted)) => {
            running.len() == wanted.len() && running.iter().zip(wanted).all(|(r, w)| covers(r, w))
        }
        (running, wanted) => running == wanted,
    }
}

/// The etcd bootstrap hint saying the cluster exists.
fn cluster_exists(manifests: &Manifests) -> ConfigMap {
    let mut hint = manifests.etcd_bootstrap.clone();
    hint.data = Some([(ETCD_BOOTSTRAP_KEY.to_owned(), "existing".to_owned())].into());
    hint
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_the_server_filled_with_defaults_is_still_the_same() {
        let wanted = serde_json::json!({ "spec": { "containers": [{ "name": "app", "image": "a@sha256:1" }] } });
        let running = serde_json::json!({
            "spec": { "containers": [{ "name": "app", "image": "a@sha256:1", "imagePullPolicy": "IfNotPresent" }],
                      "dnsPolicy": "ClusterFirst" }
        });
        assert!(covers(&running, &wanted));
        let changed = serde_json::json!({ "spec": { "containers": [{ "name": "app", "image": "a@sha256:2" }] } });
        assert!(!covers(&running, &changed));
        let more = serde_json::json!({ "spec": { "containers": [{ "name": "app" }, { "name": "etcd" }] } });
        assert!(!covers(&running, &more), "a container added is a change");
    }
}
