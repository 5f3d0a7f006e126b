//! The writable upper disk of a persistent sandbox: a sparse ext4 image made by mke2fs.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::VmError;

/// The mke2fs binary; e2fsprogs ships it on every Debian-like host.
const MKE2FS: &str = "mke2fs";

/// Creates a sparse ext4 image of `size_mib` at `path`, published by rename so a crash
/// never leaves a half-formatted disk under the final name.
pub fn create_upper_disk(path: &Path, size_mib: u64) -> Result<(), VmError> {
    if size_mib < 16 {
        return Err(VmError::InvalidSpec(format!(
            "a writable disk of {size_mib} MiB is too small; at least 16 MiB is needed"
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let disk_err = |source| VmError::File {
        path: path.to_path_buf(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix(".upper-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(disk_err)?;
    // A file of the final length with no blocks allocated: mke2fs writes only metadata.
    tmp.as_file().set_len(size_mib << 20).map_err(disk_err)?;
    let output = Command::new(MKE2FS)
        // -E root_owner: the guest's init owns the upper's root; lazy init keeps it sparse.
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
        ])
        .arg(tmp.path())
        .output()
        .map_err(|source| VmError::Tool {
            tool: MKE2FS,
            source,
        })?;
    if !output.status.success() {
        return Err(VmError::ToolFailed {
            tool: MKE2FS,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    tmp.persist(path).map_err(|e| disk_err(e.error))?;
    Ok(())
}

/// Bytes a file really occupies on disk (for checking sparseness).
pub fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// The conventional name of the upper disk in a sandbox state directory.
pub fn upper_disk_path(state_dir: &Path) -> PathBuf {
    state_dir.join("upper.ext4")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_disk_is_sparse_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let path = upper_disk_path(dir.path());
        create_upper_disk(&path, 1024).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
        let allocated = allocated_bytes(&path).unwrap();
        assert!(
            allocated < 64 << 20,
            "1 GiB disk allocates {allocated} bytes"
        );
        // The ext4 superblock magic 0xEF53 sits at offset 1024 + 56.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1080..1082], &[0x53, 0xEF]);
        // Nothing but the disk is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn tiny_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = create_upper_disk(&dir.path().join("u"), 1).unwrap_err();
        assert!(err.to_string().contains("at least 16 MiB"), "{err}");
    }
}
