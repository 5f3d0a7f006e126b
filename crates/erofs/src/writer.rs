//! Streams file data into the image, then lays out and writes the metadata.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::format::{self, BLOCK_SIZE};
use crate::layout::{punch_holes, Layout};
use crate::tree::Tree;

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

/// What the caller may choose. The defaults (zero uuid and label) give reproducible
/// images: the same tree and data always produce the same bytes.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    pub uuid: [u8; 16],
    /// Volume label, NUL-padded.
    pub volume_name: [u8; 16],
    /// Where the unlinked temporary file holding short file tails is created until
    /// `finish` (at most 4 KiB per file); `None` means the system temporary directory.
    /// Point it at the output's directory to write nowhere else.
    pub spool_dir: Option<PathBuf>,
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
    /// Blocks of appended data that were all zeros, left as holes in the file.
    pub zero_blocks: u64,
    /// Files whose data had to be copied because their tail could not be inlined.
    pub relocated_files: u64,
}

/// The image file and what was written to it. The file is complete but not synced.
#[derive(Debug)]
pub struct FinishedImage {
    pub file: File,
    pub stats: ImageStats,
}

/// One appended file's data: `blocks` blocks in the data area from `start_block`, then
/// (when `spooled_tail` > 0) a partial last block in the tail spool until `finish`
/// decides where it goes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Extent {
    pub(crate) start_block: u64,
    pub(crate) blocks: u64,
    tail_offset: u64,
    pub(crate) spooled_tail: u64,
    len: u64,
}

impl Extent {
    /// Bytes of the file stored in the data area.
    fn in_place_len(&self) -> u64 {
        self.len - self.spooled_tail
    }
}

/// Longest partial last block held back for inlining: one that still fits beside an
/// extended inode with up to 128 bytes of xattrs (file capabilities, an SELinux label).
/// Longer tails go to the data area padded to a block (wasting under 192 bytes each),
/// so that a file is copied again in `finish` only when larger xattrs leave its tail no
/// room.
const MAX_INLINE_TAIL: u64 = BLOCK_SIZE - format::EXTENDED_INODE_SIZE as u64 - 128;

/// Writes one EROFS image. See the crate documentation for the protocol.
#[derive(Debug)]
pub struct ImageWriter {
    pub(crate) file: File,
    pub(crate) options: ImageOptions,
    id: u32,
    /// Next free block of the data area (block 0 holds the superblock).
    pub(crate) next_block: u64,
    pub(crate) extents: Vec<Extent>,
    /// Partial last blocks of appended files, packed back to back; created on first use.
    tail_spool: Option<File>,
    tail_spool_len: u64,
    /// Reused for every copy, so streaming allocates nothing per file.
    copy_buffer: Vec<u8>,
    /// Data-area blocks left unwritten because they were all zeros.
    zero_blocks: u64,
}

static NEXT_WRITER_ID: AtomicU32 = AtomicU32::new(1);

/// 2^32 blocks of 4 KiB: the reach of the on-disk 32-bit block addresses.
pub(crate) const MAX_BLOCKS: u64 = 1 << 32;

impl ImageWriter {
    /// Starts an image in `file`, which is truncated. The file must be open for reading
    /// and writing (`File::options().read(true).write(true)`, or a `tempfile` file):
    /// `finish` reads back some data. Write to a temporary file and rename it once
    /// [`finish`](Self::finish) returned to publish atomically.
    pub fn new(file: File, options: ImageOptions) -> Result<Self> {
        // SAFETY: F_GETFL only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error().into());
        }
        if flags & libc::O_ACCMODE != libc::O_RDWR {
            return Err(Error::NotReadWrite);
        }
        file.set_len(0)?;
        Ok(ImageWriter {
            file,
            options,
            id: NEXT_WRITER_ID.fetch_add(1, Ordering::Relaxed),
            next_block: 1,
            extents: Vec::new(),
            tail_spool: None,
            tail_spool_len: 0,
            copy_buffer: Vec::new(),
            zero_blocks: 0,
        })
    }

    /// Copies exactly `len` bytes from `reader` into the image and returns where they
    /// live. Whole 4 KiB blocks go straight to their final place in the image; a last
    /// partial block short enough to share a block with the inode is held (in an
    /// unlinked temporary file, not in memory) until [`finish`](Self::finish) packs it
    /// next to the file's inode.
    pub fn append_data(&mut self, mut reader: impl Read, len: u64) -> Result<DataRef> {
        if len == 0 {
            return Ok(DataRef::EMPTY);
        }
        let spooled_tail = match len % BLOCK_SIZE {
            tail if tail <= MAX_INLINE_TAIL => tail,
            _ => 0,
        };
        let blocks = (len - spooled_tail).div_ceil(BLOCK_SIZE);
        if self.next_block + blocks >= MAX_BLOCKS {
            return Err(Error::ImageTooLarge { max: MAX_BLOCKS });
        }
        let mut buffer = std::mem::take(&mut self.copy_buffer);
        buffer.resize(COPY_BUFFER_SIZE, 0);
        let extent = self.copy_in(&mut reader, len, spooled_tail, &mut buffer);
        self.copy_buffer = buffer;
        self.extents.push(extent?);
        self.next_block += blocks;
        Ok(DataRef {
            writer: self.id,
            extent: self.extents.len() as u32,
            len,
        })
    }

    /// Copies `len` bytes from `reader` (never reading past them): the last
    /// `spooled_tail` bytes to the tail spool, the rest to the data area at `next_block`.
    fn copy_in(
        &mut self,
        reader: &mut impl Read,
        len: u64,
        spooled_tail: u64,
        buffer: &mut [u8],
    ) -> Result<Extent> {
        let in_place_len = len - spooled_tail;
        let start = self.next_block * BLOCK_SIZE;
        let tail_offset = self.tail_spool_len;
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buffer.len() as u64) as usize;
            let got = read_up_to(reader, &mut buffer[..want])?;
            if got < want {
                return Err(Error::ShortData {
                    expected: len,
                    got: done + got as u64,
                });
            }
            // The buffer is a whole number of blocks, so only the last chunk has a tail.
            let to_image = (in_place_len.saturating_sub(done) as usize).min(got);
            self.zero_blocks += write_sparse_at(&self.file, &buffer[..to_image], start + done)?;
            if to_image < got {
                let spool = match &mut self.tail_spool {
                    Some(spool) => spool,
                    spool => spool.insert(match &self.options.spool_dir {
                        Some(dir) => tempfile::tempfile_in(dir)?,
                        None => tempfile::tempfile()?,
                    }),
                };
                spool.write_all_at(&buffer[to_image..got], tail_offset)?;
                self.tail_spool_len += (got - to_image) as u64;
            }
            done += got as u64;
        }
        Ok(Extent {
            start_block: self.next_block,
            blocks: in_place_len.div_ceil(BLOCK_SIZE),
            tail_offset,
            spooled_tail,
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

    /// Index of the extent behind a non-empty `DataRef` of this writer.
    pub(crate) fn extent_index(&self, data: &DataRef) -> Option<usize> {
        let index = (data.extent as usize).checked_sub(1)?;
        let extent = self.extents.get(index).filter(|_| data.writer == self.id)?;
        (extent.len == data.len).then_some(index)
    }

    /// The extent behind `data`, or None for an empty file.
    pub(crate) fn extent(&self, data: &DataRef) -> Result<Option<Extent>> {
        if *data == DataRef::EMPTY {
            return Ok(None);
        }
        let index = self.extent_index(data).ok_or(Error::ForeignDataRef)?;
        Ok(Some(self.extents[index]))
    }

    /// Appends the spooled partial last block of `extent` to `out`.
    pub(crate) fn read_tail(&self, extent: &Extent, out: &mut Vec<u8>) -> Result<()> {
        let start = out.len();
        out.resize(start + extent.spooled_tail as usize, 0);
        if extent.spooled_tail > 0 {
            let spool = self.tail_spool.as_ref().expect("a tail was spooled");
            spool.read_exact_at(&mut out[start..], extent.tail_offset)?;
        }
        Ok(())
    }

    /// Copies the data-area blocks of `extent` to `out`.
    pub(crate) fn copy_in_place_blocks(&self, extent: &Extent, out: &mut impl Write) -> Result<()> {
        let mut buffer = vec![0u8; COPY_BUFFER_SIZE];
        let mut offset = extent.start_block * BLOCK_SIZE;
        let end = offset + extent.blocks * BLOCK_SIZE;
        while offset < end {
            let n = (end - offset).min(buffer.len() as u64) as usize;
            self.file.read_exact_at(&mut buffer[..n], offset)?;
            out.write_all(&buffer[..n])?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Writes the inodes, directories and superblock for every node reachable from the
    /// root of `tree`, and reclaims appended data that no reachable file uses.
    ///
    /// The metadata goes after the data, so this writes O(nodes) bytes plus the data of
    /// files whose tail could not be inlined (rare: only when huge xattrs leave no room).
    pub fn finish(self, tree: &Tree) -> Result<FinishedImage> {
        let layout = Layout::plan(&self, tree)?;
        layout.write(&self, tree)?;
        let ImageWriter {
            file, zero_blocks, ..
        } = self;
        let reclaimed_blocks = punch_holes(&file, &layout.dead)?;
        let stats = ImageStats {
            blocks: layout.total_blocks,
            inodes: layout.inodes.len() as u64,
            extended_inodes: layout.inodes.iter().filter(|i| i.inode.extended).count() as u64,
            reclaimed_blocks,
            zero_blocks,
            relocated_files: layout.relocated_files,
        };
        tracing::debug!(?stats, "EROFS image written");
        Ok(FinishedImage { file, stats })
    }
}

const COPY_BUFFER_SIZE: usize = 256 << 10;

static ZERO_BLOCK: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];

/// Writes `data` at the block-aligned `offset`, skipping its blocks that are all zeros,
/// and returns how many it skipped. The data area is written once, into a file that
/// started empty, so a skipped block is a hole: it reads as zeros and takes no disk
/// space, which keeps a layer of zero-filled files from filling the host's disk.
fn write_sparse_at(file: &File, data: &[u8], offset: u64) -> io::Result<u64> {
    let block = BLOCK_SIZE as usize;
    let mut skipped = 0;
    // Start of the run of non-zero blocks not written yet.
    let mut run = 0;
    for (index, chunk) in data.chunks(block).enumerate() {
        // A slice comparison is a memcmp: fast even in a debug build.
        if chunk == &ZERO_BLOCK[..chunk.len()] {
            let at = index * block;
            file.write_all_at(&data[run..at], offset + run as u64)?;
            run = at + chunk.len();
            skipped += 1;
        }
    }
    file.write_all_at(&data[run..], offset + run as u64)?;
    Ok(skipped)
}

/// Reads until `buffer` is full or the reader ends; returns the bytes read.
fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buffer.len() {
        match reader.read(&mut buffer[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
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
        let full = extent.in_place_len();
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
        // Data-area blocks after block 0: whole blocks, plus a padded one for a tail too
        // long to hold back (4095): 0 + 0 + 1 + 1 + 1 + 3.
        assert_eq!(writer.next_block, 1 + 6);
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
