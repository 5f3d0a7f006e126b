//! The identity layer and merged images: account files edited by kiln-identity, shell
//! chosen from the image, /sandbox owned by uid:gid. Images are checked by fsck.erofs
//! (inside the build) and read back with `fsck.erofs --extract`.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use kiln_identity::{write_sandbox_accounts, AccountFiles};
use kiln_image::Compression;
use kiln_rootfs::{build_identity_layer, build_root_image, BuildOptions, Error, Layer};
use support::LayerBuilder;

fn layers(tars: &[Vec<u8>]) -> Vec<Layer<'_>> {
    tars.iter()
        .enumerate()
        .map(|(i, t)| Layer::new(format!("sha256:l{i}"), Compression::None, &t[..]))
        .collect()
}

fn extract(image: &Path, into: &Path) {
    let out = Command::new("fsck.erofs")
        .arg(format!("--extract={}", into.display()))
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds root + identity layer and merged image; returns the extracted identity layer
/// and merged trees (they must agree on the identity files).
fn build_both(tars: &[Vec<u8>], uid: u32, gid: u32) -> (tempfile::TempDir, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let root = build_root_image(
        layers(tars),
        &dir.path().join("root.erofs"),
        &BuildOptions::default(),
    )
    .unwrap();
    let id = dir.path().join("identity.erofs");
    let report = build_identity_layer(
        &root.identity_inputs,
        uid,
        gid,
        kiln_identity::IdBounds::KILN,
        &id,
    )
    .unwrap();
    assert_eq!(report.identity.uid, uid);
    let merged_path = dir.path().join("merged.erofs");
    let options = BuildOptions {
        merged: Some((uid, gid)),
        ..BuildOptions::default()
    };
    let merged = build_root_image(layers(tars), &merged_path, &options).unwrap();
    assert_eq!(
        merged.identity.as_ref().unwrap().shell,
        report.identity.shell
    );
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    extract(&id, &a.path().join("x"));
    extract(&merged_path, &b.path().join("x"));
    (a, b)
}

fn read(dir: &tempfile::TempDir, path: &str) -> Vec<u8> {
    fs::read(dir.path().join("x").join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn expected(
    passwd: Option<&[u8]>,
    group: Option<&[u8]>,
    uid: u32,
    gid: u32,
    shell: &str,
) -> kiln_identity::EditedAccounts {
    let files = AccountFiles {
        passwd: passwd.map(<[u8]>::to_vec),
        group: group.map(<[u8]>::to_vec),
        gshadow: None,
        shadow: None,
    };
    write_sandbox_accounts(&files, uid, gid, shell, kiln_identity::IdBounds::KILN).unwrap()
}

#[test]
fn sandbox_with_other_ids_and_taken_uid_crlf_and_comments() {
    let passwd: &[u8] = b"# users\r\nroot:x:0:0:root:/root:/bin/sh\r\nsandbox:x:2000:2000::/home/sandbox:/bin/sh\r\napp:x:10001:10001::/app:/bin/sh\r\n";
    let group: &[u8] = b"root:x:0:\nsandbox:x:2000:app\n";
    let tars = vec![LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/passwd", passwd)
        .file("etc/group", group)
        .dir("bin", 0o755)
        .file_owned("bin/busybox", 0o755, 0, 0, b"\x7fELF")
        .symlink("bin/sh", "/bin/busybox")
        .tar()];
    let (layer, merged) = build_both(&tars, 10001, 10001);
    let want = expected(Some(passwd), Some(group), 10001, 10001, "/bin/sh");
    assert!(want.warnings.iter().any(|w| w.to_string().contains("app")));
    for tree in [&layer, &merged] {
        assert_eq!(read(tree, "etc/passwd"), want.passwd);
        assert_eq!(read(tree, "etc/group"), want.group);
        assert_eq!(read(tree, "etc/gshadow"), want.gshadow);
        assert_eq!(read(tree, "etc/shadow"), want.shadow);
        let home = fs::metadata(tree.path().join("x/sandbox")).unwrap();
        assert!(home.is_dir());
        assert_eq!((home.uid(), home.gid()), (10001, 10001));
    }
}

#[test]
fn distroless_image_without_etc_gets_nologin() {
    let tars = vec![LayerBuilder::new().file("app", b"binary").tar()];
    let (layer, merged) = build_both(&tars, 1234, 5678);
    let want = expected(None, None, 1234, 5678, "/sbin/nologin");
    for tree in [&layer, &merged] {
        assert_eq!(read(tree, "etc/passwd"), want.passwd);
        assert_eq!(read(tree, "etc/gshadow"), want.gshadow);
    }
}

#[test]
fn etc_behind_a_symlink_is_written_where_it_really_is() {
    let tars = vec![LayerBuilder::new()
        .dir("usr/etc", 0o750)
        .file("usr/etc/passwd", b"root:x:0:0::/:/bin/bash\n")
        .symlink("etc", "usr/etc")
        .file("bin/bash", b"bash")
        .tar()];
    let (layer, merged) = build_both(&tars, 10001, 10001);
    let want = expected(
        Some(b"root:x:0:0::/:/bin/bash\n"),
        None,
        10001,
        10001,
        "/bin/bash",
    );
    for tree in [&layer, &merged] {
        assert_eq!(read(tree, "usr/etc/passwd"), want.passwd);
        let etc = fs::metadata(tree.path().join("x/usr/etc")).unwrap();
        assert_eq!(
            etc.mode() & 0o7777,
            0o750,
            "the identity layer repeats /usr/etc's mode"
        );
    }
    assert!(fs::symlink_metadata(merged.path().join("x/etc"))
        .unwrap()
        .is_symlink());
    assert!(!layer.path().join("x/etc").exists());
}

#[test]
fn passwd_symlinks_inside_to_a_device_and_to_the_host() {
    // A symlink to a file inside the image is read through.
    let inside = vec![LayerBuilder::new()
        .file("usr/share/passwd", b"root:x:0:0::/:/bin/sh\n")
        .symlink("etc/passwd", "../usr/share/passwd")
        .tar()];
    let (layer, _) = build_both(&inside, 10001, 10001);
    let want = expected(
        Some(b"root:x:0:0::/:/bin/sh\n"),
        None,
        10001,
        10001,
        "/sbin/nologin",
    );
    assert_eq!(read(&layer, "etc/passwd"), want.passwd);

    // A host path the image does not have holds no accounts: the file is written anew.
    let host = vec![LayerBuilder::new()
        .symlink("etc/passwd", "/root/.ssh/authorized_keys")
        .tar()];
    let (layer, merged) = build_both(&host, 10001, 10001);
    let want = expected(None, None, 10001, 10001, "/sbin/nologin");
    assert_eq!(read(&layer, "etc/passwd"), want.passwd);
    assert!(fs::symlink_metadata(merged.path().join("x/etc/passwd"))
        .unwrap()
        .is_file());

    // A device is refused, naming the file.
    let device = vec![LayerBuilder::new()
        .device("dev/zero", tar::EntryType::Char, 1, 5)
        .symlink("etc/passwd", "/dev/zero")
        .tar()];
    let dir = tempfile::tempdir().unwrap();
    let root = build_root_image(
        layers(&device),
        &dir.path().join("r"),
        &BuildOptions::default(),
    )
    .unwrap();
    let err = build_identity_layer(
        &root.identity_inputs,
        10001,
        10001,
        kiln_identity::IdBounds::KILN,
        &dir.path().join("i"),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Account { .. }), "{err}");
    assert!(
        err.to_string().contains("/etc/passwd") && err.to_string().contains("character device"),
        "{err}"
    );
    assert!(!dir.path().join("i").exists());
}

#[test]
fn oversized_passwd_is_refused() {
    let big = vec![b'#'; (1 << 20) + 1];
    let tars = vec![LayerBuilder::new().file("etc/group", &big).tar()];
    let dir = tempfile::tempdir().unwrap();
    let root = build_root_image(
        layers(&tars),
        &dir.path().join("r"),
        &BuildOptions::default(),
    )
    .unwrap();
    let err = build_identity_layer(
        &root.identity_inputs,
        10001,
        10001,
        kiln_identity::IdBounds::KILN,
        &dir.path().join("i"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/etc/group"), "{err}");
}
