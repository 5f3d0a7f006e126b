//! The image cache: keys, reuse, one build for concurrent requests, leftovers of killed
//! builds, and files and directories kiln did not write as it writes them.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_identity::IdBounds;
use kiln_image::Compression;
use kiln_rootfs::{Cache, Layer, Limits, BUILDER_FORMAT_VERSION};
use support::LayerBuilder;

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn tar() -> Vec<u8> {
    LayerBuilder::new()
        .file("etc/passwd", b"root:x:0:0::/:/bin/sh\n")
        .file("bin/sh", b"sh")
        .tar()
}

#[test]
fn concurrent_requests_build_once_and_identity_layers_are_keyed_by_ids() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    let layer = tar();
    let builds = AtomicUsize::new(0);
    let limits = Limits::default();
    let paths: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let (root, inputs) = cache
                        .root_image(DIGEST, &limits, || {
                            builds.fetch_add(1, Ordering::SeqCst);
                            Ok(vec![Layer::new("sha256:l", Compression::None, &layer[..])])
                        })
                        .unwrap();
                    (root.path, inputs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(builds.load(Ordering::SeqCst), 1);
    let (root_path, inputs) = &paths[0];
    assert!(paths.iter().all(|(p, i)| p == root_path && i == inputs));
    let key_dir = dir
        .path()
        .join(format!("v{BUILDER_FORMAT_VERSION}"))
        .join(DIGEST.replace(':', "-"));
    assert_eq!(root_path, &key_dir.join("root.erofs"));

    let first = cache
        .identity_layer(DIGEST, inputs, 10001, 10001, IdBounds::KILN)
        .unwrap();
    assert!(first.built.is_some());
    let again = cache
        .identity_layer(DIGEST, inputs, 10001, 10001, IdBounds::KILN)
        .unwrap();
    assert!(again.built.is_none());
    assert_eq!(first.path, again.path);
    let other = cache
        .identity_layer(DIGEST, inputs, 2000, 2000, IdBounds::KILN)
        .unwrap();
    assert_ne!(other.path, first.path);

    let merged = cache
        .merged_image(DIGEST, &limits, 10001, 10001, || {
            Ok(vec![Layer::new("sha256:l", Compression::None, &layer[..])])
        })
        .unwrap();
    assert!(merged.built.unwrap().identity.is_some());
}

#[test]
fn leftovers_of_a_killed_build_are_removed_and_bad_keys_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    let key_dir = dir
        .path()
        .join(format!("v{BUILDER_FORMAT_VERSION}"))
        .join(DIGEST.replace(':', "-"));
    std::fs::create_dir_all(&key_dir).unwrap();
    // What a kill -9 leaves: a temp file, and an image published without its inputs.
    std::fs::write(key_dir.join(".tmp-root.erofs.abc123"), b"half written").unwrap();
    std::fs::write(key_dir.join("root.erofs"), b"not an image").unwrap();
    let layer = tar();
    let (root, _) = cache
        .root_image(DIGEST, &Limits::default(), || {
            Ok(vec![Layer::new("sha256:l", Compression::None, &layer[..])])
        })
        .unwrap();
    assert!(root.built.is_some());
    kiln_rootfs::fsck(&root.path).unwrap();
    let names: Vec<String> = std::fs::read_dir(&key_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".lock-"))
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, vec!["root.erofs", "root.identity.json"]);

    for bad in ["sha256:../../etc", "md5:abcd", "sha256:ABCDEF"] {
        let err = cache
            .root_image(bad, &Limits::default(), || Ok(vec![]))
            .unwrap_err();
        assert!(err.to_string().contains("not a manifest digest"), "{err}");
    }
}

/// A digest made of one repeated hex digit.
fn digest(hex: char) -> String {
    format!("sha256:{}", hex.to_string().repeat(64))
}

/// Builds the root image of `digest` from a layer holding 1 MiB of non-zero data, so
/// that it takes disk space.
fn build(cache: &Cache, digest: &str) {
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251 + 1) as u8).collect();
    let layer = LayerBuilder::new().file("data", &data).tar();
    cache
        .root_image(digest, &Limits::default(), || {
            Ok(vec![Layer::new("sha256:l", Compression::None, &layer[..])])
        })
        .unwrap();
}

/// Sets the last-used time of `digest`'s images to `seconds` after the epoch.
fn used_at(dir: &std::path::Path, digest: &str, seconds: u64) {
    let key_dir = dir
        .join(format!("v{BUILDER_FORMAT_VERSION}"))
        .join(digest.replace(':', "-"));
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
    std::fs::File::open(key_dir)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

fn cached(cache: &Cache) -> Vec<String> {
    cache
        .images()
        .unwrap()
        .into_iter()
        .map(|image| image.manifest_digest)
        .collect()
}

#[test]
fn eviction_removes_the_least_recently_used_unpinned_images() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    let (a, b, c) = (digest('a'), digest('b'), digest('c'));
    for (seconds, digest) in [&a, &b, &c].into_iter().enumerate() {
        build(&cache, digest);
        used_at(dir.path(), digest, 1000 + seconds as u64);
    }
    // A lookup of a cached image counts as a use: `a` becomes the most recent.
    build(&cache, &a);
    assert_eq!(cached(&cache), [b.as_str(), c.as_str(), a.as_str()]);
    let images = cache.images().unwrap();
    assert!(images.iter().all(|image| image.disk_bytes >= 1 << 20));
    let total: u64 = images.iter().map(|image| image.disk_bytes).sum();

    // One byte over: the least recently used image goes, and only that one.
    let removed = cache.evict(total - 1, &Default::default()).unwrap();
    assert_eq!(removed.manifest_digests, [b.as_str()]);
    assert_eq!(removed.bytes_freed, images[0].disk_bytes);
    assert_eq!(cached(&cache), [c.as_str(), a.as_str()]);

    // However small the limit, a pinned image stays.
    let pinned = [c.clone()].into_iter().collect();
    let removed = cache.evict(0, &pinned).unwrap();
    assert_eq!(removed.manifest_digests, [a.as_str()]);
    assert_eq!(cached(&cache), [c.as_str()]);
    let key_dirs: Vec<_> = std::fs::read_dir(dir.path().join(format!("v{BUILDER_FORMAT_VERSION}")))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        key_dirs.len(),
        1,
        "nothing but the pinned image is left: {key_dirs:?}"
    );

    // Within the limit, nothing goes.
    assert_eq!(
        cache.evict(u64::MAX, &Default::default()).unwrap(),
        Default::default()
    );
}

#[test]
fn retain_removes_the_images_of_other_digests_and_spares_a_build_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    let (a, b, c) = (digest('a'), digest('b'), digest('c'));
    for digest in [&a, &b, &c] {
        build(&cache, digest);
    }
    // A build of `c` holds its lock: removing `c` waits for another time.
    let key_dir = |digest: &str| {
        dir.path()
            .join(format!("v{BUILDER_FORMAT_VERSION}"))
            .join(digest.replace(':', "-"))
    };
    let building = std::fs::File::open(key_dir(&c).join(".lock-root.erofs")).unwrap();
    building.lock().unwrap();
    let removed = cache.retain(|digest| digest == a).unwrap();
    assert_eq!(removed.manifest_digests, [b.as_str()]);
    assert!(!key_dir(&b).exists());
    drop(building);
    let removed = cache.retain(|digest| digest == a).unwrap();
    assert_eq!(removed.manifest_digests, [c.as_str()]);
    assert_eq!(cached(&cache), [a]);
}

fn key_dir(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join(format!("v{BUILDER_FORMAT_VERSION}"))
        .join(DIGEST.replace(':', "-"))
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Builds (or reuses) the root image of `tar()` under `DIGEST`; whether it was built.
fn root_image(cache: &Cache) -> kiln_rootfs::Result<bool> {
    let layer = tar();
    let (root, _) = cache.root_image(DIGEST, &Limits::default(), || {
        Ok(vec![Layer::new("sha256:l", Compression::None, &layer[..])])
    })?;
    Ok(root.built.is_some())
}

#[test]
fn cached_images_others_could_have_written_are_built_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    assert!(root_image(&cache).unwrap());
    let image = key_dir(dir.path()).join("root.erofs");
    assert_eq!(mode(&image), 0o600);
    assert_eq!(mode(&key_dir(dir.path())), 0o700);
    assert!(!root_image(&cache).unwrap(), "kiln's own image is reused");

    // As a cache written under `umask 000` leaves them: anyone could have replaced them.
    let built = std::fs::read(&image).unwrap();
    std::fs::write(&image, b"planted").unwrap();
    chmod(&image, 0o666);
    assert!(root_image(&cache).unwrap(), "built again");
    assert_eq!(std::fs::read(&image).unwrap(), built);
    assert_eq!(mode(&image), 0o600);

    chmod(&key_dir(dir.path()).join("root.identity.json"), 0o646);
    assert!(root_image(&cache).unwrap(), "untrusted inputs: built again");
}

#[test]
fn a_shared_cache_directory_and_a_symlinked_lock_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    let key = key_dir(dir.path());
    std::fs::create_dir_all(&key).unwrap();
    chmod(&key, 0o777);
    let err = root_image(&cache).unwrap_err().to_string();
    assert!(
        err.contains("mode 777") && err.contains("chmod 700"),
        "{err}"
    );
    chmod(&key, 0o700);

    let victim = dir.path().join("victim");
    std::os::unix::fs::symlink(&victim, key.join(".lock-root.erofs")).unwrap();
    let err = root_image(&cache).unwrap_err().to_string();
    assert!(
        err.contains(".lock-root.erofs") && err.contains("symlink"),
        "{err}"
    );
    assert!(!victim.exists(), "the lock's symlink was followed");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn cached_images_of_another_user_are_built_again() {
    assert_eq!(
        kiln_hostfs::euid(),
        0,
        "this test needs root (chown): run it as root, as scripts/test does"
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path());
    assert!(root_image(&cache).unwrap());
    for name in ["root.erofs", "root.identity.json"] {
        std::os::unix::fs::chown(key_dir(dir.path()).join(name), Some(65534), None).unwrap();
    }
    assert!(root_image(&cache).unwrap(), "built again");
}

/// Unpacks `image` with fsck.erofs (the reference reader) into a new directory.
fn extract(image: &std::path::Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("x");
    let status = std::process::Command::new("fsck.erofs")
        .arg(format!("--extract={}", target.display()))
        .arg("--preserve-perms")
        .arg(image)
        .status()
        .unwrap();
    assert!(status.success(), "fsck.erofs --extract {}", image.display());
    out
}

#[test]
fn supervisor_layers_are_keyed_by_the_binary_digest_and_hold_it_at_its_guest_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::new(dir.path().join("rootfs"));
    let binary = dir.path().join("openshell-sandbox");
    // Longer than a block, with a partial last block.
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&binary, &content).unwrap();

    let first = cache.supervisor_layer(&binary).unwrap();
    assert!(first.built);
    assert_eq!(
        first.digest,
        kiln_image::Digest::sha256_of(&content).to_string()
    );
    let again = cache.supervisor_layer(&binary).unwrap();
    assert!(!again.built);
    assert_eq!(again.path, first.path);
    assert_eq!(
        cache.supervisor_layer_of(&first.digest).unwrap(),
        first.path
    );

    let unpacked = extract(&first.path);
    let root = unpacked.path().join("x");
    let placed = root.join("opt/openshell/bin/openshell-sandbox");
    assert_eq!(std::fs::read(&placed).unwrap(), content);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&placed), 0o755);
    for dir in ["opt/openshell/auth", "opt/openshell/tls"] {
        assert_eq!(mode(&root.join(dir)), 0o700, "{dir}");
        assert_eq!(
            std::fs::read_dir(root.join(dir)).unwrap().count(),
            0,
            "{dir}"
        );
    }

    // Another binary is another layer; the first stays for the sandboxes that use it.
    std::fs::write(&binary, b"another supervisor").unwrap();
    let other = cache.supervisor_layer(&binary).unwrap();
    assert!(other.built);
    assert_ne!(other.path, first.path);
    assert!(first.path.is_file());

    let gone = format!("sha256:{}", "0".repeat(64));
    let err = cache.supervisor_layer_of(&gone).unwrap_err().to_string();
    assert!(err.contains("not in the cache"), "{err}");
    let err = cache.supervisor_layer_of("../etc").unwrap_err().to_string();
    assert!(err.contains("accepted: sha256:<64 hex>"), "{err}");
}
