//! Host directories shared over virtio-9p (`kiln.vol=`): mounted into the sandbox root
//! before the workload starts, and the roots of read-write ones given to the sandbox user.
//!
//! QEMU serves each share with `security_model=mapped-xattr`: ownership and modes the
//! guest sets are kept in xattrs of the host files, so the guest's root may chown here
//! without the host files changing owner.

use std::path::Path;

use kiln_protocol::{BootError, BootStep, TmpfsMount, VolumeMount};

use crate::rootfs::failed;
use crate::sys::mount;

/// 9p over virtio with the Linux dialect (full POSIX metadata); 256 KiB messages keep
/// large reads and writes to few round trips.
const MOUNT_OPTIONS: &str = "trans=virtio,version=9p2000.L,msize=262144";

fn volume_error(volume: &VolumeMount, what: &str, e: std::io::Error) -> BootError {
    failed(
        BootStep::MountVolume,
        format!("volume {:?} at {}: {what}: {e}", volume.tag, volume.path),
    )
}

/// Mounts every volume at its path in the (already switched-to) sandbox root, creating
/// the directory. Read-only volumes are also read-only mounts in the guest (QEMU refuses
/// writes to them too). No volume carries set-id programs or device nodes in.
pub fn mount_all(volumes: &[VolumeMount]) -> Result<(), BootError> {
    for volume in volumes {
        let path = Path::new(&volume.path);
        std::fs::create_dir_all(path)
            .map_err(|e| volume_error(volume, "creating the mount point", e))?;
        let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
        if volume.read_only {
            flags |= libc::MS_RDONLY;
        }
        mount(
            Some(&volume.tag),
            path,
            Some("9p"),
            flags,
            Some(MOUNT_OPTIONS),
        )
        .map_err(|e| volume_error(volume, &format!("mounting 9p ({MOUNT_OPTIONS})"), e))?;
    }
    Ok(())
}

/// Mounts every `kiln.tmpfs=` mount (nosuid, nodev, with its mode and size), creating
/// the directory; on a read-only root these stay writable.
pub fn mount_tmpfs(mounts: &[TmpfsMount]) -> Result<(), BootError> {
    for tmpfs in mounts {
        let fail = |what: &str, e: std::io::Error| {
            failed(
                BootStep::MountVolume,
                format!("tmpfs at {}: {what}: {e}", tmpfs.path),
            )
        };
        let path = Path::new(&tmpfs.path);
        std::fs::create_dir_all(path).map_err(|e| fail("creating the mount point", e))?;
        let mut options = format!("mode={:o}", tmpfs.mode);
        if let Some(size) = tmpfs.size_bytes {
            options.push_str(&format!(",size={size}"));
        }
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&options),
        )
        .map_err(|e| fail(&format!("mounting tmpfs ({options})"), e))?;
    }
    Ok(())
}

/// Makes the root of every read-write volume the sandbox user's (`uid`:`gid`); with
/// mapped-xattr this only records the owner in the host directory's xattrs.
pub fn give_to_user(volumes: &[VolumeMount], uid: u32, gid: u32) -> Result<(), BootError> {
    for volume in volumes.iter().filter(|v| !v.read_only) {
        std::os::unix::fs::chown(&volume.path, Some(uid), Some(gid)).map_err(|e| {
            volume_error(
                volume,
                &format!("giving the volume root to {uid}:{gid} (does the host filesystem support user xattrs?)"),
                e,
            )
        })?;
    }
    Ok(())
}
