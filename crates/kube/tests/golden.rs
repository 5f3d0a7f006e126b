//! Golden pods for both topologies, each validated in strict mode by the PyPI package
//! kubernetes-validate for Kubernetes 1.29 (the first with native sidecars) and 1.37
//! (the newest it knows), and checked against the Pod Security Standards.
//!
//! Regenerate the golden files with `KILN_UPDATE_GOLDEN=1 cargo test -p kiln-kube --test golden`.
//! The validator lives in a venv made by scripts/setup-kubernetes-validate
//! ($KILN_KUBERNETES_VALIDATE_VENV, default ~/.cache/kiln/venv-kubernetes-validate); when it
//! is absent the validating tests fail, naming that script.

mod support;

use std::path::{Path, PathBuf};

use kiln_kube::pss::{self, Level};
use kiln_kube::{pod_to_yaml, render_pod, NamespaceInfo, SandboxConfig};
use support::{config, kubernetes_validate, namespace, validate};

const SCC_UID_RANGE: &str = "1000680000/10000";
const SCC_GROUPS: &str = "1000680000/10000,1000700000/100";
const WORKSPACE: &str = "[workspace]\nsize = \"10Gi\"\nstorage_class = \"fast-ssd\"\n";
const RESOURCES: &str = "[resources.requests]\ncpu = \"500m\"\nmemory = \"1Gi\"\n\
                         [resources.limits]\ncpu = \"2\"\nmemory = \"4Gi\"\n";

struct Case {
    name: &'static str,
    config: SandboxConfig,
    namespace: Option<NamespaceInfo>,
}

fn cases() -> Vec<Case> {
    let scc = || Some(namespace(Some(SCC_UID_RANGE), Some(SCC_GROUPS)));
    vec![
        Case {
            name: "combined-default",
            config: config("combined", "namespace = \"team-a\"\n"),
            namespace: None,
        },
        Case {
            name: "combined-scc",
            config: config(
                "combined",
                &format!("[env]\nLANG = \"C.UTF-8\"\n{WORKSPACE}{RESOURCES}"),
            ),
            namespace: scc(),
        },
        Case {
            name: "combined-runtime-class",
            config: config(
                "combined",
                &format!("runtime_class = \"gvisor\"\nsandbox_uid = 5000\n{WORKSPACE}"),
            ),
            namespace: Some(namespace(None, None)),
        },
        Case {
            name: "sidecar-default",
            config: config("sidecar", &format!("namespace = \"team-a\"\n{WORKSPACE}")),
            namespace: None,
        },
        Case {
            name: "sidecar-scc",
            config: config(
                "sidecar",
                &format!("[env]\nLANG = \"C.UTF-8\"\n{WORKSPACE}{RESOURCES}"),
            ),
            namespace: scc(),
        },
        Case {
            name: "sidecar-runtime-class",
            config: config(
                "sidecar",
                "runtime_class = \"kata\"\nsandbox_uid = 1000680005\nsandbox_gid = 1000700001\n",
            ),
            namespace: scc(),
        },
    ]
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn rendered_yaml(case: &Case) -> String {
    let rendered = render_pod(&case.config, case.namespace.as_ref()).unwrap();
    pod_to_yaml(&rendered.pod).unwrap()
}

#[test]
fn rendered_pods_match_golden_files() {
    let update = std::env::var_os("KILN_UPDATE_GOLDEN").is_some_and(|v| !v.is_empty());
    let mut mismatches = Vec::new();
    for case in cases() {
        let yaml = rendered_yaml(&case);
        let path = golden_dir().join(format!("{}.yaml", case.name));
        if update {
            std::fs::write(&path, &yaml).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with KILN_UPDATE_GOLDEN=1",
                path.display()
            )
        });
        if expected != yaml {
            mismatches.push(format!(
                "{}:\n--- expected\n{expected}\n--- rendered\n{yaml}",
                path.display()
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "golden mismatch (KILN_UPDATE_GOLDEN=1 regenerates):\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn every_rendered_pod_validates_strictly_on_oldest_and_newest_kubernetes() {
    let binary = kubernetes_validate();
    let dir = tempfile::tempdir().unwrap();
    for case in cases() {
        let file = dir.path().join(format!("{}.yaml", case.name));
        std::fs::write(&file, rendered_yaml(&case)).unwrap();
        for version in ["1.29.0", "1.37.0"] {
            if let Err(text) = validate(&binary, version, &file) {
                panic!("{} against Kubernetes {version}: {text}", case.name);
            }
        }
    }
    // The validator must be able to say no: an unknown field fails in strict mode, and a
    // native sidecar's restartPolicy fails on 1.27, before native sidecars existed.
    let sidecar = &cases()[3];
    let bogus = dir.path().join("bogus.yaml");
    std::fs::write(
        &bogus,
        rendered_yaml(sidecar).replace(
            "  restartPolicy: Never\n",
            "  restartPolicy: Never\n  bogus: 1\n",
        ),
    )
    .unwrap();
    assert!(validate(&binary, "1.37.0", &bogus)
        .unwrap_err()
        .contains("bogus"));
    let file = dir.path().join("sidecar.yaml");
    std::fs::write(&file, rendered_yaml(sidecar)).unwrap();
    assert!(validate(&binary, "1.27.0", &file)
        .unwrap_err()
        .contains("restartPolicy"));
}

#[test]
fn sidecar_pods_meet_restricted_in_every_container() {
    for case in cases()
        .into_iter()
        .filter(|c| c.name.starts_with("sidecar"))
    {
        let pod = render_pod(&case.config, case.namespace.as_ref())
            .unwrap()
            .pod;
        let verdicts = pss::check_pod(&pod);
        let names: Vec<&str> = verdicts.iter().map(|v| v.name.as_str()).collect();
        let expected: &[&str] = if case.config.workspace.is_some() {
            &["network", "install-supervisor", "seed-workspace", "agent"]
        } else {
            &["network", "install-supervisor", "agent"]
        };
        assert_eq!(names, expected, "{}", case.name);
        for verdict in &verdicts {
            assert_eq!(
                verdict.level,
                Level::Restricted,
                "{} {}: {:?}",
                case.name,
                verdict.name,
                verdict.violations
            );
        }
        assert_eq!(pss::pod_level(&verdicts), Level::Restricted);
    }
}

#[test]
fn combined_agent_meets_baseline_and_the_checker_says_why_not_restricted() {
    for case in cases()
        .into_iter()
        .filter(|c| c.name.starts_with("combined"))
    {
        let pod = render_pod(&case.config, case.namespace.as_ref())
            .unwrap()
            .pod;
        let verdicts = pss::check_pod(&pod);
        for verdict in verdicts.iter().filter(|v| v.name != "agent") {
            assert_eq!(
                verdict.level,
                Level::Restricted,
                "{} {}: {:?}",
                case.name,
                verdict.name,
                verdict.violations
            );
        }
        let agent = verdicts.iter().find(|v| v.name == "agent").unwrap();
        assert_eq!(agent.level, Level::Baseline, "{}", case.name);
        let reasons: Vec<(Level, &str, &str)> = agent
            .violations
            .iter()
            .map(|v| (v.level, v.rule, v.field.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    Level::Restricted,
                    "Running as Non-root",
                    "spec.containers[0].securityContext.runAsNonRoot"
                ),
                (
                    Level::Restricted,
                    "Running as Non-root user",
                    "spec.containers[0].securityContext.runAsUser"
                ),
                (
                    Level::Restricted,
                    "Capabilities",
                    "spec.containers[0].securityContext.capabilities.add"
                ),
            ],
            "{}",
            case.name
        );
        assert!(
            agent.violations[2].detail.contains("SETUID"),
            "{}",
            agent.violations[2].detail
        );
        assert_eq!(pss::pod_level(&verdicts), Level::Baseline);
    }
}
