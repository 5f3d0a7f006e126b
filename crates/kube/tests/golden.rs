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
use kiln_kube::{render_pod, Egress, NamespaceInfo, SandboxConfig};
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
            name: "sidecar-policy",
            config: config(
                "sidecar",
                &format!("namespace = \"team-a\"\npolicy = \"{}\"\n", policy_file()),
            ),
            namespace: None,
        },
        Case {
            name: "combined-policy-configmap",
            config: config(
                "combined",
                "namespace = \"team-a\"\npolicy_configmap = \"team-policy\"\n",
            ),
            namespace: None,
        },
        Case {
            name: "sidecar-egress-none",
            config: config("sidecar", "namespace = \"team-a\"\negress = \"none\"\n"),
            namespace: None,
        },
        Case {
            name: "combined-egress-none",
            config: config("combined", "egress = \"none\"\n"),
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

fn policy_file() -> String {
    golden_dir()
        .join("network-policy.yaml")
        .display()
        .to_string()
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn rendered_yaml(case: &Case) -> String {
    let rendered = render_pod(&case.config, case.namespace.as_ref()).unwrap();
    rendered.to_yaml().unwrap()
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
    let sidecar = cases()
        .into_iter()
        .find(|c| c.name == "sidecar-default")
        .unwrap();
    let sidecar = &sidecar;
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

fn verdicts(case: &Case) -> (kiln_kube::RenderedPod, Vec<pss::ContainerVerdict>) {
    let rendered = render_pod(&case.config, case.namespace.as_ref()).unwrap();
    let verdicts = pss::check_pod(&rendered.pod);
    (rendered, verdicts)
}

#[test]
fn sidecar_pods_meet_restricted_except_network_init_which_the_check_names() {
    for case in cases()
        .into_iter()
        .filter(|c| c.name.starts_with("sidecar"))
    {
        let (rendered, verdicts) = verdicts(&case);
        let names: Vec<&str> = verdicts.iter().map(|v| v.name.as_str()).collect();
        let enforced = case.config.egress == Egress::Enforce;
        let mut expected = Vec::new();
        if enforced {
            expected.extend(["network-init", "network"]);
        }
        expected.push("install-supervisor");
        if case.config.workspace.is_some() {
            expected.push("seed-workspace");
        }
        expected.push("agent");
        assert_eq!(names, expected, "{}", case.name);
        for verdict in verdicts.iter().filter(|v| v.name != "network-init") {
            assert_eq!(
                verdict.level,
                Level::Restricted,
                "{} {}: {:?}",
                case.name,
                verdict.name,
                verdict.violations
            );
        }
        let needs = pss::admission_needs(&rendered.pod, &verdicts);
        if !enforced {
            assert_eq!(
                pss::pod_level(&verdicts),
                Level::Restricted,
                "{}",
                case.name
            );
            assert!(needs.is_empty(), "{}: {needs:?}", case.name);
            assert!(rendered.network_policy.is_some(), "{}", case.name);
            continue;
        }
        // NET_ADMIN is not even in Baseline's default set.
        let init = &verdicts[0];
        assert_eq!(init.level, Level::Privileged, "{}", case.name);
        assert!(init
            .violations
            .iter()
            .any(|v| v.level == Level::Baseline && v.detail.contains("NET_ADMIN")));
        assert_eq!(pss::pod_level(&verdicts), Level::Privileged);
        assert!(needs[0].starts_with("init container network-init meets only privileged: runs as uid 0 and adds capabilities NET_ADMIN"), "{needs:?}");
        assert!(
            needs
                .iter()
                .any(|n| n.contains("pod-security.kubernetes.io/enforce=privileged")),
            "{needs:?}"
        );
        assert!(
            needs
                .iter()
                .any(|n| n.contains("SCC with allowedCapabilities [NET_ADMIN]")),
            "{needs:?}"
        );
        assert!(
            needs.iter().any(|n| n.contains("--egress none")),
            "{needs:?}"
        );
    }
}

#[test]
fn combined_agent_meets_baseline_without_enforcement_and_the_checker_says_why() {
    for case in cases()
        .into_iter()
        .filter(|c| c.name.starts_with("combined"))
    {
        let (rendered, verdicts) = verdicts(&case);
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
        let capabilities = &agent.violations.last().unwrap().detail;
        assert!(capabilities.contains("SETUID"), "{capabilities}");
        if case.config.egress == Egress::Enforce {
            assert_eq!(agent.level, Level::Privileged, "{}", case.name);
            assert!(capabilities.contains("NET_ADMIN"), "{capabilities}");
            let needs = pss::admission_needs(&rendered.pod, &verdicts);
            assert!(needs[0].contains("container agent meets only privileged: runs as uid 0 and adds capabilities CHOWN, DAC_OVERRIDE, NET_ADMIN"), "{needs:?}");
            continue;
        }
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
        assert_eq!(pss::pod_level(&verdicts), Level::Baseline);
    }
}
