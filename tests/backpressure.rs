//! A reader that stops reading cannot make kiln's memory grow or hold up a stop (issue 17,
//! item 2), with real VM boots under TCG: an exec session's output read slowly keeps the
//! sandbox's monitor within the stated bound and `rm -f` prompt, an exec reader that stops
//! does not keep its sandbox from ending with its workload, and a foreground run writing
//! into a FIFO nobody reads keeps `kiln run` within the bound and ends on SIGTERM.
//!
//! The bound is docs/sandboxes.md's: at most 64 MiB of queued data per sandbox (one 1 MiB
//! window per session and the input queue); the tests measure the process's resident
//! memory once the output is flowing and allow that much on top.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdout, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{demo_image, describe, require_root, run_with_timeout, KilnRoot};

/// docs/sandboxes.md: the most data kiln queues for one sandbox.
const QUEUED_BOUND: u64 = 64 << 20;

/// How long the tests watch the memory of a process whose reader is slow or gone.
const WATCH: Duration = Duration::from_secs(16);

/// The monitor kills the VM this long after a stop's grace period at the latest
/// (docs/sandboxes.md); a stop waiting behind queued data took minutes instead.
const STOP_DEADLINE: Duration = Duration::from_secs(15);

/// Slack on top of the stop deadline for a loaded two-core machine; still below the 40 s
/// after which `kiln stop` gives up and kills the monitor itself.
const STOP_SLACK: Duration = Duration::from_secs(15);

/// Resident memory of process `pid` in bytes (VmRSS of /proc/PID/status).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading the status of process {pid}: {e}"));
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in the status of process {pid}: {status}"));
    kib * 1024
}

/// Samples the resident memory of `pid` every second for [`WATCH`], calling `between`
/// after each sample; returns the largest.
fn peak_rss(pid: u32, mut between: impl FnMut()) -> u64 {
    let end = Instant::now() + WATCH;
    let mut peak = 0;
    while Instant::now() < end {
        peak = peak.max(rss(pid));
        between();
        thread::sleep(Duration::from_secs(1));
    }
    peak
}

/// Waits up to `limit` for `child` to exit.
fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes waiting in the pipe or FIFO `file` reads from (FIONREAD).
fn bytes_waiting(file: &File) -> usize {
    let mut waiting: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FIONREAD, &mut waiting) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    waiting as usize
}

/// Starts `kiln exec SANDBOX cat /dev/zero` and reads the first 64 KiB of its output
/// (zeros: the command's), so the output is flowing when this returns.
fn exec_cat_zero(root: &KilnRoot, sandbox: &str) -> (Child, ChildStdout) {
    let mut exec = root
        .kiln()
        .args(["exec", sandbox, "cat", "/dev/zero"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut output = exec.stdout.take().unwrap();
    let mut chunk = vec![1u8; 64 * 1024];
    output.read_exact(&mut chunk).unwrap();
    assert!(chunk.iter().all(|&b| b == 0), "cat /dev/zero sends zeros");
    (exec, output)
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_slow_exec_reader_keeps_the_monitor_bounded_and_rm_f_prompt() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    root.ok(&[
        "run",
        "-d",
        "--name",
        "slow",
        &demo_image(),
        "sh",
        "-c",
        "echo up; exec sleep 100000",
    ]);
    let id = root.ok(&["inspect", "slow"]);
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    let monitor = root.monitor_pid(id["id"].as_str().unwrap());

    let (mut exec, mut output) = exec_cat_zero(&root, "slow");
    let mut chunk = vec![0u8; 64 * 1024];
    let baseline = rss(monitor);
    let mut read_now = false;
    let peak = peak_rss(monitor, || {
        // The slow reader: 64 KiB every other second.
        read_now = !read_now;
        if read_now {
            output.read_exact(&mut chunk).unwrap();
        }
    });
    assert!(
        peak <= baseline + QUEUED_BOUND,
        "the monitor grew from {baseline} to {peak} bytes behind a slow reader; the bound is \
         {QUEUED_BOUND} bytes of queued data"
    );

    let started = Instant::now();
    let removal = run_with_timeout(
        root.kiln().args(["rm", "-f", "slow"]),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    assert!(removal.status.success(), "rm -f: {}", describe(&removal));
    assert!(
        took <= STOP_DEADLINE + STOP_SLACK,
        "rm -f took {took:?} behind a slow reader (grace 0, stop deadline {STOP_DEADLINE:?})"
    );
    // The exec client hears the end of its session instead of hanging.
    drop(output);
    let status = wait_for_exit(&mut exec, Duration::from_secs(30));
    assert!(status.is_some(), "kiln exec still runs after rm -f");
    assert!(
        !status.unwrap().success(),
        "cat /dev/zero cannot have ended well"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_stuck_exec_reader_does_not_keep_the_sandbox_from_ending() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    root.ok(&[
        "run",
        "-d",
        "--name",
        "ending",
        &demo_image(),
        "sh",
        "-c",
        "while [ ! -e /tmp/end ]; do sleep 1; done",
    ]);
    // Its output flows, then nobody reads it any more.
    let (mut exec, output) = exec_cat_zero(&root, "ending");

    root.ok(&["exec", "ending", "touch", "/tmp/end"]);
    // The main workload ends within a second; the sandbox with it, reader or not.
    let deadline = Instant::now() + STOP_DEADLINE + STOP_SLACK;
    loop {
        let state: serde_json::Value =
            serde_json::from_str(&root.ok(&["inspect", "ending"])).unwrap();
        if state["status"] == "exited" {
            assert_eq!(state["exit_code"], 0, "{state}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sandbox did not end behind a stuck exec reader: {state}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    drop(output);
    assert!(
        wait_for_exit(&mut exec, Duration::from_secs(30)).is_some(),
        "kiln exec still runs after its sandbox ended"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_run_writing_into_a_fifo_nobody_reads_stays_bounded_and_ends_on_sigterm() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let fifo = root.temp_dir().join("fifo");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // The reader opens it and never reads; opening without waiting for a writer.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .open(Path::new(&fifo))
        .unwrap();
    let mut kiln = root
        .kiln()
        .args(["run", "--rm", &demo_image(), "cat", "/dev/zero"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = kiln.id();

    // The workload runs once the FIFO is full.
    let boot = Instant::now() + Duration::from_secs(240);
    while bytes_waiting(&reader) < 64 * 1024 {
        assert!(Instant::now() < boot, "the FIFO never filled");
        assert!(kiln.try_wait().unwrap().is_none(), "kiln run ended early");
        thread::sleep(Duration::from_millis(200));
    }
    let baseline = rss(pid);
    let peak = peak_rss(pid, || {});
    assert!(
        peak <= baseline + QUEUED_BOUND,
        "kiln run grew from {baseline} to {peak} bytes writing into a full FIFO; the bound is \
         {QUEUED_BOUND} bytes of queued data"
    );

    // SAFETY: kill has no memory-safety preconditions; the pid is our child's, not reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let status = wait_for_exit(&mut kiln, STOP_DEADLINE + STOP_SLACK);
    let mut stderr = String::new();
    if status.is_some() {
        kiln.stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
    } else {
        let _ = kiln.kill();
    }
    let status = status.expect("kiln run still runs after SIGTERM");
    // The workload got the signal and its end came back: 128 + SIGTERM.
    assert_eq!(status.code(), Some(143), "{status}; stderr: {stderr}");
    drop(reader);
}
