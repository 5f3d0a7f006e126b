//! `kiln check REF`: whether an image can run as a sandbox, with what to fix (kiln-rootfs
//! does the checking on the image's resolved tree). Exit 0 when it can, 1 when not.

use std::process::ExitCode;

use clap::Args;
use kiln_image::{PullPolicy, Store};
use kiln_rootfs::{check_layers, CheckInput, CheckReport, Limits, Severity};
use serde::Serialize;

use kiln_sandbox::prepare::open_layers;

use crate::build::id_flag;
use crate::exit::CommandResult;
use crate::globals::Globals;
use crate::pull::{image_error, parse_reference, progress_renderer, SourceArgs};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Image reference (as for `kiln pull`); pulled when not in the store.
    reference: String,

    #[command(flatten)]
    source: SourceArgs,

    /// Sandbox uid to check collisions against [default: 10001].
    #[arg(long, value_name = "N")]
    uid: Option<String>,

    /// Sandbox gid to check collisions against [default: 10001].
    #[arg(long, value_name = "N")]
    gid: Option<String>,
}

#[derive(Serialize)]
struct CheckOutput<'a> {
    reference: &'a str,
    platform: String,
    #[serde(flatten)]
    report: &'a CheckReport,
}

pub fn run(globals: &Globals, args: CheckArgs) -> CommandResult {
    let reference = parse_reference(&args.reference)?;
    let uid = id_flag(
        "--uid",
        args.uid.as_deref(),
        kiln_identity::DEFAULT_SANDBOX_UID,
    )?;
    let gid = id_flag(
        "--gid",
        args.gid.as_deref(),
        kiln_identity::DEFAULT_SANDBOX_GID,
    )?;
    let mut options = args.source.options(PullPolicy::Missing)?;
    options.progress = progress_renderer(globals).filter(|_| !globals.json);
    let store = Store::open(&globals.root).map_err(image_error)?;
    let image = kiln_image::pull(&store, &reference, &options).map_err(image_error)?;
    let config = image.config.config().as_ref();
    let input = CheckInput {
        entrypoint: config
            .and_then(|c| c.entrypoint().clone())
            .unwrap_or_default(),
        cmd: config.and_then(|c| c.cmd().clone()).unwrap_or_default(),
        env: config.and_then(|c| c.env().clone()).unwrap_or_default(),
        working_dir: config.and_then(|c| c.working_dir().clone()),
        uid,
        gid,
    };
    let report = check_layers(
        open_layers(&store, &image)?,
        &input,
        &Limits::default(),
        store.dir(),
    )?;
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
