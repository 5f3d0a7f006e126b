//! Allow-list mode: the decision on a connection, an HTTP request and a DNS query under
//! a policy.

use std::net::{IpAddr, SocketAddr};

use crate::allow_host::AllowHost;
use crate::decision::{refusal, Allowed, Decision, DenyReason, EntryRef, HostFacts};
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
                    type_name(qtype)
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
        let dst = conn.dst;
        if let Some(allow) = allows.iter().find(|a| a.matches(dst, host.gateway)) {
            return Admission::Explicit(*allow);
        }
        if let Some(reason) = refusal(dst, host) {
            let always = match &reason {
                DenyReason::Refused(r) => r.kind.always_refused(),
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
                None
            }
            FirstBytes::Tls { sni } => sni,
            FirstBytes::Http { host } => host.map(strip_port),
            FirstBytes::Other => None,
        };
        // An IP literal names no host; the address itself is what is checked.
        let claim = claim
            .filter(|c| c.parse::<IpAddr>().is_err())
            .map(|c| normalize_name(c).ok_or_else(|| c.to_string()));
        let candidates: Vec<Candidate<'_>> = match &claim {
            Some(Ok(name)) => {
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
                let mut list: Vec<Candidate<'_>> = on_port
                    .iter()
                    .filter(|c| by_address(c))
                    .map(Candidate::clone_ref)
                    .collect();
                if pinned.contains(name) {
                    list.extend(named);
                }
                list
            }
            Some(Err(_)) | None => on_port
                .iter()
                .filter(|c| by_address(c) || pinned.iter().any(|n| name_matches(c, n)))
                .map(Candidate::clone_ref)
                .collect(),
        };
        if candidates.is_empty() {
            let names = match claim {
                Some(Ok(name)) => vec![name],
                Some(Err(raw)) => vec![raw],
                None => pinned,
            };
            return Admission::Decided(Decision::Deny(DenyReason::NoEntry { dst, names }));
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
            // Without allowed_ips, only a name the policy spells out exactly may lead
            // to a private address (OpenShell's rule), and never to the host's own.
            let exact = matches!(&ep.host, HostSpec::Name(p) if !p.is_wildcard());
            if !exact || range.kind == RangeKind::HostAddress {
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

fn type_name(qtype: u16) -> String {
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
