//! kiln-rootfs turns the layers of an OCI image into one EROFS root image, and writes
//! the small identity image that holds the sandbox user and the supervisor layer that
//! holds OpenShell's supervisor binary.
//!
//! It runs as an ordinary user: no mounts, no root, no unpacked directory. Each layer
//! blob (plain, gzip or zstd tar) is decoded once, as a stream; file data goes straight
//! into the output image through [`kiln_erofs::ImageWriter`] while an in-memory tree of
//! metadata is resolved; the image's inodes and directories are written at the end.
//!
//! No existing crate applies OCI layers into an in-memory tree with OCI whiteout and
//! hardlink semantics without touching the host filesystem: the tar crates unpack onto
//! disk (following the host's view of symlinks), and umoci, containerd and Docker do the
//! same through the kernel. So the applier is ours; only tar header parsing comes from
//! the `tar` crate.
//!
//! # Layer rules (OCI image-spec layer.md)
//!
//! - Layers apply in order. Entry paths are cleaned lexically (`./`, `//`, leading `/`
//!   dropped, `..` stops at the root), then the parent directories are resolved inside
//!   the tree, following the image's own symlinks (`lib -> usr/lib` works, an absolute
//!   target restarts at the image root, `..` stops at the root, more than 40 symlinks is
//!   an error). The final component is never followed: an entry replaces a symlink, it
//!   never writes through it. Missing parents are created 0755 root:root.
//! - `.wh.NAME` removes NAME from the lower layers; `.wh..wh..opq` hides every lower
//!   child of its directory, wherever it appears in the layer. What the same layer
//!   created (and directories on the path of its entries) stays, as with umoci.
//!   Whiteouts resolve their directory like any entry, so a whiteout under a symlink
//!   acts on the symlink's target inside the image (as umoci, containerd and Docker do).
//!   Whiteout entries never appear in the output.
//! - An entry replaces whatever had its name, except that a directory over a directory
//!   only takes the new attributes. Hard links name nodes of the tree (their target path
//!   resolved like a parent path, the last component not followed): a link to a file
//!   that a later layer deletes or replaces keeps the content it had.
//! - PAX records (path, linkpath, size, uid, gid, mtime with nanoseconds,
//!   `SCHILY.xattr.*`), GNU long names and base-256 numbers are honoured. The xattrs
//!   `security.selinux`, `system.nfs4_acl` and `trusted.overlay.*` describe a host, not
//!   an image, and are dropped (as umoci drops the first two). Symlinks get mode 0777.
//! - Everything read from a layer is bounded by [`Limits`]; a violation is an
//!   [`Error::Layer`] naming the layer and the entry.
//!
//! # Dead data
//!
//! File data is appended to the image as it streams, before later layers are known.
//! Data of files that a later layer deletes or replaces is then unreachable, and
//! [`kiln_erofs::ImageWriter::finish`] punches it out of the image file
//! (`fallocate(PUNCH_HOLE)`). The cost: during the build the disk holds the data of
//! every layer at once, and the finished image is sparse (its length counts the holes,
//! its disk usage does not). The alternative, a first pass to resolve the tree, would
//! decode every layer twice.
//!
//! # Publishing
//!
//! [`build_root_image`] and [`build_identity_layer`] write to a temporary file in the
//! destination directory, check it with `fsck.erofs` and publish it by rename; a crash
//! leaves at most a temporary file, never a half-written image under the final name.
//! [`Cache`] keys root images by manifest digest and [`BUILDER_FORMAT_VERSION`], and
//! identity layers by root image, uid and gid, with a lock per key so that concurrent
//! builds of one key build once.

mod apply;
mod build;
mod cache;
mod check;
mod decode;
mod error;
mod identity;
mod resolve;
mod tarstream;

use std::io::Read;

use kiln_image::Compression;

pub use apply::{apply_layers, ApplyStats, RootTree};
pub use build::{
    build_identity_layer, build_root_image, build_supervisor_layer, fsck, BuildOptions,
    BuildReport, IdentityLayerReport, ImageSummary, SupervisorLayerReport, Timings,
};
pub use cache::{
    Cache, Cached, CachedImage, Removed, SupervisorLayer, BUILDER_FORMAT_VERSION,
    MAX_SUPERVISOR_BYTES,
};
pub use check::{check_image, check_layers, CheckInput, CheckReport, Finding, Severity};
pub use error::{EntryError, EntryName, Error, Result};
pub use identity::{AccountFile, IdentityInputs, IdentityReport, NodeAttributes, PathDir};
pub use resolve::MAX_SYMLINK_HOPS;

/// One layer blob to apply: its digest (for messages), compression (kiln-image reads it
/// from the layer's media type) and contents.
pub struct Layer<'a> {
    pub digest: String,
    pub compression: Compression,
    pub blob: Box<dyn Read + 'a>,
}

impl<'a> Layer<'a> {
    pub fn new(digest: impl Into<String>, compression: Compression, blob: impl Read + 'a) -> Self {
        Layer {
            digest: digest.into(),
            compression,
            blob: Box::new(blob),
        }
    }
}

/// Bounds on what the layers of one image may hold. The defaults accept the largest
/// common images with room to spare (an NGC PyTorch image expands to about 20 GB; a
/// full Debian desktop holds a few hundred thousand files; real layers compress 2 to 10
/// times) and stop hostile ones before they cost much disk: after the first 256 MiB, an
/// image may expand to at most 100 times the bytes downloaded, and never past 32 GiB.
/// `kiln build` and `kiln check` raise the three expansion limits for one image
/// (`--max-entries`, `--max-uncompressed`, `--max-compression-ratio`); a root image built
/// that way stays cached for later runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Tar entries over all layers.
    pub max_entries: u64,
    /// Directories between the root and any node.
    pub max_depth: usize,
    /// Bytes of an entry's path or link name.
    pub max_path_len: usize,
    /// Bytes of one xattr value (EROFS and Linux allow 65535).
    pub max_xattr_size: usize,
    /// Xattrs on one entry.
    pub max_xattrs: usize,
    /// Bytes of one PAX extended header.
    pub max_pax_header: u64,
    /// Decompressed bytes over all layers.
    pub max_uncompressed_bytes: u64,
    /// Decompressed / compressed size of the layers read so far, checked once they
    /// passed `ratio_grace_bytes` decompressed: bounds what the image writes by what was
    /// downloaded, however the bytes are spread over layers.
    pub max_compression_ratio: u64,
    pub ratio_grace_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1_000_000,
            max_depth: 1024,
            max_path_len: 4096,
            max_xattr_size: 65535,
            max_xattrs: 128,
            max_pax_header: 1 << 20,
            max_uncompressed_bytes: 32 << 30,
            max_compression_ratio: 100,
            ratio_grace_bytes: 256 << 20,
        }
    }
}
