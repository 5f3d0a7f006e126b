//! Every bound the endpoint enforces; docs/network.md lists them. Beyond a bound a new
//! connection is reset, a DNS query is answered SERVFAIL, and the oldest pinned address
//! is forgotten: nothing the guest sends grows the host's memory without limit.

/// Guest connections and port-forward connections relayed at once.
pub const MAX_FLOWS: usize = 256;

/// New guest connections whose host-side connect is still under way.
pub const MAX_HALF_OPEN: usize = 64;

/// How long a host-side connect may take before the guest's connection is reset.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a connection that its first bytes decide (under a policy) may stay silent;
/// then it is decided as neither TLS nor HTTP. The first bytes are read up to
/// kiln-policy's `MAX_PEEK_BYTES` (16 KiB).
pub const PEEK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Bytes of each direction of a flow buffered in the stack (the TCP window it offers).
pub const FLOW_BUFFER: usize = 256 * 1024;

/// Bytes one read from or to the host side moves; each direction of a flow queues at most
/// [`FLOW_CHUNKS`] of them between the stack and the host socket.
pub const FLOW_CHUNK: usize = 32 * 1024;

/// Chunks queued per direction of a flow.
pub const FLOW_CHUNKS: usize = 4;

/// The largest frame accepted from QEMU: an Ethernet frame at the NIC's 1500-byte MTU
/// with room for VLAN tags. A longer length ends the endpoint (the stream cannot be
/// trusted past it).
pub const MAX_FRAME: usize = 1536;

/// Frames read from QEMU and not yet processed by the stack.
pub const FRAME_QUEUE: usize = 512;

/// DNS queries being resolved at once.
pub const MAX_DNS_INFLIGHT: usize = 64;

/// Name pinning: addresses remembered, and names per address (kiln-policy's [`Pins`](kiln_policy::Pins)).
pub use kiln_policy::{MAX_NAMES_PER_ADDRESS, MAX_PINNED_ADDRESSES};

/// Answers at most this many addresses for one query.
pub const MAX_DNS_ANSWERS: usize = 16;

/// How long one name's resolution may take before the guest gets SERVFAIL.
pub const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
