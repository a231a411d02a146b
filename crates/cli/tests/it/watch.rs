//! `br2k watch` prints each change as it happens, pushed (WebSocket) or polled (HTTP).

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::env::TestEnv;

fn watch_prints_each_change(websocket: bool) {
    let env = TestEnv::with_service();
    let url = if websocket { env.anvil.ws_endpoint() } else { env.anvil.endpoint() };
    let mut watcher = std::process::Command::new(env!("CARGO_BIN_EXE_br2k"))
        .current_dir(env.dir.path())
        .args(["watch", "logserver", "--count", "4", "--poll-interval", "50", "--rpc-url", &url])
        .env_remove("ETH_RPC_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = watcher.stderr.take().unwrap();
    // Wait until it watches ("watching ..." on stderr) before changing anything.
    let mut seen = Vec::new();
    let mut byte = [0u8];
    while !String::from_utf8_lossy(&seen).contains("watching") {
        assert_eq!(stderr.read(&mut byte).unwrap(), 1, "br2k watch exited early: {}", String::from_utf8_lossy(&seen));
        seen.push(byte[0]);
    }
    std::thread::sleep(Duration::from_millis(300));
    env.br2k(Some(1))
        .args(["service", "location", "logserver", "http://10.0.0.1:8080", "--epoch", "1"])
        .assert()
        .success();
    env.br2k(Some(0)).args(["service", "state", "logserver", "running"]).assert().success();
    env.br2k(Some(1))
        .args(["service", "location", "logserver", "http://10.0.0.2:8080", "--epoch", "2"])
        .assert()
        .success();

    let started = Instant::now();
    while watcher.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(20), "br2k watch did not see 4 locations");
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = watcher.wait_with_output().unwrap();
    assert!(output.status.success());
    snapbox::assert_data_eq!(
        String::from_utf8(output.stdout).unwrap(),
        snapbox::str![[r#"
(no location) (epoch 0, state registered)
http://10.0.0.1:8080 (epoch 1, state registered)
http://10.0.0.1:8080 (epoch 1, state running)
http://10.0.0.2:8080 (epoch 2, state running)

"#]]
    );
}

#[test]
fn watch_over_websocket() {
    watch_prints_each_change(true);
}

#[test]
fn watch_over_http_polling() {
    watch_prints_each_change(false);
}
