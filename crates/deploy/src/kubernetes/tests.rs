//! The rollout, the teardown and the recorded settings against the fake API server
//! (`fake`): no API server can run on these machines, so these tests assert the requests
//! br2k sends and the order in which it changes replicas.

use std::collections::BTreeMap;
use std::time::Duration;

use alloy::primitives::Address;
use serde_json::json;

use super::fake::{Fake, pod};
use super::*;
use crate::context::WorkerNode;

/// A three-replica service on three unlabelled nodes.
pub(super) fn spec() -> KubernetesSpec {
    KubernetesSpec {
        service: "logserver".into(),
        namespace: "team-a".into(),
        replicas: 3,
        image:
            "harbor.example.org/br2k/logserver@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .into(),
        nodes: ["w1", "w2", "w3"].iter().map(|n| WorkerNode { name: (*n).into(), labels: BTreeMap::new() }).collect(),
        endpoints: Vec::new(),
        storage_class: Some("fast".into()),
        settings: settings(),
        backup: Some(BackupTarget {
            registry_url: "https://harbor.example".into(),
            repository: "br2k/logserver".into(),
        }),
    }
}

pub(super) fn settings() -> ClusterSettings {
    ClusterSettings {
        etcd_image: DEFAULT_ETCD_IMAGE.into(),
        etcd_volume_size: "4Gi".into(),
        data_volume_size: "1Gi".into(),
        app_resources: ContainerResources::app_default(),
        etcd_resources: ContainerResources::etcd_default(),
        priority_class: None,
        rpc_url: "http://chain.example.org:8545".into(),
        registry: Address::repeat_byte(0x11),
        backup: crate::backup_schedule::BackupSchedule::default(),
        etcd_tls: false,
    }
}

const FAST: RolloutOptions = RolloutOptions { timeout: Duration::from_secs(5), poll: Duration::from_millis(1) };

async fn deploy(fake: &Fake, spec: &KubernetesSpec) -> Result<Vec<Applied>> {
    let manifests = Manifests::build(spec, &SecretValues::default()).unwrap();
    roll_out(&fake.client, "team-a", "logserver", &manifests, FAST, &|_| {}).await
}

/// The events from the `from`-th on, StatefulSet events only.
fn replica_events(fake: &Fake, from: usize) -> Vec<String> {
    fake.events().into_iter().skip(from).filter(|e| !e.starts_with("delete")).collect()
}

fn with_image(digest_byte: char) -> KubernetesSpec {
    KubernetesSpec {
        image: format!("harbor.example.org/br2k/logserver@sha256:{}", digest_byte.to_string().repeat(64)),
        ..spec()
    }
}

#[tokio::test]
async fn a_first_deployment_applies_every_object_as_br2k_and_starts_the_replicas_together() {
    let fake = Fake::new(2);
    let applied = deploy(&fake, &spec()).await.unwrap();
    let manifests = Manifests::build(&spec(), &SecretValues::default()).unwrap();
    assert_eq!(applied.len(), manifests.len() + 1, "every object, and the etcd bootstrap hint once more");
    let patches: Vec<String> =
        fake.state.lock().unwrap().requests.iter().filter(|r| r.starts_with("PATCH")).cloned().collect();
    let paths: Vec<&str> = patches.iter().map(|r| r.trim_start_matches("PATCH ").split('?').next().unwrap()).collect();
    let mut expected = vec![
        "/api/v1/namespaces/team-a/secrets/logserver-operator".to_owned(),
        "/api/v1/namespaces/team-a/configmaps/logserver-deployment".to_owned(),
        "/api/v1/namespaces/team-a/configmaps/logserver-etcd-bootstrap".to_owned(),
    ];
    for i in 1..=3 {
        expected.push(format!("/api/v1/namespaces/team-a/persistentvolumeclaims/logserver-{i}-etcd"));
        expected.push(format!("/api/v1/namespaces/team-a/persistentvolumeclaims/logserver-{i}-data"));
    }
    expected.extend((1..=3).map(|i| format!("/api/v1/namespaces/team-a/services/logserver-{i}")));
    expected.push("/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/logserver".to_owned());
    expected.push("/apis/policy/v1/namespaces/team-a/poddisruptionbudgets/logserver".to_owned());
    expected.extend((1..=3).map(|i| format!("/apis/apps/v1/namespaces/team-a/statefulsets/logserver-{i}")));
    // Once the service has a leader, its etcd cluster exists.
    expected.push("/api/v1/namespaces/team-a/configmaps/logserver-etcd-bootstrap".to_owned());
    assert_eq!(paths, expected);
    for patch in &patches {
        let mut params: Vec<&str> = patch.split_once('?').unwrap().1.split('&').filter(|p| !p.is_empty()).collect();
        params.sort_unstable();
        assert_eq!(params, ["fieldManager=br2k", "force=true"], "server-side apply as br2k: {patch}");
    }
    // All three start before any is ready (etcd bootstraps its cluster with all members).
    let events = replica_events(&fake, 0);
    assert_eq!(
        &events[..3],
        [
            "apply StatefulSet logserver-1 (generation 1)",
            "apply StatefulSet logserver-2 (generation 1)",
            "apply StatefulSet logserver-3 (generation 1)"
        ]
    );
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(fake.state.lock().unwrap().unready().is_empty());
    // A leader was asked for through the API server's proxy to a Pod.
    assert!(
        fake.state.lock().unwrap().requests.iter().any(|r| r.contains("/pods/logserver-1-0:8080/proxy/br2k/status"))
    );
}

#[tokio::test]
async fn an_image_change_touches_one_replica_at_a_time_and_waits_for_it() {
    let fake = Fake::new(3);
    deploy(&fake, &with_image('a')).await.unwrap();
    let before = fake.events().len();
    deploy(&fake, &with_image('b')).await.unwrap();
    assert_eq!(
        replica_events(&fake, before),
        [
            "apply StatefulSet logserver-1 (generation 2)",
            "ready logserver-1",
            "apply StatefulSet logserver-2 (generation 2)",
            "ready logserver-2",
            "apply StatefulSet logserver-3 (generation 2)",
            "ready logserver-3",
        ]
    );
    let set = fake.get("statefulsets", "logserver-2").unwrap();
    assert_eq!(set["spec"]["template"]["spec"]["containers"][0]["image"], with_image('b').image);
    // The same deployment again changes no replica.
    let before = fake.events().len();
    deploy(&fake, &with_image('b')).await.unwrap();
    assert!(replica_events(&fake, before).is_empty(), "{:?}", replica_events(&fake, before));
}

#[tokio::test]
async fn an_etcd_image_or_setting_change_rolls_the_same_way() {
    let fake = Fake::new(1);
    deploy(&fake, &spec()).await.unwrap();
    let before = fake.events().len();
    let mut changed = spec();
    changed.settings.etcd_image = "quay.io/coreos/etcd:v3.5.22".into();
    changed.settings.etcd_resources.memory = "4Gi".into();
    deploy(&fake, &changed).await.unwrap();
    let events = replica_events(&fake, before);
    assert_eq!(events.len(), 6, "{events:?}");
    for (pair, i) in events.chunks(2).zip(1..) {
        assert_eq!(pair, [format!("apply StatefulSet logserver-{i} (generation 2)"), format!("ready logserver-{i}")]);
    }
}

#[tokio::test]
async fn no_replica_is_changed_while_another_is_not_ready() {
    let fake = Fake::new(1);
    deploy(&fake, &with_image('a')).await.unwrap();
    // Replica 3's Pod goes down and stays down.
    {
        let mut state = fake.state.lock().unwrap();
        state.stuck.insert("logserver-3".into());
        let key = ("pods".to_owned(), "logserver-3-0".to_owned());
        state.objects.get_mut(&key).unwrap()["status"]["conditions"][0]["status"] = json!("False");
        let key = ("statefulsets".to_owned(), "logserver-3".to_owned());
        state.objects.get_mut(&key).unwrap()["status"]["readyReplicas"] = json!(0);
    }
    let before = fake.events().len();
    let options = RolloutOptions { timeout: Duration::from_millis(200), poll: Duration::from_millis(10) };
    let manifests = Manifests::build(&with_image('b'), &SecretValues::default()).unwrap();
    let err =
        roll_out(&fake.client, "team-a", "logserver", &manifests, options, &|_| {}).await.unwrap_err().to_string();
    assert!(err.contains("logserver-3") && err.contains("only while all others are ready"), "{err}");
    assert!(replica_events(&fake, before).is_empty(), "nothing was changed: {:?}", replica_events(&fake, before));
}

#[tokio::test]
async fn bare_pods_of_an_older_br2k_are_replaced_one_by_one() {
    let fake = Fake::new(2);
    for i in 1..=3 {
        let labels = json!({ "app.kubernetes.io/name": "logserver", "app.kubernetes.io/managed-by": "br2k", REPLICA_LABEL: format!("logserver-{i}") });
        fake.seed("pods", pod(&format!("logserver-{i}"), &labels, None));
    }
    let lines = std::sync::Mutex::new(Vec::new());
    let manifests = Manifests::build(&spec(), &SecretValues::default()).unwrap();
    roll_out(&fake.client, "team-a", "logserver", &manifests, FAST, &|l| lines.lock().unwrap().push(l.to_owned()))
        .await
        .unwrap();
    let expected: Vec<String> = (1..=3)
        .flat_map(|i| {
            [
                format!("delete pods logserver-{i}"),
                format!("apply StatefulSet logserver-{i} (generation 1)"),
                format!("ready logserver-{i}"),
            ]
        })
        .collect();
    assert_eq!(fake.events(), expected);
    assert!(lines.lock().unwrap().iter().any(|l| l.contains("a bare Pod (from an older br2k) is replaced")));
    assert_eq!(fake.names("pods"), ["logserver-1-0", "logserver-2-0", "logserver-3-0"]);
}

#[tokio::test]
async fn a_statefulset_whose_immutable_fields_differ_is_replaced_not_refused() {
    let fake = Fake::new(1);
    deploy(&fake, &spec()).await.unwrap();
    // As if an older br2k had named the governing Service differently.
    fake.state.lock().unwrap().objects.get_mut(&("statefulsets".into(), "logserver-2".into())).unwrap()["spec"]["serviceName"] =
        json!("logserver");
    let before = fake.events().len();
    deploy(&fake, &spec()).await.unwrap();
    assert_eq!(
        fake.events()[before..],
        ["delete statefulsets logserver-2", "apply StatefulSet logserver-2 (generation 1)", "ready logserver-2"]
    );
}

#[tokio::test]
async fn a_replica_count_change_is_refused_before_anything_is_applied() {
    let fake = Fake::new(1);
    deploy(&fake, &spec()).await.unwrap();
    let patches = |fake: &Fake| fake.state.lock().unwrap().requests.iter().filter(|r| r.starts_with("PATCH")).count();
    let before = patches(&fake);
    let err = deploy(&fake, &KubernetesSpec { replicas: 1, ..spec() }).await.unwrap_err().to_string();
    assert!(err.contains("runs 3 replicas") && err.contains("--replicas 3") && err.contains("membership"), "{err}");
    assert_eq!(patches(&fake), before, "nothing applied");
}

#[tokio::test]
async fn the_managers_redeploy_applies_the_recorded_settings_not_its_own() {
    let fake = Fake::new(1);
    let mut team = spec();
    team.settings.etcd_image = "registry.example.org/etcd:v3.5.21-team".into();
    team.settings.priority_class = Some("br2k-critical".into());
    deploy(&fake, &team).await.unwrap();

    let managers_own = settings();
    let chosen =
        deployment_settings(&fake.client, "team-a", "logserver", SettingsSource::Recorded, &managers_own, &|_| {})
            .await
            .unwrap();
    assert_eq!(chosen, team.settings);
    let before = fake.events().len();
    deploy(&fake, &KubernetesSpec { settings: chosen, ..spec() }).await.unwrap();
    assert!(replica_events(&fake, before).is_empty(), "the recorded shape: nothing restarts");
    let set = fake.get("statefulsets", "logserver-1").unwrap();
    assert_eq!(set["spec"]["template"]["spec"]["priorityClassName"], "br2k-critical");

    // `br2k deploy` uses what it is given; with nothing recorded the manager uses its own.
    let given = deployment_settings(&fake.client, "team-a", "logserver", SettingsSource::Given, &managers_own, &|_| {})
        .await
        .unwrap();
    assert_eq!(given, managers_own);
    let none = deployment_settings(&fake.client, "team-a", "other", SettingsSource::Recorded, &managers_own, &|_| {})
        .await
        .unwrap();
    assert_eq!(none, managers_own);
}

#[tokio::test]
async fn teardown_removes_what_deploy_made_and_keeps_the_volumes_unless_asked() {
    let fake = Fake::new(1);
    deploy(&fake, &spec()).await.unwrap();
    let down = take_down(&fake.client, "team-a", "logserver", false, &|_| {}).await.unwrap();
    assert_eq!(down.kept_volumes.len(), 6);
    for resource in ["statefulsets", "pods", "services", "secrets", "networkpolicies", "poddisruptionbudgets"] {
        assert!(fake.names(resource).is_empty(), "{resource}: {:?}", fake.names(resource));
    }
    assert_eq!(fake.names("persistentvolumeclaims").len(), 6, "the data stays");
    assert_eq!(fake.names("configmaps"), ["logserver-etcd-bootstrap"], "and the hint that goes with it");
    assert!(down.deleted.contains(&"StatefulSet logserver-2".to_owned()), "{:?}", down.deleted);

    let down = take_down(&fake.client, "team-a", "logserver", true, &|_| {}).await.unwrap();
    assert!(down.kept_volumes.is_empty());
    assert!(fake.names("persistentvolumeclaims").is_empty());
    assert!(fake.names("configmaps").is_empty());
}

#[tokio::test]
async fn a_refusal_names_what_was_refused_and_what_to_do() {
    let (service, mut handle) =
        tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
    tokio::spawn(async move {
        if let Some((_, respond)) = handle.next_request().await {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "statefulsets.apps is forbidden", "reason": "Forbidden", "code": 403
            });
            respond.send_response(
                http::Response::builder()
                    .status(403)
                    .body(kube::client::Body::from(serde_json::to_vec(&status).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = Client::new(service, "default");
    let manifests = Manifests::build(&spec(), &SecretValues::default()).unwrap();
    let err = roll_out(&client, "team-a", "logserver", &manifests, FAST, &|_| {}).await.unwrap_err().to_string();
    assert!(err.contains("could not list the StatefulSets of logserver in team-a"), "{err}");
    assert!(err.contains("403: the token may not do this"), "{err}");
}

#[test]
fn the_operator_key_is_made_once_kept_private_and_reused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let first = operator_key(dir.path(), "prod", "logserver").unwrap();
    let second = operator_key(dir.path(), "prod", "logserver").unwrap();
    assert_eq!(first.address(), second.address());
    assert_ne!(operator_key(dir.path(), "prod", "other").unwrap().address(), first.address());
    let path = dir.path().join("operators/prod/logserver.key");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(operator_key(dir.path(), "prod", "logserver").unwrap_err().to_string().contains("chmod 600"));
}

/// What the etcd bootstrap hint in the fake says.
fn bootstrap_hint(fake: &Fake) -> Option<String> {
    let map = fake.get("configmaps", "logserver-etcd-bootstrap")?;
    map["data"][crate::kubernetes::ETCD_BOOTSTRAP_KEY].as_str().map(str::to_owned)
}

#[tokio::test]
async fn the_etcd_bootstrap_hint_says_existing_once_the_service_had_a_leader_and_never_turns_back() {
    let fake = Fake::new(1);
    // A first deployment whose replicas never get ready: the hint stays `new` (the
    // members may still found their cluster), and the deploy says why it stopped.
    fake.state.lock().unwrap().stuck.insert("logserver-2".into());
    let stuck = deploy(&fake, &spec()).await.unwrap_err().to_string();
    assert!(stuck.contains("logserver-2"), "{stuck}");
    assert_eq!(bootstrap_hint(&fake).as_deref(), Some("new"));
    // The next deployment sees a leader: from then on `existing`.
    fake.state.lock().unwrap().stuck.clear();
    deploy(&fake, &spec()).await.unwrap();
    assert_eq!(bootstrap_hint(&fake).as_deref(), Some("existing"));
    // A redeploy, and a teardown that keeps the volumes followed by a deploy that starts
    // every replica together again, never make it `new`: a member whose volume was lost
    // meanwhile must join the others, not found a second cluster.
    deploy(&fake, &with_image('b')).await.unwrap();
    assert_eq!(bootstrap_hint(&fake).as_deref(), Some("existing"));
    take_down(&fake.client, "team-a", "logserver", false, &|_| {}).await.unwrap();
    assert_eq!(bootstrap_hint(&fake).as_deref(), Some("existing"));
    deploy(&fake, &spec()).await.unwrap();
    assert_eq!(bootstrap_hint(&fake).as_deref(), Some("existing"));
    // A service a br2k from before the hint deployed, running with a leader: its hint is
    // created saying `existing` at once (one apply), never `new` while it runs.
    fake.state.lock().unwrap().objects.remove(&("configmaps".into(), "logserver-etcd-bootstrap".into()));
    let requests_before = fake.state.lock().unwrap().requests.len();
    deploy(&fake, &spec()).await.unwrap();
    let hint_patches = fake.state.lock().unwrap().requests[requests_before..]
        .iter()
        .filter(|r| r.starts_with("PATCH") && r.contains("/configmaps/logserver-etcd-bootstrap"))
        .count();
    assert_eq!((bootstrap_hint(&fake).as_deref(), hint_patches), (Some("existing"), 1));
    // Only deleting the data too starts afresh.
    take_down(&fake.client, "team-a", "logserver", true, &|_| {}).await.unwrap();
    assert_eq!(bootstrap_hint(&fake), None);
    deploy(&fake, &spec()).await.unwrap();
    assert_eq!(bootstrap_hint(&fake).as_deref(), Some("existing"), "new until the leader, existing after");
}
