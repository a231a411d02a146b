//! Every registry and service command, as a user runs them one after another.

use std::os::unix::fs::PermissionsExt;

use snapbox::str;

use crate::env::{REGISTRY, TestEnv};

#[test]
fn deploy_records_the_registry_for_later_commands() {
    let env = TestEnv::new();
    env.br2k(Some(0)).args(["service-registry", "deploy", "--claim-cooldown", "60"]).assert().success().stdout_eq(str![[r#"
0x5FbDB2315678afecb367f032d93F642f64180aa3

"#]]).stderr_eq(str![[r#"
deploying the ServiceRegistry on chain 31337 ...
deployed at 0x5FbDB2315678afecb367f032d93F642f64180aa3 (transaction [..], block 1, gas [..]); recorded in deployments/31337.json

"#]]);
    let recorded = std::fs::read_to_string(env.dir.path().join("deployments/31337.json")).unwrap();
    let recorded: serde_json::Value = serde_json::from_str(&recorded).unwrap();
    assert_eq!(recorded["chainId"], 31337);
    assert_eq!(recorded["serviceRegistry"]["address"].as_str().unwrap().to_lowercase(), REGISTRY.to_lowercase());
    assert_eq!(recorded["serviceRegistry"]["claimCooldown"], 60);

    // Found without --registry from now on.
    env.br2k(Some(0)).args(["service", "register", "logserver", "--replicas", "5", "--image", "br2k/logserver:1", "--image-digest", &format!("sha256:{}", "ab".repeat(32))]).assert().success().stdout_eq(str![[r#"
registered "logserver" (id 0x0c47e5831489753519f58d295b1a9a28cbb20487484680d58cf48c4177478c67), manager 0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
transaction [..] (block 2, gas [..])

"#]]).stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
registering "logserver" in 0x5FbDB2315678afecb367f032d93F642f64180aa3 ...

"#]]);
    env.br2k(None).args(["--json", "service", "info", "logserver"]).assert().success().stdout_eq(str![[r#"
{"epoch":0,"id":"0x0c47e5831489753519f58d295b1a9a28cbb20487484680d58cf48c4177478c67","location":"","manager":"0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266","name":"logserver","operators":[],"pendingManager":null,"recoveryInfo":{"containerRegistry":"","context":"local","deployer":"0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266","image":"br2k/logserver:1","imageDigest":"sha256:abababababababababababababababababababababababababababababababab","replicas":5},"state":"registered","updatedAt":[..]}

"#]]);
}

#[test]
fn service_life_cycle() {
    let env = TestEnv::with_service();
    let (manager, operator, next) = (env.address(0), env.address(1), env.address(2));

    env.br2k(None).args(["service", "operator", "ls", "logserver"]).assert().success().stdout_eq(str![[r#"
0x70997970C51812dc3A010C7d01b50e0d17dc79C8

"#]]);
    env.br2k(None)
        .args(["resolve", "logserver"])
        .assert()
        .success()
        .stdout_eq(str![[r#"


"#]])
        .stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
logserver has no location yet (state registered): no leader has published itself

"#]]);

    env.br2k(Some(1))
        .args(["service", "location", "logserver", "http://127.0.0.1:8080", "--epoch", "1"])
        .assert()
        .success()
        .stdout_eq(str![[r#"
"logserver" is served at http://127.0.0.1:8080 (epoch 1)
transaction [..] (block 4, gas [..])

"#]]);
    env.br2k(None).args(["resolve", "logserver"]).assert().success().stdout_eq(str![[r#"
http://127.0.0.1:8080

"#]]);
    env.br2k(None).args(["resolve", "logserver", "--json"]).assert().success().stdout_eq(str![[r#"
{"epoch":1,"location":"http://127.0.0.1:8080","state":"registered"}

"#]]);

    env.br2k(Some(0)).args(["service", "state", "logserver", "running"]).assert().success().stdout_eq(str![[r#"
"logserver" is now running
transaction [..] (block 5, gas [..])

"#]]);
    env.br2k(None).args(["service", "info", "logserver"]).assert().success().stdout_eq(str![[r#"
name            logserver
id              0x0c47e5831489753519f58d295b1a9a28cbb20487484680d58cf48c4177478c67
state           running
location        http://127.0.0.1:8080
epoch           1
updated at      [..] (unix time)
manager         0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
pending manager -
operators       0x70997970C51812dc3A010C7d01b50e0d17dc79C8
deployer        0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266
context         local
replicas        3
image registry  -
image           -
image digest    -

"#]]);

    env.br2k(Some(0)).args(["service", "transfer", "logserver", &next]).assert().success().stdout_eq(str![[r#"
0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC may now accept "logserver" with `br2k service accept logserver`
transaction [..] (block 6, gas [..])

"#]]);
    env.br2k(Some(2)).args(["service", "accept", "logserver"]).assert().success().stdout_eq(str![[r#"
0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC now manages "logserver"; the previous manager's operators were removed: allow your replicas' keys with `br2k service operator add logserver ADDRESS`
transaction [..] (block 7, gas [..])

"#]]);
    env.br2k(Some(2)).args(["--json", "service", "operator", "rm", "logserver", &operator]).assert().success().stdout_eq(str![[r#"
{"allowed":false,"block":8,"gasUsed":[..],"operator":"0x70997970c51812dc3a010c7d01b50e0d17dc79c8","service":"logserver","txHash":"[..]"}

"#]]);

    let info = env.br2k(None).args(["--json", "service", "info", "logserver"]).assert().success();
    let info: serde_json::Value = serde_json::from_slice(&info.get_output().stdout).unwrap();
    assert_eq!(info["manager"].as_str().unwrap().to_lowercase(), next.to_lowercase());
    assert_ne!(info["manager"].as_str().unwrap().to_lowercase(), manager.to_lowercase());
    assert_eq!(info["operators"], serde_json::json!([]));

    env.br2k(Some(3)).args(["claim", "logserver", "--reason", "no answer for 30 s"]).assert().success().stdout_eq(
        str![[r#"
claim filed against "logserver"
transaction [..] (block 9, gas [..])

"#]],
    );
    env.br2k(Some(3)).args(["claim", "logserver", "--reason", "still nothing"]).assert().code(1).stderr_eq(str![[r#"
using the registry 0x5FbDB2315678afecb367f032d93F642f64180aa3 recorded in deployments/31337.json
filing a claim against "logserver" ...
error: 0x90F79bf6EB2c4f870365E785982E1f101E93b906 already claimed against "logserver" recently: the registry accepts its next claim at unix time [..]

"#]]);
}

#[test]
fn a_keystore_signs_and_its_password_file_must_be_private() {
    let env = TestEnv::with_service();
    let keys = env.dir.path().join("keys");
    let cast = br2k_test_utils::foundry_binary("cast").expect("cast is installed (bash tools/setup.sh)");
    let imported = std::process::Command::new(cast)
        .args(["wallet", "import", "operator", "--keystore-dir"])
        .arg(&keys)
        .args(["--unsafe-password", "correct horse", "--private-key"])
        .arg(crate::env::private_key_hex(&env.anvil.key(1)))
        .output()
        .unwrap();
    assert!(imported.status.success(), "cast wallet import: {}", String::from_utf8_lossy(&imported.stderr));
    let password = env.dir.path().join("password");
    std::fs::write(&password, "correct horse\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();

    let publish = |env: &TestEnv| {
        env.br2k(None).args([
            "service",
            "location",
            "logserver",
            "http://10.0.0.9:80",
            "--epoch",
            "9",
            "--keystore",
            "keys/operator",
            "--password-file",
            "password",
        ])
    };
    publish(&env).assert().code(1).stderr_eq(str![[r#"
error: the password file password is readable by others (mode 644): run `chmod 600 password`

"#]]);
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    publish(&env).assert().success().stdout_eq(str![[r#"
"logserver" is served at http://10.0.0.9:80 (epoch 9)
transaction [..] (block 4, gas [..])

"#]]);

    std::fs::write(&password, "wrong").unwrap();
    env.br2k(None)
        .args([
            "service",
            "location",
            "logserver",
            "http://10.0.0.9:80",
            "--epoch",
            "10",
            "--keystore",
            "keys/operator",
            "--password-file",
            "password",
        ])
        .assert()
        .code(1)
        .stderr_eq(str![[r#"
error: could not decrypt the keystore keys/operator: Mac Mismatch (wrong password file?)

"#]]);
}
