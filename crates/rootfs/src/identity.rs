//! The sandbox identity: account files edited by kiln-identity and the /sandbox home,
//! written as a small image of its own (the guest mounts it above the root image with
//! overlayfs) or into the root tree (`--merged`).
//!
//! What the edit needs from the root image is captured once, when the root image is
//! built, as [`IdentityInputs`] (kept next to the cached root image), so a new uid/gid
//! never re-reads the layers.
//!
//! Overlayfs shows the upper layer's attributes for a directory present in both, so the
//! identity image repeats the root directory and the directories on the way to /etc
//! with the root image's attributes. /etc is resolved through the image's symlinks and
//! the files are written where it really is, because an upper directory named `etc`
//! would hide a lower `etc -> usr/etc` symlink's whole target.

use std::time::{Duration, Instant};

use kiln_erofs::{ImageWriter, Metadata, NodeId, NodeKind, Timestamp, Tree, Xattr};
use kiln_identity::{
    choose_shell, write_sandbox_accounts, AccountFiles, IdBounds, MAX_ACCOUNT_FILE_SIZE,
};
use serde::{Deserialize, Serialize};

use crate::apply::RootTree;
use crate::error::{quote, Error, Result};
use crate::resolve::{Walk, Walker};

/// The account files the identity layer rewrites, in /etc.
const ACCOUNT_FILES: [&str; 4] = ["passwd", "group", "gshadow", "shadow"];
/// The shells `choose_shell` may pick.
const SHELLS: [&str; 2] = ["/bin/bash", "/bin/sh"];
/// The sandbox user's home, at the image root.
const SANDBOX_DIR: &[u8] = b"sandbox";

/// Attributes of a node, as stored next to a cached root image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAttributes {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl From<&Metadata> for NodeAttributes {
    fn from(meta: &Metadata) -> Self {
        NodeAttributes {
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            mtime_sec: meta.mtime.sec,
            mtime_nsec: meta.mtime.nsec,
            xattrs: meta
                .xattrs
                .iter()
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
        }
    }
}

impl NodeAttributes {
    fn metadata(&self) -> Metadata {
        Metadata {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            mtime: Timestamp {
                sec: self.mtime_sec,
                nsec: self.mtime_nsec,
            },
            xattrs: self
                .xattrs
                .iter()
                .map(|(n, v)| Xattr::new(n.clone(), v.clone()))
                .collect(),
        }
    }
}

/// One account file of the root image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountFile {
    /// No such file (or a symlink pointing at nothing in the image).
    Absent,
    /// A regular file (symlinks followed inside the image) of at most 1 MiB.
    Regular {
        contents: Vec<u8>,
        attributes: NodeAttributes,
    },
    /// Something the edit cannot start from: a device, a directory, an oversized file.
    Unusable { reason: String },
}

/// One directory on the way from the root to /etc.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathDir {
    pub name: Vec<u8>,
    /// `None` when the image lacks it (it is created 0755 root:root).
    pub attributes: Option<NodeAttributes>,
}

/// What the identity edit needs to know about a root image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInputs {
    pub root: NodeAttributes,
    /// Where /etc really is (symlinks resolved), root excluded.
    pub etc: Vec<PathDir>,
    /// passwd, group, gshadow, shadow in that order.
    pub files: Vec<AccountFile>,
    /// Which of /bin/bash and /bin/sh resolve to a regular file in the image.
    pub shells: Vec<String>,
}

/// The result of writing the sandbox identity.
#[derive(Clone, Debug, Serialize)]
pub struct IdentityReport {
    pub uid: u32,
    pub gid: u32,
    pub shell: String,
    /// What kiln-identity tolerated in the image's files (ids already taken, ...).
    pub warnings: Vec<String>,
    pub write: Duration,
}

impl IdentityInputs {
    /// Captures what the identity edit needs from a resolved root tree.
    pub fn from_root(root: &RootTree) -> Result<Self> {
        let tree = root.tree();
        let account_error = |path: &str, reason: String| Error::Account {
            path: path.to_owned(),
            reason,
        };
        let mut walker = Walker::new(tree, &[b"etc"], true, root.limits.max_depth);
        let walk = walker
            .walk(tree)
            .map_err(|e| account_error("/etc", e.to_string()))?;
        let etc = match walk {
            Walk::Done => {
                let etc = walker.top();
                if !matches!(tree.kind(etc)?, NodeKind::Directory) {
                    return Err(account_error(
                        "/etc",
                        "it is not a directory (accepted: a directory, a symlink to one, or nothing)".into(),
                    ));
                }
                let mut dirs = Vec::new();
                for (node, name) in walker.stack[1..].iter().zip(&walker.names) {
                    dirs.push(PathDir {
                        name: name.to_vec(),
                        attributes: Some(tree.metadata(*node)?.into()),
                    });
                }
                Some((etc, dirs))
            }
            Walk::Missing(_) if !walker.followed_symlinks() => None,
            Walk::Missing(name) => {
                return Err(account_error(
                    "/etc",
                    format!(
                        "it is a symlink to a missing directory ({} does not exist; accepted: a directory, a symlink to one, or nothing)",
                        quote(&name)
                    ),
                ))
            }
        };
        let mut files = Vec::new();
        for name in ACCOUNT_FILES {
            files.push(match &etc {
                None => AccountFile::Absent,
                Some((etc, _)) => account_file(root, *etc, name)?,
            });
        }
        let shells = SHELLS
            .iter()
            .filter(|shell| {
                matches!(root.lookup(shell.as_bytes(), true), Ok(Some(node))
                    if matches!(tree.kind(node), Ok(NodeKind::File(_))))
            })
            .map(|s| s.to_string())
            .collect();
        Ok(IdentityInputs {
            root: tree.metadata(tree.root())?.into(),
            etc: etc.map(|(_, dirs)| dirs).unwrap_or_else(|| {
                vec![PathDir {
                    name: b"etc".to_vec(),
                    attributes: None,
                }]
            }),
            files,
            shells,
        })
    }
}

fn account_file(root: &RootTree, etc: NodeId, name: &str) -> Result<AccountFile> {
    let tree = root.tree();
    let unusable = |reason: String| Ok(AccountFile::Unusable { reason });
    let Some(node) = tree.lookup(etc, name.as_bytes())? else {
        return Ok(AccountFile::Absent);
    };
    let node = match tree.kind(node)? {
        NodeKind::Symlink(_) => {
            let path = format!("etc/{name}");
            match root.lookup(path.as_bytes(), true) {
                Ok(Some(target)) => target,
                // A symlink to nothing in the image (a host path, say) holds no accounts.
                Ok(None) => return Ok(AccountFile::Absent),
                Err(e) => return unusable(e.to_string()),
            }
        }
        _ => node,
    };
    let what = match tree.kind(node)? {
        NodeKind::File(data) if data.len() > MAX_ACCOUNT_FILE_SIZE as u64 => {
            return unusable(format!(
                "it is {} bytes (accepted: a regular file of at most {MAX_ACCOUNT_FILE_SIZE} bytes)",
                data.len()
            ))
        }
        NodeKind::File(_) => {
            let contents = root
                .read_file(node, MAX_ACCOUNT_FILE_SIZE as u64)?
                .expect("a regular file within the size limit");
            return Ok(AccountFile::Regular {
                contents,
                attributes: tree.metadata(node)?.into(),
            });
        }
        NodeKind::Directory => "a directory",
        NodeKind::Symlink(_) => "a symlink",
        NodeKind::CharDevice { .. } => "a character device",
        NodeKind::BlockDevice { .. } => "a block device",
        NodeKind::Fifo => "a FIFO",
        NodeKind::Socket => "a socket",
    };
    unusable(format!(
        "it is {what} (accepted: a regular file, a symlink to one inside the image, or nothing)"
    ))
}

/// The edited account files and the shell, checked against the image's files.
struct Edit {
    contents: Vec<Vec<u8>>,
    report: IdentityReport,
}

fn edit(inputs: &IdentityInputs, uid: u32, gid: u32, bounds: IdBounds) -> Result<Edit> {
    let mut current = Vec::new();
    for (name, file) in ACCOUNT_FILES.iter().zip(&inputs.files) {
        current.push(match file {
            AccountFile::Absent => None,
            AccountFile::Regular { contents, .. } => Some(contents.clone()),
            AccountFile::Unusable { reason } => {
                return Err(Error::Account {
                    path: format!("/etc/{name}"),
                    reason: reason.clone(),
                })
            }
        });
    }
    let mut current = current.into_iter();
    let files = AccountFiles {
        passwd: current.next().flatten(),
        group: current.next().flatten(),
        gshadow: current.next().flatten(),
        shadow: current.next().flatten(),
    };
    let shell = choose_shell(|s| inputs.shells.iter().any(|have| have == s));
    let edited = write_sandbox_accounts(&files, uid, gid, shell, bounds)?;
    Ok(Edit {
        contents: vec![edited.passwd, edited.group, edited.gshadow, edited.shadow],
        report: IdentityReport {
            uid,
            gid,
            shell: shell.to_owned(),
            warnings: edited.warnings.iter().map(|w| w.to_string()).collect(),
            write: Duration::ZERO,
        },
    })
}

/// Writes the edited account files and /sandbox into `tree` (`uid` and `gid` within
/// `bounds`, the rules of whoever asked for them): the root tree itself
/// (merged) or the fresh tree of an identity image. Existing directories on the way to
/// /etc are kept; missing ones get the root image's attributes (or 0755 root:root).
pub(crate) fn write_identity(
    tree: &mut Tree,
    writer: &mut ImageWriter,
    inputs: &IdentityInputs,
    uid: u32,
    gid: u32,
    bounds: IdBounds,
) -> Result<IdentityReport> {
    let start = Instant::now();
    let Edit {
        contents,
        mut report,
    } = edit(inputs, uid, gid, bounds)?;
    let default_dir = Metadata {
        mode: 0o755,
        mtime: inputs.root.metadata().mtime,
        ..Metadata::default()
    };
    let mut dir = tree.root();
    for step in &inputs.etc {
        dir = match tree.lookup(dir, &step.name)? {
            Some(node) if matches!(tree.kind(node)?, NodeKind::Directory) => node,
            existing => {
                if existing.is_some() {
                    tree.unlink(dir, &step.name)?;
                }
                let meta = step
                    .attributes
                    .as_ref()
                    .map_or_else(|| default_dir.clone(), NodeAttributes::metadata);
                tree.add(dir, &step.name, NodeKind::Directory, meta)?
            }
        };
    }
    for ((name, data), file) in ACCOUNT_FILES.iter().zip(contents).zip(&inputs.files) {
        let meta = match file {
            AccountFile::Regular { attributes, .. } => attributes.metadata(),
            _ => Metadata {
                // shadow and gshadow hold password hashes: not world-readable.
                mode: if name.contains("shadow") {
                    0o640
                } else {
                    0o644
                },
                mtime: default_dir.mtime,
                ..Metadata::default()
            },
        };
        let data = writer.append_bytes(&data)?;
        replace(tree, dir, name.as_bytes(), NodeKind::File(data), meta)?;
    }
    let home = Metadata {
        mode: 0o755,
        uid,
        gid,
        mtime: default_dir.mtime,
        xattrs: Vec::new(),
    };
    let root = tree.root();
    match tree.lookup(root, SANDBOX_DIR)? {
        Some(node) if matches!(tree.kind(node)?, NodeKind::Directory) => {
            tree.set_metadata(node, home)?
        }
        _ => replace(tree, root, SANDBOX_DIR, NodeKind::Directory, home)?,
    }
    report.write = start.elapsed();
    Ok(report)
}

fn replace(
    tree: &mut Tree,
    dir: NodeId,
    name: &[u8],
    kind: NodeKind,
    meta: Metadata,
) -> Result<()> {
    tree.unlink(dir, name)?;
    tree.add(dir, name, kind, meta)?;
    Ok(())
}

/// A fresh tree for an identity image: the root image's root attributes and nothing else.
pub(crate) fn identity_tree(inputs: &IdentityInputs) -> Result<Tree> {
    Ok(Tree::new(inputs.root.metadata())?)
}
