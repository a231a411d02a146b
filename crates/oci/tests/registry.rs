//! Images pushed to and pulled from a real OCI registry (Debian's `docker-registry`), open
//! and behind htpasswd basic auth.

use std::path::Path;

use br2k_oci::image::{ImageSpec, ImageStore};
use br2k_oci::registry::{Credentials, RegistryClient};
use br2k_test_utils::OciRegistry;

fn built(store: &ImageStore) -> br2k_oci::image::ImageRecord {
    let spec = ImageSpec { binary: "/bin/true".into(), name: "br2k/demo".into(), tag: "v1".into(), port: 8080 };
    store.build(&spec).unwrap()
}

fn blob(dir: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).unwrap()
}

#[tokio::test]
async fn push_then_pull_by_digest_gives_back_the_same_bytes() {
    let registry =
        OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (source, target) = (ImageStore::new(a.path()), ImageStore::new(b.path()));
    let record = built(&source);
    let client = RegistryClient::new(&registry.url(), true, None).unwrap();
    assert_eq!(client.push(&source, &record, "br2k/demo").await.unwrap(), record.digest);
    // A second push finds every blob there and changes nothing.
    assert_eq!(client.push(&source, &record, "br2k/demo").await.unwrap(), record.digest);

    let pulled = client.pull(&target, "br2k/demo", &record.digest, "br2k/demo", "v1").await.unwrap();
    assert_eq!(pulled.digest, record.digest);
    assert_eq!(pulled.entrypoint, "/usr/local/bin/true");
    assert_eq!(pulled.binary_sha256, record.binary_sha256);
    for digest in [&record.digest, &record.config_digest, &record.layer_digest] {
        assert_eq!(blob(a.path(), digest), blob(b.path(), digest), "{digest} identical after the round trip");
    }
    assert_eq!(target.find("br2k/demo", "v1").unwrap().unwrap().digest, record.digest);

    let small = RegistryClient::new(&registry.url(), true, None).unwrap().with_max_image_bytes(1024);
    let c = tempfile::tempdir().unwrap();
    let err = small.pull(&ImageStore::new(c.path()), "br2k/demo", &record.digest, "x", "y").await.unwrap_err();
    assert!(err.to_string().contains("larger than br2k accepts"), "an image over the limit is refused: {err}");

    let missing = format!("sha256:{}", "0".repeat(64));
    let err = client.pull(&target, "br2k/demo", &missing, "x", "y").await.unwrap_err();
    assert!(err.to_string().contains("fetch the manifest"), "{err}");
}

#[tokio::test]
async fn basic_auth_is_answered_and_a_wrong_password_named() {
    let registry = OciRegistry::spawn(Some(("alice", "correct horse")))
        .expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path());
    let record = built(&store);
    let user = |password: &str| Some(Credentials { username: "alice".into(), password: password.into() });

    let right = RegistryClient::new(&registry.url(), true, user("correct horse")).unwrap();
    assert_eq!(right.push(&store, &record, "br2k/demo").await.unwrap(), record.digest);

    let wrong = RegistryClient::new(&registry.url(), true, user("battery staple")).unwrap();
    let err = wrong.push(&store, &record, "br2k/demo").await.unwrap_err().to_string();
    assert!(err.contains("refused the credentials") && err.contains("alice"), "{err}");
    assert!(!err.contains("battery"), "the password never appears in an error: {err}");

    let none = RegistryClient::new(&registry.url(), true, None).unwrap();
    let err = none.push(&store, &record, "br2k/demo").await.unwrap_err().to_string();
    assert!(err.contains("needs credentials") && err.contains("BR2K_REGISTRY_USERNAME"), "{err}");
}

/// A token service on another host: records the Authorization header of every request
/// it gets, and refuses them all.
struct ForeignTokenService {
    realm: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl ForeignTokenService {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // 127.0.0.2 is loopback too, but another host than the registry's 127.0.0.1.
        let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let mut head = vec![0; 16 * 1024];
                let n = stream.read(&mut head).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
                let authorization = head.lines().find_map(|l| l.strip_prefix("authorization: ").map(str::to_owned));
                record.lock().unwrap().push(authorization);
                let _ = stream
                    .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
        });
        Self { realm, seen, _task: task }
    }
}

#[tokio::test]
async fn credentials_are_never_sent_to_a_token_service_on_another_host() {
    let foreign = ForeignTokenService::start().await;
    let registry = OciRegistry::spawn_with_token_realm(&foreign.realm)
        .expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(dir.path());
    let record = built(&store);
    let credentials = Some(Credentials { username: "alice".into(), password: "correct horse".into() });

    let client = RegistryClient::new(&registry.url(), true, credentials.clone()).unwrap();
    let err = client.push(&store, &record, "br2k/demo").await.unwrap_err().to_string();
    assert!(err.contains("token service on another host (127.0.0.2)"), "{err}");
    assert!(err.contains("BR2K_REGISTRY_TOKEN_HOSTS=127.0.0.2"), "the error says how to trust it: {err}");
    let seen = foreign.seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "a token was asked for, anonymously");
    assert!(seen.iter().all(Option::is_none), "no credentials reached the foreign host: {seen:?}");

    // Trusted by name, it gets them (and refuses them here: it is not a real token service).
    let trusting =
        RegistryClient::new(&registry.url(), true, credentials).unwrap().trusting_token_hosts(["127.0.0.2".to_owned()]);
    let err = trusting.push(&store, &record, "br2k/demo").await.unwrap_err().to_string();
    assert!(err.contains("refused the credentials for user \"alice\""), "{err}");
    assert!(foreign.seen.lock().unwrap().last().unwrap().as_deref().is_some_and(|a| a.starts_with("basic ")));
}

#[tokio::test]
async fn bearer_tokens_from_the_registrys_own_token_service_push_and_pull() {
    // Harbor's way: the registry takes only tokens, from a token service next to it that
    // checks the user's password; the registry verifies each token's signature and scope.
    let registry = OciRegistry::spawn_with_token_service("alice", "correct horse")
        .expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (source, target) = (ImageStore::new(a.path()), ImageStore::new(b.path()));
    let record = built(&source);
    let user = |password: &str| Some(Credentials { username: "alice".into(), password: password.into() });

    let client = RegistryClient::new(&registry.url(), true, user("correct horse")).unwrap();
    assert_eq!(client.push(&source, &record, "br2k/demo").await.unwrap(), record.digest);
    let pulled = client.pull(&target, "br2k/demo", &record.digest, "br2k/demo", "v1").await.unwrap();
    assert_eq!(pulled.digest, record.digest);
    assert_eq!(client.tags("br2k/demo").await.unwrap(), vec!["v1".to_owned()]);
    assert_eq!(client.manifest_digest("br2k/demo", "v1").await.unwrap(), record.digest);
    let issued = registry.tokens_issued();
    assert!((1..=3).contains(&issued), "a token per scope (pull; pull and push), not per request: {issued}");

    let wrong = RegistryClient::new(&registry.url(), true, user("battery staple")).unwrap();
    let err = wrong.pull(&target, "br2k/demo", &record.digest, "x", "y").await.unwrap_err().to_string();
    assert!(err.contains("token service") && err.contains("refused the credentials for user \"alice\""), "{err}");
    let none = RegistryClient::new(&registry.url(), true, None).unwrap();
    let err = none.push(&source, &record, "br2k/other").await.unwrap_err().to_string();
    assert!(err.contains("needs credentials"), "{err}");
}
