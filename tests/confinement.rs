//! The VMM's jail (issue 16) on a running sandbox, read from /proc: as root QEMU runs as
//! kiln-vmm with no capabilities, groups or way back to privileges, under seccomp, in a
//! mount namespace of its own whose root holds only its files, with only the descriptors
//! it was given and the limits derived from `--memory`/`--cpus`; as an ordinary user it
//! keeps that user's uid with the same jail. The guest files in the jail are the host's,
//! mounted read-only; a root VMM runs the execute-only copy of QEMU made once under the
//! root. Its environment is empty and its umask 077.
//! `kiln inspect` and `kiln doctor` report it, and QEMU asked to spawn a helper is killed
//! by the filter.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{chown, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{demo_image, describe, guest_files, require_root, text, KilnRoot};
use kiln_vm::jail::{self, Limits};

/// Guest memory and CPUs of the sandboxes here, so the limits can be checked against them.
const MEMORY_MIB: u32 = 320;
/// A fractional share: two vCPUs, a CPU quota of one and a half CPUs.
const CPUS: &str = "1.5";
const MILLICPUS: u32 = 1500;

/// The pid of the one QEMU among the processes naming `root` (by program name: the
/// monitor's command line names QEMU too), waiting for it to appear.
fn qemu_pid(root: &KilnRoot) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let qemu: Vec<u32> = root
            .processes()
            .into_iter()
            .filter(|(_, cmd)| {
                cmd.split(' ')
                    .next()
                    .is_some_and(|program| program.contains("qemu-system"))
            })
            .map(|(pid, _)| pid)
            .collect();
        if qemu.len() == 1 {
            return qemu[0];
        }
        assert!(Instant::now() < deadline, "no QEMU: {:?}", root.processes());
        thread::sleep(Duration::from_millis(100));
    }
}

/// A field of /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_owned()
}

/// The effective id of a `Uid`/`Gid` line.
fn effective(line: &str) -> u32 {
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Names in a directory.
fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A soft limit of /proc/PID/limits.
fn limit(pid: u32, name: &str) -> u64 {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// What a jailed QEMU shows whoever runs kiln: seccomp, no_new_privs, no capabilities, no
/// supplementary groups, its own mount namespace whose root holds only the jail, and only
/// the descriptors kiln gave it. As root its `/kiln` also holds the execute-only copy of
/// QEMU it runs.
fn assert_jailed(pid: u32, root: &KilnRoot, with_volume: bool, as_root: bool) {
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "Groups"), "", "supplementary groups");
    // A clean environment and a fixed umask.
    assert_eq!(status_field(pid, "Umask"), "0077");
    let environment = fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environment.is_empty(),
        "{}",
        String::from_utf8_lossy(&environment)
    );

    let namespace = |p: &str| fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(namespace(&pid.to_string()), namespace("self"));

    // Its root: /usr and the merged-/usr links, device nodes, the guest files and shares.
    let jail_root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut expected: BTreeSet<String> = ["dev", "kiln", "usr"].map(String::from).into();
    for dir in ["bin", "sbin", "lib", "lib64"] {
        if Path::new("/").join(dir).exists() {
            expected.insert(dir.into());
        }
    }
    if with_volume {
        expected.insert("proc".into()); // QEMU's 9p server works through /proc/self/fd.
    }
    assert_eq!(names(&jail_root), expected);
    let mut kiln_dir: BTreeSet<String> = ["kernel", "initramfs"].map(String::from).into();
    if with_volume {
        kiln_dir.insert("share0".into());
    }
    if as_root {
        kiln_dir.insert("vmm".into());
    }
    assert_eq!(names(&jail_root.join("kiln")), kiln_dir);
    let devices = names(&jail_root.join("dev"));
    assert!(
        devices.is_subset(
            &["null", "zero", "random", "urandom", "kvm"]
                .map(String::from)
                .into()
        ),
        "{devices:?}"
    );
    for hidden in ["/home", "/root", "/etc", "/tmp", "/var"] {
        assert!(
            !jail_root.join(&hidden[1..]).exists(),
            "{hidden} is visible to QEMU"
        );
    }
    // Nothing of the kiln root: not the sandbox directory, not the store.
    assert!(!jail_root
        .join(root.path().strip_prefix("/").unwrap())
        .exists());
    // Read-only, even for root: the jail's root and /usr.
    for writable in [jail_root.join("x"), jail_root.join("usr/x")] {
        assert!(
            fs::write(&writable, "").is_err(),
            "{} is writable",
            writable.display()
        );
    }

    // Its descriptors: stdio, the disks and console by their files under the root, the
    // shared directory in the jail, sockets (QMP, channel, network), its own eventfds.
    let kiln_root = root.path();
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = fs::read_link(fd.path()).unwrap();
        let shown = target.to_string_lossy();
        let expected = shown == "/dev/null"
            || shown == "/dev/urandom"
            || shown == "/kiln/share0"
            || shown.starts_with("socket:")
            || shown.starts_with("anon_inode:")
            || shown.starts_with("pipe:")
            || target.starts_with(kiln_root.join("sandboxes"))
            || target.starts_with(kiln_root.join("rootfs"));
        assert!(expected, "QEMU holds {} open", target.display());
    }
}

/// The guest files in the jail are the host files kiln opened, mounted read-only (not
/// copies made for each start).
fn assert_guest_files_mounted(pid: u32, kernel: &Path, initramfs: &Path) {
    for (name, host) in [("kernel", kernel), ("initramfs", initramfs)] {
        let jailed = PathBuf::from(format!("/proc/{pid}/root/kiln/{name}"));
        let (shown, file) = (fs::metadata(&jailed).unwrap(), fs::metadata(host).unwrap());
        assert_eq!(
            (shown.dev(), shown.ino()),
            (file.dev(), file.ino()),
            "the jail's {name} is not {}",
            host.display()
        );
        assert!(
            fs::OpenOptions::new().write(true).open(&jailed).is_err(),
            "the jail's {name} is writable"
        );
    }
}

/// The execute-only copy of QEMU that a root VMM `pid` runs: root's, mode 0111, the one
/// file in the root-only `<root>/vmm` (made once, mounted into each jail). Its inode.
fn assert_vmm_copy(pid: u32, root: &KilnRoot) -> u64 {
    let copy = fs::metadata(format!("/proc/{pid}/root/kiln/vmm")).unwrap();
    assert_eq!(
        copy.mode() & 0o7777,
        0o111,
        "the VMM's copy is execute-only"
    );
    assert_eq!((copy.uid(), copy.gid()), (0, 0), "the VMM's copy is root's");
    let cache = root.path().join("vmm");
    let cache_mode = fs::metadata(&cache).unwrap().mode() & 0o7777;
    assert_eq!(cache_mode, 0o700, "{}", cache.display());
    let entries: Vec<_> = fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let cached = entries[0].metadata().unwrap();
    assert_eq!((cached.dev(), cached.ino()), (copy.dev(), copy.ino()));
    copy.ino()
}

/// The limits derived from `--memory`/`--cpus`, in /proc/PID/limits and its cgroups.
fn assert_limits(pid: u32, with_cgroup: bool) -> Vec<PathBuf> {
    let limits = Limits::for_vm(MEMORY_MIB, MILLICPUS);
    assert_eq!(limit(pid, "Max data size"), limits.data_bytes);
    assert_eq!(limit(pid, "Max open files"), limits.open_files);
    assert_eq!(limit(pid, "Max core file size"), 0);
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut dirs = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if !path.starts_with("/kiln/") {
            continue;
        }
        let read = |dir: &Path, file: &str| fs::read_to_string(dir.join(file)).unwrap();
        if controllers.is_empty() {
            let dir = PathBuf::from(format!("/sys/fs/cgroup{path}"));
            assert_eq!(
                read(&dir, "memory.max").trim(),
                limits.memory_bytes.to_string()
            );
            assert_eq!(read(&dir, "pids.max").trim(), limits.pids.to_string());
            assert_eq!(
                read(&dir, "cpu.max").trim(),
                format!("{} 100000", MILLICPUS * 100)
            );
            dirs.push(dir);
            continue;
        }
        let dir = PathBuf::from(format!("/sys/fs/cgroup/{controllers}{path}"));
        match controllers {
            "memory" => assert_eq!(
                read(&dir, "memory.limit_in_bytes").trim(),
                limits.memory_bytes.to_string()
            ),
            "pids" => assert_eq!(read(&dir, "pids.max").trim(), limits.pids.to_string()),
            "cpu" => assert_eq!(
                read(&dir, "cpu.cfs_quota_us").trim(),
                (MILLICPUS * 100).to_string()
            ),
            _ => {}
        }
        dirs.push(dir);
    }
    if with_cgroup {
        let wanted = if jail::cgroup_version() == Some("v2") {
            1
        } else {
            3
        };
        assert_eq!(dirs.len(), wanted, "QEMU's kiln cgroups: {cgroups}");
    } else {
        assert!(dirs.is_empty(), "{cgroups}");
    }
    dirs
}

fn run_detached(root: &KilnRoot, command: &mut Command, volume: Option<&Path>) -> String {
    let memory = MEMORY_MIB.to_string();
    let mut args = vec!["run", "-d", "--memory", &memory, "--cpus", CPUS];
    let mount;
    if let Some(volume) = volume {
        mount = format!("{}:/data", volume.display());
        args.extend(["-v", &mount]);
    }
    let image = demo_image_for(root);
    args.extend([image.as_str(), "sleep", "600"]);
    let output = kiln_e2e::run_with_timeout(command.args(&args), kiln_e2e::KILN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(output.status.success(), "{}", describe(&output));
    text(&output.stdout).trim().to_owned()
}

/// The demo image, as a copy inside the test's directory when the test made one.
fn demo_image_for(root: &KilnRoot) -> String {
    let copy = root.temp_dir().join("demo-oci");
    if copy.exists() {
        let reference = demo_image();
        let tag = reference.rsplit(':').next().unwrap().to_owned();
        format!("oci:{}:{tag}", copy.display())
    } else {
        demo_image()
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn as_root_qemu_runs_as_kiln_vmm_in_its_jail_with_the_flags_limits() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let volume = root.temp_dir().join("volume");
    fs::create_dir(&volume).unwrap();
    let id = run_detached(&root, &mut root.kiln(), Some(&volume));
    let pid = qemu_pid(&root);

    let (vmm_uid, vmm_gid) = jail::existing_vmm_account().expect("the run created kiln-vmm");
    assert_ne!(vmm_uid, 0);
    assert_eq!(effective(&status_field(pid, "Uid")), vmm_uid);
    assert_eq!(effective(&status_field(pid, "Gid")), vmm_gid);
    assert_jailed(pid, &root, true, true);
    // Under TCG QEMU runs without transparent huge pages (kiln_vm::qemu), under KVM with.
    let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    let arguments: Vec<&str> = cmdline.split('\0').collect();
    let tcg = arguments.windows(2).any(|pair| pair == ["-accel", "tcg"]);
    assert_eq!(
        status_field(pid, "THP_enabled"),
        if tcg { "0" } else { "1" },
        "transparent huge pages of a VMM with {arguments:?}"
    );
    let guest = guest_files();
    assert_guest_files_mounted(pid, &guest.kernel, &guest.initramfs);
    let copy = assert_vmm_copy(pid, &root);
    // Non-dumpable (it runs an execute-only copy of QEMU): its /proc files are root's, so
    // the other VMMs of the same uid can neither look into it nor trace it.
    let proc_status = fs::metadata(format!("/proc/{pid}/status")).unwrap();
    assert_eq!((proc_status.uid(), proc_status.gid()), (0, 0));
    let cgroups = assert_limits(pid, true);

    // The volume: QEMU serves it from the jail, and what the guest writes is root's.
    let served = fs::metadata(format!("/proc/{pid}/root/kiln/share0")).unwrap();
    let checked = fs::metadata(&volume).unwrap();
    assert_eq!((served.dev(), served.ino()), (checked.dev(), checked.ino()));

    // `kiln inspect` reads the same from the running VMM.
    let info: serde_json::Value = serde_json::from_str(&root.ok(&["inspect", &id])).unwrap();
    let vmm = &info["vmm"];
    assert_eq!(vmm["pid"], pid);
    assert_eq!(vmm["uid"], vmm_uid);
    assert_eq!(vmm["groups"], serde_json::json!([]));
    assert_eq!(vmm["capabilities"], "0000000000000000");
    assert_eq!(vmm["no_new_privs"], true);
    assert_eq!(vmm["seccomp"], true);
    assert_eq!(vmm["own_mount_namespace"], true);
    assert_eq!(vmm["core_limit"], 0);
    assert!(!vmm["cgroups"].as_array().unwrap().is_empty(), "{vmm}");

    root.ok(&["stop", &id]);
    for dir in cgroups {
        assert!(!dir.exists(), "{} outlived its VMM", dir.display());
    }
    let info: serde_json::Value = serde_json::from_str(&root.ok(&["inspect", &id])).unwrap();
    assert!(
        info["vmm"].is_null(),
        "a stopped sandbox has no VMM: {info}"
    );

    // The next start mounts the same copy.
    root.ok(&["start", &id]);
    assert_eq!(assert_vmm_copy(qemu_pid(&root), &root), copy);
    root.ok(&["stop", &id]);
}

#[test]
fn doctor_reports_which_protections_the_host_allows() {
    let root = KilnRoot::without_guest();
    let output = root.run(&["--json", "doctor"]);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe(&output)));
    let checks = report["checks"].as_array().unwrap();
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {report}"))
    };
    let seccomp = check("seccomp");
    assert_eq!(seccomp["ok"], true, "{seccomp}");
    assert!(seccomp["detail"]
        .as_str()
        .unwrap()
        .contains(jail::SECCOMP_OPTION));
    assert_eq!(check("cgroups")["ok"], jail::cgroup_version().is_some());
    assert_eq!(
        check("user namespaces")["ok"],
        // SAFETY: a plain getter.
        unsafe { libc::geteuid() } == 0 || jail::user_namespaces_allowed()
    );
    assert!(check("vmm user")["detail"]
        .as_str()
        .unwrap()
        .contains(jail::VMM_USER));
}

#[test]
fn the_seccomp_filter_kills_a_qemu_that_spawns_a_helper() {
    // `-netdev bridge` forks and executes qemu-bridge-helper while QEMU starts. Without
    // the filter the helper runs (and fails for want of a bridge, saying so); with kiln's
    // filter the fork is refused and QEMU dies of SIGSYS before any helper exists.
    let qemu = |sandbox: bool| {
        let mut command = Command::new(kiln_vm::qemu::DEFAULT_BINARY);
        command.args(["-M", "none", "-nodefaults", "-display", "none"]);
        if sandbox {
            command.args(["-sandbox", jail::SECCOMP_OPTION]);
        }
        command.args(["-netdev", "bridge,id=n0,br=kiln-no-bridge0"]);
        kiln_e2e::run_with_timeout(&mut command, Duration::from_secs(60)).unwrap()
    };
    let free = qemu(false);
    assert!(
        text(&free.stderr).contains("bridge helper failed"),
        "{}",
        describe(&free)
    );
    let filtered = qemu(true);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        filtered.status.signal(),
        Some(libc::SIGSYS),
        "{}",
        describe(&filtered)
    );
    assert!(!text(&filtered.stderr).contains("bridge helper"));
}

/// A host account made for one test, removed (with its processes gone) at the end.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> TestUser {
        let name = format!("kiln-t{}", std::process::id());
        let status = Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--shell"])
            .args(["/usr/sbin/nologin", &name])
            .status()
            .unwrap();
        assert!(status.success(), "useradd {name}");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            text(&out.stdout).trim().parse().unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        TestUser { name, uid, gid }
    }

    /// `command` run as this user, without supplementary groups.
    fn wrap(&self, command: &Command) -> Command {
        let mut wrapped = Command::new("setpriv");
        wrapped.args([
            &format!("--reuid={}", self.uid),
            &format!("--regid={}", self.gid),
            "--clear-groups",
            "--",
        ]);
        wrapped.arg(command.get_program());
        wrapped.args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        wrapped
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// Copies `from` (a file or a directory tree) to `to`, owned by `uid:gid`.
fn copy_for(from: &Path, to: &Path, user: &TestUser) {
    let status = Command::new("cp")
        .args(["-a", "--no-preserve=ownership"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
    let status = Command::new("chown")
        .args(["-R", &format!("{}:{}", user.uid, user.gid)])
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn as_an_ordinary_user_qemu_keeps_the_users_uid_in_the_same_jail() {
    require_root();
    let user = TestUser::create();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    // The user's own copies of everything kiln reads (root's cache is root-only).
    let dir = root.temp_dir();
    let guest = guest_files();
    copy_for(&guest.kernel, &dir.join("kernel"), &user);
    copy_for(&guest.initramfs, &dir.join("initramfs"), &user);
    let layout = demo_image();
    let layout = layout
        .strip_prefix("oci:")
        .and_then(|r| r.rsplit_once(':'))
        .unwrap()
        .0;
    copy_for(Path::new(layout), &dir.join("demo-oci"), &user);
    for owned in [dir.to_path_buf(), root.path(), root.home()] {
        chown(&owned, Some(user.uid), Some(user.gid)).unwrap();
    }
    let volume = dir.join("volume");
    fs::create_dir(&volume).unwrap();
    chown(&volume, Some(user.uid), Some(user.gid)).unwrap();
    let as_user = |args: &[&str]| {
        let mut command = root.kiln();
        command
            .env("KILN_KERNEL", dir.join("kernel"))
            .env("KILN_INITRAMFS", dir.join("initramfs"))
            .args(args);
        user.wrap(&command)
    };

    let id = run_detached(&root, &mut as_user(&[]), Some(&volume));
    let pid = qemu_pid(&root);
    assert_eq!(effective(&status_field(pid, "Uid")), user.uid);
    assert_eq!(effective(&status_field(pid, "Gid")), user.gid);
    assert_jailed(pid, &root, true, false);
    assert_guest_files_mounted(pid, &dir.join("kernel"), &dir.join("initramfs"));
    // Without root, no cgroup of kiln's: the rlimits bound it.
    assert_limits(pid, false);

    let output =
        kiln_e2e::run_with_timeout(&mut as_user(&["rm", "-f", &id]), kiln_e2e::KILN_TIMEOUT)
            .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    // The test's files go back to root, so the harness can clean up.
    let status = Command::new("chown")
        .args(["-R", "0:0"])
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success());
    root.assert_nothing_left();
}
