//! `--network-allow-host` values: one host-local or private service opened explicitly.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::AllowHostError;

/// The name the guest uses for the host kiln runs on.
pub const HOST_GATEWAY_NAME: &str = "host.kiln.internal";

/// A service the sandbox may reach even though its address is in a refused range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllowHost {
    /// `host.kiln.internal:PORT`: a port of the host itself, as the guest sees it at the
    /// host gateway address.
    HostGateway { port: u16 },
    /// `ADDR:PORT` (`[ADDR]:PORT` for IPv6): one address and port.
    Address(SocketAddr),
}

impl AllowHost {
    /// Whether a connection to `dst` is this service; `gateway` is the guest-visible
    /// address of `host.kiln.internal`, if the caller has one.
    pub fn matches(&self, dst: SocketAddr, gateway: Option<IpAddr>) -> bool {
        match *self {
            AllowHost::HostGateway { port } => {
                gateway.is_some_and(|g| crate::canonical(g) == crate::canonical(dst.ip()))
                    && dst.port() == port
            }
            AllowHost::Address(addr) => {
                crate::canonical(addr.ip()) == crate::canonical(dst.ip())
                    && addr.port() == dst.port()
            }
        }
    }
}

impl fmt::Display for AllowHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowHost::HostGateway { port } => write!(f, "{HOST_GATEWAY_NAME}:{port}"),
            AllowHost::Address(addr) => write!(f, "{addr}"),
        }
    }
}

impl FromStr for AllowHost {
    type Err = AllowHostError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| AllowHostError {
            input: input.escape_debug().to_string(),
            reason: reason.to_string(),
        };
        let (host, port) = input
            .rsplit_once(':')
            .ok_or_else(|| err("there is no :PORT"))?;
        let port =
            parse_port(port).ok_or_else(|| err("the port is not a number from 1 to 65535"))?;
        if host.eq_ignore_ascii_case(HOST_GATEWAY_NAME) {
            return Ok(AllowHost::HostGateway { port });
        }
        let ip = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6
                .parse::<std::net::Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| err("the part in brackets is not an IPv6 address"))?,
            None if host.contains(':') => return Err(err("an IPv6 address needs brackets")),
            None => host.parse::<std::net::Ipv4Addr>().map(IpAddr::V4).map_err(|_| {
                err("the host is neither host.kiln.internal nor an IP address (names are not accepted: they could resolve anywhere)")
            })?,
        };
        if ip.is_unspecified() {
            return Err(err("the unspecified address names no service"));
        }
        Ok(AllowHost::Address(SocketAddr::new(ip, port)))
    }
}

/// A decimal port 1..=65535, digits only.
fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(
            "host.kiln.internal:5432".parse(),
            Ok(AllowHost::HostGateway { port: 5432 })
        );
        assert_eq!(
            "HOST.Kiln.Internal:1".parse(),
            Ok(AllowHost::HostGateway { port: 1 })
        );
        assert_eq!(
            "10.0.0.5:8080".parse(),
            Ok(AllowHost::Address("10.0.0.5:8080".parse().unwrap()))
        );
        assert_eq!(
            "[fd00::1]:65535".parse(),
            Ok(AllowHost::Address("[fd00::1]:65535".parse().unwrap()))
        );
    }

    #[test]
    fn display_parses_back() {
        for text in ["host.kiln.internal:5432", "10.0.0.5:80", "[fd00::1]:443"] {
            let parsed: AllowHost = text.parse().unwrap();
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn bad_values_name_the_input_and_what_is_accepted() {
        let cases = [
            ("host.kiln.internal", "no :PORT"),
            ("host.kiln.internal:0", "port"),
            ("host.kiln.internal:65536", "port"),
            ("host.kiln.internal:+80", "port"),
            ("10.0.0.5:", "port"),
            ("example.com:443", "names are not accepted"),
            ("fd00::1:443", "needs brackets"),
            ("[fd00::zz]:443", "not an IPv6 address"),
            ("0.0.0.0:80", "unspecified"),
            ("010.0.0.5:80", "neither"),
        ];
        for (input, reason) in cases {
            let e = input.parse::<AllowHost>().unwrap_err().to_string();
            assert!(e.contains(input), "{e}");
            assert!(e.contains(reason), "{input}: {e}");
            assert!(e.contains("host.kiln.internal:PORT"), "{e}");
        }
    }

    #[test]
    fn matching_compares_address_and_port() {
        let gw: IpAddr = "10.0.2.2".parse().unwrap();
        let a = AllowHost::HostGateway { port: 5432 };
        assert!(a.matches("10.0.2.2:5432".parse().unwrap(), Some(gw)));
        assert!(!a.matches("10.0.2.2:5433".parse().unwrap(), Some(gw)));
        assert!(!a.matches("10.0.2.2:5432".parse().unwrap(), None));
        let b: AllowHost = "10.0.0.5:80".parse().unwrap();
        assert!(b.matches("[::ffff:10.0.0.5]:80".parse().unwrap(), None));
        assert!(!b.matches("10.0.0.6:80".parse().unwrap(), None));
    }
}
