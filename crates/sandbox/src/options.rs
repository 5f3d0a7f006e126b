//! Parsing and validating the inputs of a run request.

mod guest_setup;
mod host_dir;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use guest_setup::{
    check_tmpfs_mounts, parse_add_hosts, parse_dns, parse_hostname, parse_mount, parse_tmpfs, Mount,
};
use host_dir::Symlinks;
pub use host_dir::{DirIdentity, HostDirError};

/// A bad value in a run request, naming the input and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("invalid environment assignment {0:?}: expected KEY=VALUE (or KEY to copy it from kiln's environment) with KEY non-empty and without '=' or NUL")]
    EnvAssignment(String),

    #[error("{file}, line {line}: {reason}")]
    EnvFile {
        file: String,
        line: usize,
        reason: String,
    },

    #[error("invalid port forward {value:?}: {reason}; expected [127.0.0.1:][HOSTPORT:]GUESTPORT[/tcp] with ports in 1-65535 (no HOSTPORT: a free one is chosen, `kiln port` shows it)")]
    PortForward { value: String, reason: &'static str },

    #[error("invalid sandbox name {0:?}: expected 1-128 characters of A-Z a-z 0-9 . _ -")]
    Name(String),

    #[error("invalid {what} {value:?}: expected {accepted}")]
    Value {
        what: &'static str,
        value: String,
        accepted: &'static str,
    },

    #[error("invalid volume {value:?}: {reason}; expected HOSTDIR:GUESTDIR[:ro] with HOSTDIR an existing directory that only root and kiln's user can replace (docs/volumes.md) and GUESTDIR an absolute path")]
    Volume { value: String, reason: String },

    #[error("invalid tmpfs {value:?}: {reason}; expected PATH[:size=SIZE,mode=OCTAL] with PATH absolute")]
    Tmpfs { value: String, reason: String },

    #[error("invalid mount {value:?}: {reason}; expected type=bind,source=HOSTDIR,target=PATH[,readonly] or type=tmpfs,target=PATH[,tmpfs-size=SIZE,tmpfs-mode=OCTAL]")]
    Mount { value: String, reason: String },
}

/// A host directory shared into the sandbox (`-v HOSTDIR:GUESTDIR[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Canonical absolute path of the host directory.
    pub host: PathBuf,
    /// Absolute, normalised path in the sandbox.
    pub guest: String,
    pub read_only: bool,
    /// The directory `host` named when the volume was given; `None` only in records of
    /// kilns that did not pin volumes, which [`Volume::reopen`] refuses.
    #[serde(default)]
    pub pinned: Option<DirIdentity>,
}

impl Volume {
    /// Opens the host directory again for a boot: the recorded path, walked as when the
    /// volume was given but following no symlink, must still be the pinned directory.
    /// The VMM is to be given the returned descriptor, not the path.
    pub fn reopen(&self) -> Result<OwnedFd, HostDirError> {
        let pinned = self.pinned.ok_or(HostDirError::Unpinned)?;
        let dir = host_dir::open(&self.host, Symlinks::Refuse)?;
        if dir.identity != pinned {
            return Err(HostDirError::Replaced {
                path: dir.path,
                pinned,
                found: dir.identity,
            });
        }
        Ok(dir.fd)
    }
}

/// Guest directories a volume may not cover: the root, and the kernel's filesystems that
/// init mounts and the sandbox needs.
const RESERVED_GUEST_PATHS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Parses `-v HOSTDIR:GUESTDIR[:ro]` (`:rw` is accepted as the default). HOSTDIR must be
/// an existing directory, given relative or absolute, that only root and kiln's user can
/// replace (the walk of the `host_dir` module); it is made canonical (symlinks resolved
/// now) and pinned by device and inode, so that a later boot refuses anything else in
/// its place; GUESTDIR must be absolute and
/// is normalised (`.` and empty components dropped, `..` refused), must not be `/` or
/// under /proc, /sys, /dev, and may not hold whitespace, commas, quotes or control
/// characters (it travels on the kernel command line).
pub fn parse_volume(text: &str) -> Result<Volume, OptionError> {
    let bad = |reason: String| OptionError::Volume {
        value: text.to_owned(),
        reason,
    };
    let mut fields: Vec<&str> = text.split(':').collect();
    let read_only = match fields.as_slice() {
        [_, _] => false,
        [_, _, "ro"] => true,
        [_, _, "rw"] => false,
        [_, _, mode] => return Err(bad(format!("unknown mode {mode:?} (accepted: ro, rw)"))),
        _ => {
            return Err(bad(
                "expected two or three fields separated by ':' (HOSTDIR may not hold ':')".into(),
            ))
        }
    };
    fields.truncate(2);
    let (host, guest) = (fields[0], fields[1]);
    if host.is_empty() {
        return Err(bad("the host directory is empty".into()));
    }
    let dir = host_dir::open(Path::new(host), Symlinks::Follow).map_err(|e| bad(e.to_string()))?;
    let host = dir.path;
    if host.to_str().is_none() {
        return Err(bad(format!(
            "host path {} is not valid UTF-8",
            host.display()
        )));
    }
    Ok(Volume {
        host,
        guest: normalise_guest_path(guest).map_err(bad)?,
        read_only,
        pinned: Some(dir.identity),
    })
}

fn normalise_guest_path(guest: &str) -> Result<String, String> {
    if !guest.starts_with('/') {
        return Err(format!("guest path {guest:?} is not absolute"));
    }
    if guest
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ',' | '"'))
    {
        return Err(format!(
            "guest path {guest:?} holds whitespace, a comma, a quote or a control character"
        ));
    }
    let mut normal = String::new();
    for component in guest.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if component == ".." {
            return Err(format!("guest path {guest:?} has a '..' component"));
        }
        normal.push('/');
        normal.push_str(component);
    }
    if normal.is_empty() {
        return Err("the guest path is the sandbox's root".into());
    }
    if RESERVED_GUEST_PATHS
        .iter()
        .any(|reserved| Path::new(&normal).starts_with(reserved))
    {
        return Err(format!("guest path {normal} is under /proc, /sys or /dev"));
    }
    Ok(normal)
}

/// Parses every `-v` and refuses two volumes at the same guest path.
pub fn parse_volumes(texts: &[String]) -> Result<Vec<Volume>, OptionError> {
    let mut volumes: Vec<Volume> = Vec::new();
    for text in texts {
        let volume = parse_volume(text)?;
        if volumes.iter().any(|v| v.guest == volume.guest) {
            return Err(OptionError::Volume {
                value: text.clone(),
                reason: format!("another volume is already mounted at {}", volume.guest),
            });
        }
        volumes.push(volume);
    }
    Ok(volumes)
}

/// Parses `KEY=VALUE`; a bare `KEY` takes its value from `lookup` (kiln's environment)
/// and is dropped when unset, as `docker run -e KEY` does.
pub fn parse_env_assignment(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<(String, String)>, OptionError> {
    let bad = || OptionError::EnvAssignment(text.to_owned());
    if text.contains('\0') {
        return Err(bad());
    }
    match text.split_once('=') {
        Some(("", _)) => Err(bad()),
        Some((key, value)) => Ok(Some((key.to_owned(), value.to_owned()))),
        None if text.is_empty() => Err(bad()),
        None => Ok(lookup(text).map(|value| (text.to_owned(), value))),
    }
}

/// Parses an env file: one assignment per line as for `-e`; blank lines and lines whose
/// first non-blank character is `#` are skipped. `name` is used in errors.
pub fn parse_env_file(
    name: &str,
    contents: &[u8],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, OptionError> {
    let text = std::str::from_utf8(contents).map_err(|err| OptionError::EnvFile {
        file: name.to_owned(),
        line: 1 + contents[..err.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        reason: "not valid UTF-8".into(),
    })?;
    let mut vars = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at_line = |reason: String| OptionError::EnvFile {
            file: name.to_owned(),
            line: index + 1,
            reason,
        };
        let key = line.split_once('=').map_or(line, |(key, _)| key);
        if key.contains(char::is_whitespace) {
            return Err(at_line(format!(
                "{line:?}: a variable name cannot contain white space; the format is one \
                 KEY=VALUE (or KEY) per line, without `export` or quotes, as docker's --env-file"
            )));
        }
        let parsed = parse_env_assignment(line, &lookup).map_err(|err| at_line(err.to_string()))?;
        vars.extend(parsed);
    }
    Ok(vars)
}

/// A `-p` forward as docker writes it: `[IP:][HOSTPORT:]GUESTPORT[/PROTO]`. Only TCP
/// from host loopback is forwarded (QEMU's user network, bound to 127.0.0.1), so another
/// address or `udp` is refused rather than silently changed. `host` is `None` when the
/// host port is left to kiln.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSpec {
    pub host: Option<u16>,
    pub guest: u16,
}

pub fn parse_port_forward(text: &str) -> Result<PublishSpec, OptionError> {
    let bad = |reason| OptionError::PortForward {
        value: text.to_owned(),
        reason,
    };
    let (ports, proto) = text.split_once('/').unwrap_or((text, "tcp"));
    match proto {
        "tcp" => {}
        "udp" | "sctp" => {
            return Err(bad(
                "only TCP is forwarded (kiln's user network has no UDP or SCTP forwards)",
            ))
        }
        _ => return Err(bad("the protocol must be tcp")),
    }
    let parts: Vec<&str> = ports.split(':').collect();
    let (address, host, guest) = match parts[..] {
        [guest] => (None, "", guest),
        [host, guest] => (None, host, guest),
        [address, host, guest] => (Some(address), host, guest),
        _ => return Err(bad("too many ':'")),
    };
    if let Some(address) = address {
        if address != "127.0.0.1" && address != "localhost" {
            return Err(bad(
                "kiln forwards only from host loopback, so the address must be 127.0.0.1",
            ));
        }
    }
    let port = |p: &str| {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.starts_with('0') {
            return None;
        }
        p.parse::<u16>().ok().filter(|&n| n != 0)
    };
    let host = match host {
        "" => None,
        host => Some(port(host).ok_or_else(|| bad("the host port is not a port number"))?),
    };
    let guest = port(guest).ok_or_else(|| bad("the guest port is not a port number"))?;
    Ok(PublishSpec { host, guest })
}

/// A `KEY=VALUE` label (a bare `KEY` has an empty value, as docker's `--label`): keys of
/// at most [`LABEL_KEY_MAX`] bytes, values of at most [`LABEL_VALUE_MAX`], neither with NUL.
pub fn parse_label(text: &str) -> Result<(String, String), OptionError> {
    let (key, value) = text.split_once('=').unwrap_or((text, ""));
    let ok = !key.is_empty()
        && key.len() <= LABEL_KEY_MAX
        && value.len() <= LABEL_VALUE_MAX
        && !text.contains('\0');
    if !ok {
        return Err(OptionError::Value {
            what: "label",
            value: text.to_owned(),
            accepted: "KEY=VALUE (or KEY) with KEY of 1-256 bytes, VALUE of at most 4096, no NUL",
        });
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Bounds of a label: they are stored in the sandbox record, which kiln reads back.
pub const LABEL_KEY_MAX: usize = 256;
pub const LABEL_VALUE_MAX: usize = 4096;

/// `--cpus`: a decimal number of CPUs with at most three decimals (`0.5`, `2`), as
/// thousandths of a CPU.
pub fn parse_millicpus(text: &str) -> Result<u32, OptionError> {
    let bad = || OptionError::Value {
        what: "CPU count",
        value: text.to_owned(),
        accepted: "a number of CPUs from 0.001 to 64 with at most three decimals, as 0.5 or 2",
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.len() > 3 || fraction.len() > 3 || !digits(whole) || !digits(fraction) {
        return Err(bad());
    }
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad());
    }
    let whole: u32 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let fraction: u32 = format!("{fraction:0<3}").parse().map_err(|_| bad())?;
    let millicpus = whole * 1000 + fraction;
    if !(1..=64_000).contains(&millicpus) {
        return Err(bad());
    }
    Ok(millicpus)
}

/// `--memory`/`-m` as docker takes it: a whole number with a unit `b`, `k`, `m` or `g`
/// (any case, `kb`/`mb`/`gb` too); a bare number is MiB, kiln's unit before it took
/// docker's. Returns whole MiB (a size that is not whole MiB is refused).
pub fn parse_memory_mib(text: &str) -> Result<u64, OptionError> {
    let bad = || {
        OptionError::Value {
        what: "memory size",
        value: text.to_owned(),
        accepted: "a whole number with a unit b, k, m or g (as 512m or 1g; a bare number is MiB) that is a whole number of MiB",
    }
    };
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let bytes = match unit.to_ascii_lowercase().as_str() {
        "b" => Some(number),
        "k" | "kb" => number.checked_mul(1 << 10),
        "" | "m" | "mb" => number.checked_mul(1 << 20),
        "g" | "gb" => number.checked_mul(1 << 30),
        _ => None,
    }
    .ok_or_else(bad)?;
    if !bytes.is_multiple_of(1 << 20) {
        return Err(bad());
    }
    Ok(bytes >> 20)
}

/// Sandbox ids and names: `[A-Za-z0-9._-]{1,128}`, and never `.` or `..`, which would
/// name a directory other than the sandbox's own.
pub fn validate_name(name: &str) -> Result<(), OptionError> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(OptionError::Name(name.to_owned()))
    }
}

/// `--timeout SECONDS`: a positive whole number of seconds.
pub fn parse_timeout(text: &str) -> Result<Duration, OptionError> {
    let bad = || OptionError::Value {
        what: "timeout",
        value: text.to_owned(),
        accepted: "a whole number of seconds from 1 to 31536000",
    };
    let secs: u64 = text.parse().map_err(|_| bad())?;
    if !(1..=31_536_000).contains(&secs) || text.starts_with('+') {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

/// Whether a detached sandbox's monitor boots it again (on its writable disk) after its
/// workload ended (`--restart`). `kiln stop` ends every policy; with no daemon to
/// restart, `always` and `unless-stopped` mean the same here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    No,
    /// After a non-zero exit or a failed boot, at most `max_retries` times when given.
    OnFailure {
        max_retries: Option<u32>,
    },
    Always,
    UnlessStopped,
}

impl RestartPolicy {
    /// Whether a sandbox that ended with `exit_code` (`None`: the boot failed) after
    /// `restarts` restarts is booted again.
    pub fn restarts(self, exit_code: Option<i32>, restarts: u32) -> bool {
        match self {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure { max_retries } => {
                exit_code != Some(0) && max_retries.is_none_or(|max| restarts < max)
            }
            RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
        }
    }
}

/// `--restart`: no, on-failure[:N], always or unless-stopped, as docker takes it.
pub fn parse_restart(text: &str) -> Result<RestartPolicy, OptionError> {
    let bad = || OptionError::Value {
        what: "restart policy",
        value: text.to_owned(),
        accepted: "no, on-failure[:N] (N from 1 to 1000000), always or unless-stopped",
    };
    match text.split_once(':') {
        None => match text {
            "no" => Ok(RestartPolicy::No),
            "on-failure" => Ok(RestartPolicy::OnFailure { max_retries: None }),
            "always" => Ok(RestartPolicy::Always),
            "unless-stopped" => Ok(RestartPolicy::UnlessStopped),
            _ => Err(bad()),
        },
        Some(("on-failure", count)) => match count.parse::<u32>() {
            Ok(max @ 1..=1_000_000) if !count.starts_with('+') => Ok(RestartPolicy::OnFailure {
                max_retries: Some(max),
            }),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// The signals `kill -s` takes by name, as the guest (Linux, the host's architecture)
/// numbers them.
const SIGNAL_NAMES: [(&str, libc::c_int); 31] = [
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("ILL", libc::SIGILL),
    ("TRAP", libc::SIGTRAP),
    ("ABRT", libc::SIGABRT),
    ("BUS", libc::SIGBUS),
    ("FPE", libc::SIGFPE),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("SEGV", libc::SIGSEGV),
    ("USR2", libc::SIGUSR2),
    ("PIPE", libc::SIGPIPE),
    ("ALRM", libc::SIGALRM),
    ("TERM", libc::SIGTERM),
    ("STKFLT", libc::SIGSTKFLT),
    ("CHLD", libc::SIGCHLD),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("TSTP", libc::SIGTSTP),
    ("TTIN", libc::SIGTTIN),
    ("TTOU", libc::SIGTTOU),
    ("URG", libc::SIGURG),
    ("XCPU", libc::SIGXCPU),
    ("XFSZ", libc::SIGXFSZ),
    ("VTALRM", libc::SIGVTALRM),
    ("PROF", libc::SIGPROF),
    ("WINCH", libc::SIGWINCH),
    ("IO", libc::SIGIO),
    ("PWR", libc::SIGPWR),
    ("SYS", libc::SIGSYS),
];

/// A signal as `kill -s` and `docker kill -s` take it: a name with or without `SIG`, in
/// any case (KILL, sigterm), or a number from 1 to [`kiln_protocol::MAX_SIGNAL`].
pub fn parse_signal(text: &str) -> Result<i32, OptionError> {
    let bad = || OptionError::Value {
        what: "signal",
        value: text.to_owned(),
        accepted: "a signal name (KILL, SIGTERM, usr1 ...) or a number from 1 to 64",
    };
    if let Ok(number) = text.parse::<i32>() {
        return (1..=kiln_protocol::MAX_SIGNAL)
            .contains(&number)
            .then_some(number)
            .ok_or_else(bad);
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    SIGNAL_NAMES
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, number)| *number)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn restart_policies() {
        assert_eq!(parse_restart("no"), Ok(RestartPolicy::No));
        assert_eq!(parse_restart("always"), Ok(RestartPolicy::Always));
        assert_eq!(
            parse_restart("unless-stopped"),
            Ok(RestartPolicy::UnlessStopped)
        );
        let on_failure = |max_retries| RestartPolicy::OnFailure { max_retries };
        assert_eq!(parse_restart("on-failure"), Ok(on_failure(None)));
        assert_eq!(parse_restart("on-failure:3"), Ok(on_failure(Some(3))));
        for bad in [
            "",
            "never",
            "on-failure:0",
            "on-failure:x",
            "always:2",
            "on-failure:+1",
        ] {
            let err = parse_restart(bad).unwrap_err().to_string();
            assert!(err.contains("unless-stopped"), "{bad}: {err}");
        }
        assert!(!RestartPolicy::No.restarts(Some(1), 0));
        assert!(RestartPolicy::Always.restarts(Some(0), 50));
        assert!(!on_failure(None).restarts(Some(0), 0));
        assert!(on_failure(None).restarts(None, 9));
        assert!(on_failure(Some(2)).restarts(Some(3), 1));
        assert!(!on_failure(Some(2)).restarts(Some(3), 2));
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("KILL"), Ok(libc::SIGKILL));
        assert_eq!(parse_signal("sigterm"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("Usr1"), Ok(libc::SIGUSR1));
        assert_eq!(parse_signal("2"), Ok(libc::SIGINT));
        assert_eq!(parse_signal("64"), Ok(64));
        for bad in ["0", "65", "-9", "SIGNOPE", "", "SIG"] {
            let err = parse_signal(bad).unwrap_err().to_string();
            assert!(err.contains("signal name"), "{bad}: {err}");
        }
    }

    #[test]
    fn env_assignments() {
        assert_eq!(
            parse_env_assignment("A=b=c", no_env).unwrap(),
            Some(("A".into(), "b=c".into()))
        );
        assert_eq!(
            parse_env_assignment("A=", no_env).unwrap(),
            Some(("A".into(), "".into()))
        );
        assert_eq!(
            parse_env_assignment("HOME", |_| Some("/h".into())).unwrap(),
            Some(("HOME".into(), "/h".into()))
        );
        assert_eq!(parse_env_assignment("UNSET", no_env).unwrap(), None);
        for bad in ["", "=x", "A\0=b"] {
            let err = parse_env_assignment(bad, no_env).unwrap_err();
            assert!(err.to_string().contains("KEY=VALUE"), "{err}");
        }
    }

    #[test]
    fn env_file_skips_comments_and_names_bad_lines() {
        let vars = parse_env_file("f.env", b"# c\n\nA=1\n  B=2\r\nC\n", |k| {
            (k == "C").then(|| "3".into())
        })
        .unwrap();
        assert_eq!(
            vars,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "2".into()),
                ("C".into(), "3".into())
            ]
        );
        let err = parse_env_file("f.env", b"A=1\nexport D=4\n", no_env).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("f.env, line 2: \"export D=4\": a variable name cannot"),
            "{err}"
        );
        let err = parse_env_file("f.env", b"A=1\n=oops\n", no_env).unwrap_err();
        assert!(err.to_string().starts_with("f.env, line 2:"), "{err}");
        let err = parse_env_file("f.env", b"A=1\nB=\xff\n", no_env).unwrap_err();
        assert!(
            err.to_string().contains("line 2") && err.to_string().contains("UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn port_forwards_take_dockers_forms() {
        let spec = |host, guest| PublishSpec { host, guest };
        for (text, want) in [
            ("8080:80", spec(Some(8080), 80)),
            ("127.0.0.1:8080:80", spec(Some(8080), 80)),
            ("8080:80/tcp", spec(Some(8080), 80)),
            ("8080", spec(None, 8080)),
            ("127.0.0.1::80", spec(None, 80)),
        ] {
            assert_eq!(parse_port_forward(text).unwrap(), want, "{text}");
        }
        for bad in [
            "80:", "0:80", "80:0", "65536:1", "a:1", "08:1", "1:2:3:4", "-1:2", "+1:2",
        ] {
            let err = parse_port_forward(bad).unwrap_err();
            assert!(err.to_string().contains("GUESTPORT"), "{bad}: {err}");
        }
        let err = parse_port_forward("53:53/udp").unwrap_err().to_string();
        assert!(err.contains("only TCP is forwarded"), "{err}");
        let err = parse_port_forward("0.0.0.0:80:80").unwrap_err().to_string();
        assert!(err.contains("must be 127.0.0.1"), "{err}");
    }

    #[test]
    fn cpus_take_fractions_as_millicpus() {
        for (text, want) in [
            ("0.5", 500),
            ("2", 2000),
            (".25", 250),
            ("1.125", 1125),
            ("64", 64_000),
        ] {
            assert_eq!(parse_millicpus(text).unwrap(), want, "{text}");
        }
        for bad in ["", ".", "0", "0.0001", "65", "-1", "1e3", "abc", "1,5"] {
            let err = parse_millicpus(bad).unwrap_err().to_string();
            assert!(err.contains("at most three decimals"), "{bad}: {err}");
        }
    }

    #[test]
    fn memory_takes_dockers_suffixes() {
        for (text, want) in [
            ("1g", 1024),
            ("512m", 512),
            ("512", 512),
            ("1GB", 1024),
            ("2097152k", 2048),
            ("1048576b", 1),
        ] {
            assert_eq!(parse_memory_mib(text).unwrap(), want, "{text}");
        }
        for bad in ["", "1.5g", "1t", "100k", "g", "-1g", "1 g"] {
            let err = parse_memory_mib(bad).unwrap_err().to_string();
            assert!(err.contains("unit b, k, m or g"), "{bad}: {err}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_label("flag").unwrap(), ("flag".into(), String::new()));
        for bad in ["", "=v", "k=\0", &"k".repeat(257)] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        for good in ["a", "my-box_1.2", &"x".repeat(128)] {
            validate_name(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("30").unwrap(), Duration::from_secs(30));
        for bad in ["0", "-1", "+5", "1.5", "", "31536001"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn volumes() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().canonicalize().unwrap();
        std::fs::write(host.join("file"), "").unwrap();
        std::os::unix::fs::symlink(&host, host.join("link")).unwrap();
        let h = host.display();
        let meta = std::fs::metadata(&host).unwrap();
        let pinned = Some(DirIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        });
        assert_eq!(
            parse_volume(&format!("{h}:/data")).unwrap(),
            Volume {
                host: host.clone(),
                guest: "/data".into(),
                read_only: false,
                pinned,
            }
        );
        let volume = parse_volume(&format!("{h}/link/.:/srv//in/./x/:ro")).unwrap();
        assert_eq!(
            volume,
            Volume {
                host: host.clone(),
                guest: "/srv/in/x".into(),
                read_only: true,
                pinned,
            }
        );
        assert!(!parse_volume(&format!("{h}:/data:rw")).unwrap().read_only);

        for (bad, names) in [
            (format!("{h}/missing:/data"), format!("{h}/missing")),
            (format!("{h}/file:/data"), format!("{h}/file")),
            (format!("{h}:data"), "\"data\"".to_owned()),
            (format!("{h}:/"), "root".to_owned()),
            (format!("{h}:/a/../b"), "'..'".to_owned()),
            (format!("{h}:/proc/x"), "/proc".to_owned()),
            (format!("{h}:/dev"), "/dev".to_owned()),
            (format!("{h}:/a,b"), "comma".to_owned()),
            (format!("{h}:/a b"), "whitespace".to_owned()),
            (format!("{h}:/a:rx"), "\"rx\"".to_owned()),
            (format!("{h}"), "two or three fields".to_owned()),
            (format!("{h}:/a:ro:x"), "two or three fields".to_owned()),
            (":/a".to_owned(), "empty".to_owned()),
        ] {
            let err = parse_volume(&bad).unwrap_err().to_string();
            assert!(err.contains(&names), "{bad}: {err}");
            assert!(err.contains("HOSTDIR:GUESTDIR[:ro]"), "{bad}: {err}");
        }
        let twice = [format!("{h}:/a"), format!("{h}/link:/a/")];
        assert!(parse_volumes(&twice)
            .unwrap_err()
            .to_string()
            .contains("already mounted at /a"));
    }

    #[test]
    fn a_volume_reopens_only_as_the_directory_it_was_given_as() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let volume = parse_volume(&format!("{}:/data", work.display())).unwrap();
        let fd = volume.reopen().unwrap();
        let opened = std::fs::File::from(fd).metadata().unwrap();
        assert_eq!(opened.ino(), std::fs::metadata(&work).unwrap().ino());

        // Another directory in its place: a different inode.
        std::fs::rename(&work, dir.path().join("moved")).unwrap();
        std::fs::create_dir(&work).unwrap();
        let err = volume.reopen().unwrap_err().to_string();
        assert!(
            err.contains("/work is no longer the directory the sandbox was created with"),
            "{err}"
        );
        // A symlink to the very directory it was: still refused, nothing is followed.
        std::fs::remove_dir(&work).unwrap();
        std::os::unix::fs::symlink(dir.path().join("moved"), &work).unwrap();
        let err = volume.reopen().unwrap_err().to_string();
        assert!(err.contains("/work is now a symbolic link"), "{err}");
        std::fs::remove_file(&work).unwrap();
        let err = volume.reopen().unwrap_err().to_string();
        assert!(err.contains("/work: No such file or directory"), "{err}");
    }

    #[test]
    fn a_volume_recorded_without_its_identity_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let record = format!(
            r#"{{"host":"{}","guest":"/data","read_only":false}}"#,
            dir.path().display()
        );
        let volume: Volume = serde_json::from_str(&record).unwrap();
        assert_eq!(volume.pinned, None);
        let err = volume.reopen().unwrap_err().to_string();
        assert!(err.contains("did not record which directory"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_valid_assignment_round_trips(key in "[A-Za-z_][A-Za-z0-9_]{0,20}", value in "[^\u{0}]{0,40}") {
            let parsed = parse_env_assignment(&format!("{key}={value}"), no_env).unwrap();
            proptest::prop_assert_eq!(parsed, Some((key, value)));
        }
    }
}
