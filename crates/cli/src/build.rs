//! `kiln build REF`: pulls if needed, then builds (or reuses) the root image and the
//! sandbox identity layer with kiln-rootfs, and prints their paths and stage timings.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kiln_image::{PullPolicy, PulledImage, Store};
use kiln_rootfs::{BuildOptions, Limits, Timings};
use serde::Serialize;

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;
use kiln_sandbox::open_layers;

use crate::pull::{image_error, parse_reference, progress_renderer, SourceArgs};

/// The image and sandbox ids of `kiln build` and `kiln check`.
#[derive(Debug, Args)]
pub struct ImageToBuildArgs {
    /// Image reference (as for `kiln pull`); pulled when not in the store.
    reference: String,

    #[command(flatten)]
    source: SourceArgs,

    /// Sandbox uid (1000 to 2000000000) [default: 10001].
    #[arg(long, value_name = "N")]
    uid: Option<String>,

    /// Sandbox gid (1000 to 2000000000) [default: 10001].
    #[arg(long, value_name = "N")]
    gid: Option<String>,

    /// Tar entries the layers may hold together [default: 1000000].
    #[arg(long, value_name = "N")]
    max_entries: Option<u64>,

    /// Bytes the layers may decompress to together, as 32g [default: 32g].
    #[arg(long, value_name = "SIZE")]
    max_uncompressed: Option<String>,

    /// How many times their compressed size the layers may decompress to, once past
    /// their first 256 MiB [default: 100].
    #[arg(long, value_name = "N")]
    max_compression_ratio: Option<u64>,
}

impl ImageToBuildArgs {
    /// kiln-rootfs's default limits, with the ones these flags raise (or lower).
    fn limits(&self) -> anyhow::Result<Limits> {
        let defaults = Limits::default();
        let max_uncompressed_bytes = match self.max_uncompressed.as_deref() {
            None => defaults.max_uncompressed_bytes,
            Some(text) => kiln_sandbox::parse_size(text).context("--max-uncompressed")?,
        };
        Ok(Limits {
            max_entries: self.max_entries.unwrap_or(defaults.max_entries),
            max_uncompressed_bytes,
            max_compression_ratio: self
                .max_compression_ratio
                .unwrap_or(defaults.max_compression_ratio),
            ..defaults
        })
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    image: ImageToBuildArgs,

    /// Write one image with the identity baked in instead of root + identity layer.
    #[arg(long)]
    merged: bool,

    /// Write the root (or merged) image to FILE instead of the cache.
    #[arg(short, long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Serialize)]
struct BuildOutput {
    reference: String,
    manifest_digest: String,
    /// The root image, or the merged image with --merged.
    root: PathBuf,
    root_built: bool,
    /// The identity layer (absent with --merged).
    identity: Option<PathBuf>,
    identity_built: bool,
    uid: u32,
    gid: u32,
    timings: Timings,
    warnings: Vec<String>,
    /// Images removed from the cache to keep it within --rootfs-cache-max.
    evicted: Vec<String>,
}

pub fn run(globals: &Globals, args: BuildArgs) -> CommandResult {
    let ImageToBuild {
        store,
        image,
        uid,
        gid,
        limits,
    } = pull_image_to_build(globals, &args.image)?;
    let digest = image.record.manifest_digest.to_string();
    let cache = kiln_sandbox::image_cache(&globals.root);
    let layers = || open_layers(&store, &image);

    let mut output = BuildOutput {
        reference: image.record.reference.clone(),
        manifest_digest: digest.clone(),
        root: PathBuf::new(),
        root_built: false,
        identity: None,
        identity_built: false,
        uid,
        gid,
        timings: Timings::default(),
        warnings: Vec::new(),
        evicted: Vec::new(),
    };
    if let Some(path) = &args.output {
        let options = BuildOptions {
            limits,
            merged: args.merged.then_some((uid, gid)),
        };
        let report = kiln_rootfs::build_root_image(layers()?, path, &options)?;
        output.timings = report.timings.clone();
        output.root = path.clone();
        output.root_built = true;
        if let Some(identity) = &report.identity {
            output.warnings = identity.warnings.clone();
        } else {
            let inputs = &report.identity_inputs;
            add_identity(
                &mut output,
                cache.identity_layer(&digest, inputs, uid, gid, kiln_identity::IdBounds::KILN)?,
            );
        }
    } else if args.merged {
        let merged = cache.merged_image(&digest, &limits, uid, gid, layers)?;
        output.root = merged.path;
        if let Some(report) = merged.built {
            output.root_built = true;
            output.timings = report.timings;
            output.warnings = report.identity.map(|i| i.warnings).unwrap_or_default();
        }
    } else {
        let (root, inputs) = cache.root_image(&digest, &limits, layers)?;
        output.root = root.path;
        if let Some(report) = root.built {
            output.root_built = true;
            output.timings = report.timings;
        }
        add_identity(
            &mut output,
            cache.identity_layer(&digest, &inputs, uid, gid, kiln_identity::IdBounds::KILN)?,
        );
    }
    match kiln_sandbox::trim_image_cache(&globals.root, globals.rootfs_cache_max, &digest) {
        Ok(trimmed) => output.evicted = trimmed.manifest_digests,
        Err(err) => output
            .warnings
            .push(format!("the image cache was not trimmed: {err}")),
    }
    print(globals, &output)?;
    Ok(ExitCode::SUCCESS)
}

fn add_identity(
    output: &mut BuildOutput,
    identity: kiln_rootfs::Cached<kiln_rootfs::IdentityLayerReport>,
) {
    output.identity = Some(identity.path);
    if let Some(report) = identity.built {
        output.identity_built = true;
        output.timings.write += report.timings.write;
        output.timings.verify += report.timings.verify;
        output.warnings = report.identity.warnings;
    }
}

/// A `--uid`/`--gid` value for the sandbox user, or `default` when the flag is absent.
fn sandbox_id_flag(flag: &str, value: Option<&str>, default: u32) -> anyhow::Result<u32> {
    match value {
        None => Ok(default),
        Some(text) => kiln_identity::parse_sandbox_id(text, kiln_identity::IdBounds::KILN)
            .with_context(|| flag.to_owned()),
    }
}

/// An image pulled (when missing) for building or checking, with the sandbox ids and
/// the limits its layers are held to.
pub struct ImageToBuild {
    pub store: Store,
    pub image: PulledImage,
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
}

/// Parses the reference, `--uid`/`--gid` and the limits (usage errors), then pulls what
/// is missing.
pub fn pull_image_to_build(
    globals: &Globals,
    args: &ImageToBuildArgs,
) -> Result<ImageToBuild, CommandError> {
    let (source, uid, gid) = (&args.source, args.uid.as_deref(), args.gid.as_deref());
    let reference = parse_reference(&args.reference)?;
    let uid = sandbox_id_flag("--uid", uid, kiln_identity::DEFAULT_SANDBOX_UID)
        .map_err(CommandError::usage)?;
    let gid = sandbox_id_flag("--gid", gid, kiln_identity::DEFAULT_SANDBOX_GID)
        .map_err(CommandError::usage)?;
    let limits = args.limits().map_err(CommandError::usage)?;
    let mut options = source.options(PullPolicy::Missing)?;
    options.progress = progress_renderer(globals).filter(|_| !globals.json);
    let store = Store::open(&globals.root).map_err(image_error)?;
    let image = kiln_image::pull(&store, &reference, &options).map_err(image_error)?;
    Ok(ImageToBuild {
        store,
        image,
        uid,
        gid,
        limits,
    })
}

fn print(globals: &Globals, output: &BuildOutput) -> anyhow::Result<()> {
    if globals.json {
        println!("{}", serde_json::to_string_pretty(output)?);
        return Ok(());
    }
    let state = |built: bool| if built { "built" } else { "cached" };
    println!(
        "root      {} ({})",
        show(&output.root),
        state(output.root_built)
    );
    if let Some(identity) = &output.identity {
        println!(
            "identity  {} ({})",
            show(identity),
            state(output.identity_built)
        );
    }
    if globals.quiet {
        return Ok(());
    }
    for warning in &output.warnings {
        eprintln!("kiln: warning: {warning}");
    }
    for digest in &output.evicted {
        eprintln!("kiln: removed the cached images of {digest} (--rootfs-cache-max)");
    }
    if output.root_built || output.identity_built {
        let t = &output.timings;
        println!("stage     seconds");
        for (stage, time) in [
            ("decode", t.decode),
            ("apply", t.apply),
            ("write", t.write),
            ("verify", t.verify),
        ] {
            println!("{stage:<9} {}", seconds(time));
        }
    }
    Ok(())
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

fn seconds(time: Duration) -> String {
    format!("{:.3}", time.as_secs_f64())
}
