//! kiln-protocol: what the kiln host and its guest say to each other: the boot
//! configuration on the kernel command line, then one byte stream.
//!
//! Before the guest runs, the host puts a [`BootConfig`] on the kernel command line
//! ([`BootConfig::kernel_args`]) and the guest's init reads it back
//! ([`BootConfig::parse`]): disks (by the ids [`ROOT_DISK_ID`], [`IDENTITY_DISK_ID`],
//! [`UPPER_DISK_ID`]), the channel's port ([`CHANNEL_PORT`]), hostname, network and
//! volumes. Both sides check one grammar, so the encoder refuses what the guest would.
//!
//! A sequence of frames over any reliable byte stream (a virtio-serial port, a vsock, a
//! unix socket): [`read_frame`] and [`write_frame`] work on any [`std::io::Read`] /
//! [`std::io::Write`], and [`decode_frame`] on a byte buffer (for async codecs), so the
//! crate needs no runtime. The wire format is documented in `docs/protocol.md`.
//!
//! Every frame has a fixed 16-byte [`Header`] (magic, version, kind, session id, payload
//! length) and at most [`MAX_PAYLOAD`] bytes of payload. Control messages carry JSON
//! (small, debuggable); stdin/stdout/stderr data frames carry raw bytes. A malformed or
//! oversized frame is a [`ProtocolError`], never a panic, and the decoder allocates at
//! most `MAX_PAYLOAD` bytes per frame whatever the header claims.
//!
//! Sessions: each frame names a session. Session [`CONTROL_SESSION`] (0) carries the
//! hello, boot errors and boot-phase times; the sandbox's main workload runs in session
//! [`MAIN_SESSION`] (1); further sessions (exec into a running sandbox) use other ids on
//! the same stream. Each session's output is flow-controlled: the guest sends at most
//! [`SESSION_WINDOW`] bytes of it ahead of the host's [`Message::Credit`], so a reader that
//! stops holds back its own session only, and the host's memory stays bounded.
//!
//! No existing crate fits: the framing has to be ours to document and bound, tokio's
//! codecs pull in a runtime the static guest init does not want, and general RPC crates
//! bring their own transports instead of one plain stream over a serial port.

mod boot;
mod frame;
mod message;

pub use boot::{
    BootConfig, BootConfigError, CmdlineError, CmdlineFault, DiskRef, HostEntry, NetConfig,
    TmpfsMount, Upper, VolumeMount, CHANNEL_PORT, DEFAULT_HOSTNAME, IDENTITY_DISK_ID,
    MAX_DNS_SERVERS, MAX_EXTRA_HOSTS, MAX_TMPFS_MOUNTS, OPENSHELL_DISK_ID, ROOT_DISK_ID,
    UPPER_DISK_ID,
};

pub use frame::{
    decode_frame, encode_frame, read_frame, write_frame, write_stream, Header, Kind, ProtocolError,
    HEADER_LEN, MAGIC, MAX_PAYLOAD, WIRE_VERSION,
};
pub use message::{
    negotiate, BootError, BootPhase, BootStep, Frame, GuestStats, GuestTask, Hello, Identity,
    Message, OpenShellLaunch, OpenShellTls, OutputCredit, PhaseTime, ProcessInfo, RunAs, RunSpec,
    SessionId, ShutdownRequest, SignalRequest, StartFailure, Stream, TerminalSize, WallClock,
    WorkloadResult, CONTROL_SESSION, DEFAULT_PATH, MAIN_SESSION, MAX_COMMAND_LEN,
    MAX_OPENSHELL_TLS_FILE_LEN, MAX_OPENSHELL_TOKEN_LEN, MAX_SIGNAL, MESSAGE_VERSION_MAX,
    MESSAGE_VERSION_MIN, OPENSHELL_AUTH_DIR, OPENSHELL_SUPERVISOR_PATH, OPENSHELL_TLS_CA_PATH,
    OPENSHELL_TLS_CERT_PATH, OPENSHELL_TLS_DIR, OPENSHELL_TLS_KEY_PATH, OPENSHELL_TOKEN_PATH,
    SESSION_WINDOW, STATS_INTERVAL_MS, STATS_SAMPLES,
};

#[cfg(test)]
mod tests;
