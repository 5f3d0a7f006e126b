//! kiln-image: gets an OCI image from wherever the user has it — a registry, an OCI image
//! layout, an `oci-archive` or a `docker-archive` tarball — into kiln's local content store,
//! verified, so later steps (the rootfs builder, the launcher) can trust what they read.
//!
//! - [`ImageRef::parse`] reads references in containers-transports(5) syntax.
//! - [`Store::open`] opens the content store under kiln's `--root`; [`Store::resolve`] finds
//!   a pulled image offline; [`Store::open_blob`] opens a verified blob.
//! - [`pull`] fetches an image (registry access through oci-client, formats through
//!   oci-spec) and returns a [`PulledImage`].
//! - [`OciImage`] is an image to write out: built from a config and layers, or taken from
//!   the store; [`write_oci_layout`] writes it as an OCI image layout, [`push`] uploads it
//!   to a registry with the same credential and plain-HTTP rules as a pull.
//!
//! Nothing unverified is ever visible in the store: every manifest, index, config and layer
//! is checked against its digest (sha256 or sha512) while it streams into a temp file, the
//! uncompressed digest of each layer against the config's `rootfs.diff_ids`, sizes against
//! descriptors and caps; only then is the blob published by rename. A per-blob `flock`
//! makes concurrent kiln processes download each blob once.
//!
//! [`pull`] is synchronous: it runs oci-client's async code on a tokio runtime of its own,
//! so callers need no runtime.

mod archive;
mod auth;
mod digest;
mod ingest;
mod layout;
mod media;
mod platform;
mod pull;
mod push;
mod reference;
mod source;
mod store;

pub use digest::{Algorithm, Digest, Hasher};
pub use layout::{is_tag, write_oci_layout, NewLayer, OciImage};
pub use media::Compression;
pub use platform::Platform;
pub use pull::{pull, LayerInfo, ProgressFn, PullEvent, PullOptions, PullPolicy, PulledImage};
pub use push::{push, PushOptions};
pub use reference::{DockerRef, ImageRef};
pub use store::{ImageRecord, PruneReport, Store};

/// Hard cap on manifests, indexes and configs (4 MiB, as containerd and Docker use).
pub const MAX_METADATA_SIZE: u64 = 4 << 20;
/// Default cap on one (compressed) layer blob: 8 GiB.
pub const DEFAULT_MAX_LAYER_SIZE: u64 = 8 << 30;
/// Cap on the uncompressed tar of one layer (64 GiB): ends decompression bombs.
pub const MAX_UNCOMPRESSED_LAYER_SIZE: u64 = 64 << 30;
/// Default number of parallel blob downloads.
pub const DEFAULT_MAX_CONCURRENT_DOWNLOADS: usize = 4;

/// Everything that can go wrong getting or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {input:?}: {part} {reason}")]
    InvalidReference {
        input: String,
        part: String,
        reason: String,
    },

    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest { input: String, reason: String },

    #[error("invalid platform {input:?}: {reason}")]
    InvalidPlatform { input: String, reason: String },

    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("{what}: uncompressed digest mismatch: config rootfs.diff_ids says {expected}, content is {actual}")]
    DiffIdMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("{what}: size {actual} exceeds {limit} bytes ({why})")]
    TooLarge {
        what: String,
        limit: u64,
        actual: u64,
        why: &'static str,
    },

    #[error("{what}: size mismatch: descriptor says {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    #[error("{what}: media type {media_type:?} is not supported; accepted: {accepted}")]
    UnsupportedMediaType {
        what: String,
        media_type: String,
        accepted: &'static str,
    },

    #[error("layer {digest} is a foreign layer (to be fetched from {urls:?}); refused without --allow-foreign-layers")]
    ForeignLayer { digest: Digest, urls: Vec<String> },

    #[error("no image for platform {wanted}; the index offers: {}", offered.join(", "))]
    NoMatchingPlatform {
        wanted: String,
        offered: Vec<String>,
    },

    #[error("image {reference} is not in the store{hint}")]
    NotInStore { reference: String, hint: String },

    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },

    #[error("registry {registry}: {reason}")]
    Registry { registry: String, reason: String },

    #[error("credentials for {registry}: {reason}")]
    Credentials { registry: String, reason: String },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },

    /// A directory or file under kiln's root that kiln may not trust, or cannot reach.
    #[error(transparent)]
    HostFile(#[from] kiln_hostfs::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// Whether the error comes from what the user typed (reference, platform, flags).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::InvalidReference { .. }
                | Error::InvalidPlatform { .. }
                | Error::InvalidDigest { .. }
        )
    }
}
