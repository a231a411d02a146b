//! What `br2k` says when something is wrong: it names the problem and what to do.

use snapbox::str;

use crate::env::{TestEnv, br2k_in};

#[test]
fn a_bad_address() {
    let env = TestEnv::with_service();
    env.br2k(None).args(["--registry", "0xzz", "resolve", "logserver"]).assert().code(2).stdout_eq(str![]).stderr_eq(str![[r#"
error: invalid value '0xzz' for '--registry <ADDRESS>': "0xzz" is not an address: expected 0x followed by 40 hex digits, e.g. 0x5FbDB2315678afecb367f032d93F642f64180aa3

For more information, try '--help'.

"#]]);
    env.br2k(Some(0)).args(["service", "operator", "add", "logserver", "0x1234"]).assert().code(2).stderr_eq(str![[r#"
error: invalid value '0x1234' for '<ADDRESS>': "0x1234" is not an address: expected 0x followed by 40 hex digits, e.g. 0x5FbDB2315678afecb367f032d93F642f64180aa3

For more information, try '--help'.

"#]]);
    // A well-formed address with no registry behind it.
    env.br2k(None).args(["--registry", &env.address(7), "resolve", "logserver"]).assert().code(1).stderr_eq(str![[r#"
error: no contract at 0x14dC79964da2C08b23698B3D3cc7Ca32193d9955 on chain 31337: it is not a ServiceRegistry (deploy one with `br2k service-registry deploy` or pass the right --registry)

"#]]);
}

#[test]
fn a_missing_registry() {
    let env = TestEnv::new();
    env.br2k(None).args(["resolve", "logserver"]).assert().code(1).stdout_eq(str![]).stderr_eq(str![[r#"
error: no registry on chain 31337: run `br2k service-registry deploy` or pass --registry (or set BR2K_REGISTRY)

"#]]);
    // A deployments file from an earlier chain whose registry is gone.
    let stale = TestEnv::with_service();
    drop(stale.anvil);
    let dir = stale.dir;
    let fresh = br2k_test_utils::Anvil::spawn().unwrap();
    br2k_in(dir.path()).args(["--rpc-url", &fresh.endpoint(), "resolve", "logserver"]).assert().code(1).stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
error: the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json is not on chain 31337 (was the chain restarted?): deploy again with `br2k service-registry deploy`, or pass --registry

"#]]);
}

#[test]
fn an_unknown_service() {
    let env = TestEnv::with_service();
    env.br2k(None).args(["service", "info", "ghost"]).assert().code(1).stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
error: service "ghost" is not registered in the registry at 0x5FbDB2315678afecb367f032d93F642f64180aa3 (register it with `br2k service register ghost`)

"#]]);
}

#[test]
fn an_unreachable_rpc_url() {
    let dir = tempfile::tempdir().unwrap();
    br2k_in(dir.path()).args(["--rpc-url", "http://127.0.0.1:1", "resolve", "logserver"]).assert().code(1).stdout_eq(str![]).stderr_eq(str![[r#"
error: could not reach the RPC endpoint http://127.0.0.1:1 while trying to read the chain id (Connection refused (os error 111)): is the node running? check --rpc-url or ETH_RPC_URL

"#]]);
    br2k_in(dir.path()).args(["--rpc-url", "not a url", "resolve", "logserver"]).assert().code(1).stderr_eq(str![[
        r#"
error: invalid RPC URL "not a url": relative URL without a base (expected e.g. http://127.0.0.1:8545 or ws://127.0.0.1:8545)

"#
    ]]);
}

#[test]
fn a_reverted_transaction() {
    let env = TestEnv::with_service();
    // Account 1 is an operator, not the manager.
    env.br2k(Some(1)).args(["service", "state", "logserver", "stopped"]).assert().code(1).stdout_eq(str![]).stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
setting "logserver" to stopped ...
error: the registry refused to set the state: 0x70997970C51812dc3A010C7d01b50e0d17dc79C8 is not the manager of service "logserver" (ServiceRegistryNotManager)

"#]]);
    env.br2k(Some(1)).args(["service", "location", "logserver", "http://a", "--epoch", "0"]).assert().code(1).stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
publishing http://a for "logserver" at epoch 0 ...
error: the registry refused to publish the location: epoch 0 is not above the stored epoch 0 of service "logserver" (ServiceRegistryStaleEpoch)

"#]]);
    env.br2k(Some(0)).args(["service", "register", "logserver"]).assert().code(1).stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
registering "logserver" in 0x5FbDB2315678afecb367f032d93F642f64180aa3 ...
error: the registry refused to register the service: service "logserver" is already registered

"#]]);
}

#[test]
fn a_missing_key() {
    let env = TestEnv::with_service();
    env.br2k(None).args(["claim", "logserver", "--reason", "down"]).assert().code(1).stderr_eq(str![[r#"
error: filing a claim sends a transaction and needs a key: set ETH_PRIVATE_KEY, or pass --private-key or --keystore with --password-file

"#]]);
    env.br2k(None)
        .args(["--private-key", "0x1234", "claim", "logserver", "--reason", "down"])
        .assert()
        .code(1)
        .stderr_eq(str![[r#"
error: --private-key/ETH_PRIVATE_KEY is not a private key: expected 32 bytes of hex (64 hex digits, 0x optional)

"#]]);
}

#[test]
fn tx_commands_want_the_admin_token_and_a_private_file() {
    let env = TestEnv::with_service();
    env.br2k(None).env_remove("BR2K_ADMIN_TOKEN").args(["tx", "ls", "logserver"]).assert().code(1).stderr_eq(str![[
        r#"
error: the replicas' admin routes need their admin token: set BR2K_ADMIN_TOKEN or pass --admin-token-file (mode 0600)

"#
    ]]);
    let token = env.dir.path().join("admin");
    std::fs::write(&token, "s3cret\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    env.br2k(None)
        .env_remove("BR2K_ADMIN_TOKEN")
        .args(["tx", "cancel", "logserver", "7", "--admin-token-file", "admin"])
        .assert()
        .code(1)
        .stderr_eq(str![[r#"
error: the admin token file admin is readable by others (mode 644): run `chmod 600 admin`

"#]]);
}

#[test]
fn a_bad_service_name_is_refused_before_anything_starts_or_is_registered() {
    let env = TestEnv::with_service();
    let started = std::time::Instant::now();
    env.br2k(Some(0)).args(["up", "--name", "bad name"]).assert().code(2).stdout_eq(str![]).stderr_eq(str![[r#"
error: invalid value 'bad name' for '--name <NAME>': a service name must be 1-64 characters of letters, digits, '-', '_' or '.' (not only dots)

For more information, try '--help'.

"#]]);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "refused before any chain or etcd started");
    env.br2k(Some(0)).args(["service", "register", "../escape"]).assert().code(2).stderr_eq(str![[r#"
error: invalid value '../escape' for '<NAME>': a service name must be 1-64 characters of letters, digits, '-', '_' or '.' (not only dots)

For more information, try '--help'.

"#]]);
    env.br2k(Some(0)).args(["deploy", ".."]).assert().code(2);
    env.br2k(None).args(["down", "--name", "a/b"]).assert().code(2);
    // Nothing was registered on chain.
    env.br2k(None).args(["resolve", "../escape"]).assert().code(1);
}

#[test]
fn a_dashboard_that_anyone_could_reach_needs_an_action_token_and_the_name_it_is_reached_by() {
    let env = TestEnv::with_service();
    env.br2k(Some(0)).args(["dashboard", "--all", "--allow-actions", "--listen", "10.1.2.3:8300"]).assert().code(1).stderr_eq(str![[r#"
error: --allow-actions on 10.1.2.3:8300 (not loopback) lets whoever reaches it file claims signed with your key: give the action token people must type in with --action-token-file (mode 0600), or listen on 127.0.0.1

"#]]);
    env.br2k(None).args(["dashboard", "--all", "--listen", "0.0.0.0:8300"]).assert().code(1).stderr_eq(str![[r#"
error: listening on 0.0.0.0:8300 needs the name browsers reach it by: add --allowed-host HOST:PORT (every request naming another Host is refused, against DNS rebinding)

"#]]);
    // With neither names nor --all, the services the key manages: without a key, say so.
    env.br2k(None).env_remove("ETH_PRIVATE_KEY").args(["dashboard"]).assert().code(1).stderr_eq(str![[r#"
error: name the services to show, give the manager's key (ETH_PRIVATE_KEY, --private-key or --keystore) to show the services it manages, or pass --all for every registered service

"#]]);
}
