//! Oracles for images written by kiln-erofs: `fsck.erofs` from erofs-utils, and the Linux
//! kernel's EROFS driver through a read-only loop mount, compared entry by entry with the
//! tree the image was built from.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::hash::{DefaultHasher, Hasher};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_erofs::{DataRef, ImageOptions, ImageStats, ImageWriter, NodeId, NodeKind, Tree};

/// One filesystem entry as a comparable record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    /// Full st_mode: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub content_hash: Option<u64>,
    pub symlink_target: Option<Vec<u8>>,
    pub rdev: Option<(u32, u32)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub mtime: (i64, u32),
    pub nlink: u64,
}

/// Every path of a tree (relative, "" for the root) with its entry, and hard link groups.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: BTreeMap<Vec<u8>, Entry>,
    /// Sets of paths that share one inode (only sets of two or more).
    pub link_groups: BTreeSet<Vec<Vec<u8>>>,
}

pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(data);
    hasher.finish()
}

/// Builds an image from `tree`, with file contents looked up in `contents` by DataRef.
/// The writer must have produced every DataRef in the tree.
pub fn expected_listing(tree: &Tree, contents: &HashMap<DataRef, Vec<u8>>) -> Listing {
    let mut listing = Listing::default();
    let mut paths_by_node: HashMap<NodeId, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![(Vec::new(), tree.root())];
    while let Some((path, id)) = stack.pop() {
        let meta = tree.metadata(id).unwrap();
        let kind = tree.kind(id).unwrap();
        let mut entry = Entry {
            kind: "",
            mode: meta.mode,
            uid: meta.uid,
            gid: meta.gid,
            size: 0,
            content_hash: None,
            symlink_target: None,
            rdev: None,
            // Linux only lets regular files and directories expose user.* xattrs.
            xattrs: meta
                .xattrs
                .iter()
                .filter(|x| {
                    matches!(kind, NodeKind::File(_) | NodeKind::Directory)
                        || !x.name.starts_with(b"user.")
                })
                .map(|x| (x.name.clone(), x.value.clone()))
                .collect(),
            mtime: (meta.mtime.sec, meta.mtime.nsec),
            nlink: 0,
        };
        match kind {
            NodeKind::File(data) => {
                let bytes = if data.is_empty() {
                    &[][..]
                } else {
                    &contents[data][..]
                };
                entry.kind = "file";
                entry.mode |= libc::S_IFREG;
                entry.size = bytes.len() as u64;
                entry.content_hash = Some(hash_bytes(bytes));
            }
            NodeKind::Directory => {
                entry.kind = "dir";
                entry.mode |= libc::S_IFDIR;
                let mut subdirs = 0;
                for (name, child) in tree.entries(id).unwrap() {
                    let mut child_path = path.clone();
                    if !child_path.is_empty() {
                        child_path.push(b'/');
                    }
                    child_path.extend_from_slice(name);
                    if matches!(tree.kind(child).unwrap(), NodeKind::Directory) {
                        subdirs += 1;
                    }
                    stack.push((child_path, child));
                }
                entry.nlink = 2 + subdirs;
            }
            NodeKind::Symlink(target) => {
                entry.kind = "symlink";
                entry.mode |= libc::S_IFLNK;
                entry.size = target.len() as u64;
                entry.symlink_target = Some(target.clone());
            }
            NodeKind::CharDevice { major, minor } => {
                entry.kind = "char";
                entry.mode |= libc::S_IFCHR;
                entry.rdev = Some((*major, *minor));
            }
            NodeKind::BlockDevice { major, minor } => {
                entry.kind = "block";
                entry.mode |= libc::S_IFBLK;
                entry.rdev = Some((*major, *minor));
            }
            NodeKind::Fifo => {
                entry.kind = "fifo";
                entry.mode |= libc::S_IFIFO;
            }
            NodeKind::Socket => {
                entry.kind = "socket";
                entry.mode |= libc::S_IFSOCK;
            }
        }
        if !matches!(kind, NodeKind::Directory) {
            paths_by_node.entry(id).or_default().push(path.clone());
        }
        listing.entries.insert(path, entry);
    }
    for paths in paths_by_node.into_values() {
        for path in &paths {
            listing.entries.get_mut(path).unwrap().nlink = paths.len() as u64;
        }
        if paths.len() > 1 {
            let mut paths = paths;
            paths.sort();
            listing.link_groups.insert(paths);
        }
    }
    listing
}

/// Lists a mounted tree through the kernel (lstat, readlink, llistxattr, read).
pub fn mounted_listing(root: &Path) -> Listing {
    let mut listing = Listing::default();
    let mut paths_by_ino: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![Vec::new()];
    while let Some(rel) = stack.pop() {
        let full = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(&rel))
        };
        let meta = std::fs::symlink_metadata(&full).unwrap();
        let file_type = meta.file_type();
        // EROFS inode numbers are nids; 0 reads as an empty slot to some programs.
        assert_ne!(meta.ino(), 0, "{} has inode number 0", full.display());
        let mut entry = Entry {
            kind: "",
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            size: 0,
            content_hash: None,
            symlink_target: None,
            rdev: None,
            xattrs: read_xattrs(&full, !file_type.is_file() && !file_type.is_dir()),
            mtime: (meta.mtime(), meta.mtime_nsec() as u32),
            nlink: meta.nlink(),
        };
        if file_type.is_file() {
            entry.kind = "file";
            entry.size = meta.len();
            let mut data = Vec::new();
            File::open(&full).unwrap().read_to_end(&mut data).unwrap();
            assert_eq!(data.len() as u64, meta.len(), "{}", full.display());
            entry.content_hash = Some(hash_bytes(&data));
        } else if file_type.is_dir() {
            entry.kind = "dir";
            for child in std::fs::read_dir(&full).unwrap() {
                let name = child.unwrap().file_name();
                let mut child_rel = rel.clone();
                if !child_rel.is_empty() {
                    child_rel.push(b'/');
                }
                child_rel.extend_from_slice(name.as_bytes());
                stack.push(child_rel);
            }
        } else if file_type.is_symlink() {
            entry.kind = "symlink";
            entry.size = meta.len();
            entry.symlink_target = Some(
                std::fs::read_link(&full)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            );
        } else if file_type.is_char_device() || file_type.is_block_device() {
            entry.kind = if file_type.is_char_device() {
                "char"
            } else {
                "block"
            };
            entry.rdev = Some((libc::major(meta.rdev()), libc::minor(meta.rdev())));
        } else if file_type.is_fifo() {
            entry.kind = "fifo";
        } else if file_type.is_socket() {
            entry.kind = "socket";
        }
        if !file_type.is_dir() {
            paths_by_ino
                .entry(meta.ino())
                .or_default()
                .push(rel.clone());
        }
        listing.entries.insert(rel, entry);
    }
    for mut paths in paths_by_ino.into_values() {
        if paths.len() > 1 {
            paths.sort();
            listing.link_groups.insert(paths);
        }
    }
    listing
}

/// Reads all xattrs of `path`. With `user_hidden` (anything but a regular file or a
/// directory), user.* xattrs that the kernel lists but refuses to read are left out.
fn read_xattrs(path: &Path, user_hidden: bool) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 1 << 16];
    // SAFETY: the buffers outlive the calls and their lengths are passed along.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(
        len >= 0,
        "llistxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    names.truncate(len as usize);
    let mut xattrs = BTreeMap::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let c_name = CString::new(name).unwrap();
        let mut value = vec![0u8; 1 << 16];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c_name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        let err = std::io::Error::last_os_error();
        if len < 0
            && user_hidden
            && name.starts_with(b"user.")
            && err.raw_os_error() == Some(libc::ENODATA)
        {
            continue;
        }
        assert!(
            len >= 0,
            "lgetxattr {} {}: {err}",
            path.display(),
            name.escape_ascii()
        );
        value.truncate(len as usize);
        xattrs.insert(name.to_vec(), value);
    }
    xattrs
}

/// Asserts that two listings are equal, reporting the first differences by path.
pub fn assert_same(expected: &Listing, actual: &Listing) {
    let mut problems = Vec::new();
    for (path, want) in &expected.entries {
        match actual.entries.get(path) {
            None => problems.push(format!("missing {:?}", path.escape_ascii().to_string())),
            Some(got) if got != want => problems.push(format!(
                "{:?}:\n  want {want:?}\n  got  {got:?}",
                path.escape_ascii().to_string()
            )),
            Some(_) => {}
        }
    }
    for path in actual
        .entries
        .keys()
        .filter(|p| !expected.entries.contains_key(*p))
    {
        problems.push(format!("unexpected {:?}", path.escape_ascii().to_string()));
    }
    if expected.link_groups != actual.link_groups {
        problems.push(format!(
            "hard link groups differ:\n  want {:?}\n  got  {:?}",
            expected.link_groups, actual.link_groups
        ));
    }
    problems.truncate(20);
    assert!(
        problems.is_empty(),
        "mounted image differs from the tree:\n{}",
        problems.join("\n")
    );
}

/// Runs `fsck.erofs --extract` (checks the superblock, every inode, directory and all
/// file data, without writing anything) and panics with its output when it fails.
pub fn fsck(image: &Path) {
    let output = Command::new("fsck.erofs")
        .arg("--extract")
        .arg(image)
        .output()
        .expect("fsck.erofs (erofs-utils) must be installed");
    assert!(
        output.status.success(),
        "fsck.erofs rejected {}:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A read-only loop mount, unmounted on drop (also when the test panics).
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    /// Mounts `image`, or returns None (after saying why) when not running as root.
    pub fn new(image: &Path) -> Option<Mount> {
        if !is_root() {
            eprintln!("skipping the kernel mount comparison: it needs root (loop mount)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "the kernel refused to mount {}: {}",
            image.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Some(Mount { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// A tree under construction with its writer and the contents it was given, for checks.
pub struct Built {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub stats: ImageStats,
}

/// Finishes `writer` into `<tempdir>/image.erofs`, checks it with fsck.erofs and, as
/// root, compares the kernel's view with `tree`.
pub fn finish_and_check(
    dir: tempfile::TempDir,
    writer: ImageWriter,
    tree: &Tree,
    contents: &HashMap<DataRef, Vec<u8>>,
) -> Built {
    let image = dir.path().join("image.erofs");
    let stats = writer.finish(tree).unwrap().stats;
    fsck(&image);
    if let Some(mount) = Mount::new(&image) {
        assert_same(
            &expected_listing(tree, contents),
            &mounted_listing(mount.path()),
        );
    }
    Built { dir, image, stats }
}

/// A writer on `<new tempdir>/image.erofs`.
pub fn new_writer() -> (tempfile::TempDir, ImageWriter) {
    let dir = tempfile::tempdir().unwrap();
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("image.erofs"))
        .unwrap();
    (
        dir,
        ImageWriter::new(file, ImageOptions::default()).unwrap(),
    )
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn check(rc: libc::c_int, what: &str, path: &Path) {
    assert!(
        rc == 0,
        "{what} {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Recreates `tree` as real files under the empty directory `dest` (needs root: owners,
/// device nodes, trusted.* xattrs), reading file contents back from `writer`.
pub fn materialize(tree: &Tree, writer: &ImageWriter, dest: &Path) {
    let mut first_path: HashMap<NodeId, PathBuf> = HashMap::new();
    materialize_dir(tree, writer, tree.root(), dest, &mut first_path);
}

fn materialize_dir(
    tree: &Tree,
    writer: &ImageWriter,
    dir: NodeId,
    path: &Path,
    first_path: &mut HashMap<NodeId, PathBuf>,
) {
    for (name, child) in tree.entries(dir).unwrap() {
        let child_path = path.join(OsStr::from_bytes(name));
        if let Some(existing) = first_path.get(&child) {
            std::fs::hard_link(existing, &child_path).unwrap();
            continue;
        }
        let meta = tree.metadata(child).unwrap();
        let c = c_path(&child_path);
        let mknod = |type_bits: u32, dev: libc::dev_t| {
            // SAFETY: c is a valid NUL-terminated path.
            check(
                unsafe { libc::mknod(c.as_ptr(), type_bits | 0o600, dev) },
                "mknod",
                &child_path,
            );
        };
        match tree.kind(child).unwrap() {
            NodeKind::File(data) => {
                let mut file = File::create(&child_path).unwrap();
                std::io::copy(&mut writer.read_data(data).unwrap(), &mut file).unwrap();
            }
            NodeKind::Directory => {
                std::fs::create_dir(&child_path).unwrap();
                materialize_dir(tree, writer, child, &child_path, first_path);
            }
            NodeKind::Symlink(target) => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &child_path).unwrap()
            }
            NodeKind::CharDevice { major, minor } => {
                mknod(libc::S_IFCHR, libc::makedev(*major, *minor))
            }
            NodeKind::BlockDevice { major, minor } => {
                mknod(libc::S_IFBLK, libc::makedev(*major, *minor))
            }
            NodeKind::Fifo => mknod(libc::S_IFIFO, 0),
            NodeKind::Socket => mknod(libc::S_IFSOCK, 0),
        }
        if !matches!(tree.kind(child).unwrap(), NodeKind::Directory) {
            first_path.insert(child, child_path.clone());
        }
        apply_metadata(
            &child_path,
            meta,
            matches!(tree.kind(child).unwrap(), NodeKind::Symlink(_)),
        );
    }
    apply_metadata(path, tree.metadata(dir).unwrap(), false);
}

fn apply_metadata(path: &Path, meta: &kiln_erofs::Metadata, is_symlink: bool) {
    let c = c_path(path);
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    let rc = unsafe { libc::lchown(c.as_ptr(), meta.uid, meta.gid) };
    check(rc, "lchown", path);
    for xattr in &meta.xattrs {
        let name = CString::new(xattr.name.clone()).unwrap();
        // SAFETY: c and name are NUL-terminated and the value buffer holds its length in
        // bytes, all alive for the duration of the call.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                name.as_ptr(),
                xattr.value.as_ptr().cast(),
                xattr.value.len(),
                0,
            )
        };
        check(rc, "lsetxattr", path);
    }
    if !is_symlink {
        // After chown, which clears setuid/setgid; ACLs must agree with the mode.
        // SAFETY: c is a valid NUL-terminated path for the duration of the call.
        let rc = unsafe { libc::chmod(c.as_ptr(), meta.mode) };
        check(rc, "chmod", path);
    }
    let time = libc::timespec {
        tv_sec: meta.mtime.sec,
        tv_nsec: meta.mtime.nsec as libc::c_long,
    };
    let times = [time, time];
    // SAFETY: c is NUL-terminated and times holds the two timespecs utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, "utimensat", path);
}

/// Runs mkfs.erofs (erofs-utils) on `source` and returns the image path.
pub fn mkfs_erofs(source: &Path, image: &Path) {
    let output = Command::new("mkfs.erofs")
        .arg(image)
        .arg(source)
        .output()
        .expect("mkfs.erofs must be installed");
    assert!(
        output.status.success(),
        "mkfs.erofs failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
