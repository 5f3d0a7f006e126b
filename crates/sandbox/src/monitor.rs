//! The monitor: one process per running sandbox that owns its VM, so that the command
//! that started it (the CLI, or `kiln serve`) can exit and come back.
//!
//! It holds an exclusive flock on `monitor.lock` for its whole life, so a `running` state
//! whose lock can be taken belongs to a dead monitor. The VMM is its child with
//! PR_SET_PDEATHSIG, so killing the monitor kills the VM. It writes the workload's output
//! to `stdout.log`/`stderr.log` and the status to `state.json`, and serves clients on
//! `monitor.sock` in kiln-protocol frames: Hello both ways on session 0; `Run` on a
//! client-chosen session >= 2 starts an exec session (renumbered to a session unique in
//! the guest); `Data`, `Eof`, `Signal` and `Resize` follow on it, and the guest's
//! `Data`/`Eof`/`Result` come back on it; `Shutdown` on session 0 stops the sandbox. Every
//! connection is closed once the VM is gone and the final state is written.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};

use kiln_protocol::{
    read_frame, write_frame, BootPhase, Frame, Hello, Message, SessionId, SignalRequest,
    StartFailure, WorkloadResult, CONTROL_SESSION, MAIN_SESSION,
};
use kiln_vm::accel::AccelRequest;
use kiln_vm::GuestImages;

use crate::launch::{Control, HostIo};
use crate::lifecycle::{pinned_images, LifecycleError};
use crate::run::{boot, end_status, Host, RunError, Upper};
use crate::state::{
    now_unix, SandboxDir, SandboxRecord, StateError, StateRecord, Status, MONITOR_LOCK,
    MONITOR_SOCKET, RECORD_FILE, STATE_FILE, STDERR_LOG, STDOUT_LOG,
};

/// The longest path `sockaddr_un` holds, with its terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// How long a write to a client may block before the client is dropped.
const CLIENT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the monitor of sandbox `id`: takes its lock, detaches (the calling process returns
/// `Ok` as soon as the detached monitor holds the lock) and boots the sandbox.
pub fn run(root: &Path, id: &str) -> Result<(), LifecycleError> {
    let sandbox = SandboxDir::open(root, id)?;
    let record: SandboxRecord = sandbox.read_json(RECORD_FILE)?;
    let lock =
        take_lock(&sandbox)?.ok_or_else(|| LifecycleError::Running(sandbox.id().to_owned()))?;
    // SAFETY: the CLI calls this before it starts any thread, so the child is a complete
    // copy of a single-threaded process.
    match unsafe { libc::fork() } {
        -1 => return Err(io_error(&sandbox, "fork", std::io::Error::last_os_error())),
        0 => {}
        // The detached child shares the lock's open file: it stays locked after we exit.
        _ => return Ok(()),
    }
    // SAFETY: setsid has no preconditions; a fresh child is never a group leader.
    unsafe { libc::setsid() };
    let pid = std::process::id();
    let booting = StateRecord {
        monitor_pid: Some(pid),
        ..StateRecord::created()
    };
    sandbox.write_json(STATE_FILE, &booting)?;
    let outcome = serve(root, &sandbox, &record);
    let _ = std::fs::remove_file(sandbox.file(MONITOR_SOCKET));
    if let Err(err) = &outcome {
        tracing::error!("{err}");
        let failed = StateRecord {
            status: Status::Failed {
                message: err.to_string(),
            },
            monitor_pid: None,
            started_unix: None,
            ended_unix: Some(now_unix()),
        };
        sandbox.write_json(STATE_FILE, &failed)?;
    }
    drop(lock);
    outcome
}

/// Whether a monitor holds the sandbox's lock.
pub fn is_alive(sandbox: &SandboxDir) -> bool {
    let Ok(file) = File::open(sandbox.file(MONITOR_LOCK)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own.
    let held = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0;
    held && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// Blocks until no monitor holds the sandbox's lock: the monitor's lock is released only
/// by its end, so this wakes exactly then, without polling.
pub(crate) fn wait_until_ended(sandbox: &SandboxDir) -> Result<(), StateError> {
    let path = sandbox.file(MONITOR_LOCK);
    let file = match File::open(&path) {
        Ok(file) => file,
        // Never started: nothing to wait for.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    loop {
        // SAFETY: flock on a descriptor we own; the shared lock goes with `file`.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(StateError::Io { path, source: err });
        }
    }
}

/// The lock file with an exclusive lock held, or `None` when another process holds it.
pub(crate) fn take_lock(sandbox: &SandboxDir) -> Result<Option<File>, StateError> {
    let path = sandbox.file(MONITOR_LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(None);
        }
        return Err(StateError::Io { path, source: err });
    }
    Ok(Some(file))
}

fn io_error(sandbox: &SandboxDir, context: &str, source: std::io::Error) -> LifecycleError {
    RunError::Io {
        context: format!("sandbox {}: {context}", sandbox.id()),
        source,
    }
    .into()
}

/// The path to bind or connect to for the monitor socket, and the directory handle that
/// must stay open while it is used: a long state path is reached through
/// `/proc/self/fd/N/`, because a socket path must fit in `sockaddr_un`.
pub(crate) fn socket_address(
    sandbox: &SandboxDir,
) -> Result<(PathBuf, Option<File>), LifecycleError> {
    let path = sandbox.file(MONITOR_SOCKET);
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return Ok((path, None));
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(sandbox.path())
        .map_err(|e| io_error(sandbox, "opening the state directory", e))?;
    let short = PathBuf::from(format!(
        "/proc/self/fd/{}/{MONITOR_SOCKET}",
        dir.as_raw_fd()
    ));
    Ok((short, Some(dir)))
}

/// Boots the sandbox and serves clients until the VM is gone.
fn serve(root: &Path, sandbox: &SandboxDir, record: &SandboxRecord) -> Result<(), LifecycleError> {
    // Listening first: a live monitor without its socket is a foreground `kiln run`.
    let (address, _dir) = socket_address(sandbox)?;
    let _ = std::fs::remove_file(&address);
    let listener = UnixListener::bind(&address)
        .map_err(|e| io_error(sandbox, "listening on monitor.sock", e))?;
    std::fs::set_permissions(&address, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_error(sandbox, "monitor.sock permissions", e))?;

    let prepared = pinned_images(root, record, &|_| {})?;
    let guest = GuestImages::locate(root);
    guest.check().map_err(RunError::from)?;
    let accel: AccelRequest = record.accel.parse().unwrap_or_default();
    let host = Host::new(root, guest, accel, &record.qemu, &|line| {
        tracing::info!("{line}")
    })?;
    let log = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(sandbox.file(name))
            .map_err(|source| {
                LifecycleError::from(StateError::Io {
                    path: sandbox.file(name),
                    source,
                })
            })
    };
    let (stdout, stderr) = (log(STDOUT_LOG)?, log(STDERR_LOG)?);

    let (control_tx, control_rx) = mpsc::channel();
    let (guest_tx, guest_rx) = mpsc::channel::<Frame>();
    let (router_tx, router_rx) = mpsc::channel::<RouterEvent>();
    stop_on_termination(control_tx.clone()).map_err(|e| io_error(sandbox, "signal handlers", e))?;
    spawn_acceptor(listener, router_tx.clone());

    std::thread::scope(|scope| {
        let events = router_tx.clone();
        // Ends once launch has dropped its sender, so the router sees every guest frame
        // before it hears that the VM is gone.
        let forwarder = scope.spawn(move || {
            for frame in guest_rx {
                let _ = events.send(RouterEvent::Guest(frame));
            }
        });
        let router = scope.spawn(|| Router::new(sandbox, control_tx).run(router_rx));
        let io = HostIo {
            stdin: None,
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            guest_events: Some(guest_tx),
        };
        let upper = Upper::Disk(kiln_vm::disk::upper_disk_path(sandbox.path()));
        let outcome = boot(
            sandbox, record, &prepared, &host, upper, None, io, control_rx,
        );
        let _ = forwarder.join();
        let _ = router_tx.send(RouterEvent::Finished(end_status(&outcome)));
        router.join().expect("the router does not panic")
    })
}

/// How long the workloads get when the monitor itself is told to terminate.
const TERMINATION_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The write end of the pipe the termination handler wakes the stopping thread through.
static TERMINATION_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_termination_signal(_: libc::c_int) {
    let fd = TERMINATION_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; the byte lives in static memory.
    unsafe { libc::write(fd, b"x".as_ptr().cast(), 1) };
}

/// SIGTERM, SIGINT or SIGHUP to the monitor (a host shutdown, a plain `kill`) stops the
/// sandbox as `kiln stop` does, instead of killing the VM with the monitor. Handlers are
/// reset at exec, so the VMM is unaffected.
fn stop_on_termination(control: Sender<Control>) -> std::io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    TERMINATION_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only calls write(2); the sigaction struct is ours.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_termination_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        // SAFETY: reading into a buffer we own from the pipe's read end, which we own.
        while unsafe { libc::read(fds[0], byte.as_mut_ptr().cast(), 1) } == 1 {
            tracing::warn!("terminated: stopping the sandbox");
            if control
                .send(Control::Shutdown {
                    grace: TERMINATION_GRACE,
                })
                .is_err()
            {
                return;
            }
        }
    });
    Ok(())
}

enum RouterEvent {
    Connected(u64, UnixStream),
    FromClient(u64, Frame),
    Disconnected(u64),
    Guest(Frame),
    /// The VM is gone; the sandbox ended with this status.
    Finished(Status),
}

fn spawn_acceptor(listener: UnixListener, events: Sender<RouterEvent>) {
    std::thread::spawn(move || {
        for (client, stream) in (0u64..).zip(listener.incoming()) {
            let Ok(stream) = stream else { continue };
            let Ok(mut reader) = stream.try_clone() else {
                continue;
            };
            if events.send(RouterEvent::Connected(client, stream)).is_err() {
                return;
            }
            let events = events.clone();
            std::thread::spawn(move || {
                while let Ok(Some(frame)) = read_frame(&mut reader) {
                    if events.send(RouterEvent::FromClient(client, frame)).is_err() {
                        return;
                    }
                }
                let _ = events.send(RouterEvent::Disconnected(client));
            });
        }
    });
}

/// One connected client and its exec sessions (its session id to the guest's).
struct Client {
    stream: UnixStream,
    sessions: HashMap<SessionId, SessionId>,
}

/// Relays frames between clients and the guest and keeps `state.json`; owns all the
/// monitor's mutable state on one thread.
struct Router<'a> {
    sandbox: &'a SandboxDir,
    control: Sender<Control>,
    clients: HashMap<u64, Client>,
    /// Guest session to (client, client session).
    routes: HashMap<SessionId, (u64, SessionId)>,
    next_session: SessionId,
    running: bool,
    started_unix: Option<u64>,
}

impl<'a> Router<'a> {
    fn new(sandbox: &'a SandboxDir, control: Sender<Control>) -> Self {
        Router {
            sandbox,
            control,
            clients: HashMap::new(),
            routes: HashMap::new(),
            next_session: MAIN_SESSION + 1,
            running: false,
            started_unix: None,
        }
    }

    fn run(mut self, events: Receiver<RouterEvent>) -> Result<(), LifecycleError> {
        for event in events {
            match event {
                RouterEvent::Connected(id, mut stream) => {
                    // A client that stops reading must not hold up everyone else.
                    let _ = stream.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
                    let hello = Hello::ours(format!("kiln-monitor {}", env!("CARGO_PKG_VERSION")));
                    if write_frame(
                        &mut stream,
                        &Frame::new(CONTROL_SESSION, Message::Hello(hello)),
                    )
                    .is_ok()
                    {
                        self.clients.insert(
                            id,
                            Client {
                                stream,
                                sessions: HashMap::new(),
                            },
                        );
                    }
                }
                RouterEvent::FromClient(id, frame) => self.on_client(id, frame),
                RouterEvent::Disconnected(id) => self.drop_client(id),
                RouterEvent::Guest(frame) => self.on_guest(frame)?,
                RouterEvent::Finished(status) => {
                    let state = StateRecord {
                        status,
                        monitor_pid: None,
                        started_unix: self.started_unix,
                        ended_unix: Some(now_unix()),
                    };
                    self.sandbox.write_json(STATE_FILE, &state)?;
                    for client in self.clients.values() {
                        let _ = client.stream.shutdown(std::net::Shutdown::Both);
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn on_client(&mut self, id: u64, frame: Frame) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        match (frame.session, frame.message) {
            (CONTROL_SESSION, Message::Shutdown(request)) => {
                let grace = std::time::Duration::from_millis(request.grace_ms);
                let _ = self.control.send(Control::Shutdown { grace });
            }
            (CONTROL_SESSION, _) => {}
            (session, Message::Run(spec)) if session > MAIN_SESSION => {
                let refusal = if client.sessions.contains_key(&session) {
                    Some(format!(
                        "session {session} is already in use on this connection"
                    ))
                } else if !self.running {
                    Some("the sandbox's workload is not running".to_owned())
                } else {
                    None
                };
                if let Some(message) = refusal {
                    let result = WorkloadResult::StartFailed {
                        reason: StartFailure::Other,
                        message,
                    };
                    let _ = write_frame(
                        &mut client.stream,
                        &Frame::new(session, Message::Result(result)),
                    );
                    return;
                }
                let guest = self.next_session;
                self.next_session += 1;
                client.sessions.insert(session, guest);
                self.routes.insert(guest, (id, session));
                let _ = self
                    .control
                    .send(Control::Guest(Frame::new(guest, Message::Run(spec))));
            }
            (
                session,
                message @ (Message::Data { .. }
                | Message::Eof { .. }
                | Message::Signal(_)
                | Message::Resize(_)),
            ) => {
                if let Some(&guest) = client.sessions.get(&session) {
                    let _ = self
                        .control
                        .send(Control::Guest(Frame::new(guest, message)));
                }
            }
            (session, other) => tracing::debug!(session, "ignoring a client's {other:?}"),
        }
    }

    fn on_guest(&mut self, frame: Frame) -> Result<(), LifecycleError> {
        match (frame.session, &frame.message) {
            (CONTROL_SESSION, Message::Phase(time)) if time.phase == BootPhase::WorkloadStarted => {
                self.running = true;
                self.started_unix = Some(now_unix());
                let state = StateRecord {
                    status: Status::Running,
                    monitor_pid: Some(std::process::id()),
                    started_unix: self.started_unix,
                    ended_unix: None,
                };
                self.sandbox.write_json(STATE_FILE, &state)?;
            }
            (CONTROL_SESSION, Message::Phase(time)) if time.phase == BootPhase::WorkloadEnded => {
                self.running = false;
            }
            (guest, _) if guest > MAIN_SESSION => {
                let last = matches!(frame.message, Message::Result(_));
                let route = if last {
                    self.routes.remove(&guest)
                } else {
                    self.routes.get(&guest).copied()
                };
                let Some((id, session)) = route else {
                    return Ok(());
                };
                let Some(client) = self.clients.get_mut(&id) else {
                    return Ok(());
                };
                if last {
                    client.sessions.remove(&session);
                }
                if write_frame(&mut client.stream, &Frame::new(session, frame.message)).is_err() {
                    self.drop_client(id);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Forgets a client that is gone or stuck; nobody is left to read its sessions'
    /// output, so they are ended.
    fn drop_client(&mut self, id: u64) {
        if let Some(client) = self.clients.remove(&id) {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
            for guest in client.sessions.into_values() {
                let kill = Message::Signal(SignalRequest {
                    signal: libc::SIGKILL,
                });
                let _ = self.control.send(Control::Guest(Frame::new(guest, kill)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_state_path_is_reached_through_the_directory_handle() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("r".repeat(120));
        let sandbox = SandboxDir::create(&root, None).unwrap();
        assert!(sandbox.file(MONITOR_SOCKET).as_os_str().len() > SUN_PATH_MAX);
        let (address, dir) = socket_address(&sandbox).unwrap();
        assert!(
            dir.is_some() && address.starts_with("/proc/self/fd"),
            "{}",
            address.display()
        );
        let _listener = UnixListener::bind(&address).unwrap();
        assert!(
            sandbox.file(MONITOR_SOCKET).exists(),
            "the socket is in the state directory"
        );
        let (again, _dir) = socket_address(&sandbox).unwrap();
        UnixStream::connect(again).unwrap();
    }

    #[test]
    fn the_lock_tells_whether_a_monitor_lives() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = SandboxDir::create(root.path(), None).unwrap();
        assert!(!is_alive(&sandbox));
        let lock = take_lock(&sandbox).unwrap().expect("a free lock");
        assert!(is_alive(&sandbox));
        assert!(
            take_lock(&sandbox).unwrap().is_none(),
            "a second monitor is refused"
        );
        drop(lock);
        assert!(!is_alive(&sandbox));
    }

    #[test]
    fn waiting_ends_when_the_lock_is_released() {
        let root = tempfile::tempdir().unwrap();
        let sandbox = SandboxDir::create(root.path(), None).unwrap();
        wait_until_ended(&sandbox).expect("no lock file: nothing to wait for");
        let lock = take_lock(&sandbox).unwrap().expect("a free lock");
        let (tx, rx) = mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| tx.send(wait_until_ended(&sandbox).is_ok()).unwrap());
            let early = rx.recv_timeout(std::time::Duration::from_millis(200));
            assert!(early.is_err(), "the wait ended while the lock was held");
            drop(lock);
            assert_eq!(
                rx.recv_timeout(std::time::Duration::from_secs(10)),
                Ok(true)
            );
        });
    }
}
