//! Deciding a guest's new connection: the facts the stack knows about it and the
//! default mode's decider (kiln-policy decides; this module only gathers the facts). Every decision goes through one [`Egress`], so a
//! policy file's decider replaces the default one without touching the stack.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use kiln_policy::{check_default, AllowHost, Decision, HostFacts};

/// What the stack knows about a new guest connection when it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowFacts {
    /// Where the guest sent its SYN.
    pub dst: SocketAddrV4,
    /// The names kiln's resolver answered with `dst`'s address in this sandbox (pinned
    /// names), most recent first; empty when the guest never resolved it through kiln.
    pub names: Vec<String>,
}

/// Decides new guest connections with kiln-policy. Called on the endpoint's thread for
/// every SYN; it must not block. An allowed (or audited) connection is opened to its
/// destination, the gateway's ports to the host's loopback.
pub trait Egress: Send + Sync {
    fn decide(&self, flow: &FlowFacts) -> Decision;
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
            host: HostFacts {
                addrs: host_addresses,
                gateway: Some(IpAddr::V4(gateway)),
            },
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
    fn decide(&self, flow: &FlowFacts) -> Decision {
        check_default(SocketAddr::V4(flow.dst), &self.host, &self.allows)
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
        assert!(egress.decide(&flow("198.18.0.1:443")).lets_through());
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
            let decision = egress.decide(&flow(refused));
            assert!(
                matches!(decision, Decision::Deny(_)),
                "{refused}: {decision:?}"
            );
        }
    }

    #[test]
    fn an_opened_service_is_reachable_and_only_on_its_port() {
        let egress = egress(&["host.kiln.internal:5432", "169.254.169.254:80"]);
        assert!(egress.decide(&flow("10.0.2.2:5432")).lets_through());
        assert!(egress.decide(&flow("169.254.169.254:80")).lets_through());
        assert!(!egress.decide(&flow("10.0.2.2:5433")).lets_through());
        assert!(!egress.decide(&flow("169.254.169.254:81")).lets_through());
    }

    #[test]
    fn the_gateway_stands_for_the_host_loopback() {
        let target = |dst: &str| host_target(dst.parse().unwrap(), GATEWAY);
        assert_eq!(target("10.0.2.2:5432"), "127.0.0.1:5432".parse().unwrap());
        assert_eq!(target("198.18.0.1:80"), "198.18.0.1:80".parse().unwrap());
    }
}
