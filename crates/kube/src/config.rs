//! The sandbox's Kubernetes configuration: a TOML file, then flags over it, validated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::KubeError;

/// How the supervisor is placed in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// One agent container whose supervisor starts as root and drops to the sandbox ids.
    Combined,
    /// A non-root agent container plus a network sidecar under its own uid.
    Sidecar,
}

impl Topology {
    /// `combined` or `sidecar`, as written in the configuration.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Combined => "combined",
            Self::Sidecar => "sidecar",
        }
    }

    /// Parses a `--topology` value.
    pub fn parse(value: &str) -> Result<Self, KubeError> {
        match value {
            "combined" => Ok(Self::Combined),
            "sidecar" => Ok(Self::Sidecar),
            _ => Err(invalid(
                "supervisor_topology",
                value,
                "\"combined\" or \"sidecar\"",
            )),
        }
    }
}

/// What the pod does about the workload's network egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// kiln's enforcer decides every connection and DNS query (a policy file's allow
    /// list, else the default mode); needs CAP_NET_ADMIN once, to install its rules.
    Enforce,
    /// No egress at all: a NetworkPolicy denying all egress, no rules, no enforcer (for
    /// namespaces that refuse CAP_NET_ADMIN; needs a CNI that enforces NetworkPolicy).
    None,
}

impl Egress {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::None => "none",
        }
    }

    /// Parses an `--egress` value.
    pub fn parse(value: &str) -> Result<Self, KubeError> {
        match value {
            "enforce" => Ok(Self::Enforce),
            "none" => Ok(Self::None),
            _ => Err(invalid("egress", value, "\"enforce\" or \"none\"")),
        }
    }
}

/// Where the enforcer's policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// A policy file, validated, rendered into a ConfigMap of its own.
    File {
        path: PathBuf,
        text: String,
        digest: String,
    },
    /// An existing ConfigMap of this name, holding the policy under `policy.yaml`.
    ConfigMap(String),
}

/// The configuration file as written: every key optional, unknown keys rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub image: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The workload's argv. Needed because the container's command is the supervisor,
    /// so the image's own Entrypoint and Cmd are not visible from inside the pod.
    pub command: Option<Vec<String>>,
    pub sandbox_uid: Option<u32>,
    pub sandbox_gid: Option<u32>,
    pub supervisor_topology: Option<Topology>,
    pub supervisor_image: Option<String>,
    pub runtime_class: Option<String>,
    pub workspace: Option<WorkspaceConfig>,
    pub resources: Option<ResourcesConfig>,
    /// Extra environment for the workload, in key order.
    pub env: Option<BTreeMap<String, String>>,
    /// `enforce` (default) or `none`.
    pub egress: Option<Egress>,
    /// A network policy file (OpenShell's `network_policies`) for the enforcer.
    pub policy: Option<PathBuf>,
    /// An existing ConfigMap holding the policy under `policy.yaml`.
    pub policy_configmap: Option<String>,
}

/// `[workspace]`: a persistent volume claim of `size`, seeded from the image's /sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceConfig {
    pub size: String,
    pub storage_class: Option<String>,
}

/// `[resources]`: requests and limits of the agent container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesConfig {
    pub requests: Option<ResourceAmounts>,
    pub limits: Option<ResourceAmounts>,
}

/// Kubernetes quantities, e.g. `cpu = "500m"`, `memory = "1Gi"`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceAmounts {
    pub cpu: Option<String>,
    pub memory: Option<String>,
    #[serde(rename = "ephemeral-storage")]
    pub ephemeral_storage: Option<String>,
}

impl ConfigFile {
    /// Parses TOML text; `origin` (usually the path) names the file in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, KubeError> {
        toml::from_str(text).map_err(|err| KubeError::ConfigFile {
            origin: origin.to_owned(),
            // toml's message names the unknown or mistyped key and its line.
            message: err.to_string().trim_end().to_owned(),
        })
    }

    /// Reads and parses a configuration file (at most 1 MiB).
    pub fn load(path: &Path) -> Result<Self, KubeError> {
        let text = crate::read_bounded(path, MAX_CONFIG_SIZE)?;
        let text = String::from_utf8(text).map_err(|_| KubeError::ConfigFile {
            origin: path.display().to_string(),
            message: "not UTF-8 text".to_owned(),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }
}

/// Largest configuration file read.
pub const MAX_CONFIG_SIZE: u64 = 1 << 20;

/// Values given on the command line, a layer over the file: each setting given replaces
/// the file's, `env` entries are added to the file's (replacing same-named ones).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigOverrides {
    /// The flags' settings. A `workspace` here without a storage class keeps the file's.
    pub settings: ConfigFile,
    /// Replaces the workspace's storage class (a workspace size must come from somewhere).
    pub storage_class: Option<String>,
    /// Drop the file's workspace: no volume, /sandbox comes from the image.
    pub no_workspace: bool,
}

/// A validated sandbox configuration, ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    pub image: String,
    /// `None` when neither file nor flags name it: the namespace object then decides.
    pub namespace: Option<String>,
    pub name: String,
    pub command: Vec<String>,
    pub sandbox_uid: Option<u32>,
    pub sandbox_gid: Option<u32>,
    pub topology: Topology,
    pub supervisor_image: String,
    pub runtime_class: Option<String>,
    pub workspace: Option<WorkspaceConfig>,
    pub resources: ResourcesConfig,
    pub env: BTreeMap<String, String>,
    pub egress: Egress,
    /// The enforcer's policy; `None` with `Egress::Enforce` is the default mode.
    pub policy: Option<PolicySource>,
}

/// Environment names kiln sets itself; configuring them is an error.
pub const RESERVED_ENV: [&str; 2] = ["SANDBOX_UID", "SANDBOX_GID"];

impl SandboxConfig {
    /// Applies `overrides` over `file` and validates the result.
    pub fn resolve(file: ConfigFile, overrides: ConfigOverrides) -> Result<Self, KubeError> {
        let flags = overrides.settings;
        let required = |value: Option<String>, key: &'static str, flag: &'static str| {
            value.ok_or(KubeError::MissingSetting { key, flag })
        };
        let image = required(flags.image.or(file.image), "image", "--image")?;
        let name = required(flags.name.or(file.name), "name", "--name")?;
        let supervisor_image = required(
            flags.supervisor_image.or(file.supervisor_image),
            "supervisor_image",
            "--supervisor-image",
        )?;
        let command = flags
            .command
            .or(file.command)
            .ok_or(KubeError::MissingSetting {
                key: "command",
                flag: "-- COMMAND...",
            })?;

        let file_class = file
            .workspace
            .as_ref()
            .and_then(|w| w.storage_class.clone());
        let workspace = match flags.workspace.or(file.workspace) {
            _ if overrides.no_workspace => None,
            Some(workspace) => Some(WorkspaceConfig {
                storage_class: overrides.storage_class.or(workspace.storage_class).or(file_class),
                size: workspace.size,
            }),
            None if overrides.storage_class.is_some() => {
                return Err(invalid(
                    "workspace.storage_class",
                    overrides.storage_class.as_deref().unwrap_or_default(),
                    "a storage class only together with a workspace size (--workspace-size or [workspace] size)",
                ))
            }
            None => None,
        };

        let mut env = file.env.unwrap_or_default();
        env.extend(flags.env.unwrap_or_default());

        let egress = flags.egress.or(file.egress).unwrap_or(Egress::Enforce);
        let policy = match (
            flags.policy.or(file.policy),
            flags.policy_configmap.or(file.policy_configmap),
        ) {
            (Some(path), Some(name)) => {
                return Err(invalid(
                    "policy_configmap",
                    &name,
                    &format!(
                        "either policy ({}) or policy_configmap, not both",
                        path.display()
                    ),
                ))
            }
            (Some(path), None) => Some(load_policy(&path)?),
            (None, Some(name)) => {
                check_dns_subdomain("policy_configmap", &name)?;
                Some(PolicySource::ConfigMap(name))
            }
            (None, None) => None,
        };
        if egress == Egress::None && policy.is_some() {
            return Err(invalid(
                "egress",
                "none",
                "\"enforce\" when a policy is given (egress = \"none\" runs no enforcer to apply it)",
            ));
        }

        let config = Self {
            image,
            namespace: flags.namespace.or(file.namespace),
            name,
            command,
            sandbox_uid: flags.sandbox_uid.or(file.sandbox_uid),
            sandbox_gid: flags.sandbox_gid.or(file.sandbox_gid),
            topology: flags
                .supervisor_topology
                .or(file.supervisor_topology)
                .unwrap_or(Topology::Combined),
            supervisor_image,
            runtime_class: flags.runtime_class.or(file.runtime_class),
            workspace,
            resources: flags.resources.or(file.resources).unwrap_or_default(),
            env,
            egress,
            policy,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), KubeError> {
        check_image("image", &self.image)?;
        check_image("supervisor_image", &self.supervisor_image)?;
        if let Some(namespace) = &self.namespace {
            check_dns_label("namespace", namespace)?;
        }
        check_dns_label("name", &self.name)?;
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(invalid(
                "command",
                &format!("{:?}", self.command),
                "a non-empty argv whose first word is non-empty",
            ));
        }
        if let Some(class) = &self.runtime_class {
            check_dns_subdomain("runtime_class", class)?;
        }
        if let Some(workspace) = &self.workspace {
            check_quantity("workspace.size", &workspace.size)?;
            if let Some(class) = &workspace.storage_class {
                check_dns_subdomain("workspace.storage_class", class)?;
            }
        }
        for (section, amounts) in [
            ("requests", &self.resources.requests),
            ("limits", &self.resources.limits),
        ] {
            let Some(amounts) = amounts else { continue };
            for (key, value) in [
                ("cpu", &amounts.cpu),
                ("memory", &amounts.memory),
                ("ephemeral-storage", &amounts.ephemeral_storage),
            ] {
                if let Some(value) = value {
                    check_quantity(&format!("resources.{section}.{key}"), value)?;
                }
            }
        }
        for (key, value) in &self.env {
            check_env(key, value)?;
        }
        Ok(())
    }
}

/// Reads and validates a policy file with kiln-policy, as the enforcer will.
fn load_policy(path: &Path) -> Result<PolicySource, KubeError> {
    let bytes = crate::read_bounded(path, kiln_policy::MAX_POLICY_BYTES as u64)?;
    let origin = path.display().to_string();
    let text = String::from_utf8(bytes).map_err(|_| KubeError::Read {
        path: origin.clone(),
        message: "not UTF-8 text".to_owned(),
    })?;
    let policy = kiln_policy::Policy::parse(&origin, &text)?;
    Ok(PolicySource::File {
        path: path.to_owned(),
        digest: policy.digest().to_owned(),
        text,
    })
}

fn invalid(key: &str, value: &str, accepted: &str) -> KubeError {
    KubeError::InvalidSetting {
        key: key.to_owned(),
        value: value.to_owned(),
        accepted: accepted.to_owned(),
    }
}

fn check_image(key: &str, value: &str) -> Result<(), KubeError> {
    if value.is_empty()
        || value.len() > 4096
        || value.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            key,
            value,
            "an image reference without spaces or control characters",
        ));
    }
    Ok(())
}

/// RFC 1123 label: what Kubernetes accepts for namespace names and label values we
/// derive from the sandbox name.
fn check_dns_label(key: &str, value: &str) -> Result<(), KubeError> {
    if !is_dns_label(value) {
        return Err(invalid(
            key,
            value,
            "1-63 characters of a-z 0-9 '-', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
fn check_dns_subdomain(key: &str, value: &str) -> Result<(), KubeError> {
    if value.len() > 253 || !value.split('.').all(is_dns_label) {
        return Err(invalid(
            key,
            value,
            "at most 253 characters of dot-separated labels of a-z 0-9 '-'",
        ));
    }
    Ok(())
}

/// A Kubernetes quantity in the plain form: a positive decimal number with an optional
/// binary (Ki..Ei) or decimal (m, k, M..E) suffix. Exponent notation is not accepted.
fn check_quantity(key: &str, value: &str) -> Result<(), KubeError> {
    const SUFFIXES: [&str; 13] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|s| value.strip_suffix(s))
        .unwrap_or(value);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let ok = !whole.is_empty()
        && digits(whole)
        && digits(fraction)
        && !(number.contains('.') && fraction.is_empty())
        && number.bytes().any(|b| (b'1'..=b'9').contains(&b));
    if !ok {
        return Err(invalid(
            key,
            value,
            "a positive decimal quantity such as \"500m\", \"2\", \"1.5Gi\" or \"10G\" (suffixes Ki Mi Gi Ti Pi Ei m k M G T P E)",
        ));
    }
    Ok(())
}

/// Names Kubernetes 1.29 accepts (`[-._a-zA-Z][-._a-zA-Z0-9]*`), none of kiln's own.
fn check_env(key: &str, value: &str) -> Result<(), KubeError> {
    let bytes = key.as_bytes();
    let name_ok = !bytes.is_empty()
        && !bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !name_ok {
        return Err(invalid(
            &format!("env.{key}"),
            value,
            "a name of A-Z a-z 0-9 '-' '.' '_' not starting with a digit",
        ));
    }
    if RESERVED_ENV.contains(&key) {
        return Err(invalid(
            &format!("env.{key}"),
            value,
            "a name other than SANDBOX_UID and SANDBOX_GID, which kiln sets",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        image = "example.test/agent:1"
        namespace = "team-a"
        name = "demo"
        command = ["python3", "-m", "agent"]
        sandbox_uid = 5000
        supervisor_topology = "sidecar"
        supervisor_image = "example.test/kiln-supervisor:0.1.0"
        runtime_class = "kata"
        [workspace]
        size = "10Gi"
        storage_class = "fast-ssd"
        [resources.requests]
        cpu = "500m"
        memory = "1Gi"
        [resources.limits]
        ephemeral-storage = "2Gi"
        [env]
        LANG = "C.UTF-8"
    "#;

    #[test]
    fn full_file_parses_and_flags_override() {
        let file = ConfigFile::parse("t.toml", FULL).unwrap();
        let settings = ConfigFile {
            name: Some("other".into()),
            env: Some(BTreeMap::from([
                ("LANG".into(), "C".into()),
                ("EXTRA".into(), "1".into()),
            ])),
            ..Default::default()
        };
        let overrides = ConfigOverrides {
            settings,
            storage_class: Some("slow".into()),
            no_workspace: false,
        };
        let config = SandboxConfig::resolve(file, overrides).unwrap();
        assert_eq!(config.name, "other");
        assert_eq!(config.sandbox_uid, Some(5000));
        assert_eq!(config.sandbox_gid, None);
        assert_eq!(config.topology, Topology::Sidecar);
        assert_eq!(
            config.workspace,
            Some(WorkspaceConfig {
                size: "10Gi".into(),
                storage_class: Some("slow".into())
            })
        );
        assert_eq!(config.env.get("LANG").map(String::as_str), Some("C"));
        assert_eq!(config.env.len(), 2);
        assert_eq!(
            config
                .resources
                .limits
                .unwrap()
                .ephemeral_storage
                .as_deref(),
            Some("2Gi")
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        for (text, key) in [
            ("image = \"a\"\nsandbox_user = 5", "sandbox_user"),
            ("[workspace]\nsize = \"1Gi\"\nclass = \"x\"", "class"),
            ("[resources.limits]\ngpu = \"1\"", "gpu"),
        ] {
            let err = ConfigFile::parse("k.toml", text).unwrap_err().to_string();
            assert!(err.starts_with("k.toml: "), "{err}");
            assert!(err.contains(&format!("unknown field `{key}`")), "{err}");
        }
    }

    #[test]
    fn wrong_types_and_values_are_errors() {
        let err = ConfigFile::parse("k.toml", "supervisor_topology = \"both\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("both") && err.contains("combined"), "{err}");
        let err = ConfigFile::parse("k.toml", "sandbox_uid = -1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sandbox_uid") || err.contains("-1"), "{err}");
    }

    fn minimal() -> ConfigOverrides {
        let settings = ConfigFile {
            image: Some("img".into()),
            name: Some("demo".into()),
            supervisor_image: Some("sup".into()),
            command: Some(vec!["sh".into()]),
            ..Default::default()
        };
        ConfigOverrides {
            settings,
            ..Default::default()
        }
    }

    #[test]
    fn missing_required_settings_name_key_and_flag() {
        let mut overrides = minimal();
        overrides.settings.supervisor_image = None;
        let err = SandboxConfig::resolve(ConfigFile::default(), overrides)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("supervisor_image") && err.contains("--supervisor-image"),
            "{err}"
        );
    }

    #[test]
    fn defaults_are_combined_without_workspace() {
        let config = SandboxConfig::resolve(ConfigFile::default(), minimal()).unwrap();
        assert_eq!(
            (config.topology, config.workspace, config.namespace),
            (Topology::Combined, None, None)
        );
    }

    #[test]
    fn no_workspace_flag_drops_the_files_workspace() {
        let file = ConfigFile::parse("t.toml", FULL).unwrap();
        let config = SandboxConfig::resolve(
            file,
            ConfigOverrides {
                no_workspace: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(config.workspace, None);
    }

    fn size(size: &str) -> WorkspaceConfig {
        WorkspaceConfig {
            size: size.into(),
            storage_class: None,
        }
    }

    #[test]
    fn bad_values_are_rejected_with_the_key() {
        type Edit = fn(&mut ConfigOverrides);
        let cases: [(Edit, &str); 10] = [
            (|o| o.settings.name = Some("Demo".into()), "name"),
            (|o| o.settings.namespace = Some("-x".into()), "namespace"),
            (|o| o.settings.image = Some("a b".into()), "image"),
            (|o| o.settings.command = Some(vec![]), "command"),
            (
                |o| o.settings.runtime_class = Some("Kata".into()),
                "runtime_class",
            ),
            (
                |o| o.settings.workspace = Some(size("10 GB")),
                "workspace.size",
            ),
            (|o| o.settings.workspace = Some(size("0")), "workspace.size"),
            (
                |o| o.storage_class = Some("x".into()),
                "workspace.storage_class",
            ),
            (
                |o| o.settings.env = Some(BTreeMap::from([("1X".into(), "v".into())])),
                "env.1X",
            ),
            (
                |o| o.settings.env = Some(BTreeMap::from([("SANDBOX_UID".into(), "0".into())])),
                "env.SANDBOX_UID",
            ),
        ];
        for (edit, key) in cases {
            let mut overrides = minimal();
            edit(&mut overrides);
            let err = SandboxConfig::resolve(ConfigFile::default(), overrides).unwrap_err();
            assert!(
                matches!(&err, KubeError::InvalidSetting { key: k, .. } if k == key),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn quantities() {
        for ok in ["1", "500m", "1.5Gi", "10G", "0.5", "128Mi", "1E"] {
            check_quantity("q", ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "", "0", "0Gi", "-1", "1.", ".5", "1e3", "1 Gi", "Gi", "1GiB", "1.5.1",
        ] {
            assert!(check_quantity("q", bad).is_err(), "{bad}");
        }
    }
}
