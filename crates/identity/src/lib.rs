//! kiln-identity: who the sandbox runs as, as pure functions (bytes in, bytes out).
//!
//! This crate is the only place in kiln that parses a `run_as_user`/`run_as_group`
//! value, OpenShift SCC namespace annotations or image account files. It never touches
//! the filesystem and never calls NSS (`getpwnam` and friends): image content is hostile,
//! so callers read the bytes (bounded) and hand them in. It is shared by the VM path
//! (rootfs identity layer, guest supervisor) and the Kubernetes renderer.
//!
//! No existing crate fits: the `users`/`nix` crates go through NSS on the host, and
//! generic passwd parsers drop comments, NIS lines and CRLF endings, which this crate
//! must keep byte for byte when it edits an image's files.
//!
//! # Identity rules
//!
//! - UIDs and GIDs of the sandbox lie in [`MIN_SANDBOX_UID`]`..=`[`MAX_SANDBOX_UID`]
//!   (1000 ..= 2,000,000,000; the same bounds for GIDs), which is also within Kubernetes'
//!   limit [`KUBERNETES_MAX_ID`] (2^31-1). The default identity is 10001:10001 on every path.
//! - A run-as value ([`RunAs::parse`]) is the literal `sandbox` or a canonical decimal id
//!   within the bounds: no sign, no leading zero, no spaces, no other notation, UTF-8 only.
//!   [`parse_sandbox_id`] accepts the numeric form only (for `--uid`/`--gid`).
//! - SCC annotations [`UID_RANGE_ANNOTATION`] and [`SUPPLEMENTAL_GROUPS_ANNOTATION`] hold
//!   blocks `start/size` or `start-end` (size >= 1, end >= start, u32 arithmetic checked,
//!   whitespace around the value and around each block trimmed). Supplemental groups may
//!   hold several comma-separated blocks; every block must parse. The uid range uses its
//!   first block. A present but malformed annotation is an error, never a silent fallback.
//! - [`resolve_identity`]: an explicit uid/gid wins; else UID = start of the uid-range
//!   block and GID = start of the first supplemental-groups block (the uid-range start
//!   when that annotation is absent); else the default. Out-of-bounds results are errors
//!   that name their source. Each value carries its [`IdSource`].
//! - Account files ([`write_sandbox_accounts`]): passwd holds exactly one
//!   `sandbox:x:UID:GID:sandbox:/sandbox:SHELL` entry, group exactly one `sandbox` group
//!   with GID that keeps its members, gshadow and shadow exactly one locked (`!`) entry.
//!   An existing entry is rewritten in place (duplicates removed, with a warning); absent
//!   files are created; every other line is kept byte for byte (comments, blank lines,
//!   NIS `+`/`-` lines, CRLF endings); a newline is inserted when the last line lacks one.
//!   Another user owning UID or group owning GID is a warning that names it. The edit is
//!   idempotent. Input over 1 MiB ([`MAX_ACCOUNT_FILE_SIZE`]) or with a NUL byte is an error.
//!   Our own entries always end in `\n` (a `\r` would end up in the shell field); a `\r`
//!   before the end of the file ends a line like `\r\n`. Group members whose names hold
//!   whitespace or control bytes are dropped with a warning.
//!
//! # API notes
//!
//! [`IdBlock`] keeps `start` and `size` private behind accessors so that `size >= 1` and
//! `end <= u32::MAX` always hold.

mod accounts;
mod error;
mod etc;
mod resolve;
mod run_as;
mod scc;

pub use accounts::{
    choose_shell, write_sandbox_accounts, AccountFiles, AccountWarning, EditedAccounts,
};
pub use error::IdentityError;
pub use etc::{
    lookup_uid, lookup_user, parse_group, parse_passwd, supplementary_gids, GroupEntry, PasswdEntry,
};
pub use resolve::{resolve_identity, IdSource, ResolvedId, ResolvedIdentity};
pub use run_as::{parse_sandbox_id, RunAs};
pub use scc::{parse_supplemental_groups, parse_uid_range, IdBlock};

/// Lowest UID the sandbox may run as (below are system accounts).
pub const MIN_SANDBOX_UID: u32 = 1000;
/// Highest UID the sandbox may run as.
pub const MAX_SANDBOX_UID: u32 = 2_000_000_000;
/// Lowest GID of the sandbox's primary group.
pub const MIN_SANDBOX_GID: u32 = MIN_SANDBOX_UID;
/// Highest GID of the sandbox's primary group.
pub const MAX_SANDBOX_GID: u32 = MAX_SANDBOX_UID;
/// UID used when neither configuration nor annotations give one.
pub const DEFAULT_SANDBOX_UID: u32 = 10001;
/// GID used when neither configuration nor annotations give one.
pub const DEFAULT_SANDBOX_GID: u32 = 10001;
/// Largest id Kubernetes accepts in a securityContext (2^31-1).
pub const KUBERNETES_MAX_ID: u32 = i32::MAX as u32;
/// Name of the sandbox user and of its primary group.
pub const SANDBOX_USER: &str = "sandbox";
/// Home directory of the sandbox user.
pub const SANDBOX_HOME: &str = "/sandbox";
/// Namespace annotation holding the UID block OpenShift assigns to the namespace.
pub const UID_RANGE_ANNOTATION: &str = "openshift.io/sa.scc.uid-range";
/// Namespace annotation holding the supplemental group blocks of the namespace.
pub const SUPPLEMENTAL_GROUPS_ANNOTATION: &str = "openshift.io/sa.scc.supplemental-groups";
/// Largest account file (passwd, group, gshadow, shadow) this crate accepts.
pub const MAX_ACCOUNT_FILE_SIZE: usize = 1 << 20;

// The sandbox bounds are what callers check; they must imply Kubernetes' limit.
const _: () = assert!(MAX_SANDBOX_UID <= KUBERNETES_MAX_ID && MAX_SANDBOX_GID <= KUBERNETES_MAX_ID);
const _: () =
    assert!(MIN_SANDBOX_UID <= DEFAULT_SANDBOX_UID && DEFAULT_SANDBOX_UID <= MAX_SANDBOX_UID);
const _: () =
    assert!(MIN_SANDBOX_GID <= DEFAULT_SANDBOX_GID && DEFAULT_SANDBOX_GID <= MAX_SANDBOX_GID);

/// Quotes possibly hostile bytes for an error message: `"..."` with non-printable and
/// non-ASCII bytes escaped, so messages stay one readable line.
fn quote(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}
