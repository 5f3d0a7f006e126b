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
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::jail::{Jail, JailRequest, JailShare, Limits};
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

/// The virtio-serial device with room for kiln's one port (number 1: QEMU keeps 0 for a
/// console). QEMU's default of 31 ports has the guest set up 64 virtqueues at probe, which
/// cost a TCG boot ~40 ms.
const SERIAL_DEVICE: &str = "virtio-serial-device,max_ports=2";

/// The queue size of a read-only disk's virtio-blk device (an option suffix).
const READ_ONLY_DISK_QUEUE: &str = ",queue-size=32";

/// Under TCG the guest's RDRAND instruction is QEMU's: it answers with QEMU's own
/// getrandom, the source a virtio-rng device would read from. So a TCG guest trusts its
/// CPU's random numbers for seeding the kernel's generator and needs no virtio-rng, whose
/// probe cost a TCG boot ~5 ms. (Under KVM RDRAND is the host CPU's, which is left to the
/// kernel's default, and the guest gets the device.)
const TCG_ENTROPY_ARG: &str = "random.trust_cpu=on";

/// Kernel arguments every kiln guest gets: console on the serial port, a reboot that
/// ends QEMU (with -no-reboot), and a panic that reboots at once instead of hanging.
const BASE_CMDLINE: &[&str] = &["console=ttyS0", "reboot=t", "panic=-1", "quiet"];

/// How QEMU reaches the files of a spec: descriptors it inherits (put in fd sets) and the
/// paths the jail shows it.
struct VmmFiles {
    kernel: PathBuf,
    initramfs: PathBuf,
    /// Per disk: a read-only descriptor, and a read-write one for a writable disk (QEMU
    /// opens a writable image read-only first, and again for writing once it is used).
    disks: Vec<Vec<RawFd>>,
    console: RawFd,
    channel: RawFd,
    /// Connected to the network endpoint, for a spec with a network.
    network: Option<RawFd>,
    shares: Vec<String>,
}

/// Drives `qemu-system-x86_64 -M microvm`.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    /// kiln's root, where a root kiln keeps the execute-only copy of the binary.
    state: Option<PathBuf>,
}

impl Default for Qemu {
    fn default() -> Self {
        Self::with_binary(DEFAULT_BINARY)
    }
}

impl Qemu {
    /// Uses `binary` instead of `qemu-system-x86_64` from PATH.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            state: None,
        }
    }

    /// Keeps the execute-only copy of the binary that QEMU runs as when kiln is root
    /// under kiln root `root`, made once instead of for every start (see [`crate::jail`]).
    pub fn keeping_state_in(mut self, root: impl Into<PathBuf>) -> Self {
        self.state = Some(root.into());
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The arguments that start `spec` with `files`, without the binary.
    fn arguments(&self, spec: &VmSpec, files: &VmmFiles) -> Result<Vec<OsString>, VmError> {
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
        push(&["-sandbox", crate::jail::SECCOMP_OPTION]);
        // Files are handed over open (QEMU's fd sets): the jail holds none of them.
        let mut fd_sets = 0;
        // Each set's opaque names the file it holds, for people (and `ps`).
        let mut add_fd = |args: &mut Vec<OsString>, fds: &[RawFd], path: &Path| {
            fd_sets += 1;
            for fd in fds {
                let opaque = escape_option(path);
                let set = format!("fd={fd},set={fd_sets},opaque={opaque}");
                args.extend(["-add-fd".into(), set.into()]);
            }
            format!("/dev/fdset/{fd_sets}")
        };
        // The console goes to a file that QEMU's own diagnostics (stderr) also append to,
        // so a failure report shows both in order.
        let console_path = add_fd(&mut args, &[files.console], &spec.console_log);
        let console = format!("file,id=console,path={console_path},append=on");
        args.extend(["-chardev", &console, "-serial", "chardev:console"].map(OsString::from));
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));

        let kernel = files.kernel.to_string_lossy();
        let initrd = files.initramfs.to_string_lossy();
        let tcg_args = match spec.accel {
            Accel::Tcg => {
                let mut args = crate::tsc::tcg_kernel_args().to_vec();
                args.push(TCG_ENTROPY_ARG.to_owned());
                args
            }
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

        for (disk, fds) in spec.disks.iter().zip(&files.disks) {
            let file = add_fd(&mut args, fds, &disk.path);
            let drive = format!(
                "id={id},file={file},format=raw,if=none,readonly={ro},cache=unsafe",
                id = disk.id,
                ro = if disk.read_only { "on" } else { "off" },
            );
            // A read-only image needs no deep queue; the guest's probe sets up a request for
            // every queue entry, and QEMU's default of 256 cost a TCG boot ~15 ms a disk.
            let queue = if disk.read_only {
                READ_ONLY_DISK_QUEUE
            } else {
                ""
            };
            let device = format!(
                "virtio-blk-device,drive={id},serial={id}{queue}",
                id = disk.id
            );
            args.extend(["-drive", &drive, "-device", &device].map(OsString::from));
        }
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));

        for ((index, share), path) in spec.shares.iter().enumerate().zip(&files.shares) {
            // The jail mounts the directory the caller checked (by its descriptor) at
            // `path`; QEMU opens it there once, at start.
            let fsdev = format!(
                "local,id=share{index},path={path},security_model=mapped-xattr{ro}",
                ro = if share.read_only { ",readonly=on" } else { "" },
            );
            let device = format!(
                "virtio-9p-device,fsdev=share{index},mount_tag={}",
                share.tag
            );
            push(&["-fsdev", &fsdev, "-device", &device]);
        }

        // Connected by kiln: QEMU needs no path to reach the socket.
        let channel = format!("socket,id=kilnchan,fd={}", files.channel);
        let port = format!(
            "virtserialport,chardev=kilnchan,name={}",
            spec.channel.port_name
        );
        push(&[
            "-device",
            SERIAL_DEVICE,
            "-chardev",
            &channel,
            "-device",
            &port,
        ]);

        // Entropy for the guest's getrandom(): without it early boot can block. Under KVM
        // a virtio-rng fed by QEMU's built-in source (its own getrandom), which answers the
        // guest's first read at once. A TCG guest gets the same source without a device
        // (see TCG_ENTROPY_ARG).
        if spec.accel == Accel::Kvm {
            push(&["-object", "rng-builtin,id=rng"]);
            push(&["-device", "virtio-rng-device,rng=rng"]);
        }

        if let Some(fd) = files.network {
            // Connected by kiln to the endpoint, as the channel: QEMU 7.2's stream netdev
            // takes a connected socket as `addr.type=fd` (a number, or a monitor fd name).
            let netdev = format!("stream,id=net0,server=off,addr.type=fd,addr.str={fd}");
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

/// Starts the VMM without transparent huge pages. QEMU asks for them on guest RAM, so the
/// first guest write to each 2 MiB of it makes the host zero all 2 MiB; a boot touches a
/// little of many such regions, and on these (nested) hosts that zeroing took a third of
/// a TCG boot's host CPU. Under TCG huge pages buy the guest nothing (its memory is reached
/// through QEMU's own 4 KiB software TLB); under KVM they back the guest's page tables, so
/// they stay.
fn without_huge_pages(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and makes one prctl(2) call without
    // pointers, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Backend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, spec: &VmSpec) -> Result<VmProcess, VmError> {
        crate::guest::require_file("guest kernel", &spec.kernel)?;
        crate::guest::require_file("guest initramfs", &spec.initramfs)?;
        validate(spec)?;
        // Start each boot with an empty log; both writers then append to it. Never
        // through a symlink: the log is a file of kiln's own.
        let log = kiln_hostfs::open_log(&spec.console_log)?;
        let file_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| VmError::File { path, source }
        };
        log.set_len(0).map_err(file_error(&spec.console_log))?;
        let console = log.try_clone().map_err(file_error(&spec.console_log))?;
        let open = |path: &Path, write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .map_err(file_error(path))
        };
        let disks = spec
            .disks
            .iter()
            .map(|disk| {
                let mut fds = vec![open(&disk.path, false)?];
                if !disk.read_only {
                    fds.push(open(&disk.path, true)?);
                }
                Ok(fds)
            })
            .collect::<Result<Vec<_>, VmError>>()?;
        // Every socket QEMU uses is connected here and handed over (in `keep_fds` and
        // `VmmFiles`): the jail holds no socket path.
        let connect = |path: &Path| UnixStream::connect(path).map_err(file_error(path));
        let channel = connect(&spec.channel.socket)?;
        let network = match &spec.network {
            Network::Stream { socket } => Some(connect(socket)?),
            Network::None => None,
        };
        let spawn_error = |source| VmError::Spawn {
            vmm: "qemu",
            binary: self.binary.clone(),
            source,
        };
        let monitor = Monitor::new().map_err(spawn_error)?;
        let raw = |files: &Vec<std::fs::File>| files.iter().map(|f| f.as_raw_fd()).collect();
        let disk_fds: Vec<Vec<RawFd>> = disks.iter().map(raw).collect();
        let mut keep_fds: Vec<RawFd> = disk_fds.concat();
        keep_fds.extend([console.as_raw_fd(), channel.as_raw_fd(), monitor.vmm_fd()]);
        keep_fds.extend(network.as_ref().map(AsRawFd::as_raw_fd));
        let mut jail = Jail::prepare(JailRequest {
            binary: &self.binary,
            kernel: &spec.kernel,
            initramfs: &spec.initramfs,
            state: self.state.as_deref(),
            shares: spec
                .shares
                .iter()
                .map(|share| JailShare {
                    fd: share.dir.as_raw_fd(),
                    read_only: share.read_only,
                })
                .collect(),
            limits: Limits::for_vm(spec.memory_mib, spec.cpu_millis),
            keep_fds,
        })?;
        let files = VmmFiles {
            kernel: jail.kernel.clone(),
            initramfs: jail.initramfs.clone(),
            disks: disk_fds,
            console: console.as_raw_fd(),
            channel: channel.as_raw_fd(),
            network: network.as_ref().map(AsRawFd::as_raw_fd),
            shares: jail.share_paths.clone(),
        };
        let arguments = self.arguments(spec, &files)?;
        let mut command = Command::new(&jail.binary);
        command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        monitor.add_to(&mut command);
        if spec.accel == Accel::Tcg {
            without_huge_pages(&mut command);
        }
        let cgroup = jail.take_cgroup();
        jail.apply_to(&mut command);
        tracing::debug!(?command, "starting qemu");
        let mut vm = match VmProcess::spawn(command) {
            Ok(vm) => vm,
            Err(source) => {
                if let Some(cgroup) = cgroup {
                    cgroup.remove();
                }
                return Err(spawn_error(source));
            }
        };
        vm.own_cgroup(cgroup);
        // QEMU holds its own copies now.
        drop((disks, console, channel, network));
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
    use crate::{Channel, Disk, Share};
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
            cpu_millis: 2000,
            memory_mib: 512,
            network: Network::Stream {
                socket: "/s/net,0.sock".into(),
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

    /// What the jail would give QEMU: descriptors 10 and up, the jail's paths.
    fn files() -> VmmFiles {
        VmmFiles {
            kernel: "/kiln/kernel".into(),
            initramfs: "/kiln/initramfs".into(),
            disks: vec![vec![10], vec![11, 14]],
            console: 12,
            channel: 13,
            network: Some(15),
            shares: vec!["/kiln/share0".into(), "/kiln/share1".into()],
        }
    }

    fn joined(spec: &VmSpec) -> String {
        let mut files = files();
        if spec.network == Network::None {
            files.network = None;
        }
        Qemu::default()
            .arguments(spec, &files)
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
        let root_device =
            format!("virtio-blk-device,drive={ROOT_DISK_ID},serial={ROOT_DISK_ID},queue-size=32");
        let port = format!("virtserialport,chardev=kilnchan,name={CHANNEL_PORT}");
        let rw_share =
            "-fsdev local,id=share0,path=/kiln/share0,security_model=mapped-xattr -device";
        let ro_share = "local,id=share1,path=/kiln/share1,security_model=mapped-xattr,readonly=on";
        for part in [
            "-M microvm,x-option-roms=off,isa-serial=on,rtc=on -accel tcg -cpu max",
            "-m 512M -smp 2",
            "-no-reboot",
            "-append console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=",
            "tsc=reliable random.trust_cpu=on kiln.root=root kiln.upper=upper kiln.port=kiln.0 kiln.hostname=kiln",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-add-fd fd=12,set=1,opaque=/s/console.log -chardev file,id=console,path=/dev/fdset/1,append=on",
            "-kernel /kiln/kernel -initrd /kiln/initramfs",
            "-add-fd fd=10,set=2,opaque=/s/root,,1.erofs -drive id=root,file=/dev/fdset/2,format=raw,if=none,readonly=on",
            &root_device,
            "-add-fd fd=11,set=3,opaque=/s/upper.ext4 -add-fd fd=14,set=3,opaque=/s/upper.ext4 -drive id=upper,file=/dev/fdset/3,format=raw,if=none,readonly=off",
            "-device virtio-serial-device,max_ports=2 -chardev socket,id=kilnchan,fd=13",
            &port,
            "-netdev stream,id=net0,server=off,addr.type=fd,addr.str=15",
            "-device virtio-net-device,netdev=net0",
            rw_share,
            "virtio-9p-device,fsdev=share0,mount_tag=vol0",
            ro_share,
        ] {
            assert!(line.contains(part), "missing {part:?} in {line}");
        }
    }

    #[test]
    fn a_tcg_guest_seeds_its_random_numbers_from_qemus_rdrand_without_a_virtio_rng() {
        let line = joined(&spec());
        assert!(line.contains(" random.trust_cpu=on "), "{line}");
        assert!(!line.contains("virtio-rng"), "{line}");
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
        assert!(line.contains("-object rng-builtin,id=rng -device virtio-rng-device,rng=rng"));
        assert!(
            !line.contains("trust_cpu"),
            "a KVM guest's RDRAND is the host CPU's"
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut bad = spec();
        bad.cpus = 0;
        assert!(Qemu::default().arguments(&bad, &files()).is_err());
        let mut bad = spec();
        bad.disks[0].id = "root disk".into();
        assert!(Qemu::default().arguments(&bad, &files()).is_err());
        let mut bad = spec();
        bad.cmdline.push("a b".into());
        assert!(Qemu::default().arguments(&bad, &files()).is_err());
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
