//! Layer tarballs written byte by byte (hostile names included), applied with the public
//! API, and the resulting tree inspected or finished and checked with `fsck.erofs`.

#![allow(dead_code)] // each test file uses a different part

use std::io::Read;
use std::process::Command;

use kiln_erofs::{ImageOptions, ImageWriter, NodeKind};
use kiln_image::Compression;
use kiln_rootfs::{apply_layers, Error, Layer, Limits, RootTree};
use tar::{EntryType, Header};

/// Builds one layer tar. Names are written as given (`..`, absolute, non-UTF-8).
pub struct LayerBuilder {
    out: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        LayerBuilder {
            out: tar::Builder::new(Vec::new()),
        }
    }
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry; names longer than 100 bytes go into a GNU long-name header.
    pub fn entry(mut self, mut h: Header, path: &[u8], link: &[u8], data: &[u8]) -> Self {
        if path.len() > 100 {
            self = self.gnu_long(EntryType::GNULongName, path);
        }
        if link.len() > 100 {
            self = self.gnu_long(EntryType::GNULongLink, link);
        }
        let old = h.as_old_mut();
        let n = path.len().min(100);
        old.name = [0; 100];
        old.name[..n].copy_from_slice(&path[..n]);
        let n = link.len().min(100);
        old.linkname = [0; 100];
        old.linkname[..n].copy_from_slice(&link[..n]);
        h.set_cksum();
        self.out.append(&h, data).unwrap();
        self
    }

    fn gnu_long(mut self, kind: EntryType, name: &[u8]) -> Self {
        let mut data = name.to_vec();
        data.push(0);
        let mut h = header(kind, 0, data.len() as u64);
        h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        self.out.append(&h, &data[..]).unwrap();
        self
    }

    /// PAX records for the next entry.
    pub fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.out
            .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
            .unwrap();
        self
    }

    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.entry(
            header(EntryType::Directory, mode, 0),
            path.as_bytes(),
            b"",
            b"",
        )
    }

    pub fn file(self, path: impl AsRef<[u8]>, data: &[u8]) -> Self {
        let h = header(EntryType::Regular, 0o644, data.len() as u64);
        self.entry(h, path.as_ref(), b"", data)
    }

    pub fn file_owned(self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
        let mut h = header(EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.entry(h, path.as_bytes(), b"", data)
    }

    pub fn symlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let h = header(EntryType::Symlink, 0o777, 0);
        self.entry(h, path.as_ref(), target.as_ref(), b"")
    }

    pub fn hardlink(self, path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        let h = header(EntryType::Link, 0o644, 0);
        self.entry(h, path.as_ref(), target.as_ref(), b"")
    }

    pub fn device(self, path: &str, kind: EntryType, major: u32, minor: u32) -> Self {
        let mut h = header(kind, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.entry(h, path.as_bytes(), b"", b"")
    }

    pub fn tar(self) -> Vec<u8> {
        self.out.into_inner().unwrap()
    }
}

/// The layers applied in order as uncompressed blobs, with `limits`.
pub fn apply(layers: &[Vec<u8>], limits: &Limits) -> Result<RootTree, Error> {
    apply_blobs(
        layers
            .iter()
            .map(|l| (Compression::None, Box::new(&l[..]) as Box<dyn Read>)),
        limits,
    )
}

pub fn apply_blobs<'a>(
    blobs: impl IntoIterator<Item = (Compression, Box<dyn Read + 'a>)>,
    limits: &Limits,
) -> Result<RootTree, Error> {
    let writer = ImageWriter::new(tempfile::tempfile().unwrap(), ImageOptions::default()).unwrap();
    let layers = blobs
        .into_iter()
        .enumerate()
        .map(|(i, (compression, blob))| Layer {
            digest: format!("sha256:test-layer-{}", i + 1),
            compression,
            blob,
        });
    apply_layers(layers, writer, limits)
}

/// What a path (symlinks followed except the last) names in the tree.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Missing,
    File(Vec<u8>),
    Dir(Vec<String>),
    Symlink(Vec<u8>),
    Other,
}

pub fn found(root: &RootTree, path: &str) -> Found {
    let Some(node) = root.lookup(path.as_bytes(), false).unwrap() else {
        return Found::Missing;
    };
    match root.tree().kind(node).unwrap() {
        NodeKind::File(_) => Found::File(root.read_file(node, 1 << 20).unwrap().unwrap()),
        NodeKind::Directory => Found::Dir(
            root.tree()
                .entries(node)
                .unwrap()
                .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
                .collect(),
        ),
        NodeKind::Symlink(t) => Found::Symlink(t.clone()),
        _ => Found::Other,
    }
}

pub fn file(data: &str) -> Found {
    Found::File(data.as_bytes().to_vec())
}

pub fn dir(names: &[&str]) -> Found {
    Found::Dir(names.iter().map(|s| s.to_string()).collect())
}

/// Writes the image and checks it with fsck.erofs.
pub fn finish_and_fsck(root: RootTree) {
    let image = root.finish().unwrap();
    let path = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    let mut file = image.file;
    std::io::Seek::rewind(&mut file).unwrap();
    std::io::copy(&mut file, &mut std::fs::File::create(&path).unwrap()).unwrap();
    let out = Command::new("fsck.erofs")
        .arg(&*path)
        .output()
        .expect("running fsck.erofs (erofs-utils)");
    assert!(
        out.status.success(),
        "fsck.erofs failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
