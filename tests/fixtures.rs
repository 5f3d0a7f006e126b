//! The fixture images of `scripts/make-fixtures` hold what they claim (checked with skopeo,
//! umoci and by reading the layer tars), and a loopback `docker-registry` serves them with
//! and without htpasswd auth.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::{
    fixtures, kill_process_group, read_layer, require_root, run_ok, run_with_timeout,
    sha256_digest, EntryKind, ImageFixture, LayerEntry, OciImage, Registry, SkopeoSource,
};
use serde_json::Value;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
const ELF_MACHINE_X86_64: u16 = 62;
const ELF_MACHINE_AARCH64: u16 = 183;

fn skopeo_ok(args: &[&str]) -> Vec<u8> {
    run_ok(Command::new("skopeo").args(args), TOOL_TIMEOUT).stdout
}

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("valid JSON")
}

fn read_blob_json(image: &OciImage, digest: &str) -> Value {
    json(&fs::read(image.blob_path(digest)).expect("reading a blob"))
}

fn layer_entries(image: &OciImage, index: usize) -> Vec<LayerEntry> {
    read_layer(&image.blob_path(&image.layers[index]))
}

fn entry<'a>(entries: &'a [LayerEntry], path: &str) -> &'a LayerEntry {
    entries
        .iter()
        .find(|e| e.path == Path::new(path))
        .unwrap_or_else(|| panic!("no entry {path} in the layer"))
}

fn has_entry(entries: &[LayerEntry], path: &str) -> bool {
    entries.iter().any(|e| e.path == Path::new(path))
}

fn elf_machine(bytes: &[u8]) -> u16 {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    u16::from_le_bytes([bytes[18], bytes[19]])
}

fn media_types(manifest: &Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .expect("layers array")
        .iter()
        .map(|l| l["mediaType"].as_str().expect("mediaType").to_owned())
        .collect()
}

fn check_oci_image(image: &OciImage, layer_count: usize, compression: &str) -> Value {
    let raw = skopeo_ok(&["inspect", "--raw", &image.transport_ref()]);
    assert_eq!(
        sha256_digest(&raw),
        image.manifest_digest,
        "{}",
        image.transport_ref()
    );
    let manifest = json(&raw);
    assert_eq!(manifest["config"]["digest"], image.config_digest.as_str());
    assert_eq!(image.layers.len(), layer_count);
    for media_type in media_types(&manifest) {
        assert!(
            media_type.ends_with(&format!("tar+{compression}")),
            "{}: layer media type {media_type}",
            image.transport_ref()
        );
    }
    for digest in &image.layers {
        let blob = fs::read(image.blob_path(digest)).expect("reading a layer blob");
        assert_eq!(
            &sha256_digest(&blob),
            digest,
            "blob content matches its digest"
        );
        let magic: &[u8] = if compression == "gzip" {
            &[0x1f, 0x8b]
        } else {
            &[0x28, 0xb5, 0x2f, 0xfd]
        };
        assert!(blob.starts_with(magic), "{digest} is not {compression}");
    }
    manifest
}

fn check_image_fixture(image: &ImageFixture) {
    check_oci_image(&image.oci_gzip, image.layer_count, "gzip");
    check_oci_image(&image.oci_zstd, image.layer_count, "zstd");
    // Same config means same diff_ids: the zstd layers hold the same tars.
    assert_eq!(image.oci_zstd.config_digest, image.oci_gzip.config_digest);

    let raw = skopeo_ok(&["inspect", "--raw", &image.oci_archive.transport_ref()]);
    assert_eq!(sha256_digest(&raw), image.oci_archive.manifest_digest);
    assert_eq!(
        image.oci_archive.manifest_digest,
        image.oci_gzip.manifest_digest
    );

    let raw = skopeo_ok(&["inspect", "--raw", &image.docker_archive.transport_ref()]);
    let manifest = json(&raw);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["config"]["digest"],
        image.docker_archive.config_digest.as_str()
    );
    assert_eq!(
        image.docker_archive.config_digest,
        image.oci_gzip.config_digest
    );
    assert_eq!(media_types(&manifest).len(), image.layer_count);

    let stat = run_ok(
        Command::new("umoci")
            .arg("stat")
            .arg("--image")
            .arg(format!(
                "{}:{}",
                image.oci_gzip.path.display(),
                image.oci_gzip.tag
            )),
        TOOL_TIMEOUT,
    );
    assert!(String::from_utf8_lossy(&stat.stdout).contains("LAYER"));
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn every_image_fixture_reads_back_in_every_format() {
    require_root();
    let fixtures = fixtures();
    let names: Vec<&str> = fixtures.images().map(|i| i.name.as_str()).collect();
    assert!(
        names.contains(&"demo") && names.contains(&"layers"),
        "{names:?}"
    );
    for image in fixtures.images() {
        check_image_fixture(image);
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn demo_is_one_busybox_layer_whose_command_prints_the_identity() {
    require_root();
    let demo = fixtures().demo();
    assert_eq!(demo.layer_count, 1);
    let config = read_blob_json(&demo.oci_gzip, &demo.oci_gzip.config_digest);
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    let env: Vec<&str> = config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.iter()
            .any(|e| e.starts_with("PATH=") && e.contains("/bin")),
        "{env:?}"
    );
    let cmd: Vec<&str> = config["config"]["Cmd"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(&cmd[..2], ["/bin/sh", "-c"]);

    let entries = layer_entries(&demo.oci_gzip, 0);
    let busybox = entry(&entries, "bin/busybox");
    assert_eq!(busybox.kind, EntryKind::File);
    assert_eq!(busybox.mode, 0o755);
    assert_eq!(
        elf_machine(busybox.contents.as_ref().unwrap()),
        ELF_MACHINE_X86_64
    );
    for applet in [
        "sh", "id", "whoami", "cat", "ls", "stat", "tty", "env", "wget",
    ] {
        let link = ["bin", "usr/bin", "sbin", "usr/sbin"]
            .iter()
            .map(|dir| format!("{dir}/{applet}"))
            .find(|path| has_entry(&entries, path))
            .unwrap_or_else(|| panic!("no applet link for {applet}"));
        let link = entry(&entries, &link);
        assert_eq!(link.kind, EntryKind::Symlink);
        assert_eq!(link.link.as_deref(), Some(Path::new("/bin/busybox")));
    }
    assert_eq!(
        entry(&entries, "etc/passwd").contents.as_deref(),
        Some(&b"root:x:0:0:root:/root:/bin/sh\n"[..])
    );
    assert_eq!(
        entry(&entries, "etc/group").contents.as_deref(),
        Some(&b"root:x:0:\n"[..])
    );
    assert!(!has_entry(&entries, "sandbox"));

    // The command really runs and prints the identity (busybox in a chroot, as root).
    let work = tempfile::tempdir().unwrap();
    let rootfs = demo.oci_gzip.unpack_with_umoci(work.path());
    let output = run_ok(
        Command::new("chroot")
            .arg(&rootfs)
            .args(&cmd)
            .env_clear()
            .env("HOME", "/root")
            .env(
                "PATH",
                env.iter()
                    .find(|e| e.starts_with("PATH="))
                    .unwrap()
                    .trim_start_matches("PATH="),
            ),
        TOOL_TIMEOUT,
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "uid=0 gid=0 groups=0 user=root home=/root\n"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn layers_fixture_holds_every_case_of_the_issue() {
    require_root();
    let layers = fixtures().layers();
    assert_eq!(layers.layer_count, 4);
    let image = &layers.oci_gzip;
    let l1 = layer_entries(image, 0);
    let l2 = layer_entries(image, 1);
    let l3 = layer_entries(image, 2);
    let l4 = layer_entries(image, 3);

    // Layer 1: accounts, special files, modes, xattr, hardlink, symlinked dir, names.
    let passwd = String::from_utf8(entry(&l1, "etc/passwd").contents.clone().unwrap()).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("sandbox:x:2000:2000:")),
        "{passwd}"
    );
    assert!(passwd
        .lines()
        .any(|l| l.split(':').nth(2) == Some("10001") && !l.starts_with("sandbox:")));
    let group = String::from_utf8(entry(&l1, "etc/group").contents.clone().unwrap()).unwrap();
    assert!(group
        .lines()
        .any(|l| l.split(':').nth(2) == Some("10001") && !l.starts_with("sandbox:")));
    let null = entry(&l1, "dev/kiln-null");
    assert_eq!(
        (null.kind, null.device),
        (EntryKind::CharDevice, Some((1, 3)))
    );
    assert_eq!(entry(&l1, "run/demo.fifo").kind, EntryKind::Fifo);
    assert_eq!(entry(&l1, "usr/bin/setuid-prog").mode, 0o4755);
    let setgid = entry(&l1, "usr/bin/setgid-prog");
    assert_eq!((setgid.mode, setgid.gid), (0o2755, 10001));
    assert_eq!(entry(&l1, "tmp").mode, 0o1777);
    assert_eq!(entry(&l1, "srv/shared").mode, 0o3777);
    let cap = entry(&l1, "usr/bin/cap-prog");
    let capability = cap
        .xattrs
        .get("security.capability")
        .expect("security.capability xattr");
    // vfs_cap_data v2: magic 0x02000000 | effective flag, then permitted bit 10 (net_bind_service).
    assert_eq!(
        u32::from_le_bytes(capability[0..4].try_into().unwrap()),
        0x0200_0001
    );
    assert_eq!(
        u32::from_le_bytes(capability[4..8].try_into().unwrap()),
        1 << 10
    );
    let link = entry(&l1, "data/original-link");
    assert_eq!(
        (link.kind, link.link.as_deref()),
        (EntryKind::Hardlink, Some(Path::new("data/original")))
    );
    let lib = entry(&l1, "lib");
    assert_eq!(
        (lib.kind, lib.link.as_deref()),
        (EntryKind::Symlink, Some(Path::new("usr/lib")))
    );
    for name in ["café.txt", "日本語.txt", "emoji 🚀 space.txt", "délété.txt"] {
        assert_eq!(
            entry(&l1, &format!("srv/unicode/{name}")).kind,
            EntryKind::File
        );
    }
    assert_eq!(entry(&l1, "home/app").uid, 10001);
    assert_eq!(entry(&l1, "home/sandbox").uid, 2000);

    // Layer 2 (umoci's own diff): a whiteout and type changes.
    assert!(has_entry(&l2, "etc/.wh.deleted.conf"));
    assert_eq!(entry(&l2, "srv/file-to-dir").kind, EntryKind::Dir);
    assert_eq!(entry(&l2, "srv/dir-to-symlink").kind, EntryKind::Symlink);
    assert!(has_entry(&l2, "srv/dir-to-symlink/.wh.inner.txt"));
    assert_eq!(entry(&l2, "srv/symlink-to-file").kind, EntryKind::File);
    assert_eq!(entry(&l2, "srv/file-to-symlink").kind, EntryKind::Symlink);

    // Layer 3: opaque whiteout and hardlinks to files of layer 1.
    assert!(has_entry(&l3, "opt/replaced-dir/.wh..wh..opq"));
    let cross = entry(&l3, "data/cross-layer-link");
    assert_eq!(
        (cross.kind, cross.link.as_deref()),
        (EntryKind::Hardlink, Some(Path::new("data/original")))
    );
    assert_eq!(entry(&l3, "data/doomed-link2").kind, EntryKind::Hardlink);

    // Layer 4: only whiteouts.
    let names: BTreeSet<&Path> = l4.iter().map(|e| e.path.as_path()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            Path::new("data/.wh.doomed"),
            Path::new("srv/unicode/.wh.délété.txt")
        ])
    );

    // umoci applies the layers into the tree the comment in make-fixtures describes.
    let work = tempfile::tempdir().unwrap();
    let root = image.unpack_with_umoci(work.path());
    let read =
        |path: &str| fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let names_in = |path: &str| -> BTreeSet<String> {
        fs::read_dir(root.join(path))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    assert!(!root.join("etc/deleted.conf").exists());
    assert_eq!(
        names_in("opt/replaced-dir"),
        BTreeSet::from(["new-only.txt".to_owned()])
    );
    assert!(!root.join("data/doomed").exists());
    assert_eq!(read("data/doomed-link1"), "doomed content\n");
    assert_eq!(read("data/doomed-link2"), "doomed content\n");
    assert_eq!(read("data/cross-layer-link"), "original content\n");
    assert_eq!(read("lib/libadded.so.2"), "added in layer 2\n");
    assert_eq!(read("srv/file-to-dir/inner.txt"), "was a file in layer 1\n");
    // umoci resolves srv/dir-to-symlink/.wh.inner.txt through the symlink of the same layer.
    assert!(
        !root.join("usr/lib/inner.txt").exists(),
        "umoci kept usr/lib/inner.txt"
    );
    assert!(fs::symlink_metadata(root.join("srv/dir-to-symlink"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!root.join("srv/unicode/délété.txt").exists());
    assert!(root.join("srv/unicode/café.txt").exists());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn multiarch_index_selects_amd64_and_arm64_v8() {
    require_root();
    let index = fixtures().multiarch();
    let raw = skopeo_ok(&["inspect", "--raw", &index.transport_ref()]);
    assert_eq!(sha256_digest(&raw), index.index_digest);
    let parsed = json(&raw);
    assert_eq!(
        parsed["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(parsed["manifests"].as_array().unwrap().len(), 2);

    let work = tempfile::tempdir().unwrap();
    for (arch, variant, machine) in [
        ("amd64", None, ELF_MACHINE_X86_64),
        ("arm64", Some("v8"), ELF_MACHINE_AARCH64),
    ] {
        let expected = index.manifest_for(arch);
        assert_eq!(expected.platform.os, "linux");
        assert_eq!(expected.platform.variant.as_deref(), variant);
        // skopeo picks the platform's manifest out of the index.
        let copy = work.path().join(arch);
        let mut args = vec![
            "copy",
            "--quiet",
            "--override-os",
            "linux",
            "--override-arch",
            arch,
        ];
        if let Some(variant) = variant {
            args.extend(["--override-variant", variant]);
        }
        let source = index.transport_ref();
        let destination = format!("oci:{}:picked", copy.display());
        args.extend([source.as_str(), destination.as_str()]);
        skopeo_ok(&args);
        let picked = json(&fs::read(copy.join("index.json")).unwrap());
        assert_eq!(
            picked["manifests"][0]["digest"],
            expected.manifest_digest.as_str()
        );

        let manifest = json(&fs::read(index.blob_path(&expected.manifest_digest)).unwrap());
        let config = json(
            &fs::read(index.blob_path(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
        );
        assert_eq!(config["architecture"], arch);
        let layer = manifest["layers"][0]["digest"].as_str().unwrap();
        let entries = read_layer(&index.blob_path(layer));
        assert_eq!(
            elf_machine(entry(&entries, "bin/busybox").contents.as_ref().unwrap()),
            machine
        );
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn debian_fixture_is_minbase_plus_a_cleanup_layer() {
    require_root();
    let debian = fixtures()
        .debian()
        .expect("the debian fixture was left out (KILN_FIXTURES_SKIP_DEBIAN=1); unset it");
    assert_eq!(debian.layer_count, 2);
    let base = layer_entries(&debian.oci_gzip, 0);
    assert!(has_entry(&base, "usr/bin/apt-get"));
    assert!(has_entry(&base, "usr/share/doc"));
    assert!(has_entry(&base, "var/lib/dpkg/status"));
    let cleanup = layer_entries(&debian.oci_gzip, 1);
    let whiteouts: BTreeSet<String> = cleanup
        .iter()
        .filter(|e| {
            e.path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".wh."))
        })
        .map(|e| e.path.to_string_lossy().into_owned())
        .collect();
    for removed in [
        "usr/share/.wh.doc",
        "usr/share/.wh.man",
        "usr/share/.wh.locale",
    ] {
        assert!(whiteouts.contains(removed), "no {removed} in {whiteouts:?}");
    }
    assert!(
        cleanup
            .iter()
            .all(|e| !e.path.starts_with("usr/share/doc/")),
        "cleanup layer adds docs"
    );
}

/// Pulls `repo_tag` from the registry into a fresh OCI layout and returns the manifest
/// digest that skopeo recorded there, or skopeo's failure.
fn pull(
    registry: &Registry,
    repo_tag: &str,
    creds: Option<&str>,
    into: &Path,
) -> Result<String, String> {
    let layout = into.join(repo_tag.replace([':', '/'], "_"));
    let authfile = registry.empty_auth_file();
    let mut command = Command::new("skopeo");
    command
        .args([
            "copy",
            "--quiet",
            "--all",
            "--src-tls-verify=false",
            "--authfile",
        ])
        .arg(&authfile);
    match creds {
        Some(creds) => command.arg(format!("--src-creds={creds}")),
        None => command.arg("--src-no-creds"),
    };
    command
        .arg(registry.docker_ref(repo_tag))
        .arg(format!("oci:{}:pulled", layout.display()));
    let output = run_with_timeout(&mut command, TOOL_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let index = json(&fs::read(layout.join("index.json")).unwrap());
    Ok(index["manifests"][0]["digest"].as_str().unwrap().to_owned())
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn anonymous_registry_serves_the_pushed_fixtures() {
    require_root();
    let fixtures = fixtures();
    let registry = Registry::start(None);
    let work = tempfile::tempdir().unwrap();

    let demo = fixtures.demo();
    assert_eq!(
        registry.push(demo, "kiln/demo:latest"),
        demo.oci_gzip.manifest_digest
    );
    let layers = fixtures.layers();
    assert_eq!(
        registry.push(&layers.oci_zstd, "layers:zstd"),
        layers.oci_zstd.manifest_digest
    );
    assert_eq!(
        registry
            .push(&layers.docker_archive, "layers:from-docker-archive")
            .len(),
        71
    );
    let index = fixtures.multiarch();
    assert_eq!(registry.push(index, "multiarch:latest"), index.index_digest);

    assert_eq!(
        pull(&registry, "kiln/demo:latest", None, work.path()),
        Ok(demo.oci_gzip.manifest_digest.clone())
    );
    assert_eq!(
        pull(&registry, "layers:zstd", None, work.path()),
        Ok(layers.oci_zstd.manifest_digest.clone())
    );
    assert_eq!(
        pull(&registry, "multiarch:latest", None, work.path()),
        Ok(index.index_digest.clone())
    );
    let raw = skopeo_ok(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--no-creds",
        &registry.docker_ref("kiln/demo:latest"),
    ]);
    assert_eq!(sha256_digest(&raw), demo.oci_gzip.manifest_digest);

    // The blobs sit where tests that corrupt them look.
    for digest in &demo.oci_gzip.layers {
        let stored = fs::read(registry.blob_data_path(digest)).expect("stored layer blob");
        assert_eq!(&sha256_digest(&stored), digest);
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn registry_with_htpasswd_auth_wants_the_right_credentials() {
    require_root();
    let fixtures = fixtures();
    let registry = Registry::start(Some(("kiln", "fixture-password")));
    let work = tempfile::tempdir().unwrap();
    let demo = fixtures.demo();
    let layers = fixtures.layers();
    registry.push(demo, "demo:latest");
    registry.push(layers, "layers:latest");

    assert_eq!(
        pull(
            &registry,
            "layers:latest",
            Some("kiln:fixture-password"),
            work.path()
        ),
        Ok(layers.oci_gzip.manifest_digest.clone())
    );
    for creds in [None, Some("kiln:wrong"), Some("nobody:fixture-password")] {
        let refused = pull(&registry, "demo:latest", creds, work.path())
            .expect_err("pull without valid credentials");
        assert!(
            refused.contains("unauthorized") || refused.contains("authentication required"),
            "{creds:?}: {refused}"
        );
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn registry_restart_keeps_its_storage() {
    require_root();
    let demo = fixtures().demo();
    let mut registry = Registry::start(None);
    let work = tempfile::tempdir().unwrap();
    registry.push(demo, "demo:latest");
    registry.stop();
    assert!(
        pull(&registry, "demo:latest", None, work.path()).is_err(),
        "stopped registry answered"
    );
    registry.restart();
    assert_eq!(
        pull(&registry, "demo:latest", None, work.path()),
        Ok(demo.oci_gzip.manifest_digest.clone())
    );
}

/// Starts `scripts/make-fixtures` (without debian) on `cache` in its own process group.
fn spawn_make_fixtures(cache: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    Command::new("bash")
        .arg(kiln_e2e::workspace_root().join("scripts/make-fixtures"))
        .env("KILN_FIXTURES_CACHE", cache)
        .env("KILN_FIXTURES_SKIP_DEBIAN", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("starting make-fixtures")
}

fn finish(child: std::process::Child) -> (String, String) {
    let output = child.wait_with_output().expect("waiting for make-fixtures");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "make-fixtures failed: {stderr}");
    (
        String::from_utf8(output.stdout).unwrap().trim().to_owned(),
        stderr,
    )
}

fn published_and_temp(cache: &Path) -> (Vec<String>, Vec<String>) {
    let names: Vec<String> = fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with(".lock-"))
        .collect();
    names.into_iter().partition(|n| !n.starts_with(".tmp-"))
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn make_fixtures_survives_kills_and_concurrent_runs() {
    require_root();
    let cache = tempfile::tempdir().unwrap();

    // A run killed mid-build publishes nothing.
    let mut killed = spawn_make_fixtures(cache.path());
    let deadline = Instant::now() + Duration::from_secs(120);
    while published_and_temp(cache.path()).1.is_empty() {
        assert!(
            Instant::now() < deadline,
            "make-fixtures never started a build"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_process_group(&killed);
    killed.wait().unwrap();
    assert!(
        published_and_temp(cache.path()).0.is_empty(),
        "a killed build published something"
    );

    // Two concurrent runs agree on one published directory and clean up the leftovers.
    let first = spawn_make_fixtures(cache.path());
    let second = spawn_make_fixtures(cache.path());
    let (dir_a, _) = finish(first);
    let (dir_b, _) = finish(second);
    assert_eq!(dir_a, dir_b);
    assert!(Path::new(&dir_a).join("manifest.json").is_file());
    let (published, temp) = published_and_temp(cache.path());
    assert!(temp.is_empty(), "leftover temp dirs {temp:?}");
    assert!(
        published.iter().any(|p| Path::new(&dir_a).ends_with(p)),
        "{published:?}"
    );

    // A third run finds everything cached.
    let (dir_c, log) = finish(spawn_make_fixtures(cache.path()));
    assert_eq!(dir_c, dir_a);
    assert!(!log.contains("building"), "cached run rebuilt: {log}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn registry_script_serves_fixtures_until_terminated() {
    require_root();
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;

    let demo = fixtures().demo();
    let mut script = Command::new("bash")
        .arg(kiln_e2e::workspace_root().join("scripts/registry"))
        .args(["--auth", "kiln:script-password", "demo"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("starting scripts/registry");
    // The first stdout line is the address, printed once the fixtures are pushed.
    let stdout = script.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = sender.send(line);
    });
    let addr = match receiver.recv_timeout(TOOL_TIMEOUT) {
        Ok(line) if !line.trim().is_empty() => line.trim().to_owned(),
        other => {
            kill_process_group(&script);
            panic!("scripts/registry printed no address: {other:?}");
        }
    };
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let reference = format!("docker://{addr}/demo:latest");
    let inspect = |creds: &str| {
        run_with_timeout(
            Command::new("skopeo").args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                creds,
                &reference,
            ]),
            TOOL_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let with_creds = inspect("--creds=kiln:script-password");
    let without_creds = inspect("--no-creds");

    // SIGTERM to the script alone: its trap stops the registry and removes the temp dir.
    let pid = libc::pid_t::try_from(script.id()).unwrap();
    // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let output = script.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();

    assert!(with_creds.status.success(), "{log}");
    assert_eq!(
        sha256_digest(&with_creds.stdout),
        demo.oci_gzip.manifest_digest
    );
    assert!(!without_creds.status.success(), "anonymous pull allowed");
    let storage = log
        .split_whitespace()
        .find(|w| w.ends_with("/storage);"))
        .map(|w| w.trim_start_matches('(').trim_end_matches(");"))
        .unwrap_or_else(|| panic!("no storage dir in the log: {log}"));
    let work_dir = Path::new(storage).parent().unwrap();
    assert!(!work_dir.exists(), "{} left behind", work_dir.display());
    assert!(
        !inspect("--creds=kiln:script-password").status.success(),
        "the registry still serves after the script was terminated"
    );
}
