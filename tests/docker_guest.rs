//! Docker's guest-side flags and commands against the real `kiln` binary and real TCG
//! boots of the demo fixture image (issue 19): the guest's names (`-h/--hostname`, the
//! default short id, `/etc/hosts`, `--add-host`, `--dns`), its mounts (`--read-only`,
//! `--tmpfs`, `--mount`), and what a bad value says before anything boots.

use std::fs;
use std::os::unix::fs::PermissionsExt;

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
         echo resolv=$(cat /etc/resolv.conf); echo local=$(hostname -i localhost 2>&1 || true)",
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
