//! A sandbox's network endpoint as kiln-sandbox runs it: kiln-netstack in the process
//! that owns the VM, deciding by the sandbox's policy file (`network-policy.yaml` in its
//! directory, when there is one) and logging every decision to `network.log`. The
//! policy file is watched while the sandbox runs, so `kiln policy set` takes effect on
//! new flows within [`POLICY_POLL`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::boot::USER_NET;
use kiln_netstack::{DenialNotice, PolicyEgress};
use kiln_policy::{DecisionRecord, Policy, MAX_POLICY_BYTES};

use crate::boot::BootError;
use crate::error::{Error, ErrorKind};
use crate::state::{NetworkRecord, SandboxDir, StateError};

/// The policy in force for a sandbox, in its directory.
pub const POLICY_FILE: &str = "network-policy.yaml";

/// The sandbox's decision log (JSON lines), rotated to `network.log.1`.
pub const NETWORK_LOG: &str = "network.log";

/// The network endpoint's socket in a sandbox's directory.
const NETWORK_SOCKET: &str = "net.sock";

/// How often a running sandbox looks for a new policy file.
pub const POLICY_POLL: Duration = Duration::from_millis(250);

/// The endpoint and what keeps its policy current; dropping it stops both.
pub struct RunningNetwork {
    // Dropped first: the watcher stops before the endpoint.
    _watch: PolicyWatch,
    endpoint: kiln_netstack::Endpoint,
}

impl RunningNetwork {
    pub fn socket(&self) -> &Path {
        self.endpoint.socket()
    }
}

/// Starts the sandbox's network endpoint (kiln-netstack) in this process: the policy
/// file's allow-list when the sandbox has one, else the default mode (the internet
/// open, the host and the networks around it closed but for the services `network`
/// opens). `denials` hears each denial (a foreground run prints them).
pub fn start_network(
    sandbox: &SandboxDir,
    network: &NetworkRecord,
    log_max_size: u64,
    denials: Option<DenialNotice>,
) -> Result<Option<RunningNetwork>, BootError> {
    let NetworkRecord::User {
        forwards,
        allow_host,
    } = network
    else {
        return Ok(None);
    };
    let allowed = allow_host
        .iter()
        .map(|service| service.parse())
        .collect::<Result<Vec<_>, _>>()?;
    let host_addresses =
        kiln_netstack::DefaultEgress::host_addresses().map_err(BootError::HostAddresses)?;
    let gateway = USER_NET.gateway.expect("the user network has a gateway");
    let dns = USER_NET.dns.expect("the user network has a resolver");
    let policy_path = sandbox.file(POLICY_FILE);
    let policy = match read_policy(&policy_path) {
        Ok(policy) => policy,
        Err(err) => return Err(BootError::Policy(err.to_string())),
    };
    let egress = Arc::new(PolicyEgress::new(policy, gateway, allowed, host_addresses));
    let log = kiln_netstack::JsonLinesLog::open(&sandbox.file(NETWORK_LOG), log_max_size, denials)
        .map_err(|e| BootError::Policy(format!("the network log: {e}")))?;
    let config = kiln_netstack::EndpointConfig {
        addresses: kiln_netstack::Addresses {
            guest: USER_NET.address,
            prefix_len: USER_NET.prefix_len,
            gateway,
            dns,
        },
        forwards: forwards
            .iter()
            .map(|&(host, guest)| kiln_netstack::PortForward { host, guest })
            .collect(),
        egress: egress.clone(),
        log: Arc::new(log),
        sandbox: sandbox.id().to_owned(),
    };
    let socket = sandbox.path().join(NETWORK_SOCKET);
    let endpoint = kiln_netstack::Endpoint::start(&socket, config)?;
    let watch = PolicyWatch::start(policy_path, egress, sandbox.id().to_owned());
    Ok(Some(RunningNetwork {
        _watch: watch,
        endpoint,
    }))
}

/// Reads and validates the policy file at `path`; `None` when there is none.
fn read_policy(path: &Path) -> Result<Option<Policy>, Error> {
    let text = match read_policy_text(path)? {
        Some(text) => text,
        None => return Ok(None),
    };
    let policy = Policy::parse(&path.display().to_string(), &text)
        .map_err(|e| Error::new(ErrorKind::Internal, e))?;
    Ok(Some(policy))
}

/// The policy file's text (kiln's own file, at most [`MAX_POLICY_BYTES`]), if any.
fn read_policy_text(path: &Path) -> Result<Option<String>, Error> {
    let file = match kiln_hostfs::open_own(path) {
        Ok(file) => file,
        Err(kiln_hostfs::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(None)
        }
        Err(err) => return Err(Error::new(ErrorKind::Internal, StateError::from(err))),
    };
    let mut text = String::new();
    file.take(MAX_POLICY_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|source| {
            let path = path.to_owned();
            Error::new(ErrorKind::Internal, StateError::Io { path, source })
        })?;
    Ok(Some(text))
}

/// Polls the policy file and puts each new one that validates in force; one that does
/// not is logged and the old one kept.
struct PolicyWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PolicyWatch {
    fn start(path: PathBuf, egress: Arc<PolicyEgress>, sandbox: String) -> PolicyWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-policy-watch".into())
            .spawn(move || {
                let mut seen = egress.current().map(|p| p.source().to_owned());
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(POLICY_POLL);
                    let Ok(Some(text)) = read_policy_text(&path) else {
                        continue;
                    };
                    if seen.as_deref() == Some(&text) {
                        continue;
                    }
                    match Policy::parse(&path.display().to_string(), &text) {
                        Ok(policy) => {
                            tracing::info!(%sandbox, digest = policy.digest(), "network policy replaced");
                            egress.replace(policy);
                        }
                        Err(err) => {
                            tracing::warn!(%sandbox, %err, "new network policy refused; the old one stays");
                        }
                    }
                    seen = Some(text);
                }
            })
            .ok();
        PolicyWatch { stop, thread }
    }
}

impl Drop for PolicyWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Validates `text` (named `file` in errors) as a network policy; what it parses but
/// kiln does not enforce, as "not enforced by kiln: FIELD (why)" lines.
pub fn check_policy(file: &str, text: &str) -> Result<Vec<String>, Error> {
    let policy = Policy::parse(file, text).map_err(|e| Error::new(ErrorKind::InvalidInput, e))?;
    Ok(policy
        .not_enforced()
        .iter()
        .map(|n| n.to_string())
        .collect())
}

/// Writes the request's policy, if any, into its new sandbox's directory.
pub(crate) fn write_network_policy(
    sandbox: &SandboxDir,
    request: &crate::request::CreateRequest,
) -> Result<(), StateError> {
    match &request.network_policy {
        Some(text) => write_policy(sandbox, text),
        None => Ok(()),
    }
}

/// Writes a validated policy into a sandbox's directory (a temporary file and a rename).
fn write_policy(sandbox: &SandboxDir, text: &str) -> Result<(), StateError> {
    Ok(kiln_hostfs::write_file(
        &sandbox.file(POLICY_FILE),
        text.as_bytes(),
    )?)
}

#[derive(Debug, thiserror::Error)]
#[error("sandbox {0} has no network (--network none): a policy has nothing to decide")]
struct NoNetwork(String);

/// What `kiln policy set` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySet {
    pub digest: String,
    pub not_enforced: Vec<String>,
}

/// Replaces the network policy of sandbox `id` with `text` (named `file` in errors): a
/// running sandbox decides new flows by it within [`POLICY_POLL`]. A policy that does not
/// validate is refused and the old one stays.
pub fn set_policy(root: &Path, id: &str, file: &str, text: &str) -> Result<PolicySet, Error> {
    let sandbox = SandboxDir::open(root, id)?;
    let record: crate::state::SandboxRecord = sandbox.read_json(crate::state::RECORD_FILE)?;
    if record.network == NetworkRecord::None {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            NoNetwork(sandbox.id().to_owned()),
        ));
    }
    let policy = Policy::parse(file, text).map_err(|e| Error::new(ErrorKind::InvalidInput, e))?;
    write_policy(&sandbox, text)?;
    Ok(PolicySet {
        digest: policy.digest().to_owned(),
        not_enforced: policy
            .not_enforced()
            .iter()
            .map(|n| n.to_string())
            .collect(),
    })
}

/// The network policy of sandbox `id`: its text and digest, or `None` in the default mode.
pub fn show_policy(root: &Path, id: &str) -> Result<Option<(String, String)>, Error> {
    let sandbox = SandboxDir::open(root, id)?;
    Ok(read_policy(&sandbox.file(POLICY_FILE))?
        .map(|policy| (policy.source().to_owned(), policy.digest().to_owned())))
}

/// The longest decision line read back; a longer one is skipped.
const MAX_RECORD_LINE: usize = 64 * 1024;

/// How often `network_logs` with `follow` looks for new decisions.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Which decisions [`network_logs`] hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLogs {
    /// Those logged so far.
    All,
    /// Those logged so far, then each new one until the sandbox no longer runs.
    Follow,
    /// Those logged from this Unix time (seconds) on, until the sandbox no longer runs:
    /// a boot's decisions, given its start, however late the reader comes.
    Since(u64),
}

/// Hands decisions of sandbox `id` to `each`, oldest first (the rotated part, then the
/// current file), as `which` says. Lines that are not records (a torn last line) are
/// skipped.
pub fn network_logs(
    root: &Path,
    id: &str,
    which: NetworkLogs,
    each: &mut dyn FnMut(&DecisionRecord) -> std::io::Result<()>,
) -> Result<(), Error> {
    let follow = which != NetworkLogs::All;
    let sandbox = SandboxDir::open(root, id)?;
    let path = sandbox.file(NETWORK_LOG);
    let io_error = |path: &Path, source| {
        let path = path.to_owned();
        Error::new(ErrorKind::Internal, StateError::Io { path, source })
    };
    let rotated = path.with_extension("log.1");
    let mut reader = LogFollower::default();
    // Records' times are fixed-width RFC 3339 in UTC: they sort as text.
    let since = match which {
        NetworkLogs::Since(unix) => Some(kiln_policy::rfc3339_utc(unix.saturating_mul(1000))),
        NetworkLogs::All | NetworkLogs::Follow => None,
    };
    let mut each = |record: &DecisionRecord| match &since {
        Some(since) if record.time < *since => Ok(()),
        _ => each(record),
    };
    let each = &mut each;
    if let Some(file) = open_log(&rotated)? {
        LogFollower::default()
            .read_all(file, each)
            .map_err(|e| io_error(&rotated, e))?;
    }
    loop {
        let running = sandbox.monitor_alive();
        if let Some(file) = open_log(&path)? {
            reader
                .read_all(file, each)
                .map_err(|e| io_error(&path, e))?;
        }
        if !follow || !running {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

fn open_log(path: &Path) -> Result<Option<std::fs::File>, Error> {
    match kiln_hostfs::open_own(path) {
        Ok(file) => Ok(Some(file)),
        Err(kiln_hostfs::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(err) => Err(Error::new(ErrorKind::Internal, StateError::from(err))),
    }
}

/// Reads a decision log from where it last stopped; a file that shrank was rotated and
/// is read from its start.
#[derive(Default)]
struct LogFollower {
    offset: u64,
    partial: Vec<u8>,
}

impl LogFollower {
    fn read_all(
        &mut self,
        mut file: std::fs::File,
        each: &mut dyn FnMut(&DecisionRecord) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        if file.metadata()?.len() < self.offset {
            self.offset = 0;
            self.partial.clear();
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        self.offset += file.read_to_end(&mut bytes)? as u64;
        for byte in bytes {
            if byte != b'\n' {
                if self.partial.len() <= MAX_RECORD_LINE {
                    self.partial.push(byte);
                }
                continue;
            }
            let line = std::mem::take(&mut self.partial);
            if let Ok(record) = serde_json::from_slice::<DecisionRecord>(&line) {
                each(&record)?;
            }
        }
        Ok(())
    }
}
