//! `kiln kube render` end to end: a configuration file, flags over it and the namespace on
//! stdin give the same pod as kiln-kube's golden file; bad input exits 2 naming it; a
//! failed `--cluster` read exits 1; `--check` and `--json` print what they promise.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kiln_e2e::{kiln_bin, run_with_timeout, workspace_root};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

const CONFIG: &str = r#"
image = "registry.example/agent:1.0"
name = "demo"
supervisor_image = "registry.example/kiln-supervisor:0.1.0"
supervisor_topology = "combined"
command = ["sh"]

[workspace]
size = "1Gi"
storage_class = "fast-ssd"

[resources.requests]
cpu = "500m"
memory = "1Gi"

[resources.limits]
cpu = "2"
memory = "4Gi"
"#;

const NAMESPACE: &str = r#"{
  "apiVersion": "v1",
  "kind": "Namespace",
  "metadata": {
    "name": "team-a",
    "annotations": {
      "openshift.io/description": "test",
      "openshift.io/sa.scc.uid-range": "1000680000/10000",
      "openshift.io/sa.scc.supplemental-groups": "1000680000/10000,1000700000/100"
    }
  },
  "spec": {"finalizers": ["kubernetes"]},
  "status": {"phase": "Active"}
}"#;

/// Runs `kiln kube render ARGS` with `stdin` on standard input.
fn render(args: &[&str], stdin: &str) -> Output {
    let mut command = Command::new(kiln_bin());
    command
        .args(["kube", "render"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("starting kiln");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    // wait_with_output has no deadline; kiln render never blocks on anything but stdin.
    child.wait_with_output().unwrap()
}

fn config_file(dir: &Path, text: &str) -> String {
    let path = dir.join("sandbox.toml");
    fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Checks the exit code, that stderr mentions `needle`, and that no pod was printed.
fn assert_fails(output: &Output, code: i32, needle: &str) {
    assert_eq!(output.status.code(), Some(code), "{}", stderr(output));
    assert!(
        stderr(output).contains(needle),
        "expected {needle:?} in: {}",
        stderr(output)
    );
    assert!(output.stdout.is_empty(), "no output on failure");
}

#[test]
fn config_flags_and_stdin_namespace_give_the_golden_pod() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), CONFIG);
    let output = render(
        &[
            "--config",
            &config,
            "--namespace-json",
            "-",
            "--topology",
            "sidecar",
            "--workspace-size",
            "10Gi",
            "--env",
            "LANG=C.UTF-8",
            "--",
            "python3",
            "-m",
            "agent",
        ],
        NAMESPACE,
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let golden = workspace_root().join("crates/kube/tests/golden/sidecar-scc.yaml");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        fs::read_to_string(golden).unwrap()
    );
}

#[test]
fn check_and_json_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), CONFIG);
    let output = render(
        &[
            "--config",
            &config,
            "--namespace",
            "team-a",
            "--egress",
            "none",
            "--check",
        ],
        "",
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.starts_with("pod meets: baseline\n"), "{text}");
    assert!(text.contains("container agent: baseline\n"), "{text}");
    assert!(
        text.contains(
            "  not restricted: Capabilities: spec.containers[0].securityContext.capabilities.add"
        ),
        "{text}"
    );

    let output = render(
        &[
            "--json",
            "--config",
            &config,
            "--namespace",
            "team-a",
            "--topology",
            "sidecar",
            "--check",
        ],
        "",
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let needs = report["admission_needs"].as_array().unwrap();
    assert!(
        needs[0]
            .as_str()
            .unwrap()
            .starts_with("init container network-init meets only privileged"),
        "{needs:?}"
    );
    let levels: Vec<&str> = report["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["level"].as_str().unwrap())
        .collect();
    assert_eq!(
        levels,
        [
            "privileged",
            "restricted",
            "restricted",
            "restricted",
            "restricted"
        ]
    );

    // With egress none, the sidecar pod meets restricted and comes with a NetworkPolicy.
    let args = [
        "--json",
        "--config",
        &config,
        "--namespace",
        "team-a",
        "--topology",
        "sidecar",
        "--egress",
        "none",
    ];
    let output = render(&args, "");
    let list: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][1]["kind"], "NetworkPolicy");
    assert_eq!(list["items"][1]["spec"]["policyTypes"][0], "Egress");
    let output = render(&[&args[..], &["--check"]].concat(), "");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(report["admission_needs"].as_array().unwrap().is_empty());

    // A policy that does not validate is bad input, naming the file and the field.
    let bad = dir.path().join("bad.yaml");
    fs::write(&bad, "version: 1\nnetwork_policies:\n  x:\n    endpoints:\n      - { hots: a.test, port: 443 }\n").unwrap();
    let output = render(
        &[
            "--config",
            &config,
            "--namespace",
            "team-a",
            "--policy",
            bad.to_str().unwrap(),
        ],
        "",
    );
    assert_fails(&output, 2, "unknown field `hots`");
    let output = render(
        &[
            "--config",
            &config,
            "--namespace",
            "team-a",
            "--policy",
            bad.to_str().unwrap(),
            "--egress",
            "none",
        ],
        "",
    );
    assert_eq!(output.status.code(), Some(2));

    let output = render(
        &[
            "--json",
            "--config",
            &config,
            "--namespace",
            "team-a",
            "--uid",
            "5000",
        ],
        "",
    );
    let pod: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(
        pod["metadata"]["annotations"]["kiln/sandbox-uid-source"],
        "config"
    );
    assert_eq!(pod["spec"]["containers"][0]["env"][0]["value"], "5000");
}

#[test]
fn bad_input_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let unknown_key = config_file(dir.path(), &format!("{CONFIG}\nsandbox_user = 5\n"));
    let output = render(&["--config", &unknown_key, "--namespace", "team-a"], "");
    assert_fails(&output, 2, "unknown field `sandbox_user`");

    let config = config_file(dir.path(), CONFIG);
    let malformed = NAMESPACE.replace("1000680000/10000,1000700000/100", "1000680000/0");
    let output = render(&["--config", &config, "--namespace-json", "-"], &malformed);
    assert_fails(&output, 2, "openshift.io/sa.scc.supplemental-groups");

    let single = NAMESPACE.replace("\"1000680000/10000\"", "\"1000680000/1\"");
    let output = render(
        &[
            "--config",
            &config,
            "--namespace-json",
            "-",
            "--topology",
            "sidecar",
        ],
        &single,
    );
    assert_fails(&output, 2, "network sidecar uid");

    let output = render(
        &[
            "--config",
            &config,
            "--namespace",
            "team-a",
            "--uid",
            "0123",
        ],
        "",
    );
    assert_fails(&output, 2, "--uid");
}

#[test]
fn failed_cluster_read_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), CONFIG);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kubeconfig = dir.path().join("kubeconfig");
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: c\n  cluster:\n    \
             server: https://127.0.0.1:{port}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             users:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(kiln_bin());
    command.args([
        "kube",
        "render",
        "--config",
        &config,
        "--namespace",
        "team-a",
        "--cluster",
    ]);
    command.env("KUBECONFIG", &kubeconfig);
    let output = run_with_timeout(&mut command, TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert_fails(&output, 1, "reading namespace \"team-a\" from the cluster");
}
