//! The execute-only copy of the VMM binary that a root kiln runs QEMU as (see
//! [`crate::jail`]), made once per binary under kiln's state and reused by every start.
//!
//! A copy is root's, mode 0111, in the root-only directory `<root>/vmm/`, named after the
//! binary's path (a digest) and the identity of the file there when it was copied
//! (device, inode, size, change time: a write or chmod changes the ctime, which no
//! process sets at will). A binary replaced or changed in place gets a new copy, and the
//! old copies of the same path go. Copies are written under a temp name and published
//! with a hard link, which never replaces an entry another kiln may be binding.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::VmError;

/// The directory under kiln's root that holds the copies.
const DIR: &str = "vmm";

/// The mode of a copy: executable, readable by nobody but root.
pub(crate) const MODE: u32 = 0o111;

/// The execute-only copy of `binary` under `root`, made now unless a valid one exists;
/// open for reading (root may), so the jail can check it is the file it mounts.
pub(crate) fn execute_only(root: &Path, binary: &Path) -> Result<File, VmError> {
    let file_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmError::File { path, source }
    };
    let mut source = File::open(binary).map_err(file_error(binary))?;
    let meta = source.metadata().map_err(file_error(binary))?;
    let dir = kiln_hostfs::private_dir(root, DIR)?;
    let prefix = path_key(binary);
    let name = format!(
        "{prefix}.{:x}-{:x}-{}-{}.{}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let path = dir.join(&name);
    match open_valid(&path, meta.len()) {
        Ok(Some(copy)) => return Ok(copy),
        Ok(None) => {}
        // Not one kiln wrote (a crash cannot leave one half-written): made again.
        Err(problem) => {
            tracing::warn!("{}: {problem}; copying the VMM again", path.display());
            std::fs::remove_file(&path).map_err(file_error(&path))?;
        }
    }
    kiln_hostfs::remove_stale_temps(&dir)?;
    let mut temp = kiln_hostfs::TempFile::beside(&path)?;
    std::io::copy(&mut source, temp.file()).map_err(file_error(temp.path()))?;
    let published = (|| {
        let file = temp.file();
        std::os::unix::fs::fchown(&*file, Some(0), Some(0))?;
        file.set_permissions(std::fs::Permissions::from_mode(MODE))?;
        file.sync_all()?;
        match std::fs::hard_link(temp.path(), &path) {
            // Another kiln published the same copy first.
            Err(err) if err.kind() != ErrorKind::AlreadyExists => return Err(err),
            _ => {}
        }
        File::open(&dir)?.sync_all()
    })();
    published.map_err(file_error(&path))?;
    drop(temp);
    remove_others(&dir, &prefix, &name);
    match open_valid(&path, meta.len()) {
        Ok(Some(copy)) => Ok(copy),
        Ok(None) => Err(file_error(&path)(ErrorKind::NotFound.into())),
        Err(problem) => Err(file_error(&path)(std::io::Error::other(problem))),
    }
}

/// The part of a copy's name that says which binary path it is of.
fn path_key(binary: &Path) -> String {
    let digest = Sha256::digest(binary.as_os_str().as_encoded_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Opens the copy at `path`: `None` when there is none, an error saying what is wrong
/// with one that is not root's, execute-only and `size` bytes long.
fn open_valid(path: &Path, size: u64) -> Result<Option<File>, String> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_file() || (meta.uid(), meta.gid()) != (0, 0) || mode != MODE {
        return Err(format!(
            "not a root-owned execute-only file (uid {}, gid {}, mode {mode:o})",
            meta.uid(),
            meta.gid()
        ));
    }
    if meta.len() != size {
        return Err(format!("{} bytes, not the binary's {size}", meta.len()));
    }
    Ok(Some(file))
}

/// Removes the copies of the same binary path other than `keep` (of a binary since
/// replaced).
fn remove_others(dir: &Path, prefix: &str, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name != keep
            && name
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('.'))
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::debug!("removed the VMM copy {name} of a replaced binary"),
                Err(err) => tracing::warn!("removing {}: {err}", entry.path().display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A stand-in binary in a temp dir, and a root beside it.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let temp = tempfile::tempdir().unwrap();
        let binary = temp.path().join("vmm-binary");
        std::fs::write(&binary, b"\x7fELF stand-in").unwrap();
        let root = temp.path().join("root");
        (temp, binary, root)
    }

    /// The first statement of a test that chowns to root (it is also `#[ignore]`d).
    fn require_root() {
        assert_eq!(
            kiln_hostfs::euid(),
            0,
            "this test needs root: run it as root"
        );
    }

    #[test]
    #[ignore = "needs root (a copy is root's)"]
    fn a_copy_is_made_once_and_reused_until_the_binary_changes() {
        require_root();
        let (_temp, binary, root) = setup();
        let first = execute_only(&root, &binary).unwrap().metadata().unwrap();
        assert_eq!(first.mode() & 0o7777, MODE);
        assert_eq!((first.uid(), first.gid()), (0, 0));
        let dir_mode = std::fs::metadata(root.join(DIR)).unwrap().mode() & 0o7777;
        assert_eq!(dir_mode, 0o700);
        let again = execute_only(&root, &binary).unwrap().metadata().unwrap();
        assert_eq!((again.dev(), again.ino()), (first.dev(), first.ino()));

        // Changed in place: a new copy of the new content, and the old one is gone.
        std::fs::write(&binary, b"\x7fELF another stand-in").unwrap();
        let changed = execute_only(&root, &binary).unwrap();
        let meta = changed.metadata().unwrap();
        assert_ne!(meta.ino(), first.ino());
        assert_eq!(meta.len(), 21);
        let names: Vec<_> = std::fs::read_dir(root.join(DIR))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    #[ignore = "needs root (a copy is root's)"]
    fn a_copy_that_is_not_execute_only_is_made_again() {
        require_root();
        let (_temp, binary, root) = setup();
        execute_only(&root, &binary).unwrap();
        let entry = std::fs::read_dir(root.join(DIR))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = execute_only(&root, &binary).unwrap().metadata().unwrap();
        assert_eq!(copy.mode() & 0o7777, MODE);
    }
}
