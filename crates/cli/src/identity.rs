//! `kiln identity resolve`: which uid/gid a sandbox would run as, and why.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use kiln_identity::IdSource;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;

/// Largest --annotations file read; a Namespace object is a few KiB.
const MAX_ANNOTATIONS_FILE: u64 = 4 << 20;

const ACCEPTED_FORMS: &str =
    "accepted: a Namespace object as `kubectl get ns NAME -o json` prints it \
     (annotations under metadata.annotations) or a flat JSON object of string annotations";

#[derive(Debug, Args)]
pub struct IdentityArgs {
    #[command(subcommand)]
    command: IdentityCommand,
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Resolve the sandbox uid/gid from --uid/--gid, OpenShift SCC namespace annotations
    /// and the default (10001:10001); always prints JSON.
    Resolve(ResolveArgs),
}

#[derive(Debug, Args)]
struct ResolveArgs {
    /// Configured uid (a decimal id from 1000 to 2000000000); wins over annotations.
    #[arg(long, value_name = "N")]
    uid: Option<String>,

    /// Configured gid (a decimal id from 1000 to 2000000000); wins over annotations.
    #[arg(long, value_name = "N")]
    gid: Option<String>,

    /// Namespace annotations: a Namespace object (`kubectl get ns NAME -o json`) or a flat
    /// JSON object of annotations; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    annotations: Option<PathBuf>,
}

pub fn run(_globals: &Globals, args: IdentityArgs) -> CommandResult {
    match args.command {
        IdentityCommand::Resolve(args) => resolve(args),
    }
}

fn resolve(args: ResolveArgs) -> CommandResult {
    let uid = parse_flag("--uid", args.uid.as_deref())?;
    let gid = parse_flag("--gid", args.gid.as_deref())?;
    let annotations = match &args.annotations {
        Some(path) => read_annotations(path).map_err(CommandError::usage)?,
        None => BTreeMap::new(),
    };
    let resolved =
        kiln_identity::resolve_identity(uid, gid, &annotations).map_err(CommandError::usage)?;
    let output = ResolveOutput {
        uid: resolved.uid.value,
        gid: resolved.gid.value,
        uid_source: resolved.uid.source,
        gid_source: resolved.gid.source,
        warnings: &resolved.warnings,
    };
    println!("{}", serde_json::to_string_pretty(&output)?);
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ResolveOutput<'a> {
    uid: u32,
    gid: u32,
    uid_source: IdSource,
    gid_source: IdSource,
    warnings: &'a [String],
}

fn parse_flag(flag: &str, value: Option<&str>) -> Result<Option<u32>, CommandError> {
    value
        .map(|v| {
            kiln_identity::parse_sandbox_id(v, kiln_identity::IdBounds::KILN)
                .with_context(|| flag.to_owned())
        })
        .transpose()
        .map_err(CommandError::usage)
}

fn read_annotations(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let shown = path.display();
    let mut bytes = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_ANNOTATIONS_FILE + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_ANNOTATIONS_FILE + 1).read_to_end(&mut bytes))
    };
    read.with_context(|| format!("cannot read --annotations {shown}"))?;
    if bytes.len() as u64 > MAX_ANNOTATIONS_FILE {
        bail!(
            "--annotations {shown} is larger than {MAX_ANNOTATIONS_FILE} bytes; {ACCEPTED_FORMS}"
        );
    }
    let value: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("--annotations {shown} is not valid JSON; {ACCEPTED_FORMS}"))?;
    annotations_from_json(value).with_context(|| format!("--annotations {shown}"))
}

/// A Namespace object is recognised by its `metadata` key, which no flat map of string
/// annotations can have with an object value.
fn annotations_from_json(value: Value) -> anyhow::Result<BTreeMap<String, String>> {
    let Value::Object(mut top) = value else {
        bail!(
            "the top level is {}, not an object; {ACCEPTED_FORMS}",
            kind_of(&value)
        );
    };
    let map = match top.remove("metadata") {
        None => top,
        Some(metadata) => {
            if let Some(kind) = top.get("kind").filter(|k| k.as_str() != Some("Namespace")) {
                bail!("kind is {kind}, not \"Namespace\"; {ACCEPTED_FORMS}");
            }
            let Value::Object(mut metadata) = metadata else {
                bail!(
                    "metadata is {}, not an object; {ACCEPTED_FORMS}",
                    kind_of(&metadata)
                );
            };
            match metadata.remove("annotations") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(annotations)) => annotations,
                Some(other) => bail!(
                    "metadata.annotations is {}, not an object; {ACCEPTED_FORMS}",
                    kind_of(&other)
                ),
            }
        }
    };
    map.into_iter()
        .map(|(key, value)| match value {
            Value::String(text) => Ok((key, text)),
            other => Err(anyhow!(
                "annotation {key:?} is {}, not a string; {ACCEPTED_FORMS}",
                kind_of(&other)
            )),
        })
        .collect()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
