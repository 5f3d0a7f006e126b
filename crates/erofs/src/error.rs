//! The one error type of this crate.

use std::io;

/// Everything that can go wrong while building an EROFS image.
///
/// Names and values taken from the caller are kept as raw bytes (image paths are not
/// necessarily UTF-8) and shown escaped in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading file data from the caller's reader or writing the image failed.
    #[error("EROFS image I/O failed: {0}")]
    Io(#[from] io::Error),

    /// The image file was not opened for both reading and writing.
    #[error("the EROFS image file must be opened for reading and writing")]
    NotReadWrite,

    /// The reader given to `append_data` ended before the announced length.
    #[error("file data ended after {got} bytes, {expected} bytes were announced")]
    ShortData { expected: u64, got: u64 },

    /// A directory entry name is not acceptable in EROFS (or any Linux filesystem).
    #[error("invalid file name \"{}\": {reason} (accepted: 1 to 255 bytes, no '/' or NUL, not \".\" or \"..\")", .name.escape_ascii())]
    InvalidName { name: Vec<u8>, reason: &'static str },

    /// The directory already has an entry with this name; unlink it first.
    #[error("\"{}\" already exists in the directory", .name.escape_ascii())]
    AlreadyExists { name: Vec<u8> },

    /// A child was added to, looked up in or unlinked from a node that is not a directory.
    #[error("node {0} is not a directory")]
    NotADirectory(u32),

    /// A node id that this tree never handed out.
    #[error("node {0} does not exist in this tree")]
    UnknownNode(u32),

    /// Directories cannot be hard-linked.
    #[error("cannot hard-link \"{}\" to a directory", .name.escape_ascii())]
    HardlinkToDirectory { name: Vec<u8> },

    /// Permission bits outside 0o7777 (the file type comes from the node kind).
    #[error("invalid permission bits {mode:#o} (accepted: 0 to 0o7777)")]
    InvalidMode { mode: u32 },

    /// Nanoseconds must be below one second.
    #[error("invalid timestamp: {nsec} nanoseconds (accepted: 0 to 999999999)")]
    InvalidTimestamp { nsec: u32 },

    /// An extended attribute name without a prefix EROFS can store, or a bad name length.
    #[error("unsupported xattr name \"{}\": {reason} (accepted: user.*, trusted.*, security.*, system.posix_acl_access, system.posix_acl_default; suffix 1..=255 bytes)", .name.escape_ascii())]
    InvalidXattrName { name: Vec<u8>, reason: &'static str },

    /// The same extended attribute name was given twice for one node.
    #[error("xattr \"{}\" is set twice on one node", .name.escape_ascii())]
    DuplicateXattr { name: Vec<u8> },

    /// One extended attribute value is larger than EROFS (and Linux) can hold.
    #[error("xattr \"{}\" has a {size}-byte value (max {max})", .name.escape_ascii())]
    XattrValueTooLarge {
        name: Vec<u8>,
        size: usize,
        max: usize,
    },

    /// All extended attributes of one node together exceed the per-inode limit.
    #[error("the xattrs of one node take {size} bytes on disk (max {max})")]
    XattrsTooLarge { size: usize, max: usize },

    /// A symlink target that is empty, contains NUL or exceeds the Linux path limit.
    #[error("invalid symlink target \"{}\": {reason} (accepted: 1 to 4095 bytes, no NUL)", .target.escape_ascii())]
    InvalidSymlinkTarget {
        target: Vec<u8>,
        reason: &'static str,
    },

    /// A device number that the 32-bit EROFS encoding cannot hold.
    #[error("device number {major}:{minor} out of range (major <= 4095, minor <= 1048575)")]
    InvalidDevice { major: u32, minor: u32 },

    /// A tree can hold at most 2^32 nodes (inode numbers are 32 bits).
    #[error("too many nodes in the tree (max 4294967295)")]
    TooManyNodes,

    /// A `DataRef` that was not returned by this writer.
    #[error("file data reference was not produced by this image writer")]
    ForeignDataRef,

    /// The image would exceed what 32-bit EROFS block addresses can reach (16 TiB).
    #[error("the image would need more than {max} blocks of 4096 bytes")]
    ImageTooLarge { max: u64 },
}

/// Short for `Result<T, kiln_erofs::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
