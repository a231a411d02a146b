//! The apply path against kube's mocked API service (`tower_test::mock::pair`): no API
//! server can run on these machines, so these tests assert the exact requests br2k sends.

use std::collections::BTreeMap;

use alloy::primitives::Address;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;

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
        etcd_image: DEFAULT_ETCD_IMAGE.into(),
        nodes: ["w1", "w2", "w3"].iter().map(|n| WorkerNode { name: (*n).into(), labels: BTreeMap::new() }).collect(),
        endpoints: Vec::new(),
        storage_class: Some("fast".into()),
        volume_size: "1Gi".into(),
        rpc_url: "http://chain.example.org:8545".into(),
        registry: Address::repeat_byte(0x11),
        backup: Some(super::manifests::BackupTarget {
            registry_url: "https://harbor.example".into(),
            repository: "br2k/logserver".into(),
            schedule: crate::backup_schedule::BackupSchedule::default(),
        }),
        etcd_tls: false,
    }
}

/// One request as the mocked API server received it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    method: Method,
    uri: String,
    content_type: String,
    body: serde_json::Value,
}

/// Runs `rounds` applies of `manifests` against a mocked API server that answers every
/// patch with the object it was sent (plus a resource version), and returns what it saw.
async fn apply_against_mock(manifests: &Manifests, rounds: usize) -> (Vec<Vec<Applied>>, Vec<Seen>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("the request body is readable");
            let body: serde_json::Value = serde_json::from_slice(&bytes).expect("the patch is JSON");
            let mut answer = body.clone();
            answer["metadata"]["resourceVersion"] = "7".into();
            respond.send_response(
                Response::builder().status(200).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap(),
            );
            let content_type = parts.headers.get("content-type").map(|v| v.to_str().unwrap().to_owned());
            seen.push(Seen {
                method: parts.method,
                uri: parts.uri.to_string(),
                content_type: content_type.unwrap_or_default(),
                body,
            });
        }
        seen
    });
    let client = Client::new(service, "default");
    let mut results = Vec::new();
    for _ in 0..rounds {
        results.push(apply(&client, "team-a", manifests, &|_| {}).await.expect("the mock accepts every patch"));
    }
    drop(client);
    (results, server.await.unwrap())
}

#[tokio::test]
async fn apply_sends_one_server_side_apply_patch_per_object_as_br2k_in_the_namespace() {
    let values = SecretValues { operator_key: Some("0xkey".into()), ..SecretValues::default() };
    let manifests = Manifests::build(&spec(), &values).unwrap();
    let (results, seen) = apply_against_mock(&manifests, 1).await;
    assert_eq!(seen.len(), manifests.len());
    assert_eq!(seen.len(), 1 + 6 + 3 + 1 + 3, "operator secret, 6 volumes, 3 services, the network policy, 3 pods");
    let paths: Vec<&str> = seen.iter().map(|s| s.uri.split('?').next().unwrap()).collect();
    let mut expected = vec!["/api/v1/namespaces/team-a/secrets/logserver-operator".to_owned()];
    for i in 1..=3 {
        expected.push(format!("/api/v1/namespaces/team-a/persistentvolumeclaims/logserver-{i}-etcd"));
        expected.push(format!("/api/v1/namespaces/team-a/persistentvolumeclaims/logserver-{i}-data"));
    }
    expected.extend((1..=3).map(|i| format!("/api/v1/namespaces/team-a/services/logserver-{i}")));
    expected.push("/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/logserver".to_owned());
    expected.extend((1..=3).map(|i| format!("/api/v1/namespaces/team-a/pods/logserver-{i}")));
    assert_eq!(paths, expected);
    for request in &seen {
        assert_eq!(request.method, Method::PATCH);
        assert_eq!(request.content_type, "application/apply-patch+yaml", "server-side apply");
        let query = request.uri.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let mut params: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
        params.sort_unstable();
        assert_eq!(params, ["fieldManager=br2k", "force=true"], "{}", request.uri);
        assert_eq!(request.body["metadata"]["namespace"], "team-a");
        assert!(request.body["apiVersion"].is_string() && request.body["kind"].is_string(), "{}", request.body);
    }
    let pod = &seen.last().unwrap().body;
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["spec"]["nodeSelector"][NODE_LABEL], "w3");
    let secret = &seen[0].body;
    assert_eq!(secret["data"]["ETH_PRIVATE_KEY"], "MHhrZXk=", "base64 of the key, sent to the cluster only");
    assert!(results[0].iter().all(|a| a.resource_version.as_deref() == Some("7")));
}

#[tokio::test]
async fn a_second_apply_sends_exactly_the_same_requests() {
    let manifests = Manifests::build(&spec(), &SecretValues::default()).unwrap();
    let (results, seen) = apply_against_mock(&manifests, 2).await;
    let (first, second) = seen.split_at(manifests.len());
    assert_eq!(first, second, "the same objects, so server-side apply changes nothing");
    assert_eq!(results[0], results[1]);
}

#[tokio::test]
async fn a_refusal_names_the_object_and_what_to_do() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        if let Some((_, respond)) = handle.next_request().await {
            let status = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "secrets \"logserver-operator\" is forbidden", "reason": "Forbidden", "code": 403
            });
            respond.send_response(
                Response::builder().status(403).body(Body::from(serde_json::to_vec(&status).unwrap())).unwrap(),
            );
        }
    });
    let client = Client::new(service, "default");
    let manifests = Manifests::build(&spec(), &SecretValues::default()).unwrap();
    let err = apply(&client, "team-a", &manifests, &|_| {}).await.unwrap_err().to_string();
    assert!(err.contains("the cluster refused Secret team-a/logserver-operator"), "{err}");
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
