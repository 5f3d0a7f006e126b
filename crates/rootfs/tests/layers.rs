//! OCI layer semantics of the applier: whiteouts, opaque directories, type changes,
//! hard links across layers, symlinked parents, extensions. Every image is fsck'd.

mod support;

use kiln_erofs::NodeKind;
use kiln_rootfs::Limits;
use support::{apply, dir, file, finish_and_fsck, found, Found, LayerBuilder};

#[test]
fn whiteouts_and_opaque_directories() {
    let l1 = LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/a.conf", b"a")
        .file("etc/b.conf", b"b")
        .dir("opt/app/sub", 0o755)
        .file("opt/app/sub/deep", b"deep")
        .file("opt/app/old", b"old")
        .tar();
    let l2 = LayerBuilder::new()
        .file("etc/.wh.a.conf", b"")
        .file("opt/app/new-before", b"new")
        .file("opt/app/.wh..wh..opq", b"")
        .file("opt/app/new-after", b"after")
        // A whiteout for a name this layer itself wrote keeps the new entry.
        .file("etc/c.conf", b"c")
        .file("etc/.wh.c.conf", b"")
        .file("nowhere/.wh.x", b"")
        .tar();
    let root = apply(&[l1, l2], &Limits::default()).unwrap();
    assert_eq!(found(&root, "etc"), dir(&["b.conf", "c.conf"]));
    assert_eq!(found(&root, "opt/app"), dir(&["new-after", "new-before"]));
    assert_eq!(found(&root, "nowhere"), Found::Missing);
    assert_eq!(root.stats().whiteouts, 3);
    finish_and_fsck(root);
}

#[test]
fn opaque_keeps_directories_of_this_layer_but_not_their_lower_children() {
    let l1 = LayerBuilder::new()
        .file("d/sub/lower", b"l")
        .file("d/other", b"o")
        .tar();
    let l2 = LayerBuilder::new()
        .file("d/sub/upper", b"u")
        .file("d/.wh..wh..opq", b"")
        .tar();
    let root = apply(&[l1, l2], &Limits::default()).unwrap();
    assert_eq!(found(&root, "d"), dir(&["sub"]));
    assert_eq!(found(&root, "d/sub"), dir(&["upper"]));
}

#[test]
fn types_replace_each_other_and_directories_merge() {
    let l1 = LayerBuilder::new()
        .file("f2d", b"file")
        .dir("d2f", 0o755)
        .file("d2f/child", b"gone")
        .symlink("s2d", "f2d")
        .file("f2s", b"file")
        .dir("keep", 0o700)
        .file("keep/lower", b"lower")
        .tar();
    let l2 = LayerBuilder::new()
        .dir("f2d", 0o755)
        .file("d2f", b"now a file")
        .dir("s2d", 0o755)
        .symlink("f2s", "/keep/lower")
        .dir("keep", 0o751)
        .file("keep/upper", b"upper")
        .tar();
    let root = apply(&[l1, l2], &Limits::default()).unwrap();
    assert_eq!(found(&root, "f2d"), dir(&[]));
    assert_eq!(found(&root, "d2f"), file("now a file"));
    assert_eq!(found(&root, "s2d"), dir(&[]));
    assert_eq!(found(&root, "f2s"), Found::Symlink(b"/keep/lower".to_vec()));
    assert_eq!(found(&root, "keep"), dir(&["lower", "upper"]));
    let keep = root.lookup(b"keep", false).unwrap().unwrap();
    assert_eq!(root.tree().metadata(keep).unwrap().mode, 0o751);
    finish_and_fsck(root);
}

#[test]
fn hardlinks_keep_content_when_the_target_is_deleted_or_replaced() {
    let l1 = LayerBuilder::new()
        .file("data/doomed", b"doomed")
        .hardlink("data/link1", "data/doomed")
        .file("data/replaced", b"first")
        .tar();
    let l2 = LayerBuilder::new()
        .hardlink("data/link2", "./data/doomed")
        .hardlink("data/link3", "/data/replaced")
        .tar();
    let l3 = LayerBuilder::new()
        .file("data/.wh.doomed", b"")
        .file("data/replaced", b"second")
        .tar();
    let root = apply(&[l1, l2, l3], &Limits::default()).unwrap();
    assert_eq!(found(&root, "data/doomed"), Found::Missing);
    assert_eq!(found(&root, "data/link1"), file("doomed"));
    assert_eq!(found(&root, "data/link2"), file("doomed"));
    assert_eq!(found(&root, "data/link3"), file("first"));
    assert_eq!(found(&root, "data/replaced"), file("second"));
    let a = root.lookup(b"data/link1", false).unwrap();
    assert_eq!(a, root.lookup(b"data/link2", false).unwrap());
    finish_and_fsck(root);
}

#[test]
fn parents_resolve_through_the_images_symlinks() {
    let l1 = LayerBuilder::new()
        .dir("usr/lib", 0o755)
        .file("usr/lib/inner", b"inner")
        .symlink("lib", "usr/lib")
        .symlink("abs", "/usr")
        .tar();
    let l2 = LayerBuilder::new()
        .file("lib/added", b"added")
        .file("abs/lib/via-abs", b"abs")
        .file("lib/.wh.inner", b"")
        .tar();
    let root = apply(&[l1, l2], &Limits::default()).unwrap();
    assert_eq!(found(&root, "usr/lib"), dir(&["added", "via-abs"]));
    assert_eq!(found(&root, "lib"), Found::Symlink(b"usr/lib".to_vec()));
    finish_and_fsck(root);
}

#[test]
fn pax_records_set_attributes_and_xattrs() {
    let l1 = LayerBuilder::new()
        .pax(&[
            ("path", "srv/caf\u{e9}-with-a-very-long-name".as_bytes()),
            ("uid", b"100000"),
            ("gid", b"70000"),
            ("mtime", b"1700000000.5"),
            ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
            ("SCHILY.xattr.security.selinux", b"system_u:object_r:bin_t"),
            ("SCHILY.xattr.user.note", b"kept"),
        ])
        .file("ignored-ustar-name", b"x")
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .device("dev/fifo", tar::EntryType::Fifo, 0, 0)
        .tar();
    let root = apply(&[l1], &Limits::default()).unwrap();
    assert_eq!(found(&root, "ignored-ustar-name"), Found::Missing);
    let node = root
        .lookup("srv/caf\u{e9}-with-a-very-long-name".as_bytes(), false)
        .unwrap()
        .unwrap();
    let meta = root.tree().metadata(node).unwrap();
    assert_eq!((meta.uid, meta.gid), (100_000, 70_000));
    assert_eq!(
        (meta.mtime.sec, meta.mtime.nsec),
        (1_700_000_000, 500_000_000)
    );
    let names: Vec<&[u8]> = meta.xattrs.iter().map(|x| &x.name[..]).collect();
    assert_eq!(names, vec![&b"security.capability"[..], b"user.note"]);
    let null = root.lookup(b"dev/null", false).unwrap().unwrap();
    assert_eq!(
        root.tree().kind(null).unwrap(),
        &NodeKind::CharDevice { major: 1, minor: 3 }
    );
    finish_and_fsck(root);
}

#[test]
fn data_of_deleted_and_replaced_files_takes_no_space() {
    use std::os::unix::fs::MetadataExt;
    let big = vec![7u8; 4 << 20];
    let l1 = LayerBuilder::new()
        .file("deleted", &big)
        .file("replaced", &big)
        .tar();
    let l2 = LayerBuilder::new()
        .file(".wh.deleted", b"")
        .file("replaced", b"small now")
        .tar();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("root.erofs");
    let layers = [l1, l2];
    let layers = layers.iter().enumerate().map(|(i, l)| {
        kiln_rootfs::Layer::new(
            format!("sha256:l{i}"),
            kiln_image::Compression::None,
            &l[..],
        )
    });
    let report =
        kiln_rootfs::build_root_image(layers, &out, &kiln_rootfs::BuildOptions::default()).unwrap();
    assert_eq!(report.image.reclaimed_blocks, 2 * (4 << 20) / 4096);
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(
        allocated < 1 << 20,
        "{allocated} bytes allocated for 8 MiB of dead data"
    );
}
