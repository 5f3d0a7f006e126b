//! The image cache: keys, reuse, one build for concurrent requests, leftovers of killed
//! builds, and files and directories kiln did not write as it writes them.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};

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

    let first = cache.identity_layer(DIGEST, inputs, 10001, 10001).unwrap();
    assert!(first.built.is_some());
    let again = cache.identity_layer(DIGEST, inputs, 10001, 10001).unwrap();
    assert!(again.built.is_none());
    assert_eq!(first.path, again.path);
    let other = cache.identity_layer(DIGEST, inputs, 2000, 2000).unwrap();
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
