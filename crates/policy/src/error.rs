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
