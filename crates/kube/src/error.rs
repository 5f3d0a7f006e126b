//! The one error type of kiln-kube; each message names the input and what is accepted.

use kiln_identity::IdentityError;

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// A configuration file that does not parse (unknown key, wrong type, bad TOML).
    #[error("{origin}: {message}")]
    ConfigFile { origin: String, message: String },

    /// A setting that neither the file nor a flag gives.
    #[error("no {key} given: set `{key}` in the configuration file or pass {flag}")]
    MissingSetting {
        key: &'static str,
        flag: &'static str,
    },

    /// A setting whose value is not accepted.
    #[error("invalid {key} {value:?}: expected {accepted}")]
    InvalidSetting {
        key: String,
        value: String,
        accepted: String,
    },

    /// A file that cannot be read or is larger than accepted.
    #[error("{path}: {message}")]
    Read { path: String, message: String },

    /// A namespace object that is not what `kubectl get ns NAME -o json` prints.
    #[error("namespace object from {origin}: {message}")]
    NamespaceObject { origin: String, message: String },

    /// The configured namespace differs from the namespace object's name.
    #[error(
        "the configuration names namespace {configured:?} but the namespace object from {origin} is {actual:?}; \
         its SCC annotations would not apply to the pod"
    )]
    NamespaceMismatch {
        configured: String,
        actual: String,
        origin: String,
    },

    /// Reading the namespace from the cluster failed.
    #[error("reading namespace {namespace:?} from the cluster (current kubeconfig): {message}")]
    Cluster { namespace: String, message: String },

    /// The sandbox identity could not be resolved (malformed SCC annotation, out of range).
    #[error(transparent)]
    Identity(#[from] IdentityError),

    /// A network policy file that does not validate.
    #[error(transparent)]
    Policy(#[from] kiln_policy::PolicyError),

    /// No uid can be given to the network sidecar.
    #[error("network sidecar uid: {0}")]
    NetworkUid(String),

    /// A file given for the supervisor image that is not what it must be.
    #[error("{path}: {message}")]
    ImageInput { path: String, message: String },

    /// Building the supervisor image failed.
    #[error("building the supervisor image: {0}")]
    Image(String),

    /// Serialising the pod failed.
    #[error("printing the pod as YAML: {0}")]
    Yaml(String),
}
