//! `kiln pull REF`: gets an image into the content store (kiln-image), rendering progress:
//! bars on a TTY, one line per event otherwise, JSON lines with --json, nothing with -q.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kiln_image::{ImageRef, Platform, PullEvent, PullOptions, PullPolicy, Store};

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference: [docker://]NAME[:TAG][@DIGEST], oci:PATH[:TAG],
    /// oci-archive:PATH[:TAG] or docker-archive:PATH[:NAME:TAG].
    reference: String,

    #[command(flatten)]
    source: SourceArgs,

    /// When to contact the source: always, missing (only when not in the store) or never.
    #[arg(long = "pull", value_name = "POLICY", default_value = "missing")]
    policy: String,
}

/// Options for reaching an image source; shared by every command that may pull.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Platform to pick from a multi-platform image: OS/ARCH[/VARIANT] [default: the host's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Registry credentials, overriding ~/.docker/config.json and containers auth files.
    #[arg(long, value_name = "USER:PASSWORD")]
    creds: Option<String>,

    /// Reach this registry (HOST or HOST:PORT) over plain HTTP or unverified TLS; loopback
    /// registries need no flag (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,

    /// Accept foreign (non-distributable) layers; they are fetched from the registry itself.
    #[arg(long)]
    allow_foreign_layers: bool,

    /// Layer downloads at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    max_concurrent_downloads: u16,

    /// Largest compressed layer accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = kiln_image::DEFAULT_MAX_LAYER_SIZE)]
    max_layer_size: u64,
}

impl SourceArgs {
    /// The platform flag, parsed (bad input is a usage error).
    pub fn platform(&self) -> Result<Option<Platform>, CommandError> {
        parse_platform(self.platform.as_deref())
    }

    pub fn options(&self, policy: PullPolicy) -> Result<PullOptions, CommandError> {
        Ok(PullOptions {
            platform: self.platform()?,
            creds: self.creds.clone(),
            insecure_registries: self.insecure_registries.clone(),
            allow_foreign_layers: self.allow_foreign_layers,
            max_concurrent_downloads: usize::from(self.max_concurrent_downloads),
            max_layer_size: self.max_layer_size,
            policy,
            progress: None,
        })
    }
}

/// Maps kiln-image errors to exit codes: what the user typed is a usage error (2).
pub fn image_error(err: kiln_image::Error) -> CommandError {
    if err.is_usage() {
        CommandError::usage(err)
    } else {
        CommandError::failure(err)
    }
}

/// A `--platform OS/ARCH[/VARIANT]` flag, if given; bad input is a usage error.
pub fn parse_platform(text: Option<&str>) -> Result<Option<Platform>, CommandError> {
    text.map(Platform::parse)
        .transpose()
        .map_err(CommandError::usage)
}

pub fn parse_reference(text: &str) -> Result<ImageRef, CommandError> {
    ImageRef::parse(text).map_err(CommandError::usage)
}

pub fn run(globals: &Globals, args: PullArgs) -> CommandResult {
    let reference = parse_reference(&args.reference)?;
    let policy = PullPolicy::parse(&args.policy)
        .map_err(|e| CommandError::usage(anyhow::anyhow!("--pull: {e}")))?;
    let mut options = args.source.options(policy)?;
    let store = Store::open(&globals.root).map_err(image_error)?;
    options.progress = progress_renderer(globals);
    let image = kiln_image::pull(&store, &reference, &options).map_err(image_error)?;
    if !globals.json {
        println!(
            "{} {}",
            image.record.reference, image.record.manifest_digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The progress callback for the output mode of `globals`.
pub fn progress_renderer(globals: &Globals) -> Option<kiln_image::ProgressFn> {
    if globals.json {
        return Some(Arc::new(|event: &PullEvent| {
            if let Ok(line) = serde_json::to_string(event) {
                println!("{line}");
            }
        }));
    }
    if globals.quiet {
        return None;
    }
    if std::io::stderr().is_terminal() {
        let bars = Bars {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        };
        return Some(Arc::new(move |event: &PullEvent| bars.show(event)));
    }
    Some(Arc::new(|event: &PullEvent| {
        if let Some(line) = plain_line(event) {
            eprintln!("{line}");
        }
    }))
}

fn short(digest: &kiln_image::Digest) -> String {
    digest.hex()[..12].to_owned()
}

/// One line per event, for logs; progress ticks are left out.
fn plain_line(event: &PullEvent) -> Option<String> {
    Some(match event {
        PullEvent::InStore {
            reference,
            manifest_digest,
        } => {
            format!("{reference}: in the store ({manifest_digest})")
        }
        PullEvent::Resolved {
            reference,
            manifest_digest,
            platform,
            layers,
        } => {
            let plural = if *layers == 1 { "" } else { "s" };
            format!("{reference}: manifest {manifest_digest} ({platform}, {layers} layer{plural})")
        }
        PullEvent::LayerCached { digest, size } => {
            format!("layer {}: in the store ({size} bytes)", short(digest))
        }
        PullEvent::LayerStarted { digest, size } => {
            format!("layer {}: downloading {size} bytes", short(digest))
        }
        PullEvent::LayerProgress { .. } => return None,
        PullEvent::LayerDone { digest, size } => {
            format!("layer {}: verified ({size} bytes)", short(digest))
        }
        PullEvent::Done {
            reference,
            downloaded_bytes,
            ..
        } => {
            format!("{reference}: done, {downloaded_bytes} bytes downloaded")
        }
    })
}

/// One bar per layer: bytes, rate and state.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    fn bar(&self, digest: &kiln_image::Digest, size: u64) -> ProgressBar {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        bars.entry(digest.to_string())
            .or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
                    )
                    .expect("a valid progress template"),
                );
                bar.set_prefix(short(digest));
                bar
            })
            .clone()
    }

    fn show(&self, event: &PullEvent) {
        match event {
            PullEvent::LayerStarted { digest, size } => {
                self.bar(digest, *size).set_message("downloading")
            }
            PullEvent::LayerProgress {
                digest,
                downloaded,
                size,
            } => self.bar(digest, *size).set_position(*downloaded),
            PullEvent::LayerDone { digest, size } => {
                let bar = self.bar(digest, *size);
                bar.set_position(*size);
                bar.finish_with_message("verified");
            }
            PullEvent::LayerCached { digest, size } => {
                let bar = self.bar(digest, *size);
                bar.set_position(*size);
                bar.finish_with_message("in the store");
            }
            other => {
                if let Some(line) = plain_line(other) {
                    let _ = self.multi.println(line);
                }
            }
        }
    }
}
