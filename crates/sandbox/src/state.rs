//! A sandbox's state directory under kiln's root, and the short-lived run directory that
//! holds its sockets.
//!
//! Layout: `<root>/sandboxes/<id>/` (0700) holds the sandbox's files: `sandbox.json` (the
//! launch request, [`SandboxRecord`]), `state.json` (its status, [`StateRecord`]), the
//! console log, the workload's `stdout.log`/`stderr.log`, the writable disk and, while it
//! runs, the monitor's lock and socket. `<root>/sandboxes/.names/<name>` holds the id a
//! name points to, created exclusively so two sandboxes can never share a name.
//!
//! Whoever runs a sandbox (its monitor, or a foreground `kiln run`) holds an exclusive
//! flock on `monitor.lock` for as long as the VM lives, so a free lock means nothing runs.
//!
//! What is read back from here decides what kiln boots, so only kiln's own state counts
//! (kiln-hostfs): `sandboxes/`, `.names/` and each state directory must be private to the
//! effective uid, the records are read only when kiln wrote them, and every file is
//! written 0600 without following a symlink. The records name no program: the VMM comes
//! from the configuration of the kiln command that boots the sandbox.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_hostfs::{create_new, open_own, private_dir};
use kiln_image::ImageRecord;
use kiln_protocol::{HostEntry, RunSpec, TmpfsMount, WorkloadResult};
use kiln_vm::accel::AccelRequest;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind};
use crate::options::{validate_name, OptionError, RestartPolicy, Volume};

/// File names inside a sandbox's state directory.
pub const RECORD_FILE: &str = "sandbox.json";
pub const STATE_FILE: &str = "state.json";
pub const STDOUT_LOG: &str = "stdout.log";
pub const STDERR_LOG: &str = "stderr.log";
pub const MONITOR_LOG: &str = "monitor.log";
pub const MONITOR_LOCK: &str = "monitor.lock";
pub const MONITOR_SOCKET: &str = "monitor.sock";
/// The gateway's sandbox token of an OpenShell sandbox (owner-only, as every state file).
pub const OPENSHELL_TOKEN_FILE: &str = "openshell-token";
/// The TLS material (JSON, [`kiln_protocol::OpenShellTls`]) of an OpenShell sandbox whose
/// gateway is `https` (owner-only, as every state file).
pub const OPENSHELL_TLS_FILE: &str = "openshell-tls";

/// What a sandbox was created from and with (`sandbox.json`); never changes afterwards, so
/// every start boots the same image (the pinned manifest digest in `image`). It names no
/// program to run: the `qemu` field of older kilns' records is ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub name: Option<String>,
    /// The image as resolved at creation: reference, manifest digest, config digest.
    pub image: ImageRecord,
    pub created_unix: u64,
    pub sandbox_uid: u32,
    pub sandbox_gid: u32,
    /// The main workload's run spec.
    pub run: RunSpec,
    pub cpus: u32,
    /// The CPU share asked for, in thousandths of a CPU (`--cpus 0.5` is 500; `cpus` is
    /// this rounded up). Records of older kilns get `cpus` whole CPUs.
    #[serde(default)]
    pub millicpus: Option<u32>,
    pub memory_mib: u32,
    pub network: NetworkRecord,
    /// The user's `KEY=VALUE` labels (absent in records of older kilns).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Stored as `auto`, `kvm` or `tcg`; anything else makes the record corrupt.
    #[serde(with = "accel_text")]
    pub accel: AccelRequest,
    /// Host directories shared into the sandbox (absent in records of older kilns).
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Bytes `stdout.log` and `stderr.log` each reach before they are rotated (records
    /// of older kilns get the default).
    #[serde(default = "default_log_max_size")]
    pub log_max_size: u64,
    /// Whether the workload may create user namespaces (absent in records of older kilns:
    /// it may not).
    #[serde(default)]
    pub allow_user_namespaces: bool,
    /// The monitor removes the sandbox once its workload ran and it stopped (`run --rm
    /// -d`; absent in records of older kilns: it does not).
    #[serde(default)]
    pub auto_remove: bool,
    /// Whether the monitor boots the sandbox again after it ended (absent in records of
    /// older kilns: it does not).
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Names and mounts the guest sets up at boot (absent in records of older kilns: the
    /// defaults).
    #[serde(default)]
    pub guest: GuestSetup,
    /// OpenShell's supervisor is the main program (absent: kiln's supervisor runs the
    /// workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openshell: Option<OpenShellRecord>,
}

/// What a sandbox that runs OpenShell's supervisor boots with besides its images; the
/// token is in [`OPENSHELL_TOKEN_FILE`] and the TLS material in [`OPENSHELL_TLS_FILE`],
/// never in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenShellRecord {
    /// `sha256:<hex>` of the supervisor binary: names its cached layer.
    pub supervisor_digest: String,
}

/// What the guest's init sets up from the boot configuration besides disks and network:
/// docker's `--hostname`, `--add-host`, `--dns`, `--read-only` and `--tmpfs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSetup {
    /// `None`: the sandbox id's first [`SHORT_ID_LEN`] characters, as docker does.
    pub hostname: Option<String>,
    pub extra_hosts: Vec<HostEntry>,
    pub dns: Vec<std::net::IpAddr>,
    pub read_only: bool,
    pub tmpfs: Vec<TmpfsMount>,
}

/// How many characters of an id docker shows, and kiln's default hostname has.
pub const SHORT_ID_LEN: usize = 12;

/// What `stdout.log` and `stderr.log` each hold at most when the request does not say:
/// 10 MiB, with one rotated file each, so 40 MiB per sandbox at most. That keeps a long
/// workload's recent output while a guest writing without end fills nothing; docker's
/// json-file driver has no cap by default, and its `local` driver keeps 100 MB (five
/// files of 20 MB) per container.
pub const DEFAULT_LOG_MAX_SIZE: u64 = 10 << 20;

fn default_log_max_size() -> u64 {
    DEFAULT_LOG_MAX_SIZE
}

/// The accelerator request in `sandbox.json`, as the words `--accel` takes.
mod accel_text {
    use kiln_vm::accel::AccelRequest;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(accel: &AccelRequest, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_str(match accel {
            AccelRequest::Auto => "auto",
            AccelRequest::Kvm => "kvm",
            AccelRequest::Tcg => "tcg",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<AccelRequest, D::Error> {
        String::deserialize(input)?
            .parse()
            .map_err(D::Error::custom)
    }
}

/// The guest's network as stored in a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum NetworkRecord {
    None,
    /// kiln's network endpoint: `(host, guest)` port forwards and the host-local services
    /// opened to the guest, as kiln-netstack's `HostService` prints them.
    User {
        forwards: Vec<(u16, u16)>,
        #[serde(default)]
        allow_host: Vec<String>,
    },
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    /// Created (or being started): no workload has run yet.
    Created,
    /// The monitor runs and the workload started.
    Running,
    /// The main workload ended (on its own or stopped).
    Exited {
        result: WorkloadResult,
        exit_code: i32,
    },
    /// The sandbox could not boot, or its monitor died.
    Failed { message: String },
}

/// A sandbox's status as stored (`state.json`, replaced whole by rename).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    #[serde(flatten)]
    pub status: Status,
    /// The monitor process of the last start.
    pub monitor_pid: Option<u32>,
    pub started_unix: Option<u64>,
    pub ended_unix: Option<u64>,
}

impl StateRecord {
    pub fn created() -> Self {
        StateRecord {
            status: Status::Created,
            monitor_pid: None,
            started_unix: None,
            ended_unix: None,
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Errors about sandbox state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Name(#[from] OptionError),

    #[error("a sandbox named {name:?} already exists (id {id}); pick another name or remove it")]
    DuplicateName { name: String, id: String },

    #[error(
        "refusing to use {0}: a sandbox state directory must be a real directory, not a symlink"
    )]
    Symlink(PathBuf),

    #[error("no such sandbox: {0}")]
    NotFound(String),

    #[error("sandbox id prefix {prefix:?} is ambiguous: it matches {}; give more of the id", candidates.join(", "))]
    Ambiguous {
        prefix: String,
        candidates: Vec<String>,
    },

    #[error("sandbox {0} is running; stop it first (or force the removal)")]
    Running(String),

    #[error("sandbox {0} is not running")]
    NotRunning(String),

    #[error("{path}: not a valid sandbox state file: {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A state directory or file that kiln may not trust, or cannot reach.
    #[error(transparent)]
    Host(#[from] kiln_hostfs::Error),
}

impl StateError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StateError::Name(_) | StateError::Ambiguous { .. } => ErrorKind::InvalidInput,
            StateError::DuplicateName { .. } => ErrorKind::AlreadyExists,
            StateError::NotFound(_) => ErrorKind::NotFound,
            StateError::Running(_) | StateError::NotRunning(_) => ErrorKind::FailedPrecondition,
            // The user fixes what another user could write (the error says how).
            StateError::Host(kiln_hostfs::Error::Untrusted { .. }) => ErrorKind::FailedPrecondition,
            StateError::Symlink(_)
            | StateError::Corrupt { .. }
            | StateError::Io { .. }
            | StateError::Host(_) => ErrorKind::Internal,
        }
    }
}

impl From<StateError> for Error {
    fn from(err: StateError) -> Self {
        Error::new(err.kind(), err)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The state directory of one sandbox.
#[derive(Debug)]
pub struct SandboxDir {
    id: String,
    name: Option<String>,
    path: PathBuf,
    names_dir: PathBuf,
}

impl SandboxDir {
    /// Creates a new sandbox directory with a fresh id, claiming `name` if given.
    pub fn create(root: &Path, name: Option<&str>) -> Result<SandboxDir, StateError> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        let (sandboxes, names_dir) = state_dirs(root)?;
        let (id, path) = loop {
            let id = random_id().map_err(io_err(Path::new("/dev/urandom")))?;
            let path = sandboxes.join(&id);
            match DirBuilder::new().mode(0o700).create(&path) {
                // Exactly 0700: the umask may have taken bits away.
                Ok(()) => {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                        .map_err(io_err(&path))?;
                    break (id, path);
                }
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(io_err(&path)(err)),
            }
        };
        let dir = SandboxDir {
            id,
            name: None,
            path,
            names_dir,
        };
        if let Some(name) = name {
            if let Err(err) = dir.claim_name(name) {
                dir.remove()?;
                return Err(err);
            }
        }
        Ok(SandboxDir {
            name: name.map(str::to_owned),
            ..dir
        })
    }

    /// The existing sandbox `id_or_name`: a whole id first, then a name, then a unique
    /// prefix of an id (as docker resolves them).
    pub fn open(root: &Path, id_or_name: &str) -> Result<SandboxDir, StateError> {
        validate_name(id_or_name)?;
        let (sandboxes, names_dir) = state_dirs(root)?;
        // `.names` and other dot entries are kiln's own, never a sandbox.
        let is_id = !id_or_name.starts_with('.')
            && std::fs::symlink_metadata(sandboxes.join(id_or_name)).is_ok();
        let id = if is_id {
            id_or_name.to_owned()
        } else if let Some(id) = read_name_claim(&names_dir, id_or_name)? {
            id
        } else {
            id_by_prefix(root, id_or_name)?
        };
        let path = sandboxes.join(&id);
        let meta = std::fs::symlink_metadata(&path).map_err(|err| match err.kind() {
            std::io::ErrorKind::NotFound => StateError::NotFound(id_or_name.to_owned()),
            _ => io_err(&path)(err),
        })?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(StateError::Symlink(path));
        }
        kiln_hostfs::check_private_dir(&path)?;
        let mut dir = SandboxDir {
            id,
            name: None,
            path,
            names_dir,
        };
        dir.name = dir
            .read_json::<SandboxRecord>(RECORD_FILE)
            .ok()
            .and_then(|r| r.name);
        Ok(dir)
    }

    /// The ids of every sandbox under `root`, sorted.
    pub fn list(root: &Path) -> Result<Vec<String>, StateError> {
        let (sandboxes, _) = state_dirs(root)?;
        let entries = std::fs::read_dir(&sandboxes).map_err(io_err(&sandboxes))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&sandboxes))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .filter(|n| !n.starts_with('.') && validate_name(n).is_ok())
            {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// A file in this directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `value` as JSON to `name`, through a temporary file and a rename so readers
    /// see the old or the new contents, never a mix.
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(value).expect("state records serialise");
        Ok(kiln_hostfs::write_file(&self.file(name), &json)?)
    }

    /// Reads the JSON file `name` (at most 1 MiB), which kiln must have written: a file
    /// another user owns or could write is refused.
    pub fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<T, StateError> {
        const MAX: u64 = 1 << 20;
        let bytes = self.read_bytes(name, MAX)?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: self.file(name),
            reason: e.to_string(),
        })
    }

    /// Reads at most `max` bytes of `name`, which kiln must have written (as
    /// [`SandboxDir::read_json`]).
    fn read_bytes(&self, name: &str, max: u64) -> Result<Vec<u8>, StateError> {
        let path = self.file(name);
        let mut bytes = Vec::new();
        open_own(&path)?
            .take(max)
            .read_to_end(&mut bytes)
            .map_err(io_err(&path))?;
        Ok(bytes)
    }

    /// Keeps the OpenShell sandbox token (owner-only, by rename).
    pub fn write_openshell_token(&self, token: &str) -> Result<(), StateError> {
        Ok(kiln_hostfs::write_file(
            &self.file(OPENSHELL_TOKEN_FILE),
            token.as_bytes(),
        )?)
    }

    /// The OpenShell sandbox token, if the sandbox has one. Errors never hold it.
    pub fn openshell_token(&self) -> Result<Option<String>, StateError> {
        let max = kiln_protocol::MAX_OPENSHELL_TOKEN_LEN as u64;
        let bytes = match self.read_bytes(OPENSHELL_TOKEN_FILE, max + 1) {
            Ok(bytes) => bytes,
            Err(StateError::Host(err)) if err.is_not_found() => return Ok(None),
            Err(err) => return Err(err),
        };
        let corrupt = |reason: &str| StateError::Corrupt {
            path: self.file(OPENSHELL_TOKEN_FILE),
            reason: reason.to_owned(),
        };
        if bytes.len() as u64 > max {
            return Err(corrupt("longer than a sandbox token may be"));
        }
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| corrupt("not UTF-8"))
    }

    /// Keeps the OpenShell TLS material (owner-only, by rename).
    pub fn write_openshell_tls(&self, tls: &kiln_protocol::OpenShellTls) -> Result<(), StateError> {
        let json = serde_json::to_vec(tls).expect("TLS material serialises");
        Ok(kiln_hostfs::write_file(
            &self.file(OPENSHELL_TLS_FILE),
            &json,
        )?)
    }

    /// The OpenShell TLS material, if the sandbox has some. Errors never hold it.
    pub fn openshell_tls(&self) -> Result<Option<kiln_protocol::OpenShellTls>, StateError> {
        // Three files of at most MAX_OPENSHELL_TLS_FILE_LEN, with room for JSON escapes.
        let max = 8 * 3 * kiln_protocol::MAX_OPENSHELL_TLS_FILE_LEN as u64;
        let bytes = match self.read_bytes(OPENSHELL_TLS_FILE, max) {
            Ok(bytes) => bytes,
            Err(StateError::Host(err)) if err.is_not_found() => return Ok(None),
            Err(err) => return Err(err),
        };
        let corrupt = || StateError::Corrupt {
            path: self.file(OPENSHELL_TLS_FILE),
            reason: "not the TLS material kiln writes".into(),
        };
        let tls: kiln_protocol::OpenShellTls =
            serde_json::from_slice(&bytes).map_err(|_| corrupt())?;
        let longest = [&tls.ca, &tls.cert, &tls.key].map(String::len);
        if longest
            .iter()
            .any(|len| *len > kiln_protocol::MAX_OPENSHELL_TLS_FILE_LEN)
        {
            return Err(corrupt());
        }
        Ok(Some(tls))
    }

    /// Makes `name` point to this sandbox, unless another sandbox has it.
    fn claim_name(&self, name: &str) -> Result<(), StateError> {
        let claim = self.names_dir.join(name);
        match create_new(&claim) {
            Ok(mut file) => file.write_all(self.id.as_bytes()).map_err(io_err(&claim)),
            Err(kiln_hostfs::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                let mut owner = String::new();
                let _ = open_own(&claim).map(|f| f.take(256).read_to_string(&mut owner));
                Err(StateError::DuplicateName {
                    name: name.to_owned(),
                    id: owner,
                })
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Gives the sandbox the name `new`: claims it (exclusively, as create does), records
    /// it, then frees the old name.
    pub fn rename(&mut self, new: &str) -> Result<(), StateError> {
        validate_name(new)?;
        self.claim_name(new)?;
        let claim = self.names_dir.join(new);
        let recorded = self
            .read_json::<SandboxRecord>(RECORD_FILE)
            .and_then(|mut record| {
                record.name = Some(new.to_owned());
                self.write_json(RECORD_FILE, &record)
            });
        if let Err(err) = recorded {
            let _ = std::fs::remove_file(&claim);
            return Err(err);
        }
        match self.name.replace(new.to_owned()) {
            Some(old) => self.free_name(&old),
            None => Ok(()),
        }
    }

    /// Removes the claim of `name` (already gone is fine).
    fn free_name(&self, name: &str) -> Result<(), StateError> {
        let claim = self.names_dir.join(name);
        match std::fs::remove_file(&claim) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(io_err(&claim)(err)),
            _ => Ok(()),
        }
    }

    /// Removes the directory and its name claim. A directory that has become a symlink is
    /// refused, so a swapped path can never make kiln delete something else.
    pub fn remove(self) -> Result<(), StateError> {
        let meta = std::fs::symlink_metadata(&self.path).map_err(io_err(&self.path))?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(StateError::Symlink(self.path));
        }
        std::fs::remove_dir_all(&self.path).map_err(io_err(&self.path))?;
        match &self.name {
            Some(name) => self.free_name(name),
            None => Ok(()),
        }
    }
}

impl SandboxDir {
    /// The lock file with an exclusive lock held, or `None` when another process holds it.
    /// The lock lasts as long as the returned file (and its copies in forked children).
    pub fn lock_monitor(&self) -> Result<Option<File>, StateError> {
        let path = self.file(MONITOR_LOCK);
        let file = kiln_hostfs::open_lock(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(source)) => Err(StateError::Io { path, source }),
        }
    }

    /// Whether a monitor (or a foreground `kiln run`) holds the sandbox's lock.
    pub fn monitor_alive(&self) -> bool {
        let Ok(file) = open_own(&self.file(MONITOR_LOCK)) else {
            return false;
        };
        matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
    }

    /// Blocks until no monitor holds the sandbox's lock: the lock is released only when
    /// its holder ends, so this wakes exactly then, without polling.
    pub fn wait_for_monitor(&self) -> Result<(), StateError> {
        let path = self.file(MONITOR_LOCK);
        let file = match open_own(&path) {
            Ok(file) => file,
            // Never started: nothing to wait for.
            Err(err) if err.is_not_found() => return Ok(()),
            Err(err) => return Err(err.into()),
        };
        loop {
            // The shared lock goes with `file`.
            match file.lock_shared() {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(StateError::Io { path, source }),
            }
        }
    }

    /// Opens (creating, 0600) the log file `name` for appending, never through a
    /// symlink; one that is not kiln's own is refused.
    pub fn open_log(&self, name: &str) -> Result<File, StateError> {
        Ok(kiln_hostfs::open_log(&self.file(name))?)
    }

    /// The path to bind or connect to for the monitor socket, and the directory handle
    /// that must stay open while it is used: a long state path is reached through
    /// `/proc/self/fd/N/`, because a socket path must fit in `sockaddr_un`.
    pub fn monitor_socket(&self) -> Result<(PathBuf, Option<File>), StateError> {
        let path = self.file(MONITOR_SOCKET);
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return Ok((path, None));
        }
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(io_err(&self.path))?;
        let short = PathBuf::from(format!(
            "/proc/self/fd/{}/{MONITOR_SOCKET}",
            dir.as_raw_fd()
        ));
        Ok((short, Some(dir)))
    }
}

/// The id the name claim `name` holds, or `None` when no sandbox has that name.
fn read_name_claim(names_dir: &Path, name: &str) -> Result<Option<String>, StateError> {
    let claim = names_dir.join(name);
    let mut id = String::new();
    match open_own(&claim) {
        Ok(file) => {
            file.take(256)
                .read_to_string(&mut id)
                .map_err(io_err(&claim))?;
        }
        Err(err) if err.is_not_found() => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let id = id.trim();
    if validate_name(id).is_err() || id.starts_with('.') {
        return Err(StateError::Corrupt {
            path: claim,
            reason: "not a sandbox id".into(),
        });
    }
    Ok(Some(id.to_owned()))
}

/// The one sandbox id that starts with `prefix`.
fn id_by_prefix(root: &Path, prefix: &str) -> Result<String, StateError> {
    let mut candidates: Vec<String> = if prefix.starts_with('.') {
        Vec::new()
    } else {
        SandboxDir::list(root)?
            .into_iter()
            .filter(|id| id.starts_with(prefix))
            .collect()
    };
    match candidates.len() {
        0 => Err(StateError::NotFound(prefix.to_owned())),
        1 => Ok(candidates.remove(0)),
        _ => Err(StateError::Ambiguous {
            prefix: prefix.to_owned(),
            candidates,
        }),
    }
}

/// `<root>/sandboxes` and `<root>/sandboxes/.names`, created private or refused.
fn state_dirs(root: &Path) -> Result<(PathBuf, PathBuf), StateError> {
    let sandboxes = private_dir(root, "sandboxes")?;
    let names = private_dir(&sandboxes, ".names")?;
    Ok((sandboxes, names))
}

/// The longest path `sockaddr_un` holds, with its terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// A private (0700) temporary directory for the sandbox's sockets, removed on drop. It
/// lives under $XDG_RUNTIME_DIR or /tmp rather than under the root because a unix socket
/// path must fit in 108 bytes.
pub fn run_dir() -> Result<tempfile::TempDir, StateError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("kiln-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&base)
        .map_err(io_err(&base))
}

/// 12 hex digits from the kernel's random source: short enough to type, and a collision
/// is retried.
fn random_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_private_and_remove_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), Some("box")).unwrap();
        assert_eq!(dir.id().len(), 12);
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(dir.console_log(), b"x").unwrap();
        let path = dir.path().to_path_buf();
        dir.remove().unwrap();
        assert!(!path.exists());
        // The name is free again.
        SandboxDir::create(root.path(), Some("box")).unwrap();
    }

    #[test]
    fn duplicate_names_are_refused_without_leftovers() {
        let root = tempfile::tempdir().unwrap();
        let first = SandboxDir::create(root.path(), Some("dup")).unwrap();
        let err = SandboxDir::create(root.path(), Some("dup")).unwrap_err();
        assert!(err.to_string().contains(first.id()), "{err}");
        let entries = std::fs::read_dir(root.path().join("sandboxes"))
            .unwrap()
            .count();
        assert_eq!(entries, 2, "only .names and the first sandbox remain");
    }

    #[test]
    fn openshell_tls_is_kept_owner_only_and_a_corrupt_file_is_not_quoted() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        assert_eq!(dir.openshell_tls().unwrap(), None);
        let tls = kiln_protocol::OpenShellTls {
            ca: "ca".into(),
            cert: "cert".into(),
            key: "secret key".into(),
        };
        dir.write_openshell_tls(&tls).unwrap();
        assert_eq!(dir.openshell_tls().unwrap(), Some(tls));
        let kept = dir.file(OPENSHELL_TLS_FILE);
        let mode = std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let too_long = "k".repeat(kiln_protocol::MAX_OPENSHELL_TLS_FILE_LEN + 1);
        for bad in [
            r#"{"ca":"a","cert":"b","key":"secret"#.to_owned(),
            format!(r#"{{"ca":"a","cert":"b","key":"secret{too_long}"}}"#),
        ] {
            kiln_hostfs::write_file(&kept, bad.as_bytes()).unwrap();
            let err = dir.openshell_tls().unwrap_err().to_string();
            assert!(err.contains("not the TLS material kiln writes"), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            SandboxDir::create(root.path(), Some("../x")),
            Err(StateError::Name(_))
        ));
    }

    #[test]
    fn a_symlinked_state_dir_is_never_removed_through() {
        let root = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::fs::write(victim.path().join("keep"), b"x").unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        std::fs::remove_dir(dir.path()).unwrap();
        std::os::unix::fs::symlink(victim.path(), dir.path()).unwrap();
        assert!(matches!(dir.remove(), Err(StateError::Symlink(_))));
        assert!(victim.path().join("keep").exists());
    }

    #[test]
    fn open_finds_ids_and_names_and_refuses_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), Some("named")).unwrap();
        let state = StateRecord::created();
        dir.write_json(STATE_FILE, &state).unwrap();
        assert_eq!(
            SandboxDir::open(root.path(), dir.id()).unwrap().path(),
            dir.path()
        );
        let by_name = SandboxDir::open(root.path(), "named").unwrap();
        assert_eq!(by_name.id(), dir.id());
        assert_eq!(by_name.read_json::<StateRecord>(STATE_FILE).unwrap(), state);
        assert!(matches!(
            SandboxDir::open(root.path(), "other"),
            Err(StateError::NotFound(_))
        ));
        assert!(matches!(
            SandboxDir::open(root.path(), "../x"),
            Err(StateError::Name(_))
        ));
        assert!(matches!(
            SandboxDir::open(root.path(), ".names"),
            Err(StateError::NotFound(_))
        ));
        assert_eq!(
            SandboxDir::list(root.path()).unwrap(),
            vec![dir.id().to_owned()]
        );
    }

    #[test]
    fn a_unique_id_prefix_opens_its_sandbox_and_an_ambiguous_one_lists_the_candidates() {
        let root = tempfile::tempdir().unwrap();
        let sandboxes = root.path().join("sandboxes");
        SandboxDir::list(root.path()).unwrap();
        for id in ["ab12aaaaaaaa", "ab34bbbbbbbb", "cdcdcdcdcdcd"] {
            DirBuilder::new()
                .mode(0o700)
                .create(sandboxes.join(id))
                .unwrap();
        }
        assert_eq!(
            SandboxDir::open(root.path(), "ab3").unwrap().id(),
            "ab34bbbbbbbb"
        );
        match SandboxDir::open(root.path(), "ab") {
            Err(err @ StateError::Ambiguous { .. }) => {
                assert_eq!(err.kind(), ErrorKind::InvalidInput);
                assert_eq!(
                    err.to_string(),
                    "sandbox id prefix \"ab\" is ambiguous: it matches ab12aaaaaaaa, \
                     ab34bbbbbbbb; give more of the id"
                );
            }
            other => panic!("expected an ambiguous prefix, got {other:?}"),
        }
        assert!(matches!(
            SandboxDir::open(root.path(), "ef"),
            Err(StateError::NotFound(_))
        ));
    }

    #[test]
    fn rename_moves_the_name_claim_and_refuses_a_taken_name() {
        let root = tempfile::tempdir().unwrap();
        let mut dir = SandboxDir::create(root.path(), Some("old")).unwrap();
        let mut named = record(&dir);
        named.name = Some("old".into());
        dir.write_json(RECORD_FILE, &named).unwrap();
        SandboxDir::create(root.path(), Some("taken")).unwrap();
        assert!(matches!(
            dir.rename("taken"),
            Err(StateError::DuplicateName { .. })
        ));
        dir.rename("new").unwrap();
        let opened = SandboxDir::open(root.path(), "new").unwrap();
        assert_eq!((opened.id(), opened.name()), (dir.id(), Some("new")));
        assert!(matches!(
            SandboxDir::open(root.path(), "old"),
            Err(StateError::NotFound(_))
        ));
        SandboxDir::create(root.path(), Some("old")).unwrap();
    }

    #[test]
    fn open_refuses_a_symlinked_state_dir() {
        let root = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        std::fs::remove_dir(dir.path()).unwrap();
        std::os::unix::fs::symlink(victim.path(), dir.path()).unwrap();
        assert!(matches!(
            SandboxDir::open(root.path(), dir.id()),
            Err(StateError::Symlink(_))
        ));
    }

    #[test]
    fn status_records_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        let exited = StateRecord {
            status: Status::Exited {
                result: WorkloadResult::Killed { signal: 9 },
                exit_code: 137,
            },
            monitor_pid: None,
            started_unix: Some(1),
            ended_unix: Some(2),
        };
        dir.write_json(STATE_FILE, &exited).unwrap();
        assert_eq!(dir.read_json::<StateRecord>(STATE_FILE).unwrap(), exited);
        let text = std::fs::read_to_string(dir.file(STATE_FILE)).unwrap();
        assert!(text.contains("\"status\": \"exited\""), "{text}");
        std::fs::write(dir.file(STATE_FILE), b"{").unwrap();
        assert!(matches!(
            dir.read_json::<StateRecord>(STATE_FILE),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn the_accelerator_is_stored_as_its_word_and_a_bad_word_is_refused() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Record {
            #[serde(with = "accel_text")]
            accel: AccelRequest,
        }
        for (accel, word) in [
            (AccelRequest::Auto, "auto"),
            (AccelRequest::Kvm, "kvm"),
            (AccelRequest::Tcg, "tcg"),
        ] {
            let json = serde_json::to_string(&Record { accel }).unwrap();
            assert_eq!(json, format!("{{\"accel\":\"{word}\"}}"));
            assert_eq!(
                serde_json::from_str::<Record>(&json).unwrap(),
                Record { accel }
            );
        }
        let err = serde_json::from_str::<Record>("{\"accel\":\"turbo\"}").unwrap_err();
        assert!(err.to_string().contains("turbo"), "{err}");
    }

    #[test]
    fn a_record_without_a_log_size_gets_the_default() {
        let digest = |hex: &str| format!("sha256:{}", hex.repeat(64)).parse().unwrap();
        let record = SandboxRecord {
            id: "0123456789ab".into(),
            name: None,
            image: ImageRecord {
                reference: "docker://docker.io/library/busybox:latest".into(),
                manifest_digest: digest("a"),
                index_digest: None,
                config_digest: digest("b"),
                platform: kiln_image::Platform::host(),
                size: 1,
                created: None,
                pulled_at: 0,
            },
            created_unix: 0,
            sandbox_uid: 10001,
            sandbox_gid: 10001,
            run: RunSpec {
                argv: vec!["sh".into()],
                env: Vec::new(),
                cwd: None,
                identity: kiln_protocol::Identity {
                    run_as: kiln_protocol::RunAs::Sandbox,
                    uid: 10001,
                    gid: 10001,
                },
                tty: false,
                terminal: None,
                task: None,
                openshell: None,
            },
            cpus: 1,
            millicpus: None,
            memory_mib: 512,
            network: NetworkRecord::None,
            labels: BTreeMap::new(),
            accel: AccelRequest::Auto,
            volumes: Vec::new(),
            log_max_size: 4096,
            allow_user_namespaces: false,
            auto_remove: false,
            restart: RestartPolicy::No,
            guest: GuestSetup::default(),
            openshell: None,
        };
        let mut json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["log_max_size"], 4096);
        assert_eq!(
            serde_json::from_value::<SandboxRecord>(json.clone()).unwrap(),
            record
        );
        json.as_object_mut().unwrap().remove("log_max_size");
        let old: SandboxRecord = serde_json::from_value(json).unwrap();
        assert_eq!(old.log_max_size, DEFAULT_LOG_MAX_SIZE);
    }

    #[test]
    fn network_records_read_back_and_older_ones_have_no_host_services() {
        let network = NetworkRecord::User {
            forwards: vec![(8080, 80)],
            allow_host: vec!["host.kiln.internal:5432".into()],
        };
        let json = serde_json::to_string(&network).unwrap();
        assert_eq!(
            serde_json::from_str::<NetworkRecord>(&json).unwrap(),
            network
        );
        let older: NetworkRecord =
            serde_json::from_str(r#"{"mode":"user","forwards":[[8080,80]]}"#).unwrap();
        assert_eq!(
            older,
            NetworkRecord::User {
                forwards: vec![(8080, 80)],
                allow_host: Vec::new()
            }
        );
    }

    #[test]
    fn the_lock_tells_whether_a_monitor_lives() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = SandboxDir::create(root.path(), None).unwrap();
        assert!(!sandbox.monitor_alive());
        let lock = sandbox.lock_monitor().unwrap().expect("a free lock");
        assert!(sandbox.monitor_alive());
        assert!(
            sandbox.lock_monitor().unwrap().is_none(),
            "a second monitor is refused"
        );
        drop(lock);
        assert!(!sandbox.monitor_alive());
    }

    #[test]
    fn waiting_ends_when_the_lock_is_released() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = SandboxDir::create(root.path(), None).unwrap();
        sandbox
            .wait_for_monitor()
            .expect("no lock file: nothing to wait for");
        let lock = sandbox.lock_monitor().unwrap().expect("a free lock");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| tx.send(sandbox.wait_for_monitor().is_ok()).unwrap());
            let early = rx.recv_timeout(std::time::Duration::from_millis(200));
            assert!(early.is_err(), "the wait ended while the lock was held");
            drop(lock);
            assert_eq!(
                rx.recv_timeout(std::time::Duration::from_secs(10)),
                Ok(true)
            );
        });
    }

    #[test]
    fn a_long_state_path_is_reached_through_the_directory_handle() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("r".repeat(120));
        let sandbox = SandboxDir::create(&root, None).unwrap();
        assert!(sandbox.file(MONITOR_SOCKET).as_os_str().len() > SUN_PATH_MAX);
        let (address, dir) = sandbox.monitor_socket().unwrap();
        assert!(
            dir.is_some() && address.starts_with("/proc/self/fd"),
            "{}",
            address.display()
        );
        let _listener = std::os::unix::net::UnixListener::bind(&address).unwrap();
        assert!(
            sandbox.file(MONITOR_SOCKET).exists(),
            "the socket is in the state directory"
        );
        let (again, _dir) = sandbox.monitor_socket().unwrap();
        std::os::unix::net::UnixStream::connect(again).unwrap();
    }

    fn record(dir: &SandboxDir) -> SandboxRecord {
        let digest = |bytes: &[u8]| kiln_image::Digest::sha256_of(bytes);
        SandboxRecord {
            id: dir.id().to_owned(),
            name: None,
            image: ImageRecord {
                reference: "oci:/images/demo:latest".into(),
                manifest_digest: digest(b"manifest"),
                index_digest: None,
                config_digest: digest(b"config"),
                platform: kiln_image::Platform::host(),
                size: 1,
                created: None,
                pulled_at: 1,
            },
            created_unix: 1,
            sandbox_uid: 10001,
            sandbox_gid: 10001,
            run: RunSpec {
                argv: vec!["true".into()],
                env: Vec::new(),
                cwd: None,
                identity: kiln_protocol::Identity {
                    run_as: kiln_protocol::RunAs::Uid,
                    uid: 10001,
                    gid: 10001,
                },
                tty: false,
                terminal: None,
                task: None,
                openshell: None,
            },
            cpus: 1,
            millicpus: None,
            memory_mib: 256,
            network: NetworkRecord::None,
            labels: BTreeMap::new(),
            accel: AccelRequest::Auto,
            volumes: Vec::new(),
            log_max_size: DEFAULT_LOG_MAX_SIZE,
            allow_user_namespaces: false,
            auto_remove: false,
            restart: RestartPolicy::No,
            guest: GuestSetup::default(),
            openshell: None,
        }
    }

    #[test]
    fn records_name_no_program_and_an_old_records_qemu_is_ignored() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        let record = record(&dir);
        dir.write_json(RECORD_FILE, &record).unwrap();
        let text = std::fs::read_to_string(dir.file(RECORD_FILE)).unwrap();
        assert!(!text.contains("qemu"), "{text}");

        // What older kilns wrote, or someone planted: an executable path is not kept.
        let mut old: serde_json::Value = serde_json::from_str(&text).unwrap();
        old["qemu"] = "/tmp/evil-vmm".into();
        dir.write_json(RECORD_FILE, &old).unwrap();
        let loaded: SandboxRecord = dir.read_json(RECORD_FILE).unwrap();
        assert_eq!(loaded, record);
    }

    #[test]
    fn state_others_could_write_is_refused_with_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), Some("named")).unwrap();
        dir.write_json(STATE_FILE, &StateRecord::created()).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.file(STATE_FILE)), 0o600);
        assert_eq!(mode(&root.path().join("sandboxes/.names/named")), 0o600);
        let chmod = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };

        chmod(&dir.file(STATE_FILE), 0o666);
        let err = dir.read_json::<StateRecord>(STATE_FILE).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.to_string().contains("mode 666"), "{err}");

        chmod(dir.path(), 0o777);
        let err = SandboxDir::open(root.path(), dir.id())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mode 777") && err.contains("chmod 700"),
            "{err}"
        );
        chmod(dir.path(), 0o700);

        chmod(&root.path().join("sandboxes"), 0o777);
        for err in [
            SandboxDir::open(root.path(), "named").unwrap_err(),
            SandboxDir::create(root.path(), None).unwrap_err(),
            SandboxDir::list(root.path()).unwrap_err(),
        ] {
            assert!(err.to_string().contains("sandboxes: its mode 777"), "{err}");
        }
    }

    #[test]
    fn logs_and_locks_are_never_opened_through_a_symlink() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        let victim = root.path().join("victim");
        for name in [STDOUT_LOG, MONITOR_LOCK] {
            std::os::unix::fs::symlink(&victim, dir.file(name)).unwrap();
        }
        assert!(dir.open_log(STDOUT_LOG).is_err());
        assert!(dir.lock_monitor().is_err());
        assert!(!dir.monitor_alive());
        assert!(!victim.exists());
    }

    #[test]
    #[ignore = "needs root (scripts/test runs it as root)"]
    fn a_state_directory_of_another_user_is_refused() {
        assert_eq!(kiln_hostfs::euid(), 0, "this test needs root (chown)");
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        dir.write_json(RECORD_FILE, &record(&dir)).unwrap();
        std::os::unix::fs::chown(dir.file(RECORD_FILE), Some(65534), None).unwrap();
        let err = dir.read_json::<SandboxRecord>(RECORD_FILE).unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let err = SandboxDir::open(root.path(), dir.id()).unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
    }

    #[test]
    fn run_dir_is_private_and_short() {
        let dir = run_dir().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(dir.path().join("channel.sock").as_os_str().len() < 100);
    }
}
