//! Detached sandboxes: `kiln create`, `start`, `stop`, `rm`, `ps`, `logs`, `exec`,
//! `run -d`, and the hidden `kiln monitor` that `start` runs for each sandbox.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use kiln_sandbox::lifecycle::{
    self, ExecRequest, LifecycleError, ProvisionEvent, SandboxInfo, Status,
};
use kiln_sandbox::options::parse_env_assignment;

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;
use crate::run::{attach, kiln_error, terminal_size, SandboxArgs};

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Sandbox id or name.
    id: String,
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

    /// Sandbox id or name.
    id: String,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Stop a running sandbox first (at once, without a grace period).
    #[arg(short, long)]
    force: bool,

    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show every sandbox, not only running ones.
    #[arg(short, long)]
    all: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing new output until the sandbox stops.
    #[arg(short, long)]
    follow: bool,

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
    /// Sandbox id.
    id: String,
}

/// Bad ids are the user's to fix (exit 2); everything else is a failure (exit 1).
pub(crate) fn lifecycle_error(err: LifecycleError) -> CommandError {
    match err {
        LifecycleError::BadId(_) => CommandError::usage(err),
        other => CommandError::failure(other),
    }
}

/// Progress lines on stderr (layer progress has its own renderer).
fn progress(globals: &Globals) -> impl Fn(ProvisionEvent) + '_ {
    move |event| {
        if globals.quiet || globals.json {
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
        .create_request(globals)
        .map_err(CommandError::usage)?;
    let info =
        lifecycle::create(&globals.root, request, &progress(globals)).map_err(lifecycle_error)?;
    print_info(globals, &info)
}

fn monitor_exe() -> Result<PathBuf, CommandError> {
    std::env::current_exe()
        .map_err(|e| CommandError::failure(anyhow::anyhow!("finding the kiln executable: {e}")))
}

pub fn start(globals: &Globals, args: StartArgs) -> CommandResult {
    let info = lifecycle::start(&globals.root, &args.id, &monitor_exe()?, &progress(globals))
        .map_err(lifecycle_error)?;
    print_info(globals, &info)
}

/// `kiln run -d`: create, start, print the id. Kiln's own failures exit 125, as `run`.
pub fn run_detached(globals: &Globals, args: &SandboxArgs) -> CommandResult {
    let request = args.create_request(globals).map_err(kiln_error)?;
    let events = progress(globals);
    let created = lifecycle::create(&globals.root, request, &events).map_err(kiln_error)?;
    let info = lifecycle::start(&globals.root, &created.id, &monitor_exe()?, &events)
        .map_err(kiln_error)?;
    print_info(globals, &info)
}

pub fn stop(globals: &Globals, args: StopArgs) -> CommandResult {
    let info = lifecycle::stop(&globals.root, &args.id, Duration::from_secs(args.time))
        .map_err(lifecycle_error)?;
    print_info(globals, &info)
}

pub fn rm(globals: &Globals, args: RmArgs) -> CommandResult {
    for id in &args.ids {
        lifecycle::remove(&globals.root, id, args.force).map_err(lifecycle_error)?;
        if !globals.json {
            println!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn ps(globals: &Globals, args: PsArgs) -> CommandResult {
    let sandboxes: Vec<SandboxInfo> = lifecycle::list(&globals.root)
        .map_err(lifecycle_error)?
        .into_iter()
        .filter(|s| args.all || s.status == Status::Running)
        .collect();
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&sandboxes)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<14} {:<20} {:<14} {:<40} COMMAND",
        "ID", "NAME", "STATUS", "IMAGE"
    );
    for s in &sandboxes {
        let status = match &s.status {
            Status::Created => "created".to_owned(),
            Status::Running => "running".to_owned(),
            Status::Exited { exit_code, .. } => format!("exited ({exit_code})"),
            Status::Failed { .. } => "failed".to_owned(),
        };
        let name = s.name.as_deref().unwrap_or("-");
        println!(
            "{:<14} {:<20} {:<14} {:<40} {}",
            s.id,
            name,
            status,
            s.reference,
            s.run.argv.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn logs(globals: &Globals, args: LogsArgs) -> CommandResult {
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    lifecycle::logs(
        &globals.root,
        &args.id,
        args.follow,
        &mut stdout,
        &mut stderr,
    )
    .map_err(lifecycle_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln exec`: the command's exit code becomes kiln's; 125 means kiln itself failed.
pub fn exec(globals: &Globals, args: ExecArgs) -> CommandResult {
    let host_env = |key: &str| std::env::var(key).ok();
    let mut env = Vec::new();
    for assignment in &args.env {
        env.extend(parse_env_assignment(assignment, host_env).map_err(kiln_error)?);
    }
    let request = ExecRequest {
        argv: args.command,
        env,
        workdir: args.workdir,
        terminal: args.tty.then(terminal_size),
    };
    let session = lifecycle::exec(&globals.root, &args.id, request).map_err(kiln_error)?;
    let (io, control_rx, _raw) = attach(args.interactive, args.tty).map_err(kiln_error)?;
    let result = session.run(io, control_rx).map_err(kiln_error)?;
    Ok(ExitCode::from(result.exit_code().clamp(0, 255) as u8))
}

/// `kiln monitor ID` (hidden): run by `start`; returns once the detached monitor runs.
pub fn monitor(globals: &Globals, args: MonitorArgs) -> CommandResult {
    kiln_sandbox::monitor::run(&globals.root, &args.id).map_err(lifecycle_error)?;
    Ok(ExitCode::SUCCESS)
}

/// `kiln inspect ID` for a sandbox: its JSON, or `None` when `id` names no sandbox.
pub fn inspect(globals: &Globals, id: &str) -> Option<CommandResult> {
    kiln_sandbox::options::validate_name(id).ok()?;
    match lifecycle::get(&globals.root, id) {
        Ok(info) => Some(
            serde_json::to_string_pretty(&info)
                .map_err(CommandError::from)
                .map(|json| {
                    println!("{json}");
                    ExitCode::SUCCESS
                }),
        ),
        Err(LifecycleError::NotFound(_)) => None,
        Err(err) => Some(Err(lifecycle_error(err))),
    }
}
