//! `kiln run`: boot an image as a microVM sandbox and run its command, as `docker run`
//! would: the workload's exit code becomes kiln's, 125 means kiln itself failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_image::PullPolicy;
use kiln_protocol::TerminalSize;
use kiln_sandbox::{
    Control, CreateFields, EnvFile, Field, FieldNames, HostIo, NetworkMode, PolicyText, RunFields,
    RunReport,
};

use crate::exit::{CommandError, CommandResult, EXIT_RUN_FAILURE};
use crate::globals::Globals;
use crate::pull::{progress_renderer, SourceArgs};

#[derive(Debug, Args)]
#[command(
    disable_help_flag = true,
    after_help = "In the guest, kiln-init is PID 1: it reaps orphaned processes and passes \
signals on to the workload, as `docker run --init` arranges. ^C and other signals to kiln go \
to the workload; kiln exits with its code (130 after SIGINT), 125 when kiln itself failed."
)]
pub struct RunArgs {
    /// Remove the sandbox (its writable layer and state) when the workload ends; with -d,
    /// its monitor removes it when it stops.
    #[arg(long)]
    rm: bool,

    /// Start the sandbox detached (create + start) and print its id.
    #[arg(short, long, conflicts_with_all = ["interactive", "tty", "timeout", "timings"])]
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

    /// Network: user (kiln's endpoint: the internet, DNS, -p forwards; the host and private
    /// networks refused, see docs/network.md) or none.
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

    /// Open a host-local service to the guest: host.kiln.internal:PORT (the host's
    /// loopback) or IPV4:PORT (repeatable; needs --network user).
    #[arg(long = "network-allow-host", value_name = "HOST:PORT")]
    network_allow_host: Vec<String>,

    /// Decide the sandbox's network by an OpenShell policy file's network_policies: what
    /// no entry allows is denied (needs --network user; `kiln policy set` replaces it).
    #[arg(long = "network-policy", value_name = "FILE")]
    network_policy: Option<PathBuf>,

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

    /// Boot a detached sandbox again (on its writable disk, with a growing delay) after its
    /// workload ended: no, on-failure[:N] (non-zero exits, at most N times), always or
    /// unless-stopped (the same here: there is no daemon); `kiln stop` ends it [default: no]
    #[arg(long, value_name = "POLICY")]
    restart: Option<String>,

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
            Field::AllowHost => "--network-allow-host",
            Field::NetworkPolicy => "--network-policy",
            Field::Volumes => "-v",
            Field::Hostname => "--hostname",
            Field::AddHost => "--add-host",
            Field::Dns => "--dns",
            Field::Tmpfs => "--tmpfs",
            Field::Mount => "--mount",
            Field::Timeout => "--timeout",
            Field::LogMaxSize => "--log-max-size",
            Field::Restart => "--restart",
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
        return crate::sandbox::run_detached(globals, args.sandbox, &args.vmm, args.rm);
    }
    check_input_terminal(args.interactive, args.tty).map_err(kiln_error)?;
    let request = RunFields {
        sandbox: args.sandbox.into_fields(globals).map_err(kiln_error)?,
        timeout: args.timeout,
        remove: args.rm,
        terminal: args.tty.then(terminal_size),
        qemu: args.vmm.qemu,
    }
    .validate(&FlagNames)
    .map_err(kiln_error)?;

    crate::network::report_not_enforced(globals, request.not_enforced());
    let (mut io, control_rx, _raw) = attach(args.interactive, args.tty).map_err(kiln_error)?;
    let (quiet, progress) = (globals.quiet, globals.show_progress());
    if !quiet {
        io.network_denials = Some(Box::new(|record| {
            eprintln!("kiln: network: {}", crate::network::describe(record));
        }));
    }
    // Warnings always (unless -q); notes such as the accelerator's fallback as progress.
    let notice = move |line: &str| {
        if !quiet && (progress || line.starts_with("warning:")) {
            eprintln!("kiln: {line}");
        }
    };
    let report =
        kiln_sandbox::run(&globals.root, request, io, control_rx, &notice).map_err(kiln_error)?;
    drop(_raw);
    if args.timings {
        print_timings(globals, &report);
    }
    Ok(crate::exit::workload_exit(&report.result))
}

impl SandboxArgs {
    /// The fields of a create request as these flags give them; kiln-sandbox checks them.
    pub fn into_fields(self, globals: &Globals) -> anyhow::Result<CreateFields> {
        let mut pull = self
            .source
            .options(PullPolicy::parse(&self.pull)?)
            .map_err(|e| e.error)?;
        pull.progress = progress_renderer(globals).filter(|_| globals.show_progress());
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
            allow_host: self.network_allow_host,
            network_policy: self
                .network_policy
                .as_deref()
                .map(read_policy_file)
                .transpose()?,
            labels: self.labels,
            volumes: self.volumes,
            accel,
            log_max_size: self.log_max_size,
            rootfs_cache_max: globals.rootfs_cache_max,
            allow_user_namespaces: self.allow_userns,
            auto_remove: false,
            restart: self.restart,
            ..CreateFields::default()
        };
        self.guest.fill(&mut fields);
        Ok(fields)
    }
}

/// A `--network-policy` file (at most kiln-policy's bound, which validation reports).
pub fn read_policy_file(path: &std::path::Path) -> anyhow::Result<PolicyText> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| {
            file.take(kiln_policy::MAX_POLICY_BYTES as u64 + 1)
                .read_to_string(&mut text)
        })
        .with_context(|| format!("--network-policy {}", path.display()))?;
    Ok(PolicyText {
        file: path.display().to_string(),
        text,
    })
}

/// `-it` types into the guest's terminal from kiln's: piped input is refused, as docker
/// refuses it. Its end could only reach the guest as a ^D typed at some moment, which a
/// shell's line editor reads as the end or not depending on when it switched modes.
pub fn check_input_terminal(interactive: bool, tty: bool) -> anyhow::Result<()> {
    if interactive && tty && !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "the input device is not a TTY (-it needs a terminal on stdin; pipe input with -i alone)"
        );
    }
    Ok(())
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
        network_denials: None,
    };
    Ok((io, control_rx, raw))
}

/// The signals a user sends a workload through kiln, as `docker run` proxies them:
/// SIGINT and SIGTERM (kiln stops the VM if it does not end within the grace period),
/// SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2; SIGWINCH becomes a terminal resize. The VMM sits
/// in a process group of its own, so a terminal's ^C reaches kiln alone.
fn forward_signals(control: mpsc::Sender<Control>, tty: bool) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
    let mut signals = signal_hook::iterator::Signals::new([
        SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH,
    ])?;
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
    // The phases in order; they add up to the total.
    let phases = [
        ("pull", Some(t.pull)),
        ("build/cache", Some(t.build)),
        ("setup", t.setup),
        ("qemu start", t.vm.vmm_start),
        ("kernel", t.vm.kernel),
        ("init", t.vm.init),
        ("supervisor", t.vm.supervisor),
        ("workload", t.vm.workload),
        ("shutdown", t.vm.shutdown),
        ("cleanup", t.cleanup),
    ];
    let sums = [
        ("total", Some(t.total)),
        // Not a phase: the sum a user waits, from `kiln run` to the workload's start.
        ("to workload", t.to_workload),
    ];
    if globals.json {
        let map: serde_json::Map<String, serde_json::Value> = phases
            .iter()
            .chain(&sums)
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
    for (name, duration) in phases.into_iter().chain(sums) {
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
