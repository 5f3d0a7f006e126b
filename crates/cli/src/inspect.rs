//! `kiln inspect ID|REF`: a sandbox's state as JSON when ID names one; else a pulled
//! image's manifest digest, platform, run config and layers, read from the store alone
//! (works offline).

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Args;
use kiln_image::{Digest, PulledImage, Store};
use serde::Serialize;

use crate::exit::CommandResult;
use crate::globals::Globals;
use crate::pull::{image_error, parse_platform, parse_reference};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A sandbox id or name, or an image reference as given to `kiln pull`.
    reference: String,

    /// The platform's image when several were pulled (OS/ARCH[/VARIANT]) [default: the host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
}

#[derive(Serialize)]
struct Inspected<'a> {
    reference: &'a str,
    manifest_digest: &'a Digest,
    index_digest: Option<&'a Digest>,
    config_digest: &'a Digest,
    platform: String,
    size: u64,
    created: Option<&'a str>,
    pulled_at: u64,
    config: RunConfig<'a>,
    layers: Vec<Layer<'a>>,
}

#[derive(Serialize)]
struct RunConfig<'a> {
    entrypoint: Option<&'a Vec<String>>,
    cmd: Option<&'a Vec<String>>,
    env: Option<&'a Vec<String>>,
    user: Option<&'a String>,
    working_dir: Option<&'a String>,
    labels: Option<&'a HashMap<String, String>>,
}

#[derive(Serialize)]
struct Layer<'a> {
    digest: &'a Digest,
    diff_id: &'a Digest,
    size: u64,
    media_type: &'a str,
}

pub fn run(globals: &Globals, args: InspectArgs) -> CommandResult {
    if let Some(result) = crate::sandbox::inspect(globals, &args.reference) {
        return result;
    }
    let reference = parse_reference(&args.reference)?;
    let platform = parse_platform(args.platform.as_deref())?;
    let store = Store::open(&globals.root).map_err(image_error)?;
    let image = store
        .resolve(&reference, platform.as_ref())
        .map_err(image_error)?;
    let inspected = inspected(&image);
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&inspected)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("reference:    {}", inspected.reference);
    println!("manifest:     {}", inspected.manifest_digest);
    println!("platform:     {}", inspected.platform);
    println!("size:         {} bytes", inspected.size);
    let c = &inspected.config;
    println!(
        "entrypoint:   {}",
        c.entrypoint.map(|v| format!("{v:?}")).unwrap_or_default()
    );
    println!(
        "cmd:          {}",
        c.cmd.map(|v| format!("{v:?}")).unwrap_or_default()
    );
    println!(
        "user:         {}",
        c.user.map(String::as_str).unwrap_or_default()
    );
    println!(
        "working_dir:  {}",
        c.working_dir.map(String::as_str).unwrap_or_default()
    );
    for var in c.env.into_iter().flatten() {
        println!("env:          {var}");
    }
    for layer in &inspected.layers {
        println!(
            "layer:        {} {} bytes {}",
            layer.digest, layer.size, layer.media_type
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn inspected(image: &PulledImage) -> Inspected<'_> {
    let record = &image.record;
    let config = image.config.config().as_ref();
    Inspected {
        reference: &record.reference,
        manifest_digest: &record.manifest_digest,
        index_digest: record.index_digest.as_ref(),
        config_digest: &record.config_digest,
        platform: record.platform.to_string(),
        size: record.size,
        created: record.created.as_deref(),
        pulled_at: record.pulled_at,
        config: RunConfig {
            entrypoint: config.and_then(|c| c.entrypoint().as_ref()),
            cmd: config.and_then(|c| c.cmd().as_ref()),
            env: config.and_then(|c| c.env().as_ref()),
            user: config.and_then(|c| c.user().as_ref()),
            working_dir: config.and_then(|c| c.working_dir().as_ref()),
            labels: config.and_then(|c| c.labels().as_ref()),
        },
        layers: image
            .layers
            .iter()
            .map(|l| Layer {
                digest: &l.digest,
                diff_id: &l.diff_id,
                size: l.size,
                media_type: &l.media_type,
            })
            .collect(),
    }
}
