//! Files: reading kiln's own, and writing files owner-only without following symlinks.

use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{euid, io_at, Error};

/// The mode of every file kiln writes under its root.
const FILE_MODE: u32 = 0o600;
/// Temp files are `.<target name>.<pid>.<n>.tmp`, so [`remove_stale_temps`] knows whose
/// they are.
const TEMP_SUFFIX: &str = ".tmp";
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What makes `meta` not a file kiln wrote, if anything.
fn file_problem(meta: &Metadata) -> Option<String> {
    if meta.file_type().is_symlink() {
        return Some("it is a symlink".into());
    }
    if !meta.is_file() {
        return Some("it is not a regular file".into());
    }
    let me = euid();
    if meta.uid() != me {
        return Some(format!(
            "it belongs to uid {}, not to uid {me} that kiln runs as",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!("its mode {mode:o} lets other users write to it"));
    }
    None
}

fn untrusted_file(path: &Path, problem: &str) -> Error {
    Error::Untrusted {
        path: path.to_path_buf(),
        reason: format!("{problem}, so it may not hold what kiln wrote"),
        fix: "remove it (kiln writes its own files owner-only)".into(),
    }
}

/// O_NOFOLLOW refuses a symlink with ELOOP: say so as a refusal.
fn open_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |err| {
        if err.raw_os_error() == Some(libc::ELOOP) {
            untrusted_file(path, "it is a symlink")
        } else {
            io_at(path)(err)
        }
    }
}

fn require_own(path: &Path, meta: &Metadata) -> Result<(), Error> {
    match file_problem(meta) {
        None => Ok(()),
        Some(problem) => Err(untrusted_file(path, &problem)),
    }
}

/// Refuses what is at `path` unless it is kiln's own file, before it is opened, so that a
/// FIFO or a device there is never opened.
fn refuse_foreign(path: &Path) -> Result<(), Error> {
    require_own(path, &fs::symlink_metadata(path).map_err(io_at(path))?)
}

fn check_opened(path: &Path, file: &File) -> Result<Metadata, Error> {
    let meta = file.metadata().map_err(io_at(path))?;
    require_own(path, &meta)?;
    Ok(meta)
}

/// Opens kiln's own file `path` for reading: a regular file of the effective uid that
/// neither group nor others can write, never reached through a symlink. Anything else is
/// an [`Error::Untrusted`]; a missing file an [`Error::Io`] whose
/// [`Error::is_not_found`] holds.
pub fn open_own(path: &Path) -> Result<File, Error> {
    refuse_foreign(path)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(open_err(path))?;
    check_opened(path, &file)?;
    Ok(file)
}

/// Creates the new file `path` for writing, 0600 whatever the umask; never follows a
/// symlink and never opens an existing file (O_EXCL).
pub fn create_new(path: &Path) -> Result<File, Error> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(open_err(path))?;
    // The umask may have taken bits away.
    file.set_permissions(Permissions::from_mode(FILE_MODE))
        .map_err(io_at(path))?;
    Ok(file)
}

/// Opens (creating, 0600) the lock file `path` for `flock`; one that is not kiln's own
/// (a symlink, another user's file) is refused.
pub fn open_lock(path: &Path) -> Result<File, Error> {
    open_writable(
        path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
}

/// Opens (creating, 0600) the log file `path` for appending; one that is not kiln's own
/// (a symlink, another user's file) is refused.
pub fn open_log(path: &Path) -> Result<File, Error> {
    open_writable(path, OpenOptions::new().append(true).create(true))
}

fn open_writable(path: &Path, options: &mut OpenOptions) -> Result<File, Error> {
    match refuse_foreign(path) {
        Err(err) if err.is_not_found() => {}
        other => other?,
    }
    // O_NONBLOCK: should a FIFO appear at the path after all, the open must not block
    // on it (it is refused below); it changes nothing for a regular file.
    let file = options
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(open_err(path))?;
    let meta = check_opened(path, &file)?;
    if meta.mode() & 0o777 != FILE_MODE {
        file.set_permissions(Permissions::from_mode(FILE_MODE))
            .map_err(io_at(path))?;
    }
    Ok(file)
}

/// Replaces `path` with `bytes` whole: written to a temp file beside it and renamed over
/// it, so a reader sees the old or the new contents, never a mix.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut temp = TempFile::beside(path)?;
    temp.file().write_all(bytes).map_err(io_at(temp.path()))?;
    temp.persist(path)
}

/// A new file (0600, [`create_new`]) in the directory of the file it will become, removed
/// when dropped unless [`TempFile::persist`]ed.
#[derive(Debug)]
pub struct TempFile {
    file: File,
    /// `None` once persisted.
    path: Option<PathBuf>,
}

impl TempFile {
    /// A temp file beside `target`: `.<target name>.<pid>.<n>.tmp`.
    pub fn beside(target: &Path) -> Result<TempFile, Error> {
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(io_at(target)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a temp file needs a target file name",
            )));
        };
        let name = name.to_string_lossy();
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.{}.{n}{TEMP_SUFFIX}", std::process::id()));
            match create_new(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        file,
                        path: Some(path),
                    })
                }
                // Left by an earlier process that had this pid.
                Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(err),
            }
        }
    }

    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    pub fn path(&self) -> &Path {
        self.path
            .as_deref()
            .expect("a temp file has its path until persisted")
    }

    /// Syncs the file, renames it to `target` (in the same directory) and syncs the
    /// directory, so the new name survives a crash.
    pub fn persist(mut self, target: &Path) -> Result<(), Error> {
        let path = self.path.take().expect("a temp file is persisted once");
        let result = (|| {
            self.file.sync_all()?;
            fs::rename(&path, target)?;
            let dir = target
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&path);
        }
        result.map_err(io_at(target))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = fs::remove_file(path);
        }
    }
}

/// Removes the temp files in `dir` whose process is gone (killed mid-write); those of
/// live processes stay.
pub fn remove_stale_temps(dir: &Path) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(io_at(dir))?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(temp_owner) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// The pid in a temp file name `.<name>.<pid>.<n>.tmp`.
fn temp_owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?.strip_suffix(TEMP_SUFFIX)?;
    let mut parts = rest.rsplitn(3, '.');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|name| !name.is_empty())?;
    Some(pid)
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::tests::{require_root, with_umask};

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    fn read(mut file: File) -> String {
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        text
    }

    fn is_untrusted(result: Result<File, Error>) -> bool {
        matches!(result, Err(Error::Untrusted { .. }))
    }

    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn new_files_are_0600_whatever_the_umask_and_never_replace_anything() {
        let _serial = crate::tests::serial();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new");
        with_umask(0, || create_new(&path)).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(
            create_new(&path).is_err(),
            "an existing file is not reopened"
        );

        let target = dir.path().join("elsewhere");
        symlink(&target, dir.path().join("link")).unwrap();
        assert!(create_new(&dir.path().join("link")).is_err());
        assert!(!target.exists(), "the symlink was not followed");
    }

    #[test]
    fn temp_files_are_published_whole_or_not_at_all() {
        let _serial = crate::tests::serial();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("record.json");
        with_umask(0, || write_file(&target, b"one")).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"one");
        assert_eq!(mode(&target), 0o600);
        write_file(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");

        let mut abandoned = TempFile::beside(&target).unwrap();
        abandoned.file().write_all(b"half").unwrap();
        let temp_path = abandoned.path().to_path_buf();
        assert!(temp_path.exists());
        drop(abandoned);
        assert!(!temp_path.exists());
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn temps_of_dead_processes_are_removed_and_live_ones_kept() {
        let _serial = crate::tests::serial();
        let dir = tempfile::tempdir().unwrap();
        let live = TempFile::beside(&dir.path().join("blob")).unwrap();
        // No process has pid 0x7fffffff (above pid_max).
        let dead = dir.path().join(".blob.2147483647.0.tmp");
        fs::write(&dead, b"partial").unwrap();
        let unrelated = dir.path().join("blob.2147483647.0.tmp");
        fs::write(&unrelated, b"not a temp file of ours").unwrap();
        remove_stale_temps(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(live.path().exists());
        assert!(unrelated.exists());
        assert_eq!(temp_owner(".a.b.12.3.tmp"), Some(12));
        assert_eq!(temp_owner("..12.3.tmp"), None);
    }

    #[test]
    fn own_files_are_read_and_others_refused() {
        let _serial = crate::tests::serial();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_file(&path, b"{}").unwrap();
        assert_eq!(read(open_own(&path).unwrap()), "{}");
        // Written by an older kiln under umask 022: only its owner can write it.
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        open_own(&path).unwrap();

        fs::set_permissions(&path, Permissions::from_mode(0o666)).unwrap();
        let err = open_own(&path).unwrap_err().to_string();
        assert!(err.contains("mode 666"), "{err}");

        let link = dir.path().join("link");
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        symlink(&path, &link).unwrap();
        let err = open_own(&link).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");

        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        assert!(is_untrusted(open_own(&fifo)), "refused without blocking");
        assert!(open_own(&dir.path().join("missing"))
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn locks_and_logs_never_follow_a_symlink() {
        let _serial = crate::tests::serial();
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        for (name, open) in [
            ("lock", open_lock as fn(&Path) -> Result<File, Error>),
            ("log", open_log),
        ] {
            let path = dir.path().join(name);
            symlink(&victim, &path).unwrap();
            assert!(is_untrusted(open(&path)), "{name}");
            assert!(!victim.exists(), "{name} created the symlink's target");
            fs::remove_file(&path).unwrap();

            mkfifo(&path);
            assert!(is_untrusted(open(&path)), "{name}: a FIFO");
            fs::remove_file(&path).unwrap();

            with_umask(0, || open(&path)).unwrap();
            assert_eq!(mode(&path), 0o600, "{name}");
        }

        let log = dir.path().join("log");
        write!(open_log(&log).unwrap(), "one ").unwrap();
        write!(open_log(&log).unwrap(), "two").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "one two");
    }

    #[test]
    #[ignore = "needs root (scripts/test runs it as root)"]
    fn files_of_another_user_are_refused() {
        let _serial = crate::tests::serial();
        require_root();
        let dir = tempfile::tempdir().unwrap();
        for name in ["record", "lock", "log"] {
            let path = dir.path().join(name);
            write_file(&path, b"planted").unwrap();
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        }
        let err = open_own(&dir.path().join("record"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to uid 65534"), "{err}");
        assert!(is_untrusted(open_lock(&dir.path().join("lock"))));
        assert!(is_untrusted(open_log(&dir.path().join("log"))));
        assert_eq!(fs::read(dir.path().join("log")).unwrap(), b"planted");
    }
}
