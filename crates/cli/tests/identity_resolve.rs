//! `kiln identity resolve` end to end: the real binary, real files and stdin.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

const UID_RANGE: &str = "openshift.io/sa.scc.uid-range";
const GROUPS: &str = "openshift.io/sa.scc.supplemental-groups";

fn kiln(args: &[&str], stdin: Option<&str>) -> Output {
    let root = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root.path())
        .args(["identity", "resolve"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn resolve(args: &[&str], stdin: Option<&str>) -> Value {
    let out = kiln(args, stdin);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs with a bad input and returns stderr, asserting exit code 2 and empty stdout.
fn usage_error(args: &[&str], stdin: Option<&str>) -> String {
    let out = kiln(args, stdin);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn write_file(dir: &tempfile::TempDir, name: &str, value: &Value) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Shaped like `kubectl get ns NAME -o json` on OpenShift.
fn namespace(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "annotations": annotations,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"kubernetes.io/metadata.name": "agents"},
            "name": "agents",
            "resourceVersion": "12345",
            "uid": "0b5e3c0e-1f2a-4b4c-9d1e-2f3a4b5c6d7e"
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

#[test]
fn defaults_without_input() {
    assert_eq!(
        resolve(&[], None),
        json!({"uid": 10001, "gid": 10001, "uid_source": "default", "gid_source": "default", "warnings": []})
    );
}

#[test]
fn flags_are_config() {
    assert_eq!(
        resolve(&["--uid", "5000", "--gid", "6000"], None),
        json!({"uid": 5000, "gid": 6000, "uid_source": "config", "gid_source": "config", "warnings": []})
    );
    let only_uid = resolve(&["--uid", "2000000000"], None);
    assert_eq!(
        (&only_uid["uid"], &only_uid["gid_source"]),
        (&json!(2_000_000_000), &json!("default"))
    );
}

#[test]
fn namespace_object_annotations() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        &dir,
        "ns.json",
        &namespace(json!({
            "openshift.io/sa.scc.mcs": "s0:c26,c25",
            (UID_RANGE): "1000680000/10000",
            (GROUPS): "1000690000/10000,1000700000-1000700009"
        })),
    );
    assert_eq!(
        resolve(&["--annotations", &file], None),
        json!({"uid": 1000680000, "gid": 1000690000, "uid_source": UID_RANGE, "gid_source": GROUPS, "warnings": []})
    );
    // Explicit flags win; a uid outside the namespace's range is allowed but warned about.
    let out = resolve(&["--annotations", &file, "--uid", "10001"], None);
    assert_eq!(
        (&out["uid"], &out["uid_source"], &out["gid_source"]),
        (&json!(10001), &json!("config"), &json!(GROUPS))
    );
    let warning = out["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains(
            "uid 10001 from config lies outside the namespace's uid range 1000680000/10000"
        ),
        "{warning}"
    );
}

#[test]
fn namespace_without_annotations_is_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut ns = namespace(json!({}));
    ns["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    let file = write_file(&dir, "ns.json", &ns);
    assert_eq!(
        resolve(&["--annotations", &file], None)["uid_source"],
        json!("default")
    );
}

#[test]
fn flat_object_from_stdin_and_file() {
    let flat = json!({(UID_RANGE): " 2000-2999 "}).to_string();
    assert_eq!(
        resolve(&["--annotations", "-"], Some(&flat)),
        json!({"uid": 2000, "gid": 2000, "uid_source": UID_RANGE, "gid_source": UID_RANGE, "warnings": []})
    );
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        &dir,
        "flat.json",
        &json!({(GROUPS): "7000/5", "other": "x"}),
    );
    assert_eq!(
        resolve(&["--annotations", &file, "--gid", "7004"], None),
        json!({"uid": 10001, "gid": 7004, "uid_source": "default", "gid_source": "config", "warnings": []})
    );
}

#[test]
fn bad_flags_exit_2_quoting_the_value() {
    for (flag, value) in [
        ("--uid", "999"),
        ("--uid", "01000"),
        ("--gid", "0x3e8"),
        ("--gid", "sandbox"),
        ("--uid", ""),
    ] {
        let err = usage_error(&[flag, value], None);
        assert!(
            err.contains(&format!("{flag}: invalid id \"{value}\"")),
            "{err}"
        );
        assert!(
            err.contains("accepted: a decimal id from 1000 to 2000000000"),
            "{err}"
        );
    }
}

#[test]
fn bad_annotations_exit_2_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let malformed = write_file(
        &dir,
        "malformed.json",
        &namespace(json!({(UID_RANGE): "1000/0"})),
    );
    let err = usage_error(&["--annotations", &malformed], None);
    assert!(err.contains("invalid annotation openshift.io/sa.scc.uid-range=\"1000/0\": block 1 \"1000/0\": size is 0"), "{err}");
    // Malformed even though both ids are configured: never silently ignored.
    let err = usage_error(
        &["--annotations", "-", "--uid", "5000", "--gid", "5000"],
        Some(&json!({(GROUPS): "1000/10,"}).to_string()),
    );
    assert!(
        err.contains("invalid annotation openshift.io/sa.scc.supplemental-groups"),
        "{err}"
    );
    let low = write_file(&dir, "low.json", &json!({(UID_RANGE): "500/10"}));
    let err = usage_error(&["--annotations", &low], None);
    assert!(
        err.contains("uid 500 from annotation openshift.io/sa.scc.uid-range=\"500/10\" is outside"),
        "{err}"
    );

    let missing = dir.path().join("missing.json");
    let err = usage_error(&["--annotations", missing.to_str().unwrap()], None);
    assert!(
        err.contains("cannot read --annotations") && err.contains("missing.json"),
        "{err}"
    );

    for (stdin, expected) in [
        ("{not json", "is not valid JSON"),
        ("[]", "the top level is an array, not an object"),
        (r#"{"a": 1}"#, "annotation \"a\" is a number, not a string"),
        (
            r#"{"kind": "List", "metadata": {}, "items": []}"#,
            "kind is \"List\", not \"Namespace\"",
        ),
        (
            r#"{"metadata": {"annotations": ["x"]}}"#,
            "metadata.annotations is an array, not an object",
        ),
        (
            r#"{"metadata": "x"}"#,
            "metadata is a string, not an object",
        ),
    ] {
        let err = usage_error(&["--annotations", "-"], Some(stdin));
        assert!(err.contains(expected), "{stdin}: {err}");
        assert!(err.contains("accepted: a Namespace object"), "{err}");
    }
}
