//! Reads a layer blob (gzip, zstd or plain tar) into a list of its entries, so tests can
//! check what a layer really holds: whiteouts, hardlinks, devices, modes, xattrs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Regular files up to this size (busybox is ~2 MiB) keep their contents in
/// [`LayerEntry::contents`].
const MAX_KEPT_CONTENTS: u64 = 4 << 20;

/// The type of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Other(u8),
}

/// One entry of a layer tar.
#[derive(Debug, Clone)]
pub struct LayerEntry {
    /// Path inside the image, without a leading `./` or `/` and without a trailing `/`.
    pub path: PathBuf,
    pub kind: EntryKind,
    /// Permission and set-id/sticky bits (`0o7777` at most).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// Symlink target or hardlink source path.
    pub link: Option<PathBuf>,
    /// Device (major, minor) for character and block devices.
    pub device: Option<(u32, u32)>,
    /// Extended attributes from `SCHILY.xattr.*` PAX records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Contents of regular files up to 4 MiB.
    pub contents: Option<Vec<u8>>,
}

/// Every entry of the layer blob at `path`, in archive order. The compression is taken from
/// the blob's magic bytes; zstd goes through the `zstd` tool. Panics on unreadable input.
pub fn read_layer(path: &Path) -> Vec<LayerEntry> {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut magic = [0u8; 4];
    let read = file.read(&mut magic).expect("reading layer magic");
    drop(file);
    let file = BufReader::new(File::open(path).expect("reopening layer"));
    if read >= 2 && magic[..2] == [0x1f, 0x8b] {
        entries(path, flate2::read::GzDecoder::new(file))
    } else if read == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let mut child = Command::new("zstd")
            .args(["-dc", "--"])
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running zstd (apt-get install zstd): {e}"));
        let stdout = child.stdout.take().expect("zstd stdout");
        let list = entries(path, stdout);
        let status = child.wait().expect("waiting for zstd");
        assert!(
            status.success(),
            "zstd -dc {} failed: {status}",
            path.display()
        );
        list
    } else {
        entries(path, file)
    }
}

fn entries(path: &Path, reader: impl Read) -> Vec<LayerEntry> {
    let fail = |e: std::io::Error| -> ! { panic!("reading layer {}: {e}", path.display()) };
    let mut archive = tar::Archive::new(reader);
    let mut list = Vec::new();
    for entry in archive.entries().unwrap_or_else(|e| fail(e)) {
        let mut entry = entry.unwrap_or_else(|e| fail(e));
        let header = entry.header().clone();
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            tar::EntryType::Link => EntryKind::Hardlink,
            tar::EntryType::Char => EntryKind::CharDevice,
            tar::EntryType::Block => EntryKind::BlockDevice,
            tar::EntryType::Fifo => EntryKind::Fifo,
            other => EntryKind::Other(other.as_byte()),
        };
        let mut xattrs = BTreeMap::new();
        if let Some(extensions) = entry.pax_extensions().unwrap_or_else(|e| fail(e)) {
            for extension in extensions {
                let extension = extension.unwrap_or_else(|e| fail(e));
                if let Ok(name) = extension.key() {
                    if let Some(xattr) = name.strip_prefix("SCHILY.xattr.") {
                        xattrs.insert(xattr.to_owned(), extension.value_bytes().to_vec());
                    }
                }
            }
        }
        let device = match kind {
            EntryKind::CharDevice | EntryKind::BlockDevice => Some((
                header.device_major().ok().flatten().unwrap_or(0),
                header.device_minor().ok().flatten().unwrap_or(0),
            )),
            _ => None,
        };
        let size = entry.size();
        let contents = if kind == EntryKind::File && size <= MAX_KEPT_CONTENTS {
            let mut data = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut data).unwrap_or_else(|e| fail(e));
            Some(data)
        } else {
            None
        };
        list.push(LayerEntry {
            path: normalize(&entry.path().unwrap_or_else(|e| fail(e))),
            kind,
            mode: header.mode().unwrap_or_else(|e| fail(e)) & 0o7777,
            uid: header.uid().unwrap_or_else(|e| fail(e)),
            gid: header.gid().unwrap_or_else(|e| fail(e)),
            size,
            link: entry
                .link_name()
                .unwrap_or_else(|e| fail(e))
                .map(|l| l.into_owned()),
            device,
            xattrs,
            contents,
        });
    }
    list
}

fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| {
            !matches!(
                c,
                std::path::Component::CurDir | std::path::Component::RootDir
            )
        })
        .collect()
}
