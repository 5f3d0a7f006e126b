//! `kiln restart ID...`: stop (if running) and start again, keeping the writable disk,
//! as `docker restart` does.

use std::time::Duration;

use clap::Args;

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;
use crate::run::VmmArgs;
use crate::sandbox::each_id;

#[derive(Debug, Args)]
pub struct RestartArgs {
    /// Seconds the workloads get after SIGTERM before they are killed.
    #[arg(
        short = 't',
        long = "time",
        value_name = "SECONDS",
        default_value_t = 10
    )]
    time: u64,

    #[command(flatten)]
    vmm: VmmArgs,

    /// Sandbox ids or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Restarts each sandbox and prints its id; one that fails is reported on stderr, the
/// rest still restarted, and kiln exits 1.
pub fn run(globals: &Globals, args: RestartArgs) -> CommandResult {
    let monitor_exe = crate::sandbox::monitor_exe()?;
    let events = crate::sandbox::progress(globals);
    each_id(&args.ids, |id| {
        let info = kiln_sandbox::restart(
            &globals.root,
            id,
            Duration::from_secs(args.time),
            &monitor_exe,
            &args.vmm.qemu,
            &events,
        )
        .map_err(sandbox_error)?;
        if let Some((message, _)) = info.start_failure() {
            return Err(CommandError::failure(anyhow::anyhow!("{id}: {message}")));
        }
        if !globals.json {
            println!("{id}");
        }
        Ok(())
    })
}
