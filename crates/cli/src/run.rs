//! `kiln run`: boot an image as a microVM sandbox and run its command, as `docker run`
//! would: the workload's exit code becomes kiln's, 125 means kiln itself failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_image::PullPolicy;
use kiln_protocol::TerminalSize;
use kiln_sandbox::{
    Control, CreateFields, EnvFile, Field, FieldNames, HostIo, NetworkMode, RunFields, RunReport,
};

use crate::exit::{CommandError, CommandResult, EXIT_RUN_FAILURE};
use crate::globals::Globals;
use crate::pull::{progress_renderer, SourceArgs};

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct RunArgs {
    /// Remove the sandbox (its writable layer and state) when the workload ends.
    #[arg(long)]
    rm: bool,

    /// Start the sandbox detached (create + start) and print its id.
    #[arg(short, long, conflicts_with_all = ["rm", "interactive", "tty", "timeout", "timings"])]
    detach: bool,

    /// Stream kiln's stdin to the workload (EOF included).
    #[arg(short, long)]
    interactive: bool,

    /// Run the workload on a terminal (a PTY in the guest).
    #[arg(short, long)]
    tty: bool,

    /// Stop the sandbox and fail if the workload runs longer than this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<String>,

    /// Print how long each phase took (on stderr).
    #[arg(long)]
    timings: bool,

    #[command(flatten)]
    vmm: VmmArgs,

    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// The VMM of the commands that boot sandboxes: kiln's own configuration at boot time,
/// never recorded with a sandbox.
#[derive(Debug, Args)]
pub struct VmmArgs {
    /// QEMU binary.
    #[arg(long, env = "KILN_QEMU", default_value = kiln_vm::qemu::DEFAULT_BINARY, hide = true)]
    pub qemu: PathBuf,
}

/// The flags of a sandbox's launch, shared by `kiln run` and `kiln create`.
#[derive(Debug, Args)]
pub struct SandboxArgs {
    /// Set an environment variable: KEY=VALUE, or KEY to copy kiln's own (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,

    /// Read environment variables from a file, one KEY=VALUE per line (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    env_files: Vec<PathBuf>,

    /// Working directory of the workload (absolute) [default: the image's, else the user's home].
    #[arg(short, long = "workdir", value_name = "DIR")]
    workdir: Option<String>,

    /// Replace the image's entrypoint (and drop its Cmd); "" clears it.
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,

    /// Whom the workload runs as: sandbox, or a numeric uid (1000 to 2000000000).
    #[arg(long, value_name = "sandbox|UID", default_value = kiln_identity::SANDBOX_USER)]
    user: String,

    /// Uid of the `sandbox` user written into the image (1000 to 2000000000).
    #[arg(long, value_name = "N")]
    uid: Option<String>,

    /// Gid of the `sandbox` group written into the image (1000 to 2000000000).
    #[arg(long, value_name = "N")]
    gid: Option<String>,

    /// CPUs, as 2 or 0.5 (the VM gets the next whole number of vCPUs; the exact share is
    /// kept for a CPU quota) [default: 1]
    #[arg(long, value_name = "N")]
    cpus: Option<String>,

    /// Guest memory with a unit b, k, m or g, as 512m or 1g (a bare number is MiB)
    /// [default: 512m]
    #[arg(short = 'm', long, value_name = "SIZE")]
    memory: Option<String>,

    /// Set a label KEY=VALUE on the sandbox (repeatable; `kiln ps --filter label=...`).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE")]
    labels: Vec<String>,

    /// Network: user (NAT egress through QEMU's user-mode stack, DNS, -p forwards) or none.
    #[arg(long, value_name = "MODE", default_value = "user", value_parser = ["user", "none"])]
    network: String,

    /// Forward a TCP port from host loopback into the guest: [127.0.0.1:][HOSTPORT:]GUESTPORT[/tcp]
    /// (repeatable; needs --network user; without HOSTPORT a free port is chosen, see `kiln port`).
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[127.0.0.1:][HOSTPORT:]GUESTPORT"
    )]
    publish: Vec<String>,

    /// Share a host directory: HOSTDIR:GUESTDIR[:ro] (repeatable; 9p, see docs/volumes.md).
    #[arg(short = 'v', long = "volume", value_name = "HOSTDIR:GUESTDIR[:ro]")]
    volumes: Vec<String>,

    /// Let the workload create user namespaces (off by default: inside one it holds every capability; docs/supervisor.md).
    #[arg(long = "allow-userns")]
    allow_userns: bool,

    #[command(flatten)]
    guest: crate::guest_setup::GuestArgs,

    /// Name of the sandbox ([A-Za-z0-9._-], up to 128 characters).
    #[arg(long)]
    name: Option<String>,

    /// Size stdout.log and stderr.log of a detached sandbox each reach before they are
    /// rotated to a .1 file (4k to 1t, as 512k or 10m) [default: 10m]
    #[arg(long, value_name = "SIZE")]
    log_max_size: Option<String>,

    /// When to contact the image source: always, missing (only when not in the store) or never.
    #[arg(long = "pull", value_name = "POLICY", default_value = "missing")]
    pull: String,

    /// Accelerator: auto (KVM when it really works here, else TCG), kvm or tcg.
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto")]
    accel: String,

    #[command(flatten)]
    source: SourceArgs,

    /// Image reference (as for `kiln pull`).
    reference: String,

    /// Command and arguments, replacing the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Any error before the workload runs is kiln's own: exit code 125, as `docker run`.
pub fn kiln_error(error: impl Into<anyhow::Error>) -> CommandError {
    CommandError {
        code: EXIT_RUN_FAILURE,
        error: error.into(),
    }
}

/// How the CLI names request fields in errors: by their flags.
pub struct FlagNames;

impl FieldNames for FlagNames {
    fn field(&self, field: Field) -> &'static str {
        match field {
            Field::Image => "REFERENCE",
            Field::Name => "--name",
            Field::User => "--user",
            Field::Uid => "--uid",
            Field::Gid => "--gid",
            Field::Cpus => "--cpus",
            Field::Memory => "--memory",
            Field::Env => "-e",
            Field::EnvFile => "--env-file",
            Field::Workdir => "-w",
            Field::Publish => "-p",
            Field::Volumes => "-v",
            Field::Hostname => "--hostname",
            Field::AddHost => "--add-host",
            Field::Dns => "--dns",
            Field::Tmpfs => "--tmpfs",
            Field::Mount => "--mount",
            Field::Timeout => "--timeout",
            Field::LogMaxSize => "--log-max-size",
            Field::Labels => "--label",
            Field::Command => "COMMAND",
        }
    }

    fn network(&self, mode: NetworkMode) -> &'static str {
        match mode {
            NetworkMode::User => "--network user",
            NetworkMode::None => "--network none",
        }
    }
}

pub fn run(globals: &Globals, args: RunArgs) -> CommandResult {
    if args.detach {
        return crate::sandbox::run_detached(globals, args.sandbox, &args.vmm);
    }
    let request = RunFields {
        sandbox: args.sandbox.into_fields(globals).map_err(kiln_error)?,
        timeout: args.timeout,
        remove: args.rm,
        terminal: args.tty.then(terminal_size),
        qemu: args.vmm.qemu,
    }
    .validate(&FlagNames)
    .map_err(kiln_error)?;

    let (io, control_rx, _raw) = attach(args.interactive, args.tty).map_err(kiln_error)?;
    let quiet = globals.quiet;
    let notice = move |line: &str| {
        if !quiet {
            eprintln!("kiln: {line}");
        }
    };
    let report =
        kiln_sandbox::run(&globals.root, request, io, control_rx, &notice).map_err(kiln_error)?;
    drop(_raw);
    if args.timings {
        print_timings(globals, &report);
    }
    let code = report.result.exit_code().clamp(0, 255) as u8;
    Ok(ExitCode::from(code))
}

impl SandboxArgs {
    /// The fields of a create request as these flags give them; kiln-sandbox checks them.
    pub fn into_fields(self, globals: &Globals) -> anyhow::Result<CreateFields> {
        let mut pull = self
            .source
            .options(PullPolicy::parse(&self.pull)?)
            .map_err(|e| e.error)?;
        pull.progress = progress_renderer(globals).filter(|_| !globals.json);
        let env_files = self
            .env_files
            .iter()
            .map(|file| {
                let contents = std::fs::read(file)
                    .with_context(|| format!("--env-file {}", file.display()))?;
                Ok(EnvFile {
                    name: file.display().to_string(),
                    contents,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let accel = self
            .accel
            .parse()
            .map_err(anyhow::Error::msg)
            .context("--accel")?;
        let network = match self.network.as_str() {
            "none" => NetworkMode::None,
            _ => NetworkMode::User,
        };
        let mut fields = CreateFields {
            image: self.reference,
            pull,
            name: self.name,
            entrypoint: self.entrypoint,
            command: self.command,
            env_files,
            env: self.env,
            lend_environment: true,
            workdir: self.workdir,
            user: Some(self.user),
            uid: self.uid,
            gid: self.gid,
            cpus: self.cpus,
            memory: self.memory,
            network,
            publish: self.publish,
            labels: self.labels,
            volumes: self.volumes,
            accel,
            log_max_size: self.log_max_size,
            rootfs_cache_max: globals.rootfs_cache_max,
            allow_user_namespaces: self.allow_userns,
            ..CreateFields::default()
        };
        self.guest.fill(&mut fields);
        Ok(fields)
    }
}

/// Kiln's own stdio for a workload (stdin only with `-i`), with kiln's signals and
/// terminal resizes forwarded to it, and the terminal in raw mode for `-it` until the
/// returned guard drops.
pub fn attach(
    interactive: bool,
    tty: bool,
) -> anyhow::Result<(HostIo, mpsc::Receiver<Control>, Option<terminal::RawMode>)> {
    let (control_tx, control_rx) = mpsc::channel();
    forward_signals(control_tx, tty)?;
    // Raw mode only when kiln's own stdin is the terminal the user types into.
    let raw = (tty && interactive && std::io::stdin().is_terminal())
        .then(terminal::RawMode::enable)
        .transpose()?;
    let io = HostIo {
        stdin: interactive.then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
        stdout: Box::new(std::io::stdout()),
        stderr: Box::new(std::io::stderr()),
        guest_events: None,
    };
    Ok((io, control_rx, raw))
}

/// SIGINT and SIGTERM go to the workload (kiln stops the VM if it does not end within
/// the grace period); SIGWINCH becomes a terminal resize.
fn forward_signals(control: mpsc::Sender<Control>, tty: bool) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGWINCH};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGWINCH])?;
    std::thread::spawn(move || {
        for signal in signals.forever() {
            let request = match signal {
                SIGWINCH if tty => Control::Resize(terminal_size()),
                SIGWINCH => continue,
                other => Control::Signal(other),
            };
            if control.send(request).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// The size of kiln's terminal, or 24x80 when it has none.
pub fn terminal_size() -> TerminalSize {
    terminal::size().unwrap_or(TerminalSize { rows: 24, cols: 80 })
}

fn print_timings(globals: &Globals, report: &RunReport) {
    let t = &report.timings;
    let phases = [
        ("pull", Some(t.pull)),
        ("build/cache", Some(t.build)),
        ("vmm start", t.vm.vmm_start),
        ("kernel", t.vm.kernel),
        ("init", t.vm.init),
        ("supervisor", t.vm.supervisor),
        ("workload", t.vm.workload),
        ("shutdown", t.vm.shutdown),
        // Not a phase: the sum a user waits, from `kiln run` to the workload's start.
        ("to workload", t.to_workload),
    ];
    if globals.json {
        let map: serde_json::Map<String, serde_json::Value> = phases
            .iter()
            .map(|(name, d)| (name.to_string(), d.map(|d| d.as_secs_f64()).into()))
            .collect();
        let json = serde_json::json!({
            "accel": report.accel.accel.as_str(),
            "root_image_built": report.root_image_built,
            "timings_seconds": map,
        });
        eprintln!("{json}");
        return;
    }
    let root_image = if report.root_image_built {
        "built"
    } else {
        "cached"
    };
    eprintln!(
        "phase            seconds   (accel: {}, root image {root_image})",
        report.accel.accel.as_str()
    );
    for (name, duration) in phases {
        let shown = duration.map_or("-".to_owned(), |d: Duration| {
            format!("{:.3}", d.as_secs_f64())
        });
        eprintln!("{name:<16} {shown:>7}");
    }
}

/// The host terminal: its size and raw mode for `-it`.
mod terminal {
    use kiln_protocol::TerminalSize;

    /// The size of the terminal on stdin (or stdout), if there is one.
    pub fn size() -> Option<TerminalSize> {
        for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
            // SAFETY: winsize holds plain integers, for which all-zero bytes are valid.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes a winsize into the struct we own, nothing else.
            let filled = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
            if filled && ws.ws_row > 0 {
                return Some(TerminalSize {
                    rows: ws.ws_row,
                    cols: ws.ws_col,
                });
            }
        }
        None
    }

    /// Puts stdin's terminal in raw mode (keys go to the workload as typed) until dropped.
    pub struct RawMode {
        saved: libc::termios,
    }

    impl RawMode {
        pub fn enable() -> std::io::Result<RawMode> {
            // SAFETY: tcgetattr/tcsetattr on stdin with termios structs we own.
            unsafe {
                let mut saved: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut raw = saved;
                libc::cfmakeraw(&mut raw);
                if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(RawMode { saved })
            }
        }
    }

    impl Drop for RawMode {
        fn drop(&mut self) {
            // SAFETY: restores the attributes saved by enable().
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
        }
    }
}
