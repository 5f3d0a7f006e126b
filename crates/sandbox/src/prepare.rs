//! Getting the images a sandbox boots from: the pulled image (kiln-image), its root image
//! and the identity layer for the sandbox's uid/gid (kiln-rootfs), built or reused.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_identity::IdBounds;
use kiln_image::{ImageRecord, ImageRef, PullOptions, PulledImage, Store};
use kiln_rootfs::{Cache, Layer, Limits, Removed};

use crate::error::{Error, ErrorKind};
use crate::request::DEFAULT_ROOTFS_CACHE_MAX;
use crate::state::{SandboxDir, SandboxRecord, StateError, RECORD_FILE};

/// Why the images could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Image(#[from] kiln_image::Error),
    #[error(transparent)]
    Build(#[from] kiln_rootfs::Error),
    #[error("sandbox {id}: the image it was created from ({digest}) is no longer in the store ({reason}); pull that digest again or remove the sandbox")]
    ImageGone {
        id: String,
        digest: String,
        reason: String,
    },
}

impl From<PrepareError> for Error {
    fn from(err: PrepareError) -> Self {
        let kind = match &err {
            PrepareError::Image(image) if image.is_usage() => ErrorKind::InvalidInput,
            PrepareError::ImageGone { .. } => ErrorKind::FailedPrecondition,
            PrepareError::Image(_) | PrepareError::Build(_) => ErrorKind::Internal,
        };
        Error::new(kind, err)
    }
}

/// The images of one sandbox, ready to boot.
#[derive(Debug)]
pub struct PreparedImages {
    pub image: PulledImage,
    pub root_image: PathBuf,
    pub identity_layer: PathBuf,
    /// The layer holding OpenShell's supervisor, for a sandbox that runs it.
    pub supervisor_layer: Option<PathBuf>,
    /// True when this call built the root image (false: it was cached).
    pub root_built: bool,
    /// Warnings from writing the sandbox user (e.g. another user owns the uid).
    pub warnings: Vec<String>,
    /// Resolving and pulling the image.
    pub pull_time: Duration,
}

/// Where kiln-rootfs keeps built images under kiln's root.
pub fn image_cache(root: &Path) -> Cache {
    Cache::new(root.join("rootfs"))
}

/// The images the sandboxes under `root` are pinned to. A sandbox being created or
/// removed right now has no record to pin anything yet.
pub fn sandbox_images(root: &Path) -> Result<Vec<ImageRecord>, StateError> {
    let mut pinned = Vec::new();
    for id in SandboxDir::list(root)? {
        if let Ok(record) =
            SandboxDir::open(root, &id).and_then(|dir| dir.read_json::<SandboxRecord>(RECORD_FILE))
        {
            pinned.push(record.image);
        }
    }
    Ok(pinned)
}

/// Removes the least recently used built images under `root` until they take at most
/// `max_bytes` of disk (`None`: [`DEFAULT_ROOTFS_CACHE_MAX`]), sparing those of `in_use`
/// and of every image a sandbox is pinned to.
pub fn trim_image_cache(
    root: &Path,
    max_bytes: Option<u64>,
    in_use: &str,
) -> Result<Removed, Error> {
    let max_bytes = max_bytes.unwrap_or(DEFAULT_ROOTFS_CACHE_MAX);
    let mut pinned: HashSet<String> = sandbox_images(root)?
        .into_iter()
        .map(|image| image.manifest_digest.to_string())
        .collect();
    pinned.insert(in_use.to_owned());
    Ok(image_cache(root)
        .evict(max_bytes, &pinned)
        .map_err(PrepareError::from)?)
}

/// Pulls `reference` as `options` say and builds or reuses its root image and the
/// identity layer for `uid`:`gid`, then trims the image cache to `cache_max` bytes.
pub fn prepare_images(
    root: &Path,
    reference: &ImageRef,
    options: &PullOptions,
    uid: u32,
    gid: u32,
    cache_max: u64,
) -> Result<PreparedImages, PrepareError> {
    let started = Instant::now();
    let store = Store::open(root)?;
    let image = kiln_image::pull(&store, reference, options)?;
    let pull_time = started.elapsed();
    let ids = (uid, gid, IdBounds::KILN);
    let prepared = build_images(root, &store, image, ids, Some(cache_max), &|_| {})?;
    Ok(PreparedImages {
        pull_time,
        ..prepared
    })
}

/// A build step about to run, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStep {
    /// The root image is not cached and is being built.
    RootImage,
    /// The identity layer is being built or found.
    IdentityLayer,
}

/// Builds or reuses the root image of `image` (already in `store`) and the identity layer
/// for `ids` (uid, gid and the bounds they were checked against), then trims the image cache to `cache_max` bytes if given (a failure
/// to trim is a warning); `step` hears of each step before it runs.
pub fn build_images(
    root: &Path,
    store: &Store,
    image: PulledImage,
    (uid, gid, bounds): (u32, u32, IdBounds),
    cache_max: Option<u64>,
    step: &dyn Fn(BuildStep),
) -> Result<PreparedImages, PrepareError> {
    let digest = image.record.manifest_digest.to_string();
    let cache = image_cache(root);
    let (root_image, inputs) = cache.root_image(&digest, &Limits::default(), || {
        step(BuildStep::RootImage);
        open_layers(store, &image)
    })?;
    step(BuildStep::IdentityLayer);
    let identity = cache.identity_layer(&digest, &inputs, uid, gid, bounds)?;
    let mut warnings = identity
        .built
        .as_ref()
        .map(|r| r.identity.warnings.clone())
        .unwrap_or_default();
    if let Some(max_bytes) = cache_max {
        if let Err(err) = trim_image_cache(root, Some(max_bytes), &digest) {
            warnings.push(format!("the image cache was not trimmed: {err}"));
        }
    }
    Ok(PreparedImages {
        root_built: root_image.built.is_some(),
        root_image: root_image.path,
        identity_layer: identity.path,
        supervisor_layer: None,
        image,
        warnings,
        pull_time: Duration::ZERO,
    })
}

/// The images `record` pins, rebuilt from the store by digest when their cache is gone;
/// never resolves the reference again. Its supervisor layer (if any) must be cached: kiln
/// keeps no copy of the binary to build it again from. `step` hears of each build step before it runs.
/// The cache is not trimmed: its limit is a setting of the commands that add images.
pub fn pinned_images(
    root: &Path,
    record: &SandboxRecord,
    step: &dyn Fn(BuildStep),
) -> Result<PreparedImages, PrepareError> {
    let store = Store::open(root)?;
    let image = store
        .load(record.image.clone())
        .map_err(|source| PrepareError::ImageGone {
            id: record.id.clone(),
            digest: record.image.manifest_digest.to_string(),
            reason: source.to_string(),
        })?;
    // The record's ids passed its front end's bounds at create: the widest any of kiln's
    // front ends admits lets them through again.
    let ids = (record.sandbox_uid, record.sandbox_gid, IdBounds::OPENSHELL);
    let prepared = build_images(root, &store, image, ids, None, step)?;
    let supervisor_layer = match &record.openshell {
        Some(openshell) => {
            Some(image_cache(root).supervisor_layer_of(&openshell.supervisor_digest)?)
        }
        None => None,
    };
    Ok(PreparedImages {
        supervisor_layer,
        ..prepared
    })
}

/// Opens the stored blob of every layer of `image`, bottom first, for kiln-rootfs.
pub fn open_layers<'a>(store: &Store, image: &PulledImage) -> kiln_rootfs::Result<Vec<Layer<'a>>> {
    image
        .layers
        .iter()
        .map(|layer| {
            let file: File =
                store
                    .open_blob(&layer.digest)
                    .map_err(|e| kiln_rootfs::Error::Io {
                        context: format!("opening layer {}", layer.digest),
                        source: std::io::Error::other(e),
                    })?;
            Ok(Layer::new(
                layer.digest.to_string(),
                layer.compression,
                file,
            ))
        })
        .collect()
}
