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
//! The rules it applies are written once, in `docs/identity.md`, included here:
//!
#![doc = include_str!("../../../docs/identity.md")]
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

/// The ids a sandbox may run as, inclusive at both ends; each caller says whose rules
/// apply ([`IdBounds::KILN`] or [`IdBounds::OPENSHELL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdBounds {
    /// Lowest accepted id.
    pub min: u32,
    /// Highest accepted id.
    pub max: u32,
}

impl IdBounds {
    /// kiln's own rules (its CLI, API and Kubernetes renderer): 1000 ..= 2,000,000,000,
    /// clear of system accounts and within Kubernetes' limit.
    pub const KILN: Self = Self {
        min: MIN_SANDBOX_UID,
        max: MAX_SANDBOX_UID,
    };
    /// OpenShell's rules for explicit sandbox ids: 1 ..= 4,294,967,294. It refuses 0
    /// (root) and u32::MAX, which Linux APIs read as "no id / unchanged".
    pub const OPENSHELL: Self = Self {
        min: 1,
        max: u32::MAX - 1,
    };

    /// Whether `id` is accepted.
    pub fn contains(self, id: u32) -> bool {
        (self.min..=self.max).contains(&id)
    }
}

impl std::fmt::Display for IdBounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

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
// Every id kiln accepts, OpenShell accepts too.
const _: () = assert!(
    IdBounds::OPENSHELL.min <= IdBounds::KILN.min && IdBounds::KILN.max <= IdBounds::OPENSHELL.max
);
const _: () =
    assert!(MIN_SANDBOX_UID <= DEFAULT_SANDBOX_UID && DEFAULT_SANDBOX_UID <= MAX_SANDBOX_UID);
const _: () =
    assert!(MIN_SANDBOX_GID <= DEFAULT_SANDBOX_GID && DEFAULT_SANDBOX_GID <= MAX_SANDBOX_GID);

/// Quotes possibly hostile bytes for an error message: `"..."` with non-printable and
/// non-ASCII bytes escaped, so messages stay one readable line.
fn quote(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}
