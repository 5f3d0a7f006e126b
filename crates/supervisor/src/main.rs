//! `kiln-supervisor`: the Kubernetes path's entry point into kiln-supervisor.
//!
//! `kiln-supervisor --mode full|process -- CMD [ARG...]` runs CMD as SANDBOX_UID:SANDBOX_GID
//! (environment) with the supervisor's environment (USER, LOGNAME, HOME and SHELL replaced
//! by the sandbox user's), forwards signals to it, reaps orphans (it may be the container's PID 1)
//! and exits with the workload's code (128 + signal when killed, 127/126 when it could not
//! start, 125 when the supervisor itself failed).
//!
//! The pod's network enforcement (kiln-podnet): `--mode network-init --proxy-uid N`
//! installs the nftables rules and exits (the sidecar topology's init container, with
//! CAP_NET_ADMIN); `--mode network --proxy-uid N [--policy FILE]` is the enforcer,
//! running as the proxy uid with no capabilities until SIGTERM or SIGINT. `--mode full
//! --proxy-uid N` (the combined topology) installs the same rules as root and runs the
//! enforcer as a separate process under the proxy uid before it starts the workload.

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
    NetworkInit,
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
    /// The network enforcer's uid (network-init, network; in full mode: enforce the
    /// pod's egress with an enforcer under this uid). Never the sandbox uid or 0.
    #[arg(long, value_name = "UID")]
    proxy_uid: Option<u32>,
    /// The network policy file (OpenShell's `network_policies`), watched for updates;
    /// without it, the default mode (internet open, private ranges refused).
    #[arg(long, value_name = "FILE", requires = "proxy_uid")]
    policy: Option<PathBuf>,
    /// Names the sandbox in the decision records (the pod's name).
    #[arg(
        long,
        value_name = "NAME",
        env = "KILN_SANDBOX_NAME",
        default_value = "pod"
    )]
    sandbox_name: String,
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
        ModeArg::NetworkInit => return network_init(&args),
        ModeArg::Network => return network(&args),
    };
    let network = args
        .proxy_uid
        .map(|proxy_uid| (proxy_uid, args.policy.clone(), args.sandbox_name.clone()));
    if matches!(mode, Mode::Process) && network.is_some() {
        anyhow::bail!("--proxy-uid belongs to full mode (combined topology); in process mode the network sidecar enforces");
    }
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
        openshell: None,
    };
    let supervisor = Supervisor {
        mode,
        writable: args.writable,
        cgroup: args.cgroup,
        // The Kubernetes renderer and this binary's flags take kiln's own bounds.
        bounds: kiln_supervisor::IdBounds::KILN,
    };
    let user = supervisor.prepare(&spec.identity)?;
    // Combined topology: the rules go in while the supervisor is root, and the enforcer
    // listens before the workload starts (its first connection would be refused).
    let enforcer = match network {
        Some((proxy_uid, policy, name)) => Some(start_enforcer(proxy_uid, uid, policy, &name)?),
        None => None,
    };

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
    let result = supervise(&workload, enforcer, &mut signals)?;
    if let Some(pid) = enforcer {
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
    }
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
    enforcer: Option<Pid>,
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
                    Ok(status) if status.pid() == enforcer => {
                        // The rules stay: the workload's connections now fail, closed.
                        tracing::error!(?status, "the network enforcer ended; the workload's connections and DNS queries now fail");
                    }
                    Ok(_) => {} // an orphan re-parented to us
                }
            }
        }
    }
}

fn proxy_uid(args: &Args, mode: &str) -> anyhow::Result<u32> {
    let uid = args
        .proxy_uid
        .ok_or_else(|| anyhow::anyhow!("--proxy-uid is required in {mode} mode"))?;
    if let Some(sandbox) = args.uid {
        kiln_podnet::check_proxy_uid(uid, sandbox)?;
    }
    Ok(uid)
}

fn rule_set(proxy_uid: u32) -> kiln_podnet::RuleSet {
    kiln_podnet::RuleSet {
        proxy_uid,
        proxy_port: kiln_podnet::DEFAULT_PROXY_PORT,
        dns_port: kiln_podnet::DEFAULT_DNS_PORT,
    }
}

/// Network-init mode: the rules, once; needs CAP_NET_ADMIN and nothing else.
fn network_init(args: &Args) -> anyhow::Result<ExitCode> {
    let rules = rule_set(proxy_uid(args, "network-init")?);
    rules.install()?;
    tracing::info!(
        proxy_uid = rules.proxy_uid,
        "installed nftables table inet {}",
        kiln_podnet::TABLE
    );
    Ok(ExitCode::SUCCESS)
}

/// Network mode: the enforcer, as the proxy uid with no capabilities, until SIGTERM or
/// SIGINT.
fn network(args: &Args) -> anyhow::Result<ExitCode> {
    let uid = proxy_uid(args, "network")?;
    let euid = nix::unistd::geteuid().as_raw();
    if euid != uid {
        anyhow::bail!(
            "network mode runs as the proxy uid {uid} (the rules let only its traffic through), but runs as uid {euid}"
        );
    }
    // Nothing this process starts may gain privileges, and it holds none itself.
    nix::sys::prctl::set_no_new_privs()?;
    let effective = effective_capabilities()?;
    if effective != 0 {
        anyhow::bail!(
            "network mode runs with no capabilities, but holds effective capabilities {effective:#x}; drop them (securityContext.capabilities.drop: [ALL])"
        );
    }
    let mut signals = Signals::new([libc::SIGTERM, libc::SIGINT])?;
    let config = kiln_podnet::EnforcerConfig {
        sandbox: args.sandbox_name.clone(),
        policy: args.policy.clone(),
        proxy_port: kiln_podnet::DEFAULT_PROXY_PORT,
        dns_port: kiln_podnet::DEFAULT_DNS_PORT,
        hosts_file: PathBuf::from("/etc/hosts"),
        resolv_conf: PathBuf::from("/etc/resolv.conf"),
    };
    let _enforcer = kiln_podnet::Enforcer::start(&config)?;
    let signal = signals
        .forever()
        .next()
        .and_then(signal_name)
        .unwrap_or("?");
    tracing::info!(%signal, "network mode stopping");
    Ok(ExitCode::SUCCESS)
}

/// CapEff of this process, from /proc/self/status.
fn effective_capabilities() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| anyhow::anyhow!("/proc/self/status has no CapEff line"))?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// Combined topology: installs the rules (as root) and starts this binary in network
/// mode as a separate process under the proxy uid and gid, with no supplementary groups
/// and, having left uid 0, no capabilities. Returns once it listens.
fn start_enforcer(
    proxy_uid: u32,
    sandbox_uid: u32,
    policy: Option<PathBuf>,
    sandbox_name: &str,
) -> anyhow::Result<Pid> {
    use std::os::unix::process::CommandExt;
    kiln_podnet::check_proxy_uid(proxy_uid, sandbox_uid)?;
    let rules = rule_set(proxy_uid);
    rules.install()?;
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .args(["--mode", "network", "--proxy-uid", &proxy_uid.to_string()])
        .args(["--sandbox-name", sandbox_name])
        .env_remove("SANDBOX_UID")
        .env_remove("SANDBOX_GID")
        .uid(proxy_uid)
        .gid(proxy_uid)
        .stdin(std::process::Stdio::null());
    if let Some(policy) = policy {
        command.arg("--policy").arg(policy);
    }
    let child = command.spawn()?;
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !kiln_podnet::listening(rules.proxy_port)? {
        if let Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) =
            waitpid(pid, Some(WaitPidFlag::WNOHANG))
        {
            anyhow::bail!("the network enforcer (uid {proxy_uid}) ended before it listened; see its messages above");
        }
        if std::time::Instant::now() > deadline {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            anyhow::bail!("the network enforcer (uid {proxy_uid}) did not listen within 10 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    tracing::info!(proxy_uid, pid = pid.as_raw(), "network enforcer running");
    Ok(pid)
}
