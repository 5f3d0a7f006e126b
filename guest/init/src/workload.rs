//! Running the workload as PID 1: the supervisor starts it, init pumps its streams to and
//! from the host, forwards signals, reaps every process, and turns the workload's end
//! into its typed result.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kiln_protocol::{
    BootError, BootPhase, BootStep, Frame, Message, PhaseTime, RunSpec, Stream, WorkloadResult,
    CONTROL_SESSION, MAIN_SESSION, MAX_PAYLOAD,
};
use kiln_supervisor::{io_for_spec, Mode, Supervisor, Workload};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::channel::Channel;
use crate::rootfs::failed;

/// The cgroup the workload runs in: the memory controller's memory.events tells an OOM
/// kill apart from another SIGKILL.
const WORKLOAD_CGROUP: &str = "/sys/fs/cgroup/workload";

/// Signals init passes on to the workload (PID 1 gets no default action for them).
const FORWARDED_SIGNALS: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// The workload's pid for the signal handler; 0 while there is none.
static WORKLOAD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let pid = WORKLOAD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, signal) };
    }
}

fn install_signal_forwarding() -> std::io::Result<()> {
    for signal in FORWARDED_SIGNALS {
        // SAFETY: the handler only loads an atomic and calls kill(2). No SA_RESTART, so a
        // signal also wakes init's waitpid.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction =
                forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Creates the workload's cgroup with the memory and pids controllers enabled for it.
fn create_cgroup() -> Result<PathBuf, BootError> {
    let fail = |what: &str, e: std::io::Error| {
        failed(BootStep::RuntimeFilesystems, format!("{what}: {e}"))
    };
    std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory +pids")
        .map_err(|e| fail("enabling the memory and pids cgroup controllers", e))?;
    std::fs::create_dir_all(WORKLOAD_CGROUP)
        .map_err(|e| fail("creating the workload cgroup", e))?;
    Ok(PathBuf::from(WORKLOAD_CGROUP))
}

/// How the workload ended, and when.
pub struct Outcome {
    pub result: WorkloadResult,
    /// CLOCK_BOOTTIME (ns) when its end was seen.
    pub ended_ns: u64,
}

/// Runs `spec` and returns its result, or the boot error of a supervisor step that failed
/// before the workload could start. Everything the workload writes has been sent to the
/// host when this returns; all other processes of the guest are gone.
pub fn run(
    spec: &RunSpec,
    channel: &'static Channel,
    clock: fn() -> u64,
) -> Result<Outcome, BootError> {
    let supervisor_error =
        |e: kiln_supervisor::SupervisorError| failed(BootStep::SupervisorStart, e.to_string());
    install_signal_forwarding().map_err(|e| {
        failed(
            BootStep::SupervisorStart,
            format!("installing signal forwarding: {e}"),
        )
    })?;
    send_phase(channel, BootPhase::SupervisorStarted, clock());
    let mut supervisor = Supervisor::new(Mode::Full);
    supervisor.cgroup = Some(create_cgroup()?);
    let user = supervisor
        .prepare(&spec.identity)
        .map_err(supervisor_error)?;
    let mut workload = match supervisor.start(spec, &user, io_for_spec(spec)) {
        Ok(workload) => workload,
        Err(err) => {
            let result = err.start_failure().ok_or_else(|| supervisor_error(err))?;
            return Ok(Outcome {
                result,
                ended_ns: clock(),
            });
        }
    };
    WORKLOAD_PID.store(workload.pid().as_raw(), Ordering::SeqCst);
    send_phase(channel, BootPhase::WorkloadStarted, clock());

    // Output: pipes give stdout and stderr apart; a terminal gives one stream, stdout.
    let mut pumps = Vec::new();
    let stdin = match workload.pty.take() {
        Some(pty) => {
            let input = pty.try_clone().map_err(|e| {
                failed(
                    BootStep::SupervisorStart,
                    format!("cloning the terminal: {e}"),
                )
            })?;
            pumps.push(pump_output(pty, Stream::Stdout, channel));
            Some(input)
        }
        None => {
            pumps.extend(
                workload
                    .stdout
                    .take()
                    .map(|out| pump_output(out, Stream::Stdout, channel)),
            );
            pumps.extend(
                workload
                    .stderr
                    .take()
                    .map(|err| pump_output(err, Stream::Stderr, channel)),
            );
            workload.stdin.take()
        }
    };
    let workload = Arc::new(workload);
    let host_input = Arc::clone(&workload);
    let tty = spec.tty;
    std::thread::spawn(move || serve_host(channel, &host_input, stdin, tty));

    let result = reap_until_exit(&workload);
    let ended_ns = clock();
    WORKLOAD_PID.store(0, Ordering::SeqCst);
    // The sandbox ends with its workload: what it left running would keep the output
    // pipes open. SIGKILL to -1 from PID 1 reaches every process but init.
    // SAFETY: plain system call.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    reap_all();
    for pump in pumps {
        let _ = pump.join();
    }
    Ok(Outcome { result, ended_ns })
}

/// Reaps every child (orphans are re-parented to PID 1) until the workload's own end.
fn reap_until_exit(workload: &Workload) -> WorkloadResult {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(status) if status.pid() == Some(workload.pid()) => {
                if let Some(result) = workload.result_of(status) {
                    return result;
                }
            }
            Ok(_) | Err(Errno::EINTR) => {}
            // ECHILD cannot happen while the workload lives; anything else would spin.
            Err(errno) => {
                crate::console(&format!("waiting for the workload: {errno}"));
                return WorkloadResult::Killed {
                    signal: libc::SIGKILL,
                };
            }
        }
    }
}

/// Reaps whatever is left until there are no children.
fn reap_all() {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Sends everything `source` yields as `stream` data, then its end.
fn pump_output(mut source: File, stream: Stream, channel: &'static Channel) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buffer = vec![0u8; 64 * 1024.min(MAX_PAYLOAD)];
        loop {
            match source.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    let data = Message::Data {
                        stream,
                        bytes: buffer[..n].to_vec(),
                    };
                    if channel.send(&Frame::new(MAIN_SESSION, data)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A terminal's master reads EIO once the last slave fd is closed: the end.
                Err(_) => break,
            }
        }
        let _ = channel.send(&Frame::new(MAIN_SESSION, Message::Eof { stream }));
    })
}

/// Serves what the host sends during the run: stdin data and its end, signals, terminal
/// size changes. Stops when the host closes the channel.
fn serve_host(channel: &Channel, workload: &Workload, mut stdin: Option<File>, tty: bool) {
    loop {
        let frame = match channel.receive(None) {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                crate::console(&format!("reading from the host: {e}"));
                return;
            }
        };
        if frame.session != MAIN_SESSION {
            crate::console(&format!(
                "ignoring a frame for session {}: no such session",
                frame.session
            ));
            continue;
        }
        match frame.message {
            Message::Data {
                stream: Stream::Stdin,
                bytes,
            } => {
                // A workload that stopped reading closes its stdin; later input is dropped.
                if let Some(input) = &mut stdin {
                    if input.write_all(&bytes).is_err() {
                        stdin = None;
                    }
                }
            }
            Message::Eof {
                stream: Stream::Stdin,
            } => {
                if let Some(input) = stdin.take() {
                    end_of_input(input, tty);
                }
            }
            Message::Signal(request) => {
                if let Err(e) = workload.signal(request.signal) {
                    crate::console(&format!("forwarding signal {}: {e}", request.signal));
                }
            }
            Message::Resize(size) => {
                if let Err(e) = workload.resize(size) {
                    crate::console(&format!("resizing the terminal: {e}"));
                }
            }
            other => crate::console(&format!(
                "ignoring an unexpected message from the host: {other:?}"
            )),
        }
    }
}

/// Closes the workload's input: a pipe is closed; a terminal gets its EOF character
/// (^D ends a canonical-mode read at the start of a line). Dropping this clone of the
/// terminal's master does not hang it up: the output pump holds the master too.
fn end_of_input(mut input: File, tty: bool) {
    if tty {
        let _ = input.write_all(b"\x04");
    }
}

/// Tells the host the guest reached `phase`; a failure is only logged, the run goes on.
fn send_phase(channel: &Channel, phase: BootPhase, boottime_ns: u64) {
    let time = PhaseTime { phase, boottime_ns };
    if let Err(e) = channel.send(&Frame::new(CONTROL_SESSION, Message::Phase(time))) {
        crate::console(&format!("cannot tell the host about phase {phase:?}: {e}"));
    }
}

/// Tells the host when and how the workload ended.
pub fn report(channel: &Channel, outcome: &Outcome) {
    let ended = PhaseTime {
        phase: BootPhase::WorkloadEnded,
        boottime_ns: outcome.ended_ns,
    };
    for frame in [
        Frame::new(CONTROL_SESSION, Message::Phase(ended)),
        Frame::new(MAIN_SESSION, Message::Result(outcome.result.clone())),
    ] {
        if let Err(e) = channel.send(&frame) {
            crate::console(&format!(
                "cannot report the workload's result to the host: {e}"
            ));
            return;
        }
    }
}
