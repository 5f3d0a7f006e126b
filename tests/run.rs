//! `kiln run` end to end: real VM boots under TCG of the demo fixture image, through the
//! `kiln` binary. Covers the workload's identity, exit codes, streams, overrides, the
//! sandbox state left behind, the network modes, the typed failures (pre-boot refusal,
//! deadline) and signals to kiln; after each test no QEMU started for its root remains.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{
    demo_image, describe, fixtures, qemu_left_after, require_root, run_with_timeout, text,
    KilnRoot, KILN_TIMEOUT,
};

fn code(output: &Output) -> i32 {
    output
        .status
        .code()
        .unwrap_or_else(|| panic!("kiln died of a signal: {}", describe(output)))
}

/// kiln failed itself (exit 125) with a message naming `what`, and left no sandbox.
fn assert_kiln_error(root: &KilnRoot, output: &Output, what: &str) {
    assert_eq!(code(output), 125, "{}", describe(output));
    assert!(text(&output.stderr).contains(what), "{}", describe(output));
    assert_eq!(
        root.sandbox_dirs(),
        Vec::<PathBuf>::new(),
        "a sandbox was left"
    );
}

/// The `key=value` lines a fact script printed, as a map.
fn facts(stdout: &[u8]) -> std::collections::BTreeMap<String, String> {
    text(stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const FACTS_SCRIPT: &str = "echo uid=$(id -u); echo gid=$(id -g); echo groups=$(id -G); \
    echo user=$(whoami); echo sandbox_owner=$(stat -c %u:%g /sandbox); \
    touch /sandbox/made && echo made_owner=$(stat -c %u:%g /sandbox/made); \
    echo pwd=$(pwd); echo from_e=$FROM_E; echo from_file=$FROM_FILE; \
    echo to-stderr >&2";

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn identity_overrides_and_streams_in_one_boot() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let env_file = root.path().join("env");
    fs::write(&env_file, "FROM_FILE=file value\n").unwrap();
    let output = root.run(&[
        "run",
        "--rm",
        "-e",
        "FROM_E=e value",
        "--env-file",
        env_file.to_str().unwrap(),
        "-w",
        "/tmp",
        "--entrypoint",
        "/bin/sh",
        &demo_image(),
        "-c",
        FACTS_SCRIPT,
    ]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    let facts = facts(&output.stdout);
    let expect = [
        ("uid", "10001"),
        ("gid", "10001"),
        ("groups", "10001"),
        ("user", "sandbox"),
        ("sandbox_owner", "10001:10001"),
        ("made_owner", "10001:10001"),
        ("pwd", "/tmp"),
        ("from_e", "e value"),
        ("from_file", "file value"),
    ];
    for (key, value) in expect {
        assert_eq!(
            facts.get(key).map(String::as_str),
            Some(value),
            "{key}: {}",
            describe(&output)
        );
    }
    assert!(
        !text(&output.stdout).contains("to-stderr"),
        "{}",
        describe(&output)
    );
    assert!(
        text(&output.stderr).contains("to-stderr"),
        "{}",
        describe(&output)
    );
    assert_eq!(
        root.sandbox_dirs(),
        Vec::<PathBuf>::new(),
        "--rm left state behind"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn image_cmd_runs_with_the_largest_ids_and_keeps_state_without_rm() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let output = root.run(&[
        "run",
        "--uid",
        "2000000000",
        "--gid",
        "2000000000",
        &demo_image(),
    ]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    // The demo image's Cmd prints the identity.
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("uid=2000000000 gid=2000000000 groups=2000000000 user=sandbox"),
        "{}",
        describe(&output)
    );
    let dirs = root.sandbox_dirs();
    assert_eq!(dirs.len(), 1, "one sandbox state dir: {dirs:?}");
    for file in ["sandbox.json", "console.log", "upper.ext4"] {
        assert!(
            dirs[0].join(file).is_file(),
            "{} lacks {file}",
            dirs[0].display()
        );
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn uid_below_the_range_is_refused_before_boot() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let output = root.run(&["run", "--rm", "--uid", "999", &demo_image(), "true"]);
    assert_kiln_error(&root, &output, "999");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn exit_codes_follow_the_workload() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let cases: [(&[&str], i32); 4] = [
        (&["sh", "-c", "exit 42"], 42),
        (&["sh", "-c", "kill -9 $$"], 137),
        (&["no-such-command"], 127),
        (&["/etc/passwd"], 126),
    ];
    for (command, expected) in cases {
        let mut args = vec!["run", "--rm", "--network", "none"];
        let image = demo_image();
        args.push(&image);
        args.extend_from_slice(command);
        let output = root.run(&args);
        assert_eq!(
            code(&output),
            expected,
            "{command:?}: {}",
            describe(&output)
        );
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn stdin_is_read_with_interactive() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let mut command = root.kiln();
    command.args(["run", "--rm", "-i", &demo_image(), "cat"]);
    let stdin_file = root.path().join("stdin");
    fs::write(&stdin_file, "line one\nline two\n").unwrap();
    // run_with_timeout reads stdin from /dev/null; a shell redirect feeds the file instead.
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg("exec \"$@\" < \"$STDIN_FILE\"")
        .arg("sh")
        .env("STDIN_FILE", &stdin_file)
        .arg(command.get_program())
        .args(command.get_args())
        .envs(command.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
    let output = run_with_timeout(&mut shell, KILN_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(
        text(&output.stdout),
        "line one\nline two\n",
        "{}",
        describe(&output)
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn timeout_stops_the_sandbox_with_a_typed_error() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let output = root.run(&[
        "run",
        "--rm",
        "--timeout",
        "2",
        &demo_image(),
        "sleep",
        "60",
    ]);
    assert_eq!(code(&output), 125, "{}", describe(&output));
    assert!(
        text(&output.stderr).to_lowercase().contains("timeout")
            || text(&output.stderr).to_lowercase().contains("deadline")
            || text(&output.stderr).contains("2 s"),
        "{}",
        describe(&output)
    );
}

/// Waits up to `limit` for `child` to exit; on expiry kills its process group and returns
/// None.
fn wait_with_deadline(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            kiln_e2e::kill_process_group(child);
            child.wait().unwrap();
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `kiln run ... sleep 60`, waits until the workload has printed that it runs,
/// then sends `signal` to kiln and waits (bounded) for kiln to exit.
fn signal_during_sleep(root: &KilnRoot, signal: libc::c_int) -> std::process::ExitStatus {
    let mut child = root
        .kiln()
        .args([
            "run",
            "--rm",
            &demo_image(),
            "sh",
            "-c",
            "echo started; sleep 60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    // The workload runs once its first line arrives; the reader thread keeps the pipe
    // open until kiln exits.
    let stdout = child.stdout.take().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let first = lines.next().and_then(Result::ok);
        let _ = started_tx.send(first);
        lines.for_each(drop);
    });
    let first = started_rx.recv_timeout(Duration::from_secs(120));
    if first.as_ref().ok().and_then(Option::as_deref) != Some("started") {
        kiln_e2e::kill_process_group(&child);
        child.wait().unwrap();
        panic!("the workload did not start: {first:?}");
    }
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    wait_with_deadline(&mut child, Duration::from_secs(60))
        .unwrap_or_else(|| panic!("kiln did not exit within 60 s of signal {signal}"))
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn sigterm_is_forwarded_and_kiln_exits_143() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let status = signal_during_sleep(&root, libc::SIGTERM);
    assert_eq!(status.code(), Some(143), "{status}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn sigkill_of_kiln_leaves_no_qemu() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let status = signal_during_sleep(&root, libc::SIGKILL);
    assert_eq!(status.code(), None, "{status}");
    let left = qemu_left_after(&root.path(), Duration::from_secs(10));
    assert!(left.is_empty(), "QEMU outlived SIGKILLed kiln: {left:?}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn tty_gives_the_workload_a_terminal() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let output = root.run(&["run", "--rm", "-t", &demo_image(), "tty"]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert!(
        text(&output.stdout).trim().starts_with("/dev/pts/"),
        "{}",
        describe(&output)
    );
}

/// A free TCP port on host loopback (bound, then released for the caller to use).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves `body` to every HTTP request on a free loopback port, from a thread that lives
/// as long as the test process; returns the port.
fn serve_http(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn network_user_reaches_an_opened_host_service_and_none_does_not() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let port = serve_http("served-by-the-host");
    // No -T: Debian's busybox 1.35 wget segfaults with it.
    let fetch = format!("busybox wget -q -O - http://10.0.2.2:{port}/ || echo fetch-failed");
    // The host's loopback is refused by default (tests/network.rs); opened explicitly here.
    let allow_host = format!("host.kiln.internal:{port}");
    let user = root.run(&[
        "run",
        "--rm",
        "--network",
        "user",
        "--network-allow-host",
        &allow_host,
        &demo_image(),
        "sh",
        "-c",
        &fetch,
    ]);
    assert_eq!(code(&user), 0, "{}", describe(&user));
    assert!(
        text(&user.stdout).contains("served-by-the-host"),
        "{}",
        describe(&user)
    );
    let none = root.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        &demo_image(),
        "sh",
        "-c",
        &fetch,
    ]);
    assert_eq!(code(&none), 0, "{}", describe(&none));
    assert!(
        !text(&none.stdout).contains("served-by-the-host"),
        "{}",
        describe(&none)
    );
    assert!(
        text(&none.stdout).contains("fetch-failed"),
        "{}",
        describe(&none)
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn publish_forwards_a_host_port_into_the_guest() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let host_port = free_port();
    let publish = format!("{host_port}:8080");
    // nc serves one connection and exits once the host closes it, ending the workload.
    let mut child = root
        .kiln()
        .args([
            "run",
            "--rm",
            "-p",
            &publish,
            &demo_image(),
            "sh",
            "-c",
            "echo served-by-the-guest | busybox nc -l -p 8080",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // QEMU accepts forwarded connections before the guest listens and then drops them,
    // so poll until one carries the guest's greeting.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut received = String::new();
    while Instant::now() < deadline && !received.contains("served-by-the-guest") {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        received.clear();
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", host_port)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = [0u8; 256];
            if let Ok(n) = stream.read(&mut buf) {
                received = String::from_utf8_lossy(&buf[..n]).into_owned();
            }
        }
        thread::sleep(Duration::from_millis(300));
    }
    let status = wait_with_deadline(&mut child, Duration::from_secs(60));
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    assert!(
        received.contains("served-by-the-guest"),
        "the host never got the guest's greeting through -p {publish}; kiln: {status:?}, stderr: {stderr}"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr: {stderr}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn concurrent_runs_of_an_uncached_image_share_one_root_image() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let image = demo_image();
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let mut command = root.kiln();
            command.args([
                "run",
                "--json",
                "--rm",
                "--timings",
                "--network",
                "none",
                &image,
                "echo",
                "done",
            ]);
            thread::spawn(move || (i, run_with_timeout(&mut command, KILN_TIMEOUT)))
        })
        .collect();
    let mut builds = 0;
    for run in runs {
        let (i, output) = run.join().unwrap();
        let output = output.unwrap_or_else(|e| panic!("run {i}: {e}"));
        // --timings --json reports on stderr whether this run built the root image.
        let report = text(&output.stderr)
            .lines()
            .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .unwrap_or_else(|| panic!("run {i}: no timings JSON: {}", describe(&output)));
        if report["root_image_built"] == serde_json::Value::Bool(true) {
            builds += 1;
        }
        assert_eq!(code(&output), 0, "run {i}: {}", describe(&output));
        assert_eq!(
            text(&output.stdout),
            "done\n",
            "run {i}: {}",
            describe(&output)
        );
    }
    let mut root_images = Vec::new();
    let mut leftovers = Vec::new();
    for version in fs::read_dir(root.path().join("rootfs")).unwrap().flatten() {
        for image_dir in fs::read_dir(version.path()).unwrap().flatten() {
            for file in fs::read_dir(image_dir.path()).unwrap().flatten() {
                let name = file.file_name().into_string().unwrap();
                if name == "root.erofs" {
                    root_images.push(file.path());
                } else if name.starts_with(".tmp-") {
                    leftovers.push(file.path());
                }
            }
        }
    }
    assert_eq!(builds, 1, "the root image was built {builds} times");
    assert_eq!(root_images.len(), 1, "root images: {root_images:?}");
    assert!(
        leftovers.is_empty(),
        "temporary build files left: {leftovers:?}"
    );
}

/// An OCI layout (built with umoci) whose only layer holds `/hello`: no shell, no binaries.
fn image_without_binaries(dir: &Path) -> String {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:bare", layout.display());
    let umoci = |args: &[&str]| {
        kiln_e2e::run_ok(Command::new("umoci").args(args), Duration::from_secs(60));
    };
    umoci(&["init", "--layout", layout.to_str().unwrap()]);
    umoci(&["new", "--image", &image]);
    umoci(&["unpack", "--image", &image, bundle.to_str().unwrap()]);
    fs::write(bundle.join("rootfs/hello"), "hi\n").unwrap();
    umoci(&["repack", "--image", &image, bundle.to_str().unwrap()]);
    format!("oci:{image}")
}

/// A copy of the demo image whose config sets Entrypoint, Cmd, Env and WorkingDir (umoci).
fn image_with_run_config(dir: &Path) -> String {
    let layout = dir.join("configured");
    let source = &fixtures().demo().oci_gzip;
    kiln_e2e::run_ok(
        Command::new("cp").arg("-a").arg(&source.path).arg(&layout),
        Duration::from_secs(60),
    );
    let image = format!("{}:{}", layout.display(), source.tag);
    kiln_e2e::run_ok(
        Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--config.entrypoint",
            "/bin/sh",
            "--config.entrypoint",
            "-c",
            "--config.cmd",
            "echo \"$FROM_IMAGE in $(pwd)\"",
            "--config.env",
            "FROM_IMAGE=image value",
            "--config.workingdir",
            "/etc",
        ]),
        Duration::from_secs(60),
    );
    format!("oci:{image}")
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn run_config_comes_from_the_image_and_flags_override_it() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let work = tempfile::tempdir().unwrap();
    let image = image_with_run_config(work.path());
    let output = root.run(&["run", "--rm", "--network", "none", &image]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(
        text(&output.stdout),
        "image value in /etc\n",
        "{}",
        describe(&output)
    );

    // The image's Entrypoint stays when only the command is given; -e and -w override.
    let output = root.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-e",
        "FROM_IMAGE=flag value",
        "-w",
        "/tmp",
        &image,
        "echo \"$FROM_IMAGE in $(pwd)\"",
    ]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(
        text(&output.stdout),
        "flag value in /tmp\n",
        "{}",
        describe(&output)
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn image_without_the_command_gives_127() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let work = tempfile::tempdir().unwrap();
    let image = image_without_binaries(work.path());
    let output = root.run(&["run", "--rm", "--network", "none", &image, "sh"]);
    assert_eq!(code(&output), 127, "{}", describe(&output));
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_kernel_panic_is_a_typed_error() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    // An initramfs with no /init: the kernel finds no root to mount and panics.
    let tree = root.path().join("initramfs-tree");
    fs::create_dir_all(tree.join("dev")).unwrap();
    let cpio = root.path().join("no-init.cpio");
    let mut command = Command::new("sh");
    command
        .current_dir(&tree)
        .arg("-c")
        .arg("find . | cpio --quiet -o -H newc > \"$0\"")
        .arg(&cpio);
    kiln_e2e::run_ok(&mut command, Duration::from_secs(60));
    let mut run = root.kiln();
    run.args(["run", "--rm", "--network", "none", &demo_image(), "true"])
        .env("KILN_INITRAMFS", &cpio);
    let output = run_with_timeout(&mut run, KILN_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_kiln_error(&root, &output, "panic");
}
