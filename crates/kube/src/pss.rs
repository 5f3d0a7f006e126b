//! A Pod Security Standards checker: which level each container of a pod meets, and
//! where it falls short, which rule and which field.
//!
//! The rules are the Baseline and Restricted controls of the Kubernetes Pod Security
//! Standards as the pod-security-admission policy applies them for the newest version
//! (1.37), including the user-namespace relaxations (`hostUsers: false`) and the Windows
//! pod exemptions. Pod-level violations (host namespaces, volumes, sysctls, pod
//! security context) count against every container, since they affect them all.
//! No crate does this: the reference implementation is Go code inside the API server.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Container, HTTPGetAction, LifecycleHandler, Pod, PodSpec, Probe, SecurityContext,
    TCPSocketAction,
};
use serde::Serialize;

/// A Pod Security Standards level; `Privileged < Baseline < Restricted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        })
    }
}

/// One broken control.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The level the control belongs to: breaking a baseline control leaves only
    /// privileged; breaking a restricted one leaves baseline.
    pub level: Level,
    /// The control's name in the Pod Security Standards document.
    pub rule: &'static str,
    /// The offending field, e.g. `spec.containers[0].securityContext.runAsNonRoot`.
    pub field: String,
    /// What the field holds and what the control accepts.
    pub detail: String,
}

/// Which list of the pod spec a container is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ContainerKind {
    InitContainer,
    Container,
    EphemeralContainer,
}

impl ContainerKind {
    fn list(&self) -> &'static str {
        match self {
            Self::InitContainer => "initContainers",
            Self::Container => "containers",
            Self::EphemeralContainer => "ephemeralContainers",
        }
    }
}

/// The verdict for one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerVerdict {
    pub name: String,
    pub kind: ContainerKind,
    /// The highest level the container meets (pod-level violations included).
    pub level: Level,
    /// Every control it breaks, pod-level ones first.
    pub violations: Vec<Violation>,
}

/// Checks every container, init container and ephemeral container of `pod`.
pub fn check_pod(pod: &Pod) -> Vec<ContainerVerdict> {
    let empty = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let pod_violations = check_pod_level(spec, &annotations);

    let ephemeral: Vec<Container> = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|c| {
            // Same fields under the same names; Container ignores targetContainerName.
            serde_json::to_value(c)
                .and_then(serde_json::from_value)
                .unwrap_or_default()
        })
        .collect();
    let lists: [(ContainerKind, &[Container]); 3] = [
        (
            ContainerKind::InitContainer,
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        (ContainerKind::Container, &spec.containers),
        (ContainerKind::EphemeralContainer, &ephemeral),
    ];
    let mut verdicts = Vec::new();
    for (kind, containers) in lists {
        for (index, container) in containers.iter().enumerate() {
            let path = format!("spec.{}[{index}]", kind.list());
            let mut violations = pod_violations.clone();
            violations.extend(check_container(spec, container, &path));
            let level = met_level(&violations);
            verdicts.push(ContainerVerdict {
                name: container.name.clone(),
                kind,
                level,
                violations,
            });
        }
    }
    verdicts
}

/// What a cluster admin must allow for `pod` to be admitted when it is below
/// `restricted`: per container, the capabilities it adds and whether it runs as root;
/// then the namespace's Pod Security label and an OpenShift SCC granting the same.
/// Empty for a restricted pod.
pub fn admission_needs(pod: &Pod, verdicts: &[ContainerVerdict]) -> Vec<String> {
    let level = pod_level(verdicts);
    if level == Level::Restricted {
        return Vec::new();
    }
    let empty = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    let mut needs = Vec::new();
    let mut capabilities: Vec<String> = Vec::new();
    let mut root = false;
    for verdict in verdicts.iter().filter(|v| v.level < Level::Restricted) {
        let Some(container) = containers.clone().find(|c| c.name == verdict.name) else {
            continue;
        };
        let context = container.security_context.as_ref();
        let added: Vec<String> = context
            .and_then(|c| c.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .unwrap_or_default();
        let as_root = context.and_then(|c| c.run_as_user) == Some(0);
        root |= as_root;
        for cap in &added {
            if !capabilities.contains(cap) {
                capabilities.push(cap.clone());
            }
        }
        needs.push(format!(
            "{} {} meets only {}: {}adds capabilities {}",
            match verdict.kind {
                ContainerKind::InitContainer => "init container",
                ContainerKind::Container => "container",
                ContainerKind::EphemeralContainer => "ephemeral container",
            },
            verdict.name,
            verdict.level,
            if as_root { "runs as uid 0 and " } else { "" },
            if added.is_empty() {
                "none".to_owned()
            } else {
                added.join(", ")
            },
        ));
    }
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("NAMESPACE");
    needs.push(format!(
        "a cluster admin must label the namespace: kubectl label namespace {namespace} pod-security.kubernetes.io/enforce={level}"
    ));
    needs.push(format!(
        "on OpenShift, an SCC with allowedCapabilities [{}]{} granted to the pod's service account (oc adm policy add-scc-to-user SCC -z SERVICE_ACCOUNT -n {namespace})",
        capabilities.join(", "),
        if root { " and runAsUser type RunAsAny (uid 0)" } else { "" },
    ));
    if capabilities.iter().any(|c| c == "NET_ADMIN") {
        needs.push(
            "or render with --egress none (no network enforcer, no NET_ADMIN; a NetworkPolicy denies all egress) and the sidecar topology, which meets restricted".to_owned(),
        );
    }
    needs
}

/// The lowest level over all verdicts: what the whole pod meets.
pub fn pod_level(verdicts: &[ContainerVerdict]) -> Level {
    verdicts
        .iter()
        .map(|v| v.level)
        .min()
        .unwrap_or(Level::Restricted)
}

fn met_level(violations: &[Violation]) -> Level {
    match violations.iter().map(|v| v.level).min() {
        None => Level::Restricted,
        Some(Level::Restricted) => Level::Baseline,
        Some(_) => Level::Privileged,
    }
}

const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];
const SAFE_SYSCTLS: [&str; 14] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_slow_start_after_idle",
    "net.ipv4.tcp_notsent_lowat",
];
const SELINUX_TYPES: [&str; 5] = [
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];
const RESTRICTED_VOLUME_SOURCES: [&str; 9] = [
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
];
const APPARMOR_ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

fn violation(
    level: Level,
    rule: &'static str,
    field: impl Into<String>,
    detail: impl Into<String>,
) -> Violation {
    Violation {
        level,
        rule,
        field: field.into(),
        detail: detail.into(),
    }
}

/// Pods in a user namespace (`hostUsers: false`) may run as uid 0 inside it.
fn in_user_namespace(spec: &PodSpec) -> bool {
    spec.host_users == Some(false)
}

fn is_windows(spec: &PodSpec) -> bool {
    spec.os.as_ref().is_some_and(|os| os.name == "windows")
}

fn check_pod_level(spec: &PodSpec, annotations: &BTreeMap<String, String>) -> Vec<Violation> {
    use Level::{Baseline, Restricted};
    let mut out = Vec::new();
    // Any container's AppArmor annotation counts, as in pod-security-admission, even one
    // naming no container of this pod.
    for (key, value) in annotations.range(APPARMOR_ANNOTATION_PREFIX.to_owned()..) {
        if !key.starts_with(APPARMOR_ANNOTATION_PREFIX) {
            break;
        }
        if !(value.is_empty() || value == "runtime/default" || value.starts_with("localhost/")) {
            out.push(violation(
                Baseline,
                "AppArmor",
                format!("metadata.annotations[{key:?}]"),
                format!("is {value:?}; allowed: runtime/default, localhost/* or unset"),
            ));
        }
    }
    for (field, value) in [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ] {
        if value == Some(true) {
            out.push(violation(
                Baseline,
                "Host Namespaces",
                format!("spec.{field}"),
                "is true; allowed: false or unset",
            ));
        }
    }
    for (index, volume) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{index}]");
        if volume.host_path.is_some() {
            out.push(violation(
                Baseline,
                "HostPath Volumes",
                format!("{field}.hostPath"),
                "is set; allowed: unset",
            ));
        }
        let sources = serde_json::to_value(volume)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        for source in sources.keys().filter(|k| *k != "name" && *k != "hostPath") {
            if !RESTRICTED_VOLUME_SOURCES.contains(&source.as_str()) {
                out.push(violation(
                    Restricted,
                    "Volume Types",
                    format!("{field}.{source}"),
                    format!(
                        "is set; allowed volume sources: {}",
                        RESTRICTED_VOLUME_SOURCES.join(", ")
                    ),
                ));
            }
        }
    }
    let Some(context) = &spec.security_context else {
        return out;
    };
    let prefix = "spec.securityContext";
    if context
        .windows_options
        .as_ref()
        .and_then(|w| w.host_process)
        == Some(true)
    {
        out.push(violation(
            Baseline,
            "HostProcess",
            format!("{prefix}.windowsOptions.hostProcess"),
            "is true",
        ));
    }
    if let Some(apparmor) = &context.app_armor_profile {
        check_apparmor_type(
            &apparmor.type_,
            &format!("{prefix}.appArmorProfile.type"),
            &mut out,
        );
    }
    if let Some(selinux) = &context.se_linux_options {
        check_selinux(selinux, &format!("{prefix}.seLinuxOptions"), &mut out);
    }
    if let Some(seccomp) = &context.seccomp_profile {
        if seccomp.type_ == "Unconfined" {
            out.push(violation(
                Baseline,
                "Seccomp",
                format!("{prefix}.seccompProfile.type"),
                "is Unconfined; allowed: RuntimeDefault, Localhost or unset",
            ));
        }
    }
    for (index, sysctl) in context.sysctls.iter().flatten().enumerate() {
        if !SAFE_SYSCTLS.contains(&sysctl.name.as_str()) {
            out.push(violation(
                Baseline,
                "Sysctls",
                format!("{prefix}.sysctls[{index}].name"),
                format!("{:?} is not in the safe set", sysctl.name),
            ));
        }
    }
    if !in_user_namespace(spec) {
        if context.run_as_non_root == Some(false) {
            out.push(violation(
                Restricted,
                "Running as Non-root",
                format!("{prefix}.runAsNonRoot"),
                "is false; allowed: true",
            ));
        }
        if context.run_as_user == Some(0) {
            out.push(violation(
                Restricted,
                "Running as Non-root user",
                format!("{prefix}.runAsUser"),
                "is 0; allowed: a non-zero uid or unset",
            ));
        }
    }
    out
}

fn check_apparmor_type(value: &str, field: &str, out: &mut Vec<Violation>) {
    if value != "RuntimeDefault" && value != "Localhost" {
        out.push(violation(
            Level::Baseline,
            "AppArmor",
            field,
            format!("is {value:?}; allowed: RuntimeDefault, Localhost or unset"),
        ));
    }
}

fn check_selinux(
    options: &k8s_openapi::api::core::v1::SELinuxOptions,
    field: &str,
    out: &mut Vec<Violation>,
) {
    let kind = options.type_.as_deref().unwrap_or_default();
    if !SELINUX_TYPES.contains(&kind) {
        out.push(violation(
            Level::Baseline,
            "SELinux",
            format!("{field}.type"),
            format!(
                "is {kind:?}; allowed: container_t, container_init_t, container_kvm_t, container_engine_t or unset"
            ),
        ));
    }
    for (name, value) in [("user", &options.user), ("role", &options.role)] {
        if value.as_deref().is_some_and(|v| !v.is_empty()) {
            out.push(violation(
                Level::Baseline,
                "SELinux",
                format!("{field}.{name}"),
                "is set; allowed: unset",
            ));
        }
    }
}

fn check_container(spec: &PodSpec, container: &Container, path: &str) -> Vec<Violation> {
    use Level::{Baseline, Restricted};
    let mut out = Vec::new();
    let empty = SecurityContext::default();
    let context = container.security_context.as_ref().unwrap_or(&empty);
    let sc = format!("{path}.securityContext");
    let pod_context = spec.security_context.clone().unwrap_or_default();

    // Baseline.
    if context
        .windows_options
        .as_ref()
        .and_then(|w| w.host_process)
        == Some(true)
    {
        out.push(violation(
            Baseline,
            "HostProcess",
            format!("{sc}.windowsOptions.hostProcess"),
            "is true",
        ));
    }
    if context.privileged == Some(true) {
        out.push(violation(
            Baseline,
            "Privileged Containers",
            format!("{sc}.privileged"),
            "is true; allowed: false or unset",
        ));
    }
    let capabilities = context.capabilities.clone().unwrap_or_default();
    let added = capabilities.add.unwrap_or_default();
    let beyond: Vec<&String> = added
        .iter()
        .filter(|c| !BASELINE_CAPABILITIES.contains(&c.as_str()))
        .collect();
    if !beyond.is_empty() {
        out.push(violation(
            Baseline,
            "Capabilities",
            format!("{sc}.capabilities.add"),
            format!(
                "adds {beyond:?}; allowed: {}",
                BASELINE_CAPABILITIES.join(", ")
            ),
        ));
    }
    for (index, port) in container.ports.iter().flatten().enumerate() {
        if port.host_port.is_some_and(|p| p != 0) {
            out.push(violation(
                Baseline,
                "Host Ports",
                format!("{path}.ports[{index}].hostPort"),
                "is set; allowed: 0 or unset",
            ));
        }
    }
    if let Some(apparmor) = &context.app_armor_profile {
        check_apparmor_type(
            &apparmor.type_,
            &format!("{sc}.appArmorProfile.type"),
            &mut out,
        );
    }
    if let Some(selinux) = &context.se_linux_options {
        check_selinux(selinux, &format!("{sc}.seLinuxOptions"), &mut out);
    }
    let proc_mount = context.proc_mount.as_deref().unwrap_or("Default");
    if proc_mount != "Default" {
        let detail = format!("is {proc_mount:?}; allowed: Default or unset");
        if !in_user_namespace(spec) {
            out.push(violation(
                Baseline,
                "/proc Mount Type",
                format!("{sc}.procMount"),
                detail.clone(),
            ));
        }
        out.push(violation(
            Restricted,
            "/proc Mount Type",
            format!("{sc}.procMount"),
            detail,
        ));
    }
    let container_seccomp = context.seccomp_profile.as_ref().map(|s| s.type_.as_str());
    if container_seccomp == Some("Unconfined") {
        out.push(violation(
            Baseline,
            "Seccomp",
            format!("{sc}.seccompProfile.type"),
            "is Unconfined; allowed: RuntimeDefault, Localhost or unset",
        ));
    }
    check_host_fields(container, path, &mut out);

    // Restricted.
    let windows = is_windows(spec);
    if !windows && context.allow_privilege_escalation != Some(false) {
        out.push(violation(
            Restricted,
            "Privilege Escalation",
            format!("{sc}.allowPrivilegeEscalation"),
            format!(
                "is {}; allowed: false",
                show(context.allow_privilege_escalation)
            ),
        ));
    }
    if !in_user_namespace(spec) {
        match (context.run_as_non_root, pod_context.run_as_non_root) {
            (Some(false), _) => out.push(violation(
                Restricted,
                "Running as Non-root",
                format!("{sc}.runAsNonRoot"),
                "is false; allowed: true",
            )),
            (None, pod) if pod != Some(true) => out.push(violation(
                Restricted,
                "Running as Non-root",
                format!("{sc}.runAsNonRoot"),
                "is unset and spec.securityContext.runAsNonRoot is not true; allowed: true here or at pod level",
            )),
            _ => {}
        }
        if context.run_as_user == Some(0) {
            out.push(violation(
                Restricted,
                "Running as Non-root user",
                format!("{sc}.runAsUser"),
                "is 0; allowed: a non-zero uid or unset",
            ));
        }
    }
    if !windows {
        let pod_seccomp = pod_context
            .seccomp_profile
            .as_ref()
            .map(|s| s.type_.as_str());
        let effective = container_seccomp.or(pod_seccomp);
        if !matches!(effective, Some("RuntimeDefault" | "Localhost"))
            && container_seccomp != Some("Unconfined")
        {
            out.push(violation(
                Restricted,
                "Seccomp",
                format!("{sc}.seccompProfile.type"),
                format!(
                    "is {} (pod level {}); allowed: RuntimeDefault or Localhost, here or at pod level",
                    show(container_seccomp),
                    show(pod_seccomp)
                ),
            ));
        }
        if !capabilities.drop.iter().flatten().any(|c| c == "ALL") {
            out.push(violation(
                Restricted,
                "Capabilities",
                format!("{sc}.capabilities.drop"),
                format!(
                    "is {}; must include ALL",
                    show(context.capabilities.as_ref().and_then(|c| c.drop.as_ref()))
                ),
            ));
        }
        let not_allowed: Vec<&String> = added.iter().filter(|c| *c != "NET_BIND_SERVICE").collect();
        if !not_allowed.is_empty() {
            out.push(violation(
                Restricted,
                "Capabilities",
                format!("{sc}.capabilities.add"),
                format!("adds {not_allowed:?}; allowed: only NET_BIND_SERVICE"),
            ));
        }
    }
    out
}

/// Baseline "Host Probes / Lifecycle Hooks": no `host` in probes or lifecycle handlers.
fn check_host_fields(container: &Container, path: &str, out: &mut Vec<Violation>) {
    fn probe(p: &Option<Probe>) -> Option<(Option<&HTTPGetAction>, Option<&TCPSocketAction>)> {
        p.as_ref()
            .map(|p| (p.http_get.as_ref(), p.tcp_socket.as_ref()))
    }
    fn handler(
        h: Option<&LifecycleHandler>,
    ) -> Option<(Option<&HTTPGetAction>, Option<&TCPSocketAction>)> {
        h.map(|h| (h.http_get.as_ref(), h.tcp_socket.as_ref()))
    }
    let lifecycle = container.lifecycle.as_ref();
    let places = [
        ("livenessProbe", probe(&container.liveness_probe)),
        ("readinessProbe", probe(&container.readiness_probe)),
        ("startupProbe", probe(&container.startup_probe)),
        (
            "lifecycle.postStart",
            handler(lifecycle.and_then(|l| l.post_start.as_ref())),
        ),
        (
            "lifecycle.preStop",
            handler(lifecycle.and_then(|l| l.pre_stop.as_ref())),
        ),
    ];
    for (name, actions) in places {
        let Some((http_get, tcp_socket)) = actions else {
            continue;
        };
        let hosts = [
            ("httpGet", http_get.and_then(|a| a.host.as_ref())),
            ("tcpSocket", tcp_socket.and_then(|a| a.host.as_ref())),
        ];
        for (kind, host) in hosts {
            if host.is_some_and(|h| !h.is_empty()) {
                out.push(violation(
                    Level::Baseline,
                    "Host Probes / Lifecycle Hooks",
                    format!("{path}.{name}.{kind}.host"),
                    "is set; allowed: empty or unset",
                ));
            }
        }
    }
}

fn show<T: fmt::Debug>(value: Option<T>) -> String {
    value.map_or_else(|| "unset".to_owned(), |v| format!("{v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile};

    fn restricted_container(name: &str) -> Container {
        Container {
            name: name.to_owned(),
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    add: None,
                }),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(containers: Vec<Container>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn restricted_container_meets_restricted() {
        let verdicts = check_pod(&pod(vec![restricted_container("a")]));
        assert_eq!(
            verdicts[0].level,
            Level::Restricted,
            "{:?}",
            verdicts[0].violations
        );
    }

    #[test]
    fn default_container_meets_baseline_only() {
        let verdicts = check_pod(&pod(vec![Container {
            name: "a".into(),
            ..Default::default()
        }]));
        assert_eq!(verdicts[0].level, Level::Baseline);
        let rules: Vec<&str> = verdicts[0].violations.iter().map(|v| v.rule).collect();
        assert_eq!(
            rules,
            [
                "Privilege Escalation",
                "Running as Non-root",
                "Seccomp",
                "Capabilities"
            ]
        );
    }

    #[test]
    fn pod_level_settings_count_for_containers() {
        let mut p = pod(vec![restricted_container("a")]);
        p.spec.as_mut().unwrap().host_pid = Some(true);
        let verdicts = check_pod(&p);
        assert_eq!(verdicts[0].level, Level::Privileged);
        assert_eq!(verdicts[0].violations[0].field, "spec.hostPID");

        // Pod-level runAsNonRoot true covers a container that leaves it unset.
        let mut c = restricted_container("a");
        c.security_context.as_mut().unwrap().run_as_non_root = None;
        let mut p = pod(vec![c]);
        p.spec.as_mut().unwrap().security_context =
            Some(k8s_openapi::api::core::v1::PodSecurityContext {
                run_as_non_root: Some(true),
                ..Default::default()
            });
        assert_eq!(check_pod(&p)[0].level, Level::Restricted);
    }

    #[test]
    fn capabilities_beyond_the_default_set_break_baseline() {
        let mut c = restricted_container("a");
        c.security_context.as_mut().unwrap().capabilities = Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(vec!["SYS_ADMIN".into()]),
        });
        let verdict = &check_pod(&pod(vec![c]))[0];
        assert_eq!(verdict.level, Level::Privileged);
        assert_eq!(
            verdict.violations[0].field,
            "spec.containers[0].securityContext.capabilities.add"
        );
        assert_eq!(verdict.violations[0].rule, "Capabilities");
    }

    #[test]
    fn user_namespace_allows_root() {
        let mut c = restricted_container("a");
        let context = c.security_context.as_mut().unwrap();
        context.run_as_non_root = Some(false);
        context.run_as_user = Some(0);
        let mut p = pod(vec![c]);
        assert_eq!(check_pod(&p)[0].level, Level::Baseline);
        p.spec.as_mut().unwrap().host_users = Some(false);
        assert_eq!(check_pod(&p)[0].level, Level::Restricted);
    }

    #[test]
    fn apparmor_annotations_count_for_every_container() {
        let mut p = pod(vec![restricted_container("a"), restricted_container("b")]);
        p.metadata.annotations = Some(BTreeMap::from([
            (
                "container.apparmor.security.beta.kubernetes.io/a".to_owned(),
                "runtime/default".to_owned(),
            ),
            (
                "container.apparmor.security.beta.kubernetes.io/gone".to_owned(),
                "unconfined".to_owned(),
            ),
        ]));
        let verdicts = check_pod(&p);
        assert!(verdicts.iter().all(|v| v.level == Level::Privileged));
        assert_eq!(
            verdicts[1].violations[0].field,
            "metadata.annotations[\"container.apparmor.security.beta.kubernetes.io/gone\"]"
        );
    }

    /// One change each to a restricted pod, with the level left and the field blamed.
    #[test]
    fn single_rule_table() {
        type Edit = fn(&mut PodSpec);
        let cases: [(&str, Edit, Level, &str); 12] = [
            (
                "privileged",
                |s| sc(s).privileged = Some(true),
                Level::Privileged,
                "containers[0].securityContext.privileged",
            ),
            (
                "host port",
                |s| {
                    s.containers[0].ports = Some(vec![serde_json::from_str(
                        r#"{"containerPort":80,"hostPort":80}"#,
                    )
                    .unwrap()])
                },
                Level::Privileged,
                "containers[0].ports[0].hostPort",
            ),
            (
                "unsafe sysctl",
                |s| {
                    s.security_context = Some(
                        serde_json::from_str(
                            r#"{"sysctls":[{"name":"kernel.msgmax","value":"1"}]}"#,
                        )
                        .unwrap(),
                    )
                },
                Level::Privileged,
                "securityContext.sysctls[0].name",
            ),
            (
                "selinux user",
                |s| {
                    sc(s).se_linux_options =
                        Some(serde_json::from_str(r#"{"user":"root"}"#).unwrap())
                },
                Level::Privileged,
                "containers[0].securityContext.seLinuxOptions.user",
            ),
            (
                "unmasked proc",
                |s| sc(s).proc_mount = Some("Unmasked".into()),
                Level::Privileged,
                "containers[0].securityContext.procMount",
            ),
            (
                "seccomp unconfined",
                |s| {
                    sc(s).seccomp_profile = Some(SeccompProfile {
                        type_: "Unconfined".into(),
                        localhost_profile: None,
                    })
                },
                Level::Privileged,
                "containers[0].securityContext.seccompProfile.type",
            ),
            (
                "seccomp unset everywhere",
                |s| sc(s).seccomp_profile = None,
                Level::Baseline,
                "containers[0].securityContext.seccompProfile.type",
            ),
            (
                "escalation allowed",
                |s| sc(s).allow_privilege_escalation = None,
                Level::Baseline,
                "containers[0].securityContext.allowPrivilegeEscalation",
            ),
            (
                "root uid",
                |s| sc(s).run_as_user = Some(0),
                Level::Baseline,
                "containers[0].securityContext.runAsUser",
            ),
            (
                "drop not ALL",
                |s| {
                    sc(s).capabilities = Some(Capabilities {
                        drop: Some(vec!["NET_RAW".into()]),
                        add: None,
                    })
                },
                Level::Baseline,
                "containers[0].securityContext.capabilities.drop",
            ),
            (
                "add NET_BIND_SERVICE only",
                |s| {
                    sc(s).capabilities = Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: Some(vec!["NET_BIND_SERVICE".into()]),
                    })
                },
                Level::Restricted,
                "",
            ),
            (
                "host probe",
                |s| {
                    s.containers[0].liveness_probe = Some(
                        serde_json::from_str(r#"{"httpGet":{"port":80,"host":"10.0.0.1"}}"#)
                            .unwrap(),
                    )
                },
                Level::Privileged,
                "containers[0].livenessProbe.httpGet.host",
            ),
        ];
        for (what, edit, level, field) in cases {
            let mut p = pod(vec![restricted_container("a")]);
            edit(p.spec.as_mut().unwrap());
            let verdict = &check_pod(&p)[0];
            assert_eq!(verdict.level, level, "{what}: {:?}", verdict.violations);
            if !field.is_empty() {
                assert_eq!(
                    verdict.violations[0].field,
                    format!("spec.{field}"),
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn pod_level_seccomp_covers_containers_and_windows_pods_are_exempt() {
        let mut c = restricted_container("a");
        c.security_context.as_mut().unwrap().seccomp_profile = None;
        let mut p = pod(vec![c]);
        p.spec.as_mut().unwrap().security_context =
            Some(k8s_openapi::api::core::v1::PodSecurityContext {
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            });
        assert_eq!(check_pod(&p)[0].level, Level::Restricted);

        let mut c = restricted_container("a");
        let context = c.security_context.as_mut().unwrap();
        (
            context.seccomp_profile,
            context.capabilities,
            context.allow_privilege_escalation,
        ) = (None, None, None);
        let mut p = pod(vec![c]);
        p.spec.as_mut().unwrap().os = Some(k8s_openapi::api::core::v1::PodOS {
            name: "windows".into(),
        });
        assert_eq!(check_pod(&p)[0].level, Level::Restricted);
    }

    fn sc(spec: &mut PodSpec) -> &mut SecurityContext {
        spec.containers[0].security_context.as_mut().unwrap()
    }

    #[test]
    fn non_core_volumes_break_restricted_and_host_path_baseline() {
        let mut p = pod(vec![restricted_container("a")]);
        p.spec.as_mut().unwrap().volumes = Some(vec![
            serde_json::from_str(r#"{"name":"n","nfs":{"server":"s","path":"/"}}"#).unwrap(),
            serde_json::from_str(r#"{"name":"h","hostPath":{"path":"/"}}"#).unwrap(),
        ]);
        let verdict = &check_pod(&p)[0];
        let fields: Vec<&str> = verdict
            .violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["spec.volumes[0].nfs", "spec.volumes[1].hostPath"]);
        assert_eq!(verdict.level, Level::Privileged);
    }
}
