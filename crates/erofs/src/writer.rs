//! Streams file data into the image, then lays out and writes the metadata.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::format::{self, Dirent, Inode, SuperBlock, BLOCK_SIZE};
use crate::tree::{NodeId, NodeKind, Timestamp, Tree};

/// Where the contents of one regular file live in the image being written.
///
/// Returned by [`ImageWriter::append_data`] and [`ImageWriter::append_bytes`]; only valid
/// with the writer that returned it. Cheap to copy: several nodes may share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DataRef {
    writer: u32,
    extent: u32,
    len: u64,
}

impl DataRef {
    /// The contents of an empty file (valid with every writer).
    pub const EMPTY: DataRef = DataRef {
        writer: 0,
        extent: 0,
        len: 0,
    };

    /// The file size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Superblock fields the caller may choose. The defaults (all zero) give reproducible
/// images: the same tree and data always produce the same bytes.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    pub uuid: [u8; 16],
    /// Volume label, NUL-padded.
    pub volume_name: [u8; 16],
}

/// Figures about a finished image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Image size in 4096-byte blocks (holes included).
    pub blocks: u64,
    /// Inodes written (hard links count once).
    pub inodes: u64,
    /// Inodes that needed the 64-byte extended form.
    pub extended_inodes: u64,
    /// Blocks of appended data that no reachable file uses, punched out of the file.
    pub reclaimed_blocks: u64,
    /// Files whose data had to be copied because their tail could not be inlined.
    pub relocated_files: u64,
}

/// The image file and what was written to it. The file is complete but not synced.
#[derive(Debug)]
pub struct FinishedImage {
    pub file: File,
    pub stats: ImageStats,
}

/// One appended file's data: whole blocks in the image, the partial last block in the
/// tail spool until `finish` decides where it goes.
#[derive(Clone, Copy, Debug)]
struct Extent {
    start_block: u64,
    full_blocks: u64,
    tail_offset: u64,
    tail_len: u64,
}

/// Writes one EROFS image. See the crate documentation for the protocol.
#[derive(Debug)]
pub struct ImageWriter {
    file: File,
    options: ImageOptions,
    id: u32,
    /// Next free block of the data area (block 0 holds the superblock).
    next_block: u64,
    extents: Vec<Extent>,
    /// Partial last blocks of appended files, packed back to back; created on first use.
    tail_spool: Option<File>,
    tail_spool_len: u64,
}

static NEXT_WRITER_ID: AtomicU32 = AtomicU32::new(1);

/// 2^32 blocks of 4 KiB: the reach of the on-disk 32-bit block addresses.
const MAX_BLOCKS: u64 = 1 << 32;

impl ImageWriter {
    /// Starts an image in `file`, which is truncated. Any writable file works; write to a
    /// temporary file and rename it once [`finish`](Self::finish) returned to publish
    /// atomically.
    pub fn new(file: File, options: ImageOptions) -> Result<Self> {
        file.set_len(0)?;
        Ok(ImageWriter {
            file,
            options,
            id: NEXT_WRITER_ID.fetch_add(1, Ordering::Relaxed),
            next_block: 1,
            extents: Vec::new(),
            tail_spool: None,
            tail_spool_len: 0,
        })
    }

    /// Copies exactly `len` bytes from `reader` into the image and returns where they
    /// live. Whole 4 KiB blocks go straight to their final place in the image; only the
    /// last partial block is held (in an unlinked temporary file, not in memory) until
    /// [`finish`](Self::finish) packs it next to the file's inode.
    pub fn append_data(&mut self, reader: impl Read, len: u64) -> Result<DataRef> {
        if len == 0 {
            return Ok(DataRef::EMPTY);
        }
        let full_blocks = len / BLOCK_SIZE;
        let tail_len = len % BLOCK_SIZE;
        if self.next_block + full_blocks >= MAX_BLOCKS {
            return Err(Error::ImageTooLarge { max: MAX_BLOCKS });
        }
        let mut reader = reader.take(len);
        if full_blocks > 0 {
            let mut file = &self.file;
            file.seek(SeekFrom::Start(self.next_block * BLOCK_SIZE))?;
            let copied = io::copy(&mut (&mut reader).take(full_blocks * BLOCK_SIZE), &mut file)?;
            if copied != full_blocks * BLOCK_SIZE {
                return Err(Error::ShortData {
                    expected: len,
                    got: copied,
                });
            }
        }
        let tail_offset = self.tail_spool_len;
        if tail_len > 0 {
            let mut tail = [0u8; BLOCK_SIZE as usize];
            let tail = &mut tail[..tail_len as usize];
            let mut got = 0;
            while got < tail.len() {
                match reader.read(&mut tail[got..]) {
                    Ok(0) => {
                        let got = full_blocks * BLOCK_SIZE + got as u64;
                        return Err(Error::ShortData { expected: len, got });
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let spool = match &mut self.tail_spool {
                Some(spool) => spool,
                spool => spool.insert(tempfile::tempfile()?),
            };
            spool.write_all_at(tail, tail_offset)?;
            self.tail_spool_len += tail_len;
        }
        let start_block = self.next_block;
        self.next_block += full_blocks;
        self.extents.push(Extent {
            start_block,
            full_blocks,
            tail_offset,
            tail_len,
        });
        Ok(DataRef {
            writer: self.id,
            extent: self.extents.len() as u32,
            len,
        })
    }

    /// [`append_data`](Self::append_data) for contents already in memory.
    pub fn append_bytes(&mut self, data: &[u8]) -> Result<DataRef> {
        self.append_data(data, data.len() as u64)
    }

    /// Reads back data appended earlier (to inspect a file such as /etc/passwd before
    /// the image is finished). Bound what you read with [`Read::take`].
    pub fn read_data(&self, data: &DataRef) -> Result<DataReader<'_>> {
        let extent = self.extent(data)?;
        Ok(DataReader {
            writer: self,
            extent,
            pos: 0,
            len: data.len,
        })
    }

    fn extent(&self, data: &DataRef) -> Result<Option<Extent>> {
        if *data == DataRef::EMPTY {
            return Ok(None);
        }
        let extent = (data.writer == self.id)
            .then(|| self.extents.get((data.extent as usize).wrapping_sub(1)))
            .flatten()
            .ok_or(Error::ForeignDataRef)?;
        if extent.full_blocks * BLOCK_SIZE + extent.tail_len != data.len {
            return Err(Error::ForeignDataRef);
        }
        Ok(Some(*extent))
    }

    fn read_tail(&self, extent: &Extent, out: &mut Vec<u8>) -> Result<()> {
        let start = out.len();
        out.resize(start + extent.tail_len as usize, 0);
        let spool = self.tail_spool.as_ref().expect("a tail was spooled");
        spool.read_exact_at(&mut out[start..], extent.tail_offset)?;
        Ok(())
    }

    /// Writes the inodes, directories and superblock for every node reachable from the
    /// root of `tree`, and reclaims appended data that no reachable file uses.
    ///
    /// The metadata goes after the data, so this writes O(nodes) bytes plus the data of
    /// files whose tail could not be inlined (rare: only when huge xattrs leave no room).
    pub fn finish(self, tree: &Tree) -> Result<FinishedImage> {
        let plan = Layout::plan(&self, tree)?;
        plan.write(&self, tree)?;
        let ImageWriter { file, .. } = self;
        let reclaimed_blocks = punch_holes(&file, &plan.dead)?;
        let stats = ImageStats {
            blocks: plan.total_blocks,
            inodes: plan.inodes.len() as u64,
            extended_inodes: plan.inodes.iter().filter(|i| i.inode.extended).count() as u64,
            reclaimed_blocks,
            relocated_files: plan.relocated_files,
        };
        tracing::debug!(?stats, "EROFS image written");
        Ok(FinishedImage { file, stats })
    }
}

/// Reads the contents behind a [`DataRef`]; see [`ImageWriter::read_data`].
#[derive(Debug)]
pub struct DataReader<'a> {
    writer: &'a ImageWriter,
    extent: Option<Extent>,
    pos: u64,
    len: u64,
}

impl Read for DataReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(extent) = self.extent.filter(|_| self.pos < self.len) else {
            return Ok(0);
        };
        let full = extent.full_blocks * BLOCK_SIZE;
        let n = if self.pos < full {
            let want = buf.len().min((full - self.pos) as usize);
            self.writer
                .file
                .read_at(&mut buf[..want], extent.start_block * BLOCK_SIZE + self.pos)?
        } else {
            let want = buf.len().min((self.len - self.pos) as usize);
            let spool = self.writer.tail_spool.as_ref().expect("a tail was spooled");
            spool.read_at(&mut buf[..want], extent.tail_offset + (self.pos - full))?
        };
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Where the part of an inode's data that is not inline lives.
enum Spill {
    /// Nothing outside the inode (or file data already in the data area).
    None,
    /// Directory or symlink blocks written after the metadata area.
    Generated { first_block: u64 },
    /// File data copied after the metadata area because its tail could not be inlined.
    Relocated { first_block: u64, extent: Extent },
}

struct PlannedInode {
    id: NodeId,
    /// Byte offset from the start of the metadata area (nid = pos / 32).
    pos: u64,
    inode: Inode,
    /// Bytes of data stored right after the inode and its xattrs.
    inline_len: usize,
    spill: Spill,
}

struct Layout {
    inodes: Vec<PlannedInode>,
    /// nid of every node, by node index; `u64::MAX` for unreachable nodes.
    nids: Vec<u64>,
    /// Parent directory of every reachable directory, by node index.
    parents: Vec<NodeId>,
    build_time: Timestamp,
    meta_blkaddr: u64,
    extra_start: u64,
    total_blocks: u64,
    /// Data-area block ranges that no reachable file uses.
    dead: Vec<(u64, u64)>,
    relocated_files: u64,
}

impl Layout {
    fn plan(writer: &ImageWriter, tree: &Tree) -> Result<Layout> {
        // Breadth-first from the root, so the root gets nid 0 and siblings sit together.
        let node_count = tree.node_count();
        let mut order = vec![tree.root()];
        let mut slot = vec![u32::MAX; node_count];
        let mut parents = vec![tree.root(); node_count];
        let mut nlink = vec![2u32];
        slot[tree.root().0 as usize] = 0;
        let mut next = 0;
        while next < order.len() {
            let dir = order[next];
            next += 1;
            let Ok(children) = tree.children(dir) else {
                continue;
            };
            for &child in children.values() {
                let child_slot = &mut slot[child.0 as usize];
                let is_dir = matches!(tree.kind(child)?, NodeKind::Directory);
                if *child_slot == u32::MAX {
                    *child_slot = order.len() as u32;
                    order.push(child);
                    nlink.push(if is_dir { 2 } else { 0 });
                }
                if is_dir {
                    parents[child.0 as usize] = dir;
                    nlink[slot[dir.0 as usize] as usize] += 1;
                } else {
                    nlink[*child_slot as usize] += 1;
                }
            }
        }

        // Compact inodes take their mtime from the superblock: use the most common one.
        let mut mtimes: HashMap<Timestamp, usize> = HashMap::new();
        for &id in &order {
            *mtimes.entry(tree.metadata(id)?.mtime).or_default() += 1;
        }
        let build_time = mtimes
            .into_iter()
            .max_by_key(|&(t, n)| (n, std::cmp::Reverse(t)))
            .map(|(t, _)| t)
            .unwrap_or_default();

        let mut inodes = Vec::with_capacity(order.len());
        let mut pos = 0u64;
        let block = BLOCK_SIZE as usize;
        for (index, &id) in order.iter().enumerate() {
            let meta = tree.metadata(id)?;
            let kind = tree.kind(id)?;
            let (type_bits, size, tail_len, raw, extent) = match kind {
                NodeKind::File(data) => {
                    let extent = writer.extent(data)?;
                    if let Some(e) = &extent {
                        (
                            format::S_IFREG,
                            data.len,
                            e.tail_len as usize,
                            e.start_block,
                            extent,
                        )
                    } else {
                        (format::S_IFREG, 0, 0, 0, None)
                    }
                }
                NodeKind::Directory => {
                    let size = dir_size(tree, id)?;
                    (format::S_IFDIR, size, (size % BLOCK_SIZE) as usize, 0, None)
                }
                NodeKind::Symlink(target) => {
                    (format::S_IFLNK, target.len() as u64, target.len(), 0, None)
                }
                NodeKind::CharDevice { major, minor } => (
                    format::S_IFCHR,
                    0,
                    0,
                    u64::from(format::encode_rdev(*major, *minor)?),
                    None,
                ),
                NodeKind::BlockDevice { major, minor } => (
                    format::S_IFBLK,
                    0,
                    0,
                    u64::from(format::encode_rdev(*major, *minor)?),
                    None,
                ),
                NodeKind::Fifo => (format::S_IFIFO, 0, 0, 0, None),
                NodeKind::Socket => (format::S_IFSOCK, 0, 0, 0, None),
            };
            let xattr_body_size = format::xattr_body_size(&meta.xattrs)?;
            let nlink = nlink[index];
            let extended = meta.uid > 0xffff
                || meta.gid > 0xffff
                || nlink > 0xffff
                || size > u64::from(u32::MAX)
                || meta.mtime != build_time;
            let mut inode = Inode {
                extended,
                layout: format::LAYOUT_FLAT_PLAIN,
                xattr_body_size,
                mode: type_bits | meta.mode as u16,
                nlink,
                size,
                raw: raw as u32,
                ino: index as u32 + 1,
                uid: meta.uid,
                gid: meta.gid,
                mtime: meta.mtime,
            };
            let base = inode.size_on_disk() + xattr_body_size;
            let inline = tail_len > 0 && base + tail_len <= block;
            let record = if inline { base + tail_len } else { base };
            // Records never straddle a block (the kernel needs that for inline data),
            // except records larger than a block, which start one.
            pos = pos.next_multiple_of(format::INODE_SLOT);
            let offset_in_block = (pos % BLOCK_SIZE) as usize;
            if offset_in_block != 0 && offset_in_block + record > block {
                pos = pos.next_multiple_of(BLOCK_SIZE);
            }
            if inline {
                inode.layout = format::LAYOUT_FLAT_INLINE;
            }
            let spill = match (kind, extent) {
                (NodeKind::File(_), Some(extent)) if tail_len > 0 && !inline => Spill::Relocated {
                    first_block: 0,
                    extent,
                },
                (NodeKind::Directory | NodeKind::Symlink(_), _)
                    if size > 0 && !(inline && size < BLOCK_SIZE) =>
                {
                    Spill::Generated { first_block: 0 }
                }
                _ => Spill::None,
            };
            inodes.push(PlannedInode {
                id,
                pos,
                inode,
                inline_len: if inline { tail_len } else { 0 },
                spill,
            });
            pos += record as u64;
        }

        // Blocks after the metadata: directory and long symlink blocks, relocated files.
        let meta_blkaddr = writer.next_block;
        let extra_start = meta_blkaddr + pos.div_ceil(BLOCK_SIZE);
        let mut next_block = extra_start;
        let mut relocated_files = 0;
        for planned in &mut inodes {
            let size = planned.inode.size;
            let spilled = size - planned.inline_len as u64;
            match &mut planned.spill {
                Spill::None => {}
                Spill::Generated { first_block } => {
                    *first_block = next_block;
                    planned.inode.raw = next_block as u32;
                    next_block += spilled.div_ceil(BLOCK_SIZE);
                }
                Spill::Relocated { first_block, .. } => {
                    *first_block = next_block;
                    planned.inode.raw = next_block as u32;
                    next_block += size.div_ceil(BLOCK_SIZE);
                    relocated_files += 1;
                }
            }
            if next_block >= MAX_BLOCKS {
                return Err(Error::ImageTooLarge { max: MAX_BLOCKS });
            }
        }
        // Data-area extents that no inode reads in place are dead: unlinked files, and
        // files relocated above (unless another inode shares the same DataRef).
        let mut used_in_place = vec![false; writer.extents.len()];
        for planned in &inodes {
            if let (Spill::None, NodeKind::File(data)) = (&planned.spill, tree.kind(planned.id)?) {
                if !data.is_empty() {
                    used_in_place[data.extent as usize - 1] = true;
                }
            }
        }
        let dead = writer
            .extents
            .iter()
            .zip(used_in_place)
            .filter(|&(e, used)| !used && e.full_blocks > 0)
            .map(|(e, _)| (e.start_block, e.full_blocks))
            .collect();

        let mut nids = vec![u64::MAX; node_count];
        for planned in &inodes {
            nids[planned.id.0 as usize] = planned.pos / format::INODE_SLOT;
        }
        Ok(Layout {
            inodes,
            nids,
            parents,
            build_time,
            meta_blkaddr,
            extra_start,
            total_blocks: next_block,
            dead,
            relocated_files,
        })
    }

    fn write(&self, writer: &ImageWriter, tree: &Tree) -> Result<()> {
        let mut file = &writer.file;
        let meta_start = self.meta_blkaddr * BLOCK_SIZE;
        file.seek(SeekFrom::Start(meta_start))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut written = 0u64;
        let mut record = Vec::with_capacity(BLOCK_SIZE as usize);
        for planned in &self.inodes {
            write_zeros(&mut out, planned.pos - written)?;
            record.clear();
            planned.inode.write(&mut record);
            format::write_xattr_body(&mut record, &tree.metadata(planned.id)?.xattrs);
            if planned.inline_len > 0 {
                match tree.kind(planned.id)? {
                    NodeKind::File(data) => {
                        let extent = writer.extent(data)?.expect("non-empty file");
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
            &mut out,
            (self.extra_start - self.meta_blkaddr) * BLOCK_SIZE - written,
        )?;

        for planned in &self.inodes {
            let spilled = planned.inode.size - planned.inline_len as u64;
            let mut blocks = Vec::new();
            match (&planned.spill, tree.kind(planned.id)?) {
                (Spill::None, _) => continue,
                (Spill::Generated { .. }, NodeKind::Directory) => {
                    blocks = self.dir_content(tree, planned.id)?;
                    blocks.truncate(spilled as usize);
                }
                (Spill::Generated { .. }, NodeKind::Symlink(target)) => {
                    blocks.extend_from_slice(target)
                }
                (Spill::Relocated { extent, .. }, _) => {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut offset = extent.start_block * BLOCK_SIZE;
                    let mut left = extent.full_blocks * BLOCK_SIZE;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        writer.file.read_exact_at(&mut buf[..n], offset)?;
                        out.write_all(&buf[..n])?;
                        (offset, left) = (offset + n as u64, left - n as u64);
                    }
                    writer.read_tail(extent, &mut blocks)?;
                }
                (Spill::Generated { .. }, _) => {
                    unreachable!("only directories and symlinks generate blocks")
                }
            }
            let padded = blocks.len().next_multiple_of(BLOCK_SIZE as usize);
            blocks.resize(padded, 0);
            out.write_all(&blocks)?;
        }
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
fn punch_holes(file: &File, ranges: &[(u64, u64)]) -> Result<u64> {
    let mut punched = 0;
    for &(start, blocks) in ranges {
        let (offset, len) = (
            (start * BLOCK_SIZE) as libc::off_t,
            (blocks * BLOCK_SIZE) as libc::off_t,
        );
        // SAFETY: fallocate only reads its integer arguments; the fd is open for writing.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if rc != 0 {
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

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn appended_data_reads_back_and_is_block_aligned() {
        let mut writer =
            ImageWriter::new(tempfile::tempfile().unwrap(), ImageOptions::default()).unwrap();
        let mut refs = Vec::new();
        for len in [0, 1, 4095, 4096, 4097, 3 * 4096 + 5] {
            let data = pattern(len);
            refs.push((writer.append_data(&data[..], len as u64).unwrap(), data));
        }
        // Whole blocks only take data-area blocks: 0 + 0 + 0 + 1 + 1 + 3, after block 0.
        assert_eq!(writer.next_block, 1 + 5);
        for (data_ref, data) in &refs {
            let mut back = Vec::new();
            writer
                .read_data(data_ref)
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(&back, data, "len {}", data.len());
            assert_eq!(data_ref.len(), data.len() as u64);
        }
        let mut limited = Vec::new();
        writer
            .read_data(&refs[5].0)
            .unwrap()
            .take(10)
            .read_to_end(&mut limited)
            .unwrap();
        assert_eq!(limited, pattern(10));
    }

    #[test]
    fn empty_tree_is_a_root_directory() {
        let writer =
            ImageWriter::new(tempfile::tempfile().unwrap(), ImageOptions::default()).unwrap();
        let tree = Tree::new(crate::Metadata {
            mode: 0o755,
            ..Default::default()
        })
        .unwrap();
        let image = writer.finish(&tree).unwrap();
        assert_eq!(image.stats.inodes, 1);
        // Superblock block and one metadata block.
        assert_eq!(image.stats.blocks, 2);
        assert_eq!(image.file.metadata().unwrap().len(), 2 * BLOCK_SIZE);
    }
}
