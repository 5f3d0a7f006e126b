//! Allow-list mode: the decision on a connection, an HTTP request and a DNS query under
//! a policy.

use std::net::{IpAddr, SocketAddr};

use crate::allow_host::AllowHost;
use crate::decision::{refusal, Allowed, Decision, DenyReason, EntryRef, HostFacts, Verdict};
use crate::host::normalize_name;
use crate::model::{Endpoint, EndpointKind, HostSpec, Policy, RestAllow, RestMatch};
use crate::ranges::{refused_range, RangeKind};

/// Most query parameters of one request that are matched; a request with more is
/// refused rather than matched on a prefix.
pub const MAX_QUERY_PARAMS: usize = 256;

/// What the first bytes of a flow showed (see the `peek` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes<'a> {
    /// Nothing seen yet.
    NotSeen,
    /// A TLS ClientHello, with its SNI if it had one.
    Tls { sni: Option<&'a str> },
    /// An HTTP/1.x request head, with its Host if it had one.
    Http { host: Option<&'a str> },
    /// Something else, or nothing before the caller stopped waiting.
    Other,
}

/// A connection from the sandbox, as the endpoint sees it.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub dst: SocketAddr,
    /// The names kiln's resolver answered with `dst`'s address for this sandbox.
    pub pinned: &'a [String],
    pub first_bytes: FirstBytes<'a>,
}

/// One HTTP request on a plain HTTP connection, as its head shows it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as sent (percent-encoded), starting with `/` (or `*` for `OPTIONS *`).
    pub path: &'a str,
    /// The query as sent, without the `?`.
    pub query: Option<&'a str>,
    pub host: Option<&'a str>,
}

/// The decision on a DNS query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsDecision {
    /// Answer it from the host's resolver configuration (and pin the answers).
    Resolve,
    /// Answer NXDOMAIN at once: no rule could ever allow a connection to this name.
    NxDomain { reason: String },
    /// Answer REFUSED: a record type that could carry data, for a name outside the
    /// policy.
    Refused { reason: String },
}

impl DnsDecision {
    /// `allow` for an answered query, `deny` for NXDOMAIN and REFUSED.
    pub fn verdict(&self) -> Verdict {
        match self {
            DnsDecision::Resolve => Verdict::Allow,
            DnsDecision::NxDomain { .. } | DnsDecision::Refused { .. } => Verdict::Deny,
        }
    }

    /// Why the query was not answered.
    pub fn reason(&self) -> Option<&str> {
        match self {
            DnsDecision::Resolve => None,
            DnsDecision::NxDomain { reason } | DnsDecision::Refused { reason } => Some(reason),
        }
    }
}

/// DNS record types an address lookup uses; everything else is "odd" outside the policy.
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// One endpoint that may take a flow, with where it is in the file.
struct Candidate<'p> {
    entry: EntryRef,
    endpoint: &'p Endpoint,
}

impl Policy {
    /// The decision on a connection under this policy. `allows` are the sandbox's
    /// `--network-allow-host` values, which open their service in this mode too.
    pub fn check_connection(
        &self,
        conn: &Connection<'_>,
        host: &HostFacts,
        allows: &[AllowHost],
    ) -> Decision {
        match self.admit(conn, host, allows) {
            Admission::Explicit(allow) => Decision::Allow(Allowed::AllowHost(allow)),
            Admission::Endpoints(list) => {
                let first = list.into_iter().next().map(|c| c.entry);
                first.map_or(Decision::NeedPeek, |e| Decision::Allow(Allowed::Entry(e)))
            }
            Admission::Decided(decision) => decision,
        }
    }

    /// The decision on one request of a plain HTTP connection. Every request is
    /// decided, since its Host may differ from the previous one on the connection.
    pub fn check_request(
        &self,
        dst: SocketAddr,
        pinned: &[String],
        request: &Request<'_>,
        host: &HostFacts,
        allows: &[AllowHost],
    ) -> Decision {
        let conn = Connection {
            dst,
            pinned,
            first_bytes: FirstBytes::Http { host: request.host },
        };
        let admitted = match self.admit(&conn, host, allows) {
            Admission::Explicit(allow) => return Decision::Allow(Allowed::AllowHost(allow)),
            Admission::Endpoints(list) => list,
            Admission::Decided(decision) => return decision,
        };
        let method = request.method.to_ascii_uppercase();
        let query = match parse_query(request.query) {
            Ok(q) => q,
            Err(reason) => return target_refusal(&admitted[0], reason),
        };
        let mut allowed_by = None;
        let mut first_applicable = None;
        for c in &admitted {
            let path = match canonical_path(request.path, c.endpoint.allow_encoded_slash) {
                Ok(p) => p,
                Err(reason) => return target_refusal(c, reason),
            };
            if c.endpoint.path.as_ref().is_some_and(|g| !g.matches(&path)) {
                continue;
            }
            first_applicable.get_or_insert((c, path.clone()));
            if let EndpointKind::Rest { deny, .. } = &c.endpoint.kind {
                if let Some(i) = deny
                    .iter()
                    .position(|d| d.matches(&method, &path, &query, true))
                {
                    return enforce(
                        c,
                        DenyReason::RequestDenied {
                            entry: c.entry.clone(),
                            method,
                            path,
                            deny_rule: i,
                        },
                    );
                }
            }
            if allowed_by.is_none() && c.endpoint.allows_request(&method, &path, &query) {
                allowed_by = Some(c.entry.clone());
            }
        }
        match (allowed_by, first_applicable) {
            (Some(entry), _) => Decision::Allow(Allowed::Entry(entry)),
            (None, Some((c, path))) => enforce(
                c,
                DenyReason::RequestNotAllowed {
                    entry: c.entry.clone(),
                    method,
                    path,
                },
            ),
            (None, None) => {
                let c = &admitted[0];
                enforce(
                    c,
                    DenyReason::RequestNotAllowed {
                        entry: c.entry.clone(),
                        method,
                        path: request.path.to_string(),
                    },
                )
            }
        }
    }

    /// The decision on a DNS query for `name` of record type `qtype` (1 = A, 28 = AAAA,
    /// 16 = TXT, ...).
    pub fn check_dns(&self, name: &str, qtype: u16) -> DnsDecision {
        let Some(name) = normalize_name(name) else {
            return DnsDecision::Refused {
                reason: format!("{:?} is not a DNS name", name.escape_debug().to_string()),
            };
        };
        let named = self.endpoints().any(|c| match &c.endpoint.host {
            HostSpec::Name(p) => p.matches(&name),
            _ => false,
        });
        if named {
            return DnsDecision::Resolve;
        }
        let address_lookup = qtype == TYPE_A || qtype == TYPE_AAAA;
        let address_only = self
            .endpoints()
            .any(|c| matches!(c.endpoint.host, HostSpec::AnyInAllowedIps));
        match (address_lookup, address_only) {
            // A host-less endpoint allows whatever name leads into its allowed_ips.
            (true, true) => DnsDecision::Resolve,
            (true, false) => DnsDecision::NxDomain {
                reason: format!("no policy entry names {name}"),
            },
            (false, _) => DnsDecision::Refused {
                reason: format!(
                    "{} query for {name}, which no policy entry names",
                    dns_type_name(qtype)
                ),
            },
        }
    }

    fn endpoints(&self) -> impl Iterator<Item = Candidate<'_>> {
        self.entries.iter().flat_map(|entry| {
            entry
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, endpoint)| Candidate {
                    entry: EntryRef {
                        key: entry.key.clone(),
                        name: entry.name.clone(),
                        endpoint: i,
                    },
                    endpoint,
                })
        })
    }

    /// The endpoints that take this connection, in file order; or the final decision
    /// when none does (or when the first bytes are needed to know).
    fn admit(
        &self,
        conn: &Connection<'_>,
        host: &HostFacts,
        allows: &[AllowHost],
    ) -> Admission<'_> {
        // IPv4 peers of a dual-stack socket arrive IPv4-mapped; match them as IPv4.
        let dst = SocketAddr::new(crate::canonical(conn.dst.ip()), conn.dst.port());
        if let Some(allow) = allows.iter().find(|a| a.matches(dst, host.gateway)) {
            return Admission::Explicit(*allow);
        }
        if let Some(reason) = refusal(dst, host) {
            // The host's own addresses are not for policies to open (an audit entry
            // would let them through): only --network-allow-host reaches them.
            let always = match &reason {
                DenyReason::Refused(r) => {
                    r.kind.always_refused() || r.kind == RangeKind::HostAddress
                }
                _ => true,
            };
            if always {
                return Admission::Decided(Decision::Deny(reason));
            }
        }
        let pinned: Vec<String> = conn
            .pinned
            .iter()
            .filter_map(|n| normalize_name(n))
            .collect();
        let on_port: Vec<Candidate<'_>> = self
            .endpoints()
            .filter(|c| c.endpoint.ports.contains(&dst.port()))
            .collect();
        let by_address = |c: &Candidate<'_>| match &c.endpoint.host {
            HostSpec::Address(ip) => crate::canonical(*ip) == crate::canonical(dst.ip()),
            HostSpec::AnyInAllowedIps => {
                c.endpoint.allowed_ips.iter().any(|n| n.contains(&dst.ip()))
            }
            HostSpec::Name(_) => false,
        };
        let name_matches = |c: &Candidate<'_>, name: &str| match &c.endpoint.host {
            HostSpec::Name(p) => p.matches(name),
            _ => false,
        };
        let some_named = on_port
            .iter()
            .any(|c| pinned.iter().any(|n| name_matches(c, n)));
        let some_addressed = on_port.iter().any(by_address);
        if !some_named && !some_addressed {
            return Admission::Decided(Decision::Deny(DenyReason::NoEntry { dst, names: pinned }));
        }
        let claim = match conn.first_bytes {
            FirstBytes::NotSeen => {
                let needs_bytes = on_port.iter().any(|c| {
                    (by_address(c) && !c.endpoint.allows_everything())
                        || pinned.iter().any(|n| name_matches(c, n))
                });
                if needs_bytes {
                    return Admission::Decided(Decision::NeedPeek);
                }
                Claim::Pinned
            }
            FirstBytes::Tls { sni } => Claim::of(sni),
            FirstBytes::Http { host } => Claim::of(host.map(strip_port)),
            FirstBytes::Other => Claim::Pinned,
        };
        let addressed = || {
            on_port
                .iter()
                .filter(|c| by_address(c))
                .map(Candidate::clone_ref)
        };
        let candidates: Vec<Candidate<'_>> = match &claim {
            Claim::Named(name) => {
                let named: Vec<Candidate<'_>> = on_port
                    .iter()
                    .filter(|c| name_matches(c, name))
                    .map(Candidate::clone_ref)
                    .collect();
                if !named.is_empty() && !pinned.contains(name) && !some_addressed {
                    let reason = DenyReason::NameNotPinned {
                        name: name.clone(),
                        dst,
                    };
                    return Admission::Decided(enforce(&named[0], reason));
                }
                let mut list: Vec<Candidate<'_>> = addressed().collect();
                if pinned.contains(name) {
                    list.extend(named);
                }
                list
            }
            Claim::Unnamed => addressed().collect(),
            Claim::Pinned => on_port
                .iter()
                .filter(|c| by_address(c) || pinned.iter().any(|n| name_matches(c, n)))
                .map(Candidate::clone_ref)
                .collect(),
        };
        if candidates.is_empty() {
            let reason = match claim {
                Claim::Named(name) => DenyReason::NoEntry {
                    dst,
                    names: vec![name],
                },
                Claim::Unnamed => DenyReason::NoName { dst },
                Claim::Pinned => DenyReason::NoEntry { dst, names: pinned },
            };
            return Admission::Decided(Decision::Deny(reason));
        }
        let http = matches!(conn.first_bytes, FirstBytes::Http { .. });
        let mut first_refusal = None;
        let mut admitted = Vec::new();
        for c in candidates {
            match c.refusal(dst, host, http) {
                None => admitted.push(c),
                Some(reason) => {
                    first_refusal.get_or_insert((c, reason));
                }
            }
        }
        match (admitted.is_empty(), first_refusal) {
            (false, _) => Admission::Endpoints(admitted),
            (true, Some((c, reason))) => Admission::Decided(enforce(&c, reason)),
            (true, None) => unreachable!("a non-empty candidate list admits or refuses"),
        }
    }
}

/// Which names stand for a flow's destination.
enum Claim {
    /// The SNI or Host: the server serves this name, whatever else shares the address.
    Named(String),
    /// TLS or HTTP naming no host (no SNI, no Host, an IP address, or something that
    /// is not a DNS name): the server picks its default site, which may be any name on
    /// the address, so only address-matched endpoints may take it.
    Unnamed,
    /// Neither TLS nor HTTP: there is no name in the flow, and the address's pinned
    /// names decide.
    Pinned,
}

impl Claim {
    fn of(name: Option<&str>) -> Claim {
        match name
            .filter(|n| n.parse::<IpAddr>().is_err())
            .map(normalize_name)
        {
            Some(Some(name)) => Claim::Named(name),
            _ => Claim::Unnamed,
        }
    }
}

/// How a connection fares before any request: explicitly allowed, taken by endpoints
/// (non-empty, file order), or decided already (denied, audited, or needing a peek).
enum Admission<'p> {
    Explicit(AllowHost),
    Endpoints(Vec<Candidate<'p>>),
    Decided(Decision),
}

impl<'p> Candidate<'p> {
    fn clone_ref(&self) -> Candidate<'p> {
        Candidate {
            entry: self.entry.clone(),
            endpoint: self.endpoint,
        }
    }

    /// Why this endpoint does not take a flow to `dst`, if it does not.
    fn refusal(&self, dst: SocketAddr, host: &HostFacts, http: bool) -> Option<DenyReason> {
        let ep = self.endpoint;
        if !ep.allowed_ips.is_empty() {
            if !ep.allowed_ips.iter().any(|n| n.contains(&dst.ip())) {
                return Some(DenyReason::NotInAllowedIps {
                    entry: self.entry.clone(),
                    addr: dst.ip(),
                });
            }
        } else if let Some(range) = refused_range(dst.ip(), &host.addrs) {
            // Without allowed_ips, only a name or address the policy spells out
            // exactly may lead to a private address (OpenShell's rule).
            let exact = match &ep.host {
                HostSpec::Name(p) => !p.is_wildcard(),
                HostSpec::Address(_) => true,
                HostSpec::AnyInAllowedIps => false,
            };
            if !exact {
                return Some(DenyReason::InternalAddress {
                    entry: self.entry.clone(),
                    range,
                });
            }
        }
        match &ep.kind {
            EndpointKind::Tcp => None,
            EndpointKind::Rest { .. } if http || ep.allows_everything() => None,
            EndpointKind::Rest { .. } => Some(DenyReason::NotPlainHttp {
                entry: self.entry.clone(),
            }),
            EndpointKind::Uninspected { open: true } => None,
            EndpointKind::Uninspected { open: false } => Some(DenyReason::Uninspected {
                entry: self.entry.clone(),
            }),
        }
    }
}

/// `reason` as a denial, or as an audit record when the endpoint only audits.
fn enforce(c: &Candidate<'_>, reason: DenyReason) -> Decision {
    if c.endpoint.audit {
        Decision::Audit {
            entry: c.entry.clone(),
            would_deny: reason,
        }
    } else {
        Decision::Deny(reason)
    }
}

fn target_refusal(c: &Candidate<'_>, reason: String) -> Decision {
    enforce(
        c,
        DenyReason::BadRequestTarget {
            entry: c.entry.clone(),
            reason,
        },
    )
}

impl Endpoint {
    fn allows_request(&self, method: &str, path: &str, query: &[(String, String)]) -> bool {
        match &self.kind {
            EndpointKind::Tcp => true,
            EndpointKind::Uninspected { open } => *open,
            EndpointKind::Rest {
                allow: RestAllow::Access(access),
                ..
            } => access.allows(method),
            EndpointKind::Rest {
                allow: RestAllow::Rules(rules),
                ..
            } => rules.iter().any(|r| r.matches(method, path, query, false)),
        }
    }
}

impl RestMatch {
    /// Whether a request matches. Allow clauses need every value of each listed
    /// parameter to match (and the parameter present); deny rules fire when some value
    /// of each listed parameter matches.
    fn matches(&self, method: &str, path: &str, query: &[(String, String)], deny: bool) -> bool {
        let method_ok = self.method == "*"
            || self.method == method
            || (method == "HEAD" && self.method == "GET");
        if !method_ok || !self.path.matches(path) {
            return false;
        }
        self.query.iter().all(|(key, globs)| {
            let mut values = query
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v)
                .peekable();
            if values.peek().is_none() {
                return false;
            }
            let value_ok = |v: &String| globs.iter().any(|g| g.matches(v));
            if deny {
                values.any(value_ok)
            } else {
                values.all(value_ok)
            }
        })
    }
}

/// A Host header's name without its port (`example.com:8080`, `[::1]:80`).
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The path rules are matched against: percent-decoded, `.`/`..` segments resolved,
/// repeated slashes kept (servers differ on them, so rules see what was sent).
fn canonical_path(raw: &str, allow_encoded_slash: bool) -> Result<String, String> {
    if raw == "*" {
        return Ok("*".into());
    }
    if !raw.starts_with('/') {
        return Err(format!("path {raw:?} does not start with '/'"));
    }
    let mut segments: Vec<String> = Vec::new();
    let raw_segments: Vec<&str> = raw[1..].split('/').collect();
    let last = raw_segments.len() - 1;
    for (i, seg) in raw_segments.iter().enumerate() {
        let decoded = percent_decode(seg, false, allow_encoded_slash)
            .map_err(|e| format!("path {raw:?}: {e}"))?;
        match decoded.as_str() {
            "." => {
                if i == last {
                    segments.push(String::new());
                }
            }
            ".." => {
                if segments.pop().is_none() {
                    return Err(format!("path {raw:?} climbs above the root"));
                }
                if i == last {
                    segments.push(String::new());
                }
            }
            _ => segments.push(decoded),
        }
    }
    Ok(format!("/{}", segments.join("/")))
}

/// Query pairs, decoded (`+` is a space), in order.
fn parse_query(raw: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let Some(raw) = raw.filter(|q| !q.is_empty()) else {
        return Ok(Vec::new());
    };
    let mut pairs = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        if pairs.len() == MAX_QUERY_PARAMS {
            return Err(format!("more than {MAX_QUERY_PARAMS} query parameters"));
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let decode = |s: &str| percent_decode(s, true, true).map_err(|e| format!("query: {e}"));
        pairs.push((decode(k)?, decode(v)?));
    }
    Ok(pairs)
}

/// Decodes `%XX` escapes into UTF-8 text. An encoded `/` stays `%2F` when allowed (so
/// it cannot act as a separator) and is refused otherwise; control characters and
/// invalid UTF-8 are refused.
fn percent_decode(
    text: &str,
    plus_is_space: bool,
    allow_encoded_slash: bool,
) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let value = hex
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("a '%' not followed by two hex digits")?;
                if value == b'/' {
                    if !allow_encoded_slash {
                        return Err(
                            "an encoded '/' (%2F); the endpoint does not set allow_encoded_slash"
                                .into(),
                        );
                    }
                    out.extend_from_slice(b"%2F");
                } else {
                    out.push(value);
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    let text = String::from_utf8(out).map_err(|_| "not UTF-8 once decoded".to_string())?;
    if text.chars().any(char::is_control) {
        return Err("a control character once decoded".into());
    }
    Ok(text)
}

/// A DNS record type's name (`A`, `TXT`, ...), or `TYPE<n>` for the others.
pub fn dns_type_name(qtype: u16) -> String {
    match qtype {
        1 => "A".into(),
        28 => "AAAA".into(),
        5 => "CNAME".into(),
        15 => "MX".into(),
        16 => "TXT".into(),
        33 => "SRV".into(),
        64 => "SVCB".into(),
        65 => "HTTPS".into(),
        255 => "ANY".into(),
        n => format!("TYPE{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
version: 1
network_policies:
  api:
    name: the-api
    endpoints:
      - host: good.test
        port: 443
      - host: good.test
        port: 80
        protocol: rest
        access: read-only
      - host: "*.wild.test"
        port: 443
  private:
    endpoints:
      - host: db.corp.test
        port: 5432
      - allowed_ips: [10.9.0.0/16]
        port: 6379
      - host: pinned-ips.test
        port: 443
        allowed_ips: [198.18.7.0/24]
      - host: 10.7.7.7
        port: 8080
  rest:
    endpoints:
      - host: rw.test
        port: 80
        protocol: rest
        access: read-write
        deny_rules:
          - method: "*"
            path: /admin/**
          - method: GET
            path: /search
            query: { q: "secret*" }
      - host: rules.test
        port: 80
        protocol: rest
        rules:
          - allow: { method: GET, path: "/repos/*/issues", query: { state: { any: [open, closed] } } }
          - allow: { method: POST, path: /upload }
      - host: tls-rest.test
        port: 443
        protocol: rest
        access: full
      - host: scoped.test
        port: 80
        path: /api/**
        protocol: rest
        access: full
      - host: npm.test
        port: 80
        protocol: rest
        access: read-only
        allow_encoded_slash: true
  audited:
    endpoints:
      - host: audit.test
        port: 80
        protocol: rest
        access: read-only
        enforcement: audit
      - host: "*.audit.test"
        port: 443
        enforcement: audit
  other:
    endpoints:
      - host: gql.test
        port: 443
        protocol: graphql
        access: read-only
"#;

    fn policy() -> Policy {
        Policy::parse("test.yaml", POLICY).unwrap()
    }

    fn facts() -> HostFacts {
        HostFacts {
            addrs: vec!["192.168.1.20".parse().unwrap()],
            gateway: Some("10.0.2.2".parse().unwrap()),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn connect(dst: &str, pinned: &[&str], first_bytes: FirstBytes<'_>) -> Decision {
        let pinned = names(pinned);
        let conn = Connection {
            dst: dst.parse().unwrap(),
            pinned: &pinned,
            first_bytes,
        };
        policy().check_connection(&conn, &facts(), &[])
    }

    fn entry_of(decision: &Decision) -> String {
        match decision {
            Decision::Allow(Allowed::Entry(e)) => format!("{}[{}]", e.key, e.endpoint),
            other => panic!("not allowed by an entry: {other:?}"),
        }
    }

    fn denial(decision: Decision) -> String {
        match decision {
            Decision::Deny(reason) => reason.to_string(),
            other => panic!("not denied: {other:?}"),
        }
    }

    const TLS_GOOD: FirstBytes<'static> = FirstBytes::Tls {
        sni: Some("good.test"),
    };

    #[test]
    fn a_pinned_allowed_name_needs_the_first_bytes_then_passes() {
        assert_eq!(
            connect("198.18.0.5:443", &["good.test"], FirstBytes::NotSeen),
            Decision::NeedPeek
        );
        let d = connect("198.18.0.5:443", &["good.test"], TLS_GOOD);
        assert_eq!(entry_of(&d), "api[0]");
        let Decision::Allow(Allowed::Entry(e)) = d else {
            unreachable!()
        };
        assert_eq!(e.to_string(), "network_policies.api.endpoints[0] (the-api)");
    }

    #[test]
    fn nothing_pinned_or_nothing_matching_is_denied_at_once() {
        let e = denial(connect("198.18.0.5:443", &[], FirstBytes::NotSeen));
        assert!(
            e.contains("198.18.0.5:443 matches no policy entry (no name"),
            "{e}"
        );
        let e = denial(connect(
            "198.18.0.5:443",
            &["evil.test"],
            FirstBytes::NotSeen,
        ));
        assert!(e.contains("known as evil.test"), "{e}");
    }

    #[test]
    fn a_port_not_listed_is_denied() {
        let e = denial(connect(
            "198.18.0.5:8443",
            &["good.test"],
            FirstBytes::NotSeen,
        ));
        assert!(e.contains("198.18.0.5:8443"), "{e}");
    }

    #[test]
    fn two_names_on_one_address_are_told_apart_by_sni_and_host() {
        let pinned = ["good.test", "bad.test"];
        assert_eq!(
            entry_of(&connect("198.18.0.5:443", &pinned, TLS_GOOD)),
            "api[0]"
        );
        let e = denial(connect(
            "198.18.0.5:443",
            &pinned,
            FirstBytes::Tls {
                sni: Some("bad.test"),
            },
        ));
        assert!(e.contains("known as bad.test"), "{e}");
        let e = denial(connect(
            "198.18.0.5:80",
            &pinned,
            FirstBytes::Http {
                host: Some("bad.test:80"),
            },
        ));
        assert!(e.contains("known as bad.test"), "{e}");
        assert_eq!(
            entry_of(&connect(
                "198.18.0.5:80",
                &pinned,
                FirstBytes::Http {
                    host: Some("GOOD.test.")
                }
            )),
            "api[1]"
        );
    }

    #[test]
    fn an_allowed_name_the_resolver_never_gave_for_the_address_is_denied() {
        // Straight to an address learnt from another name, claiming an allowed one.
        let d = connect("198.18.0.9:443", &["x.wild.test"], TLS_GOOD);
        let e = denial(d);
        assert!(
            e.contains("names good.test, but kiln's resolver never gave 198.18.0.9"),
            "{e}"
        );
        // And to an allowed name's address with a denied SNI.
        let e = denial(connect(
            "198.18.0.5:443",
            &["good.test"],
            FirstBytes::Tls {
                sni: Some("bad.test"),
            },
        ));
        assert!(e.contains("bad.test"), "{e}");
    }

    #[test]
    fn without_tls_or_http_the_pinned_names_decide() {
        let d = connect("198.18.0.5:443", &["good.test"], FirstBytes::Other);
        assert_eq!(entry_of(&d), "api[0]");
    }

    #[test]
    fn tls_or_http_naming_no_host_only_reaches_address_endpoints() {
        // The server would pick its default site, which may be a denied name.
        for first_bytes in [
            FirstBytes::Tls { sni: None },
            FirstBytes::Http { host: None },
            FirstBytes::Http {
                host: Some("198.18.0.5"),
            },
            FirstBytes::Http {
                host: Some("good.test:x"),
            },
            FirstBytes::Http {
                host: Some("good.test/evil"),
            },
        ] {
            let e = denial(connect("198.18.0.5:443", &["good.test"], first_bytes));
            assert!(e.contains("names no host"), "{first_bytes:?}: {e}");
        }
        let d = connect("10.9.0.1:6379", &[], FirstBytes::Tls { sni: None });
        assert_eq!(entry_of(&d), "private[1]");
    }

    #[test]
    fn wildcard_hosts_match_one_label() {
        let sni = FirstBytes::Tls {
            sni: Some("a.wild.test"),
        };
        assert_eq!(
            entry_of(&connect("198.18.0.6:443", &["a.wild.test"], sni)),
            "api[2]"
        );
        let deep = FirstBytes::Tls {
            sni: Some("a.b.wild.test"),
        };
        assert!(denial(connect("198.18.0.6:443", &["a.b.wild.test"], deep))
            .contains("matches no policy entry"));
    }

    #[test]
    fn private_addresses_need_an_exact_name_or_allowed_ips() {
        let tcp = FirstBytes::Other;
        assert_eq!(
            entry_of(&connect("10.1.2.3:5432", &["db.corp.test"], tcp)),
            "private[0]"
        );
        let sni = FirstBytes::Tls {
            sni: Some("a.wild.test"),
        };
        let e = denial(connect("10.1.2.3:443", &["a.wild.test"], sni));
        assert!(
            e.contains("private (RFC 1918) range 10.0.0.0/8") && e.contains("allowed_ips"),
            "{e}"
        );
        // The host's own address: never through a policy, even an audit one.
        let e = denial(connect("192.168.1.20:5432", &["db.corp.test"], tcp));
        assert!(e.contains("an address of this host"), "{e}");
        let sni = FirstBytes::Tls {
            sni: Some("x.audit.test"),
        };
        let e = denial(connect("192.168.1.20:443", &["x.audit.test"], sni));
        assert!(e.contains("an address of this host"), "{e}");
        // Address-only endpoint: no name, no peek needed for plain TCP.
        assert_eq!(
            entry_of(&connect("10.9.3.4:6379", &[], FirstBytes::NotSeen)),
            "private[1]"
        );
        assert!(denial(connect("10.8.3.4:6379", &[], FirstBytes::NotSeen))
            .contains("matches no policy entry"));
        // An endpoint naming a private address exactly.
        let d = connect("10.7.7.7:8080", &[], FirstBytes::NotSeen);
        assert_eq!(entry_of(&d), "private[3]");
        // IPv4-mapped destinations match IPv4 allowed_ips.
        let d = connect("[::ffff:10.9.3.4]:6379", &[], FirstBytes::NotSeen);
        assert_eq!(entry_of(&d), "private[1]");
        // A named endpoint with allowed_ips: the address must be in them.
        let sni = FirstBytes::Tls {
            sni: Some("pinned-ips.test"),
        };
        assert_eq!(
            entry_of(&connect("198.18.7.1:443", &["pinned-ips.test"], sni)),
            "private[2]"
        );
        let e = denial(connect("198.18.8.1:443", &["pinned-ips.test"], sni));
        assert!(
            e.contains(
                "198.18.8.1 is not in the allowed_ips of network_policies.private.endpoints[2]"
            ),
            "{e}"
        );
    }

    #[test]
    fn metadata_loopback_and_the_host_stay_refused_unless_explicitly_allowed() {
        let pinned = names(&["good.test"]);
        let conn = |dst: &str| Connection {
            dst: dst.parse().unwrap(),
            pinned: &pinned,
            first_bytes: TLS_GOOD,
        };
        let p = policy();
        let e = denial(p.check_connection(&conn("169.254.169.254:443"), &facts(), &[]));
        assert!(e.contains("cloud metadata"), "{e}");
        assert!(
            denial(p.check_connection(&conn("10.0.2.2:443"), &facts(), &[]))
                .contains("host itself")
        );
        let allows: Vec<AllowHost> = vec!["host.kiln.internal:443".parse().unwrap()];
        assert_eq!(
            p.check_connection(&conn("10.0.2.2:443"), &facts(), &allows),
            Decision::Allow(Allowed::AllowHost(allows[0]))
        );
    }

    #[test]
    fn rest_endpoints_need_plain_http_unless_everything_is_allowed() {
        let tls = FirstBytes::Tls {
            sni: Some("good.test"),
        };
        // good.test:80 is rest read-only: TLS on it cannot be checked.
        let e = denial(connect("198.18.0.5:80", &["good.test"], tls));
        assert!(e.contains("plain HTTP only"), "{e}");
        let full = FirstBytes::Tls {
            sni: Some("tls-rest.test"),
        };
        assert_eq!(
            entry_of(&connect("198.18.0.5:443", &["tls-rest.test"], full)),
            "rest[2]"
        );
        let gql = FirstBytes::Tls {
            sni: Some("gql.test"),
        };
        assert!(denial(connect("198.18.0.5:443", &["gql.test"], gql)).contains("does not inspect"));
    }

    #[test]
    fn audit_endpoints_let_through_what_enforce_would_deny() {
        let tls = FirstBytes::Tls {
            sni: Some("audit.test"),
        };
        let d = connect("198.18.0.5:80", &["audit.test"], tls);
        let Decision::Audit { entry, would_deny } = d else {
            panic!("{d:?}")
        };
        assert_eq!(entry.key, "audited");
        assert!(matches!(would_deny, DenyReason::NotPlainHttp { .. }));
        let sni = FirstBytes::Tls {
            sni: Some("x.audit.test"),
        };
        let d = connect("10.1.1.1:443", &["x.audit.test"], sni);
        assert!(
            matches!(
                d,
                Decision::Audit {
                    would_deny: DenyReason::InternalAddress { .. },
                    ..
                }
            ),
            "{d:?}"
        );
        assert!(d.lets_through());
    }

    fn request(host: &str, method: &str, target: &str, pinned: &[&str]) -> Decision {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let pinned = names(pinned);
        let req = Request {
            method,
            path,
            query,
            host: Some(host),
        };
        policy().check_request(
            "198.18.0.5:80".parse().unwrap(),
            &pinned,
            &req,
            &facts(),
            &[],
        )
    }

    #[test]
    fn read_only_passes_get_head_options_and_refuses_post() {
        for method in ["GET", "head", "OPTIONS"] {
            assert_eq!(
                entry_of(&request("good.test", method, "/x", &["good.test"])),
                "api[1]"
            );
        }
        let e = denial(request("good.test", "POST", "/x", &["good.test"]));
        assert_eq!(
            e,
            "POST /x is not permitted by network_policies.api.endpoints[1] (the-api)"
        );
    }

    #[test]
    fn deny_rules_win_over_access() {
        assert_eq!(
            entry_of(&request("rw.test", "PUT", "/data", &["rw.test"])),
            "rest[0]"
        );
        let e = denial(request("rw.test", "GET", "/admin/users", &["rw.test"]));
        assert!(
            e.ends_with("is blocked by network_policies.rest.endpoints[0].deny_rules[0]"),
            "{e}"
        );
        let e = denial(request(
            "rw.test",
            "GET",
            "/search?q=top&q=secret-plan",
            &["rw.test"],
        ));
        assert!(e.contains("deny_rules[1]"), "{e}");
        assert_eq!(
            entry_of(&request("rw.test", "GET", "/search?q=public", &["rw.test"])),
            "rest[0]"
        );
        assert_eq!(
            entry_of(&request("rw.test", "GET", "/search", &["rw.test"])),
            "rest[0]"
        );
        assert!(
            denial(request("rw.test", "DELETE", "/data", &["rw.test"])).contains("not permitted")
        );
        // Dot segments and encodings cannot sneak past a deny rule.
        assert!(
            denial(request("rw.test", "GET", "/x/../admin/a", &["rw.test"]))
                .contains("deny_rules[0]")
        );
        assert!(
            denial(request("rw.test", "GET", "/%61dmin/a", &["rw.test"])).contains("deny_rules[0]")
        );
    }

    #[test]
    fn allow_rules_match_method_path_and_query() {
        let ok = |t: &str, m: &str| request("rules.test", m, t, &["rules.test"]);
        assert_eq!(
            entry_of(&ok("/repos/a/issues?state=open", "GET")),
            "rest[1]"
        );
        assert_eq!(
            entry_of(&ok("/repos/a/b/issues?state=closed", "GET")),
            "rest[1]"
        );
        assert!(denial(ok("/repos/a/issues", "GET")).contains("not permitted"));
        assert!(denial(ok("/repos/a/issues?state=open&state=all", "GET")).contains("not permitted"));
        assert_eq!(entry_of(&ok("/upload", "POST")), "rest[1]");
        assert!(denial(ok("/upload", "PUT")).contains("not permitted"));
    }

    #[test]
    fn bad_targets_are_refused_with_the_reason() {
        let d = |t: &str| denial(request("rw.test", "GET", t, &["rw.test"]));
        assert!(d("/../etc").contains("climbs above the root"));
        assert!(d("/a%2Fb").contains("allow_encoded_slash"));
        assert!(d("/a%zz").contains("two hex digits"));
        assert!(d("/a%00").contains("control character"));
        assert!(d("/a%ff").contains("not UTF-8"));
        let many = format!("/?{}", "a=1&".repeat(MAX_QUERY_PARAMS + 1));
        assert!(d(&many).contains("query parameters"));
        assert_eq!(
            entry_of(&request("npm.test", "GET", "/@scope%2Fname", &["npm.test"])),
            "rest[4]"
        );
    }

    #[test]
    fn the_endpoint_path_selector_limits_the_endpoint() {
        assert_eq!(
            entry_of(&request(
                "scoped.test",
                "DELETE",
                "/api/x",
                &["scoped.test"]
            )),
            "rest[3]"
        );
        assert!(
            denial(request("scoped.test", "GET", "/other", &["scoped.test"]))
                .contains("not permitted")
        );
    }

    #[test]
    fn every_request_is_checked_against_its_own_host() {
        let pinned = ["good.test", "bad.test"];
        assert_eq!(
            entry_of(&request("good.test", "GET", "/", &pinned)),
            "api[1]"
        );
        assert!(denial(request("bad.test", "GET", "/", &pinned)).contains("known as bad.test"));
    }

    #[test]
    fn audited_requests_pass_with_what_enforce_would_say() {
        let d = request("audit.test", "POST", "/x", &["audit.test"]);
        let Decision::Audit { would_deny, .. } = d else {
            panic!("{d:?}")
        };
        assert!(would_deny
            .to_string()
            .starts_with("POST /x is not permitted"));
    }

    #[test]
    fn dns_answers_policy_names_and_refuses_the_rest() {
        let p = policy();
        assert_eq!(p.check_dns("good.test", TYPE_A), DnsDecision::Resolve);
        assert_eq!(p.check_dns("Good.Test.", TYPE_AAAA), DnsDecision::Resolve);
        assert_eq!(p.check_dns("x.wild.test", TYPE_A), DnsDecision::Resolve);
        assert_eq!(p.check_dns("good.test", 16), DnsDecision::Resolve);
        // The hostless allowed_ips endpoint means any name may lead somewhere allowed.
        assert_eq!(p.check_dns("elsewhere.test", TYPE_A), DnsDecision::Resolve);
        let DnsDecision::Refused { reason } = p.check_dns("exfil.attacker.test", 16) else {
            panic!("TXT answered");
        };
        assert_eq!(
            reason,
            "TXT query for exfil.attacker.test, which no policy entry names"
        );
        assert!(matches!(
            p.check_dns("a b", TYPE_A),
            DnsDecision::Refused { .. }
        ));
        let strict = Policy::parse(
            "s.yaml",
            "version: 1\nnetwork_policies:\n  a:\n    endpoints: [{host: good.test, port: 443}]\n",
        )
        .unwrap();
        let DnsDecision::NxDomain { reason } = strict.check_dns("bad.test", TYPE_A) else {
            panic!("bad.test answered");
        };
        assert_eq!(reason, "no policy entry names bad.test");
        assert!(matches!(
            strict.check_dns("bad.test", 65),
            DnsDecision::Refused { .. }
        ));
    }

    #[test]
    fn host_headers_lose_their_port() {
        assert_eq!(strip_port("a.test:8080"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
