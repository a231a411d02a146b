//! A registry token service, as Harbor's core runs one next to its registry: it checks a
//! user name and password (HTTP basic auth) and hands out a token, a JWT signed with the
//! key whose certificate the registry trusts, granting the scope asked for. The registry
//! verifies every token itself, so a client that gets through used the token flow for
//! real.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

/// The issuer and service names the registry is configured to expect.
pub(crate) const ISSUER: &str = "br2k-test";

/// A running token service on 127.0.0.1; stopped when dropped.
#[derive(Debug)]
pub(crate) struct TokenService {
    pub(crate) realm: String,
    issued: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl TokenService {
    /// Starts one that accepts `user` with `password` and signs with `key` (PKCS#8 DER of
    /// a P-256 key) whose certificate is `certificate` (DER).
    pub(crate) fn start(user: &str, password: &str, key: &[u8], certificate: &[u8]) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let realm = format!("http://{}/token", listener.local_addr()?);
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key, &SystemRandom::new())
            .map_err(|e| std::io::Error::other(format!("the token key: {e}")))?;
        let signer = Signer { key, certificate: STANDARD.encode(certificate) };
        let expected = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));
        let (issued, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, stopped) = (issued.clone(), stop.clone());
        let user = user.to_owned();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if answer(&stream, &expected, &user, &signer) {
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { realm, issued, stop })
    }

    /// How many tokens it has handed out.
    pub(crate) fn issued(&self) -> usize {
        self.issued.load(Ordering::Relaxed)
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Signer {
    key: EcdsaKeyPair,
    certificate: String,
}

impl Signer {
    /// A JWT granting `user` the `actions` on repository `name`, as the distribution
    /// registry's token auth reads it (ES256, the certificate in `x5c`).
    fn token(&self, user: &str, scope: Option<(&str, Vec<&str>)>) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let header = serde_json::json!({ "typ": "JWT", "alg": "ES256", "x5c": [self.certificate] });
        let access: Vec<_> = scope
            .into_iter()
            .map(|(name, actions)| serde_json::json!({ "type": "repository", "name": name, "actions": actions }))
            .collect();
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": user, "aud": ISSUER, "iat": now, "nbf": now - 10, "exp": now + 300,
            "jti": format!("{now}-{}", rand_suffix()), "access": access,
        });
        let signed =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = self.key.sign(&SystemRandom::new(), signed.as_bytes()).expect("ECDSA signing works");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

fn rand_suffix() -> u64 {
    let mut bytes = [0; 8];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut bytes).expect("the system has randomness");
    u64::from_le_bytes(bytes)
}

/// Answers one request; whether it handed out a token.
fn answer(stream: &TcpStream, expected: &str, user: &str, signer: &Signer) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return false;
    }
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(value.trim().to_owned());
        }
    }
    let mut stream = stream;
    if authorization.as_deref() != Some(expected) {
        let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        return false;
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let scope = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == "scope")
        .map(|(_, value)| percent_decode(value));
    // `repository:NAME:ACTIONS`; NAME may itself hold no ':' in this registry.
    let granted = scope.as_deref().and_then(|scope| {
        let mut parts = scope.splitn(3, ':');
        (parts.next()? == "repository").then_some(())?;
        Some((parts.next()?, parts.next()?.split(',').collect::<Vec<_>>()))
    });
    let body = serde_json::json!({ "token": signer.token(user, granted), "expires_in": 300 }).to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    true
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
