//! The QEMU backend: the `microvm` machine with virtio-mmio devices.
//!
//! The machine is chosen for boot speed: no PCI, no firmware option ROMs, no legacy
//! devices but the serial port the console needs and the RTC the guest's clock is set
//! from. The kernel is best given as the uncompressed `vmlinux`, which QEMU enters through
//! its PVH note without decompressing it (a bzImage boots too, half a second slower under
//! TCG). QEMU 7.2's microvm describes its
//! virtio-mmio devices through ACPI, so the guest needs no `virtio_mmio.device=` options.
//! QEMU starts paused with its machine protocol on a private socket pair and runs the
//! guest once kiln listens there for how the guest ends (see [`crate::qmp`]).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::qmp::Monitor;
use crate::{Accel, Backend, Network, VmError, VmProcess, VmSpec};

/// The default QEMU binary, looked up on PATH.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// How long QEMU may take from its start to answering on its monitor: loading the kernel
/// and initramfs and setting up the devices, on a loaded host.
const MONITOR_WAIT: Duration = Duration::from_secs(15);

/// How long a QEMU that closed its monitor during the handshake gets to exit by itself (it
/// is quitting on a bad argument or file, and says why on stderr).
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// The machine: microvm with the one serial port the console uses and its CMOS RTC. The
/// RTC is how the guest kernel sets its wall clock at boot (its CMOS driver reads it);
/// without one the guest starts at 1970 and the kernel waits out two RTC probes (about
/// 1 s each). Everything else legacy stays off.
const MACHINE: &str = "microvm,x-option-roms=off,isa-serial=on,rtc=on";

/// Kernel arguments every kiln guest gets: console on the serial port, a reboot that
/// ends QEMU (with -no-reboot), and a panic that reboots at once instead of hanging.
const BASE_CMDLINE: &[&str] = &["console=ttyS0", "reboot=t", "panic=-1", "quiet"];

/// Drives `qemu-system-x86_64 -M microvm`.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_BINARY),
        }
    }
}

impl Qemu {
    /// Uses `binary` instead of `qemu-system-x86_64` from PATH.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The arguments that start `spec`, without the binary.
    pub fn arguments(&self, spec: &VmSpec) -> Result<Vec<OsString>, VmError> {
        validate(spec)?;
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));

        push(&["-M", MACHINE]);
        match spec.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        let memory = format!("{}M", spec.memory_mib);
        let cpus = spec.cpus.to_string();
        push(&["-m", &memory, "-smp", &cpus]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // The console goes to a file that QEMU's own diagnostics (stderr) also append to,
        // so a failure report shows both in order.
        let console = format!(
            "file,id=console,path={},append=on",
            escape_option(&spec.console_log)
        );
        push(&["-chardev", &console, "-serial", "chardev:console"]);

        let kernel = spec.kernel.to_string_lossy();
        let initrd = spec.initramfs.to_string_lossy();
        let tcg_args = match spec.accel {
            Accel::Tcg => crate::tsc::tcg_kernel_args().to_vec(),
            Accel::Kvm => Vec::new(),
        };
        let cmdline = BASE_CMDLINE
            .iter()
            .map(|s| s.to_string())
            .chain(tcg_args)
            .chain(spec.cmdline.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        push(&["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline]);

        for disk in &spec.disks {
            let drive = format!(
                "id={id},file={file},format=raw,if=none,readonly={ro},cache=unsafe",
                id = disk.id,
                file = escape_option(&disk.path),
                ro = if disk.read_only { "on" } else { "off" },
            );
            let device = format!("virtio-blk-device,drive={id},serial={id}", id = disk.id);
            push(&["-drive", &drive, "-device", &device]);
        }

        for (index, share) in spec.shares.iter().enumerate() {
            // QEMU opens its share root once, at start; through the inherited descriptor's
            // /proc link that open reaches the directory the caller checked, whatever its
            // path names by then (see `start`, which lets QEMU inherit it).
            let fsdev = format!(
                "local,id=share{index},path=/proc/self/fd/{fd},security_model=mapped-xattr{ro}",
                fd = share.dir.as_raw_fd(),
                ro = if share.read_only { ",readonly=on" } else { "" },
            );
            let device = format!(
                "virtio-9p-device,fsdev=share{index},mount_tag={}",
                share.tag
            );
            push(&["-fsdev", &fsdev, "-device", &device]);
        }

        let channel = format!(
            "socket,id=kilnchan,path={}",
            escape_option(&spec.channel.socket)
        );
        let port = format!(
            "virtserialport,chardev=kilnchan,name={}",
            spec.channel.port_name
        );
        push(&[
            "-device",
            "virtio-serial-device",
            "-chardev",
            &channel,
            "-device",
            &port,
        ]);

        // Entropy for the guest's getrandom(): without it early boot can block.
        push(&["-object", "rng-random,id=rng,filename=/dev/urandom"]);
        push(&["-device", "virtio-rng-device,rng=rng"]);

        if let Network::User { forwards } = &spec.network {
            let mut netdev = String::from("user,id=net0");
            for forward in forwards {
                netdev.push_str(&format!(
                    ",hostfwd=tcp:127.0.0.1:{}-:{}",
                    forward.host, forward.guest
                ));
            }
            push(&[
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-device,netdev=net0",
            ]);
        }
        Ok(args)
    }
}

impl Backend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, spec: &VmSpec) -> Result<VmProcess, VmError> {
        crate::guest::require_file("guest kernel", &spec.kernel)?;
        crate::guest::require_file("guest initramfs", &spec.initramfs)?;
        let arguments = self.arguments(spec)?;
        // Start each boot with an empty log; both writers then append to it. Never
        // through a symlink: the log is a file of kiln's own.
        let log = kiln_hostfs::open_log(&spec.console_log)?;
        log.set_len(0).map_err(|source| VmError::File {
            path: spec.console_log.clone(),
            source,
        })?;
        let spawn_error = |source| VmError::Spawn {
            vmm: "qemu",
            binary: self.binary.clone(),
            source,
        };
        let monitor = Monitor::new().map_err(spawn_error)?;
        let mut command = Command::new(&self.binary);
        command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let share_fds: Vec<RawFd> = spec.shares.iter().map(|s| s.dir.as_raw_fd()).collect();
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl,
        // which is async-signal-safe, on descriptors the spec keeps open across the spawn.
        unsafe {
            command.pre_exec(move || {
                // Kiln opens every descriptor close-on-exec; QEMU keeps the shares' only.
                for &fd in &share_fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        monitor.add_to(&mut command);
        tracing::debug!(?command, "starting qemu");
        let mut vm = VmProcess::spawn(command).map_err(spawn_error)?;
        match monitor.start(Instant::now() + MONITOR_WAIT) {
            Ok(report) => vm.report_guest_end(report),
            // QEMU quit at start (a bad disk, an unusable accelerator): the caller gets the
            // ended process, whose status and console log say why.
            Err(_) if vm.wait_until(Instant::now() + EXIT_WAIT)?.is_some() => {}
            Err(err) => {
                vm.kill()?;
                return Err(VmError::Qmp(err.to_string()));
            }
        }
        Ok(vm)
    }
}

/// QEMU splits option values at commas; a literal comma is written twice.
fn escape_option(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

fn validate(spec: &VmSpec) -> Result<(), VmError> {
    if spec.cpus == 0 {
        return Err(VmError::InvalidSpec("the VM needs at least 1 CPU".into()));
    }
    if spec.memory_mib < 64 {
        return Err(VmError::InvalidSpec(format!(
            "{} MiB of memory is too little; the guest needs at least 64 MiB",
            spec.memory_mib
        )));
    }
    let valid_id = |id: &str| {
        !id.is_empty()
            && id.len() <= 20
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    for disk in &spec.disks {
        if !valid_id(&disk.id) {
            return Err(VmError::InvalidSpec(format!(
                "disk id {:?} must be 1-20 characters of [A-Za-z0-9-] (it is the virtio serial)",
                disk.id
            )));
        }
    }
    for share in &spec.shares {
        if !valid_id(&share.tag) {
            return Err(VmError::InvalidSpec(format!(
                "share tag {:?} must be 1-20 characters of [A-Za-z0-9-]",
                share.tag
            )));
        }
    }
    if !valid_id(&spec.channel.port_name.replace('.', "-")) {
        return Err(VmError::InvalidSpec(format!(
            "channel port name {:?} must be 1-20 characters of [A-Za-z0-9.-]",
            spec.channel.port_name
        )));
    }
    for arg in &spec.cmdline {
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            return Err(VmError::InvalidSpec(format!(
                "kernel argument {arg:?} must be non-empty and contain no whitespace"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Channel, Disk, PortForward, Share};
    use kiln_protocol::{BootConfig, DiskRef, Upper, CHANNEL_PORT, ROOT_DISK_ID, UPPER_DISK_ID};

    fn spec() -> VmSpec {
        let boot = BootConfig {
            root: Some(DiskRef::Serial(ROOT_DISK_ID.into())),
            upper: Upper::Disk(DiskRef::Serial(UPPER_DISK_ID.into())),
            ..BootConfig::default()
        };
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline: boot.kernel_args().unwrap(),
            disks: vec![
                Disk {
                    id: ROOT_DISK_ID.into(),
                    path: "/s/root,1.erofs".into(),
                    read_only: true,
                },
                Disk {
                    id: UPPER_DISK_ID.into(),
                    path: "/s/upper.ext4".into(),
                    read_only: false,
                },
            ],
            shares: vec![
                Share {
                    tag: "vol0".into(),
                    dir: open_dir("/"),
                    read_only: false,
                },
                Share {
                    tag: "vol1".into(),
                    dir: open_dir("/tmp"),
                    read_only: true,
                },
            ],
            cpus: 2,
            memory_mib: 512,
            network: Network::User {
                forwards: vec![PortForward {
                    host: 8080,
                    guest: 80,
                }],
            },
            channel: Channel {
                socket: "/run/x/chan.sock".into(),
                port_name: CHANNEL_PORT.into(),
            },
            console_log: "/s/console.log".into(),
            accel: Accel::Tcg,
        }
    }

    fn open_dir(path: &str) -> std::os::fd::OwnedFd {
        std::fs::File::open(path).unwrap().into()
    }

    fn joined(spec: &VmSpec) -> String {
        Qemu::default()
            .arguments(spec)
            .unwrap()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_has_every_part() {
        let spec = spec();
        let line = joined(&spec);
        let root_device = format!("virtio-blk-device,drive={ROOT_DISK_ID},serial={ROOT_DISK_ID}");
        let port = format!("virtserialport,chardev=kilnchan,name={CHANNEL_PORT}");
        // The shares by their open descriptors, never by a path QEMU would resolve again.
        let (rw, ro) = (
            spec.shares[0].dir.as_raw_fd(),
            spec.shares[1].dir.as_raw_fd(),
        );
        let rw_share = format!(
            "-fsdev local,id=share0,path=/proc/self/fd/{rw},security_model=mapped-xattr -device"
        );
        let ro_share = format!(
            "local,id=share1,path=/proc/self/fd/{ro},security_model=mapped-xattr,readonly=on"
        );
        for part in [
            "-M microvm,x-option-roms=off,isa-serial=on,rtc=on -accel tcg -cpu max",
            "-m 512M -smp 2",
            "-no-reboot",
            "-append console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=",
            "tsc=reliable kiln.root=root kiln.upper=upper kiln.port=kiln.0 kiln.hostname=kiln",
            "file=/s/root,,1.erofs,format=raw,if=none,readonly=on",
            &root_device,
            "readonly=off",
            "file,id=console,path=/s/console.log,append=on",
            "socket,id=kilnchan,path=/run/x/chan.sock",
            &port,
            "hostfwd=tcp:127.0.0.1:8080-:80",
            &rw_share,
            "virtio-9p-device,fsdev=share0,mount_tag=vol0",
            &ro_share,
        ] {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
    }

    #[test]
    fn no_network_means_no_nic() {
        let mut spec = spec();
        spec.network = Network::None;
        assert!(!joined(&spec).contains("netdev"));
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let mut spec = spec();
        spec.accel = Accel::Kvm;
        let line = joined(&spec);
        assert!(line.contains("-accel kvm -cpu host"));
        assert!(!line.contains("tsc_early_khz"), "KVM guests use kvm-clock");
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut bad = spec();
        bad.cpus = 0;
        assert!(Qemu::default().arguments(&bad).is_err());
        let mut bad = spec();
        bad.disks[0].id = "root disk".into();
        assert!(Qemu::default().arguments(&bad).is_err());
        let mut bad = spec();
        bad.cmdline.push("a b".into());
        assert!(Qemu::default().arguments(&bad).is_err());
    }

    #[test]
    fn missing_kernel_is_reported_with_a_fix() {
        let err = Qemu::default().start(&spec()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("/k/vmlinux") && text.contains("scripts/build-guest"),
            "{text}"
        );
    }
}
