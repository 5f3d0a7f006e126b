//! OpenShell's supervisor in the guest: the sandbox token, placed where only root (the
//! supervisor) can read it before the supervisor starts.
//!
//! The token goes on a tmpfs of its own, so it never reaches the sandbox's writable disk
//! and is gone at power-off. The directories on the way come from the supervisor layer,
//! the topmost lower of the overlay; one that is not a plain directory (the upper could
//! have replaced it on an earlier boot) is refused rather than followed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use kiln_protocol::{
    BootError, BootStep, OpenShellLaunch, MAX_OPENSHELL_TOKEN_LEN, OPENSHELL_AUTH_DIR,
    OPENSHELL_TOKEN_PATH,
};

use crate::rootfs::failed;
use crate::sys::mount;

/// The token tmpfs: root's only, nothing on it runs, and small (a token is at most 64 KiB).
const TOKEN_TMPFS_OPTIONS: &str = "mode=0700,size=256k";

fn fail(message: String) -> BootError {
    failed(BootStep::SupervisorStart, message)
}

/// Writes the launch's token (if any) to [`OPENSHELL_TOKEN_PATH`], root:root 0400, on a
/// fresh tmpfs at [`OPENSHELL_AUTH_DIR`]. Error messages never hold the token.
pub fn place_token(launch: &OpenShellLaunch) -> Result<(), BootError> {
    let Some(token) = &launch.token else {
        return Ok(());
    };
    if token.len() > MAX_OPENSHELL_TOKEN_LEN {
        return Err(fail(format!(
            "the sandbox token is {} bytes; at most {MAX_OPENSHELL_TOKEN_LEN} are accepted",
            token.len()
        )));
    }
    let dir = Path::new(OPENSHELL_AUTH_DIR);
    for step in dir.ancestors().filter(|p| *p != Path::new("/")) {
        match step.symlink_metadata() {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => {
                return Err(fail(format!(
                    "{} is not a directory; the supervisor layer puts one there",
                    step.display()
                )))
            }
            Err(e) => return Err(fail(format!("{}: {e}", step.display()))),
        }
    }
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(TOKEN_TMPFS_OPTIONS),
    )
    .map_err(|e| fail(format!("mounting a tmpfs on {OPENSHELL_AUTH_DIR}: {e}")))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW)
        .open(OPENSHELL_TOKEN_PATH)
        .map_err(|e| fail(format!("creating {OPENSHELL_TOKEN_PATH}: {e}")))?;
    file.write_all(token.as_bytes())
        .map_err(|e| fail(format!("writing {OPENSHELL_TOKEN_PATH}: {e}")))
}
