//! Lays out the metadata of a finished tree (inode placement, nids, block addresses)
//! and writes it after the data area.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::error::{Error, Result};
use crate::format::{self, Dirent, Inode, SuperBlock, BLOCK_SIZE};
use crate::tree::{Metadata, NodeId, NodeKind, Timestamp, Tree};
use crate::writer::{Extent, ImageWriter, MAX_BLOCKS};

/// Where the part of an inode's data that is not inline lives.
enum Spill {
    /// Nothing outside the inode, or file data used in place in the data area.
    None,
    /// Directory or symlink blocks written after the metadata area.
    Generated,
    /// File data copied after the metadata area because its tail could not be inlined.
    Relocated(Extent),
}

pub(crate) struct PlannedInode {
    id: NodeId,
    /// Byte offset from the start of the metadata area (nid = pos / 32).
    pos: u64,
    pub(crate) inode: Inode,
    /// Bytes of data stored right after the inode and its xattrs.
    inline_len: usize,
    spill: Spill,
}

pub(crate) struct Layout {
    pub(crate) inodes: Vec<PlannedInode>,
    /// nid of every node, by node index; `u64::MAX` for unreachable nodes.
    nids: Vec<u64>,
    /// Parent of every reachable directory, by node index.
    parents: Vec<NodeId>,
    build_time: Timestamp,
    meta_blkaddr: u64,
    spill_start: u64,
    pub(crate) total_blocks: u64,
    /// Data-area block ranges (start, count) that no inode reads in place.
    pub(crate) dead: Vec<(u64, u64)>,
    pub(crate) relocated_files: u64,
}

/// The nodes reachable from the root, breadth-first, so the root gets the first nid (the
/// superblock's root_nid has 16 bits) and siblings sit together.
struct Reachable {
    order: Vec<NodeId>,
    /// Link count by position in `order`: names for files, 2 + subdirectories for dirs.
    nlink: Vec<u32>,
    /// Parent of every reachable directory, by node index.
    parents: Vec<NodeId>,
}

fn reachable(tree: &Tree) -> Result<Reachable> {
    let root = tree.root();
    let mut order = vec![root];
    let mut position = vec![u32::MAX; tree.node_count()];
    let mut parents = vec![root; tree.node_count()];
    let mut nlink = vec![2u32];
    position[root.0 as usize] = 0;
    let mut next = 0;
    while let Some(&dir) = order.get(next) {
        let dir_position = next;
        next += 1;
        let Ok(children) = tree.children(dir) else {
            continue;
        };
        for &child in children.values() {
            let is_dir = matches!(tree.kind(child)?, NodeKind::Directory);
            let child_position = &mut position[child.0 as usize];
            if *child_position == u32::MAX {
                *child_position = order.len() as u32;
                order.push(child);
                nlink.push(if is_dir { 2 } else { 0 });
            }
            if is_dir {
                parents[child.0 as usize] = dir;
                nlink[dir_position] += 1;
            } else {
                nlink[*child_position as usize] += 1;
            }
        }
    }
    Ok(Reachable {
        order,
        nlink,
        parents,
    })
}

/// Compact inodes take their mtime from the superblock: pick the most common one (the
/// earliest among equals, for reproducible output).
fn most_common_mtime(tree: &Tree, order: &[NodeId]) -> Result<Timestamp> {
    let mut counts: HashMap<Timestamp, usize> = HashMap::new();
    for &id in order {
        *counts.entry(tree.metadata(id)?.mtime).or_default() += 1;
    }
    let best = counts
        .into_iter()
        .max_by_key(|&(time, count)| (count, std::cmp::Reverse(time)));
    Ok(best.map(|(time, _)| time).unwrap_or_default())
}

/// Whether an inode needs the 64-byte form: the 32-byte one has 16-bit ids and link
/// count, a 32-bit size and no mtime of its own.
pub(crate) fn needs_extended(
    meta: &Metadata,
    nlink: u32,
    size: u64,
    build_time: Timestamp,
) -> bool {
    meta.uid > 0xffff
        || meta.gid > 0xffff
        || nlink > 0xffff
        || size > u64::from(u32::MAX)
        || meta.mtime != build_time
}

/// What a node stores besides its metadata.
struct Payload {
    type_bits: u16,
    size: u64,
    /// Bytes of the partial last block, which may go inline.
    tail_len: usize,
    /// Block address (files in the data area) or encoded device number.
    raw: u32,
    extent: Option<Extent>,
}

fn payload(writer: &ImageWriter, tree: &Tree, id: NodeId) -> Result<Payload> {
    let simple = |type_bits, raw| Payload {
        type_bits,
        size: 0,
        tail_len: 0,
        raw,
        extent: None,
    };
    Ok(match tree.kind(id)? {
        NodeKind::File(data) => match writer.extent(data)? {
            Some(extent) => Payload {
                type_bits: format::S_IFREG,
                size: data.len(),
                tail_len: extent.spooled_tail as usize,
                raw: extent.start_block as u32,
                extent: Some(extent),
            },
            None => simple(format::S_IFREG, 0),
        },
        NodeKind::Directory => {
            let size = dir_size(tree, id)?;
            Payload {
                type_bits: format::S_IFDIR,
                size,
                tail_len: (size % BLOCK_SIZE) as usize,
                raw: 0,
                extent: None,
            }
        }
        NodeKind::Symlink(target) => Payload {
            type_bits: format::S_IFLNK,
            size: target.len() as u64,
            tail_len: target.len(),
            raw: 0,
            extent: None,
        },
        NodeKind::CharDevice { major, minor } => {
            simple(format::S_IFCHR, format::encode_rdev(*major, *minor)?)
        }
        NodeKind::BlockDevice { major, minor } => {
            simple(format::S_IFBLK, format::encode_rdev(*major, *minor)?)
        }
        NodeKind::Fifo => simple(format::S_IFIFO, 0),
        NodeKind::Socket => simple(format::S_IFSOCK, 0),
    })
}

const SLOTS_PER_BLOCK: usize = (BLOCK_SIZE / format::INODE_SLOT) as usize;

/// Places inode records (inode, xattrs, inline data) in the metadata area. A record
/// never straddles a block boundary (the kernel needs that for inline data), so each
/// goes to the partly used block with the least room that still fits it (best fit),
/// which keeps blocks full whatever the mix of record sizes. Records larger than a
/// block start a new one.
struct MetaAllocator {
    /// Blocks (relative to the metadata area) in use so far.
    blocks: u64,
    /// Partly used blocks by the number of free 32-byte slots at their end.
    free: Vec<Vec<u64>>,
}

impl MetaAllocator {
    /// Slot 0 stays unused: nid 0 would make the first inode (the root) inode number 0,
    /// which some programs take for an empty directory slot.
    fn new() -> Self {
        let mut free = vec![Vec::new(); SLOTS_PER_BLOCK + 1];
        free[SLOTS_PER_BLOCK - 1].push(0);
        MetaAllocator { blocks: 1, free }
    }

    /// Reserves `record` bytes and returns their offset in the metadata area.
    fn allocate(&mut self, record: usize) -> u64 {
        let slots = record.div_ceil(format::INODE_SLOT as usize).max(1);
        if slots <= SLOTS_PER_BLOCK {
            if let Some(free) = (slots..=SLOTS_PER_BLOCK).find(|&free| !self.free[free].is_empty())
            {
                let block = self.free[free].pop().expect("non-empty list");
                self.free[free - slots].push(block);
                return block * BLOCK_SIZE + ((SLOTS_PER_BLOCK - free) as u64) * format::INODE_SLOT;
            }
        }
        let first = self.blocks;
        let bytes = slots as u64 * format::INODE_SLOT;
        self.blocks += bytes.div_ceil(BLOCK_SIZE);
        let used_in_last = bytes - (self.blocks - 1 - first) * BLOCK_SIZE;
        let free = SLOTS_PER_BLOCK - (used_in_last / format::INODE_SLOT) as usize;
        self.free[free].push(self.blocks - 1);
        first * BLOCK_SIZE
    }
}

impl Layout {
    pub(crate) fn plan(writer: &ImageWriter, tree: &Tree) -> Result<Layout> {
        let Reachable {
            order,
            nlink,
            parents,
        } = reachable(tree)?;
        let build_time = most_common_mtime(tree, &order)?;

        let mut inodes = Vec::with_capacity(order.len());
        let mut allocator = MetaAllocator::new();
        let mut records_end = 0;
        for (index, &id) in order.iter().enumerate() {
            let meta = tree.metadata(id)?;
            let payload = payload(writer, tree, id)?;
            let xattr_body_size = format::xattr_body_size(&meta.xattrs)?;
            let mut inode = Inode {
                extended: needs_extended(meta, nlink[index], payload.size, build_time),
                layout: format::LAYOUT_FLAT_PLAIN,
                xattr_body_size,
                mode: payload.type_bits | meta.mode as u16,
                nlink: nlink[index],
                size: payload.size,
                raw: payload.raw,
                ino: index as u32 + 1,
                uid: meta.uid,
                gid: meta.gid,
                mtime: meta.mtime,
            };
            let base = inode.size_on_disk() + xattr_body_size;
            let inline = payload.tail_len > 0 && base + payload.tail_len <= BLOCK_SIZE as usize;
            let inline_len = if inline { payload.tail_len } else { 0 };
            if inline {
                inode.layout = format::LAYOUT_FLAT_INLINE;
            }
            let spill = match payload.extent {
                Some(extent) if payload.tail_len > 0 && !inline => Spill::Relocated(extent),
                Some(_) => Spill::None,
                None if payload.size > inline_len as u64 => Spill::Generated,
                None => Spill::None,
            };
            let pos = allocator.allocate(base + inline_len);
            records_end = records_end.max(pos + (base + inline_len) as u64);
            inodes.push(PlannedInode {
                id,
                pos,
                inode,
                inline_len,
                spill,
            });
        }

        let meta_blkaddr = writer.next_block;
        let spill_start = meta_blkaddr + allocator.blocks;
        let mut next_block = spill_start;
        let mut relocated_files = 0;
        for planned in &mut inodes {
            let spilled = match planned.spill {
                Spill::None => continue,
                Spill::Generated => planned.inode.size - planned.inline_len as u64,
                Spill::Relocated(_) => {
                    relocated_files += 1;
                    planned.inode.size
                }
            };
            planned.inode.raw = next_block as u32;
            next_block += spilled.div_ceil(BLOCK_SIZE);
        }
        // fsck.erofs 1.5 reads a 12-byte xattr header after every inode, even one
        // without xattrs, and fails at the end of the image: keep a block after an
        // inode that ends the metadata area when nothing else follows it.
        if next_block == spill_start && records_end == allocator.blocks * BLOCK_SIZE {
            next_block += 1;
        }
        if next_block >= MAX_BLOCKS {
            return Err(Error::ImageTooLarge { max: MAX_BLOCKS });
        }

        let mut nids = vec![u64::MAX; tree.node_count()];
        for planned in &inodes {
            nids[planned.id.0 as usize] = planned.pos / format::INODE_SLOT;
        }
        Ok(Layout {
            dead: dead_extents(writer, tree, &inodes)?,
            inodes,
            nids,
            parents,
            build_time,
            meta_blkaddr,
            spill_start,
            total_blocks: next_block,
            relocated_files,
        })
    }

    pub(crate) fn write(&self, writer: &ImageWriter, tree: &Tree) -> Result<()> {
        let mut file = &writer.file;
        file.seek(SeekFrom::Start(self.meta_blkaddr * BLOCK_SIZE))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        self.write_metadata(writer, tree, &mut out)?;
        self.write_spills(writer, tree, &mut out)?;
        out.flush()?;
        drop(out);

        let root_nid = self.nids[tree.root().0 as usize];
        let superblock = SuperBlock {
            root_nid: u16::try_from(root_nid).expect("the root is the first inode"),
            inos: self.inodes.len() as u64,
            build_time: self.build_time,
            blocks: self.total_blocks as u32,
            meta_blkaddr: self.meta_blkaddr as u32,
            uuid: writer.options.uuid,
            volume_name: writer.options.volume_name,
        };
        writer.file.write_all_at(&superblock.block(), 0)?;
        writer.file.set_len(self.total_blocks * BLOCK_SIZE)?;
        Ok(())
    }

    /// The metadata area: each inode, its xattrs and its inline data, in nid order.
    fn write_metadata(
        &self,
        writer: &ImageWriter,
        tree: &Tree,
        out: &mut impl Write,
    ) -> Result<()> {
        let mut written = 0u64;
        let mut record = Vec::with_capacity(BLOCK_SIZE as usize);
        let mut by_position: Vec<&PlannedInode> = self.inodes.iter().collect();
        by_position.sort_unstable_by_key(|planned| planned.pos);
        for planned in by_position {
            write_zeros(out, planned.pos - written)?;
            record.clear();
            planned.inode.write(&mut record);
            format::write_xattr_body(&mut record, &tree.metadata(planned.id)?.xattrs);
            if planned.inline_len > 0 {
                match tree.kind(planned.id)? {
                    NodeKind::File(data) => {
                        let extent = writer.extent(data)?.expect("an inline tail means data");
                        writer.read_tail(&extent, &mut record)?;
                    }
                    NodeKind::Directory => {
                        let content = self.dir_content(tree, planned.id)?;
                        record.extend_from_slice(&content[content.len() - planned.inline_len..]);
                    }
                    NodeKind::Symlink(target) => record.extend_from_slice(target),
                    _ => unreachable!("only files, directories and symlinks have data"),
                }
            }
            out.write_all(&record)?;
            written = planned.pos + record.len() as u64;
        }
        write_zeros(
            out,
            (self.spill_start - self.meta_blkaddr) * BLOCK_SIZE - written,
        )?;
        Ok(())
    }

    /// The blocks after the metadata area, in the order `plan` assigned them.
    fn write_spills(&self, writer: &ImageWriter, tree: &Tree, out: &mut impl Write) -> Result<()> {
        let mut blocks = Vec::new();
        for planned in &self.inodes {
            blocks.clear();
            match (&planned.spill, tree.kind(planned.id)?) {
                (Spill::None, _) => continue,
                (Spill::Generated, NodeKind::Directory) => {
                    blocks = self.dir_content(tree, planned.id)?;
                    blocks.truncate((planned.inode.size - planned.inline_len as u64) as usize);
                }
                (Spill::Generated, NodeKind::Symlink(target)) => blocks.extend_from_slice(target),
                (Spill::Relocated(extent), _) => {
                    writer.copy_in_place_blocks(extent, out)?;
                    writer.read_tail(extent, &mut blocks)?;
                }
                (Spill::Generated, _) => {
                    unreachable!("only directories and symlinks generate blocks")
                }
            }
            blocks.resize(blocks.len().next_multiple_of(BLOCK_SIZE as usize), 0);
            out.write_all(&blocks)?;
        }
        Ok(())
    }

    /// The full on-disk content of a directory: blocks padded, except the last.
    fn dir_content(&self, tree: &Tree, dir: NodeId) -> Result<Vec<u8>> {
        let parent = self.parents[dir.0 as usize];
        let entries = dir_entries(tree, dir, parent, |id| self.nids[id.0 as usize])?;
        let (blocks, _) = format::pack_dir_blocks(entries.iter().map(|e| e.name.len()));
        let mut content = Vec::new();
        let mut rest = &entries[..];
        for (i, &count) in blocks.iter().enumerate() {
            let (this, next) = rest.split_at(count);
            format::write_dir_block(&mut content, this, i + 1 < blocks.len());
            rest = next;
        }
        Ok(content)
    }
}

/// Data-area extents that no inode reads in place: data of unreachable files, and of
/// relocated files (unless another inode shares the same `DataRef` in place).
fn dead_extents(
    writer: &ImageWriter,
    tree: &Tree,
    inodes: &[PlannedInode],
) -> Result<Vec<(u64, u64)>> {
    let mut used_in_place = vec![false; writer.extents.len()];
    for planned in inodes {
        if let (Spill::None, NodeKind::File(data)) = (&planned.spill, tree.kind(planned.id)?) {
            if let Some(index) = writer.extent_index(data) {
                used_in_place[index] = true;
            }
        }
    }
    Ok(writer
        .extents
        .iter()
        .zip(used_in_place)
        .filter(|&(extent, used)| !used && extent.blocks > 0)
        .map(|(extent, _)| (extent.start_block, extent.blocks))
        .collect())
}

/// A directory's entries, "." and ".." included, in the byte order EROFS looks names up
/// in.
fn dir_entries(
    tree: &Tree,
    dir: NodeId,
    parent: NodeId,
    nid: impl Fn(NodeId) -> u64,
) -> Result<Vec<Dirent<'_>>> {
    let children = tree.children(dir)?;
    let mut entries = Vec::with_capacity(children.len() + 2);
    entries.push(Dirent {
        name: b".",
        nid: nid(dir),
        file_type: format::FT_DIR,
    });
    entries.push(Dirent {
        name: b"..",
        nid: nid(parent),
        file_type: format::FT_DIR,
    });
    for (name, &child) in children {
        let file_type = match tree.kind(child)? {
            NodeKind::File(_) => format::FT_REG,
            NodeKind::Directory => format::FT_DIR,
            NodeKind::Symlink(_) => format::FT_SYMLINK,
            NodeKind::CharDevice { .. } => format::FT_CHRDEV,
            NodeKind::BlockDevice { .. } => format::FT_BLKDEV,
            NodeKind::Fifo => format::FT_FIFO,
            NodeKind::Socket => format::FT_SOCK,
        };
        entries.push(Dirent {
            name,
            nid: nid(child),
            file_type,
        });
    }
    // Children are sorted already; names below '.' (such as "-x") sort before "." and "..".
    entries.sort_by(|a, b| a.name.cmp(b.name));
    Ok(entries)
}

fn dir_size(tree: &Tree, dir: NodeId) -> Result<u64> {
    let entries = dir_entries(tree, dir, dir, |_| 0)?;
    Ok(format::pack_dir_blocks(entries.iter().map(|e| e.name.len())).1)
}

fn write_zeros(out: &mut impl Write, mut count: u64) -> io::Result<()> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while count > 0 {
        let n = count.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..n])?;
        count -= n as u64;
    }
    Ok(())
}

/// Deallocates dead block ranges, keeping the file size. Returns the blocks punched.
/// Filesystems without hole punching keep the dead data (it is unreferenced either way).
pub(crate) fn punch_holes(file: &File, ranges: &[(u64, u64)]) -> Result<u64> {
    let mut punched = 0;
    for &(start, blocks) in ranges {
        let offset = (start * BLOCK_SIZE) as libc::off_t;
        let len = (blocks * BLOCK_SIZE) as libc::off_t;
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate only reads its integer arguments; the fd is open for writing.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                tracing::warn!("filesystem cannot punch holes; dead data stays in the image file");
                return Ok(punched);
            }
            return Err(err.into());
        }
        punched += blocks;
    }
    Ok(punched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_fill_blocks_best_fit_without_straddling() {
        let mut meta = MetaAllocator::new();
        // Slot 0 is never handed out.
        assert_eq!(meta.allocate(40), 32);
        assert_eq!(meta.allocate(32), 96);
        // 4001 bytes do not fit in the 3968 left in block 0: a new block.
        assert_eq!(meta.allocate(4001), 4096);
        // 64 bytes fit in block 1's last 64 bytes (the tightest fit), not block 0.
        assert_eq!(meta.allocate(64), 4096 + 4032);
        assert_eq!(meta.allocate(100), 128);
        // Larger than a block: starts a new one; its last block stays open.
        assert_eq!(meta.allocate(5000), 8192);
        assert_eq!(meta.blocks, 4);
        assert_eq!(meta.allocate(32), 8192 + 5024);
    }

    #[test]
    fn compact_inodes_only_when_every_field_fits() {
        let t0 = Timestamp { sec: 10, nsec: 0 };
        let meta = Metadata {
            mode: 0o644,
            uid: 65_535,
            gid: 65_535,
            mtime: t0,
            xattrs: Vec::new(),
        };
        assert!(!needs_extended(&meta, 65_535, u64::from(u32::MAX), t0));
        assert!(needs_extended(&meta, 65_536, 0, t0));
        assert!(needs_extended(&meta, 1, u64::from(u32::MAX) + 1, t0));
        assert!(needs_extended(&meta, 1, 0, Timestamp { sec: 10, nsec: 1 }));
        assert!(needs_extended(
            &Metadata {
                uid: 65_536,
                ..meta.clone()
            },
            1,
            0,
            t0
        ));
        assert!(needs_extended(
            &Metadata {
                gid: 65_536,
                ..meta
            },
            1,
            0,
            t0
        ));
    }
}
