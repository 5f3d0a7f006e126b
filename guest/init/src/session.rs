//! The guest's sessions: the main workload (session 1) and exec sessions (ids >= 2), each
//! a process started by the supervisor with its own output pumps, input, signals,
//! terminal and one result; the host-serving thread that routes frames to them; and the
//! PID-1 reaper that hands every exit status to the session whose process it was.
//!
//! One table, behind one lock, holds the live sessions. A process is started while the
//! lock is held, so the reaper (which takes the lock for every status) can never see the
//! status of a session's process before the session is in the table.
//!
//! Each session's output is flow-controlled (kiln-protocol's `SESSION_WINDOW`): a pump
//! sends a frame only when the session's window has room for it, and the host's credit
//! makes room. A pump waits on its window, never on the channel, so a session whose reader
//! on the host is slow holds back only itself: its process blocks on a full pipe, while
//! other sessions, results and phases go on.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_protocol::{
    Frame, Message, RunSpec, SessionId, StartFailure, Stream, TerminalSize, WorkloadResult,
    CONTROL_SESSION, HEADER_LEN, MAIN_SESSION, MAX_PAYLOAD, SESSION_WINDOW,
};
use kiln_supervisor::{
    io_for_spec, validate_sandbox_user, RootAccounts, SandboxUser, Supervisor, SupervisorError,
    Workload,
};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::channel::Channel;

/// What the host's input thread hands to a session's stdin writer.
enum Input {
    Data(Vec<u8>),
    End,
}

/// A session's stdin: the pipe (or terminal) as it is until the host first sends input,
/// then the writer thread that feeds it. Most runs get no input: the host's end of it
/// just closes the pipe, and no thread is started for it (under TCG a thread costs a
/// start a few milliseconds).
enum Stdin {
    Idle { file: File, tty: bool },
    Writing(Sender<Input>),
}

impl Stdin {
    /// Passes `input` on; what is left of the stdin afterwards (`None` after its end).
    fn feed(self, input: Input) -> Option<Stdin> {
        let writer = match self {
            // Closing the pipe is its end.
            Stdin::Idle { tty: false, .. } if matches!(input, Input::End) => return None,
            Stdin::Idle { file, tty } => stdin_writer(file, tty),
            Stdin::Writing(writer) => writer,
        };
        let ended = matches!(input, Input::End);
        let _ = writer.send(input);
        (!ended).then_some(Stdin::Writing(writer))
    }
}

/// A running session's process and its plumbing.
struct Live {
    workload: Workload,
    /// The terminal's master, for resizes (tty sessions only).
    terminal: Option<File>,
    /// The session's stdin; dropping it closes it.
    input: Option<Stdin>,
    /// The output pump, if it has output: its result goes out only after that ended.
    pumps: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct Table {
    live: HashMap<SessionId, Live>,
    /// False once the main workload ended: no new session starts.
    accepting: bool,
    /// A `Shutdown` from the host arrived.
    shutting_down: bool,
    /// Threads sending the results of ended exec sessions.
    finishers: Vec<JoinHandle<()>>,
    /// The ended main workload's output pumps, drained before its result goes out.
    main_pumps: Vec<JoinHandle<()>>,
}

/// What one reaped child was.
pub enum Reaped {
    /// The main workload ended with this result.
    Main(WorkloadResult),
    /// Another process (an exec session, or an orphan).
    Other,
    /// No child is left.
    None,
}

/// Every session of the guest.
pub struct Sessions {
    table: Mutex<Table>,
    /// Each session's output window, from its start until its output ended (a reaped
    /// session's pumps may still be sending).
    windows: Arc<Mutex<HashMap<SessionId, Arc<Window>>>>,
    channel: &'static Channel,
    supervisor: Supervisor,
}

/// How much output a session may still send before the host returns credit.
struct Window {
    state: Mutex<WindowState>,
    granted: Condvar,
}

struct WindowState {
    credit: u32,
    /// The host is gone: nobody will grant credit again.
    closed: bool,
}

impl Window {
    fn new() -> Arc<Window> {
        Arc::new(Window {
            state: Mutex::new(WindowState {
                credit: SESSION_WINDOW,
                closed: false,
            }),
            granted: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, WindowState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `charge` fits the window and takes it; false once the host is gone.
    fn spend(&self, charge: u32) -> bool {
        let mut state = self.lock();
        while !state.closed && state.credit < charge {
            state = self
                .granted
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if state.closed {
            return false;
        }
        state.credit -= charge;
        true
    }

    fn grant(&self, bytes: u32) {
        let mut state = self.lock();
        state.credit = state.credit.saturating_add(bytes).min(SESSION_WINDOW);
        self.granted.notify_all();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.granted.notify_all();
    }
}

/// Sends `message` on `session`, logging a failure (the host may be gone).
fn send(channel: &Channel, session: SessionId, message: Message) {
    if let Err(e) = channel.send(&Frame::new(session, message)) {
        crate::console(&format!(
            "cannot send to the host on session {session}: {e}"
        ));
    }
}

impl Sessions {
    pub fn new(channel: &'static Channel, supervisor: Supervisor) -> Sessions {
        Sessions {
            table: Mutex::new(Table {
                accepting: true,
                ..Table::default()
            }),
            windows: Arc::default(),
            channel,
            supervisor,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_windows(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<Window>>> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the main workload (session 1) as `user`, already prepared by the
    /// supervisor. Returns its pid, or why it did not start.
    pub fn start_main(&self, spec: &RunSpec, user: &SandboxUser) -> Result<Pid, SupervisorError> {
        let mut table = self.lock();
        self.start_locked(&mut table, MAIN_SESSION, spec, user)
    }

    /// Starts `spec` on `session` while the table is locked (see the module doc).
    fn start_locked(
        &self,
        table: &mut Table,
        session: SessionId,
        spec: &RunSpec,
        user: &SandboxUser,
    ) -> Result<Pid, SupervisorError> {
        let mut workload = self.supervisor.start(spec, user, io_for_spec(spec))?;
        let pid = workload.pid();
        let channel = self.channel;
        let window = Window::new();
        // Pipes give stdout and stderr apart; a terminal gives one stream, stdout.
        let (input, pumps, terminal) = match workload.pty.take() {
            Some(terminal) => {
                let clones = terminal
                    .try_clone()
                    .and_then(|o| Ok((o, terminal.try_clone()?)));
                let (output, input) = match clones {
                    Ok(clones) => clones,
                    Err(e) => {
                        // Not in the table: nobody would ever see its end.
                        let _ = workload.signal(libc::SIGKILL);
                        return Err(system("cloning the terminal", e));
                    }
                };
                let sources = vec![(output, Stream::Stdout)];
                let pump = pump_output(sources, session, channel, Arc::clone(&window));
                (Some(input), vec![pump], Some(terminal))
            }
            None => {
                let sources: Vec<(File, Stream)> = [
                    (workload.stdout.take(), Stream::Stdout),
                    (workload.stderr.take(), Stream::Stderr),
                ]
                .into_iter()
                .filter_map(|(file, stream)| Some((file?, stream)))
                .collect();
                let pumps = if sources.is_empty() {
                    Vec::new()
                } else {
                    vec![pump_output(sources, session, channel, Arc::clone(&window))]
                };
                (workload.stdin.take(), pumps, None)
            }
        };
        let input = input.map(|file| Stdin::Idle {
            file,
            tty: spec.tty,
        });
        self.lock_windows().insert(session, window);
        table.live.insert(
            session,
            Live {
                workload,
                terminal,
                input,
                pumps,
            },
        );
        Ok(pid)
    }

    /// Starts an exec session, or answers with a `start_failed` result why it cannot.
    fn start_exec(&self, session: SessionId, spec: &RunSpec) {
        let refuse = |message: String| {
            let result = WorkloadResult::StartFailed {
                reason: StartFailure::Other,
                message,
            };
            send(self.channel, session, Message::Result(result));
        };
        let mut table = self.lock();
        if !table.accepting {
            return refuse("the sandbox's main workload has ended".into());
        }
        if table.live.contains_key(&session) {
            return refuse(format!("session {session} is already running a process"));
        }
        if spec.openshell.is_some() {
            return refuse("only the main session runs OpenShell's supervisor".into());
        }
        // A task runs init's own binary in place of the spec's program.
        let task_spec;
        let spec = match &spec.task {
            Some(task) => {
                task_spec = RunSpec {
                    argv: crate::task::argv(task),
                    ..spec.clone()
                };
                &task_spec
            }
            None => spec,
        };
        // Same identity checks as the main workload; /sandbox is already prepared.
        let started = RootAccounts::read(std::path::Path::new("/"))
            .and_then(|accounts| {
                validate_sandbox_user(&spec.identity, &accounts, self.supervisor.bounds)
            })
            .and_then(|user| self.start_locked(&mut table, session, spec, &user));
        drop(table);
        if let Err(err) = started {
            match err.start_failure() {
                Some(result) => send(self.channel, session, Message::Result(result)),
                None => refuse(err.to_string()),
            }
        }
    }

    /// Serves what the host sends after the main workload started: exec runs, stdin
    /// data and its end, signals, terminal sizes, output credit, and shutdown. Returns
    /// when the host closes the channel; pumps waiting for credit then give up.
    pub fn serve_host(&self) {
        loop {
            let frame = match self.channel.receive(None) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    crate::console(&format!("reading from the host: {e}"));
                    break;
                }
            };
            match (frame.session, frame.message) {
                (session, Message::Credit(credit)) => {
                    // Credit for a session whose output already ended is not needed.
                    if let Some(window) = self.lock_windows().get(&session) {
                        window.grant(credit.bytes);
                    }
                }
                (CONTROL_SESSION, Message::Shutdown(request)) => {
                    self.channel.note_host_shutdown();
                    self.shutdown(Duration::from_millis(request.grace_ms))
                }
                (CONTROL_SESSION, other) => crate::console(&format!(
                    "ignoring an unexpected control message from the host: {other:?}"
                )),
                (session, Message::Run(spec)) => self.start_exec(session, &spec),
                (session, message) => self.deliver(session, message),
            }
        }
        for window in self.lock_windows().values() {
            window.close();
        }
    }

    /// Hands a host frame to a live session.
    fn deliver(&self, session: SessionId, message: Message) {
        let mut table = self.lock();
        // A frame for a session that just ended is dropped: its process is gone.
        let Some(live) = table.live.get_mut(&session) else {
            return;
        };
        match message {
            Message::Data {
                stream: Stream::Stdin,
                bytes,
            } => {
                if let Some(input) = live.input.take() {
                    live.input = input.feed(Input::Data(bytes));
                }
            }
            Message::Eof {
                stream: Stream::Stdin,
            } => {
                if let Some(input) = live.input.take() {
                    live.input = input.feed(Input::End);
                }
            }
            Message::Signal(request) => {
                if let Err(e) = live.workload.signal(request.signal) {
                    crate::console(&format!(
                        "session {session}: forwarding signal {}: {e}",
                        request.signal
                    ));
                }
            }
            Message::Resize(size) => {
                if let Some(terminal) = &live.terminal {
                    if let Err(e) = resize(terminal, size) {
                        crate::console(&format!("session {session}: resizing the terminal: {e}"));
                    }
                }
            }
            other => crate::console(&format!(
                "session {session}: ignoring an unexpected message from the host: {other:?}"
            )),
        }
    }

    /// The host's `Shutdown`: no new session starts, every process gets SIGTERM now and
    /// SIGKILL after `grace`. The main workload's end then finishes the sandbox.
    fn shutdown(&self, grace: Duration) {
        {
            let mut table = self.lock();
            table.accepting = false;
            table.shutting_down = true;
        }
        crate::console(&format!(
            "shutdown requested, grace {} ms",
            grace.as_millis()
        ));
        // SIGTERM to -1 from PID 1 reaches every process but init.
        // SAFETY: plain system call.
        unsafe { libc::kill(-1, libc::SIGTERM) };
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            // SAFETY: plain system call.
            unsafe { libc::kill(-1, libc::SIGKILL) };
        });
    }

    /// Waits for the next child to end (orphans are re-parented to PID 1) and hands its
    /// status to its session: an exec session's result is sent once its output ended.
    pub fn reap_next(&self) -> Reaped {
        let status = loop {
            match waitpid(Pid::from_raw(-1), None) {
                Ok(status) => break status,
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => return Reaped::None,
                Err(errno) => {
                    crate::console(&format!("waiting for children: {errno}"));
                    return Reaped::None;
                }
            }
        };
        let Some(pid) = status
            .pid()
            .filter(|_| matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)))
        else {
            return Reaped::Other;
        };
        let mut table = self.lock();
        let Some(session) = table
            .live
            .iter()
            .find(|(_, live)| live.workload.pid() == pid)
            .map(|(id, _)| *id)
        else {
            return Reaped::Other;
        };
        let live = table.live.remove(&session).expect("found above");
        let result = live.workload.result_of(status).expect("an end status");
        if session == MAIN_SESSION {
            table.accepting = false;
            table.main_pumps = live.pumps;
            return Reaped::Main(result);
        }
        let channel = self.channel;
        let windows = Arc::clone(&self.windows);
        table.finishers.push(std::thread::spawn(move || {
            for pump in live.pumps {
                let _ = pump.join();
            }
            windows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&session);
            send(channel, session, Message::Result(result));
        }));
        Reaped::Other
    }

    /// After the main workload ended: no new session starts; during a shutdown the exec
    /// sessions get the rest of the grace period to end; then every process left is
    /// killed and reaped, each exec session's result is sent, and the main session's
    /// output drained. Its result is the caller's to send.
    pub fn finish_main(&self) {
        let shutting_down = {
            let mut table = self.lock();
            table.accepting = false;
            table.shutting_down
        };
        if shutting_down {
            // The shutdown timer kills what ignores SIGTERM.
            while !self.lock().live.is_empty() {
                if matches!(self.reap_next(), Reaped::None) {
                    break;
                }
            }
        }
        // The sandbox ends with its workload: what is left would keep output pipes open.
        // SAFETY: plain system call.
        unsafe { libc::kill(-1, libc::SIGKILL) };
        while !matches!(self.reap_next(), Reaped::None) {}
        let (finishers, main_pumps) = {
            let mut table = self.lock();
            (
                std::mem::take(&mut table.finishers),
                std::mem::take(&mut table.main_pumps),
            )
        };
        for thread in finishers.into_iter().chain(main_pumps) {
            let _ = thread.join();
        }
        self.lock_windows().remove(&MAIN_SESSION);
    }
}

fn system(what: &'static str, source: std::io::Error) -> SupervisorError {
    SupervisorError::StartFailed {
        reason: StartFailure::Other,
        message: format!("{what}: {source}"),
    }
}

/// Sets the size of the terminal whose master is `terminal` (the kernel then sends the
/// foreground process group SIGWINCH).
fn resize(terminal: &File, size: TerminalSize) -> std::io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A thread writing what the host sends to a session's stdin, so that a process that
/// does not read cannot stall the frames of other sessions. Its end closes a pipe; a
/// terminal gets its EOF character instead (^D ends a canonical-mode read at the start of
/// a line), since closing this clone of the master would not hang it up.
fn stdin_writer(mut stdin: File, tty: bool) -> Sender<Input> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        for input in receiver {
            match input {
                // A process that stopped reading closed its stdin; later input is dropped.
                Input::Data(bytes) => {
                    if stdin.write_all(&bytes).is_err() {
                        return;
                    }
                }
                Input::End => break,
            }
        }
        if tty {
            wait_until_read(&stdin, TERMINAL_EOF_WAIT);
            let _ = stdin.write_all(b"\x04");
        }
    });
    sender
}

/// How long a terminal's end waits for the workload to read the input before it.
const TERMINAL_EOF_WAIT: Duration = Duration::from_secs(2);

/// Waits (at most `limit`) until the workload has read what is queued on the terminal
/// whose master is `master`, as util-linux's `script` does before its EOF. Piped input
/// arrives before a shell's line editor switches the terminal to raw mode; a ^D queued
/// in canonical mode then reaches the editor as a NUL, not as the end, and it waits on.
fn wait_until_read(master: &File, limit: Duration) {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER opens the master's slave as a new descriptor, returned or -1.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is the new descriptor TIOCGPTPEER returned, owned by nobody else. It is
    // closed on return: the output pump's end is the last slave descriptor closing.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        let mut pollfd = libc::pollfd {
            fd: slave.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a zero timeout only asks whether input is pending.
        if unsafe { libc::poll(&mut pollfd, 1, 0) } <= 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends everything the `sources` yield as their stream's data of `session`, and each
/// stream's end when its source ends; each frame waits for room in the session's
/// `window`. One thread serves a session's stdout and stderr alike (poll(2)): a thread
/// less to start for every workload.
fn pump_output(
    mut sources: Vec<(File, Stream)>,
    session: SessionId,
    channel: &'static Channel,
    window: Arc<Window>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 * 1024.min(MAX_PAYLOAD)];
        while !sources.is_empty() {
            let mut polled: Vec<libc::pollfd> = sources
                .iter()
                .map(|(source, _)| libc::pollfd {
                    fd: source.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: `polled` holds one valid pollfd per source, and poll(2) writes only
            // their `revents`.
            let ready =
                unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, -1) };
            if ready < 0 {
                if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            let mut ended = Vec::new();
            for (index, pollfd) in polled.iter().enumerate() {
                if pollfd.revents == 0 {
                    continue;
                }
                let (source, stream) = &mut sources[index];
                match source.read(&mut buffer) {
                    Ok(0) => ended.push(index),
                    Ok(n) => {
                        // At most 64 KiB and a header: always within the window.
                        let charge = (HEADER_LEN + n) as u32;
                        if !window.spend(charge) {
                            return;
                        }
                        let data = Message::Data {
                            stream: *stream,
                            bytes: buffer[..n].to_vec(),
                        };
                        if channel.send(&Frame::new(session, data)).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // A terminal's master reads EIO once the last slave fd is closed: the end.
                    Err(_) => ended.push(index),
                }
            }
            for index in ended.into_iter().rev() {
                let (_, stream) = sources.remove(index);
                let _ = channel.send(&Frame::new(session, Message::Eof { stream }));
            }
        }
        // Sources given up on by a failed poll end too.
        for (_, stream) in sources {
            let _ = channel.send(&Frame::new(session, Message::Eof { stream }));
        }
    })
}
