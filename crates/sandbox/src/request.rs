//! The one place that checks what a front end asks for. The CLI and the driver API hand
//! over the fields of a create, run or exec request as they have them (text, numbers,
//! unset values) and get back a request that holds only valid values, or an error that
//! names the bad field in the front end's own words (`--uid`, or `uid`).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use kiln_image::{ImageRef, PullOptions};
use kiln_protocol::TerminalSize;
use kiln_vm::accel::AccelRequest;

use crate::error::{Error, ErrorKind};
use crate::options::{
    check_tmpfs_mounts, parse_add_hosts, parse_dns, parse_env_assignment, parse_env_file,
    parse_hostname, parse_label, parse_memory_mib, parse_millicpus, parse_mount,
    parse_port_forward, parse_restart, parse_timeout, parse_tmpfs, parse_volumes, validate_name,
    Mount, RestartPolicy, Volume,
};
use crate::spec::Overrides;
use crate::state::GuestSetup;
use crate::state::NetworkRecord;
pub use crate::state::DEFAULT_LOG_MAX_SIZE;

/// Virtual CPUs a sandbox may have, and what it gets when the request says nothing.
pub const CPUS: RangeInclusive<u32> = 1..=64;
pub const DEFAULT_CPUS: u32 = 1;

/// Guest memory in MiB a sandbox may have, and what it gets when the request says nothing.
pub const MEMORY_MIB: RangeInclusive<u32> = 64..=1_048_576;
pub const DEFAULT_MEMORY_MIB: u32 = 512;

/// Bytes a sandbox's `stdout.log` or `stderr.log` may be given as its maximum size
/// (the default is [`DEFAULT_LOG_MAX_SIZE`]).
pub const LOG_MAX_SIZE: RangeInclusive<u64> = (4 << 10)..=(1 << 40);

/// Disk space the built root images under `<root>/rootfs` may take before the least
/// recently used ones that no sandbox pins are removed: room for the largest common
/// images (an NGC PyTorch image is about 20 GB) or for dozens of ordinary ones.
pub const DEFAULT_ROOTFS_CACHE_MAX: u64 = 20 << 30;

/// A field of a request, as errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Image,
    Name,
    User,
    Uid,
    Gid,
    Cpus,
    Memory,
    Env,
    EnvFile,
    Workdir,
    Publish,
    /// `--network-allow-host` values.
    AllowHost,
    /// The `--network-policy` file.
    NetworkPolicy,
    Volumes,
    Hostname,
    AddHost,
    Dns,
    Tmpfs,
    Mount,
    Timeout,
    LogMaxSize,
    Restart,
    Labels,
    /// An exec request's program and arguments.
    Command,
}

/// A policy file as a request carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyText {
    /// What errors call it (the path given).
    pub file: String,
    pub text: String,
}

/// The guest's network as a request chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// kiln's network endpoint: the internet, DNS, port forwards, and the host's own
    /// services only where opened (docs/network.md).
    #[default]
    User,
    None,
}

/// How a front end names the fields of a request (and the network choices) in errors.
pub trait FieldNames {
    /// The field's name, e.g. `--uid` or `uid`.
    fn field(&self, field: Field) -> &'static str;
    /// How the front end writes the choice of `mode`, e.g. `--network user` or
    /// `NETWORK_USER`.
    fn network(&self, mode: NetworkMode) -> &'static str;
}

/// An env file as the front end read it; `name` (its path) is used in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFile {
    pub name: String,
    pub contents: Vec<u8>,
}

/// The fields of a create request as a front end has them; `None` means the default.
#[derive(Default)]
pub struct CreateFields {
    /// The image reference (as for `kiln pull`).
    pub image: String,
    pub pull: PullOptions,
    pub name: Option<String>,
    /// Replaces the image's entrypoint and drops its Cmd; an empty string clears it.
    pub entrypoint: Option<String>,
    /// Replaces the image's Cmd when not empty.
    pub command: Vec<String>,
    /// Assignments read before `env`, in order.
    pub env_files: Vec<EnvFile>,
    /// `KEY=VALUE` assignments, in order; later ones win.
    pub env: Vec<String>,
    /// Whether a bare `KEY` takes its value from this process's environment (dropped when
    /// unset), as `docker run -e KEY` does; without it a bare `KEY` in `env` is refused.
    pub lend_environment: bool,
    /// An absolute directory, or empty for the workload's home; unset means the image's.
    pub workdir: Option<String>,
    /// `sandbox` or a numeric uid; the default is `sandbox`.
    pub user: Option<String>,
    /// Ids of the `sandbox` user written into the image; the default is 10001.
    pub uid: Option<String>,
    pub gid: Option<String>,
    /// The bounds `uid`, `gid` and a numeric `user` must lie in; the default is kiln's
    /// own ([`kiln_identity::IdBounds::KILN`]).
    pub id_bounds: Option<kiln_identity::IdBounds>,
    /// CPUs as docker's `--cpus` takes them (`0.5`, `2`): the VM gets the next whole
    /// number of vCPUs, the request keeps the exact share.
    pub cpus: Option<String>,
    /// Guest memory as docker's `--memory` takes it (`512m`, `1g`; a bare number is MiB).
    pub memory: Option<String>,
    pub network: NetworkMode,
    /// `[127.0.0.1:][HOSTPORT:]GUESTPORT[/tcp]` forwards; only with [`NetworkMode::User`].
    pub publish: Vec<String>,
    /// Host-local services opened to the guest, `host.kiln.internal:PORT` or `ADDR:PORT`;
    /// only with [`NetworkMode::User`].
    pub allow_host: Vec<String>,
    /// An OpenShell policy file's text and what to call it in errors (its path): the
    /// allow-list the sandbox's network decides by; only with [`NetworkMode::User`].
    pub network_policy: Option<PolicyText>,
    /// `KEY=VALUE` labels; a later one wins.
    pub labels: Vec<String>,
    /// `HOSTDIR:GUESTDIR[:ro]` shares.
    pub volumes: Vec<String>,
    /// The guest's hostname; the default is the sandbox id's first 12 characters.
    pub hostname: Option<String>,
    /// `NAME:IP` lines for the guest's /etc/hosts.
    pub add_hosts: Vec<String>,
    /// Nameservers for the guest's /etc/resolv.conf (instead of the network's).
    pub dns: Vec<String>,
    /// Make the root filesystem read-only (volumes and tmpfs mounts stay writable).
    pub read_only: bool,
    /// `PATH[:size=SIZE,mode=OCTAL]` tmpfs mounts.
    pub tmpfs: Vec<String>,
    /// docker's `--mount` specs: `type=bind` (a volume) or `type=tmpfs`.
    pub mounts: Vec<String>,
    pub accel: AccelRequest,
    /// A size as [`parse_size`] reads it, in [`LOG_MAX_SIZE`]; the default is
    /// [`DEFAULT_LOG_MAX_SIZE`].
    pub log_max_size: Option<String>,
    /// Bytes the built root images may take on disk; the default is
    /// [`DEFAULT_ROOTFS_CACHE_MAX`].
    pub rootfs_cache_max: Option<u64>,
    /// Let the workload create user namespaces in the guest. Off by default: inside one it
    /// holds every capability (`unshare -r`), which widens what it can reach of the kernel.
    pub allow_user_namespaces: bool,
    /// Remove the sandbox once its workload ran and the sandbox stopped (`run --rm -d`):
    /// its monitor does, so nobody has to wait for it.
    pub auto_remove: bool,
    /// `no`, `on-failure[:N]`, `always` or `unless-stopped`; the default is `no`.
    pub restart: Option<String>,
    /// Run OpenShell's supervisor as the sandbox's main program instead of the workload
    /// (kiln's OpenShell driver); it runs the workload itself.
    pub openshell: Option<OpenShellSupervisor>,
}

/// OpenShell's supervisor in the guest: the binary, its environment, the token and the
/// TLS material.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct OpenShellSupervisor {
    /// Host path of the static `openshell-sandbox` binary; it is put in the guest at
    /// /opt/openshell/bin/openshell-sandbox by a read-only layer cached by its digest.
    pub binary: PathBuf,
    /// Its exact environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The gateway's sandbox token: kept owner-only in the sandbox's state directory and
    /// written in the guest where only root can read it; never logged or shown.
    pub token: Option<String>,
    /// The TLS material for an `https` gateway: kept and written as the token is; its
    /// `Debug` shows none of it.
    pub tls: Option<kiln_protocol::OpenShellTls>,
}

impl std::fmt::Debug for OpenShellSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenShellSupervisor")
            .field("binary", &self.binary)
            .field("env", &self.env)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// A valid request to create a sandbox: only [`CreateFields::validate`] makes one.
pub struct CreateRequest {
    pub(crate) reference: ImageRef,
    pub(crate) pull: PullOptions,
    pub(crate) overrides: Overrides,
    /// Whom the workload runs as.
    pub(crate) run_as: kiln_identity::RunAs,
    /// Ids of the `sandbox` user written into the image.
    pub(crate) sandbox_uid: u32,
    pub(crate) sandbox_gid: u32,
    /// The bounds they were checked against, for the identity layer.
    pub(crate) id_bounds: kiln_identity::IdBounds,
    pub(crate) cpus: u32,
    /// The exact CPU share; `cpus` is it rounded up.
    pub(crate) millicpus: u32,
    pub(crate) memory_mib: u32,
    pub(crate) network: NetworkRecord,
    /// The validated policy file's text, written into the sandbox's directory.
    pub(crate) network_policy: Option<String>,
    /// What the policy has that kiln does not enforce, one line each.
    pub not_enforced: Vec<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) name: Option<String>,
    /// Host directories shared into the sandbox, at every start.
    pub(crate) volumes: Vec<Volume>,
    /// Names and mounts the guest sets up at boot.
    pub(crate) guest: GuestSetup,
    pub(crate) accel: AccelRequest,
    /// Bytes each output log reaches before it is rotated.
    pub(crate) log_max_size: u64,
    /// Bytes the image cache may take once this sandbox's images are in it.
    pub(crate) rootfs_cache_max: u64,
    pub(crate) allow_user_namespaces: bool,
    pub(crate) auto_remove: bool,
    pub(crate) restart: RestartPolicy,
    pub(crate) openshell: Option<OpenShellSupervisor>,
}

/// The fields of a foreground run (`kiln run`): a create request and how this run goes.
#[derive(Default)]
pub struct RunFields {
    pub sandbox: CreateFields,
    /// Whole seconds the workload may run.
    pub timeout: Option<String>,
    /// Throw the writable layer and the state directory away afterwards.
    pub remove: bool,
    /// A terminal of this size for the workload.
    pub terminal: Option<TerminalSize>,
    /// The QEMU binary this run boots with: kiln's own configuration, never recorded
    /// with the sandbox (a detached sandbox gets it from the command that starts it).
    pub qemu: PathBuf,
}

/// A valid foreground run: only [`RunFields::validate`] makes one.
pub struct RunRequest {
    pub(crate) sandbox: CreateRequest,
    pub(crate) timeout: Option<Duration>,
    pub(crate) remove: bool,
    pub(crate) terminal: Option<TerminalSize>,
    pub(crate) qemu: PathBuf,
}

impl RunRequest {
    /// What the network policy has that kiln does not enforce, one line each.
    pub fn not_enforced(&self) -> &[String] {
        &self.sandbox.not_enforced
    }
}

/// The fields of a command to run in a running sandbox, as a front end has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecFields {
    /// Program and arguments.
    pub command: Vec<String>,
    /// `KEY=VALUE` assignments added to (or replacing entries of) the main workload's
    /// environment.
    pub env: Vec<String>,
    /// As [`CreateFields::lend_environment`].
    pub lend_environment: bool,
    /// An absolute directory, or empty for the command's home; unset means the main
    /// workload's.
    pub workdir: Option<String>,
    pub terminal: Option<TerminalSize>,
}

/// A valid command for a running sandbox: only [`ExecFields::validate`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) workdir: Option<String>,
    pub(crate) terminal: Option<TerminalSize>,
}

/// A request field that is not valid; its message names the field as the front end does.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct InvalidField(String);

impl From<InvalidField> for Error {
    fn from(err: InvalidField) -> Self {
        Error::new(ErrorKind::InvalidInput, err)
    }
}

/// Names fields in messages.
struct Checker<'a> {
    names: &'a dyn FieldNames,
}

impl Checker<'_> {
    /// An error of a parser whose message already quotes the value.
    fn wrap(&self, field: Field, err: impl std::fmt::Display) -> InvalidField {
        InvalidField(format!("{}: {err}", self.names.field(field)))
    }

    fn invalid(
        &self,
        field: Field,
        value: impl std::fmt::Debug,
        expected: impl std::fmt::Display,
    ) -> InvalidField {
        InvalidField(format!(
            "{} {value:?}: expected {expected}",
            self.names.field(field)
        ))
    }

    fn in_range(
        &self,
        field: Field,
        value: Option<u32>,
        default: u32,
        range: RangeInclusive<u32>,
    ) -> Result<u32, InvalidField> {
        match value {
            None => Ok(default),
            Some(v) if range.contains(&v) => Ok(v),
            Some(v) => Err(self.invalid(field, v, format!("{} to {}", range.start(), range.end()))),
        }
    }

    fn sandbox_id(
        &self,
        field: Field,
        value: Option<&str>,
        default: u32,
        bounds: kiln_identity::IdBounds,
    ) -> Result<u32, InvalidField> {
        value.map_or(Ok(default), |text| {
            kiln_identity::parse_sandbox_id(text, bounds).map_err(|e| self.wrap(field, e))
        })
    }

    /// A workdir must be absolute, or empty (no directory: the spec falls back to HOME).
    fn workdir(&self, workdir: Option<String>) -> Result<Option<String>, InvalidField> {
        match workdir {
            Some(dir) if !dir.is_empty() && !dir.starts_with('/') => {
                Err(self.invalid(Field::Workdir, dir, "an absolute path"))
            }
            dir => Ok(dir),
        }
    }

    /// `KEY=VALUE` assignments; a bare `KEY` only when the environment is lent.
    fn env(&self, entries: &[String], lend: bool) -> Result<Vec<(String, String)>, InvalidField> {
        let mut env = Vec::new();
        for entry in entries {
            let lookup = |key: &str| lend.then(|| host_env(key)).flatten();
            let parsed =
                parse_env_assignment(entry, lookup).map_err(|e| self.wrap(Field::Env, e))?;
            if !lend && !entry.contains('=') {
                return Err(self.invalid(Field::Env, entry, "KEY=VALUE"));
            }
            env.extend(parsed);
        }
        Ok(env)
    }
}

/// A size in bytes as docker's `--log-opt max-size` takes it: a whole number, then
/// optionally a unit `k`, `m`, `g` or `t` for KiB, MiB, GiB or TiB (any case, with an
/// optional `b` or `ib` after it: `10m`, `512k`, `1GiB`, `4096`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError(text.to_owned());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1 << shift).ok_or_else(invalid)
}

/// A size that [`parse_size`] does not read.
#[derive(Debug, thiserror::Error)]
#[error("invalid size {0:?} (accepted: a whole number of bytes, optionally followed by k, m, g or t for KiB, MiB, GiB or TiB, as in 512k or 10m)")]
pub struct SizeError(String);

/// `bytes` in the largest unit [`parse_size`] reads that divides it, e.g. `10m`.
fn show_size(bytes: u64) -> String {
    let (unit, shift) = [("t", 40), ("g", 30), ("m", 20), ("k", 10)]
        .into_iter()
        .find(|&(_, shift)| bytes != 0 && bytes.is_multiple_of(1 << shift))
        .unwrap_or(("", 0));
    format!("{}{unit}", bytes >> shift)
}

/// Labels a sandbox may carry: they live in its record, which kiln reads back whole.
pub const MAX_LABELS: usize = 64;

/// A TCP port on host loopback that is free now, for a `-p GUESTPORT` without a host
/// port (docker picks one the same way; another process may take it before the boot).
fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// A bare `KEY`'s value from this process's environment.
fn host_env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

impl CreateFields {
    /// Checks every field and fills in the defaults.
    pub fn validate(self, names: &dyn FieldNames) -> Result<CreateRequest, Error> {
        Ok(self.check(&Checker { names })?)
    }

    fn check(self, check: &Checker) -> Result<CreateRequest, InvalidField> {
        let reference = ImageRef::parse(&self.image).map_err(|e| check.wrap(Field::Image, e))?;
        if let Some(name) = &self.name {
            validate_name(name).map_err(|e| check.wrap(Field::Name, e))?;
        }
        let user = self.user.as_deref().unwrap_or(kiln_identity::SANDBOX_USER);
        let id_bounds = self.id_bounds.unwrap_or(kiln_identity::IdBounds::KILN);
        let run_as = kiln_identity::RunAs::parse(user.as_bytes(), id_bounds)
            .map_err(|e| check.wrap(Field::User, e))?;
        let sandbox_uid = check.sandbox_id(
            Field::Uid,
            self.uid.as_deref(),
            kiln_identity::DEFAULT_SANDBOX_UID,
            id_bounds,
        )?;
        let sandbox_gid = check.sandbox_id(
            Field::Gid,
            self.gid.as_deref(),
            kiln_identity::DEFAULT_SANDBOX_GID,
            id_bounds,
        )?;
        let millicpus = match self.cpus.as_deref() {
            None => DEFAULT_CPUS * 1000,
            Some(text) => parse_millicpus(text).map_err(|e| check.wrap(Field::Cpus, e))?,
        };
        let cpus = check.in_range(Field::Cpus, Some(millicpus.div_ceil(1000)), 1, CPUS)?;
        let memory_mib = match self.memory.as_deref() {
            None => None,
            Some(text) => Some(
                parse_memory_mib(text)
                    .map_err(|e| check.wrap(Field::Memory, e))?
                    .try_into()
                    .unwrap_or(u32::MAX),
            ),
        };
        let memory_mib =
            check.in_range(Field::Memory, memory_mib, DEFAULT_MEMORY_MIB, MEMORY_MIB)?;
        if self.labels.len() > MAX_LABELS {
            return Err(check.invalid(
                Field::Labels,
                self.labels.len(),
                format!("at most {MAX_LABELS} labels"),
            ));
        }
        let labels = self
            .labels
            .iter()
            .map(|l| parse_label(l).map_err(|e| check.wrap(Field::Labels, e)))
            .collect::<Result<BTreeMap<_, _>, _>>()?;

        let mut env = Vec::new();
        for file in &self.env_files {
            let lookup = |key: &str| self.lend_environment.then(|| host_env(key)).flatten();
            env.extend(
                parse_env_file(&file.name, &file.contents, lookup)
                    .map_err(|e| check.wrap(Field::EnvFile, e))?,
            );
        }
        env.extend(check.env(&self.env, self.lend_environment)?);
        let working_dir = check.workdir(self.workdir)?;

        let mut forwards = Vec::new();
        for text in &self.publish {
            let spec = parse_port_forward(text).map_err(|e| check.wrap(Field::Publish, e))?;
            let host = match spec.host {
                Some(port) => port,
                None => free_loopback_port().map_err(|e| {
                    check.wrap(
                        Field::Publish,
                        format!("choosing a host port for {text:?}: {e}"),
                    )
                })?,
            };
            forwards.push((host, spec.guest));
        }
        let allow_host = self
            .allow_host
            .iter()
            .map(|value| {
                value
                    .parse::<kiln_policy::AllowHost>()
                    .map(|service| service.to_string())
                    .map_err(|e| check.wrap(Field::AllowHost, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let not_enforced = match &self.network_policy {
            Some(policy) => crate::network::check_policy(&policy.file, &policy.text)
                .map_err(|e| check.wrap(Field::NetworkPolicy, e))?,
            None => Vec::new(),
        };
        let network = match self.network {
            NetworkMode::User => NetworkRecord::User {
                forwards,
                allow_host,
            },
            NetworkMode::None
                if forwards.is_empty()
                    && allow_host.is_empty()
                    && self.network_policy.is_none() =>
            {
                NetworkRecord::None
            }
            NetworkMode::None => {
                let names = check.names;
                let field = if !forwards.is_empty() {
                    Field::Publish
                } else if !allow_host.is_empty() {
                    Field::AllowHost
                } else {
                    Field::NetworkPolicy
                };
                return Err(InvalidField(format!(
                    "{} needs {} (got {})",
                    names.field(field),
                    names.network(NetworkMode::User),
                    names.network(NetworkMode::None)
                )));
            }
        };
        let mut volumes =
            parse_volumes(&self.volumes).map_err(|e| check.wrap(Field::Volumes, e))?;
        let mut tmpfs = self
            .tmpfs
            .iter()
            .map(|t| parse_tmpfs(t).map_err(|e| check.wrap(Field::Tmpfs, e)))
            .collect::<Result<Vec<_>, _>>()?;
        for text in &self.mounts {
            match parse_mount(text).map_err(|e| check.wrap(Field::Mount, e))? {
                Mount::Bind(volume) => {
                    if volumes.iter().any(|v| v.guest == volume.guest) {
                        return Err(check.invalid(
                            Field::Mount,
                            text,
                            format!("a target no other volume has ({})", volume.guest),
                        ));
                    }
                    volumes.push(volume);
                }
                Mount::Tmpfs(mount) => tmpfs.push(mount),
            }
        }
        check_tmpfs_mounts(&tmpfs, &volumes).map_err(|e| check.wrap(Field::Tmpfs, e))?;
        let guest = GuestSetup {
            hostname: self
                .hostname
                .as_deref()
                .map(parse_hostname)
                .transpose()
                .map_err(|e| check.wrap(Field::Hostname, e))?,
            extra_hosts: parse_add_hosts(&self.add_hosts)
                .map_err(|e| check.wrap(Field::AddHost, e))?,
            dns: parse_dns(&self.dns).map_err(|e| check.wrap(Field::Dns, e))?,
            read_only: self.read_only,
            tmpfs,
        };
        let restart = match self.restart.as_deref() {
            None => RestartPolicy::No,
            Some(text) => parse_restart(text).map_err(|e| check.wrap(Field::Restart, e))?,
        };
        if self.auto_remove && restart != RestartPolicy::No {
            let accepted = "no with a sandbox removed when it stops (--rm): it would never restart";
            return Err(check.invalid(Field::Restart, self.restart.unwrap_or_default(), accepted));
        }
        let log_max_size = match self.log_max_size.as_deref() {
            None => DEFAULT_LOG_MAX_SIZE,
            Some(text) => {
                let size = parse_size(text).map_err(|e| check.wrap(Field::LogMaxSize, e))?;
                if !LOG_MAX_SIZE.contains(&size) {
                    let accepted = format!(
                        "a size from {} to {}",
                        show_size(*LOG_MAX_SIZE.start()),
                        show_size(*LOG_MAX_SIZE.end())
                    );
                    return Err(check.invalid(Field::LogMaxSize, text, accepted));
                }
                size
            }
        };
        Ok(CreateRequest {
            reference,
            pull: self.pull,
            overrides: Overrides {
                entrypoint: self.entrypoint,
                cmd: self.command,
                env,
                working_dir,
            },
            run_as,
            sandbox_uid,
            sandbox_gid,
            id_bounds,
            cpus,
            millicpus,
            memory_mib,
            network,
            network_policy: self.network_policy.map(|p| p.text),
            not_enforced,
            labels,
            name: self.name,
            volumes,
            guest,
            accel: self.accel,
            log_max_size,
            rootfs_cache_max: self.rootfs_cache_max.unwrap_or(DEFAULT_ROOTFS_CACHE_MAX),
            allow_user_namespaces: self.allow_user_namespaces,
            auto_remove: self.auto_remove,
            restart,
            openshell: self.openshell,
        })
    }
}

impl CreateRequest {
    /// The sandbox's name, if it gets one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

impl RunFields {
    /// Checks every field and fills in the defaults.
    pub fn validate(self, names: &dyn FieldNames) -> Result<RunRequest, Error> {
        let check = Checker { names };
        let restart = self.sandbox.restart.clone();
        let sandbox = self.sandbox.check(&check)?;
        if sandbox.restart != RestartPolicy::No {
            let accepted = "no: a foreground run is not restarted (start the sandbox detached)";
            return Err(check
                .invalid(Field::Restart, restart.unwrap_or_default(), accepted)
                .into());
        }
        let timeout = self
            .timeout
            .as_deref()
            .map(parse_timeout)
            .transpose()
            .map_err(|e| check.wrap(Field::Timeout, e))?;
        Ok(RunRequest {
            sandbox,
            timeout,
            remove: self.remove,
            terminal: self.terminal,
            qemu: self.qemu,
        })
    }
}

impl ExecFields {
    /// Checks every field.
    pub fn validate(self, names: &dyn FieldNames) -> Result<ExecRequest, Error> {
        let check = Checker { names };
        if self
            .command
            .first()
            .is_none_or(|program| program.is_empty())
        {
            return Err(check
                .invalid(Field::Command, &self.command, "a program and its arguments")
                .into());
        }
        Ok(ExecRequest {
            env: check.env(&self.env, self.lend_environment)?,
            workdir: check.workdir(self.workdir)?,
            argv: self.command,
            terminal: self.terminal,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names as an API spells them, with the network choices in capitals.
    struct Api;

    impl FieldNames for Api {
        fn field(&self, field: Field) -> &'static str {
            match field {
                Field::Image => "image",
                Field::Name => "name",
                Field::User => "user",
                Field::Uid => "uid",
                Field::Gid => "gid",
                Field::Cpus => "cpus",
                Field::Memory => "memory_mib",
                Field::Env => "env",
                Field::EnvFile => "env_file",
                Field::Workdir => "workdir",
                Field::Publish => "publish",
                Field::AllowHost => "network_allow_host",
                Field::NetworkPolicy => "network_policy",
                Field::Volumes => "volumes",
                Field::Hostname => "hostname",
                Field::AddHost => "add_host",
                Field::Dns => "dns",
                Field::Tmpfs => "tmpfs",
                Field::Mount => "mount",
                Field::Timeout => "timeout",
                Field::LogMaxSize => "log_max_size",
                Field::Restart => "restart",
                Field::Labels => "labels",
                Field::Command => "argv",
            }
        }

        fn network(&self, mode: NetworkMode) -> &'static str {
            match mode {
                NetworkMode::User => "NETWORK_USER",
                NetworkMode::None => "NETWORK_NONE",
            }
        }
    }

    fn fields() -> CreateFields {
        CreateFields {
            image: "docker.io/library/alpine:3".into(),
            ..CreateFields::default()
        }
    }

    fn refused(fields: CreateFields, naming: &str) {
        let err = fields.validate(&Api).err().expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains(naming), "{naming}: {err}");
    }

    #[test]
    fn unset_fields_get_the_defaults() {
        let request = fields().validate(&Api).unwrap();
        assert_eq!((request.cpus, request.memory_mib), (1, 512));
        assert_eq!((request.sandbox_uid, request.sandbox_gid), (10001, 10001));
        assert_eq!(request.run_as, kiln_identity::RunAs::Sandbox);
        assert_eq!(
            request.network,
            NetworkRecord::User {
                forwards: Vec::new(),
                allow_host: Vec::new()
            }
        );
        assert_eq!(request.name(), None);
        assert_eq!(request.overrides.working_dir, None);
        assert!(!request.allow_user_namespaces);
    }

    #[test]
    fn set_fields_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let request = CreateFields {
            name: Some("box".into()),
            user: Some("4242".into()),
            uid: Some("20000".into()),
            gid: Some("20001".into()),
            cpus: Some("0.5".into()),
            memory: Some("1g".into()),
            labels: vec!["team=a".into(), "flag".into()],
            env_files: vec![EnvFile {
                name: "f.env".into(),
                contents: b"A=file\nB=file\n".to_vec(),
            }],
            env: vec!["B=flag".into()],
            workdir: Some("/work".into()),
            publish: vec!["8080:80".into()],
            allow_host: vec!["HOST.Kiln.Internal:5432".into(), "198.18.0.9:80".into()],
            volumes: vec![format!("{}:/data:ro", dir.path().display())],
            allow_user_namespaces: true,
            ..fields()
        }
        .validate(&Api)
        .unwrap();
        assert_eq!(request.name(), Some("box"));
        assert_eq!(request.run_as, kiln_identity::RunAs::Id(4242));
        assert_eq!((request.sandbox_uid, request.sandbox_gid), (20000, 20001));
        assert_eq!(
            (request.cpus, request.millicpus, request.memory_mib),
            (1, 500, 1024)
        );
        let labels: Vec<_> = request.labels.iter().collect();
        assert_eq!(
            labels,
            [(&"flag".into(), &"".into()), (&"team".into(), &"a".into())]
        );
        let env = [("A", "file"), ("B", "file"), ("B", "flag")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(request.overrides.env, env);
        assert_eq!(request.overrides.working_dir.as_deref(), Some("/work"));
        // Host services are kept as the endpoint reads them back.
        assert_eq!(
            request.network,
            NetworkRecord::User {
                forwards: vec![(8080, 80)],
                allow_host: vec!["host.kiln.internal:5432".into(), "198.18.0.9:80".into()],
            }
        );
        assert_eq!(request.volumes[0].guest, "/data");
        assert!(request.allow_user_namespaces);
    }

    #[test]
    fn bad_fields_are_invalid_input_naming_them() {
        refused(
            CreateFields {
                image: "oci:".into(),
                ..fields()
            },
            "image: invalid image reference \"oci:\"",
        );
        refused(
            CreateFields {
                name: Some("a/b".into()),
                ..fields()
            },
            "name: invalid sandbox name \"a/b\"",
        );
        refused(
            CreateFields {
                user: Some("root".into()),
                ..fields()
            },
            "user: invalid run-as value \"root\"",
        );
        refused(
            CreateFields {
                uid: Some("999".into()),
                ..fields()
            },
            "uid: invalid id \"999\"",
        );
        refused(
            CreateFields {
                gid: Some("+1000".into()),
                ..fields()
            },
            "gid: invalid id \"+1000\"",
        );
        refused(
            CreateFields {
                cpus: Some("64.5".into()),
                ..fields()
            },
            "cpus: invalid CPU count \"64.5\": expected a number of CPUs from 0.001 to 64",
        );
        refused(
            CreateFields {
                memory: Some("63m".into()),
                ..fields()
            },
            "memory_mib 63: expected 64 to 1048576",
        );
        refused(
            CreateFields {
                memory: Some("1 g".into()),
                ..fields()
            },
            "memory_mib: invalid memory size \"1 g\": expected a whole number with a unit",
        );
        refused(
            CreateFields {
                labels: vec!["=v".into()],
                ..fields()
            },
            "labels: invalid label \"=v\"",
        );
        refused(
            CreateFields {
                env: vec!["=1".into()],
                ..fields()
            },
            "env: invalid environment assignment \"=1\"",
        );
        refused(
            CreateFields {
                env_files: vec![EnvFile {
                    name: "f.env".into(),
                    contents: b"=x\n".to_vec(),
                }],
                ..fields()
            },
            "env_file: f.env, line 1:",
        );
        refused(
            CreateFields {
                workdir: Some("rel".into()),
                ..fields()
            },
            "workdir \"rel\": expected an absolute path",
        );
        refused(
            CreateFields {
                publish: vec!["0:80".into()],
                ..fields()
            },
            "publish: invalid port forward \"0:80\"",
        );
        refused(
            CreateFields {
                publish: vec!["8080:80".into()],
                network: NetworkMode::None,
                ..fields()
            },
            "publish needs NETWORK_USER (got NETWORK_NONE)",
        );
        refused(
            CreateFields {
                allow_host: vec!["host.kiln.internal:5432".into()],
                network: NetworkMode::None,
                ..fields()
            },
            "network_allow_host needs NETWORK_USER (got NETWORK_NONE)",
        );
        refused(
            CreateFields {
                allow_host: vec!["db.example:5432".into()],
                ..fields()
            },
            "network_allow_host: invalid --network-allow-host",
        );
        refused(
            CreateFields {
                volumes: vec!["/no/such/dir:/data".into()],
                ..fields()
            },
            "volumes: invalid volume \"/no/such/dir:/data\"",
        );
    }

    #[test]
    fn sizes_are_read_as_docker_writes_them() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("10b", 10),
            ("512k", 512 << 10),
            ("10m", 10 << 20),
            ("10MB", 10 << 20),
            ("1GiB", 1 << 30),
            ("2t", 2 << 40),
        ] {
            assert_eq!(parse_size(text).unwrap(), bytes, "{text}");
        }
        for bad in [
            "",
            "m",
            "-1",
            "+5",
            "1.5m",
            "10 m",
            "10x",
            "10mbb",
            "99999999999t",
        ] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(
                err.contains(&format!("{bad:?}")) && err.contains("as in 512k or 10m"),
                "{err}"
            );
        }
        assert_eq!(show_size(10 << 20), "10m");
        assert_eq!(show_size(4097), "4097");
    }

    #[test]
    fn the_log_size_has_a_default_and_a_range() {
        let request = fields().validate(&Api).unwrap();
        assert_eq!(request.log_max_size, 10 << 20);
        assert_eq!(request.rootfs_cache_max, DEFAULT_ROOTFS_CACHE_MAX);
        let set = CreateFields {
            log_max_size: Some("512k".into()),
            rootfs_cache_max: Some(0),
            ..fields()
        }
        .validate(&Api)
        .unwrap();
        assert_eq!((set.log_max_size, set.rootfs_cache_max), (512 << 10, 0));
        refused(
            CreateFields {
                log_max_size: Some("1k".into()),
                ..fields()
            },
            "log_max_size \"1k\": expected a size from 4k to 1t",
        );
        refused(
            CreateFields {
                log_max_size: Some("ten".into()),
                ..fields()
            },
            "log_max_size: invalid size \"ten\"",
        );
    }

    #[test]
    fn a_bare_key_is_looked_up_only_when_the_environment_is_lent() {
        let lent = CreateFields {
            env: vec!["PATH".into(), "KILN_TEST_SURELY_UNSET".into()],
            lend_environment: true,
            ..fields()
        };
        let request = lent.validate(&Api).unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(request.overrides.env, [("PATH".to_owned(), path)]);
        refused(
            CreateFields {
                env: vec!["A=1".into(), "PATH".into()],
                ..fields()
            },
            "env \"PATH\": expected KEY=VALUE",
        );
    }

    #[test]
    fn run_requests_check_the_timeout() {
        let run = |timeout: &str| {
            RunFields {
                sandbox: fields(),
                timeout: Some(timeout.into()),
                ..RunFields::default()
            }
            .validate(&Api)
        };
        assert_eq!(run("30").unwrap().timeout, Some(Duration::from_secs(30)));
        let err = run("0").err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            err.to_string()
                .starts_with("timeout: invalid timeout \"0\""),
            "{err}"
        );
    }

    #[test]
    fn exec_requests() {
        let exec = ExecFields {
            command: vec!["sh".into()],
            env: vec!["A=1".into()],
            workdir: Some(String::new()),
            ..ExecFields::default()
        };
        let request = exec.clone().validate(&Api).unwrap();
        assert_eq!(request.env, [("A".to_owned(), "1".to_owned())]);
        assert_eq!(request.workdir.as_deref(), Some(""), "empty is not unset");
        for (bad, naming) in [
            (
                ExecFields {
                    command: Vec::new(),
                    ..exec.clone()
                },
                "argv []: expected a program",
            ),
            (
                ExecFields {
                    command: vec![String::new()],
                    ..exec.clone()
                },
                "argv [\"\"]",
            ),
            (
                ExecFields {
                    workdir: Some("tmp".into()),
                    ..exec.clone()
                },
                "workdir \"tmp\"",
            ),
            (
                ExecFields {
                    env: vec!["B".into()],
                    ..exec.clone()
                },
                "env \"B\": expected KEY=VALUE",
            ),
        ] {
            let err = bad.validate(&Api).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
            assert!(err.to_string().contains(naming), "{naming}: {err}");
        }
    }
}
