//! The errors of this crate; each names the input and says what is accepted.

/// A `--network-allow-host` value that is not `host.kiln.internal:PORT` or `ADDR:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid --network-allow-host value \"{input}\": {reason}; accepted: \
     host.kiln.internal:PORT, IPV4:PORT or [IPV6]:PORT with PORT from 1 to 65535"
)]
pub struct AllowHostError {
    pub input: String,
    pub reason: String,
}

/// A policy file that cannot be used: each message names the file (as the caller named
/// it), the field (with its entry: `network_policies.KEY.endpoints[N].FIELD`) and what is
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: the policy is {size} bytes; at most {max} are accepted")]
    TooLarge {
        file: String,
        size: usize,
        max: usize,
    },
    /// Not YAML, an unknown field, or a value of the wrong type (the detail carries the
    /// field's path, line and column).
    #[error("{file}: {detail}")]
    Syntax { file: String, detail: String },
    /// A value that breaks a rule of the policy schema.
    #[error("{file}: {field} {reason}")]
    Invalid {
        file: String,
        field: String,
        reason: String,
    },
}
