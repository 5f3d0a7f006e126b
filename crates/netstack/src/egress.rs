//! Deciding a guest's new connection: the facts the stack knows about it, the verdict,
//! and the default mode's decider. Every decision goes through one [`Egress`], so a
//! policy file's decider replaces the default one without touching the stack.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::str::FromStr;

use crate::HOST_NAME;

/// What the stack knows about a new guest connection when it decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowFacts {
    /// Where the guest sent its SYN.
    pub dst: SocketAddrV4,
    /// The names kiln's resolver answered with `dst`'s address in this sandbox (pinned
    /// names), most recent first; empty when the guest never resolved it through kiln.
    pub names: Vec<String>,
}

/// The decision on a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Open the host-side connection to `connect` and relay.
    Allow { connect: SocketAddr },
    /// Reset the guest's connection; `reason` is logged.
    Deny { reason: String },
}

/// Decides new guest connections. Called on the endpoint's thread for every SYN; it
/// must not block.
pub trait Egress: Send + Sync {
    fn decide(&self, flow: &FlowFacts) -> Verdict;
}

/// A host-local service opened to the guest (`--network-allow-host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostService {
    /// `host.kiln.internal:PORT` or a loopback `ADDR:PORT`: the guest connects to the
    /// gateway's PORT and reaches `host`, on the host's loopback.
    Loopback { host: SocketAddrV4 },
    /// Any other `ADDR:PORT`: the guest connects to it as it is.
    Address(SocketAddrV4),
}

/// A `--network-allow-host` value that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?}: {why}; expected {HOST_NAME}:PORT or IPV4:PORT, with PORT 1-65535")]
pub struct HostServiceError {
    value: String,
    why: &'static str,
}

impl FromStr for HostService {
    type Err = HostServiceError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let error = |why| HostServiceError {
            value: value.to_owned(),
            why,
        };
        let (host, port) = value.rsplit_once(':').ok_or_else(|| error("no port"))?;
        let port: u16 = match port.parse() {
            Ok(0) | Err(_) => return Err(error("the port is not 1-65535")),
            Ok(port) => port,
        };
        if host.eq_ignore_ascii_case(HOST_NAME) {
            return Ok(HostService::Loopback {
                host: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            });
        }
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(IpAddr::V4(ip)) if ip.is_loopback() => Ok(HostService::Loopback {
                host: SocketAddrV4::new(ip, port),
            }),
            Ok(IpAddr::V4(ip)) if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() => {
                Err(error("not a unicast address"))
            }
            Ok(IpAddr::V4(ip)) => Ok(HostService::Address(SocketAddrV4::new(ip, port))),
            Ok(IpAddr::V6(_)) => Err(error("the guest's network is IPv4 only")),
            Err(_) => Err(error("not an IPv4 address or the host's name")),
        }
    }
}

impl fmt::Display for HostService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostService::Loopback { host } if *host.ip() == Ipv4Addr::LOCALHOST => {
                write!(f, "{HOST_NAME}:{}", host.port())
            }
            HostService::Loopback { host } => write!(f, "{host}"),
            HostService::Address(addr) => write!(f, "{addr}"),
        }
    }
}

/// The default mode (`--network user`): the internet is open; the host's own services and
/// the networks around it (as kiln-policy's default check refuses them) are closed but for
/// the services opened explicitly.
pub struct DefaultEgress {
    gateway: Ipv4Addr,
    dns: Ipv4Addr,
    allowed: Vec<HostService>,
    /// Every address of the host's interfaces when the sandbox started.
    host_addresses: Vec<IpAddr>,
}

impl DefaultEgress {
    pub fn new(
        gateway: Ipv4Addr,
        dns: Ipv4Addr,
        allowed: Vec<HostService>,
        host_addresses: Vec<IpAddr>,
    ) -> Self {
        Self {
            gateway,
            dns,
            allowed,
            host_addresses,
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
    fn decide(&self, flow: &FlowFacts) -> Verdict {
        let (ip, port) = (*flow.dst.ip(), flow.dst.port());
        for service in &self.allowed {
            match *service {
                HostService::Loopback { host } if ip == self.gateway && host.port() == port => {
                    return Verdict::Allow {
                        connect: SocketAddr::V4(host),
                    };
                }
                HostService::Address(addr) if addr == flow.dst => {
                    return Verdict::Allow {
                        connect: SocketAddr::V4(addr),
                    };
                }
                _ => {}
            }
        }
        if ip == self.gateway {
            return Verdict::Deny {
                reason: format!(
                    "{HOST_NAME}:{port} (the host's loopback) is not opened with --network-allow-host"
                ),
            };
        }
        if ip == self.dns {
            return Verdict::Deny {
                reason: "the resolver answers DNS over UDP only".into(),
            };
        }
        match refusal(IpAddr::V4(ip), &self.host_addresses) {
            Some(reason) => Verdict::Deny {
                reason: reason.to_owned(),
            },
            None => Verdict::Allow {
                connect: SocketAddr::V4(flow.dst),
            },
        }
    }
}

/// Why the default mode refuses `ip`, if it does.
fn refusal(ip: IpAddr, host_addresses: &[IpAddr]) -> Option<&'static str> {
    if host_addresses.contains(&ip) {
        return Some("an address of the host itself");
    }
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local (cloud metadata)"),
        IpAddr::V4(v4) if v4.is_private() => Some("a private network (RFC 1918)"),
        IpAddr::V4(v4) if v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64 => {
            Some("carrier-grade NAT (100.64.0.0/10)")
        }
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            Some("not a unicast address")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
    const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

    fn flow(dst: &str) -> FlowFacts {
        FlowFacts {
            dst: dst.parse().unwrap(),
            names: Vec::new(),
        }
    }

    fn egress(allowed: &[&str]) -> DefaultEgress {
        DefaultEgress::new(
            GATEWAY,
            DNS,
            allowed.iter().map(|a| a.parse().unwrap()).collect(),
            vec!["192.0.2.7".parse().unwrap()],
        )
    }

    fn allowed(verdict: Verdict) -> SocketAddr {
        match verdict {
            Verdict::Allow { connect } => connect,
            Verdict::Deny { reason } => panic!("denied: {reason}"),
        }
    }

    #[test]
    fn host_services_parse_and_print_back() {
        for (text, printed) in [
            ("host.kiln.internal:5432", "host.kiln.internal:5432"),
            ("HOST.KILN.INTERNAL:80", "host.kiln.internal:80"),
            ("127.0.0.1:8080", "host.kiln.internal:8080"),
            ("127.0.0.2:8080", "127.0.0.2:8080"),
            ("169.254.169.254:80", "169.254.169.254:80"),
        ] {
            let service: HostService = text.parse().unwrap();
            assert_eq!(service.to_string(), printed);
            assert_eq!(printed.parse::<HostService>().unwrap(), service);
        }
        for bad in [
            "host.kiln.internal",
            "host.kiln.internal:0",
            "host.kiln.internal:65536",
            "example.com:80",
            "[::1]:80",
            "0.0.0.0:80",
            ":80",
        ] {
            let err = bad.parse::<HostService>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("IPV4:PORT"), "{err}");
        }
    }

    #[test]
    fn the_internet_is_open_and_what_is_around_the_host_is_not() {
        let egress = egress(&[]);
        assert_eq!(
            allowed(egress.decide(&flow("198.18.0.1:443"))),
            "198.18.0.1:443".parse().unwrap()
        );
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
            assert!(
                matches!(egress.decide(&flow(refused)), Verdict::Deny { .. }),
                "{refused}"
            );
        }
    }

    #[test]
    fn an_opened_service_is_reachable_and_only_on_its_port() {
        let egress = egress(&["host.kiln.internal:5432", "169.254.169.254:80"]);
        assert_eq!(
            allowed(egress.decide(&flow("10.0.2.2:5432"))),
            "127.0.0.1:5432".parse().unwrap()
        );
        assert_eq!(
            allowed(egress.decide(&flow("169.254.169.254:80"))),
            "169.254.169.254:80".parse().unwrap()
        );
        assert!(matches!(
            egress.decide(&flow("10.0.2.2:5433")),
            Verdict::Deny { .. }
        ));
        assert!(matches!(
            egress.decide(&flow("169.254.169.254:81")),
            Verdict::Deny { .. }
        ));
    }
}
