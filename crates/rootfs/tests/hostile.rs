//! Hostile layers, generated here: each is rejected with an error naming the entry, or
//! its effect is contained inside the image (asserted on the tree, then fsck'd). The
//! applier never touches the host filesystem; the cases that aim at host paths also
//! check that a sentinel directory on the host is left alone.

mod support;

use std::io::{self, Read, Write};

use kiln_erofs::NodeKind;
use kiln_image::Compression;
use kiln_rootfs::{EntryError, Error, Limits, RootTree};
use support::{apply, apply_blobs, dir, file, finish_and_fsck, found, Found, LayerBuilder};
use tar::EntryType;

enum Expect {
    /// Rejected, and the error names this entry.
    Rejected(&'static [u8]),
    /// Applied; the check asserts where the effect landed.
    Contained(Box<dyn Fn(&RootTree)>),
}

struct Case {
    name: &'static str,
    layers: Vec<Vec<u8>>,
    limits: Limits,
    expect: Expect,
}

fn case(name: &'static str, layers: Vec<LayerBuilder>, expect: Expect) -> Case {
    Case {
        name,
        layers: layers.into_iter().map(LayerBuilder::tar).collect(),
        limits: Limits::default(),
        expect,
    }
}

fn contained(check: impl Fn(&RootTree) + 'static) -> Expect {
    Expect::Contained(Box::new(check))
}

fn base() -> LayerBuilder {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .dir("data", 0o755)
        .file("data/x", b"x")
}

/// `sentinel` is a directory on the host that hostile symlinks point at; it must stay
/// as it is.
fn cases(sentinel: &str) -> Vec<Case> {
    let planted = format!("{sentinel}/planted");
    let long = |prefix: &str| format!("{prefix}{}/file", "p".repeat(150));
    let mut pax_desync_long = LayerBuilder::new().pax(&[("size", b"4096")]);
    pax_desync_long = pax_desync_long.file("short-data", b"only a few bytes");
    let pax_desync_short = LayerBuilder::new()
        .pax(&[("size", b"2")])
        .file("shrunk", &[b'A'; 600])
        .file("next", b"n");
    let deep = "d/".repeat(10_000) + "file";
    let mut cases = vec![
        case(
            "dot-dot path",
            vec![base().file("../../escape", b"e")],
            contained(|r| {
                assert_eq!(found(r, "escape"), file("e"));
            }),
        ),
        case(
            "absolute path",
            vec![base().file("/etc/abs", b"a")],
            contained(|r| {
                assert_eq!(found(r, "etc/abs"), file("a"));
            }),
        ),
        case(
            "dot-dot in a PAX path",
            vec![base()
                .pax(&[("path", b"../../../pax-escape")])
                .file("harmless", b"p")],
            contained(|r| {
                assert_eq!(found(r, "pax-escape"), file("p"));
                assert_eq!(found(r, "harmless"), Found::Missing);
            }),
        ),
        case(
            "absolute PAX path",
            vec![base()
                .pax(&[("path", b"/../../etc/pax-abs")])
                .file("harmless", b"p")],
            contained(|r| {
                assert_eq!(found(r, "etc/pax-abs"), file("p"));
            }),
        ),
        case(
            "dot-dot in a GNU long name",
            vec![base().file(long("../../../../"), b"g")],
            contained(move |r| {
                assert_eq!(found(r, &format!("{}/file", "p".repeat(150))), file("g"));
            }),
        ),
        case(
            "absolute GNU long name",
            vec![base().file(long("/etc/"), b"g")],
            contained(move |r| {
                assert_eq!(
                    found(r, &format!("etc/{}/file", "p".repeat(150))),
                    file("g")
                );
            }),
        ),
        case(
            "write through a symlink pointing outside",
            vec![base().symlink("out", sentinel).file("out/planted", b"x")],
            contained(move |r| {
                assert_eq!(found(r, &planted), file("x"));
            }),
        ),
        case(
            "write through a symlink to /",
            vec![base()
                .symlink("rootlink", "/")
                .file("rootlink/etc/via-root", b"r")],
            contained(|r| {
                assert_eq!(found(r, "etc/via-root"), file("r"));
            }),
        ),
        case(
            "write through an escaping relative symlink",
            vec![base()
                .symlink("data/up", "../../../../..")
                .file("data/up/top", b"t")],
            contained(|r| {
                assert_eq!(found(r, "top"), file("t"));
            }),
        ),
        case(
            "symlink then directory of the same name (chmod outside)",
            vec![base().symlink("evil", "/etc").dir("evil", 0o777)],
            contained(|r| {
                let etc = r.lookup(b"etc", false).unwrap().unwrap();
                assert_eq!(r.tree().metadata(etc).unwrap().mode, 0o755);
                let evil = r.lookup(b"evil", false).unwrap().unwrap();
                assert_eq!(r.tree().kind(evil).unwrap(), &NodeKind::Directory);
            }),
        ),
        case(
            "symlink then file of the same name",
            vec![
                base().symlink("s", "/etc/passwd"),
                LayerBuilder::new().file("s", b"replaced"),
            ],
            contained(|r| {
                assert_eq!(found(r, "s"), file("replaced"));
                assert_eq!(found(r, "etc/passwd"), file("root:x:0:0::/root:/bin/sh\n"));
            }),
        ),
        case(
            "hardlink to an absolute path",
            vec![base().hardlink("h", "/etc/passwd")],
            contained(|r| {
                assert_eq!(
                    r.lookup(b"h", false).unwrap(),
                    r.lookup(b"etc/passwd", false).unwrap()
                );
            }),
        ),
        case(
            "hardlink to an escaping path",
            vec![base().hardlink("h", "../../../etc/passwd")],
            contained(|r| {
                assert_eq!(
                    r.lookup(b"h", false).unwrap(),
                    r.lookup(b"etc/passwd", false).unwrap()
                );
            }),
        ),
        case(
            "hardlink to a symlink",
            vec![base().symlink("l", "/etc/shadow").hardlink("h", "l")],
            contained(|r| {
                assert_eq!(found(r, "h"), Found::Symlink(b"/etc/shadow".to_vec()));
            }),
        ),
        case(
            "hardlink through a symlink pointing outside",
            vec![base().symlink("host", "/etc").hardlink("h", "host/passwd")],
            contained(|r| {
                assert_eq!(
                    r.lookup(b"h", false).unwrap(),
                    r.lookup(b"etc/passwd", false).unwrap()
                );
            }),
        ),
        case(
            "hardlink to itself",
            vec![base().hardlink("self", "self")],
            Expect::Rejected(b"self"),
        ),
        case(
            "hardlink to itself over a file",
            vec![base().hardlink("data/x", "data/x")],
            Expect::Rejected(b"data/x"),
        ),
        case(
            "hardlink to a later entry",
            vec![base().hardlink("early", "later").file("later", b"l")],
            Expect::Rejected(b"early"),
        ),
        case(
            "hardlink to a directory",
            vec![base().hardlink("hd", "etc")],
            Expect::Rejected(b"hd"),
        ),
        case(
            "hardlink to the root",
            vec![base().hardlink("hr", "/")],
            Expect::Rejected(b"hr"),
        ),
        case(
            "whiteout with an empty name",
            vec![base().file("etc/.wh.", b"")],
            Expect::Rejected(b"etc/.wh."),
        ),
        case(
            "whiteout of dot-dot",
            vec![base().file("etc/.wh..", b"")],
            Expect::Rejected(b"etc/.wh.."),
        ),
        case(
            "whiteout of dot-dot-dot",
            vec![base().file("etc/.wh...", b"")],
            Expect::Rejected(b"etc/.wh..."),
        ),
        case(
            "whiteout under a symlink pointing outside",
            vec![base().symlink("out", sentinel).file("out/.wh.keep", b"")],
            contained(|r| {
                assert_eq!(found(r, "etc/passwd"), file("root:x:0:0::/root:/bin/sh\n"));
            }),
        ),
        case(
            "whiteout under a symlinked directory",
            vec![
                base().symlink("alias", "data"),
                LayerBuilder::new().file("alias/.wh.x", b""),
            ],
            contained(|r| {
                assert_eq!(found(r, "data"), dir(&[]));
            }),
        ),
        case(
            "opaque whiteout at the root",
            vec![
                base(),
                LayerBuilder::new()
                    .file(".wh..wh..opq", b"")
                    .file("only", b"o"),
            ],
            contained(|r| {
                assert_eq!(found(r, ""), dir(&["only"]));
            }),
        ),
        case(
            "PAX size longer than the data",
            vec![pax_desync_long],
            Expect::Rejected(b"short-data"),
        ),
        case(
            "PAX size shorter than the data",
            vec![pax_desync_short],
            Expect::Rejected(b"shrunk"),
        ),
        case(
            "duplicate entries",
            vec![base()
                .file("dup", b"first")
                .file("dup", b"second")
                .dir("dd", 0o700)
                .dir("dd", 0o755)],
            contained(|r| {
                assert_eq!(found(r, "dup"), file("second"));
                let dd = r.lookup(b"dd", false).unwrap().unwrap();
                assert_eq!(r.tree().metadata(dd).unwrap().mode, 0o755);
            }),
        ),
        case(
            "non-UTF-8 names",
            vec![base().file(&b"data/\xff\xfe-latin1-\xe9"[..], b"bytes")],
            contained(|r| {
                let data = r.lookup(b"data", false).unwrap().unwrap();
                let names: Vec<Vec<u8>> = r
                    .tree()
                    .entries(data)
                    .unwrap()
                    .map(|(n, _)| n.to_vec())
                    .collect();
                assert!(names.contains(&b"\xff\xfe-latin1-\xe9".to_vec()));
            }),
        ),
        case(
            "entry below a regular file",
            vec![base().file("data/x/inside", b"")],
            Expect::Rejected(b"data/x/inside"),
        ),
        case(
            "symlink loop on the path",
            vec![base().symlink("a", "b").symlink("b", "a").file("a/x", b"")],
            Expect::Rejected(b"a/x"),
        ),
        case(
            "root replaced by a symlink",
            vec![base().symlink("./", "/tmp")],
            Expect::Rejected(b"./"),
        ),
        case(
            "name longer than 255 bytes",
            vec![base()
                .pax(&[("path", "n".repeat(300).as_bytes())])
                .file("x", b"")],
            Expect::Rejected(&[b'n'; 300]),
        ),
        case(
            "GNU sparse entry",
            vec![base().entry(
                {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(EntryType::GNUSparse);
                    h.set_size(0);
                    h
                },
                b"sparse",
                b"",
                b"",
            )],
            Expect::Rejected(b"sparse"),
        ),
        case(
            "huge xattr",
            vec![base()
                .pax(&[("SCHILY.xattr.user.big", &vec![b'v'; 200 << 10])])
                .file("xbig", b"")],
            Expect::Rejected(b"xbig"),
        ),
        case(
            "huge PAX header",
            vec![base()
                .pax(&[("comment", &vec![b'c'; 4 << 20])])
                .file("after-pax", b"")],
            Expect::Rejected(b"data/x"),
        ),
    ];
    let many_xattrs: Vec<(String, Vec<u8>)> = (0..1000)
        .map(|i| (format!("SCHILY.xattr.user.a{i}"), b"v".to_vec()))
        .collect();
    let records: Vec<(&str, &[u8])> = many_xattrs
        .iter()
        .map(|(k, v)| (k.as_str(), &v[..]))
        .collect();
    cases.push(case(
        "a thousand xattrs",
        vec![base().pax(&records).file("xmany", b"")],
        Expect::Rejected(b"xmany"),
    ));
    let mut deep_case = case(
        "10,000-deep directories",
        vec![base().pax(&[("path", deep.as_bytes())]).file("x", b"")],
        Expect::Rejected(b"d/d/d/d"),
    );
    deep_case.limits.max_path_len = 1 << 20;
    cases.push(deep_case);
    cases.push(case(
        "10,000-deep path over the path limit",
        vec![base().pax(&[("path", deep.as_bytes())]).file("x", b"")],
        Expect::Rejected(b"d/d/d/d"),
    ));
    cases
}

fn check_rejection(name: &str, err: &Error, entry: &[u8]) {
    let Error::Layer { entry: named, .. } = err else {
        panic!(
            "{name}: expected an error naming entry {:?}, got {err}",
            entry.escape_ascii().to_string()
        );
    };
    let path = named.path().unwrap_or_default();
    assert!(
        path.windows(entry.len()).any(|w| w == entry),
        "{name}: the error names {named} instead of {}",
        entry.escape_ascii()
    );
    let shown = entry.escape_ascii().to_string();
    let shown = &shown[..shown.len().min(40)];
    assert!(
        err.to_string().contains(shown),
        "{name}: message {err} lacks {shown}"
    );
}

#[test]
fn hostile_layers_are_rejected_or_contained() {
    let host = tempfile::tempdir().unwrap();
    let sentinel = host.path();
    std::fs::write(sentinel.join("keep"), b"host file").unwrap();
    let cases = cases(sentinel.to_str().unwrap());
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for case in cases {
        match (apply(&case.layers, &case.limits), case.expect) {
            (Err(err), Expect::Rejected(entry)) => check_rejection(case.name, &err, entry),
            (Ok(root), Expect::Contained(check)) => {
                check(&root);
                finish_and_fsck(root);
            }
            (Ok(_), Expect::Rejected(entry)) => {
                panic!(
                    "{}: accepted, expected a rejection naming {}",
                    case.name,
                    entry.escape_ascii()
                )
            }
            (Err(err), Expect::Contained(_)) => panic!("{}: rejected: {err}", case.name),
        }
    }
    let left: Vec<_> = std::fs::read_dir(sentinel)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("keep")]);
    assert_eq!(std::fs::read(sentinel.join("keep")).unwrap(), b"host file");
}

/// A tar stream of `count` empty files, generated as it is read (a million entries
/// would be 512 MB of headers).
struct ManyFiles {
    next: u64,
    count: u64,
    block: Vec<u8>,
    pos: usize,
}

impl Read for ManyFiles {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.block.len() {
            if self.next > self.count {
                return Ok(0);
            }
            self.block = if self.next == self.count {
                vec![0; 1024]
            } else {
                let mut h = tar::Header::new_ustar();
                h.set_path(format!("many/f{:07}", self.next)).unwrap();
                h.set_size(0);
                h.set_mode(0o644);
                h.set_cksum();
                h.as_bytes().to_vec()
            };
            self.next += 1;
            self.pos = 0;
        }
        let n = buf.len().min(self.block.len() - self.pos);
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn a_million_file_layer_stops_at_the_entry_limit() {
    let layer = ManyFiles {
        next: 0,
        count: 1_000_000,
        block: Vec::new(),
        pos: 0,
    };
    let limits = Limits {
        max_entries: 10_000,
        ..Limits::default()
    };
    let err = apply_blobs(
        [(Compression::None, Box::new(layer) as Box<dyn Read>)],
        &limits,
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Layer {
                reason: EntryError::TooManyEntries { max: 10_000 },
                ..
            }
        ),
        "{err}"
    );
    check_rejection("million files", &err, b"many/f0010000");
}

/// A layer holding one file `bomb` of `size` zero bytes.
fn zero_file_tar(size: u64, out: &mut impl Write) {
    let mut h = tar::Header::new_ustar();
    h.set_path("bomb").unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    out.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    out.write_all(&[0; 1024]).unwrap();
}

#[test]
fn gzip_bomb_hits_the_decompressed_size_limit() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    zero_file_tar(64 << 20, &mut gz);
    let blob = gz.finish().unwrap();
    let limits = Limits {
        max_uncompressed_bytes: 8 << 20,
        ..Limits::default()
    };
    let err = apply_blobs(
        [(Compression::Gzip, Box::new(&blob[..]) as Box<dyn Read>)],
        &limits,
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Layer {
                reason: EntryError::DecompressedTooLarge { .. },
                ..
            }
        ),
        "{err}"
    );
    check_rejection("gzip bomb", &err, b"bomb");
}

#[test]
fn zstd_bomb_hits_the_ratio_limit() {
    let mut zst = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    zero_file_tar(64 << 20, &mut zst);
    let blob = zst.finish().unwrap();
    let limits = Limits {
        max_compression_ratio: 100,
        ratio_grace_bytes: 1 << 20,
        ..Limits::default()
    };
    let err = apply_blobs(
        [(Compression::Zstd, Box::new(&blob[..]) as Box<dyn Read>)],
        &limits,
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Layer {
                reason: EntryError::RatioTooHigh { max_ratio: 100 },
                ..
            }
        ),
        "{err}"
    );
    check_rejection("zstd bomb", &err, b"bomb");
}
