use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy::providers::{Provider, ProviderBuilder};
use br2k_test_utils::{Anvil, AnvilError};

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// An executable shell script standing in for anvil; the directory holds it alive.
fn fake_anvil(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake-anvil");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, script)
}

#[tokio::test]
async fn anvil_answers_on_its_port_and_is_killed_on_drop() {
    let anvil = Anvil::spawn().expect("anvil starts");
    assert_ne!(anvil.port(), 0);
    assert_eq!(anvil.keys().len(), 10, "anvil's 10 funded dev accounts");

    let provider = ProviderBuilder::new().connect_http(anvil.endpoint().parse().unwrap());
    assert_eq!(provider.get_chain_id().await.unwrap(), 31337);
    let balance = provider.get_balance(anvil.address(0)).await.unwrap();
    assert!(!balance.is_zero(), "dev account 0 is funded");

    let pid = anvil.pid();
    assert!(process_exists(pid));
    drop(anvil);
    assert!(!process_exists(pid), "anvil {pid} still runs after the fixture was dropped");
}

#[tokio::test]
async fn two_anvils_get_different_ports_and_settings_are_configurable() {
    let a = Anvil::spawn().unwrap();
    let b = Anvil::builder().chain_id(4242).arg("--accounts").arg("3").spawn().unwrap();
    assert_ne!(a.port(), b.port());
    assert_eq!(b.keys().len(), 3, "extra arguments reach anvil");
    let provider = ProviderBuilder::new().connect_http(b.endpoint().parse().unwrap());
    assert_eq!(provider.get_chain_id().await.unwrap(), 4242);
}

#[test]
fn a_program_that_never_listens_hits_the_startup_timeout() {
    let (_dir, script) = fake_anvil("exec sleep 30");

    let started = Instant::now();
    let err = Anvil::builder().program(&script).startup_timeout(Duration::from_millis(300)).spawn().unwrap_err();
    assert!(matches!(err, AnvilError::StartupTimeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "gave up after {:?}", started.elapsed());
}

#[test]
fn a_program_that_exits_reports_its_status_and_output() {
    let (_dir, script) = fake_anvil("echo 'error: port in use' >&2\nexit 3");

    let err = Anvil::builder().program(&script).spawn().unwrap_err();
    let AnvilError::Exited { status, .. } = &err else { panic!("expected Exited, got {err}") };
    assert_eq!(status.code(), Some(3));
    // The reader thread may still be flushing stderr when the exit is seen; the message
    // says what happened either way.
    assert!(err.to_string().contains("exited"), "{err}");
}

#[test]
fn a_missing_program_names_the_setup_command() {
    let err = Anvil::builder().program("/nonexistent/anvil").spawn().unwrap_err();
    assert!(matches!(err, AnvilError::NotFound(_)), "{err}");
    assert!(err.to_string().contains("bash tools/setup.sh"), "{err}");
}
