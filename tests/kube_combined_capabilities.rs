//! The combined topology's agent container keeps only the capabilities `kiln kube render`
//! puts in its `capabilities.add`, and this test shows each one is needed and together
//! they are enough: the real static kiln-supervisor runs `--mode full` as root in a
//! chroot (a busybox root standing in for the agent image), with a bounding set of exactly
//! those capabilities and no_new_privs set — what the container runtime gives the pod —
//! and must drop to the sandbox ids, chown /sandbox (which holds a 0700 directory of the
//! sandbox user, as a seeded workspace does) and run the workload with no capability
//! left. Without any single one of them it must fail before running the workload.
//!
//! Needs root, capsh (libcap2-bin) and unshare (util-linux). The supervisor is
//! $KILN_SUPERVISOR_BIN, else what scripts/build-supervisor builds.

use std::fs;
use std::os::unix::fs::{chown, symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kiln_e2e::{kiln_bin, require_root, run_ok, run_with_timeout, workspace_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
const UID: u32 = 10001;
const GID: u32 = 10001;

fn static_supervisor() -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_SUPERVISOR_BIN") {
        return PathBuf::from(path);
    }
    let output = run_ok(
        &mut Command::new(workspace_root().join("scripts/build-supervisor")),
        BUILD_TIMEOUT,
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// The capabilities the rendered combined pod adds, as capsh names them (`cap_chown`),
/// with egress not enforced: NET_ADMIN, added for the rules when it is, is exercised by
/// tests/kube_network.rs (the supervisor installs the rules with exactly these six).
fn rendered_capabilities() -> Vec<String> {
    let mut command = Command::new(kiln_bin());
    command.args([
        "--json",
        "kube",
        "render",
        "--image",
        "agent",
        "--name",
        "demo",
        "--namespace",
        "team-a",
        "--supervisor-image",
        "supervisor",
        "--topology",
        "combined",
        "--egress",
        "none",
        "--",
        "sh",
    ]);
    // A List: the pod, then the NetworkPolicy that denies its egress.
    let list: Value = serde_json::from_slice(&run_ok(&mut command, TIMEOUT).stdout).unwrap();
    let pod = &list["items"][0];
    assert_eq!(pod["kind"], "Pod");
    let agent = &pod["spec"]["containers"][0];
    assert_eq!(
        agent["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("cap_{}", c.as_str().unwrap().to_ascii_lowercase()))
        .collect()
}

/// A minimal agent root: busybox, an /etc/passwd with root only, the supervisor at
/// /kiln/bin, and /sandbox holding a root-owned file and the sandbox user's 0700 `.ssh`.
fn agent_root(dir: &Path, supervisor: &Path) -> PathBuf {
    let root = dir.join("root");
    for sub in ["bin", "etc", "proc", "tmp", "kiln/bin", "sandbox/.ssh"] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "id", "grep"] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::copy(supervisor, root.join("kiln/bin/kiln-supervisor")).unwrap();
    root
}

/// Resets /sandbox to what a freshly seeded workspace plus an image file look like.
fn reset_sandbox(root: &Path) {
    let sandbox = root.join("sandbox");
    fs::write(sandbox.join("from-image"), "x").unwrap();
    fs::write(sandbox.join(".ssh/key"), "secret").unwrap();
    chown(&sandbox, Some(0), Some(0)).unwrap();
    chown(sandbox.join("from-image"), Some(0), Some(0)).unwrap();
    for path in [sandbox.join(".ssh"), sandbox.join(".ssh/key")] {
        chown(&path, Some(UID), Some(GID)).unwrap();
    }
    fs::set_permissions(sandbox.join(".ssh"), fs::Permissions::from_mode(0o700)).unwrap();
}

/// Runs the supervisor in `root` with a bounding set of exactly `keep` (capsh names).
fn run_supervisor(root: &Path, keep: &[String]) -> Output {
    let all = [
        "cap_chown",
        "cap_dac_override",
        "cap_dac_read_search",
        "cap_fowner",
        "cap_fsetid",
        "cap_kill",
        "cap_setgid",
        "cap_setuid",
        "cap_setpcap",
        "cap_linux_immutable",
        "cap_net_bind_service",
        "cap_net_broadcast",
        "cap_net_admin",
        "cap_net_raw",
        "cap_ipc_lock",
        "cap_ipc_owner",
        "cap_sys_module",
        "cap_sys_rawio",
        "cap_sys_chroot",
        "cap_sys_ptrace",
        "cap_sys_pacct",
        "cap_sys_admin",
        "cap_sys_boot",
        "cap_sys_nice",
        "cap_sys_resource",
        "cap_sys_time",
        "cap_sys_tty_config",
        "cap_mknod",
        "cap_lease",
        "cap_audit_write",
        "cap_audit_control",
        "cap_setfcap",
        "cap_mac_override",
        "cap_mac_admin",
        "cap_syslog",
        "cap_wake_alarm",
        "cap_block_suspend",
        "cap_audit_read",
        "cap_perfmon",
        "cap_bpf",
        "cap_checkpoint_restore",
    ];
    let drop: Vec<&str> = all
        .iter()
        .copied()
        .filter(|c| !keep.iter().any(|k| k == c))
        .collect();
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--pid", "--fork"])
        .arg(format!("--mount-proc={}", root.join("proc").display()))
        .arg("capsh")
        .arg(format!("--chroot={}", root.display()))
        .arg(format!("--drop={}", drop.join(",")))
        .args(["--no-new-privs", "--shell=/bin/sh", "--", "-c"])
        .arg(
            "exec /kiln/bin/kiln-supervisor --mode full -- /bin/sh -c \
             'id -u; id -g; id -G; grep -E \"^(CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):\" /proc/self/status'",
        )
        .env("SANDBOX_UID", UID.to_string())
        .env("SANDBOX_GID", GID.to_string());
    run_with_timeout(&mut command, TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn combined_agent_capabilities_are_needed_and_enough() {
    require_root();
    let keep = rendered_capabilities();
    let dir = tempfile::tempdir().unwrap();
    let root = agent_root(dir.path(), &static_supervisor());

    reset_sandbox(&root);
    let output = run_supervisor(&root, &keep);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{keep:?}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..3],
        [UID.to_string(), GID.to_string(), GID.to_string()],
        "{stdout}"
    );
    for field in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(
            lines.contains(&format!("{field}:\t0000000000000000").as_str()),
            "{field}: {stdout}"
        );
    }
    assert!(lines.contains(&"NoNewPrivs:\t1"), "{stdout}");
    for path in [
        "sandbox",
        "sandbox/from-image",
        "sandbox/.ssh",
        "sandbox/.ssh/key",
    ] {
        let meta = fs::symlink_metadata(root.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{path}");
    }

    for missing in &keep {
        reset_sandbox(&root);
        let fewer: Vec<String> = keep.iter().filter(|c| *c != missing).cloned().collect();
        let output = run_supervisor(&root, &fewer);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(125),
            "without {missing} the supervisor must fail: {stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "without {missing} no workload runs"
        );
        eprintln!("without {missing}: {}", stderr.trim());
    }
}
