//! kiln-policy: a sandbox's network policy and the decision on every flow, as pure
//! functions (text, addresses and times in; decisions out).
//!
//! This crate is the one place that says what a sandbox may reach. It parses the
//! `network_policies` section of an OpenShell sandbox policy file, knows the address
//! ranges refused by default, parses `--network-allow-host` values, decides connections,
//! HTTP requests and DNS queries, reads the first bytes of a flow (TLS SNI, HTTP request
//! head) and defines the JSON record every decision is logged as.
//!
//! It does no I/O: no files, no sockets, no clock. The VM path (a user-space network
//! endpoint on the host) and the Kubernetes sidecar (a transparent proxy in the pod) do
//! their I/O differently, and both must take the same decision on the same inputs; with
//! the decision a pure function, they cannot drift apart and every rule is testable
//! without a network. Callers pass the policy text, the host's own addresses and the
//! time in.
//!
//! The rules are described for users in `docs/network.md`.

mod allow_host;
mod check;
mod decision;
mod error;
mod file;
mod glob;
mod host;
mod model;
pub mod peek;
mod ranges;
mod record;

pub use allow_host::{AllowHost, HOST_GATEWAY_NAME};
pub use check::{dns_type_name, Connection, DnsDecision, FirstBytes, Request, MAX_QUERY_PARAMS};
pub use decision::{check_default, Allowed, Decision, DenyReason, EntryRef, HostFacts, Verdict};
pub use error::{AllowHostError, PolicyError};
pub use model::{NotEnforced, Policy, MAX_ENDPOINTS, MAX_POLICY_BYTES, MAX_RULES_PER_ENDPOINT};
pub use ranges::{canonical, refused_range, RangeKind, RefusedRange};
pub use record::{rfc3339_utc, DecisionRecord, FlowProtocol};
