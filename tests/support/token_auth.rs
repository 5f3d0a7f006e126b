//! A token server for `docker-registry` configured with `auth: token:`, as Docker Hub and
//! most hosted registries work: the registry answers 401 with a Bearer challenge naming
//! this server; clients fetch a JWT here (with basic credentials, or none) and show it to
//! the registry. Tokens are RS256 JWTs signed with a throwaway key whose self-signed
//! certificate (made by the `openssl` CLI) is the registry's `rootcertbundle`; the
//! certificate travels in the token's `x5c` header, which distribution checks against
//! that bundle.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use serde_json::json;
use tempfile::TempDir;

use crate::process::run_ok;

/// The registry's `service` (the tokens' audience).
pub const TOKEN_SERVICE: &str = "kiln-test-registry";
/// The tokens' issuer, which the registry trusts.
pub const TOKEN_ISSUER: &str = "kiln-test-token-issuer";
const TOKEN_LIFETIME_SECS: u64 = 300;
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(60);
/// A request head larger than this is not a client of ours.
const MAX_REQUEST_HEAD: usize = 64 << 10;

/// A running token server; dropping it stops it.
pub struct TokenServer {
    dir: TempDir,
    port: u16,
    user: String,
    password: String,
    issued: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the serving thread needs to answer a request.
struct Issuer {
    key: RsaKeyPair,
    cert_der: Vec<u8>,
    user: String,
    password: String,
    issued: Arc<Mutex<Vec<String>>>,
}

impl TokenServer {
    /// Starts a token server on a free loopback port that gives `user`/`password` every
    /// action they ask for, anonymous clients a token granting nothing, and wrong
    /// credentials a 401.
    pub fn start(user: &str, password: &str) -> TokenServer {
        let dir = tempfile::Builder::new()
            .prefix("kiln-token-server.")
            .tempdir()
            .expect("creating the token server's temp dir");
        let (key_der, cert_der) = make_key_and_cert(dir.path());
        let key = RsaKeyPair::from_pkcs8(&key_der).expect("openssl's key is PKCS#8 RSA");
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding the token server");
        let port = listener.local_addr().expect("token server address").port();
        let issued: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let issuer = Issuer {
            key,
            cert_der,
            user: user.to_owned(),
            password: password.to_owned(),
            issued: issued.clone(),
        };
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    // A client that hangs up mid-request only loses its own answer.
                    let _ = issuer.serve(stream);
                }
            }
        });
        TokenServer {
            dir,
            port,
            user: user.to_owned(),
            password: password.to_owned(),
            issued,
            stop,
            thread: Some(thread),
        }
    }

    /// The URL clients get tokens from (the registry's `realm`).
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The user and password it gives tokens to.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.user, &self.password)
    }

    /// The PEM certificate the registry must trust (its `rootcertbundle`).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// One line per token issued so far: `SUBJECT SCOPE...` (subject `-` for anonymous).
    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An RSA key (PKCS#8 DER) and its self-signed certificate (DER; PEM in `dir/cert.pem`).
fn make_key_and_cert(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let openssl = |args: &[&str]| {
        let mut command = Command::new("openssl");
        command.current_dir(dir).args(args);
        run_ok(&mut command, OPENSSL_TIMEOUT);
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "key.pem",
        "-out",
        "cert.pem",
        "-days",
        "2",
        "-subj",
        &format!("/CN={TOKEN_ISSUER}"),
    ]);
    openssl(&[
        "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.der",
    ]);
    openssl(&[
        "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
    ]);
    let read = |name: &str| {
        std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("reading openssl's {name}: {e}"))
    };
    (read("key.der"), read("cert.der"))
}

impl Issuer {
    /// Answers one HTTP request on `stream`, then closes it.
    fn serve(&self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut authorization = None;
        let mut head_size = request_line.len();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            head_size += line.len();
            if head_size > MAX_REQUEST_HEAD {
                return respond(stream, 431, &json!({"error": "request head too large"}));
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("authorization") {
                    authorization = Some(value.trim().to_owned());
                }
            }
        }
        let target = request_line.split_whitespace().nth(1).unwrap_or("");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != "/token" {
            return respond(stream, 404, &json!({"error": "not found"}));
        }
        let subject = match authorization.as_deref().map(|a| self.check_basic(a)) {
            None => None,
            Some(true) => Some(self.user.as_str()),
            Some(false) => {
                return respond(
                    stream,
                    401,
                    &json!({"error": "wrong user name or password"}),
                );
            }
        };
        let scopes: Vec<String> = query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .filter(|(name, _)| *name == "scope")
            .flat_map(|(_, value)| {
                // A scope parameter may hold several space-separated scopes.
                percent_decode(value)
                    .split(' ')
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter(|s| !s.is_empty())
            .collect();
        let token = self.token(subject, &scopes);
        self.issued.lock().unwrap().push(format!(
            "{} {}",
            subject.unwrap_or("-"),
            scopes.join(" ")
        ));
        respond(
            stream,
            200,
            &json!({"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME_SECS}),
        )
    }

    fn check_basic(&self, authorization: &str) -> bool {
        let Some(encoded) = authorization.strip_prefix("Basic ") else {
            return false;
        };
        let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
            return false;
        };
        decoded == format!("{}:{}", self.user, self.password).as_bytes()
    }

    /// A JWT granting `subject` every action of `scopes` (`TYPE:NAME:ACTION,...`), or
    /// nothing when anonymous.
    fn token(&self, subject: Option<&str>, scopes: &[String]) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs();
        let access: Vec<_> = match subject {
            None => Vec::new(),
            Some(_) => scopes
                .iter()
                .filter_map(|scope| {
                    let (kind, rest) = scope.split_once(':')?;
                    let (name, actions) = rest.rsplit_once(':')?;
                    Some(json!({
                        "type": kind,
                        "name": name,
                        "actions": actions.split(',').collect::<Vec<_>>(),
                    }))
                })
                .collect(),
        };
        let header =
            json!({"typ": "JWT", "alg": "RS256", "x5c": [STANDARD.encode(&self.cert_der)]});
        let claims = json!({
            "iss": TOKEN_ISSUER,
            "sub": subject.unwrap_or(""),
            "aud": TOKEN_SERVICE,
            "exp": now + TOKEN_LIFETIME_SECS,
            "nbf": now - 1,
            "iat": now,
            "jti": format!("kiln-test-{now}-{}", self.issued.lock().unwrap().len()),
            "access": access,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .expect("signing the token");
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

fn respond(mut stream: TcpStream, status: u16, body: &serde_json::Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Request Header Fields Too Large",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 401 {
        head.push_str("WWW-Authenticate: Basic realm=\"kiln-test-token-server\"\r\n");
    }
    stream.write_all(format!("{head}\r\n{body}").as_bytes())?;
    stream.flush()
}

/// Decodes `%XX` escapes and `+` (a space in a query string).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
