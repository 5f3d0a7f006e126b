//! What a guest or an image can make kiln write to the host's disk, bounded (issue 17
//! item 3): a detached workload writing without end keeps its log under the cap; a
//! gzip layer of a gigabyte of zeros is refused by the default expansion limits and,
//! allowed, builds an image whose zeros are holes; the root image cache stays under its
//! limit by evicting the least recently used image no sandbox pins; `kiln prune` removes
//! the root images of removed images.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sha2::Digest as _;

use kiln_e2e::{
    demo_image, describe, fixtures, require_root, run_ok, sha256_digest, text, KilnRoot,
};

/// The key directory of `manifest_digest` in the root image cache.
fn key_dir(root: &KilnRoot, manifest_digest: &str) -> PathBuf {
    root.path()
        .join("rootfs/v1")
        .join(manifest_digest.replace(':', "-"))
}

/// Disk space the files of `dir` take.
fn disk_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// `kiln --json ARGS` (which must succeed), parsed.
fn json(root: &KilnRoot, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&root.ok(&all)).expect("kiln prints JSON")
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_workload_writing_without_end_keeps_its_log_under_the_cap() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    // About 600 kB of numbered lines: 36 times the cap.
    let id = root
        .ok(&[
            "run",
            "-d",
            "--log-max-size",
            "16k",
            &demo_image(),
            "sh",
            "-c",
            "seq 1 100000; exec sleep 100000",
        ])
        .trim()
        .to_owned();
    let state_dir = root.path().join("sandboxes").join(&id);
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(state_dir.join("sandbox.json")).unwrap()).unwrap();
    assert_eq!(record["log_max_size"], 16384, "{record}");

    let deadline = Instant::now() + Duration::from_secs(240);
    let logs = loop {
        let logs = root.ok(&["logs", &id]);
        if logs.ends_with("\n100000\n") {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "the workload's last line never came; the logs end with {:?}",
            &logs[logs.len().saturating_sub(100)..]
        );
        thread::sleep(Duration::from_millis(500));
    };

    let mut files: Vec<(String, u64)> = fs::read_dir(&state_dir)
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("stdout.log")
        })
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, entry.metadata().unwrap().len())
        })
        .collect();
    files.sort();
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["stdout.log", "stdout.log.1"], "one rotated file");
    for (name, len) in &files {
        assert!(*len <= 16384, "{name} holds {len} bytes, over the 16k cap");
    }
    // `kiln logs` reads both files: the newest lines, in order, none lost or repeated.
    // Each stored line is its number behind a 31-byte arrival time, so more lines than
    // one file holds means both were read.
    let numbers: Vec<u64> = logs
        .lines()
        .skip(1) // The older file may start in the middle of a line.
        .map(|line| line.parse().unwrap_or_else(|_| panic!("line {line:?}")))
        .collect();
    let one_file_lines = 16384 / (31 + "100000\n".len());
    assert!(numbers.len() > one_file_lines, "{} lines", numbers.len());
    let first = numbers[0];
    assert_eq!(numbers, (first..=100_000).collect::<Vec<_>>());
}

/// Writes an OCI layout at `dir` (tag `latest`) whose one layer is `layer` (gzip) with
/// the uncompressed digest `diff_id`; returns the manifest digest.
fn write_layout(dir: &Path, layer: &[u8], diff_id: &str) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = sha256_digest(bytes);
        fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes).unwrap();
        serde_json::json!({"digest": digest, "size": bytes.len()})
    };
    let layer = put(layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/zeros"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let config = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config["digest"],
            "size": config["size"],
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer["digest"],
            "size": layer["size"],
        }],
    });
    let manifest = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest["digest"],
            "size": manifest["size"],
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest["digest"].as_str().unwrap().to_owned()
}

/// A layer made by GNU tar and gzip -9 of one file, `zeros`, of `size` zero bytes (a
/// sparse file, so nothing is written to make it). Returns the gzip blob and the digest
/// of the tar stream.
fn zero_layer(work: &Path, size: u64) -> (Vec<u8>, String) {
    let source = work.join("layer");
    fs::create_dir(&source).unwrap();
    let zeros = fs::File::create(source.join("zeros")).unwrap();
    zeros.set_len(size).unwrap();
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&source)
        .args(["--numeric-owner", "-cf", "-", "zeros"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("running tar");
    let blob_path = work.join("layer.gz");
    let mut gzip = Command::new("gzip")
        .arg("-9")
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&blob_path).unwrap())
        .spawn()
        .expect("running gzip");
    // The tar stream goes to gzip and, on the way, into its digest.
    let mut tar_out = tar.stdout.take().unwrap();
    let mut gzip_in = gzip.stdin.take().unwrap();
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = tar_out.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        gzip_in.write_all(&buffer[..n]).unwrap();
    }
    drop(gzip_in);
    assert!(tar.wait().unwrap().success(), "tar failed");
    assert!(gzip.wait().unwrap().success(), "gzip failed");
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (fs::read(&blob_path).unwrap(), format!("sha256:{hex}"))
}

#[test]
fn a_gigabyte_of_zeros_in_a_megabyte_of_gzip_is_refused_and_when_allowed_costs_no_disk() {
    let root = KilnRoot::without_guest().quiet();
    let work = root.temp_dir().join("bomb");
    fs::create_dir(&work).unwrap();
    // 1.1 GiB, as in the report that found it: gzip -9 makes about 1.1 MB of it.
    let size = 1100 << 20;
    let (layer, diff_id) = zero_layer(&work, size);
    assert!(layer.len() < 2 << 20, "gzip made {} bytes", layer.len());
    let layout = work.join("image");
    let digest = write_layout(&layout, &layer, &diff_id);
    let reference = format!("oci:{}:latest", layout.display());

    // The default limits stop it: the error names the limit and the flag that raises it.
    let refused = root.run(&["build", &reference]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("entry \"zeros\"")
            && stderr.contains("more than 100 times their compressed size")
            && stderr.contains("`kiln build --max-compression-ratio N` raises it"),
        "{stderr}"
    );
    assert!(!key_dir(&root, &digest).join("root.erofs").exists());

    // Allowed, the image holds the whole file, but its zeros take no disk.
    let built = json(
        &root,
        &["build", "--max-compression-ratio", "2000", &reference],
    );
    let image = PathBuf::from(built["root"].as_str().unwrap());
    let meta = fs::metadata(&image).unwrap();
    assert!(meta.len() > size, "the image's length is {}", meta.len());
    let on_disk = meta.blocks() * 512;
    assert!(
        on_disk < 1 << 20,
        "the image takes {on_disk} bytes of disk; its 1.1 GiB of zeros should be holes"
    );
    // fsck.erofs reads every file back (as zeros) and checks it.
    run_ok(
        Command::new("fsck.erofs").arg("--extract").arg(&image),
        Duration::from_secs(600),
    );
    let dump = run_ok(
        Command::new("dump.erofs").arg("--path=/zeros").arg(&image),
        Duration::from_secs(60),
    );
    assert!(
        text(&dump.stdout).contains(&format!("Size: {size}")),
        "{}",
        text(&dump.stdout)
    );
}

/// The three fixture images the cache tests build: (reference, manifest digest).
fn three_images() -> [(String, String); 3] {
    let fixtures = fixtures();
    let reference = |image: &kiln_e2e::OciImage| {
        (
            format!("oci:{}:{}", image.path.display(), image.tag),
            image.manifest_digest.clone(),
        )
    };
    [
        reference(&fixtures.demo().oci_gzip),
        reference(&fixtures.layers().oci_gzip),
        // The demo tree again, with zstd layers: another manifest.
        reference(&fixtures.demo().oci_zstd),
    ]
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn over_the_cache_limit_the_least_recently_used_unpinned_image_goes_and_a_pinned_one_never() {
    require_root();
    let root = KilnRoot::without_guest().quiet();
    let [(pinned_ref, pinned), (old_ref, old), (new_ref, new)] = three_images();
    // Oldest first: a sandbox pins the first image; the second is the least recently
    // used image no sandbox pins.
    root.ok(&["create", &pinned_ref, "true"]);
    root.ok(&["build", &old_ref]);
    root.ok(&["build", &new_ref]);
    let total: u64 = [&pinned, &old, &new]
        .into_iter()
        .map(|digest| disk_bytes(&key_dir(&root, digest)))
        .sum();

    // One byte over the limit: using the newest image again evicts exactly one image.
    let limit = (total - 1).to_string();
    let built = json(&root, &["--rootfs-cache-max", &limit, "build", &new_ref]);
    assert_eq!(built["evicted"], serde_json::json!([old]), "{built}");
    assert!(!key_dir(&root, &old).exists());
    assert!(key_dir(&root, &pinned).join("root.erofs").exists());
    assert!(key_dir(&root, &new).join("root.erofs").exists());

    // However small the limit, creating a sandbox keeps its own image and the pinned one.
    root.ok(&["--rootfs-cache-max", "0", "create", &old_ref, "true"]);
    assert!(!key_dir(&root, &new).exists(), "the unpinned image went");
    assert!(key_dir(&root, &pinned).join("root.erofs").exists());
    assert!(key_dir(&root, &old).join("root.erofs").exists());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn prune_removes_the_root_images_of_removed_images_but_not_of_pinned_ones() {
    require_root();
    let root = KilnRoot::without_guest().quiet();
    let [(pinned_ref, pinned), (gone_ref, gone), _] = three_images();
    let sandbox = root.ok(&["create", &pinned_ref, "true"]).trim().to_owned();
    root.ok(&["build", &gone_ref]);
    root.ok(&["rmi", &gone_ref]);
    root.ok(&["rmi", &pinned_ref]);

    let pruned = json(&root, &["prune"]);
    assert_eq!(
        pruned["root_images_removed"],
        serde_json::json!([gone]),
        "{pruned}"
    );
    assert!(pruned["root_image_bytes_freed"].as_u64().unwrap() > 0);
    assert!(!key_dir(&root, &gone).exists());
    assert!(
        key_dir(&root, &pinned).join("root.erofs").exists(),
        "a sandbox still pins it"
    );

    root.ok(&["rm", &sandbox]);
    let pruned = json(&root, &["prune"]);
    assert_eq!(
        pruned["root_images_removed"],
        serde_json::json!([pinned]),
        "{pruned}"
    );
    let left: Vec<_> = fs::read_dir(root.path().join("rootfs/v1"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
