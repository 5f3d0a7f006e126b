//! The address ranges a sandbox may never reach without an explicit allow: the host's
//! own services, its networks and the cloud metadata service.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// Why an address is refused: which kind of range it falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RangeKind {
    /// `0.0.0.0/8` ("this network") and `::`.
    Unspecified,
    /// `127.0.0.0/8` and `::1`.
    Loopback,
    /// `169.254.0.0/16` (cloud metadata lives at 169.254.169.254) and `fe80::/10`.
    LinkLocal,
    /// RFC 1918: `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`.
    Private,
    /// RFC 6598 carrier-grade NAT: `100.64.0.0/10`.
    SharedAddressSpace,
    /// IPv6 unique local addresses: `fc00::/7`.
    UniqueLocal,
    /// `224.0.0.0/4` and `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// An address of the host kiln runs on (passed in by the caller).
    HostAddress,
}

impl RangeKind {
    fn describe(self) -> &'static str {
        match self {
            RangeKind::Unspecified => "unspecified",
            RangeKind::Loopback => "loopback",
            RangeKind::LinkLocal => "link-local (cloud metadata)",
            RangeKind::Private => "private (RFC 1918)",
            RangeKind::SharedAddressSpace => "carrier-grade NAT (RFC 6598)",
            RangeKind::UniqueLocal => "IPv6 unique local",
            RangeKind::Multicast => "multicast",
            RangeKind::Broadcast => "broadcast",
            RangeKind::HostAddress => "an address of this host",
        }
    }

    /// Kinds no policy entry can open (OpenShell rejects them in `allowed_ips` too);
    /// only an explicit `--network-allow-host` reaches such an address.
    pub fn always_refused(self) -> bool {
        matches!(
            self,
            RangeKind::Unspecified
                | RangeKind::Loopback
                | RangeKind::LinkLocal
                | RangeKind::Multicast
                | RangeKind::Broadcast
        )
    }
}

/// A refused address: the kind of range and the range itself (for a host address, the
/// address as a /32 or /128). `embedded_in` is set when the address was an IPv6 form
/// carrying that IPv4 address (mapped, compatible, NAT64 or 6to4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedRange {
    pub kind: RangeKind,
    pub range: IpNet,
    pub embedded_in: Option<Ipv6Addr>,
}

impl fmt::Display for RefusedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == RangeKind::HostAddress {
            write!(f, "{} ({})", self.kind.describe(), self.range.addr())?;
        } else {
            write!(f, "{} range {}", self.kind.describe(), self.range)?;
        }
        if let Some(outer) = self.embedded_in {
            write!(f, " (embedded in IPv6 address {outer})")?;
        }
        Ok(())
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const V4_RANGES: [(RangeKind, Ipv4Net); 10] = [
    (RangeKind::Unspecified, v4(0, 0, 0, 0, 8)),
    (RangeKind::Loopback, v4(127, 0, 0, 0, 8)),
    (RangeKind::LinkLocal, v4(169, 254, 0, 0, 16)),
    (RangeKind::Private, v4(10, 0, 0, 0, 8)),
    (RangeKind::Private, v4(172, 16, 0, 0, 12)),
    (RangeKind::Private, v4(192, 168, 0, 0, 16)),
    (RangeKind::SharedAddressSpace, v4(100, 64, 0, 0, 10)),
    (RangeKind::Broadcast, v4(255, 255, 255, 255, 32)),
    (RangeKind::Multicast, v4(224, 0, 0, 0, 4)),
    // Class E (240/4) is not routable on the internet either; refusing it keeps the
    // broadcast address's neighbours out too.
    (RangeKind::Broadcast, v4(240, 0, 0, 0, 4)),
];

const fn v6(first: u16, len: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(first, 0, 0, 0, 0, 0, 0, 0), len)
}

const V6_RANGES: [(RangeKind, Ipv6Net); 5] = [
    (
        RangeKind::Unspecified,
        Ipv6Net::new_assert(Ipv6Addr::UNSPECIFIED, 128),
    ),
    (
        RangeKind::Loopback,
        Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128),
    ),
    (RangeKind::LinkLocal, v6(0xfe80, 10)),
    (RangeKind::UniqueLocal, v6(0xfc00, 7)),
    (RangeKind::Multicast, v6(0xff00, 8)),
];

/// The ranges of the kinds no policy can open, with the IPv4-mapped IPv6 form of each
/// IPv4 one (for checking that a policy's CIDRs stay clear of them).
pub(crate) fn always_refused_nets() -> Vec<(RangeKind, IpNet)> {
    let mut nets = Vec::new();
    for (kind, net) in V4_RANGES.iter().filter(|(k, _)| k.always_refused()) {
        nets.push((*kind, IpNet::V4(*net)));
        let mapped = Ipv6Net::new_assert(net.network().to_ipv6_mapped(), 96 + net.prefix_len());
        nets.push((*kind, IpNet::V6(mapped)));
    }
    for (kind, net) in V6_RANGES.iter().filter(|(k, _)| k.always_refused()) {
        nets.push((*kind, IpNet::V6(*net)));
    }
    nets
}

/// The IPv4 address an IPv6 address carries, for the forms that reach an IPv4 host:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`
/// and 6to4 `2002:aabb:ccdd::/48`.
fn embedded_v4(addr: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = addr.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(mapped) = addr.to_ipv4_mapped() {
        return Some(mapped);
    }
    // :: and ::1 are IPv6's own unspecified and loopback addresses, not IPv4 forms.
    if s[..6] == [0; 6] && addr != Ipv6Addr::UNSPECIFIED && addr != Ipv6Addr::LOCALHOST {
        return Some(low(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(low(s[1], s[2]));
    }
    None
}

/// The refused range `addr` falls in, if any: the fixed ranges above and every address
/// of the host itself (`host_addrs`, as the caller found them on its interfaces).
///
/// 198.18.0.0/15 (benchmarking) and the documentation ranges are not refused: they are
/// not reachable from the internet, but tests use them to stand for it.
pub fn refused_range(addr: IpAddr, host_addrs: &[IpAddr]) -> Option<RefusedRange> {
    let host_match = |a: IpAddr| host_addrs.iter().any(|h| canonical(*h) == a);
    let host = |a: IpAddr| RefusedRange {
        kind: RangeKind::HostAddress,
        range: IpNet::from(a),
        embedded_in: None,
    };
    let addr = canonical(addr);
    match addr {
        IpAddr::V4(a) => {
            let fixed = V4_RANGES.iter().find(|(_, net)| net.contains(&a));
            let fixed = fixed.map(|(kind, net)| RefusedRange {
                kind: *kind,
                range: IpNet::V4(*net),
                embedded_in: None,
            });
            prefer(fixed, host_match(addr).then(|| host(addr)))
        }
        IpAddr::V6(a) => {
            let fixed = V6_RANGES.iter().find(|(_, net)| net.contains(&a));
            let fixed = fixed.map(|(kind, net)| RefusedRange {
                kind: *kind,
                range: IpNet::V6(*net),
                embedded_in: None,
            });
            if fixed.is_some() || host_match(addr) {
                return prefer(fixed, host_match(addr).then(|| host(addr)));
            }
            let inner = embedded_v4(a)?;
            refused_range(IpAddr::V4(inner), host_addrs).map(|r| RefusedRange {
                embedded_in: Some(a),
                ..r
            })
        }
    }
}

/// The range that says most about an address: an always-refused range first (it can
/// never be opened), then the host's own address, then a private range.
fn prefer(fixed: Option<RefusedRange>, host: Option<RefusedRange>) -> Option<RefusedRange> {
    match fixed {
        Some(r) if r.kind.always_refused() => Some(r),
        _ => host.or(fixed),
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are; everything else as is.
/// Sockets report IPv4 peers of a dual-stack listener in the mapped form.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(addr: &str, host: &[IpAddr]) -> Option<RangeKind> {
        refused_range(addr.parse().unwrap(), host).map(|r| r.kind)
    }

    #[test]
    fn every_default_range_is_refused_with_its_name() {
        let cases = [
            (
                "127.0.0.1",
                RangeKind::Loopback,
                "loopback range 127.0.0.0/8",
            ),
            ("::1", RangeKind::Loopback, "loopback range ::1/128"),
            (
                "169.254.169.254",
                RangeKind::LinkLocal,
                "link-local (cloud metadata) range 169.254.0.0/16",
            ),
            ("fe80::1", RangeKind::LinkLocal, "fe80::/10"),
            (
                "10.0.2.2",
                RangeKind::Private,
                "private (RFC 1918) range 10.0.0.0/8",
            ),
            ("172.31.255.255", RangeKind::Private, "172.16.0.0/12"),
            ("192.168.1.1", RangeKind::Private, "192.168.0.0/16"),
            ("100.64.0.1", RangeKind::SharedAddressSpace, "100.64.0.0/10"),
            (
                "100.127.255.254",
                RangeKind::SharedAddressSpace,
                "(RFC 6598)",
            ),
            ("fd00::5", RangeKind::UniqueLocal, "fc00::/7"),
            ("0.0.0.0", RangeKind::Unspecified, "0.0.0.0/8"),
            ("::", RangeKind::Unspecified, "::/128"),
            (
                "255.255.255.255",
                RangeKind::Broadcast,
                "255.255.255.255/32",
            ),
            ("224.0.0.251", RangeKind::Multicast, "224.0.0.0/4"),
            ("ff02::1", RangeKind::Multicast, "ff00::/8"),
        ];
        for (addr, want, text) in cases {
            let got = refused_range(addr.parse().unwrap(), &[]).unwrap();
            assert_eq!(got.kind, want, "{addr}");
            assert!(got.to_string().contains(text), "{addr}: {got}");
        }
    }

    #[test]
    fn ipv6_forms_of_refused_ipv4_addresses_are_refused() {
        for addr in [
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "::10.1.2.3",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(kind(addr, &[]).is_some(), "{addr}");
        }
        let r = refused_range("64:ff9b::a9fe:a9fe".parse().unwrap(), &[]).unwrap();
        assert_eq!(r.kind, RangeKind::LinkLocal);
        assert!(r
            .to_string()
            .contains("embedded in IPv6 address 64:ff9b::a9fe:a9fe"));
    }

    #[test]
    fn the_test_internet_and_public_addresses_are_not_refused() {
        for addr in [
            "198.18.0.1",
            "198.19.255.254",
            "1.1.1.1",
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:198.18.0.1",
            "64:ff9b::808:808",
        ] {
            assert_eq!(kind(addr, &[]), None, "{addr}");
        }
    }

    #[test]
    fn host_addresses_are_refused_in_any_form() {
        let host: Vec<IpAddr> = vec![
            "198.18.0.1".parse().unwrap(),
            "2001:db8::7".parse().unwrap(),
        ];
        assert_eq!(kind("198.18.0.1", &host), Some(RangeKind::HostAddress));
        assert_eq!(
            kind("::ffff:198.18.0.1", &host),
            Some(RangeKind::HostAddress)
        );
        assert_eq!(kind("2001:db8::7", &host), Some(RangeKind::HostAddress));
        assert_eq!(kind("198.18.0.2", &host), None);
        let lan: Vec<IpAddr> = vec![
            "192.168.1.20".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ];
        assert_eq!(kind("192.168.1.20", &lan), Some(RangeKind::HostAddress));
        assert_eq!(kind("127.0.0.1", &lan), Some(RangeKind::Loopback));
        let mapped_host = vec!["::ffff:198.18.0.9".parse().unwrap()];
        assert_eq!(
            kind("198.18.0.9", &mapped_host),
            Some(RangeKind::HostAddress)
        );
        assert!(refused_range("198.18.0.1".parse().unwrap(), &host)
            .unwrap()
            .to_string()
            .contains("an address of this host (198.18.0.1)"));
    }

    #[test]
    fn only_loopback_link_local_and_special_addresses_are_always_refused() {
        assert!(RangeKind::LinkLocal.always_refused());
        assert!(RangeKind::Loopback.always_refused());
        assert!(!RangeKind::Private.always_refused());
        assert!(!RangeKind::HostAddress.always_refused());
        assert!(!RangeKind::UniqueLocal.always_refused());
    }
}
