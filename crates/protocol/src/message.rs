//! The messages frames carry, as typed values.

use serde::{Deserialize, Serialize};

use crate::{ProtocolError, HEADER_LEN};

/// Which session a frame belongs to.
pub type SessionId = u32;

/// Session of the stream itself: hello, boot errors, boot-phase times.
pub const CONTROL_SESSION: SessionId = 0;
/// Session of the sandbox's main workload.
pub const MAIN_SESSION: SessionId = 1;

/// Oldest message-set version this build speaks. Version 2 added per-session flow control
/// ([`Message::Credit`]), which both sides must obey, so version 1 is no longer spoken.
pub const MESSAGE_VERSION_MIN: u16 = 2;
/// Newest message-set version this build speaks.
pub const MESSAGE_VERSION_MAX: u16 = 2;

/// How much of one session's output the guest may send before the host returns credit:
/// data frames count their header and payload ([`Frame::window_charge`]). The host holds
/// at most this much per session, however slowly the output's reader takes it.
pub const SESSION_WINDOW: u32 = 1 << 20;

/// The highest Linux signal number (SIGRTMAX); signals are 1 to this.
pub const MAX_SIGNAL: i32 = 64;

/// One decoded frame: the session it belongs to and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub session: SessionId,
    pub message: Message,
}

impl Frame {
    pub fn new(session: SessionId, message: Message) -> Self {
        Self { session, message }
    }

    /// What this frame takes from its session's window: a data frame's size on the wire
    /// (header and payload), nothing for any other frame.
    pub fn window_charge(&self) -> u32 {
        match &self.message {
            Message::Data { bytes, .. } => {
                u32::try_from(HEADER_LEN + bytes.len()).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }
}

/// Everything the host and the guest say to each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First frame each side sends, on the control session.
    Hello(Hello),
    /// Host to guest: start a workload in this session.
    Run(RunSpec),
    /// Bytes of one of the workload's streams (stdin from the host, stdout/stderr from
    /// the guest); never empty on the wire.
    Data { stream: Stream, bytes: Vec<u8> },
    /// The stream is closed: no more `Data` for it in this session.
    Eof { stream: Stream },
    /// Host to guest: the terminal of a tty session changed size.
    Resize(TerminalSize),
    /// Host to guest: deliver a signal to the session's workload.
    Signal(SignalRequest),
    /// Guest to host: how the session's workload ended. Last frame of a session.
    Result(WorkloadResult),
    /// Guest to host: boot failed before the workload started.
    BootError(BootError),
    /// Guest to host: the guest reached a boot phase.
    Phase(PhaseTime),
    /// Host to guest, control session: stop the sandbox. The guest sends SIGTERM to every
    /// session's workload, SIGKILLs what is left after the grace period, reports the main
    /// session's result, syncs and powers off.
    Shutdown(ShutdownRequest),
    /// Host to guest: the host delivered this much of the session's output, which the
    /// guest may now send again (see [`SESSION_WINDOW`]).
    Credit(OutputCredit),
    /// Host to guest, control session, right after the host's hello: the host's wall
    /// clock, which the guest sets as its own before it boots further (the RTC it read at
    /// boot has whole seconds only).
    Clock(WallClock),
}

/// One of the three standard streams of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

/// Version announcement; both sides pick the same version with [`negotiate`]. Unlike
/// every other message it accepts unknown fields, so that a newer peer's hello can
/// always be read far enough to negotiate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest message-set version the sender speaks.
    pub min_version: u16,
    /// Newest message-set version the sender speaks.
    pub max_version: u16,
    /// Who is speaking, for logs (e.g. "kiln-init 0.1.0").
    pub software: String,
}

impl Hello {
    /// This build's hello.
    pub fn ours(software: impl Into<String>) -> Self {
        Self {
            min_version: MESSAGE_VERSION_MIN,
            max_version: MESSAGE_VERSION_MAX,
            software: software.into(),
        }
    }
}

/// The message-set version both sides speak: the newest one in both ranges.
pub fn negotiate(ours: &Hello, theirs: &Hello) -> Result<u16, ProtocolError> {
    let low = ours.min_version.max(theirs.min_version);
    let high = ours.max_version.min(theirs.max_version);
    if low > high || theirs.min_version > theirs.max_version {
        return Err(ProtocolError::NoCommonVersion {
            ours: (ours.min_version, ours.max_version),
            theirs: (theirs.min_version, theirs.max_version),
            peer: theirs.software.clone(),
        });
    }
    Ok(high)
}

/// The PATH a workload gets when neither its image nor the user sets one (Docker's
/// default). The host fills it into the run spec, the guest's supervisor into an
/// environment without PATH, and `kiln check` searches the image's commands in it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run and how: the image config with the user's overrides already applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Program and arguments (Entrypoint + Cmd); must not be empty.
    pub argv: Vec<String>,
    /// Environment as `KEY=VALUE` entries, in order; later entries win.
    pub env: Vec<String>,
    /// Working directory; `None` means the user's home.
    pub cwd: Option<String>,
    pub identity: Identity,
    /// Run the workload on a pseudo-terminal (stdout and stderr then arrive as stdout).
    pub tty: bool,
    /// Initial terminal size of a tty session.
    pub terminal: Option<TerminalSize>,
    /// Work of kiln-init's own to run in this session instead of `argv` (exec sessions
    /// only; `argv` then only names it). Absent on the wire when `None`, so a run spec
    /// without a task reads as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<GuestTask>,
    /// The main session only: `argv` is OpenShell's supervisor, which kiln-init starts as
    /// root with exactly `env` (it drops to the sandbox user itself) once `identity` is
    /// validated and /sandbox prepared. Absent on the wire when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openshell: Option<OpenShellLaunch>,
}

/// Where OpenShell's supervisor sits in the guest (the supervisor layer puts it there).
pub const OPENSHELL_SUPERVISOR_PATH: &str = "/opt/openshell/bin/openshell-sandbox";
/// The directory kiln-init mounts a tmpfs on for the sandbox token (root, 0700).
pub const OPENSHELL_AUTH_DIR: &str = "/opt/openshell/auth";
/// The sandbox token's file in the guest (root, 0400).
pub const OPENSHELL_TOKEN_PATH: &str = "/opt/openshell/auth/sandbox.jwt";
/// The longest sandbox token the host sends and the guest writes.
pub const MAX_OPENSHELL_TOKEN_LEN: usize = 64 * 1024;
/// The directory kiln-init mounts a tmpfs on for the gateway's TLS material (root, 0700).
pub const OPENSHELL_TLS_DIR: &str = "/opt/openshell/tls";
/// The gateway's CA certificate in the guest (root, 0444).
pub const OPENSHELL_TLS_CA_PATH: &str = "/opt/openshell/tls/ca.crt";
/// The supervisor's client certificate in the guest (root, 0444).
pub const OPENSHELL_TLS_CERT_PATH: &str = "/opt/openshell/tls/tls.crt";
/// The supervisor's client key in the guest (root, 0400).
pub const OPENSHELL_TLS_KEY_PATH: &str = "/opt/openshell/tls/tls.key";
/// The longest of each TLS file (PEM text) the host sends and the guest writes.
pub const MAX_OPENSHELL_TLS_FILE_LEN: usize = 64 * 1024;

/// What kiln-init does for OpenShell's supervisor besides starting it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenShellLaunch {
    /// The gateway's sandbox token, written to [`OPENSHELL_TOKEN_PATH`] on a tmpfs only
    /// root can read. A secret: its `Debug` shows only whether there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The TLS material the supervisor dials an `https` gateway with, written under
    /// [`OPENSHELL_TLS_DIR`] on a tmpfs only root can read. Absent on the wire when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OpenShellTls>,
}

impl std::fmt::Debug for OpenShellLaunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = self.token.as_ref().map(|_| "<redacted>");
        f.debug_struct("OpenShellLaunch")
            .field("token", &token)
            .field("tls", &self.tls)
            .finish()
    }
}

/// The gateway's CA certificate and the supervisor's client certificate and key, PEM text
/// of at most [`MAX_OPENSHELL_TLS_FILE_LEN`] bytes each. The key is a secret: `Debug`
/// shows none of the three.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenShellTls {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for OpenShellTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenShellTls(<redacted>)")
    }
}

/// Work kiln-init does itself in an exec session: it runs its own binary with the
/// session's identity (the sandbox user, never root), so a task reaches exactly what the
/// workload's user can. Output goes to the session's stdout, input comes from its stdin,
/// and the session ends with a result as any exec does (exit 0 on success; a failure's
/// reason on stderr, exit 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestTask {
    /// `kiln top`: one JSON [`ProcessInfo`] per line for each process of the guest.
    Processes,
    /// `kiln stats`: `samples` JSON [`GuestStats`] lines, `interval_ms` apart
    /// ([`STATS_SAMPLES`], [`STATS_INTERVAL_MS`]).
    Stats { samples: u32, interval_ms: u32 },
    /// `kiln cp ID:PATH ...`: the file or directory at PATH (absolute) as a tar archive
    /// whose entries are under PATH's last component; symlinks are archived as symlinks.
    ArchiveOut { path: String },
    /// `kiln cp ... ID:PATH`: a tar archive from stdin, holding one top entry, becomes
    /// PATH (absolute) when PATH does not exist, else goes into the directory PATH.
    ArchiveIn { path: String },
}

/// The number of samples a [`GuestTask::Stats`] may ask for.
pub const STATS_SAMPLES: std::ops::RangeInclusive<u32> = 1..=1_000_000;
/// Milliseconds between two samples of a [`GuestTask::Stats`].
pub const STATS_INTERVAL_MS: std::ops::RangeInclusive<u32> = 100..=60_000;

/// One process of the guest, as [`GuestTask::Processes`] reports it (from /proc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    /// Real uid.
    pub uid: u32,
    /// The state letter of /proc/PID/stat (R, S, D, Z, ...).
    pub state: String,
    /// Resident memory in KiB.
    pub rss_kib: u64,
    /// User and system CPU time in milliseconds.
    pub cpu_ms: u64,
    /// When it started, in milliseconds since the guest booted.
    pub started_ms: u64,
    /// Its command line (arguments joined by spaces), or `[name]` for a kernel thread;
    /// at most [`MAX_COMMAND_LEN`] bytes.
    pub command: String,
}

/// The longest command line a [`ProcessInfo`] carries.
pub const MAX_COMMAND_LEN: usize = 4096;

/// One sample of the guest's counters, as [`GuestTask::Stats`] reports it. CPU use is the
/// change of `cpu_busy_ticks` over the change of `cpu_total_ticks` between two samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestStats {
    /// Clock ticks all CPUs spent not idle (the `cpu` line of /proc/stat).
    pub cpu_busy_ticks: u64,
    /// Clock ticks of all CPUs in total.
    pub cpu_total_ticks: u64,
    pub online_cpus: u32,
    /// MemTotal - MemAvailable, in bytes.
    pub memory_used_bytes: u64,
    /// MemTotal, in bytes: the guest's memory as the VM sees it.
    pub memory_total_bytes: u64,
    /// Bytes received and sent by every interface but lo.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub processes: u32,
}

/// Who the workload runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub run_as: RunAs,
    pub uid: u32,
    pub gid: u32,
}

/// The two accepted run-as forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunAs {
    /// The `sandbox` account of the image's /etc/passwd, with `uid`/`gid`.
    Sandbox,
    /// A bare numeric uid:gid with no passwd entry needed.
    Uid,
}

/// Size of a terminal in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSize {
    pub rows: u16,
    pub cols: u16,
}

/// A signal for the workload, by Linux signal number (e.g. 15 for SIGTERM; 1 to
/// [`MAX_SIGNAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: i32,
}

/// How long the workloads get between SIGTERM and SIGKILL when the sandbox stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    pub grace_ms: u64,
}

/// A wall-clock time: nanoseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WallClock {
    pub unix_ns: u64,
}

impl WallClock {
    /// This machine's wall clock now; 0 for a clock set before 1970.
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            unix_ns: u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

/// Window credit the host returns to a session's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputCredit {
    /// 1 to [`SESSION_WINDOW`].
    pub bytes: u32,
}

/// How a workload ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkloadResult {
    /// The workload exited with this status (0 to 255).
    Exited { code: i32 },
    /// A signal ended the workload (1 to [`MAX_SIGNAL`]).
    Killed { signal: i32 },
    /// The kernel's OOM killer ended the workload (seen in its cgroup's memory.events).
    OomKilled,
    /// The workload could not be started.
    StartFailed {
        reason: StartFailure,
        message: String,
    },
}

/// Why a workload did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFailure {
    /// The program does not exist (exit code 127).
    NotFound,
    /// The program exists but cannot be executed (exit code 126).
    NotExecutable,
    /// Anything else that kept it from starting (exit code 126).
    Other,
}

impl WorkloadResult {
    /// The exit code a shell or `docker run` reports for this result: the code itself,
    /// 128 + signal, 137 for an OOM kill (SIGKILL), 127 not found, 126 cannot execute.
    /// (Decoding refuses codes and signals out of range; this saturates on any that are
    /// made in code.)
    pub fn exit_code(&self) -> i32 {
        match self {
            WorkloadResult::Exited { code } => *code,
            WorkloadResult::Killed { signal } => signal.saturating_add(128),
            WorkloadResult::OomKilled => 128 + 9,
            WorkloadResult::StartFailed { reason, .. } => match reason {
                StartFailure::NotFound => 127,
                StartFailure::NotExecutable | StartFailure::Other => 126,
            },
        }
    }
}

/// A boot that failed before the workload started, naming the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootError {
    pub step: BootStep,
    pub message: String,
}

/// The guest's boot steps, in the order init runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootStep {
    /// proc, sysfs, devtmpfs in the initramfs.
    KernelFilesystems,
    /// Reading the `kiln.*` kernel command line.
    CommandLine,
    /// Receiving the host's hello and wall clock ([`Message::Clock`]) and setting it.
    Clock,
    /// Turning off user namespaces for the workload (`user.max_user_namespaces`), unless
    /// the command line allows them.
    UserNamespaces,
    /// The root image (EROFS).
    MountRoot,
    /// The identity layer (EROFS).
    MountIdentity,
    /// The layer holding OpenShell's supervisor (EROFS).
    MountSupervisor,
    /// The writable upper (ext4 disk or tmpfs).
    MountUpper,
    /// Stacking the layers into the overlay root.
    Overlay,
    SwitchRoot,
    /// devpts, /dev/shm, /run, /tmp, cgroup2 inside the new root.
    RuntimeFilesystems,
    /// A host directory shared over virtio-9p (`kiln.vol=`), mounted or given to the
    /// sandbox user.
    MountVolume,
    Hostname,
    /// lo, and eth0 when networking was asked for.
    Network,
    /// Receiving the run spec from the host.
    RunSpec,
    /// The supervisor's checks and preparation (user, filesystem, privileges).
    SupervisorStart,
    /// init itself panicked.
    InitPanic,
}

/// A boot phase and when the guest reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseTime {
    pub phase: BootPhase,
    /// CLOCK_BOOTTIME in the guest, in nanoseconds: time since the kernel started.
    pub boottime_ns: u64,
}

/// Moments of a guest's life the host times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootPhase {
    /// init started (kernel start -> init is this time itself).
    InitStarted,
    /// The root is assembled and the supervisor starts its checks (user, filesystem,
    /// privileges).
    SupervisorStarted,
    /// The workload's process was started.
    WorkloadStarted,
    /// The workload ended.
    WorkloadEnded,
    /// init is about to sync and power off.
    Shutdown,
}
