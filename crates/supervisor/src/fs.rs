//! Giving the sandbox user its writable paths, without following a single symlink.
//!
//! # Ownership and the overlay
//!
//! In the VM the identity layer already holds /sandbox owned by the sandbox ids, and the
//! guest mounts its overlay root with `metacopy=on`. The walk here changes only entries
//! whose owner differs, so the common case writes nothing at all, and an entry that does
//! need a chown is copied up as metadata only (the file data stays in the lower layer).
//! On the Kubernetes path the paths are volumes, where chown is an inode update.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchownat, Gid, Uid};

use crate::SupervisorError;

/// Makes every path in `paths` (absolute) and everything below it owned by `uid:gid`.
///
/// - No symlink is followed: a path whose resolution meets a symlink is an error, and
///   symlinks inside the trees are chowned themselves (like `lchown`).
/// - A missing path whose parent exists is created as a directory (mode 0755).
/// - The walk stays on each path's filesystem: other mounts below it are left alone.
/// - Entries already owned by `uid:gid` are not touched (no overlay copy-up).
pub fn prepare_filesystem(paths: &[PathBuf], uid: u32, gid: u32) -> Result<(), SupervisorError> {
    let root = nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| writable_err(Path::new("/"), &format!("opening /: {errno}")))?;
    for path in paths {
        own_tree(root.as_fd(), path, uid, gid)?;
    }
    Ok(())
}

fn writable_err(path: &Path, reason: &str) -> SupervisorError {
    SupervisorError::WritablePath {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

/// `path` relative to `/`, refusing anything but plain names (no `..`, no `.`).
fn relative(path: &Path) -> Result<PathBuf, SupervisorError> {
    let mut rel = PathBuf::new();
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err(writable_err(path, "accepted: an absolute path"));
    }
    for component in components {
        match component {
            Component::Normal(name) => rel.push(name),
            _ => return Err(writable_err(path, "accepted: a path without '.' or '..'")),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(writable_err(
            path,
            "the root directory itself is never made writable",
        ));
    }
    Ok(rel)
}

fn no_symlinks(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH)
}

fn own_tree(root: BorrowedFd, path: &Path, uid: u32, gid: u32) -> Result<(), SupervisorError> {
    let rel = relative(path)?;
    let fail = |what: &str, errno: Errno| {
        let reason = if errno == Errno::ELOOP {
            format!("{what}: a component is a symlink, which is never followed")
        } else {
            format!("{what}: {errno}")
        };
        writable_err(path, &reason)
    };
    let base = match openat2(root, &rel, no_symlinks(OFlag::O_PATH)) {
        Err(Errno::ENOENT) => {
            let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
            let parent_fd = match parent {
                Some(parent) => openat2(
                    root,
                    parent,
                    no_symlinks(OFlag::O_PATH | OFlag::O_DIRECTORY),
                )
                .map_err(|e| fail("opening its parent", e))?,
                None => root
                    .try_clone_to_owned()
                    .map_err(|e| fail("opening /", io_errno(e)))?,
            };
            let name = rel
                .file_name()
                .expect("relative() returns a non-empty path");
            mkdirat(parent_fd.as_fd(), name, Mode::from_bits_truncate(0o755))
                .map_err(|e| fail("creating it", e))?;
            openat2(root, &rel, no_symlinks(OFlag::O_PATH)).map_err(|e| fail("opening it", e))?
        }
        other => other.map_err(|e| fail("opening it", e))?,
    };
    let stat = fstatat(base.as_fd(), "", AtFlags::AT_EMPTY_PATH).map_err(|e| fail("stat", e))?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind == SFlag::S_IFLNK {
        return Err(fail("opening it", Errno::ELOOP));
    }
    if (stat.st_uid, stat.st_gid) != (uid, gid) {
        chown_at(
            base.as_fd(),
            OsStr::new(""),
            uid,
            gid,
            AtFlags::AT_EMPTY_PATH,
        )
        .map_err(|e| fail("chown", e))?;
    }
    if kind != SFlag::S_IFDIR {
        return Ok(());
    }
    // Breadth-first with one open directory at a time, so depth cannot exhaust fds.
    let mut pending = vec![PathBuf::from(".")];
    while let Some(dir_rel) = pending.pop() {
        let how = no_symlinks(OFlag::O_RDONLY | OFlag::O_DIRECTORY).resolve(
            ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
        let dir_fd: OwnedFd = openat2(base.as_fd(), &dir_rel, how)
            .map_err(|e| fail(&format!("opening {}", dir_rel.display()), e))?;
        let mut dir = Dir::from_fd(dir_fd).map_err(|e| fail("reading a directory", e))?;
        let dir_fd = dir
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| fail("dup", io_errno(e)))?;
        for entry in dir.iter() {
            let entry = entry.map_err(|e| fail(&format!("reading {}", dir_rel.display()), e))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let entry_stat = fstatat(dir_fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| fail(&format!("stat {}", dir_rel.join(name).display()), e))?;
            if entry_stat.st_dev != stat.st_dev {
                continue; // a mount point: another filesystem, left alone
            }
            if (entry_stat.st_uid, entry_stat.st_gid) != (uid, gid) {
                chown_at(dir_fd.as_fd(), name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .map_err(|e| fail(&format!("chown {}", dir_rel.join(name).display()), e))?;
            }
            if SFlag::from_bits_truncate(entry_stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                pending.push(dir_rel.join(name));
            }
        }
    }
    Ok(())
}

fn io_errno(err: std::io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}

fn chown_at(
    dir: BorrowedFd,
    name: &OsStr,
    uid: u32,
    gid: u32,
    flags: AtFlags,
) -> Result<(), Errno> {
    fchownat(
        dir,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        flags,
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt};

    use super::*;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (chown to other ids): run it as root, as scripts/test does"
        );
    }

    #[test]
    fn relative_paths_are_refused() {
        for bad in ["sandbox", "/", "/a/../etc", "./a"] {
            let err = prepare_filesystem(&[PathBuf::from(bad)], 5000, 5000).unwrap_err();
            assert!(
                matches!(err, SupervisorError::WritablePath { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    #[ignore = "needs root (scripts/test runs it as root)"]
    fn trees_are_owned_without_following_symlinks() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "host file").unwrap();
        let tree = tmp.path().join("sandbox");
        std::fs::create_dir_all(tree.join("a/b/c")).unwrap();
        std::fs::write(tree.join("a/b/c/file"), "data").unwrap();
        symlink(&outside, tree.join("a/link")).unwrap();
        symlink(tmp.path(), tree.join("dirlink")).unwrap();

        prepare_filesystem(&[tree.clone(), tmp.path().join("new")], 5000, 5001).unwrap();

        for path in ["", "a", "a/b", "a/b/c", "a/b/c/file", "a/link", "dirlink"] {
            let meta = std::fs::symlink_metadata(tree.join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (5000, 5001), "{path}");
        }
        let host = std::fs::metadata(&outside).unwrap();
        assert_eq!(
            (host.uid(), host.gid()),
            (0, 0),
            "a symlink's target is never chowned"
        );
        assert_eq!(std::fs::metadata(tmp.path()).unwrap().uid(), 0);
        let created = std::fs::metadata(tmp.path().join("new")).unwrap();
        assert!(created.is_dir());
        assert_eq!((created.uid(), created.gid()), (5000, 5001));
    }

    #[test]
    #[ignore = "needs root (scripts/test runs it as root)"]
    fn a_symlink_on_the_way_is_an_error() {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        symlink(tmp.path().join("real"), tmp.path().join("link")).unwrap();
        for path in [tmp.path().join("link"), tmp.path().join("link/sub")] {
            let err = prepare_filesystem(std::slice::from_ref(&path), 5000, 5000).unwrap_err();
            assert!(
                err.to_string().contains("symlink"),
                "{}: {err}",
                path.display()
            );
        }
        assert_eq!(std::fs::metadata(tmp.path().join("real")).unwrap().uid(), 0);
        assert!(!tmp.path().join("real/sub").exists());
    }
}
