//! kiln trusts only its own state (issue 17 item 1): the attacks of a user who can write
//! into kiln's `--root`, performed as that user (uid 65534 through setpriv, or files
//! handed to it with chown) against the `kiln` binary run as root. A shared or foreign
//! root is refused with the fix; under `umask 000` kiln still writes 0700 directories
//! and 0600 files; a planted sandbox record naming a program never runs it; a planted
//! root image is not booted; a planted lock symlink is not followed; guest files of
//! another user are refused. Sandboxes boot for real under TCG where the attack needs one.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{
    demo_image, describe, fixtures, guest_files, require_root, run_ok, run_with_timeout, text,
    KilnRoot, KILN_TIMEOUT,
};

/// The other user: nobody/nogroup on Debian.
const OTHER: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

/// `sh -c SCRIPT sh ARGS...` as the other user (uid and gid 65534, no other groups); it
/// must succeed.
fn as_other_user(script: &str, args: &[&Path]) {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={OTHER}"))
        .arg(format!("--regid={OTHER}"))
        .args(["--clear-groups", "sh", "-c", script, "sh"])
        .args(args);
    run_ok(&mut command, Duration::from_secs(30));
}

/// Lets the other user reach the root (the test's temp dir is root's own, 0700).
fn open_the_way(root: &KilnRoot) {
    chmod(root.temp_dir(), 0o755);
}

/// `kiln ARGS` failed with `code`, and its message says each of `words`.
fn assert_refused(output: &Output, code: i32, words: &[&str]) {
    assert_eq!(output.status.code(), Some(code), "{}", describe(output));
    let stderr = text(&output.stderr);
    for word in words {
        assert!(
            stderr.contains(word),
            "{word:?} missing: {}",
            describe(output)
        );
    }
}

/// The cache directory of the demo image's root image, as `rootfs/v1/sha256-HEX`.
fn demo_cache_dir(root: &KilnRoot) -> PathBuf {
    let digest = &fixtures().demo().oci_gzip.manifest_digest;
    root.path().join("rootfs/v1").join(digest.replace(':', "-"))
}

/// The directories from `rootfs` down to the demo's cache directory.
fn cache_chain(root: &KilnRoot) -> [PathBuf; 3] {
    let key = demo_cache_dir(root);
    let v1 = key.parent().unwrap().to_path_buf();
    [v1.parent().unwrap().to_path_buf(), v1, key]
}

/// The demo's cache directory as a kiln of old left it under `umask 000`: anyone can
/// write into it, and reach it.
fn open_cache_dir(root: &KilnRoot) -> PathBuf {
    let chain = cache_chain(root);
    fs::create_dir_all(&chain[2]).unwrap();
    for dir in &chain {
        chmod(dir, 0o777);
    }
    open_the_way(root);
    chain[2].clone()
}

/// What `kiln` says to do about it: `chmod 700` each directory.
fn close_cache_dir(root: &KilnRoot) {
    for dir in cache_chain(root) {
        chmod(&dir, 0o700);
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_shared_or_foreign_root_is_refused_with_the_fix() {
    require_root();
    let root = KilnRoot::without_guest();
    let dir = root.path();
    let shown = dir.display().to_string();

    for mode in [0o777, 0o1777, 0o770] {
        chmod(&dir, mode);
        let mode_text = format!("mode {mode:o}");
        for args in [&["images"][..], &["ps", "-a"], &["pull", &demo_image()]] {
            let output = root.run(args);
            assert_refused(&output, 1, &[&shown, &mode_text, "chmod 700"]);
        }
    }
    chmod(&dir, 0o700);
    root.ok(&["pull", &demo_image()]);

    chown(&dir, OTHER);
    let output = root.run(&["images"]);
    assert_refused(&output, 1, &[&shown, "belongs to uid 65534", "chown"]);
    chown(&dir, 0);

    // Every directory kiln uses is checked when its owner opens it, not only the root.
    root.ok(&["build", &demo_image()]);
    root.ok(&["ps", "-a"]);
    for (sub, args) in [
        ("store/blobs/sha256", &["images"][..]),
        ("rootfs/v1", &["build", &demo_image()]),
        ("sandboxes", &["ps", "-a"]),
    ] {
        let sub_dir = dir.join(sub);
        chmod(&sub_dir, 0o777);
        let output = root.run(args);
        assert_refused(&output, 1, &[&sub_dir.display().to_string(), "mode 777"]);
        chmod(&sub_dir, 0o700);
        root.ok(args);
    }

    // A parent others can write lets them replace the root itself.
    chmod(root.temp_dir(), 0o777);
    let output = root.run(&["images"]);
    assert_refused(
        &output,
        1,
        &[&root.temp_dir().display().to_string(), "replace"],
    );
    chmod(root.temp_dir(), 0o700);
}

/// Every directory and regular file under `dir`, with its permission bits.
fn modes_under(dir: &Path) -> Vec<(PathBuf, bool, u32)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path.clone());
            }
            found.push((path, meta.is_dir(), meta.mode() & 0o7777));
        }
    }
    found
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn under_umask_000_pull_and_build_leave_directories_0700_and_files_0600() {
    require_root();
    let root = KilnRoot::without_guest();
    // kiln creates the root itself.
    fs::remove_dir(root.path()).unwrap();
    for args in [["pull", &demo_image()], ["build", &demo_image()]] {
        let mut command = root.kiln();
        command.args(args);
        // SAFETY: umask is async-signal-safe and touches no memory.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        let output = run_with_timeout(&mut command, KILN_TIMEOUT).unwrap();
        assert!(output.status.success(), "{args:?}: {}", describe(&output));
    }
    assert_eq!(
        fs::metadata(root.path()).unwrap().mode() & 0o7777,
        0o700,
        "the root"
    );
    let entries = modes_under(&root.path());
    let wrong: Vec<_> = entries
        .iter()
        .filter(|(_, is_dir, mode)| *mode != if *is_dir { 0o700 } else { 0o600 })
        .collect();
    assert!(wrong.is_empty(), "not 0700/0600: {wrong:?}");
    let has = |suffix: &str| {
        entries
            .iter()
            .any(|(path, _, _)| path.to_string_lossy().ends_with(suffix))
    };
    for expected in [
        ".lock",
        "gc.lock",
        ".json",
        "root.erofs",
        "root.identity.json",
        "identity-10001-10001.erofs",
        ".lock-root.erofs",
    ] {
        assert!(has(expected), "no {expected} under the root: {entries:?}");
    }
}

/// Polls `kiln logs ID` until its stdout contains `wanted`.
fn wait_for_log(root: &KilnRoot, id: &str, wanted: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if root.ok(&["logs", id]).contains(wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{wanted:?} never appeared in the logs of {id}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// A program that leaves `marker` behind if anyone ever runs it.
fn planted_program(root: &KilnRoot) -> (PathBuf, PathBuf) {
    let marker = root.temp_dir().join("planted-program-ran");
    let program = root.temp_dir().join("planted-vmm");
    fs::write(
        &program,
        format!("#!/bin/sh\ntouch '{}'\nexit 1\n", marker.display()),
    )
    .unwrap();
    chmod(&program, 0o755);
    (program, marker)
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_sandbox_record_naming_a_program_never_runs_it() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let id = root
        .ok(&[
            "create",
            &demo_image(),
            "sh",
            "-c",
            "echo genuine; exec sleep 100000",
        ])
        .trim()
        .to_owned();
    let (program, marker) = planted_program(&root);
    let sandboxes = root.path().join("sandboxes");
    let sandbox = sandboxes.join(&id);
    let mut record: serde_json::Value =
        serde_json::from_slice(&fs::read(sandbox.join("sandbox.json")).unwrap()).unwrap();
    assert!(record.get("qemu").is_none(), "kiln records no program");
    record["qemu"] = program.to_str().unwrap().into();
    let planted = root.temp_dir().join("planted.json");
    fs::write(&planted, serde_json::to_vec(&record).unwrap()).unwrap();
    chmod(&planted, 0o644);

    // The attack: in a sandboxes directory anyone can write, the other user moves root's
    // sandbox aside and puts one of its own, naming its program, in its place.
    open_the_way(&root);
    chmod(&sandboxes, 0o777);
    as_other_user(
        r#"mv "$1" "$1.moved" && mkdir "$1" && cp "$2" "$1/sandbox.json""#,
        &[&sandbox, &planted],
    );
    let output = root.run(&["start", &id]);
    assert_refused(
        &output,
        1,
        &[&sandboxes.display().to_string(), "mode 777", "chmod 700"],
    );
    // The fix the error names leaves the planted directory, which is not kiln's.
    chmod(&sandboxes, 0o700);
    let output = root.run(&["start", &id]);
    assert_refused(&output, 1, &["belongs to uid 65534"]);
    assert!(!marker.exists(), "the planted program ran");

    // Put root's sandbox back, with a record of kiln's own that names the program (as
    // older kilns recorded their VMM): the start boots kiln's configured QEMU instead.
    fs::remove_dir_all(&sandbox).unwrap();
    fs::rename(sandbox.with_extension("moved"), &sandbox).unwrap();
    let record_path = sandbox.join("sandbox.json");
    fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    assert_eq!(fs::metadata(&record_path).unwrap().mode() & 0o777, 0o600);
    root.ok(&["start", &id]);
    wait_for_log(&root, &id, "genuine");
    assert!(!marker.exists(), "the program the record names ran");
    root.ok(&["rm", "-f", &id]);
}

/// Prints which filesystem the workload got: the demo image has no /data/original, the
/// `layers` fixture (the attacker's) has.
const WHICH_ROOT: &str = "if [ -e /data/original ]; then echo planted; else echo genuine; fi";

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_planted_root_image_is_not_booted() {
    require_root();
    // The attacker's filesystem: the `layers` fixture built by kiln into a root image.
    let attacker = KilnRoot::without_guest().quiet();
    let layers = &fixtures().layers().oci_gzip;
    let layers_ref = format!("oci:{}:{}", layers.path.display(), layers.tag);
    attacker.ok(&["build", &layers_ref]);
    let built = attacker
        .path()
        .join("rootfs/v1")
        .join(layers.manifest_digest.replace(':', "-"));
    let staging = attacker.temp_dir().join("planted");
    fs::create_dir(&staging).unwrap();
    for name in ["root.erofs", "root.identity.json"] {
        fs::copy(built.join(name), staging.join(name)).unwrap();
        chmod(&staging.join(name), 0o644);
    }
    chmod(&staging, 0o755);
    open_the_way(&attacker);

    let root = KilnRoot::with_guest().quiet();
    root.ok(&["pull", &demo_image()]);
    let key = open_cache_dir(&root);
    as_other_user(r#"cp "$1"/* "$2"/"#, &[&staging, &key]);
    let planted = fs::read(key.join("root.erofs")).unwrap();
    assert_eq!(fs::metadata(key.join("root.erofs")).unwrap().uid(), OTHER);

    let run = ["run", "--rm", &demo_image(), "sh", "-c", WHICH_ROOT];
    let output = root.run(&run);
    assert_refused(&output, 125, &["rootfs", "mode 777", "chmod 700"]);
    close_cache_dir(&root);
    let output = root.run(&run);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        text(&output.stdout).trim(),
        "genuine",
        "{}",
        describe(&output)
    );
    let image = key.join("root.erofs");
    let meta = fs::metadata(&image).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    assert_ne!(
        fs::read(&image).unwrap(),
        planted,
        "the planted image is gone"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_planted_lock_symlink_is_not_followed() {
    require_root();
    let root = KilnRoot::without_guest().quiet();
    root.ok(&["pull", &demo_image()]);
    let key = open_cache_dir(&root);
    // Somewhere only root may create files: what the other user wants root to write.
    let private = root.temp_dir().join("root-only");
    fs::create_dir(&private).unwrap();
    chmod(&private, 0o700);
    let victim = private.join("created-by-kiln");
    let lock = key.join(".lock-root.erofs");
    as_other_user(r#"ln -s "$1" "$2""#, &[&victim, &lock]);

    let output = root.run(&["build", &demo_image()]);
    assert_refused(&output, 1, &["mode 777"]);
    close_cache_dir(&root);
    let output = root.run(&["build", &demo_image()]);
    assert_refused(&output, 1, &[&lock.display().to_string(), "symlink"]);
    assert!(!victim.exists(), "kiln followed the planted lock");

    fs::remove_file(&lock).unwrap();
    root.ok(&["build", &demo_image()]);
    assert!(!victim.exists());
    assert!(fs::symlink_metadata(&lock).unwrap().is_file());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn guest_files_of_another_user_are_refused() {
    require_root();
    // No KILN_KERNEL / KILN_INITRAMFS: kiln takes the files installed under the root.
    let root = KilnRoot::without_guest();
    let guest = root.path().join("guest");
    fs::create_dir(&guest).unwrap();
    let files = guest_files();
    for (source, name) in [(&files.kernel, "kernel"), (&files.initramfs, "initramfs")] {
        fs::copy(source, guest.join(name)).unwrap();
        chmod(&guest.join(name), 0o644);
    }
    let kernel_check = |root: &KilnRoot| -> serde_json::Value {
        let output = root.run(&["--json", "doctor"]);
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", describe(&output)));
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|check| check["name"] == "kernel")
            .cloned()
            .unwrap()
    };
    assert_eq!(kernel_check(&root)["ok"], true);

    chown(&guest.join("kernel"), OTHER);
    let check = kernel_check(&root);
    assert_eq!(check["ok"], false);
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("belongs to uid 65534"),
        "{check}"
    );
    let output = root.run(&["run", "--rm", &demo_image(), "true"]);
    assert_refused(
        &output,
        125,
        &["guest kernel", "belongs to uid 65534", "build-guest"],
    );
}
