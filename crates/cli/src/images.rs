//! `kiln images`, `kiln rmi REF`, `kiln prune`: what the content store holds.

use std::process::ExitCode;

use clap::Args;
use kiln_image::{ImageRecord, Store};

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;
use crate::listing::{self, Columns, Filters, Format, ListingArgs, Row};
use crate::ps::display_reference;
use crate::pull::{image_error, parse_platform, parse_reference};

#[derive(Debug, Args)]
pub struct ImagesArgs {
    #[command(flatten)]
    output: ListingArgs,

    /// Only images that match: reference=PATTERN (`*` matches any run of characters),
    /// label=KEY[=VALUE] (repeatable).
    #[arg(short, long, value_name = "KEY=VALUE")]
    filter: Vec<String>,
}

const COLUMNS: Columns = &[
    ("Reference", "REFERENCE"),
    ("ID", "IMAGE ID"),
    ("Digest", "DIGEST"),
    ("Platform", "PLATFORM"),
    ("CreatedAt", "CREATED AT"),
    ("CreatedSince", "CREATED"),
    ("PulledSince", "PULLED"),
    ("Size", "SIZE"),
];

const DEFAULT: &str =
    "table {{.Reference}}\t{{.ID}}\t{{.Platform}}\t{{.CreatedSince}}\t{{.PulledSince}}\t{{.Size}}";

const FILTERS: &[&str] = &["reference", "label"];

/// Widest reference the table shows without --no-trunc.
const REFERENCE_WIDTH: usize = 40;

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

pub fn images(globals: &Globals, args: ImagesArgs) -> CommandResult {
    let format = listing::parse_format(args.output.format.as_deref(), COLUMNS, DEFAULT)
        .map_err(CommandError::usage)?;
    let filters = Filters::parse(&args.filter, FILTERS).map_err(CommandError::usage)?;
    let store = Store::open(&globals.root).map_err(image_error)?;
    let mut records = Vec::new();
    for record in store.images().map_err(image_error)? {
        let shown = display_reference(&record.reference);
        if !filters.allows("reference", |pattern| {
            glob_matches(pattern, shown) || glob_matches(pattern, &record.reference)
        }) {
            continue;
        }
        if filters.values("label").is_some() {
            let image = store.load(record.clone()).map_err(image_error)?;
            let labels = image
                .config
                .config()
                .as_ref()
                .and_then(|c| c.labels().clone())
                .unwrap_or_default();
            if !filters.allows_labels(|key| labels.get(key).map(String::as_str)) {
                continue;
            }
        }
        records.push(record);
    }
    // Newest pull first, as docker lists the newest image first.
    records.sort_by_key(|r| std::cmp::Reverse(r.pulled_at));
    let full = args.output.no_trunc || format == Format::Json;
    let id = |r: &ImageRecord| {
        if full {
            r.config_digest.to_string()
        } else {
            r.config_digest.hex()[..12].to_owned()
        }
    };
    if globals.json && args.output.format.is_none() {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(ExitCode::SUCCESS);
    }
    if globals.quiet {
        let mut seen = std::collections::HashSet::new();
        for r in &records {
            if seen.insert(id(r)) {
                println!("{}", id(r));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let now = listing::now_unix();
    let rows: Vec<Row> = records
        .iter()
        .map(|r| {
            let reference = display_reference(&r.reference);
            let created = r
                .created
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .and_then(|t| u64::try_from(t.timestamp()).ok());
            vec![
                if full {
                    reference.to_owned()
                } else {
                    listing::truncate(reference, REFERENCE_WIDTH)
                },
                id(r),
                r.manifest_digest.to_string(),
                r.platform.to_string(),
                created.map_or_else(|| "N/A".to_owned(), listing::timestamp),
                created.map_or_else(|| "N/A".to_owned(), |t| listing::ago(t, now)),
                listing::ago(r.pulled_at, now),
                listing::human_size(r.size),
            ]
        })
        .collect();
    listing::print(&mut std::io::stdout().lock(), &format, COLUMNS, &rows)?;
    Ok(ExitCode::SUCCESS)
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
fn glob_matches(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob_matches(tail, &rest[i..]))
        }
    }
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
        let images = report.root_images_removed.len();
        println!(
            "removed the built root images of {images} image{}, freed {} bytes",
            if images == 1 { "" } else { "s" },
            report.root_image_bytes_freed
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn reference_patterns() {
        assert!(glob_matches("busybox*", "busybox:latest"));
        assert!(glob_matches("*:latest", "busybox:latest"));
        assert!(glob_matches("busybox:latest", "busybox:latest"));
        assert!(!glob_matches("alpine*", "busybox:latest"));
        assert!(!glob_matches("busybox", "busybox:latest"));
    }
}
