//! What a decision says, and the default mode's decision (no policy file).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::allow_host::{AllowHost, HOST_GATEWAY_NAME};
use crate::ranges::{refused_range, RangeKind, RefusedRange};

/// What the caller knows about the host, found by the caller (this crate reads nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Every address on the host's interfaces; connections to them are refused.
    pub addrs: Vec<IpAddr>,
    /// The guest-visible address that stands for the host (`host.kiln.internal`).
    pub gateway: Option<IpAddr>,
}

/// The decision on a connection or a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through.
    Allow(Allowed),
    /// Reset the connection, answer 403, and log the reason.
    Deny(DenyReason),
    /// The first bytes of the flow (TLS SNI or HTTP Host) decide; ask again with them.
    NeedPeek,
    /// Let it through, but log it as what `enforcement: enforce` would have done.
    Audit {
        entry: EntryRef,
        would_deny: DenyReason,
    },
}

impl Decision {
    /// `allow`, `deny` or `audit` (`NeedPeek` is not a final decision: `None`).
    pub fn verdict(&self) -> Option<Verdict> {
        match self {
            Decision::Allow(_) => Some(Verdict::Allow),
            Decision::Deny(_) => Some(Verdict::Deny),
            Decision::Audit { .. } => Some(Verdict::Audit),
            Decision::NeedPeek => None,
        }
    }

    /// Whether the flow may proceed (allow or audit).
    pub fn lets_through(&self) -> bool {
        matches!(self, Decision::Allow(_) | Decision::Audit { .. })
    }
}

/// The final word on a flow, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    Audit,
}

/// What allowed a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Default mode: a public address, open to the sandbox.
    Internet,
    /// An explicit `--network-allow-host`.
    AllowHost(AllowHost),
    /// A policy entry's endpoint.
    Entry(EntryRef),
}

impl fmt::Display for Allowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowed::Internet => f.write_str("default: public internet"),
            Allowed::AllowHost(a) => write!(f, "--network-allow-host {a}"),
            Allowed::Entry(e) => write!(f, "{e}"),
        }
    }
}

/// One endpoint of one policy entry: the entry's key in `network_policies`, its
/// display name and the endpoint's index in its `endpoints` list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EntryRef {
    pub key: String,
    pub name: String,
    pub endpoint: usize,
}

impl fmt::Display for EntryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "network_policies.{}.endpoints[{}]",
            self.key, self.endpoint
        )?;
        if self.name != self.key {
            write!(f, " ({})", self.name)?;
        }
        Ok(())
    }
}

/// Why a flow was (or, under audit, would have been) denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The destination is in a refused range and nothing opened it explicitly.
    Refused(RefusedRange),
    /// The destination is the host gateway and no `--network-allow-host` names the port.
    HostGateway { port: u16 },
    /// No policy entry allows this destination (names are the ones known for it).
    NoEntry { dst: SocketAddr, names: Vec<String> },
    /// A TLS or HTTP flow naming no host (no SNI or Host, an IP address, not a DNS
    /// name), to an address no endpoint allows by address.
    NoName { dst: SocketAddr },
    /// The flow's SNI or Host names a host kiln's resolver never gave this address.
    NameNotPinned { name: String, dst: SocketAddr },
    /// The destination is private (or the host's) and the matching endpoint neither
    /// names it exactly nor lists it in `allowed_ips`.
    InternalAddress {
        entry: EntryRef,
        range: RefusedRange,
    },
    /// The matching endpoint has `allowed_ips` and the destination is not in them.
    NotInAllowedIps { entry: EntryRef, addr: IpAddr },
    /// A `protocol: rest` endpoint with rules: kiln checks them on plain HTTP only.
    NotPlainHttp { entry: EntryRef },
    /// An endpoint of a protocol kiln does not inspect, with rules it cannot check.
    Uninspected { entry: EntryRef },
    /// An HTTP request no rule of the endpoint allows.
    RequestNotAllowed {
        entry: EntryRef,
        method: String,
        path: String,
    },
    /// An HTTP request a `deny_rules` entry matches.
    RequestDenied {
        entry: EntryRef,
        method: String,
        path: String,
        deny_rule: usize,
    },
    /// A request whose target kiln will not match against rules (bad encoding, `..`
    /// escaping the root, an encoded `/` where the endpoint does not allow one).
    BadRequestTarget { entry: EntryRef, reason: String },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::Refused(r) if r.kind == RangeKind::HostAddress => {
                write!(f, "destination is {r}")
            }
            DenyReason::Refused(r) => write!(f, "destination is in the refused {r}"),
            DenyReason::HostGateway { port } => write!(
                f,
                "destination is the host itself ({HOST_GATEWAY_NAME}); open this service \
                 with --network-allow-host {HOST_GATEWAY_NAME}:{port}"
            ),
            DenyReason::NoEntry { dst, names } if names.is_empty() => {
                write!(
                    f,
                    "{dst} matches no policy entry (no name was resolved to it)"
                )
            }
            DenyReason::NoEntry { dst, names } => write!(
                f,
                "{dst} (known as {}) matches no policy entry",
                names.join(", ")
            ),
            DenyReason::NoName { dst } => write!(
                f,
                "the flow to {dst} names no host (no SNI or Host, or an IP address), and no \
                 policy entry allows {} by address",
                dst.ip()
            ),
            DenyReason::NameNotPinned { name, dst } => write!(
                f,
                "the flow names {name}, but kiln's resolver never gave {} for that name",
                dst.ip()
            ),
            DenyReason::InternalAddress { entry, range } => write!(
                f,
                "{entry} resolves to {range}; a wildcard or address-only endpoint needs \
                 allowed_ips for it"
            ),
            DenyReason::NotInAllowedIps { entry, addr } => {
                write!(f, "{addr} is not in the allowed_ips of {entry}")
            }
            DenyReason::NotPlainHttp { entry } => write!(
                f,
                "{entry} has protocol rest rules, which kiln checks on plain HTTP only \
                 (it does not decrypt TLS)"
            ),
            DenyReason::Uninspected { entry } => write!(
                f,
                "{entry} has a protocol kiln does not inspect, with rules kiln cannot check"
            ),
            DenyReason::RequestNotAllowed {
                entry,
                method,
                path,
            } => write!(f, "{method} {path} is not permitted by {entry}"),
            DenyReason::RequestDenied {
                entry,
                method,
                path,
                deny_rule,
            } => write!(
                f,
                "{method} {path} is blocked by {entry}.deny_rules[{deny_rule}]"
            ),
            DenyReason::BadRequestTarget { entry, reason } => {
                write!(f, "request target refused on {entry}: {reason}")
            }
        }
    }
}

/// The default mode (no policy file): the internet is open, the refused ranges and the
/// host itself are not, unless an explicit allow names the address and port.
pub fn check_default(dst: SocketAddr, host: &HostFacts, allows: &[AllowHost]) -> Decision {
    if let Some(allow) = allows.iter().find(|a| a.matches(dst, host.gateway)) {
        return Decision::Allow(Allowed::AllowHost(*allow));
    }
    if let Some(reason) = refusal(dst, host) {
        return Decision::Deny(reason);
    }
    Decision::Allow(Allowed::Internet)
}

/// The refusal for a destination in a refused range or at the host gateway, if any.
pub(crate) fn refusal(dst: SocketAddr, host: &HostFacts) -> Option<DenyReason> {
    if host
        .gateway
        .is_some_and(|g| crate::canonical(g) == crate::canonical(dst.ip()))
    {
        return Some(DenyReason::HostGateway { port: dst.port() });
    }
    refused_range(dst.ip(), &host.addrs).map(DenyReason::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            addrs: vec![
                "192.168.1.20".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
            ],
            gateway: Some("10.0.2.2".parse().unwrap()),
        }
    }

    fn dst(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_internet_is_open_by_default() {
        for d in ["198.18.0.5:443", "1.1.1.1:53", "[2606:4700::1111]:443"] {
            assert_eq!(
                check_default(dst(d), &facts(), &[]),
                Decision::Allow(Allowed::Internet),
                "{d}"
            );
        }
    }

    #[test]
    fn refused_ranges_and_host_addresses_are_denied_with_the_range() {
        for (d, text) in [
            ("127.0.0.1:5432", "loopback range 127.0.0.0/8"),
            (
                "169.254.169.254:80",
                "link-local (cloud metadata) range 169.254.0.0/16",
            ),
            ("[::ffff:169.254.169.254]:80", "169.254.0.0/16"),
            ("10.1.2.3:22", "10.0.0.0/8"),
            ("100.64.1.1:80", "100.64.0.0/10"),
            ("[fd12::1]:80", "fc00::/7"),
            ("[fe80::1]:80", "fe80::/10"),
            (
                "198.18.0.1:8080",
                "destination is an address of this host (198.18.0.1)",
            ),
        ] {
            let Decision::Deny(reason) = check_default(dst(d), &facts(), &[]) else {
                panic!("{d} allowed");
            };
            assert!(reason.to_string().contains(text), "{d}: {reason}");
        }
    }

    #[test]
    fn the_host_gateway_is_denied_with_the_flag_that_opens_it() {
        let Decision::Deny(reason) = check_default(dst("10.0.2.2:5432"), &facts(), &[]) else {
            panic!("gateway allowed");
        };
        assert!(reason
            .to_string()
            .contains("--network-allow-host host.kiln.internal:5432"));
    }

    #[test]
    fn an_explicit_allow_opens_exactly_one_service() {
        let allows: Vec<AllowHost> = ["host.kiln.internal:5432", "169.254.169.254:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(
            check_default(dst("10.0.2.2:5432"), &facts(), &allows),
            Decision::Allow(Allowed::AllowHost(allows[0]))
        );
        assert_eq!(
            check_default(dst("169.254.169.254:80"), &facts(), &allows),
            Decision::Allow(Allowed::AllowHost(allows[1]))
        );
        assert!(matches!(
            check_default(dst("10.0.2.2:5433"), &facts(), &allows),
            Decision::Deny(DenyReason::HostGateway { port: 5433 })
        ));
        assert!(matches!(
            check_default(dst("169.254.169.254:81"), &facts(), &allows),
            Decision::Deny(DenyReason::Refused(_))
        ));
    }

    #[test]
    fn verdicts() {
        assert_eq!(Decision::NeedPeek.verdict(), None);
        assert_eq!(
            Decision::Allow(Allowed::Internet).verdict(),
            Some(Verdict::Allow)
        );
        assert!(!Decision::Deny(DenyReason::HostGateway { port: 1 }).lets_through());
    }
}
