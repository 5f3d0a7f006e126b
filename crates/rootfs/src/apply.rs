//! Applying layer tar streams, in order, to one in-memory tree (OCI image-spec layer.md).

use std::collections::HashSet;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use kiln_erofs::{validate_name, ImageWriter, Metadata, NodeId, NodeKind, Tree};

use crate::decode::{classify, LayerStream, Sizes};
use crate::error::{EntryError, EntryName, Error, Result};
use crate::resolve::{self, clean, Walk, Walker};
use crate::tarstream::{HeaderLimits, ReadError, TarEntry, TarReader};
use crate::{Layer, Limits};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// `.wh..wh..opq` with the whiteout prefix removed.
const OPAQUE: &[u8] = b".wh..opq";

/// Counts and times of one [`apply_layers`] run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ApplyStats {
    pub layers: usize,
    /// Tar entries read (whiteouts included, extension headers not).
    pub entries: u64,
    /// Regular file entries and the bytes of data they appended.
    pub files: u64,
    pub file_bytes: u64,
    /// Whiteout entries that found something to hide.
    pub whiteouts: u64,
    /// Layer blob bytes read, and the tar bytes they decompressed to.
    pub compressed_bytes: u64,
    pub decompressed_bytes: u64,
    /// Time inside the decompressors.
    pub decode: Duration,
    /// Time appending file data to the image.
    pub write: Duration,
    /// Everything else: tar headers, path resolution, tree updates.
    pub apply: Duration,
}

/// The flattened tree of an image's layers, with the file data already in the image
/// file. [`finish`](Self::finish) writes the metadata; until then the tree can be
/// inspected and edited (the identity files of a merged image).
pub struct RootTree {
    pub(crate) writer: ImageWriter,
    pub(crate) tree: Tree,
    pub(crate) limits: Limits,
    stats: ApplyStats,
}

impl std::fmt::Debug for RootTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootTree")
            .field("nodes", &self.tree.node_count())
            .field("stats", &self.stats)
            .finish()
    }
}

impl RootTree {
    /// The tree (metadata only).
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn stats(&self) -> &ApplyStats {
        &self.stats
    }

    /// The node at `path` inside the image, following the image's symlinks (the last
    /// component only if `follow_last`); `None` when something on the way is missing.
    pub fn lookup(&self, path: &[u8], follow_last: bool) -> Result<Option<NodeId>, EntryError> {
        resolve::lookup(&self.tree, path, follow_last, self.limits.max_depth)
    }

    /// The contents of regular file `node`, or `None` when it is not a regular file or
    /// is larger than `max` bytes.
    pub fn read_file(&self, node: NodeId, max: u64) -> Result<Option<Vec<u8>>, kiln_erofs::Error> {
        let NodeKind::File(data) = self.tree.kind(node)? else {
            return Ok(None);
        };
        if data.len() > max {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(data.len() as usize);
        self.writer.read_data(data)?.read_to_end(&mut out)?;
        Ok(Some(out))
    }

    /// Writes inodes, directories and the superblock (see [`ImageWriter::finish`]).
    pub fn finish(self) -> Result<kiln_erofs::FinishedImage, kiln_erofs::Error> {
        self.writer.finish(&self.tree)
    }
}

/// Applies `layers` (bottom first) into a tree whose file data goes to `writer`.
///
/// Every layer is decoded once, as a stream. Errors name the layer and the entry.
pub fn apply_layers<'a>(
    layers: impl IntoIterator<Item = Layer<'a>>,
    writer: ImageWriter,
    limits: &Limits,
) -> Result<RootTree> {
    let root = Metadata {
        mode: 0o755,
        ..Metadata::default()
    };
    let tree = Tree::new(root).expect("the default root metadata is valid");
    let mut applier = Applier {
        root: RootTree {
            writer,
            tree,
            limits: limits.clone(),
            stats: ApplyStats::default(),
        },
        touched: Vec::new(),
        generation: 0,
        linked: HashSet::new(),
    };
    let start = Instant::now();
    for (index, layer) in layers.into_iter().enumerate() {
        applier.apply_layer(index + 1, layer)?;
    }
    let stats = &mut applier.root.stats;
    stats.apply = start.elapsed().saturating_sub(stats.decode + stats.write);
    Ok(applier.root)
}

struct Applier {
    root: RootTree,
    /// Per node index: the generation (layer number) that last created or updated it,
    /// or that applied an entry below it. Whiteouts keep what the current layer touched.
    touched: Vec<u32>,
    generation: u32,
    /// Hard-link entries of the current layer (parent, name): they name lower nodes, so
    /// node marks cannot tell them apart from the lower names of the same node.
    linked: HashSet<(NodeId, Box<[u8]>)>,
}

impl Applier {
    fn apply_layer(&mut self, number: usize, layer: Layer<'_>) -> Result<()> {
        let fail = |entry: EntryName, reason: EntryError| Error::Layer {
            layer: number,
            digest: layer.digest.clone(),
            entry,
            reason,
        };
        let limits = self.root.limits.clone();
        let earlier = Sizes {
            compressed: self.root.stats.compressed_bytes,
            decompressed: self.root.stats.decompressed_bytes,
        };
        let stream = LayerStream::new(layer.blob, layer.compression, earlier, &limits)
            .map_err(|e| fail(EntryName::After(None), classify(e)))?;
        let header_limits = HeaderLimits {
            max_pax: limits.max_pax_header,
            max_path: limits.max_path_len as u64,
        };
        let mut reader = TarReader::new(stream, header_limits);
        self.generation += 1;
        self.linked.clear();
        let mut previous: Option<Vec<u8>> = None;
        loop {
            let entry = match reader.next_entry() {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(err) => return Err(fail(EntryName::After(previous), read_error(err))),
            };
            self.root.stats.entries += 1;
            let result = if self.root.stats.entries > limits.max_entries {
                Err(EntryError::TooManyEntries {
                    max: limits.max_entries,
                })
            } else {
                self.apply_entry(&entry, &mut reader)
            };
            if let Err(reason) = result {
                return Err(fail(EntryName::Path(entry.path), reason));
            }
            previous = Some(entry.path);
        }
        let stats = &mut self.root.stats;
        stats.layers += 1;
        let sizes = reader.get_ref().sizes();
        stats.compressed_bytes += sizes.compressed;
        stats.decompressed_bytes += sizes.decompressed;
        stats.decode += reader.get_ref().decode_time();
        Ok(())
    }

    fn apply_entry(
        &mut self,
        entry: &TarEntry,
        reader: &mut TarReader<LayerStream<'_>>,
    ) -> Result<(), EntryError> {
        let limits = &self.root.limits;
        if entry.path.len() > limits.max_path_len {
            return Err(EntryError::PathTooLong {
                len: entry.path.len(),
                max: limits.max_path_len,
            });
        }
        let components = clean(&entry.path);
        let Some((&name, parent)) = components.split_last() else {
            return self.apply_root(entry);
        };
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(parent, target);
        }
        validate_name(name)?;
        let kind = EntryKind::of(entry)?;
        let meta = self.metadata(entry)?;
        let dir = self.parent_dir(parent, entry)?;
        let tree = &mut self.root.tree;
        let existing = tree.lookup(dir, name)?;
        if kind == EntryKind::Directory {
            if let Some(node) = existing {
                if matches!(tree.kind(node)?, NodeKind::Directory) {
                    // A directory over a directory only takes the new attributes.
                    tree.set_metadata(node, meta)?;
                    self.mark(node);
                    return Ok(());
                }
            }
        }
        if existing.is_some() {
            tree.unlink(dir, name)?;
        }
        let node_kind = match kind {
            EntryKind::Hardlink => return self.hardlink(dir, name, &entry.link),
            EntryKind::File => NodeKind::File(self.append_data(entry, reader)?),
            EntryKind::Directory => NodeKind::Directory,
            EntryKind::Symlink => NodeKind::Symlink(entry.link.clone()),
            EntryKind::CharDevice => NodeKind::CharDevice {
                major: entry.device.0,
                minor: entry.device.1,
            },
            EntryKind::BlockDevice => NodeKind::BlockDevice {
                major: entry.device.0,
                minor: entry.device.1,
            },
            EntryKind::Fifo => NodeKind::Fifo,
        };
        let node = self.root.tree.add(dir, name, node_kind, meta)?;
        self.mark(node);
        Ok(())
    }

    /// An entry for the root itself (`./`): only a directory, which sets its attributes.
    fn apply_root(&mut self, entry: &TarEntry) -> Result<(), EntryError> {
        if entry.type_flag != b'5' {
            return Err(EntryError::RootNotDirectory);
        }
        let meta = self.metadata(entry)?;
        let root = self.root.tree.root();
        self.root.tree.set_metadata(root, meta)?;
        self.mark(root);
        Ok(())
    }

    /// The directory holding an entry, following the image's symlinks and creating
    /// missing directories (0755 root:root, the entry's mtime) as `tar` would. Marks the
    /// path as touched by this layer.
    fn parent_dir(&mut self, parent: &[&[u8]], entry: &TarEntry) -> Result<NodeId, EntryError> {
        let tree = &mut self.root.tree;
        let mut walker = Walker::new(tree, parent, true, self.root.limits.max_depth);
        while let Walk::Missing(name) = walker.walk(tree)? {
            validate_name(&name)?;
            let implicit = Metadata {
                mode: 0o755,
                mtime: entry.mtime,
                ..Metadata::default()
            };
            let node = tree.add(walker.top(), &name, NodeKind::Directory, implicit)?;
            walker.push(node, name)?;
        }
        let dir = walker.top();
        if !matches!(tree.kind(dir)?, NodeKind::Directory) {
            return Err(EntryError::NotADirectory {
                component: parent.last().map(|c| c.to_vec()).unwrap_or_default(),
            });
        }
        // The entry itself goes one level below.
        if walker.stack.len() > self.root.limits.max_depth {
            return Err(EntryError::TooDeep {
                max: self.root.limits.max_depth,
            });
        }
        for &node in &walker.stack {
            self.mark(node);
        }
        Ok(dir)
    }

    fn hardlink(&mut self, dir: NodeId, name: &[u8], link: &[u8]) -> Result<(), EntryError> {
        if link.is_empty() {
            return Err(EntryError::HardlinkWithoutTarget);
        }
        let missing = || EntryError::HardlinkTargetMissing {
            target: link.to_vec(),
        };
        let tree = &mut self.root.tree;
        let components = clean(link);
        let Some((&target_name, target_parent)) = components.split_last() else {
            return Err(EntryError::HardlinkToDirectory {
                target: link.to_vec(),
            });
        };
        // Like link(2): the parent path follows symlinks, the final name does not.
        let mut walker = Walker::new(tree, target_parent, true, self.root.limits.max_depth);
        let Walk::Done = walker.walk(tree)? else {
            return Err(missing());
        };
        let target_dir = walker.top();
        if !matches!(tree.kind(target_dir)?, NodeKind::Directory) {
            return Err(missing());
        }
        let target = tree.lookup(target_dir, target_name)?.ok_or_else(missing)?;
        if matches!(tree.kind(target)?, NodeKind::Directory) {
            return Err(EntryError::HardlinkToDirectory {
                target: link.to_vec(),
            });
        }
        tree.link(dir, name, target)?;
        self.linked.insert((dir, name.into()));
        Ok(())
    }

    fn append_data(
        &mut self,
        entry: &TarEntry,
        reader: &mut TarReader<LayerStream<'_>>,
    ) -> Result<kiln_erofs::DataRef, EntryError> {
        let start = Instant::now();
        let decode_before = reader.get_ref().decode_time();
        let mut read_error = None;
        let result = self.root.writer.append_data(
            Capture {
                inner: reader.data(),
                error: &mut read_error,
            },
            entry.size,
        );
        let decode = reader.get_ref().decode_time() - decode_before;
        let stats = &mut self.root.stats;
        stats.write += start.elapsed().saturating_sub(decode);
        match result {
            Ok(data) => {
                stats.files += 1;
                stats.file_bytes += entry.size;
                Ok(data)
            }
            Err(_) if read_error.is_some() => Err(classify(read_error.expect("checked"))),
            Err(kiln_erofs::Error::ShortData { .. }) => Err(EntryError::Corrupt(
                "the layer ends inside this entry's data".into(),
            )),
            Err(err) => Err(err.into()),
        }
    }

    fn whiteout(&mut self, parent: &[&[u8]], target: &[u8]) -> Result<(), EntryError> {
        let opaque = target == OPAQUE;
        if !opaque && validate_name(target).is_err() {
            return Err(EntryError::InvalidWhiteout);
        }
        let tree = &self.root.tree;
        let mut walker = Walker::new(tree, parent, true, self.root.limits.max_depth);
        // Nothing to hide below a directory that does not exist.
        let Walk::Done = walker.walk(tree)? else {
            return Ok(());
        };
        let dir = walker.top();
        if !matches!(tree.kind(dir)?, NodeKind::Directory) {
            return Ok(());
        }
        self.root.stats.whiteouts += 1;
        if opaque {
            self.hide_lower_children(dir)
        } else {
            self.hide_lower(dir, target)
        }
    }

    /// Removes `name` from `dir` unless this layer created it; a directory this layer
    /// touched stays, with only what this layer put in it.
    fn hide_lower(&mut self, dir: NodeId, name: &[u8]) -> Result<(), EntryError> {
        let Some(child) = self.root.tree.lookup(dir, name)? else {
            return Ok(());
        };
        if self.linked.contains(&(dir, Box::from(name))) {
            return Ok(());
        }
        if self.is_touched(child) {
            if matches!(self.root.tree.kind(child)?, NodeKind::Directory) {
                self.hide_lower_children(child)?;
            }
            return Ok(());
        }
        self.root.tree.unlink(dir, name)?;
        Ok(())
    }

    fn hide_lower_children(&mut self, dir: NodeId) -> Result<(), EntryError> {
        let names: Vec<Box<[u8]>> = self
            .root
            .tree
            .entries(dir)?
            .map(|(name, _)| Box::from(name))
            .collect();
        for name in names {
            self.hide_lower(dir, &name)?;
        }
        Ok(())
    }

    fn metadata(&self, entry: &TarEntry) -> Result<Metadata, EntryError> {
        let limits = &self.root.limits;
        if entry.xattrs.len() > limits.max_xattrs {
            return Err(EntryError::TooManyXattrs {
                count: entry.xattrs.len(),
                max: limits.max_xattrs,
            });
        }
        let mut xattrs = Vec::new();
        for xattr in &entry.xattrs {
            if xattr.value.len() > limits.max_xattr_size {
                return Err(EntryError::XattrTooLarge {
                    name: xattr.name.clone(),
                    size: xattr.value.len(),
                    max: limits.max_xattr_size,
                });
            }
            if kept_xattr(&xattr.name) {
                xattrs.push(xattr.clone());
            }
        }
        let mode = if entry.type_flag == b'2' {
            // Linux shows every symlink as 0777 whatever the archive says.
            0o777
        } else {
            entry.mode
        };
        Ok(Metadata {
            mode,
            uid: entry.uid,
            gid: entry.gid,
            mtime: entry.mtime,
            xattrs,
        })
    }

    fn mark(&mut self, node: NodeId) {
        let index = node.index() as usize;
        if index >= self.touched.len() {
            self.touched
                .resize(self.root.tree.node_count().max(index + 1), 0);
        }
        self.touched[index] = self.generation;
    }

    fn is_touched(&self, node: NodeId) -> bool {
        self.touched.get(node.index() as usize) == Some(&self.generation)
    }
}

/// Xattrs that describe the host rather than the image are dropped, as umoci does:
/// SELinux labels, NFSv4 ACLs, and overlayfs's own attributes, which would steer the
/// guest's overlay mount.
fn kept_xattr(name: &[u8]) -> bool {
    !(name == b"security.selinux"
        || name == b"system.nfs4_acl"
        || name.starts_with(b"trusted.overlay."))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryKind {
    File,
    Directory,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

impl EntryKind {
    fn of(entry: &TarEntry) -> Result<Self, EntryError> {
        Ok(match entry.type_flag {
            // '7' (contiguous file) is a regular file everywhere that matters.
            b'0' | b'\0' | b'7' => EntryKind::File,
            b'1' => EntryKind::Hardlink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::CharDevice,
            b'4' => EntryKind::BlockDevice,
            b'5' => EntryKind::Directory,
            b'6' => EntryKind::Fifo,
            other => return Err(EntryError::UnsupportedType(other)),
        })
    }
}

fn read_error(err: ReadError) -> EntryError {
    match err {
        ReadError::Io(err) => classify(err),
        ReadError::Entry(err) => err,
    }
}

/// Keeps the real error of the layer stream, which the image writer would only report
/// as an I/O failure of its own.
struct Capture<'e, R> {
    inner: R,
    error: &'e mut Option<io::Error>,
}

impl<R: Read> Read for Capture<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|err| {
            let kind = err.kind();
            *self.error = Some(err);
            io::Error::new(kind, "reading the layer failed")
        })
    }
}
