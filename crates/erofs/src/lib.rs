//! kiln-erofs writes self-contained, uncompressed EROFS images in one pass.
//!
//! EROFS is the read-only Linux filesystem kiln's guests boot from. No Rust crate writes
//! self-contained EROFS images today (the existing ones read images, or write only the
//! metadata of composefs-style images whose file data lives elsewhere), and shelling out
//! to `mkfs.erofs` needs the whole tree unpacked on disk first. So this crate is ours. It
//! knows nothing of OCI: the caller decides what the tree holds.
//!
//! # Protocol
//!
//! 1. [`ImageWriter::new`] takes the output [`std::fs::File`], open for reading and
//!    writing, and truncates it. Write to a temporary file in the destination directory
//!    and rename it once `finish` returned to publish atomically (and `sync_all` first
//!    if the image must survive a crash).
//! 2. While the input streams, [`ImageWriter::append_data`] copies each regular file's
//!    contents into the image and returns a [`DataRef`]; [`ImageWriter::append_bytes`]
//!    does the same for contents in memory, and [`ImageWriter::read_data`] reads them
//!    back. Whole 4 KiB blocks land in their final place right away; a partial last
//!    block short enough to be inlined waits in an unlinked temporary file.
//! 3. Meanwhile the caller builds a [`Tree`]: directories, files (with their `DataRef`),
//!    symlinks, hard links ([`Tree::link`]), devices, FIFOs and sockets, each with
//!    [`Metadata`] (permission bits incl. setuid/setgid/sticky, 32-bit uid/gid, mtime
//!    with nanoseconds, xattrs). The tree holds metadata only, never file contents.
//!    Entries can be looked up, replaced, removed ([`Tree::unlink`]) or cleared
//!    ([`Tree::clear`]) at any time; a node's link count is the number of names that
//!    reach it from the root when `finish` runs.
//! 4. [`ImageWriter::finish`] writes inodes, directories and the superblock after the
//!    data, and returns the file with [`ImageStats`].
//!
//! Every input is validated where it enters ([`Tree::add`], [`Tree::set_metadata`], ...)
//! and rejected with a typed [`Error`]: names (empty, ".", "..", '/', NUL, over 255
//! bytes), xattr names without an EROFS prefix, oversized xattrs, symlink targets, device
//! numbers, permission bits. A reader that ends early is [`Error::ShortData`]; the writer
//! never reads past the announced length, so it can consume an archive stream.
//!
//! # Image layout
//!
//! Block size 4096. Block 0 holds the superblock (with its crc32c checksum,
//! `EROFS_FEATURE_COMPAT_SB_CHKSUM`), blocks 1.. the appended file data in append order,
//! then the metadata area (`meta_blkaddr`) with the root inode first (nid 1: the kernel
//! uses nids as inode numbers, and 0 is none), then directory blocks and symlink targets
//! that do not fit next to their inode. The output is a function of the tree and the
//! data only (no clock, no randomness).
//!
//! - Inodes are compact (32 bytes) when uid, gid and nlink fit 16 bits, the size fits 32
//!   bits and the mtime equals the superblock build time, which is set to the most
//!   common mtime of the tree; otherwise extended (64 bytes). Every mtime is kept to the
//!   nanosecond.
//! - Regular files, directories and symlinks use `FLAT_INLINE` tail packing when the
//!   partial last block fits in one metadata block with the inode and its xattrs, and
//!   `FLAT_PLAIN` otherwise. Inode records are packed best-fit into metadata blocks, so
//!   images come out about as small as `mkfs.erofs` makes them. File tails longer than
//!   3904 bytes are written padded in place while streaming; a held-back tail that
//!   turns out not to fit (only with more than 128 bytes of xattrs) makes `finish` copy
//!   that file after the metadata ([`ImageStats::relocated_files`]).
//! - Xattrs are stored inline per inode (no shared xattr table) with the EROFS name
//!   prefixes `user.`, `trusted.`, `security.`, `system.posix_acl_access` and
//!   `system.posix_acl_default`; values up to 64 KiB - 1, 256 KiB per inode. Note that
//!   Linux shows `user.*` xattrs only on regular files and directories.
//! - Directories of any size: entries (with "." and "..") sorted by name bytes, packed
//!   into as many blocks as needed.
//!
//! # Reclaiming dead data
//!
//! Data appended for a file that is no longer reachable from the root when `finish`
//! runs (for example deleted by a later layer) is punched out of the image file with
//! `fallocate(PUNCH_HOLE)`: the image keeps its length but those blocks take no disk
//! space. The cost is one syscall per dead extent and no copying; the price is a sparse
//! file (copy it with `cp --sparse=always` or similar to keep it small). On filesystems
//! that cannot punch holes the dead data stays, unreferenced.
//!
//! # Zero blocks
//!
//! Whole blocks of file data that are all zeros are not written: the image file starts
//! empty and the data area is written once, so they stay holes that read as zeros and
//! take no disk space ([`ImageStats::zero_blocks`]). A layer holding a gigabyte of
//! zeros (a few kilobytes compressed) thus costs kilobytes on the host's disk too; the
//! image's contents, and its length, are the same as with the zeros written.
//!
//! # Example
//!
//! ```
//! use kiln_erofs::{ImageOptions, ImageWriter, Metadata, NodeKind, Tree};
//!
//! # fn main() -> Result<(), kiln_erofs::Error> {
//! let file = tempfile::tempfile()?;
//! let mut writer = ImageWriter::new(file, ImageOptions::default())?;
//! let dir = Metadata { mode: 0o755, ..Metadata::default() };
//! let mut tree = Tree::new(dir.clone())?;
//! let etc = tree.add(tree.root(), b"etc", NodeKind::Directory, dir)?;
//! let data = writer.append_bytes(b"root:x:0:0::/root:/bin/sh\n")?;
//! let file = Metadata { mode: 0o644, ..Metadata::default() };
//! tree.add(etc, b"passwd", NodeKind::File(data), file)?;
//! let image = writer.finish(&tree)?;
//! assert_eq!(image.stats.inodes, 3);
//! # Ok(())
//! # }
//! ```

mod error;
mod format;
mod layout;
mod tree;
mod writer;

pub use error::{Error, Result};
pub use tree::{validate_name, Metadata, NodeId, NodeKind, Timestamp, Tree, Xattr};
pub use writer::{DataReader, DataRef, FinishedImage, ImageOptions, ImageStats, ImageWriter};

/// Identifies how this crate lays images out: bumped whenever the same tree and data
/// would produce different bytes, so callers can put it in their cache keys.
pub const LAYOUT_VERSION: u32 = 2;

/// Block size of every image this crate writes.
pub const BLOCK_SIZE: u64 = format::BLOCK_SIZE;
/// Longest directory entry name, in bytes.
pub const NAME_LEN: usize = format::NAME_LEN;
