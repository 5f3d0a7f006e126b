//! `kiln images`, `kiln rmi REF`, `kiln prune`: what the content store holds.

use std::process::ExitCode;

use clap::Args;
use kiln_image::Store;

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;
use crate::pull::{image_error, parse_platform, parse_reference};

#[derive(Debug, Args)]
pub struct ImagesArgs {}

#[derive(Debug, Args)]
pub struct RmiArgs {
    /// The image reference, as given to `kiln pull`.
    reference: String,

    /// Remove only the image of this platform (OS/ARCH[/VARIANT]) [default: every platform].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {}

pub fn images(globals: &Globals, _args: ImagesArgs) -> CommandResult {
    let store = Store::open(&globals.root).map_err(image_error)?;
    let records = store.images().map_err(image_error)?;
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<60} {:<16} {:<19} {:>12} PULLED",
        "REFERENCE", "PLATFORM", "MANIFEST", "SIZE"
    );
    for r in &records {
        println!(
            "{:<60} {:<16} {:<19} {:>12} {}",
            r.reference,
            r.platform.to_string(),
            format!(
                "{}:{}",
                r.manifest_digest.algorithm().name(),
                &r.manifest_digest.hex()[..12]
            ),
            r.size,
            r.pulled_at
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rmi(globals: &Globals, args: RmiArgs) -> CommandResult {
    let reference = parse_reference(&args.reference)?;
    let platform = parse_platform(args.platform.as_deref())?;
    let store = Store::open(&globals.root).map_err(image_error)?;
    let removed = store
        .remove(&reference.canonical(), platform.as_ref())
        .map_err(image_error)?;
    if removed == 0 {
        return Err(CommandError::failure(anyhow::anyhow!(
            "image {reference} is not in the store (see `kiln images`)"
        )));
    }
    if globals.json {
        println!(
            "{}",
            serde_json::json!({"reference": reference.canonical(), "removed": removed})
        );
    } else if !globals.quiet {
        println!("removed {reference} ({removed} platform(s)); `kiln prune` frees its blobs");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prune(globals: &Globals, _args: PruneArgs) -> CommandResult {
    let report = kiln_sandbox::prune_images(&globals.root).map_err(crate::exit::sandbox_error)?;
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !globals.quiet {
        println!(
            "removed {} blobs, freed {} bytes",
            report.blobs_removed, report.bytes_freed
        );
        println!(
            "removed the built root images of {} images, freed {} bytes",
            report.root_images_removed.len(),
            report.root_image_bytes_freed
        );
    }
    Ok(ExitCode::SUCCESS)
}
