//! HTTP requests with arbitrary methods, targets and Hosts against a fixed policy:
//! deciding never panics, and only a request whose Host is a name kiln's resolver gave
//! for the address is allowed.
#![no_main]

use std::sync::OnceLock;

use kiln_policy::{Decision, HostFacts, Policy, Request};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = r#"
version: 1
network_policies:
  api:
    endpoints:
      - host: api.test
        port: 80
        protocol: rest
        access: read-write
        deny_rules:
          - method: "*"
            path: /admin/**
          - method: GET
            path: /search
            query: { q: "secret*" }
      - host: "*.cdn.test"
        port: 80
        protocol: rest
        rules:
          - allow: { method: GET, path: "/assets/**", query: { v: { any: ["1*", "2*"] } } }
        allow_encoded_slash: true
"#;

fn policy() -> &'static Policy {
    static POLICY_VALUE: OnceLock<Policy> = OnceLock::new();
    POLICY_VALUE.get_or_init(|| Policy::parse("fuzz.yaml", POLICY).unwrap())
}

fuzz_target!(|input: (&str, &str, Option<&str>, Option<&str>)| {
    let (method, path, query, host_header) = input;
    let pinned = vec!["api.test".to_string(), "a.cdn.test".to_string()];
    let request = Request { method, path, query, host: host_header };
    let host = HostFacts::default();
    let decision =
        policy().check_request("198.18.0.5:80".parse().unwrap(), &pinned, &request, &host, &[]);
    // Whatever is allowed was allowed for the pinned name its Host gave.
    if let Decision::Allow(_) = decision {
        let host_header = host_header.expect("allowed without a Host");
        let name = host_header.split(':').next().unwrap_or_default();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        assert!(pinned.contains(&name), "allowed for Host {host_header:?}");
    }
});
