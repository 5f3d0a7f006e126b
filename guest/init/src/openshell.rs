//! OpenShell's supervisor in the guest: the sandbox token and the gateway's TLS material,
//! placed where only root (the supervisor) can read them before the supervisor starts.
//!
//! Each goes on a tmpfs of its own, so it never reaches the sandbox's writable disk and is
//! gone at power-off. The directories on the way come from the supervisor layer, the
//! topmost lower of the overlay; one that is not a plain directory (the upper could have
//! replaced it on an earlier boot) is refused rather than followed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use kiln_protocol::{
    BootError, BootStep, OpenShellLaunch, MAX_OPENSHELL_TLS_FILE_LEN, MAX_OPENSHELL_TOKEN_LEN,
    OPENSHELL_AUTH_DIR, OPENSHELL_TLS_CA_PATH, OPENSHELL_TLS_CERT_PATH, OPENSHELL_TLS_DIR,
    OPENSHELL_TLS_KEY_PATH, OPENSHELL_TOKEN_PATH,
};

use crate::rootfs::failed;
use crate::sys::mount;

/// The token tmpfs: root's only, nothing on it runs, and small (a token is at most 64 KiB).
const TOKEN_TMPFS_OPTIONS: &str = "mode=0700,size=256k";
/// The TLS tmpfs: as the token's, for three files of at most 64 KiB.
const TLS_TMPFS_OPTIONS: &str = "mode=0700,size=512k";

fn fail(message: String) -> BootError {
    failed(BootStep::SupervisorStart, message)
}

/// One secret file: its path in the guest, what it holds, its mode and the longest it
/// may be. `what` names it in errors, which never hold its content.
struct Secret<'a> {
    what: &'static str,
    path: &'static str,
    content: &'a str,
    mode: u32,
    max: usize,
}

/// Writes the launch's token (if any) to [`OPENSHELL_TOKEN_PATH`], root:root 0400, on a
/// fresh tmpfs at [`OPENSHELL_AUTH_DIR`]. Error messages never hold the token.
pub fn place_token(launch: &OpenShellLaunch) -> Result<(), BootError> {
    let Some(token) = &launch.token else {
        return Ok(());
    };
    let token = Secret {
        what: "the sandbox token",
        path: OPENSHELL_TOKEN_PATH,
        content: token,
        mode: 0o400,
        max: MAX_OPENSHELL_TOKEN_LEN,
    };
    place_on_tmpfs(OPENSHELL_AUTH_DIR, TOKEN_TMPFS_OPTIONS, &[token])
}

/// Writes the launch's TLS material (if any) on a fresh tmpfs at [`OPENSHELL_TLS_DIR`]:
/// the CA and client certificates root:root 0444, the key root:root 0400. Error messages
/// never hold the material.
pub fn place_tls(launch: &OpenShellLaunch) -> Result<(), BootError> {
    let Some(tls) = &launch.tls else {
        return Ok(());
    };
    let file = |what, path, content, mode| Secret {
        what,
        path,
        content,
        mode,
        max: MAX_OPENSHELL_TLS_FILE_LEN,
    };
    let files = [
        file(
            "the TLS CA certificate",
            OPENSHELL_TLS_CA_PATH,
            &tls.ca,
            0o444,
        ),
        file(
            "the TLS certificate",
            OPENSHELL_TLS_CERT_PATH,
            &tls.cert,
            0o444,
        ),
        file("the TLS key", OPENSHELL_TLS_KEY_PATH, &tls.key, 0o400),
    ];
    place_on_tmpfs(OPENSHELL_TLS_DIR, TLS_TMPFS_OPTIONS, &files)
}

/// Mounts a root-only tmpfs (`options`) on `dir`, a plain directory of the supervisor
/// layer, and writes `files` into it, root:root, each with its own mode.
fn place_on_tmpfs(dir: &str, options: &str, files: &[Secret]) -> Result<(), BootError> {
    for file in files {
        if file.content.len() > file.max {
            return Err(fail(format!(
                "{} is {} bytes; at most {} are accepted",
                file.what,
                file.content.len(),
                file.max
            )));
        }
    }
    let dir_path = Path::new(dir);
    for step in dir_path.ancestors().filter(|p| *p != Path::new("/")) {
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
        dir_path,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(options),
    )
    .map_err(|e| fail(format!("mounting a tmpfs on {dir}: {e}")))?;
    for file in files {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file.mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(file.path)
            .map_err(|e| fail(format!("creating {}: {e}", file.path)))?;
        out.write_all(file.content.as_bytes())
            .map_err(|e| fail(format!("writing {}: {e}", file.path)))?;
    }
    Ok(())
}
