//! `kiln inspect ID|REF`: a sandbox's state when ID names one (an id, a unique id
//! prefix or a name); else a pulled image by image id (`sha256:...` or a short one, as
//! `kiln images` shows it) or reference: manifest digest, platform, run config and
//! layers, read from the store alone (works offline). Both print JSON, as docker's
//! inspect; `--format` prints a template of its fields instead.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::Args;
use kiln_image::{Digest, PulledImage, Store};
use serde::Serialize;

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;
use crate::listing;
use crate::pull::{image_error, parse_platform, parse_reference};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A sandbox id, id prefix or name; an image id; or an image reference as given to `kiln pull`.
    reference: String,

    /// Print a template of the JSON's fields instead, as {{.status}} or {{.config.cmd}}.
    #[arg(short, long, value_name = "TEMPLATE")]
    format: Option<String>,

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
    let template = args.format.as_deref();
    if let Some(result) = crate::sandbox::inspect(&globals.root, &args.reference, template) {
        return result;
    }
    let store = Store::open(&globals.root).map_err(image_error)?;
    let image = match store.find_id(&args.reference).map_err(image_error)? {
        Some(record) => store.load(record).map_err(image_error)?,
        None => {
            let reference = parse_reference(&args.reference)?;
            let platform = parse_platform(args.platform.as_deref())?;
            store
                .resolve(&reference, platform.as_ref())
                .map_err(image_error)?
        }
    };
    print_inspected(&inspected(&image), template)
}

/// `value` as pretty JSON, or rendered through `template`.
pub fn print_inspected(value: &impl Serialize, template: Option<&str>) -> CommandResult {
    let json = serde_json::to_value(value)?;
    match template {
        None => println!("{}", serde_json::to_string_pretty(&json)?),
        Some(template) => println!(
            "{}",
            listing::render_json(template, &json).map_err(CommandError::usage)?
        ),
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
