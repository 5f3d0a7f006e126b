//! Where the guest kernel and initramfs live.
//!
//! `scripts/build-guest` builds both (cached by their inputs) and installs them under
//! `<root>/guest/`; `KILN_KERNEL` and `KILN_INITRAMFS` point elsewhere, e.g. at a kernel
//! built from another tree.

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
}

impl GuestImages {
    /// The boot files kiln uses for `root`: the environment's, else those installed there.
    pub fn locate(root: &Path) -> Self {
        let from_env = |name| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            kernel: from_env(KERNEL_ENV).unwrap_or_else(|| root.join("guest").join("kernel")),
            initramfs: from_env(INITRAMFS_ENV)
                .unwrap_or_else(|| root.join("guest").join("initramfs")),
        }
    }
}

impl GuestImages {
    /// Fails with the command that builds them when either file is missing.
    pub fn check(&self) -> Result<(), VmError> {
        for (what, path) in [
            ("guest kernel", &self.kernel),
            ("guest initramfs", &self.initramfs),
        ] {
            if !path.is_file() {
                return Err(VmError::MissingFile {
                    what,
                    path: path.clone(),
                    hint: "build and install it with `bash scripts/build-guest`, or point KILN_KERNEL / KILN_INITRAMFS at one",
                });
            }
        }
        Ok(())
    }
}
