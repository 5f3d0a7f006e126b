//! What the workload can reach of the guest itself, attacked for real (TCG boots of the
//! kernel and kiln-init's initramfs, through the `kiln` binary where a sandbox is needed):
//! world-writable device nodes an image carries for the guest's disks, /dev/kmsg and the
//! consoles open nothing (the root is nodev, and nosuid); "Kernel panic" text a workload
//! writes wherever it can, its own name in the kernel's OOM report included, does not make
//! kiln report a kernel panic, while QEMU's own report of a guest reset does; and user
//! namespaces are off unless `--allow-userns` asks for them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{
    demo_image, describe, facts, fixtures, guest_files, kill_process_group, qemu_pids_mentioning,
    require_root, run_ok, KilnRoot,
};
use kiln_protocol::{BootConfig, CHANNEL_PORT};
use kiln_vm::qemu::Qemu;
use kiln_vm::{Accel, Backend, Channel, GuestEnd, Network, VmSpec};

/// A boot under TCG takes 3-15 s; the rest is slack for a loaded two-core machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// The device nodes [`image_with_device_nodes`] puts under /nodes: name, type, major,
/// minor. virtio-blk disks are block major 254 in 16-minor steps (the guest has three:
/// root image, identity layer, writable disk); 1:11 is /dev/kmsg, whose lines reach the
/// serial console; 5:1 is /dev/console and 4:64 the serial port itself.
const NODES: [(&str, &str, u32, u32); 6] = [
    ("vda", "b", 254, 0),
    ("vdb", "b", 254, 16),
    ("vdc", "b", 254, 32),
    ("kmsg", "c", 1, 11),
    ("console", "c", 5, 1),
    ("ttyS0", "c", 4, 64),
];

/// A copy of the demo image with a layer holding [`NODES`] under /nodes, mode 0666, made
/// with mknod and umoci as an image author would.
fn image_with_device_nodes(dir: &Path) -> String {
    let layout = dir.join("with-nodes");
    let bundle = dir.join("bundle");
    let source = &fixtures().demo().oci_gzip;
    let image = format!("{}:{}", layout.display(), source.tag);
    let timeout = Duration::from_secs(120);
    run_ok(
        Command::new("cp").arg("-a").arg(&source.path).arg(&layout),
        timeout,
    );
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle),
        timeout,
    );
    let nodes = bundle.join("rootfs/nodes");
    std::fs::create_dir(&nodes).unwrap();
    for (name, kind, major, minor) in NODES {
        run_ok(
            Command::new("mknod")
                .args(["-m", "0666"])
                .arg(nodes.join(name))
                .args([kind, &major.to_string(), &minor.to_string()]),
            timeout,
        );
    }
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle),
        timeout,
    );
    format!("oci:{image}")
}

/// Prints each disk's number and serial, how each node under /nodes looks, what opening
/// it for reading and for writing gives, and the root mount's options.
const DEVICE_NODE_SCRIPT: &str = r#"
for disk in /sys/block/vd*; do echo "disk.${disk##*/}=$(cat $disk/dev),$(cat $disk/serial)"; done
try() { if err=$( (eval "$2") 2>&1 ); then echo "$1=opened"; else echo "$1=$err"; fi; }
for node in /nodes/*; do
  name=${node##*/}
  echo "$name.kind=$(stat -c '%F %t:%T %a' $node)"
  try "$name.read" "exec 3< $node"
  try "$name.write" "exec 3> $node"
done
awk '$5 == "/" { print "root_mount=" $6 }' /proc/self/mountinfo
"#;

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn device_nodes_from_the_image_open_nothing() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let image = image_with_device_nodes(root.temp_dir());
    // Not --rm: the sandbox gets its writable disk, the third virtio disk.
    let output = root.run(&[
        "run",
        "--network",
        "none",
        &image,
        "sh",
        "-c",
        DEVICE_NODE_SCRIPT,
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let facts = facts(&output.stdout);
    let report = describe(&output);

    // The nodes name the guest's real disks, the writable one included.
    let mut disks: Vec<&str> = facts
        .iter()
        .filter(|(key, _)| key.starts_with("disk."))
        .map(|(_, value)| value.as_str())
        .collect();
    disks.sort();
    assert_eq!(
        disks
            .iter()
            .map(|d| d.split(',').next().unwrap())
            .collect::<Vec<_>>(),
        ["254:0", "254:16", "254:32"],
        "{report}"
    );
    assert!(disks.iter().any(|d| d.ends_with(",upper")), "{report}");

    for (name, kind, major, minor) in NODES {
        let kind = if kind == "b" { "block" } else { "character" };
        assert_eq!(
            facts.get(&format!("{name}.kind")).map(String::as_str),
            Some(format!("{kind} special file {major:x}:{minor:x} 666").as_str()),
            "the image keeps its device nodes: {report}"
        );
        for access in ["read", "write"] {
            let result = &facts[&format!("{name}.{access}")];
            assert!(
                result.ends_with("Permission denied"),
                "opening /nodes/{name} for {access}: {result}; {report}"
            );
        }
    }
    let root_mount = &facts["root_mount"];
    for option in ["nodev", "nosuid"] {
        assert!(
            root_mount.split(',').any(|o| o == option),
            "the root is mounted {root_mount}, without {option}"
        );
    }
}

/// Kills kiln (and so its VM) and fails the test with `why`.
fn abandon(child: &mut Child, why: String) -> ! {
    kill_process_group(child);
    child.wait().unwrap();
    panic!("{why}");
}

/// Writes the forged line to stdout, stderr and every console node it may open, then gets
/// it into the kernel's own log: a program named after it (a script whose interpreter,
/// `sort -`, keeps all of /dev/zero in memory) is killed by the OOM killer, whose report
/// names it on the console. Prints `forged-done` and waits.
const FORGE_SCRIPT: &str = r#"
forged='Kernel panic - not syncing: forged by the workload'
echo "$forged"; echo "$forged" >&2
for node in /dev/kmsg /dev/console /dev/ttyS0; do
  if err=$( (echo "<0>$forged" > $node) 2>&1 ); then echo "$node=written"; else echo "$node=$err"; fi
done
hog="/tmp/$forged"
echo '#!/usr/bin/sort -' > "$hog"; chmod +x "$hog"
"$hog" < /dev/zero; echo "hog=$?"
echo forged-done
sleep 600
"#;

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn panic_text_from_the_workload_is_not_a_kernel_panic() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let mut child = root
        .kiln()
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            "--memory",
            "128",
            &demo_image(),
            "sh",
            "-c",
            FORGE_SCRIPT,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = thread::spawn(move || {
        let mut stderr = String::new();
        let _ = stderr_pipe.read_to_string(&mut stderr);
        stderr
    });
    let mut stdout = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while stdout.last().map(String::as_str) != Some("forged-done") {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => stdout.push(line),
            Err(_) => abandon(&mut child, format!("no forged-done; stdout: {stdout:?}")),
        }
    }
    let facts = facts(stdout.join("\n").as_bytes());
    for node in ["/dev/kmsg", "/dev/console", "/dev/ttyS0"] {
        if !facts[node].ends_with("Permission denied") {
            abandon(&mut child, format!("{node}: {}; {stdout:?}", facts[node]));
        }
    }
    // The attack's precondition: the forged words are on the host's console log.
    let console_log = root.sandbox_dirs()[0].join("console.log");
    let planted = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&console_log)
        .unwrap_or_default()
        .contains("Kernel panic")
    {
        if Instant::now() >= planted {
            abandon(
                &mut child,
                format!("the OOM report did not reach the console; stdout: {stdout:?}"),
            );
        }
        thread::sleep(Duration::from_millis(100));
    }

    // The VM now dies without a result, as it would if QEMU crashed.
    for pid in qemu_pids_mentioning(&root.path()) {
        // SAFETY: kill has no memory-safety preconditions; the pid is a QEMU this test's
        // kiln started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            abandon(
                &mut child,
                "kiln did not end after its VM was killed".into(),
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stderr = stderr.join().unwrap();
    let forged = "Kernel panic - not syncing: forged by the workload";
    assert!(stdout.iter().any(|l| l == forged), "{stdout:?}");
    assert!(
        stderr.contains(forged),
        "the workload's stderr still arrives: {stderr}"
    );
    assert_eq!(status.code(), Some(125), "{status}; stderr: {stderr}");
    assert!(
        stderr.contains("the VM exited") && !stderr.contains("kernel panicked"),
        "{stderr}"
    );
}

/// Boots `initramfs` under TCG with no disks and the default boot configuration, lets the
/// guest talk on the channel until it closes, and returns how QEMU says the guest ended.
fn guest_end_of_boot(initramfs: &Path) -> Option<GuestEnd> {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("channel.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let spec = VmSpec {
        kernel: guest_files().kernel.clone(),
        initramfs: initramfs.to_owned(),
        cmdline: BootConfig::default().kernel_args().unwrap(),
        disks: Vec::new(),
        shares: Vec::new(),
        cpus: 1,
        cpu_millis: 1000,
        memory_mib: 256,
        network: Network::None,
        channel: Channel {
            socket,
            port_name: CHANNEL_PORT.into(),
        },
        console_log: dir.path().join("console.log"),
        accel: Accel::Tcg,
    };
    let deadline = Instant::now() + BOOT_DEADLINE;
    let mut vm = Qemu::default().start(&spec).expect("starting QEMU");
    // QEMU connects as it starts; what the guest says there is not the point here.
    let mut channel = loop {
        match listener.accept() {
            Ok((channel, _)) => break channel,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("QEMU did not connect to the channel: {e}"),
        }
    };
    channel.set_nonblocking(false).unwrap();
    thread::spawn(move || std::io::copy(&mut channel, &mut std::io::sink()));
    let status = vm.wait_until(deadline).unwrap();
    let console = std::fs::read_to_string(&spec.console_log).unwrap_or_default();
    assert!(
        status.is_some(),
        "the guest did not end within {BOOT_DEADLINE:?}; console:\n{console}"
    );
    vm.guest_end()
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn qemu_tells_a_kernel_panic_from_a_power_off() {
    require_root();
    // kiln-init without a root image reports the boot error and powers off.
    assert_eq!(
        guest_end_of_boot(&guest_files().initramfs),
        Some(GuestEnd::PowerOff)
    );
    // An initramfs without /init: the kernel finds nothing to run and panics.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("dev")).unwrap();
    let cpio = dir.path().join("no-init.cpio");
    run_ok(
        Command::new("sh")
            .current_dir(&tree)
            .arg("-c")
            .arg("find . | cpio --quiet -o -H newc > \"$0\"")
            .arg(&cpio),
        Duration::from_secs(60),
    );
    assert_eq!(guest_end_of_boot(&cpio), Some(GuestEnd::Reset));
}

/// Tries `unshare -r` and prints the guest's user namespace limit.
const USERNS_SCRIPT: &str = r#"
echo "max=$(cat /proc/sys/user/max_user_namespaces)"
out=$(unshare -r id -u 2>&1); echo "status=$?"; echo "out=$out"
"#;

fn userns_run(root: &KilnRoot, flags: &[&str]) -> (Output, BTreeMap<String, String>) {
    let image = demo_image();
    let mut args = vec!["run", "--rm", "--network", "none"];
    args.extend_from_slice(flags);
    args.extend([image.as_str(), "sh", "-c", USERNS_SCRIPT]);
    let output = root.run(&args);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let facts = facts(&output.stdout);
    (output, facts)
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn user_namespaces_only_with_allow_userns() {
    require_root();
    let root = KilnRoot::with_guest().quiet();

    let (output, default) = userns_run(&root, &[]);
    let report = describe(&output);
    assert_eq!(default["max"], "0", "{report}");
    assert_ne!(default["status"], "0", "unshare -r worked: {report}");
    // ENOSPC: the namespace limit refused it, not a kernel without user namespaces.
    assert!(
        default["out"].contains("No space left on device"),
        "{report}"
    );

    let (output, allowed) = userns_run(&root, &["--allow-userns"]);
    let report = describe(&output);
    assert_ne!(allowed["max"], "0", "{report}");
    assert_eq!(
        (allowed["status"].as_str(), allowed["out"].as_str()),
        ("0", "0"),
        "uid 0 inside the namespace: {report}"
    );
}
