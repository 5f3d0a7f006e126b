//! Directories: kiln's own (private) ones, and the ones above them.

use std::fs::{self, DirBuilder, Metadata};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::{euid, io_at, Error};

/// Mode bits that let the group or others create, rename or remove entries.
const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// `base/sub`, each directory of it created 0700 when missing, after checking that every
/// directory above `base` keeps other users from replacing it ([`check_parent_dir`]) and
/// that `base` and each directory below it is kiln's own ([`check_private_dir`]). `sub`
/// is a relative path of plain names (kiln's own layout); empty means `base` itself.
pub fn private_dir(base: &Path, sub: impl AsRef<Path>) -> Result<PathBuf, Error> {
    let base = std::path::absolute(base).map_err(io_at(base))?;
    if let Some(parent) = base.parent() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_at(parent))?;
        check_parent_dir(parent, &base)?;
    }
    make_private(&base)?;
    let mut dir = base;
    for part in sub.as_ref().components() {
        match part {
            Component::Normal(name) => dir.push(name),
            _ => {
                return Err(io_at(sub.as_ref())(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a relative path of plain names",
                )))
            }
        }
        make_private(&dir)?;
    }
    Ok(dir)
}

/// Creates `dir` 0700 (exactly: the umask may only take bits away, and kiln sets them
/// back) unless it exists, then checks it is kiln's own.
fn make_private(dir: &Path) -> Result<(), Error> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_at(dir))?
        }
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(io_at(dir)(err)),
    }
    check_private_dir(dir)
}

/// Checks that `dir` is kiln's own: a real directory (not a symlink) of the effective uid
/// that neither its group nor others can write, so nobody else can have put anything in
/// it. Does not create it and does not look above it.
pub fn check_private_dir(dir: &Path) -> Result<(), Error> {
    let meta = fs::symlink_metadata(dir).map_err(io_at(dir))?;
    match private_problem(&meta) {
        None => Ok(()),
        Some((reason, fix)) => Err(Error::Untrusted {
            path: dir.to_path_buf(),
            reason,
            fix,
        }),
    }
}

fn private_problem(meta: &Metadata) -> Option<(String, String)> {
    let me = euid();
    if meta.file_type().is_symlink() {
        return Some((
            "it is a symlink, and kiln keeps its files only in real directories".into(),
            "remove the link and let kiln create the directory (or pass the directory it \
             points to as --root)"
                .into(),
        ));
    }
    if !meta.is_dir() {
        return Some((
            "it is not a directory".into(),
            "move it away or pick another --root".into(),
        ));
    }
    if meta.uid() != me {
        return Some((
            format!(
                "it belongs to uid {}, not to uid {me} that kiln runs as, so that user could \
                 put files there that kiln would trust",
                meta.uid()
            ),
            format!("if what is in it is yours, `chown -R {me}` it; else pick another --root"),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_WRITE != 0 {
        return Some((
            format!(
                "its mode {mode:o} lets other users write to it, so they could put files there \
                 that kiln would trust"
            ),
            "`chmod 700` it (kiln then checks again each file it finds there)".into(),
        ));
    }
    None
}

/// Checks that neither `dir` nor any directory above it lets another user replace `entry`
/// (a path in `dir`): each is owned by this user or root, and writable by its group or
/// others only when sticky (as /tmp is). Symlinks on the way are resolved first, so the
/// directories checked are those `entry` really lives under.
pub fn check_parent_dir(dir: &Path, entry: &Path) -> Result<(), Error> {
    let real = fs::canonicalize(dir).map_err(io_at(dir))?;
    for ancestor in real.ancestors() {
        let meta = fs::symlink_metadata(ancestor).map_err(io_at(ancestor))?;
        if let Some((reason, fix)) = parent_problem(&meta, entry) {
            return Err(Error::Untrusted {
                path: ancestor.to_path_buf(),
                reason,
                fix,
            });
        }
    }
    Ok(())
}

fn parent_problem(meta: &Metadata, entry: &Path) -> Option<(String, String)> {
    let entry = entry.display();
    if !meta.is_dir() {
        return Some(("it is not a directory".into(), "pick another path".into()));
    }
    if meta.uid() != euid() && meta.uid() != 0 {
        return Some((
            format!(
                "it belongs to uid {}, who could replace {entry}",
                meta.uid()
            ),
            "keep kiln's files under directories that belong to you or root".into(),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & GROUP_OTHER_WRITE != 0 && mode & STICKY == 0 {
        return Some((
            format!("its mode {mode:o} lets other users replace {entry}"),
            "`chmod go-w` it (or `chmod +t`, as /tmp is), or keep kiln's files elsewhere".into(),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn directories_are_made_0700_whatever_the_umask() {
        let _serial = crate::tests::serial();
        let top = tempfile::tempdir().unwrap();
        let made =
            crate::tests::with_umask(0, || private_dir(&top.path().join("root"), "a/b")).unwrap();
        assert_eq!(made, top.path().join("root/a/b"));
        for dir in ["root", "root/a", "root/a/b"] {
            assert_eq!(mode(&top.path().join(dir)), 0o700, "{dir}");
        }
        // Existing directories are accepted as they are when only their owner can write.
        chmod(&made, 0o755);
        private_dir(&top.path().join("root"), "a/b").unwrap();
        assert_eq!(mode(&made), 0o755);
    }

    #[test]
    fn a_directory_others_can_write_is_refused_with_the_fix() {
        let _serial = crate::tests::serial();
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        private_dir(&root, "store").unwrap();
        chmod(&root.join("store"), 0o777);
        let err = private_dir(&root, "store").unwrap_err().to_string();
        assert!(
            err.contains("mode 777") && err.contains("chmod 700"),
            "{err}"
        );
        assert!(
            err.contains(&root.join("store").display().to_string()),
            "{err}"
        );
        chmod(&root.join("store"), 0o770);
        assert!(private_dir(&root, "store").is_err(), "group-writable");
        chmod(&root.join("store"), 0o700);
        private_dir(&root, "store").unwrap();

        chmod(&root, 0o1777);
        let err = private_dir(&root, "").unwrap_err().to_string();
        assert!(err.contains("mode 1777"), "{err}");
    }

    #[test]
    fn a_symlink_is_refused_where_kiln_makes_directories() {
        let _serial = crate::tests::serial();
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        private_dir(&root, "").unwrap();
        let elsewhere = top.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("store")).unwrap();
        let err = private_dir(&root, "store").unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&root, &link).unwrap();
        assert!(private_dir(&link, "").is_err(), "a symlinked base");
    }

    #[test]
    fn parents_others_can_write_are_refused_unless_sticky() {
        let _serial = crate::tests::serial();
        let top = tempfile::tempdir().unwrap();
        let shared = top.path().join("shared");
        fs::create_dir(&shared).unwrap();
        chmod(&shared, 0o777);
        let err = private_dir(&shared.join("root"), "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mode 777 lets other users replace")
                && err.contains(&shared.join("root").display().to_string()),
            "{err}"
        );
        chmod(&shared, 0o1777);
        private_dir(&shared.join("root"), "").unwrap();

        // A symlinked parent is judged by the directory it leads to.
        let link = top.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        chmod(&shared, 0o777);
        assert!(check_parent_dir(&link, &link.join("root")).is_err());
    }

    /// Ownership checks need a second uid: as root, hand the directory to nobody.
    #[test]
    #[ignore = "needs root (scripts/test runs it as root)"]
    fn directories_of_another_user_are_refused() {
        let _serial = crate::tests::serial();
        crate::tests::require_root();
        let top = tempfile::tempdir().unwrap();
        let root = private_dir(&top.path().join("root"), "").unwrap();
        std::os::unix::fs::chown(&root, Some(65534), None).unwrap();
        let err = private_dir(&root, "").unwrap_err().to_string();
        assert!(
            err.contains("belongs to uid 65534") && err.contains("chown"),
            "{err}"
        );
        // As the parent of something else, another user's directory is refused too.
        let err = check_parent_dir(&root, &root.join("x"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("who could replace"), "{err}");
    }
}
