//! The one error type of this crate.

use std::path::PathBuf;

use crate::PrivilegeError;

/// Why the supervisor could not prepare or start a workload (a workload that starts and
/// fails is a [`kiln_protocol::WorkloadResult`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("sandbox {what} {value} is outside the sandbox range {bounds}")]
    IdOutOfRange {
        what: &'static str,
        value: u32,
        bounds: kiln_identity::IdBounds,
    },
    #[error("the sandbox root's /etc/passwd has no \"sandbox\" entry; run as a numeric uid, or build the image with its identity layer")]
    NoSandboxUser,
    #[error("the sandbox root's \"sandbox\" entry has uid:gid {}:{}, but {}:{} was asked for", passwd.0, passwd.1, asked.0, asked.1)]
    SandboxIdsMismatch {
        passwd: (u32, u32),
        asked: (u32, u32),
    },
    #[error("the sandbox root's /etc/group makes \"sandbox\" a member of group 0; accepted: no root group membership")]
    RootGroupMember,
    #[error(transparent)]
    Accounts(#[from] kiln_identity::IdentityError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writable path {path}: {reason}")]
    WritablePath { path: PathBuf, reason: String },
    #[error("{mode} mode runs as uid {expected} already, but the supervisor runs as uid {actual}")]
    WrongUid {
        mode: &'static str,
        expected: u32,
        actual: u32,
    },
    #[error("full mode starts as root to prepare the sandbox, but the supervisor runs as uid {actual} (not the target uid {target} either)")]
    NotRoot { actual: u32, target: u32 },
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    /// The workload could not be started; [`SupervisorError::start_failure`] turns this
    /// into its [`kiln_protocol::WorkloadResult`].
    #[error("the workload did not start: {message}")]
    StartFailed {
        reason: kiln_protocol::StartFailure,
        message: String,
    },
    #[error("network mode runs no workload: it is the pod's network enforcer")]
    NetworkMode,
    #[error("{what}: {source}")]
    System {
        what: &'static str,
        source: std::io::Error,
    },
}
