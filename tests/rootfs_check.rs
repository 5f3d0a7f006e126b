//! `kiln check` on fixture images: exit 0 with the resolved command when the image can
//! run as a sandbox, exit 1 naming the blocker when it cannot.

use std::process::Command;
use std::time::Duration;

use kiln_e2e::{fixtures, require_root, run_ok, run_with_timeout, KilnRoot};

const TIMEOUT: Duration = Duration::from_secs(600);

fn check(root: &KilnRoot, layout: &std::path::Path, tag: &str) -> (i32, serde_json::Value) {
    let out = run_with_timeout(
        root.kiln()
            .arg("--json")
            .arg("check")
            .arg(format!("oci:{}:{tag}", layout.display())),
        TIMEOUT,
    )
    .expect("kiln check finished in time");
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), report)
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn check_passes_the_layers_fixture_and_blocks_a_missing_command() {
    require_root();
    let fixture = fixtures().layers();
    let work = tempfile::tempdir().unwrap();
    let root = KilnRoot::without_guest();

    let (code, report) = check(&root, &fixture.oci_gzip.path, &fixture.oci_gzip.tag);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["can_run"], true);
    assert_eq!(report["platform"], "linux/amd64");
    assert_eq!(report["command"], "/bin/sh");
    let messages: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["message"].as_str().unwrap())
        .collect();
    // The fixture's passwd has a stale sandbox user and `app` on uid 10001.
    assert!(
        messages
            .iter()
            .any(|m| m.contains("sandbox user (2000:2000)")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("user app already has uid 10001")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("setuid/setgid")),
        "{messages:?}"
    );

    // The same image whose entrypoint names a program it lacks.
    let layout = work.path().join("layout");
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(&fixture.oci_gzip.path)
            .arg(&layout),
        TIMEOUT,
    );
    run_ok(
        Command::new("umoci")
            .arg("config")
            .arg("--image")
            .arg(format!("{}:{}", layout.display(), fixture.oci_gzip.tag))
            .args([
                "--config.entrypoint",
                "/usr/bin/not-there",
                "--tag",
                "broken",
            ]),
        TIMEOUT,
    );
    let (code, report) = check(&root, &layout, "broken");
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["can_run"], false);
    let blocker = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["severity"] == "blocker")
        .unwrap();
    assert!(
        blocker["message"]
            .as_str()
            .unwrap()
            .contains("/usr/bin/not-there"),
        "{blocker}"
    );
}
