//! `kiln kill [-s SIGNAL] ID...`: a signal to the main workload of running sandboxes, as
//! `docker kill` sends it.

use clap::Args;

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;
use crate::sandbox::each_id;

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal: a name (KILL, SIGTERM, usr1) or a number from 1 to 64.
    #[arg(short, long, value_name = "SIGNAL", default_value = "KILL")]
    signal: String,

    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Signals each sandbox and prints its id; one that is missing or not running is reported
/// on stderr, the rest still signalled, and kiln exits 1.
pub fn run(globals: &Globals, args: KillArgs) -> CommandResult {
    let signal = kiln_sandbox::parse_signal(&args.signal)
        .map_err(|e| CommandError::usage(anyhow::anyhow!("-s: {e}")))?;
    each_id(&args.ids, |id| {
        kiln_sandbox::kill(&globals.root, id, signal).map_err(sandbox_error)?;
        if !globals.json {
            println!("{id}");
        }
        Ok(())
    })
}
