//! `kiln run -v HOSTDIR:GUESTDIR[:ro]` end to end (real TCG boots of the demo fixture image
//! through the `kiln` binary): the sandbox user writes to a read-write volume, the file is
//! the kiln user's on the host (QEMU's 0600/0700 modes, symlinks as plain files) and the
//! sandbox user's in the guest, pre-existing host files of the kiln user show as the VMM's
//! (kiln-vmm's, see docs/security.md) in the guest and stay readable; a read-only volume
//! refuses writes in the guest and stays unchanged on the host; a missing host directory
//! or a host file is refused before boot.
//!
//! Pinning (issue 17 item 5): a host directory another user could replace is refused at
//! create; a volume swapped for a symlink to a root-only directory (by `nobody`, uid
//! 65534) or replaced by another directory after create is refused at start, naming the
//! volume, with nothing shared or chowned; put back, it boots, and QEMU serves it through
//! the descriptor kiln checked, never by its path.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, symlink, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

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
    // QEMU serves the volume through a mount that shows kiln's files as its own uid's.
    let (vmm_uid, vmm_gid) = kiln_vm::jail::existing_vmm_account().expect("kiln-vmm exists");
    assert_eq!(fact("host_file_owner"), format!("{vmm_uid}:{vmm_gid}"));
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

/// The uid and gid the attacks run as.
const NOBODY: u32 = 65534;

/// A directory under /tmp that root owns and everyone may enter (mode 0755), so that
/// `nobody` can reach what the test hands it below.
fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A directory only root may read (0700), with a file in it: what an attacker wants shared.
fn root_only_dir(under: &Path) -> PathBuf {
    let secret = under.join("secret");
    fs::create_dir(&secret).unwrap();
    fs::write(secret.join("key"), "root only\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700)).unwrap();
    secret
}

/// Runs `script` with `sh -c` in `dir` as uid and gid 65534, which must succeed.
fn as_nobody(dir: &Path, script: &str) {
    let output = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(output.status.success(), "as nobody: {}", describe(&output));
}

/// The names of the extended attributes of `path` itself (not following a symlink).
fn xattr_names(path: &Path) -> Vec<String> {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buffer = vec![0u8; 4096];
    // SAFETY: `c_path` is NUL-terminated and `buffer` is writable for its whole length.
    let length =
        unsafe { libc::llistxattr(c_path.as_ptr(), buffer.as_mut_ptr().cast(), buffer.len()) };
    assert!(
        length >= 0,
        "{}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    buffer.truncate(length as usize);
    buffer
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect()
}

/// Asserts that `secret` is as [`root_only_dir`] made it: nothing shared it or chowned it.
fn assert_untouched(secret: &Path) {
    let meta = fs::metadata(secret).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 0, 0o700)
    );
    assert_eq!(names_in(secret), ["key"]);
    let virtfs: Vec<String> = xattr_names(secret)
        .into_iter()
        .filter(|n| n.starts_with("user.virtfs"))
        .collect();
    assert!(
        virtfs.is_empty(),
        "the guest chowned {}: {virtfs:?}",
        secret.display()
    );
}

/// `kiln create -v VOLUME demo ARGS...`, which must succeed; the new sandbox's id.
fn create_with(root: &KilnRoot, volume: &str, args: &[&str]) -> String {
    let image = demo_image();
    let mut all = vec!["create", "-v", volume, &image];
    all.extend_from_slice(args);
    root.ok(&all).trim().to_owned()
}

/// `kiln start ID` fails (exit 1) with a message containing `naming`, before anything
/// boots: the sandbox stays created and no QEMU or monitor runs.
fn assert_start_refused(root: &KilnRoot, id: &str, naming: &str) {
    let stderr = root.fails(&["start", id], 1);
    assert!(stderr.contains(naming), "{naming}: {stderr}");
    let info: serde_json::Value = serde_json::from_str(&root.ok(&["inspect", id])).unwrap();
    assert_eq!(info["status"], "created", "{info}");
    assert!(root.processes().is_empty(), "{:?}", root.processes());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_volume_swapped_for_a_symlink_to_a_root_only_directory_is_refused_at_start() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let dir = open_tempdir();
    let secret = root_only_dir(dir.path());
    let parent = dir.path().join("alice");
    let work = parent.join("work");
    fs::create_dir_all(&work).unwrap();
    let volume = format!("{}:/data", work.display());
    let id = create_with(&root, &volume, &["true"]);

    // Create refuses a parent another user owns (next test), so the parent is handed to
    // nobody only now: start must not rely on what create checked.
    chown(&parent, Some(NOBODY), Some(NOBODY)).unwrap();
    as_nobody(
        &parent,
        &format!("mv work work.old && ln -s {} work", secret.display()),
    );
    let naming = format!(
        "volume {volume}: {} is owned by uid 65534",
        parent.display()
    );
    assert_start_refused(&root, &id, &naming);

    // With the parent root's again, the pin alone refuses the symlink.
    chown(&parent, Some(0), Some(0)).unwrap();
    let naming = format!("volume {volume}: {} is now a symbolic link", work.display());
    assert_start_refused(&root, &id, &naming);
    assert_untouched(&secret);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_host_directory_another_user_could_replace_is_refused_at_create() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let dir = open_tempdir();
    let make = |path: &Path, owner: u32, mode: u32| {
        fs::create_dir_all(path).unwrap();
        chown(path, Some(owner), Some(owner)).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    };
    // The case: the parent belongs to another user (whatever its mode).
    let owned = dir.path().join("alice");
    make(&owned, NOBODY, 0o555);
    make(&owned.join("work"), 0, 0o755);
    // A parent everyone may write, without the sticky bit.
    let open = dir.path().join("open");
    make(&open, 0, 0o777);
    make(&open.join("work"), 0, 0o755);
    // A sticky shared parent, as /tmp, holding another user's directory.
    let sticky = dir.path().join("sticky");
    make(&sticky, 0, 0o1777);
    make(&sticky.join("theirs"), NOBODY, 0o755);
    make(&sticky.join("mine"), 0, 0o755);
    // A symlink of root's that leads through the other user's directory.
    symlink(owned.join("work"), dir.path().join("link")).unwrap();

    let cases = [
        (
            owned.join("work"),
            format!("{} is owned by uid 65534", owned.display()),
        ),
        (
            open.join("work"),
            format!(
                "{} is writable by its group or by everyone (mode 0777",
                open.display()
            ),
        ),
        (
            sticky.join("theirs"),
            format!(
                "{} is owned by uid 65534 and sits in the shared sticky directory {}",
                sticky.join("theirs").display(),
                sticky.display()
            ),
        ),
        (
            dir.path().join("link"),
            format!("{} is owned by uid 65534", owned.display()),
        ),
    ];
    for (host, why) in cases {
        let volume = format!("{}:/data", host.display());
        let stderr = root.fails(&["create", "-v", &volume, &demo_image(), "true"], 2);
        assert!(
            stderr.contains(&format!("invalid volume {volume:?}")),
            "{stderr}"
        );
        assert!(stderr.contains(&why), "{why}: {stderr}");
        assert!(root.sandbox_dirs().is_empty(), "{:?}", root.sandbox_dirs());
    }

    // Root's own directory in the sticky parent is fine.
    let volume = format!("{}:/data", sticky.join("mine").display());
    let id = create_with(&root, &volume, &["true"]);
    root.ok(&["rm", &id]);
}

/// Waits until `path` exists.
/// Waits until `path` holds `contents`: the guest creates the file before it writes it,
/// so its mere existence says nothing about what it holds yet.
fn wait_for_contents(path: &Path, contents: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while fs::read_to_string(path).ok().as_deref() != Some(contents) {
        assert!(
            Instant::now() < deadline,
            "{} never held {contents:?}",
            path.display()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_volume_replaced_by_another_directory_is_refused_and_boots_once_put_back() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let dir = open_tempdir();
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    let volume = format!("{}:/data", work.display());
    let script = "echo from-guest > /data/made; exec sleep 100000";
    let id = create_with(&root, &volume, &["sh", "-c", script]);

    let original = dir.path().join("original");
    fs::rename(&work, &original).unwrap();
    fs::create_dir(&work).unwrap();
    let naming = format!(
        "volume {volume}: {} is no longer the directory the sandbox was created with",
        work.display()
    );
    assert_start_refused(&root, &id, &naming);
    assert!(xattr_names(&work).is_empty(), "the stand-in was shared");

    // Put back, the very directory boots and the guest writes into it.
    fs::remove_dir(&work).unwrap();
    fs::rename(&original, &work).unwrap();
    root.ok(&["start", &id]);
    wait_for_contents(&work.join("made"), "from-guest\n");

    // QEMU got the directory as a descriptor, mounted in its jail: its command line names
    // no host path of the volume, and what it serves is that very directory.
    let qemu: Vec<(u32, String)> = root
        .processes()
        .into_iter()
        // By program name: the monitor's own command line names QEMU too (`--qemu`).
        .filter(|(_, cmd)| {
            cmd.split(' ')
                .next()
                .is_some_and(|program| program.contains("qemu-system"))
        })
        .collect();
    assert_eq!(qemu.len(), 1, "{:?}", root.processes());
    let (pid, cmdline) = &qemu[0];
    assert!(cmdline.contains("path=/kiln/share0"), "{cmdline}");
    assert!(!cmdline.contains(&*work.to_string_lossy()), "{cmdline}");
    let served = fs::metadata(format!("/proc/{pid}/root/kiln/share0")).unwrap();
    let checked = fs::metadata(&work).unwrap();
    assert_eq!(
        (served.dev(), served.ino()),
        (checked.dev(), checked.ino()),
        "QEMU {pid} does not serve {}",
        work.display()
    );
    root.ok(&["rm", "-f", &id]);
}
