//! Endpoint hosts: exact names, or a `*` wildcard inside the first label (OpenShell's
//! label rules), and the normal form of a name a flow carries.

use crate::glob::Glob;

/// Longest DNS name (RFC 1035), without the root dot.
pub(crate) const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A validated `host` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPattern {
    first: FirstLabel,
    /// The labels after the first, lowercase, matched exactly.
    rest: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FirstLabel {
    Exact(String),
    /// A label with `*` in it: `*`, `api-*`, `*-aiplatform`.
    Glob(Glob),
    /// `**`: one or more whole labels.
    Labels,
}

impl HostPattern {
    /// Validates `host` (not an IP literal: the caller checks that first).
    pub(crate) fn new(host: &str) -> Result<HostPattern, String> {
        if host.is_empty() {
            return Err("is empty".into());
        }
        if host.len() > MAX_NAME_LEN {
            return Err(format!("is longer than {MAX_NAME_LEN} characters"));
        }
        if host.ends_with('.') {
            return Err("ends with a dot; omit the DNS root dot".into());
        }
        if host == "*" || host == "**" {
            return Err("a bare wildcard would allow every host; name a domain".into());
        }
        let source = host.to_ascii_lowercase();
        let labels: Vec<&str> = source.split('.').collect();
        for label in &labels {
            if label.is_empty() {
                return Err("has an empty label".into());
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(format!(
                    "has a label longer than {MAX_LABEL_LEN} characters"
                ));
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '*')))
            {
                return Err(format!(
                    "contains {c:?}; accepted: letters, digits, '-', '_' and a '*' wildcard"
                ));
            }
        }
        let (first, rest) = (labels[0], &labels[1..]);
        if rest.iter().any(|l| l.contains('*')) {
            return Err("has a wildcard outside the first label".into());
        }
        let first = if first == "**" {
            FirstLabel::Labels
        } else if first.contains("**") {
            return Err("'**' must be the whole first label".into());
        } else if first.contains('*') {
            FirstLabel::Glob(Glob::new(first)?)
        } else {
            FirstLabel::Exact(first.to_string())
        };
        // `*.com` / `**.com` would cover a whole top-level domain.
        let whole_label = matches!(first, FirstLabel::Labels)
            || matches!(&first, FirstLabel::Glob(g) if g.source() == "*");
        if whole_label && rest.len() < 2 {
            return Err("is a top-level-domain wildcard; use e.g. '*.example.com'".into());
        }
        Ok(HostPattern {
            rest: rest.iter().map(|l| l.to_string()).collect(),
            first,
        })
    }

    pub(crate) fn is_wildcard(&self) -> bool {
        !matches!(self.first, FirstLabel::Exact(_))
    }

    /// Whether `name` (already normalized by [`normalize_name`]) matches.
    pub(crate) fn matches(&self, name: &str) -> bool {
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() <= self.rest.len() {
            return false;
        }
        let split = labels.len() - self.rest.len();
        if labels[split..].iter().zip(&self.rest).any(|(a, b)| a != b) {
            return false;
        }
        let head = &labels[..split];
        match &self.first {
            FirstLabel::Labels => true,
            FirstLabel::Exact(l) => head.len() == 1 && head[0] == l,
            FirstLabel::Glob(g) => head.len() == 1 && g.matches(head[0]),
        }
    }
}

/// The normal form of a name a flow carries (SNI, Host, a DNS question): lowercase,
/// without a trailing root dot. `None` for something that is not a DNS name.
pub(crate) fn normalize_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= MAX_LABEL_LEN
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::new(s).unwrap()
    }

    #[test]
    fn exact_hosts_match_case_insensitively_and_only_themselves() {
        let h = p("API.GitHub.com");
        assert!(h.matches("api.github.com"));
        assert!(!h.matches("x.api.github.com"));
        assert!(!h.matches("github.com"));
        assert!(!h.is_wildcard());
    }

    #[test]
    fn one_star_is_one_label_two_stars_are_one_or_more() {
        let one = p("*.example.com");
        assert!(one.matches("a.example.com"));
        assert!(!one.matches("a.b.example.com"));
        assert!(!one.matches("example.com"));
        let many = p("**.example.com");
        assert!(many.matches("a.example.com"));
        assert!(many.matches("a.b.example.com"));
        assert!(!many.matches("example.com"));
        let intra = p("*-aiplatform.googleapis.com");
        assert!(intra.matches("us-central1-aiplatform.googleapis.com"));
        assert!(!intra.matches("aiplatform.googleapis.com"));
        assert!(!intra.matches("a.b-aiplatform.googleapis.com"));
        assert!(intra.is_wildcard());
    }

    #[test]
    fn openshell_label_rules_are_enforced() {
        for (host, reason) in [
            ("*", "bare wildcard"),
            ("**", "bare wildcard"),
            ("*.com", "top-level-domain"),
            ("**.com", "top-level-domain"),
            ("api.*.com", "outside the first label"),
            ("api.example.*", "outside the first label"),
            ("a**.example.com", "whole first label"),
            ("a..com", "empty label"),
            ("example.com.", "root dot"),
            ("exa mple.com", "contains ' '"),
            ("ex?mple.com", "contains '?'"),
            ("", "empty"),
        ] {
            let e = HostPattern::new(host).unwrap_err();
            assert!(e.contains(reason), "{host}: {e}");
        }
        assert!(HostPattern::new(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(HostPattern::new("a.".repeat(128).trim_end_matches('.')).is_err());
    }

    #[test]
    fn names_normalize() {
        assert_eq!(
            normalize_name("Api.Example.COM."),
            Some("api.example.com".into())
        );
        assert_eq!(normalize_name("a..b"), None);
        assert_eq!(normalize_name("a b"), None);
        assert_eq!(normalize_name(""), None);
        assert_eq!(normalize_name("."), None);
    }
}
