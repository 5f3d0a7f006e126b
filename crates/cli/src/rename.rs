//! `kiln rename OLD NEW`: give a sandbox another name, as `docker rename`.

use std::process::ExitCode;

use clap::Args;

use crate::exit::{sandbox_error, CommandResult};
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct RenameArgs {
    /// Sandbox id, unique id prefix or name.
    old: String,

    /// The new name ([A-Za-z0-9._-], up to 128 characters; no other sandbox's).
    new: String,
}

pub fn run(globals: &Globals, args: RenameArgs) -> CommandResult {
    let info = kiln_sandbox::rename(&globals.root, &args.old, &args.new).map_err(sandbox_error)?;
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    }
    Ok(ExitCode::SUCCESS)
}
