//! Randomly generated trees (proptest), each written by kiln-erofs and checked by
//! fsck.erofs and, as root, by the kernel through a loop mount.

mod oracle;

use std::collections::HashMap;

use kiln_erofs::{validate_name, DataRef, Metadata, NodeId, NodeKind, Timestamp, Tree, Xattr};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Kind {
    File { size: usize, seed: u8 },
    Dir,
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    Socket,
}

#[derive(Clone, Debug)]
enum Op {
    Add {
        parent: usize,
        name: Vec<u8>,
        kind: Kind,
        meta: Metadata,
    },
    Link {
        parent: usize,
        name: Vec<u8>,
        target: usize,
    },
    Unlink {
        parent: usize,
        pick: usize,
    },
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "[a-zA-Z0-9._-]{1,16}".prop_map(String::into_bytes),
        "[a-z\u{e9}\u{4e2d}\u{1F600} !#]{1,12}".prop_map(String::into_bytes),
        prop::collection::vec(1u8..=255, 1..40),
        (200usize..=255).prop_map(|n| vec![b'L'; n]),
    ]
    .prop_filter("valid EROFS name", |n| validate_name(n).is_ok())
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        // Around the longest tail held back for inlining, and what fits beside an inode.
        Just(3904),
        Just(3905),
        Just(4032),
        Just(4064),
        Just(4065),
        Just(4095),
        Just(4096),
        Just(4097),
        Just(8192),
        0..20_000usize,
        Just(300_001),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        6 => (size(), any::<u8>()).prop_map(|(size, seed)| Kind::File { size, seed }),
        3 => Just(Kind::Dir),
        2 => prop_oneof![
            "[a-z/.]{1,60}".prop_map(String::into_bytes),
            (1usize..=4095).prop_map(|n| vec![b's'; n]),
        ]
        .prop_map(Kind::Symlink),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| Kind::Char(a, b)),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| Kind::Block(a, b)),
        1 => Just(Kind::Fifo),
        1 => Just(Kind::Socket),
    ]
}

fn id() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        0..70_000u32,
        Just(65_535),
        Just(65_536),
        Just(2_000_000_000)
    ]
}

fn xattrs() -> impl Strategy<Value = Vec<Xattr>> {
    let prefix = prop_oneof![Just("user."), Just("trusted."), Just("security.")];
    let value = prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..40),
        1 => prop::collection::vec(any::<u8>(), 0..3000),
    ];
    prop::collection::vec((prefix, "[a-z.]{1,20}", value), 0..4).prop_map(|xs| {
        let mut out: Vec<Xattr> = Vec::new();
        for (prefix, suffix, value) in xs {
            let name = format!("{prefix}{suffix}").into_bytes();
            if !out.iter().any(|x| x.name == name) {
                out.push(Xattr { name, value });
            }
        }
        out
    })
}

fn metadata() -> impl Strategy<Value = Metadata> {
    let mtime = prop_oneof![
        3 => Just(Timestamp { sec: 1_600_000_000, nsec: 0 }),
        1 => (-2_000_000_000i64..8_000_000_000, 0u32..1_000_000_000)
            .prop_map(|(sec, nsec)| Timestamp { sec, nsec }),
    ];
    (0u32..=0o7777, id(), id(), mtime, xattrs()).prop_map(|(mode, uid, gid, mtime, xattrs)| {
        Metadata {
            mode,
            uid,
            gid,
            mtime,
            xattrs,
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (any::<usize>(), name(), kind(), metadata())
            .prop_map(|(parent, name, kind, meta)| Op::Add { parent, name, kind, meta }),
        2 => (any::<usize>(), name(), any::<usize>())
            .prop_map(|(parent, name, target)| Op::Link { parent, name, target }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(parent, pick)| Op::Unlink { parent, pick }),
    ]
}

fn content(seed: u8, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Applies `ops` to a new tree; names that already exist are skipped.
fn build(ops: &[Op], big_dir: Option<usize>) {
    let (dir, mut writer) = oracle::new_writer();
    let mut contents: HashMap<DataRef, Vec<u8>> = HashMap::new();
    let root_meta = Metadata {
        mode: 0o755,
        ..Metadata::default()
    };
    let mut tree = Tree::new(root_meta).unwrap();
    let mut dirs = vec![tree.root()];
    let mut others: Vec<NodeId> = Vec::new();
    for op in ops {
        match op {
            Op::Add {
                parent,
                name,
                kind,
                meta,
            } => {
                let parent = dirs[parent % dirs.len()];
                if tree.lookup(parent, name).unwrap().is_some() {
                    continue;
                }
                let node_kind = match kind {
                    Kind::File { size, seed } => {
                        let data = content(*seed, *size);
                        let data_ref = writer.append_data(&data[..], data.len() as u64).unwrap();
                        if !data.is_empty() {
                            contents.insert(data_ref, data);
                        }
                        NodeKind::File(data_ref)
                    }
                    Kind::Dir => NodeKind::Directory,
                    Kind::Symlink(target) => NodeKind::Symlink(target.clone()),
                    Kind::Char(major, minor) => NodeKind::CharDevice {
                        major: *major,
                        minor: *minor,
                    },
                    Kind::Block(major, minor) => NodeKind::BlockDevice {
                        major: *major,
                        minor: *minor,
                    },
                    Kind::Fifo => NodeKind::Fifo,
                    Kind::Socket => NodeKind::Socket,
                };
                let id = tree.add(parent, name, node_kind, meta.clone()).unwrap();
                if matches!(kind, Kind::Dir) {
                    dirs.push(id);
                } else {
                    others.push(id);
                }
            }
            Op::Link {
                parent,
                name,
                target,
            } => {
                let parent = dirs[parent % dirs.len()];
                if others.is_empty() || tree.lookup(parent, name).unwrap().is_some() {
                    continue;
                }
                tree.link(parent, name, others[target % others.len()])
                    .unwrap();
            }
            Op::Unlink { parent, pick } => {
                let parent = dirs[parent % dirs.len()];
                let names: Vec<Vec<u8>> = tree
                    .entries(parent)
                    .unwrap()
                    .map(|(n, _)| n.to_vec())
                    .collect();
                if !names.is_empty() {
                    tree.unlink(parent, &names[pick % names.len()]).unwrap();
                }
            }
        }
    }
    if let Some(pick) = big_dir {
        let parent = dirs[pick % dirs.len()];
        let meta = Metadata {
            mode: 0o644,
            ..Metadata::default()
        };
        for i in 0..3000 {
            let name = format!("many-{i}-{}", "m".repeat(i % 50));
            if tree.lookup(parent, name.as_bytes()).unwrap().is_none() {
                tree.add(
                    parent,
                    name.as_bytes(),
                    NodeKind::File(DataRef::EMPTY),
                    meta.clone(),
                )
                .unwrap();
            }
        }
    }
    oracle::finish_and_check(dir, writer, &tree, &contents);
}

proptest! {
    // Every case runs fsck.erofs and a loop mount: keep the count modest (2-core machine).
    #![proptest_config(ProptestConfig {
        cases: 48,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_trees_survive_fsck_and_the_kernel(
        ops in prop::collection::vec(op(), 1..120),
        big_dir in prop::option::weighted(0.3, any::<usize>()),
    ) {
        build(&ops, big_dir);
    }
}
