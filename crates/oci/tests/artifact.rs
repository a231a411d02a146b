//! OCI artifacts on a real registry (Debian's `docker-registry`), read back by br2k and by
//! an OCI client that is not br2k's (`skopeo`), and refused when the registry's copy was
//! altered.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use br2k_oci::artifact::{Artifact, Layer};
use br2k_oci::registry::RegistryClient;
use br2k_test_utils::OciRegistry;

const TYPE: &str = "application/vnd.br2k.snapshot.v1";

fn artifact() -> Artifact {
    Artifact {
        artifact_type: TYPE.into(),
        layers: vec![
            Layer {
                media_type: "application/vnd.br2k.state.v1".into(),
                title: "state".into(),
                bytes: vec![7; 100_000],
            },
            Layer {
                media_type: "application/vnd.br2k.log.v1+jsonl".into(),
                title: "log".into(),
                bytes: b"{}\n".to_vec(),
            },
        ],
        annotations: BTreeMap::from([
            ("io.br2k.service".to_owned(), "logserver".to_owned()),
            ("io.br2k.index".to_owned(), "100".to_owned()),
        ]),
    }
}

fn blob_file(registry: &OciRegistry, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    registry.storage().join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
}

fn skopeo(args: &[&str]) -> String {
    let output = Command::new("skopeo")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("skopeo cannot run ({e}): run `bash tools/setup.sh` to install it"));
    assert!(output.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn alter(path: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    change(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn an_artifact_is_pushed_read_back_by_digest_and_by_skopeo_and_refused_when_altered() {
    let registry =
        OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&registry.url(), true, None).unwrap();
    let pushed = artifact();
    let digest = client.push_artifact("br2k/logserver", "snapshot-100", &pushed).await.unwrap();
    assert_eq!(client.pull_artifact("br2k/logserver", &digest, TYPE).await.unwrap(), pushed);

    // Another OCI client reads it by digest: the manifest names br2k's artifact type.
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/br2k/logserver@{digest}", registry.host()),
    ]);
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(manifest["artifactType"], TYPE);
    assert_eq!(manifest["annotations"]["io.br2k.index"], "100");

    let wrong = client.pull_artifact("br2k/logserver", &digest, "application/vnd.br2k.segment.v1").await;
    assert!(wrong.unwrap_err().to_string().contains("not \"application/vnd.br2k.segment.v1\""));

    // A file altered in the registry is refused; so is an altered manifest.
    let state = format!("sha256:{}", sha256_hex(&pushed.layers[0].bytes));
    alter(&blob_file(&registry, &state), |b| b[0] ^= 1);
    let err = client.pull_artifact("br2k/logserver", &digest, TYPE).await.unwrap_err().to_string();
    assert!(err.contains("does not match that digest") && err.contains(&state), "{err}");
    alter(&blob_file(&registry, &digest), |b| b.extend_from_slice(b" "));
    let err = client.pull_artifact("br2k/logserver", &digest, TYPE).await.unwrap_err().to_string();
    assert!(err.contains("does not match that digest") && err.contains("refusing to restore"), "{err}");
}

fn sha256_hex(bytes: &[u8]) -> String {
    br2k_oci::image::sha256_digest(bytes).trim_start_matches("sha256:").to_owned()
}

#[tokio::test]
async fn a_file_layer_is_streamed_up_under_its_digest_and_a_wrong_digest_is_refused() {
    let registry =
        OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let client = RegistryClient::new(&registry.url(), true, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot");
    // Larger than one read buffer, so the upload is really a stream of chunks.
    let bytes: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let digest = br2k_oci::image::sha256_digest(&bytes);
    let size = bytes.len() as u64;
    let (descriptor, fresh) = client
        .push_file_layer("br2k/files", "application/octet-stream", BTreeMap::new(), (&path, &digest, size))
        .await
        .unwrap();
    assert!(fresh && descriptor.digest == digest && descriptor.size == size);
    assert_eq!(client.fetch_blob("br2k/files", &digest, size).await.unwrap().to_vec(), bytes, "the same bytes back");
    let copy = dir.path().join("copy");
    client.fetch_blob_to_file("br2k/files", &digest, size, &copy).await.unwrap();
    assert_eq!(std::fs::read(&copy).unwrap(), bytes, "streamed down to a file, the same bytes");
    let cut = client.fetch_blob_to_file("br2k/files", &digest, size - 1, &copy).await.unwrap_err();
    assert!(cut.to_string().contains("larger than"), "a blob past its bound is refused: {cut}");
    let (_, again) = client
        .push_file_layer("br2k/files", "application/octet-stream", BTreeMap::new(), (&path, &digest, size))
        .await
        .unwrap();
    assert!(!again, "a blob the registry holds is not sent again");
    // Bytes that do not hash to the digest they are offered under: the registry refuses.
    let other = br2k_oci::image::sha256_digest(b"something else");
    let refused = client.push_blob_file("br2k/files", &other, &path, size).await.unwrap_err();
    assert!(!client.has_blob("br2k/files", &other).await.unwrap(), "{refused}");
}
