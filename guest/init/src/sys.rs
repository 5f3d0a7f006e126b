//! Thin, checked wrappers over the system calls init needs (mount, chroot, hostname,
//! reboot), the one sysctl it sets, and the sysfs look-ups that find devices by role.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_protocol::DiskRef;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Sets the wall clock (CLOCK_REALTIME) to `unix_ns` nanoseconds since the epoch.
pub fn set_wall_clock(unix_ns: u64) -> io::Result<()> {
    const NANOS: u64 = 1_000_000_000;
    let time = libc::timespec {
        tv_sec: libc::time_t::try_from(unix_ns / NANOS)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        // Below 10^9, which every c_long holds.
        tv_nsec: (unix_ns % NANOS) as libc::c_long,
    };
    // SAFETY: clock_settime only reads the timespec we own.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) })
}

/// mount(2). `source` and `data` are optional as in the C API.
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let to_c = |s: Option<&str>| {
        s.map(|s| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput)))
    };
    let source = to_c(source).transpose()?;
    let fstype = to_c(fstype).transpose()?;
    let data = to_c(data).transpose()?;
    let target = cstring(target)?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// Moves the mount at `from` to `to` (MS_MOVE).
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    let from = from
        .to_str()
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    mount(Some(from), to, None, libc::MS_MOVE, None)
}

/// Makes the mount at `target` read-only for everything above it (a bind remount changes
/// the mount's flags, not its filesystem's, so mounts below stay as they are). Its nodev
/// and nosuid are given again: a remount replaces every per-mount flag.
pub fn remount_read_only(target: &Path) -> io::Result<()> {
    let flags =
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    mount(None, target, None, flags, None)
}

/// chroot(2) into `dir` and chdir to its root.
pub fn chroot(dir: &Path) -> io::Result<()> {
    let dir = cstring(dir)?;
    // SAFETY: dir is a valid C string.
    check(unsafe { libc::chroot(dir.as_ptr()) })?;
    std::env::set_current_dir("/")
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Sets `user.max_user_namespaces` to 0 (needs /proc): from then on no process in the guest
/// can create a user namespace, so the workload cannot give itself one where it holds every
/// capability (`unshare -r`). Only root in the guest could raise the limit again.
pub fn forbid_user_namespaces() -> io::Result<()> {
    std::fs::write("/proc/sys/user/max_user_namespaces", "0")
}

/// Flushes every filesystem and powers the machine off. With QEMU's `-no-reboot` and the
/// kernel's `reboot=t`, this ends the VMM process. Never returns.
pub fn power_off() -> ! {
    // SAFETY: plain system calls without pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
        // Only reachable if reboot(2) is refused; PID 1 exiting panics the kernel, and
        // `panic=-1` turns that into a reboot, which -no-reboot turns into an exit.
        libc::_exit(1)
    }
}

/// Polls `find` every 10 ms until it yields a value or `limit` passes. Devices announced by
/// the host (virtio-serial ports) appear asynchronously after the kernel hands over to init.
pub fn wait_for<T>(limit: Duration, mut find: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(found) = find() {
            return Some(found);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The device node of `disk`: an explicit path, or the virtio-blk disk whose
/// `/sys/block/<name>/serial` equals the serial.
pub fn find_disk(disk: &DiskRef, sys: &Path, dev: &Path) -> Option<PathBuf> {
    match disk {
        DiskRef::Path(path) => Some(PathBuf::from(path)).filter(|p| p.exists()),
        DiskRef::Serial(serial) => {
            let name = find_in_class(&sys.join("block"), "serial", serial)?;
            Some(dev.join(name)).filter(|p| p.exists())
        }
    }
}

/// The device node of the virtio-serial port named `port` (`/sys/class/virtio-ports/*/name`).
pub fn find_port(port: &str, sys: &Path, dev: &Path) -> Option<PathBuf> {
    let name = find_in_class(&sys.join("class/virtio-ports"), "name", port)?;
    Some(dev.join(name)).filter(|p| p.exists())
}

/// The entry of `class_dir` whose `attribute` file holds `value` (trailing newline ignored).
fn find_in_class(class_dir: &Path, attribute: &str, value: &str) -> Option<String> {
    std::fs::read_dir(class_dir)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let content = std::fs::read(entry.path().join(attribute)).ok()?;
            let content = content.strip_suffix(b"\n").unwrap_or(&content);
            (content == value.as_bytes()).then(|| entry.file_name().to_string_lossy().into_owned())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_and_ports_are_found_by_their_sysfs_attribute() {
        use kiln_protocol::{CHANNEL_PORT, IDENTITY_DISK_ID, ROOT_DISK_ID, UPPER_DISK_ID};

        let dir = tempfile::tempdir().unwrap();
        let (sys, dev) = (dir.path().join("sys"), dir.path().join("dev"));
        for (name, serial) in [("vda", IDENTITY_DISK_ID), ("vdb", ROOT_DISK_ID)] {
            std::fs::create_dir_all(sys.join("block").join(name)).unwrap();
            std::fs::write(
                sys.join("block").join(name).join("serial"),
                format!("{serial}\n"),
            )
            .unwrap();
        }
        std::fs::create_dir_all(sys.join("class/virtio-ports/vport0p1")).unwrap();
        std::fs::write(
            sys.join("class/virtio-ports/vport0p1/name"),
            format!("{CHANNEL_PORT}\n"),
        )
        .unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        for node in ["vda", "vdb", "vport0p1"] {
            std::fs::write(dev.join(node), "").unwrap();
        }

        assert_eq!(
            find_disk(&DiskRef::Serial(ROOT_DISK_ID.into()), &sys, &dev),
            Some(dev.join("vdb"))
        );
        assert_eq!(
            find_disk(&DiskRef::Serial(UPPER_DISK_ID.into()), &sys, &dev),
            None
        );
        assert_eq!(
            find_disk(
                &DiskRef::Path(dev.join("vda").display().to_string()),
                &sys,
                &dev
            ),
            Some(dev.join("vda"))
        );
        assert_eq!(
            find_port(CHANNEL_PORT, &sys, &dev),
            Some(dev.join("vport0p1"))
        );
        assert_eq!(find_port("kiln.1", &sys, &dev), None);
    }

    #[test]
    fn wait_for_gives_up_after_the_limit() {
        assert_eq!(wait_for::<()>(Duration::from_millis(30), || None), None);
        let mut calls = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), || {
                calls += 1;
                (calls == 3).then_some(calls)
            }),
            Some(3)
        );
    }
}
