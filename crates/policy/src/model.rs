//! The validated policy: what each entry allows, built from the file with OpenShell's
//! validation constraints, and the list of fields kiln does not enforce.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::error::PolicyError;
use crate::file::{EndpointDef, MatchDef, PolicyFile, QueryMatcherDef};
use crate::glob::Glob;
use crate::host::HostPattern;
use crate::ranges::refused_range;

/// Largest policy file accepted.
pub const MAX_POLICY_BYTES: usize = 1 << 20;
/// Most endpoints in one policy (all entries together).
pub const MAX_ENDPOINTS: usize = 4096;
/// Most `rules` plus `deny_rules` on one endpoint.
pub const MAX_RULES_PER_ENDPOINT: usize = 1024;

/// A validated network policy. Immutable: to change the policy in force, parse the new
/// file and swap the `Arc<Policy>` the flows read.
#[derive(Debug, Clone)]
pub struct Policy {
    source: String,
    digest: String,
    pub(crate) entries: Vec<Entry>,
    not_enforced: Vec<NotEnforced>,
}

/// A field of the file that kiln parsed and checked but does not enforce, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotEnforced {
    /// The field's path in the file, e.g. `network_policies.github.binaries`.
    pub field: String,
    /// Why, and what kiln does instead.
    pub detail: String,
}

impl fmt::Display for NotEnforced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not enforced by kiln: {} ({})", self.field, self.detail)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub name: String,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub host: HostSpec,
    pub ports: Vec<u16>,
    pub kind: EndpointKind,
    pub audit: bool,
    pub allowed_ips: Vec<IpNet>,
    /// The endpoint `path` selector: requests outside it are not this endpoint's.
    pub path: Option<Glob>,
    pub allow_encoded_slash: bool,
}

#[derive(Debug, Clone)]
pub(crate) enum HostSpec {
    Name(HostPattern),
    Address(IpAddr),
    /// No host: any destination address in `allowed_ips`.
    AnyInAllowedIps,
}

#[derive(Debug, Clone)]
pub(crate) enum EndpointKind {
    /// Plain TCP (no protocol, or `tcp`): the connection decision is the only one.
    Tcp,
    /// `protocol: rest`: every HTTP request is decided.
    Rest {
        allow: RestAllow,
        deny: Vec<RestMatch>,
    },
    /// A protocol kiln does not inspect (websocket, graphql, sql, json-rpc, mcp): its
    /// traffic passes only when `open` (access full, no deny rules), since nothing
    /// narrower can be checked.
    Uninspected { open: bool },
}

#[derive(Debug, Clone)]
pub(crate) enum RestAllow {
    Access(Access),
    Rules(Vec<RestMatch>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadOnly,
    ReadWrite,
    Full,
}

impl Access {
    pub(crate) fn allows(self, method: &str) -> bool {
        match self {
            Access::Full => true,
            Access::ReadOnly => matches!(method, "GET" | "HEAD" | "OPTIONS"),
            Access::ReadWrite => {
                matches!(
                    method,
                    "GET" | "HEAD" | "OPTIONS" | "POST" | "PUT" | "PATCH"
                )
            }
        }
    }
}

/// A REST allow clause or deny rule.
#[derive(Debug, Clone)]
pub(crate) struct RestMatch {
    /// Uppercase, or `*`.
    pub method: String,
    pub path: Glob,
    /// Decoded parameter name → globs, any of which a value may match.
    pub query: Vec<(String, Vec<Glob>)>,
}

impl Endpoint {
    /// Whether every request on a connection to this endpoint would pass anyway, so
    /// a flow kiln cannot read (TLS, not HTTP) loses nothing by being let through.
    pub(crate) fn allows_everything(&self) -> bool {
        match &self.kind {
            EndpointKind::Tcp => true,
            EndpointKind::Rest { allow, deny } => {
                matches!(allow, RestAllow::Access(Access::Full))
                    && deny.is_empty()
                    && self.path.is_none()
            }
            EndpointKind::Uninspected { open } => *open,
        }
    }
}

impl Policy {
    /// Parses and validates a policy file. `file` names it in errors (a path, or
    /// whatever the caller calls it); nothing is read from it.
    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge {
                file: file.to_string(),
                size: text.len(),
                max: MAX_POLICY_BYTES,
            });
        }
        let raw: PolicyFile = serde_norway::from_str(text).map_err(|e| PolicyError::Syntax {
            file: file.to_string(),
            detail: e.to_string(),
        })?;
        let mut builder = Builder {
            file,
            not_enforced: Vec::new(),
            endpoints: 0,
        };
        let entries = builder.build(raw)?;
        let digest = Sha256::digest(text.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Policy {
            source: text.to_string(),
            digest: format!("sha256:{hex}"),
            entries,
            not_enforced: builder.not_enforced,
        })
    }

    /// The file's text, as parsed (for showing the policy in force).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `sha256:<hex>` of the file's text: which policy is in force.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Fields parsed and checked but not enforced by kiln, each once.
    pub fn not_enforced(&self) -> &[NotEnforced] {
        &self.not_enforced
    }
}

struct Builder<'a> {
    file: &'a str,
    not_enforced: Vec<NotEnforced>,
    endpoints: usize,
}

const CREDENTIALS: &str = "kiln injects, rewrites and signs no credentials";

impl Builder<'_> {
    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            file: self.file.to_string(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn report(&mut self, field: impl Into<String>, detail: &str) {
        self.not_enforced.push(NotEnforced {
            field: field.into(),
            detail: detail.to_string(),
        });
    }

    fn build(&mut self, raw: PolicyFile) -> Result<Vec<Entry>, PolicyError> {
        match raw.version {
            Some(1) => {}
            Some(v) => return Err(self.invalid("version", format!("is {v}; accepted: 1"))),
            None => return Err(self.invalid("version", "is missing; accepted: 1")),
        }
        if let Some(fs) = &raw.filesystem_policy {
            for path in fs.read_only.iter().chain(&fs.read_write) {
                if !path.starts_with('/') {
                    return Err(self.invalid(
                        "filesystem_policy",
                        format!("path {path:?} is not absolute"),
                    ));
                }
            }
            let _ = fs.include_workdir;
            self.report(
                "filesystem_policy",
                "kiln's guest has its own root image and volumes; see docs/volumes.md",
            );
        }
        if let Some(landlock) = &raw.landlock {
            if let Some(c) = &landlock.compatibility {
                if !matches!(c.as_str(), "best_effort" | "hard_requirement") {
                    return Err(self.invalid(
                        "landlock.compatibility",
                        format!("is {c:?}; accepted: best_effort, hard_requirement"),
                    ));
                }
            }
            self.report("landlock", "kiln's guest applies no Landlock rules");
        }
        if let Some(process) = &raw.process {
            let _ = (&process.run_as_user, &process.run_as_group);
            self.report(
                "process",
                "the sandbox user comes from kiln's identity rules; see docs/identity.md",
            );
        }
        for (key, mw) in &raw.network_middlewares.0 {
            if mw.middleware.is_empty() || mw.endpoints.include.is_empty() {
                return Err(self.invalid(
                    format!("network_middlewares.{key}"),
                    "needs a middleware name and a non-empty endpoints.include",
                ));
            }
            let _ = (
                &mw.name,
                mw.order,
                &mw.config,
                &mw.on_error,
                &mw.endpoints.exclude,
            );
        }
        if !raw.network_middlewares.0.is_empty() {
            self.report("network_middlewares", "kiln runs no HTTP middleware");
        }
        let mut entries = Vec::new();
        for (key, entry) in raw.network_policies.0 {
            let at = format!("network_policies.{key}");
            if key.is_empty() {
                return Err(self.invalid("network_policies", "has an entry with an empty key"));
            }
            if let Some(binaries) = &entry.binaries {
                if binaries.iter().any(|b| b.path.is_empty()) {
                    return Err(self.invalid(format!("{at}.binaries"), "has an empty path"));
                }
                self.report(
                    format!("{at}.binaries"),
                    "only a process inside the guest could tell which binary connects; kiln \
                     decides outside the guest, for every process alike",
                );
            }
            let defs = match entry.endpoints {
                Some(e) if !e.is_empty() => e,
                _ => {
                    return Err(self.invalid(
                        format!("{at}.endpoints"),
                        "is missing or empty; an entry needs at least one endpoint",
                    ))
                }
            };
            let mut endpoints = Vec::new();
            for (i, def) in defs.into_iter().enumerate() {
                self.endpoints += 1;
                if self.endpoints > MAX_ENDPOINTS {
                    return Err(self.invalid(
                        "network_policies",
                        format!("has more than {MAX_ENDPOINTS} endpoints"),
                    ));
                }
                endpoints.push(self.endpoint(&format!("{at}.endpoints[{i}]"), def)?);
            }
            entries.push(Entry {
                name: entry
                    .name
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| key.clone()),
                key,
                endpoints,
            });
        }
        Ok(entries)
    }

    fn endpoint(&mut self, at: &str, def: EndpointDef) -> Result<Endpoint, PolicyError> {
        let field = |name: &str| format!("{at}.{name}");
        let protocol = def.protocol.as_deref().unwrap_or("").to_ascii_lowercase();
        let explicit_tcp = protocol == "tcp";
        let inspected = !protocol.is_empty() && !explicit_tcp;
        if inspected
            && !matches!(
                protocol.as_str(),
                "rest" | "websocket" | "graphql" | "sql" | "json-rpc" | "mcp"
            )
        {
            return Err(self.invalid(
                field("protocol"),
                format!(
                    "is {protocol:?}; accepted: tcp, rest (websocket, graphql, sql, json-rpc \
                     and mcp are accepted but not inspected by kiln), or no protocol for plain TCP"
                ),
            ));
        }

        // allowed_ips first: a host may be left out only when they are given.
        let mut allowed_ips = Vec::new();
        if let Some(list) = &def.allowed_ips {
            if list.is_empty() {
                return Err(self.invalid(field("allowed_ips"), "is empty; remove it or list CIDRs"));
            }
            for text in list {
                allowed_ips.push(self.cidr(&field("allowed_ips"), text)?);
            }
        }

        let host_text = def.host.as_deref().unwrap_or("");
        let host = if host_text.trim().is_empty() {
            if explicit_tcp {
                return Err(self.invalid(field("host"), "is required with protocol tcp"));
            }
            if allowed_ips.is_empty() {
                return Err(self.invalid(
                    field("host"),
                    "is missing; name a host, or give allowed_ips for an address-only endpoint",
                ));
            }
            HostSpec::AnyInAllowedIps
        } else if let Ok(ip) = host_text.parse::<IpAddr>() {
            if explicit_tcp {
                return Err(self.invalid(
                    field("host"),
                    format!("is the IP address {ip}; protocol tcp needs a DNS name"),
                ));
            }
            if let Some(r) = refused_range(ip, &[]).filter(|r| r.kind.always_refused()) {
                return Err(self.invalid(
                    field("host"),
                    format!("is in the {r}, which no policy can open"),
                ));
            }
            HostSpec::Address(ip)
        } else {
            HostSpec::Name(
                HostPattern::new(host_text)
                    .map_err(|e| self.invalid(field("host"), format!("{host_text:?} {e}")))?,
            )
        };

        let ports = match (def.port, def.ports.clone()) {
            (Some(_), Some(_)) => {
                return Err(self.invalid(field("ports"), "port and ports are mutually exclusive"))
            }
            (Some(p), None) => vec![p],
            (None, Some(ps)) if !ps.is_empty() => ps,
            (None, Some(_)) => return Err(self.invalid(field("ports"), "is empty")),
            (None, None) => {
                return Err(
                    self.invalid(field("port"), "is missing; give port or ports (1 to 65535)")
                )
            }
        };
        if ports.contains(&0) {
            return Err(self.invalid(field("port"), "0 is not a port; accepted: 1 to 65535"));
        }

        let audit = match def.enforcement.as_deref() {
            None | Some("enforce") => false,
            Some("audit") => true,
            Some(other) => {
                return Err(self.invalid(
                    field("enforcement"),
                    format!("is {other:?}; accepted: enforce, audit"),
                ))
            }
        };

        if let Some(tls) = &def.tls {
            if !matches!(tls.as_str(), "skip" | "terminate" | "passthrough") {
                return Err(self.invalid(
                    field("tls"),
                    format!("is {tls:?}; accepted: skip (terminate, passthrough are deprecated)"),
                ));
            }
            self.report(
                field("tls"),
                "kiln never terminates TLS; it reads the SNI only",
            );
        }

        if let Some(p) = &def.path {
            if !(p.starts_with('/') || p == "**") {
                return Err(self.invalid(field("path"), "must start with '/' or be '**'"));
            }
        }
        let path = match def.path.as_deref() {
            None | Some("") | Some("**") => None,
            Some(p) => Some(Glob::new(p).map_err(|e| self.invalid(field("path"), e))?),
        };

        // Fields OpenShell rejects on protocol tcp (plain TCP has no requests).
        if explicit_tcp {
            let l7_only: Vec<&str> = [
                ("enforcement", def.enforcement.is_some()),
                ("path", def.path.is_some()),
                ("allow_encoded_slash", def.allow_encoded_slash.is_some()),
                (
                    "websocket_credential_rewrite",
                    def.websocket_credential_rewrite.is_some(),
                ),
                (
                    "request_body_credential_rewrite",
                    def.request_body_credential_rewrite.is_some(),
                ),
                ("persisted_queries", def.persisted_queries.is_some()),
                (
                    "graphql_persisted_queries",
                    def.graphql_persisted_queries.is_some(),
                ),
                (
                    "graphql_max_body_bytes",
                    def.graphql_max_body_bytes.is_some(),
                ),
                ("json_rpc", def.json_rpc.is_some()),
                ("mcp", def.mcp.is_some()),
            ]
            .into_iter()
            .filter_map(|(name, set)| set.then_some(name))
            .collect();
            if !l7_only.is_empty() {
                return Err(self.invalid(
                    field("protocol"),
                    format!(
                        "is tcp, which takes no request fields; remove {}",
                        l7_only.join(", ")
                    ),
                ));
            }
        }

        self.credentials(at, &def)?;
        let kind = self.rules(at, &protocol, &def)?;
        Ok(Endpoint {
            host,
            ports,
            kind,
            audit,
            allowed_ips,
            path,
            allow_encoded_slash: def.allow_encoded_slash.unwrap_or(false),
        })
    }

    fn credentials(&mut self, at: &str, def: &EndpointDef) -> Result<(), PolicyError> {
        let field = |name: &str| format!("{at}.{name}");
        if let Some(signing) = &def.credential_signing {
            if !matches!(signing.as_str(), "sigv4" | "sigv4:body" | "sigv4:no_body") {
                return Err(self.invalid(
                    field("credential_signing"),
                    format!("is {signing:?}; accepted: sigv4, sigv4:body, sigv4:no_body"),
                ));
            }
            if def.signing_service.as_deref().unwrap_or("").is_empty() {
                return Err(self.invalid(
                    field("signing_service"),
                    "is required when credential_signing is set",
                ));
            }
            if def.request_body_credential_rewrite == Some(true) {
                return Err(self.invalid(
                    field("credential_signing"),
                    "and request_body_credential_rewrite are mutually exclusive",
                ));
            }
        }
        if let Some(binding) = &def.credential_binding {
            if binding.provider.is_empty() {
                return Err(self.invalid(field("credential_binding.provider"), "is empty"));
            }
        }
        for (name, set) in [
            (
                "websocket_credential_rewrite",
                def.websocket_credential_rewrite.is_some(),
            ),
            (
                "request_body_credential_rewrite",
                def.request_body_credential_rewrite.is_some(),
            ),
            (
                "allow_uninspected_credentials",
                def.allow_uninspected_credentials.is_some(),
            ),
            ("credential_signing", def.credential_signing.is_some()),
            ("signing_service", def.signing_service.is_some()),
            ("signing_region", def.signing_region.is_some()),
            ("credential_binding", def.credential_binding.is_some()),
        ] {
            if set {
                self.report(field(name), CREDENTIALS);
            }
        }
        Ok(())
    }

    /// The endpoint's protocol, access, rules and deny rules, with OpenShell's
    /// constraints on how they combine.
    fn rules(
        &mut self,
        at: &str,
        protocol: &str,
        def: &EndpointDef,
    ) -> Result<EndpointKind, PolicyError> {
        let field = |name: &str| format!("{at}.{name}");
        let access = match def.access.as_deref() {
            None => None,
            Some("read-only") => Some(Access::ReadOnly),
            Some("read-write") => Some(Access::ReadWrite),
            Some("full") => Some(Access::Full),
            Some(other) => {
                return Err(self.invalid(
                    field("access"),
                    format!("is {other:?}; accepted: read-only, read-write, full"),
                ))
            }
        };
        let rules = def.rules.as_deref();
        let deny_rules = def.deny_rules.as_deref();
        if rules.is_some_and(<[_]>::is_empty) {
            return Err(self.invalid(
                field("rules"),
                "is an empty list; use access: full or remove rules",
            ));
        }
        if deny_rules.is_some_and(<[_]>::is_empty) {
            return Err(self.invalid(field("deny_rules"), "is an empty list; remove it"));
        }
        if rules.map_or(0, <[_]>::len) + deny_rules.map_or(0, <[_]>::len) > MAX_RULES_PER_ENDPOINT {
            return Err(self.invalid(
                field("rules"),
                format!("rules and deny_rules together exceed {MAX_RULES_PER_ENDPOINT}"),
            ));
        }
        let (has_rules, has_deny) = (rules.is_some(), deny_rules.is_some());
        if has_rules && access.is_some() {
            return Err(self.invalid(field("access"), "and rules are mutually exclusive"));
        }
        if rules.is_some_and(|r| r.iter().all(|r| r.allow.is_none())) {
            return Err(self.invalid(
                field("rules"),
                "would deny all traffic (no item has an allow clause); use access: full or add \
                 allow clauses",
            ));
        }
        let mcp_allow_all = def
            .mcp
            .as_ref()
            .and_then(|m| m.allow_all_known_mcp_methods)
            .unwrap_or(false);
        if def.mcp.is_some() && protocol != "mcp" {
            return Err(self.invalid(field("mcp"), "is only valid with protocol mcp"));
        }
        match protocol {
            "" | "tcp" => {
                if access.is_some() || has_rules || has_deny {
                    let why = if protocol == "tcp" {
                        "protocol tcp takes no access, rules or deny_rules"
                    } else {
                        "access, rules and deny_rules need a protocol (rest); without one the \
                         endpoint is plain TCP"
                    };
                    return Err(self.invalid(field("protocol"), why));
                }
                if let Some(name) = [
                    ("persisted_queries", def.persisted_queries.is_some()),
                    (
                        "graphql_persisted_queries",
                        def.graphql_persisted_queries.is_some(),
                    ),
                    (
                        "graphql_max_body_bytes",
                        def.graphql_max_body_bytes.is_some(),
                    ),
                    ("json_rpc", def.json_rpc.is_some()),
                ]
                .into_iter()
                .find_map(|(n, set)| set.then_some(n))
                {
                    return Err(self.invalid(field(name), "needs an inspected protocol"));
                }
                Ok(EndpointKind::Tcp)
            }
            "rest" => {
                if !has_rules && access.is_none() {
                    return Err(self.invalid(
                        field("protocol"),
                        "rest needs rules or access to define the allowed requests",
                    ));
                }
                let allow = match access {
                    Some(a) => RestAllow::Access(a),
                    None => {
                        let mut clauses = Vec::new();
                        for (i, rule) in rules.unwrap_or_default().iter().enumerate() {
                            if let Some(m) = &rule.allow {
                                clauses.push(
                                    self.rest_match(&field(&format!("rules[{i}].allow")), m)?,
                                );
                            }
                        }
                        RestAllow::Rules(clauses)
                    }
                };
                let mut deny = Vec::new();
                for (i, m) in deny_rules.unwrap_or_default().iter().enumerate() {
                    deny.push(self.rest_match(&field(&format!("deny_rules[{i}]")), m)?);
                }
                Ok(EndpointKind::Rest { allow, deny })
            }
            other => {
                let jsonrpc_family = matches!(other, "mcp" | "json-rpc");
                if jsonrpc_family && access.is_some() {
                    return Err(self.invalid(
                        field("access"),
                        format!("is not valid with protocol {other}; use explicit rules"),
                    ));
                }
                if other == "json-rpc" && !has_rules {
                    return Err(self.invalid(
                        field("rules"),
                        "are required with protocol json-rpc (allow.method)",
                    ));
                }
                if other == "mcp" && !has_rules && !mcp_allow_all {
                    return Err(self.invalid(
                        field("rules"),
                        "are required with protocol mcp unless mcp.allow_all_known_mcp_methods is true",
                    ));
                }
                if !jsonrpc_family && !has_rules && access.is_none() {
                    return Err(self.invalid(
                        field("protocol"),
                        format!("{other} needs rules or access to define the allowed traffic"),
                    ));
                }
                if other == "sql" && def.enforcement.as_deref() == Some("enforce") {
                    return Err(self.invalid(
                        field("enforcement"),
                        "SQL enforcement needs full SQL parsing; use enforcement: audit",
                    ));
                }
                if let Some(pq) = &def.persisted_queries {
                    if !matches!(pq.as_str(), "deny" | "allow_registered") {
                        return Err(self.invalid(
                            field("persisted_queries"),
                            format!("is {pq:?}; accepted: deny, allow_registered"),
                        ));
                    }
                }
                for (key, op) in def.graphql_persisted_queries.iter().flat_map(|q| &q.0) {
                    if !matches!(
                        op.operation_type.as_str(),
                        "query" | "mutation" | "subscription"
                    ) {
                        return Err(self.invalid(
                            field(&format!("graphql_persisted_queries.{key}.operation_type")),
                            "accepted: query, mutation, subscription",
                        ));
                    }
                }
                let open = access == Some(Access::Full) && !has_deny;
                self.report(
                    field("protocol"),
                    if open {
                        "kiln does not inspect this protocol; with access: full it passes as plain TCP"
                    } else {
                        "kiln does not inspect this protocol; the endpoint's traffic is denied \
                         since its rules cannot be checked"
                    },
                );
                Ok(EndpointKind::Uninspected { open })
            }
        }
    }

    fn rest_match(&self, at: &str, m: &MatchDef) -> Result<RestMatch, PolicyError> {
        let others: Vec<&str> = [
            ("command", m.command.is_some()),
            ("operation_type", m.operation_type.is_some()),
            ("operation_name", m.operation_name.is_some()),
            ("fields", m.fields.is_some()),
            ("tool", m.tool.is_some()),
            ("params", m.params.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, set)| set.then_some(n))
        .collect();
        if !others.is_empty() {
            return Err(self.invalid(
                at,
                format!(
                    "{} do not apply to protocol rest; accepted: method, path, query",
                    others.join(", ")
                ),
            ));
        }
        let method = match m.method.as_deref() {
            None | Some("") => return Err(self.invalid(format!("{at}.method"), "is required")),
            Some("*") => "*".to_string(),
            Some(method) if method.bytes().all(crate::peek::is_token_byte) => {
                method.to_ascii_uppercase()
            }
            Some(method) => {
                return Err(self.invalid(
                    format!("{at}.method"),
                    format!("{method:?} is not an HTTP method; accepted: GET, POST, ... or *"),
                ))
            }
        };
        let path = match m.path.as_deref() {
            None | Some("") => return Err(self.invalid(format!("{at}.path"), "is required")),
            Some(p) if p.starts_with('/') || p.starts_with('*') => {
                Glob::new(p).map_err(|e| self.invalid(format!("{at}.path"), e))?
            }
            Some(p) => {
                return Err(self.invalid(
                    format!("{at}.path"),
                    format!("{p:?} must start with '/' or '**'"),
                ))
            }
        };
        let mut query = Vec::new();
        for (key, matcher) in m.query.iter().flat_map(|q| &q.0) {
            let at = format!("{at}.query.{key}");
            let globs = match matcher {
                QueryMatcherDef::Glob(g) => vec![g.as_str()],
                QueryMatcherDef::Any(any) if any.is_empty() => {
                    return Err(self.invalid(at, "any: is an empty list"))
                }
                QueryMatcherDef::Any(any) => any.iter().map(String::as_str).collect(),
            };
            let globs = globs
                .into_iter()
                .map(|g| Glob::new(g).map_err(|e| self.invalid(&at, e)))
                .collect::<Result<_, _>>()?;
            query.push((key.clone(), globs));
        }
        Ok(RestMatch {
            method,
            path,
            query,
        })
    }

    fn cidr(&self, at: &str, text: &str) -> Result<IpNet, PolicyError> {
        let net = text
            .parse::<IpNet>()
            .map(|n| n.trunc())
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                self.invalid(
                    at,
                    format!("{text:?} is not a CIDR (a.b.c.d/n, x::/n) or an IP address"),
                )
            })?;
        if let Some(r) = always_refused_overlap(net) {
            return Err(self.invalid(
                at,
                format!("{text} overlaps the {r}, which no policy can open; remove it"),
            ));
        }
        Ok(net)
    }
}

/// The always-refused range `net` overlaps, if any (a net overlaps a range when either
/// contains the other's first address).
fn always_refused_overlap(net: IpNet) -> Option<crate::ranges::RefusedRange> {
    let probe = |addr: IpAddr| refused_range(addr, &[]).filter(|r| r.kind.always_refused());
    if let Some(r) = probe(net.network()) {
        return Some(r);
    }
    crate::ranges::always_refused_nets()
        .into_iter()
        .find(|(_, range)| net.contains(&range.network()) || net.contains(range))
        .map(|(kind, range)| crate::ranges::RefusedRange {
            kind,
            range,
            embedded_in: None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Policy, PolicyError> {
        Policy::parse("policy.yaml", yaml)
    }

    /// A policy with one entry `e` holding one endpoint written as `endpoint` (YAML
    /// flow-mapping body, e.g. `host: a.example.com, port: 443`).
    fn one(endpoint: &str) -> Result<Policy, PolicyError> {
        parse(&format!(
            "version: 1\nnetwork_policies:\n  e:\n    endpoints:\n      - {{{endpoint}}}\n"
        ))
    }

    fn invalid(endpoint: &str) -> String {
        match one(endpoint) {
            Ok(_) => panic!("accepted: {endpoint}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_schema_reference_example_parses() {
        let p = parse(
            r#"
version: 1
filesystem_policy:
  include_workdir: true
  read_only: [/usr, /lib]
  read_write: [/sandbox, /tmp]
landlock:
  compatibility: best_effort
process:
  run_as_user: sandbox
  run_as_group: sandbox
network_policies:
  github_rest_api:
    name: github-rest-api
    endpoints:
      - host: api.github.com
        port: 443
        protocol: rest
        enforcement: enforce
        access: read-only
    binaries:
      - path: /usr/bin/gh
  npm_registry:
    name: npm-registry
    endpoints:
      - host: registry.npmjs.org
        port: 443
        protocol: rest
        access: read-only
        allow_encoded_slash: true
      - host: "*.npmjs.org"
        ports: [80, 443]
        rules:
          - allow:
              method: GET
              path: /**/info/refs*
              query:
                service: "git-*"
                tag: { any: ["v1.*", "v2.*"] }
        protocol: rest
        deny_rules:
          - method: POST
            path: "/repos/*/pulls/*/reviews"
  internal:
    endpoints:
      - allowed_ips: [10.0.5.0/24, "fd00::/8"]
        port: 5432
network_middlewares:
  redact:
    middleware: openshell/regex
    order: 10
    endpoints:
      include: ["*.example.com"]
"#,
        )
        .unwrap();
        assert_eq!(p.entries.len(), 3);
        assert!(p.digest().starts_with("sha256:") && p.digest().len() == 71);
        let fields: Vec<&str> = p.not_enforced().iter().map(|n| n.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "filesystem_policy",
                "landlock",
                "process",
                "network_middlewares",
                "network_policies.github_rest_api.binaries",
            ]
        );
        assert!(p.not_enforced()[4]
            .to_string()
            .starts_with("not enforced by kiln: network_policies.github_rest_api.binaries ("));
        assert_eq!(p.entries[0].name, "github-rest-api");
        assert_eq!(p.entries[1].key, "internal");
        assert_eq!(p.entries[1].name, "internal");
    }

    #[test]
    fn other_protocols_credentials_and_tls_are_reported_per_endpoint() {
        let p = parse(
            r#"
version: 1
network_policies:
  gql:
    endpoints:
      - host: api.github.com
        port: 443
        protocol: graphql
        access: read-only
        tls: skip
      - host: ws.example.com
        port: 443
        protocol: websocket
        access: full
        websocket_credential_rewrite: true
        credential_binding: { provider: github }
"#,
        )
        .unwrap();
        let reported: Vec<String> = p.not_enforced().iter().map(|n| n.to_string()).collect();
        let at = "network_policies.gql.endpoints";
        for want in [
            format!("{at}[0].tls"),
            format!("{at}[0].protocol (kiln does not inspect this protocol; the endpoint's traffic is denied"),
            format!("{at}[1].websocket_credential_rewrite"),
            format!("{at}[1].credential_binding"),
            format!("{at}[1].protocol (kiln does not inspect this protocol; with access: full"),
        ] {
            assert!(reported.iter().any(|r| r.contains(&want)), "{want} not in {reported:#?}");
        }
    }

    #[test]
    fn unknown_and_mistyped_fields_name_the_file_entry_and_field() {
        for (yaml, want) in [
            ("version: 1\nnetwork_policy: {}\n", "unknown field `network_policy`"),
            (
                "version: 1\nnetwork_policies:\n  gh:\n    endpoints:\n      - {hots: a.b.c, port: 1}\n",
                "network_policies.gh.endpoints[0]: unknown field `hots`",
            ),
            (
                "version: 1\nnetwork_policies:\n  gh:\n    endpoints:\n      - {host: a.b.c, port: 70000}\n",
                "network_policies.gh.endpoints[0].port",
            ),
            (
                "version: 1\nnetwork_policies:\n  gh:\n    endpoints:\n      - {host: a.b.c, port: 1, protocol: rest, rules: [{allow: {method: GET, path: /, colour: red}}]}\n",
                "unknown field `colour`",
            ),
            ("version: 1\nlandlock: {mode: x}\n", "landlock: unknown field `mode`"),
            ("version: [1\n", "policy.yaml: "),
            (
                "version: 1\nnetwork_policies:\n  gh:\n    endpoints: [{host: a.b.c, port: 1}]\n  gh:\n    endpoints: [{host: a.b.c, port: 2}]\n",
                "network_policies: duplicate entry `gh`",
            ),
            (
                "version: 1\nnetwork_policies:\n  gh:\n    endpoints: [{host: a.b.c, port: 1, protocol: rest, rules: [{allow: {method: GET, path: /, query: {a: 5}}}]}]\n",
                "allow.query.a: invalid type: integer `5`, expected a glob string or {any: [glob, ...]}",
            ),
            (
                "version: 1\nnetwork_policies:\n  gh:\n    endpoints: [{host: a.b.c, port: 1, protocol: rest, rules: [{allow: {method: GET, path: /, query: {a: {all: [x]}}}}]}]\n",
                "unknown field `all`, expected `any`",
            ),
            ("version: 1\nversion: 1\n", "duplicate field `version`"),
        ] {
            let e = parse(yaml).unwrap_err().to_string();
            assert!(e.starts_with("policy.yaml: "), "{e}");
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn version_must_be_1() {
        assert!(parse("network_policies: {}\n")
            .unwrap_err()
            .to_string()
            .contains("version is missing; accepted: 1"));
        assert!(parse("version: 2\n")
            .unwrap_err()
            .to_string()
            .contains("version is 2; accepted: 1"));
        assert!(parse("version: 1\n").unwrap().entries.is_empty());
    }

    #[test]
    fn the_size_is_bounded() {
        let big = format!("version: 1\n#{}\n", "x".repeat(MAX_POLICY_BYTES));
        assert!(matches!(parse(&big), Err(PolicyError::TooLarge { .. })));
    }

    #[test]
    fn every_endpoint_constraint_is_checked() {
        let at = "policy.yaml: network_policies.e.endpoints[0]";
        let cases = [
            ("port: 443", "host is missing"),
            ("host: '', port: 443", "host is missing"),
            ("host: '*', port: 443", "bare wildcard"),
            ("host: '**', port: 443", "bare wildcard"),
            ("host: '*.com', port: 443", "top-level-domain wildcard"),
            ("host: 'a.*.com', port: 443", "outside the first label"),
            ("host: 'a.b.com', port: 443, protocol: tcp, enforcement: audit", "remove enforcement"),
            ("host: '1.2.3.4', port: 443, protocol: tcp", "protocol tcp needs a DNS name"),
            ("allowed_ips: [1.2.3.0/24], port: 443, protocol: tcp", "required with protocol tcp"),
            ("host: '127.0.0.1', port: 80", "no policy can open"),
            ("host: a.b.com", "port is missing"),
            ("host: a.b.com, port: 0", "0 is not a port"),
            ("host: a.b.com, port: 1, ports: [2]", "mutually exclusive"),
            ("host: a.b.com, ports: []", "ports is empty"),
            ("host: a.b.com, port: 1, protocol: ftp", "accepted: tcp, rest"),
            ("host: a.b.com, port: 1, protocol: rest", "rest needs rules or access"),
            ("host: a.b.com, port: 1, protocol: rest, access: all", "accepted: read-only, read-write, full"),
            (
                "host: a.b.com, port: 1, protocol: rest, access: full, rules: [{allow: {method: GET, path: /}}]",
                "access and rules are mutually exclusive",
            ),
            ("host: a.b.com, port: 1, protocol: rest, rules: []", "rules is an empty list"),
            ("host: a.b.com, port: 1, protocol: rest, rules: [{}]", "would deny all traffic"),
            (
                "host: a.b.com, port: 1, protocol: rest, access: full, deny_rules: []",
                "deny_rules is an empty list",
            ),
            (
                "host: a.b.com, port: 1, deny_rules: [{method: GET, path: /}]",
                "need a protocol (rest)",
            ),
            ("host: a.b.com, port: 1, access: read-only", "need a protocol (rest)"),
            (
                "host: a.b.com, port: 1, protocol: tcp, access: full",
                "protocol tcp takes no access",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {path: /}}]",
                "rules[0].allow.method is required",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: GET}}]",
                "rules[0].allow.path is required",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: GET, path: api}}]",
                "must start with '/'",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: 'GE T', path: /}}]",
                "is not an HTTP method",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: GET, path: '/[a'}}]",
                "unclosed [",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: GET, path: /, operation_type: query}}]",
                "operation_type do not apply to protocol rest",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: GET, path: /, query: {a: {any: []}}}}]",
                "query.a any: is an empty list",
            ),
            ("host: a.b.com, port: 1, allowed_ips: [127.0.0.0/8]", "loopback range"),
            ("host: a.b.com, port: 1, allowed_ips: [169.254.169.254]", "link-local"),
            ("host: a.b.com, port: 1, allowed_ips: [0.0.0.0/0]", "no policy can open"),
            ("host: a.b.com, port: 1, allowed_ips: ['::/0']", "no policy can open"),
            ("host: a.b.com, port: 1, allowed_ips: ['::ffff:127.0.0.1']", "loopback"),
            ("host: a.b.com, port: 1, allowed_ips: [10.0.0.0/33]", "is not a CIDR"),
            ("host: a.b.com, port: 1, allowed_ips: []", "allowed_ips is empty"),
            ("host: a.b.com, port: 1, enforcement: block", "accepted: enforce, audit"),
            ("host: a.b.com, port: 1, tls: yes", "accepted: skip"),
            ("host: a.b.com, port: 1, path: api", "must start with '/' or be '**'"),
            ("host: a.b.com, port: 1, protocol: mcp, access: full", "not valid with protocol mcp"),
            ("host: a.b.com, port: 1, protocol: json-rpc", "required with protocol json-rpc"),
            ("host: a.b.com, port: 1, protocol: mcp", "required with protocol mcp"),
            ("host: a.b.com, port: 1, protocol: graphql", "graphql needs rules or access"),
            ("host: a.b.com, port: 1, protocol: sql, access: full, enforcement: enforce", "use enforcement: audit"),
            ("host: a.b.com, port: 1, mcp: {strict_tool_names: true}", "only valid with protocol mcp"),
            ("host: a.b.com, port: 1, credential_signing: sigv5", "accepted: sigv4"),
            ("host: a.b.com, port: 1, credential_signing: sigv4", "signing_service is required"),
            (
                "host: a.b.com, port: 1, credential_signing: sigv4, signing_service: s3, request_body_credential_rewrite: true",
                "mutually exclusive",
            ),
            ("host: a.b.com, port: 1, protocol: graphql, access: full, persisted_queries: maybe", "accepted: deny, allow_registered"),
            (
                "host: a.b.com, port: 1, graphql_max_body_bytes: 5",
                "graphql_max_body_bytes needs an inspected protocol",
            ),
            (
                "host: a.b.com, port: 1, credential_binding: {provider: ''}",
                "credential_binding.provider is empty",
            ),
            (
                "host: a.b.com, port: 1, protocol: graphql, access: full, graphql_persisted_queries: {h: {operation_type: delete}}",
                "graphql_persisted_queries.h.operation_type accepted: query",
            ),
            (
                "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: GET, path: /, query: {a: '[z-a]'}}}]",
                "rules[0].allow.query.a reversed range",
            ),
            ("host: a.b.com, port: 1, path: '/[a'", "path unclosed ["),
        ];
        for (endpoint, want) in cases {
            let e = invalid(endpoint);
            assert!(e.starts_with(at), "{endpoint}: {e}");
            assert!(e.contains(want), "{endpoint}: want {want:?} in {e}");
        }
    }

    #[test]
    fn entry_level_constraints() {
        let e = parse("version: 1\nnetwork_policies:\n  x:\n    name: y\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network_policies.x.endpoints is missing or empty"),
            "{e}"
        );
        let e = parse("version: 1\nnetwork_policies:\n  x:\n    endpoints: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing or empty"), "{e}");
        let e = parse("version: 1\nnetwork_policies:\n  x:\n    endpoints: [{host: a.b.c, port: 1}]\n    binaries: [{path: ''}]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("network_policies.x.binaries has an empty path"),
            "{e}"
        );
        let e = parse("version: 1\nfilesystem_policy: {read_only: [usr]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not absolute"), "{e}");
    }

    #[test]
    fn top_level_and_size_constraints() {
        let e = parse("version: 1\nlandlock: {compatibility: strict}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("landlock.compatibility is \"strict\"; accepted: best_effort"),
            "{e}"
        );
        let e = parse(
            "version: 1\nnetwork_middlewares:\n  m: {middleware: x, endpoints: {include: []}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "network_middlewares.m needs a middleware name and a non-empty endpoints.include"
            ),
            "{e}"
        );
        let e = parse(
            "version: 1\nnetwork_policies:\n  '':\n    endpoints: [{host: a.b.c, port: 1}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("network_policies has an entry with an empty key"),
            "{e}"
        );
        let endpoints = "{host: a.b.c, port: 1},".repeat(MAX_ENDPOINTS + 1);
        let e = parse(&format!(
            "version: 1\nnetwork_policies:\n  a:\n    endpoints: [{endpoints}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("more than {MAX_ENDPOINTS} endpoints")),
            "{e}"
        );
        let rules = "{allow: {method: GET, path: /}},".repeat(MAX_RULES_PER_ENDPOINT + 1);
        let e = one(&format!(
            "host: a.b.c, port: 1, protocol: rest, rules: [{rules}]"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&format!("exceed {MAX_RULES_PER_ENDPOINT}")),
            "{e}"
        );
    }

    #[test]
    fn accepted_endpoint_shapes() {
        for endpoint in [
            "host: a.b.com, port: 1",
            "host: A.B.COM, port: 1, protocol: TCP",
            "host: '*.b.com', ports: [1, 2]",
            "host: '**.b.com', port: 1",
            "host: '*-ai.b.com', port: 1",
            "host: 198.18.0.5, port: 1",
            "host: '2001:db8::1', port: 1",
            "allowed_ips: [10.0.0.0/8], port: 1",
            "host: a.b.com, port: 1, protocol: rest, access: read-write, enforcement: audit",
            "host: a.b.com, port: 1, protocol: rest, access: full, deny_rules: [{method: '*', path: /admin/**}]",
            "host: a.b.com, port: 1, protocol: rest, rules: [{allow: {method: get, path: '**'}}]",
            "host: a.b.com, port: 1, protocol: mcp, mcp: {allow_all_known_mcp_methods: true}",
            "host: a.b.com, port: 1, protocol: json-rpc, rules: [{allow: {method: '*'}}]",
        ] {
            one(endpoint).unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        }
    }

    #[test]
    fn the_digest_follows_the_text() {
        let a = parse("version: 1\n").unwrap();
        let b = parse("version: 1\n# changed\n").unwrap();
        assert_ne!(a.digest(), b.digest());
        assert_eq!(a.digest(), parse("version: 1\n").unwrap().digest());
        assert_eq!(b.source(), "version: 1\n# changed\n");
    }
}
