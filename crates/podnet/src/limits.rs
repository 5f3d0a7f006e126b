//! Every bound the enforcer keeps; docs/kubernetes.md lists them. The values match the
//! VM path's endpoint where the two have the same thing to bound.

use std::time::Duration;

/// The transparent proxy's port (on 127.0.0.1 and ::1), where the rules redirect TCP.
pub const DEFAULT_PROXY_PORT: u16 = 15001;

/// The resolver's port (on 127.0.0.1 and ::1), where the rules redirect UDP port 53.
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// Connections relayed at once; a new one beyond it is reset.
pub const MAX_FLOWS: usize = 256;

/// How long the first bytes of a connection may take to show TLS or HTTP.
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the connect to the original destination may take before a reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes moved by one read in either direction.
pub const CHUNK: usize = 32 * 1024;

/// The longest line of a chunked request body's framing (size and extensions).
pub const MAX_CHUNK_LINE: usize = 4096;

/// How long the responses to requests already forwarded may take once a request on
/// the connection is denied, before the connection is closed with the 403.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// DNS queries being resolved at once; beyond it a query gets SERVFAIL.
pub const MAX_DNS_INFLIGHT: usize = 64;

/// Answers at most this many addresses for one query.
pub const MAX_DNS_ANSWERS: usize = 16;

/// How long one name's resolution may take before the workload gets SERVFAIL.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest DNS message read (from the workload or a server).
pub const MAX_DNS_MESSAGE: usize = 4096;

/// The largest /etc/hosts or /etc/resolv.conf read.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// How often the policy file is checked for a new version.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(500);
