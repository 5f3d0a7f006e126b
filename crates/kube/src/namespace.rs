//! The namespace the pod goes into: its name and annotations, from JSON or the cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;

use crate::KubeError;

/// Largest namespace JSON document read.
pub const MAX_NAMESPACE_JSON_SIZE: u64 = 4 << 20;

/// How long a cluster read may take before it is an error.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the renderer needs of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub name: String,
    pub annotations: BTreeMap<String, String>,
    /// Where it was read from (a path, `stdin`, or `cluster`), for messages.
    pub origin: String,
}

impl NamespaceInfo {
    fn from_object(namespace: Namespace, origin: &str) -> Result<Self, KubeError> {
        let name = namespace
            .metadata
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| KubeError::NamespaceObject {
                origin: origin.to_owned(),
                message: "metadata.name is missing".to_owned(),
            })?;
        Ok(Self {
            name,
            annotations: namespace.metadata.annotations.unwrap_or_default(),
            origin: origin.to_owned(),
        })
    }
}

/// Parses a namespace as `kubectl get ns NAME -o json` prints it (apiVersion v1, kind
/// Namespace, metadata.name set).
pub fn namespace_from_json(origin: &str, json: &[u8]) -> Result<NamespaceInfo, KubeError> {
    let namespace: Namespace = serde_json::from_slice(json).map_err(|err| KubeError::NamespaceObject {
        origin: origin.to_owned(),
        message: format!("{err}; expected the output of `kubectl get ns NAME -o json` (kind Namespace, apiVersion v1)"),
    })?;
    NamespaceInfo::from_object(namespace, origin)
}

/// Reads namespace `name` from the cluster of the current kubeconfig (`KUBECONFIG`, else
/// ~/.kube/config, else the in-cluster service account). Any failure is an error: the
/// caller must not fall back to defaults, or the pod would get ids the SCC rejects.
pub fn namespace_from_cluster(name: &str) -> Result<NamespaceInfo, KubeError> {
    let fail = |message: String| KubeError::Cluster {
        namespace: name.to_owned(),
        message,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("starting the async runtime: {e}")))?;
    let namespace = runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| fail(error_chain(&e)))?;
        let api: kube::Api<Namespace> = kube::Api::all(client);
        match tokio::time::timeout(CLUSTER_TIMEOUT, api.get(name)).await {
            Ok(result) => result.map_err(|e| fail(error_chain(&e))),
            Err(_) => Err(fail(format!(
                "no answer within {} s",
                CLUSTER_TIMEOUT.as_secs()
            ))),
        }
    })?;
    NamespaceInfo::from_object(namespace, "cluster")
}

/// An error and its causes, `outer: inner: ...` (kube-rs keeps e.g. "connection refused"
/// in the causes), without repeating a cause its parent already printed.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_output_parses() {
        let json = br#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"team-a",
            "annotations":{"openshift.io/sa.scc.uid-range":"1000680000/10000"}},"spec":{"finalizers":["kubernetes"]},
            "status":{"phase":"Active"}}"#;
        let ns = namespace_from_json("ns.json", json).unwrap();
        assert_eq!(ns.name, "team-a");
        assert_eq!(ns.annotations.len(), 1);
    }

    #[test]
    fn other_objects_are_rejected() {
        for json in [
            &br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"x"}}"#[..],
            br#"{"apiVersion":"v1","kind":"Namespace","metadata":{}}"#,
            br#"not json"#,
        ] {
            let err = namespace_from_json("ns.json", json)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("namespace object from ns.json: "), "{err}");
        }
    }
}
