//! `kiln build` processes: concurrent builds of one image build it once, and a build
//! killed with SIGKILL leaves nothing half-visible; the next build publishes a good image.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::{fixtures, require_root, run_ok, KilnRoot};

const TIMEOUT: Duration = Duration::from_secs(600);

fn build_command(root: &KilnRoot, layout: &Path) -> Command {
    let mut command = root.kiln();
    command
        .arg("--json")
        .arg("build")
        .arg(format!("oci:{}:latest", layout.display()));
    command
}

fn key_dir(root: &Path, manifest_digest: &str) -> PathBuf {
    root.join("rootfs/v1")
        .join(manifest_digest.replace(':', "-"))
}

fn fsck(path: &Path) {
    run_ok(Command::new("fsck.erofs").arg(path), TIMEOUT);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn concurrent_builds_of_one_image_build_once() {
    require_root();
    let image = &fixtures().layers().oci_gzip;
    let root = KilnRoot::without_guest();
    let children: Vec<_> = (0..3)
        .map(|_| {
            build_command(&root, &image.path)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<serde_json::Value> = children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success());
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect();
    let built = |key: &str| outputs.iter().filter(|o| o[key] == true).count();
    assert_eq!(built("root_built"), 1, "{outputs:?}");
    assert_eq!(built("identity_built"), 1, "{outputs:?}");
    assert!(outputs.iter().all(|o| o["root"] == outputs[0]["root"]));
    let dir = key_dir(&root.path(), &image.manifest_digest);
    assert_eq!(
        PathBuf::from(outputs[0]["root"].as_str().unwrap()),
        dir.join("root.erofs")
    );
    fsck(&dir.join("root.erofs"));
    fsck(&dir.join("identity-10001-10001.erofs"));
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_killed_build_leaves_nothing_half_visible() {
    require_root();
    let fixtures = fixtures();
    let fixture = fixtures.debian().unwrap_or_else(|| fixtures.layers());
    let image = &fixture.oci_gzip;
    let root = KilnRoot::without_guest();
    // Pull first, so the kill lands in the build.
    run_ok(
        root.kiln()
            .arg("-q")
            .arg("pull")
            .arg(format!("oci:{}:latest", image.path.display())),
        TIMEOUT,
    );
    let dir = key_dir(&root.path(), &image.manifest_digest);
    let temp_exists = || {
        std::fs::read_dir(&dir).is_ok_and(|entries| {
            entries.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".tmp-root.erofs.")
            })
        })
    };
    let mut child = build_command(&root, &image.path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !temp_exists() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let image_path = dir.join("root.erofs");
    if image_path.exists() {
        // The build won the race: what is visible must be complete.
        fsck(&image_path);
    }

    let out = run_ok(&mut build_command(&root, &image.path), TIMEOUT);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(PathBuf::from(report["root"].as_str().unwrap()), image_path);
    fsck(&image_path);
    assert!(
        !temp_exists(),
        "leftover temporary files in {}",
        dir.display()
    );
}
