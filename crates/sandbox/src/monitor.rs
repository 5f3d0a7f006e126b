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
//!
//! Each connection has a thread that reads it and one per exec session that writes that
//! session's output to it, taken from the session's bounded queue (`sessions`), so a
//! client that stops reading holds back its own sessions in the guest and nothing else:
//! not the other clients, not the logs, not a stop.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};

use kiln_protocol::{
    read_frame, write_frame, BootPhase, Frame, Hello, Message, SessionId, StartFailure,
    WorkloadResult, CONTROL_SESSION, MAIN_SESSION,
};
use kiln_vm::GuestImages;

use crate::boot::{boot, end_status, BootError, Host, Upper};
use crate::error::{Error, ErrorKind};
use crate::launch::{Control, GuestEvent, HostIo};
use crate::logs::lines::Timestamped;
use crate::logs::RotatingLog;
use crate::prepare::pinned_images;
use crate::sessions::{lock, ExecChannel, SessionError, SessionOutput};
use crate::state::{
    now_unix, SandboxDir, SandboxRecord, StateError, StateRecord, Status, MONITOR_SOCKET,
    RECORD_FILE, STATE_FILE, STDERR_LOG, STDOUT_LOG,
};

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
        RotatingLog::open(&sandbox.file(name), record.log_max_size)
            .map(Timestamped::new)
            .map_err(|source| StateError::Io {
                path: sandbox.file(name),
                source,
            })
    };
    let (stdout, stderr) = (log(STDOUT_LOG)?, log(STDERR_LOG)?);

    let (control_tx, control_rx) = mpsc::channel();
    let (guest_tx, guest_rx) = mpsc::channel::<GuestEvent>();
    stop_on_termination(control_tx.clone()).map_err(|e| io_error(sandbox, "signal handlers", e))?;
    let clients = Arc::new(Clients::new(control_tx));
    spawn_acceptor(listener, Arc::clone(&clients));

    std::thread::scope(|scope| {
        // Ends once launch has dropped its sender, after the VM is gone.
        let keeper = scope.spawn(|| keep_state(sandbox, &clients, guest_rx));
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
        let started_unix = keeper.join().expect("the state keeper does not panic")?;
        let state = StateRecord {
            status: end_status(&outcome),
            monitor_pid: None,
            started_unix,
            ended_unix: Some(now_unix()),
        };
        sandbox.write_json(STATE_FILE, &state)?;
        clients.end();
        Ok(())
    })
}

/// Follows the guest's boot phases into `state.json` and tells the clients whether exec
/// sessions can start; returns when the VM is gone, with the time the workload started.
fn keep_state(
    sandbox: &SandboxDir,
    clients: &Clients,
    events: Receiver<GuestEvent>,
) -> Result<Option<u64>, StateError> {
    let mut started_unix = None;
    for event in events {
        match event {
            GuestEvent::Connected(exec) => clients.lock().exec = Some(exec),
            GuestEvent::Phase(time) if time.phase == BootPhase::WorkloadStarted => {
                started_unix = Some(now_unix());
                let state = StateRecord {
                    status: Status::Running,
                    monitor_pid: Some(std::process::id()),
                    started_unix,
                    ended_unix: None,
                };
                sandbox.write_json(STATE_FILE, &state)?;
                clients.lock().running = true;
            }
            GuestEvent::Phase(time) if time.phase == BootPhase::WorkloadEnded => {
                clients.lock().running = false;
            }
            GuestEvent::Phase(_) => {}
        }
    }
    Ok(started_unix)
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

/// What the client threads share.
struct Clients {
    control: Sender<Control>,
    state: Mutex<ClientsState>,
}

#[derive(Default)]
struct ClientsState {
    /// The guest channel's exec side, once it is up.
    exec: Option<ExecChannel>,
    /// The main workload runs: exec sessions may start.
    running: bool,
    /// Every open connection, to be closed when the sandbox ends.
    connections: HashMap<u64, UnixStream>,
    /// The sandbox ended: connections are closed, new ones too.
    ended: bool,
}

impl Clients {
    fn new(control: Sender<Control>) -> Clients {
        Clients {
            control,
            state: Mutex::new(ClientsState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ClientsState> {
        lock(&self.state)
    }

    /// The sandbox ended: closes every connection.
    fn end(&self) {
        let mut state = self.lock();
        state.ended = true;
        for connection in state.connections.values() {
            let _ = connection.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn spawn_acceptor(listener: UnixListener, clients: Arc<Clients>) {
    std::thread::spawn(move || {
        for (id, stream) in (0u64..).zip(listener.incoming()) {
            let Ok(stream) = stream else { continue };
            let clients = Arc::clone(&clients);
            std::thread::spawn(move || serve_client(&clients, id, stream));
        }
    });
}

/// A client connection's exec sessions: its session ids to the guest's.
type SessionMap = Arc<Mutex<HashMap<SessionId, SessionId>>>;

/// Serves one client connection on its own thread: its frames go to the guest from here
/// (waiting, when the guest's input queue is full, holds back this client only), and each
/// exec session's output goes to it from a thread of the session's own. A client that
/// stops reading so holds back its own sessions and nothing else; one that disconnects
/// has its sessions killed.
fn serve_client(clients: &Clients, id: u64, stream: UnixStream) {
    let (Ok(registered), Ok(writer)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    {
        let mut state = clients.lock();
        if state.ended {
            return;
        }
        state.connections.insert(id, registered);
    }
    let writer = Arc::new(Mutex::new(writer));
    let hello = Hello::ours(format!("kiln-monitor {}", env!("CARGO_PKG_VERSION")));
    let sessions = SessionMap::default();
    let mut reader = stream;
    if write_to(&writer, Frame::new(CONTROL_SESSION, Message::Hello(hello))) {
        while let Ok(Some(frame)) = read_frame(&mut reader) {
            if !on_client_frame(clients, &writer, &sessions, frame) {
                break;
            }
        }
    }
    let _ = reader.shutdown(std::net::Shutdown::Both);
    let exec = clients.lock().exec.clone();
    let open: Vec<SessionId> = lock(&sessions).drain().map(|(_, guest)| guest).collect();
    if let Some(exec) = exec {
        for guest in open {
            exec.abandon(guest);
        }
    }
    clients.lock().connections.remove(&id);
}

/// Handles one frame from a client; false when the connection is done for.
fn on_client_frame(
    clients: &Clients,
    writer: &Arc<Mutex<UnixStream>>,
    sessions: &SessionMap,
    frame: Frame,
) -> bool {
    match (frame.session, frame.message) {
        (CONTROL_SESSION, Message::Shutdown(request)) => {
            let grace = std::time::Duration::from_millis(request.grace_ms);
            let _ = clients.control.send(Control::Shutdown { grace });
            true
        }
        (CONTROL_SESSION, _) => true,
        (session, Message::Run(spec)) if session > MAIN_SESSION => {
            match start_exec(clients, writer, sessions, session, spec) {
                Ok(()) => true,
                Err(message) => {
                    let result = WorkloadResult::StartFailed {
                        reason: StartFailure::Other,
                        message,
                    };
                    write_to(writer, Frame::new(session, Message::Result(result)))
                }
            }
        }
        (session, message) => {
            let guest = lock(sessions).get(&session).copied();
            let exec = clients.lock().exec.clone();
            match (guest, exec) {
                (Some(guest), Some(exec)) => match exec.send(guest, message) {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::debug!("client session {session}: {err}");
                        !matches!(err, SessionError::Closed)
                    }
                },
                _ => true,
            }
        }
    }
}

/// Opens an exec session for a client's `Run` on `session`, or says why not.
fn start_exec(
    clients: &Clients,
    writer: &Arc<Mutex<UnixStream>>,
    sessions: &SessionMap,
    session: SessionId,
    spec: kiln_protocol::RunSpec,
) -> Result<(), String> {
    if lock(sessions).contains_key(&session) {
        return Err(format!(
            "session {session} is already in use on this connection"
        ));
    }
    let exec = {
        let state = clients.lock();
        match (&state.exec, state.running) {
            (Some(exec), true) => exec.clone(),
            _ => return Err("the sandbox's workload is not running".to_owned()),
        }
    };
    let output = exec.open(spec).map_err(|err| err.to_string())?;
    lock(sessions).insert(session, output.session());
    let (writer, sessions) = (Arc::clone(writer), Arc::clone(sessions));
    std::thread::spawn(move || relay_output(output, session, &writer, &sessions));
    Ok(())
}

/// Passes an exec session's output to its client as fast as the client reads it. A
/// failed write drops `output`, which kills the session.
fn relay_output(
    mut output: SessionOutput,
    session: SessionId,
    writer: &Mutex<UnixStream>,
    sessions: &Mutex<HashMap<SessionId, SessionId>>,
) {
    while let Some(frame) = output.next() {
        let last = matches!(frame.message, Message::Result(_));
        if last {
            // The client may use the id again once it has the result.
            lock(sessions).remove(&session);
        }
        if !write_to(writer, Frame::new(session, frame.message)) || last {
            return;
        }
    }
}

/// Writes `frame` to a client; false when the client is gone.
fn write_to(writer: &Mutex<UnixStream>, frame: Frame) -> bool {
    write_frame(&mut *lock(writer), &frame).is_ok()
}
