//! kiln-hostfs: kiln's own files on the host, and when kiln may trust them.
//!
//! Everything kiln writes lives under its `--root`, and what it reads back from there
//! decides what runs as the user who runs kiln (often root): root images, the records that
//! name images and sandboxes, the guest kernel. Another user who can write into that tree
//! can make kiln run their code, so every crate that owns a part of it goes through here:
//!
//! - [`private_dir`] creates (0700, whatever the umask) or opens a directory and refuses it
//!   unless it and every directory between it and its base is kiln's own: a real directory
//!   (not a symlink) of the effective uid that neither group nor others can write. Above
//!   the base, [`check_parent_dir`] asks less: owned by this user or root, and writable by
//!   others only when sticky, so nobody else can replace what kiln keeps there.
//! - [`open_own`] opens a file for reading only when it is kiln's own: a regular file of the
//!   effective uid that neither group nor others can write, never through a symlink. The
//!   caller decides what an untrusted file means: verify it again, rebuild it, or refuse.
//! - [`create_new`], [`TempFile`], [`write_file`], [`open_lock`] and [`open_log`] write
//!   files: created 0600 whatever the umask, opened with O_NOFOLLOW (and O_EXCL when new),
//!   and published by rename so a crash never leaves a half-written file visible.
//!
//! Every refusal is an [`Error::Untrusted`] naming the path, why it is refused and the
//! command that fixes it.

mod dir;
mod file;

use std::io;
use std::path::{Path, PathBuf};

pub use dir::{check_parent_dir, check_private_dir, private_dir};
pub use file::{
    create_new, open_lock, open_log, open_own, remove_stale_temps, write_file, TempFile,
};

/// Why a path under kiln's root cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another user could have written (or could still replace) what is at `path`.
    #[error("refusing {path}: {reason}; {fix}")]
    Untrusted {
        path: PathBuf,
        reason: String,
        fix: String,
    },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl Error {
    /// Whether nothing is at the path.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// kiln's root when `--root` (or `KILN_ROOT`) does not name one: `$XDG_CACHE_HOME/kiln`,
/// else `~/.cache/kiln`; `None` when neither variable is set. `scripts/build-guest`
/// installs the guest files there by default, so every other root finds them too.
pub fn default_root() -> Option<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        let xdg = PathBuf::from(xdg);
        // The XDG spec says relative values are invalid and must be ignored.
        if xdg.is_absolute() {
            return Some(xdg.join("kiln"));
        }
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty())?;
    Some(PathBuf::from(home).join(".cache").join("kiln"))
}

/// The effective uid of this process: the owner of everything kiln trusts.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    /// Every test of this crate starts with this: one of them changes the process-wide
    /// umask, which would change the modes of whatever the others create meanwhile.
    pub fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` under umask `mask` (the caller holds [`serial`]).
    pub fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
        // SAFETY: umask has no preconditions.
        let old = unsafe { libc::umask(mask) };
        let result = f();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        result
    }

    /// The first statement of a test that needs root (it is also `#[ignore]`d).
    pub fn require_root() {
        assert_eq!(
            super::euid(),
            0,
            "this test needs root (files of another uid): run it as root, as scripts/test does"
        );
    }
}
