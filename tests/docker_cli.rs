//! Issue 19's listing, parsing and scripting items through the real `kiln` binary, as a
//! docker user types them: `ps`/`images` with `-q`, `--format`, `--no-trunc` and
//! `--filter`; id prefixes and several ids; `port`, `rename`, `system df`, `completion`;
//! `inspect` by image id; docker's size, CPU and port forms; `--env-file` lines docker
//! refuses; `prune`; `pull` offline; and a second `--root` that boots the installed
//! guest files. Each test asserts stdout, stderr and the exit status. Only the last test
//! boots a VM: `kiln create` pulls and builds but does not boot.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;

use kiln_e2e::{demo_image, describe, guest_files, require_root, text, KilnRoot};

/// `kiln ARGS` and its exit status, stdout and stderr.
fn run(root: &KilnRoot, args: &[&str]) -> (Option<i32>, String, String) {
    let output: Output = root.run(args);
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// Creates a sandbox (pull and build, no boot) and returns its id.
fn create(root: &KilnRoot, flags: &[&str]) -> String {
    let image = demo_image();
    let mut args = vec!["create"];
    args.extend_from_slice(flags);
    args.extend([image.as_str(), "sleep", "1000"]);
    let id = root.ok(&args).trim().to_owned();
    assert_eq!(id.len(), 12, "create prints the id: {id:?}");
    id
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn ps_lists_newest_first_and_scripts_with_quiet_format_and_filters() {
    require_root();
    let root = KilnRoot::without_guest();
    let older = create(
        &root,
        &[
            "--name",
            "web",
            "--label",
            "team=a",
            "-p",
            "127.0.0.1:8080:80/tcp",
            "-p",
            "9000",
        ],
    );
    // Whole seconds order the list: the second sandbox must be newer.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let newer = create(&root, &["--name", "db", "--label", "team=b"]);

    // -q is ids only, newest first, so `kiln rm -f $(kiln ps -aq)` works.
    assert_eq!(root.ok(&["ps", "-aq"]), format!("{newer}\n{older}\n"));
    assert_eq!(
        root.ok(&["ps", "-q"]),
        "",
        "created sandboxes are not running"
    );

    let (code, table, stderr) = run(&root, &["ps", "-a"]);
    assert_eq!((code, stderr.as_str()), (Some(0), ""), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    for column in [
        "SANDBOX ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PORTS",
        "NAMES",
    ] {
        assert!(lines[0].contains(column), "{table}");
    }
    assert!(
        lines[1].starts_with(&newer) && lines[2].starts_with(&older),
        "{table}"
    );
    // Columns line up: each starts where its header does (in characters: a cut
    // reference ends in the three-byte `…`).
    let status_at = lines[0].find("STATUS").unwrap();
    for line in &lines[1..] {
        let status: String = line.chars().skip(status_at).take(7).collect();
        assert_eq!(status, "Created", "{table}");
        assert!(line.contains("ago"), "CREATED is relative: {table}");
        assert!(
            line.contains('…'),
            "the long oci: reference is cut: {table}"
        );
    }
    assert!(
        lines[2].contains("127.0.0.1:8080->80/tcp, 127.0.0.1:"),
        "{table}"
    );
    let full = root.ok(&["ps", "-a", "--no-trunc", "--format", "{{.Image}}"]);
    assert_eq!(full, format!("{}\n{}\n", demo_image(), demo_image()));

    assert_eq!(
        root.ok(&["ps", "-a", "--format", "{{.Names}}:{{.State}}:{{.Labels}}"]),
        "db:created:team=b\nweb:created:team=a\n"
    );
    let rows: Vec<serde_json::Value> = root
        .ok(&["ps", "-a", "--format", "json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["ID"], older.as_str());
    assert_eq!(rows[1]["Status"], "Created");
    let table = root.ok(&["ps", "-a", "--format", "table {{.ID}}\\t{{.Names}}"]);
    assert_eq!(
        table.lines().next().unwrap(),
        "SANDBOX ID     NAMES",
        "{table}"
    );

    for (filter, want) in [
        ("label=team=a", vec![older.as_str()]),
        ("label=team", vec![newer.as_str(), older.as_str()]),
        ("name=we", vec![older.as_str()]),
        ("status=created", vec![newer.as_str(), older.as_str()]),
        ("status=running", vec![]),
    ] {
        let listed = root.ok(&["ps", "-aq", "--filter", filter]);
        assert_eq!(listed.lines().collect::<Vec<_>>(), want, "{filter}");
    }

    let (code, stdout, stderr) = run(&root, &["ps", "--format", "{{.Nope}}"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert!(
        stderr.contains("unknown field .Nope; accepted:") && stderr.contains("{{.Ports}}"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&root, &["ps", "--filter", "status=paused"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains(
            "--filter status=paused: unknown status; accepted: created, running, exited, failed"
        ),
        "{stderr}"
    );
    let (code, _, stderr) = run(&root, &["ps", "--filter", "size=1"]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--filter \"size=1\": unknown filter; accepted: id=VALUE"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn ids_take_prefixes_and_names_and_several_ids_continue_past_a_missing_one() {
    require_root();
    let root = KilnRoot::without_guest().quiet();
    // Sixteen first hex digits: among seventeen sandboxes two share one (usually far
    // fewer are needed), which makes an ambiguous prefix.
    let mut ids: Vec<String> = Vec::new();
    let (first, second) = loop {
        let id = create(&root, &[]);
        if let Some(other) = ids.iter().find(|o| o[..1] == id[..1]) {
            break (other.clone(), id);
        }
        ids.push(id);
    };
    let shared = &first[..first
        .chars()
        .zip(second.chars())
        .take_while(|(a, b)| a == b)
        .count()];
    let (code, _, stderr) = run(&root, &["inspect", shared]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("sandbox id prefix {shared:?} is ambiguous"))
            && stderr.contains(&first)
            && stderr.contains(&second),
        "{stderr}"
    );
    // One more digit than they share tells them apart.
    let unique = &first[..shared.len() + 1];
    let inspected: serde_json::Value =
        serde_json::from_str(&root.ok(&["inspect", unique])).unwrap();
    assert_eq!(inspected["id"], first.as_str());

    root.ok(&["rename", unique, "renamed"]);
    let renamed: serde_json::Value =
        serde_json::from_str(&root.ok(&["inspect", "renamed"])).unwrap();
    assert_eq!(renamed["id"], first.as_str());
    assert_eq!(renamed["name"], "renamed");
    let (code, _, stderr) = run(&root, &["rename", &second, "renamed"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("a sandbox named \"renamed\" already exists"),
        "{stderr}"
    );

    // rm of several: a missing one is reported, the others are still removed, exit 1.
    let (code, stdout, stderr) = run(&root, &["rm", "renamed", "nosuch", &second[..8]]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, format!("renamed\n{}\n", &second[..8]));
    assert_eq!(stderr, "kiln: error: no such sandbox: nosuch\n");
    let (code, _, stderr) = run(&root, &["stop", "nosuch", "gone"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        "kiln: error: no such sandbox: nosuch\nkiln: error: no such sandbox: gone\n"
    );

    // `kiln rm -f $(kiln ps -aq)`
    let all: Vec<String> = root.ok(&["ps", "-aq"]).lines().map(String::from).collect();
    // Created: `ids` and `second`; removed: `first` (of `ids`) and `second`.
    assert_eq!(all.len(), ids.len() - 1, "{all:?}");
    let mut args = vec!["rm", "-f"];
    args.extend(all.iter().map(String::as_str));
    root.ok(&args);
    assert_eq!(root.ok(&["ps", "-aq"]), "");
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn sizes_cpus_ports_and_labels_take_dockers_forms() {
    require_root();
    let root = KilnRoot::without_guest().quiet();
    let id = create(
        &root,
        &[
            "--cpus",
            "0.5",
            "-m",
            "1g",
            "-l",
            "a=1",
            "--label",
            "b",
            "-p",
            "8080",
            "-p",
            "127.0.0.1:8081:81",
        ],
    );
    let info: serde_json::Value = serde_json::from_str(&root.ok(&["inspect", &id])).unwrap();
    assert_eq!(
        (info["cpus"].as_u64(), info["millicpus"].as_u64()),
        (Some(1), Some(500))
    );
    assert_eq!(info["memory_mib"], 1024);
    assert_eq!(info["labels"], serde_json::json!({"a": "1", "b": ""}));
    assert_eq!(
        root.ok(&[
            "inspect",
            "--format",
            "{{.memory_mib}} {{json .labels}}",
            &id
        ]),
        "1024 {\"a\":\"1\",\"b\":\"\"}\n"
    );

    // `kiln port`: a free host port was chosen for 8080.
    let ports = root.ok(&["port", &id]);
    let lines: Vec<&str> = ports.lines().collect();
    assert_eq!(lines.len(), 2, "{ports}");
    let chosen: u16 = lines[0]
        .strip_prefix("8080/tcp -> 127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{ports}"));
    assert!(chosen > 0);
    assert_eq!(lines[1], "81/tcp -> 127.0.0.1:8081");
    assert_eq!(root.ok(&["port", &id, "81/tcp"]), "127.0.0.1:8081\n");
    let (code, stdout, stderr) = run(&root, &["port", &id, "82"]);
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert!(stderr.contains("no port 82/tcp of sandbox"), "{stderr}");
}

#[test]
fn bad_flag_values_name_the_flag_and_what_is_accepted() {
    let root = KilnRoot::without_guest();
    let env_file = root.temp_dir().join("vars.env");
    fs::write(&env_file, "A=1\nexport D=4\n").unwrap();
    let env_file = env_file.display().to_string();
    // Checked before the image is looked at: the image need not exist.
    let image = "oci:/nonexistent/image:latest";
    for (flags, code, message) in [
        (
            vec!["create", "--memory", "1x"],
            2,
            "--memory: invalid memory size \"1x\": expected a whole number with a unit b, k, m or g",
        ),
        (
            vec!["run", "-m", "1.5g"],
            125,
            "--memory: invalid memory size \"1.5g\"",
        ),
        (
            vec!["run", "--cpus", "abc"],
            125,
            "--cpus: invalid CPU count \"abc\": expected a number of CPUs from 0.001 to 64",
        ),
        (
            vec!["create", "-p", "53:53/udp"],
            2,
            "-p: invalid port forward \"53:53/udp\": only TCP is forwarded",
        ),
        (
            vec!["create", "-p", "0.0.0.0:80:80"],
            2,
            "the address must be 127.0.0.1",
        ),
        (
            vec!["create", "--env-file", &env_file],
            2,
            "vars.env, line 2: \"export D=4\": a variable name cannot contain white space; the format is one KEY=VALUE",
        ),
        (vec!["create", "--label", "=x"], 2, "--label: invalid label \"=x\""),
    ] {
        let mut args = flags.clone();
        args.push(image);
        let (status, stdout, stderr) = run(&root, &args);
        assert_eq!(status, Some(code), "{args:?}: {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn images_show_ids_human_sizes_and_relative_times_and_inspect_takes_an_image_id() {
    require_root();
    let root = KilnRoot::without_guest();
    let pulled = root.run(&["pull", &demo_image()]);
    assert!(pulled.status.success(), "{}", describe(&pulled));
    assert!(
        text(&pulled.stderr).contains("(linux/amd64, 1 layer)"),
        "the demo image has one layer: {}",
        describe(&pulled)
    );

    let table = root.ok(&["images"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for column in [
        "REFERENCE",
        "IMAGE ID",
        "PLATFORM",
        "CREATED",
        "PULLED",
        "SIZE",
    ] {
        assert!(lines[0].contains(column), "{table}");
    }
    assert!(
        lines[1].ends_with("MB") && lines[1].contains(" ago "),
        "human size, relative times: {table}"
    );
    let short = root.ok(&["-q", "images"]);
    let short = short.trim();
    assert_eq!(short.len(), 12, "{short}");
    let long = root.ok(&["-q", "images", "--no-trunc"]);
    assert!(
        long.trim().starts_with(&format!("sha256:{short}")),
        "{long}"
    );
    assert!(lines[1].contains(short), "{table}");

    for id in [short, long.trim(), &short[..6]] {
        let inspected: serde_json::Value =
            serde_json::from_str(&root.ok(&["inspect", id])).unwrap();
        assert_eq!(inspected["reference"], demo_image().as_str(), "{id}");
        assert_eq!(inspected["config_digest"], long.trim(), "{id}");
    }
    assert_eq!(
        root.ok(&["inspect", "--format", "{{.platform}}", &demo_image()]),
        "linux/amd64\n"
    );
    let (code, _, stderr) = run(&root, &["inspect", "--format", "{{.nope}}", short]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("unknown field .nope"), "{stderr}");

    assert_eq!(
        root.ok(&[
            "images",
            "--filter",
            "reference=*demo-gzip*",
            "--format",
            "{{.ID}}"
        ]),
        format!("{short}\n")
    );
    assert_eq!(
        root.ok(&["images", "--filter", "reference=*alpine*", "-q"]),
        ""
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn system_df_counts_and_prune_removes_the_root_images_of_removed_images() {
    require_root();
    let root = KilnRoot::without_guest();
    let id = create(&root, &[]);
    let df = root.ok(&["system", "df"]);
    let rows: Vec<Vec<&str>> = df
        .lines()
        .map(|l| {
            l.split("   ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        rows[0],
        ["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"],
        "{df}"
    );
    assert_eq!(&rows[1][..3], ["Images", "1", "1"], "{df}");
    assert_eq!(&rows[2][..3], ["Root images", "1", "1"], "{df}");
    assert_eq!(&rows[3][..3], ["Sandboxes", "1", "0"], "{df}");

    root.ok(&["rm", &id]);
    root.ok(&["rmi", &demo_image()]);
    let built = root.path().join("rootfs/v1");
    assert_eq!(fs::read_dir(&built).unwrap().count(), 1, "still built");
    let pruned = root.ok(&["prune"]);
    assert!(
        pruned.contains("removed the built root images of 1 image, freed"),
        "{pruned}"
    );
    let left: Vec<_> = fs::read_dir(&built)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "prune left {left:?}");
    let df = root.ok(&["--json", "system", "df"]);
    let usage: serde_json::Value = serde_json::from_str(&df).unwrap();
    assert_eq!(usage["root_images"]["bytes"], 0, "{df}");
}

#[test]
fn completion_scripts_come_from_the_command_line_definition() {
    let root = KilnRoot::without_guest();
    for (shell, marker) in [
        ("bash", "_kiln()"),
        ("zsh", "#compdef kiln"),
        ("fish", "complete -c kiln"),
    ] {
        let script = root.ok(&["completion", shell]);
        assert!(script.contains(marker), "{shell}: {script}");
        for command in ["ps", "rename", "port"] {
            assert!(script.contains(command), "{shell} completes {command}");
        }
    }
    let (code, stdout, stderr) = run(&root, &["completion", "tcsh"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""));
    assert!(
        stderr.contains("[possible values: bash, zsh, fish]"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn pull_without_a_network_names_the_dns_failure() {
    require_root();
    let root = KilnRoot::without_guest();
    // A network namespace of its own, with no interface up: no lookup leaves the test.
    let output = kiln_e2e::run_with_timeout(
        std::process::Command::new("unshare")
            .args(["--net", "--"])
            .arg(kiln_e2e::kiln_bin())
            .args(["pull", "registry.example.invalid/x:1"])
            .env("KILN_ROOT", root.path())
            .env("HOME", root.home()),
        kiln_e2e::KILN_TIMEOUT,
    )
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("registry.example.invalid")
            && stderr.contains("dns error")
            && stderr.contains("name resolution"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_second_root_boots_the_installed_guest_and_ps_shows_it_up_with_its_ports() {
    require_root();
    // The default root (under this test's HOME) holds the installed guest files, as
    // scripts/build-guest installs them; the sandbox runs under another --root.
    let installed = KilnRoot::without_guest();
    let cache = installed.home().join(".cache");
    let guest = cache.join("kiln/guest");
    fs::create_dir_all(&guest).unwrap();
    for dir in [cache.join("kiln"), guest.clone()] {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    }
    let files = guest_files();
    for (from, name) in [(&files.kernel, "kernel"), (&files.initramfs, "initramfs")] {
        fs::copy(from, guest.join(name)).unwrap();
        fs::set_permissions(guest.join(name), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let second = installed.temp_dir().join("second");
    fs::create_dir(&second).unwrap();
    fs::set_permissions(&second, fs::Permissions::from_mode(0o700)).unwrap();
    let second = second.display().to_string();
    let kiln = |args: &[&str]| {
        let mut command = installed.kiln();
        command
            .env_remove("XDG_CACHE_HOME")
            .arg("--root")
            .arg(&second)
            .args(args);
        kiln_e2e::run_with_timeout(&mut command, kiln_e2e::KILN_TIMEOUT).unwrap()
    };

    let doctor = kiln(&["doctor"]);
    let report = text(&doctor.stdout);
    for name in ["kernel", "initramfs"] {
        let line = report
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line: {report}"));
        assert!(
            line.trim_start().starts_with("ok") && line.contains(&guest.display().to_string()),
            "{name} is found installed: {report}"
        );
    }

    let started = kiln(&[
        "-q",
        "run",
        "-d",
        "-p",
        "8080",
        &demo_image(),
        "sleep",
        "1000",
    ]);
    assert!(started.status.success(), "{}", describe(&started));
    let id = text(&started.stdout).trim().to_owned();
    let listed = kiln(&["ps", "--format", "{{.ID}}|{{.Status}}|{{.Ports}}"]);
    let row = text(&listed.stdout);
    let fields: Vec<&str> = row.trim().split('|').collect();
    assert_eq!(fields[0], id, "{row}");
    assert!(fields[1].starts_with("Up "), "{row}");
    assert!(
        fields[2].starts_with("127.0.0.1:") && fields[2].ends_with("->8080/tcp"),
        "{row}"
    );
    let ids: BTreeSet<String> = text(&kiln(&["ps", "-q"]).stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(ids, BTreeSet::from([id.clone()]));
    let removed = kiln(&["rm", "-f", &id[..5]]);
    assert!(removed.status.success(), "{}", describe(&removed));
    assert_eq!(text(&kiln(&["ps", "-aq"]).stdout), "");

    // An ended workload: "Exited (3) ... ago", found by its status.
    let ended = kiln(&["-q", "run", "-d", &demo_image(), "sh", "-c", "exit 3"]);
    assert!(ended.status.success(), "{}", describe(&ended));
    let id = text(&ended.stdout).trim().to_owned();
    let deadline = std::time::Instant::now() + kiln_e2e::KILN_TIMEOUT;
    let status = loop {
        let listed = kiln(&[
            "ps",
            "-a",
            "--filter",
            "status=exited",
            "--format",
            "{{.ID}} {{.Status}}",
        ]);
        let row = text(&listed.stdout);
        if !row.is_empty() || std::time::Instant::now() > deadline {
            break row;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        status.starts_with(&format!("{id} Exited (3) ")) && status.trim_end().ends_with(" ago"),
        "{status}"
    );
    assert!(kiln(&["rm", &id]).status.success());

    // A foreground run under the second root boots the installed guest too.
    let foreground = kiln(&["-q", "run", "--rm", &demo_image(), "echo", "hi"]);
    assert_eq!(
        foreground.status.code(),
        Some(0),
        "{}",
        describe(&foreground)
    );
    assert_eq!(text(&foreground.stdout), "hi\n");
}
