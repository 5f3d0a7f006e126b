//! `kiln run -v HOSTDIR:GUESTDIR[:ro]` end to end (real TCG boots of the demo fixture image
//! through the `kiln` binary): the sandbox user writes to a read-write volume, the file is
//! the kiln user's on the host (QEMU's 0600/0700 modes, symlinks as plain files) and the
//! sandbox user's in the guest, pre-existing host files keep their host ownership in the
//! guest and stay readable; a read-only volume
//! refuses writes in the guest and stays unchanged on the host; a missing host directory
//! or a host file is refused before boot.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use kiln_e2e::{demo_image, describe, require_root, text, KilnRoot};

/// The `key=value` lines of `stdout`.
fn facts(stdout: &[u8]) -> BTreeMap<String, String> {
    text(stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn read_write_and_read_only_volumes() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let (rw, ro) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fs::write(rw.path().join("host.txt"), "from the host\n").unwrap();
    fs::set_permissions(
        rw.path().join("host.txt"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    fs::write(ro.path().join("ro.txt"), "read only\n").unwrap();
    fs::set_permissions(ro.path().join("ro.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    // Wide open on the host, so that only the read-only mount can refuse the write.
    fs::set_permissions(ro.path(), fs::Permissions::from_mode(0o777)).unwrap();

    let script = "echo made > /data/made.txt; echo made=$?; echo made_owner=$(stat -c %u:%g /data/made.txt); \
        echo root_owner=$(stat -c %u:%g /data); echo host_file=$(cat /data/host.txt); \
        echo host_file_owner=$(stat -c %u:%g /data/host.txt); echo ro_read=$(cat /in/ro.txt); \
        echo ro_error=$(touch /in/new 2>&1); touch /in/new 2>/dev/null; echo ro_write=$?; \
        echo made_mode=$(stat -c %a /data/made.txt); ln -s /etc/passwd /data/link; \
        echo link=$(readlink /data/link); mkdir /data/sub";
    let (rw_arg, ro_arg) = (
        format!("{}:/data", rw.path().display()),
        format!("{}:/in:ro", ro.path().display()),
    );
    let output = root.run(&[
        "run",
        "--rm",
        "-v",
        &rw_arg,
        "-v",
        &ro_arg,
        "--entrypoint",
        "/bin/sh",
        &demo_image(),
        "-c",
        script,
    ]);
    root.assert_nothing_left();
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let facts = facts(&output.stdout);
    let fact = |key: &str| {
        facts
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {key}: {}", describe(&output)))
    };
    // SAFETY: plain system calls.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };

    // In the guest: created files and the volume root are the sandbox user's; a host file
    // shows its host owner and is readable.
    assert_eq!(fact("made"), "0");
    assert_eq!(fact("made_owner"), "10001:10001");
    assert_eq!(fact("root_owner"), "10001:10001");
    assert_eq!(fact("host_file"), "from the host");
    assert_eq!(fact("host_file_owner"), format!("{euid}:{egid}"));
    assert_eq!(fact("ro_read"), "read only");
    assert_ne!(
        fact("ro_write"),
        "0",
        "a write to a read-only volume succeeded"
    );
    assert!(
        fact("ro_error").contains("Read-only file system"),
        "{}",
        describe(&output)
    );

    // On the host: the file is there, owned by whoever ran kiln, never the guest's uid.
    let made = rw.path().join("made.txt");
    assert_eq!(fs::read_to_string(&made).unwrap(), "made\n");
    let meta = fs::metadata(&made).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (euid, egid),
        "host owner of a guest-created file"
    );
    assert_eq!(
        meta.mode() & 0o7777,
        0o600,
        "QEMU's mapped-xattr host mode of files"
    );
    assert_eq!(
        fs::metadata(rw.path()).unwrap().uid(),
        euid,
        "the volume root keeps its host owner"
    );
    // A guest symlink is a plain file on the host (its target as content), so it can
    // never lead a host program elsewhere; the guest sees the symlink.
    assert_eq!(fact("made_mode"), "644");
    assert_eq!(fact("link"), "/etc/passwd");
    assert_eq!(
        fs::metadata(rw.path().join("sub")).unwrap().mode() & 0o7777,
        0o700
    );
    let link = fs::symlink_metadata(rw.path().join("link")).unwrap();
    assert!(link.file_type().is_file(), "{link:?}");
    assert_eq!(names_in(ro.path()), ["ro.txt"]);
    assert_eq!(
        fs::read_to_string(ro.path().join("ro.txt")).unwrap(),
        "read only\n"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_missing_host_directory_or_a_host_file_is_refused_before_boot() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    fs::write(&file, "").unwrap();
    for host in [dir.path().join("missing"), file] {
        let volume = format!("{}:/data", host.display());
        let output = root.run(&["run", "--rm", "-v", &volume, &demo_image(), "true"]);
        root.assert_nothing_left();
        assert_eq!(output.status.code(), Some(125), "{}", describe(&output));
        let stderr = text(&output.stderr);
        assert!(
            stderr.contains(&host.display().to_string()),
            "{}",
            describe(&output)
        );
        assert!(
            stderr.contains("HOSTDIR:GUESTDIR[:ro]"),
            "{}",
            describe(&output)
        );
        let sandboxes = root.path().join("sandboxes");
        let left: Vec<String> = if sandboxes.exists() {
            names_in(&sandboxes)
        } else {
            Vec::new()
        };
        assert!(
            left.iter().all(|n| n == ".names"),
            "a sandbox was left: {left:?}"
        );
    }
}
