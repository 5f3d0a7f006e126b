//! Docker's guest-side flags and commands against the real `kiln` binary and real TCG
//! boots of the demo fixture image (issue 19): the guest's names (`-h/--hostname`, the
//! default short id, `/etc/hosts`, `--add-host`, `--dns`), its mounts (`--read-only`,
//! `--tmpfs`, `--mount`), and what a bad value says before anything boots; and the
//! commands that ask a running sandbox's guest: `logs --tail/--since/-t`, `top`, `stats`
//! and `cp` both ways.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{demo_image, describe, facts, require_root, text, KilnRoot};

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn hostname_hosts_and_dns_are_the_guests() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let script = "echo host=$(hostname); echo resolves=$(hostname -i); \
                  echo hosts=$(cat /etc/hosts | tr '\\t\\n' ' |'); \
                  echo resolv=$(cat /etc/resolv.conf | tr '\\n' '|'); \
                  echo etc_hostname=$(cat /etc/hostname)";
    let output = root.run(&[
        "run",
        "--rm",
        "-h",
        "web1",
        "--add-host",
        "db.internal:10.1.2.3",
        "--add-host",
        "v6:2001:db8::7",
        "--dns",
        "192.0.2.53",
        "--dns",
        "192.0.2.54",
        &demo_image(),
        "sh",
        "-c",
        script,
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(text(&output.stderr), "", "{}", describe(&output));
    let seen = facts(&output.stdout);
    assert_eq!(seen["host"], "web1");
    assert_eq!(seen["etc_hostname"], "web1");
    assert_eq!(seen["resolves"], "10.0.2.15", "{}", describe(&output));
    assert_eq!(
        seen["hosts"],
        "127.0.0.1 localhost|::1 localhost ip6-localhost ip6-loopback|10.0.2.15 web1|\
         10.1.2.3 db.internal|2001:db8::7 v6|"
    );
    assert_eq!(
        seen["resolv"],
        "nameserver 192.0.2.53|nameserver 192.0.2.54|"
    );

    // Without -h the hostname is the sandbox id's first 12 characters, as docker's; the
    // network's own DNS server is the nameserver; localhost resolves.
    let output = root.run(&[
        "run",
        "--rm",
        &demo_image(),
        "sh",
        "-c",
        "echo host=$(hostname); echo own=$(grep -c \"$(hostname)\\$\" /etc/hosts); \
         echo resolv=$(cat /etc/resolv.conf)",
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    let seen = facts(&output.stdout);
    let host = &seen["host"];
    assert!(
        host.len() == 12 && host.bytes().all(|b| b.is_ascii_hexdigit()),
        "{}",
        describe(&output)
    );
    assert_eq!(seen["own"], "1");
    assert_eq!(seen["resolv"], "nameserver 10.0.2.3");
}

#[test]
fn bad_names_and_mounts_are_refused_before_boot() {
    let root = KilnRoot::without_guest();
    let image = demo_image();
    for (args, says) in [
        (
            vec!["--hostname", "no/slash"],
            "kiln: error: --hostname: invalid hostname \"no/slash\": expected 1-64 characters of A-Z a-z 0-9 . _ -\n",
        ),
        (
            vec!["--add-host", "db"],
            "kiln: error: --add-host: invalid extra host \"db\": expected NAME:IP",
        ),
        (
            vec!["--dns", "resolver.example"],
            "kiln: error: --dns: invalid DNS server \"resolver.example\": expected an IPv4 or IPv6 address",
        ),
        (
            vec!["--tmpfs", "/dev/x"],
            "kiln: error: --tmpfs: invalid tmpfs \"/dev/x\": guest path /dev/x is under /proc, /sys or /dev",
        ),
        (
            vec!["--tmpfs", "/t:mode=99"],
            "kiln: error: --tmpfs: invalid tmpfs \"/t:mode=99\": mode \"99\" is not octal up to 7777",
        ),
        (
            vec!["--mount", "type=volume,source=cache,target=/cache"],
            "kiln: error: --mount: invalid mount \"type=volume,source=cache,target=/cache\": kiln has no named volumes; share a host directory with type=bind",
        ),
        (
            vec!["--mount", "type=bind,source=/no/such/dir,target=/x"],
            "kiln: error: --mount: invalid mount \"type=bind,source=/no/such/dir,target=/x\": invalid volume",
        ),
        (
            vec!["--tmpfs", "/t", "--mount", "type=tmpfs,target=/t"],
            "kiln: error: --tmpfs: invalid tmpfs \"/t\": another volume or tmpfs is already mounted at /t",
        ),
    ] {
        let mut argv = vec!["run", "--rm"];
        argv.extend(&args);
        argv.extend([image.as_str(), "true"]);
        let output = root.run(&argv);
        assert_eq!(output.status.code(), Some(125), "{args:?}: {}", describe(&output));
        assert_eq!(text(&output.stdout), "", "{args:?}");
        assert!(
            text(&output.stderr).starts_with(says),
            "{args:?}: {}",
            describe(&output)
        );
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn read_only_root_keeps_volumes_and_tmpfs_writable() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let share = tempfile::tempdir().unwrap();
    fs::set_permissions(share.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let bind = format!("type=bind,source={},target=/data", share.path().display());
    let script = "touch /sandbox/x 2>/dev/null; echo home=$?; \
                  touch /etc/x 2>/dev/null; echo etc=$?; \
                  echo hi > /scratch/f && echo scratch=$(cat /scratch/f); \
                  echo mode=$(stat -c %a /scratch) small=$(stat -c %a /small); \
                  echo size=$(grep ' /small ' /proc/mounts | grep -o 'size=[0-9]*k'); \
                  echo t2=$(touch /t2/f && echo ok); \
                  echo tmp=$(touch /tmp/f && echo ok); \
                  echo out > /data/out && echo data=ok";
    let output = root.run(&[
        "run",
        "--rm",
        "--read-only",
        "--tmpfs",
        "/scratch",
        "--tmpfs",
        "/small:size=64k,mode=700",
        "--mount",
        &bind,
        "--mount",
        "type=tmpfs,target=/t2",
        &demo_image(),
        "sh",
        "-c",
        script,
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    let seen = facts(&output.stdout);
    assert_eq!(seen["home"], "1", "{}", describe(&output));
    assert_eq!(seen["etc"], "1");
    assert_eq!(seen["scratch"], "hi");
    assert_eq!(seen["mode"], "1777 small=700");
    assert_eq!(seen["size"], "size=64k");
    assert_eq!(seen["t2"], "ok");
    assert_eq!(seen["tmp"], "ok");
    assert_eq!(seen["data"], "ok");
    assert_eq!(
        fs::read_to_string(share.path().join("out")).unwrap(),
        "out\n"
    );

    // A read-only bind mount refuses the write; without --read-only the root is writable.
    let bind_ro = format!(
        "type=bind,source={},target=/data,readonly",
        share.path().display()
    );
    let output = root.run(&[
        "run",
        "--rm",
        "--mount",
        &bind_ro,
        &demo_image(),
        "sh",
        "-c",
        "echo x > /data/ro 2>/dev/null; echo data=$?; touch /sandbox/x; echo home=$?",
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    let seen = facts(&output.stdout);
    assert_eq!(seen["data"], "1", "{}", describe(&output));
    assert_eq!(seen["home"], "0");
    assert!(!share.path().join("ro").exists());
}

/// Polls `kiln logs ID` until its stdout contains `wanted`.
fn wait_for_log(root: &KilnRoot, id: &str, wanted: &str) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let logs = root.ok(&["logs", id]);
        if logs.contains(wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{wanted:?} never appeared in the logs of {id}: {logs}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// `kiln run -d` of the demo image running `script`; its id.
fn detached(root: &KilnRoot, script: &str) -> String {
    root.ok(&["run", "-d", &demo_image(), "sh", "-c", script])
        .trim()
        .to_owned()
}

/// An RFC 3339 UTC time with nanoseconds, as `kiln logs -t` starts a line with.
fn is_stamp(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 30
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            29 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn logs_top_and_stats_of_a_running_sandbox() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let id = detached(
        &root,
        "echo one; echo two; echo err >&2; sleep 2; echo three; exec sleep 100000",
    );
    wait_for_log(&root, &id, "three\n");

    // --tail counts each stream's lines; -t keeps each line's arrival time.
    let output = root.run(&["logs", "--tail", "1", &id]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(text(&output.stdout), "three\n");
    assert_eq!(text(&output.stderr), "err\n");
    let stamped = root.ok(&["logs", "-t", &id]);
    let lines: Vec<(&str, &str)> = stamped
        .lines()
        .map(|l| l.split_once(' ').unwrap())
        .collect();
    assert_eq!(
        lines.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        ["one", "two", "three"],
        "{stamped}"
    );
    assert!(lines.iter().all(|(t, _)| is_stamp(t)), "{stamped}");
    assert!(lines[0].0 < lines[2].0, "{stamped}");
    // --since the third line's time: only it; a duration ago: everything.
    assert_eq!(root.ok(&["logs", "--since", lines[2].0, &id]), "three\n");
    assert_eq!(
        root.ok(&["logs", "--since", "1h", &id]),
        "one\ntwo\nthree\n"
    );
    let error = root.fails(&["logs", "--since", "yesterday", &id], 2);
    assert!(
        error.starts_with("kiln: error: invalid time \"yesterday\": expected an RFC 3339 time"),
        "{error}"
    );
    let error = root.fails(&["logs", "--tail", "x", &id], 2);
    assert_eq!(
        error,
        "kiln: error: --tail \"x\": expected a number of lines or \"all\"\n"
    );

    // top: the guest's processes, the workload among them as the sandbox user.
    let output = root.run(&["top", &id]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(text(&output.stderr), "");
    let top = text(&output.stdout);
    let mut rows = top.lines();
    let header: Vec<&str> = rows.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["UID", "PID", "PPID", "STAT", "RSS(KiB)", "TIME", "CMD"]
    );
    let workload = rows
        .find(|row| row.ends_with(" sleep 100000"))
        .unwrap_or_else(|| panic!("no workload in {top}"));
    let columns: Vec<&str> = workload.split_whitespace().collect();
    assert_eq!(columns[0], "10001", "{workload}");
    assert_eq!(columns[3], "S", "{workload}");
    assert!(
        top.lines().any(|row| row.ends_with(" /init")),
        "init: {top}"
    );
    let error = root.fails(&["top", "nosuchbox"], 1);
    assert!(error.contains("nosuchbox"), "{error}");

    // stats: one sample pair of the VM's own counters.
    let output = root.run(&["--json", "stats", "--no-stream", &id]);
    assert!(output.status.success(), "{}", describe(&output));
    let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let row = &rows[0];
    assert_eq!(row["id"], id.as_str());
    let limit = row["memory_limit_bytes"].as_u64().unwrap();
    let used = row["memory_used_bytes"].as_u64().unwrap();
    assert!(limit > 300 << 20 && limit <= 512 << 20, "{row}");
    assert!(used > 0 && used < limit, "{row}");
    let cpu = row["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu), "{row}");
    assert!(row["processes"].as_u64().unwrap() >= 2, "{row}");
    let table = root.ok(&["stats", "--no-stream"]);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("ID "), "{table}");
    let line = lines.next().unwrap();
    assert!(line.starts_with(&id) && line.contains("MiB / "), "{table}");
    assert_eq!(lines.next(), None, "{table}");

    // Without --no-stream a table comes every second until kiln is stopped; its guest
    // task ends with the connection.
    let mut stats = root
        .kiln()
        .args(["stats", &id])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = stats.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut tables = 0;
    while tables < 3 {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("kiln stats prints a table every second");
        if line.starts_with("ID ") {
            tables += 1;
        } else {
            assert!(line.starts_with(&id), "{line}");
        }
    }
    // A task shows in top as init's binary run with "task" (top leaves itself out).
    let during = root.ok(&["top", &id]);
    assert!(during.contains("/proc/self/exe task "), "{during}");
    stats.kill().unwrap();
    stats.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while root.ok(&["top", &id]).contains("/proc/self/exe task ") {
        assert!(
            Instant::now() < deadline,
            "the stats task outlived kiln stats"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn cp_copies_both_ways_keeping_modes_and_mtimes() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();
    let id = detached(
        &root,
        "mkdir -p /sandbox/evil && ln -s /etc /sandbox/evil/etc && echo ready; \
         exec sleep 100000",
    );
    wait_for_log(&root, &id, "ready\n");

    // Into the guest: a directory with a file of mode 640 and an old mtime.
    let host = tempfile::tempdir().unwrap();
    let tree = host.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("sub/f"), "payload\n").unwrap();
    fs::set_permissions(tree.join("sub/f"), fs::Permissions::from_mode(0o640)).unwrap();
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options()
        .write(true)
        .open(tree.join("sub/f"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    let guest_dir = format!("{id}:/sandbox");
    let output = root.run(&["cp", tree.to_str().unwrap(), &guest_dir]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(text(&output.stdout), "");
    assert_eq!(text(&output.stderr), "");
    let seen = root.ok(&[
        "exec",
        &id,
        "sh",
        "-c",
        "stat -c '%a %Y %U' /sandbox/tree/sub/f; cat /sandbox/tree/sub/f",
    ]);
    assert_eq!(seen, "640 1000000000 sandbox\npayload\n");
    // A single file to a new name, its mode kept.
    let script = host.path().join("script.sh");
    fs::write(&script, "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o750)).unwrap();
    let to = format!("{id}:/sandbox/run.sh");
    let output = root.run(&["cp", script.to_str().unwrap(), &to]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(root.ok(&["exec", &id, "/sandbox/run.sh"]), "ran\n");
    assert_eq!(
        root.ok(&["exec", &id, "stat", "-c", "%a", "/sandbox/run.sh"]),
        "750\n"
    );
    fs::remove_file(&script).unwrap();

    // Out of the guest, to a new name: the same modes, mtimes and bytes.
    let back = host.path().join("back");
    let from = format!("{id}:/sandbox/tree");
    let output = root.run(&["cp", &from, back.to_str().unwrap()]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(text(&output.stderr), "");
    let file = back.join("sub/f");
    assert_eq!(fs::read_to_string(&file).unwrap(), "payload\n");
    let meta = fs::metadata(&file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.modified().unwrap(), old);
    // Into an existing directory: under the source's name; no staging left behind.
    let output = root.run(&[
        "cp",
        &format!("{id}:/sandbox/tree/sub/f"),
        host.path().to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        fs::read_to_string(host.path().join("f")).unwrap(),
        "payload\n"
    );
    let mut names: Vec<String> = fs::read_dir(host.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["back", "f", "tree"]);

    // A guest symlink to /etc comes out as a symlink, never followed on the host.
    let evil = host.path().join("evil");
    let output = root.run(&["cp", &format!("{id}:/sandbox/evil"), evil.to_str().unwrap()]);
    assert!(output.status.success(), "{}", describe(&output));
    let link = fs::symlink_metadata(evil.join("etc")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(fs::read_link(evil.join("etc")).unwrap(), Path::new("/etc"));

    // What the guest lacks or refuses is the guest's error; a bad pair is the user's.
    let error = root.fails(
        &["cp", &format!("{id}:/no/such"), evil.to_str().unwrap()],
        1,
    );
    assert!(
        error.starts_with(&format!(
            "kiln: error: sandbox {id}: archiving failed in the guest: /no/such: No such file"
        )),
        "{error}"
    );
    let error = root.fails(&["cp", tree.to_str().unwrap(), &format!("{id}:/etc")], 1);
    assert!(error.contains("Permission denied"), "{error}");
    let error = root.fails(&["cp", "a", "b"], 2);
    assert!(
        error.contains("exactly one of SRC and DEST must be SANDBOX:/PATH"),
        "{error}"
    );
    let error = root.fails(&["cp", &format!("{id}:relative"), "b"], 2);
    assert!(error.contains("PATH absolute"), "{error}");
}
