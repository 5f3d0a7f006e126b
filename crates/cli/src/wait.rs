//! `kiln wait ID...`: blocks until each sandbox stops and prints its exit code, as
//! `docker wait` does.

use clap::Args;
use kiln_sandbox::Status;

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;
use crate::sandbox::each_id;

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Prints one exit code per sandbox, in order, once it stopped; a sandbox that cannot be
/// waited for (missing, never started, failed to boot) is reported on stderr, the others
/// still waited for, and kiln exits 1.
pub fn run(globals: &Globals, args: WaitArgs) -> CommandResult {
    each_id(&args.ids, |id| {
        let info = kiln_sandbox::wait(&globals.root, id).map_err(sandbox_error)?;
        let message = match info.status {
            Status::Exited { exit_code, .. } => {
                println!("{exit_code}");
                return Ok(());
            }
            Status::Failed { message } => format!("sandbox {}: failed: {message}", info.id),
            Status::Created => format!("sandbox {} was never started", info.id),
            // wait returns only once the monitor is gone.
            Status::Running => format!("sandbox {} is still running", info.id),
        };
        Err(CommandError::failure(anyhow::anyhow!(message)))
    })
}
