//! kiln-init: PID 1 of the kiln microVM guest.
//!
//! A static binary (`scripts/build-initramfs` packs it as `/init` of an uncompressed cpio
//! with `/dev/console`) that turns the booted kernel into a sandbox and back off:
//!
//! 1. mounts proc, sysfs and devtmpfs in the initramfs, reads the `kiln.*` kernel
//!    arguments, opens the host channel and sends a hello and `init_started`;
//! 2. turns off user namespaces (`user.max_user_namespaces=0`) unless `kiln.userns=on`,
//!    mounts the root image, the identity layer and, for OpenShell, the supervisor layer
//!    (EROFS, read-only) and the writable upper (tmpfs, or an ext4 disk for a persistent
//!    sandbox), stacks them into an overlay (`lowerdir=[openshell:]identity:root`,
//!    `metacopy=on,redirect_dir=on`; all of them nodev and nosuid, so the image's device
//!    nodes and set-id bits are inert), moves /dev, /proc, /sys into it and switches root
//!    (move mount + chroot: the initramfs cannot be pivoted);
//! 3. mounts devpts, /dev/shm, /run, /tmp and cgroup2, the 9p volumes and tmpfs mounts,
//!    sets the hostname, writes /etc/hostname, /etc/hosts and /etc/resolv.conf, brings up
//!    lo and, when asked, eth0 with a static address (ioctls) and default route;
//! 4. reads the host's hello and wall clock, which it had sent at once, and sets the clock
//!    (the RTC the kernel read at boot has whole seconds only), then waits for the run
//!    spec (session 1), gives the read-write
//!    volumes' roots to the spec's uid:gid, makes the root read-only when `kiln.ro=on`
//!    (after the supervisor's preparation), starts the workload through kiln-supervisor
//!    (full mode: user check, /sandbox ownership, verified privilege drop; for a spec
//!    that runs OpenShell's supervisor, the sandbox token and TLS material on root-only
//!    tmpfs mounts and the supervisor started as root, which drops privileges itself) in
//!    the cgroup `/sys/fs/cgroup/workload` (memory + pids controllers, so an OOM kill is
//!    told apart),
//!    pumps stdin/stdout/stderr (or the terminal) over the channel, forwards signals
//!    (received by init, or sent by the host), runs exec sessions the host opens, and
//!    reaps every process;
//! 5. when the workload ends (or after the host's `Shutdown`: SIGTERM to every process,
//!    SIGKILL after the grace period), sends `workload_ended`, kills what is left, sends
//!    each exec session's result and the main result, then `shutdown`, syncs and powers
//!    off.
//!
//! Any failure before the workload starts is a typed [`kiln_protocol::BootError`] naming
//! its [`kiln_protocol::BootStep`], sent on the control session and printed on the
//! console, followed by power-off; a panic in init does the same (step `init_panic`).
//! Without a channel (the port never appeared) the error goes to the console only.
//! Boot-phase times are CLOCK_BOOTTIME nanoseconds, so `init_started` is also the time
//! from kernel start to init.
//!
//! # Kernel command line
//!
//! init reads its [`kiln_protocol::BootConfig`] from the `kiln.*` arguments: the root
//! image and identity layer (EROFS), the writable upper (tmpfs, or an ext4 disk that keeps
//! `upper/` and `work/` at its top, created when missing), the channel's port, hostname,
//! eth0's static address, the 9p volumes and whether user namespaces are allowed.
//! docs/protocol.md ("Boot configuration") gives every argument and its grammar. A disk is best named by serial
//! (`-device virtio-blk-device,drive=root,serial=root`): virtio-mmio probe order is not
//! the order of the QEMU arguments. An unknown or malformed `kiln.*` argument is a
//! `command_line` boot error. The kernel also needs `console=ttyS0 reboot=t panic=-1`
//! (power-off and panics end QEMU with `-no-reboot`; the host tells the two apart by the
//! reason QEMU reports, never by console text) and, under TCG,
//! `tsc_early_khz=<host TSC kHz> tsc=reliable`: on a busy host the kernel otherwise fails
//! to calibrate the TSC against the PIT and hangs (see kernels/README.md).
//!
//! # Channel
//!
//! `-device virtio-serial-device -chardev socket,id=kiln,path=SOCK -device
//! virtserialport,chardev=kiln,name=kiln.0`, with the host listening on SOCK before QEMU
//! starts. init waits up to 10 s for the port, and up to 60 s for the host's hello and
//! `Run` after boot. The host sends Hello (control session), Run (session 1), then stdin
//! Data/Eof, Signal, Resize and Credit frames, Run frames opening exec sessions (ids >= 2)
//! and finally, perhaps, Shutdown (control session); init sends Hello, Phase frames and
//! any BootError on the control session and Data/Eof/Result on each workload session,
//! each session's data within the window the host's credit leaves it.

mod channel;
mod etc;
mod net;
mod openshell;
mod rootfs;
mod session;
mod sys;
mod task;
mod volume;
mod workload;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use kiln_protocol::{
    negotiate, BootConfig, BootError, BootPhase, BootStep, Frame, Hello, Message, PhaseTime,
    RunSpec, WorkloadResult, CHANNEL_PORT, CONTROL_SESSION, MAIN_SESSION,
};

use channel::Channel;
use rootfs::failed;

/// How long the host has to send its hello and the run spec once the guest is up.
const RUN_SPEC_WAIT: Duration = Duration::from_secs(60);

/// Time since the kernel started in nanoseconds (CLOCK_BOOTTIME, the clock /proc/uptime
/// reads), usable before /proc is mounted.
fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Writes a line to the console (init's stderr is /dev/console).
fn console(line: &str) {
    let _ = writeln!(std::io::stderr(), "kiln-init: {line}");
}

fn software() -> String {
    format!("kiln-init {}", env!("CARGO_PKG_VERSION"))
}

fn phase(phase: BootPhase) -> Frame {
    Frame::new(
        CONTROL_SESSION,
        Message::Phase(PhaseTime {
            phase,
            boottime_ns: boottime_ns(),
        }),
    )
}

/// Everything between the kernel's hand-over and a root the workload can run in.
fn boot(config: &BootConfig) -> Result<(), BootError> {
    if !config.user_namespaces {
        sys::forbid_user_namespaces().map_err(|e| {
            failed(
                BootStep::UserNamespaces,
                format!("setting user.max_user_namespaces to 0: {e}"),
            )
        })?;
    }
    let root = rootfs::assemble_root(config)?;
    rootfs::switch_root(&root.path)?;
    rootfs::mount_runtime_filesystems()?;
    volume::mount_all(&config.volumes)?;
    volume::mount_tmpfs(&config.tmpfs)?;
    sys::sethostname(&config.hostname).map_err(|e| {
        failed(
            BootStep::Hostname,
            format!("setting the hostname to {:?}: {e}", config.hostname),
        )
    })?;
    if !root.name_files_written {
        etc::write_name_files(Path::new("/"), config).map_err(|e| {
            failed(
                BootStep::Hostname,
                format!("writing /etc/hostname, /etc/hosts and /etc/resolv.conf: {e}"),
            )
        })?;
    }
    bring_up_network(config)
}

fn bring_up_network(config: &BootConfig) -> Result<(), BootError> {
    let fail = |e: std::io::Error| failed(BootStep::Network, e.to_string());
    net::loopback_up().map_err(fail)?;
    if let Some(net_config) = &config.net {
        net::configure("eth0", net_config).map_err(fail)?;
    }
    Ok(())
}

/// The host's next frame, waiting at most [`RUN_SPEC_WAIT`]; a failure is `step`'s.
fn next_frame(channel: &Channel, step: BootStep) -> Result<Frame, BootError> {
    channel
        .receive(Some(RUN_SPEC_WAIT))
        .map_err(|e| failed(step, format!("reading from the host: {e}")))?
        .ok_or_else(|| failed(step, "the host closed the channel during boot"))
}

/// Reads the host's hello (checking that both speak a common version) and its wall clock,
/// which becomes the guest's. The host answers init's hello at once, but init reads the
/// answer only after the boot steps (waiting for it would leave the guest idle for a
/// round trip), so the clock is set to the host's time plus the guest's time since the
/// hello went out (`hello_sent`, CLOCK_BOOTTIME ns), which is within milliseconds of the
/// host's. `false` when the host asks to shut down instead.
fn greet_host(channel: &Channel, hello_sent: u64) -> Result<bool, BootError> {
    let step = BootStep::Clock;
    let mut greeted = false;
    loop {
        let frame = next_frame(channel, step)?;
        match (frame.session, frame.message) {
            (CONTROL_SESSION, Message::Hello(theirs)) if !greeted => {
                negotiate(&Hello::ours(software()), &theirs)
                    .map_err(|e| failed(step, e.to_string()))?;
                greeted = true;
            }
            (CONTROL_SESSION, Message::Clock(clock)) if greeted => {
                let since_hello = boottime_ns().saturating_sub(hello_sent);
                let now = clock.unix_ns.saturating_add(since_hello);
                sys::set_wall_clock(now)
                    .map_err(|e| failed(step, format!("setting the clock to {now} ns: {e}")))?;
                return Ok(true);
            }
            (CONTROL_SESSION, Message::Shutdown(_)) => return Ok(false),
            (session, message) => {
                return Err(failed(
                    step,
                    format!(
                        "expected the host's hello and then its clock on session \
                         {CONTROL_SESSION}, got {message:?} on session {session}"
                    ),
                ))
            }
        }
    }
}

/// Waits for the run spec of the main session; `None` when the host asks to shut down
/// instead.
fn receive_run_spec(channel: &Channel) -> Result<Option<RunSpec>, BootError> {
    match next_frame(channel, BootStep::RunSpec)? {
        Frame {
            session: CONTROL_SESSION,
            message: Message::Shutdown(_),
        } => Ok(None),
        Frame {
            session: MAIN_SESSION,
            message: Message::Run(spec),
        } => Ok(Some(spec)),
        Frame { session, message } => Err(failed(
            BootStep::RunSpec,
            format!(
                "expected a run spec on session {MAIN_SESSION}, got {message:?} on session {session}"
            ),
        )),
    }
}

/// Boots, reads the host's greeting, receives the run spec, gives the read-write volumes
/// to the workload's user and runs the workload; `None` when the host asked to shut down
/// before sending a spec.
fn boot_and_run(
    config: &BootConfig,
    channel: &'static Channel,
    hello_sent: u64,
) -> Result<Option<WorkloadResult>, BootError> {
    boot(config)?;
    if !greet_host(channel, hello_sent)? {
        return Ok(None);
    }
    let Some(spec) = receive_run_spec(channel)? else {
        return Ok(None);
    };
    volume::give_to_user(&config.volumes, spec.identity.uid, spec.identity.gid)?;
    workload::run(&spec, channel, boottime_ns, config.read_only).map(Some)
}

/// Tells the host and the console that boot failed.
fn report_boot_error(channel: Option<&Channel>, error: BootError) {
    console(&format!(
        "boot failed at step {:?}: {}",
        error.step, error.message
    ));
    if let Some(channel) = channel {
        if let Err(e) = channel.send(&Frame::new(CONTROL_SESSION, Message::BootError(error))) {
            console(&format!("cannot report the boot error to the host: {e}"));
        }
    }
}

/// Announces the shutdown, then syncs and powers off.
fn shutdown(channel: Option<&Channel>) -> ! {
    if let Some(channel) = channel {
        let _ = channel.send(&phase(BootPhase::Shutdown));
    }
    sys::power_off()
}

fn main() {
    let init_started = boottime_ns();
    // An exec session's task (kiln top, stats, cp): the binary is init's, the job is not.
    if let Some(task) = task::from_args() {
        std::process::exit(task::run(task));
    }
    if std::process::id() != 1 {
        eprintln!("kiln-init is the guest's PID 1 and runs only there (it mounts, switches root and powers off)");
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        let error = failed(BootStep::InitPanic, info.to_string());
        console(&format!("panic: {}", error.message));
        channel::send_from_panic(&Frame::new(CONTROL_SESSION, Message::BootError(error)));
        sys::power_off();
    }));

    if let Err(error) = rootfs::mount_kernel_filesystems() {
        report_boot_error(None, error);
        shutdown(None);
    }
    let config = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| failed(BootStep::CommandLine, format!("reading /proc/cmdline: {e}")))
        .and_then(|text| {
            BootConfig::parse(&text).map_err(|e| failed(BootStep::CommandLine, e.to_string()))
        });
    // A bad command line is still reported on the default port when that exists.
    let port = config.as_ref().map_or(CHANNEL_PORT, |c| c.port.as_str());
    let channel = match Channel::open(port) {
        Ok(channel) => channel,
        Err(e) => {
            console(&format!("no channel to the host: {e}"));
            if let Err(error) = config {
                report_boot_error(None, error);
            }
            shutdown(None);
        }
    };
    let greeting = [
        Frame::new(CONTROL_SESSION, Message::Hello(Hello::ours(software()))),
        Frame::new(
            CONTROL_SESSION,
            Message::Phase(PhaseTime {
                phase: BootPhase::InitStarted,
                boottime_ns: init_started,
            }),
        ),
    ];
    for frame in &greeting {
        if let Err(e) = channel.send(frame) {
            console(&format!("cannot talk to the host: {e}"));
            shutdown(None);
        }
    }
    let hello_sent = boottime_ns();
    // init lives until power-off; the threads serving the workload borrow the channel.
    let channel: &'static Channel = Box::leak(Box::new(channel));
    match config.and_then(|config| boot_and_run(&config, channel, hello_sent)) {
        Err(error) => report_boot_error(Some(channel), error),
        Ok(Some(result)) => workload::report(channel, result),
        Ok(None) => console("shutdown requested before the workload started"),
    }
    shutdown(Some(channel));
}
