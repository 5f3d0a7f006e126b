//! How kiln-sandbox reports a failure to its front ends: what went wrong, and whose fault
//! it is, so that the CLI and the driver API cannot disagree about it.

use std::fmt;

/// Whose fault an error is. The CLI turns it into an exit code, the driver API into a
/// status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is malformed: a request field, an id or a name. Fixing the input
    /// fixes the call.
    InvalidInput,
    /// No sandbox has the given id or name.
    NotFound,
    /// Another sandbox already has the name.
    AlreadyExists,
    /// The sandbox's state does not allow the call: it runs, it does not run, or the image
    /// it is pinned to is gone.
    FailedPrecondition,
    /// Anything else kiln failed at: pull, build, boot, I/O.
    Internal,
}

/// An error of kiln-sandbox: its message (and the chain of causes under it) and its kind.
pub struct Error {
    kind: ErrorKind,
    inner: Box<dyn std::error::Error + Send + Sync>,
}

impl Error {
    pub(crate) fn new(
        kind: ErrorKind,
        inner: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error {
            kind,
            inner: Box::new(inner),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("inner", &self.inner)
            .finish()
    }
}

// The message and the causes are the inner error's own: this type only adds the kind.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}
