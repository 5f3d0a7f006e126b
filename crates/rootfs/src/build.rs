//! Building an image file: temporary file in the destination directory, `fsck.erofs`,
//! publish by rename.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_erofs::{ImageOptions, ImageStats, ImageWriter};
use serde::Serialize;
use tempfile::NamedTempFile;

use crate::apply::{apply_layers, ApplyStats};
use crate::error::{Error, Result};
use crate::identity::{identity_tree, write_identity, IdentityInputs, IdentityReport};
use crate::{Layer, Limits};

/// How to build a root image.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub limits: Limits,
    /// Bake the sandbox identity (uid, gid) into the root image (`--merged`).
    pub merged: Option<(u32, u32)>,
}

/// Where the time of a build went. Decoding and applying overlap (the layers stream),
/// so each stage counts only its own work.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timings {
    /// Decompressing the layers.
    pub decode: Duration,
    /// Tar headers, path resolution, whiteouts, tree edits.
    pub apply: Duration,
    /// File data into the image, then inodes, directories and superblock.
    pub write: Duration,
    /// `fsck.erofs`.
    pub verify: Duration,
}

/// The outcome of [`build_root_image`].
#[derive(Clone, Debug, Serialize)]
pub struct BuildReport {
    pub path: PathBuf,
    pub apply: ApplyStats,
    pub image: ImageSummary,
    pub timings: Timings,
    /// What a later identity layer needs from this root image.
    #[serde(skip)]
    pub identity_inputs: IdentityInputs,
    /// The identity baked in, for a merged image.
    pub identity: Option<IdentityReport>,
}

/// Figures about a written image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImageSummary {
    /// Image length in bytes (holes included).
    pub bytes: u64,
    pub inodes: u64,
    /// Blocks of data deleted or replaced by later layers, punched out of the file.
    pub reclaimed_blocks: u64,
}

impl From<&ImageStats> for ImageSummary {
    fn from(stats: &ImageStats) -> Self {
        ImageSummary {
            bytes: stats.blocks * kiln_erofs::BLOCK_SIZE,
            inodes: stats.inodes,
            reclaimed_blocks: stats.reclaimed_blocks,
        }
    }
}

/// The outcome of [`build_identity_layer`].
#[derive(Clone, Debug, Serialize)]
pub struct IdentityLayerReport {
    pub path: PathBuf,
    pub identity: IdentityReport,
    pub image: ImageSummary,
    pub timings: Timings,
}

/// Applies `layers` (bottom first) and writes the flattened EROFS image to `out`, which
/// appears only once the image is complete and `fsck.erofs` accepted it.
pub fn build_root_image<'a>(
    layers: impl IntoIterator<Item = Layer<'a>>,
    out: &Path,
    options: &BuildOptions,
) -> Result<BuildReport> {
    let (temp, writer) = start_image(out)?;
    let mut root = apply_layers(layers, writer, &options.limits)?;
    let identity_inputs = IdentityInputs::from_root(&root)?;
    let identity = match options.merged {
        // Only `kiln build --merged` bakes an identity in: kiln's own bounds.
        Some((uid, gid)) => Some(write_identity(
            &mut root.tree,
            &mut root.writer,
            &identity_inputs,
            uid,
            gid,
            kiln_identity::IdBounds::KILN,
        )?),
        None => None,
    };
    let apply = root.stats().clone();
    let start = Instant::now();
    let finished = root.finish().map_err(|source| Error::Image {
        path: out.to_owned(),
        source,
    })?;
    sync(&finished.file, out)?;
    let write = apply.write + start.elapsed();
    let verify = fsck_and_publish(temp, out)?;
    Ok(BuildReport {
        path: out.to_owned(),
        image: (&finished.stats).into(),
        timings: Timings {
            decode: apply.decode,
            apply: apply.apply,
            write,
            verify,
        },
        apply,
        identity_inputs,
        identity,
    })
}

/// Writes the identity image for `uid`/`gid` over the root image `inputs` describe:
/// the edited /etc/passwd, group, gshadow and shadow, and /sandbox owned by uid:gid, each
/// within `bounds`.
pub fn build_identity_layer(
    inputs: &IdentityInputs,
    uid: u32,
    gid: u32,
    bounds: kiln_identity::IdBounds,
    out: &Path,
) -> Result<IdentityLayerReport> {
    let (temp, mut writer) = start_image(out)?;
    let mut tree = identity_tree(inputs)?;
    let identity = write_identity(&mut tree, &mut writer, inputs, uid, gid, bounds)?;
    let start = Instant::now();
    let finished = writer.finish(&tree).map_err(|source| Error::Image {
        path: out.to_owned(),
        source,
    })?;
    sync(&finished.file, out)?;
    let write = identity.write + start.elapsed();
    let verify = fsck_and_publish(temp, out)?;
    Ok(IdentityLayerReport {
        path: out.to_owned(),
        identity,
        image: (&finished.stats).into(),
        timings: Timings {
            write,
            verify,
            ..Timings::default()
        },
    })
}

/// The outcome of [`build_supervisor_layer`].
#[derive(Clone, Debug, Serialize)]
pub struct SupervisorLayerReport {
    pub path: PathBuf,
    pub image: ImageSummary,
}

/// Hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: kiln_image::Hasher,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes the layer that holds OpenShell's supervisor: `binary` (`len` bytes) as
/// /opt/openshell/bin/openshell-sandbox, root:root 0755, and an empty
/// /opt/openshell/auth and /opt/openshell/tls, root:root 0700, for the tmpfs of the
/// sandbox token and of the gateway's TLS material. Directories are
/// root:root 0755 and every time is the epoch, so one binary always gives one image.
/// A binary whose bytes do not hash to `digest` (it changed since it was hashed) is an
/// error, and nothing is published.
pub fn build_supervisor_layer(
    binary: impl std::io::Read,
    len: u64,
    digest: &kiln_image::Digest,
    out: &Path,
) -> Result<SupervisorLayerReport> {
    use kiln_erofs::{Metadata, NodeKind, Tree};
    let image_error = |source| Error::Image {
        path: out.to_owned(),
        source,
    };
    let (temp, mut writer) = start_image(out)?;
    let mut hashing = HashingReader {
        inner: binary,
        hasher: kiln_image::Hasher::new(digest.algorithm()),
    };
    let data = writer.append_data(&mut hashing, len).map_err(image_error)?;
    let read = hashing.hasher.finish();
    if read != *digest {
        return Err(Error::io(
            format!("building {}", out.display()),
            std::io::Error::other(format!(
                "the supervisor binary changed while it was read (first {digest}, then {read})"
            )),
        ));
    }
    let mode = |mode| Metadata {
        mode,
        ..Metadata::default()
    };
    let mut tree = Tree::new(mode(0o755)).map_err(image_error)?;
    let opt = tree
        .add(tree.root(), b"opt", NodeKind::Directory, mode(0o755))
        .map_err(image_error)?;
    let openshell = tree
        .add(opt, b"openshell", NodeKind::Directory, mode(0o755))
        .map_err(image_error)?;
    let bin = tree
        .add(openshell, b"bin", NodeKind::Directory, mode(0o755))
        .map_err(image_error)?;
    tree.add(bin, b"openshell-sandbox", NodeKind::File(data), mode(0o755))
        .map_err(image_error)?;
    for dir in [&b"auth"[..], b"tls"] {
        tree.add(openshell, dir, NodeKind::Directory, mode(0o700))
            .map_err(image_error)?;
    }
    let finished = writer.finish(&tree).map_err(image_error)?;
    sync(&finished.file, out)?;
    fsck_and_publish(temp, out)?;
    Ok(SupervisorLayerReport {
        path: out.to_owned(),
        image: (&finished.stats).into(),
    })
}

/// A temporary file next to `out` (so the rename is atomic and nothing is written
/// elsewhere) and an image writer on it.
fn start_image(out: &Path) -> Result<(NamedTempFile, ImageWriter)> {
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{name}."))
        .tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating a temporary file in {}", dir.display()), e))?;
    let file = temp
        .as_file()
        .try_clone()
        .map_err(|e| Error::io("duplicating the image file handle", e))?;
    let options = ImageOptions {
        spool_dir: Some(dir.to_owned()),
        ..ImageOptions::default()
    };
    let writer = ImageWriter::new(file, options).map_err(|source| Error::Image {
        path: out.to_owned(),
        source,
    })?;
    Ok((temp, writer))
}

fn sync(file: &File, out: &Path) -> Result<()> {
    file.sync_all()
        .map_err(|e| Error::io(format!("syncing the image for {}", out.display()), e))
}

/// Checks the finished temporary image with `fsck.erofs`, then renames it to `out`.
/// Returns the time fsck took.
fn fsck_and_publish(temp: NamedTempFile, out: &Path) -> Result<Duration> {
    let start = Instant::now();
    fsck(temp.path())?;
    let verify = start.elapsed();
    // Owner-only, as every file kiln writes, whatever the umask.
    fs::set_permissions(temp.path(), fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", temp.path().display()), e))?;
    temp.persist(out)
        .map_err(|e| Error::io(format!("publishing {}", out.display()), e.error))?;
    Ok(verify)
}

/// Runs `fsck.erofs` (erofs-utils) on `path`.
pub fn fsck(path: &Path) -> Result<()> {
    let output = Command::new("fsck.erofs")
        .arg(path)
        .output()
        .map_err(|e| Error::io("running fsck.erofs (install erofs-utils)", e))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(Error::Fsck {
        path: path.to_owned(),
        output: text.trim().to_owned(),
    })
}
