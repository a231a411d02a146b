//! A headless Chromium driven over the DevTools protocol: open a page, evaluate script in
//! it, click, take a screenshot. Debian's `chromium` (installed by `tools/setup.sh`); the
//! protocol is JSON over one WebSocket per page, so a small synchronous client is enough.

use std::io::BufRead as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tempfile::TempDir;
use tungstenite::WebSocket;

use crate::process::{KillOnDrop, OutputTail, ToolNotFound, first_line, locate};

/// How long Chromium may take to start, and one DevTools call to answer.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong driving the browser.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// Chromium is not installed.
    #[error(transparent)]
    NotInstalled(#[from] ToolNotFound),
    /// It did not start.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The binary.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It started but did not say where its DevTools listen.
    #[error("chromium did not report its DevTools address within {STARTUP_TIMEOUT:?}; its output:\n{output}")]
    StartupTimeout {
        /// What it printed.
        output: String,
    },
    /// A DevTools call failed.
    #[error("the DevTools connection failed while trying to {action}: {detail}")]
    Protocol {
        /// The call.
        action: String,
        /// Its error.
        detail: String,
    },
    /// Script evaluated in the page threw.
    #[error("the page's script threw: {0}")]
    Script(String),
    /// A condition waited for stayed false.
    #[error("{what} did not become true within {after:?}; last value: {last}")]
    WaitTimeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
        /// The condition's last value.
        last: Value,
    },
    /// A screenshot could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A headless Chromium, killed when dropped.
pub struct Browser {
    _child: KillOnDrop,
    port: u16,
    _profile: TempDir,
    output: OutputTail,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").field("port", &self.port).finish_non_exhaustive()
    }
}

impl Browser {
    /// Starts Chromium headless with a fresh profile (`BR2K_CHROMIUM` names another binary).
    ///
    /// # Errors
    /// [`BrowserError::NotInstalled`], naming the setup command, when Chromium is missing;
    /// a start or DevTools error otherwise.
    pub fn launch() -> Result<Self, BrowserError> {
        let program = locate("chromium", "BR2K_CHROMIUM", &[PathBuf::from("/usr/bin/chromium")])?;
        let profile = tempfile::Builder::new()
            .prefix("br2k-chromium-")
            .tempdir()
            .map_err(|source| BrowserError::Spawn { program: program.clone(), source })?;
        let mut command = Command::new(&program);
        // The flags TOOLCHAIN.md found necessary here: no sandbox as root, and nothing that
        // reaches out to the (closed) network by itself.
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = KillOnDrop(
            crate::process::spawn_retrying_busy(&mut command)
                .map_err(|source| BrowserError::Spawn { program: program.clone(), source })?,
        );
        let output = OutputTail::default();
        let (lines_tx, lines_rx) = mpsc::channel();
        output.follow(child.0.stderr.take().expect("stderr is piped"), Some(lines_tx));
        output.follow(child.0.stdout.take().expect("stdout is piped"), None);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID"
        let port = first_line(&lines_rx, deadline, |line| {
            line.split("ws://127.0.0.1:").nth(1).and_then(|rest| rest.split('/').next()).and_then(|p| p.parse().ok())
        })
        .map_err(|_| BrowserError::StartupTimeout { output: output.text() })?;
        Ok(Self { _child: child, port, _profile: profile, output })
    }

    /// Opens `url` in a new tab.
    ///
    /// # Errors
    /// DevTools errors.
    pub fn open(&self, url: &str) -> Result<Page, BrowserError> {
        let mut browser = Connection::open(self.port, "browser", &self.browser_path()?)?;
        let target = browser.call("Target.createTarget", &json!({ "url": "about:blank" }))?;
        let id = target["targetId"].as_str().unwrap_or_default().to_owned();
        let mut page = Page { connection: Connection::open(self.port, "page", &format!("/devtools/page/{id}"))? };
        page.connection.call("Page.enable", &json!({}))?;
        page.connection.call("Page.navigate", &json!({ "url": url }))?;
        Ok(page)
    }

    /// What Chromium printed last (for a failing test's message).
    pub fn output(&self) -> String {
        self.output.text()
    }

    /// The browser endpoint's path, from `/json/version`.
    fn browser_path(&self) -> Result<String, BrowserError> {
        let failed = |detail: String| BrowserError::Protocol { action: "read /json/version".into(), detail };
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| failed(e.to_string()))?;
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| failed(e.to_string()))?;
        std::io::Write::write_all(
            &mut stream,
            format!("GET /json/version HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", self.port)
                .as_bytes(),
        )
        .map_err(|e| failed(e.to_string()))?;
        // Read by Content-Length: Chromium keeps the connection open after answering.
        let mut reader = std::io::BufReader::new(stream);
        let mut length = 0;
        let mut line = String::new();
        while reader.read_line(&mut line).map_err(|e| failed(e.to_string()))? > 0 && line != "\r\n" {
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
            line.clear();
        }
        let mut body = vec![0; length];
        std::io::Read::read_exact(&mut reader, &mut body).map_err(|e| failed(e.to_string()))?;
        let body = String::from_utf8_lossy(&body).into_owned();
        let version: Value = serde_json::from_str(&body).map_err(|e| failed(format!("{e}: {body}")))?;
        let url = version["webSocketDebuggerUrl"].as_str().ok_or_else(|| failed(body.clone()))?;
        Ok(url.split_once("/devtools/").map(|(_, path)| format!("/devtools/{path}")).unwrap_or_default())
    }
}

/// One tab.
pub struct Page {
    connection: Connection,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page").finish_non_exhaustive()
    }
}

impl Page {
    /// Evaluates `expression` in the page and returns its value (awaited, when a promise).
    ///
    /// # Errors
    /// DevTools errors, or [`BrowserError::Script`] when the expression throws.
    pub fn eval(&mut self, expression: &str) -> Result<Value, BrowserError> {
        let answer = self.connection.call(
            "Runtime.evaluate",
            &json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
        )?;
        if let Some(thrown) = answer.get("exceptionDetails") {
            return Err(BrowserError::Script(
                thrown["exception"]["description"]
                    .as_str()
                    .map_or_else(|| thrown["text"].as_str().unwrap_or("(no description)").to_owned(), str::to_owned),
            ));
        }
        Ok(answer["result"]["value"].clone())
    }

    /// Evaluates `expression` until its value is truthy (not `null`, `false`, `0` or `""`)
    /// and returns that value.
    ///
    /// # Errors
    /// [`BrowserError::WaitTimeout`] with the last value, or an evaluation's error.
    pub fn wait_for(&mut self, what: &str, expression: &str, timeout: Duration) -> Result<Value, BrowserError> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(expression)?;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(BrowserError::WaitTimeout { what: what.into(), after: timeout, last: value });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sets the page's viewport to `width` x `height` CSS pixels (1280 x 1000 at launch).
    ///
    /// # Errors
    /// DevTools errors.
    pub fn set_viewport(&mut self, width: u32, height: u32) -> Result<(), BrowserError> {
        self.connection.call(
            "Emulation.setDeviceMetricsOverride",
            &json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        Ok(())
    }

    /// Saves what the page shows as a PNG at `path` (its directory is created).
    ///
    /// # Errors
    /// DevTools errors, or the file's.
    pub fn screenshot(&mut self, path: &Path) -> Result<(), BrowserError> {
        let shot = self.connection.call("Page.captureScreenshot", &json!({ "format": "png" }))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .map_err(|e| BrowserError::Protocol { action: "decode a screenshot".into(), detail: e.to_string() })?;
        let write = |source| BrowserError::Write { path: path.to_owned(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        std::fs::write(path, png).map_err(write)
    }
}

/// A DevTools WebSocket: numbered calls, each answered by a message with its number
/// (events in between are skipped).
struct Connection {
    socket: WebSocket<TcpStream>,
    next_id: u64,
}

impl Connection {
    fn open(port: u16, what: &str, path: &str) -> Result<Self, BrowserError> {
        let failed = |detail: String| BrowserError::Protocol { action: format!("connect to the {what}"), detail };
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| failed(e.to_string()))?;
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(|e| failed(e.to_string()))?;
        let (socket, _) =
            tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream).map_err(|e| failed(e.to_string()))?;
        Ok(Self { socket, next_id: 1 })
    }

    fn call(&mut self, method: &str, params: &Value) -> Result<Value, BrowserError> {
        let failed = |detail: String| BrowserError::Protocol { action: method.into(), detail };
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.socket.send(tungstenite::Message::text(message)).map_err(|e| failed(e.to_string()))?;
        loop {
            let message = self.socket.read().map_err(|e| failed(e.to_string()))?;
            let Ok(text) = message.to_text() else { continue };
            let Ok(answer) = serde_json::from_str::<Value>(text) else { continue };
            if answer["id"].as_u64() != Some(id) {
                continue; // an event, or another call's answer
            }
            if let Some(error) = answer.get("error") {
                return Err(failed(error.to_string()));
            }
            return Ok(answer["result"].clone());
        }
    }
}
