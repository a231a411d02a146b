//! `br2k dashboard` in a real browser (headless Chromium over DevTools) against a service
//! put up here: three replicas and the leader on the page, the page following a leader
//! kill by itself, an action behind its confirmation, and no secret in any answer.

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use br2k_test_utils::Browser;
use serde_json::Value;

use crate::{br2k, http, logserver, one_at_a_time};

/// The anvil dev key the dashboard signs its claims with (account 1; `up` deploys with 0).
const ACTIONS_KEY: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

/// What must never reach a browser: the anvil dev keys the local chain, the replicas and
/// the dashboard sign with, and anything named like a secret.
const SECRETS: [&str; 8] = [
    "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    ACTIONS_KEY,
    "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdfc2a4c",
    "7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "private_key",
    "password",
    // Tokens are named on the page (the action token it asks for, the admin token an
    // action needs): what must never show is one being sent or set.
    "bearer ",
    "token=",
];

/// Where the test keeps its screenshots: `target/test-artefacts/`.
fn artefact(name: &str) -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    target.parent().unwrap_or(&target).join("test-artefacts").join(name)
}

/// Kills and reaps a child when dropped.
struct Stop(std::process::Child);
impl Drop for Stop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Brings a detached `br2k up` down when dropped.
struct Down<'a> {
    name: &'a str,
    state: PathBuf,
}
impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = br2k().args(["down", "--name", self.name]).arg("--state-dir").arg(&self.state).output();
    }
}

/// `POST path` with extra header lines; the answer's status and body.
fn post(base: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    use std::io::Read as _;
    let authority = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// The whole answer (head and body) to `GET path` sent with `Host: host`.
fn get_with_host(base: &str, path: &str, host: &str) -> String {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

/// The first event of `/api/events`: the view the page starts from.
fn first_event(base: &str) -> String {
    let authority = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(stream, "GET /api/events HTTP/1.1\r\nHost: {authority}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let mut events = std::io::BufReader::new(stream);
    loop {
        let mut line = String::new();
        assert!(events.read_line(&mut line).unwrap() > 0, "the event stream ended");
        if let Some(data) = line.strip_prefix("data: ") {
            return data.trim_end().to_owned();
        }
    }
}

/// A service put up here, its dashboard (every registered service, actions allowed) and
/// a headless Chromium on it: the overview shows the service with three healthy replicas;
/// its page shows the three replicas and the leader; after the leader's app and etcd
/// member are killed the same page (not reloaded) shows the new leader and a leader-change
/// event; a claim filed through the page's confirmation reaches the timeline. Screenshots
/// of both pages are kept in `target/test-artefacts/`. No answer of any endpoint carries a
/// key or anything named like a secret. Last, the chain goes down: the page says so, and why.
#[test]
fn the_dashboard_in_a_browser_follows_a_leader_kill_by_itself() {
    let _turn = one_at_a_time();
    let browser = Browser::launch().expect("a headless chromium for the dashboard test");
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    crate::work_root(&tmp); // creates TMPDIR, as a real one exists
    // A state directory of the user's choosing: the dashboard finds the replicas from
    // the service itself, not from where this machine keeps its runners.
    let state = dir.path().join("state");
    let output = br2k()
        .env("TMPDIR", &tmp)
        .args(["--json", "up", "--detach", "--name", "t-dash", "--election-timeout", "500"])
        .arg("--app")
        .arg(logserver())
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(output.status.success(), "up failed: {}", String::from_utf8_lossy(&output.stderr));
    let _down = Down { name: "t-dash", state: state.clone() };
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("dashboard.log");
    let _dashboard = Stop(
        br2k()
            .env("TMPDIR", &tmp)
            .env("ETH_PRIVATE_KEY", ACTIONS_KEY)
            .args(["dashboard", "--all", "--allow-actions", "--refresh", "300ms"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--rpc-url", run["rpc_url"].as_str().unwrap(), "--registry", run["registry"].as_str().unwrap()])
            .stderr(std::fs::File::create(&log).unwrap())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dashboard_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The overview: the one registered service, three healthy replicas, a leader.
    let mut page = browser.open(&format!("{base}/#/")).unwrap();
    let wait = Duration::from_secs(30);
    let overview = page
        .wait_for(
            "the overview shows t-dash with 3/3 replicas healthy and a leader",
            r#"(() => { const c = document.querySelector('#services .card[data-service="t-dash"]');
                 return c && c.querySelector('.replica-count').textContent === '3/3'
                   && c.querySelector('.leader-name').textContent !== 'none' && c.textContent; })()"#,
            wait,
        )
        .unwrap_or_else(|e| panic!("{e}\ndashboard:\n{}", dashboard_log()));
    eprintln!("overview: {overview}");
    page.screenshot(&artefact("dashboard-overview.png")).unwrap();

    // The service's page, reached by its link: three replicas, one leading.
    page.eval(r##"document.querySelector('#services a[href="#/service/t-dash"]').click()"##).unwrap();
    let leader_now = r#"(() => { const rows = document.querySelectorAll('#replicas tr.replica');
        const leaders = document.querySelectorAll('#replicas tr.replica[data-role="leader"] td.name');
        return rows.length === 3 && leaders.length === 1 ? leaders[0].textContent : null; })()"#;
    let first_leader = page.wait_for("the service page shows 3 replicas and 1 leader", leader_now, wait).unwrap();
    let first_leader = first_leader.as_str().unwrap().to_owned();
    // The leader's idempotency table: its keys, bytes and window (no keyed request yet).
    let table = page
        .wait_for(
            "the service page shows the leader's idempotency table",
            r#"(() => { const t = document.querySelector('#service .idempotency');
                 return t && /^\d+ keys/.test(t.textContent) ? t.textContent : null; })()"#,
            wait,
        )
        .unwrap();
    assert_eq!(table.as_str(), Some("0 keys held"), "{table}");
    // A mark a reload would wipe: the page must change by itself, not be loaded again.
    page.eval("window.br2kNotReloaded = true").unwrap();

    // A grow to 4 whose command is killed as it promotes the new member: the page shows
    // the learner and the change in progress, step by step, and `br2k status` says so too.
    crate::kill_when(
        br2k().args(["scale", "t-dash", "--replicas", "4"]).arg("--state-dir").arg(&state),
        ": promote the learner to a voter ...",
    );
    let learner = page
        .wait_for(
            "the service page shows the learner and the membership change in progress",
            r#"(() => { const change = document.querySelector('#service .membership-change');
                 const learner = document.querySelector('#replicas tr.replica[data-role="learner"] td.name');
                 return change && learner && change.textContent.includes('next: promote')
                   ? learner.textContent + ' | ' + change.textContent : null; })()"#,
            wait,
        )
        .unwrap_or_else(|e| panic!("{e}\ndashboard:\n{}", dashboard_log()));
    assert!(
        learner
            .as_str()
            .unwrap()
            .starts_with("n4 | membership change in progress: add n4 (2 of 5 steps done, next: promote the learner"),
        "{learner}"
    );
    page.screenshot(&artefact("dashboard-membership-change.png")).unwrap();
    let status = br2k()
        .args([
            "status",
            "t-dash",
            "--rpc-url",
            run["rpc_url"].as_str().unwrap(),
            "--registry",
            run["registry"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    let status = crate::ok(status);
    assert!(status.contains("membership change in progress: add n4"), "{status}");
    assert!(status.contains("n4      learner, "), "{status}");
    // Finished by the next command, then shrunk back: the page follows.
    for replicas in ["4", "3"] {
        let output =
            br2k().args(["scale", "t-dash", "--replicas", replicas]).arg("--state-dir").arg(&state).output().unwrap();
        crate::ok(output);
    }
    page.wait_for(
        "the page shows 3 voters and no change in progress",
        r#"(() => document.querySelectorAll('#replicas tr.replica').length === 3
             && !document.querySelector('#replicas tr.replica[data-role="learner"]')
             && !document.querySelector('#service .membership-change'))()"#,
        wait,
    )
    .unwrap_or_else(|e| panic!("{e}\ndashboard:\n{}", dashboard_log()));

    // Kill the leader's app and etcd member.
    let node = run["nodes"].as_array().unwrap().iter().find(|n| n["name"] == first_leader.as_str()).unwrap();
    for pid in [node["app_pid"].as_u64().unwrap(), node["etcd_pid"].as_u64().unwrap()] {
        assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    }
    let killed = Instant::now();
    let change = format!(
        r#"(() => {{ const leader = document.querySelector('#replicas tr.replica[data-role="leader"] td.name');
            const now = leader && leader.textContent;
            const event = [...document.querySelectorAll('#timeline tr.happening[data-kind="leader"]')]
              .map(r => r.textContent).find(t => now && t.includes(now + ' leads'));
            return now && now !== '{first_leader}' && event && window.br2kNotReloaded === true ? event : null; }})()"#
    );
    let event = page
        .wait_for("the page shows a new leader and the leader change, without a reload", &change, wait)
        .unwrap_or_else(|e| panic!("{e}\ndashboard:\n{}", dashboard_log()));
    eprintln!("the page showed {event:?} {:?} after the kill", killed.elapsed());
    let dead = page
        .eval(&format!(
            r#"[...document.querySelectorAll('#replicas tr.replica')].find(r => r.querySelector('td.name').textContent === '{first_leader}').querySelector('td.health').textContent"#
        ))
        .unwrap();
    assert!(dead.as_str().is_some_and(|why| why != "healthy" && !why.is_empty()), "the dead replica's reason: {dead}");

    // An action, through the page's confirmation dialog.
    page.eval("document.getElementById('claim').click()").unwrap();
    page.wait_for("the confirmation dialog opens", "document.getElementById('confirm').open", wait).unwrap();
    page.eval("document.getElementById('confirm-reason').value = 'browser test claim'; document.getElementById('confirm-ok').click()")
        .unwrap();
    let filed = page
        .wait_for(
            "the claim is filed and reaches the timeline",
            r#"(() => { const claim = [...document.querySelectorAll('#timeline tr.happening[data-kind="claim"]')]
                 .find(r => r.textContent.includes('browser test claim'));
               const result = document.getElementById('action-result');
               return claim && result && result.textContent.includes('claim filed') ? result.textContent : null; })()"#,
            wait,
        )
        .unwrap_or_else(|e| panic!("{e}\ndashboard:\n{}", dashboard_log()));
    eprintln!("action: {filed}");
    page.screenshot(&artefact("dashboard-service.png")).unwrap();
    eprintln!("screenshots: {}", artefact("").display());

    // Actions need the page's confirmation header and the run's action token (which the
    // page served on loopback carries), and come only from the page's origin.
    let claim = "/api/services/t-dash/claim";
    let (code, body) = http(&base, "POST", claim, r#"{"reason":"x"}"#);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("x-br2k-confirm"), "{body}");
    let token = page.eval(r#"document.querySelector('meta[name="br2k-action-token"]').content"#).unwrap();
    let token = token.as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64, "a 32-byte token: {token:?}");
    assert!(dashboard_log().contains(&token), "printed once at start for the operator");
    let confirmed = format!("Host: 127.0.0.1:{port}\r\nx-br2k-confirm: t-dash\r\n");
    let (code, body) = post(&base, claim, &confirmed, r#"{"reason":"curl, no token"}"#);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("action token"), "{body}");
    let (code, _) = post(&base, claim, &format!("{confirmed}x-br2k-action-token: {}\r\n", "0".repeat(64)), "{}");
    assert_eq!(code, 403, "a wrong token");
    let host = format!("{confirmed}x-br2k-action-token: {token}\r\n");
    let (code, body) = post(&base, claim, &format!("{host}Origin: http://evil.example\r\n"), r#"{"reason":"x"}"#);
    assert_eq!(code, 403, "{body}");
    let (code, body) = post(&base, claim, "Host: rebound.example:80\r\nx-br2k-confirm: t-dash\r\n", "{}");
    assert_eq!(code, 421, "{body}");
    let (code, body) = post(&base, claim, &host, r#"{"reason":"  "}"#);
    assert_eq!(code, 400, "an empty reason: {body}");
    // Every route checks the Host (a DNS-rebinding page reads nothing), and every answer
    // keeps the page out of frames.
    for path in ["/", "/api/services", "/api/events", "/page.js"] {
        let rebound = get_with_host(&base, path, "rebound.example");
        assert!(rebound.starts_with("HTTP/1.1 421"), "GET {path} with another Host: {rebound}");
        assert!(!rebound.contains("t-dash"), "nothing of the view leaks: {rebound}");
    }
    let answer = get_with_host(&base, "/", &format!("127.0.0.1:{port}")).to_lowercase();
    assert!(answer.contains("content-security-policy: default-src 'self'"), "{answer}");
    assert!(answer.contains("frame-ancestors 'none'") && answer.contains("x-frame-options: deny"), "{answer}");

    // No answer of any endpoint carries a secret: the page, its style and script, the
    // data, the event stream, the actions' answers, and what the browser ended up showing.
    let mut served =
        vec![page.eval("document.documentElement.outerHTML").unwrap().to_string(), body, first_event(&base)];
    for path in ["/", "/page.css", "/page.js", "/api/services", "/api/nothing"] {
        let (code, body) = http(&base, "GET", path, "");
        assert!(code == 200 || path == "/api/nothing", "GET {path}: {code}");
        served.push(body);
    }
    // A backup asked for without the replicas' admin token (this dashboard was given none):
    // refused before any leader is asked.
    let (code, body) = post(&base, "/api/services/t-dash/backup", &host, "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin token"), "{body}");
    served.push(body);
    let (code, body) = post(&base, "/api/services/t-dash/nothing", &host, "{}");
    assert_eq!(code, 404, "{body}");
    served.push(body);
    let (code, body) = post(
        &base,
        "/api/services/nobody/claim",
        &format!("Host: 127.0.0.1:{port}\r\nx-br2k-confirm: nobody\r\nx-br2k-action-token: {token}\r\n"),
        r#"{"reason":"x"}"#,
    );
    assert_eq!(code, 502, "a claim against a service nobody registered: {body}");
    served.push(body);
    // The run's action token is the one secret the page carries (on loopback, in its
    // meta tag): the data, the events and the answers never do.
    for answer in &served {
        let carried = answer.matches(token.as_str()).count();
        let page = answer.contains("<html") || answer.contains("<meta");
        assert!(carried == usize::from(page), "the action token {carried} times in: {answer}");
    }
    let served = served.join("\n").to_lowercase();
    let served = served.replace(token.as_str(), "");
    for secret in SECRETS {
        assert!(!served.contains(secret), "the dashboard served {secret:?}");
    }
    assert!(!served.contains("https://") && !served.contains("src=\"http"), "the page loads nothing from elsewhere");

    // The chain goes down (its anvil, a child of the runner, killed): the page says the
    // registry cannot be read and why, and the service's card why it cannot be read.
    let runner = run["pid"].as_u64().unwrap().to_string();
    let anvil = std::process::Command::new("pgrep").args(["-P", &runner, "-x", "anvil"]).output().unwrap();
    let anvil = String::from_utf8(anvil.stdout).unwrap();
    assert!(!anvil.trim().is_empty(), "no anvil under the runner {runner}");
    assert!(std::process::Command::new("kill").args(["-9", anvil.trim()]).status().unwrap().success());
    page.eval("location.hash = '#/'").unwrap();
    let down = page
        .wait_for(
            "the page shows the registry and the service as unreadable, with the reason",
            r#"(() => { const banner = document.getElementById('banner');
                 const card = document.querySelector('#services .card[data-service="t-dash"] .error');
                 return !banner.hidden && card && window.br2kNotReloaded === true
                   ? banner.textContent + ' | ' + card.textContent : null; })()"#,
            wait,
        )
        .unwrap_or_else(|e| panic!("{e}\ndashboard:\n{}", dashboard_log()));
    eprintln!("registry down: {down}");
    assert!(down.as_str().unwrap().contains("cannot be read: "), "{down}");
    page.screenshot(&artefact("dashboard-registry-down.png")).unwrap();
    drop(browser);
}
