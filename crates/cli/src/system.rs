//! `kiln system df`: the disk space kiln's images, built root images and sandboxes take.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use kiln_sandbox::Usage;

use crate::exit::{sandbox_error, CommandResult};
use crate::globals::Globals;
use crate::listing::{self, Columns, Row};

#[derive(Debug, Args)]
pub struct SystemArgs {
    #[command(subcommand)]
    command: SystemCommand,
}

#[derive(Debug, Subcommand)]
enum SystemCommand {
    /// Show the disk space used by images, built root images and sandboxes.
    Df,
}

const COLUMNS: Columns = &[
    ("Type", "TYPE"),
    ("TotalCount", "TOTAL"),
    ("Active", "ACTIVE"),
    ("Size", "SIZE"),
    ("Reclaimable", "RECLAIMABLE"),
];

const TABLE: &str = "table {{.Type}}\t{{.TotalCount}}\t{{.Active}}\t{{.Size}}\t{{.Reclaimable}}";

pub fn run(globals: &Globals, args: SystemArgs) -> CommandResult {
    match args.command {
        SystemCommand::Df => df(globals),
    }
}

fn df(globals: &Globals) -> CommandResult {
    let usage = kiln_sandbox::disk_usage(&globals.root).map_err(sandbox_error)?;
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&usage)?);
        return Ok(ExitCode::SUCCESS);
    }
    let row = |kind: &str, usage: &Usage| -> Row {
        let share = (usage.reclaimable_bytes * 100)
            .checked_div(usage.bytes)
            .unwrap_or(0)
            .min(100);
        vec![
            kind.to_owned(),
            usage.total.to_string(),
            usage.active.to_string(),
            listing::human_size(usage.bytes),
            format!(
                "{} ({share}%)",
                listing::human_size(usage.reclaimable_bytes)
            ),
        ]
    };
    let rows = [
        row("Images", &usage.images),
        row("Root images", &usage.root_images),
        row("Sandboxes", &usage.sandboxes),
    ];
    let format = listing::parse_format(None, COLUMNS, TABLE)?;
    listing::print(&mut std::io::stdout().lock(), &format, COLUMNS, &rows)?;
    Ok(ExitCode::SUCCESS)
}
