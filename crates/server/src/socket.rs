//! The server's unix socket: created owner-only (0600) in a directory only its owner can
//! write to, and a filter that closes connections from any other uid (SO_PEERCRED)
//! before a single byte of them is read.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("socket path {0}: expected a path ending in a file name")]
    NoFileName(PathBuf),

    #[error("socket path {path} is {len} bytes long; a unix socket path must be under 100 bytes")]
    TooLong { path: PathBuf, len: usize },

    #[error("socket path {path}: {source}")]
    UnsafeDirectory {
        path: PathBuf,
        source: kiln_hostfs::Error,
    },

    #[error(
        "refusing socket path {0}: it exists and is not a socket (remove it or pick another path)"
    )]
    NotASocket(PathBuf),

    #[error(
        "refusing socket path {path}: a socket there belongs to uid {owner}, not to this user"
    )]
    ForeignSocket { path: PathBuf, owner: u32 },

    #[error("refusing socket path {0}: a server is already listening on it")]
    InUse(PathBuf),

    #[error("socket path {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SocketError + '_ {
    move |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A listening socket that removes its file when dropped (if the file is still the one
/// it created).
#[derive(Debug)]
pub struct OwnerSocket {
    listener: Option<StdUnixListener>,
    path: PathBuf,
    identity: (u64, u64),
}

impl OwnerSocket {
    /// Creates the socket at `path`:
    /// - its directory and those above it must exist, belong to this user or root, and
    ///   not be writable by others unless sticky (so nobody else can swap the socket for
    ///   their own: kiln-hostfs's `check_parent_dir`);
    /// - an existing socket there is replaced only when nobody listens on it (stale) and
    ///   it belongs to this user; anything else at the path is refused;
    /// - the socket is bound in a private (0700) directory next to `path`, set to 0600
    ///   and renamed into place without replacing anything, so it is never reachable
    ///   with looser permissions, and no process-wide umask is touched.
    pub fn bind(path: &Path) -> Result<OwnerSocket, SocketError> {
        let path = std::path::absolute(path).map_err(io_err(path))?;
        let len = path.as_os_str().as_bytes().len();
        if len >= 100 {
            return Err(SocketError::TooLong { path, len });
        }
        let dir = match (path.parent(), path.file_name()) {
            (Some(dir), Some(_)) => dir.to_path_buf(),
            _ => return Err(SocketError::NoFileName(path)),
        };
        kiln_hostfs::check_parent_dir(&dir, &path).map_err(|source| {
            SocketError::UnsafeDirectory {
                path: path.clone(),
                source,
            }
        })?;
        remove_stale(&path)?;

        let private = tempfile::Builder::new()
            .prefix(".kiln-serve-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&dir)
            .map_err(io_err(&dir))?;
        let staged = private.path().join("s");
        let listener = StdUnixListener::bind(&staged).map_err(io_err(&staged))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&staged))?;
        rename_noreplace(&staged, &path).map_err(|err| match err.kind() {
            io::ErrorKind::AlreadyExists => SocketError::InUse(path.clone()),
            _ => io_err(&path)(err),
        })?;
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        Ok(OwnerSocket {
            listener: Some(listener),
            identity: (meta.dev(), meta.ino()),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the listener (once) to serve on; the file stays until this is dropped.
    /// Must be called inside a tokio runtime.
    pub fn take_listener(&mut self) -> io::Result<UnixListener> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| io::Error::other("the listener was taken already"))?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    }
}

impl Drop for OwnerSocket {
    fn drop(&mut self) {
        // Only our own socket: another server may have taken the path over since.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Removes a socket left at `path` by a server that is gone. Refuses anything else.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_err(path)(err)),
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    if meta.uid() != kiln_hostfs::euid() {
        return Err(SocketError::ForeignSocket {
            path: path.to_path_buf(),
            owner: meta.uid(),
        });
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(io_err(path))
        }
        Err(err) => Err(io_err(path)(err)),
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the peer of `stream` runs as this process's effective uid. A peer whose
/// credentials cannot be read is refused.
pub fn same_user(stream: &UnixStream) -> bool {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == kiln_hostfs::euid() => true,
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused a connection from another user");
            false
        }
        Err(err) => {
            tracing::warn!("refused a connection whose peer credentials are unreadable: {err}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_is_owner_only_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.sock");
        let socket = OwnerSocket::bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Nothing of the staging directory is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(socket);
        assert!(!path.exists());
    }

    #[test]
    fn live_sockets_and_other_files_are_refused_stale_ones_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.sock");
        let live = OwnerSocket::bind(&path).unwrap();
        assert!(matches!(
            OwnerSocket::bind(&path),
            Err(SocketError::InUse(_))
        ));
        drop(live);

        // A socket nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        drop(OwnerSocket::bind(&path).unwrap());

        std::fs::write(&path, b"not a socket").unwrap();
        let err = OwnerSocket::bind(&path).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn directories_others_can_write_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = OwnerSocket::bind(&open.join("kiln.sock")).unwrap_err();
        assert!(err.to_string().contains("mode 777"), "{err}");
        // Sticky, as /tmp is: others cannot remove or rename our socket.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(OwnerSocket::bind(&open.join("kiln.sock")).unwrap());

        let missing = OwnerSocket::bind(&dir.path().join("missing/kiln.sock")).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
        let long = dir.path().join("x".repeat(120));
        assert!(matches!(
            OwnerSocket::bind(&long),
            Err(SocketError::TooLong { .. })
        ));
    }
}
