//! Where the guest kernel and initramfs live.
//!
//! `scripts/build-guest` builds both (cached by their inputs) and installs them under
//! `<root>/guest/` (the default root unless told otherwise); a root without its own uses
//! the default root's. `KILN_KERNEL` and `KILN_INITRAMFS` point elsewhere, e.g. at a
//! kernel built from another tree.

use std::path::{Path, PathBuf};

use crate::VmError;

/// Environment variable naming the guest kernel to boot instead of `<root>/guest/kernel`.
pub const KERNEL_ENV: &str = "KILN_KERNEL";
/// Environment variable naming the initramfs to boot instead of `<root>/guest/initramfs`.
pub const INITRAMFS_ENV: &str = "KILN_INITRAMFS";
/// The command that builds and installs both.
pub const BUILD_COMMAND: &str = "bash scripts/build-guest";

/// The guest's boot files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The root whose `guest/` they are taken from: they must be kiln's own there (those
    /// the environment names are the user's own choice).
    root: PathBuf,
}

impl GuestImages {
    /// The boot files kiln uses for `root`: the environment's, else those installed
    /// under `root`, else those installed under the default root (where
    /// `scripts/build-guest` puts them), so a second `--root` boots the installed guest.
    pub fn locate(root: &Path) -> Self {
        Self::locate_in(root, kiln_hostfs::default_root().as_deref())
    }

    fn locate_in(root: &Path, installed: Option<&Path>) -> Self {
        let from_env = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let has_guest = |base: &Path| base.join("guest").join("kernel").is_file();
        let base = match installed {
            Some(installed) if !has_guest(root) && has_guest(installed) => installed,
            _ => root,
        };
        Self {
            kernel: from_env(KERNEL_ENV).unwrap_or_else(|| base.join("guest").join("kernel")),
            initramfs: from_env(INITRAMFS_ENV)
                .unwrap_or_else(|| base.join("guest").join("initramfs")),
            root: base.to_path_buf(),
        }
    }

    /// Fails with the command that builds them when either file is missing, and refuses
    /// one taken from `<root>/guest` that is not kiln's own: its directory or the file
    /// itself belongs to another user or is writable by others, so someone else could
    /// have put their kernel there. No digest of them is recorded to check them against.
    pub fn check(&self) -> Result<(), VmError> {
        self.check_file("guest kernel", &self.kernel)?;
        self.check_file("guest initramfs", &self.initramfs)
    }

    /// [`Self::check`] for one of the two files.
    pub(crate) fn check_file(&self, what: &'static str, path: &Path) -> Result<(), VmError> {
        require_file(what, path)?;
        if path.parent() != Some(self.root.join("guest").as_path()) {
            return Ok(());
        }
        kiln_hostfs::private_dir(&self.root, "guest")
            .and_then(|_| kiln_hostfs::open_own(path))
            .map(drop)
            .map_err(|source| VmError::UntrustedGuestFile { what, source })
    }
}

/// Fails with the command that builds `path` when it is missing.
pub(crate) fn require_file(what: &'static str, path: &Path) -> Result<(), VmError> {
    if path.is_file() {
        return Ok(());
    }
    Err(VmError::MissingFile {
        what,
        path: path.to_path_buf(),
        hint: "build and install it with `bash scripts/build-guest`, or point KILN_KERNEL / KILN_INITRAMFS at one",
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// `<root>/guest/{kernel,initramfs}` as scripts/build-guest installs them (0644).
    fn installed() -> (tempfile::TempDir, GuestImages) {
        installed_at(tempfile::tempdir().unwrap())
    }

    fn installed_at(root: tempfile::TempDir) -> (tempfile::TempDir, GuestImages) {
        let guest = root.path().join("guest");
        std::fs::create_dir(&guest).unwrap();
        for name in ["kernel", "initramfs"] {
            std::fs::write(guest.join(name), name).unwrap();
            chmod(&guest.join(name), 0o644);
        }
        let images = GuestImages {
            kernel: guest.join("kernel"),
            initramfs: guest.join("initramfs"),
            root: root.path().to_path_buf(),
        };
        (root, images)
    }

    #[test]
    fn a_root_without_guest_files_uses_the_installed_ones() {
        // The environment's files win over both; this test is about the installed ones.
        if std::env::var_os(KERNEL_ENV).is_some() || std::env::var_os(INITRAMFS_ENV).is_some() {
            return;
        }
        let (installed, images) = installed();
        let other = tempfile::tempdir().unwrap();
        let found = GuestImages::locate_in(other.path(), Some(installed.path()));
        assert_eq!(found, images);
        found.check().unwrap();
        // A root with its own guest files keeps them.
        let (own, own_images) = installed_at(other);
        assert_eq!(
            GuestImages::locate_in(own.path(), Some(installed.path())),
            own_images
        );
    }

    #[test]
    fn installed_files_others_could_write_are_refused() {
        let (root, images) = installed();
        images.check().unwrap();
        chmod(&images.kernel, 0o666);
        let err = images.check().unwrap_err().to_string();
        assert!(
            err.contains("guest kernel") && err.contains("mode 666") && err.contains("build-guest"),
            "{err}"
        );
        chmod(&images.kernel, 0o644);
        chmod(&root.path().join("guest"), 0o777);
        let err = images.check().unwrap_err().to_string();
        assert!(err.contains("mode 777"), "{err}");
    }

    #[test]
    fn files_named_by_the_environment_are_the_users_choice() {
        let (root, mut images) = installed();
        let elsewhere = root.path().join("my-kernel");
        std::fs::write(&elsewhere, b"kernel").unwrap();
        chmod(&elsewhere, 0o666);
        images.kernel = elsewhere;
        images.check().unwrap();
        images.initramfs = root.path().join("missing");
        let err = images.check().unwrap_err().to_string();
        assert!(err.contains("scripts/build-guest"), "{err}");
    }
}
