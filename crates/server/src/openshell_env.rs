//! The environment OpenShell's supervisor (`openshell-sandbox`) starts with in a kiln VM,
//! built as OpenShell's own VM driver builds it, so the supervisor finds the gateway, knows
//! which sandbox it is and runs the exact command.
//!
//! Order of precedence, lowest first: the sandbox's merged environment (from
//! [`SandboxPlan`]); then the variables the driver owns, which always win. A sandbox may
//! not set the token itself, point the token file elsewhere or override the TLS server
//! name the supervisor verifies (that would let it redirect the gateway and catch the
//! token), so those are removed from what it gives.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::openshell_spec::SandboxPlan;

/// Where the supervisor binary sits in the guest.
pub const GUEST_SUPERVISOR_PATH: &str = kiln_protocol::OPENSHELL_SUPERVISOR_PATH;
/// Where the sandbox token file sits in the guest.
pub const GUEST_TOKEN_PATH: &str = kiln_protocol::OPENSHELL_TOKEN_PATH;
/// Where the gateway's CA certificate sits in the guest when TLS is configured.
pub const GUEST_TLS_CA_PATH: &str = kiln_protocol::OPENSHELL_TLS_CA_PATH;
/// Where the supervisor's client certificate sits in the guest when TLS is configured.
pub const GUEST_TLS_CERT_PATH: &str = kiln_protocol::OPENSHELL_TLS_CERT_PATH;
/// Where the supervisor's client key sits in the guest when TLS is configured.
pub const GUEST_TLS_KEY_PATH: &str = kiln_protocol::OPENSHELL_TLS_KEY_PATH;
/// The host as the guest sees it on QEMU's user network (kiln's `--network user`): a
/// connection to it reaches the host's loopback.
pub const GUEST_HOST_ALIAS: &str = "10.0.2.2";

const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the supervisor's SSH daemon listens in the guest. The supervisor opens its
/// session to the gateway (which is what makes a sandbox Ready there, and carries exec and
/// connect) only when it is given this path.
pub const GUEST_SSH_SOCKET_PATH: &str = "/run/openshell/ssh.sock";

/// Variables a sandbox's own environment may not set.
const RESERVED: [&str; 3] = [
    "OPENSHELL_SANDBOX_TOKEN",
    "OPENSHELL_SANDBOX_TOKEN_FILE",
    "OPENSHELL_GATEWAY_TLS_SERVER_NAME",
];

/// What the server knows that a sandbox spec does not carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorSettings {
    /// The gateway's URL as the host reaches it (e.g. `http://127.0.0.1:8080`).
    pub endpoint: String,
    /// The supervisor's log level when the spec gives none.
    pub log_level: String,
    /// Whether TLS material is placed in the guest (the endpoint is `https`).
    pub tls: bool,
    pub uid: u32,
    pub gid: u32,
}

/// The supervisor's environment for `plan`. `log_level` is the spec's (empty: the
/// server's); `has_token` says whether a token file is placed in the guest.
pub fn supervisor_environment(
    plan: &SandboxPlan,
    settings: &SupervisorSettings,
    log_level: &str,
    has_token: bool,
) -> BTreeMap<String, String> {
    let mut env = plan.environment.clone();
    for name in RESERVED {
        env.remove(name);
    }
    if !plan.environment.is_empty() {
        env.insert(
            "OPENSHELL_USER_ENVIRONMENT".into(),
            serde_json::to_string(&plan.environment).expect("a string map always serialises"),
        );
    }
    let main_process = serde_json::json!({
        "version": 1,
        "command": plan.command,
        "tty": plan.tty,
    });
    let log_level = match log_level {
        "" => settings.log_level.as_str(),
        level => level,
    };
    let owned = [
        ("HOME", "/root".to_owned()),
        ("PATH", GUEST_PATH.to_owned()),
        ("TERM", "xterm".to_owned()),
        ("OPENSHELL_ENDPOINT", guest_endpoint(&settings.endpoint)),
        ("OPENSHELL_SANDBOX_ID", plan.id.clone()),
        ("OPENSHELL_SANDBOX", plan.name.clone()),
        ("OPENSHELL_MAIN_PROCESS_SPEC", main_process.to_string()),
        ("OPENSHELL_LOG_LEVEL", log_level.to_owned()),
        ("OPENSHELL_SANDBOX_UID", settings.uid.to_string()),
        ("OPENSHELL_SANDBOX_GID", settings.gid.to_string()),
        // kiln gives the numeric identity, so the image's USER does not decide it.
        ("OPENSHELL_OCI_IMAGE_USER", String::new()),
        (
            "OPENSHELL_SSH_SOCKET_PATH",
            GUEST_SSH_SOCKET_PATH.to_owned(),
        ),
        // kiln sends nothing to OpenShell's telemetry.
        ("OPENSHELL_TELEMETRY_ENABLED", "false".to_owned()),
        // The guest's network is kiln's to enforce (kiln-netstack); kiln offers the
        // supervisor no policy DNS or transparent TCP interception of its own.
        ("OPENSHELL_NETWORK_RUNTIME_CAPABILITIES", String::new()),
    ];
    env.extend(owned.map(|(k, v)| (k.to_owned(), v)));
    if settings.tls {
        env.extend(
            [
                ("OPENSHELL_TLS_CA", GUEST_TLS_CA_PATH),
                ("OPENSHELL_TLS_CERT", GUEST_TLS_CERT_PATH),
                ("OPENSHELL_TLS_KEY", GUEST_TLS_KEY_PATH),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
    }
    if has_token {
        env.insert(
            "OPENSHELL_SANDBOX_TOKEN_FILE".into(),
            GUEST_TOKEN_PATH.into(),
        );
    }
    env
}

/// Why `--openshell-supervisor`, `--openshell-endpoint` or the `--openshell-tls-*` flags
/// cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorConfigError {
    #[error("{}: {source}", .path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}; accepted: a static openshell-sandbox binary (a regular, executable ELF file of at most {} bytes)", .path.display(), kiln_sandbox::MAX_SUPERVISOR_BYTES)]
    NotASupervisor { path: PathBuf, reason: String },
    #[error("{endpoint:?}: {reason}; accepted: the gateway's http:// or https:// URL as this host reaches it, e.g. http://127.0.0.1:8080")]
    Endpoint { endpoint: String, reason: String },
    #[error("{flag} {}: {reason}; accepted: a regular file of PEM text of at most {} bytes", .path.display(), kiln_protocol::MAX_OPENSHELL_TLS_FILE_LEN)]
    NotTlsMaterial {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the gateway {endpoint:?} is https: give its TLS material with --openshell-tls-ca, --openshell-tls-cert and --openshell-tls-key")]
    TlsMissing { endpoint: String },
    #[error("TLS material (--openshell-tls-ca, --openshell-tls-cert, --openshell-tls-key) is for an https:// gateway; {endpoint:?} is not one")]
    TlsUnused { endpoint: String },
}

/// The host paths of the TLS material: the gateway's CA certificate, the supervisor's
/// client certificate and its key.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Reads the TLS material for `endpoint` (checked by [`check_endpoint`]), as OpenShell's
/// VM driver wants it: required for an `https` gateway, refused for an `http` one. Each
/// file must be a regular file (after symlinks: they are the operator's) of PEM text of
/// at most [`kiln_protocol::MAX_OPENSHELL_TLS_FILE_LEN`] bytes. Errors never hold the
/// files' content.
pub fn read_tls_material(
    endpoint: &str,
    paths: Option<&TlsPaths>,
) -> Result<Option<kiln_protocol::OpenShellTls>, SupervisorConfigError> {
    let https = url::Url::parse(endpoint).is_ok_and(|url| url.scheme() == "https");
    match (https, paths) {
        (false, None) => Ok(None),
        (true, None) => Err(SupervisorConfigError::TlsMissing {
            endpoint: endpoint.to_owned(),
        }),
        (false, Some(_)) => Err(SupervisorConfigError::TlsUnused {
            endpoint: endpoint.to_owned(),
        }),
        (true, Some(paths)) => Ok(Some(kiln_protocol::OpenShellTls {
            ca: read_pem("--openshell-tls-ca", &paths.ca)?,
            cert: read_pem("--openshell-tls-cert", &paths.cert)?,
            key: read_pem("--openshell-tls-key", &paths.key)?,
        })),
    }
}

/// The PEM text of `path`, given as `flag`.
fn read_pem(flag: &'static str, path: &Path) -> Result<String, SupervisorConfigError> {
    let max = kiln_protocol::MAX_OPENSHELL_TLS_FILE_LEN;
    let refuse = |reason: &str| SupervisorConfigError::NotTlsMaterial {
        flag,
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let unreadable = |e: std::io::Error| refuse(&e.to_string());
    let file = std::fs::File::open(path).map_err(unreadable)?;
    if !file.metadata().map_err(unreadable)?.is_file() {
        return Err(refuse("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > max {
        return Err(refuse("too long"));
    }
    let text = String::from_utf8(bytes).map_err(|_| refuse("not text"))?;
    if !text.contains("-----BEGIN ") {
        return Err(refuse("no PEM block"));
    }
    Ok(text)
}

/// Checks that `path` can be OpenShell's supervisor binary: a regular file (after
/// symlinks: it is the operator's), executable, an ELF image, at most
/// [`kiln_sandbox::MAX_SUPERVISOR_BYTES`]. Returns it made absolute.
pub fn check_supervisor_binary(path: &Path) -> Result<PathBuf, SupervisorConfigError> {
    let unreadable = |source| SupervisorConfigError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let refuse = |reason: String| SupervisorConfigError::NotASupervisor {
        path: path.to_owned(),
        reason,
    };
    let absolute = std::path::absolute(path).map_err(unreadable)?;
    let mut file = std::fs::File::open(&absolute).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(refuse("not executable".into()));
    }
    if meta.len() > kiln_sandbox::MAX_SUPERVISOR_BYTES {
        return Err(refuse(format!("{} bytes", meta.len())));
    }
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) if magic == *b"\x7fELF" => Ok(absolute),
        Ok(()) => Err(refuse("not an ELF file".into())),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(refuse("too short for an ELF file".into()))
        }
        Err(e) => Err(unreadable(e)),
    }
}

/// Checks the gateway's URL as the host reaches it: `http` or `https` with a host.
pub fn check_endpoint(endpoint: &str) -> Result<(), SupervisorConfigError> {
    let refuse = |reason: &str| SupervisorConfigError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let url = url::Url::parse(endpoint).map_err(|e| refuse(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(refuse("not an http or https URL"));
    }
    if url.host().is_none() {
        return Err(refuse("no host"));
    }
    Ok(())
}

/// The `--network-allow-host` entry that lets the guest reach a gateway listening on
/// the host's loopback (`host.kiln.internal:PORT`, which the guest dials as
/// [`GUEST_HOST_ALIAS`]); `None` for an endpoint that is not on loopback, which the
/// guest reaches as any other address.
pub fn gateway_allow_host(endpoint: &str) -> Option<String> {
    let url = url::Url::parse(endpoint).ok()?;
    if !is_loopback(&url) {
        return None;
    }
    let port = url.port_or_known_default()?;
    Some(format!("{}:{port}", kiln_policy::HOST_GATEWAY_NAME))
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// The gateway URL as the guest must dial it: a loopback host (127.0.0.0/8, ::1,
/// `localhost`) is the guest's own loopback inside the VM, so it becomes
/// [`GUEST_HOST_ALIAS`]; any other URL is the guest's to resolve and stays as given.
pub fn guest_endpoint(endpoint: &str) -> String {
    let Ok(mut url) = url::Url::parse(endpoint) else {
        return endpoint.to_owned();
    };
    if is_loopback(&url) && url.set_host(Some(GUEST_HOST_ALIAS)).is_ok() {
        return url.into();
    }
    endpoint.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> SandboxPlan {
        SandboxPlan {
            id: "sb-1".into(),
            name: "first".into(),
            image: "alpine".into(),
            environment: [
                ("A", "1"),
                ("HOME", "/mine"),
                ("OPENSHELL_SANDBOX_TOKEN", "forged"),
                ("OPENSHELL_GATEWAY_TLS_SERVER_NAME", "evil.example"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
            command: vec!["sh".into(), "-c".into(), "echo 'a  b'".into()],
            tty: true,
            vcpus: None,
            memory_mib: None,
            labels: BTreeMap::new(),
        }
    }

    fn settings(endpoint: &str, tls: bool) -> SupervisorSettings {
        SupervisorSettings {
            endpoint: endpoint.into(),
            log_level: "info".into(),
            tls,
            uid: 500,
            gid: 600,
        }
    }

    #[test]
    fn driver_variables_win_and_reserved_ones_are_dropped() {
        let env =
            supervisor_environment(&plan(), &settings("http://127.0.0.1:8080", false), "", true);
        assert_eq!(env["A"], "1");
        assert_eq!(env["HOME"], "/root");
        assert_eq!(env["OPENSHELL_ENDPOINT"], "http://10.0.2.2:8080/");
        assert_eq!(env["OPENSHELL_SANDBOX_ID"], "sb-1");
        assert_eq!(env["OPENSHELL_SANDBOX"], "first");
        assert_eq!(env["OPENSHELL_LOG_LEVEL"], "info");
        assert_eq!(env["OPENSHELL_SANDBOX_UID"], "500");
        assert_eq!(env["OPENSHELL_SANDBOX_GID"], "600");
        assert_eq!(env["OPENSHELL_SANDBOX_TOKEN_FILE"], GUEST_TOKEN_PATH);
        assert_eq!(env["OPENSHELL_SSH_SOCKET_PATH"], GUEST_SSH_SOCKET_PATH);
        assert_eq!(env["OPENSHELL_TELEMETRY_ENABLED"], "false");
        assert!(!env.contains_key("OPENSHELL_SANDBOX_TOKEN"));
        assert!(!env.contains_key("OPENSHELL_GATEWAY_TLS_SERVER_NAME"));
        assert!(!env.contains_key("OPENSHELL_TLS_CA"));
        let spec: serde_json::Value =
            serde_json::from_str(&env["OPENSHELL_MAIN_PROCESS_SPEC"]).unwrap();
        assert_eq!(
            spec,
            serde_json::json!({"version": 1, "command": ["sh", "-c", "echo 'a  b'"], "tty": true})
        );
        let user: BTreeMap<String, String> =
            serde_json::from_str(&env["OPENSHELL_USER_ENVIRONMENT"]).unwrap();
        assert_eq!(user, plan().environment);
    }

    #[test]
    fn tls_paths_token_file_and_log_level_follow_the_settings() {
        let env = supervisor_environment(
            &plan(),
            &settings("https://gw.example:443", true),
            "debug",
            false,
        );
        assert_eq!(env["OPENSHELL_ENDPOINT"], "https://gw.example:443");
        assert_eq!(env["OPENSHELL_TLS_CA"], GUEST_TLS_CA_PATH);
        assert_eq!(env["OPENSHELL_TLS_CERT"], GUEST_TLS_CERT_PATH);
        assert_eq!(env["OPENSHELL_TLS_KEY"], GUEST_TLS_KEY_PATH);
        assert_eq!(env["OPENSHELL_LOG_LEVEL"], "debug");
        assert!(!env.contains_key("OPENSHELL_SANDBOX_TOKEN_FILE"));
    }

    #[test]
    fn only_loopback_endpoints_are_rewritten() {
        for (given, guest) in [
            ("http://127.0.0.1:8080", "http://10.0.2.2:8080/"),
            ("http://127.1.2.3:1", "http://10.0.2.2:1/"),
            ("http://localhost:8080/x", "http://10.0.2.2:8080/x"),
            ("https://LOCALHOST", "https://10.0.2.2/"),
            ("http://[::1]:8080", "http://10.0.2.2:8080/"),
            ("http://192.168.1.5:8080", "http://192.168.1.5:8080"),
            ("https://gw.example", "https://gw.example"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(guest_endpoint(given), guest, "{given}");
        }
    }

    #[test]
    fn a_supervisor_binary_must_be_an_executable_elf_file() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8], mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let good = write("good", b"\x7fELF\x02\x01\x01", 0o755);
        assert_eq!(check_supervisor_binary(&good).unwrap(), good);
        for (path, reason) in [
            (write("script", b"#!/bin/sh\n", 0o755), "not an ELF file"),
            (write("plain", b"\x7fELF", 0o644), "not executable"),
            (write("short", b"\x7fE", 0o755), "too short"),
            (dir.path().to_owned(), "not a regular file"),
        ] {
            let err = check_supervisor_binary(&path).unwrap_err().to_string();
            assert!(err.contains(reason), "{err}");
            assert!(
                err.contains("accepted: a static openshell-sandbox"),
                "{err}"
            );
        }
        let err = check_supervisor_binary(&dir.path().join("missing")).unwrap_err();
        assert!(
            matches!(err, SupervisorConfigError::Unreadable { .. }),
            "{err}"
        );
    }

    #[test]
    fn tls_material_goes_with_an_https_gateway_only_and_must_be_pem() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let pem = |label: &str| format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n");
        let paths = TlsPaths {
            ca: write("ca.crt", pem("CERTIFICATE").as_bytes()),
            cert: write("tls.crt", pem("CERTIFICATE").as_bytes()),
            key: write("tls.key", pem("PRIVATE KEY").as_bytes()),
        };
        let tls = read_tls_material("https://127.0.0.1:8443", Some(&paths))
            .unwrap()
            .unwrap();
        assert_eq!(tls.key, pem("PRIVATE KEY"));
        assert_eq!(tls.ca, pem("CERTIFICATE"));
        assert!(read_tls_material("http://127.0.0.1:8080", None)
            .unwrap()
            .is_none());

        let err = read_tls_material("https://127.0.0.1:8443", None).unwrap_err();
        assert!(
            matches!(err, SupervisorConfigError::TlsMissing { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--openshell-tls-key"), "{err}");
        let err = read_tls_material("http://127.0.0.1:8080", Some(&paths)).unwrap_err();
        assert!(
            matches!(err, SupervisorConfigError::TlsUnused { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--openshell-tls-ca"), "{err}");

        let too_long = vec![b'A'; kiln_protocol::MAX_OPENSHELL_TLS_FILE_LEN + 1];
        for (bad, reason) in [
            (write("binary", b"\xff\xfe secret"), "not text"),
            (write("plain", b"secret but not PEM"), "no PEM block"),
            (write("long", &too_long), "too long"),
            (dir.path().to_owned(), "not a regular file"),
        ] {
            let mut given = paths.clone();
            given.key = bad;
            let err = read_tls_material("https://gw.example", Some(&given))
                .unwrap_err()
                .to_string();
            assert!(err.contains(reason), "{err}");
            assert!(err.starts_with("--openshell-tls-key "), "{err}");
            assert!(
                err.contains("accepted: a regular file of PEM text"),
                "{err}"
            );
            assert!(!err.contains("secret"), "{err}");
        }
        let mut missing = paths.clone();
        missing.cert = dir.path().join("missing");
        let err = read_tls_material("https://gw.example", Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--openshell-tls-cert "), "{err}");
        assert!(err.contains("No such file"), "{err}");
    }

    #[test]
    fn a_loopback_gateway_opens_its_port_of_the_host_and_nothing_else() {
        for (endpoint, allowed) in [
            ("http://127.0.0.1:8080", Some("host.kiln.internal:8080")),
            ("http://localhost", Some("host.kiln.internal:80")),
            ("https://[::1]", Some("host.kiln.internal:443")),
            ("http://192.168.1.5:8080", None),
            ("https://gw.example", None),
        ] {
            assert_eq!(
                gateway_allow_host(endpoint).as_deref(),
                allowed,
                "{endpoint}"
            );
        }
        assert!(check_endpoint("http://127.0.0.1:8080").is_ok());
        for bad in ["ftp://gw", "127.0.0.1:8080", "http://"] {
            let err = check_endpoint(bad).unwrap_err().to_string();
            assert!(err.contains("accepted: the gateway's"), "{err}");
        }
    }
}
