//! Resolving image paths inside the in-memory tree, following the image's own symlinks.
//!
//! The host filesystem is never consulted: an absolute symlink target starts again at
//! the image root, `..` stops at the root, and the walk gives up after
//! [`MAX_SYMLINK_HOPS`] symlinks (the Linux limit).

use kiln_erofs::{NodeId, NodeKind, Tree};

use crate::error::EntryError;

/// Symlinks followed in one resolution before it is called a loop (Linux's MAXSYMLINKS).
pub const MAX_SYMLINK_HOPS: u32 = 40;

/// The components of an entry path after lexical cleaning (as `filepath.Clean` relative
/// to the root does): empty and `.` components dropped, `..` removes the previous one and
/// stops at the root. `./a//b/` and `/a/b` both give `[a, b]`.
pub(crate) fn clean(path: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    for comp in path.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            _ => out.push(comp),
        }
    }
    out
}

/// Where a walk stopped.
pub(crate) enum Walk {
    /// Every component was found; the last node of the stack is the result.
    Done,
    /// `name` does not exist in the directory on top of the stack. The remaining
    /// components are still pending: create `name` there (push it) and walk again, or
    /// give up.
    Missing(Box<[u8]>),
}

/// A resolution in progress: the directories from the root to the current one, and the
/// components still to walk (last one first).
pub(crate) struct Walker {
    pub stack: Vec<NodeId>,
    /// The name of each node of `stack` after the root.
    pub names: Vec<Box<[u8]>>,
    pending: Vec<Box<[u8]>>,
    hops: u32,
    follow_last: bool,
    max_depth: usize,
}

impl Walker {
    /// A walk from the root through `components`; the final component is followed when
    /// it is a symlink only if `follow_last`.
    pub(crate) fn new(
        tree: &Tree,
        components: &[&[u8]],
        follow_last: bool,
        max_depth: usize,
    ) -> Self {
        Walker {
            stack: vec![tree.root()],
            names: Vec::new(),
            pending: components.iter().rev().map(|c| Box::from(*c)).collect(),
            hops: 0,
            follow_last,
            max_depth,
        }
    }

    /// The node reached so far.
    pub(crate) fn top(&self) -> NodeId {
        *self.stack.last().expect("the stack always holds the root")
    }

    /// Walks until every component is resolved or one is missing. Intermediate
    /// components must be directories (or symlinks to them); the last one may be
    /// anything.
    pub(crate) fn walk(&mut self, tree: &Tree) -> Result<Walk, EntryError> {
        while let Some(comp) = self.pending.pop() {
            match &*comp {
                b"" | b"." => continue,
                b".." => {
                    if self.stack.len() > 1 {
                        self.stack.pop();
                        self.names.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let dir = self.top();
            if !matches!(tree.kind(dir)?, NodeKind::Directory) {
                return Err(EntryError::NotADirectory {
                    component: comp.to_vec(),
                });
            }
            let Some(node) = tree.lookup(dir, &comp)? else {
                return Ok(Walk::Missing(comp));
            };
            let last = self.pending.is_empty();
            match tree.kind(node)? {
                NodeKind::Symlink(target) if !last || self.follow_last => {
                    self.hops += 1;
                    if self.hops > MAX_SYMLINK_HOPS {
                        return Err(EntryError::SymlinkLoop {
                            max: MAX_SYMLINK_HOPS,
                        });
                    }
                    if target.first() == Some(&b'/') {
                        self.stack.truncate(1);
                        self.names.clear();
                    }
                    self.pending
                        .extend(target.split(|&b| b == b'/').rev().map(Box::from));
                }
                NodeKind::Directory => self.push(node, comp)?,
                _ if last => self.push(node, comp)?,
                _ => {
                    return Err(EntryError::NotADirectory {
                        component: comp.to_vec(),
                    })
                }
            }
        }
        Ok(Walk::Done)
    }

    /// Adds a node found (or created) below the top of the stack.
    pub(crate) fn push(&mut self, node: NodeId, name: Box<[u8]>) -> Result<(), EntryError> {
        if self.stack.len() > self.max_depth {
            return Err(EntryError::TooDeep {
                max: self.max_depth,
            });
        }
        self.stack.push(node);
        self.names.push(name);
        Ok(())
    }

    /// Whether a symlink was followed so far.
    pub(crate) fn followed_symlinks(&self) -> bool {
        self.hops > 0
    }
}

/// The node `path` names, following symlinks (the final one only if `follow_last`), or
/// `None` when a component is missing.
pub(crate) fn lookup(
    tree: &Tree,
    path: &[u8],
    follow_last: bool,
    max_depth: usize,
) -> Result<Option<NodeId>, EntryError> {
    let mut walker = Walker::new(tree, &clean(path), follow_last, max_depth);
    Ok(match walker.walk(tree)? {
        Walk::Done => Some(walker.top()),
        Walk::Missing(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_erofs::{DataRef, Metadata};

    fn tree() -> Tree {
        let dir = Metadata {
            mode: 0o755,
            ..Metadata::default()
        };
        let mut tree = Tree::new(dir.clone()).unwrap();
        let root = tree.root();
        let usr = tree
            .add(root, b"usr", NodeKind::Directory, dir.clone())
            .unwrap();
        let lib = tree
            .add(usr, b"lib", NodeKind::Directory, dir.clone())
            .unwrap();
        tree.add(lib, b"libc.so", NodeKind::File(DataRef::EMPTY), dir.clone())
            .unwrap();
        let link = |t: &str| NodeKind::Symlink(t.as_bytes().to_vec());
        tree.add(root, b"lib", link("usr/lib"), dir.clone())
            .unwrap();
        tree.add(usr, b"abs", link("/usr/lib/libc.so"), dir.clone())
            .unwrap();
        tree.add(usr, b"up", link("../../../../usr"), dir.clone())
            .unwrap();
        tree.add(root, b"loop1", link("loop2"), dir.clone())
            .unwrap();
        tree.add(root, b"loop2", link("/loop1"), dir.clone())
            .unwrap();
        tree.add(root, b"dangling", link("/nowhere/x"), dir.clone())
            .unwrap();
        tree
    }

    #[test]
    fn cleaning_is_lexical_and_clamped() {
        assert_eq!(clean(b"./a//b/"), vec![&b"a"[..], b"b"]);
        assert_eq!(clean(b"/../../etc/passwd"), vec![&b"etc"[..], b"passwd"]);
        assert_eq!(clean(b"a/../../b"), vec![&b"b"[..]]);
        assert!(clean(b"./").is_empty());
    }

    #[test]
    fn symlinks_resolve_inside_the_image() {
        let t = tree();
        let libc = lookup(&t, b"usr/lib/libc.so", false, 64).unwrap().unwrap();
        assert_eq!(lookup(&t, b"lib/libc.so", false, 64).unwrap(), Some(libc));
        assert_eq!(lookup(&t, b"usr/abs", true, 64).unwrap(), Some(libc));
        assert_ne!(lookup(&t, b"usr/abs", false, 64).unwrap(), Some(libc));
        // `..` in a symlink target clamps at the image root.
        assert_eq!(
            lookup(&t, b"usr/up/lib/libc.so", true, 64).unwrap(),
            Some(libc)
        );
        assert_eq!(lookup(&t, b"dangling", true, 64).unwrap(), None);
        assert!(matches!(
            lookup(&t, b"loop1/x", true, 64),
            Err(EntryError::SymlinkLoop { .. })
        ));
        assert!(matches!(
            lookup(&t, b"usr/lib/libc.so/x", true, 64),
            Err(EntryError::NotADirectory { .. })
        ));
        assert!(matches!(
            lookup(&t, b"usr/lib/libc.so", true, 1),
            Err(EntryError::TooDeep { max: 1 })
        ));
    }
}
