//! kiln-supervisor: runs a sandbox's workload as the sandbox user, in the VM guest
//! (called by kiln-init) and on Kubernetes (the static `kiln-supervisor` binary).
//!
//! The steps, each a public function so both paths share them:
//! [`validate_sandbox_user`] (numeric ids, or the `sandbox` entry of the root's
//! /etc/passwd parsed by kiln-identity, never NSS), [`prepare_filesystem`] (chown the
//! writable paths without following symlinks), [`drop_privileges`] (groups, gid, uid,
//! capabilities, no_new_privs, all checked), [`session_user_and_home`] (USER, LOGNAME,
//! HOME, SHELL), and [`Workload`] (start with pipes or a PTY, signals, a typed
//! [`WorkloadResult`] including OOM kills from the cgroup's memory.events).
//! [`Supervisor`] strings them together per [`Mode`].
//!
//! No existing crate fits: process-spawning crates either go through NSS for users,
//! cannot report which step between fork and exec failed, or do not clear the capability
//! bounding and ambient sets and verify the result.

mod env;
mod error;
mod fs;
mod privileges;
mod spawn;
mod user;

use std::path::{Path, PathBuf};

pub use env::workload_env;
pub use error::SupervisorError;
pub use fs::prepare_filesystem;
pub use kiln_identity::IdBounds;
pub use kiln_protocol::{
    Identity, OpenShellLaunch, RunAs, RunSpec, StartFailure, TerminalSize, WorkloadResult,
};
pub use privileges::{drop_privileges, PrivilegeError, PrivilegeStep, Privileges};
pub use spawn::{oom_kills, Launch, Workload, WorkloadIo};
pub use user::{
    session_user_and_home, validate_sandbox_user, RootAccounts, SandboxUser, Session, DEFAULT_SHELL,
};

/// Terminal size of a tty workload whose spec gives none.
pub const DEFAULT_TERMINAL: TerminalSize = TerminalSize { rows: 24, cols: 80 };

/// Which topology the supervisor serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The VM guest and Kubernetes' combined topology: starts as root, validates the
    /// user, prepares the writable paths, drops privileges for the workload.
    Full,
    /// Kubernetes' sidecar topology, agent container: already runs as the sandbox uid;
    /// validates and runs the workload, no privileged step is attempted.
    Process,
    /// Kubernetes' network enforcer (kiln-podnet), the sidecar topology's `network`
    /// container or the combined supervisor's child; it runs no workload.
    Network,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Process => "process",
            Mode::Network => "network",
        }
    }
}

/// The supervisor's configuration: mode, writable paths and the workload's cgroup.
#[derive(Debug, Clone)]
pub struct Supervisor {
    pub mode: Mode,
    /// Paths made the sandbox user's in full mode, besides /sandbox (when it exists);
    /// missing ones are created.
    pub writable: Vec<PathBuf>,
    /// A cgroup v2 directory to run the workload in; enables OOM detection.
    pub cgroup: Option<PathBuf>,
    /// The ids a workload may run as ([`IdBounds::KILN`] unless the
    /// caller says otherwise).
    pub bounds: IdBounds,
}

impl Supervisor {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            writable: Vec::new(),
            cgroup: None,
            bounds: IdBounds::KILN,
        }
    }

    /// Validates `identity` against the root's account files and, in full mode when
    /// running as root, gives the sandbox user /sandbox and the writable paths. Running
    /// as the target uid already skips the filesystem step; any other non-root uid is
    /// an error in full mode, and anything but the target uid is one in process mode.
    pub fn prepare(&self, identity: &Identity) -> Result<SandboxUser, SupervisorError> {
        let accounts = RootAccounts::read(Path::new("/"))?;
        let user = validate_sandbox_user(identity, &accounts, self.bounds)?;
        let euid = nix::unistd::geteuid().as_raw();
        match self.mode {
            Mode::Network => return Err(SupervisorError::NetworkMode),
            Mode::Process if euid != identity.uid => {
                return Err(SupervisorError::WrongUid {
                    mode: "process",
                    expected: identity.uid,
                    actual: euid,
                })
            }
            Mode::Process => {}
            Mode::Full if euid == identity.uid => {
                tracing::info!(
                    uid = euid,
                    "already the sandbox uid: no filesystem or id changes"
                )
            }
            Mode::Full if euid != 0 => {
                return Err(SupervisorError::NotRoot {
                    actual: euid,
                    target: identity.uid,
                })
            }
            Mode::Full => {
                // /sandbox comes from the identity layer (VM) or the workspace volume
                // (Kubernetes); an image that has neither gets no home created for it.
                let home = Path::new(kiln_identity::SANDBOX_HOME);
                let mut paths: Vec<PathBuf> = Vec::new();
                if home.symlink_metadata().is_ok() {
                    paths.push(home.to_owned());
                }
                paths.extend(self.writable.iter().cloned());
                prepare_filesystem(&paths, identity.uid, identity.gid)?;
            }
        }
        Ok(user)
    }

    /// Starts the workload of `spec` as `user` (from [`Supervisor::prepare`]): its
    /// environment is [`workload_env`] of the session and `spec.env`, its working
    /// directory `spec.cwd` or the user's home, and the child drops to the user's ids.
    /// A spec that runs OpenShell's supervisor (`spec.openshell`) starts it as root with
    /// exactly `spec.env`: that supervisor drops to the sandbox user itself.
    pub fn start(
        &self,
        spec: &RunSpec,
        user: &SandboxUser,
        io: WorkloadIo,
    ) -> Result<Workload, SupervisorError> {
        let session = session_user_and_home(user);
        let cwd = spec.cwd.clone().unwrap_or_else(|| session.home.clone());
        if !cwd.starts_with('/') {
            return Err(SupervisorError::StartFailed {
                reason: StartFailure::Other,
                message: format!("working directory {cwd:?} is not absolute"),
            });
        }
        let (env, privileges) = match &spec.openshell {
            Some(_) => (spec.env.clone(), None),
            None => (
                workload_env(&session, &spec.env),
                Some(user.privileges.clone()),
            ),
        };
        let launch = Launch {
            argv: spec.argv.clone(),
            env,
            cwd: PathBuf::from(cwd),
            privileges,
            cgroup: self.cgroup.clone(),
            io,
        };
        let uid = launch.privileges.as_ref().map_or(0, |p| p.uid);
        tracing::debug!(argv = ?launch.argv, cwd = %launch.cwd.display(), uid, "starting the workload");
        Workload::spawn(&launch)
    }

    /// [`Supervisor::prepare`] then [`Supervisor::start`].
    pub fn spawn(&self, spec: &RunSpec, io: WorkloadIo) -> Result<Workload, SupervisorError> {
        let user = self.prepare(&spec.identity)?;
        self.start(spec, &user, io)
    }

    /// [`Supervisor::spawn`], then waits: a workload that did not start is
    /// `Ok(WorkloadResult::StartFailed)`, only supervisor failures are errors.
    pub fn run(&self, spec: &RunSpec, io: WorkloadIo) -> Result<WorkloadResult, SupervisorError> {
        match self.spawn(spec, io) {
            Ok(workload) => workload.wait(),
            Err(err) => err.start_failure().ok_or(err),
        }
    }
}

/// The stdio a spec asks for: a PTY of its terminal size for a tty spec, else pipes.
pub fn io_for_spec(spec: &RunSpec) -> WorkloadIo {
    if spec.tty {
        WorkloadIo::Pty(spec.terminal.unwrap_or(DEFAULT_TERMINAL))
    } else {
        WorkloadIo::Pipes
    }
}
