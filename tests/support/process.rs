//! Running a command under a timeout, killing its whole process group when it overruns.

use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A command overran its timeout; it and its process group were killed.
#[derive(Debug)]
pub struct TimedOut {
    pub command: String,
    pub timeout: Duration,
    /// What it printed before it was killed.
    pub output: Output,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} did not finish within {:?}; stdout: {}; stderr: {}",
            self.command,
            self.timeout,
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

impl std::error::Error for TimedOut {}

/// Runs `command` (stdin from /dev/null, stdout and stderr captured) in a process group of
/// its own; after `timeout` it kills that group and returns [`TimedOut`]. Panics when the
/// command cannot be started.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> Result<Output, TimedOut> {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {description}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break (status, false);
        }
        if Instant::now() >= deadline {
            kill_process_group(&child);
            break (child.wait().expect("reaping the killed child"), true);
        }
        thread::sleep(Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    };
    if timed_out {
        return Err(TimedOut {
            command: description,
            timeout,
            output,
        });
    }
    Ok(output)
}

/// [`run_with_timeout`] for commands that must succeed: panics with their output when they
/// time out or exit non-zero.
pub fn run_ok(command: &mut Command, timeout: Duration) -> Output {
    let description = format!("{command:?}");
    let output = run_with_timeout(command, timeout).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        output.status.success(),
        "{description} failed ({}); stdout: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut data = Vec::new();
        // A read error ends the capture; what was read so far is still reported.
        let _ = pipe.read_to_end(&mut data);
        data
    })
}

/// SIGKILLs the process group led by `child` (a child spawned with `process_group(0)` and
/// not yet waited for).
pub fn kill_process_group(child: &Child) {
    let pgid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill has no memory-safety preconditions. The group is the child's own
    // (process_group(0)) and the child is not reaped yet, so its id cannot be reused.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Pids of live QEMU processes whose command line mentions `path` (e.g. a test's kiln root,
/// which every sandbox's console log lives under).
pub fn qemu_pids_mentioning(path: &std::path::Path) -> Vec<u32> {
    let needle = path.to_str().expect("a UTF-8 path").as_bytes().to_vec();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let is_qemu = cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| String::from_utf8_lossy(argv0).contains("qemu-system"));
        if is_qemu
            && cmdline
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
        {
            pids.push(pid);
        }
    }
    pids
}

/// Waits up to `limit` for the QEMU processes mentioning `path` to end; returns the pids
/// of those still running.
pub fn qemu_left_after(path: &std::path::Path, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let pids = qemu_pids_mentioning(path);
        if pids.is_empty() || Instant::now() >= deadline {
            return pids;
        }
        thread::sleep(Duration::from_millis(100));
    }
}
