//! docker habits on the run path and the lifecycle, end to end through the `kiln` binary
//! and real VM boots under TCG: ^C on a real terminal (tmux) and `timeout` reach the
//! workload and not QEMU; piped input with `-it` is refused; start failures are shown as
//! docker shows them; progress stays off stderr unless it is a terminal or -v; a
//! `--timeout` error carries no console lines; `start` of a running sandbox is a no-op;
//! `wait`, `kill`, `restart`; `--rm -d`; a foreground run leaves its logs; `--timings`
//! adds up.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{demo_image, describe, require_root, run_with_timeout, text, KilnRoot};

/// How long a boot may take to get its workload running on a loaded machine under TCG.
const BOOT_WAIT: Duration = Duration::from_secs(240);

fn code(output: &Output) -> i32 {
    output
        .status
        .code()
        .unwrap_or_else(|| panic!("kiln died of a signal: {}", describe(output)))
}

/// `command` as one line for `sh -c`: its environment changes, program and arguments,
/// each single-quoted.
fn shell_line(command: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    // env takes its -u options before the assignments.
    let mut unset = Vec::new();
    let mut set = Vec::new();
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => {
                let mut pair = key.to_os_string();
                pair.push("=");
                pair.push(value);
                set.push(quote(&pair));
            }
            None => unset.push(format!("-u {}", quote(key))),
        }
    }
    let mut words = vec!["env".to_owned()];
    words.extend(unset);
    words.extend(set);
    words.push(quote(command.get_program()));
    words.extend(command.get_args().map(quote));
    words.join(" ")
}

/// Waits until `path` holds `needle` (or `limit` passes); its text either way.
fn wait_for_text(path: &Path, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let found = fs::read_to_string(path).unwrap_or_default();
        if found.contains(needle) || Instant::now() >= deadline {
            return found;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A tmux server of the test's own (its socket in the test's directory), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    fn new(root: &KilnRoot) -> Tmux {
        Tmux {
            socket: root.temp_dir().join("tmux.sock"),
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.arg("-S").arg(&self.socket).env("TERM", "xterm");
        command
    }

    /// Runs `line` in a new detached session on an 80x24 terminal.
    fn start(&self, line: &str) {
        let status = self
            .command()
            .args(["new-session", "-d", "-x", "80", "-y", "24", line])
            .status()
            .expect("tmux runs");
        assert!(status.success(), "tmux new-session: {status}");
    }

    /// Types `keys` (tmux key names, e.g. C-c) into the session's terminal.
    fn send_keys(&self, keys: &str) {
        let status = self
            .command()
            .args(["send-keys", keys])
            .status()
            .expect("tmux runs");
        assert!(status.success(), "tmux send-keys: {status}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn ctrl_c_on_a_terminal_reaches_the_workload_and_kiln_exits_130() {
    require_root();
    let root = KilnRoot::with_guest();
    let dir = root.temp_dir();
    let (out, err, status) = (dir.join("out"), dir.join("err"), dir.join("status"));
    let mut kiln = root.kiln();
    kiln.args([
        "run",
        "--rm",
        &demo_image(),
        "sh",
        "-c",
        "echo started; sleep 60",
    ]);
    let line = format!(
        "{} >{} 2>{}; echo $? >{}",
        shell_line(&kiln),
        out.display(),
        err.display(),
        status.display()
    );
    let tmux = Tmux::new(&root);
    tmux.start(&line);
    let started = wait_for_text(&out, "started", BOOT_WAIT);
    assert!(
        started.contains("started"),
        "the workload did not start: {started:?}"
    );
    // ^C on the terminal: SIGINT to its foreground process group.
    tmux.send_keys("C-c");
    let ended = wait_for_text(&status, "\n", Duration::from_secs(60));
    let stderr = fs::read_to_string(&err).unwrap_or_default();
    assert_eq!(ended.trim(), "130", "exit status; stderr: {stderr}");
    assert_eq!(stderr, "", "nothing but the workload's end");
    drop(tmux);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn timeout_signals_the_workload_through_kiln() {
    require_root();
    let root = KilnRoot::with_guest();
    // `timeout` signals its child and then its whole process group: QEMU must not be in it.
    let mut kiln = root.kiln();
    kiln.args([
        "run",
        "--rm",
        &demo_image(),
        "sh",
        "-c",
        "trap 'echo got-int; exit 3' INT; echo started; while :; do sleep 1; done",
    ]);
    let line = format!(
        "exec timeout --preserve-status -s INT 600 {}",
        shell_line(&kiln)
    );
    let mut command = Command::new("sh");
    command
        .args(["-c", &line])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let _ = lines_tx.send(line.unwrap_or_default());
        }
    });
    let stderr = child.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        text
    });
    let first = lines_rx.recv_timeout(BOOT_WAIT);
    if first.as_deref() != Ok("started") {
        kiln_e2e::kill_process_group(&child);
        child.wait().unwrap();
        panic!("the workload did not start: {first:?}");
    }
    // SIGALRM is how timeout's own timer expires: this is its deadline, now.
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGALRM) };
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            kiln_e2e::kill_process_group(&child);
            child.wait().unwrap();
            panic!("kiln did not end within 120 s of timeout's SIGINT");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines_rx.try_iter().collect();
    let stderr = stderr.join().unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "the workload's own status; stderr: {stderr}"
    );
    assert!(
        rest.iter().any(|l| l == "got-int"),
        "{rest:?}; stderr: {stderr}"
    );
    assert_eq!(stderr, "", "no channel or VM failure");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn piped_input_with_it_is_refused_as_docker_refuses_it() {
    require_root();
    let root = KilnRoot::with_guest();
    let refused = "kiln: error: the input device is not a TTY (-it needs a terminal on stdin; \
                   pipe input with -i alone)";
    let image = demo_image();
    let runs: [&[&str]; 2] = [
        &["run", "--rm", "-it", &image, "sh"],
        &["exec", "-it", "nosuchsandbox", "sh", "-c", "true"],
    ];
    for args in runs {
        let line = format!("echo 'echo hi' | {}", shell_line(root.kiln().args(args)));
        let output = run_with_timeout(Command::new("sh").args(["-c", &line]), BOOT_WAIT)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code(&output), 125, "{}", describe(&output));
        assert_eq!(text(&output.stdout), "", "{}", describe(&output));
        assert_eq!(text(&output.stderr).trim_end(), refused);
    }
    // Piped input without -t reaches the workload to its end.
    let line = format!(
        "echo 'echo hi' | {}",
        shell_line(root.kiln().args(["run", "--rm", "-i", &demo_image(), "sh"]))
    );
    let output = run_with_timeout(Command::new("sh").args(["-c", &line]), BOOT_WAIT)
        .unwrap_or_else(|e| panic!("the session did not end at the end of its input: {e}"));
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(text(&output.stdout), "hi\n", "{}", describe(&output));
    assert_eq!(text(&output.stderr), "", "{}", describe(&output));
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn start_failures_are_shown_as_docker_shows_them() {
    require_root();
    let root = KilnRoot::with_guest().removing_sandboxes_at_end();
    let not_found = r#"kiln: exec: "nosuchcmd": executable file not found in $PATH"#;

    let output = root.run(&["run", "--rm", &demo_image(), "nosuchcmd"]);
    assert_eq!(code(&output), 127, "{}", describe(&output));
    assert_eq!(text(&output.stderr).trim_end(), not_found);
    assert_eq!(text(&output.stdout), "");

    let output = root.run(&["run", "--rm", &demo_image(), "/etc/passwd"]);
    assert_eq!(code(&output), 126, "{}", describe(&output));
    assert_eq!(
        text(&output.stderr).trim_end(),
        r#"kiln: exec: "/etc/passwd": permission denied"#
    );

    // Detached: no id, the reason, the code.
    let output = root.run(&["run", "-d", "--name", "nocmd", &demo_image(), "nosuchcmd"]);
    assert_eq!(code(&output), 127, "{}", describe(&output));
    assert_eq!(
        text(&output.stdout),
        "",
        "no id for a sandbox that never ran"
    );
    assert_eq!(text(&output.stderr).trim_end(), not_found);
    // `start` fails as `docker start` does: the reason is its error, exit 1.
    let output = root.run(&["start", "nocmd"]);
    assert_eq!(code(&output), 1, "{}", describe(&output));
    assert_eq!(
        text(&output.stderr).trim_end(),
        not_found.replace("kiln: ", "kiln: error: nocmd: ")
    );

    // exec in a running sandbox.
    let id = root.ok(&["run", "-d", &demo_image(), "sleep", "600"]);
    let output = root.run(&["exec", id.trim(), "nosuchcmd"]);
    assert_eq!(code(&output), 127, "{}", describe(&output));
    assert_eq!(text(&output.stderr).trim_end(), not_found);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn progress_is_for_terminals_and_verbose_runs() {
    require_root();
    let root = KilnRoot::with_guest().removing_sandboxes_at_end();
    // stderr is a pipe here: a script sees the workload's streams and nothing else.
    let output = root.run(&[
        "run",
        "--rm",
        &demo_image(),
        "sh",
        "-c",
        "echo out; echo err >&2",
    ]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(text(&output.stdout), "out\n");
    assert_eq!(text(&output.stderr), "err\n");

    // -v asks for it; run -d reports each step once.
    let output = root.run(&["-v", "run", "-d", &demo_image(), "sleep", "600"]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(stderr.contains(": in the store (sha256:"), "{stderr}");
    assert_eq!(
        stderr.matches("preparing the identity layer").count(),
        1,
        "{stderr}"
    );
    let id = text(&output.stdout).trim().to_owned();
    assert_eq!(id.len(), 12, "one id on stdout: {}", describe(&output));

    // start of a running sandbox: nothing to do, as docker start.
    let output = root.run(&["start", &id]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(text(&output.stdout).trim(), id);
    assert_eq!(text(&output.stderr), "");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_timeout_error_shows_no_guest_console() {
    require_root();
    let root = KilnRoot::with_guest();
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
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.trim_end(),
        "kiln: error: deadline for workload expired after 2.0 s",
        "{}",
        describe(&output)
    );
}

/// Waits until sandbox `id`'s stdout log holds `count` lines `line`.
fn wait_for_lines(root: &KilnRoot, id: &str, line: &str, count: usize) {
    let deadline = Instant::now() + BOOT_WAIT;
    loop {
        let logs = root.ok(&["logs", id]);
        if logs.lines().filter(|l| *l == line).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {count} lines {line:?}: {logs:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn wait_kill_and_restart_a_detached_sandbox() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let script = "trap 'echo got-usr1; exit 7' USR1; echo up; while :; do sleep 1; done";
    let id = root.ok(&[
        "run",
        "-d",
        "--name",
        "w",
        &demo_image(),
        "sh",
        "-c",
        script,
    ]);
    let id = id.trim();
    // The workload runs once `run -d` returns; its trap is set once it printed.
    wait_for_lines(&root, "w", "up", 1);

    assert_eq!(root.ok(&["kill", "-s", "usr1", "w"]).trim(), "w");
    assert_eq!(root.ok(&["wait", id]), "7\n");
    assert_eq!(root.ok(&["logs", "w"]), "up\ngot-usr1\n");

    // A stopped sandbox: kill refuses, restart boots it again on its disk.
    let stderr = root.fails(&["kill", "w"], 1);
    assert!(stderr.contains("not running"), "{stderr}");
    assert_eq!(root.ok(&["restart", "w"]).trim(), "w");
    wait_for_lines(&root, "w", "up", 2);
    assert_eq!(root.ok(&["kill", "w"]).trim(), "w");
    assert_eq!(root.ok(&["wait", "w"]), "137\n");
    assert_eq!(root.ok(&["logs", "w"]), "up\ngot-usr1\nup\n");

    let stderr = root.fails(&["kill", "-s", "NOPE", "w"], 2);
    assert!(stderr.contains("signal name"), "{stderr}");
    let stderr = root.fails(&["wait", "w", "missing"], 1);
    assert!(stderr.contains("missing"), "{stderr}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn rm_with_detach_removes_the_sandbox_when_it_stops() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let id = root.ok(&["run", "--rm", "-d", &demo_image(), "sleep", "600"]);
    let id = id.trim();
    assert_eq!(root.sandbox_dirs().len(), 1, "{:?}", root.sandbox_dirs());
    root.ok(&["stop", "-t", "1", id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !root.sandbox_dirs().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    assert!(root.sandbox_dirs().is_empty(), "{:?}", root.sandbox_dirs());

    // One whose workload never ran is removed too, after its reason.
    let output = root.run(&["run", "--rm", "-d", &demo_image(), "nosuchcmd"]);
    assert_eq!(code(&output), 127, "{}", describe(&output));
    assert!(root.sandbox_dirs().is_empty(), "{:?}", root.sandbox_dirs());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_foreground_run_leaves_its_output_for_logs() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let output = root.run(&[
        "run",
        "--name",
        "fg",
        &demo_image(),
        "sh",
        "-c",
        "echo to-out; echo to-err >&2",
    ]);
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(text(&output.stdout), "to-out\n");
    let logs = root.run(&["logs", "fg"]);
    assert_eq!(code(&logs), 0, "{}", describe(&logs));
    assert_eq!(text(&logs.stdout), "to-out\n");
    assert_eq!(text(&logs.stderr), "to-err\n");
    // Each line keeps the time it arrived, as a detached sandbox's do.
    let stamped = root.ok(&["logs", "-t", "fg"]);
    let (time, line) = stamped.trim_end().split_once(' ').unwrap_or_default();
    assert_eq!(line, "to-out", "{stamped:?}");
    assert!(
        time.len() == 30 && time.ends_with('Z') && time.contains('T'),
        "an RFC 3339 time: {stamped:?}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn restart_policies_boot_a_detached_sandbox_again() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    // on-failure:2 — the first run and two restarts, on the same writable disk.
    // /tmp is a tmpfs in the guest; /sandbox is on the writable disk.
    let script = "echo run >> /sandbox/runs; cat /sandbox/runs | wc -l; exit 3";
    let id = root.ok(&[
        "run",
        "-d",
        "--restart",
        "on-failure:2",
        "--name",
        "flaky",
        &demo_image(),
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(root.ok(&["wait", id.trim()]), "3\n");
    assert_eq!(root.ok(&["logs", "flaky"]), "1\n2\n3\n");

    // always: restarted after a clean exit too, until `kiln stop`.
    root.ok(&[
        "run",
        "-d",
        "--restart",
        "always",
        "--name",
        "again",
        &demo_image(),
        "sh",
        "-c",
        "echo up; sleep 1",
    ]);
    wait_for_lines(&root, "again", "up", 2);
    root.ok(&["stop", "-t", "1", "again"]);
    let ps = root.ok(&["ps"]);
    assert!(!ps.contains("again"), "stopped for good: {ps}");

    let stderr = root.fails(&["run", "--restart", "always", &demo_image(), "true"], 125);
    assert!(stderr.contains("--restart"), "{stderr}");
    let stderr = root.fails(&["create", "--restart", "sometimes", &demo_image()], 2);
    assert!(stderr.contains("unless-stopped"), "{stderr}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn attach_streams_new_output_and_passes_signals_on() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let script = "trap 'echo got-int; echo bye >&2; exit 5' INT; echo before; \
                  while :; do sleep 1; done";
    root.ok(&[
        "run",
        "-d",
        "--name",
        "att",
        &demo_image(),
        "sh",
        "-c",
        script,
    ]);
    wait_for_lines(&root, "att", "before", 1);
    let mut child = root
        .kiln()
        .args(["attach", "att"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // attach reads from the logs' ends at once; give it that moment, then ^C.
    thread::sleep(Duration::from_secs(2));
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            kiln_e2e::kill_process_group(&child);
            panic!("attach did not end with the sandbox");
        }
        thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(code(&output), 5, "{}", describe(&output));
    assert_eq!(
        text(&output.stdout),
        "got-int\n",
        "only what came after attach"
    );
    assert_eq!(text(&output.stderr), "bye\n");

    let stderr = root.fails(&["attach", "att"], 1);
    assert!(stderr.contains("not running"), "{stderr}");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn sighup_and_sigquit_reach_the_workload() {
    require_root();
    let root = KilnRoot::with_guest();
    for (signal, name, expected) in [(libc::SIGHUP, "HUP", 4), (libc::SIGQUIT, "QUIT", 5)] {
        let script = format!(
            "trap 'echo got-{name}; exit {expected}' {name}; echo started; while :; do sleep 1; done"
        );
        let mut child = root
            .kiln()
            .args(["run", "--rm", &demo_image(), "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let _ = lines_tx.send(line.unwrap_or_default());
            }
        });
        let first = lines_rx.recv_timeout(BOOT_WAIT);
        if first.as_deref() != Ok("started") {
            kiln_e2e::kill_process_group(&child);
            child.wait().unwrap();
            panic!("the workload did not start: {first:?}");
        }
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let output = child.wait_with_output().unwrap();
        let rest: Vec<String> = lines_rx.try_iter().collect();
        assert_eq!(code(&output), expected, "SIG{name}: {}", describe(&output));
        assert_eq!(rest, [format!("got-{name}")], "SIG{name}");
        assert_eq!(text(&output.stderr), "", "SIG{name}");
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn progress_shows_on_a_terminal() {
    require_root();
    let root = KilnRoot::with_guest();
    let dir = root.temp_dir();
    let (out, status) = (dir.join("out"), dir.join("status"));
    root.ok(&["-q", "pull", &demo_image()]);
    let mut kiln = root.kiln();
    kiln.args(["run", "--rm", &demo_image(), "echo", "done"]);
    // stderr stays on the terminal; stdout goes to a file.
    let line = format!(
        "{} >{}; echo $? >{}; sleep 600",
        shell_line(&kiln),
        out.display(),
        status.display()
    );
    let tmux = Tmux::new(&root);
    tmux.start(&line);
    let ended = wait_for_text(&status, "\n", BOOT_WAIT);
    assert_eq!(ended.trim(), "0");
    assert_eq!(fs::read_to_string(&out).unwrap(), "done\n");
    let screen = tmux
        .command()
        .args(["capture-pane", "-p", "-J"])
        .output()
        .expect("tmux runs");
    let screen = text(&screen.stdout);
    assert_eq!(
        screen.matches(": in the store (sha256:").count(),
        1,
        "{screen}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn timings_add_up_to_the_total_and_the_total_to_the_wall_time() {
    require_root();
    let root = KilnRoot::with_guest();
    let started = Instant::now();
    let output = root.run(&["run", "--rm", "--timings", &demo_image(), "true"]);
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(code(&output), 0, "{}", describe(&output));
    assert_eq!(text(&output.stdout), "");
    let stderr = text(&output.stderr);
    let mut lines = stderr.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("phase            seconds   (accel: "),
        "{stderr}"
    );
    let rows: Vec<(String, f64)> = lines
        .map(|line| {
            let (name, seconds) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a timings row: {line:?}\n{stderr}"));
            let seconds = seconds
                .parse()
                .unwrap_or_else(|_| panic!("a phase without a figure: {line:?}\n{stderr}"));
            (name.trim().to_owned(), seconds)
        })
        .collect();
    let names: Vec<&str> = rows.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pull",
            "build/cache",
            "setup",
            "qemu start",
            "kernel",
            "init",
            "supervisor",
            "workload",
            "shutdown",
            "cleanup",
            "total",
            "to workload"
        ],
        "{stderr}"
    );
    let figure = |name: &str| rows.iter().find(|(n, _)| n == name).unwrap().1;
    let phases: f64 = rows[..10].iter().map(|(_, seconds)| seconds).sum();
    let total = figure("total");
    // Each figure is rounded to a millisecond.
    assert!(
        (phases - total).abs() <= 0.006,
        "the phases add up to {phases:.3} s, not the total\n{stderr}"
    );
    // The total is the run; what is left of the wall time is starting and ending the
    // process.
    assert!(
        total <= wall && wall - total < 2.0,
        "total {total:.3} s of a {wall:.3} s wall time\n{stderr}"
    );
    assert!(
        figure("qemu start") > 0.0,
        "QEMU's own start shown\n{stderr}"
    );
    assert!(
        figure("to workload") < total,
        "the time to the workload is part of the run\n{stderr}"
    );
}
