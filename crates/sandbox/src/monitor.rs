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
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};

use kiln_protocol::{
    read_frame, write_frame, BootPhase, Frame, Hello, Message, SessionId, SignalRequest,
    StartFailure, WorkloadResult, CONTROL_SESSION, MAIN_SESSION,
};
use kiln_vm::GuestImages;

use crate::boot::{boot, end_status, BootError, Host, Upper};
use crate::error::{Error, ErrorKind};
use crate::launch::{Control, HostIo};
use crate::logs::RotatingLog;
use crate::prepare::pinned_images;
use crate::state::{
    now_unix, SandboxDir, SandboxRecord, StateError, StateRecord, Status, MONITOR_SOCKET,
    RECORD_FILE, STATE_FILE, STDERR_LOG, STDOUT_LOG,
};

/// How long a write to a client may block before the client is dropped.
const CLIENT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the monitor of sandbox `id`: takes its lock, detaches (the calling process returns
/// `Ok` as soon as the detached monitor holds the lock) and boots the sandbox with the
/// QEMU binary `qemu`.
pub fn run(root: &Path, id: &str, qemu: &Path) -> Result<(), Error> {
    let sandbox = SandboxDir::open(root, id)?;
    let record: SandboxRecord = sandbox.read_json(RECORD_FILE)?;
    let lock = sandbox
        .lock_monitor()?
        .ok_or_else(|| StateError::Running(sandbox.id().to_owned()))?;
    // SAFETY: the CLI calls this before it starts any thread, so the child is a complete
    // copy of a single-threaded process.
    match unsafe { libc::fork() } {
        -1 => return Err(io_error(&sandbox, "fork", std::io::Error::last_os_error()).into()),
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
    let outcome = serve(root, &sandbox, &record, qemu);
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

/// A system call of the monitor's own that failed.
#[derive(Debug, thiserror::Error)]
#[error("sandbox {id}: {context}: {source}")]
struct MonitorIoError {
    id: String,
    context: &'static str,
    source: std::io::Error,
}

impl From<MonitorIoError> for Error {
    fn from(err: MonitorIoError) -> Self {
        Error::new(ErrorKind::Internal, err)
    }
}

fn io_error(sandbox: &SandboxDir, context: &'static str, source: std::io::Error) -> MonitorIoError {
    MonitorIoError {
        id: sandbox.id().to_owned(),
        context,
        source,
    }
}

/// Boots the sandbox and serves clients until the VM is gone.
fn serve(
    root: &Path,
    sandbox: &SandboxDir,
    record: &SandboxRecord,
    qemu: &Path,
) -> Result<(), Error> {
    // Listening first: a live monitor without its socket is a foreground `kiln run`.
    let (address, _dir) = sandbox.monitor_socket()?;
    let _ = std::fs::remove_file(&address);
    let listener = UnixListener::bind(&address)
        .map_err(|e| io_error(sandbox, "listening on monitor.sock", e))?;
    std::fs::set_permissions(&address, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io_error(sandbox, "monitor.sock permissions", e))?;

    let prepared = pinned_images(root, record, &|_| {})?;
    let guest = GuestImages::locate(root);
    guest.check().map_err(BootError::from)?;
    let host = Host::new(root, guest, record.accel, qemu, &|line| {
        tracing::info!("{line}")
    })
    .map_err(BootError::from)?;
    let log = |name: &str| {
        RotatingLog::open(&sandbox.file(name), record.log_max_size).map_err(|source| {
            StateError::Io {
                path: sandbox.file(name),
                source,
            }
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
        let upper = Upper::existing(sandbox);
        let outcome = boot(
            sandbox, record, &prepared, &host, upper, None, io, control_rx,
        );
        let _ = forwarder.join();
        let _ = router_tx.send(RouterEvent::Finished(end_status(&outcome)));
        Ok(router.join().expect("the router does not panic")?)
    })
}

/// How long the workloads get when the monitor itself is told to terminate.
const TERMINATION_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// SIGTERM, SIGINT or SIGHUP to the monitor (a host shutdown, a plain `kill`) stops the
/// sandbox as `kiln stop` does, instead of killing the VM with the monitor. Handlers are
/// reset at exec, so the VMM is unaffected.
fn stop_on_termination(control: Sender<Control>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            tracing::warn!("terminated: stopping the sandbox");
            let stop = Control::Shutdown {
                grace: TERMINATION_GRACE,
            };
            if control.send(stop).is_err() {
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

    fn run(mut self, events: Receiver<RouterEvent>) -> Result<(), StateError> {
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

    fn on_guest(&mut self, frame: Frame) -> Result<(), StateError> {
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
