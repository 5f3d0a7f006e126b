//! A real registry for tests: Debian's `docker-registry` (distribution 2.8) on a free
//! loopback port, storing into a temp dir, optionally behind htpasswd (bcrypt) basic auth
//! or bearer-token auth with a token server of our own. Images go in with `skopeo copy`.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::fixtures::SkopeoSource;
use crate::process::run_ok;
use crate::token_auth::{TokenServer, TOKEN_ISSUER, TOKEN_SERVICE};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const SKOPEO_TIMEOUT: Duration = Duration::from_secs(600);
/// Attempts at finding a port nobody takes between our probe and the registry's bind.
const PORT_ATTEMPTS: usize = 5;

/// A running `docker-registry`; dropping it kills the process and removes its files.
pub struct Registry {
    dir: TempDir,
    port: u16,
    credentials: Option<(String, String)>,
    /// With token auth: the server that issues the registry's tokens.
    token_server: Option<TokenServer>,
    child: Option<Child>,
}

impl Registry {
    /// Starts a registry on 127.0.0.1:<free port>. With `auth = Some((user, password))`
    /// every request needs those basic-auth credentials. Panics when it does not come up.
    pub fn start(auth: Option<(&str, &str)>) -> Registry {
        Registry::launch(auth, None)
    }

    /// Starts a registry with bearer-token auth (`auth: token:`): clients get their
    /// tokens from a [`TokenServer`] that accepts `user`/`password`.
    pub fn start_token_auth(user: &str, password: &str) -> Registry {
        Registry::launch(None, Some(TokenServer::start(user, password)))
    }

    /// `auth` puts the registry behind htpasswd; `token_server` behind token auth instead.
    fn launch(auth: Option<(&str, &str)>, token_server: Option<TokenServer>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("kiln-registry.")
            .tempdir()
            .expect("creating the registry's temp dir");
        if let Some((user, password)) = auth {
            let output = run_ok(
                Command::new("htpasswd").args(["-Bbn", user, password]),
                Duration::from_secs(30),
            );
            fs::write(dir.path().join("htpasswd"), output.stdout).expect("writing htpasswd");
        }
        // An empty auth file keeps the host's container credentials out of our skopeo runs.
        fs::write(dir.path().join("auth.json"), "{}").expect("writing auth.json");
        let mut registry = Registry {
            dir,
            port: 0,
            credentials: auth
                .or(token_server.as_ref().map(TokenServer::credentials))
                .map(|(u, p)| (u.to_owned(), p.to_owned())),
            token_server,
            child: None,
        };
        for _ in 0..PORT_ATTEMPTS {
            registry.port = free_port();
            registry.write_config();
            registry.spawn();
            match registry.wait_ready() {
                Ok(()) => return registry,
                Err(log) if log.contains("address already in use") => registry.stop(),
                Err(log) => panic!("docker-registry did not start; its log:\n{log}"),
            }
        }
        panic!("docker-registry found no free port in {PORT_ATTEMPTS} attempts");
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user and password the registry (or its token server) accepts, when it wants some.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// With token auth, the server issuing the tokens.
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// skopeo's `docker://127.0.0.1:PORT/REPO:TAG` for `repo_tag`.
    pub fn docker_ref(&self, repo_tag: &str) -> String {
        format!("docker://{}/{repo_tag}", self.addr())
    }

    /// The registry's filesystem storage root (`docker/registry/v2/...` below it).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the bytes of blob `digest` (`sha256:...`), for tests that
    /// corrupt or remove blobs.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let (algorithm, hex) = digest
            .split_once(':')
            .unwrap_or_else(|| panic!("digest {digest:?} has no algorithm prefix"));
        self.storage_dir()
            .join("docker/registry/v2/blobs")
            .join(algorithm)
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// An empty containers auth file; pass it as `--authfile` to keep host credentials out.
    pub fn empty_auth_file(&self) -> PathBuf {
        self.dir.path().join("auth.json")
    }

    /// Pushes `source` (an image or the index, with `--all`) as `repo_tag` with skopeo,
    /// using the registry's credentials. Returns the pushed manifest's digest.
    pub fn push(&self, source: &(impl SkopeoSource + ?Sized), repo_tag: &str) -> String {
        let digest_file = tempfile::NamedTempFile::new_in(self.dir.path()).expect("digest file");
        let mut command = Command::new("skopeo");
        command
            .arg("copy")
            .arg("--quiet")
            .arg("--authfile")
            .arg(self.empty_auth_file())
            .arg("--dest-tls-verify=false")
            .arg("--digestfile")
            .arg(digest_file.path());
        if source.is_index() {
            command.arg("--all");
        }
        match self.credentials() {
            Some((user, password)) => command.arg(format!("--dest-creds={user}:{password}")),
            None => command.arg("--dest-no-creds"),
        };
        command
            .arg(source.transport_ref())
            .arg(self.docker_ref(repo_tag));
        run_ok(&mut command, SKOPEO_TIMEOUT);
        fs::read_to_string(digest_file.path())
            .expect("reading skopeo's digest file")
            .trim()
            .to_owned()
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Kills the registry process (storage stays). Doing it twice is harmless.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Kills our own child by its pid; an already exited child is fine.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the registry again on the same port with the same storage and auth.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        if let Err(log) = self.wait_ready() {
            panic!("docker-registry did not restart; its log:\n{log}");
        }
    }

    fn write_config(&self) {
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {}\n",
            self.storage_dir().display(),
            self.addr()
        );
        if let Some(token_server) = &self.token_server {
            config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    \
                 issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                token_server.realm(),
                token_server.cert_path().display()
            ));
        } else if self.credentials.is_some() {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                self.dir.path().join("htpasswd").display()
            ));
        }
        fs::write(self.config_path(), config).expect("writing the registry config");
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .expect("opening the registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting docker-registry (apt-get install docker-registry): {e}")
            });
        self.child = Some(child);
    }

    /// Waits until `GET /v2/` answers; Err(log) when the process exits or time runs out.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("registry spawned");
            if child.try_wait().expect("polling docker-registry").is_some() {
                self.child = None;
                return Err(self.log());
            }
            if answers_v2(self.port) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        Err(format!(
            "no answer on {} within {READY_TIMEOUT:?}\n{}",
            self.addr(),
            self.log()
        ))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding a loopback port")
        .port()
}

/// Whether an HTTP server on the port answers `GET /v2/` with 200 or 401.
fn answers_v2(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    if stream.read_exact(&mut head).is_err() {
        return false;
    }
    head.starts_with(b"HTTP/1.") && (head.ends_with(b" 200") || head.ends_with(b" 401"))
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("addr", &self.addr())
            .field("dir", &self.dir.path())
            .field("auth", &self.credentials.is_some())
            .finish()
    }
}
