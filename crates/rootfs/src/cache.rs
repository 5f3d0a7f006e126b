//! Built images kept under kiln's root directory, one directory per image manifest.
//!
//! Layout: `DIR/v{BUILDER_FORMAT_VERSION}/{algorithm}-{hex}/` holding `root.erofs`,
//! `root.identity.json` (the [`IdentityInputs`] of that root image), and
//! `identity-{uid}-{gid}.erofs` / `merged-{uid}-{gid}.erofs`. Each name is built under
//! an exclusive `flock` on `.lock-{name}`: a second process asking for the same image
//! waits and then reuses it. Images are published by rename after `fsck.erofs`, so a
//! killed build leaves only `.tmp-{name}.*` files, removed by the next build of that
//! name (which holds the lock, so no live build owns them).
//!
//! A cached image is booted as it is, so the cache trusts only what kiln wrote there
//! (kiln-hostfs): its directories must be private to the effective uid, lock files are
//! never followed through a symlink, and a cached file kiln did not write as it writes
//! them (another owner, or writable by others) is removed and built again; nothing records
//! an image's digest to check it against instead.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::build::{
    build_identity_layer, build_root_image, BuildOptions, BuildReport, IdentityLayerReport,
};
use crate::error::{Error, Result};
use crate::identity::IdentityInputs;
use crate::{Layer, Limits};

/// Bump when the builder's output for the same layers changes; old images are ignored.
pub const BUILDER_FORMAT_VERSION: u32 = 1;

const ROOT_IMAGE: &str = "root.erofs";
const ROOT_INPUTS: &str = "root.identity.json";

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

    /// The identity layer for (root image of `manifest_digest`, uid, gid).
    pub fn identity_layer(
        &self,
        manifest_digest: &str,
        inputs: &IdentityInputs,
        uid: u32,
        gid: u32,
    ) -> Result<Cached<IdentityLayerReport>> {
        let dir = self.key_dir(manifest_digest)?;
        let name = format!("identity-{uid}-{gid}.erofs");
        self.get_or_build(&dir, &name, |path| {
            build_identity_layer(inputs, uid, gid, path)
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
        self.get_or_build(&dir, &name, |path| {
            build_root_image(layers()?, path, &options)
        })
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
        let (algorithm, hex) = manifest_digest.split_once(':').unwrap_or(("", ""));
        let hex_len = match algorithm {
            "sha256" => 64,
            "sha512" => 128,
            _ => 0,
        };
        if hex_len == 0
            || hex.len() != hex_len
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::io(
                format!("image cache key {manifest_digest:?}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a manifest digest (accepted: sha256:<64 hex> or sha512:<128 hex>)",
                ),
            ));
        }
        let key =
            Path::new(&format!("v{BUILDER_FORMAT_VERSION}")).join(format!("{algorithm}-{hex}"));
        Ok(kiln_hostfs::private_dir(&self.dir, key)?)
    }
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
