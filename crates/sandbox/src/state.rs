//! A sandbox's state directory under kiln's root, and the short-lived run directory that
//! holds its sockets.
//!
//! Layout: `<root>/sandboxes/<id>/` (0700) holds the sandbox's files (request, console
//! log, writable disk); `<root>/sandboxes/.names/<name>` holds the id a name points to,
//! created exclusively so two sandboxes can never share a name.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::options::validate_name;

/// Errors about sandbox state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Name(#[from] crate::options::OptionError),

    #[error("a sandbox named {name:?} already exists (id {id}); pick another --name or remove it")]
    DuplicateName { name: String, id: String },

    #[error("refusing to use {0}: a sandbox state directory must be a real directory, not a symlink")]
    Symlink(PathBuf),

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// The state directory of one sandbox.
#[derive(Debug)]
pub struct SandboxDir {
    id: String,
    name: Option<String>,
    path: PathBuf,
    names_dir: PathBuf,
}

impl SandboxDir {
    /// Creates a new sandbox directory with a fresh id, claiming `name` if given.
    pub fn create(root: &Path, name: Option<&str>) -> Result<SandboxDir, StateError> {
        if let Some(name) = name {
            validate_name(name)?;
        }
        let sandboxes = root.join("sandboxes");
        let names_dir = sandboxes.join(".names");
        DirBuilder::new().recursive(true).mode(0o700).create(&names_dir).map_err(io_err(&names_dir))?;
        let (id, path) = loop {
            let id = random_id().map_err(io_err(Path::new("/dev/urandom")))?;
            let path = sandboxes.join(&id);
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => break (id, path),
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(io_err(&path)(err)),
            }
        };
        let dir = SandboxDir { id, name: None, path, names_dir };
        if let Some(name) = name {
            let claim = dir.names_dir.join(name);
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&claim) {
                Ok(mut file) => file.write_all(dir.id.as_bytes()).map_err(io_err(&claim))?,
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    let mut owner = String::new();
                    let _ = std::fs::File::open(&claim).and_then(|mut f| f.read_to_string(&mut owner));
                    dir.remove()?;
                    return Err(StateError::DuplicateName { name: name.to_owned(), id: owner });
                }
                Err(err) => return Err(io_err(&claim)(err)),
            }
        }
        Ok(SandboxDir { name: name.map(str::to_owned), ..dir })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn console_log(&self) -> PathBuf {
        self.path.join("console.log")
    }

    /// Removes the directory and its name claim. A directory that has become a symlink is
    /// refused, so a swapped path can never make kiln delete something else.
    pub fn remove(self) -> Result<(), StateError> {
        let meta = std::fs::symlink_metadata(&self.path).map_err(io_err(&self.path))?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(StateError::Symlink(self.path));
        }
        std::fs::remove_dir_all(&self.path).map_err(io_err(&self.path))?;
        if let Some(name) = &self.name {
            let claim = self.names_dir.join(name);
            match std::fs::remove_file(&claim) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&claim)(err)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// A private (0700) temporary directory for the sandbox's sockets, removed on drop. It
/// lives under $XDG_RUNTIME_DIR or /tmp rather than under the root because a unix socket
/// path must fit in 108 bytes.
pub fn run_dir() -> Result<tempfile::TempDir, StateError> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute() && p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    tempfile::Builder::new()
        .prefix("kiln-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&base)
        .map_err(io_err(&base))
}

/// 12 hex digits from the kernel's random source: short enough to type, and a collision
/// is retried.
fn random_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 6];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_is_private_and_remove_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let dir = SandboxDir::create(root.path(), Some("box")).unwrap();
        assert_eq!(dir.id().len(), 12);
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(dir.console_log(), b"x").unwrap();
        let path = dir.path().to_path_buf();
        dir.remove().unwrap();
        assert!(!path.exists());
        // The name is free again.
        SandboxDir::create(root.path(), Some("box")).unwrap();
    }

    #[test]
    fn duplicate_names_are_refused_without_leftovers() {
        let root = tempfile::tempdir().unwrap();
        let first = SandboxDir::create(root.path(), Some("dup")).unwrap();
        let err = SandboxDir::create(root.path(), Some("dup")).unwrap_err();
        assert!(err.to_string().contains(first.id()), "{err}");
        let entries = std::fs::read_dir(root.path().join("sandboxes")).unwrap().count();
        assert_eq!(entries, 2, "only .names and the first sandbox remain");
    }

    #[test]
    fn bad_names_are_refused() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(SandboxDir::create(root.path(), Some("../x")), Err(StateError::Name(_))));
    }

    #[test]
    fn a_symlinked_state_dir_is_never_removed_through() {
        let root = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::fs::write(victim.path().join("keep"), b"x").unwrap();
        let dir = SandboxDir::create(root.path(), None).unwrap();
        std::fs::remove_dir(dir.path()).unwrap();
        std::os::unix::fs::symlink(victim.path(), dir.path()).unwrap();
        assert!(matches!(dir.remove(), Err(StateError::Symlink(_))));
        assert!(victim.path().join("keep").exists());
    }

    #[test]
    fn run_dir_is_private_and_short() {
        let dir = run_dir().unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(dir.path().join("channel.sock").as_os_str().len() < 100);
    }
}
