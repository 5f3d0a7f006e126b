//! `kiln-supervisor`: the Kubernetes path's entry point into kiln-supervisor.
//!
//! `kiln-supervisor --mode full|process -- CMD [ARG...]` runs CMD as SANDBOX_UID:SANDBOX_GID
//! (environment) with the supervisor's environment (USER, LOGNAME, HOME and SHELL replaced
//! by the sandbox user's), forwards signals to it, reaps orphans (it may be the container's PID 1)
//! and exits with the workload's code (128 + signal when killed, 127/126 when it could not
//! start, 125 when the supervisor itself failed). `--mode network` runs nothing: it says
//! that it enforces nothing yet and waits for SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use kiln_supervisor::{
    drop_privileges, Identity, Mode, RunAs, RunSpec, Supervisor, SupervisorError, WorkloadIo,
    WorkloadResult,
};
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::iterator::Signals;
use signal_hook::low_level::signal_name;

/// Exit code when the supervisor itself fails (Docker's code for a runtime failure).
const SUPERVISOR_FAILED: u8 = 125;

/// Inherited variables that describe the container's user, not the sandbox user.
const SESSION_VARIABLES: [&str; 4] = ["USER", "LOGNAME", "HOME", "SHELL"];

/// Signals passed on to the workload.
const FORWARDED: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Full,
    Process,
    Network,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RunAsArg {
    /// The `sandbox` entry of /etc/passwd, which must have SANDBOX_UID:SANDBOX_GID.
    Sandbox,
    /// SANDBOX_UID:SANDBOX_GID as they are, no passwd entry needed.
    Uid,
}

/// Runs a sandbox workload as the sandbox user (Kubernetes path of kiln).
#[derive(Debug, Parser)]
#[command(name = "kiln-supervisor", version)]
struct Args {
    #[arg(long, value_enum)]
    mode: ModeArg,
    /// Sandbox uid (1000..=2000000000).
    #[arg(long, env = "SANDBOX_UID", value_parser = parse_id)]
    uid: Option<u32>,
    /// Sandbox gid (1000..=2000000000).
    #[arg(long, env = "SANDBOX_GID", value_parser = parse_id)]
    gid: Option<u32>,
    #[arg(long, value_enum, default_value = "uid")]
    run_as: RunAsArg,
    /// Another path made the sandbox user's in full mode (besides /sandbox); repeatable.
    #[arg(long, value_name = "PATH")]
    writable: Vec<PathBuf>,
    /// cgroup v2 directory to run the workload in (enables OOM detection).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// Working directory of the workload (default: the supervisor's).
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// The workload's program and arguments.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_id(value: &str) -> Result<u32, String> {
    kiln_identity::parse_sandbox_id(value, kiln_identity::IdBounds::KILN).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kiln-supervisor: {err:#}");
            ExitCode::from(SUPERVISOR_FAILED)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mode = match args.mode {
        ModeArg::Full => Mode::Full,
        ModeArg::Process => Mode::Process,
        ModeArg::Network => return network(),
    };
    let (Some(uid), Some(gid)) = (args.uid, args.gid) else {
        anyhow::bail!(
            "SANDBOX_UID and SANDBOX_GID (or --uid and --gid) are required in {} mode",
            mode.name()
        );
    };
    if args.command.is_empty() {
        anyhow::bail!(
            "no command given; usage: kiln-supervisor --mode {} -- CMD [ARG...]",
            mode.name()
        );
    }
    let workdir = match args.workdir {
        Some(dir) => dir,
        None => std::env::current_dir()?.to_string_lossy().into_owned(),
    };
    let spec = RunSpec {
        argv: args.command,
        // The runtime set USER/LOGNAME/HOME/SHELL for the container's user (root in full
        // mode); the session's values for the sandbox user replace them.
        env: std::env::vars()
            .filter(|(k, _)| !SESSION_VARIABLES.contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        cwd: Some(workdir),
        identity: Identity {
            run_as: match args.run_as {
                RunAsArg::Sandbox => RunAs::Sandbox,
                RunAsArg::Uid => RunAs::Uid,
            },
            uid,
            gid,
        },
        tty: false,
        terminal: None,
        task: None,
    };
    let supervisor = Supervisor {
        mode,
        writable: args.writable,
        cgroup: args.cgroup,
    };
    let user = supervisor.prepare(&spec.identity)?;

    // Caught from before the fork, so none is lost. Blocked across the fork, so the child
    // resets them to their defaults (before it unblocks them) without ever running the
    // handlers it inherited: one sent to it then still reaches the workload.
    let caught = FORWARDED.into_iter().chain([Signal::SIGCHLD]);
    let mut signals = Signals::new(caught.clone().map(|signal| signal as libc::c_int))?;
    let before = caught
        .collect::<SigSet>()
        .thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    let started = supervisor.start(&spec, &user, WorkloadIo::Inherit);
    let unblocked = before.thread_set_mask();

    let workload = match started {
        Ok(workload) => workload,
        Err(err) => return start_failed(err),
    };
    // The supervisor needs no privilege to signal and reap its child: drop its own too.
    let ready = unblocked
        .map_err(anyhow::Error::from)
        .and_then(|()| drop_privileges(&user.privileges).map_err(anyhow::Error::from));
    if let Err(err) = ready {
        let _ = nix::sys::signal::kill(workload.pid(), Signal::SIGKILL);
        let _ = waitpid(workload.pid(), None);
        return Err(err);
    }
    let result = supervise(&workload, &mut signals)?;
    tracing::debug!(?result, "workload ended");
    if let WorkloadResult::OomKilled = result {
        eprintln!("kiln-supervisor: the workload was killed for running out of memory");
    }
    Ok(exit_code(&result))
}

fn start_failed(err: SupervisorError) -> anyhow::Result<ExitCode> {
    match err.start_failure() {
        Some(result) => {
            eprintln!("kiln-supervisor: {err}");
            Ok(exit_code(&result))
        }
        None => Err(err.into()),
    }
}

fn exit_code(result: &WorkloadResult) -> ExitCode {
    ExitCode::from(result.exit_code().clamp(0, 255) as u8)
}

/// Forwards signals to the workload and reaps every child until the workload ends.
fn supervise(
    workload: &kiln_supervisor::Workload,
    signals: &mut Signals,
) -> anyhow::Result<WorkloadResult> {
    loop {
        for signal in signals.wait() {
            if signal != libc::SIGCHLD {
                if let Err(err) = workload.signal(signal) {
                    let signal = signal_name(signal).unwrap_or("?");
                    tracing::warn!(%err, %signal, "could not forward a signal");
                }
                continue;
            }
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Err(Errno::EINTR) => continue,
                    Err(err) => return Err(err.into()),
                    Ok(status) if status.pid() == Some(workload.pid()) => {
                        if let Some(result) = workload.result_of(status) {
                            return Ok(result);
                        }
                    }
                    Ok(_) => {} // an orphan re-parented to us
                }
            }
        }
    }
}

/// Network mode: there is no enforcement to run yet, and it must not look as if there were.
fn network() -> anyhow::Result<ExitCode> {
    let mut signals = Signals::new([libc::SIGTERM, libc::SIGINT])?;
    tracing::warn!(
        "network mode enforces nothing yet: no egress or ingress policy is applied; \
         this container only keeps its place in the pod"
    );
    let signal = signals
        .forever()
        .next()
        .and_then(signal_name)
        .unwrap_or("?");
    tracing::info!(%signal, "network mode stopping");
    Ok(ExitCode::SUCCESS)
}
