//! `kiln check`: can this image run as a sandbox, and what should its author know?
//! Everything is looked up in the resolved tree, through the image's own symlinks.

use std::collections::HashSet;
use std::path::Path;

use kiln_erofs::{NodeId, NodeKind};
use kiln_identity::{parse_group, parse_passwd, SANDBOX_USER};
use kiln_protocol::DEFAULT_PATH;
use serde::Serialize;

use crate::apply::{apply_layers, RootTree};
use crate::error::{Error, Result};
use crate::identity::{AccountFile, IdentityInputs};
use crate::{Layer, Limits};

/// Set-id files listed by name; more are only counted.
const MAX_LISTED_SETID: usize = 50;

/// What the image config says about how it runs, and the configured sandbox ids.
#[derive(Clone, Debug, Default)]
pub struct CheckInput {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE` entries of the config's Env.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The image cannot run as a sandbox until this is fixed.
    Blocker,
    /// It runs, but probably not as intended.
    Warning,
    Info,
}

/// One thing `kiln check` found, and what to do about it.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    /// True when there is no blocker.
    pub can_run: bool,
    pub findings: Vec<Finding>,
    /// argv[0] resolved inside the image.
    pub command: Option<String>,
    pub shell: Option<String>,
    pub setid_files: Vec<String>,
    pub setid_count: u64,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub file_bytes: u64,
}

/// Applies `layers` (file data goes to an unlinked scratch file in `scratch_dir`, gone
/// when this returns) and checks the result with [`check_image`].
pub fn check_layers<'a>(
    layers: impl IntoIterator<Item = Layer<'a>>,
    input: &CheckInput,
    limits: &Limits,
    scratch_dir: &Path,
) -> Result<CheckReport> {
    let scratch = tempfile::tempfile_in(scratch_dir).map_err(|e| {
        Error::io(
            format!("creating a scratch file in {}", scratch_dir.display()),
            e,
        )
    })?;
    let options = kiln_erofs::ImageOptions {
        spool_dir: Some(scratch_dir.to_owned()),
        ..kiln_erofs::ImageOptions::default()
    };
    let writer = kiln_erofs::ImageWriter::new(scratch, options).map_err(|source| Error::Image {
        path: scratch_dir.to_owned(),
        source,
    })?;
    let root = apply_layers(layers, writer, limits)?;
    check_image(&root, input)
}

/// Checks the resolved tree of an image against what a sandbox needs.
pub fn check_image(root: &RootTree, input: &CheckInput) -> Result<CheckReport> {
    let inputs = IdentityInputs::from_root(root)?;
    let mut findings = Vec::new();
    let mut add = |severity, message: String, fix: &str| {
        findings.push(Finding {
            severity,
            message,
            fix: fix.to_owned(),
        })
    };

    let argv: Vec<&String> = input.entrypoint.iter().chain(&input.cmd).collect();
    let mut command = None;
    match argv.first() {
        None => add(
            Severity::Blocker,
            "the image config has neither Entrypoint nor Cmd".into(),
            "set ENTRYPOINT or CMD in the Dockerfile, or pass a command to kiln run",
        ),
        Some(program) => match find_program(root, program, input)? {
            Program::Found(path) => command = Some(path),
            Program::NotExecutable(path) => add(
                Severity::Blocker,
                format!("the command {program} resolves to {path}, which has no execute bit"),
                "chmod +x it in the Dockerfile",
            ),
            Program::Missing => add(
                Severity::Blocker,
                format!("the command {program} is not in the image (searched PATH and symlinks inside the image)"),
                "install it, or fix ENTRYPOINT/CMD or the PATH in ENV",
            ),
        },
    }

    let shell = ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|s| inputs.shells.iter().any(|have| have == s))
        .map(str::to_owned);
    if shell.is_none() {
        add(
            Severity::Info,
            "no /bin/sh or /bin/bash: the sandbox user gets /sbin/nologin and `kiln exec` needs a command".into(),
            "nothing to do for distroless images; add a shell to get interactive sessions",
        );
    }

    for (name, file) in ["passwd", "group"].iter().zip(&inputs.files) {
        match file {
            AccountFile::Absent => add(
                Severity::Info,
                format!("/etc/{name} is missing; kiln creates it with the sandbox entry"),
                "nothing to do",
            ),
            AccountFile::Unusable { reason } => add(
                Severity::Blocker,
                format!("/etc/{name}: {reason}"),
                "make it a regular text file (or remove it: kiln writes one)",
            ),
            AccountFile::Regular { contents, .. } => {
                account_findings(name, contents, input, &mut add)?;
            }
        }
    }

    let stats = walk(root)?;
    if stats.setid_count > 0 {
        add(
            Severity::Warning,
            format!(
                "{} setuid/setgid files (e.g. {})",
                stats.setid_count,
                stats.setid.first().map(String::as_str).unwrap_or_default()
            ),
            "remove the set-id bits you do not need (chmod u-s,g-s): inside the sandbox they still grant their owner's rights",
        );
    }
    let can_run = !findings.iter().any(|f| f.severity == Severity::Blocker);
    Ok(CheckReport {
        can_run,
        findings,
        command,
        shell,
        setid_files: stats.setid,
        setid_count: stats.setid_count,
        files: stats.files,
        directories: stats.directories,
        symlinks: stats.symlinks,
        file_bytes: stats.file_bytes,
    })
}

fn account_findings(
    name: &str,
    contents: &[u8],
    input: &CheckInput,
    add: &mut impl FnMut(Severity, String, &str),
) -> Result<()> {
    if name == "passwd" {
        for entry in parse_passwd(contents)? {
            if entry.name == SANDBOX_USER {
                add(
                    Severity::Info,
                    format!(
                        "the image has a sandbox user ({}:{}); kiln rewrites it to {}:{}",
                        entry.uid, entry.gid, input.uid, input.gid
                    ),
                    "drop the useradd line from the Dockerfile: kiln writes the user",
                );
            } else if entry.uid == input.uid {
                add(
                    Severity::Warning,
                    format!(
                        "user {} already has uid {}, the sandbox uid; both names map to it",
                        entry.name, input.uid
                    ),
                    "pick another --uid, or remove that user",
                );
            }
        }
    } else {
        for entry in parse_group(contents)? {
            if entry.name == SANDBOX_USER {
                add(
                    Severity::Info,
                    format!(
                        "the image has a sandbox group (gid {}); kiln rewrites it to {}",
                        entry.gid, input.gid
                    ),
                    "drop the groupadd line from the Dockerfile: kiln writes the group",
                );
            } else if entry.gid == input.gid {
                add(
                    Severity::Warning,
                    format!(
                        "group {} already has gid {}, the sandbox gid",
                        entry.name, input.gid
                    ),
                    "pick another --gid, or remove that group",
                );
            }
        }
    }
    Ok(())
}

enum Program {
    Found(String),
    NotExecutable(String),
    Missing,
}

/// Finds argv[0] as execve and a shell would: a name with `/` is a path (relative to
/// WorkingDir), a bare name is searched in the config's PATH.
fn find_program(root: &RootTree, program: &str, input: &CheckInput) -> Result<Program> {
    let candidates: Vec<String> = if program.contains('/') {
        let base = input.working_dir.as_deref().unwrap_or("/");
        vec![if program.starts_with('/') {
            program.to_owned()
        } else {
            format!("{}/{program}", base.trim_end_matches('/'))
        }]
    } else {
        let path = input
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
            .collect()
    };
    let mut not_executable = None;
    for candidate in candidates {
        let Ok(Some(node)) = root.lookup(candidate.as_bytes(), true) else {
            continue;
        };
        if let NodeKind::File(_) = root.tree().kind(node)? {
            if root.tree().metadata(node)?.mode & 0o111 != 0 {
                return Ok(Program::Found(candidate));
            }
            not_executable.get_or_insert(candidate);
        }
    }
    Ok(not_executable.map_or(Program::Missing, Program::NotExecutable))
}

#[derive(Default)]
struct TreeStats {
    files: u64,
    directories: u64,
    symlinks: u64,
    file_bytes: u64,
    setid: Vec<String>,
    setid_count: u64,
}

/// Counts every node reachable from the root once (hard links included once).
fn walk(root: &RootTree) -> Result<TreeStats> {
    let tree = root.tree();
    let mut stats = TreeStats::default();
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut pending: Vec<(NodeId, Vec<u8>)> = vec![(tree.root(), Vec::new())];
    while let Some((node, path)) = pending.pop() {
        if !seen.insert(node) {
            continue;
        }
        match tree.kind(node)? {
            NodeKind::Directory => {
                stats.directories += 1;
                for (name, child) in tree.entries(node)? {
                    let mut child_path = path.clone();
                    child_path.push(b'/');
                    child_path.extend_from_slice(name);
                    pending.push((child, child_path));
                }
            }
            NodeKind::File(data) => {
                stats.files += 1;
                stats.file_bytes += data.len();
                if tree.metadata(node)?.mode & 0o6000 != 0 {
                    stats.setid_count += 1;
                    if stats.setid.len() < MAX_LISTED_SETID {
                        stats
                            .setid
                            .push(String::from_utf8_lossy(&path).into_owned());
                    }
                }
            }
            NodeKind::Symlink(_) => stats.symlinks += 1,
            _ => {}
        }
    }
    stats.setid.sort();
    Ok(stats)
}
