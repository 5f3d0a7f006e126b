//! Built images kept under kiln's root directory, one directory per image manifest.
//!
//! Layout: `DIR/v{BUILDER_FORMAT_VERSION}/{algorithm}-{hex}/` holding `root.erofs`,
//! `root.identity.json` (the [`IdentityInputs`] of that root image), and
//! `identity-{uid}-{gid}.erofs` / `merged-{uid}-{gid}.erofs`; and
//! `DIR/v{BUILDER_FORMAT_VERSION}/supervisors-2/sha256-{hex}.erofs`, the layer holding one
//! OpenShell supervisor binary (by its digest), shared by every sandbox that names that
//! binary and never evicted (one file per binary). Each name is built under an exclusive
//! `flock` on `.lock-{name}`: a second process asking for the same image
//! waits and then reuses it. Images are published by rename after `fsck.erofs`, so a
//! killed build leaves only `.tmp-{name}.*` files, removed by the next build of that
//! name (which holds the lock, so no live build owns them).
//!
//! The cache has no size of its own: the caller bounds it with [`Cache::evict`], which
//! removes the least recently used images (a key directory's mtime is set whenever its
//! root or merged image is looked up) except those it is told are pinned, and
//! [`Cache::retain`] removes the images of manifests that are gone. An image is removed
//! whole, and never while another process holds its root image's lock (to build it or
//! look it up).
//!
//! A cached image is booted as it is, so the cache trusts only what kiln wrote there
//! (kiln-hostfs): its directories must be private to the effective uid, lock files are
//! never followed through a symlink, and a cached file kiln did not write as it writes
//! them (another owner, or writable by others) is removed and built again; nothing records
//! an image's digest to check it against instead.

use std::collections::HashSet;
use std::fs::{self, File, TryLockError};
use std::io::{Read, Seek};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::build::{
    build_identity_layer, build_root_image, build_supervisor_layer, BuildOptions, BuildReport,
    IdentityLayerReport,
};
use crate::error::{Error, Result};
use crate::identity::IdentityInputs;
use crate::{Layer, Limits};

/// Bump when the builder's output for the same layers changes; old images are ignored.
pub const BUILDER_FORMAT_VERSION: u32 = 1;

const ROOT_IMAGE: &str = "root.erofs";
const ROOT_INPUTS: &str = "root.identity.json";
/// Prefix of a key directory being removed.
const REMOVING: &str = ".removing-";

/// The directory of supervisor layers, beside the key directories (not a manifest
/// digest, so eviction and retain never list it). Its number is the layers' layout: a
/// layer is named by the binary's digest alone, so a change to what a layer holds besides
/// the binary (layout 2 added /opt/openshell/tls) needs a new directory, not a rebuild of
/// every root image.
const SUPERVISORS: &str = "supervisors-2";

/// The largest supervisor binary [`Cache::supervisor_layer`] takes.
pub const MAX_SUPERVISOR_BYTES: u64 = 512 << 20;

/// A supervisor layer in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorLayer {
    /// `sha256:<hex>` of the binary in it.
    pub digest: String,
    pub path: PathBuf,
    /// This call built it (false: it was cached).
    pub built: bool,
}

fn supervisor_layer_name(digest: &kiln_image::Digest) -> String {
    format!("{}-{}.erofs", digest.algorithm().name(), digest.hex())
}

/// The cache of built images.
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
}

/// A cached image, and the build report when this call built it.
#[derive(Debug, Serialize)]
pub struct Cached<R> {
    pub path: PathBuf,
    pub built: Option<R>,
}

/// The images of one manifest in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedImage {
    pub manifest_digest: String,
    /// Disk space its files take (holes do not count).
    pub disk_bytes: u64,
    /// When its root or merged image was last looked up.
    pub last_used: SystemTime,
    dir: PathBuf,
}

/// What [`Cache::evict`] or [`Cache::retain`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Removed {
    /// Manifest digests whose images were removed.
    pub manifest_digests: Vec<String>,
    /// Disk space freed.
    pub bytes_freed: u64,
}

impl Cache {
    /// A cache in `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Cache { dir: dir.into() }
    }

    /// The root image of `manifest_digest`, built from `layers()` unless cached.
    pub fn root_image<'a>(
        &self,
        manifest_digest: &str,
        limits: &Limits,
        layers: impl FnOnce() -> Result<Vec<Layer<'a>>>,
    ) -> Result<(Cached<BuildReport>, IdentityInputs)> {
        let dir = self.key_dir(manifest_digest)?;
        let path = dir.join(ROOT_IMAGE);
        let inputs_path = dir.join(ROOT_INPUTS);
        let _lock = lock(&dir, ROOT_IMAGE)?;
        mark_used(&dir);
        match (keep_own(&path)?, keep_own(&inputs_path)?) {
            (true, true) => {
                let inputs = read_inputs(&inputs_path)?;
                return Ok((Cached { path, built: None }, inputs));
            }
            // Killed between publishing the image and its inputs: build again.
            (true, false) => remove(&path)?,
            (false, _) => {}
        }
        remove_stale_temps(&dir, ROOT_IMAGE)?;
        kiln_hostfs::remove_stale_temps(&dir)?;
        let options = BuildOptions {
            limits: limits.clone(),
            merged: None,
        };
        let report = build_root_image(layers()?, &path, &options)?;
        // The image counts as cached only once its inputs are published too.
        if let Err(err) = write_inputs(&inputs_path, &report.identity_inputs) {
            let _ = fs::remove_file(&path);
            return Err(err);
        }
        let inputs = report.identity_inputs.clone();
        Ok((
            Cached {
                path,
                built: Some(report),
            },
            inputs,
        ))
    }

    /// The identity layer for (root image of `manifest_digest`, uid, gid); ids outside
    /// `bounds` (the rules of whoever asks) are refused.
    pub fn identity_layer(
        &self,
        manifest_digest: &str,
        inputs: &IdentityInputs,
        uid: u32,
        gid: u32,
        bounds: kiln_identity::IdBounds,
    ) -> Result<Cached<IdentityLayerReport>> {
        let dir = self.key_dir(manifest_digest)?;
        let name = format!("identity-{uid}-{gid}.erofs");
        self.get_or_build(&dir, &name, |path| {
            build_identity_layer(inputs, uid, gid, bounds, path)
        })
    }

    /// One image with the identity baked in (`--merged`), built from `layers()`.
    pub fn merged_image<'a>(
        &self,
        manifest_digest: &str,
        limits: &Limits,
        uid: u32,
        gid: u32,
        layers: impl FnOnce() -> Result<Vec<Layer<'a>>>,
    ) -> Result<Cached<BuildReport>> {
        let dir = self.key_dir(manifest_digest)?;
        let name = format!("merged-{uid}-{gid}.erofs");
        let options = BuildOptions {
            limits: limits.clone(),
            merged: Some((uid, gid)),
        };
        mark_used(&dir);
        self.get_or_build(&dir, &name, |path| {
            build_root_image(layers()?, path, &options)
        })
    }

    /// The layer holding the OpenShell supervisor `binary` (a host path), keyed by the
    /// binary's sha256: built once per binary and shared by every sandbox, whatever its
    /// image. A binary over [`MAX_SUPERVISOR_BYTES`] is refused.
    pub fn supervisor_layer(&self, binary: &Path) -> Result<SupervisorLayer> {
        let context = |what: &str| format!("{what} the supervisor binary {}", binary.display());
        let mut file = File::open(binary).map_err(|e| Error::io(context("opening"), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(context("reading"), e))?
            .len();
        if len > MAX_SUPERVISOR_BYTES {
            return Err(Error::io(
                context("reading"),
                std::io::Error::other(format!(
                    "it is {len} bytes; at most {MAX_SUPERVISOR_BYTES} are accepted"
                )),
            ));
        }
        let mut hasher = kiln_image::Hasher::new(kiln_image::Algorithm::Sha256);
        std::io::copy(&mut (&mut file).take(len), &mut hasher)
            .and_then(|_| file.rewind())
            .map_err(|e| Error::io(context("hashing"), e))?;
        let digest = hasher.finish();
        let dir = kiln_hostfs::private_dir(&self.version_dir(), SUPERVISORS)?;
        let name = supervisor_layer_name(&digest);
        let cached = self.get_or_build(&dir, &name, |path| {
            build_supervisor_layer(file.take(len), len, &digest, path)
        })?;
        Ok(SupervisorLayer {
            digest: digest.to_string(),
            path: cached.path,
            built: cached.built.is_some(),
        })
    }

    /// The cached supervisor layer of the binary with sha256 `digest`, as
    /// [`Cache::supervisor_layer`] built it; an error when it is not there (or is not
    /// kiln's).
    pub fn supervisor_layer_of(&self, digest: &str) -> Result<PathBuf> {
        let parsed = kiln_image::Digest::parse(digest)
            .ok()
            .filter(|d| d.algorithm() == kiln_image::Algorithm::Sha256)
            .ok_or_else(|| {
                Error::io(
                    format!("supervisor layer {digest:?}"),
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "not a binary digest (accepted: sha256:<64 hex>)",
                    ),
                )
            })?;
        let dir = kiln_hostfs::private_dir(&self.version_dir(), SUPERVISORS)?;
        let path = dir.join(supervisor_layer_name(&parsed));
        if keep_own(&path)? {
            Ok(path)
        } else {
            Err(Error::io(
                format!("supervisor layer {}", path.display()),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not in the cache; create the sandbox again with its supervisor binary",
                ),
            ))
        }
    }

    fn get_or_build<R>(
        &self,
        dir: &Path,
        name: &str,
        build: impl FnOnce(&Path) -> Result<R>,
    ) -> Result<Cached<R>> {
        let path = dir.join(name);
        let _lock = lock(dir, name)?;
        if keep_own(&path)? {
            return Ok(Cached { path, built: None });
        }
        remove_stale_temps(dir, name)?;
        let report = build(&path)?;
        Ok(Cached {
            path,
            built: Some(report),
        })
    }

    /// `DIR/vN/ALGO-HEX`, created private (or refused when it is not); the digest is
    /// checked so it cannot name another path.
    fn key_dir(&self, manifest_digest: &str) -> Result<PathBuf> {
        if !is_manifest_digest(manifest_digest) {
            return Err(Error::io(
                format!("image cache key {manifest_digest:?}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a manifest digest (accepted: sha256:<64 hex> or sha512:<128 hex>)",
                ),
            ));
        }
        let key = Path::new(&format!("v{BUILDER_FORMAT_VERSION}"))
            .join(manifest_digest.replace(':', "-"));
        Ok(kiln_hostfs::private_dir(&self.dir, key)?)
    }

    fn version_dir(&self) -> PathBuf {
        self.dir.join(format!("v{BUILDER_FORMAT_VERSION}"))
    }

    /// Every manifest with images in the cache, least recently used first. Entries that
    /// are not a key directory are left out, and what a removal killed half-way left is
    /// removed.
    pub fn images(&self) -> Result<Vec<CachedImage>> {
        let version_dir = self.version_dir();
        let entries = match fs::read_dir(&version_dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(Error::io(format!("listing {}", version_dir.display()), err)),
        };
        let mut images = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io(format!("listing {}", version_dir.display()), e))?;
            let file_name = entry.file_name();
            let file_name = file_name.to_string_lossy();
            if file_name.starts_with(REMOVING) {
                // A removal that was killed half-way.
                let _ = fs::remove_dir_all(entry.path());
                continue;
            }
            let name = file_name.replacen('-', ":", 1);
            let meta = entry
                .metadata()
                .map_err(|e| Error::io(format!("reading {}", entry.path().display()), e))?;
            if !is_manifest_digest(&name) || !meta.is_dir() {
                continue;
            }
            images.push(CachedImage {
                manifest_digest: name,
                disk_bytes: disk_bytes(&entry.path())?,
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                dir: entry.path(),
            });
        }
        images.sort_by(|a, b| {
            (a.last_used, &a.manifest_digest).cmp(&(b.last_used, &b.manifest_digest))
        });
        Ok(images)
    }

    /// Removes the least recently used images, never those of a digest in `pinned`, until
    /// the cache takes at most `max_bytes` of disk (or only pinned and busy images are
    /// left).
    pub fn evict(&self, max_bytes: u64, pinned: &HashSet<String>) -> Result<Removed> {
        let images = self.images()?;
        let mut total: u64 = images.iter().map(|image| image.disk_bytes).sum();
        let mut removed = Removed::default();
        for image in images {
            if total <= max_bytes {
                break;
            }
            if pinned.contains(&image.manifest_digest) || !remove_image(&image)? {
                continue;
            }
            total -= image.disk_bytes;
            removed.bytes_freed += image.disk_bytes;
            removed.manifest_digests.push(image.manifest_digest);
        }
        Ok(removed)
    }

    /// Removes the images of every manifest digest that `keep` refuses.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Result<Removed> {
        let mut removed = Removed::default();
        for image in self.images()? {
            if keep(&image.manifest_digest) || !remove_image(&image)? {
                continue;
            }
            removed.bytes_freed += image.disk_bytes;
            removed.manifest_digests.push(image.manifest_digest);
        }
        Ok(removed)
    }
}

/// `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`.
fn is_manifest_digest(digest: &str) -> bool {
    let (algorithm, hex) = digest.split_once(':').unwrap_or(("", ""));
    let hex_len = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == hex_len
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Sets the mtime of a key directory, which says when its images were last used. A
/// failure only costs eviction order, so it is logged, not returned.
fn mark_used(dir: &Path) {
    let result = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .and_then(|dir| dir.set_modified(SystemTime::now()));
    if let Err(err) = result {
        tracing::warn!("marking {} as used: {err}", dir.display());
    }
}

/// Disk space taken by the files of a key directory.
fn disk_bytes(dir: &Path) -> Result<u64> {
    let entries =
        fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    let mut bytes = 0;
    for entry in entries.flatten() {
        if let Ok(meta) = entry.metadata() {
            bytes += meta.blocks() * 512;
        }
    }
    Ok(bytes)
}

/// Removes a key directory unless a build holds its root image's lock (then returns
/// false). The directory is first renamed to a dot name, which listings skip, so a
/// removal cut short leaves nothing that looks like an image.
fn remove_image(image: &CachedImage) -> Result<bool> {
    let lock_path = image.dir.join(format!(".lock-{ROOT_IMAGE}"));
    let lock = match File::options()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
    {
        Ok(file) => Some(file),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(Error::io(format!("opening {}", lock_path.display()), err)),
    };
    if let Some(lock) = &lock {
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(false),
            Err(TryLockError::Error(err)) => {
                return Err(Error::io(format!("locking {}", lock_path.display()), err))
            }
        }
    }
    let name = image.dir.file_name().unwrap_or_default().to_string_lossy();
    let doomed = image.dir.with_file_name(format!("{REMOVING}{name}"));
    // What a removal killed half-way left under the same name.
    let _ = fs::remove_dir_all(&doomed);
    fs::rename(&image.dir, &doomed)
        .and_then(|()| match fs::remove_dir_all(&doomed) {
            // A listing in another process cleared it first.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        })
        .map_err(|e| Error::io(format!("removing {}", image.dir.display()), e))?;
    tracing::info!("removed the cached images of {}", image.manifest_digest);
    Ok(true)
}

/// Whether `path` holds a file this cache wrote. Anything else there (another user's
/// file, one others could write, a symlink) is removed with a warning, to be built again.
fn keep_own(path: &Path) -> Result<bool> {
    match kiln_hostfs::open_own(path) {
        Ok(_) => Ok(true),
        Err(err) if err.is_not_found() => Ok(false),
        Err(kiln_hostfs::Error::Untrusted { reason, .. }) => {
            tracing::warn!("{}: {reason}; removed, to be built again", path.display());
            remove(path)?;
            Ok(false)
        }
        Err(err) => Err(err.into()),
    }
}

fn remove(path: &Path) -> Result<()> {
    fs::remove_file(path).map_err(|e| Error::io(format!("removing {}", path.display()), e))
}

/// Takes the exclusive lock of `name` in `dir`; released when the file is dropped. The
/// lock file is never followed through a symlink, and one that is not kiln's is refused.
fn lock(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(format!(".lock-{name}"));
    let file = kiln_hostfs::open_lock(&path)?;
    // A signal handled while waiting interrupts the wait; wait again.
    loop {
        match file.lock() {
            Ok(()) => return Ok(file),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(Error::io(format!("locking {}", path.display()), err)),
        }
    }
}

/// Removes what killed builds of `name` left (call with the lock of `name` held).
fn remove_stale_temps(dir: &Path, name: &str) -> Result<()> {
    let prefix = format!(".tmp-{name}.");
    let entries =
        fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn write_inputs(path: &Path, inputs: &IdentityInputs) -> Result<()> {
    let json = serde_json::to_vec(inputs)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e.into()))?;
    Ok(kiln_hostfs::write_file(path, &json)?)
}

fn read_inputs(path: &Path) -> Result<IdentityInputs> {
    let mut bytes = Vec::new();
    kiln_hostfs::open_own(path)?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::io(format!("parsing {}", path.display()), e.into()))
}
