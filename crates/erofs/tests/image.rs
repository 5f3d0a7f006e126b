//! Images written by kiln-erofs, checked by fsck.erofs and the kernel (loop mount).

mod oracle;

use std::collections::HashMap;

use kiln_erofs::{DataRef, ImageWriter, Metadata, NodeKind, Timestamp, Tree, Xattr};
use oracle::{finish_and_check, new_writer};

fn meta(mode: u32) -> Metadata {
    Metadata {
        mode,
        uid: 0,
        gid: 0,
        mtime: Timestamp {
            sec: 1_700_000_000,
            nsec: 0,
        },
        xattrs: Vec::new(),
    }
}

/// Deterministic contents of `len` bytes, different per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A POSIX ACL xattr value (version 2): owner, one named user, group, mask, other.
fn posix_acl(owner: u16, user: u32, user_perm: u16, group: u16, mask: u16, other: u16) -> Vec<u8> {
    let mut value = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, owner, u32::MAX),
        (0x02, user_perm, user),
        (0x04, group, u32::MAX),
        (0x10, mask, u32::MAX),
        (0x20, other, u32::MAX),
    ] {
        value.extend_from_slice(&tag.to_le_bytes());
        value.extend_from_slice(&perm.to_le_bytes());
        value.extend_from_slice(&id.to_le_bytes());
    }
    value
}

fn add_file(
    writer: &mut ImageWriter,
    contents: &mut HashMap<DataRef, Vec<u8>>,
    data: Vec<u8>,
) -> NodeKind {
    let data_ref = writer.append_data(&data[..], data.len() as u64).unwrap();
    if !data.is_empty() {
        contents.insert(data_ref, data);
    }
    NodeKind::File(data_ref)
}

/// A tree with every node kind, special mode bits, big ids, hard links, all xattr
/// prefixes, odd names and the file sizes around block boundaries.
/// `all` adds what cannot go through a host directory and mkfs.erofs 1.5: 60 kB xattrs
/// (ext4 refuses them) and a 255-byte name (mkfs.erofs 1.5 fails on it).
fn sample_tree(
    writer: &mut ImageWriter,
    contents: &mut HashMap<DataRef, Vec<u8>>,
    all: bool,
) -> Tree {
    let mut tree = Tree::new(meta(0o755)).unwrap();
    let root = tree.root();

    for (i, len) in [0usize, 1, 4095, 4096, 4097, 8192, 3 * 4096 + 17, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let kind = add_file(writer, contents, pattern(i as u64, len));
        tree.add(root, format!("file-{len}").as_bytes(), kind, meta(0o644))
            .unwrap();
    }
    let bin = tree
        .add(root, b"bin", NodeKind::Directory, meta(0o755))
        .unwrap();
    let su = add_file(writer, contents, pattern(100, 5000));
    let caps = Xattr::new(
        "security.capability",
        vec![
            1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    );
    let su = tree
        .add(
            bin,
            b"su",
            su,
            Metadata {
                mode: 0o4755,
                xattrs: vec![caps],
                ..meta(0)
            },
        )
        .unwrap();
    tree.link(bin, b"su-hardlink", su).unwrap();
    tree.link(root, b"su-elsewhere", su).unwrap();
    let acl_dir = Metadata {
        xattrs: vec![
            Xattr::new("system.posix_acl_access", posix_acl(7, 1000, 7, 5, 5, 5)),
            Xattr::new("system.posix_acl_default", posix_acl(7, 2000, 6, 5, 4, 0)),
        ],
        ..meta(0o755)
    };
    // The access ACL agrees with the mode (owner rwx, mask r-x, other r-x) as chmod keeps it.
    tree.add(root, b"acl", NodeKind::Directory, acl_dir)
        .unwrap();
    let tmp = tree
        .add(root, b"tmp", NodeKind::Directory, meta(0o1777))
        .unwrap();
    tree.add(tmp, b"sgid-dir", NodeKind::Directory, meta(0o2775))
        .unwrap();
    tree.add(
        root,
        b"lib",
        NodeKind::Symlink(b"usr/lib".to_vec()),
        meta(0o777),
    )
    .unwrap();
    tree.add(
        root,
        b"long-link",
        NodeKind::Symlink(vec![b'x'; 4095]),
        meta(0o777),
    )
    .unwrap();
    let dev = tree
        .add(root, b"dev", NodeKind::Directory, meta(0o755))
        .unwrap();
    tree.add(
        dev,
        b"null",
        NodeKind::CharDevice { major: 1, minor: 3 },
        meta(0o666),
    )
    .unwrap();
    tree.add(
        dev,
        b"sda",
        NodeKind::BlockDevice { major: 8, minor: 0 },
        meta(0o660),
    )
    .unwrap();
    tree.add(
        dev,
        b"big",
        NodeKind::CharDevice {
            major: 4095,
            minor: 1_048_575,
        },
        meta(0o600),
    )
    .unwrap();
    tree.add(dev, b"fifo", NodeKind::Fifo, meta(0o644)).unwrap();
    tree.add(dev, b"socket", NodeKind::Socket, meta(0o755))
        .unwrap();

    let attrs = Metadata {
        mode: 0o640,
        uid: 100_000,
        gid: 2_000_000_000,
        mtime: Timestamp {
            sec: 1_234_567_890,
            nsec: 123_456_789,
        },
        xattrs: vec![
            Xattr::new("user.note", "hello"),
            Xattr::new("user.empty", ""),
            Xattr::new("trusted.overlay.opaque", "y"),
            Xattr::new("user.big", pattern(7, 3000)),
        ],
    };
    let kind = add_file(writer, contents, pattern(200, 10));
    tree.add(root, b"attrs", kind, attrs).unwrap();
    let old = Metadata {
        mtime: Timestamp {
            sec: -86_400,
            nsec: 5,
        },
        ..meta(0o644)
    };
    tree.add(root, b"before-1970", NodeKind::File(DataRef::EMPTY), old)
        .unwrap();
    if all {
        let huge = Metadata {
            xattrs: vec![Xattr::new("user.huge", pattern(8, 60_000))],
            ..meta(0o600)
        };
        let kind = add_file(writer, contents, pattern(300, 3000));
        tree.add(root, b"huge-xattr-file", kind, huge.clone())
            .unwrap();
        tree.add(root, b"huge-xattr-dir", NodeKind::Directory, huge)
            .unwrap();
    }
    for name in ["-dash", " space", "!bang", "\u{e9}t\u{e9}", "\u{1F600}"] {
        tree.add(root, name.as_bytes(), NodeKind::Fifo, meta(0o644))
            .unwrap();
    }
    tree.add(root, &[0xff, 0xfe, b'x'], NodeKind::Fifo, meta(0o644))
        .unwrap();
    if all {
        tree.add(root, &[b'n'; 255], NodeKind::Fifo, meta(0o644))
            .unwrap();
    }
    tree
}

#[test]
fn every_node_kind_and_attribute_survives() {
    let (dir, mut writer) = new_writer();
    let mut contents = HashMap::new();
    let tree = sample_tree(&mut writer, &mut contents, true);
    let built = finish_and_check(dir, writer, &tree, &contents);
    // uid/gid beyond 16 bits, and an mtime other than the most common one.
    assert_eq!(built.stats.extended_inodes, 2, "{:?}", built.stats);
    // A 60 kB xattr leaves no room for the 3000-byte file's tail beside its inode.
    assert_eq!(built.stats.relocated_files, 1, "{:?}", built.stats);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn agrees_with_mkfs_erofs_on_the_same_tree() {
    assert!(
        oracle::is_root(),
        "this test needs root (recreating owners and devices, loop mount): run it as root, \
         as scripts/test does"
    );
    let (dir, mut writer) = new_writer();
    let mut contents = HashMap::new();
    let tree = sample_tree(&mut writer, &mut contents, false);
    let source = dir.path().join("source");
    std::fs::create_dir(&source).unwrap();
    oracle::materialize(&tree, &writer, &source);
    let reference = dir.path().join("mkfs.erofs");
    oracle::mkfs_erofs(&source, &reference);
    let built = finish_and_check(dir, writer, &tree, &contents);

    let expected = oracle::expected_listing(&tree, &contents);
    let mount = oracle::Mount::new(&reference).unwrap();
    oracle::assert_same(&expected, &oracle::mounted_listing(mount.path()));
    let ours = std::fs::metadata(&built.image).unwrap().len();
    let theirs = std::fs::metadata(&reference).unwrap().len();
    eprintln!("image size: kiln-erofs {ours} bytes, mkfs.erofs {theirs} bytes");
    // Both pack file tails and small directories next to their inodes.
    assert!(
        ours <= theirs,
        "kiln-erofs image ({ours} bytes) is larger than mkfs.erofs's ({theirs})"
    );
}

#[test]
fn directories_spanning_many_blocks() {
    let (dir, writer) = new_writer();
    let contents = HashMap::new();
    let mut tree = Tree::new(meta(0o755)).unwrap();
    let big = tree
        .add(tree.root(), b"big", NodeKind::Directory, meta(0o755))
        .unwrap();
    for i in 0..5000 {
        let name = format!("entry-{i:05}-{}", "x".repeat(i % 40));
        tree.add(
            big,
            name.as_bytes(),
            NodeKind::File(DataRef::EMPTY),
            meta(0o644),
        )
        .unwrap();
    }
    // Exactly one full block: 256 dirents (3072 bytes), "." and ".." (3), 253 names of
    // 4 bytes (1012) and one of 9 bytes.
    let exact = tree
        .add(tree.root(), b"exact", NodeKind::Directory, meta(0o755))
        .unwrap();
    for i in 0..253 {
        tree.add(
            exact,
            format!("{i:04}").as_bytes(),
            NodeKind::Fifo,
            meta(0o644),
        )
        .unwrap();
    }
    tree.add(exact, b"123456789", NodeKind::Fifo, meta(0o644))
        .unwrap();
    let built = finish_and_check(dir, writer, &tree, &contents);
    assert_eq!(built.stats.inodes, 5000 + 254 + 3);
}

#[test]
fn dead_data_takes_no_disk_space() {
    let (dir, mut writer) = new_writer();
    let mut contents = HashMap::new();
    let mut tree = Tree::new(meta(0o755)).unwrap();
    let root = tree.root();
    let keep = add_file(&mut writer, &mut contents, pattern(1, 64 * 4096));
    let dead = add_file(&mut writer, &mut contents, pattern(2, 16 << 20));
    let gone_dir = tree
        .add(root, b"gone", NodeKind::Directory, meta(0o755))
        .unwrap();
    tree.add(gone_dir, b"dead", dead, meta(0o644)).unwrap();
    tree.add(root, b"keep", keep, meta(0o644)).unwrap();
    // A later layer deletes the directory holding the big file.
    tree.unlink(root, b"gone").unwrap();

    let built = finish_and_check(dir, writer, &tree, &contents);
    assert_eq!(built.stats.reclaimed_blocks, 4096, "{:?}", built.stats);
    let on_disk =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&built.image).unwrap()) * 512;
    assert!(
        on_disk < (1 << 20),
        "image takes {on_disk} bytes on disk, the dead 16 MiB should be punched out"
    );
}

#[test]
fn zero_blocks_take_no_disk_space_and_read_back_as_zeros() {
    let (dir, mut writer) = new_writer();
    let mut contents = HashMap::new();
    let mut tree = Tree::new(meta(0o755)).unwrap();
    let root = tree.root();
    // 64 MiB of zeros; data between zero runs; zeros ending in a tail too long to inline
    // (written padded in place); data ending in a short zero tail (held for inlining).
    let mut mixed = vec![0u8; 10 * 4096];
    mixed[3 * 4096..5 * 4096].copy_from_slice(&pattern(3, 2 * 4096));
    mixed.extend(pattern(4, 100));
    mixed.extend(vec![0u8; 3 * 4096]);
    let mut data_then_zeros = pattern(5, 2 * 4096 + 10);
    data_then_zeros.extend(vec![0u8; 20]);
    for (name, data) in [
        (&b"zeros"[..], vec![0u8; 64 << 20]),
        (b"mixed", mixed),
        (b"zero-long-tail", vec![0u8; 4 * 4096 + 4000]),
        (b"data-then-zeros", data_then_zeros),
    ] {
        let kind = add_file(&mut writer, &mut contents, data);
        tree.add(root, name, kind, meta(0o644)).unwrap();
    }

    // fsck.erofs --extract reads every file; as root the kernel's contents are compared.
    let built = finish_and_check(dir, writer, &tree, &contents);
    // All 16384 blocks of `zeros`; 10 of `mixed` (the block holding its 100 data bytes is
    // written, its zero tail is held for inlining); the 5 of `zero-long-tail`.
    assert_eq!(built.stats.zero_blocks, 16384 + 10 + 5, "{:?}", built.stats);
    let on_disk =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&built.image).unwrap()) * 512;
    assert!(
        on_disk < (1 << 20),
        "image takes {on_disk} bytes on disk; its 64 MiB of zeros should be holes"
    );
    let length = std::fs::metadata(&built.image).unwrap().len();
    assert!(
        length > 64 << 20,
        "the image's length still counts the zeros"
    );
}

#[test]
fn same_input_gives_identical_images() {
    let build = || {
        let (dir, mut writer) = new_writer();
        let mut tree = Tree::new(meta(0o755)).unwrap();
        for i in 0..50u64 {
            let data = writer
                .append_bytes(&pattern(i, (i as usize) * 300))
                .unwrap();
            let m = Metadata {
                mtime: Timestamp {
                    sec: i as i64 % 3,
                    nsec: 0,
                },
                ..meta(0o644)
            };
            tree.add(
                tree.root(),
                format!("f{i}").as_bytes(),
                NodeKind::File(data),
                m,
            )
            .unwrap();
        }
        writer.finish(&tree).unwrap();
        std::fs::read(dir.path().join("image.erofs")).unwrap()
    };
    assert_eq!(build(), build());
}

#[test]
fn write_only_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("image")).unwrap();
    let err = ImageWriter::new(file, kiln_erofs::ImageOptions::default()).unwrap_err();
    assert!(matches!(err, kiln_erofs::Error::NotReadWrite), "{err}");
}

#[test]
fn short_reader_and_foreign_refs_are_rejected() {
    let (_dir, mut writer) = new_writer();
    let err = writer.append_data(&b"abc"[..], 10).unwrap_err();
    assert!(
        matches!(
            err,
            kiln_erofs::Error::ShortData {
                expected: 10,
                got: 3
            }
        ),
        "{err}"
    );
    let err = writer.append_data(&vec![0u8; 5000][..], 9000).unwrap_err();
    assert!(
        matches!(
            err,
            kiln_erofs::Error::ShortData {
                expected: 9000,
                got: 5000
            }
        ),
        "{err}"
    );

    let (_dir2, mut other) = new_writer();
    let foreign = other.append_bytes(b"x").unwrap();
    let mut tree = Tree::new(meta(0o755)).unwrap();
    tree.add(tree.root(), b"f", NodeKind::File(foreign), meta(0o644))
        .unwrap();
    assert!(matches!(
        writer.finish(&tree),
        Err(kiln_erofs::Error::ForeignDataRef)
    ));
}

#[test]
fn link_counts_beyond_16_bits_use_extended_inodes() {
    let (dir, mut writer) = new_writer();
    let mut contents = HashMap::new();
    let mut tree = Tree::new(meta(0o755)).unwrap();
    let root = tree.root();
    let kind = add_file(&mut writer, &mut contents, pattern(9, 100));
    let file = tree.add(root, b"target", kind, meta(0o644)).unwrap();
    let links = tree
        .add(root, b"links", NodeKind::Directory, meta(0o755))
        .unwrap();
    for i in 0..70_000 {
        tree.link(links, format!("l{i}").as_bytes(), file).unwrap();
    }
    let subdirs = tree
        .add(root, b"subdirs", NodeKind::Directory, meta(0o755))
        .unwrap();
    for i in 0..65_540 {
        tree.add(
            subdirs,
            format!("d{i}").as_bytes(),
            NodeKind::Directory,
            meta(0o755),
        )
        .unwrap();
    }
    let built = finish_and_check(dir, writer, &tree, &contents);
    // The file (70,001 names) and "subdirs" (2 + 65,540) need 32-bit link counts.
    assert_eq!(built.stats.extended_inodes, 2, "{:?}", built.stats);
}

#[test]
fn uuid_and_volume_name_reach_the_superblock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.erofs");
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let uuid = *b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10";
    let options = kiln_erofs::ImageOptions {
        uuid,
        volume_name: *b"kiln-root\0\0\0\0\0\0\0",
        spool_dir: None,
    };
    let writer = ImageWriter::new(file, options).unwrap();
    writer.finish(&Tree::new(meta(0o755)).unwrap()).unwrap();
    oracle::fsck(&path);

    let dump = std::process::Command::new("dump.erofs")
        .arg(&path)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("01234567-89ab-cdef-fedc-ba9876543210"),
        "{dump}"
    );
    let image = std::fs::read(&path).unwrap();
    // volume_name sits 64 bytes into the superblock, which starts at byte 1024.
    assert_eq!(&image[1024 + 64..1024 + 73], b"kiln-root");
}

#[test]
fn an_inode_ending_the_metadata_area_passes_fsck() {
    // Slot 0 stays free, the root with its 83 entries inline takes 44 slots and 83 FIFOs
    // one slot each: the last FIFO's inode ends exactly at the end of the metadata block.
    let (dir, writer) = new_writer();
    let mut tree = Tree::new(meta(0o755)).unwrap();
    for i in 0..83 {
        tree.add(
            tree.root(),
            format!("f{i:03}").as_bytes(),
            NodeKind::Fifo,
            meta(0o644),
        )
        .unwrap();
    }
    let built = finish_and_check(dir, writer, &tree, &HashMap::new());
    // Superblock, one metadata block, and the block fsck.erofs 1.5 reads past it.
    assert_eq!(built.stats.blocks, 3, "{:?}", built.stats);
}
