//! The content store under kiln's `--root`:
//!
//! ```text
//! <root>/store/blobs/<alg>/<hex>        verified blobs, published by rename
//! <root>/store/blobs/<alg>/<hex>.lock   per-blob flock: one writer per blob across processes
//! <root>/store/blobs/<alg>/.tmp.<pid>.<n>.<name>   temp files of process <pid>
//! <root>/store/diffids/<alg>/<hex>      verified uncompressed digest of a layer blob
//! <root>/store/images/<key-hash>.json   one record per pulled reference and platform
//! <root>/store/gc.lock                  pulls hold it shared, prune exclusive
//! ```
//!
//! A blob is only ever renamed into place after its digest and size were checked, so a
//! reader never sees a partial or unverified blob; a kill -9 leaves at most temp files,
//! which [`Store::open`] removes once their process is gone.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::{Algorithm, Digest};
use crate::platform::Platform;
use crate::Error;

const TEMP_PREFIX: &str = ".tmp.";
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An open content store.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// One pulled image: a reference resolved (for one platform) to a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// Canonical reference, e.g. `docker://docker.io/library/busybox:latest`.
    pub reference: String,
    pub manifest_digest: Digest,
    /// The index the manifest was picked from, when there was one.
    pub index_digest: Option<Digest>,
    pub config_digest: Digest,
    pub platform: Platform,
    /// Bytes of manifest, config and layer blobs.
    pub size: u64,
    /// The config's `created` time, as the image states it.
    pub created: Option<String>,
    /// When kiln pulled it, seconds since the Unix epoch.
    pub pulled_at: u64,
}

impl ImageRecord {
    /// Every blob the image needs (layers come from the manifest, read by the caller).
    fn own_blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.manifest_digest, &self.config_digest]
            .into_iter()
            .chain(self.index_digest.as_ref())
    }
}

/// What [`Store::prune`] removed.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PruneReport {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
}

/// An exclusive per-blob or shared/exclusive store lock; released on drop.
#[derive(Debug)]
pub(crate) struct Lock {
    _file: File,
}

impl Store {
    /// Opens (creating) the store under `root` and removes temp files that processes which
    /// no longer run left behind.
    pub fn open(root: &Path) -> Result<Store, Error> {
        let dir = root.join("store");
        for sub in [
            "blobs/sha256",
            "blobs/sha512",
            "diffids/sha256",
            "diffids/sha512",
            "images",
        ] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(Error::io(format!("creating {}", path.display())))?;
        }
        let store = Store { dir };
        store.remove_stale_temps()?;
        Ok(store)
    }

    /// The store's directory (`<root>/store`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `digest` lives (it may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Opens a verified blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, Error> {
        File::open(self.blob_path(digest)).map_err(Error::io(format!("opening blob {digest}")))
    }

    /// Reads a whole blob of at most `cap` bytes (manifests, configs).
    pub(crate) fn read_blob(&self, digest: &Digest, cap: u64) -> Result<Vec<u8>, Error> {
        let mut bytes = Vec::new();
        self.open_blob(digest)?
            .take(cap + 1)
            .read_to_end(&mut bytes)
            .map_err(Error::io(format!("reading blob {digest}")))?;
        if bytes.len() as u64 > cap {
            return Err(Error::TooLarge {
                what: format!("blob {digest}"),
                limit: cap,
                actual: bytes.len() as u64,
                why: "manifest and config cap",
            });
        }
        Ok(bytes)
    }

    /// Stores already verified bytes as blob `digest`.
    pub(crate) fn put_verified(&self, digest: &Digest, bytes: &[u8]) -> Result<(), Error> {
        if self.has_blob(digest) {
            return Ok(());
        }
        let _lock = self.lock_blob(digest)?;
        if self.has_blob(digest) {
            return Ok(());
        }
        let mut temp = self.temp_file(digest.algorithm(), digest.hex())?;
        temp.file()
            .write_all(bytes)
            .map_err(Error::io(format!("writing blob {digest}")))?;
        temp.persist(&self.blob_path(digest))
    }

    /// Takes the exclusive lock of one blob, waiting for another writer to finish.
    pub(crate) fn lock_blob(&self, digest: &Digest) -> Result<Lock, Error> {
        let path = self.blob_path(digest).with_extension("lock");
        lock_file(&path, File::lock)
    }

    /// Pulls hold this shared; prune holds it exclusive so it never removes a blob that a
    /// pull has written but not yet recorded.
    pub(crate) fn lock_gc(&self, exclusive: bool) -> Result<Lock, Error> {
        let take: fn(&File) -> io::Result<()> = if exclusive {
            File::lock
        } else {
            File::lock_shared
        };
        lock_file(&self.dir.join("gc.lock"), take)
    }

    /// A temp file in the blob directory of `algorithm`, removed on drop unless persisted.
    pub(crate) fn temp_file(&self, algorithm: Algorithm, name: &str) -> Result<TempFile, Error> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join("blobs")
            .join(algorithm.name())
            .join(format!("{TEMP_PREFIX}{}.{n}.{name}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(Error::io(format!("creating temp file {}", path.display())))?;
        Ok(TempFile {
            file,
            path: Some(path),
        })
    }

    /// The verified uncompressed digest of layer blob `digest`, if one was recorded.
    pub(crate) fn diff_id(&self, digest: &Digest) -> Option<Digest> {
        let text = fs::read_to_string(self.diff_id_path(digest)).ok()?;
        Digest::parse(text.trim()).ok()
    }

    /// Records `diff_id` for `digest` (called under the blob's lock, before the blob is
    /// published, so a published layer always has it).
    pub(crate) fn record_diff_id(&self, digest: &Digest, diff_id: &Digest) -> Result<(), Error> {
        let mut temp = self.temp_file(digest.algorithm(), &format!("{}.diffid", digest.hex()))?;
        temp.file()
            .write_all(diff_id.to_string().as_bytes())
            .map_err(Error::io(format!("writing the diff id of {digest}")))?;
        temp.persist(&self.diff_id_path(digest))
    }

    fn diff_id_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("diffids")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    fn record_path(&self, reference: &str, platform: &Platform) -> PathBuf {
        let key = Digest::sha256_of(format!("{reference}\n{platform}").as_bytes());
        self.dir
            .join("images")
            .join(format!("{}.json", &key.hex()[..32]))
    }

    /// Records a pulled image (replacing an older record of the same reference and platform).
    pub(crate) fn put_record(&self, record: &ImageRecord) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(record).expect("image records serialize");
        let mut temp = self.temp_file(Algorithm::Sha256, "record")?;
        temp.file()
            .write_all(&json)
            .map_err(Error::io("writing an image record"))?;
        temp.persist(&self.record_path(&record.reference, &record.platform))
    }

    /// Every image record, sorted by reference then platform. Unreadable records are
    /// skipped with a warning.
    pub fn images(&self) -> Result<Vec<ImageRecord>, Error> {
        let dir = self.dir.join("images");
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(Error::io(format!("listing {}", dir.display())))? {
            let path = entry
                .map_err(Error::io(format!("listing {}", dir.display())))?
                .path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(record) => records.push(record),
                Err(e) => tracing::warn!("skipping image record {}: {e}", path.display()),
            }
        }
        records.sort_by(|a, b| {
            (&a.reference, a.platform.to_string()).cmp(&(&b.reference, b.platform.to_string()))
        });
        Ok(records)
    }

    /// The record for `reference`: for `platform` when given; else the host's platform, or
    /// the only record of that reference.
    pub fn find(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<Option<ImageRecord>, Error> {
        let candidates: Vec<ImageRecord> = self
            .images()?
            .into_iter()
            .filter(|r| r.reference == reference)
            .collect();
        let wanted = platform.cloned().unwrap_or_else(Platform::host);
        if let Some(found) = candidates.iter().find(|r| wanted.accepts(&r.platform)) {
            return Ok(Some(found.clone()));
        }
        Ok(match (platform, candidates.len()) {
            (None, 1) => candidates.into_iter().next(),
            _ => None,
        })
    }

    /// Removes the records of `reference` (all platforms, or just `platform`). Blobs stay
    /// until [`Store::prune`]. Returns how many records were removed.
    pub fn remove(&self, reference: &str, platform: Option<&Platform>) -> Result<usize, Error> {
        let mut removed = 0;
        for record in self.images()? {
            if record.reference == reference && platform.is_none_or(|p| p.accepts(&record.platform))
            {
                let path = self.record_path(&record.reference, &record.platform);
                fs::remove_file(&path)
                    .map_err(Error::io(format!("removing {}", path.display())))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes every blob that neither an image record of the store nor one of `pinned`
    /// (images that outlive their record, e.g. those sandboxes were created from) refers
    /// to, with its lock and diff id files.
    pub fn prune(&self, pinned: &[ImageRecord]) -> Result<PruneReport, Error> {
        let _gc = self.lock_gc(true)?;
        let mut keep = std::collections::HashSet::new();
        for record in self.images()?.into_iter().chain(pinned.iter().cloned()) {
            keep.extend(record.own_blobs().cloned());
            // A record whose manifest cannot be read keeps only what it names directly.
            if let Ok(bytes) = self.read_blob(&record.manifest_digest, crate::MAX_METADATA_SIZE) {
                if let Ok(manifest) = serde_json::from_slice::<LayerList>(&bytes) {
                    keep.extend(manifest.layers.into_iter().map(|l| l.digest));
                }
            }
        }
        let mut report = PruneReport::default();
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.dir.join("blobs").join(algorithm.name());
            let entries =
                fs::read_dir(&dir).map_err(Error::io(format!("listing {}", dir.display())))?;
            for entry in entries {
                let entry = entry.map_err(Error::io(format!("listing {}", dir.display())))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(digest) = Digest::parse(&format!("{}:{name}", algorithm.name())) else {
                    continue;
                };
                if keep.contains(&digest) {
                    continue;
                }
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path())
                    .map_err(Error::io(format!("removing blob {digest}")))?;
                let _ = fs::remove_file(self.diff_id_path(&digest));
                let _ = fs::remove_file(self.blob_path(&digest).with_extension("lock"));
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        Ok(report)
    }

    /// Removes `.tmp.<pid>.*` files whose process is gone (killed mid-write).
    fn remove_stale_temps(&self) -> Result<(), Error> {
        for algorithm in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.dir.join("blobs").join(algorithm.name());
            let entries =
                fs::read_dir(&dir).map_err(Error::io(format!("listing {}", dir.display())))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
                    continue;
                };
                let pid = rest.split('.').next().unwrap_or_default();
                let alive = pid
                    .parse::<u32>()
                    .is_ok_and(|pid| Path::new("/proc").join(pid.to_string()).exists());
                if !alive {
                    tracing::debug!("removing stale temp file {}", entry.path().display());
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// The layer digests of a manifest, as prune needs them.
#[derive(Deserialize)]
struct LayerList {
    #[serde(default)]
    layers: Vec<LayerDigest>,
}

#[derive(Deserialize)]
struct LayerDigest {
    digest: Digest,
}

/// Opens (creating) the lock file at `path` and waits for the flock that `take` asks for.
fn lock_file(path: &Path, take: fn(&File) -> io::Result<()>) -> Result<Lock, Error> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(Error::io(format!("opening lock {}", path.display())))?;
    take(&file).map_err(Error::io(format!("locking {}", path.display())))?;
    Ok(Lock { _file: file })
}

/// A temp file next to its final place; removed on drop unless persisted.
pub(crate) struct TempFile {
    file: File,
    path: Option<PathBuf>,
}

impl TempFile {
    pub(crate) fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// fsync, rename to `target`, fsync the target's directory.
    pub(crate) fn persist(mut self, target: &Path) -> Result<(), Error> {
        let path = self.path.take().expect("a temp file is persisted once");
        let result = (|| {
            self.file.sync_all()?;
            fs::rename(&path, target)?;
            File::open(target.parent().expect("store paths have parents"))?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&path);
        }
        result.map_err(Error::io(format!("publishing {}", target.display())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reference: &str, platform: &str, manifest: &Digest, config: &Digest) -> ImageRecord {
        ImageRecord {
            reference: reference.into(),
            manifest_digest: manifest.clone(),
            index_digest: None,
            config_digest: config.clone(),
            platform: Platform::parse(platform).unwrap(),
            size: 0,
            created: None,
            pulled_at: now(),
        }
    }

    #[test]
    fn blobs_records_and_prune() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let layer = Digest::sha256_of(b"layer");
        let config = Digest::sha256_of(b"{}");
        let manifest_bytes = format!(r#"{{"layers":[{{"digest":"{layer}"}}]}}"#);
        let manifest = Digest::sha256_of(manifest_bytes.as_bytes());
        let orphan = Digest::sha256_of(b"orphan");
        for (d, b) in [
            (&layer, &b"layer"[..]),
            (&config, b"{}"),
            (&manifest, manifest_bytes.as_bytes()),
            (&orphan, b"orphan"),
        ] {
            store.put_verified(d, b).unwrap();
        }
        assert_eq!(store.read_blob(&config, 10).unwrap(), b"{}");
        assert!(store.read_blob(&layer, 2).is_err());
        store
            .put_record(&record("oci:/x:1", "linux/amd64", &manifest, &config))
            .unwrap();
        store
            .put_record(&record("oci:/x:1", "linux/arm64/v8", &manifest, &config))
            .unwrap();
        assert_eq!(store.images().unwrap().len(), 2);
        let host = store.find("oci:/x:1", None).unwrap().unwrap();
        assert_eq!(host.platform, Platform::host());
        let arm = store
            .find("oci:/x:1", Some(&Platform::parse("linux/arm64").unwrap()))
            .unwrap();
        assert_eq!(arm.unwrap().platform.to_string(), "linux/arm64/v8");
        assert!(store.find("oci:/y", None).unwrap().is_none());

        let report = store.prune(&[]).unwrap();
        assert_eq!(
            report,
            PruneReport {
                blobs_removed: 1,
                bytes_freed: 6
            }
        );
        assert!(!store.has_blob(&orphan) && store.has_blob(&layer));
        let pinned = store.images().unwrap();
        assert_eq!(store.remove("oci:/x:1", None).unwrap(), 2);
        assert_eq!(store.prune(&pinned).unwrap().blobs_removed, 0);
        assert!(
            store.has_blob(&layer),
            "a pinned image keeps its blobs without its record"
        );
        assert_eq!(store.prune(&[]).unwrap().blobs_removed, 3);
        assert!(!store.has_blob(&layer));
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed_on_open() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let mine = store.temp_file(Algorithm::Sha256, "mine").unwrap();
        let mine_path = mine.path.clone().unwrap();
        // No process has pid 0x7fffffff (above pid_max).
        let dead = store.dir().join("blobs/sha256/.tmp.2147483647.0.dead");
        fs::write(&dead, b"partial").unwrap();
        Store::open(root.path()).unwrap();
        assert!(!dead.exists());
        assert!(mine_path.exists(), "a live process's temp file stays");
        drop(mine);
        assert!(!mine_path.exists());
    }
}
