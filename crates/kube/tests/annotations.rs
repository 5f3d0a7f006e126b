//! The OpenShift SCC annotation matrix through the renderer: which ids each pod gets,
//! which source its annotations record, and which namespaces are refused. Every pod
//! rendered here is also validated strictly by kubernetes-validate (1.29 and 1.37).

mod support;

use k8s_openapi::api::core::v1::{Container, Pod};
use kiln_identity::IdentityError;
use kiln_kube::{
    pod_to_yaml, render_pod, KubeError, GID_SOURCE_ANNOTATION, NETWORK_UID_SOURCE_ANNOTATION,
    UID_SOURCE_ANNOTATION,
};
use support::{config, kubernetes_validate, namespace, validate};

const UID_RANGE: &str = "openshift.io/sa.scc.uid-range";
const GROUPS: &str = "openshift.io/sa.scc.supplemental-groups";

/// What a pod says about its ids: (uid, uid source, gid, gid source, network uid and source).
#[derive(Debug, PartialEq, Eq)]
struct Ids {
    uid: i64,
    uid_source: String,
    gid: i64,
    gid_source: String,
    network: Option<(i64, String)>,
}

fn container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap()
}

fn env(container: &Container, name: &str) -> String {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap()
}

/// Reads the ids back out of the pod, checking that every place agrees.
fn ids(pod: &Pod) -> Ids {
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    let spec = pod.spec.as_ref().unwrap();
    let pod_context = spec.security_context.as_ref().unwrap();
    let gid = pod_context.fs_group.unwrap();
    let agent = container(pod, "agent");
    let uid: i64 = env(agent, "SANDBOX_UID").parse().unwrap();
    assert_eq!(env(agent, "SANDBOX_GID"), gid.to_string());
    let install = container(pod, "install-supervisor")
        .security_context
        .as_ref()
        .unwrap();
    assert_eq!(
        (install.run_as_user, install.run_as_group),
        (Some(uid), Some(gid))
    );
    let network = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "network")
        .map(|c| {
            let context = c.security_context.as_ref().unwrap();
            assert_eq!(context.run_as_user, context.run_as_group);
            (
                context.run_as_user.unwrap(),
                annotations[NETWORK_UID_SOURCE_ANNOTATION].clone(),
            )
        });
    Ids {
        uid,
        uid_source: annotations[UID_SOURCE_ANNOTATION].clone(),
        gid,
        gid_source: annotations[GID_SOURCE_ANNOTATION].clone(),
        network,
    }
}

fn expect(
    uid: i64,
    uid_source: &str,
    gid: i64,
    gid_source: &str,
    network: Option<(i64, &str)>,
) -> Ids {
    Ids {
        uid,
        uid_source: uid_source.to_owned(),
        gid,
        gid_source: gid_source.to_owned(),
        network: network.map(|(n, s)| (n, s.to_owned())),
    }
}

#[test]
fn accepted_annotations_give_ids_and_record_sources() {
    // (what, uid-range, supplemental groups, topology, expected ids)
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a str, Ids);
    let cases: Vec<Case> = vec![
        (
            "start/size",
            Some("1000680000/10000"),
            Some("1000690000/10000"),
            "sidecar",
            expect(
                1000680000,
                UID_RANGE,
                1000690000,
                GROUPS,
                Some((1000689999, UID_RANGE)),
            ),
        ),
        (
            "start-end",
            Some("1000680000-1000689999"),
            Some("1000690000-1000699999"),
            "sidecar",
            expect(
                1000680000,
                UID_RANGE,
                1000690000,
                GROUPS,
                Some((1000689999, UID_RANGE)),
            ),
        ),
        (
            "several supplemental blocks: the first gives the gid",
            Some("1000680000/10000"),
            Some("1000700000/100, 1000800000/100,5000-5009"),
            "combined",
            expect(1000680000, UID_RANGE, 1000700000, GROUPS, None),
        ),
        (
            "uid-range absent: default uid and network uid",
            None,
            Some("1000700000/100"),
            "sidecar",
            expect(
                10001,
                "default",
                1000700000,
                GROUPS,
                Some((10000, "default")),
            ),
        ),
        (
            "supplemental absent: gid from the uid range",
            Some("1000680000/10000"),
            None,
            "sidecar",
            expect(
                1000680000,
                UID_RANGE,
                1000680000,
                UID_RANGE,
                Some((1000689999, UID_RANGE)),
            ),
        ),
        (
            "both absent",
            None,
            None,
            "sidecar",
            expect(10001, "default", 10001, "default", Some((10000, "default"))),
        ),
        (
            "size 1 is enough for combined without egress enforcement",
            Some("1000680000/1"),
            None,
            "combined-no-egress",
            expect(1000680000, UID_RANGE, 1000680000, UID_RANGE, None),
        ),
        (
            "size 2 is the smallest for sidecar",
            Some("1000680000/2"),
            None,
            "sidecar",
            expect(
                1000680000,
                UID_RANGE,
                1000680000,
                UID_RANGE,
                Some((1000680001, UID_RANGE)),
            ),
        ),
    ];
    let validator = kubernetes_validate();
    let dir = tempfile::tempdir().unwrap();
    for (index, (what, uid_range, groups, topology, expected)) in cases.into_iter().enumerate() {
        let ns = namespace(uid_range, groups);
        let (topology, extra) = match topology {
            "combined-no-egress" => ("combined", "egress = \"none\"\n"),
            other => (other, ""),
        };
        let rendered = render_pod(&config(topology, extra), Some(&ns))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(ids(&rendered.pod), expected, "{what}");
        let file = dir.path().join(format!("{index}.yaml"));
        std::fs::write(&file, pod_to_yaml(&rendered.pod).unwrap()).unwrap();
        for version in ["1.29.0", "1.37.0"] {
            validate(&validator, version, &file)
                .unwrap_or_else(|text| panic!("{what} on {version}: {text}"));
        }
    }
}

#[test]
fn explicit_ids_win_and_annotations_still_give_the_network_uid() {
    let ns = namespace(Some("1000680000/10000"), Some("1000690000/10000"));
    let pod = render_pod(
        &config(
            "sidecar",
            "sandbox_uid = 1000680007\nsandbox_gid = 1000690003\n",
        ),
        Some(&ns),
    )
    .unwrap()
    .pod;
    assert_eq!(
        ids(&pod),
        expect(
            1000680007,
            "config",
            1000690003,
            "config",
            Some((1000689999, UID_RANGE))
        )
    );
}

fn identity_error(err: KubeError) -> IdentityError {
    match err {
        KubeError::Identity(inner) => inner,
        other => panic!("expected an identity error, got {other}"),
    }
}

#[test]
fn malformed_annotations_are_errors_never_defaults() {
    let cases = [
        (Some("abc"), None, UID_RANGE),
        (Some("1000680000/"), None, UID_RANGE),
        (Some("1000680000/10000"), Some("1000690000/10000,"), GROUPS),
        (None, Some("x-y"), GROUPS),
        (Some(""), None, UID_RANGE),
    ];
    for topology in ["combined", "sidecar"] {
        for (uid_range, groups, bad) in cases {
            let ns = namespace(uid_range, groups);
            // Also with explicit ids: a broken namespace is still an error.
            for extra in ["", "sandbox_uid = 5000\nsandbox_gid = 5000\n"] {
                let err = render_pod(&config(topology, extra), Some(&ns)).unwrap_err();
                let message = err.to_string();
                match identity_error(err) {
                    IdentityError::InvalidAnnotation { annotation, .. } => {
                        assert_eq!(annotation, bad, "{message}")
                    }
                    other => panic!("{uid_range:?} {groups:?}: {other}"),
                }
                assert!(message.contains(bad), "{message}");
            }
        }
    }
}

#[test]
fn size_zero_is_malformed() {
    for (uid_range, groups) in [(Some("1000680000/0"), None), (None, Some("1000690000/0"))] {
        let err =
            render_pod(&config("combined", ""), Some(&namespace(uid_range, groups))).unwrap_err();
        assert!(matches!(
            identity_error(err),
            IdentityError::InvalidAnnotation { .. }
        ));
    }
}

#[test]
fn size_one_with_enforced_egress_is_an_error() {
    let ns = namespace(Some("1000680000/1"), None);
    for topology in ["sidecar", "combined"] {
        let err = render_pod(&config(topology, ""), Some(&ns)).unwrap_err();
        assert!(matches!(err, KubeError::NetworkUid(_)), "{err}");
        let message = err.to_string();
        assert!(
            message.contains("1000680000/1") && message.contains("egress = \"none\""),
            "{message}"
        );
        // Without an enforcer there is no proxy uid to find.
        render_pod(&config(topology, "egress = \"none\"\n"), Some(&ns)).unwrap();
    }
    // The same with the start-end form.
    let ns = namespace(Some("1000680000-1000680000"), None);
    assert!(matches!(
        render_pod(&config("sidecar", ""), Some(&ns)),
        Err(KubeError::NetworkUid(_))
    ));
}

#[test]
fn values_over_the_kubernetes_limit_are_errors() {
    // Starts above 2^31-1, or past u32 altogether.
    for (uid_range, groups) in [
        (Some("2147483648/10"), None),
        (Some("1000680000/10000"), Some("2147483648/10")),
        (Some("4294967295/1"), None),
        (Some("4294967296/1"), None),
        (Some("4294967290/10"), None),
    ] {
        let ns = namespace(uid_range, groups);
        let err = render_pod(&config("combined", ""), Some(&ns)).unwrap_err();
        assert!(
            matches!(err, KubeError::Identity(_)),
            "{uid_range:?} {groups:?}: {err}"
        );
    }
    // A block that starts in range but ends above 2^31-1 cannot give the network uid.
    let ns = namespace(Some("2000000000/200000000"), None);
    render_pod(&config("combined", "egress = \"none\"\n"), Some(&ns)).unwrap();
    let err = render_pod(&config("sidecar", ""), Some(&ns)).unwrap_err();
    assert!(
        matches!(err, KubeError::NetworkUid(_)) && err.to_string().contains("2147483647"),
        "{err}"
    );
}

#[test]
fn network_uid_must_differ_from_the_sandbox_uid() {
    let err = render_pod(
        &config("sidecar", "sandbox_uid = 10000\n"),
        Some(&namespace(None, None)),
    )
    .unwrap_err();
    assert!(matches!(err, KubeError::NetworkUid(_)), "{err}");
    let ns = namespace(Some("1000680000/10000"), None);
    let err = render_pod(&config("sidecar", "sandbox_uid = 1000689999\n"), Some(&ns)).unwrap_err();
    assert!(err.to_string().contains("equals the sandbox uid"), "{err}");
}

#[test]
fn namespace_object_and_configuration_must_agree() {
    let err = render_pod(
        &config("combined", "namespace = \"team-b\"\n"),
        Some(&namespace(None, None)),
    )
    .unwrap_err();
    assert!(matches!(err, KubeError::NamespaceMismatch { .. }), "{err}");
    let err = render_pod(&config("combined", ""), None).unwrap_err();
    assert!(
        matches!(
            err,
            KubeError::MissingSetting {
                key: "namespace",
                ..
            }
        ),
        "{err}"
    );
}
