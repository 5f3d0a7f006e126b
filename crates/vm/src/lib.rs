//! kiln-vm boots the sandbox microVM.
//!
//! It owns three things and nothing else:
//! - [`VmSpec`]: what a sandbox VM is made of (kernel, initramfs, disks, the host-guest
//!   channel, network, size), independent of any VMM;
//! - [`Backend`]: a VMM that can start a [`VmSpec`] as a host process. [`qemu::Qemu`]
//!   drives QEMU's `microvm` machine; Firecracker or Cloud Hypervisor can be added as
//!   other backends without touching callers;
//! - [`accel`]: choosing KVM or TCG, with a probe whose verdict is cached per host boot,
//!   because on some hosts `/dev/kvm` opens yet cannot run our guest.
//!
//! Every VM process runs confined ([`jail`]: its own mount namespace, no privileges,
//! seccomp, cgroup and rlimits) and is tied to its parent (it is killed when kiln dies) and every wait
//! takes a deadline, so no phase can hang. Once it has ended, [`VmProcess::guest_end`]
//! says whether the guest powered off or reset (its kernel's panic path), as the VMM saw
//! it: the console is the guest's to write, so nothing in it decides that.

pub mod accel;
pub mod disk;
pub mod doctor;
pub mod guest;
pub mod jail;
mod process;
pub mod qemu;
mod qmp;
pub mod tsc;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

pub use accel::Accel;
pub use guest::GuestImages;
pub use jail::{Confinement, Limits};
pub use process::VmProcess;

/// A disk given to the guest as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Short id, also the device's serial number, so the guest can find the disk by role
    /// (`/sys/block/vd*/serial`) whatever order the devices are probed in; kiln's roles
    /// are kiln-protocol's `ROOT_DISK_ID`, `IDENTITY_DISK_ID` and `UPPER_DISK_ID`.
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

/// A host directory shared with the guest over virtio-9p (QEMU's built-in 9p server in
/// `mapped-xattr` mode: files the guest creates belong on the host to the user running
/// the VMM, and the guest's view of their owner and mode is kept in `user.virtfs.*`
/// extended attributes; see docs/volumes.md).
///
/// The directory is given open, not by path: the caller opens and checks it, and the VMM
/// inherits that descriptor and serves the directory it refers to, so renaming or
/// replacing the path after the check changes nothing.
#[derive(Debug)]
pub struct Share {
    /// 9p mount tag the guest mounts by (`mount -t 9p TAG`); at most 31 bytes.
    pub tag: String,
    /// The host directory (an `O_PATH` descriptor is enough).
    pub dir: OwnedFd,
    /// The VMM refuses writes, whatever the guest mounts.
    pub read_only: bool,
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No NIC at all.
    None,
    /// A virtio-net NIC whose frames QEMU carries over the unix socket at `socket` (its
    /// `-netdev stream`), to the network endpoint listening there (kiln-netstack).
    Stream { socket: PathBuf },
}

/// The host-guest channel: a virtio-serial port backed by a unix socket on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Unix socket the host listens on before the VMM starts; the VMM connects to it.
    pub socket: PathBuf,
    /// Port name the guest sees under /dev/virtio-ports/ (kiln's is kiln-protocol's
    /// `CHANNEL_PORT`).
    pub port_name: String,
}

/// Everything needed to start one sandbox VM.
#[derive(Debug)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Kernel command line arguments added after the backend's own (console, reboot).
    pub cmdline: Vec<String>,
    pub disks: Vec<Disk>,
    /// Host directories shared with the guest.
    pub shares: Vec<Share>,
    /// vCPUs the guest sees.
    pub cpus: u32,
    /// The VMM's CPU budget in thousandths of a CPU (a CFS quota where cgroups allow).
    pub cpu_millis: u32,
    pub memory_mib: u32,
    pub network: Network,
    pub channel: Channel,
    /// File that receives the guest's serial console.
    pub console_log: PathBuf,
    pub accel: Accel,
}

/// How the guest ended, as the VMM saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest powered itself off: kiln-init's end, after a result or a boot error.
    PowerOff,
    /// The guest reset itself. kiln's guest kernel runs with `panic=-1 reboot=t` and its
    /// init only ever powers off, so this is the kernel's panic path.
    Reset,
}

/// A VMM that can run a [`VmSpec`].
pub trait Backend {
    /// Short name for messages ("qemu").
    fn name(&self) -> &'static str;

    /// Starts the VM as a child process tied to this process's lifetime.
    fn start(&self, spec: &VmSpec) -> Result<VmProcess, VmError>;
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start {vmm} ({binary}): {source}")]
    Spawn {
        vmm: &'static str,
        binary: PathBuf,
        source: std::io::Error,
    },

    #[error("{what} not found at {path}; {hint}")]
    MissingFile {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },

    #[error("{what}: {source}; install it again with `bash scripts/build-guest`")]
    UntrustedGuestFile {
        what: &'static str,
        source: kiln_hostfs::Error,
    },

    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),

    #[error("waiting for the VM process {pid}: {source}")]
    Wait { pid: u32, source: std::io::Error },

    #[error("deadline for {phase} expired after {:.1} s", .after.as_secs_f64())]
    Deadline {
        phase: &'static str,
        after: Duration,
    },

    #[error("QEMU's monitor (QMP), which reports how the guest ends: {0}")]
    Qmp(String),

    #[error("KVM was requested but cannot be used: {0}")]
    KvmUnavailable(String),

    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("cannot run {tool}: {source}")]
    Tool {
        tool: &'static str,
        source: std::io::Error,
    },

    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: String,
        stderr: String,
    },

    /// A directory or file of kiln's own (the acceleration cache, a console log) that
    /// kiln may not trust, or cannot reach.
    #[error(transparent)]
    HostFile(#[from] kiln_hostfs::Error),
}
