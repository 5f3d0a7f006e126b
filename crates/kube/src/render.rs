//! The sandbox pod for the combined and sidecar topologies.
//!
//! Layout shared by both topologies:
//! - init container `install-supervisor` (supervisor image) copies the static supervisor
//!   into the `kiln-bin` emptyDir, as the sandbox ids;
//! - init container `seed-workspace` (agent image, only with a workspace) copies the
//!   image's /sandbox into the new workspace claim once, as the sandbox ids;
//! - container `agent` (agent image) runs the supervisor from `kiln-bin` (read-only
//!   there), which runs the workload argv given after `--`.
//!
//! With egress enforced (the default), the pod's egress goes through kiln's enforcer
//! (kiln-podnet) under the proxy uid. The sidecar topology runs it in `network`, a
//! native sidecar (an init container with restartPolicy Always, early so it is up
//! before the agent), after `network-init` (root with NET_ADMIN only, once) installed
//! the rules; the combined topology's supervisor does both itself before it drops. A
//! policy file becomes a ConfigMap mounted read-only where the enforcer reads it. With
//! egress `none` there is no enforcer: a NetworkPolicy denies the pod all egress.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    EphemeralVolumeSource, PersistentVolumeClaimSpec, PersistentVolumeClaimTemplate, Pod,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecurityContext, Volume,
    VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kiln_identity::{
    resolve_identity, IdSource, ResolvedId, ResolvedIdentity, KUBERNETES_MAX_ID, SANDBOX_HOME,
    UID_RANGE_ANNOTATION,
};

use crate::{
    Egress, KubeError, NamespaceInfo, PolicySource, ResourceAmounts, SandboxConfig, Topology,
};

/// Where the supervisor image keeps the static kiln-supervisor.
pub const SUPERVISOR_PATH_IN_IMAGE: &str = "/kiln-supervisor";
/// The static busybox in the supervisor image, used only for its `cp` (the supervisor
/// image has no other userland, and the agent image cannot see the supervisor image).
pub const BUSYBOX_PATH_IN_IMAGE: &str = "/bin/busybox";
/// Network sidecar uid when the namespace has no uid-range annotation.
pub const DEFAULT_NETWORK_UID: u32 = 10000;
/// Pod label holding the topology.
pub const TOPOLOGY_LABEL: &str = "kiln/topology";
/// Pod annotation: where the sandbox uid came from (`config`, an annotation name, `default`).
pub const UID_SOURCE_ANNOTATION: &str = "kiln/sandbox-uid-source";
/// Pod annotation: where the sandbox gid came from.
pub const GID_SOURCE_ANNOTATION: &str = "kiln/sandbox-gid-source";
/// Pod annotation: where the network enforcer's (proxy) uid came from (egress enforced).
pub const NETWORK_UID_SOURCE_ANNOTATION: &str = "kiln/network-uid-source";
/// Pod label: `enforce` or `none`.
pub const EGRESS_LABEL: &str = "kiln/egress";
/// Pod annotation: the digest of the policy rendered into the pod's ConfigMap.
pub const POLICY_DIGEST_ANNOTATION: &str = "kiln/network-policy-digest";
/// Where the enforcer reads the policy: the ConfigMap's key `policy.yaml`, mounted
/// read-only in this directory (the kubelet swaps the directory's `..data` symlink on
/// an update, which the enforcer picks up).
pub const POLICY_DIR: &str = "/etc/kiln/network-policy";
/// The ConfigMap key holding the policy.
pub const POLICY_KEY: &str = "policy.yaml";
/// The one capability `network-init` (and the combined agent) needs for the rules.
pub const NETWORK_CAPABILITY: &str = "NET_ADMIN";

/// Capabilities the combined agent container keeps, all needed by `kiln-supervisor
/// --mode full` before it drops to the sandbox ids (docs/kubernetes.md justifies each).
pub const COMBINED_CAPABILITIES: [&str; 5] =
    ["CHOWN", "DAC_OVERRIDE", "SETGID", "SETPCAP", "SETUID"];

const BIN_VOLUME: &str = "kiln-bin";
const POLICY_VOLUME: &str = "network-policy";
const BIN_DIR: &str = "/kiln/bin";
const WORKSPACE_VOLUME: &str = "workspace";
const SEED_MOUNT: &str = "/kiln/workspace";
const SEED_MARKER: &str = ".kiln-seeded";

/// A rendered pod and the identity decisions behind it.
#[derive(Debug, Clone)]
pub struct RenderedPod {
    pub pod: Pod,
    pub identity: ResolvedIdentity,
    /// The network enforcer's uid (also its gid), when egress is enforced.
    pub network_uid: Option<ResolvedId>,
    /// The policy's ConfigMap, when rendered from a policy file.
    pub config_map: Option<ConfigMap>,
    /// With egress `none`: the NetworkPolicy denying the pod all egress.
    pub network_policy: Option<NetworkPolicy>,
    /// Allowed but likely wrong choices (from kiln-identity), for the user to see.
    pub warnings: Vec<String>,
}

/// Renders the pod for `config` in `namespace` (whose annotations decide the ids when
/// the configuration does not). Without a namespace object the configuration must name
/// the namespace, and only configured or default ids are used.
pub fn render_pod(
    config: &SandboxConfig,
    namespace: Option<&NamespaceInfo>,
) -> Result<RenderedPod, KubeError> {
    let namespace_name = match (&config.namespace, namespace) {
        (Some(configured), Some(ns)) if *configured != ns.name => {
            return Err(KubeError::NamespaceMismatch {
                configured: configured.clone(),
                actual: ns.name.clone(),
                origin: ns.origin.clone(),
            })
        }
        (_, Some(ns)) => ns.name.clone(),
        (Some(configured), None) => configured.clone(),
        (None, None) => {
            return Err(KubeError::MissingSetting {
                key: "namespace",
                flag: "--namespace, --namespace-json FILE or --cluster",
            })
        }
    };
    let empty = BTreeMap::new();
    let annotations = namespace.map_or(&empty, |ns| &ns.annotations);
    let identity = resolve_identity(config.sandbox_uid, config.sandbox_gid, annotations)?;
    let network_uid = match config.egress {
        Egress::None => None,
        Egress::Enforce => Some(network_uid(&identity)?),
    };
    let policy_configmap = match &config.policy {
        Some(PolicySource::File { .. }) => Some(format!("{}-network-policy", config.name)),
        Some(PolicySource::ConfigMap(name)) => Some(name.clone()),
        None => None,
    };
    // The enforcer's arguments after `--mode ...`, the same in both topologies.
    let enforcer_args = |proxy_uid: u32| {
        let mut args = vec![
            "--proxy-uid".to_owned(),
            proxy_uid.to_string(),
            "--sandbox-name".to_owned(),
            config.name.clone(),
        ];
        if policy_configmap.is_some() {
            args.extend(["--policy".to_owned(), format!("{POLICY_DIR}/{POLICY_KEY}")]);
        }
        args
    };
    let policy_mount = || {
        policy_configmap
            .as_ref()
            .map(|_| mount(POLICY_VOLUME, POLICY_DIR, true))
    };

    let uid = i64::from(identity.uid.value);
    let gid = i64::from(identity.gid.value);
    let supervisor_env = vec![
        env("SANDBOX_UID", identity.uid.value),
        env("SANDBOX_GID", identity.gid.value),
    ];

    let mut init_containers = Vec::new();
    if let (Some(network), Topology::Sidecar) = (network_uid, config.topology) {
        let network_id = i64::from(network.value);
        let mut init_command = strings(&[SUPERVISOR_PATH_IN_IMAGE, "--mode", "network-init"]);
        init_command.extend(["--proxy-uid".to_owned(), network.value.to_string()]);
        init_containers.push(Container {
            name: "network-init".to_owned(),
            image: Some(config.supervisor_image.clone()),
            command: Some(init_command),
            env: Some(supervisor_env.clone()),
            security_context: Some(network_init_context()),
            ..Default::default()
        });
        let mut command = strings(&[SUPERVISOR_PATH_IN_IMAGE, "--mode", "network"]);
        command.extend(enforcer_args(network.value));
        init_containers.push(Container {
            name: "network".to_owned(),
            image: Some(config.supervisor_image.clone()),
            command: Some(command),
            env: Some(supervisor_env.clone()),
            // A native sidecar: started before the later init containers and the agent,
            // kept running alongside them.
            restart_policy: Some("Always".to_owned()),
            security_context: Some(non_root_context(network_id, network_id, true)),
            volume_mounts: policy_mount().map(|m| vec![m]),
            ..Default::default()
        });
    }
    init_containers.push(Container {
        name: "install-supervisor".to_owned(),
        image: Some(config.supervisor_image.clone()),
        command: Some(vec![
            BUSYBOX_PATH_IN_IMAGE.to_owned(),
            "cp".to_owned(),
            SUPERVISOR_PATH_IN_IMAGE.to_owned(),
            format!("{BIN_DIR}/kiln-supervisor"),
        ]),
        security_context: Some(non_root_context(uid, gid, true)),
        volume_mounts: Some(vec![mount(BIN_VOLUME, BIN_DIR, false)]),
        ..Default::default()
    });
    if config.workspace.is_some() {
        init_containers.push(Container {
            name: "seed-workspace".to_owned(),
            image: Some(config.image.clone()),
            command: Some(vec!["/bin/sh".to_owned(), "-c".to_owned(), seed_script()]),
            security_context: Some(non_root_context(uid, gid, true)),
            volume_mounts: Some(vec![mount(WORKSPACE_VOLUME, SEED_MOUNT, false)]),
            ..Default::default()
        });
    }

    let combined_network = network_uid.filter(|_| config.topology == Topology::Combined);
    let (mode, agent_context) = match config.topology {
        Topology::Combined => ("full", combined_agent_context(combined_network.is_some())),
        Topology::Sidecar => ("process", non_root_context(uid, gid, false)),
    };
    let mut agent_env = supervisor_env;
    agent_env.extend(config.env.iter().map(|(name, value)| EnvVar {
        name: name.clone(),
        value: Some(value.clone()),
        ..Default::default()
    }));
    let mut agent_mounts = vec![mount(BIN_VOLUME, BIN_DIR, true)];
    if combined_network.is_some() {
        agent_mounts.extend(policy_mount());
    }
    let mut agent_command = vec![
        format!("{BIN_DIR}/kiln-supervisor"),
        "--mode".to_owned(),
        mode.to_owned(),
    ];
    if let Some(network) = combined_network {
        agent_command.extend(enforcer_args(network.value));
    }
    agent_command.push("--".to_owned());
    if config.workspace.is_some() {
        agent_mounts.push(mount(WORKSPACE_VOLUME, SANDBOX_HOME, false));
    }
    let agent = Container {
        name: "agent".to_owned(),
        image: Some(config.image.clone()),
        command: Some(agent_command),
        args: Some(config.command.clone()),
        env: Some(agent_env),
        resources: resources(config),
        security_context: Some(agent_context),
        volume_mounts: Some(agent_mounts),
        ..Default::default()
    };

    let mut volumes = vec![Volume {
        name: BIN_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }];
    if let Some(name) = &policy_configmap {
        volumes.push(Volume {
            name: POLICY_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: name.clone(),
                // Readable by the enforcer's uid whatever the pod's fsGroup.
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if let Some(workspace) = &config.workspace {
        volumes.push(Volume {
            name: WORKSPACE_VOLUME.to_owned(),
            // A generic ephemeral volume: Kubernetes creates the claim with the pod (one
            // object to apply) and deletes it with the pod.
            ephemeral: Some(EphemeralVolumeSource {
                volume_claim_template: Some(PersistentVolumeClaimTemplate {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels(config)),
                        ..Default::default()
                    }),
                    spec: PersistentVolumeClaimSpec {
                        access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                        storage_class_name: workspace.storage_class.clone(),
                        resources: Some(VolumeResourceRequirements {
                            requests: Some(BTreeMap::from([(
                                "storage".to_owned(),
                                Quantity(workspace.size.clone()),
                            )])),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                }),
            }),
            ..Default::default()
        });
    }

    let mut pod_context = PodSecurityContext {
        fs_group: Some(gid),
        // Only walk the volume when its root's group is wrong: large workspaces start fast.
        fs_group_change_policy: Some("OnRootMismatch".to_owned()),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    };
    if config.topology == Topology::Sidecar {
        pod_context.run_as_non_root = Some(true);
        pod_context.run_as_user = Some(uid);
        pod_context.run_as_group = Some(gid);
    }

    let mut pod_annotations = BTreeMap::from([
        (
            UID_SOURCE_ANNOTATION.to_owned(),
            identity.uid.source.to_string(),
        ),
        (
            GID_SOURCE_ANNOTATION.to_owned(),
            identity.gid.source.to_string(),
        ),
    ]);
    if let Some(network) = network_uid {
        pod_annotations.insert(
            NETWORK_UID_SOURCE_ANNOTATION.to_owned(),
            network.source.to_string(),
        );
    }
    let config_map = match &config.policy {
        Some(PolicySource::File { text, digest, .. }) => {
            pod_annotations.insert(POLICY_DIGEST_ANNOTATION.to_owned(), digest.clone());
            Some(ConfigMap {
                metadata: ObjectMeta {
                    name: policy_configmap.clone(),
                    namespace: Some(namespace_name.clone()),
                    labels: Some(labels(config)),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([(POLICY_KEY.to_owned(), text.clone())])),
                ..Default::default()
            })
        }
        _ => None,
    };
    let network_policy = (config.egress == Egress::None).then(|| NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(format!("{}-no-egress", config.name)),
            namespace: Some(namespace_name.clone()),
            labels: Some(labels(config)),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/instance".to_owned(),
                    config.name.clone(),
                )])),
                ..Default::default()
            }),
            policy_types: Some(strings(&["Egress"])),
            // No rule: nothing may leave the pod.
            egress: Some(Vec::new()),
            ingress: None,
        }),
    });

    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(namespace_name),
            labels: Some(labels(config)),
            annotations: Some(pod_annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            // Service environment variables would tell the workload about the cluster.
            enable_service_links: Some(false),
            host_network: Some(false),
            host_pid: Some(false),
            host_ipc: Some(false),
            restart_policy: Some("Never".to_owned()),
            runtime_class_name: config.runtime_class.clone(),
            security_context: Some(pod_context),
            init_containers: Some(init_containers),
            containers: vec![agent],
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    };
    let warnings = identity.warnings.clone();
    Ok(RenderedPod {
        pod,
        identity,
        network_uid,
        config_map,
        network_policy,
        warnings,
    })
}

/// Prints a pod as YAML for `kubectl apply -f -`.
pub fn pod_to_yaml(pod: &Pod) -> Result<String, KubeError> {
    yaml(pod)
}

fn yaml(value: &impl serde::Serialize) -> Result<String, KubeError> {
    serde_norway::to_string(value).map_err(|e| KubeError::Yaml(e.to_string()))
}

impl RenderedPod {
    /// Every object to apply as one multi-document YAML stream: the policy's ConfigMap
    /// (before the pod that mounts it), the pod, the NetworkPolicy.
    pub fn to_yaml(&self) -> Result<String, KubeError> {
        let mut docs = Vec::new();
        if let Some(map) = &self.config_map {
            docs.push(yaml(map)?);
        }
        docs.push(pod_to_yaml(&self.pod)?);
        if let Some(policy) = &self.network_policy {
            docs.push(yaml(policy)?);
        }
        Ok(docs.join("---\n"))
    }

    /// The same objects as JSON values, in the same order.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        let mut items = Vec::new();
        if let Some(map) = &self.config_map {
            items.push(serde_json::to_value(map).unwrap_or_default());
        }
        items.push(serde_json::to_value(&self.pod).unwrap_or_default());
        if let Some(policy) = &self.network_policy {
            items.push(serde_json::to_value(policy).unwrap_or_default());
        }
        items
    }
}

/// The network sidecar's uid: on OpenShift the last uid of the namespace's block (the
/// SCC admits only uids from it, and the first one is the sandbox's), else
/// [`DEFAULT_NETWORK_UID`]. It must differ from the sandbox uid, or the workload could
/// signal or trace the sidecar.
fn network_uid(identity: &ResolvedIdentity) -> Result<ResolvedId, KubeError> {
    let network = match identity.uid_block {
        Some(block) if block.size() < 2 => {
            return Err(KubeError::NetworkUid(format!(
                "the namespace's uid range {block} ({UID_RANGE_ANNOTATION}) holds a single uid, but enforcing \
                 egress needs two (the sandbox takes the first, the network enforcer the last); use \
                 egress = \"none\" or a namespace with a larger block"
            )))
        }
        Some(block) => ResolvedId { value: block.end(), source: IdSource::Annotation(UID_RANGE_ANNOTATION) },
        None => ResolvedId { value: DEFAULT_NETWORK_UID, source: IdSource::Default },
    };
    if network.value > KUBERNETES_MAX_ID {
        return Err(KubeError::NetworkUid(format!(
            "{} (the end of the namespace's uid range) is above Kubernetes' limit {KUBERNETES_MAX_ID}",
            network.value
        )));
    }
    if network.value == identity.uid.value {
        return Err(KubeError::NetworkUid(format!(
            "{} from {} equals the sandbox uid from {}; configure a sandbox_uid other than {}",
            network.value, network.source, identity.uid.source, network.value
        )));
    }
    Ok(network)
}

fn labels(config: &SandboxConfig) -> BTreeMap<String, String> {
    BTreeMap::from([
        (EGRESS_LABEL.to_owned(), config.egress.as_str().to_owned()),
        (
            "app.kubernetes.io/name".to_owned(),
            "kiln-sandbox".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), config.name.clone()),
        ("app.kubernetes.io/managed-by".to_owned(), "kiln".to_owned()),
        (
            TOPOLOGY_LABEL.to_owned(),
            config.topology.as_str().to_owned(),
        ),
    ])
}

/// Copies the image's /sandbox into the claim once; the marker keeps a restarted pod
/// from copying over the user's changes.
fn seed_script() -> String {
    format!(
        "set -eu\n\
         if [ ! -e {SEED_MOUNT}/{SEED_MARKER} ]; then\n\
         \x20 if [ -d {SANDBOX_HOME} ]; then cp -R {SANDBOX_HOME}/. {SEED_MOUNT}/; fi\n\
         \x20 touch {SEED_MOUNT}/{SEED_MARKER}\n\
         fi\n"
    )
}

/// The restricted Pod Security Standard's container settings, as `uid`:`gid`.
fn non_root_context(uid: i64, gid: i64, read_only_root: bool) -> SecurityContext {
    SecurityContext {
        run_as_user: Some(uid),
        run_as_group: Some(gid),
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(strings(&["ALL"])),
            add: None,
        }),
        read_only_root_filesystem: read_only_root.then_some(true),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

/// `network-init`: root (capabilities added to a non-root container are not effective)
/// with NET_ADMIN only, to install the nftables rules once; nothing else.
fn network_init_context() -> SecurityContext {
    SecurityContext {
        run_as_user: Some(0),
        run_as_group: Some(0),
        run_as_non_root: Some(false),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(strings(&["ALL"])),
            add: Some(strings(&[NETWORK_CAPABILITY])),
        }),
        read_only_root_filesystem: Some(true),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

/// The combined agent starts as root with only what `--mode full` needs to drop itself
/// (and, with egress enforced, NET_ADMIN for the rules it installs first).
/// No privilege escalation: the supervisor changes ids with setuid/setgid, which
/// no_new_privs does not prevent; it only stops execve from gaining privileges.
fn combined_agent_context(enforce: bool) -> SecurityContext {
    let mut add = strings(&COMBINED_CAPABILITIES);
    if enforce {
        add.push(NETWORK_CAPABILITY.to_owned());
        add.sort();
    }
    SecurityContext {
        run_as_user: Some(0),
        run_as_group: Some(0),
        run_as_non_root: Some(false),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(strings(&["ALL"])),
            add: Some(add),
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

fn resources(config: &SandboxConfig) -> Option<ResourceRequirements> {
    let amounts = |a: &Option<ResourceAmounts>| {
        let a = a.as_ref()?;
        let map: BTreeMap<String, Quantity> = [
            ("cpu", &a.cpu),
            ("memory", &a.memory),
            ("ephemeral-storage", &a.ephemeral_storage),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), Quantity(v.clone()?))))
        .collect();
        (!map.is_empty()).then_some(map)
    };
    let requests = amounts(&config.resources.requests);
    let limits = amounts(&config.resources.limits);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..Default::default()
    })
}

fn env(name: &str, value: u32) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_string()),
        ..Default::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}
