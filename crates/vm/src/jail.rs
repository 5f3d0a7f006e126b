//! The VMM's jail: what a QEMU that a guest takes over can still do on the host.
//!
//! Every VMM kiln starts goes through [`Jail`]: in the forked child, before QEMU is
//! executed, it joins a cgroup of its own (as root), enters a mount namespace of its own
//! (through a user namespace when kiln is not root) whose root is a read-only tmpfs holding
//! only `/usr`, a few device nodes, copies of the guest kernel and initramfs and the
//! sandbox's shared directories, sets resource limits and a fixed umask, drops to
//! [`VMM_USER`] (as root; no capabilities, no supplementary groups), sets no_new_privs and
//! keeps only the descriptors QEMU is given. QEMU then installs its own seccomp filter
//! ([`SECCOMP_OPTION`]). Disks, the console log and sockets are handed over open, so
//! nothing else of the sandbox directory is in the jail. docs/security.md says what this
//! defends against and what it does not.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::VmError;

/// The host account a VMM runs as when kiln runs as root. It exists only on the host: the
/// sandbox identity lives in the guest's own account files and never meets it.
pub const VMM_USER: &str = "kiln-vmm";

/// QEMU's seccomp filter: its default deny list plus obsolete system calls, any change of
/// uid/gid, creating processes (fork, exec) and resource control (nice, affinity,
/// scheduler).
pub const SECCOMP_OPTION: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Memory a VMM may use besides guest RAM (its own heap, device buffers, the slirp stack,
/// TCG's translated code as it fills), in the cgroup limit.
pub const MEMORY_OVERHEAD_MIB: u64 = 512;

/// Address space a VMM may map for data besides guest RAM (`RLIMIT_DATA`): TCG reserves a
/// 1 GiB translation buffer up front, and thread arenas count once used.
pub const DATA_OVERHEAD_MIB: u64 = 2048;

/// Tasks (threads) per VMM: vCPUs, the I/O and 9p worker pools (up to 64), RCU, slirp.
pub const PIDS_MAX: u32 = 256;

/// Open files per VMM: disks, sockets, and the 9p server's open guest files.
pub const OPEN_FILES_MAX: u64 = 4096;

/// The CFS period a CPU quota is expressed in.
const CPU_PERIOD_US: u64 = 100_000;

/// The bounds of one VMM process, derived from the guest's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory cgroup limit: guest RAM plus [`MEMORY_OVERHEAD_MIB`].
    pub memory_bytes: u64,
    /// `RLIMIT_DATA`: guest RAM plus [`DATA_OVERHEAD_MIB`].
    pub data_bytes: u64,
    /// pids cgroup limit.
    pub pids: u32,
    /// `RLIMIT_NOFILE`.
    pub open_files: u64,
    /// CPU budget in thousandths of a CPU (1000 = one CPU), a CFS quota in the cgroup.
    pub cpu_millis: u32,
}

impl Limits {
    /// The limits of a VMM whose guest has `memory_mib` of RAM and a CPU budget of
    /// `cpu_millis` thousandths of a CPU.
    pub fn for_vm(memory_mib: u32, cpu_millis: u32) -> Limits {
        let mib = |n: u64| n << 20;
        Limits {
            memory_bytes: mib(u64::from(memory_mib) + MEMORY_OVERHEAD_MIB),
            data_bytes: mib(u64::from(memory_mib) + DATA_OVERHEAD_MIB),
            pids: PIDS_MAX,
            open_files: OPEN_FILES_MAX,
            cpu_millis,
        }
    }

    /// The CFS quota for one [`CPU_PERIOD_US`].
    fn cpu_quota_us(&self) -> u64 {
        (u64::from(self.cpu_millis) * CPU_PERIOD_US / 1000).max(1000)
    }
}

/// Whom the VMM runs as, and whether it gets a filesystem view of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// kiln is root: drop to [`VMM_USER`] in a mount namespace.
    DropTo { uid: u32, gid: u32 },
    /// kiln is an ordinary user: stay that user, in a user and mount namespace.
    UserNamespace { uid: u32, gid: u32 },
    /// An ordinary user on a host without unprivileged user namespaces: no view of its own.
    SameView,
}

/// A directory shared with the guest, as the jail mounts it.
pub(crate) struct JailShare {
    /// The directory as the caller opened and checked it.
    pub fd: RawFd,
    pub read_only: bool,
}

/// Everything the child does between fork and exec, prepared in the parent (the child may
/// not allocate).
pub(crate) struct Jail {
    mode: Mode,
    staging: CString,
    dirs: Vec<CString>,
    symlinks: Vec<(CString, CString)>,
    binds: Vec<Bind>,
    nodes: Vec<Node>,
    copies: Vec<Copy>,
    tmpfs_options: CString,
    /// Files of the jail mounted over others (the execute-only VMM over its binary).
    overlays: Vec<(CString, CString)>,
    /// A /proc of its own (QEMU's 9p server works through /proc/self/fd).
    proc_mount: Option<CString>,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    cgroup_procs: Vec<CString>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    keep_fds: Vec<RawFd>,
    /// The user namespace that maps kiln's uid/gid to the VMM's on the shared directories'
    /// mounts, so what the guest writes there stays kiln's.
    idmap: Option<OwnedFd>,
    cgroup: Option<Cgroup>,
    /// The kernel and initramfs, open for copying.
    _sources: Vec<File>,
    /// The VMM binary by absolute path (the jail has no PATH).
    pub binary: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The path QEMU serves each share from.
    pub share_paths: Vec<String>,
}

struct Bind {
    source: CString,
    target: CString,
    recursive: bool,
    attrs: u64,
    idmap: bool,
    /// The device and inode the source must be (a share that was checked by descriptor).
    expect: Option<(u64, u64)>,
    directory: bool,
}

struct Node {
    path: CString,
    mode: libc::mode_t,
    dev: libc::dev_t,
    owner: Option<(u32, u32)>,
}

struct Copy {
    from: RawFd,
    to: CString,
    mode: libc::mode_t,
}

/// Where the jail is built in the child's own mount namespace before it becomes the
/// root; every source is cloned before the tmpfs hides it.
const STAGING: &str = "/tmp";

/// Where the guest files and shares appear inside the jail.
const JAIL_DIR: &str = "/kiln";

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn c_path(path: impl AsRef<Path>) -> Result<CString, VmError> {
    CString::new(path.as_ref().as_os_str().as_bytes())
        .map_err(|_| VmError::InvalidSpec(format!("{} has a NUL byte", path.as_ref().display())))
}

fn io_error(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> VmError {
    let path = path.to_path_buf();
    let what = what.to_owned();
    move |source| VmError::File {
        path,
        source: std::io::Error::new(source.kind(), format!("{what}: {source}")),
    }
}

/// What a jailed VMM needs from its spec.
pub(crate) struct JailRequest<'a> {
    pub binary: &'a Path,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub shares: Vec<JailShare>,
    pub limits: Limits,
    /// Descriptors QEMU gets (besides stdio).
    pub keep_fds: Vec<RawFd>,
}

impl Jail {
    /// Prepares the jail for one VMM.
    pub fn prepare(request: JailRequest<'_>) -> Result<Jail, VmError> {
        // SAFETY: plain getters without arguments.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mode = if euid == 0 {
            let (uid, gid) = vmm_account()?;
            Mode::DropTo { uid, gid }
        } else if user_namespaces_allowed() {
            Mode::UserNamespace {
                uid: euid,
                gid: egid,
            }
        } else {
            Mode::SameView
        };
        let binary = resolve_binary(request.binary)?;
        let kernel_file =
            File::open(request.kernel).map_err(io_error("guest kernel", request.kernel))?;
        let initramfs_file = File::open(request.initramfs)
            .map_err(io_error("guest initramfs", request.initramfs))?;
        let mut jail = Jail {
            mode,
            staging: c_path(STAGING)?,
            dirs: Vec::new(),
            symlinks: Vec::new(),
            binds: Vec::new(),
            nodes: Vec::new(),
            copies: Vec::new(),
            tmpfs_options: CString::default(),
            proc_mount: None,
            overlays: Vec::new(),
            uid_map: Vec::new(),
            gid_map: Vec::new(),
            cgroup_procs: Vec::new(),
            rlimits: vec![
                (libc::RLIMIT_CORE, 0),
                (libc::RLIMIT_NOFILE, request.limits.open_files),
                (libc::RLIMIT_DATA, request.limits.data_bytes),
            ],
            keep_fds: request.keep_fds,
            idmap: None,
            cgroup: None,
            _sources: Vec::new(),
            binary: binary.clone(),
            kernel: request.kernel.to_path_buf(),
            initramfs: request.initramfs.to_path_buf(),
            share_paths: Vec::new(),
        };
        if euid == 0 {
            match Cgroup::create(&request.limits) {
                Ok(cgroup) => {
                    jail.cgroup_procs = cgroup.procs_files()?;
                    jail.cgroup = Some(cgroup);
                }
                Err(err) => tracing::warn!("the VMM runs without a cgroup: {err}"),
            }
        }
        if mode == Mode::SameView {
            for share in &request.shares {
                jail.share_paths.push(format!("/proc/self/fd/{}", share.fd));
                jail.keep_fds.push(share.fd);
            }
            return Ok(jail);
        }
        if let Mode::UserNamespace { uid, gid } = mode {
            jail.uid_map = format!("{uid} {uid} 1\n").into_bytes();
            jail.gid_map = format!("{gid} {gid} 1\n").into_bytes();
        }
        let stage = |path: &str| c_path(format!("{STAGING}{path}"));
        let read_only = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;

        // Programs and libraries: /usr read-only, with the merged-/usr links (or binds
        // where this host keeps those directories apart).
        jail.add_bind("/usr", stage("/usr")?, true, read_only, None, true)?;
        for dir in ["/bin", "/sbin", "/lib", "/lib64"] {
            match std::fs::read_link(dir) {
                Ok(target) => jail.symlinks.push((c_path(&target)?, stage(dir)?)),
                Err(_) if Path::new(dir).is_dir() => {
                    jail.add_bind(dir, stage(dir)?, true, read_only, None, true)?
                }
                Err(_) => {}
            }
        }
        // A VMM binary outside /usr (a test's stand-in) comes with its directory.
        if let Some(dir) = binary.parent().filter(|dir| !dir.starts_with("/usr")) {
            if let Some(parent) = dir.parent() {
                jail.add_dirs(parent)?;
            }
            jail.add_bind(
                dir,
                stage(&dir.to_string_lossy())?,
                false,
                read_only,
                None,
                true,
            )?;
        }

        jail.dirs.push(stage("/dev")?);
        let mut nodes = vec![
            ("null", 1, 3),
            ("zero", 1, 5),
            ("random", 1, 8),
            ("urandom", 1, 9),
        ];
        if Path::new(crate::accel::KVM_DEVICE).exists() {
            nodes.push(("kvm", 10, 232));
        }
        for (name, major, minor) in nodes {
            let target = stage(&format!("/dev/{name}"))?;
            match mode {
                // Made here, so that only the VMM's uid can open /dev/kvm.
                Mode::DropTo { uid, gid } => jail.nodes.push(Node {
                    path: target,
                    mode: if name == "kvm" { 0o600 } else { 0o666 },
                    dev: libc::makedev(major, minor),
                    owner: (name == "kvm").then_some((uid, gid)),
                }),
                // A user namespace cannot make device nodes; the host's are bound.
                _ => jail.add_bind(
                    format!("/dev/{name}"),
                    target,
                    false,
                    MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
                    None,
                    false,
                )?,
            }
        }

        jail.dirs.push(stage(JAIL_DIR)?);
        jail.kernel = PathBuf::from(format!("{JAIL_DIR}/kernel"));
        jail.initramfs = PathBuf::from(format!("{JAIL_DIR}/initramfs"));
        let size = |file: &File| file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut copy_size = size(&kernel_file) + size(&initramfs_file);
        jail.copies.push(Copy {
            from: kernel_file.as_raw_fd(),
            to: stage(&format!("{JAIL_DIR}/kernel"))?,
            mode: 0o444,
        });
        jail.copies.push(Copy {
            from: initramfs_file.as_raw_fd(),
            to: stage(&format!("{JAIL_DIR}/initramfs"))?,
            mode: 0o444,
        });
        jail._sources = vec![kernel_file, initramfs_file];
        // As root, QEMU executes an execute-only copy of itself (at its own path, so it
        // finds its data files): a binary its user cannot read makes the kernel mark the
        // process non-dumpable, so its /proc files are root's and the VMMs of other
        // sandboxes (the same uid) can neither look into it nor trace it. Only for
        // compiled programs: a script's interpreter must read it.
        if matches!(mode, Mode::DropTo { .. }) && is_elf(&binary) {
            let program = File::open(&binary).map_err(io_error("VMM binary", &binary))?;
            copy_size += size(&program);
            let copy = stage(&format!("{JAIL_DIR}/vmm"))?;
            jail.copies.push(Copy {
                from: program.as_raw_fd(),
                to: copy.clone(),
                mode: 0o111,
            });
            jail.overlays
                .push((copy, stage(&binary.to_string_lossy())?));
            jail._sources.push(program);
        }
        // Room for the copies and the directories, no more.
        jail.tmpfs_options = CString::new(format!(
            "mode=0755,size={},nr_inodes=256",
            copy_size + (1 << 20)
        ))
        .expect("no NUL in numbers");

        if !request.shares.is_empty() {
            if let Mode::DropTo { uid, gid } = mode {
                // SAFETY: plain getters without arguments.
                let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
                jail.idmap = Some(idmap_namespace((euid, uid), (egid, gid))?);
            }
        }
        if !request.shares.is_empty() {
            match mode {
                // Showing only processes of the VMM's uid, which cannot look into each
                // other (see `enter`), and no system files.
                Mode::DropTo { .. } => {
                    jail.dirs.push(stage("/proc")?);
                    jail.proc_mount = Some(stage("/proc")?);
                }
                // A user namespace may not mount a proc of the host's PID namespace, only
                // bind the host's: the user's own processes stay visible (docs/security.md).
                _ => jail.add_bind(
                    "/proc",
                    stage("/proc")?,
                    true,
                    MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                    None,
                    true,
                )?,
            }
        }
        for (index, share) in request.shares.iter().enumerate() {
            let source =
                std::fs::read_link(format!("/proc/self/fd/{}", share.fd)).map_err(|source| {
                    VmError::Spawn {
                        vmm: "qemu",
                        binary: binary.clone(),
                        source,
                    }
                })?;
            let stat = fd_stat(share.fd).map_err(io_error("shared directory", &source))?;
            let path = format!("{JAIL_DIR}/share{index}");
            let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
            if share.read_only {
                attrs |= MOUNT_ATTR_RDONLY;
            }
            let idmap = jail.idmap.is_some();
            jail.add_bind(&source, stage(&path)?, false, attrs, Some(stat), true)?;
            jail.binds.last_mut().expect("just added").idmap = idmap;
            jail.share_paths.push(path);
        }
        Ok(jail)
    }

    fn add_bind(
        &mut self,
        source: impl AsRef<Path>,
        target: CString,
        recursive: bool,
        attrs: u64,
        expect: Option<(u64, u64)>,
        directory: bool,
    ) -> Result<(), VmError> {
        self.binds.push(Bind {
            source: c_path(source)?,
            target,
            recursive,
            attrs,
            idmap: false,
            expect,
            directory,
        });
        Ok(())
    }

    /// `dir` and its ancestors, as staging directories to create (outermost first).
    fn add_dirs(&mut self, dir: &Path) -> Result<(), VmError> {
        let mut ancestors: Vec<&Path> = dir.ancestors().filter(|a| *a != Path::new("/")).collect();
        ancestors.reverse();
        for ancestor in ancestors {
            let staged = c_path(format!("{STAGING}{}", ancestor.display()))?;
            if !self.dirs.contains(&staged) {
                self.dirs.push(staged);
            }
        }
        Ok(())
    }

    /// Takes the cgroup, which the VM process removes once it has ended.
    pub fn take_cgroup(&mut self) -> Option<Cgroup> {
        self.cgroup.take()
    }

    /// Makes `command` enter this jail in its child before it executes. Register it after
    /// every other `pre_exec` step: it closes every descriptor QEMU is not given.
    pub fn apply_to(self, command: &mut Command) {
        command.env_clear();
        // SAFETY: the closure runs in the forked child before exec. It only makes system
        // calls (all async-signal-safe) on buffers prepared before the fork, and never
        // allocates.
        unsafe {
            command.pre_exec(move || self.enter());
        }
    }

    /// The child's side, between fork and exec.
    fn enter(&self) -> std::io::Result<()> {
        let check = |ret: libc::c_long| {
            if ret < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(ret)
            }
        };
        // SAFETY: system calls on NUL-terminated strings and descriptors
        // prepared before the fork and open in this process.
        unsafe {
            for procs in &self.cgroup_procs {
                write_file(procs, b"0")?;
            }
            match self.mode {
                Mode::SameView => {}
                Mode::DropTo { .. } => {
                    check(libc::unshare(libc::CLONE_NEWNS).into())?;
                }
                Mode::UserNamespace { .. } => {
                    check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS).into())?;
                    write_file(c"/proc/self/setgroups", b"deny")?;
                    write_file(c"/proc/self/uid_map", &self.uid_map)?;
                    write_file(c"/proc/self/gid_map", &self.gid_map)?;
                }
            }
            if self.mode != Mode::SameView {
                self.build_root(&check)?;
            }
            for &(resource, value) in &self.rlimits {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                check(libc::setrlimit(resource, &limit).into())?;
            }
            libc::umask(0o077);
            if let Mode::DropTo { uid, gid } = self.mode {
                check(libc::setgroups(0, std::ptr::null()).into())?;
                check(libc::setresgid(gid, gid, gid).into())?;
                check(libc::setresuid(uid, uid, uid).into())?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())?;
            check(libc::syscall(
                libc::SYS_close_range,
                3,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            ))?;
            for &fd in &self.keep_fds {
                check(libc::fcntl(fd, libc::F_SETFD, 0).into())?;
            }
        }
        Ok(())
    }

    /// Builds the jail's root and makes it this process's root.
    ///
    /// # Safety
    /// Only between fork and exec, in a process with its own mount namespace.
    unsafe fn build_root(
        &self,
        check: &dyn Fn(libc::c_long) -> std::io::Result<libc::c_long>,
    ) -> std::io::Result<()> {
        // SAFETY: system calls on strings and descriptors prepared before the fork (see `enter`).
        unsafe {
            // Nothing mounted here propagates back to the host.
            check(
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
                .into(),
            )?;
            // Clone every source first: the tmpfs below may hide some of them.
            let mut trees: [RawFd; 32] = [-1; 32];
            if self.binds.len() > trees.len() {
                return Err(std::io::Error::from_raw_os_error(libc::E2BIG));
            }
            for (bind, tree) in self.binds.iter().zip(trees.iter_mut()) {
                let flags = OPEN_TREE_CLONE
                    | libc::O_CLOEXEC as libc::c_uint
                    | if bind.recursive { AT_RECURSIVE } else { 0 };
                *tree = check(libc::syscall(
                    libc::SYS_open_tree,
                    libc::AT_FDCWD,
                    bind.source.as_ptr(),
                    flags,
                ))? as RawFd;
                if let Some((dev, ino)) = bind.expect {
                    // The directory the caller checked, not whatever its path names now.
                    let stat = fd_stat(*tree)?;
                    if stat != (dev, ino) {
                        return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
                    }
                }
                let attr = MountAttr {
                    attr_set: bind.attrs | if bind.idmap { MOUNT_ATTR_IDMAP } else { 0 },
                    attr_clr: 0,
                    propagation: 0,
                    userns_fd: match (&self.idmap, bind.idmap) {
                        (Some(ns), true) => ns.as_raw_fd() as u64,
                        _ => 0,
                    },
                };
                check(libc::syscall(
                    libc::SYS_mount_setattr,
                    *tree,
                    c"".as_ptr(),
                    libc::AT_EMPTY_PATH as libc::c_uint
                        | if bind.recursive { AT_RECURSIVE } else { 0 },
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                ))?;
            }
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.staging.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID,
                    self.tmpfs_options.as_ptr().cast(),
                )
                .into(),
            )?;
            for dir in &self.dirs {
                check(libc::mkdir(dir.as_ptr(), 0o755).into())?;
            }
            if let Some(proc_dir) = &self.proc_mount {
                check(
                    libc::mount(
                        c"proc".as_ptr(),
                        proc_dir.as_ptr(),
                        c"proc".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        c"hidepid=invisible,subset=pid".as_ptr().cast(),
                    )
                    .into(),
                )?;
            }
            for (target, link) in &self.symlinks {
                check(libc::symlink(target.as_ptr(), link.as_ptr()).into())?;
            }
            for node in &self.nodes {
                check(libc::mknod(node.path.as_ptr(), libc::S_IFCHR | node.mode, node.dev).into())?;
                check(libc::chmod(node.path.as_ptr(), node.mode).into())?;
                if let Some((uid, gid)) = node.owner {
                    check(libc::chown(node.path.as_ptr(), uid, gid).into())?;
                }
            }
            for copy in &self.copies {
                copy_file(copy.from, &copy.to, copy.mode)?;
            }
            for (bind, &tree) in self.binds.iter().zip(trees.iter()) {
                if bind.directory {
                    check(libc::mkdir(bind.target.as_ptr(), 0o755).into())?;
                } else {
                    let fd = check(
                        libc::open(
                            bind.target.as_ptr(),
                            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        )
                        .into(),
                    )?;
                    libc::close(fd as RawFd);
                }
                check(libc::syscall(
                    libc::SYS_move_mount,
                    tree,
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    bind.target.as_ptr(),
                    MOVE_MOUNT_F_EMPTY_PATH,
                ))?;
                libc::close(tree);
            }
            for (file, over) in &self.overlays {
                check(
                    libc::mount(
                        file.as_ptr(),
                        over.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                    .into(),
                )?;
            }
            check(libc::chdir(self.staging.as_ptr()).into())?;
            check(libc::syscall(
                libc::SYS_pivot_root,
                c".".as_ptr(),
                c".".as_ptr(),
            ))?;
            // The old root sits under the new one; let go of it entirely.
            check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH).into())?;
            check(libc::chdir(c"/".as_ptr()).into())?;
            let read_only = MountAttr {
                attr_set: MOUNT_ATTR_RDONLY,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            check(libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                c"/".as_ptr(),
                0,
                &read_only as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ))?;
        }
        Ok(())
    }
}

fn fd_stat(fd: RawFd) -> std::io::Result<(u64, u64)> {
    // SAFETY: stat is a plain C struct, for which all zero bytes are a valid value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the struct we own; a bad descriptor is an error.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((stat.st_dev, stat.st_ino))
}

/// Writes `data` to `path` in one write (the child's way: no allocation).
///
/// # Safety
/// Async-signal-safe; callable between fork and exec.
unsafe fn write_file(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path and a buffer we own.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, data.as_ptr().cast(), data.len());
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if written != data.len() as isize {
            return Err(error);
        }
    }
    Ok(())
}

/// Copies `from` (from its start) to a new read-only file `to`.
///
/// # Safety
/// Async-signal-safe; callable between fork and exec.
unsafe fn copy_file(from: RawFd, to: &std::ffi::CStr, mode: libc::mode_t) -> std::io::Result<()> {
    // SAFETY: descriptors we own and a stack buffer.
    unsafe {
        let out = libc::open(
            to.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
            mode,
        );
        if out < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buffer = [0u8; 16384];
        let mut offset: libc::off_t = 0;
        loop {
            let read = libc::pread(from, buffer.as_mut_ptr().cast(), buffer.len(), offset);
            if read < 0 {
                let error = std::io::Error::last_os_error();
                libc::close(out);
                return Err(error);
            }
            if read == 0 {
                break;
            }
            let mut done = 0;
            while done < read {
                let wrote = libc::write(
                    out,
                    buffer.as_ptr().add(done as usize).cast(),
                    (read - done) as usize,
                );
                if wrote <= 0 {
                    let error = std::io::Error::last_os_error();
                    libc::close(out);
                    return Err(error);
                }
                done += wrote;
            }
            offset += read as libc::off_t;
        }
        libc::close(out);
    }
    Ok(())
}

/// Whether `path` is an ELF program (not a script).
fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// `binary` as an absolute path, looked up on PATH when it names no directory.
fn resolve_binary(binary: &Path) -> Result<PathBuf, VmError> {
    let not_found = || VmError::Spawn {
        vmm: "qemu",
        binary: binary.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found on PATH"),
    };
    let found = if binary.components().count() > 1 {
        std::path::absolute(binary).map_err(|_| not_found())?
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
            .ok_or_else(not_found)?
    };
    found.canonicalize().map_err(|source| VmError::Spawn {
        vmm: "qemu",
        binary: binary.to_path_buf(),
        source,
    })
}

/// Whether this host lets an ordinary user create a user namespace.
pub fn user_namespaces_allowed() -> bool {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
    };
    let debian_switch = read("/proc/sys/kernel/unprivileged_userns_clone");
    let max = read("/proc/sys/user/max_user_namespaces");
    debian_switch.as_deref() != Some("0") && max.as_deref() != Some("0")
}

/// The uid and gid of [`VMM_USER`], creating the account (a system user without a home or
/// a login shell) on first use.
pub fn vmm_account() -> Result<(u32, u32), VmError> {
    if let Some(ids) = lookup_account(VMM_USER) {
        return Ok(ids);
    }
    let output = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "kiln sandbox VMM",
            VMM_USER,
        ])
        .output()
        .map_err(|source| VmError::Tool {
            tool: "useradd",
            source,
        })?;
    // Another kiln may have created it meanwhile (useradd then exits 9).
    lookup_account(VMM_USER).ok_or_else(|| VmError::ToolFailed {
        tool: "useradd",
        status: output.status.to_string(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// The uid and gid of [`VMM_USER`] if the account exists.
pub fn existing_vmm_account() -> Option<(u32, u32)> {
    lookup_account(VMM_USER)
}

/// The uid and gid of host account `name`, from the host's passwd database.
fn lookup_account(name: &str) -> Option<(u32, u32)> {
    let name = CString::new(name).ok()?;
    // SAFETY: passwd is a plain C struct, for which all zero bytes are a valid value.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16384];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to memory we own, with its true length.
    let ret = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    (ret == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
}

/// A user namespace mapping `(from, to)` uid and gid one to one: an idmapped mount through
/// it shows `from`'s files as `to`'s, and writes `to` makes land as `from`'s.
fn idmap_namespace(uids: (u32, u32), gids: (u32, u32)) -> Result<OwnedFd, VmError> {
    let tool_error = |source| VmError::Tool {
        tool: "sleep (user namespace holder)",
        source,
    };
    let mut holder = Command::new("sleep");
    holder.arg("60");
    // SAFETY: unshare is a plain system call, async-signal-safe.
    unsafe {
        holder.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = holder.spawn().map_err(tool_error)?;
    let proc_dir = PathBuf::from(format!("/proc/{}", child.id()));
    let result = (|| {
        std::fs::write(
            proc_dir.join("uid_map"),
            format!("{} {} 1\n", uids.0, uids.1),
        )?;
        std::fs::write(
            proc_dir.join("gid_map"),
            format!("{} {} 1\n", gids.0, gids.1),
        )?;
        File::open(proc_dir.join("ns/user")).map(OwnedFd::from)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result.map_err(tool_error)
}

/// The per-VMM cgroup (v2, or one directory per v1 controller), removed on drop.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

/// Where the cgroup filesystem is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup version the host offers to kiln: "v2", "v1" or none.
pub fn cgroup_version() -> Option<&'static str> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        Some("v2")
    } else if root.join("memory").is_dir() && root.join("pids").is_dir() {
        Some("v1")
    } else {
        None
    }
}

impl Cgroup {
    fn create(limits: &Limits) -> Result<Cgroup, VmError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vmm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let root = Path::new(CGROUP_ROOT);
        let write = |path: PathBuf, value: String| {
            std::fs::write(&path, value).map_err(|source| VmError::File { path, source })
        };
        let mkdir = |path: &Path| {
            std::fs::create_dir_all(path).map_err(|source| VmError::File {
                path: path.to_path_buf(),
                source,
            })
        };
        let quota = format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us());
        let mut cgroup = Cgroup { dirs: Vec::new() };
        match cgroup_version() {
            Some("v2") => {
                let base = root.join("kiln");
                mkdir(&base)?;
                remove_stale_groups(&base);
                // Controllers must be enabled on every level above the VMM's group.
                let enable = "+memory +pids +cpu".to_owned();
                write(root.join("cgroup.subtree_control"), enable.clone())?;
                write(base.join("cgroup.subtree_control"), enable)?;
                let dir = base.join(name);
                mkdir(&dir)?;
                cgroup.dirs.push(dir.clone());
                write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                write(dir.join("memory.swap.max"), "0".into())?;
                write(dir.join("pids.max"), limits.pids.to_string())?;
                write(dir.join("cpu.max"), quota)?;
            }
            Some(_) => {
                for controller in ["memory", "pids", "cpu"] {
                    remove_stale_groups(&root.join(controller).join("kiln"));
                    let dir = root.join(controller).join("kiln").join(&name);
                    mkdir(&dir)?;
                    cgroup.dirs.push(dir);
                }
                let dir = |i: usize| cgroup.dirs[i].clone();
                write(
                    dir(0).join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                write(dir(1).join("pids.max"), limits.pids.to_string())?;
                write(dir(2).join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                write(
                    dir(2).join("cpu.cfs_quota_us"),
                    limits.cpu_quota_us().to_string(),
                )?;
            }
            None => {
                return Err(VmError::InvalidSpec(
                    "this host has no cgroup filesystem at /sys/fs/cgroup".into(),
                ))
            }
        }
        Ok(cgroup)
    }

    fn procs_files(&self) -> Result<Vec<CString>, VmError> {
        self.dirs
            .iter()
            .map(|dir| c_path(dir.join("cgroup.procs")))
            .collect()
    }

    /// Removes the groups once their process has ended (the kernel may take a moment to
    /// let go of an exited task).
    pub fn remove(&self) {
        for dir in &self.dirs {
            for attempt in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => break,
                    Err(err) if attempt == 49 => {
                        tracing::warn!("removing cgroup {}: {err}", dir.display())
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
    }
}

/// Removes the empty groups under `base` whose kiln has ended without removing them (it
/// was killed): each is named after the kiln that made it, and a group with a task left
/// in it cannot be removed.
fn remove_stale_groups(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let maker = name
            .to_str()
            .and_then(|name| name.strip_prefix("vmm-")?.split('-').next());
        let ended =
            |pid: &&str| pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists();
        if let Some(pid) = maker.filter(ended) {
            if std::fs::remove_dir(entry.path()).is_ok() {
                tracing::debug!("removed the cgroup of ended kiln {pid}");
            }
        }
    }
}

/// Which protections a running VMM process has, read from /proc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    pub pid: u32,
    /// Effective uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Effective capabilities, as the hex mask /proc shows.
    pub capabilities: String,
    pub no_new_privs: bool,
    /// A seccomp filter is installed.
    pub seccomp: bool,
    /// Its mount namespace differs from the observer's.
    pub own_mount_namespace: bool,
    /// Its cgroup paths (one line per hierarchy), when it is in one of kiln's.
    pub cgroups: Vec<String>,
    /// Its soft limits: data, open files, core size.
    pub data_limit: Option<u64>,
    pub open_files_limit: Option<u64>,
    pub core_limit: Option<u64>,
}

/// Reads what confines process `pid`.
pub fn observe(pid: u32) -> std::io::Result<Confinement> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = std::fs::read_to_string(proc_dir.join("status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
            .unwrap_or_default()
    };
    // Uid and Gid list real, effective, saved and filesystem ids.
    let effective = |value: String| value.split_whitespace().nth(1).and_then(|v| v.parse().ok());
    let limits = std::fs::read_to_string(proc_dir.join("limits"))?;
    let limit = |name: &str| {
        limits
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line[name.len()..].split_whitespace().next())
            .and_then(|value| value.parse().ok())
    };
    let namespace = |dir: &Path| std::fs::read_link(dir.join("ns/mnt")).ok();
    let cgroups = std::fs::read_to_string(proc_dir.join("cgroup"))?
        .lines()
        .filter(|line| line.contains("/kiln/"))
        .map(str::to_owned)
        .collect();
    Ok(Confinement {
        pid,
        uid: effective(field("Uid")).unwrap_or(u32::MAX),
        gid: effective(field("Gid")).unwrap_or(u32::MAX),
        groups: field("Groups")
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
        capabilities: field("CapEff"),
        no_new_privs: field("NoNewPrivs") == "1",
        seccomp: field("Seccomp") == "2",
        own_mount_namespace: namespace(&proc_dir) != namespace(Path::new("/proc/self")),
        cgroups,
        data_limit: limit("Max data size"),
        open_files_limit: limit("Max open files"),
        core_limit: limit("Max core file size"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_guest() {
        let limits = Limits::for_vm(512, 1500);
        assert_eq!(limits.memory_bytes, (512 + MEMORY_OVERHEAD_MIB) << 20);
        assert_eq!(limits.data_bytes, (512 + DATA_OVERHEAD_MIB) << 20);
        assert_eq!(limits.cpu_quota_us(), 150_000);
        assert_eq!(Limits::for_vm(256, 500).cpu_quota_us(), 50_000);
    }

    #[test]
    fn a_binary_is_found_on_path() {
        assert!(resolve_binary(Path::new("sh")).unwrap().is_absolute());
        assert!(resolve_binary(Path::new("no-such-vmm-binary")).is_err());
    }

    #[test]
    fn groups_of_ended_kilns_are_removed_and_others_kept() {
        let base = tempfile::tempdir().unwrap();
        let mut ended = Command::new("true").spawn().unwrap();
        ended.wait().unwrap();
        let stale = base.path().join(format!("vmm-{}-0", ended.id()));
        let live = base.path().join(format!("vmm-{}-0", std::process::id()));
        let other = base.path().join("not-a-vmm");
        for dir in [&stale, &live, &other] {
            std::fs::create_dir(dir).unwrap();
        }
        remove_stale_groups(base.path());
        assert!(!stale.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn this_process_is_observed() {
        let me = observe(std::process::id()).unwrap();
        assert!(!me.own_mount_namespace);
        assert!(me.open_files_limit.is_some());
    }
}
