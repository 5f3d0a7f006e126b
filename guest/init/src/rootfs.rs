//! The guest's filesystems: the kernel's own (proc, sys, dev) in the initramfs, the sandbox
//! root assembled as an overlay of the read-only images under a writable upper, the switch
//! into it, and the usual runtime mounts inside it.

use std::io;
use std::path::{Path, PathBuf};

use crate::etc;
use crate::sys::{self, mount};
use kiln_protocol::{BootConfig, BootError, BootStep as Step, DiskRef, Upper};

/// Where init mounts things in the initramfs before switching.
const ROOT_IMAGE: &str = "/kiln/root";
const IDENT_IMAGE: &str = "/kiln/ident";
const OPENSHELL_IMAGE: &str = "/kiln/openshell";
const UPPER: &str = "/kiln/upper";
const NEW_ROOT: &str = "/newroot";

/// How long a disk named on the command line may take to show up.
const DISK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Flags of every mount that holds image content or what the workload wrote: the images,
/// the upper and the overlay root. An image keeps its device nodes (kiln builds what the
/// layers say), but none of them may reach the guest's own hardware: a world-writable
/// node for the root disk or /dev/kmsg would hand the workload the disks and the console.
/// Set-id bits gain nothing either: the workload runs with no_new_privs and an empty
/// bounding set (docs/supervisor.md), and nosuid says so at the mount as well.
const IMAGE_CONTENT: libc::c_ulong = libc::MS_NODEV | libc::MS_NOSUID;

/// The typed boot error of `step`.
pub fn failed(step: Step, message: impl Into<String>) -> BootError {
    BootError {
        step,
        message: message.into(),
    }
}

fn io_step(step: Step, what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> BootError {
    move |err| failed(step, format!("{what}: {err}"))
}

fn mkdir(path: &Path, step: Step) -> Result<(), BootError> {
    std::fs::create_dir_all(path).map_err(io_step(step, format!("creating {}", path.display())))
}

/// Mounts proc, sysfs and devtmpfs in the initramfs: enough to find the disks and the
/// channel's port.
pub fn mount_kernel_filesystems() -> Result<(), BootError> {
    let step = Step::KernelFilesystems;
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (fstype, target, flags) in [
        ("proc", "/proc", nosuid_nodev_noexec),
        ("sysfs", "/sys", nosuid_nodev_noexec),
        ("devtmpfs", "/dev", libc::MS_NOSUID),
    ] {
        let target = Path::new(target);
        mkdir(target, step)?;
        mount(Some(fstype), target, Some(fstype), flags, None).map_err(io_step(
            step,
            format!("mounting {fstype} on {}", target.display()),
        ))?;
    }
    Ok(())
}

fn disk_node(disk: &DiskRef, step: Step) -> Result<PathBuf, BootError> {
    sys::wait_for(DISK_WAIT, || {
        sys::find_disk(disk, Path::new("/sys"), Path::new("/dev"))
    })
    .ok_or_else(|| failed(step, format!("{disk} not found (is the disk attached?)")))
}

fn mount_erofs(disk: &DiskRef, target: &str, step: Step) -> Result<(), BootError> {
    let node = disk_node(disk, step)?;
    let target = Path::new(target);
    mkdir(target, step)?;
    let node_str = node.to_string_lossy();
    mount(
        Some(&node_str),
        target,
        Some("erofs"),
        libc::MS_RDONLY | IMAGE_CONTENT,
        None,
    )
    .map_err(io_step(
        step,
        format!(
            "mounting {} (EROFS, read-only) on {}",
            node.display(),
            target.display()
        ),
    ))
}

/// The sandbox root [`assemble_root`] mounted.
pub struct AssembledRoot {
    pub path: PathBuf,
    /// Whether the name files are already in its upper ([`etc::write_into_fresh_upper`]).
    pub name_files_written: bool,
}

/// Mounts the images and the upper named by `config` and stacks them into an overlay at
/// /newroot: lowerdir=[openshell:]identity:root (the identity layer's edited /etc/passwd and
/// /sandbox win over the image, and OpenShell's supervisor layer over both), the upper on tmpfs or an ext4 disk, with metacopy so that
/// ownership changes under /sandbox copy up metadata only. Every one of these mounts is
/// nodev and nosuid ([`IMAGE_CONTENT`]).
pub fn assemble_root(config: &BootConfig) -> Result<AssembledRoot, BootError> {
    let root = config.root.as_ref().ok_or_else(|| {
        failed(
            Step::MountRoot,
            "no root image given (kiln.root= on the kernel command line)",
        )
    })?;
    mount_erofs(root, ROOT_IMAGE, Step::MountRoot)?;
    let mut lowers = vec![ROOT_IMAGE];
    if let Some(ident) = &config.ident {
        mount_erofs(ident, IDENT_IMAGE, Step::MountIdentity)?;
        lowers.insert(0, IDENT_IMAGE);
    }
    // Topmost, so that nothing of the image can stand in for OpenShell's supervisor.
    if let Some(openshell) = &config.openshell {
        mount_erofs(openshell, OPENSHELL_IMAGE, Step::MountSupervisor)?;
        lowers.insert(0, OPENSHELL_IMAGE);
    }

    let step = Step::MountUpper;
    let upper = Path::new(UPPER);
    mkdir(upper, step)?;
    match &config.upper {
        Upper::Tmpfs => mount(
            Some("tmpfs"),
            upper,
            Some("tmpfs"),
            IMAGE_CONTENT,
            Some("mode=0755"),
        )
        .map_err(io_step(step, "mounting the tmpfs upper"))?,
        Upper::Disk(disk) => {
            let node = disk_node(disk, step)?;
            mount(
                Some(&node.to_string_lossy()),
                upper,
                Some("ext4"),
                IMAGE_CONTENT,
                None,
            )
            .map_err(io_step(
                step,
                format!("mounting {} (ext4) on {UPPER}", node.display()),
            ))?
        }
    }
    // A fresh disk is empty; a reused one already has both directories.
    for dir in ["upper", "work"] {
        mkdir(&upper.join(dir), step)?;
    }

    let name_files_written = match config.upper {
        Upper::Tmpfs => {
            let lowers: Vec<&Path> = lowers.iter().map(Path::new).collect();
            etc::write_into_fresh_upper(&upper.join("upper"), &lowers, config).map_err(io_step(
                Step::Hostname,
                "writing /etc/hostname, /etc/hosts and /etc/resolv.conf into the upper",
            ))?
        }
        // A disk's upper may hold an earlier boot's /etc (or its whiteout): the overlay
        // sorts that out.
        Upper::Disk(_) => false,
    };

    let step = Step::Overlay;
    let new_root = Path::new(NEW_ROOT);
    mkdir(new_root, step)?;
    let options = format!(
        "lowerdir={},upperdir={UPPER}/upper,workdir={UPPER}/work,metacopy=on,redirect_dir=on",
        lowers.join(":")
    );
    mount(
        Some("overlay"),
        new_root,
        Some("overlay"),
        IMAGE_CONTENT,
        Some(&options),
    )
    .map_err(io_step(step, format!("mounting overlay ({options})")))?;
    Ok(AssembledRoot {
        path: new_root.to_path_buf(),
        name_files_written,
    })
}

/// Moves /dev, /proc and /sys into `new_root`, makes it the root (the initramfs cannot be
/// pivoted away, so: move mount onto / and chroot, as switch_root does).
pub fn switch_root(new_root: &Path) -> Result<(), BootError> {
    let step = Step::SwitchRoot;
    for dir in ["dev", "proc", "sys"] {
        let target = new_root.join(dir);
        mkdir(&target, step)?;
        sys::move_mount(&Path::new("/").join(dir), &target)
            .map_err(io_step(step, format!("moving /{dir} into the new root")))?;
    }
    std::env::set_current_dir(new_root)
        .map_err(io_step(step, format!("entering {}", new_root.display())))?;
    sys::move_mount(Path::new("."), Path::new("/"))
        .map_err(io_step(step, "moving the new root onto /"))?;
    sys::chroot(Path::new(".")).map_err(io_step(step, "chroot into the new root"))
}

/// Mounts devpts, /dev/shm, /run, /tmp and the cgroup2 hierarchy inside the sandbox root,
/// creating missing mount points (they land in the upper), and the /dev/fd links.
pub fn mount_runtime_filesystems() -> Result<(), BootError> {
    let step = Step::RuntimeFilesystems;
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    for (fstype, target, flags, data) in [
        (
            "devpts",
            "/dev/pts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "/dev/shm", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/tmp", nosuid_nodev, "mode=1777"),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            nosuid_nodev | libc::MS_NOEXEC,
            // favordynmods: moving a task into a cgroup (the workload's start, each exec
            // session's) and enabling controllers otherwise wait for an RCU grace period,
            // 10-15 ms of a TCG boot; forks and exits pay a little more instead.
            "nsdelegate,favordynmods",
        ),
    ] {
        let target = Path::new(target);
        mkdir(target, step)?;
        mount(Some(fstype), target, Some(fstype), flags, Some(data)).map_err(io_step(
            step,
            format!("mounting {fstype} on {}", target.display()),
        ))?;
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(to, link) {
            Err(err) if err.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_step(step, format!("linking {link} to {to}"))(err))
            }
            _ => {}
        }
    }
    Ok(())
}
