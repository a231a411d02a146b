//! Images pushed to and pulled from a real OCI registry (Debian's `docker-registry`), open
//! and behind htpasswd basic auth.

use std::path::Path;

use br2k_deploy::container_registry::{Credentials, RegistryClient};
use br2k_deploy::image::{ImageSpec, ImageStore};
use br2k_test_utils::OciRegistry;

fn built(store: &ImageStore) -> br2k_deploy::image::ImageRecord {
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
