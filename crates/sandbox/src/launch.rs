//! Booting one sandbox VM and driving its workload over the host-guest channel.
//!
//! The host listens on the channel's unix socket before the VMM starts; the VMM connects
//! to it. Then the guest's init says hello, the host answers with its hello and the run
//! spec, relays the workload's streams, forwards signals and terminal resizes, and takes
//! the result. Every phase has a deadline, and the VM process never outlives this call.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::{
    negotiate, read_frame, write_frame, write_stream, BootError, BootPhase, Frame, Hello, Message,
    ProtocolError, RunSpec, ShutdownRequest, SignalRequest, Stream, TerminalSize, WorkloadResult,
    CONTROL_SESSION, MAIN_SESSION,
};
use kiln_vm::{Accel, Backend, GuestEnd, VmError, VmProcess, VmSpec};
use serde::Serialize;

/// How long each phase may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// VMM start until it connects to the channel socket.
    pub connect: Duration,
    /// Channel connected until the workload started: kernel boot, init's mounts and the
    /// supervisor's checks.
    pub boot: Duration,
    /// Run spec sent until the workload's result; `None` waits as long as it runs.
    pub workload: Option<Duration>,
    /// Result received until the VM process has ended.
    pub shutdown: Duration,
    /// After a forwarded SIGINT/SIGTERM, how long the workload gets before the VM is killed.
    pub stop_grace: Duration,
}

impl Deadlines {
    /// Defaults for `accel`: software emulation boots several times slower.
    pub fn for_accel(accel: Accel) -> Self {
        let boot = match accel {
            Accel::Kvm => Duration::from_secs(20),
            Accel::Tcg => Duration::from_secs(90),
        };
        Self {
            connect: Duration::from_secs(15),
            boot,
            workload: None,
            shutdown: Duration::from_secs(15),
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// A request from kiln's side while the workload runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Forward this signal to the workload (kiln got it, e.g. SIGINT).
    Signal(i32),
    /// The terminal changed size (only meaningful for a tty session).
    Resize(TerminalSize),
    /// Stop the sandbox: the guest sends SIGTERM to every workload, SIGKILLs what is left
    /// after `grace`, syncs and powers off. The VM is killed if it has not ended by the
    /// shutdown deadline after that.
    Shutdown { grace: Duration },
    /// Send this frame to the guest unchanged (an exec session's frames, relayed by the
    /// sandbox's monitor).
    Guest(Frame),
}

/// Where the workload's streams go on the host.
pub struct HostIo {
    /// Streamed to the workload's stdin, then EOF; `None` gives it an empty stdin.
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    /// Receives what the guest says beyond the main session's output: its boot-phase
    /// reports and every frame of another session (exec sessions).
    pub guest_events: Option<Sender<Frame>>,
}

/// Durations of the phases of one VM run, as far as they were reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VmTimings {
    /// VMM process start until it connected to the channel.
    pub vmm_start: Option<Duration>,
    /// Kernel start until init ran (guest clock).
    pub kernel: Option<Duration>,
    /// init start until the supervisor started: mounts, overlay root, network.
    pub init: Option<Duration>,
    /// The supervisor's user check, filesystem preparation and privilege drop, until the
    /// workload started.
    pub supervisor: Option<Duration>,
    /// The workload's own run time (guest clock).
    pub workload: Option<Duration>,
    /// Workload end until the VM process ended (host clock).
    pub shutdown: Option<Duration>,
}

/// How a run ended when the workload ran.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchOutcome {
    pub result: WorkloadResult,
    pub timings: VmTimings,
}

/// A phase of a run, for deadline and failure reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    VmmStart,
    Boot,
    Workload,
    Shutdown,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::VmmStart => "VMM start (connecting to the channel)",
            Phase::Boot => "guest boot (kernel, init, supervisor)",
            Phase::Workload => "workload",
            Phase::Shutdown => "shutdown",
        })
    }
}

/// Why a run did not produce a workload result.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Vm(#[from] VmError),

    #[error("deadline for {phase} expired after {:.1} s{}", .after.as_secs_f64(), console_note(.console_tail))]
    Deadline {
        phase: Phase,
        after: Duration,
        console_tail: String,
    },

    #[error("guest boot failed at step {:?}: {}{}", .error.step, .error.message, console_note(.console_tail))]
    Boot {
        error: BootError,
        console_tail: String,
    },

    #[error("the guest kernel panicked during {phase}{}", console_note(.console_tail))]
    GuestPanic { phase: Phase, console_tail: String },

    #[error("the VM exited ({status}) during {phase} without a result{}", console_note(.console_tail))]
    VmExited {
        phase: Phase,
        status: String,
        console_tail: String,
    },

    #[error("host-guest channel failed during {phase}: {source}")]
    Channel { phase: Phase, source: ProtocolError },

    #[error("stopped by signal {signal}; the workload did not end within {:.0} s", .grace.as_secs_f64())]
    Interrupted { signal: i32, grace: Duration },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn console_note(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\nlast lines of the guest console:\n{tail}")
    }
}

/// Lines of the console log shown with a failure.
const CONSOLE_TAIL_LINES: usize = 25;

/// The last lines of the console log, read with a bounded amount of memory.
pub fn console_tail(path: &Path) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX_BYTES);
    let mut bytes = Vec::new();
    use std::io::Seek;
    if file.seek(std::io::SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
}

enum Event {
    Frame(Frame),
    ChannelClosed,
    ChannelError(ProtocolError),
    Control(Control),
}

/// Boots `spec`, runs `run` as the main session and returns its result.
pub fn launch(
    backend: &dyn Backend,
    spec: &VmSpec,
    run: RunSpec,
    deadlines: Deadlines,
    io: HostIo,
    control: Receiver<Control>,
) -> Result<LaunchOutcome, LaunchError> {
    let io_err = |context: String| move |source| LaunchError::Io { context, source };
    let socket = &spec.channel.socket;
    let listener =
        UnixListener::bind(socket).map_err(io_err(format!("listening on {}", socket.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("channel socket".into()))?;

    let started = Instant::now();
    let mut vm = backend.start(spec)?;
    let stream = accept(
        &listener,
        &mut vm,
        spec,
        started + deadlines.connect,
        deadlines.connect,
    )?;
    let mut timings = VmTimings {
        vmm_start: Some(started.elapsed()),
        ..VmTimings::default()
    };
    drop(listener);
    let _ = std::fs::remove_file(socket);

    stream
        .set_nonblocking(false)
        .map_err(io_err("channel socket".into()))?;
    let writer = Arc::new(Mutex::new(
        stream
            .try_clone()
            .map_err(io_err("channel socket".into()))?,
    ));
    let (events, inbox) = mpsc::channel();
    spawn_reader(stream, events.clone());
    spawn_control_forwarder(control, events.clone());

    let mut driver = Driver {
        spec,
        vm,
        writer,
        io_out: (io.stdout, io.stderr),
        stdin: io.stdin,
        guest_events: io.guest_events,
        run: Some(run),
        phase: Phase::Boot,
        deadline: Some(Instant::now() + deadlines.boot),
        phase_started: Instant::now(),
        deadlines,
        result: None,
        boot_times: Default::default(),
        stop_signal: None,
        workload_ended_at: None,
    };
    let outcome = driver.drive(&inbox);
    timings.kernel = driver.boot_times.kernel();
    timings.init = driver.boot_times.init();
    timings.supervisor = driver.boot_times.supervisor();
    timings.workload = driver.boot_times.workload();
    timings.shutdown = driver.workload_ended_at.map(|t| t.elapsed());
    outcome.map(|result| LaunchOutcome { result, timings })
}

/// Waits for the VMM to connect, watching that it has not died meanwhile.
fn accept(
    listener: &UnixListener,
    vm: &mut VmProcess,
    spec: &VmSpec,
    deadline: Instant,
    allowed: Duration,
) -> Result<UnixStream, LaunchError> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(LaunchError::Io {
                    context: "accepting the VMM's channel".into(),
                    source,
                })
            }
        }
        if let Some(status) = vm.try_wait()? {
            return Err(exited(Phase::VmmStart, vm, status, spec));
        }
        if Instant::now() >= deadline {
            vm.kill()?;
            return Err(LaunchError::Deadline {
                phase: Phase::VmmStart,
                after: allowed,
                console_tail: console_tail(&spec.console_log),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn exited(
    phase: Phase,
    vm: &mut VmProcess,
    status: std::process::ExitStatus,
    spec: &VmSpec,
) -> LaunchError {
    ended_without_result(
        phase,
        vm.guest_end(),
        status.to_string(),
        console_tail(&spec.console_log),
    )
}

/// Why the VM ended without a result. Only the VMM's own report of the guest's end can say
/// that the guest kernel panicked: the console is the guest's (and the workload's) to
/// write, so its text goes along for the reader but decides nothing.
fn ended_without_result(
    phase: Phase,
    guest_end: Option<GuestEnd>,
    status: String,
    console_tail: String,
) -> LaunchError {
    match guest_end {
        Some(GuestEnd::Reset) => LaunchError::GuestPanic {
            phase,
            console_tail,
        },
        Some(GuestEnd::PowerOff) | None => LaunchError::VmExited {
            phase,
            status,
            console_tail,
        },
    }
}

fn spawn_reader(mut stream: UnixStream, events: Sender<Event>) {
    std::thread::spawn(move || loop {
        let event = match read_frame(&mut stream) {
            Ok(Some(frame)) => Event::Frame(frame),
            Ok(None) => Event::ChannelClosed,
            Err(err) => Event::ChannelError(err),
        };
        let last = !matches!(event, Event::Frame(_));
        if events.send(event).is_err() || last {
            return;
        }
    });
}

fn spawn_control_forwarder(control: Receiver<Control>, events: Sender<Event>) {
    std::thread::spawn(move || {
        for request in control {
            if events.send(Event::Control(request)).is_err() {
                return;
            }
        }
    });
}

/// Guest clock readings of the boot phases.
#[derive(Debug, Default)]
struct BootTimes {
    init_started: Option<u64>,
    supervisor_started: Option<u64>,
    workload_started: Option<u64>,
    workload_ended: Option<u64>,
}

impl BootTimes {
    fn record(&mut self, phase: BootPhase, ns: u64) {
        match phase {
            BootPhase::InitStarted => self.init_started = Some(ns),
            BootPhase::SupervisorStarted => self.supervisor_started = Some(ns),
            BootPhase::WorkloadStarted => self.workload_started = Some(ns),
            BootPhase::WorkloadEnded => self.workload_ended = Some(ns),
            BootPhase::Shutdown => {}
        }
    }

    fn kernel(&self) -> Option<Duration> {
        self.init_started.map(Duration::from_nanos)
    }

    fn init(&self) -> Option<Duration> {
        Some(Duration::from_nanos(
            self.supervisor_started?.checked_sub(self.init_started?)?,
        ))
    }

    fn supervisor(&self) -> Option<Duration> {
        Some(Duration::from_nanos(
            self.workload_started?
                .checked_sub(self.supervisor_started?)?,
        ))
    }

    fn workload(&self) -> Option<Duration> {
        Some(Duration::from_nanos(
            self.workload_ended?.checked_sub(self.workload_started?)?,
        ))
    }
}

struct Driver<'a> {
    spec: &'a VmSpec,
    vm: VmProcess,
    writer: Arc<Mutex<UnixStream>>,
    io_out: (Box<dyn Write + Send>, Box<dyn Write + Send>),
    stdin: Option<Box<dyn Read + Send>>,
    guest_events: Option<Sender<Frame>>,
    run: Option<RunSpec>,
    phase: Phase,
    deadline: Option<Instant>,
    phase_started: Instant,
    deadlines: Deadlines,
    result: Option<WorkloadResult>,
    boot_times: BootTimes,
    stop_signal: Option<i32>,
    workload_ended_at: Option<Instant>,
}

impl Driver<'_> {
    fn drive(&mut self, inbox: &Receiver<Event>) -> Result<WorkloadResult, LaunchError> {
        loop {
            let wait = match self.deadline {
                Some(deadline) => deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
                None => Duration::from_millis(50),
            };
            match inbox.recv_timeout(wait) {
                Ok(Event::Frame(frame)) => self.on_frame(frame)?,
                Ok(Event::Control(request)) => self.on_control(request)?,
                Ok(Event::ChannelClosed) | Err(RecvTimeoutError::Disconnected) => {
                    // The guest closes the channel as it powers off; the VM's exit decides.
                    return self.finish_after_channel_end();
                }
                Ok(Event::ChannelError(source)) => {
                    self.vm.kill()?;
                    return Err(LaunchError::Channel {
                        phase: self.phase,
                        source,
                    });
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if let Some(status) = self.vm.try_wait()? {
                if let Some(result) = self.result.take() {
                    return Ok(result);
                }
                return Err(exited(self.phase, &mut self.vm, status, self.spec));
            }
            if let Some(deadline) = self.deadline {
                if Instant::now() >= deadline {
                    return self.on_deadline();
                }
            }
        }
    }

    fn on_deadline(&mut self) -> Result<WorkloadResult, LaunchError> {
        self.vm.kill()?;
        if let Some(result) = self.result.take() {
            // The workload finished; only the power-off was slow.
            tracing::warn!(
                "the guest did not power off within {:?}; killed it",
                self.deadlines.shutdown
            );
            return Ok(result);
        }
        if let Some(signal) = self.stop_signal {
            return Err(LaunchError::Interrupted {
                signal,
                grace: self.deadlines.stop_grace,
            });
        }
        Err(LaunchError::Deadline {
            phase: self.phase,
            after: self.phase_started.elapsed(),
            console_tail: console_tail(&self.spec.console_log),
        })
    }

    fn finish_after_channel_end(&mut self) -> Result<WorkloadResult, LaunchError> {
        let grace = Instant::now() + self.deadlines.shutdown;
        let status = match self.vm.wait_until(grace)? {
            Some(status) => status,
            None => self.vm.kill()?,
        };
        match self.result.take() {
            Some(result) => Ok(result),
            None => Err(exited(self.phase, &mut self.vm, status, self.spec)),
        }
    }

    fn enter(&mut self, phase: Phase, allowed: Option<Duration>) {
        self.phase = phase;
        self.phase_started = Instant::now();
        self.deadline = allowed.map(|d| self.phase_started + d);
    }

    fn send(&self, frame: &Frame) -> Result<(), LaunchError> {
        let mut writer = self.writer.lock().expect("channel writer lock");
        write_frame(&mut *writer, frame).map_err(|source| LaunchError::Channel {
            phase: self.phase,
            source,
        })
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), LaunchError> {
        let for_observer =
            frame.session > MAIN_SESSION || matches!(frame.message, Message::Phase(_));
        if let Some(events) = self.guest_events.as_ref().filter(|_| for_observer) {
            let _ = events.send(frame.clone());
        }
        if frame.session > MAIN_SESSION {
            return Ok(());
        }
        match frame.message {
            Message::Hello(theirs) => {
                let ours = Hello::ours(format!("kiln {}", env!("CARGO_PKG_VERSION")));
                negotiate(&ours, &theirs).map_err(|source| LaunchError::Channel {
                    phase: self.phase,
                    source,
                })?;
                self.send(&Frame::new(CONTROL_SESSION, Message::Hello(ours)))?;
                let run = self.run.take().expect("one hello per boot");
                self.send(&Frame::new(MAIN_SESSION, Message::Run(run)))?;
                self.start_stdin();
                // Still booting: init mounts the root and starts the supervisor next, all
                // under the boot deadline, until it reports the workload started.
            }
            Message::Phase(time) => {
                self.boot_times.record(time.phase, time.boottime_ns);
                if time.phase == BootPhase::WorkloadStarted && self.phase == Phase::Boot {
                    self.enter(Phase::Workload, self.deadlines.workload);
                }
                if time.phase == BootPhase::WorkloadEnded && self.workload_ended_at.is_none() {
                    self.workload_ended_at = Some(Instant::now());
                }
            }
            Message::BootError(error) => {
                // Give init a moment to power off by itself, then make sure it is gone.
                if self
                    .vm
                    .wait_until(Instant::now() + Duration::from_secs(5))?
                    .is_none()
                {
                    self.vm.kill()?;
                }
                let console_tail = console_tail(&self.spec.console_log);
                return Err(LaunchError::Boot {
                    error,
                    console_tail,
                });
            }
            Message::Data { stream, bytes } if frame.session == MAIN_SESSION => {
                let (out, err) = &mut self.io_out;
                let sink: &mut dyn Write = if stream == Stream::Stderr {
                    err.as_mut()
                } else {
                    out.as_mut()
                };
                // A closed host stdout (e.g. `| head`) must not abort the run.
                let _ = sink.write_all(&bytes).and_then(|_| sink.flush());
            }
            Message::Eof { .. } => {}
            Message::Result(result) if frame.session == MAIN_SESSION => {
                self.workload_ended_at.get_or_insert_with(Instant::now);
                self.result = Some(result);
                self.enter(Phase::Shutdown, Some(self.deadlines.shutdown));
            }
            other => tracing::debug!(
                session = frame.session,
                "ignoring unexpected frame {other:?}"
            ),
        }
        Ok(())
    }

    fn on_control(&mut self, request: Control) -> Result<(), LaunchError> {
        match (request, self.phase) {
            (Control::Signal(signal), Phase::Workload | Phase::Boot) if self.run.is_none() => {
                self.send(&Frame::new(
                    MAIN_SESSION,
                    Message::Signal(SignalRequest { signal }),
                ))?;
                if self.stop_signal.is_none()
                    && matches!(signal, libc_signals::SIGINT | libc_signals::SIGTERM)
                {
                    self.stop_signal = Some(signal);
                    let grace = Instant::now() + self.deadlines.stop_grace;
                    self.deadline = Some(self.deadline.map_or(grace, |d| d.min(grace)));
                }
            }
            (Control::Signal(signal), Phase::VmmStart | Phase::Boot) => {
                // The run spec is not even sent: nothing to stop gracefully.
                self.vm.kill()?;
                return Err(LaunchError::Interrupted {
                    signal,
                    grace: Duration::ZERO,
                });
            }
            (Control::Resize(size), Phase::Workload | Phase::Boot) if self.run.is_none() => {
                self.send(&Frame::new(MAIN_SESSION, Message::Resize(size)))?;
            }
            (Control::Shutdown { grace }, Phase::Workload | Phase::Boot) if self.run.is_none() => {
                let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
                self.send(&Frame::new(
                    CONTROL_SESSION,
                    Message::Shutdown(ShutdownRequest { grace_ms }),
                ))?;
                self.stop_signal.get_or_insert(libc_signals::SIGTERM);
                let end = Instant::now() + grace + self.deadlines.shutdown;
                self.deadline = Some(self.deadline.map_or(end, |d| d.min(end)));
            }
            (Control::Shutdown { .. }, Phase::VmmStart | Phase::Boot) => {
                self.vm.kill()?;
                return Err(LaunchError::Interrupted {
                    signal: libc_signals::SIGTERM,
                    grace: Duration::ZERO,
                });
            }
            (Control::Guest(frame), Phase::Workload | Phase::Boot) if self.run.is_none() => {
                self.send(&frame)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Streams kiln's stdin to the workload on its own thread, then EOF.
    fn start_stdin(&mut self) {
        let writer = Arc::clone(&self.writer);
        let stdin = self.stdin.take();
        std::thread::spawn(move || {
            let send =
                |frame: &Frame| write_frame(&mut *writer.lock().expect("writer lock"), frame);
            if let Some(mut input) = stdin {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let mut guard = writer.lock().expect("writer lock");
                            if write_stream(&mut *guard, MAIN_SESSION, Stream::Stdin, &buf[..n])
                                .is_err()
                            {
                                return;
                            }
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            }
            let _ = send(&Frame::new(
                MAIN_SESSION,
                Message::Eof {
                    stream: Stream::Stdin,
                },
            ));
        });
    }
}

/// The two signal numbers that mean "stop" (Linux x86_64 and aarch64 agree).
mod libc_signals {
    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let tail = console_tail(&path);
        assert!(
            tail.starts_with("line 75") && tail.ends_with("line 99"),
            "{tail}"
        );
        assert_eq!(console_tail(&dir.path().join("missing")), "");
    }

    #[test]
    fn boot_times_subtract_guest_clock_readings() {
        let mut times = BootTimes::default();
        times.record(BootPhase::InitStarted, 1_500_000_000);
        times.record(BootPhase::SupervisorStarted, 1_650_000_000);
        times.record(BootPhase::WorkloadStarted, 1_700_000_000);
        times.record(BootPhase::WorkloadEnded, 1_750_000_000);
        assert_eq!(times.kernel(), Some(Duration::from_millis(1500)));
        assert_eq!(times.init(), Some(Duration::from_millis(150)));
        assert_eq!(times.supervisor(), Some(Duration::from_millis(50)));
        assert_eq!(times.workload(), Some(Duration::from_millis(50)));
    }

    #[test]
    fn only_the_vmm_report_makes_a_kernel_panic() {
        let forged = "Kernel panic - not syncing: written by the workload".to_owned();
        for end in [None, Some(GuestEnd::PowerOff)] {
            let err = ended_without_result(
                Phase::Workload,
                end,
                "exit status: 0".into(),
                forged.clone(),
            );
            assert!(
                matches!(err, LaunchError::VmExited { .. }),
                "{end:?}: {err}"
            );
            assert!(
                err.to_string().contains(&forged),
                "the console is still shown: {err}"
            );
        }
        let err = ended_without_result(
            Phase::Boot,
            Some(GuestEnd::Reset),
            "exit status: 0".into(),
            String::new(),
        );
        assert!(
            matches!(
                err,
                LaunchError::GuestPanic {
                    phase: Phase::Boot,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("kernel panicked"), "{err}");
    }

    #[test]
    fn deadline_errors_name_the_phase_and_show_the_console() {
        let err = LaunchError::Deadline {
            phase: Phase::Boot,
            after: Duration::from_secs(90),
            console_tail: "Run /init as init process".into(),
        };
        let text = err.to_string();
        assert!(
            text.contains("guest boot") && text.contains("90.0 s") && text.contains("/init"),
            "{text}"
        );
    }
}
