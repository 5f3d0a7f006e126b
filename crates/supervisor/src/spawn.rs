//! Starting the workload process and turning its end into a typed result.
//!
//! std's `Command` cannot be used: it reports a failure between fork and exec as a bare
//! errno, so a missing working directory would look like a missing program (127), and a
//! failed privilege drop like an exec error. Here the child reports the failing stage and
//! errno over a close-on-exec pipe, and runs only allocation-free system calls.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kiln_protocol::{StartFailure, TerminalSize, WorkloadResult, DEFAULT_PATH};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{pipe2, ForkResult, Pid};

use crate::privileges::{drop_privileges, PrivilegeStep};
use crate::{PrivilegeError, Privileges, SupervisorError};

/// How the workload's standard streams are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadIo {
    /// The supervisor's own stdin, stdout and stderr.
    Inherit,
    /// Three pipes, handed out as [`Workload::stdin`], `stdout` and `stderr`.
    Pipes,
    /// A new pseudo-terminal as controlling terminal, in a new session; its master is
    /// [`Workload::pty`].
    Pty(TerminalSize),
}

/// Everything needed to start one workload process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Program and arguments; a program without `/` is searched in the workload's PATH.
    pub argv: Vec<String>,
    /// The complete environment, `KEY=VALUE`.
    pub env: Vec<String>,
    pub cwd: PathBuf,
    /// Ids the child drops to before exec; `None` keeps the caller's (root's): only for
    /// OpenShell's supervisor, which drops to the sandbox user itself.
    pub privileges: Option<Privileges>,
    /// A cgroup v2 directory the child moves into before exec; its memory.events tells
    /// an OOM kill apart from another SIGKILL.
    pub cgroup: Option<PathBuf>,
    pub io: WorkloadIo,
}

/// A running workload.
#[derive(Debug)]
pub struct Workload {
    pid: Pid,
    /// Write end of the workload's stdin ([`WorkloadIo::Pipes`]).
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// Master side of the workload's terminal ([`WorkloadIo::Pty`]).
    pub pty: Option<File>,
    cgroup: Option<PathBuf>,
    oom_kills_before: u64,
}

/// Where in the child the start failed; sent with the errno over the status pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Stage {
    Signals = 1,
    Cgroup = 2,
    Terminal = 3,
    Stdio = 4,
    Privileges = 5,
    WorkingDirectory = 6,
    Exec = 7,
}

impl Stage {
    fn from_u32(value: u32) -> Option<Stage> {
        [
            Stage::Signals,
            Stage::Cgroup,
            Stage::Terminal,
            Stage::Stdio,
            Stage::Privileges,
            Stage::WorkingDirectory,
            Stage::Exec,
        ]
        .into_iter()
        .find(|s| *s as u32 == value)
    }
}

const PRIVILEGE_STEPS: [PrivilegeStep; 13] = [
    PrivilegeStep::TargetIsRoot,
    PrivilegeStep::SetGroups,
    PrivilegeStep::SetGid,
    PrivilegeStep::BoundingSet,
    PrivilegeStep::SetUid,
    PrivilegeStep::AmbientCapabilities,
    PrivilegeStep::CapabilitySets,
    PrivilegeStep::NoNewPrivs,
    PrivilegeStep::VerifyIds,
    PrivilegeStep::VerifyGroups,
    PrivilegeStep::VerifyNoRoot,
    PrivilegeStep::VerifyCapabilities,
    PrivilegeStep::VerifyNoNewPrivs,
];

/// Everything the child touches, built before fork so the child never allocates.
struct Prepared {
    /// Owns the strings `argv_ptrs` points into.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// Owns the strings `envp_ptrs` points into.
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Paths to try in order (PATH search done ahead of time).
    candidates: Vec<CString>,
    cwd: CString,
    cgroup_procs: Option<CString>,
}

fn cstring(what: &'static str, bytes: &[u8]) -> Result<CString, SupervisorError> {
    CString::new(bytes).map_err(|_| SupervisorError::StartFailed {
        reason: StartFailure::Other,
        message: format!("{what} holds a NUL byte"),
    })
}

impl Prepared {
    fn new(launch: &Launch) -> Result<Self, SupervisorError> {
        let program = launch.argv.first().ok_or(SupervisorError::StartFailed {
            reason: StartFailure::Other,
            message: "argv is empty".to_owned(),
        })?;
        let argv = launch
            .argv
            .iter()
            .map(|a| cstring("an argument", a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = launch
            .env
            .iter()
            .map(|e| cstring("an environment entry", e.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let candidates = search_candidates(program, &launch.env)
            .iter()
            .map(|p| cstring("the program path", p.as_os_str().as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let with_null = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        Ok(Self {
            argv_ptrs: with_null(&argv),
            envp_ptrs: with_null(&envp),
            _argv: argv,
            _envp: envp,
            candidates,
            cwd: cstring("the working directory", launch.cwd.as_os_str().as_bytes())?,
            cgroup_procs: launch
                .cgroup
                .as_ref()
                .map(|c| {
                    cstring(
                        "the cgroup path",
                        c.join("cgroup.procs").as_os_str().as_bytes(),
                    )
                })
                .transpose()?,
        })
    }
}

/// The paths execvp would try for `program`, using the workload's PATH (not ours).
fn search_candidates(program: &str, env: &[String]) -> Vec<PathBuf> {
    if program.contains('/') {
        return vec![PathBuf::from(program)];
    }
    if program.is_empty() {
        return Vec::new();
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(program))
        .collect()
}

/// One end of a pipe pair per stream the child gets, and the end the parent keeps.
struct Pipe {
    parent: OwnedFd,
    child: OwnedFd,
}

fn pipe(child_reads: bool) -> Result<Pipe, SupervisorError> {
    let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| system("creating a pipe", e))?;
    Ok(if child_reads {
        Pipe {
            parent: write,
            child: read,
        }
    } else {
        Pipe {
            parent: read,
            child: write,
        }
    })
}

fn system(what: &'static str, errno: Errno) -> SupervisorError {
    SupervisorError::System {
        what,
        source: errno.into(),
    }
}

impl Workload {
    /// Starts the workload. A workload that could not start is
    /// [`SupervisorError::StartFailed`] (see [`SupervisorError::start_failure`]).
    pub fn spawn(launch: &Launch) -> Result<Workload, SupervisorError> {
        let prepared = Prepared::new(launch)?;
        let oom_kills_before = match &launch.cgroup {
            Some(cgroup) => oom_kills(cgroup)?,
            None => 0,
        };
        // The child's three fds (or none) and the parent's kept ends.
        let mut child_fds: Vec<OwnedFd> = Vec::new();
        let (mut stdin, mut stdout, mut stderr, mut pty) = (None, None, None, None);
        match launch.io {
            WorkloadIo::Inherit => {}
            WorkloadIo::Pipes => {
                let (i, o, e) = (pipe(true)?, pipe(false)?, pipe(false)?);
                stdin = Some(File::from(i.parent));
                stdout = Some(File::from(o.parent));
                stderr = Some(File::from(e.parent));
                child_fds = vec![i.child, o.child, e.child];
            }
            WorkloadIo::Pty(size) => {
                let winsize = nix::pty::Winsize {
                    ws_row: size.rows,
                    ws_col: size.cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                let pair = nix::pty::openpty(&winsize, None)
                    .map_err(|e| system("opening a pseudo-terminal", e))?;
                for fd in [&pair.master, &pair.slave] {
                    nix::fcntl::fcntl(
                        fd,
                        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                    )
                    .map_err(|e| system("setting close-on-exec", e))?;
                }
                pty = Some(File::from(pair.master));
                child_fds = vec![pair.slave];
            }
        }
        // Above 0..=2, so that putting one onto 0, 1 or 2 never overwrites another.
        let child_fds = child_fds
            .into_iter()
            .map(above_stdio)
            .collect::<Result<Vec<_>, _>>()?;
        let status_pipe = pipe(false)?;
        let child_raw: Vec<RawFd> = child_fds.iter().map(|fd| fd.as_raw_fd()).collect();

        // SAFETY: the child runs only async-signal-safe system calls on memory prepared
        // above (see child_main), then execs or _exits.
        match unsafe { nix::unistd::fork() }.map_err(|e| system("fork", e))? {
            ForkResult::Child => {
                let failure = child_main(&prepared, launch, &child_raw);
                let bytes = failure.to_bytes();
                // SAFETY: writing a stack buffer to an fd we own; then leaving at once.
                unsafe {
                    libc::write(
                        status_pipe.child.as_raw_fd(),
                        bytes.as_ptr().cast(),
                        bytes.len(),
                    );
                    libc::_exit(127);
                }
            }
            ForkResult::Parent { child } => {
                drop(child_fds);
                drop(status_pipe.child);
                let mut report = Vec::new();
                let read = File::from(status_pipe.parent)
                    .take(12)
                    .read_to_end(&mut report);
                let workload = Workload {
                    pid: child,
                    stdin,
                    stdout,
                    stderr,
                    pty,
                    cgroup: launch.cgroup.clone(),
                    oom_kills_before,
                };
                match read {
                    Ok(0) => Ok(workload),
                    Ok(_) | Err(_) => {
                        // The child is on its way to _exit: reap it before reporting.
                        let _ = waitpid(child, None);
                        Err(ChildFailure::from_bytes(&report).into_error(launch))
                    }
                }
            }
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sends `signal` (a Linux signal number) to the workload.
    pub fn signal(&self, signal: i32) -> Result<(), SupervisorError> {
        let signal = Signal::try_from(signal).map_err(|e| system("unknown signal number", e))?;
        nix::sys::signal::kill(self.pid, signal).map_err(|e| system("signalling the workload", e))
    }

    /// Sets the terminal size of a [`WorkloadIo::Pty`] workload (the kernel then sends
    /// it SIGWINCH); does nothing for other workloads.
    pub fn resize(&self, size: TerminalSize) -> Result<(), SupervisorError> {
        let Some(pty) = &self.pty else { return Ok(()) };
        let winsize = nix::pty::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
        let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
        Errno::result(rc)
            .map(drop)
            .map_err(|e| system("resizing the terminal", e))
    }

    /// Waits for the workload to end. Callers that reap every child themselves (a PID 1
    /// waiting on -1) use [`Workload::result_of`] with the status they got instead.
    pub fn wait(&self) -> Result<WorkloadResult, SupervisorError> {
        loop {
            match waitpid(self.pid, None) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(system("waiting for the workload", e)),
                Ok(status) => {
                    if let Some(result) = self.result_of(status) {
                        return Ok(result);
                    }
                }
            }
        }
    }

    /// The result for a wait status of this workload; `None` for a status that is not
    /// an end (stopped, continued). A SIGKILL while the cgroup's memory.events counted
    /// a new oom_kill is [`WorkloadResult::OomKilled`].
    pub fn result_of(&self, status: WaitStatus) -> Option<WorkloadResult> {
        match status {
            WaitStatus::Exited(_, code) => Some(WorkloadResult::Exited { code }),
            WaitStatus::Signaled(_, signal, _) => {
                let oom = signal == Signal::SIGKILL
                    && self
                        .cgroup
                        .as_ref()
                        .and_then(|c| oom_kills(c).ok())
                        .is_some_and(|n| n > self.oom_kills_before);
                Some(if oom {
                    WorkloadResult::OomKilled
                } else {
                    WorkloadResult::Killed {
                        signal: signal as i32,
                    }
                })
            }
            _ => None,
        }
    }
}

/// The `oom_kill` count of a cgroup v2 directory's memory.events.
pub fn oom_kills(cgroup: &Path) -> Result<u64, SupervisorError> {
    let path = cgroup.join("memory.events");
    let text = std::fs::read_to_string(&path).map_err(|source| SupervisorError::Read {
        path: path.clone(),
        source,
    })?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0))
}

/// What the child reports when it cannot exec: stage, detail (privilege step), errno.
#[derive(Debug, Clone, Copy)]
struct ChildFailure {
    stage: u32,
    detail: u32,
    errno: i32,
}

impl ChildFailure {
    fn to_bytes(self) -> [u8; 12] {
        let mut b = [0u8; 12];
        b[0..4].copy_from_slice(&self.stage.to_ne_bytes());
        b[4..8].copy_from_slice(&self.detail.to_ne_bytes());
        b[8..12].copy_from_slice(&self.errno.to_ne_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> ChildFailure {
        let word = |i: usize| {
            b.get(i..i + 4)
                .map_or(0, |w| u32::from_ne_bytes(w.try_into().expect("4 bytes")))
        };
        ChildFailure {
            stage: word(0),
            detail: word(4),
            errno: word(8) as i32,
        }
    }

    fn into_error(self, launch: &Launch) -> SupervisorError {
        let (program, cwd) = (&launch.argv[0], &launch.cwd);
        let errno = Errno::from_raw(self.errno);
        let failed = |reason, message: String| SupervisorError::StartFailed { reason, message };
        match Stage::from_u32(self.stage) {
            Some(Stage::Exec) => {
                let reason = match errno {
                    Errno::ENOENT | Errno::ENOTDIR => StartFailure::NotFound,
                    Errno::EACCES | Errno::ENOEXEC | Errno::EPERM | Errno::EISDIR => {
                        StartFailure::NotExecutable
                    }
                    _ => StartFailure::Other,
                };
                // Worded as docker words it, so what users search for matches.
                let message = if program.contains('/') || reason != StartFailure::NotFound {
                    let cause = errno.desc();
                    let mut chars = cause.chars();
                    let cause: String = chars
                        .next()
                        .map(|first| first.to_lowercase().chain(chars).collect())
                        .unwrap_or_default();
                    format!("exec: {program:?}: {cause}")
                } else {
                    format!("exec: {program:?}: executable file not found in $PATH")
                };
                failed(reason, message)
            }
            Some(Stage::WorkingDirectory) => failed(
                StartFailure::Other,
                format!("working directory {}: {}", cwd.display(), errno.desc()),
            ),
            Some(Stage::Privileges) => PrivilegeError {
                step: PRIVILEGE_STEPS
                    .get(self.detail as usize)
                    .copied()
                    .unwrap_or(PrivilegeStep::VerifyIds),
                errno,
            }
            .into(),
            Some(Stage::Cgroup) => failed(
                StartFailure::Other,
                format!(
                    "joining cgroup {}: {}",
                    launch.cgroup.as_deref().unwrap_or(Path::new("?")).display(),
                    errno.desc()
                ),
            ),
            Some(stage @ (Stage::Signals | Stage::Terminal | Stage::Stdio)) => failed(
                StartFailure::Other,
                format!("setting up the process ({stage:?}): {}", errno.desc()),
            ),
            None => failed(
                StartFailure::Other,
                "the workload process ended before exec".to_owned(),
            ),
        }
    }
}

/// The child between fork and exec: returns only on failure.
fn child_main(p: &Prepared, launch: &Launch, child_fds: &[RawFd]) -> ChildFailure {
    let fail = |stage: Stage, detail: u32, errno: Errno| ChildFailure {
        stage: stage as u32,
        detail,
        errno: errno as i32,
    };
    // SAFETY: the whole child side makes only async-signal-safe system calls, on memory
    // prepared before the fork.
    unsafe {
        // Signal state survives exec: give the workload default dispositions (Rust
        // ignores SIGPIPE, the caller may catch some) and an empty mask (the
        // kiln-supervisor binary blocks what it catches across the fork).
        for signal in 1..32 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return fail(Stage::Signals, 0, Errno::last());
        }
        if let Some(procs) = &p.cgroup_procs {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return fail(Stage::Cgroup, 0, Errno::last());
            }
            libc::close(fd);
        }
        if let WorkloadIo::Pty(_) = launch.io {
            let slave = child_fds[0];
            if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) != 0 {
                return fail(Stage::Terminal, 0, Errno::last());
            }
            for target in 0..3 {
                if libc::dup2(slave, target) < 0 {
                    return fail(Stage::Stdio, 0, Errno::last());
                }
            }
        } else if launch.io == WorkloadIo::Pipes {
            for (target, fd) in child_fds.iter().enumerate() {
                if libc::dup2(*fd, target as RawFd) < 0 {
                    return fail(Stage::Stdio, 0, Errno::last());
                }
            }
        }
        if let Some(Err(e)) = launch.privileges.as_ref().map(drop_privileges) {
            let detail = PRIVILEGE_STEPS
                .iter()
                .position(|s| *s == e.step)
                .unwrap_or(0);
            return fail(Stage::Privileges, detail as u32, e.errno);
        }
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            return fail(Stage::WorkingDirectory, 0, Errno::last());
        }
        // As execvp: keep searching past ENOENT, ENOTDIR and EACCES; report EACCES if
        // any candidate gave it (it exists but cannot run), else the last error.
        let mut errno = Errno::ENOENT;
        let mut saw_eacces = false;
        for candidate in &p.candidates {
            libc::execve(
                candidate.as_ptr(),
                p.argv_ptrs.as_ptr(),
                p.envp_ptrs.as_ptr(),
            );
            errno = Errno::last();
            match errno {
                Errno::EACCES => saw_eacces = true,
                Errno::ENOENT | Errno::ENOTDIR => {}
                _ => break,
            }
        }
        if saw_eacces && matches!(errno, Errno::ENOENT | Errno::ENOTDIR) {
            errno = Errno::EACCES;
        }
        fail(Stage::Exec, 0, errno)
    }
}

fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, SupervisorError> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .map_err(|e| system("dup", e))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

impl SupervisorError {
    /// The workload result of a start failure; `None` for other errors.
    pub fn start_failure(&self) -> Option<WorkloadResult> {
        match self {
            SupervisorError::StartFailed { reason, message } => Some(WorkloadResult::StartFailed {
                reason: *reason,
                message: message.clone(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_count_is_read_from_memory_events() {
        let dir = tempfile::tempdir().unwrap();
        let events = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        std::fs::write(dir.path().join("memory.events"), events).unwrap();
        assert_eq!(oom_kills(dir.path()).unwrap(), 2);
        std::fs::write(dir.path().join("memory.events"), "low 0\n").unwrap();
        assert_eq!(
            oom_kills(dir.path()).unwrap(),
            0,
            "kernels before 4.13 have no oom_kill line"
        );
        let err = oom_kills(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("memory.events"), "{err}");
    }

    #[test]
    fn programs_are_searched_in_the_workload_path() {
        let env = vec!["PATH=/a::/b".to_owned()];
        assert_eq!(
            search_candidates("ls", &env),
            [
                PathBuf::from("/a/ls"),
                PathBuf::from("./ls"),
                PathBuf::from("/b/ls")
            ]
        );
        assert_eq!(search_candidates("./x", &env), [PathBuf::from("./x")]);
        assert_eq!(
            search_candidates("ls", &[]).len(),
            DEFAULT_PATH.split(':').count()
        );
        assert!(search_candidates("", &env).is_empty());
    }
}
