//! kiln-kube: the Kubernetes pod that runs a kiln sandbox.
//!
//! It turns a [`SandboxConfig`] (TOML file plus flags) and the target namespace's
//! annotations into a typed [`k8s_openapi`] `Pod` for one of two supervisor topologies,
//! resolving the sandbox identity with kiln-identity (explicit configuration, else the
//! namespace's OpenShift SCC annotations, else the default) and recording where each id
//! came from. [`pss`] checks any pod against the Pod Security Standards, container by
//! container. The namespace comes from a `kubectl get ns -o json` document or, through
//! kube-rs, from the cluster of the current kubeconfig.

mod config;
mod error;
mod image;
mod namespace;
pub mod pss;
mod render;

use std::io::Read;
use std::path::Path;

pub use config::{
    ConfigFile, ConfigOverrides, Egress, PolicySource, ResourceAmounts, ResourcesConfig,
    SandboxConfig, Topology, WorkspaceConfig, MAX_CONFIG_SIZE, RESERVED_ENV,
};
pub use error::KubeError;
pub use image::{build_supervisor_image, parse_push_target, OciTarget, MAX_BINARY_SIZE};
pub use namespace::{
    namespace_from_cluster, namespace_from_json, NamespaceInfo, MAX_NAMESPACE_JSON_SIZE,
};
pub use render::{
    pod_to_yaml, render_pod, RenderedPod, BUSYBOX_PATH_IN_IMAGE, DEFAULT_NETWORK_UID, EGRESS_LABEL,
    GID_SOURCE_ANNOTATION, NETWORK_CAPABILITY, NETWORK_UID_SOURCE_ANNOTATION,
    POLICY_DIGEST_ANNOTATION, POLICY_DIR, POLICY_KEY, SUPERVISOR_PATH_IN_IMAGE, TOPOLOGY_LABEL,
    UID_SOURCE_ANNOTATION,
};

/// Reads at most `limit` bytes of `path`; `-` is standard input. Larger input is an error.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, KubeError> {
    let err = |message: String| KubeError::Read {
        path: path.display().to_string(),
        message,
    };
    let mut bytes = Vec::new();
    let reader: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).map_err(|e| err(e.to_string()))?)
    };
    reader
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(err(format!("larger than {limit} bytes")));
    }
    Ok(bytes)
}
