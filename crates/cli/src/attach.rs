//! `kiln attach ID`: the output of a running detached sandbox from now on, with kiln's
//! signals passed to its workload, as `docker attach` does.

use std::process::ExitCode;

use clap::{ArgAction, Args};
use kiln_sandbox::Status;

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Pass kiln's SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the workload;
    /// with false, ^C detaches (kiln exits, the sandbox runs on).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set)]
    sig_proxy: bool,

    /// Sandbox id or name (a detached sandbox has no stdin: only its output is attached).
    id: String,
}

/// Streams the workload's stdout and stderr until the sandbox stops, then exits with its
/// workload's exit code.
pub fn run(globals: &Globals, args: AttachArgs) -> CommandResult {
    if args.sig_proxy {
        forward_signals(globals.root.clone(), args.id.clone())?;
    }
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let info = kiln_sandbox::attach(&globals.root, &args.id, &mut stdout, &mut stderr)
        .map_err(sandbox_error)?;
    match info.status {
        Status::Exited { exit_code, .. } => Ok(ExitCode::from(exit_code.clamp(0, 255) as u8)),
        Status::Failed { message } => Err(CommandError::failure(anyhow::anyhow!(
            "sandbox {}: failed: {message}",
            info.id
        ))),
        // attach returns once the monitor is gone, which leaves an end status.
        Status::Created | Status::Running => Ok(ExitCode::SUCCESS),
    }
}

/// Signals to kiln go to the sandbox's main workload, as `kiln kill -s` sends them.
fn forward_signals(root: std::path::PathBuf, id: String) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2])?;
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if let Err(err) = kiln_sandbox::kill(&root, &id, signal) {
                eprintln!("kiln: passing signal {signal} on: {err}");
            }
        }
    });
    Ok(())
}
