//! A fake Kubernetes API server for the backend's tests: no API server can run on these
//! machines (see the README), so the rollout and teardown are tested against this.
//!
//! It serves kube's client through `tower_test::mock` and keeps objects by resource and
//! name: server-side apply stores what it is sent (bumping a StatefulSet's generation
//! when its spec changes), GET and label-selected LIST read them, DELETE removes them.
//! It plays the StatefulSet controller as far as a rollout sees it: a StatefulSet
//! applied with a new spec replaces its Pod `NAME-0` with a Pod that is not ready, and
//! reports it ready (at the new revision) after a set number of reads; a StatefulSet
//! marked stuck never becomes ready. A ready Pod answers `/br2k/status` through the
//! proxy, the first ready one in name order as the leader. Every change it makes is
//! written to its event log, which the tests read to see the order things happened in.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

/// What the fake holds.
#[derive(Default)]
pub(super) struct State {
    /// `(resource, name)` to the object as stored.
    pub objects: BTreeMap<(String, String), Value>,
    /// What changed, in order: `apply StatefulSet s-1 (generation 2)`, `ready s-1`, ...
    pub events: Vec<String>,
    /// Every request: `METHOD path`.
    pub requests: Vec<String>,
    /// Reads of a changed StatefulSet before it is reported ready.
    pub ready_after: u32,
    /// StatefulSets that never become ready.
    pub stuck: BTreeSet<String>,
    countdown: BTreeMap<String, u32>,
    resource_version: u64,
}

impl State {
    /// The replicas (StatefulSets and bare Pods) that are not ready now.
    pub(super) fn unready(&self) -> Vec<String> {
        self.objects
            .iter()
            .filter(|((resource, _), _)| resource == "pods")
            .filter(|(_, pod)| pod["status"]["conditions"][0]["status"] != "True")
            .map(|((_, name), _)| name.clone())
            .collect()
    }
}

/// A fake API server and a client of it.
pub(super) struct Fake {
    pub(super) state: Arc<Mutex<State>>,
    pub(super) client: Client,
}

impl Fake {
    /// A fake whose changed StatefulSets are ready after `ready_after` reads.
    pub(super) fn new(ready_after: u32) -> Self {
        let state = Arc::new(Mutex::new(State { ready_after, ..State::default() }));
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let served = state.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("the request body is readable");
                let (status, answer) = served.lock().unwrap().serve(&parts.method, &parts.uri.to_string(), &bytes);
                respond.send_response(
                    Response::builder().status(status).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap(),
                );
            }
        });
        Self { state, client: Client::new(service, "default") }
    }

    /// Puts `object` in the fake as if it had always been there.
    pub(super) fn seed(&self, resource: &str, object: Value) {
        let name = object["metadata"]["name"].as_str().expect("a named object").to_owned();
        self.state.lock().unwrap().objects.insert((resource.into(), name), object);
    }

    pub(super) fn events(&self) -> Vec<String> {
        self.state.lock().unwrap().events.clone()
    }

    pub(super) fn names(&self, resource: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state.objects.keys().filter(|(r, _)| r == resource).map(|(_, n)| n.clone()).collect()
    }

    pub(super) fn get(&self, resource: &str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(&(resource.to_owned(), name.to_owned())).cloned()
    }
}

/// A ready Pod named `name` with `labels`, owned by StatefulSet `owner` (or by nothing).
pub(super) fn pod(name: &str, labels: &Value, owner: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "team-a", "labels": labels },
        "spec": { "containers": [{ "name": "app" }] },
        "status": { "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }] },
    });
    if let Some(owner) = owner {
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "StatefulSet", "name": owner, "uid": format!("uid-{owner}"), "controller": true
        }]);
    }
    pod
}

impl State {
    fn serve(&mut self, method: &Method, uri: &str, body: &[u8]) -> (u16, Value) {
        self.requests.push(format!("{method} {uri}"));
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let parts: Vec<&str> = path.split('/').collect();
        let Some(at) = parts.iter().position(|p| *p == "namespaces") else { return not_found(path) };
        let resource = parts.get(at + 2).copied().unwrap_or_default().to_owned();
        let name = parts.get(at + 3).map(|n| (*n).to_owned());
        let rest = parts.get(at + 4..).map(|r| r.join("/")).unwrap_or_default();
        match (method, name) {
            (&Method::GET, Some(name)) if rest == "proxy/br2k/status" => self.status(&name),
            (&Method::GET, Some(name)) => self.read(&resource, &name),
            (&Method::GET, None) => self.list(&resource, query),
            (&Method::PATCH, Some(name)) => {
                let object: Value = serde_json::from_slice(body).expect("an apply patch is JSON");
                self.apply(&resource, &name, object)
            }
            (&Method::DELETE, Some(name)) => self.delete(&resource, &name),
            _ => not_found(path),
        }
    }

    fn read(&mut self, resource: &str, name: &str) -> (u16, Value) {
        if resource == "statefulsets" {
            self.controller_tick(name);
        }
        match self.objects.get(&(resource.to_owned(), name.to_owned())) {
            Some(object) => (200, object.clone()),
            None => not_found(name),
        }
    }

    /// One read of a changed StatefulSet: a step closer to its Pod being ready.
    fn controller_tick(&mut self, name: &str) {
        if self.stuck.contains(name) {
            return;
        }
        let Some(left) = self.countdown.get_mut(name) else { return };
        if *left > 0 {
            *left -= 1;
            return;
        }
        self.countdown.remove(name);
        let key = ("statefulsets".to_owned(), name.to_owned());
        if let Some(set) = self.objects.get_mut(&key) {
            let status = &mut set["status"];
            status["readyReplicas"] = json!(1);
            status["updatedReplicas"] = json!(1);
            status["currentRevision"] = status["updateRevision"].clone();
        }
        if let Some(pod) = self.objects.get_mut(&("pods".to_owned(), format!("{name}-0"))) {
            pod["status"]["conditions"][0]["status"] = json!("True");
        }
        self.events.push(format!("ready {name}"));
    }

    fn list(&mut self, resource: &str, query: &str) -> (u16, Value) {
        let selector =
            query.split('&').find_map(|p| p.strip_prefix("labelSelector=")).map(percent_decode).unwrap_or_default();
        let wanted: Vec<(&str, &str)> = selector.split(',').filter_map(|kv| kv.split_once('=')).collect();
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|((r, _), _)| r == resource)
            .map(|(_, o)| o)
            .filter(|o| wanted.iter().all(|(k, v)| o["metadata"]["labels"][*k] == *v))
            .cloned()
            .collect();
        (200, json!({ "apiVersion": "v1", "kind": "List", "metadata": { "resourceVersion": "1" }, "items": items }))
    }

    fn apply(&mut self, resource: &str, name: &str, mut object: Value) -> (u16, Value) {
        self.resource_version += 1;
        let key = (resource.to_owned(), name.to_owned());
        let before = self.objects.get(&key).cloned();
        let changed = before.as_ref().is_none_or(|b| b["spec"] != object["spec"]);
        let generation =
            before.as_ref().and_then(|b| b["metadata"]["generation"].as_i64()).unwrap_or(0) + i64::from(changed);
        object["metadata"]["generation"] = json!(generation);
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        if resource == "statefulsets" {
            object["status"] = before.as_ref().map_or(Value::Null, |b| b["status"].clone());
            if changed {
                let revision = format!("{name}-rev{generation}");
                object["status"]["observedGeneration"] = json!(generation);
                object["status"]["replicas"] = json!(1);
                object["status"]["readyReplicas"] = json!(0);
                object["status"]["updatedReplicas"] = json!(0);
                object["status"]["updateRevision"] = json!(revision);
                self.events.push(format!("apply StatefulSet {name} (generation {generation})"));
                let labels = object["spec"]["template"]["metadata"]["labels"].clone();
                let mut replaced = pod(&format!("{name}-0"), &labels, Some(name));
                replaced["status"]["conditions"][0]["status"] = json!("False");
                self.objects.insert(("pods".into(), format!("{name}-0")), replaced);
                self.countdown.insert(name.to_owned(), self.ready_after);
            }
        }
        self.objects.insert(key, object.clone());
        (200, object)
    }

    fn delete(&mut self, resource: &str, name: &str) -> (u16, Value) {
        if self.objects.remove(&(resource.to_owned(), name.to_owned())).is_none() {
            return not_found(name);
        }
        if resource == "statefulsets" {
            self.objects.remove(&("pods".to_owned(), format!("{name}-0")));
            self.countdown.remove(name);
        }
        self.events.push(format!("delete {resource} {name}"));
        (200, json!({ "kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {} }))
    }

    /// `/br2k/status` of Pod `name`: the first ready Pod leads.
    fn status(&self, name: &str) -> (u16, Value) {
        let pod_name = name.split(':').next().unwrap_or(name);
        let ready: Vec<&String> = self
            .objects
            .iter()
            .filter(|((r, _), o)| r == "pods" && o["status"]["conditions"][0]["status"] == "True")
            .map(|((_, n), _)| n)
            .collect();
        if !ready.iter().any(|n| *n == pod_name) {
            return (
                503,
                json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503, "message": "not ready", "reason": "ServiceUnavailable" }),
            );
        }
        let role = if ready.first().is_some_and(|n| *n == pod_name) { "leader" } else { "follower" };
        (200, json!({ "role": role }))
    }
}

fn not_found(name: &str) -> (u16, Value) {
    (
        404,
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": format!("{name} not found") }),
    )
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
