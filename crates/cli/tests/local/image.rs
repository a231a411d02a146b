//! `br2k image` and `br2k image-registry` against a real registry (Debian's
//! `docker-registry`), open and behind basic auth.

use std::path::Path;
use std::process::Output;

use br2k_test_utils::OciRegistry;

use crate::{br2k, ok};

fn run(dir: &Path, args: &[&str]) -> Output {
    br2k().current_dir(dir).args(args).output().unwrap()
}

#[test]
fn build_push_and_pull_back_by_digest_through_the_command_line() {
    let registry =
        OciRegistry::spawn(None).expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let built: serde_json::Value = serde_json::from_str(&ok(run(
        a.path(),
        &["--json", "image", "build", "/bin/true", "--name", "br2k/demo", "--tag", "v1"],
    )))
    .unwrap();
    let digest = built["digest"].as_str().unwrap().to_owned();

    // Plain HTTP only when asked for.
    let refused = run(a.path(), &["image-registry", "add", "test", &registry.url()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("plain HTTP"));
    for dir in [a.path(), b.path()] {
        ok(run(dir, &["image-registry", "add", "test", &registry.url(), "--plain-http"]));
    }
    assert!(ok(run(a.path(), &["image-registry", "ls"])).contains("test"));

    let pushed = ok(run(a.path(), &["image", "push", "br2k/demo:v1", "--to", "test"]));
    assert_eq!(pushed.trim(), format!("{}/br2k/demo@{digest}", registry.host()));
    let pulled =
        ok(run(b.path(), &["image", "pull", &digest, "--from", "test", "--repository", "br2k/demo", "--tag", "v1"]));
    assert!(pulled.contains(&digest), "{pulled}");
    for dir in ["blobs/sha256"] {
        let names = |root: &Path| {
            let mut v: Vec<_> =
                std::fs::read_dir(root.join(".br2k").join(dir)).unwrap().flatten().map(|e| e.file_name()).collect();
            v.sort();
            v
        };
        assert_eq!(names(a.path()), names(b.path()));
        for name in names(a.path()) {
            let path = Path::new(".br2k").join(dir).join(&name);
            assert_eq!(std::fs::read(a.path().join(&path)).unwrap(), std::fs::read(b.path().join(&path)).unwrap());
        }
    }

    let unknown = run(a.path(), &["image", "push", "br2k/demo:v1", "--to", "nowhere"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no container registry \"nowhere\""));
}

#[test]
fn credentials_come_from_the_environment_and_are_never_written_to_the_project() {
    let registry = OciRegistry::spawn(Some(("bob", "hunter2-but-longer")))
        .expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    ok(run(dir.path(), &["image", "build", "/bin/true", "--name", "br2k/demo"]));
    ok(run(dir.path(), &["image-registry", "add", "secure", &registry.url(), "--plain-http"]));
    let home = dir.path().join("home"); // no Docker config.json there
    let push = |password: Option<&str>| {
        let mut command = br2k();
        command.current_dir(dir.path()).env("HOME", &home).env_remove("DOCKER_CONFIG");
        if let Some(password) = password {
            command.env("BR2K_REGISTRY_USERNAME", "bob").env("BR2K_REGISTRY_PASSWORD", password);
        }
        command.args(["image", "push", "br2k/demo:latest", "--to", "secure"]).output().unwrap()
    };
    let missing = push(None);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("needs credentials"));
    let wrong = push(Some("wrong"));
    let stderr = String::from_utf8_lossy(&wrong.stderr).into_owned();
    assert!(stderr.contains("refused the credentials for user \"bob\""), "{stderr}");
    ok(push(Some("hunter2-but-longer")));
    let project = std::fs::read_to_string(dir.path().join(".br2k/registry.json")).unwrap();
    assert!(!project.contains("hunter2") && !project.contains("bob"), "{project}");
}

#[test]
fn login_checks_the_credentials_and_stores_them_where_docker_does_private() {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let registry = OciRegistry::spawn(Some(("carol", "s3cret-enough")))
        .expect("docker-registry starts (run `bash tools/setup.sh` if it is missing)");
    let dir = tempfile::tempdir().unwrap();
    let docker = dir.path().join("docker");
    ok(run(dir.path(), &["image-registry", "add", "secure", &registry.url(), "--plain-http"]));
    let login = |password: &str| {
        let mut child = br2k()
            .current_dir(dir.path())
            .env("DOCKER_CONFIG", &docker)
            .args(["image-registry", "login", "secure", "--username", "carol", "--password-stdin"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        child.wait_with_output().unwrap()
    };
    let wrong = login("not-it");
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr).into_owned();
    assert!(stderr.contains("refused the credentials for user \"carol\""), "{stderr}");
    assert!(!docker.join("config.json").exists(), "refused credentials must not be stored");

    ok(login("s3cret-enough"));
    let config = docker.join("config.json");
    assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600);
    let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert!(stored["auths"][registry.host()]["auth"].is_string(), "{stored}");

    // A push now finds the credentials in config.json, with nothing in the environment.
    ok(run(dir.path(), &["image", "build", "/bin/true", "--name", "br2k/demo"]));
    let push = br2k()
        .current_dir(dir.path())
        .env("DOCKER_CONFIG", &docker)
        .env_remove("BR2K_REGISTRY_USERNAME")
        .env_remove("BR2K_REGISTRY_PASSWORD")
        .args(["image", "push", "br2k/demo:latest", "--to", "secure"])
        .output()
        .unwrap();
    ok(push);

    // `image rm` forgets the image and its blobs; a second rm says there is nothing.
    ok(run(dir.path(), &["image", "rm", "br2k/demo:latest"]));
    assert_eq!(std::fs::read_dir(dir.path().join(".br2k/blobs/sha256")).unwrap().count(), 0);
    let again = run(dir.path(), &["image", "rm", "br2k/demo:latest"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no image br2k/demo:latest"));
}
