//! Properties of the decisions over generated addresses, policies and requests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use kiln_policy::peek::{http_request_head, HttpPeek};
use kiln_policy::{
    check_default, refused_range, AllowHost, Allowed, Connection, Decision, DenyReason, FirstBytes,
    HostFacts, Policy, Request,
};
use proptest::prelude::*;

fn facts() -> HostFacts {
    HostFacts {
        addrs: vec![
            "192.168.7.7".parse().unwrap(),
            "198.18.99.1".parse().unwrap(),
        ],
        gateway: Some("10.0.2.2".parse().unwrap()),
    }
}

/// Addresses biased towards the interesting ranges.
fn address() -> impl Strategy<Value = IpAddr> {
    let v4 = |a: u8, b: std::ops::RangeInclusive<u8>| {
        (b, any::<u8>(), any::<u8>())
            .prop_map(move |(b, c, d)| IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    };
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        v4(127, 0..=255),
        v4(169, 254..=254),
        v4(10, 0..=255),
        v4(100, 60..=130),
        v4(172, 10..=40),
        v4(198, 17..=20),
        any::<u32>().prop_map(|a| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped())),
        (0xfc00u16..=0xfe80, any::<u64>())
            .prop_map(|(h, l)| IpAddr::V6(Ipv6Addr::from((u128::from(h) << 112) | u128::from(l)))),
    ]
}

const ALWAYS_REFUSED: &[&str] = &[
    "127.0.0.1",
    "127.8.9.10",
    "169.254.169.254",
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "fe80::1",
    "::ffff:169.254.169.254",
    "::ffff:127.0.0.1",
    "64:ff9b::a9fe:a9fe",
];

/// Policies over a few hosts, ports and address ranges, with every kind of endpoint.
fn policy() -> impl Strategy<Value = Policy> {
    let host = prop_oneof![
        Just("good.test".to_string()),
        Just("*.wild.test".to_string()),
        Just("**.deep.test".to_string()),
        Just("198.18.0.5".to_string()),
        Just(String::new()),
    ];
    let ips = prop_oneof![
        Just(None),
        Just(Some("[10.0.0.0/8]")),
        Just(Some("[198.18.0.0/15, \"fd00::/8\"]")),
        Just(Some("[100.64.0.0/10]")),
    ];
    let kind = prop_oneof![
        Just(""),
        Just("protocol: rest, access: read-only,"),
        Just("protocol: rest, access: full,"),
        Just("protocol: rest, access: read-write, deny_rules: [{method: '*', path: /admin/**}],"),
        Just("protocol: graphql, access: full,"),
    ];
    let endpoint = (
        host,
        prop_oneof![Just(80u16), Just(443)],
        ips,
        kind,
        any::<bool>(),
    );
    proptest::collection::vec(endpoint, 1..5).prop_filter_map("invalid endpoint", |endpoints| {
        let mut yaml = String::from("version: 1\nnetwork_policies:\n  e:\n    endpoints:\n");
        for (host, port, ips, kind, audit) in endpoints {
            yaml.push_str(&format!("      - {{ {kind} port: {port}"));
            if !host.is_empty() {
                yaml.push_str(&format!(", host: \"{host}\""));
            }
            if let Some(ips) = ips {
                yaml.push_str(&format!(", allowed_ips: {ips}"));
            }
            if audit {
                yaml.push_str(", enforcement: audit");
            }
            yaml.push_str(" }\n");
        }
        Policy::parse("generated.yaml", &yaml).ok()
    })
}

fn first_bytes() -> impl Strategy<Value = FirstBytes<'static>> {
    prop_oneof![
        Just(FirstBytes::NotSeen),
        Just(FirstBytes::Other),
        Just(FirstBytes::Tls { sni: None }),
        Just(FirstBytes::Tls {
            sni: Some("good.test")
        }),
        Just(FirstBytes::Tls {
            sni: Some("a.wild.test")
        }),
        Just(FirstBytes::Http {
            host: Some("x.y.deep.test")
        }),
        Just(FirstBytes::Http {
            host: Some("bad.test")
        }),
    ]
}

proptest! {
    #[test]
    fn allow_host_values_print_and_parse_back(addr in address(), port in 1u16..) {
        prop_assume!(!addr.is_unspecified());
        let allow = AllowHost::Address(SocketAddr::new(addr, port));
        prop_assert_eq!(allow.to_string().parse::<AllowHost>(), Ok(allow));
        let gateway = AllowHost::HostGateway { port };
        prop_assert_eq!(gateway.to_string().parse::<AllowHost>(), Ok(gateway));
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_as_their_ipv4_address(a in any::<u32>()) {
        let v4 = Ipv4Addr::from(a);
        let kind = |ip: IpAddr| refused_range(ip, &facts().addrs).map(|r| r.kind);
        prop_assert_eq!(kind(IpAddr::V4(v4)), kind(IpAddr::V6(v4.to_ipv6_mapped())));
    }

    #[test]
    fn default_mode_opens_exactly_what_is_not_refused(addr in address(), port in 1u16..) {
        let dst = SocketAddr::new(addr, port);
        let host = facts();
        let refused = refused_range(addr, &host.addrs).is_some()
            || host.gateway.is_some_and(|g| kiln_policy::canonical(g) == kiln_policy::canonical(addr));
        let decision = check_default(dst, &host, &[]);
        prop_assert_eq!(decision == Decision::Allow(Allowed::Internet), !refused, "{:?}", decision);
        prop_assert_eq!(matches!(decision, Decision::Deny(_)), refused);
        // An explicit allow of that very service always opens it.
        let allow = AllowHost::Address(dst);
        prop_assume!(!addr.is_unspecified());
        prop_assert_eq!(check_default(dst, &host, &[allow]), Decision::Allow(Allowed::AllowHost(allow)));
    }

    #[test]
    fn no_policy_opens_an_always_refused_address_or_the_host(
        policy in policy(),
        dst in proptest::sample::select(ALWAYS_REFUSED),
        port in prop_oneof![Just(80u16), Just(443)],
        first_bytes in first_bytes(),
    ) {
        let host = facts();
        let pinned = vec!["good.test".to_string(), "a.wild.test".to_string(), "x.y.deep.test".to_string()];
        for dst in [dst.parse().unwrap(), "192.168.7.7".parse().unwrap(), "10.0.2.2".parse().unwrap()] {
            let conn = Connection { dst: SocketAddr::new(dst, port), pinned: &pinned, first_bytes };
            let decision = policy.check_connection(&conn, &host, &[]);
            prop_assert!(matches!(decision, Decision::Deny(_)), "{}: {:?}", dst, decision);
        }
    }

    #[test]
    fn an_unpinned_destination_is_only_reached_by_address(
        policy in policy(),
        addr in address(),
        port in prop_oneof![Just(80u16), Just(443)],
        first_bytes in first_bytes(),
    ) {
        // No pinned names: only endpoints naming the address (or its allowed_ips) may
        // take the connection, whatever SNI or Host the flow claims.
        let conn = Connection { dst: SocketAddr::new(addr, port), pinned: &[], first_bytes };
        let decision = policy.check_connection(&conn, &facts(), &[]);
        if decision.lets_through() {
            let by_address = addr == "198.18.0.5".parse::<IpAddr>().unwrap()
                || ["10.0.0.0/8", "198.18.0.0/15", "fd00::/8", "100.64.0.0/10"]
                    .iter()
                    .any(|n| n.parse::<ipnet::IpNet>().unwrap().contains(&addr));
            prop_assert!(by_address, "{}: {:?}", addr, decision);
        }
    }

    #[test]
    fn percent_encoding_a_path_does_not_change_the_decision(
        segments in proptest::collection::vec("[a-z0-9._-]{1,8}", 0..5),
        encode in proptest::collection::vec(any::<bool>(), 40),
        method in proptest::sample::select(&["GET", "POST", "DELETE", "HEAD"][..]),
    ) {
        let policy = Policy::parse(
            "p.yaml",
            "version: 1\nnetwork_policies:\n  a:\n    endpoints:\n      - {host: api.test, port: 80, protocol: rest, access: read-write, deny_rules: [{method: '*', path: /admin/**}, {method: GET, path: '/*/secret*'}]}\n",
        ).unwrap();
        let plain = format!("/{}", segments.join("/"));
        let encoded: String = plain
            .chars()
            .zip(encode.iter().cycle())
            .map(|(c, e)| if *e && c != '/' { format!("%{:02X}", c as u32) } else { c.to_string() })
            .collect();
        let pinned = vec!["api.test".to_string()];
        let decide = |path: &str| {
            let request = Request { method, path, query: None, host: Some("api.test") };
            policy.check_request("198.18.0.5:80".parse().unwrap(), &pinned, &request, &facts(), &[])
        };
        prop_assert_eq!(without_raw_target(decide(&plain)), without_raw_target(decide(&encoded)));
    }

    #[test]
    fn request_heads_parse_back_and_every_prefix_needs_more(
        method in "[A-Z]{1,10}",
        path in "/[a-zA-Z0-9/._~%-]{0,30}",
        query in proptest::option::of("[a-z0-9=&]{0,20}"),
        host in "[a-z]{1,10}(\\.[a-z]{1,10}){0,3}(:[0-9]{1,5})?",
        length in proptest::option::of(0u64..1_000_000),
    ) {
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n");
        if let Some(n) = length {
            head.push_str(&format!("Content-Length: {n}\r\n"));
        }
        head.push_str("\r\n");
        let HttpPeek::Request(parsed) = http_request_head(head.as_bytes()) else {
            panic!("{head:?} did not parse");
        };
        prop_assert_eq!(&parsed.method, &method);
        prop_assert_eq!(&parsed.path, &path);
        prop_assert_eq!(&parsed.query, &query);
        prop_assert_eq!(parsed.host.as_deref(), Some(host.as_str()));
        prop_assert_eq!(parsed.head_len, head.len());
        for n in 0..head.len() {
            prop_assert_eq!(http_request_head(&head.as_bytes()[..n]), HttpPeek::NeedMore);
        }
    }
}

/// A decision with the refused target's own text taken out: a refusal quotes the path as
/// the guest sent it (encoded or not), which is the point of the log line, not a
/// difference in the decision.
fn without_raw_target(decision: Decision) -> Decision {
    match decision {
        Decision::Deny(DenyReason::BadRequestTarget { entry, .. }) => {
            Decision::Deny(DenyReason::BadRequestTarget {
                entry,
                reason: String::new(),
            })
        }
        other => other,
    }
}
