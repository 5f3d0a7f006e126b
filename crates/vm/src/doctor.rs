//! `kiln doctor`: can this host run sandboxes, and if not, what exactly fixes it; and
//! which of the VMM's confinements (docs/security.md) the host allows.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::accel::{self, Accel, AccelVerdict};
use crate::guest::{self, GuestImages};
use crate::jail;
use crate::VmError;

/// Below this much free space under the root, builds of realistic images may fail.
const MIN_FREE_BYTES: u64 = 2 << 30;

/// One check of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// The exact command that fixes a failed check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|check| check.ok)
    }
}

/// Checks the VMM, the root's permissions, the guest boot files, acceleration and free
/// space for `root`.
///
/// Acceleration is reported from this host boot's cached verdict when there is one; a
/// fresh probe needs a guest boot, which the first `kiln run` does.
pub fn diagnose(qemu_binary: &Path, root: &Path) -> Report {
    let images = GuestImages::locate(root);
    Report {
        checks: vec![
            check_qemu(qemu_binary),
            check_root(root),
            check_guest_file(&images, "kernel", &images.kernel, guest::KERNEL_ENV),
            check_guest_file(
                &images,
                "initramfs",
                &images.initramfs,
                guest::INITRAMFS_ENV,
            ),
            check_accel(root),
            check_space(root),
            check_vmm_user(),
            check_user_namespaces(),
            check_cgroups(),
            check_seccomp(qemu_binary),
        ],
    }
}

fn is_root() -> bool {
    // SAFETY: a plain getter without arguments.
    unsafe { libc::geteuid() == 0 }
}

/// Whom the VMM runs as.
fn check_vmm_user() -> Check {
    let detail = if !is_root() {
        // SAFETY: a plain getter without arguments.
        let uid = unsafe { libc::geteuid() };
        format!(
            "QEMU runs as you (uid {uid}) with no_new_privs; as root kiln runs it as {}",
            jail::VMM_USER
        )
    } else {
        match jail::existing_vmm_account() {
            Some((uid, gid)) => format!(
                "QEMU runs as {} (uid {uid}, gid {gid}) with no capabilities or supplementary groups",
                jail::VMM_USER
            ),
            None => format!(
                "{} does not exist yet; the first `kiln run` creates it (useradd --system)",
                jail::VMM_USER
            ),
        }
    };
    Check {
        name: "vmm user",
        ok: true,
        detail,
        fix: None,
    }
}

/// Whether QEMU can get a mount namespace of its own.
fn check_user_namespaces() -> Check {
    if is_root() {
        return Check {
            name: "user namespaces",
            ok: true,
            detail: "not needed as root: QEMU gets its own mount namespace directly".into(),
            fix: None,
        };
    }
    if jail::user_namespaces_allowed() {
        Check {
            name: "user namespaces",
            ok: true,
            detail: "allowed: QEMU gets its own mount namespace holding only its files".into(),
            fix: None,
        }
    } else {
        Check {
            name: "user namespaces",
            ok: false,
            detail: "off for ordinary users: QEMU would see the host's files as you".into(),
            fix: Some(
                "sudo sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000"
                    .into(),
            ),
        }
    }
}

/// Whether each VMM gets a cgroup bounding its memory, tasks and CPU.
fn check_cgroups() -> Check {
    match (jail::cgroup_version(), is_root()) {
        (Some(version), true) => Check {
            name: "cgroups",
            ok: true,
            detail: format!("{version}: each VMM gets memory, pids and cpu limits"),
            fix: None,
        },
        (Some(version), false) => Check {
            name: "cgroups",
            ok: true,
            detail: format!(
                "{version}, used when kiln runs as root; as you, rlimits bound the VMM"
            ),
            fix: None,
        },
        (None, _) => Check {
            name: "cgroups",
            ok: false,
            detail: "no cgroup filesystem at /sys/fs/cgroup: only rlimits bound the VMM".into(),
            fix: Some("sudo mount -t cgroup2 none /sys/fs/cgroup".into()),
        },
    }
}

/// Whether the kernel filters system calls and QEMU has its `-sandbox` option.
fn check_seccomp(binary: &Path) -> Check {
    let kernel = Path::new("/proc/sys/kernel/seccomp/actions_avail").exists();
    let qemu = Command::new(binary)
        .arg("-help")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("-sandbox"))
        .unwrap_or(false);
    let (ok, detail, fix) = match (kernel, qemu) {
        (true, true) => (
            true,
            format!("QEMU runs with -sandbox {}", jail::SECCOMP_OPTION),
            None,
        ),
        (false, _) => (
            false,
            "the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)".to_owned(),
            None,
        ),
        (true, false) => (
            false,
            format!(
                "{} has no -sandbox option (built without libseccomp)",
                binary.display()
            ),
            Some("sudo apt-get install qemu-system-x86".to_owned()),
        ),
    };
    Check {
        name: "seccomp",
        ok,
        detail,
        fix,
    }
}

fn check_qemu(binary: &Path) -> Check {
    let fix = Some("sudo apt-get install qemu-system-x86".to_owned());
    let version = match Command::new(binary).arg("--version").output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        Ok(out) => {
            let detail = format!("{} --version failed: {}", binary.display(), out.status);
            return Check {
                name: "qemu",
                ok: false,
                detail,
                fix,
            };
        }
        Err(err) => {
            let detail = format!("{} not runnable: {err}", binary.display());
            return Check {
                name: "qemu",
                ok: false,
                detail,
                fix,
            };
        }
    };
    let machines = Command::new(binary).args(["-M", "help"]).output();
    let has_microvm = machines
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with("microvm "))
        })
        .unwrap_or(false);
    if has_microvm {
        Check {
            name: "qemu",
            ok: true,
            detail: version,
            fix: None,
        }
    } else {
        let detail = format!("{version}: no microvm machine (QEMU 4.2 or newer has it)");
        Check {
            name: "qemu",
            ok: false,
            detail,
            fix,
        }
    }
}

/// Whether kiln would accept `root` (kiln-hostfs): a directory of this user that others
/// cannot write, under directories that keep others from replacing it.
fn check_root(root: &Path) -> Check {
    let verdict = std::path::absolute(root)
        .map_err(|source| kiln_hostfs::Error::Io {
            path: root.to_path_buf(),
            source,
        })
        .and_then(|root| {
            if let Some(parent) = root.parent() {
                kiln_hostfs::check_parent_dir(parent, &root)?;
            }
            kiln_hostfs::check_private_dir(&root)
        });
    match verdict {
        Ok(()) => Check {
            name: "root",
            ok: true,
            detail: root.display().to_string(),
            fix: None,
        },
        Err(err) if err.is_not_found() => Check {
            name: "root",
            ok: true,
            detail: format!("{} (created 0700 on first use)", root.display()),
            fix: None,
        },
        Err(err) => {
            let fix = match &err {
                kiln_hostfs::Error::Untrusted { fix, .. } => Some(fix.clone()),
                kiln_hostfs::Error::Io { .. } => None,
            };
            Check {
                name: "root",
                ok: false,
                detail: err.to_string(),
                fix,
            }
        }
    }
}

fn check_guest_file(images: &GuestImages, name: &'static str, path: &Path, env: &str) -> Check {
    let fix = Some(guest::BUILD_COMMAND.to_owned());
    match images.check_file(name, path) {
        Ok(()) => Check {
            name,
            ok: true,
            detail: path.display().to_string(),
            fix: None,
        },
        Err(VmError::MissingFile { .. }) => Check {
            name,
            ok: false,
            detail: format!(
                "{} is missing (or set {env} to another file)",
                path.display()
            ),
            fix,
        },
        Err(err) => Check {
            name,
            ok: false,
            detail: err.to_string(),
            fix,
        },
    }
}

fn check_accel(root: &Path) -> Check {
    let cache = accel::cache_dir(root);
    match accel::cached_verdict(&cache) {
        Some(AccelVerdict { accel, reason, .. }) => Check {
            name: "acceleration",
            ok: true,
            detail: format!("{} ({reason})", accel.as_str()),
            fix: None,
        },
        None => {
            let detail = match accel::open_kvm(Path::new(accel::KVM_DEVICE)) {
                Err(why) => format!("{}: {why}", Accel::Tcg.as_str()),
                Ok(()) => format!(
                    "{} opens; the first `kiln run` boots the guest once under KVM to check it \
                     really works, and falls back to TCG if not",
                    accel::KVM_DEVICE
                ),
            };
            Check {
                name: "acceleration",
                ok: true,
                detail,
                fix: None,
            }
        }
    }
}

fn check_space(root: &Path) -> Check {
    // The root may not exist yet: measure the nearest existing ancestor.
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match free_bytes(existing) {
        Ok(free) => {
            let detail = format!(
                "{:.1} GiB free under {}",
                free as f64 / (1u64 << 30) as f64,
                existing.display()
            );
            if free >= MIN_FREE_BYTES {
                Check {
                    name: "disk space",
                    ok: true,
                    detail,
                    fix: None,
                }
            } else {
                let fix = Some(format!("kiln --root {} prune", root.display()));
                Check {
                    name: "disk space",
                    ok: false,
                    detail: format!("{detail}; at least 2 GiB needed"),
                    fix,
                }
            }
        }
        Err(err) => Check {
            name: "disk space",
            ok: false,
            detail: format!(
                "cannot measure free space under {}: {err}",
                existing.display()
            ),
            fix: None,
        },
    }
}

fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte")
    })?;
    // SAFETY: statvfs is a plain C struct, for which all zero bytes are a valid value.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and statvfs writes into the struct we own.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_qemu_says_how_to_install_it() {
        let check = check_qemu(Path::new("/nonexistent/qemu-system-x86_64"));
        assert!(!check.ok);
        assert_eq!(
            check.fix.as_deref(),
            Some("sudo apt-get install qemu-system-x86")
        );
    }

    #[test]
    fn missing_guest_files_point_at_the_build_script() {
        let dir = tempfile::tempdir().unwrap();
        let images = GuestImages::locate(dir.path());
        let check = check_guest_file(
            &images,
            "kernel",
            &dir.path().join("guest/kernel"),
            guest::KERNEL_ENV,
        );
        assert!(!check.ok);
        assert_eq!(check.fix.as_deref(), Some(guest::BUILD_COMMAND));
        assert!(check.detail.contains("KILN_KERNEL"));
    }

    #[test]
    fn a_root_others_can_write_is_reported_with_its_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        assert!(check_root(&root).ok, "created on first use");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let check = check_root(&root);
        assert!(!check.ok);
        assert!(check.detail.contains("mode 777"), "{}", check.detail);
        assert!(check.fix.unwrap().contains("chmod 700"));
    }

    #[test]
    fn space_is_measured_on_an_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let check = check_space(&dir.path().join("not/yet/created"));
        assert!(check.detail.contains("GiB free under"), "{}", check.detail);
    }

    #[test]
    fn report_serialises_with_fixes() {
        let dir = tempfile::tempdir().unwrap();
        let report = diagnose(Path::new("/nonexistent/qemu"), dir.path());
        assert!(!report.ok());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["checks"][0]["name"], "qemu");
        assert!(json["checks"][0]["fix"].is_string());
    }
}
