//! The image cache: keys, reuse, one build for concurrent requests, leftovers of killed
//! builds.

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
