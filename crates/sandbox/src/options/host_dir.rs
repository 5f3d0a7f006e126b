//! A volume's host directory, opened so that what kiln checks is what the VMM serves.
//!
//! [`open`] walks the path from `/` one component at a time, opening each with
//! `O_PATH | O_NOFOLLOW`, so no part of it is resolved by anyone but this walk. Before it
//! steps from a directory into an entry it checks that nobody but root and the caller
//! (kiln's effective uid) can replace that entry ([`check_step`]): otherwise another user
//! could swap the entry for a symlink or another directory between two looks at it. A
//! symlink is followed only when asked ([`Symlinks::Follow`], when a volume is given) and
//! only once the step to it passed that check. The walk ends holding the directory open;
//! its device and inode ([`DirIdentity`]) pin it for later starts.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Metadata};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Symlinks a walk may follow, as the kernel allows (`MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// Which directory a path named when it was checked: its device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirIdentity {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for DirIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "device {} inode {}", self.dev, self.ino)
    }
}

/// Whether a walk follows the symlinks it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symlinks {
    /// Follow each (from a directory that passed the checks), as the path's owner meant.
    Follow,
    /// Refuse any: the path was made symlink-free when the volume was given.
    Refuse,
}

/// A host directory held open by [`open`].
#[derive(Debug)]
pub struct HostDir {
    /// An `O_PATH` descriptor of the directory.
    pub fd: OwnedFd,
    /// Its path from `/` without symlinks, `.` or `..`.
    pub path: PathBuf,
    pub identity: DirIdentity,
}

/// Why a volume's host directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum HostDirError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} is now a symbolic link (the path had none when the volume was given)", .path.display())]
    Symlink { path: PathBuf },
    #[error("{}: more than {MAX_SYMLINKS} symbolic links", .path.display())]
    SymlinkLoop { path: PathBuf },
    #[error(
        "{danger}, so {who} could replace {} with a symbolic link or another directory; \
         every directory above a volume must belong to {trusted} and be writable by no one \
         else, or be sticky (as /tmp) with the entry below it belonging to {trusted}",
        .entry.display()
    )]
    Replaceable {
        danger: Danger,
        who: Who,
        entry: PathBuf,
        trusted: Trusted,
    },
    #[error(
        "{} is no longer the directory the sandbox was created with ({pinned} then, \
         {found} now); put the directory back or create a new sandbox",
        .path.display()
    )]
    Replaced {
        path: PathBuf,
        pinned: DirIdentity,
        found: DirIdentity,
    },
    #[error(
        "the sandbox was created by a kiln that did not record which directory this is; \
         remove the sandbox and create it again"
    )]
    Unpinned,
}

/// What makes an entry replaceable by someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Danger {
    /// The directory holding it belongs to another user.
    DirOwned { dir: PathBuf, uid: u32 },
    /// The directory holding it is writable by its group or by everyone, without the
    /// sticky bit.
    DirWritable { dir: PathBuf, mode: u32 },
    /// It sits in a sticky, shared directory and belongs to another user.
    EntryOwned {
        dir: PathBuf,
        entry: PathBuf,
        uid: u32,
    },
}

impl std::fmt::Display for Danger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Danger::DirOwned { dir, uid } => write!(f, "{} is owned by uid {uid}", dir.display()),
            Danger::DirWritable { dir, mode } => write!(
                f,
                "{} is writable by its group or by everyone (mode {:04o}, not sticky)",
                dir.display(),
                mode & 0o7777
            ),
            Danger::EntryOwned { dir, entry, uid } => write!(
                f,
                "{} is owned by uid {uid} and sits in the shared sticky directory {}",
                entry.display(),
                dir.display()
            ),
        }
    }
}

/// Who could replace an entry, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Uid(u32),
    GroupOrOthers,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Uid(uid) => write!(f, "uid {uid}"),
            Who::GroupOrOthers => f.write_str("other users"),
        }
    }
}

/// The users trusted not to swap a volume: root and `caller`, kiln's effective uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trusted {
    pub caller: u32,
}

impl Trusted {
    /// Root and this process's effective uid.
    fn this_process() -> Trusted {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let caller = unsafe { libc::geteuid() };
        Trusted { caller }
    }

    fn contains(self, uid: u32) -> bool {
        uid == 0 || uid == self.caller
    }
}

impl std::fmt::Display for Trusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.caller {
            0 => f.write_str("root"),
            uid => write!(f, "root or uid {uid} (kiln's user)"),
        }
    }
}

/// Owner and mode of a directory or entry, as [`check_step`] needs them.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    pub uid: u32,
    pub mode: u32,
}

impl From<&Metadata> for Ownership {
    fn from(meta: &Metadata) -> Self {
        Ownership {
            uid: meta.uid(),
            mode: meta.mode(),
        }
    }
}

/// Refuses the step from directory `dir` (at `dir_path`) into its entry `entry` (at
/// `entry_path`) when someone not `trusted` could replace the entry: when
/// `dir` belongs to another user (its owner can always make it writable), or is group- or
/// world-writable without the sticky bit, or is sticky and shared while the entry belongs
/// to another user (in a sticky directory, an entry's owner may rename or remove it).
pub fn check_step(
    dir_path: &Path,
    dir: Ownership,
    entry_path: &Path,
    entry: Ownership,
    trusted: Trusted,
) -> Result<(), HostDirError> {
    let refuse = |danger, who| {
        Err(HostDirError::Replaceable {
            danger,
            who,
            entry: entry_path.to_owned(),
            trusted,
        })
    };
    if !trusted.contains(dir.uid) {
        let danger = Danger::DirOwned {
            dir: dir_path.to_owned(),
            uid: dir.uid,
        };
        return refuse(danger, Who::Uid(dir.uid));
    }
    let shared = dir.mode & 0o022 != 0;
    let sticky = dir.mode & libc::S_ISVTX != 0;
    if shared && !sticky {
        let danger = Danger::DirWritable {
            dir: dir_path.to_owned(),
            mode: dir.mode,
        };
        return refuse(danger, Who::GroupOrOthers);
    }
    if shared && !trusted.contains(entry.uid) {
        let danger = Danger::EntryOwned {
            dir: dir_path.to_owned(),
            entry: entry_path.to_owned(),
            uid: entry.uid,
        };
        return refuse(danger, Who::Uid(entry.uid));
    }
    Ok(())
}

/// A directory reached by the walk, with the path it was reached by.
struct Step {
    file: File,
    path: PathBuf,
    meta: Metadata,
}

/// Opens the directory `path` names (made absolute against the working directory) by a
/// walk from `/` that checks every step with [`check_step`] and follows symlinks as
/// `symlinks` says.
pub fn open(path: &Path, symlinks: Symlinks) -> Result<HostDir, HostDirError> {
    let trusted = Trusted::this_process();
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| HostDirError::Io { path, source }
    };
    let absolute = std::path::absolute(path).map_err(io(path))?;
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open("/")
        .map_err(io(Path::new("/")))?;
    let meta = root.metadata().map_err(io(Path::new("/")))?;
    let mut walked = vec![Step {
        file: root,
        path: PathBuf::from("/"),
        meta,
    }];
    // Components still to walk, the next one last.
    let mut pending: Vec<Part> = parts(&absolute).rev().collect();
    let mut followed = 0;
    while let Some(part) = pending.pop() {
        let name = match part {
            Part::Root => {
                walked.truncate(1);
                continue;
            }
            Part::Parent => {
                if walked.len() > 1 {
                    walked.pop();
                }
                continue;
            }
            Part::Name(name) => name,
        };
        let dir = walked.last().expect("the walk always holds /");
        let entry_path = dir.path.join(&name);
        let file = open_entry(&dir.file, &name).map_err(io(&entry_path))?;
        let meta = file.metadata().map_err(io(&entry_path))?;
        check_step(
            &dir.path,
            Ownership::from(&dir.meta),
            &entry_path,
            Ownership::from(&meta),
            trusted,
        )?;
        let kind = meta.file_type();
        if kind.is_dir() {
            walked.push(Step {
                file,
                path: entry_path,
                meta,
            });
        } else if kind.is_symlink() {
            if symlinks == Symlinks::Refuse {
                return Err(HostDirError::Symlink { path: entry_path });
            }
            if followed == MAX_SYMLINKS {
                return Err(HostDirError::SymlinkLoop { path: absolute });
            }
            followed += 1;
            let target = read_link(&file).map_err(io(&entry_path))?;
            pending.extend(parts(&target).rev());
        } else {
            return Err(HostDirError::NotADirectory { path: entry_path });
        }
    }
    let last = walked.pop().expect("the walk always holds /");
    Ok(HostDir {
        identity: DirIdentity {
            dev: last.meta.dev(),
            ino: last.meta.ino(),
        },
        fd: last.file.into(),
        path: last.path,
    })
}

/// A component of a path still to walk.
enum Part {
    Root,
    Parent,
    Name(OsString),
}

/// The components of `path` a walk acts on (`.` changes nothing).
fn parts(path: &Path) -> impl DoubleEndedIterator<Item = Part> + '_ {
    path.components().filter_map(|component| match component {
        Component::RootDir => Some(Part::Root),
        Component::ParentDir => Some(Part::Parent),
        Component::Normal(name) => Some(Part::Name(name.to_owned())),
        Component::CurDir | Component::Prefix(_) => None,
    })
}

/// Opens `name` in `dir` as an `O_PATH` descriptor without following it if it is a
/// symlink.
fn open_entry(dir: &File, name: &OsStr) -> std::io::Result<File> {
    let name = CString::new(name.as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte"))?;
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `dir` is an open descriptor and `name` a NUL-terminated string, both alive
    // for the call; openat returns a new descriptor or -1.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The target of the symlink `link` (an `O_PATH | O_NOFOLLOW` descriptor of it).
fn read_link(link: &File) -> std::io::Result<PathBuf> {
    let mut buffer = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the empty path is NUL-terminated, `link` is open, and readlinkat writes at
    // most `buffer.len()` bytes into `buffer`.
    let length = unsafe {
        libc::readlinkat(
            link.as_raw_fd(),
            c"".as_ptr(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
        )
    };
    if length < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let length = length as usize;
    if length == buffer.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buffer.truncate(length);
    Ok(PathBuf::from(OsStr::from_bytes(&buffer)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    const ME: u32 = 1000;
    const OTHER: u32 = 65534;

    fn step(dir_uid: u32, dir_mode: u32, entry_uid: u32) -> Result<(), HostDirError> {
        let dir = Ownership {
            uid: dir_uid,
            mode: libc::S_IFDIR | dir_mode,
        };
        let entry = Ownership {
            uid: entry_uid,
            mode: libc::S_IFDIR | 0o755,
        };
        let trusted = Trusted { caller: ME };
        check_step(Path::new("/d"), dir, Path::new("/d/e"), entry, trusted)
    }

    #[test]
    fn a_step_is_safe_only_where_root_and_the_caller_alone_can_replace_the_entry() {
        // Directories of root or the caller, written by their owner only.
        assert!(step(0, 0o755, OTHER).is_ok());
        assert!(step(ME, 0o700, OTHER).is_ok());
        // A sticky shared directory (/tmp): the entry must be root's or the caller's.
        assert!(step(0, 0o1777, ME).is_ok());
        assert!(step(0, 0o1777, 0).is_ok());
        let err = step(0, 0o1777, OTHER).unwrap_err().to_string();
        assert!(
            err.starts_with("/d/e is owned by uid 65534 and sits in the shared sticky directory /d, so uid 65534 could replace /d/e"),
            "{err}"
        );
        // Another user's directory, whatever its mode: its owner can chmod it.
        let err = step(OTHER, 0o555, 0).unwrap_err().to_string();
        assert!(
            err.starts_with("/d is owned by uid 65534, so uid 65534 could replace /d/e"),
            "{err}"
        );
        assert!(
            err.ends_with("belonging to root or uid 1000 (kiln's user)"),
            "{err}"
        );
        // Writable by group or everyone, without the sticky bit.
        for mode in [0o775, 0o757, 0o777] {
            let err = step(0, mode, 0).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("/d is writable by its group or by everyone (mode {mode:04o}, not sticky), so other users could replace /d/e")),
                "{err}"
            );
        }
    }

    fn identity_of(path: &Path) -> DirIdentity {
        let meta = std::fs::metadata(path).unwrap();
        DirIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// A temporary directory the caller owns, mode 0700.
    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    #[test]
    fn the_walk_follows_symlinks_only_when_asked_and_names_the_real_path() {
        let dir = private_dir();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        symlink(&real, dir.path().join("absolute")).unwrap();
        symlink("real/../real/.", dir.path().join("relative")).unwrap();
        let canonical = std::fs::canonicalize(&real).unwrap();
        for given in ["absolute", "relative", "absolute/./", "relative/../real"] {
            let opened = open(&dir.path().join(given), Symlinks::Follow).unwrap();
            assert_eq!(opened.path, canonical, "{given}");
            assert_eq!(opened.identity, identity_of(&real), "{given}");
        }
        let opened = open(&canonical, Symlinks::Refuse).unwrap();
        assert_eq!(opened.identity, identity_of(&real));

        let link = dir.path().join("absolute");
        let err = open(&link, Symlinks::Refuse).unwrap_err().to_string();
        assert!(err.contains("is now a symbolic link"), "{err}");
    }

    #[test]
    fn files_missing_paths_and_symlink_loops_are_refused() {
        let dir = private_dir();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let err = open(&file, Symlinks::Follow).unwrap_err().to_string();
        assert!(err.ends_with("/file is not a directory"), "{err}");
        let missing = dir.path().join("missing");
        let err = open(&missing, Symlinks::Follow).unwrap_err().to_string();
        assert!(err.contains("/missing: No such file"), "{err}");
        symlink("loop", dir.path().join("loop")).unwrap();
        let err = open(&dir.path().join("loop"), Symlinks::Follow)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 40 symbolic links"), "{err}");
    }

    #[test]
    fn a_shared_parent_is_refused_even_on_the_way_through_a_symlink() {
        let dir = private_dir();
        let open_dir = dir.path().join("open");
        std::fs::create_dir_all(open_dir.join("work")).unwrap();
        std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        symlink(open_dir.join("work"), dir.path().join("link")).unwrap();
        for given in [open_dir.join("work"), dir.path().join("link")] {
            let err = open(&given, Symlinks::Follow).unwrap_err().to_string();
            assert!(
                err.contains("/open is writable by its group or by everyone (mode 0777"),
                "{err}"
            );
        }
    }
}
