//! `kiln restart ID...`: stop (if running) and start again, keeping the writable disk,
//! as `docker restart` does.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::exit::{sandbox_error, CommandResult};
use crate::globals::Globals;
use crate::run::VmmArgs;

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
    let mut failed = false;
    for id in &args.ids {
        let restarted = kiln_sandbox::restart(
            &globals.root,
            id,
            Duration::from_secs(args.time),
            &monitor_exe,
            &args.vmm.qemu,
            &events,
        );
        match restarted {
            Ok(info) => {
                if let Some((message, _)) = info.start_failure() {
                    eprintln!("kiln: {id}: {message}");
                    failed = true;
                } else if !globals.json {
                    println!("{id}");
                }
            }
            Err(err) => {
                eprintln!("kiln: error: {:#}", sandbox_error(err).error);
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
