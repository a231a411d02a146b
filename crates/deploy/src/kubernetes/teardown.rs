//! `br2k down NAME --context K8S`: removes what deploying a service created, found by its
//! labels, replicas first. Its volumes (and with them every acknowledged request) stay
//! unless asked, so that deploying it again picks up where it stopped; so does the etcd
//! bootstrap hint that goes with them (a member whose volume is lost in between must
//! join the others, not found a second cluster).

use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::manifests::names;
use crate::error::{DeployError, Result};

/// What [`take_down`] removed and kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TakenDown {
    /// `Kind name` of every object deleted.
    pub deleted: Vec<String>,
    /// The volume claims kept (empty with `delete_data`).
    pub kept_volumes: Vec<String>,
}

/// Deletes the objects of `service` in `namespace` that br2k made: its StatefulSets (and
/// their Pods) and any bare Pods of an older br2k, then its Services, disruption budget,
/// network policy, settings and Secrets; its volume claims and etcd bootstrap hint too
/// with `delete_data`.
///
/// # Errors
/// When the API server refuses a list or a deletion; what was deleted before stays deleted,
/// and running it again finishes the rest.
pub async fn take_down(
    client: &Client,
    namespace: &str,
    service: &str,
    delete_data: bool,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<TakenDown> {
    let mut out = TakenDown::default();
    let params = ListParams::default().labels(&names::selector(service));
    let ctx = Ctx { client, namespace, service, params: &params, progress };
    ctx.delete_all::<StatefulSet>(&mut out, |_| true).await?;
    // The StatefulSets' own Pods go with them; bare Pods of an older br2k go here.
    ctx.delete_all::<Pod>(&mut out, |pod| pod.owner_references().is_empty()).await?;
    ctx.delete_all::<Service>(&mut out, |_| true).await?;
    ctx.delete_all::<PodDisruptionBudget>(&mut out, |_| true).await?;
    ctx.delete_all::<NetworkPolicy>(&mut out, |_| true).await?;
    let hint = names::etcd_bootstrap(service);
    ctx.delete_all::<ConfigMap>(&mut out, |map| delete_data || map.name_any() != hint).await?;
    ctx.delete_all::<Secret>(&mut out, |_| true).await?;
    if delete_data {
        ctx.delete_all::<PersistentVolumeClaim>(&mut out, |_| true).await?;
    } else {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
        let list = claims.list(&params).await.map_err(|e| ctx.failed("list the volume claims", &e))?;
        out.kept_volumes = list.items.iter().map(ResourceExt::name_any).collect();
    }
    Ok(out)
}

struct Ctx<'a> {
    client: &'a Client,
    namespace: &'a str,
    service: &'a str,
    params: &'a ListParams,
    progress: &'a (dyn Fn(&str) + Sync),
}

impl Ctx<'_> {
    fn failed(&self, what: &str, error: &kube::Error) -> DeployError {
        super::call_failed(self.service, self.namespace, what, error)
    }

    async fn delete_all<K>(&self, out: &mut TakenDown, only: impl Fn(&K) -> bool) -> Result<()>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned,
    {
        let kind = K::kind(&()).into_owned();
        let api: Api<K> = Api::namespaced(self.client.clone(), self.namespace);
        let list = api.list(self.params).await.map_err(|e| self.failed(&format!("list the {kind}s"), &e))?;
        // Foreground: a StatefulSet is gone only once its Pod is, so nothing is left running.
        let params =
            DeleteParams { propagation_policy: Some(PropagationPolicy::Foreground), ..DeleteParams::default() };
        for object in list.items.into_iter().filter(|o| only(o)) {
            let name = object.name_any();
            match api.delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(self.failed(&format!("delete {kind} {name}"), &e)),
            }
            (self.progress)(&format!("  deleted {kind} {name}"));
            out.deleted.push(format!("{kind} {name}"));
        }
        Ok(())
    }
}
