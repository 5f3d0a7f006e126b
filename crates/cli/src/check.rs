//! `kiln check REF`: whether an image can run as a sandbox, with what to fix (kiln-rootfs
//! does the checking on the image's resolved tree). Exit 0 when it can, 1 when not.

use std::process::ExitCode;

use clap::Args;
use kiln_rootfs::{check_layers, CheckInput, CheckReport, Severity};
use serde::Serialize;

use kiln_sandbox::{open_layers, ImageDefaults};

use crate::build::{pull_image_to_build, ImageToBuild, ImageToBuildArgs};
use crate::exit::CommandResult;
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    image: ImageToBuildArgs,
}

#[derive(Serialize)]
struct CheckOutput<'a> {
    reference: &'a str,
    platform: String,
    #[serde(flatten)]
    report: &'a CheckReport,
}

pub fn run(globals: &Globals, args: CheckArgs) -> CommandResult {
    let ImageToBuild {
        store,
        image,
        uid,
        gid,
        limits,
    } = pull_image_to_build(globals, &args.image)?;
    let config = ImageDefaults::from_config(&image.config);
    let input = CheckInput {
        entrypoint: config.entrypoint,
        cmd: config.cmd,
        env: config.env,
        working_dir: config.working_dir,
        uid,
        gid,
    };
    let report = check_layers(open_layers(&store, &image)?, &input, &limits, store.dir())?;
    let output = CheckOutput {
        reference: &image.record.reference,
        platform: image.record.platform.to_string(),
        report: &report,
    };
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&output)?);
    } else {
        print(&output);
    }
    Ok(if report.can_run {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print(output: &CheckOutput<'_>) {
    let r = output.report;
    println!("image:     {}", output.reference);
    println!("platform:  {}", output.platform);
    println!(
        "command:   {}",
        r.command.as_deref().unwrap_or("(not found)")
    );
    println!("shell:     {}", r.shell.as_deref().unwrap_or("(none)"));
    println!(
        "contents:  {} files ({} bytes), {} directories, {} symlinks, {} setuid/setgid",
        r.files, r.file_bytes, r.directories, r.symlinks, r.setid_count
    );
    for finding in &r.findings {
        let label = match finding.severity {
            Severity::Blocker => "BLOCKER",
            Severity::Warning => "warning",
            Severity::Info => "info",
        };
        println!(
            "{label:<8}  {}\n          fix: {}",
            finding.message, finding.fix
        );
    }
    if r.can_run {
        println!("result:    can run as a sandbox");
    } else {
        println!("result:    cannot run as a sandbox (see BLOCKER lines)");
    }
}
