//! `kiln kube supervisor-image`: the OCI layout it writes is read back with umoci and
//! skopeo, the unpacked busybox performs the pod's install step, and `--push` reaches a
//! real loopback docker-registry (with and without htpasswd auth), from which skopeo
//! pulls the same manifest back.
//!
//! The static supervisor is $KILN_SUPERVISOR_BIN when set (scripts/build-supervisor's
//! output); otherwise Debian's static busybox stands in for it, since the image builder's
//! contract is "a static x86_64 executable", which both are.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kiln_e2e::{kiln_bin, run_ok, run_with_timeout, sha256_digest, KilnRoot, Registry};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(300);
const BUSYBOX: &str = "/bin/busybox";

fn supervisor() -> PathBuf {
    std::env::var_os("KILN_SUPERVISOR_BIN").map_or_else(|| PathBuf::from(BUSYBOX), PathBuf::from)
}

fn kiln(args: &[&str]) -> Output {
    kiln_with(&supervisor(), args)
}

fn kiln_with(supervisor: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(kiln_bin());
    command
        .args(["kube", "supervisor-image", "--busybox", BUSYBOX])
        .arg("--supervisor")
        .arg(supervisor);
    command.args(args).env_remove("KILN_REGISTRY_CREDS");
    run_with_timeout(&mut command, TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

fn kiln_ok(args: &[&str]) -> String {
    let output = kiln(args);
    assert!(
        output.status.success(),
        "kiln {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The `manifest sha256:...` line kiln prints.
fn printed_digest(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("manifest "))
        .expect("a manifest line")
        .to_owned()
}

fn skopeo(args: &[&str]) -> Vec<u8> {
    run_ok(Command::new("skopeo").args(args), TIMEOUT).stdout
}

fn skopeo_digest(image: &str, extra: &[&str]) -> String {
    let mut args = vec!["inspect"];
    args.extend_from_slice(extra);
    args.push(image);
    let info: Value = serde_json::from_slice(&skopeo(&args)).unwrap();
    info["Digest"].as_str().unwrap().to_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn layout_unpacks_with_umoci_and_its_busybox_installs_the_supervisor() {
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let stdout = kiln_ok(&["-o", &format!("oci:{}:v1", layout.display())]);
    let digest = printed_digest(&stdout);
    assert_eq!(
        skopeo_digest(&format!("oci:{}:v1", layout.display()), &[]),
        digest
    );

    // The same inputs give the same image.
    let again = work.path().join("again");
    assert_eq!(
        printed_digest(&kiln_ok(&["-o", &format!("oci:{}:v1", again.display())])),
        digest
    );

    // Writing over an existing layout is refused, and leaves it alone.
    let output = kiln(&["-o", &format!("oci:{}:v2", layout.display())]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
    assert_eq!(
        skopeo_digest(&format!("oci:{}:v1", layout.display()), &[]),
        digest
    );

    let bundle = work.path().join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle),
        TIMEOUT,
    );
    let rootfs = bundle.join("rootfs");
    for (inside, original) in [
        ("kiln-supervisor", supervisor()),
        ("bin/busybox", PathBuf::from(BUSYBOX)),
    ] {
        let unpacked = rootfs.join(inside);
        assert_eq!(
            fs::read(&unpacked).unwrap(),
            fs::read(&original).unwrap(),
            "{inside}"
        );
        assert_eq!(
            fs::metadata(&unpacked).unwrap().permissions().mode() & 0o7777,
            0o755,
            "{inside}"
        );
    }
    let config: Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["process"]["args"][0], "/kiln-supervisor");

    // What the pod's install-supervisor init container runs, with the image's own busybox.
    let installed = work.path().join("kiln-bin/kiln-supervisor");
    fs::create_dir(installed.parent().unwrap()).unwrap();
    run_ok(
        Command::new(rootfs.join("bin/busybox"))
            .arg("cp")
            .arg(rootfs.join("kiln-supervisor"))
            .arg(&installed),
        TIMEOUT,
    );
    assert_eq!(
        fs::read(&installed).unwrap(),
        fs::read(supervisor()).unwrap()
    );
    assert_ne!(
        fs::metadata(&installed).unwrap().permissions().mode() & 0o111,
        0,
        "installed supervisor is executable"
    );
}

#[test]
fn push_reaches_a_loopback_registry_and_pulls_back_the_same_manifest() {
    let registry = Registry::start(None);
    let reference = format!("{}/kiln/kiln-supervisor:test", registry.addr());
    let digest = printed_digest(&kiln_ok(&["--push", &reference]));
    let authfile = registry.empty_auth_file();
    let source = format!("docker://{reference}");
    let tls = ["--tls-verify=false", "--authfile", path_str(&authfile)];
    assert_eq!(skopeo_digest(&source, &tls), digest);

    // Pulled into a layout, the manifest bytes hash to the same digest.
    let work = tempfile::tempdir().unwrap();
    let pulled = work.path().join("pulled");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--authfile",
        path_str(&authfile),
        &source,
        &format!("oci:{}:test", pulled.display()),
    ]);
    let index: Value =
        serde_json::from_slice(&fs::read(pulled.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    let manifest = fs::read(
        pulled
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap();
    assert_eq!(sha256_digest(&manifest), digest);

    // Pulled back with kiln itself (kiln-image).
    let root = KilnRoot::without_guest();
    let stdout = root.ok(&["pull", &source]);
    assert_eq!(
        stdout.split_whitespace().last(),
        Some(digest.as_str()),
        "kiln pull printed: {stdout}"
    );

    // A second push finds the blobs there and still tags the manifest.
    let retag = format!("{}/kiln/kiln-supervisor:again", registry.addr());
    assert_eq!(printed_digest(&kiln_ok(&["--push", &retag])), digest);
    assert_eq!(skopeo_digest(&format!("docker://{retag}"), &tls), digest);
}

#[test]
fn push_with_basic_auth_needs_credentials() {
    let registry = Registry::start(Some(("kiln", "s3cret")));
    let reference = format!("{}/kiln-supervisor:auth", registry.addr());

    let output = kiln(&["--push", &reference]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--creds"), "{stderr}");

    let output = kiln(&["--push", &reference, "--creds", "kiln:wrong"]);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let digest = printed_digest(&kiln_ok(&["--push", &reference, "--creds", "kiln:s3cret"]));
    let authfile = registry.empty_auth_file();
    let args = [
        "--tls-verify=false",
        "--authfile",
        path_str(&authfile),
        "--creds",
        "kiln:s3cret",
    ];
    assert_eq!(
        skopeo_digest(&format!("docker://{reference}"), &args),
        digest
    );
}

#[test]
fn bad_inputs_are_usage_errors() {
    let work = tempfile::tempdir().unwrap();
    let script = work.path().join("not-elf");
    fs::write(&script, "#!/bin/sh\n").unwrap();
    let out = format!("oci:{}", work.path().join("out").display());
    for (binary, args, needle) in [
        (supervisor(), vec!["-o", "/tmp/no-oci-prefix"], "oci:DIR"),
        (
            supervisor(),
            vec!["--push", "kiln-supervisor:1"],
            "explicit registry host",
        ),
        (script.clone(), vec!["-o", &out], "not an ELF file"),
        (kiln_bin(), vec!["-o", &out], "dynamically linked"),
    ] {
        let output = kiln_with(&binary, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    assert!(
        !work.path().join("out").exists(),
        "nothing is written on bad input"
    );
}
