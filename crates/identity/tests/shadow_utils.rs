//! The edited files checked by shadow-utils' own validators, `pwck -r` and `grpck -r`
//! (Debian package `passwd`), run against a temporary root with `-R`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use kiln_identity::{write_sandbox_accounts, AccountFiles, AccountWarning};

/// The first statement of every test here: `-R` chroots, so the checks need root, and
/// the tools must be there (scripts/install-deps installs them).
fn require_root_and_checkers() {
    // /proc/self is owned by the effective uid.
    let euid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    assert_eq!(
        euid, 0,
        "this test needs root (pwck/grpck -R chroot): run it as root, as scripts/test does"
    );
    for tool in ["pwck", "grpck"] {
        if let Err(e) = Command::new(tool).arg("--help").output() {
            panic!("this test needs {tool} (Debian package passwd): {e}");
        }
    }
}

/// Writes the edit of `files` into a fresh root with every home directory present and
/// returns the combined output of `pwck -q -r` and `grpck -r` after asserting success.
fn check(files: &AccountFiles, uid: u32, gid: u32) -> Vec<AccountWarning> {
    let edited =
        write_sandbox_accounts(files, uid, gid, "/bin/sh", kiln_identity::IdBounds::KILN).unwrap();
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    for (name, bytes) in [
        ("passwd", &edited.passwd),
        ("group", &edited.group),
        ("gshadow", &edited.gshadow),
        ("shadow", &edited.shadow),
    ] {
        std::fs::write(etc.join(name), bytes).unwrap();
    }
    for entry in kiln_identity::parse_passwd(&edited.passwd).unwrap() {
        std::fs::create_dir_all(root.path().join(entry.home.trim_start_matches('/'))).unwrap();
    }
    run_ok(root.path(), "pwck", &["-q", "-r"]);
    run_ok(root.path(), "grpck", &["-r"]);
    edited.warnings
}

fn run_ok(root: &Path, tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .arg("-R")
        .arg(root)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.is_empty(),
        "{tool} {args:?} failed ({}): {text}",
        out.status
    );
}

const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/bash\n\
    daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
    nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const SHADOW: &[u8] =
    b"root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n";
const GROUP: &[u8] = b"root:x:0:\ndaemon:x:1:\nusers:x:100:\nnogroup:x:65534:\n";
const GSHADOW: &[u8] = b"root:*::\ndaemon:*::\nusers:*::\nnogroup:*::\n";

fn all(passwd: &[u8], group: &[u8], gshadow: &[u8], shadow: &[u8]) -> AccountFiles {
    AccountFiles {
        passwd: Some(passwd.to_vec()),
        group: Some(group.to_vec()),
        gshadow: Some(gshadow.to_vec()),
        shadow: Some(shadow.to_vec()),
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn debian_style_files_pass_pwck_and_grpck() {
    require_root_and_checkers();
    assert!(check(&all(PASSWD, GROUP, GSHADOW, SHADOW), 10001, 10001).is_empty());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn files_without_final_newline_pass() {
    require_root_and_checkers();
    let strip = |b: &[u8]| b.strip_suffix(b"\n").unwrap().to_vec();
    check(
        &all(
            &strip(PASSWD),
            &strip(GROUP),
            &strip(GSHADOW),
            &strip(SHADOW),
        ),
        10001,
        10001,
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn stale_and_duplicate_sandbox_entries_pass() {
    require_root_and_checkers();
    let passwd = [
        PASSWD,
        b"sandbox:x:1500:1500::/home/sandbox:/bin/false\nsandbox:x:1600:1600::/:/bin/sh\n",
    ]
    .concat();
    let group = [GROUP, b"sandbox:x:1500:daemon\nsandbox:x:1600:nobody\n"].concat();
    let gshadow = [GSHADOW, b"sandbox:::daemon\n"].concat();
    let shadow = [SHADOW, b"sandbox::19000:0:99999:7:::\n"].concat();
    let warnings = check(&all(&passwd, &group, &gshadow, &shadow), 2000, 3000);
    assert_eq!(
        warnings,
        [
            AccountWarning::DuplicateSandboxEntries {
                file: "/etc/passwd",
                removed: 1
            },
            AccountWarning::DuplicateSandboxEntries {
                file: "/etc/group",
                removed: 1
            },
        ]
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn absent_shadow_files_are_created_valid() {
    require_root_and_checkers();
    let files = AccountFiles {
        passwd: Some(PASSWD.to_vec()),
        group: Some(GROUP.to_vec()),
        gshadow: None,
        shadow: None,
    };
    let edited = write_sandbox_accounts(
        &files,
        10001,
        10001,
        "/bin/sh",
        kiln_identity::IdBounds::KILN,
    )
    .unwrap();
    assert_eq!(edited.shadow, b"sandbox:!:::::::\n");
    // pwck wants a shadow entry for every user, so give the others theirs as an image would.
    let completed = all(
        &edited.passwd,
        &edited.group,
        &[GSHADOW, &edited.gshadow].concat(),
        &[SHADOW, &edited.shadow].concat(),
    );
    check(&completed, 10001, 10001);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn colliding_ids_still_pass_with_warnings() {
    require_root_and_checkers();
    let passwd = [PASSWD, b"app:x:10001:10001::/app:/bin/sh\n"].concat();
    let shadow = [SHADOW, b"app:!:19000::::::\n"].concat();
    let group = [GROUP, b"app:x:10001:\n"].concat();
    let gshadow = [GSHADOW, b"app:!::\n"].concat();
    let warnings = check(&all(&passwd, &group, &gshadow, &shadow), 10001, 10001);
    assert_eq!(
        warnings,
        [
            AccountWarning::UidTaken {
                user: "app".into(),
                uid: 10001
            },
            AccountWarning::GidTaken {
                group: "app".into(),
                gid: 10001
            },
        ]
    );
}
