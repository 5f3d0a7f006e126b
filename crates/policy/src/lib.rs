//! kiln-policy: a sandbox's network policy and the decision on every flow, as pure
//! functions (text, addresses and times in; decisions out).
//!
//! This crate is the one place that says what a sandbox may reach. It parses the
//! `network_policies` section of an OpenShell sandbox policy file, knows the address
//! ranges refused by default, parses `--network-allow-host` values, decides connections,
//! HTTP requests and DNS queries, reads the first bytes of a flow (TLS SNI, HTTP request
//! head), remembers which names a resolver pinned to each address and defines the JSON
//! record every decision is logged as.
//!
//! It does no I/O: no files, no sockets, no clock. The VM path (a user-space network
//! endpoint on the host) and the Kubernetes sidecar (a transparent proxy in the pod) do
//! their I/O differently, and both must take the same decision on the same inputs; with
//! the decision a pure function, they cannot drift apart and every rule is testable
//! without a network. Callers pass the policy text, the host's own addresses and the
//! time in.
//!
//! The rules are described for users in `docs/network.md`.
//!
//! # Use
//!
//! A [`Policy`] is an immutable value: an enforcer keeps the one in force in an
//! `Arc<Policy>` it swaps whole when a new file validates (so a decision is taken wholly
//! by the old or the new policy), and names it by [`Policy::digest`]. Per connection it
//! asks [`Policy::check_connection`] (or [`check_default`] without a policy); on
//! [`Decision::NeedPeek`] it reads the flow's first bytes, runs [`peek::peek`] on them and
//! asks again. On a plain HTTP connection it decides every request with
//! [`Policy::check_request`], and every DNS query with [`Policy::check_dns`]. Each final
//! decision becomes one [`DecisionRecord`].
//!
//! ```
//! use std::sync::Arc;
//! use kiln_policy::{peek, Connection, Decision, FirstBytes, HostFacts, Policy};
//!
//! let text = "version: 1\nnetwork_policies:\n  gh:\n    endpoints:\n      - { host: api.github.com, port: 443 }\n";
//! let policy = Arc::new(Policy::parse("policy.yaml", text)?);
//! let host = HostFacts::default();
//! let pinned = vec!["api.github.com".to_string()];
//! let mut conn = Connection {
//!     dst: "198.18.0.5:443".parse()?,
//!     pinned: &pinned,
//!     first_bytes: FirstBytes::NotSeen,
//! };
//! assert_eq!(policy.check_connection(&conn, &host, &[]), Decision::NeedPeek);
//! let first = b"\x16\x03\x01"; // what the guest sent so far: not enough yet
//! let seen = peek::peek(first);
//! conn.first_bytes = seen.first_bytes();
//! assert_eq!(policy.check_connection(&conn, &host, &[]), Decision::NeedPeek);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod allow_host;
mod check;
mod decision;
mod error;
mod file;
mod glob;
mod host;
mod model;
pub mod peek;
mod pins;
mod ranges;
mod record;

pub use allow_host::{AllowHost, HOST_GATEWAY_NAME};
pub use check::{dns_type_name, Connection, DnsDecision, FirstBytes, Request, MAX_QUERY_PARAMS};
pub use decision::{check_default, Allowed, Decision, DenyReason, EntryRef, HostFacts, Verdict};
pub use error::{AllowHostError, PolicyError};
pub use model::{NotEnforced, Policy, MAX_ENDPOINTS, MAX_POLICY_BYTES, MAX_RULES_PER_ENDPOINT};
pub use pins::{Pins, MAX_NAMES_PER_ADDRESS, MAX_PINNED_ADDRESSES};
pub use ranges::{canonical, refused_range, RangeKind, RefusedRange};
pub use record::{rfc3339_utc, DecisionRecord, FlowProtocol};
