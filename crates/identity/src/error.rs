//! The one error type of this crate; every message quotes the input and says what is accepted.

use crate::IdBounds;

/// What went wrong, with the offending input quoted (non-printable bytes escaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A run_as_user / run_as_group value that is neither `sandbox` nor a canonical id.
    #[error(
        "invalid run-as value {input}: {reason}; accepted: \"sandbox\" or a decimal id from \
         {} to {} written without sign, leading zeros, spaces or other notation",
        bounds.min, bounds.max
    )]
    InvalidRunAs {
        input: String,
        reason: String,
        bounds: IdBounds,
    },

    /// A numeric uid/gid that is not a canonical decimal id within the sandbox bounds.
    #[error(
        "invalid id {input}: {reason}; accepted: a decimal id from {} to {} \
         written without sign, leading zeros, spaces or other notation",
        bounds.min, bounds.max
    )]
    InvalidId {
        input: String,
        reason: String,
        bounds: IdBounds,
    },

    /// A present but malformed OpenShift SCC annotation.
    #[error(
        "invalid annotation {annotation}={value}: {reason}; accepted: comma-separated blocks \
         START/SIZE or START-END of decimal 32-bit ids with SIZE >= 1 and END >= START"
    )]
    InvalidAnnotation {
        annotation: &'static str,
        value: String,
        reason: String,
    },

    /// A resolved uid/gid outside the sandbox bounds; `origin` says where it came from.
    #[error("{what} {value} from {origin} is outside the sandbox range {bounds}")]
    OutOfRange {
        what: &'static str,
        value: u32,
        origin: String,
        bounds: IdBounds,
    },

    /// An account file that is too large or not text.
    #[error("{file}: {reason}")]
    AccountFile { file: &'static str, reason: String },

    /// A login shell that cannot be written into a passwd entry.
    #[error(
        "invalid login shell {shell}: {reason}; accepted: an absolute path without ':', \
         newline or NUL, at most 4096 bytes"
    )]
    InvalidShell { shell: String, reason: String },
}
