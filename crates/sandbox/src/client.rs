//! Talking to a running sandbox's monitor over `monitor.sock`: stopping it, and exec
//! sessions (another process in the sandbox, as the sandbox identity).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::{
    negotiate, read_frame, write_frame, write_stream, Frame, GuestTask, Hello, Message,
    ProtocolError, RunSpec, SessionId, ShutdownRequest, SignalRequest, Stream, TerminalSize,
    WorkloadResult, CONTROL_SESSION, MAIN_SESSION,
};

use crate::error::{Error, ErrorKind};
use crate::launch::{Control, HostIo};
use crate::request::ExecRequest;
use crate::spec::{build_run_spec, ImageDefaults, Overrides};
use crate::state::{
    SandboxDir, SandboxRecord, StateError, StateRecord, MONITOR_SOCKET, STATE_FILE,
};

/// The session an exec connection runs its command in (one command per connection).
const EXEC_SESSION: SessionId = 2;

/// After the grace period, how long the guest may take to sync and power off and the
/// monitor to record the end before `stop` kills the monitor (and with it the VM).
const STOP_MARGIN: Duration = Duration::from_secs(40);

/// Output of an exec session, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended; nothing follows.
    Exited(WorkloadResult),
}

/// A running exec session: read its output with [`ExecSession::next`], feed it through
/// [`ExecSession::input`], or hand both to [`ExecSession::run`].
pub struct ExecSession {
    id: String,
    reader: UnixStream,
    input: ExecInput,
}

/// The sending half of an exec session; cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct ExecInput {
    writer: Arc<Mutex<UnixStream>>,
}

/// A sandbox's monitor that cannot be reached, or failed.
#[derive(Debug, thiserror::Error)]
#[error("sandbox {id}: monitor: {message}")]
pub struct MonitorError {
    pub id: String,
    pub message: String,
}

impl From<MonitorError> for Error {
    fn from(err: MonitorError) -> Self {
        Error::new(ErrorKind::Internal, err)
    }
}

fn channel_err(sandbox_id: &str, err: ProtocolError) -> MonitorError {
    MonitorError {
        id: sandbox_id.to_owned(),
        message: err.to_string(),
    }
}

/// Connects to the monitor and exchanges hellos.
fn connect(sandbox: &SandboxDir) -> Result<UnixStream, Error> {
    if !sandbox.file(MONITOR_SOCKET).exists() && sandbox.monitor_alive() {
        let pid = sandbox
            .read_json::<StateRecord>(STATE_FILE)
            .ok()
            .and_then(|s| s.monitor_pid);
        return Err(MonitorError {
            id: sandbox.id().to_owned(),
            message: format!(
                "it runs in the foreground under `kiln run` (pid {}), which has no monitor socket; \
                 stop it there, or start sandboxes with `kiln start` or `kiln run -d`",
                pid.map_or("unknown".to_owned(), |p| p.to_string())
            ),
        }
        .into());
    }
    let (address, _dir) = sandbox.monitor_socket()?;
    let mut stream = UnixStream::connect(&address).map_err(|e| MonitorError {
        id: sandbox.id().to_owned(),
        message: format!(
            "connecting to {}: {e}",
            sandbox.file(MONITOR_SOCKET).display()
        ),
    })?;
    let ours = Hello::ours(format!("kiln {}", env!("CARGO_PKG_VERSION")));
    write_frame(
        &mut stream,
        &Frame::new(CONTROL_SESSION, Message::Hello(ours.clone())),
    )
    .map_err(|e| channel_err(sandbox.id(), e))?;
    match read_frame(&mut stream).map_err(|e| channel_err(sandbox.id(), e))? {
        Some(Frame {
            message: Message::Hello(theirs),
            ..
        }) => {
            negotiate(&ours, &theirs).map_err(|e| channel_err(sandbox.id(), e))?;
            Ok(stream)
        }
        Some(other) => Err(MonitorError {
            id: sandbox.id().to_owned(),
            message: format!("expected its hello, got {other:?}"),
        }
        .into()),
        None => Err(StateError::NotRunning(sandbox.id().to_owned()).into()),
    }
}

/// Asks the monitor to stop the sandbox and waits until it has; kills the monitor (and so
/// the VM) if it has not ended `grace` + a margin later.
pub fn shutdown(sandbox: &SandboxDir, grace: Duration) -> Result<(), Error> {
    let mut stream = match connect(sandbox) {
        Ok(stream) => stream,
        // It ended between the liveness check and the connection.
        Err(_) if !sandbox.monitor_alive() => return Ok(()),
        Err(err) => return Err(err),
    };
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let request = Frame::new(
        CONTROL_SESSION,
        Message::Shutdown(ShutdownRequest { grace_ms }),
    );
    write_frame(&mut stream, &request).map_err(|e| channel_err(sandbox.id(), e))?;
    let deadline = Instant::now() + grace + STOP_MARGIN;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return kill_monitor(sandbox);
        }
        let _ = stream.set_read_timeout(Some(left));
        match read_frame(&mut stream) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(ProtocolError::Io(err))
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return kill_monitor(sandbox)
            }
            Err(_) => break,
        }
    }
    // The connection closes just before the monitor exits and lets go of its lock.
    wait_until_gone(sandbox, Duration::from_secs(10));
    Ok(())
}

/// Sends `signal` to the sandbox's main workload through its monitor.
pub fn signal_main(sandbox: &SandboxDir, signal: i32) -> Result<(), Error> {
    let mut stream = connect(sandbox)?;
    let request = Frame::new(MAIN_SESSION, Message::Signal(SignalRequest { signal }));
    write_frame(&mut stream, &request).map_err(|e| channel_err(sandbox.id(), e))?;
    // The monitor has the frame once it reads on; closing first could lose it with the
    // connection, so wait for the monitor's end of it (it keeps the connection open).
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = read_frame(&mut stream);
    Ok(())
}

/// SIGKILLs a monitor that did not stop; its VM dies with it (PDEATHSIG) and the
/// sandbox then reads as failed.
fn kill_monitor(sandbox: &SandboxDir) -> Result<(), Error> {
    let state: StateRecord = sandbox.read_json(STATE_FILE)?;
    if let Some(pid) = state.monitor_pid.and_then(|p| i32::try_from(p).ok()) {
        tracing::warn!(
            "sandbox {}: the monitor did not stop in time; killing it",
            sandbox.id()
        );
        // SAFETY: kill has no memory-safety preconditions; the pid is the monitor's, which
        // still holds its lock (checked by the caller), so it has not been reused.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_until_gone(sandbox, Duration::from_secs(10));
    Ok(())
}

fn wait_until_gone(sandbox: &SandboxDir, limit: Duration) {
    let deadline = Instant::now() + limit;
    while sandbox.monitor_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `request` in the sandbox: the main workload's identity and environment, with
/// the request's additions.
pub fn exec(
    sandbox: &SandboxDir,
    record: &SandboxRecord,
    request: ExecRequest,
) -> Result<ExecSession, Error> {
    let defaults = ImageDefaults {
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        env: record.run.env.clone(),
        working_dir: record.run.cwd.clone(),
    };
    let overrides = Overrides {
        entrypoint: None,
        cmd: request.argv,
        env: request.env,
        working_dir: request.workdir,
    };
    let spec = build_run_spec(&defaults, &overrides, record.run.identity, request.terminal)?;
    open_session(sandbox, spec)
}

/// Starts kiln-init's `task` in the sandbox, as the sandbox's identity in its home.
pub fn exec_task(
    sandbox: &SandboxDir,
    record: &SandboxRecord,
    task: GuestTask,
) -> Result<ExecSession, Error> {
    let spec = RunSpec {
        // Only names the task (the guest runs its own binary): what `kiln top` shows.
        argv: vec!["kiln-init-task".into()],
        env: record.run.env.clone(),
        cwd: None,
        identity: record.run.identity,
        tty: false,
        terminal: None,
        task: Some(task),
        openshell: None,
    };
    open_session(sandbox, spec)
}

/// Opens the exec session that runs `spec`.
fn open_session(sandbox: &SandboxDir, spec: RunSpec) -> Result<ExecSession, Error> {
    let mut stream = connect(sandbox)?;
    write_frame(&mut stream, &Frame::new(EXEC_SESSION, Message::Run(spec)))
        .map_err(|e| channel_err(sandbox.id(), e))?;
    let writer = stream
        .try_clone()
        .map_err(|e| channel_err(sandbox.id(), e.into()))?;
    Ok(ExecSession {
        id: sandbox.id().to_owned(),
        reader: stream,
        input: ExecInput {
            writer: Arc::new(Mutex::new(writer)),
        },
    })
}

impl ExecInput {
    fn send(&self, message: Message) -> Result<(), ProtocolError> {
        write_frame(
            &mut *self.writer.lock().expect("exec writer lock"),
            &Frame::new(EXEC_SESSION, message),
        )
    }

    /// Bytes for the command's stdin.
    pub fn stdin(&self, bytes: &[u8]) -> Result<(), ProtocolError> {
        write_stream(
            &mut *self.writer.lock().expect("exec writer lock"),
            EXEC_SESSION,
            Stream::Stdin,
            bytes,
        )
    }

    /// Closes the command's stdin.
    pub fn close_stdin(&self) -> Result<(), ProtocolError> {
        self.send(Message::Eof {
            stream: Stream::Stdin,
        })
    }

    /// Delivers `signal` to the command.
    pub fn signal(&self, signal: i32) -> Result<(), ProtocolError> {
        self.send(Message::Signal(SignalRequest { signal }))
    }

    /// The command's terminal changed size.
    pub fn resize(&self, size: TerminalSize) -> Result<(), ProtocolError> {
        self.send(Message::Resize(size))
    }
}

impl ExecSession {
    /// The sending half, for other threads.
    pub fn input(&self) -> ExecInput {
        self.input.clone()
    }

    /// The next output of the command; blocks. An error when the connection ends before
    /// the command's result (the sandbox stopped).
    // Not an Iterator: it ends with a result or an error, never with `None`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<ExecOutput, Error> {
        loop {
            let frame = match read_frame(&mut self.reader) {
                Ok(frame) => frame,
                // The monitor cuts its connections off, mid-frame if need be, once the
                // sandbox has ended.
                Err(ProtocolError::Truncated { .. }) => None,
                Err(ProtocolError::Io(err))
                    if err.kind() == std::io::ErrorKind::ConnectionReset =>
                {
                    None
                }
                Err(err) => return Err(channel_err(&self.id, err).into()),
            };
            let Some(frame) = frame else {
                return Err(MonitorError {
                    id: self.id.clone(),
                    message: "the sandbox stopped before the command ended".into(),
                }
                .into());
            };
            if frame.session != EXEC_SESSION {
                continue;
            }
            match frame.message {
                Message::Data {
                    stream: Stream::Stdout,
                    bytes,
                } => return Ok(ExecOutput::Stdout(bytes)),
                Message::Data {
                    stream: Stream::Stderr,
                    bytes,
                } => return Ok(ExecOutput::Stderr(bytes)),
                Message::Result(result) => return Ok(ExecOutput::Exited(result)),
                _ => {}
            }
        }
    }

    /// Runs the session to its end: `io.stdin` (if any, else an empty stdin) streams to
    /// the command, its output to `io.stdout`/`io.stderr`; `control` delivers signals and
    /// terminal resizes.
    pub fn run(mut self, io: HostIo, control: Receiver<Control>) -> Result<WorkloadResult, Error> {
        let input = self.input();
        let stdin = io.stdin;
        std::thread::spawn(move || {
            if let Some(mut stdin) = stdin {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) if input.stdin(&buf[..n]).is_ok() => {}
                        Ok(_) => return,
                        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
            let _ = input.close_stdin();
        });
        let input = self.input();
        std::thread::spawn(move || {
            for request in control {
                let sent = match request {
                    Control::Signal(signal) => input.signal(signal),
                    Control::Resize(size) => input.resize(size),
                    _ => Ok(()),
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        let (mut stdout, mut stderr) = (io.stdout, io.stderr);
        loop {
            // A closed host stdout (e.g. `| head`) must not end the session.
            match self.next()? {
                ExecOutput::Stdout(bytes) => {
                    let _ = stdout.write_all(&bytes).and_then(|()| stdout.flush());
                }
                ExecOutput::Stderr(bytes) => {
                    let _ = stderr.write_all(&bytes).and_then(|()| stderr.flush());
                }
                ExecOutput::Exited(result) => return Ok(result),
            }
        }
    }
}
