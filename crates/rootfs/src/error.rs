//! The one error type of this crate, and what can be wrong with one layer entry.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building a root or identity image.
///
/// Image paths are hostile bytes: they are shown quoted with non-printable and non-ASCII
/// bytes escaped, so a message stays one readable line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A layer entry, or the tar stream around it, was rejected.
    #[error("layer {layer} ({digest}), {entry}: {reason}")]
    Layer {
        /// 1-based position of the layer in the manifest (bottom layer is 1).
        layer: usize,
        digest: String,
        entry: EntryName,
        reason: EntryError,
    },

    /// A layer media type this builder cannot decode.
    #[error("layer {layer} ({digest}): unsupported media type \"{media_type}\" (accepted: OCI or Docker layer tar, plain, +gzip or +zstd)")]
    MediaType {
        layer: usize,
        digest: String,
        media_type: String,
    },

    /// The EROFS writer refused the tree or could not write the image.
    #[error("writing EROFS image {}: {source}", .path.display())]
    Image {
        path: PathBuf,
        source: kiln_erofs::Error,
    },

    /// The EROFS writer refused a tree edit (identity files).
    #[error("EROFS tree: {0}")]
    Tree(#[from] kiln_erofs::Error),

    /// A file of the output or the cache could not be read or written.
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },

    /// `fsck.erofs` did not accept an image; nothing was published.
    #[error("fsck.erofs rejected {}: {output}", .path.display())]
    Fsck { path: PathBuf, output: String },

    /// An account file or directory of the image cannot be used for the identity layer.
    #[error("the image's {path}: {reason}")]
    Account { path: String, reason: String },

    /// kiln-identity rejected the account files or the ids.
    #[error(transparent)]
    Identity(#[from] kiln_identity::IdentityError),

    /// A cache directory or file that kiln may not trust, or cannot reach.
    #[error(transparent)]
    HostFile(#[from] kiln_hostfs::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Short for `Result<T, kiln_rootfs::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which tar entry an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryName {
    /// The entry with this path (as written in the layer).
    Path(Vec<u8>),
    /// The tar header following this entry (`None`: the first header of the layer),
    /// for errors found before the next entry's path is known.
    After(Option<Vec<u8>>),
}

impl EntryName {
    /// The entry's path, or the path of the entry the failing header follows.
    pub fn path(&self) -> Option<&[u8]> {
        match self {
            EntryName::Path(path) | EntryName::After(Some(path)) => Some(path),
            EntryName::After(None) => None,
        }
    }
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryName::Path(path) => write!(f, "entry {}", quote(path)),
            EntryName::After(Some(path)) => write!(f, "the tar header after entry {}", quote(path)),
            EntryName::After(None) => write!(f, "the first tar header"),
        }
    }
}

/// What is wrong with one layer entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("the path is {len} bytes long (limit {max})")]
    PathTooLong { len: usize, max: usize },
    #[error("the path is deeper than {max} directories (limit)")]
    TooDeep { max: usize },
    #[error("more than {max} symbolic links to follow (a loop?)")]
    SymlinkLoop { max: u32 },
    #[error("{} on its path is not a directory", quote(.component))]
    NotADirectory { component: Vec<u8> },
    #[error("it would replace the image root directory with a non-directory")]
    RootNotDirectory,
    #[error("invalid whiteout name (accepted: .wh.NAME with a valid NAME, or .wh..wh..opq)")]
    InvalidWhiteout,
    #[error("hard link target {} does not exist in the image (yet)", quote(.target))]
    HardlinkTargetMissing { target: Vec<u8> },
    #[error("hard link target {} is a directory", quote(.target))]
    HardlinkToDirectory { target: Vec<u8> },
    #[error("hard link without a target name")]
    HardlinkWithoutTarget,
    #[error("unsupported tar entry type {} (accepted: file, directory, symlink, hard link, char/block device, FIFO)", .0.escape_ascii())]
    UnsupportedType(u8),
    #[error(
        "more than {max} entries in the image (limit; `kiln build --max-entries N` raises it)"
    )]
    TooManyEntries { max: u64 },
    #[error("{count} extended attributes (limit {max})")]
    TooManyXattrs { count: usize, max: usize },
    #[error("extended attribute {} has a {size}-byte value (limit {max})", quote(.name))]
    XattrTooLarge {
        name: Vec<u8>,
        size: usize,
        max: usize,
    },
    #[error("{what} is {size} bytes (limit {max})")]
    HeaderTooLarge {
        what: &'static str,
        size: u64,
        max: u64,
    },
    #[error("invalid {field} {}", quote(.value))]
    BadNumber { field: &'static str, value: Vec<u8> },
    #[error("malformed tar stream: {0}")]
    Corrupt(String),
    #[error("the layers decompress to more than {max} bytes (limit; `kiln build --max-uncompressed SIZE` raises it)")]
    DecompressedTooLarge { max: u64 },
    #[error("the layers decompress to more than {max_ratio} times their compressed size (limit; `kiln build --max-compression-ratio N` raises it)")]
    RatioTooHigh { max_ratio: u64 },
    #[error("decompressing the layer failed: {0}")]
    Decompress(io::Error),
    #[error(transparent)]
    Image(#[from] kiln_erofs::Error),
}

/// Quotes possibly hostile bytes for a message.
pub(crate) fn quote(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}
