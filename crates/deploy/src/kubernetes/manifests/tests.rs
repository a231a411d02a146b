use serde_json::{Value, json};

use super::*;
use crate::kubernetes::tests::spec;

fn build(spec: &KubernetesSpec, values: &SecretValues) -> Manifests {
    Manifests::build(spec, values).unwrap()
}

/// Replica `i`'s StatefulSet as JSON (what the API server receives).
fn set(manifests: &Manifests, i: usize) -> Value {
    serde_json::to_value(&manifests.stateful_sets[i - 1]).unwrap()
}

fn container<'a>(set: &'a Value, name: &str) -> &'a Value {
    let pod = &set["spec"]["template"]["spec"];
    let mut all = pod["containers"].as_array().unwrap().iter().chain(pod["initContainers"].as_array().unwrap());
    all.find(|c| c["name"] == name).unwrap()
}

/// etcd's flags, as the init step is given them to write into etcd's configuration file.
fn etcd_flags(set: &Value) -> Vec<String> {
    let flags = env(container(set, "etcd-init"), "BR2K_ETCD_INIT_FLAGS").unwrap()["value"].as_str().unwrap();
    flags.lines().map(str::to_owned).collect()
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array().unwrap().iter().find(|e| e["name"] == name)
}

fn args(container: &Value) -> Vec<String> {
    container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
}

#[test]
fn one_statefulset_of_one_pod_per_replica_with_etcd_on_localhost_and_peers_by_service_name() {
    let manifests = build(&spec(), &SecretValues::default());
    assert_eq!((manifests.stateful_sets.len(), manifests.services.len(), manifests.claims.len()), (3, 3, 6));
    assert_eq!(manifests.secrets.len(), 1, "no pull or push secret without registry credentials");
    let set = set(&manifests, 2);
    assert_eq!(set["metadata"]["name"], "logserver-2");
    assert_eq!(set["spec"]["replicas"], 1);
    assert_eq!(set["spec"]["serviceName"], "logserver-2");
    assert_eq!(set["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let selector = json!({ "app.kubernetes.io/name": "logserver", "br2k.io/replica": "logserver-2" });
    assert_eq!(set["spec"]["selector"]["matchLabels"], selector);
    assert_eq!(manifests.services[1].spec.as_ref().unwrap().selector, serde_json::from_value(selector).ok());
    // The replica's own volumes, not claim templates: the data of an older deployment stays.
    assert!(set["spec"].get("volumeClaimTemplates").is_none());
    let volumes = &set["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["persistentVolumeClaim"]["claimName"], "logserver-2-etcd");
    assert_eq!(volumes[1]["persistentVolumeClaim"]["claimName"], "logserver-2-data");
    let etcd = etcd_flags(&set);
    assert!(etcd.contains(&"--listen-client-urls=http://0.0.0.0:2379".to_owned()));
    assert!(etcd.contains(&"--advertise-client-urls=http://logserver-2.team-a.svc:2379".to_owned()));
    assert!(etcd.contains(&"--name=logserver-2".to_owned()));
    assert!(etcd.contains(
        &"--initial-cluster=logserver-1=http://logserver-1.team-a.svc:2380,logserver-2=http://logserver-2.team-a.svc:2380,logserver-3=http://logserver-3.team-a.svc:2380".to_owned()
    ));
    let app = container(&set, "app");
    assert_eq!(env(app, "BR2K_REPLICA").unwrap()["value"], "logserver-2");
    assert_eq!(env(app, "BR2K_ETCD").unwrap()["value"], "http://127.0.0.1:2379", "the app uses its own member");
    assert!(env(app, "ETH_PRIVATE_KEY").is_none(), "the key is a file, never an environment variable");
    let ports = &manifests.services[1].spec.as_ref().unwrap().ports.as_ref().unwrap();
    assert!(ports.iter().any(|p| p.port == 2379), "the other members' init steps reach this member's client port");
}

#[test]
fn an_init_step_decides_how_each_etcd_member_starts_and_etcd_starts_from_what_it_wrote() {
    let manifests = build(&spec(), &SecretValues::default());
    let set = set(&manifests, 2);
    let init = container(&set, "etcd-init");
    assert_eq!(init["image"], container(&set, "app")["image"], "the app's image runs the init step");
    assert!(init.get("command").is_none() && init.get("args").is_none(), "the image's own entrypoint");
    assert_eq!(env(init, "BR2K_ETCD_INIT").unwrap()["value"], "/tmp/etcd/etcd.json");
    assert_eq!(
        env(init, "BR2K_ETCD_INIT_PEERS").unwrap()["value"],
        "http://logserver-1.team-a.svc:2379,http://logserver-3.team-a.svc:2379",
        "the other members, through their Services"
    );
    let hint = env(init, "BR2K_ETCD_INIT_BOOTSTRAP_FILE").unwrap()["value"].as_str().unwrap();
    assert_eq!(hint, "/var/run/br2k/etcd-bootstrap/etcd-cluster-state");
    let flags = etcd_flags(&set);
    assert!(flags.iter().all(|f| !f.starts_with("--initial-cluster-state")), "the init step decides the state");
    // The flags are exactly what the init step accepts.
    let text = flags.join("\n");
    assert!(flags.iter().all(|f| f.starts_with("--") && f.contains('=')), "{text}");
    let mounts = init["volumeMounts"].as_array().unwrap();
    let mount = |name: &str| mounts.iter().find(|m| m["name"] == name).cloned().unwrap();
    assert_eq!(mount("etcd")["mountPath"], "/var/lib/etcd", "it reads the member's data directory");
    assert_eq!(mount("etcd")["readOnly"], true);
    assert_eq!(mount("etcd-bootstrap")["mountPath"], "/var/run/br2k/etcd-bootstrap");
    assert_eq!(mount("scratch")["mountPath"], "/tmp", "where it writes etcd's configuration");
    assert!(mounts.iter().all(|m| m["name"] != "operator-key" && m["name"] != "data"), "nothing it does not need");
    let volumes = set["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let hint_volume = volumes.iter().find(|v| v["name"] == "etcd-bootstrap").unwrap();
    assert_eq!(hint_volume["configMap"]["name"], "logserver-etcd-bootstrap");
    let etcd = container(&set, "etcd");
    assert_eq!(args(etcd), ["--config-file=/tmp/etcd/etcd.json"]);
    assert!(
        etcd["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == "scratch" && m["mountPath"] == "/tmp")
    );
    // The hint as a first deployment creates it.
    let created = manifests.etcd_bootstrap.data.as_ref().unwrap();
    assert_eq!(created[ETCD_BOOTSTRAP_KEY], "new");
    assert_eq!(manifests.etcd_bootstrap.metadata.name.as_deref(), Some("logserver-etcd-bootstrap"));
}

#[test]
fn every_pod_meets_the_restricted_pod_security_standard() {
    let values = SecretValues {
        backup_push: Some(("harbor.example".into(), Credentials { username: "push".into(), password: "p".into() })),
        ..SecretValues::default()
    };
    let tls = KubernetesSpec { settings: ClusterSettings { etcd_tls: true, ..spec().settings }, ..spec() };
    for manifests in [build(&spec(), &SecretValues::default()), build(&tls, &values)] {
        for i in 1..=3 {
            let set = set(&manifests, i);
            let pod = &set["spec"]["template"]["spec"];
            assert_eq!(pod["automountServiceAccountToken"], false, "no service-account token");
            let security = &pod["securityContext"];
            assert_eq!(security["runAsNonRoot"], true);
            assert_eq!(security["runAsUser"], 65_532);
            assert_eq!(security["runAsGroup"], 65_532);
            assert_eq!(security["fsGroup"], 65_532, "the volumes are writable by the non-root user");
            assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
            assert!(pod.get("hostNetwork").is_none() && pod.get("hostPID").is_none() && pod.get("hostIPC").is_none());
            for volume in pod["volumes"].as_array().unwrap() {
                assert!(volume.get("hostPath").is_none(), "{volume}");
            }
            for name in ["app", "etcd", "etcd-init"] {
                let c = container(&set, name);
                let s = &c["securityContext"];
                assert_eq!(s["allowPrivilegeEscalation"], false, "{name}");
                assert_eq!(s["capabilities"]["drop"], json!(["ALL"]), "{name}");
                assert!(s["capabilities"].get("add").is_none(), "{name}");
                assert_eq!(s["readOnlyRootFilesystem"], true, "{name}");
                assert_eq!(s["runAsNonRoot"], true, "{name}");
                assert_eq!(s["seccompProfile"]["type"], "RuntimeDefault", "{name}");
                assert!(s.get("privileged").is_none_or(|p| p == false), "{name}");
                let scratch = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "scratch").unwrap();
                assert_eq!(scratch["mountPath"], "/tmp", "{name}: scratch space on a read-only root");
                let ports = c.get("ports").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
                assert!(ports.iter().all(|p| p.get("hostPort").is_none()), "{name}");
            }
            let scratch = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "scratch").unwrap();
            assert_eq!(scratch["emptyDir"]["sizeLimit"], "256Mi");
        }
    }
}

#[test]
fn the_operator_key_is_a_0400_file_and_backups_push_with_their_own_credential() {
    let pull = Credentials { username: "robot".into(), password: "pull-secret-value".into() };
    let push = Credentials { username: "backup-robot".into(), password: "push-secret-value".into() };
    let values = SecretValues {
        operator_key: Some("0xsecret-operator-key".into()),
        pull: Some(("harbor.example.org".into(), pull)),
        backup_push: Some(("harbor.example.org".into(), push)),
        etcd_tls: None,
        admin_token: Some("an-admin-token-value".into()),
    };
    let manifests = build(&spec(), &values);
    let names: Vec<&str> = manifests.secrets.iter().map(|s| s.metadata.name.as_deref().unwrap()).collect();
    assert_eq!(names, ["logserver-operator", "logserver-pull", "logserver-backup-push"]);
    assert!(manifests.secrets.iter().all(|s| s.data.is_some()));
    let set = set(&manifests, 1);
    let pod = &set["spec"]["template"]["spec"];
    assert_eq!(pod["imagePullSecrets"], json!([{ "name": "logserver-pull" }]), "the pull credential is the kubelet's");
    let volume = |name: &str| pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).cloned();
    let key = volume("operator-key").unwrap();
    assert_eq!(key["secret"]["secretName"], "logserver-operator");
    assert_eq!(key["secret"]["items"], json!([{ "key": "ETH_PRIVATE_KEY", "path": "key", "mode": 0o400 }]));
    assert_eq!(key["secret"]["defaultMode"], 0o400, "the admin token is not in the key's volume");
    let app = container(&set, "app");
    assert_eq!(env(app, "ETH_PRIVATE_KEY_FILE").unwrap()["value"], "/var/run/br2k/operator/key");
    let mounts = app["volumeMounts"].as_array().unwrap();
    let mount = |name: &str| mounts.iter().find(|m| m["name"] == name).cloned();
    assert_eq!(mount("operator-key").unwrap()["readOnly"], true);
    // Backups: the push-only credential mounted as Docker's config; never the pull one.
    let auth = volume("registry-auth").unwrap();
    assert_eq!(auth["secret"]["secretName"], "logserver-backup-push");
    assert_eq!(env(app, "DOCKER_CONFIG").unwrap()["value"], "/var/run/br2k/registry");
    assert_eq!(env(app, "BR2K_BACKUP_REPOSITORY").unwrap()["value"], "br2k/logserver");
    assert!(pod["volumes"].as_array().unwrap().iter().all(|v| v["secret"]["secretName"] != "logserver-pull"));
    assert!(container(&set, "etcd")["volumeMounts"].as_array().unwrap().iter().all(|m| m["name"] != "operator-key"));
    // Without a push credential the app gets no registry credential at all.
    let no_push = build(&spec(), &SecretValues { backup_push: None, ..values.clone() });
    let set = super::tests::set(&no_push, 1);
    assert!(env(container(&set, "app"), "DOCKER_CONFIG").is_none());
    // The dry run's YAML never carries a secret value.
    let yaml = manifests.to_yaml();
    for secret in ["secret-operator-key", "cm9ib3", "an-admin-token-value", "push-secret-value", "YmFja3Vw"] {
        assert!(!yaml.contains(secret), "{secret} in {yaml}");
    }
    assert!(yaml.contains("data (BR2K_ADMIN_TOKEN, ETH_PRIVATE_KEY) is written at deploy time"), "{yaml}");
    assert_eq!(yaml.matches("\n---\n").count() + 1, manifests.len());
}

#[test]
fn replicas_spread_over_nodes_and_zones_and_a_drain_never_takes_quorum() {
    let manifests = build(&spec(), &SecretValues::default());
    let set2 = set(&manifests, 2);
    let affinity = &set2["spec"]["template"]["spec"]["affinity"];
    let own = json!({ "app.kubernetes.io/name": "logserver", "app.kubernetes.io/managed-by": "br2k" });
    let anti = &affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(anti, &json!([{ "labelSelector": { "matchLabels": own }, "topologyKey": "kubernetes.io/hostname" }]));
    let required = &affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
    let term = |node: &str| json!({ "matchExpressions": [{ "key": NODE_LABEL, "operator": "In", "values": [node] }] });
    assert_eq!(required, &json!([term("w1"), term("w2"), term("w3")]), "only the context's nodes");
    let preferred = &affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(preferred, &json!([{ "weight": 100, "preference": term("w2") }]), "replica 2 prefers node 2");
    assert!(
        set2["spec"]["template"]["spec"].get("nodeSelector").is_none(),
        "not pinned: a lost node is not a lost replica"
    );
    assert!(set2["spec"]["template"]["spec"].get("topologySpreadConstraints").is_none(), "no zones named");

    let budget = serde_json::to_value(&manifests.disruption_budget).unwrap();
    assert_eq!(budget["spec"]["minAvailable"], 2, "3 replicas keep a quorum of 2");
    assert_eq!(budget["spec"]["selector"]["matchLabels"], own);
    assert_eq!(budget["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    for (replicas, quorum) in [(1, 1), (2, 2), (5, 3)] {
        let mut s = spec();
        s.replicas = replicas;
        s.nodes =
            (1..=5).map(|i| crate::context::WorkerNode { name: format!("w{i}"), labels: BTreeMap::new() }).collect();
        let budget = serde_json::to_value(&build(&s, &SecretValues::default()).disruption_budget).unwrap();
        assert_eq!(budget["spec"]["minAvailable"], quorum, "{replicas} replicas");
    }

    // Nodes that name their zones: the replicas spread over them.
    let mut zoned = spec();
    zoned.nodes = ["a", "b", "c"]
        .iter()
        .map(|z| crate::context::WorkerNode {
            name: format!("w-{z}"),
            labels: BTreeMap::from([(ZONE_LABEL.to_owned(), (*z).to_owned()), ("pool".to_owned(), "br2k".to_owned())]),
        })
        .collect();
    let set = set(&build(&zoned, &SecretValues::default()), 1);
    let spread = &set["spec"]["template"]["spec"]["topologySpreadConstraints"];
    assert_eq!(spread[0]["topologyKey"], ZONE_LABEL);
    assert_eq!(spread[0]["maxSkew"], 1);
    assert_eq!(spread[0]["whenUnsatisfiable"], "DoNotSchedule");
    assert_eq!(spread[0]["nodeTaintsPolicy"], "Honor", "a lost (tainted) node's zone does not count");
    let preferred =
        &set["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(preferred[0]["preference"]["matchExpressions"].as_array().unwrap().len(), 2, "every label of the node");
}

#[test]
fn both_containers_are_guaranteed_their_resources_and_etcds_quota_fits_its_volume() {
    let mut s = spec();
    s.settings.etcd_volume_size = "10Gi".into();
    s.settings.data_volume_size = "3Gi".into();
    s.settings.etcd_resources = crate::kubernetes::ContainerResources { cpu: "2".into(), memory: "4Gi".into() };
    s.settings.priority_class = Some("br2k-critical".into());
    let manifests = build(&s, &SecretValues::default());
    let set = set(&manifests, 1);
    for (name, cpu, memory) in [("app", "500m", "512Mi"), ("etcd-init", "500m", "512Mi"), ("etcd", "2", "4Gi")] {
        let resources = &container(&set, name)["resources"];
        let want = json!({ "cpu": cpu, "memory": memory });
        assert_eq!(resources["requests"], want, "{name}");
        assert_eq!(resources["limits"], want, "{name}: requests equal limits (Guaranteed)");
    }
    assert_eq!(set["spec"]["template"]["spec"]["priorityClassName"], "br2k-critical");
    assert!(etcd_flags(&set).contains(&format!("--quota-backend-bytes={}", 5u64 << 30)));
    let size = |claim: &PersistentVolumeClaim| {
        claim.spec.as_ref().unwrap().resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0.clone()
    };
    assert_eq!((size(&manifests.claims[0]), size(&manifests.claims[1])), ("10Gi".to_owned(), "3Gi".to_owned()));
    // Declared without a node or volume: a WaitForFirstConsumer class binds them where the Pod lands.
    let claim = serde_json::to_value(&manifests.claims[0]).unwrap();
    assert!(claim["spec"].get("volumeName").is_none() && claim["spec"].get("selector").is_none());
    assert_eq!(claim["spec"]["storageClassName"], "fast");
}

#[test]
fn probes_fit_a_quorum_member() {
    let manifests = build(&spec(), &SecretValues::default());
    let set = set(&manifests, 1);
    let etcd = container(&set, "etcd");
    let health = json!({ "path": "/health?exclude=NOSPACE&serializable=true", "port": 2381 });
    for probe in ["startupProbe", "livenessProbe"] {
        assert_eq!(etcd[probe]["httpGet"], health, "{probe}: the member's own view, not the quorum's");
        assert_eq!(etcd[probe]["timeoutSeconds"], 15, "{probe}: a slow fsync does not fail it");
    }
    assert!(
        etcd["livenessProbe"]["failureThreshold"].as_i64().unwrap()
            * etcd["livenessProbe"]["periodSeconds"].as_i64().unwrap()
            >= 80
    );
    assert!(
        etcd["startupProbe"]["failureThreshold"].as_i64().unwrap()
            * etcd["startupProbe"]["periodSeconds"].as_i64().unwrap()
            >= 300
    );
    assert!(
        etcd_flags(&set).contains(&"--listen-metrics-urls=http://0.0.0.0:2381".to_owned()),
        "the kubelet probes the Pod's address"
    );
    let app = container(&set, "app");
    assert_eq!(app["livenessProbe"]["tcpSocket"]["port"], 8080, "the process, not etcd's state");
    assert_eq!(app["startupProbe"]["tcpSocket"]["port"], 8080);
    assert_eq!(app["readinessProbe"]["httpGet"]["path"], "/br2k/health");
    assert_eq!(env(app, "BR2K_ETCD_METRICS").unwrap()["value"], "http://127.0.0.1:2381");
}

#[test]
fn only_the_services_own_pods_reach_etcd_and_anyone_reaches_the_app() {
    let manifests = build(&spec(), &SecretValues::default());
    let policy = serde_json::to_value(&manifests.network_policy).unwrap();
    let own = json!({ "app.kubernetes.io/name": "logserver", "app.kubernetes.io/managed-by": "br2k" });
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"], own, "it covers the service's Pods");
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "{policy}");
    assert_eq!(rules[0]["from"][0]["podSelector"]["matchLabels"], own, "etcd only from the service's Pods");
    assert_eq!(rules[0]["ports"], json!([{ "port": 2380, "protocol": "TCP" }, { "port": 2379, "protocol": "TCP" }]));
    assert!(rules[1].get("from").is_none_or(Value::is_null), "the app from anywhere: {policy}");
    assert_eq!(rules[1]["ports"], json!([{ "port": 8080, "protocol": "TCP" }]));
    // Every Pod the policy covers carries its labels.
    for i in 1..=3 {
        let labels = &set(&manifests, i)["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "logserver");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "br2k");
    }
}

#[test]
fn with_etcd_tls_every_member_serves_and_asks_for_certificates_of_the_deployments_authority() {
    let tls_spec = KubernetesSpec { settings: ClusterSettings { etcd_tls: true, ..spec().settings }, ..spec() };
    let hosts: Vec<Vec<String>> = (1..=3).map(|i| tls_spec.member_hosts(i)).collect();
    assert_eq!(hosts[1][2], "logserver-2.team-a.svc", "named as peers reach it");
    let certificates = crate::etcd_tls::EtcdCertificates::make("logserver", &hosts).unwrap();
    let values = SecretValues { etcd_tls: Some(certificates.clone()), ..SecretValues::default() };
    let manifests = build(&tls_spec, &values);
    let tls = manifests.secrets.iter().find(|s| s.metadata.name.as_deref() == Some("logserver-etcd-tls")).unwrap();
    let data = tls.data.as_ref().unwrap();
    assert_eq!(data["ca.crt"].0, certificates.ca.as_bytes());
    assert_eq!(data["logserver-2.key"].0, certificates.members[1].key.as_bytes());
    assert!(!manifests.to_yaml().contains("PRIVATE KEY"), "the dry run never prints a key");
    let set = set(&manifests, 2);
    let etcd = etcd_flags(&set);
    for wanted in [
        "--listen-client-urls=https://0.0.0.0:2379",
        "--initial-advertise-peer-urls=https://logserver-2.team-a.svc:2380",
        "--client-cert-auth=true",
        "--peer-client-cert-auth=true",
        "--peer-trusted-ca-file=/var/run/br2k/etcd-tls/ca.crt",
    ] {
        assert!(etcd.contains(&wanted.to_owned()), "{wanted} missing from {etcd:?}");
    }
    let init = container(&set, "etcd-init");
    assert!(env(init, "BR2K_ETCD_INIT_PEERS").unwrap()["value"].as_str().unwrap().starts_with("https://"));
    let init_mounts = init["volumeMounts"].as_array().unwrap();
    assert!(init_mounts.iter().any(|m| m["name"] == "etcd-tls"), "it asks the others with the member's certificate");
    let app = container(&set, "app");
    assert_eq!(env(app, "BR2K_ETCD").unwrap()["value"], "https://127.0.0.1:2379");
    assert_eq!(env(app, "BR2K_ETCD_KEY_FILE").unwrap()["value"], "/var/run/br2k/etcd-tls/member.key");
    let volumes = set["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let volume = volumes.iter().find(|v| v["name"] == "etcd-tls").unwrap();
    let items = &volume["secret"]["items"];
    assert_eq!(items[1], json!({ "key": "logserver-2.crt", "path": "member.crt", "mode": 0o444 }));
    assert_eq!(items[2], json!({ "key": "logserver-2.key", "path": "member.key", "mode": 0o400 }));
    let plain = build(&spec(), &SecretValues::default()).to_yaml();
    assert!(!plain.contains("etcd-tls") && plain.contains("http://0.0.0.0:2379"));
}

#[test]
fn the_same_spec_gives_the_same_objects_and_records_its_settings() {
    let a = build(&spec(), &SecretValues::default());
    assert_eq!(a.to_yaml(), build(&spec(), &SecretValues::default()).to_yaml());
    let recorded = &a.settings.data.as_ref().unwrap()[SETTINGS_KEY];
    assert_eq!(serde_json::from_str::<ClusterSettings>(recorded).unwrap(), spec().settings);
}

#[test]
fn bad_specs_are_refused_with_what_to_do() {
    let refused = |spoil: fn(&mut KubernetesSpec)| {
        let mut bad = spec();
        spoil(&mut bad);
        Manifests::build(&bad, &SecretValues::default()).unwrap_err().to_string()
    };
    assert!(refused(|s| s.service = "Log_Server".into()).contains("cannot name Kubernetes objects"));
    let err = refused(|s| s.replicas = 4);
    assert!(err.contains("4 replicas need 4 worker nodes") && err.contains("--node"), "{err}");
    assert!(refused(|s| s.image = "logserver:latest".into()).contains("pinned by digest"));
    assert!(refused(|s| s.settings.data_volume_size = "lots".into()).contains("--data-volume-size"));
    assert!(refused(|s| s.settings.app_resources.cpu = "fast".into()).contains("--app-cpu"));
}
