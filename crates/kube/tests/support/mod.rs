//! Shared by kiln-kube's integration tests: configurations and namespaces by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_identity::{SUPPLEMENTAL_GROUPS_ANNOTATION, UID_RANGE_ANNOTATION};
use kiln_kube::{ConfigFile, ConfigOverrides, NamespaceInfo, SandboxConfig};

/// A configuration from TOML text with `extra` appended.
pub fn config(topology: &str, extra: &str) -> SandboxConfig {
    let text = format!(
        "image = \"registry.example/agent:1.0\"\n\
         name = \"demo\"\n\
         command = [\"python3\", \"-m\", \"agent\"]\n\
         supervisor_image = \"registry.example/kiln-supervisor:0.1.0\"\n\
         supervisor_topology = \"{topology}\"\n\
         {extra}"
    );
    let file = ConfigFile::parse("test.toml", &text).unwrap();
    SandboxConfig::resolve(file, ConfigOverrides::default()).unwrap()
}

/// Namespace `team-a` with the given SCC annotations (`None` leaves one out).
pub fn namespace(uid_range: Option<&str>, supplemental_groups: Option<&str>) -> NamespaceInfo {
    let mut annotations =
        BTreeMap::from([("openshift.io/description".to_owned(), "test".to_owned())]);
    if let Some(value) = uid_range {
        annotations.insert(UID_RANGE_ANNOTATION.to_owned(), value.to_owned());
    }
    if let Some(value) = supplemental_groups {
        annotations.insert(SUPPLEMENTAL_GROUPS_ANNOTATION.to_owned(), value.to_owned());
    }
    NamespaceInfo {
        name: "team-a".to_owned(),
        annotations,
        origin: "test".to_owned(),
    }
}

/// The venv's kubernetes-validate; panics, naming the script that installs it, when it is
/// absent.
pub fn kubernetes_validate() -> PathBuf {
    let venv = std::env::var_os("KILN_KUBERNETES_VALIDATE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/kiln/venv-kubernetes-validate")
        });
    let binary = venv.join("bin/kubernetes-validate");
    assert!(
        binary.is_file(),
        "{} is absent; run scripts/setup-kubernetes-validate",
        binary.display()
    );
    binary
}

pub fn validate(binary: &Path, version: &str, file: &Path) -> Result<(), String> {
    let output = Command::new(binary)
        .args(["--strict", "--kubernetes-version", version])
        .arg(file)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // It prints INFO for a pass and ERROR for a failure; both must agree with the exit code.
    if output.status.success() && text.contains("passed") && !text.contains("ERROR") {
        Ok(())
    } else {
        Err(text)
    }
}
