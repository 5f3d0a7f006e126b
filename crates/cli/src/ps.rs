//! `kiln ps`: the sandboxes, newest first, as docker's `ps` shows containers.

use std::process::ExitCode;

use clap::Args;
use kiln_sandbox::{NetworkRecord, SandboxInfo, Status};

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;
use crate::listing::{self, Columns, Filters, Format, ListingArgs, Row};

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Show every sandbox, not only running ones. With -q (`kiln ps -aq`), only their ids.
    #[arg(short, long)]
    all: bool,

    #[command(flatten)]
    output: ListingArgs,

    /// Only sandboxes that match: id=PREFIX, name=TEXT, label=KEY[=VALUE],
    /// status=created|running|exited|failed (repeatable).
    #[arg(short, long, value_name = "KEY=VALUE")]
    filter: Vec<String>,
}

const COLUMNS: Columns = &[
    ("ID", "SANDBOX ID"),
    ("Image", "IMAGE"),
    ("Command", "COMMAND"),
    ("CreatedAt", "CREATED AT"),
    ("RunningFor", "CREATED"),
    ("Status", "STATUS"),
    ("State", "STATE"),
    ("Ports", "PORTS"),
    ("Names", "NAMES"),
    ("Labels", "LABELS"),
];

const DEFAULT: &str =
    "table {{.ID}}\t{{.Image}}\t{{.Command}}\t{{.RunningFor}}\t{{.Status}}\t{{.Ports}}\t{{.Names}}";

const FILTERS: &[&str] = &["id", "name", "label", "status"];

/// The states `--filter status=` takes, as [`state`] names them.
const STATES: &[&str] = &["created", "running", "exited", "failed"];

/// Widest image reference and command the table shows without --no-trunc.
const IMAGE_WIDTH: usize = 30;
const COMMAND_WIDTH: usize = 20;

pub fn ps(globals: &Globals, args: PsArgs) -> CommandResult {
    let format = listing::parse_format(args.output.format.as_deref(), COLUMNS, DEFAULT)
        .map_err(CommandError::usage)?;
    let filters = Filters::parse(&args.filter, FILTERS).map_err(CommandError::usage)?;
    for status in filters.values("status").unwrap_or_default() {
        if !STATES.contains(&status.as_str()) {
            return Err(CommandError::usage(anyhow::anyhow!(
                "--filter status={status}: unknown status; accepted: {}",
                STATES.join(", ")
            )));
        }
    }
    let mut sandboxes: Vec<SandboxInfo> = kiln_sandbox::list(&globals.root)
        .map_err(sandbox_error)?
        .into_iter()
        .filter(|s| {
            // A status filter shows what it names, running or not (as docker's).
            (args.all || s.status == Status::Running || filters.values("status").is_some())
                && matches(&filters, s)
        })
        .collect();
    sandboxes.sort_by(|a, b| (b.created_unix, &b.id).cmp(&(a.created_unix, &a.id)));
    if globals.json && args.output.format.is_none() {
        println!("{}", serde_json::to_string_pretty(&sandboxes)?);
        return Ok(ExitCode::SUCCESS);
    }
    if globals.quiet {
        for s in &sandboxes {
            println!("{}", s.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let now = listing::now_unix();
    let rows: Vec<Row> = sandboxes
        .iter()
        .map(|s| row(s, now, args.output.no_trunc || format == Format::Json))
        .collect();
    listing::print(&mut std::io::stdout().lock(), &format, COLUMNS, &rows)?;
    Ok(ExitCode::SUCCESS)
}

fn matches(filters: &Filters, s: &SandboxInfo) -> bool {
    filters.allows("id", |prefix| s.id.starts_with(prefix))
        && filters.allows("name", |text| {
            s.name.as_deref().is_some_and(|name| name.contains(text))
        })
        && filters.allows("status", |status| state(&s.status) == status)
        && filters.allows_labels(|key| s.labels.get(key).map(String::as_str))
}

/// The one-word state, as `--filter status=` and `{{.State}}` name it.
fn state(status: &Status) -> &'static str {
    match status {
        Status::Created => "created",
        Status::Running => "running",
        Status::Exited { .. } => "exited",
        Status::Failed { .. } => "failed",
    }
}

fn row(s: &SandboxInfo, now: u64, full: bool) -> Row {
    let command = format!("\"{}\"", s.run.argv.join(" "));
    let image = display_reference(&s.reference);
    let (image, command) = if full {
        (image.to_owned(), command)
    } else {
        (
            listing::truncate(image, IMAGE_WIDTH),
            listing::truncate(&command, COMMAND_WIDTH),
        )
    };
    let since = |unix: Option<u64>| unix.map(|t| listing::ago(t, now)).unwrap_or_default();
    let status = match &s.status {
        Status::Created => "Created".to_owned(),
        Status::Running => format!(
            "Up {}",
            listing::human_duration(now.saturating_sub(s.started_unix.unwrap_or(now)))
        ),
        Status::Exited { exit_code, .. } => {
            format!("Exited ({exit_code}) {}", since(s.ended_unix))
        }
        Status::Failed { .. } => format!("Failed {}", since(s.ended_unix)),
    };
    vec![
        s.id.clone(),
        image,
        command,
        listing::timestamp(s.created_unix),
        listing::ago(s.created_unix, now),
        status.trim_end().to_owned(),
        state(&s.status).to_owned(),
        ports(&s.network),
        s.name.clone().unwrap_or_default(),
        s.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    ]
}

/// A sandbox's forwards as docker writes them: `127.0.0.1:8080->80/tcp`.
pub fn ports(network: &NetworkRecord) -> String {
    match network {
        NetworkRecord::None => String::new(),
        NetworkRecord::User { forwards, .. } => forwards
            .iter()
            .map(|(host, guest)| format!("127.0.0.1:{host}->{guest}/tcp"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A reference as a docker user writes it: `busybox:latest` for Docker Hub's library,
/// `ghcr.io/x/y:1` for other registries; other sources keep their transport.
pub fn display_reference(reference: &str) -> &str {
    reference
        .strip_prefix("docker://docker.io/library/")
        .or_else(|| reference.strip_prefix("docker://"))
        .unwrap_or(reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_as_docker_writes_them() {
        assert_eq!(
            display_reference("docker://docker.io/library/busybox:latest"),
            "busybox:latest"
        );
        assert_eq!(display_reference("docker://ghcr.io/a/b:1"), "ghcr.io/a/b:1");
        assert_eq!(
            display_reference("oci:/images/demo:latest"),
            "oci:/images/demo:latest"
        );
    }

    #[test]
    fn ports_read_as_dockers() {
        let network = NetworkRecord::User {
            forwards: vec![(8080, 80), (9000, 9000)],
            allow_host: Vec::new(),
        };
        assert_eq!(
            ports(&network),
            "127.0.0.1:8080->80/tcp, 127.0.0.1:9000->9000/tcp"
        );
        assert_eq!(ports(&NetworkRecord::None), "");
    }
}
