//! Deciding a guest's flows: the facts the stack knows about them, the default mode's
//! decider and the policy file's (kiln-policy decides; this module only gathers the
//! facts). Every decision goes through one [`Egress`], so the two modes share the stack,
//! and every final decision goes to one [`DecisionLog`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, RwLock};

use kiln_policy::{
    check_default, AllowHost, Decision, DecisionRecord, DnsDecision, FirstBytes, HostFacts, Policy,
    Request,
};

/// What the stack knows about a new guest connection when it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowFacts {
    /// Where the guest sent its SYN.
    pub dst: SocketAddrV4,
    /// The names kiln's resolver answered with `dst`'s address in this sandbox (pinned
    /// names), most recent first; empty when the guest never resolved it through kiln.
    pub names: Vec<String>,
}

/// Decides the guest's flows with kiln-policy. Called on the endpoint's thread; it must
/// not block. An allowed (or audited) connection is opened to its destination, the
/// gateway's ports to the host's loopback.
pub trait Egress: Send + Sync {
    /// A connection, with what its first bytes showed ([`FirstBytes::NotSeen`] at the
    /// SYN; [`Decision::NeedPeek`] asks again once they are seen).
    fn decide(&self, flow: &FlowFacts, first_bytes: FirstBytes<'_>) -> Decision;

    /// Whether every request of a plain HTTP connection is decided.
    fn inspects_requests(&self) -> bool {
        false
    }

    /// One request on a plain HTTP connection; `None` when requests are not inspected.
    fn decide_request(&self, _flow: &FlowFacts, _request: &Request<'_>) -> Option<Decision> {
        None
    }

    /// A DNS query for `name` of record type `qtype`.
    fn decide_dns(&self, _name: &str, _qtype: u16) -> DnsDecision {
        DnsDecision::Resolve
    }

    /// The rule set in force, as a 403 names it.
    fn rule_set(&self) -> String;
}

/// Where every final decision goes, as kiln-policy's record.
pub trait DecisionLog: Send + Sync {
    fn record(&self, record: &DecisionRecord);
}

/// The facts kiln-policy needs about the host: its addresses and the gateway standing
/// for it.
fn host_facts(gateway: Ipv4Addr, host_addresses: Vec<IpAddr>) -> HostFacts {
    HostFacts {
        addrs: host_addresses,
        gateway: Some(IpAddr::V4(gateway)),
    }
}

/// The default mode (`--network user`): kiln-policy's default decision, with the host's
/// own addresses and the services opened by `--network-allow-host`.
pub struct DefaultEgress {
    host: HostFacts,
    allows: Vec<AllowHost>,
}

impl DefaultEgress {
    /// `gateway` is the guest's address for the host (`host.kiln.internal`);
    /// `host_addresses` every address of the host's interfaces.
    pub fn new(gateway: Ipv4Addr, allows: Vec<AllowHost>, host_addresses: Vec<IpAddr>) -> Self {
        Self {
            host: host_facts(gateway, host_addresses),
            allows,
        }
    }

    /// The addresses of this host's interfaces (for [`DefaultEgress::new`]).
    pub fn host_addresses() -> std::io::Result<Vec<IpAddr>> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
        Ok(addrs
            .filter_map(|ifaddr| ifaddr.address)
            .filter_map(|addr| {
                addr.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect())
    }
}

impl Egress for DefaultEgress {
    fn decide(&self, flow: &FlowFacts, _: FirstBytes<'_>) -> Decision {
        check_default(SocketAddr::V4(flow.dst), &self.host, &self.allows)
    }

    fn rule_set(&self) -> String {
        "the default network (no policy file)".into()
    }
}

/// A sandbox's decider: allow-list mode (`--network-policy FILE`, what no entry of the
/// policy allows is denied) while it holds a policy, the default mode while it holds
/// none. The policy is swapped whole by [`PolicyEgress::replace`], so each decision is
/// taken wholly by the old or the new one.
pub struct PolicyEgress {
    policy: RwLock<Option<Arc<Policy>>>,
    default: DefaultEgress,
}

impl PolicyEgress {
    pub fn new(
        policy: Option<Policy>,
        gateway: Ipv4Addr,
        allows: Vec<AllowHost>,
        host_addresses: Vec<IpAddr>,
    ) -> Self {
        Self {
            policy: RwLock::new(policy.map(Arc::new)),
            default: DefaultEgress::new(gateway, allows, host_addresses),
        }
    }

    /// Puts `policy` in force for every decision from now on.
    pub fn replace(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(policy));
    }

    /// The policy in force, if any.
    pub fn current(&self) -> Option<Arc<Policy>> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Egress for PolicyEgress {
    fn decide(&self, flow: &FlowFacts, first_bytes: FirstBytes<'_>) -> Decision {
        let Some(policy) = self.current() else {
            return self.default.decide(flow, first_bytes);
        };
        let conn = kiln_policy::Connection {
            dst: SocketAddr::V4(flow.dst),
            pinned: &flow.names,
            first_bytes,
        };
        policy.check_connection(&conn, &self.default.host, &self.default.allows)
    }

    fn inspects_requests(&self) -> bool {
        self.current().is_some()
    }

    fn decide_request(&self, flow: &FlowFacts, request: &Request<'_>) -> Option<Decision> {
        Some(self.current()?.check_request(
            SocketAddr::V4(flow.dst),
            &flow.names,
            request,
            &self.default.host,
            &self.default.allows,
        ))
    }

    fn decide_dns(&self, name: &str, qtype: u16) -> DnsDecision {
        match self.current() {
            // The host's own name: connections to it are decided by --network-allow-host.
            Some(_) if name == kiln_policy::HOST_GATEWAY_NAME => DnsDecision::Resolve,
            Some(policy) => policy.check_dns(name, qtype),
            None => DnsDecision::Resolve,
        }
    }

    fn rule_set(&self) -> String {
        match self.current() {
            Some(policy) => format!("network policy {}", policy.digest()),
            None => self.default.rule_set(),
        }
    }
}

/// Where the host side of an allowed connection to `dst` goes: the gateway stands for
/// the host, so its ports are the host's loopback ports.
pub(crate) fn host_target(dst: SocketAddrV4, gateway: Ipv4Addr) -> SocketAddr {
    if *dst.ip() == gateway {
        SocketAddr::from((Ipv4Addr::LOCALHOST, dst.port()))
    } else {
        SocketAddr::V4(dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    fn flow(dst: &str) -> FlowFacts {
        FlowFacts {
            dst: dst.parse().unwrap(),
            names: Vec::new(),
        }
    }

    fn egress(allowed: &[&str]) -> DefaultEgress {
        DefaultEgress::new(
            GATEWAY,
            allowed.iter().map(|a| a.parse().unwrap()).collect(),
            vec!["192.0.2.7".parse().unwrap()],
        )
    }

    #[test]
    fn the_internet_is_open_and_what_is_around_the_host_is_not() {
        let egress = egress(&[]);
        assert!(egress
            .decide(&flow("198.18.0.1:443"), FirstBytes::NotSeen)
            .lets_through());
        for refused in [
            "10.0.2.2:5432",
            "10.0.2.3:53",
            "127.0.0.1:80",
            "169.254.169.254:80",
            "10.1.2.3:80",
            "192.168.1.1:80",
            "172.16.0.1:80",
            "100.64.0.1:80",
            "192.0.2.7:22",
        ] {
            let decision = egress.decide(&flow(refused), FirstBytes::NotSeen);
            assert!(
                matches!(decision, Decision::Deny(_)),
                "{refused}: {decision:?}"
            );
        }
    }

    #[test]
    fn an_opened_service_is_reachable_and_only_on_its_port() {
        let egress = egress(&["host.kiln.internal:5432", "169.254.169.254:80"]);
        assert!(egress
            .decide(&flow("10.0.2.2:5432"), FirstBytes::NotSeen)
            .lets_through());
        assert!(egress
            .decide(&flow("169.254.169.254:80"), FirstBytes::NotSeen)
            .lets_through());
        assert!(!egress
            .decide(&flow("10.0.2.2:5433"), FirstBytes::NotSeen)
            .lets_through());
        assert!(!egress
            .decide(&flow("169.254.169.254:81"), FirstBytes::NotSeen)
            .lets_through());
    }

    #[test]
    fn a_policy_replaces_the_default_and_decides_by_name() {
        let text = "version: 1\nnetwork_policies:\n  web:\n    endpoints:\n      - { host: web.test, port: 80 }\n";
        let egress = PolicyEgress::new(None, GATEWAY, Vec::new(), Vec::new());
        let named = FlowFacts {
            dst: "198.18.5.5:80".parse().unwrap(),
            names: vec!["web.test".into()],
        };
        assert!(egress.decide(&named, FirstBytes::NotSeen).lets_through());
        assert!(!egress.inspects_requests());
        egress.replace(Policy::parse("p.yaml", text).unwrap());
        assert!(egress.inspects_requests());
        let host = |h| FirstBytes::Http { host: Some(h) };
        assert!(egress.decide(&named, host("web.test")).lets_through());
        assert!(!egress.decide(&named, host("other.test")).lets_through());
        let unnamed = FlowFacts {
            names: Vec::new(),
            ..named
        };
        assert!(!egress.decide(&unnamed, FirstBytes::NotSeen).lets_through());
        assert_eq!(egress.decide_dns("web.test", 1), DnsDecision::Resolve);
        assert!(matches!(
            egress.decide_dns("other.test", 1),
            DnsDecision::NxDomain { .. }
        ));
        assert!(matches!(
            egress.decide_dns("other.test", 16),
            DnsDecision::Refused { .. }
        ));
        assert!(egress.rule_set().starts_with("network policy sha256:"));
        // An address no name led to is decided at the SYN: reset at once, never a 403.
        for dst in ["169.254.169.254:80", "10.9.0.5:80", "198.18.5.5:9999"] {
            let unnamed = FlowFacts {
                dst: dst.parse().unwrap(),
                names: Vec::new(),
            };
            let decision = egress.decide(&unnamed, FirstBytes::NotSeen);
            assert!(matches!(decision, Decision::Deny(_)), "{dst}: {decision:?}");
        }
        let unlisted_port = FlowFacts {
            dst: "198.18.5.5:9999".parse().unwrap(),
            names: vec!["web.test".into()],
        };
        let decision = egress.decide(&unlisted_port, FirstBytes::NotSeen);
        assert!(matches!(decision, Decision::Deny(_)), "{decision:?}");
    }

    #[test]
    fn the_gateway_stands_for_the_host_loopback() {
        let target = |dst: &str| host_target(dst.parse().unwrap(), GATEWAY);
        assert_eq!(target("10.0.2.2:5432"), "127.0.0.1:5432".parse().unwrap());
        assert_eq!(target("198.18.0.1:80"), "198.18.0.1:80".parse().unwrap());
    }
}
