//! The enforcer: its shared state (the policy in force, pinned names, the decision log)
//! and the threads that serve the proxy, the resolver and the policy reload.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_policy::{
    check_default, rfc3339_utc, Connection, Decision, DecisionRecord, DnsDecision, HostFacts, Pins,
    Policy, Request, MAX_POLICY_BYTES,
};

use crate::dns::Upstream;
use crate::error::io;
use crate::limits::RELOAD_INTERVAL;
use crate::PodnetError;

/// What the enforcer serves, and how.
#[derive(Debug, Clone)]
pub struct EnforcerConfig {
    /// Names the sandbox in the decision records (the pod name).
    pub sandbox: String,
    /// The policy file (allow-list mode), watched for changes; `None`: default mode.
    pub policy: Option<PathBuf>,
    pub proxy_port: u16,
    pub dns_port: u16,
    /// The pod's hosts file and resolver configuration, read once at start.
    pub hosts_file: PathBuf,
    pub resolv_conf: PathBuf,
}

/// A running enforcer; its threads serve until the process ends.
pub struct Enforcer {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub sandbox: String,
    pub policy: RwLock<Option<Arc<Policy>>>,
    pub host: HostFacts,
    pub pins: Mutex<Pins>,
    pub upstream: Upstream,
    pub flows: AtomicUsize,
    pub dns_inflight: AtomicUsize,
}

impl Enforcer {
    /// Loads the policy (an invalid one is an error here: nothing starts on it), binds
    /// the proxy and resolver sockets and starts serving.
    pub fn start(config: &EnforcerConfig) -> Result<Enforcer, PodnetError> {
        let policy = match &config.policy {
            Some(path) => Some(Arc::new(load_policy(path)?)),
            None => None,
        };
        match &policy {
            Some(p) => {
                report_not_enforced(p);
                tracing::info!(policy = %p.digest(), "allow-list mode: what no entry allows is denied");
            }
            None => tracing::info!(
                "default mode (no policy file): the internet is open; loopback, link-local, private ranges and the pod's own addresses are refused"
            ),
        }
        let shared = Arc::new(Shared {
            sandbox: config.sandbox.clone(),
            policy: RwLock::new(policy),
            host: HostFacts {
                addrs: local_addresses()?,
                gateway: None,
            },
            pins: Mutex::new(Pins::default()),
            upstream: Upstream::read(&config.hosts_file, &config.resolv_conf)?,
            flows: AtomicUsize::new(0),
            dns_inflight: AtomicUsize::new(0),
        });
        let mut listeners = Vec::new();
        let mut resolvers = Vec::new();
        for addr in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ] {
            let proxy = SocketAddr::new(addr, config.proxy_port);
            let dns = SocketAddr::new(addr, config.dns_port);
            match (TcpListener::bind(proxy), UdpSocket::bind(dns)) {
                (Ok(l), Ok(u)) => {
                    listeners.push(l);
                    resolvers.push(u);
                }
                // A pod without IPv6 has no ::1; its IPv6 traffic has nowhere to go.
                (Err(err), _) | (_, Err(err)) if addr.is_ipv6() => {
                    tracing::info!(%err, "no IPv6 loopback: serving IPv4 only");
                }
                (Err(err), _) => return Err(io(format!("binding the proxy to {proxy}"))(err)),
                (_, Err(err)) => return Err(io(format!("binding the resolver to {dns}"))(err)),
            }
        }
        for listener in listeners {
            let shared = shared.clone();
            std::thread::spawn(move || crate::proxy::serve(&shared, listener));
        }
        for socket in resolvers {
            let shared = shared.clone();
            std::thread::spawn(move || crate::dns::serve(&shared, socket));
        }
        if let Some(path) = config.policy.clone() {
            let shared = shared.clone();
            std::thread::spawn(move || watch_policy(&shared, &path));
        }
        tracing::info!(
            proxy_port = config.proxy_port,
            dns_port = config.dns_port,
            "enforcing"
        );
        Ok(Enforcer { shared })
    }

    /// The digest of the policy in force (`None` in default mode).
    pub fn policy_digest(&self) -> Option<String> {
        self.shared.current().map(|p| p.digest().to_owned())
    }
}

impl Shared {
    pub fn current(&self) -> Option<Arc<Policy>> {
        self.policy
            .read()
            .map(|p| p.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub fn decide_connection(&self, conn: &Connection<'_>) -> Decision {
        match self.current() {
            Some(policy) => policy.check_connection(conn, &self.host, &[]),
            None => check_default(conn.dst, &self.host, &[]),
        }
    }

    /// `None` in default mode, where requests are not decided one by one.
    pub fn decide_request(
        &self,
        dst: SocketAddr,
        pinned: &[String],
        request: &Request<'_>,
    ) -> Option<Decision> {
        let policy = self.current()?;
        Some(policy.check_request(dst, pinned, request, &self.host, &[]))
    }

    pub fn decide_dns(&self, name: &str, qtype: u16) -> DnsDecision {
        match self.current() {
            Some(policy) => policy.check_dns(name, qtype),
            None => DnsDecision::Resolve,
        }
    }

    /// Why a request was denied, for the 403's body: the policy in force.
    pub fn rule_set(&self) -> String {
        self.current()
            .map_or_else(|| "default".to_owned(), |p| p.digest().to_owned())
    }

    pub fn pinned(&self, addr: IpAddr) -> Vec<String> {
        self.pins.lock().map(|p| p.names(addr)).unwrap_or_default()
    }
}

/// The time for a decision record.
pub(crate) fn now() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    rfc3339_utc(millis)
}

/// Writes one decision record as a line on standard output (`kubectl logs -c network`).
pub(crate) fn log(record: &DecisionRecord) {
    let mut line = record.to_json_line();
    line.push('\n');
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop enforcement.
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}

fn load_policy(path: &Path) -> Result<Policy, PodnetError> {
    let text = read_policy_text(path)?;
    Ok(Policy::parse(&path.display().to_string(), &text)?)
}

fn read_policy_text(path: &Path) -> Result<String, PodnetError> {
    let read = |source| PodnetError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    // One byte over the limit is enough for kiln-policy to refuse the size.
    Ok(text)
}

fn report_not_enforced(policy: &Policy) {
    for field in policy.not_enforced() {
        tracing::warn!("{field}");
    }
}

/// Polls the policy file. A ConfigMap volume swaps its `..data` symlink atomically, so
/// each read sees one whole version; a version that validates replaces the policy in
/// force for every later decision, one that does not is logged and the old one kept.
fn watch_policy(shared: &Shared, path: &Path) {
    let mut refused: Option<String> = None;
    loop {
        std::thread::sleep(RELOAD_INTERVAL);
        let text = match read_policy_text(path) {
            Ok(text) => text,
            Err(err) => {
                if refused.as_deref() != Some("") {
                    tracing::error!(%err, "policy update refused; the policy in force stays");
                    refused = Some(String::new());
                }
                continue;
            }
        };
        let current = shared.current();
        if current.as_ref().is_some_and(|p| p.source() == text) || refused.as_ref() == Some(&text) {
            continue;
        }
        match Policy::parse(&path.display().to_string(), &text) {
            Ok(policy) => {
                report_not_enforced(&policy);
                tracing::info!(
                    policy = %policy.digest(),
                    previous = %current.as_ref().map_or("none", |p| p.digest()),
                    "policy replaced"
                );
                if let Ok(mut slot) = shared.policy.write() {
                    *slot = Some(Arc::new(policy));
                }
                refused = None;
            }
            Err(err) => {
                tracing::error!(
                    %err,
                    kept = %current.as_ref().map_or("none", |p| p.digest()),
                    "policy update refused; the policy in force stays"
                );
                refused = Some(text);
            }
        }
    }
}

/// Every address of the pod's interfaces: connections to them are refused by default.
fn local_addresses() -> Result<Vec<IpAddr>, PodnetError> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| io("listing the pod's addresses")(std::io::Error::from(e)))?;
    Ok(addrs
        .filter_map(|ifaddr| ifaddr.address)
        .filter_map(|addr| {
            addr.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}
