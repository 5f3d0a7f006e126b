//! The guest kernel and kiln-init's initramfs, built (or found in their caches) by
//! `scripts/build-kernel` and `scripts/build-initramfs` once per test process.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::{run_with_timeout, workspace_root};

/// Building the kernel from scratch takes 4-10 minutes on two busy cores.
const KERNEL_BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const INITRAMFS_BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The files a kiln guest boots from.
#[derive(Debug)]
pub struct GuestFiles {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Runs one of the build scripts with `args` and returns the path it prints.
fn build(script: &str, args: &[&str], timeout: Duration) -> PathBuf {
    let mut command = Command::new(workspace_root().join("scripts").join(script));
    command.args(args);
    // The initramfs build runs cargo; a target dir of its own keeps it off the lock of
    // the cargo that runs this test.
    let target = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join("guest-boot-target");
    command.env("CARGO_TARGET_DIR", target);
    let output = run_with_timeout(&mut command, timeout).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        output.status.success(),
        "scripts/{script} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
    assert!(
        path.is_file(),
        "scripts/{script} printed {}, which is not a file",
        path.display()
    );
    path
}

/// The guest kernel and initramfs, built on first use in this process.
pub fn guest_files() -> &'static GuestFiles {
    static FILES: OnceLock<GuestFiles> = OnceLock::new();
    FILES.get_or_init(|| GuestFiles {
        // The uncompressed kernel, as kiln boots it (PVH entry, no decompression).
        kernel: build(
            "build-kernel",
            &["--image", "vmlinux"],
            KERNEL_BUILD_TIMEOUT,
        ),
        initramfs: build("build-initramfs", &[], INITRAMFS_BUILD_TIMEOUT),
    })
}

/// The guest kernel with `kernels/NAME.config` merged after the base (`--fragment NAME`),
/// built on first use; returns the directory holding its image and `config`.
pub fn kernel_with_fragment(name: &str) -> PathBuf {
    let image = build(
        "build-kernel",
        &["--image", "vmlinux", "--fragment", name],
        KERNEL_BUILD_TIMEOUT,
    );
    image
        .parent()
        .expect("the kernel image's directory")
        .to_path_buf()
}
