//! Detached sandboxes end to end through the `kiln` binary, with real VM boots under TCG:
//! create/start/stop/start/rm keeping the files written in /sandbox, `logs`, `ps`,
//! `inspect`, `run -d`, a killed monitor, refused ids and names, and a start that keeps
//! the pinned image after the tag moved. After each test no QEMU or monitor started for
//! its root remains.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{
    demo_image, describe, fixtures, qemu_pids_mentioning, require_root, text, KilnRoot,
    KILN_TIMEOUT,
};

/// `kiln inspect ID` as JSON.
fn inspect(root: &KilnRoot, id: &str) -> serde_json::Value {
    serde_json::from_str(&root.ok(&["inspect", id])).expect("inspect prints JSON")
}

/// Polls `kiln logs ID` until its stdout contains `wanted`.
fn wait_for_log(root: &KilnRoot, id: &str, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let logs = root.ok(&["logs", id]);
        if logs.contains(wanted) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "{wanted:?} never appeared in the logs of {id}: {logs}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `kiln -q ARGS` with its stdout piped and returns it with its first line.
fn spawn_until_first_line(root: &KilnRoot, args: &[&str]) -> (std::process::Child, String) {
    let mut child = root
        .kiln()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    (child, line)
}

/// A fresh root for one test; the sandboxes it leaves are removed when it ends.
fn new_root() -> KilnRoot {
    KilnRoot::with_guest().quiet().removing_sandboxes_at_end()
}

/// A workload that appends a line to a file in /sandbox each boot, shows the file, and
/// then stays up.
const COUNTING_SCRIPT: &str = "echo boot >> /sandbox/boots; echo boots=$(wc -l < /sandbox/boots); \
    echo to-stderr >&2; exec sleep 100000";

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn create_start_stop_start_rm_keeps_sandbox_files() {
    require_root();
    let root = new_root();
    let id = root
        .ok(&[
            "create",
            "--name",
            "keeper",
            &demo_image(),
            "sh",
            "-c",
            COUNTING_SCRIPT,
        ])
        .trim()
        .to_owned();
    assert_eq!(id.len(), 12, "create prints the id: {id:?}");
    assert!(
        root.ok(&["ps"]).lines().all(|l| !l.contains(&id)),
        "a created sandbox is not running"
    );
    assert!(root.ok(&["ps", "-a", "--json"]).contains("\"created\""));
    let created = inspect(&root, "keeper");
    assert_eq!(created["status"], "created");
    assert_eq!(created["id"], id.as_str());
    let upper = Path::new(created["state_dir"].as_str().unwrap()).join("upper.ext4");
    assert!(upper.is_file(), "create made the writable disk");

    root.ok(&["start", "keeper"]);
    wait_for_log(&root, "keeper", "boots=1");
    let running = inspect(&root, &id);
    assert_eq!(running["status"], "running");
    assert!(running["monitor_pid"].as_u64().is_some());
    assert!(root.ok(&["ps"]).contains(&id));
    let stderr = text(&root.run(&["logs", "keeper"]).stderr);
    assert!(
        stderr.contains("to-stderr"),
        "stderr.log goes to stderr: {stderr}"
    );

    let refused = root.run(&["rm", "keeper"]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    assert!(
        text(&refused.stderr).contains("running"),
        "{}",
        describe(&refused)
    );

    root.ok(&["stop", "-t", "1", "keeper"]);
    let stopped = inspect(&root, "keeper");
    assert_eq!(stopped["status"], "exited", "{stopped}");
    assert!(
        qemu_pids_mentioning(&root.path()).is_empty(),
        "stop leaves no VM"
    );
    root.ok(&["stop", "keeper"]);

    root.ok(&["start", &id]);
    let logs = wait_for_log(&root, &id, "boots=2");
    assert!(
        logs.contains("boots=1\n"),
        "the log keeps the first boot's output: {logs}"
    );

    root.ok(&["rm", "-f", "keeper"]);
    assert!(!upper.exists(), "rm removes the state directory");
    assert_eq!(root.ok(&["ps", "-a", "--json"]).trim(), "[]");
    let gone = root.run(&["inspect", &id]);
    assert!(!gone.status.success(), "{}", describe(&gone));
    // The name is free again.
    root.ok(&["create", "--name", "keeper", &demo_image(), "true"]);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_terminated_monitor_stops_the_sandbox_and_a_killed_one_reads_failed() {
    require_root();
    let root = new_root();
    let id = root
        .ok(&[
            "run",
            "-d",
            &demo_image(),
            "sh",
            "-c",
            "echo up; exec sleep 100000",
        ])
        .trim()
        .to_owned();
    wait_for_log(&root, &id, "up");

    // A plain SIGTERM to the monitor stops the sandbox as `kiln stop` does.
    let pid = inspect(&root, &id)["monitor_pid"]
        .as_u64()
        .expect("a running sandbox names its monitor");
    // SAFETY: kill has no memory-safety preconditions; the pid is the live monitor's.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while inspect(&root, &id)["status"] == "running" {
        assert!(
            Instant::now() < deadline,
            "SIGTERM did not stop the sandbox"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let stopped = inspect(&root, &id);
    assert_eq!(
        (&stopped["status"], &stopped["exit_code"]),
        (&"exited".into(), &143.into()),
        "{stopped}"
    );

    root.ok(&["start", &id]);
    let pid = inspect(&root, &id)["monitor_pid"]
        .as_u64()
        .expect("a running sandbox names its monitor");
    assert!(!qemu_pids_mentioning(&root.path()).is_empty());
    // SAFETY: kill has no memory-safety preconditions; the pid is the live monitor's.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };

    let deadline = Instant::now() + Duration::from_secs(30);
    while !qemu_pids_mentioning(&root.path()).is_empty() {
        assert!(Instant::now() < deadline, "QEMU outlived its monitor");
        thread::sleep(Duration::from_millis(100));
    }
    let listed: serde_json::Value =
        serde_json::from_str(&root.ok(&["ps", "-a", "--json"])).unwrap();
    assert_eq!(listed[0]["status"], "failed", "{listed}");
    assert_eq!(inspect(&root, &id)["status"], "failed");
    assert!(
        root.ok(&["ps"]).lines().all(|l| !l.contains(&id)),
        "a failed sandbox is not listed as running"
    );
    // A failed sandbox can be removed without -f.
    root.ok(&["rm", &id]);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn logs_follow_until_the_workload_ends() {
    require_root();
    let root = new_root();
    let id = root.ok(&[
        "run",
        "-d",
        &demo_image(),
        "sh",
        "-c",
        "echo one; sleep 3; echo two; exit 7",
    ]);
    let id = id.trim();
    let followed = root.run(&["logs", "-f", id]);
    assert!(followed.status.success(), "{}", describe(&followed));
    assert_eq!(text(&followed.stdout), "one\ntwo\n");
    let ended = inspect(&root, id);
    assert_eq!(ended["status"], "exited", "{ended}");
    assert_eq!(ended["exit_code"], 7, "{ended}");
    assert!(root
        .ok(&["ps", "-a", "--json"])
        .contains("\"exit_code\": 7"));
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_sandbox_kiln_run_kept_can_be_started_again() {
    require_root();
    let root = new_root();
    // While `kiln run` runs it in the foreground, the sandbox is running: start does
    // nothing (as docker start), and stop/exec say where it runs.
    let (mut foreground, first_line) = spawn_until_first_line(
        &root,
        &[
            "run",
            "--name",
            "fg",
            &demo_image(),
            "sh",
            "-c",
            "echo up; exec sleep 100000",
        ],
    );
    assert_eq!(first_line, "up\n");
    assert_eq!(inspect(&root, "fg")["status"], "running");
    let start = root.run(&["start", "fg"]);
    assert_eq!(start.status.code(), Some(0), "{}", describe(&start));
    assert_eq!(inspect(&root, "fg")["status"], "running");
    let stop = root.run(&["stop", "fg"]);
    assert!(
        text(&stop.stderr).contains("foreground"),
        "{}",
        describe(&stop)
    );
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
    unsafe { libc::kill(foreground.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(foreground.wait().unwrap().code(), Some(143));
    assert_eq!(inspect(&root, "fg")["exit_code"], 143);

    let script = "echo boot >> /sandbox/boots; echo boots=$(wc -l < /sandbox/boots); exit 3";
    let ran = root.run(&["run", "--name", "kept", &demo_image(), "sh", "-c", script]);
    assert_eq!(ran.status.code(), Some(3), "{}", describe(&ran));
    let kept = inspect(&root, "kept");
    assert_eq!(
        (&kept["status"], &kept["exit_code"]),
        (&"exited".into(), &3.into()),
        "{kept}"
    );
    root.ok(&["start", "kept"]);
    let logs = root.ok(&["logs", "-f", "kept"]);
    assert!(
        logs.contains("boots=2"),
        "the second boot sees the first one's file: {logs}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn ids_and_names_are_checked() {
    require_root();
    let root = new_root();
    let first = root
        .ok(&["create", "--name", "twin", &demo_image(), "true"])
        .trim()
        .to_owned();
    let duplicate = root.run(&["create", "--name", "twin", &demo_image(), "true"]);
    assert_eq!(duplicate.status.code(), Some(1), "{}", describe(&duplicate));
    let message = text(&duplicate.stderr);
    assert!(
        message.contains("twin") && message.contains(&first),
        "{message}"
    );

    for command in [
        &["start", "../x"][..],
        &["stop", "a/b"],
        &["rm", "a b"],
        &["logs", "../x"],
        &["exec", "a/b", "true"],
    ] {
        let output = root.run(command);
        assert_ne!(
            output.status.code(),
            Some(0),
            "{command:?}: {}",
            describe(&output)
        );
        assert!(
            text(&output.stderr).contains("A-Z a-z 0-9"),
            "{command:?}: {}",
            describe(&output)
        );
    }
    for command in [
        &["start", "nosuch"][..],
        &["stop", "nosuch"],
        &["rm", "nosuch"],
        &["logs", "nosuch"],
    ] {
        let output = root.run(command);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{command:?}: {}",
            describe(&output)
        );
        assert!(
            text(&output.stderr).contains("no such sandbox: nosuch"),
            "{command:?}: {}",
            describe(&output)
        );
    }
    let sandboxes: Vec<_> = fs::read_dir(root.path().join("sandboxes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != ".names")
        .collect();
    assert_eq!(sandboxes.len(), 1, "the refused create left nothing behind");
    // inspect falls back to images for what is not a sandbox.
    root.ok(&["inspect", &demo_image()]);

    // rm never deletes through a state directory swapped for a symlink.
    let victim = tempfile::tempdir().unwrap();
    fs::write(victim.path().join("keep"), "x").unwrap();
    let state_dir = root.path().join("sandboxes").join(&first);
    fs::rename(&state_dir, root.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(victim.path(), &state_dir).unwrap();
    let refused = root.run(&["rm", "-f", "twin"]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    assert!(
        text(&refused.stderr).contains("symlink"),
        "{}",
        describe(&refused)
    );
    assert!(victim.path().join("keep").exists());
    fs::remove_file(&state_dir).unwrap();
    fs::rename(root.path().join("moved"), &state_dir).unwrap();
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn start_boots_the_pinned_image_after_the_tag_moved() {
    require_root();
    let root = new_root();
    let demo = fixtures().demo();
    // A layout of our own whose `latest` we can move: the gzip image first.
    let layout = root.path().join("layout");
    let copy = Command::new("cp")
        .arg("-a")
        .arg(&demo.oci_gzip.path)
        .arg(&layout)
        .status()
        .unwrap();
    assert!(copy.success());
    let reference = format!("oci:{}:latest", layout.display());
    let id = root
        .ok(&[
            "create",
            &reference,
            "sh",
            "-c",
            "echo pinned; exec sleep 100000",
        ])
        .trim()
        .to_owned();
    let pinned = demo.oci_gzip.manifest_digest.clone();
    assert_eq!(inspect(&root, &id)["manifest_digest"], pinned.as_str());

    // Move `latest` to the zstd build of the same tree (another manifest digest) and
    // pull it, so the store's record of the reference now names the new digest.
    let blobs = demo.oci_zstd.path.join("blobs/sha256");
    for blob in fs::read_dir(&blobs).unwrap().flatten() {
        fs::copy(
            blob.path(),
            layout.join("blobs/sha256").join(blob.file_name()),
        )
        .unwrap();
    }
    fs::copy(
        demo.oci_zstd.path.join("index.json"),
        layout.join("index.json"),
    )
    .unwrap();
    root.ok(&["pull", "--pull", "always", &reference]);
    let image: serde_json::Value =
        serde_json::from_str(&root.ok(&["--json", "inspect", &reference])).unwrap();
    let moved = demo.oci_zstd.manifest_digest.as_str();
    assert_eq!(image["manifest_digest"], moved);
    // The built images are gone too: start rebuilds them from the store, by digest.
    fs::remove_dir_all(root.path().join("rootfs")).unwrap();

    root.ok(&["start", &id]);
    wait_for_log(&root, &id, "pinned");
    assert_eq!(inspect(&root, &id)["manifest_digest"], pinned.as_str());
    let built: Vec<String> = fs::read_dir(root.path().join("rootfs/v1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let hex = |digest: &str| digest.trim_start_matches("sha256:").to_owned();
    assert!(
        built.iter().any(|name| name.contains(&hex(&pinned))),
        "root image of the pinned digest: {built:?}"
    );
    assert!(
        built.iter().all(|name| !name.contains(&hex(moved))),
        "nothing built for the new tag: {built:?}"
    );
    root.ok(&["stop", "-t", "1", &id]);
}

/// `kiln -q exec ARGS` with `input` on its stdin.
fn exec_with_input(root: &KilnRoot, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let mut child = root
        .kiln()
        .arg("exec")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + KILN_TIMEOUT;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() >= deadline {
                    // SAFETY: kill has no memory-safety preconditions; the group is the
                    // child's own and the child is not reaped yet.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    output
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn exec_runs_commands_in_a_running_sandbox() {
    require_root();
    let root = new_root();
    let id = root.ok(&[
        "run",
        "-d",
        "--name",
        "execbox",
        &demo_image(),
        "sh",
        "-c",
        "echo up; exec sleep 100000",
    ]);
    let id = id.trim();
    wait_for_log(&root, id, "up");

    // Four sessions at once, each with its own output and exit code.
    let outputs: Vec<(i32, Output)> = thread::scope(|scope| {
        let handles: Vec<_> = (3..7)
            .map(|n| {
                let root = &root;
                scope.spawn(move || {
                    let script = format!("sleep 1; echo out-{n}; echo err-{n} >&2; exit {n}");
                    (n, root.run(&["exec", "execbox", "sh", "-c", &script]))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (n, output) in &outputs {
        assert_eq!(output.status.code(), Some(*n), "{}", describe(output));
        assert_eq!(
            text(&output.stdout),
            format!("out-{n}\n"),
            "{}",
            describe(output)
        );
        assert_eq!(
            text(&output.stderr),
            format!("err-{n}\n"),
            "{}",
            describe(output)
        );
    }

    // The sandbox identity, -e and -w, and stdin with -i.
    let facts = root.ok(&[
        "exec",
        "-e",
        "FROM_E=e value",
        "-w",
        "/tmp",
        id,
        "sh",
        "-c",
        "echo $(id -u):$(id -g) $FROM_E $(pwd)",
    ]);
    assert_eq!(facts, "10001:10001 e value /tmp\n");
    let echoed = exec_with_input(
        &root,
        &[
            "-i",
            id,
            "sh",
            "-c",
            "cat > /sandbox/kept; cat /sandbox/kept",
        ],
        b"typed in\n",
    );
    assert!(echoed.status.success(), "{}", describe(&echoed));
    assert_eq!(text(&echoed.stdout), "typed in\n");
    let terminal = root.ok(&["exec", "-t", id, "tty"]);
    assert!(
        terminal.starts_with("/dev/pts/"),
        "-t gives the command a terminal: {terminal:?}"
    );
    // kiln's SIGTERM goes to the command, whose death by it becomes 143.
    let (mut waiting, started) = spawn_until_first_line(
        &root,
        &["exec", id, "sh", "-c", "echo started; exec sleep 100000"],
    );
    assert_eq!(started, "started\n");
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
    unsafe { libc::kill(waiting.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(waiting.wait().unwrap().code(), Some(143));
    let missing = root.run(&["exec", id, "/no/such/program"]);
    assert_eq!(missing.status.code(), Some(127), "{}", describe(&missing));

    // A file written by exec survives stop/start; exec needs a running sandbox.
    root.ok(&["stop", "-t", "1", id]);
    let stopped = root.run(&["exec", id, "true"]);
    assert_eq!(stopped.status.code(), Some(125), "{}", describe(&stopped));
    assert!(
        text(&stopped.stderr).contains("not running"),
        "{}",
        describe(&stopped)
    );
    root.ok(&["start", id]);
    wait_for_log(&root, id, "up\nup");
    assert_eq!(root.ok(&["exec", id, "cat", "/sandbox/kept"]), "typed in\n");
    root.ok(&["rm", "-f", id]);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn volumes_given_at_create_are_shared_at_start() {
    require_root();
    let root = new_root();
    let shared = tempfile::tempdir().unwrap();
    let read_only = tempfile::tempdir().unwrap();
    fs::write(read_only.path().join("given"), "from the host\n").unwrap();
    let rw = format!("{}:/data", shared.path().display());
    let ro = format!("{}:/given:ro", read_only.path().display());
    let id = root.ok(&[
        "create",
        "-v",
        &rw,
        "-v",
        &ro,
        &demo_image(),
        "sh",
        "-c",
        "echo up; exec sleep 100000",
    ]);
    let id = id.trim();
    root.ok(&["start", id]);
    wait_for_log(&root, id, "up");
    root.ok(&["exec", id, "sh", "-c", "echo from the guest > /data/made"]);
    assert_eq!(
        fs::read_to_string(shared.path().join("made")).unwrap(),
        "from the guest\n"
    );
    assert_eq!(
        root.ok(&["exec", id, "cat", "/given/given"]),
        "from the host\n"
    );
    let refused = root.run(&["exec", id, "touch", "/given/new"]);
    assert_ne!(refused.status.code(), Some(0), "{}", describe(&refused));
    assert!(!read_only.path().join("new").exists());
    root.ok(&["stop", id]);
    // A volume's host directory that is gone fails the start before booting, naming it.
    let gone = shared.path().to_owned();
    drop(shared);
    let refused = root.run(&["start", id]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    assert!(
        text(&refused.stderr).contains(&gone.display().to_string()),
        "{}",
        describe(&refused)
    );
    assert!(qemu_pids_mentioning(&root.path()).is_empty());
    root.ok(&["rm", id]);
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn prune_keeps_a_pinned_image_and_start_names_it_when_it_is_gone() {
    require_root();
    let root = new_root();
    let id = root.ok(&["create", &demo_image(), "true"]);
    let id = id.trim();
    let pinned = &fixtures().demo().oci_gzip.manifest_digest;
    let manifest_blob = root
        .path()
        .join("store/blobs/sha256")
        .join(pinned.trim_start_matches("sha256:"));
    // rmi + prune keep what a sandbox is pinned to.
    root.ok(&["rmi", &demo_image()]);
    root.ok(&["prune"]);
    assert!(
        manifest_blob.is_file(),
        "prune removed the pinned image's manifest"
    );
    // A store lost some other way: start refuses, naming the digest.
    fs::remove_dir_all(root.path().join("store")).unwrap();
    fs::remove_dir_all(root.path().join("rootfs")).unwrap();
    let refused = root.run(&["start", id]);
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    assert!(
        text(&refused.stderr).contains(pinned.as_str()),
        "{}",
        describe(&refused)
    );
    assert!(qemu_pids_mentioning(&root.path()).is_empty());
    assert_eq!(
        inspect(&root, id)["status"],
        "created",
        "a refused start changes nothing"
    );
}
