//! kiln-sandbox runs sandboxes: it takes a request, gets the image (kiln-image), builds or
//! reuses its root and identity images (kiln-rootfs), boots the microVM (kiln-vm), drives
//! the workload over the host-guest protocol (kiln-protocol) and returns the workload's
//! result. It also owns a sandbox's state directory and the detached lifecycle: create,
//! start (under a monitor process that owns the VM), stop, exec, remove.
//!
//! Every front end (the CLI and the driver API) hands its input to the same checks: a
//! request is built from the fields as the front end has them ([`CreateFields`],
//! [`RunFields`], [`ExecFields`]), and every error carries an [`ErrorKind`] that says whose
//! fault it is, so the front ends only translate.
//!
//! The modules are layers; each uses only those above it in this list:
//!
//! - `error`: [`Error`] and [`ErrorKind`].
//! - `options`, `spec`: parsing single inputs (env, ports, volumes, names); the workload's
//!   run spec from the image's config and the overrides.
//! - `state`: the sandbox's state directory, its records and its monitor's lock.
//! - `logs`: the workload's output logs, capped and rotated, and reading them back.
//! - `request`: the validated create, run and exec requests.
//! - `prepare`: the images a sandbox boots from, pulled and built or reused.
//! - `sessions`: the host's side of the channel's sessions: the guest's session rules,
//!   per-session output windows, the bounded queues to the guest.
//! - `launch`: one VM boot and the channel to its guest.
//! - `boot`: what a foreground run and the monitor share: the host, the writable layer,
//!   the VM spec of a sandbox, its record, and the status a boot leaves.
//! - `run`, `monitor`, `client`: a foreground run; the monitor process of a detached
//!   sandbox; talking to a running monitor (stop, exec).
//! - `lifecycle`: detached sandboxes from create to remove.

mod boot;
mod client;
mod error;
mod launch;
mod lifecycle;
mod logs;
mod monitor;
mod network;
mod options;
mod prepare;
mod request;
mod run;
mod sessions;
mod spec;
mod state;
mod tasks;

pub use client::{ExecInput, ExecOutput, ExecSession};
pub use error::{Error, ErrorKind};
/// The largest OpenShell supervisor binary a sandbox may name.
pub use kiln_rootfs::MAX_SUPERVISOR_BYTES;
pub use launch::{Control, HostIo, VmTimings};
pub use lifecycle::{
    attach, create, disk_usage, exec, get, kill, list, logs, prune_images, remove, rename, restart,
    start, stop, wait, DiskUsage, LogOptions, ProvisionEvent, PruneReport, SandboxInfo, Usage,
};
/// Runs the monitor of a detached sandbox (`kiln monitor ID`, started by [`start`]).
pub use monitor::run as run_monitor;
pub use network::{
    check_policy, network_logs, set_policy, show_policy, NetworkLogs, PolicySet, NETWORK_LOG,
    POLICY_FILE, POLICY_POLL,
};
pub use options::parse_signal;
pub use prepare::{image_cache, open_layers, trim_image_cache};
pub use request::{
    parse_size, CreateFields, CreateRequest, EnvFile, ExecFields, ExecRequest, Field, FieldNames,
    NetworkMode, OpenShellSupervisor, PolicyText, RunFields, RunRequest, SizeError,
    DEFAULT_LOG_MAX_SIZE, DEFAULT_ROOTFS_CACHE_MAX, LOG_MAX_SIZE,
};
pub use run::{run, RunReport, RunTimings};
pub use spec::ImageDefaults;
pub use state::{NetworkRecord, Status};
pub use tasks::{copy, stats, top, CopyEndpoint, SandboxStats, MAX_COPY_BYTES};
