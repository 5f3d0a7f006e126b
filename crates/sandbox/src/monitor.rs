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
//! `Data`/`Eof`/`Result` come back on it; `Shutdown` on session 0 stops the sandbox, and
//! `Signal` on session 1 goes to the main workload (`kiln kill`). Every
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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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
use crate::prepare::{pinned_images, PreparedImages};
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
    // `run --rm -d`: a sandbox whose workload ran goes with its end (under the lock, so no
    // start comes between); one that never ran stays for its starter to say why.
    let ran = || {
        sandbox
            .read_json::<StateRecord>(STATE_FILE)
            .is_ok_and(|state| state.started_unix.is_some())
    };
    if record.auto_remove && ran() {
        sandbox.remove()?;
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
    let clients = Arc::new(Clients::new());
    stop_on_termination(Arc::clone(&clients))
        .map_err(|e| io_error(sandbox, "signal handlers", e))?;
    spawn_acceptor(listener, Arc::clone(&clients));

    let (mut restarts, mut backoff_step) = (0u32, 0u32);
    loop {
        let booted = Instant::now();
        let (status, started_unix) = boot_once(sandbox, record, &prepared, &host, &clients)?;
        let exit_code = match &status {
            Status::Exited { exit_code, .. } => Some(*exit_code),
            _ => None,
        };
        let again = record.restart.restarts(exit_code, restarts) && !clients.stop_requested();
        let state = StateRecord {
            status,
            // A monitor that boots again still owns the sandbox (`stop` may have to kill it).
            monitor_pid: again.then(std::process::id),
            started_unix,
            ended_unix: Some(now_unix()),
        };
        sandbox.write_json(STATE_FILE, &state)?;
        if !again {
            break;
        }
        // docker's backoff: doubling from 100 ms, from the start again after a long run.
        if booted.elapsed() >= RESTART_BACKOFF_RESET {
            backoff_step = 0;
        }
        let delay = (RESTART_DELAY_MIN * 2u32.pow(backoff_step.min(10))).min(RESTART_DELAY_MAX);
        if clients.stop_within(delay) {
            break;
        }
        tracing::info!("restarting the sandbox (restart {})", restarts + 1);
        restarts += 1;
        backoff_step += 1;
    }
    clients.end();
    Ok(())
}

/// The first delay before a restart (`--restart`); it doubles with each restart.
const RESTART_DELAY_MIN: Duration = Duration::from_millis(100);
/// The longest delay before a restart.
const RESTART_DELAY_MAX: Duration = Duration::from_secs(60);
/// A boot that ran this long starts the delays from the first again.
const RESTART_BACKOFF_RESET: Duration = Duration::from_secs(10);

/// One boot of the sandbox on its writable disk, its output appended to the logs; how
/// it ended and when its workload started.
fn boot_once(
    sandbox: &SandboxDir,
    record: &SandboxRecord,
    prepared: &PreparedImages,
    host: &Host,
    clients: &Clients,
) -> Result<(Status, Option<u64>), Error> {
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
    clients.attach_boot(control_tx);
    std::thread::scope(|scope| {
        // Ends once launch has dropped its sender, after the VM is gone.
        let keeper = scope.spawn(|| keep_state(sandbox, clients, guest_rx));
        let io = HostIo {
            stdin: None,
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            guest_events: Some(guest_tx),
            network_denials: None,
        };
        let upper = Upper::existing(sandbox);
        let outcome = boot(sandbox, record, prepared, host, upper, None, io, control_rx);
        clients.lock().control = None;
        let started_unix = keeper.join().expect("the state keeper does not panic")?;
        Ok((end_status(&outcome), started_unix))
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
const TERMINATION_GRACE: Duration = Duration::from_secs(10);

/// SIGTERM, SIGINT or SIGHUP to the monitor (a host shutdown, a plain `kill`) stops the
/// sandbox as `kiln stop` does, instead of killing the VM with the monitor. Handlers are
/// reset at exec, so the VMM is unaffected.
fn stop_on_termination(clients: Arc<Clients>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            tracing::warn!("terminated: stopping the sandbox");
            clients.control(Control::Shutdown {
                grace: TERMINATION_GRACE,
            });
        }
    });
    Ok(())
}

/// What the client threads share.
struct Clients {
    state: Mutex<ClientsState>,
    /// Wakes a wait between boots when a stop is asked for.
    stop_asked: Condvar,
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
    /// The running boot's signals and stop; `None` between boots.
    control: Option<Sender<Control>>,
    /// A stop was asked for: no restart follows.
    stop_requested: bool,
}

impl Clients {
    fn new() -> Clients {
        Clients {
            state: Mutex::new(ClientsState::default()),
            stop_asked: Condvar::new(),
        }
    }

    /// Passes `request` to the running boot; a stop also ends the restarts, and a wait
    /// between boots.
    fn control(&self, request: Control) {
        let mut state = self.lock();
        if matches!(request, Control::Shutdown { .. }) {
            state.stop_requested = true;
            self.stop_asked.notify_all();
        }
        if let Some(control) = &state.control {
            let _ = control.send(request);
        }
    }

    /// Routes requests to a new boot through `control`; a stop asked for before it had
    /// its channel goes to it at once.
    fn attach_boot(&self, control: Sender<Control>) {
        let mut state = self.lock();
        if state.stop_requested {
            let _ = control.send(Control::Shutdown {
                grace: Duration::ZERO,
            });
        }
        state.control = Some(control);
    }

    fn stop_requested(&self) -> bool {
        self.lock().stop_requested
    }

    /// Waits `delay` unless a stop is asked for first; whether one was.
    fn stop_within(&self, delay: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .stop_asked
            .wait_timeout_while(state, delay, |state| !state.stop_requested)
            .unwrap_or_else(PoisonError::into_inner);
        state.stop_requested
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
            let grace = Duration::from_millis(request.grace_ms);
            clients.control(Control::Shutdown { grace });
            true
        }
        (CONTROL_SESSION, _) => true,
        // `kiln kill`: a signal for the main workload, as kiln's own signals in a foreground run.
        (MAIN_SESSION, Message::Signal(request)) => {
            clients.control(Control::Signal(request.signal));
            true
        }
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
