//! Detached sandboxes: `kiln create`, `start`, `stop`, `rm`, `logs`, `exec`,
//! `run -d`, and the hidden `kiln monitor` that `start` runs for each sandbox.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use kiln_sandbox::{ErrorKind, ExecFields, ProvisionEvent, SandboxInfo};

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;
use crate::run::{attach, kiln_error, terminal_size, FlagNames, SandboxArgs, VmmArgs};

#[derive(Debug, Args)]
#[command(disable_help_flag = true)]
pub struct CreateArgs {
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    vmm: VmmArgs,

    /// Sandbox ids, unique id prefixes or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// Seconds the workloads get after SIGTERM before they are killed.
    #[arg(
        short = 't',
        long = "time",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    time: u64,

    /// Sandbox ids, unique id prefixes or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop a running sandbox first (at once, without a grace period).
    #[arg(short, long)]
    force: bool,

    /// Sandbox ids, unique id prefixes or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the sandbox stops.
    #[arg(short, long)]
    follow: bool,

    /// The sandbox's network decisions instead (one line each; --json: the JSON lines).
    #[arg(long)]
    network: bool,

    #[command(flatten)]
    selection: crate::logs::LogSelectionArgs,

    /// Sandbox id or name.
    id: String,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Stream kiln's stdin to the command (EOF included).
    #[arg(short, long)]
    interactive: bool,

    /// Run the command on a terminal (a PTY in the guest).
    #[arg(short, long)]
    tty: bool,

    /// Set an environment variable: KEY=VALUE, or KEY to copy kiln's own (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,

    /// Working directory of the command (absolute) [default: the sandbox's].
    #[arg(short, long = "workdir", value_name = "DIR")]
    workdir: Option<String>,

    /// Sandbox id or name.
    id: String,

    /// Command and arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Passed by `start`: the monitor boots with the VMM of the command that started it.
    #[command(flatten)]
    vmm: VmmArgs,

    /// Sandbox id.
    id: String,
}

/// Progress lines on stderr (layer progress has its own renderer).
pub fn progress(globals: &Globals) -> impl Fn(ProvisionEvent) + '_ {
    let shown = globals.show_progress();
    move |event| {
        if !shown {
            return;
        }
        let line = match event {
            ProvisionEvent::PullingLayer { .. } | ProvisionEvent::ResolvingImage { .. } => return,
            ProvisionEvent::BuildingRootImage => "building the root image".to_owned(),
            ProvisionEvent::BuildingIdentityLayer => "preparing the identity layer".to_owned(),
            ProvisionEvent::Booting => "booting".to_owned(),
            ProvisionEvent::Running => "running".to_owned(),
            ProvisionEvent::Exited { exit_code, .. } => {
                format!("the workload already exited ({exit_code})")
            }
        };
        eprintln!("kiln: {line}");
    }
}

/// A started sandbox: its id (or JSON), or why its workload could not start, on stderr
/// with the exit code for it (127, 126), as `docker start` and `docker run -d` fail.
fn print_started(globals: &Globals, info: &SandboxInfo) -> CommandResult {
    if let Some((message, code)) = info.start_failure() {
        eprintln!("kiln: {message}");
        return Ok(ExitCode::from(code.clamp(0, 255) as u8));
    }
    print_info(globals, info)
}

fn print_info(globals: &Globals, info: &SandboxInfo) -> CommandResult {
    if globals.json {
        println!("{}", serde_json::to_string_pretty(info)?);
    } else {
        println!("{}", info.id);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn create(globals: &Globals, args: CreateArgs) -> CommandResult {
    let request = args
        .sandbox
        .into_fields(globals)
        .map_err(CommandError::usage)?
        .validate(&FlagNames)
        .map_err(sandbox_error)?;
    crate::network::report_not_enforced(globals, &request.not_enforced);
    let info =
        kiln_sandbox::create(&globals.root, request, &progress(globals)).map_err(sandbox_error)?;
    print_info(globals, &info)
}

pub fn monitor_exe() -> Result<PathBuf, CommandError> {
    std::env::current_exe()
        .map_err(|e| CommandError::failure(anyhow::anyhow!("finding the kiln executable: {e}")))
}

pub fn start(globals: &Globals, args: StartArgs) -> CommandResult {
    let monitor = monitor_exe()?;
    each_id(&args.ids, |id| {
        let info = kiln_sandbox::start(
            &globals.root,
            id,
            &monitor,
            &args.vmm.qemu,
            &progress(globals),
        )
        .map_err(sandbox_error)?;
        // As `docker start`: the workload's start failure is the command's error.
        if let Some((message, _)) = info.start_failure() {
            return Err(CommandError::failure(anyhow::anyhow!("{id}: {message}")));
        }
        print_info(globals, &info).map(drop)
    })
}

/// Runs `action` for each of `ids` as docker does: a failure is reported on stderr and
/// the others still run; the exit code is 1 when any failed.
pub fn each_id(
    ids: &[String],
    mut action: impl FnMut(&str) -> Result<(), CommandError>,
) -> CommandResult {
    let mut failed = false;
    for id in ids {
        if let Err(err) = action(id) {
            crate::exit::report(&err);
            failed = true;
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `kiln run -d`: create, start, print the id. Kiln's own failures exit 125, as `run`.
/// With `--rm` the monitor removes the sandbox when it stops; one that never got its
/// workload running is removed here, after saying why.
pub fn run_detached(
    globals: &Globals,
    args: SandboxArgs,
    vmm: &VmmArgs,
    remove: bool,
) -> CommandResult {
    let mut fields = args.into_fields(globals).map_err(kiln_error)?;
    fields.auto_remove = remove;
    let request = fields.validate(&FlagNames).map_err(kiln_error)?;
    crate::network::report_not_enforced(globals, &request.not_enforced);
    let events = progress(globals);
    let created = kiln_sandbox::create(&globals.root, request, &events).map_err(kiln_error)?;
    let started = monitor_exe().and_then(|exe| {
        kiln_sandbox::start(&globals.root, &created.id, &exe, &vmm.qemu, &events)
            .map_err(kiln_error)
    });
    let never_ran = match &started {
        // Its monitor is ending: it goes once that has.
        Ok(info) if info.start_failure().is_some() => {
            Some(kiln_sandbox::wait(&globals.root, &created.id).map(drop))
        }
        Ok(_) => None,
        Err(_) => Some(Ok(())),
    };
    if let (true, Some(waited)) = (remove, never_ran) {
        let removed = waited.and_then(|()| kiln_sandbox::remove(&globals.root, &created.id, true));
        if let Err(err) = removed {
            eprintln!("kiln: warning: removing sandbox {}: {err}", created.id);
        }
    }
    print_started(globals, &started?)
}

pub fn stop(globals: &Globals, args: StopArgs) -> CommandResult {
    each_id(&args.ids, |id| {
        let info = kiln_sandbox::stop(&globals.root, id, Duration::from_secs(args.time))
            .map_err(sandbox_error)?;
        print_info(globals, &info).map(drop)
    })
}

pub fn rm(globals: &Globals, args: RmArgs) -> CommandResult {
    each_id(&args.ids, |id| {
        kiln_sandbox::remove(&globals.root, id, args.force).map_err(sandbox_error)?;
        if !globals.json {
            println!("{id}");
        }
        Ok(())
    })
}

pub fn logs(globals: &Globals, args: LogsArgs) -> CommandResult {
    if args.network {
        return crate::network::logs(globals, &args.id, args.follow);
    }
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let options = args
        .selection
        .into_options(args.follow)
        .map_err(CommandError::usage)?;
    kiln_sandbox::logs(&globals.root, &args.id, &options, &mut stdout, &mut stderr)
        .map_err(sandbox_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln exec`: the command's exit code becomes kiln's; 125 means kiln itself failed.
pub fn exec(globals: &Globals, args: ExecArgs) -> CommandResult {
    crate::run::check_input_terminal(args.interactive, args.tty).map_err(kiln_error)?;
    let request = ExecFields {
        command: args.command,
        env: args.env,
        lend_environment: true,
        workdir: args.workdir,
        terminal: args.tty.then(terminal_size),
    }
    .validate(&FlagNames)
    .map_err(kiln_error)?;
    let session = kiln_sandbox::exec(&globals.root, &args.id, request).map_err(kiln_error)?;
    let (io, control_rx, _raw) = attach(args.interactive, args.tty).map_err(kiln_error)?;
    let result = session.run(io, control_rx).map_err(kiln_error)?;
    Ok(crate::exit::workload_exit(&result))
}

/// `kiln monitor ID` (hidden): run by `start`; returns once the detached monitor runs.
pub fn monitor(globals: &Globals, args: MonitorArgs) -> CommandResult {
    kiln_sandbox::run_monitor(&globals.root, &args.id, &args.vmm.qemu).map_err(sandbox_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln inspect ID` for a sandbox: its JSON (or `template` of it), or `None` when `id`
/// names no sandbox.
pub fn inspect(root: &Path, id: &str, template: Option<&str>) -> Option<CommandResult> {
    match kiln_sandbox::get(root, id) {
        Ok(info) => Some(crate::inspect::print_inspected(&info, template)),
        // Not a sandbox's id or name (an image reference, say): not ours to show.
        Err(err) if err.kind() == ErrorKind::NotFound => None,
        // An image reference is no sandbox name (it has ':' or '/'); an ambiguous id
        // prefix is, and its error lists the sandboxes it matches.
        Err(err) if err.kind() == ErrorKind::InvalidInput && !id.contains([':', '/', '@']) => {
            Some(Err(sandbox_error(err)))
        }
        Err(err) if err.kind() == ErrorKind::InvalidInput => None,
        Err(err) => Some(Err(sandbox_error(err))),
    }
}
