//! The content store under kiln's `--root`:
//!
//! ```text
//! <root>/store/blobs/<alg>/<hex>        verified blobs, published by rename
//! <root>/store/blobs/<alg>/<hex>.lock   per-blob flock: one writer per blob across processes
//! <root>/store/*/.<name>.<pid>.<n>.tmp  temp files of process <pid>
//! <root>/store/diffids/<alg>/<hex>      verified uncompressed digest of a layer blob
//! <root>/store/images/<key-hash>.json   one record per pulled reference and platform
//! <root>/store/gc.lock                  pulls hold it shared, prune exclusive
//! ```
//!
//! A blob is only ever renamed into place after its digest and size were checked, so a
//! reader never sees a partial or unverified blob; a kill -9 leaves at most temp files,
//! which [`Store::open`] removes once their process is gone.
//!
//! The store trusts only what kiln itself wrote there (kiln-hostfs): its directories must
//! be private to the effective uid, and its files are written 0600. A blob file that is
//! not kiln's own (another owner, or writable by others, as a store once shared or written
//! under `umask 000` leaves them) is hashed again and replaced by a verified copy, or
//! removed; such a record or diff id is ignored.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_hostfs::TempFile;
use serde::{Deserialize, Serialize};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::platform::Platform;
use crate::Error;

/// The directories of the store, under `<root>/store`.
const DIRS: [&str; 5] = [
    "blobs/sha256",
    "blobs/sha512",
    "diffids/sha256",
    "diffids/sha512",
    "images",
];

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
    /// Opens (creating) the store under `root`, refusing it unless `root` and the store's
    /// directories are private to this user (kiln-hostfs's `private_dir`), and removes
    /// temp files that processes which no longer run left behind.
    pub fn open(root: &Path) -> Result<Store, Error> {
        let dir = kiln_hostfs::private_dir(root, "store")?;
        for sub in DIRS {
            kiln_hostfs::remove_stale_temps(&kiln_hostfs::private_dir(&dir, sub)?)?;
        }
        Ok(Store { dir })
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

    /// Whether blob `digest` is in the store, as kiln wrote it or verified again.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, Error> {
        match kiln_hostfs::open_own(&self.blob_path(digest)) {
            Ok(_) => Ok(true),
            Err(err) if err.is_not_found() => Ok(false),
            Err(kiln_hostfs::Error::Untrusted { reason, .. }) => self.verify_again(digest, &reason),
            Err(err) => Err(err.into()),
        }
    }

    /// Whether blob `digest` is in the store as kiln wrote it; anything else at its place
    /// counts as absent. For callers holding the blob's lock, who then write the blob anew
    /// over whatever is there.
    pub(crate) fn has_own_blob(&self, digest: &Digest) -> Result<bool, Error> {
        match kiln_hostfs::open_own(&self.blob_path(digest)) {
            Ok(_) => Ok(true),
            Err(err) if err.is_not_found() => Ok(false),
            Err(kiln_hostfs::Error::Untrusted { .. }) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Opens a verified blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, Error> {
        let path = self.blob_path(digest);
        let missing = || {
            Error::io(format!("opening blob {digest}"))(io::Error::from(io::ErrorKind::NotFound))
        };
        match kiln_hostfs::open_own(&path) {
            Ok(file) => Ok(file),
            Err(kiln_hostfs::Error::Untrusted { reason, .. }) => {
                if self.verify_again(digest, &reason)? {
                    Ok(kiln_hostfs::open_own(&path)?)
                } else {
                    Err(missing())
                }
            }
            Err(err) if err.is_not_found() => Err(missing()),
            Err(err) => Err(err.into()),
        }
    }

    /// A blob file kiln did not write as it writes them (`why`) may have been changed by
    /// whoever could write it: it is hashed while copied into a file of kiln's own, which
    /// replaces it when the digest matches; otherwise it is removed. Returns whether the
    /// blob is now in the store. Takes the blob's lock: never call it holding that lock.
    fn verify_again(&self, digest: &Digest, why: &str) -> Result<bool, Error> {
        let _lock = self.lock_blob(digest)?;
        let path = self.blob_path(digest);
        // Another process may have settled it while this one waited for the lock.
        match kiln_hostfs::open_own(&path) {
            Ok(_) => return Ok(true),
            Err(err) if err.is_not_found() => return Ok(false),
            Err(kiln_hostfs::Error::Untrusted { .. }) => {}
            Err(err) => return Err(err.into()),
        }
        let context = || format!("verifying blob {digest} again");
        let meta = fs::symlink_metadata(&path).map_err(Error::io(context()))?;
        if meta.is_file() {
            let source = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(Error::io(context()))?;
            let mut temp = self.temp_blob(digest)?;
            // At most the size it had when looked at: its owner may still be appending.
            let mut source = source.take(meta.len());
            let mut hasher = Hasher::new(digest.algorithm());
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = source.read(&mut buf).map_err(Error::io(context()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                temp.file()
                    .write_all(&buf[..n])
                    .map_err(Error::io(context()))?;
            }
            if hasher.finish() == *digest {
                temp.persist(&path)?;
                tracing::warn!("blob {digest}: {why}; its content matches its digest, so a copy of kiln's own replaced it");
                return Ok(true);
            }
        }
        tracing::warn!("blob {digest}: {why}, and its content does not match its digest: removed");
        fs::remove_file(&path).map_err(Error::io(format!("removing blob {digest}")))?;
        Ok(false)
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
        if self.has_blob(digest)? {
            return Ok(());
        }
        let _lock = self.lock_blob(digest)?;
        if self.has_own_blob(digest)? {
            return Ok(());
        }
        Ok(kiln_hostfs::write_file(&self.blob_path(digest), bytes)?)
    }

    /// Takes the exclusive lock of one blob, waiting for another writer to finish.
    pub(crate) fn lock_blob(&self, digest: &Digest) -> Result<Lock, Error> {
        lock_file(&self.lock_path(digest), File::lock)
    }

    fn lock_path(&self, digest: &Digest) -> PathBuf {
        self.blob_path(digest).with_extension("lock")
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

    /// A temp file beside blob `digest`'s place, removed on drop unless persisted there.
    pub(crate) fn temp_blob(&self, digest: &Digest) -> Result<TempFile, Error> {
        Ok(TempFile::beside(&self.blob_path(digest))?)
    }

    /// The verified uncompressed digest of layer blob `digest`, if kiln recorded one (a
    /// file that is not kiln's own counts as none: the caller computes it again).
    pub(crate) fn diff_id(&self, digest: &Digest) -> Option<Digest> {
        let mut text = String::new();
        kiln_hostfs::open_own(&self.diff_id_path(digest))
            .ok()?
            .take(1024)
            .read_to_string(&mut text)
            .ok()?;
        Digest::parse(text.trim()).ok()
    }

    /// Records `diff_id` for `digest` (called under the blob's lock, before the blob is
    /// published, so a published layer always has it).
    pub(crate) fn record_diff_id(&self, digest: &Digest, diff_id: &Digest) -> Result<(), Error> {
        let path = self.diff_id_path(digest);
        Ok(kiln_hostfs::write_file(
            &path,
            diff_id.to_string().as_bytes(),
        )?)
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
        let path = self.record_path(&record.reference, &record.platform);
        Ok(kiln_hostfs::write_file(&path, &json)?)
    }

    /// Every image record, sorted by reference then platform. Unreadable records, and
    /// those kiln did not write as it writes them, are skipped with a warning.
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
            let parsed = read_record(&path);
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

    /// The record whose image id (its config digest, as docker's image ids) or manifest
    /// digest is `id`: `sha256:HEX`, or a prefix of at least 4 hex digits with or without
    /// `sha256:`. `Ok(None)` when `id` is not written as an id or no image has it; an
    /// error when it names several images.
    pub fn find_id(&self, id: &str) -> Result<Option<ImageRecord>, Error> {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        let is_hex = hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if hex.len() < 4 || hex.len() > 64 || !is_hex {
            return Ok(None);
        }
        let matches: Vec<ImageRecord> = self
            .images()?
            .into_iter()
            .filter(|r| {
                r.config_digest.hex().starts_with(hex) || r.manifest_digest.hex().starts_with(hex)
            })
            .collect();
        let images: std::collections::BTreeSet<&str> =
            matches.iter().map(|r| r.config_digest.hex()).collect();
        if images.len() > 1 {
            return Err(Error::Invalid {
                what: format!("image id {id:?}"),
                reason: format!(
                    "it matches several images ({}); give more of the id",
                    matches
                        .iter()
                        .map(|r| format!("{} {}", &r.config_digest.hex()[..12], r.reference))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(matches.into_iter().next())
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
                let _ = fs::remove_file(self.lock_path(&digest));
                report.blobs_removed += 1;
                report.bytes_freed += size;
            }
        }
        Ok(report)
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

/// An image record kiln wrote (at most the metadata cap).
fn read_record(path: &Path) -> Result<ImageRecord, String> {
    let mut bytes = Vec::new();
    kiln_hostfs::open_own(path)
        .map_err(|e| e.to_string())?
        .take(crate::MAX_METADATA_SIZE)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Opens (creating) the lock file at `path` and waits for the flock that `take` asks for.
fn lock_file(path: &Path, take: fn(&File) -> io::Result<()>) -> Result<Lock, Error> {
    let file = kiln_hostfs::open_lock(path)?;
    take(&file).map_err(Error::io(format!("locking {}", path.display())))?;
    Ok(Lock { _file: file })
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
    fn image_ids_are_config_digests_or_manifest_digests_and_may_be_short() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let (m1, c1) = (Digest::sha256_of(b"m1"), Digest::sha256_of(b"c1"));
        let (m2, c2) = (Digest::sha256_of(b"m2"), Digest::sha256_of(b"c2"));
        for (reference, m, c) in [
            ("oci:/a:1", &m1, &c1),
            ("oci:/b:1", &m2, &c2),
            ("oci:/a:2", &m1, &c1),
        ] {
            store
                .put_record(&record(reference, "linux/amd64", m, c))
                .unwrap();
        }
        let found = |id: &str| store.find_id(id).unwrap().map(|r| r.config_digest);
        assert_eq!(found(&c1.to_string()), Some(c1.clone()));
        assert_eq!(found(&c2.hex()[..12]), Some(c2.clone()));
        assert_eq!(found(&m2.hex()[..6]), Some(c2.clone()));
        // Two references of one image are one image.
        assert_eq!(
            found(&format!("sha256:{}", &c1.hex()[..4])),
            Some(c1.clone())
        );
        // Not written as an id: a name for the caller to look up.
        for name in ["busybox", "abc", "ABCDEF12", &c1.hex()[..3]] {
            assert_eq!(found(name), None, "{name}");
        }
        assert_eq!(found("0000000000"), None);
        // Two configs whose digests share four hex digits (a birthday search: a few
        // hundred tries): that prefix names both images and is refused.
        let mut seen = std::collections::HashMap::new();
        let (c3, c4) = (0u32..)
            .map(|i| Digest::sha256_of(format!("config {i}").as_bytes()))
            .find_map(|d| {
                let prefix = d.hex()[..4].to_owned();
                seen.insert(prefix, d.clone()).map(|other| (other, d))
            })
            .unwrap();
        for (reference, c) in [("oci:/c:1", &c3), ("oci:/d:1", &c4)] {
            store
                .put_record(&record(reference, "linux/amd64", &m2, c))
                .unwrap();
        }
        let err = store.find_id(&c3.hex()[..4]).unwrap_err().to_string();
        assert!(
            err.contains("several images") && err.contains("oci:/c:1") && err.contains("oci:/d:1"),
            "{err}"
        );
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
        assert!(!store.has_blob(&orphan).unwrap() && store.has_blob(&layer).unwrap());
        let pinned = store.images().unwrap();
        assert_eq!(store.remove("oci:/x:1", None).unwrap(), 2);
        assert_eq!(store.prune(&pinned).unwrap().blobs_removed, 0);
        assert!(
            store.has_blob(&layer).unwrap(),
            "a pinned image keeps its blobs without its record"
        );
        assert_eq!(store.prune(&[]).unwrap().blobs_removed, 3);
        assert!(!store.has_blob(&layer).unwrap());
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed_on_open() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let mine = store.temp_blob(&Digest::sha256_of(b"mine")).unwrap();
        let mine_path = mine.path().to_path_buf();
        // No process has pid 0x7fffffff (above pid_max).
        let dead = [
            store.dir().join("blobs/sha256/.abc.2147483647.0.tmp"),
            store.dir().join("images/.abc.json.2147483647.1.tmp"),
        ];
        for path in &dead {
            fs::write(path, b"partial").unwrap();
        }
        Store::open(root.path()).unwrap();
        assert!(dead.iter().all(|path| !path.exists()));
        assert!(mine_path.exists(), "a live process's temp file stays");
        drop(mine);
        assert!(!mine_path.exists());
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::MetadataExt;
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_blob_others_could_write_is_verified_again_before_it_is_used() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let intact = Digest::sha256_of(b"intact");
        let tampered = Digest::sha256_of(b"tampered");
        store.put_verified(&intact, b"intact").unwrap();
        store.put_verified(&tampered, b"tampered").unwrap();
        assert_eq!(mode(&store.blob_path(&intact)), 0o600);
        // As a store written under `umask 000` leaves them: anyone could have changed them.
        chmod(&store.blob_path(&intact), 0o666);
        chmod(&store.blob_path(&tampered), 0o666);
        fs::write(store.blob_path(&tampered), b"planted").unwrap();

        assert!(store.has_blob(&intact).unwrap());
        assert_eq!(
            mode(&store.blob_path(&intact)),
            0o600,
            "replaced by kiln's own copy"
        );
        assert_eq!(store.read_blob(&intact, 100).unwrap(), b"intact");
        assert!(!store.has_blob(&tampered).unwrap());
        assert!(!store.blob_path(&tampered).exists(), "removed");
        assert!(store.open_blob(&tampered).is_err());

        // A symlink where a blob belongs is never read through.
        let elsewhere = root.path().join("elsewhere");
        fs::write(&elsewhere, b"intact").unwrap();
        fs::remove_file(store.blob_path(&intact)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, store.blob_path(&intact)).unwrap();
        assert!(!store.has_blob(&intact).unwrap());
        assert!(elsewhere.exists());
    }

    #[test]
    fn records_and_diff_ids_others_could_write_are_ignored() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let (manifest, config) = (Digest::sha256_of(b"m"), Digest::sha256_of(b"c"));
        let image = record("oci:/x:1", "linux/amd64", &manifest, &config);
        store.put_record(&image).unwrap();
        let path = store.record_path(&image.reference, &image.platform);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(store.images().unwrap().len(), 1);
        chmod(&path, 0o666);
        assert!(store.images().unwrap().is_empty());

        store.record_diff_id(&manifest, &config).unwrap();
        assert_eq!(store.diff_id(&manifest), Some(config.clone()));
        chmod(&store.diff_id_path(&manifest), 0o666);
        assert_eq!(store.diff_id(&manifest), None);
    }

    #[test]
    fn a_shared_store_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        chmod(&store.dir().join("blobs/sha256"), 0o777);
        let err = Store::open(root.path()).unwrap_err().to_string();
        assert!(
            err.contains("blobs/sha256") && err.contains("mode 777"),
            "{err}"
        );
    }

    #[test]
    #[ignore = "needs root (scripts/test runs it as root)"]
    fn a_blob_of_another_user_is_verified_again() {
        assert_eq!(kiln_hostfs::euid(), 0, "this test needs root (chown)");
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(root.path()).unwrap();
        let blob = Digest::sha256_of(b"blob");
        store.put_verified(&blob, b"blob").unwrap();
        std::os::unix::fs::chown(store.blob_path(&blob), Some(65534), None).unwrap();
        assert!(store.has_blob(&blob).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(store.blob_path(&blob)).unwrap().uid(), 0);
    }
}
