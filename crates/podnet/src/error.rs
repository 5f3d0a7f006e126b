//! The one error type of this crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PodnetError {
    /// The proxy uid is not usable (equal to the sandbox uid, or root).
    #[error("proxy uid {uid}: {reason}")]
    ProxyUid { uid: u32, reason: String },
    /// The kernel refused the nftables rules.
    #[error("installing the nftables rules: {0}")]
    Rules(String),
    /// A policy file that cannot be read or does not validate.
    #[error(transparent)]
    Policy(#[from] kiln_policy::PolicyError),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodnetError {
    let what = what.into();
    move |source| PodnetError::Io { what, source }
}
