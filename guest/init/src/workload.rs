//! Running the main workload as PID 1: the supervisor prepares the sandbox user and
//! starts it as session 1 (see [`crate::session`]), init forwards the signals it gets to
//! it, reaps every process, and turns the workload's end into its typed result.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use kiln_protocol::{
    BootError, BootPhase, BootStep, Frame, Message, PhaseTime, RunSpec, WorkloadResult,
    CONTROL_SESSION, MAIN_SESSION,
};
use kiln_supervisor::{Mode, Supervisor};

use crate::channel::Channel;
use crate::rootfs::failed;
use crate::session::{Reaped, Sessions};

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

/// The workload's pid for the forwarding handler; 0 while there is none.
static WORKLOAD_PID: AtomicI32 = AtomicI32::new(0);

/// Passes a signal init received on to the workload; one that arrives while there is no
/// workload is dropped. Runs as a signal handler, so it only reads an atomic and calls
/// kill(2), both async-signal-safe, and leaves errno as the interrupted code had it.
extern "C" fn forward_to_workload(signal: libc::c_int) {
    let pid = WORKLOAD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: __errno_location points at this thread's errno; kill(2) takes plain
        // integers. A workload that ended meanwhile needs no telling, so a failed kill
        // is no error.
        unsafe {
            let errno = libc::__errno_location();
            let saved = *errno;
            libc::kill(pid, signal);
            *errno = saved;
        }
    }
}

/// Catches [`FORWARDED_SIGNALS`] (PID 1 gets no default action for them) and passes each
/// on to the workload straight from the handler: no thread of its own, which under TCG
/// was ~7 ms of every start. `SA_RESTART`, so that init's own blocking calls carry on.
fn forward_signals() -> std::io::Result<()> {
    for signal in FORWARDED_SIGNALS {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the handler is an
        // async-signal-safe extern "C" fn that lives for the whole program.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward_to_workload as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
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

/// Runs `spec` as the main session and serves exec sessions and the host's shutdown
/// while it runs; returns its result, or the boot error of a supervisor step that failed
/// before it could start. When this returns, every exec session's result and everything
/// the workload wrote have been sent to the host, and all other processes of the guest
/// are gone.
pub fn run(
    spec: &RunSpec,
    channel: &'static Channel,
    clock: fn() -> u64,
    read_only_root: bool,
) -> Result<WorkloadResult, BootError> {
    let supervisor_error =
        |e: kiln_supervisor::SupervisorError| failed(BootStep::SupervisorStart, e.to_string());
    forward_signals().map_err(|e| {
        failed(
            BootStep::SupervisorStart,
            format!("installing signal forwarding: {e}"),
        )
    })?;
    send_phase(channel, BootPhase::SupervisorStarted, clock());
    let mut supervisor = Supervisor::new(Mode::Full);
    supervisor.cgroup = Some(create_cgroup()?);
    // The host checked the ids against its front end's bounds (kiln's own, or OpenShell's
    // for ids an OpenShell gateway configures); the guest refuses what none admits.
    supervisor.bounds = kiln_supervisor::IdBounds::OPENSHELL;
    let user = supervisor
        .prepare(&spec.identity)
        .map_err(supervisor_error)?;
    if let Some(launch) = &spec.openshell {
        crate::openshell::place_token(launch)?;
        crate::openshell::place_tls(launch)?;
    }
    // After the preparation, which may chown /sandbox in the overlay.
    if read_only_root {
        crate::sys::remount_read_only(std::path::Path::new("/")).map_err(|e| {
            failed(
                BootStep::SupervisorStart,
                format!("making the root read-only: {e}"),
            )
        })?;
    }
    // init lives until power-off; the host-serving thread borrows the sessions.
    let sessions: &'static Sessions = Box::leak(Box::new(Sessions::new(channel, supervisor)));
    let pid = match sessions.start_main(spec, &user) {
        Ok(pid) => pid,
        Err(err) => {
            let result = err.start_failure().ok_or_else(|| supervisor_error(err))?;
            send_phase(channel, BootPhase::WorkloadEnded, clock());
            // Reads the host's answer to the result (see `report`); no session starts now.
            std::thread::spawn(|| sessions.serve_host());
            return Ok(result);
        }
    };
    WORKLOAD_PID.store(pid.as_raw(), Ordering::SeqCst);
    send_phase(channel, BootPhase::WorkloadStarted, clock());
    std::thread::spawn(|| sessions.serve_host());

    let result = loop {
        match sessions.reap_next() {
            Reaped::Main(result) => break result,
            Reaped::Other => {}
            // Cannot happen while the workload lives; anything else would spin.
            Reaped::None => {
                crate::console("the workload vanished without an exit status");
                break WorkloadResult::Killed {
                    signal: libc::SIGKILL,
                };
            }
        }
    };
    WORKLOAD_PID.store(0, Ordering::SeqCst);
    // Said before the exec sessions are killed and drained: the host then stops waiting
    // for their slow readers, and stops opening new ones.
    send_phase(channel, BootPhase::WorkloadEnded, clock());
    sessions.finish_main();
    Ok(result)
}

/// Tells the host the guest reached `phase`; a failure is only logged, the run goes on.
fn send_phase(channel: &Channel, phase: BootPhase, boottime_ns: u64) {
    let time = PhaseTime { phase, boottime_ns };
    if let Err(e) = channel.send(&Frame::new(CONTROL_SESSION, Message::Phase(time))) {
        crate::console(&format!("cannot tell the host about phase {phase:?}: {e}"));
    }
}

/// How long init waits for the host to answer the workload's result before it powers
/// off anyway: a host that is gone or loaded must not keep the VM up for long.
const RESULT_ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Tells the host how the workload ended (the `workload_ended` phase went out when it did),
/// and waits (bounded) until the host answers with `Shutdown`: the frame is only queued
/// when the write returns, and a power-off before QEMU passed it on would lose it.
pub fn report(channel: &Channel, result: WorkloadResult) {
    let result = Frame::new(MAIN_SESSION, Message::Result(result));
    // A `kiln stop` sends a Shutdown before the result exists; only a later one answers it.
    let shutdowns = channel.host_shutdowns();
    if let Err(e) = channel.send(&result) {
        crate::console(&format!(
            "cannot report the workload's result to the host: {e}"
        ));
        return;
    }
    if !channel.wait_for_host_shutdown(shutdowns, RESULT_ANSWER_WAIT) {
        crate::console("the host did not answer the workload's result; powering off");
    }
}
