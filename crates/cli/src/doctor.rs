//! `kiln doctor`: reports whether this host can run sandboxes.

use std::process::ExitCode;

use clap::Args;

use crate::exit::CommandResult;
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// QEMU binary to check.
    #[arg(long, env = "KILN_QEMU", default_value = kiln_vm::qemu::DEFAULT_BINARY)]
    qemu: std::path::PathBuf,
}

pub fn run(globals: &Globals, args: DoctorArgs) -> CommandResult {
    let report = kiln_vm::doctor::diagnose(&args.qemu, &globals.root);
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for check in &report.checks {
            let mark = if check.ok { "ok" } else { "PROBLEM" };
            println!("{mark:>7}  {:<13} {}", check.name, check.detail);
            if let Some(fix) = &check.fix {
                println!("{:>7}  {:<13} fix: {fix}", "", "");
            }
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
