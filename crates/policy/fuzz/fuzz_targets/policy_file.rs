//! Policy files from arbitrary text: parsing never panics, and a policy that parses
//! decides DNS queries and connections without panicking and never opens an
//! always-refused address.
#![no_main]

use kiln_policy::{
    refused_range, Connection, Decision, FirstBytes, HostFacts, Policy,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(policy) = Policy::parse("fuzz.yaml", text) else {
        return;
    };
    assert!(policy.digest().starts_with("sha256:"));
    for reported in policy.not_enforced() {
        assert!(reported.to_string().starts_with("not enforced by kiln: "));
    }
    for name in ["a.example.com", "x.y.test", "localhost", "-", "a..b"] {
        for qtype in [1, 16, 28, 255] {
            let _ = policy.check_dns(name, qtype);
        }
    }
    let host = HostFacts {
        addrs: vec!["192.168.1.2".parse().unwrap()],
        gateway: Some("10.0.2.2".parse().unwrap()),
    };
    let pinned = vec!["a.example.com".to_string(), "x.y.test".to_string()];
    for dst in ["198.18.0.5:443", "10.1.2.3:80", "169.254.169.254:80", "[::1]:443", "10.0.2.2:22"] {
        let dst = dst.parse().unwrap();
        for first_bytes in [
            FirstBytes::NotSeen,
            FirstBytes::Other,
            FirstBytes::Tls { sni: Some("a.example.com") },
            FirstBytes::Http { host: Some("x.y.test:80") },
        ] {
            let conn = Connection { dst, pinned: &pinned, first_bytes };
            let decision = policy.check_connection(&conn, &host, &[]);
            let always = refused_range(dst.ip(), &[]).is_some_and(|r| r.kind.always_refused());
            if always {
                assert!(matches!(decision, Decision::Deny(_)), "{dst}: {decision:?}");
            }
        }
    }
});
