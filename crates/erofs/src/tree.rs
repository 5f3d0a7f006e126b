//! The in-memory tree an image is written from: per-node metadata only, never file contents.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format;
use crate::writer::DataRef;

/// Identifies one node (inode) of a [`Tree`]. Hard links share one `NodeId`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) u32);

impl NodeId {
    /// The index of this node in its tree (stable for the tree's lifetime).
    pub fn index(self) -> u32 {
        self.0
    }
}

/// Seconds and nanoseconds since the Unix epoch (negative seconds are before 1970).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// One extended attribute, with its full name (`user.foo`, `security.capability`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

impl Xattr {
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Xattr {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// Attributes every node has. `mode` holds only the permission bits (0o7777, setuid,
/// setgid and sticky included); the file type comes from [`NodeKind`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub xattrs: Vec<Xattr>,
}

/// What a node is. Regular files refer to data already appended to the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    File(DataRef),
    Directory,
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

#[derive(Debug)]
struct Node {
    kind: NodeKind,
    meta: Metadata,
    /// Children of a directory, sorted by name bytes as EROFS needs them.
    children: Option<BTreeMap<Box<[u8]>, NodeId>>,
}

/// A directory tree to write as an EROFS image.
///
/// Only names and metadata live here; file contents are in the image file already (see
/// [`crate::ImageWriter::append_data`]). Nodes that are no longer reachable from the root
/// (unlinked, or under an unlinked directory) are left out of the image, and data that
/// only they referenced is reclaimed by [`crate::ImageWriter::finish`].
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// A tree holding only its root directory.
    pub fn new(root: Metadata) -> Result<Self> {
        validate_metadata(&root)?;
        Ok(Tree {
            nodes: vec![Node {
                kind: NodeKind::Directory,
                meta: root,
                children: Some(BTreeMap::new()),
            }],
        })
    }

    /// The root directory.
    pub fn root(&self) -> NodeId {
        NodeId(0)
    }

    /// Number of nodes ever created, reachable or not.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Creates a node named `name` in directory `parent`. Fails if the name exists.
    pub fn add(
        &mut self,
        parent: NodeId,
        name: &[u8],
        kind: NodeKind,
        meta: Metadata,
    ) -> Result<NodeId> {
        validate_name(name)?;
        validate_kind(&kind)?;
        validate_metadata(&meta)?;
        self.node(parent)?;
        let id = NodeId(u32::try_from(self.nodes.len()).map_err(|_| Error::TooManyNodes)?);
        let children = self.children_mut(parent)?;
        if children.contains_key(name) {
            return Err(Error::AlreadyExists {
                name: name.to_vec(),
            });
        }
        children.insert(name.into(), id);
        let children = matches!(kind, NodeKind::Directory).then(BTreeMap::new);
        self.nodes.push(Node {
            kind,
            meta,
            children,
        });
        Ok(id)
    }

    /// Adds another name for the existing non-directory node `target` (a hard link).
    pub fn link(&mut self, parent: NodeId, name: &[u8], target: NodeId) -> Result<()> {
        validate_name(name)?;
        if matches!(self.node(target)?.kind, NodeKind::Directory) {
            return Err(Error::HardlinkToDirectory {
                name: name.to_vec(),
            });
        }
        let children = self.children_mut(parent)?;
        if children.contains_key(name) {
            return Err(Error::AlreadyExists {
                name: name.to_vec(),
            });
        }
        children.insert(name.into(), target);
        Ok(())
    }

    /// Removes every entry of directory `dir` (an opaque directory in overlay terms).
    pub fn clear(&mut self, dir: NodeId) -> Result<()> {
        self.children_mut(dir)?.clear();
        Ok(())
    }

    /// Removes the entry `name` from `parent` and returns the node it named, if any.
    /// A removed directory takes its whole subtree out of the image.
    pub fn unlink(&mut self, parent: NodeId, name: &[u8]) -> Result<Option<NodeId>> {
        Ok(self.children_mut(parent)?.remove(name))
    }

    /// The node named `name` in directory `parent`.
    pub fn lookup(&self, parent: NodeId, name: &[u8]) -> Result<Option<NodeId>> {
        Ok(self.children(parent)?.get(name).copied())
    }

    /// The entries of a directory in on-disk (byte) order, without "." and "..".
    pub fn entries(&self, dir: NodeId) -> Result<impl Iterator<Item = (&[u8], NodeId)>> {
        Ok(self
            .children(dir)?
            .iter()
            .map(|(name, id)| (&name[..], *id)))
    }

    /// What `id` is.
    pub fn kind(&self, id: NodeId) -> Result<&NodeKind> {
        Ok(&self.node(id)?.kind)
    }

    /// The attributes of `id`.
    pub fn metadata(&self, id: NodeId) -> Result<&Metadata> {
        Ok(&self.node(id)?.meta)
    }

    /// Replaces the attributes of `id` (shared by all its hard links).
    pub fn set_metadata(&mut self, id: NodeId, meta: Metadata) -> Result<()> {
        validate_metadata(&meta)?;
        self.node_mut(id)?.meta = meta;
        Ok(())
    }

    fn node(&self, id: NodeId) -> Result<&Node> {
        self.nodes
            .get(id.0 as usize)
            .ok_or(Error::UnknownNode(id.0))
    }

    fn node_mut(&mut self, id: NodeId) -> Result<&mut Node> {
        self.nodes
            .get_mut(id.0 as usize)
            .ok_or(Error::UnknownNode(id.0))
    }

    pub(crate) fn children(&self, dir: NodeId) -> Result<&BTreeMap<Box<[u8]>, NodeId>> {
        self.node(dir)?
            .children
            .as_ref()
            .ok_or(Error::NotADirectory(dir.0))
    }

    fn children_mut(&mut self, dir: NodeId) -> Result<&mut BTreeMap<Box<[u8]>, NodeId>> {
        self.node_mut(dir)?
            .children
            .as_mut()
            .ok_or(Error::NotADirectory(dir.0))
    }
}

/// Checks one directory entry name against what EROFS and Linux accept.
pub fn validate_name(name: &[u8]) -> Result<()> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == b"." || name == b".." {
        "reserved"
    } else if name.contains(&b'/') {
        "contains '/'"
    } else if name.contains(&0) {
        "contains NUL"
    } else if name.len() > format::NAME_LEN {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.to_vec(),
        reason,
    })
}

fn validate_kind(kind: &NodeKind) -> Result<()> {
    match kind {
        NodeKind::Symlink(target) => {
            let reason = if target.is_empty() {
                "empty"
            } else if target.contains(&0) {
                "contains NUL"
            } else if target.len() > format::SYMLINK_MAX {
                "longer than 4095 bytes"
            } else {
                return Ok(());
            };
            Err(Error::InvalidSymlinkTarget {
                target: target.clone(),
                reason,
            })
        }
        NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
            format::encode_rdev(*major, *minor).map(|_| ())
        }
        NodeKind::File(_) | NodeKind::Directory | NodeKind::Fifo | NodeKind::Socket => Ok(()),
    }
}

fn validate_metadata(meta: &Metadata) -> Result<()> {
    if meta.mode > 0o7777 {
        return Err(Error::InvalidMode { mode: meta.mode });
    }
    if meta.mtime.nsec >= 1_000_000_000 {
        return Err(Error::InvalidTimestamp {
            nsec: meta.mtime.nsec,
        });
    }
    format::xattr_body_size(&meta.xattrs).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            mode: 0o755,
            ..Metadata::default()
        }
    }

    #[test]
    fn names_are_validated() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b", &[b'x'; 256]] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
        for good in [
            &b"a"[..],
            b"...",
            b".hidden",
            "caf\u{e9}".as_bytes(),
            &[b'x'; 255],
            &[0xff, 0xfe],
        ] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn add_link_unlink_lookup() {
        let mut tree = Tree::new(meta()).unwrap();
        let root = tree.root();
        let dir = tree.add(root, b"etc", NodeKind::Directory, meta()).unwrap();
        let file = tree
            .add(dir, b"passwd", NodeKind::File(DataRef::EMPTY), meta())
            .unwrap();
        assert!(matches!(
            tree.add(dir, b"passwd", NodeKind::Fifo, meta()),
            Err(Error::AlreadyExists { .. })
        ));
        tree.link(root, b"hard", file).unwrap();
        assert!(matches!(
            tree.link(root, b"d2", dir),
            Err(Error::HardlinkToDirectory { .. })
        ));
        assert!(matches!(
            tree.add(file, b"x", NodeKind::Fifo, meta()),
            Err(Error::NotADirectory(_))
        ));
        assert_eq!(tree.lookup(root, b"hard").unwrap(), Some(file));
        assert_eq!(tree.unlink(root, b"etc").unwrap(), Some(dir));
        assert_eq!(tree.lookup(root, b"etc").unwrap(), None);
        let names: Vec<_> = tree
            .entries(root)
            .unwrap()
            .map(|(n, _)| n.to_vec())
            .collect();
        assert_eq!(names, vec![b"hard".to_vec()]);
        tree.clear(root).unwrap();
        assert_eq!(tree.entries(root).unwrap().count(), 0);
        assert!(matches!(tree.clear(file), Err(Error::NotADirectory(_))));
    }

    #[test]
    fn bad_attributes_are_rejected() {
        let mut tree = Tree::new(meta()).unwrap();
        let root = tree.root();
        let bad_mode = Metadata {
            mode: 0o10755,
            ..meta()
        };
        assert!(matches!(
            tree.add(root, b"a", NodeKind::Fifo, bad_mode),
            Err(Error::InvalidMode { .. })
        ));
        let long = NodeKind::Symlink(vec![b'a'; 4096]);
        assert!(matches!(
            tree.add(root, b"a", long, meta()),
            Err(Error::InvalidSymlinkTarget { .. })
        ));
        let dev = NodeKind::CharDevice {
            major: 4096,
            minor: 0,
        };
        assert!(matches!(
            tree.add(root, b"a", dev, meta()),
            Err(Error::InvalidDevice { .. })
        ));
        let late = Metadata {
            mtime: Timestamp {
                sec: 0,
                nsec: 1_000_000_000,
            },
            ..meta()
        };
        assert!(matches!(
            tree.set_metadata(root, late),
            Err(Error::InvalidTimestamp { .. })
        ));
        let xattr = Metadata {
            xattrs: vec![Xattr::new("os2.x", "v")],
            ..meta()
        };
        assert!(matches!(
            tree.add(root, b"a", NodeKind::Fifo, xattr),
            Err(Error::InvalidXattrName { .. })
        ));
    }
}
