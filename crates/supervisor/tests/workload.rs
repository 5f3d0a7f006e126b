//! Real workloads started through the supervisor as root: the privilege drop seen from
//! the workload's own /proc/self/status, result types, stdio, PTY, signals and OOM.
//! Every test needs root: it is ignored unless asked for (`--include-ignored`, as
//! scripts/test does as root) and fails when asked for without root.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_supervisor::{
    drop_privileges, Identity, Launch, Mode, PrivilegeStep, Privileges, RunAs, RunSpec,
    StartFailure, Supervisor, SupervisorError, TerminalSize, Workload, WorkloadIo, WorkloadResult,
};

const UID: u32 = 4242;
const GID: u32 = 4343;

/// The first statement of every test here.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (dropping to other ids): run it as root, as scripts/test does"
    );
}

/// Full mode chowns /sandbox, so the tests that run it need a host without one.
fn require_no_host_sandbox() {
    assert!(
        Path::new("/sandbox").symlink_metadata().is_err(),
        "this host has a /sandbox, which the supervisor's full mode would chown: run the \
         test on a host without one"
    );
}

fn launch(argv: &[&str], io: WorkloadIo) -> Launch {
    Launch {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: PathBuf::from("/"),
        privileges: Some(Privileges {
            uid: UID,
            gid: GID,
            groups: vec![],
        }),
        cgroup: None,
        io,
    }
}

/// Runs to the end with pipes; returns the result, stdout and stderr.
fn run(launch: &Launch) -> (WorkloadResult, String, String) {
    let mut workload = Workload::spawn(launch).unwrap();
    drop(workload.stdin.take());
    let stderr = workload.stderr.take();
    let reader = std::thread::spawn(move || read_all(stderr));
    let out = read_all(workload.stdout.take());
    let result = workload.wait().unwrap();
    (result, out, reader.join().unwrap())
}

fn read_all(stream: Option<std::fs::File>) -> String {
    let mut text = String::new();
    stream.unwrap().read_to_string(&mut text).unwrap();
    text
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn assert_dropped(status: &str, groups: &str) {
    assert_eq!(
        status_field(status, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        status_field(status, "Gid"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(status_field(status, "Groups"), groups);
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(status, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(status, "NoNewPrivs"), "1");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn workload_runs_with_exactly_the_target_ids_and_no_capabilities() {
    require_root();
    let (result, status, _) = run(&launch(&["cat", "/proc/self/status"], WorkloadIo::Pipes));
    assert_eq!(result, WorkloadResult::Exited { code: 0 });
    // Root's own groups are not kept: a numeric identity has none.
    assert_dropped(&status, "");

    let mut with_groups = launch(&["cat", "/proc/self/status"], WorkloadIo::Pipes);
    with_groups.privileges.as_mut().unwrap().groups = vec![3000, 100];
    let (_, status, _) = run(&with_groups);
    assert_dropped(&status, "100 3000");
}

#[test]
fn dropping_to_root_is_refused() {
    let err = drop_privileges(&Privileges {
        uid: 0,
        gid: 0,
        groups: vec![],
    })
    .unwrap_err();
    assert_eq!(err.step, PrivilegeStep::TargetIsRoot);
    for (gid, groups) in [(0, vec![]), (GID, vec![10, 0])] {
        let err = drop_privileges(&Privileges {
            uid: UID,
            gid,
            groups,
        })
        .unwrap_err();
        assert_eq!(err.step, PrivilegeStep::TargetIsRoot);
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn results_are_typed() {
    require_root();
    let result = |argv: &[&str]| run(&launch(argv, WorkloadIo::Pipes)).0;
    assert_eq!(
        result(&["sh", "-c", "exit 3"]),
        WorkloadResult::Exited { code: 3 }
    );
    assert_eq!(
        result(&["sh", "-c", "kill -TERM $$"]),
        WorkloadResult::Killed { signal: 15 }
    );

    let failure = |launch: &Launch| match Workload::spawn(launch) {
        Err(SupervisorError::StartFailed { reason, message }) => (reason, message),
        other => panic!("expected a start failure, got {other:?}"),
    };
    let (reason, message) = failure(&launch(&["/no/such/program"], WorkloadIo::Pipes));
    assert_eq!(reason, StartFailure::NotFound);
    assert_eq!(
        message,
        r#"exec: "/no/such/program": no such file or directory"#
    );
    let (reason, message) = failure(&launch(&["no-such-program-kiln"], WorkloadIo::Pipes));
    assert_eq!(reason, StartFailure::NotFound);
    assert_eq!(
        message,
        r#"exec: "no-such-program-kiln": executable file not found in $PATH"#
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("script");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (reason, message) = failure(&launch(&[script.to_str().unwrap()], WorkloadIo::Pipes));
    assert_eq!(reason, StartFailure::NotExecutable);
    assert_eq!(message, format!("exec: {script:?}: permission denied"));
    let start_failed = |reason| WorkloadResult::StartFailed {
        reason,
        message: String::new(),
    };
    assert_eq!(start_failed(StartFailure::NotFound).exit_code(), 127);
    assert_eq!(start_failed(StartFailure::NotExecutable).exit_code(), 126);

    let mut bad_cwd = launch(&["true"], WorkloadIo::Pipes);
    bad_cwd.cwd = PathBuf::from("/no/such/dir");
    let (reason, message) = failure(&bad_cwd);
    assert_eq!(
        reason,
        StartFailure::Other,
        "a missing directory is not a missing program"
    );
    assert!(
        message.contains("working directory /no/such/dir"),
        "{message}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn stdio_streams_are_separate() {
    require_root();
    let mut workload = Workload::spawn(&launch(
        &["sh", "-c", "tr a-z A-Z; echo oops >&2; exit 4"],
        WorkloadIo::Pipes,
    ))
    .unwrap();
    let mut stdin = workload.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    drop(stdin);
    let out = read_all(workload.stdout.take());
    let err = read_all(workload.stderr.take());
    assert_eq!((out.as_str(), err.as_str()), ("HELLO\n", "oops\n"));
    assert_eq!(workload.wait().unwrap(), WorkloadResult::Exited { code: 4 });
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn pty_workloads_get_a_terminal_of_the_asked_size() {
    require_root();
    let size = TerminalSize {
        rows: 33,
        cols: 101,
    };
    let workload = Workload::spawn(&launch(
        &[
            "sh",
            "-c",
            "stty size; test -t 0 && echo tty; read line; stty size",
        ],
        WorkloadIo::Pty(size),
    ))
    .unwrap();
    let mut pty = workload.pty.as_ref().unwrap().try_clone().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("tty") {
        let n = pty.read(&mut buf).unwrap();
        seen.extend(&buf[..n]);
    }
    workload.resize(TerminalSize { rows: 7, cols: 9 }).unwrap();
    pty.write_all(b"go\n").unwrap();
    // The pty reports EIO once the last process holding the terminal is gone.
    while let Ok(n @ 1..) = pty.read(&mut buf) {
        seen.extend(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("33 101"), "{text}");
    assert!(text.contains("7 9"), "{text}");
    assert_eq!(workload.wait().unwrap(), WorkloadResult::Exited { code: 0 });
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn signals_reach_the_workload() {
    require_root();
    let workload = Workload::spawn(&launch(&["sleep", "600"], WorkloadIo::Pipes)).unwrap();
    workload.signal(libc::SIGINT).unwrap();
    assert_eq!(
        workload.wait().unwrap(),
        WorkloadResult::Killed {
            signal: libc::SIGINT
        }
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn the_workload_starts_with_no_signal_blocked_or_caught_and_the_callers_mask_stays() {
    require_root();
    extern "C" fn caught(_: libc::c_int) {}
    let own_mask = || {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status_field(&status, "SigBlk").to_owned()
    };
    // SAFETY: a handler that does nothing, and a mask change of this test's thread.
    unsafe {
        libc::signal(libc::SIGUSR1, caught as *const () as libc::sighandler_t);
        let mut blocked: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut blocked);
        libc::sigaddset(&mut blocked, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut());
    }
    let before = own_mask();
    // cat catches nothing itself (grep, for one, catches SIGSEGV).
    let (result, out, _) = run(&launch(&["cat", "/proc/self/status"], WorkloadIo::Pipes));
    assert_eq!(result, WorkloadResult::Exited { code: 0 });
    assert_eq!(status_field(&out, "SigBlk"), "0000000000000000", "{out}");
    assert_eq!(status_field(&out, "SigCgt"), "0000000000000000", "{out}");
    assert_eq!(own_mask(), before, "the caller's signal mask is as it was");
}

/// A cgroup v2 mount point whose controllers include memory, if the host has one.
fn memory_cgroup_v2() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if !right.starts_with("cgroup2 ") {
            return None;
        }
        let mount = PathBuf::from(left.split(' ').nth(4)?);
        let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).ok()?;
        controllers
            .split_whitespace()
            .any(|c| c == "memory")
            .then_some(mount)
    })
}

#[test]
#[ignore = "needs root and cgroup v2 with the memory controller (scripts/test runs it where the host has them)"]
fn out_of_memory_in_a_cgroup_is_oom_killed() {
    require_root();
    let mount = memory_cgroup_v2()
        .expect("this test needs a cgroup v2 hierarchy with the memory controller on this host");
    let enable = std::fs::write(mount.join("cgroup.subtree_control"), "+memory");
    let cgroup = mount.join(format!("kiln-supervisor-test-{}", std::process::id()));
    std::fs::create_dir(&cgroup).unwrap();
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(self.0);
        }
    }
    let _cleanup = Cleanup(&cgroup);
    if let Err(e) = std::fs::write(cgroup.join("memory.max"), "16M") {
        panic!(
            "cannot set memory.max under {} ({e}; enabling +memory: {enable:?})",
            mount.display()
        );
    }
    let _ = std::fs::write(cgroup.join("memory.swap.max"), "0");
    let mut oom = launch(
        &["sh", "-c", "a=x; while :; do a=$a$a; done"],
        WorkloadIo::Pipes,
    );
    oom.cgroup = Some(cgroup.clone());
    assert_eq!(run(&oom).0, WorkloadResult::OomKilled);
    // A plain SIGKILL in the same cgroup is not an OOM kill.
    let mut sleeper = launch(&["sleep", "600"], WorkloadIo::Pipes);
    sleeper.cgroup = Some(cgroup.clone());
    let workload = Workload::spawn(&sleeper).unwrap();
    workload.signal(libc::SIGKILL).unwrap();
    assert_eq!(
        workload.wait().unwrap(),
        WorkloadResult::Killed { signal: 9 }
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn supervisor_runs_a_spec_as_a_numeric_identity() {
    require_root();
    let spec = RunSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo \"$USER $LOGNAME $HOME $SHELL $(id -u):$(id -g) $(pwd)\"".into(),
        ],
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: Some("/tmp".into()),
        identity: Identity {
            run_as: RunAs::Uid,
            uid: 4242,
            gid: 4343,
        },
        tty: false,
        terminal: None,
        task: None,
        openshell: None,
    };
    // Process mode: the caller must already be the target uid, and root is not.
    let err = Supervisor::new(Mode::Process)
        .spawn(&spec, WorkloadIo::Pipes)
        .unwrap_err();
    assert!(matches!(err, SupervisorError::WrongUid { .. }), "{err}");
    let err = Supervisor::new(Mode::Network)
        .spawn(&spec, WorkloadIo::Pipes)
        .unwrap_err();
    assert!(matches!(err, SupervisorError::NetworkMode), "{err}");

    // Full mode refuses the identity before preparing anything.
    let mut bad = spec.clone();
    bad.identity.uid = 0;
    let err = Supervisor::new(Mode::Full)
        .run(&bad, WorkloadIo::Pipes)
        .unwrap_err();
    assert!(matches!(err, SupervisorError::IdOutOfRange { .. }), "{err}");

    // start() skips prepare(), so this host's /sandbox is left alone.
    let user = Supervisor::new(Mode::Full);
    let sandbox_user = kiln_supervisor::validate_sandbox_user(
        &spec.identity,
        &Default::default(),
        kiln_identity::IdBounds::KILN,
    )
    .unwrap();
    let mut workload = user.start(&spec, &sandbox_user, WorkloadIo::Pipes).unwrap();
    drop(workload.stdin.take());
    let out = read_all(workload.stdout.take());
    assert_eq!(out, "4242 4242 /sandbox /bin/sh 4242:4343 /tmp\n");
    assert_eq!(workload.wait().unwrap(), WorkloadResult::Exited { code: 0 });

    let mut missing = spec.clone();
    missing.argv = vec!["/no/such/program".into()];
    let result = user
        .start(&missing, &sandbox_user, WorkloadIo::Pipes)
        .map(|_| ())
        .unwrap_err();
    assert_eq!(result.start_failure().unwrap().exit_code(), 127);

    // OpenShell's supervisor starts as root with exactly the spec's environment.
    let mut openshell = spec.clone();
    openshell.argv = vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo \"$(id -u):$(id -g) [$USER] $HOME $PATH\"; env | wc -l".into(),
    ];
    openshell.env = vec!["PATH=/usr/bin:/bin".into(), "HOME=/root".into()];
    openshell.openshell = Some(kiln_supervisor::OpenShellLaunch::default());
    let mut workload = user
        .start(&openshell, &sandbox_user, WorkloadIo::Pipes)
        .unwrap();
    drop(workload.stdin.take());
    let out = read_all(workload.stdout.take());
    // sh adds PWD (and SHLVL, _ on some shells) to what it was given: at most 5 lines.
    let (first, count) = out.split_once('\n').unwrap();
    assert_eq!(first, "0:0 [] /root /usr/bin:/bin", "{out}");
    assert!(count.trim().parse::<u32>().unwrap() <= 5, "{out}");
    assert_eq!(workload.wait().unwrap(), WorkloadResult::Exited { code: 0 });
}

/// The static binary as the Kubernetes path uses it.
fn supervisor_binary(mode: &str, uid: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln-supervisor"));
    command
        .args(["--mode", mode])
        .env("SANDBOX_UID", uid)
        .env("SANDBOX_GID", GID.to_string())
        .env_remove("KILN_LOG");
    command
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn binary_exits_with_the_workload_code() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let writable = dir.path().join("data");
    let status = |args: &[&str]| {
        supervisor_binary("full", "4242")
            .args(["--writable", writable.to_str().unwrap(), "--workdir", "/"])
            .args(args)
            .env("HOME", "/root")
            .env("USER", "root")
            .env("KEPT", "kept")
            .output()
            .unwrap()
    };
    require_no_host_sandbox();
    let out = status(&[
        "--",
        "sh",
        "-c",
        "touch \"$0/file\" && grep -E '^(Uid|CapEff|NoNewPrivs)' /proc/self/status; echo \"$HOME $USER $KEPT\"; exit 7",
        writable.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Uid:\t4242\t4242\t4242\t4242"), "{text}");
    assert!(text.contains("CapEff:\t0000000000000000"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    assert!(
        text.contains("/sandbox 4242 kept\n"),
        "root's HOME is replaced, the rest kept: {text}"
    );
    assert!(writable.join("file").exists());

    let out = status(&["--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let out = status(&["--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    let out = status(&["--", dir.path().to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(126),
        "a directory is not executable: {out:?}"
    );
    let out = supervisor_binary("full", "0")
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses uid 0: {out:?}");

    let host_passwd = std::fs::read("/etc/passwd").unwrap();
    if kiln_identity::lookup_user(&host_passwd, "sandbox")
        .unwrap()
        .is_none()
    {
        let out = status(&["--run-as", "sandbox", "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("has no \"sandbox\" entry"), "{stderr}");
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn binary_forwards_signals() {
    require_root();
    require_no_host_sandbox();
    let mut child = supervisor_binary("full", "4242")
        .args([
            "--workdir",
            "/",
            "--",
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while :; do sleep 0.1; done",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut ready)
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(42));
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn binary_process_mode_runs_as_the_caller() {
    require_root();
    use std::os::unix::process::CommandExt;
    // As a Kubernetes runtime would start the sidecar agent: already 4242:4343, no
    // capabilities (setuid from root drops them; the bounding set goes in the workload).
    let out = supervisor_binary("process", "4242")
        .args(["--workdir", "/", "--", "sh", "-c", "id -u; id -G"])
        .gid(GID)
        .uid(UID)
        .output()
        .unwrap();
    // Without CAP_SETPCAP the bounding set cannot be cleared: a non-empty one is an
    // error, never silently kept.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(
        stderr.contains(
            "clearing the capability bounding set (needs CAP_SETPCAP): Operation not permitted"
        ),
        "{stderr}"
    );

    // As runc starts a container with `capabilities: drop: [ALL]`: an empty bounding
    // set, then the ids.
    let mut agent = supervisor_binary("process", "4242");
    agent.args(["--workdir", "/", "--", "cat", "/proc/self/status"]);
    // SAFETY: only system calls between fork and exec.
    unsafe {
        agent.pre_exec(|| {
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(GID, GID, GID) == 0
                && libc::setresuid(UID, UID, UID) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = agent.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_dropped(&String::from_utf8_lossy(&out.stdout), "");

    let out = supervisor_binary("process", "4242")
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(125),
        "root is not the process-mode uid: {out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("process mode runs as uid 4242"));
}

#[test]
fn binary_network_modes_refuse_a_missing_or_wrong_proxy_uid() {
    let euid = nix::unistd::geteuid().as_raw();
    let other = if euid == 4243 { 4244 } else { 4243 };
    let cases: [(&str, Vec<String>, &str); 4] = [
        ("network", vec![], "--proxy-uid is required in network mode"),
        (
            "network-init",
            vec![],
            "--proxy-uid is required in network-init mode",
        ),
        (
            "network-init",
            vec!["--proxy-uid".into(), "4242".into()],
            "proxy uid 4242: equals the sandbox uid 4242",
        ),
        (
            "network",
            vec!["--proxy-uid".into(), other.to_string()],
            "network mode runs as the proxy uid",
        ),
    ];
    for (mode, args, expected) in cases {
        let out = supervisor_binary(mode, "4242")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125), "{mode} {args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{mode} {args:?}: {stderr}");
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn binary_full_mode_needs_only_the_kubernetes_combined_capabilities() {
    require_root();
    if let Err(e) = Command::new("setpriv").arg("--version").output() {
        panic!("this test needs setpriv (util-linux; scripts/install-deps installs it): {e}");
    }
    require_no_host_sandbox();
    let dir = tempfile::tempdir().unwrap();
    let writable = dir.path().join("w");
    // A seeded workspace: a 0700 directory of the sandbox user holding a root file, which
    // root can only reach with DAC_OVERRIDE.
    std::fs::create_dir_all(writable.join(".ssh")).unwrap();
    std::fs::write(writable.join(".ssh/key"), "k").unwrap();
    std::os::unix::fs::chown(writable.join(".ssh"), Some(UID), Some(GID)).unwrap();
    std::fs::set_permissions(
        writable.join(".ssh"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    // What kiln-kube's combined agent gets: root, CHOWN DAC_OVERRIDE SETGID SETPCAP
    // SETUID only, allowPrivilegeEscalation false (no_new_privs).
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-all,+chown,+dac_override,+setgid,+setpcap,+setuid",
            "--no-new-privs",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_kiln-supervisor"))
        .args([
            "--mode",
            "full",
            "--workdir",
            "/",
            "--writable",
            writable.to_str().unwrap(),
        ])
        .args([
            "--",
            "sh",
            "-c",
            // The supervisor drops its own ids right after starting the workload.
            "cat /proc/self/status; for i in $(seq 100); do \
             grep -q '^Uid:.4242' /proc/$PPID/status && break; sleep 0.1; done; \
             grep -E '^(Uid|Cap)' /proc/$PPID/status >&2",
        ])
        .env("SANDBOX_UID", UID.to_string())
        .env("SANDBOX_GID", GID.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_dropped(&String::from_utf8_lossy(&out.stdout), "");
    // The supervisor process itself dropped too once the workload ran.
    let parent = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        status_field(&parent, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(status_field(&parent, "CapBnd"), "0000000000000000");
    for path in [writable.clone(), writable.join(".ssh/key")] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{}", path.display());
    }
}
