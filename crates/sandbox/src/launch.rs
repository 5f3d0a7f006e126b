//! Booting one sandbox VM and driving its workload over the host-guest channel.
//!
//! The host listens on the channel's unix socket before the VMM starts; the VMM connects
//! to it. Then the guest's init says hello, the host answers with its hello and the run
//! spec, relays the workload's streams, forwards signals and terminal resizes, and takes
//! the result. Every phase has a deadline, and the VM process never outlives this call.
//!
//! Three kinds of thread share the work, so that none waits on another's reader: one
//! reads the channel and checks every frame (the [`crate::sessions`] rules), one writes
//! the main session's output to its destination, and this call's own thread drives the
//! phases, signals and deadlines; sending to the guest only queues frames.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use kiln_protocol::{
    negotiate, read_frame, BootError, BootPhase, Frame, Hello, Message, PhaseTime, ProtocolError,
    RunSpec, ShutdownRequest, SignalRequest, Stream, TerminalSize, WallClock, WorkloadResult,
    CONTROL_SESSION, MAIN_SESSION,
};
use kiln_vm::{Accel, Backend, GuestEnd, VmError, VmProcess, VmSpec};
use serde::Serialize;

use crate::sessions::{ExecChannel, GuestChannel, SessionError, SessionOutput};

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
}

/// Where the workload's streams go on the host. A destination that takes its output
/// slowly holds back the workload's writes in the guest (flow control), never the
/// host's memory.
pub struct HostIo {
    /// Streamed to the workload's stdin, then EOF; `None` gives it an empty stdin.
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    /// Hears about the guest beyond the main session (a sandbox's monitor does).
    pub guest_events: Option<Sender<GuestEvent>>,
    /// Hears each network denial (a foreground `kiln run` prints them).
    pub network_denials: Option<kiln_netstack::DenialNotice>,
}

/// What [`HostIo::guest_events`] hears.
pub enum GuestEvent {
    /// The channel is up: exec sessions are opened through this.
    Connected(ExecChannel),
    /// The guest reached a boot phase.
    Phase(PhaseTime),
}

/// Durations of the phases of one VM run, as far as they were reached. The host-clock
/// phases and the guest's boot phases between them tile the run: from the VMM's spawn to
/// the host hearing the workload's start is `vmm_start` + `kernel` + `init` + `supervisor`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VmTimings {
    /// QEMU's own start: from spawning the VMM until the guest kernel ran (host clock,
    /// with the guest's boot phases after it taken off).
    pub vmm_start: Option<Duration>,
    /// Kernel start until init ran (guest clock).
    pub kernel: Option<Duration>,
    /// init start until the supervisor started: mounts, overlay root, network.
    pub init: Option<Duration>,
    /// The supervisor's user check, filesystem preparation and privilege drop, until the
    /// workload started.
    pub supervisor: Option<Duration>,
    /// The workload's run, from the host hearing it started until it heard its result
    /// (host clock).
    pub workload: Option<Duration>,
    /// Workload end until the VM process ended (host clock).
    pub shutdown: Option<Duration>,
    /// When the VMM was spawned, the host heard that the workload started, and the VM
    /// ended (host clock), for figures that begin before the VM does or end after it,
    /// such as [`crate::RunTimings::to_workload`].
    #[serde(skip)]
    pub vmm_spawned_at: Option<Instant>,
    #[serde(skip)]
    pub workload_started_at: Option<Instant>,
    #[serde(skip)]
    pub ended_at: Option<Instant>,
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

    #[error("sending to the guest failed during {phase}: {source}")]
    Send { phase: Phase, source: SessionError },

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
    /// A checked frame the run handles itself (see [`GuestChannel::accept`]).
    Frame(Frame),
    ChannelClosed,
    ChannelError(ProtocolError),
    Control(Control),
    /// The main session's output is all written to its destination.
    OutputWritten,
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
        vmm_spawned_at: Some(started),
        ..VmTimings::default()
    };
    drop(listener);
    let _ = std::fs::remove_file(socket);

    stream
        .set_nonblocking(false)
        .map_err(io_err("channel socket".into()))?;
    let channel = GuestChannel::start(&stream).map_err(io_err("channel socket".into()))?;
    let (events, inbox) = mpsc::channel();
    spawn_reader(stream, channel.clone(), events.clone());
    spawn_control_forwarder(control, events.clone());
    if let Some(observer) = &io.guest_events {
        let _ = observer.send(GuestEvent::Connected(channel.exec()));
    }

    let mut driver = Driver {
        spec,
        vm,
        channel: channel.clone(),
        events,
        io_out: Some((io.stdout, io.stderr)),
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
        stopping: false,
        output_written: false,
        workload_started_at: None,
        workload_ended_at: None,
    };
    let outcome = driver.drive(&inbox);
    channel.close();
    let ended_at = Instant::now();
    timings.kernel = driver.boot_times.kernel();
    timings.init = driver.boot_times.init();
    timings.supervisor = driver.boot_times.supervisor();
    if let (Some(workload_started), Some(kernel), Some(init), Some(supervisor)) = (
        driver.workload_started_at,
        timings.kernel,
        timings.init,
        timings.supervisor,
    ) {
        let boot = workload_started.saturating_duration_since(started);
        timings.vmm_start = Some(boot.saturating_sub(kernel + init + supervisor));
    }
    timings.workload = driver
        .workload_started_at
        .zip(driver.workload_ended_at)
        .map(|(started, ended)| ended.saturating_duration_since(started));
    timings.shutdown = driver
        .workload_ended_at
        .map(|t| ended_at.saturating_duration_since(t));
    timings.workload_started_at = driver.workload_started_at;
    timings.ended_at = Some(ended_at);
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

/// Reads the channel until it ends or breaks: checks each frame and queues session output
/// for its reader (never waiting for one), passing the rest to the run.
fn spawn_reader(mut stream: UnixStream, channel: GuestChannel, events: Sender<Event>) {
    std::thread::spawn(move || loop {
        let event = match read_frame(&mut stream).map(|frame| frame.map(|f| channel.accept(f))) {
            Ok(Some(Ok(None))) => continue,
            Ok(Some(Ok(Some(frame)))) => Event::Frame(frame),
            // The VMM closing its end with credit the powered-off guest never read resets
            // the connection: an end like any other, which the VM's exit decides.
            Err(ProtocolError::Io(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                Event::ChannelClosed
            }
            Ok(Some(Err(err))) | Err(err) => Event::ChannelError(err),
            Ok(None) => Event::ChannelClosed,
        };
        let last = !matches!(event, Event::Frame(_));
        if last {
            channel.end_of_output();
        }
        if events.send(event).is_err() || last {
            return;
        }
    });
}

/// Writes the main session's output to `stdout` and `stderr` as fast as they take it,
/// then tells the run.
fn spawn_output_writer(
    mut output: SessionOutput,
    (mut stdout, mut stderr): (Box<dyn Write + Send>, Box<dyn Write + Send>),
    events: Sender<Event>,
) {
    std::thread::spawn(move || {
        while let Some(frame) = output.next() {
            if let Message::Data { stream, bytes } = frame.message {
                let sink = if stream == Stream::Stderr {
                    &mut stderr
                } else {
                    &mut stdout
                };
                // A closed host stdout (e.g. `| head`) must not abort the run.
                let _ = sink.write_all(&bytes).and_then(|()| sink.flush());
            }
        }
        let _ = events.send(Event::OutputWritten);
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
}

impl BootTimes {
    fn record(&mut self, phase: BootPhase, ns: u64) {
        match phase {
            BootPhase::InitStarted => self.init_started = Some(ns),
            BootPhase::SupervisorStarted => self.supervisor_started = Some(ns),
            BootPhase::WorkloadStarted => self.workload_started = Some(ns),
            BootPhase::WorkloadEnded | BootPhase::Shutdown => {}
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
}

/// Where the main session's output goes, until its writer thread takes it.
type Outputs = (Box<dyn Write + Send>, Box<dyn Write + Send>);

struct Driver<'a> {
    spec: &'a VmSpec,
    vm: VmProcess,
    channel: GuestChannel,
    /// For the output writer thread's report.
    events: Sender<Event>,
    io_out: Option<Outputs>,
    stdin: Option<Box<dyn Read + Send>>,
    guest_events: Option<Sender<GuestEvent>>,
    run: Option<RunSpec>,
    phase: Phase,
    deadline: Option<Instant>,
    phase_started: Instant,
    deadlines: Deadlines,
    result: Option<WorkloadResult>,
    boot_times: BootTimes,
    stop_signal: Option<i32>,
    /// A stop was asked for: output no longer waits for slow destinations.
    stopping: bool,
    output_written: bool,
    workload_started_at: Option<Instant>,
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
                Ok(Event::OutputWritten) => self.output_written = true,
                Ok(Event::ChannelClosed) | Err(RecvTimeoutError::Disconnected) => {
                    // The guest closes the channel as it powers off; the VM's exit decides.
                    return self.finish_after_channel_end(inbox);
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
                return self.finish_after_vm_exit(status, inbox);
            }
            if let Some(deadline) = self.deadline {
                if Instant::now() >= deadline {
                    return self.on_deadline(inbox);
                }
            }
        }
    }

    fn on_deadline(&mut self, inbox: &Receiver<Event>) -> Result<WorkloadResult, LaunchError> {
        self.vm.kill()?;
        if let Some(result) = self.result.take() {
            // The workload finished; only the power-off was slow.
            tracing::warn!(
                "the guest did not power off within {:?}; killed it",
                self.deadlines.shutdown
            );
            return Ok(self.wait_for_output(result, inbox));
        }
        if let Some(signal) = self.stop_signal {
            return Err(LaunchError::Interrupted {
                signal,
                grace: self.deadlines.stop_grace,
            });
        }
        // The workload's deadline is the user's --timeout: the guest's boot-time console
        // says nothing about it. A boot or shutdown that hangs is another matter.
        let console_tail = match self.phase {
            Phase::Workload => String::new(),
            _ => console_tail(&self.spec.console_log),
        };
        Err(LaunchError::Deadline {
            phase: self.phase,
            after: self.phase_started.elapsed(),
            console_tail,
        })
    }

    /// The VM is gone: what the guest sent before it went may still be on its way from
    /// the channel's reader (its result among it), so that is taken first, until the
    /// channel ends.
    fn finish_after_vm_exit(
        &mut self,
        status: std::process::ExitStatus,
        inbox: &Receiver<Event>,
    ) -> Result<WorkloadResult, LaunchError> {
        while self.result.is_none() {
            // The VMM's end of the socket is closed, so the reader reaches its end soon.
            match inbox.recv_timeout(self.deadlines.shutdown) {
                Ok(Event::Frame(frame)) => self.on_frame(frame)?,
                Ok(Event::OutputWritten) => self.output_written = true,
                Ok(Event::Control(_)) => {}
                Ok(Event::ChannelClosed | Event::ChannelError(_)) | Err(_) => break,
            }
        }
        match self.result.take() {
            Some(result) => Ok(self.wait_for_output(result, inbox)),
            None => Err(exited(self.phase, &mut self.vm, status, self.spec)),
        }
    }

    fn finish_after_channel_end(
        &mut self,
        inbox: &Receiver<Event>,
    ) -> Result<WorkloadResult, LaunchError> {
        let grace = Instant::now() + self.deadlines.shutdown;
        let status = match self.vm.wait_until(grace)? {
            Some(status) => status,
            None => self.vm.kill()?,
        };
        match self.result.take() {
            Some(result) => Ok(self.wait_for_output(result, inbox)),
            None => Err(exited(self.phase, &mut self.vm, status, self.spec)),
        }
    }

    /// With the result in and the VM gone, waits until the main session's output is
    /// written: as long as its destination takes (the guest waited for it too), unless
    /// the run is stopping and output had to be dropped for a destination that stopped
    /// taking it, or the stop's deadline passes.
    fn wait_for_output(
        &mut self,
        result: WorkloadResult,
        inbox: &Receiver<Event>,
    ) -> WorkloadResult {
        loop {
            if self.output_written
                || (self.stopping && self.channel.dropped_output(MAIN_SESSION))
                || (self.stopping && self.deadline.is_some_and(|d| Instant::now() >= d))
            {
                return result;
            }
            let stop_requested = match inbox.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::OutputWritten) => {
                    self.output_written = true;
                    false
                }
                Ok(Event::Control(Control::Signal(signal))) => is_stop(signal),
                Ok(Event::Control(Control::Shutdown { .. })) => true,
                Ok(_) | Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => return result,
            };
            if stop_requested && !self.stopping {
                self.stop_output();
                self.deadline = Some(Instant::now() + self.deadlines.stop_grace);
            }
        }
    }

    /// A stop was asked for: output stops waiting for destinations that fell behind.
    fn stop_output(&mut self) {
        self.channel.stop();
        self.stopping = true;
    }

    fn enter(&mut self, phase: Phase, allowed: Option<Duration>) {
        self.phase = phase;
        self.phase_started = Instant::now();
        self.deadline = allowed.map(|d| self.phase_started + d);
    }

    /// Queues a control frame for the guest; never waits for the guest to read it.
    fn send(&self, frame: Frame) -> Result<(), LaunchError> {
        self.channel
            .control(frame)
            .map_err(|source| LaunchError::Send {
                phase: self.phase,
                source,
            })
    }

    /// Handles a frame the channel's reader checked and passed on: hello, boot errors,
    /// phases and the main session's result.
    fn on_frame(&mut self, frame: Frame) -> Result<(), LaunchError> {
        let channel_error = |phase, source| LaunchError::Channel { phase, source };
        match frame.message {
            Message::Hello(theirs) => {
                let Some(run) = self.run.take() else {
                    return Err(channel_error(self.phase, ProtocolError::SecondHello));
                };
                let ours = Hello::ours(format!("kiln {}", env!("CARGO_PKG_VERSION")));
                negotiate(&ours, &theirs).map_err(|source| channel_error(self.phase, source))?;
                self.send(Frame::new(CONTROL_SESSION, Message::Hello(ours)))?;
                // Read as late as possible: the guest sets it to this plus its own time
                // since its hello, once its boot steps are done.
                self.send(Frame::new(
                    CONTROL_SESSION,
                    Message::Clock(WallClock::now()),
                ))?;
                let output = self
                    .channel
                    .open_main(run)
                    .map_err(|source| LaunchError::Send {
                        phase: self.phase,
                        source,
                    })?;
                if let Some(outputs) = self.io_out.take() {
                    spawn_output_writer(output, outputs, self.events.clone());
                }
                self.start_stdin();
                // Still booting: init mounts the root and starts the supervisor next, all
                // under the boot deadline, until it reports the workload started.
            }
            Message::Phase(time) => {
                if let Some(events) = &self.guest_events {
                    let _ = events.send(GuestEvent::Phase(time));
                }
                self.boot_times.record(time.phase, time.boottime_ns);
                if time.phase == BootPhase::WorkloadStarted && self.phase == Phase::Boot {
                    self.workload_started_at = Some(Instant::now());
                    self.enter(Phase::Workload, self.deadlines.workload);
                }
                if time.phase == BootPhase::WorkloadEnded {
                    self.workload_ended_at.get_or_insert_with(Instant::now);
                    self.channel.end_exec_sessions();
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
            Message::Result(result) => {
                self.workload_ended_at.get_or_insert_with(Instant::now);
                self.result = Some(result);
                self.enter(Phase::Shutdown, Some(self.deadlines.shutdown));
                if self.spec.disks.iter().all(|disk| disk.read_only) {
                    // Nothing of this VM outlives it: no writable disk to leave clean (the
                    // upper is tmpfs, and 9p volumes are written through at once), and the
                    // result is the guest's last word (its sessions' output and results
                    // came before it), so QEMU is ended now instead of waiting for the
                    // guest to power off.
                    self.vm.kill()?;
                } else {
                    // The guest powers off only once the result is here: its write queued
                    // the frame in the virtqueue, and what QEMU has not yet moved to this
                    // socket when power-off ends it is lost. A VM already gone needs no
                    // reply.
                    let ack = ShutdownRequest { grace_ms: 0 };
                    let _ = self.send(Frame::new(CONTROL_SESSION, Message::Shutdown(ack)));
                }
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
                self.send(Frame::new(
                    MAIN_SESSION,
                    Message::Signal(SignalRequest { signal }),
                ))?;
                if is_stop(signal) {
                    self.stop_output();
                    if self.stop_signal.is_none() {
                        self.stop_signal = Some(signal);
                        let grace = Instant::now() + self.deadlines.stop_grace;
                        self.deadline = Some(self.deadline.map_or(grace, |d| d.min(grace)));
                    }
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
                self.send(Frame::new(MAIN_SESSION, Message::Resize(size)))?;
            }
            (Control::Shutdown { grace }, Phase::Workload | Phase::Boot) if self.run.is_none() => {
                let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
                self.send(Frame::new(
                    CONTROL_SESSION,
                    Message::Shutdown(ShutdownRequest { grace_ms }),
                ))?;
                self.stop_output();
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
            _ => {}
        }
        Ok(())
    }

    /// Streams kiln's stdin to the workload on its own thread, then EOF; it waits while
    /// the input queue is full.
    fn start_stdin(&mut self) {
        let channel = self.channel.clone();
        let stdin = self.stdin.take();
        std::thread::spawn(move || {
            if let Some(mut input) = stdin {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let data = Message::Data {
                                stream: Stream::Stdin,
                                bytes: buf[..n].to_vec(),
                            };
                            if channel.input(Frame::new(MAIN_SESSION, data)).is_err() {
                                return;
                            }
                        }
                        Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            }
            let eof = Message::Eof {
                stream: Stream::Stdin,
            };
            let _ = channel.input(Frame::new(MAIN_SESSION, eof));
        });
    }
}

/// Whether `signal` asks the workload to stop (SIGINT, SIGTERM).
fn is_stop(signal: i32) -> bool {
    matches!(signal, libc_signals::SIGINT | libc_signals::SIGTERM)
}

/// The two signal numbers that mean "stop" (Linux x86_64 and aarch64 agree).
mod libc_signals {
    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};

    use kiln_protocol::{
        write_frame, Identity, Kind, RunAs, SessionId, HEADER_LEN, MAGIC, WIRE_VERSION,
    };
    use kiln_vm::qemu::Qemu;
    use kiln_vm::{Channel, Network};

    use super::*;

    fn run_spec() -> RunSpec {
        RunSpec {
            argv: vec!["true".into()],
            env: Vec::new(),
            cwd: None,
            identity: Identity {
                run_as: RunAs::Uid,
                uid: 1000,
                gid: 1000,
            },
            tty: false,
            terminal: None,
            task: None,
            openshell: None,
        }
    }

    /// The stand-in VMM of [`against_scripted_guest`]; bash, not sh, because dash takes
    /// only single-digit descriptors in a redirection.
    const SCRIPTED_VMM: &str = r#"#!/bin/bash
for arg do
    case $arg in socket,id=kiln-qmp,fd=*) fd=${arg##*fd=} ;; esac
done
eval "exec 3<&$fd 4>&$fd"
printf '{"QMP":{"version":{},"capabilities":[]}}\n' >&4
for command in qmp_capabilities cont; do
    read -r _ <&3
    printf '{"return":{}}\n' >&4
done
# Stays this script (its command line names it, see `vmm_channel`) until killed.
while read -r _ <&3; do :; done
"#;

    /// The channel socket kiln handed the scripted VMM `script` (its `kilnchan` chardev's
    /// descriptor), taken from the running script with pidfd_getfd.
    fn vmm_channel(script: &Path) -> UnixStream {
        use std::os::fd::FromRawFd;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "the scripted VMM never started");
            let found = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .find_map(|entry| {
                    let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
                    let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                    let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
                    if !cmdline.contains(&*script.to_string_lossy()) {
                        return None;
                    }
                    let fd: i32 = cmdline
                        .split('\0')
                        .find_map(|arg| arg.strip_prefix("socket,id=kilnchan,fd="))?
                        .parse()
                        .ok()?;
                    Some((pid, fd))
                });
            if let Some((pid, fd)) = found {
                // SAFETY: plain system calls; the descriptors they return are ours.
                unsafe {
                    let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
                    if pidfd >= 0 {
                        let ours = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0);
                        libc::close(pidfd as i32);
                        if ours >= 0 {
                            return UnixStream::from_raw_fd(ours as i32);
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs launch's host side against a scripted guest. A compromised guest cannot be
    /// produced from a real VM here (it would take a subverted guest kernel or kiln-init),
    /// so the test plays the guest: `guest` gets the channel socket kiln handed the VMM
    /// (taken from it, see [`vmm_channel`]), after the hellos and the run spec, and the "VMM" that launch starts and
    /// kills is a shell script that answers QEMU's machine protocol on the descriptor it
    /// is given (greeting, `qmp_capabilities`, `cont`), then sleeps.
    fn against_scripted_guest(
        stdout: Box<dyn Write + Send>,
        guest: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> Result<LaunchOutcome, LaunchError> {
        against_scripted_guest_on(Disks::ReadOnly, stdout, guest)
    }

    /// Whether the scripted VM has a writable disk, which it must leave clean.
    enum Disks {
        ReadOnly,
        Writable,
    }

    fn against_scripted_guest_on(
        disks: Disks,
        stdout: Box<dyn Write + Send>,
        guest: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> Result<LaunchOutcome, LaunchError> {
        let dir = tempfile::tempdir().unwrap();
        // The VMM runs as kiln-vmm when the tests run as root: it must reach its script.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let vmm = dir.path().join("vmm");
        std::fs::write(&vmm, SCRIPTED_VMM).unwrap();
        std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
        for file in ["kernel", "initramfs", "upper.ext4"] {
            std::fs::write(dir.path().join(file), b"").unwrap();
        }
        let disks = match disks {
            Disks::ReadOnly => Vec::new(),
            Disks::Writable => vec![kiln_vm::Disk {
                id: kiln_protocol::UPPER_DISK_ID.into(),
                path: dir.path().join("upper.ext4"),
                read_only: false,
            }],
        };
        let spec = VmSpec {
            kernel: dir.path().join("kernel"),
            initramfs: dir.path().join("initramfs"),
            cmdline: Vec::new(),
            disks,
            shares: Vec::new(),
            cpus: 1,
            cpu_millis: 1000,
            memory_mib: 128,
            network: Network::None,
            channel: Channel {
                socket: dir.path().join("channel.sock"),
                port_name: kiln_protocol::CHANNEL_PORT.into(),
            },
            console_log: dir.path().join("console.log"),
            accel: Accel::Tcg,
        };
        let script = vmm.clone();
        let peer = std::thread::spawn(move || {
            let mut stream = vmm_channel(&script);
            let hello = Hello::ours("scripted guest");
            write_frame(
                &mut stream,
                &Frame::new(CONTROL_SESSION, Message::Hello(hello)),
            )
            .unwrap();
            for expected in [Kind::Hello, Kind::Clock, Kind::Run] {
                let frame = read_frame(&mut stream).unwrap().unwrap();
                assert_eq!(frame.message.kind(), expected);
                if let Message::Clock(clock) = frame.message {
                    // The host's own clock, read as it answered.
                    let skew = WallClock::now().unix_ns.abs_diff(clock.unix_ns);
                    assert!(skew < 60_000_000_000, "clock {clock:?} is not now");
                }
            }
            guest(&mut stream);
            stream
        });
        let deadlines = Deadlines {
            connect: Duration::from_secs(10),
            boot: Duration::from_secs(60),
            workload: None,
            shutdown: Duration::from_secs(1),
            stop_grace: Duration::from_secs(1),
        };
        let (_keep_open, control) = mpsc::channel();
        let io = HostIo {
            stdin: None,
            stdout,
            stderr: Box::new(std::io::sink()),
            guest_events: None,
            network_denials: None,
        };
        let outcome = launch(
            &Qemu::with_binary(&vmm),
            &spec,
            run_spec(),
            deadlines,
            io,
            control,
        );
        drop(peer.join().expect("the scripted guest ran its script"));
        outcome
    }

    /// Raw bytes of a frame, for payloads the encoder refuses to write.
    fn raw_frame(kind: Kind, session: SessionId, payload: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend([WIRE_VERSION, kind as u8, 0, 0]);
        bytes.extend(session.to_be_bytes());
        bytes.extend((payload.len() as u32).to_be_bytes());
        bytes.extend(payload);
        bytes
    }

    fn channel_error(outcome: Result<LaunchOutcome, LaunchError>) -> ProtocolError {
        match outcome {
            Err(LaunchError::Channel { source, .. }) => source,
            Err(other) => panic!("expected a channel error, got: {other}"),
            Ok(outcome) => panic!("expected a channel error, got {outcome:?}"),
        }
    }

    /// Collects what the run writes to its stdout.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A stdout that takes nothing until the test lets it go (drops the sender).
    struct Stuck(Mutex<mpsc::Receiver<()>>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.lock().unwrap().recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn send(stream: &mut UnixStream, session: SessionId, message: Message) {
        write_frame(stream, &Frame::new(session, message)).unwrap();
    }

    #[test]
    fn an_honest_guest_gets_its_output_written_and_its_result_returned() {
        let stdout = Captured::default();
        let outcome = against_scripted_guest(Box::new(stdout.clone()), |guest| {
            for text in ["hello ", "world"] {
                let bytes = text.as_bytes().to_vec();
                let stream = Stream::Stdout;
                send(guest, MAIN_SESSION, Message::Data { stream, bytes });
            }
            let stream = Stream::Stdout;
            send(guest, MAIN_SESSION, Message::Eof { stream });
            let result = WorkloadResult::Exited { code: 3 };
            send(guest, MAIN_SESSION, Message::Result(result));
        })
        .unwrap();
        assert_eq!(outcome.result, WorkloadResult::Exited { code: 3 });
        assert_eq!(stdout.0.lock().unwrap().as_slice(), b"hello world");
    }

    /// The guest's end of a main session without output: its stdout's end, then exit 0.
    fn end_main_session(guest: &mut UnixStream) {
        let stream = Stream::Stdout;
        send(guest, MAIN_SESSION, Message::Eof { stream });
        let result = WorkloadResult::Exited { code: 0 };
        send(guest, MAIN_SESSION, Message::Result(result));
    }

    #[test]
    fn a_vm_with_nothing_to_keep_is_ended_at_its_result() {
        let (frames_tx, frames_rx) = mpsc::channel();
        let outcome = against_scripted_guest(Box::new(std::io::sink()), move |guest| {
            end_main_session(guest);
            // Everything the host sends until it closes the channel.
            let mut kinds = Vec::new();
            while let Ok(Some(frame)) = read_frame(guest) {
                kinds.push(frame.message.kind());
            }
            frames_tx.send(kinds).unwrap();
        })
        .unwrap();
        assert_eq!(outcome.result, WorkloadResult::Exited { code: 0 });
        let kinds = frames_rx.recv().unwrap();
        assert!(
            !kinds.contains(&Kind::Shutdown),
            "a VM without a writable disk is killed, not asked to power off: {kinds:?}"
        );
    }

    #[test]
    fn the_guest_hears_its_result_arrived_before_it_powers_off() {
        let (acked_tx, acked_rx) = mpsc::channel();
        let outcome =
            against_scripted_guest_on(Disks::Writable, Box::new(std::io::sink()), move |guest| {
                end_main_session(guest);
                // What kiln-init waits for before it powers off; the main session's stdin end
                // and credit may come first.
                let ack = loop {
                    let frame = read_frame(guest).unwrap().expect("the host replies");
                    if frame.session == CONTROL_SESSION {
                        break frame;
                    }
                };
                acked_tx.send(ack).unwrap();
            })
            .unwrap();
        assert_eq!(outcome.result, WorkloadResult::Exited { code: 0 });
        let ack = acked_rx.recv().unwrap();
        assert_eq!(ack.session, CONTROL_SESSION);
        assert_eq!(
            ack.message,
            Message::Shutdown(ShutdownRequest { grace_ms: 0 })
        );
    }

    #[test]
    fn a_second_hello_is_a_typed_error() {
        let err = channel_error(against_scripted_guest(Box::new(std::io::sink()), |guest| {
            send(guest, CONTROL_SESSION, Message::Hello(Hello::ours("again")));
        }));
        assert!(matches!(err, ProtocolError::SecondHello), "{err}");
    }

    #[test]
    fn an_out_of_range_signal_or_exit_code_is_a_typed_error() {
        for (payload, accepted) in [
            (r#"{"outcome":"killed","signal":2147483647}"#, "1 to 64"),
            (r#"{"outcome":"exited","code":300}"#, "0 to 255"),
        ] {
            let err = channel_error(against_scripted_guest(Box::new(std::io::sink()), |guest| {
                let bytes = raw_frame(Kind::Result, MAIN_SESSION, payload.as_bytes());
                guest.write_all(&bytes).unwrap();
            }));
            assert!(
                matches!(
                    err,
                    ProtocolError::BadPayload {
                        kind: Kind::Result,
                        ..
                    }
                ) && err.to_string().contains(accepted),
                "{payload}: {err}"
            );
        }
    }

    #[test]
    fn a_frame_for_a_session_the_host_never_opened_is_a_typed_error() {
        let err = channel_error(against_scripted_guest(Box::new(std::io::sink()), |guest| {
            let bytes = b"not yours".to_vec();
            let stream = Stream::Stdout;
            send(guest, 7, Message::Data { stream, bytes });
        }));
        assert!(
            matches!(err, ProtocolError::UnknownSession { session: 7, .. }),
            "{err}"
        );
    }

    #[test]
    fn an_oversize_length_is_refused_from_the_header() {
        let err = channel_error(against_scripted_guest(Box::new(std::io::sink()), |guest| {
            // Only the header: the host must refuse it without waiting for 4 GiB.
            let mut header = raw_frame(Kind::StdoutData, MAIN_SESSION, b"");
            header[HEADER_LEN - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
            guest.write_all(&header).unwrap();
        }));
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn a_guest_that_ignores_its_window_is_refused() {
        let (release, stuck) = mpsc::channel();
        let outcome = against_scripted_guest(Box::new(Stuck(Mutex::new(stuck))), |guest| {
            // 17 frames of 64 KiB with their headers are more than the 1 MiB window, and
            // the stuck stdout lets no credit come back.
            // The host may hang up before the last of them.
            for _ in 0..17 {
                let bytes = vec![0u8; 64 * 1024];
                let stream = Stream::Stdout;
                let data = Frame::new(MAIN_SESSION, Message::Data { stream, bytes });
                if write_frame(guest, &data).is_err() {
                    break;
                }
            }
        });
        drop(release);
        let err = channel_error(outcome);
        assert!(
            matches!(
                err,
                ProtocolError::WindowExceeded {
                    session: MAIN_SESSION,
                    ..
                }
            ),
            "{err}"
        );
    }

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
