//! The decision record: one JSON line per decision, the same shape on the VM path and
//! in the Kubernetes sidecar.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::check::{dns_type_name, DnsDecision};
use crate::decision::{Decision, Verdict};

/// What the flow was when it was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowProtocol {
    /// A TCP connection before its first bytes were seen, or one that is neither TLS
    /// nor HTTP.
    Tcp,
    /// A TCP connection that opened with a TLS ClientHello.
    Tls,
    /// A plain HTTP/1.x connection, or one request on it.
    Http,
    /// A DNS query to kiln's resolver.
    Dns,
    /// A UDP datagram flow other than DNS.
    Udp,
}

/// One decision, as logged. `time` is RFC 3339 UTC (see [`rfc3339_utc`]); fields that
/// were not seen are left out of the JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub time: String,
    pub sandbox: String,
    pub protocol: FlowProtocol,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    /// Names kiln's resolver gave this address (pinned names), or the DNS query name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// DNS only: the query type (`A`, `AAAA`, `TXT`, or `TYPE<n>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_type: Option<String>,
    /// DNS only: the addresses answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<IpAddr>,
    pub decision: Verdict,
    /// The policy entry or explicit allow that let the flow through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<String>,
    /// Why it was denied (for `audit`, why enforcement would have denied it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Set on the record written when the flow ends: bytes guest → internet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    /// Set on the record written when the flow ends: bytes internet → guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
}

impl DecisionRecord {
    /// A record of `decision` with the flow fields empty; the caller sets what it saw.
    /// Returns `None` for [`Decision::NeedPeek`], which is not logged.
    pub fn new(
        time: String,
        sandbox: &str,
        protocol: FlowProtocol,
        dst: std::net::SocketAddr,
        decision: &Decision,
    ) -> Option<Self> {
        let (entry, reason) = match decision {
            Decision::Allow(allowed) => (Some(allowed.to_string()), None),
            Decision::Deny(reason) => (None, Some(reason.to_string())),
            Decision::Audit { entry, would_deny } => {
                (Some(entry.to_string()), Some(would_deny.to_string()))
            }
            Decision::NeedPeek => return None,
        };
        Some(DecisionRecord {
            time,
            sandbox: sandbox.to_string(),
            protocol,
            dst_addr: dst.ip(),
            dst_port: dst.port(),
            names: Vec::new(),
            sni: None,
            host: None,
            method: None,
            path: None,
            query_type: None,
            answers: Vec::new(),
            decision: decision.verdict()?,
            entry,
            reason,
            bytes_up: None,
            bytes_down: None,
        })
    }

    /// The record of a DNS query for `name` of type `qtype` to the resolver at
    /// `resolver`; the caller adds the `answers` it gave.
    pub fn dns(
        time: String,
        sandbox: &str,
        resolver: std::net::SocketAddr,
        name: &str,
        qtype: u16,
        decision: &DnsDecision,
    ) -> Self {
        DecisionRecord {
            time,
            sandbox: sandbox.to_string(),
            protocol: FlowProtocol::Dns,
            dst_addr: resolver.ip(),
            dst_port: resolver.port(),
            names: vec![name.to_string()],
            sni: None,
            host: None,
            method: None,
            path: None,
            query_type: Some(dns_type_name(qtype)),
            answers: Vec::new(),
            decision: decision.verdict(),
            entry: None,
            reason: decision.reason().map(str::to_string),
            bytes_up: None,
            bytes_down: None,
        }
    }

    /// The record as one JSON line (no trailing newline).
    pub fn to_json_line(&self) -> String {
        // Serializing plain strings, numbers and addresses cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `unix_millis` (milliseconds since 1970-01-01 UTC) as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_utc(unix_millis: u64) -> String {
    let secs = unix_millis / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_millis % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::{Allowed, DenyReason};

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_utc(1_796_443_879_456), "2026-12-05T04:11:19.456Z");
    }

    #[test]
    fn a_denial_serializes_with_its_reason_and_without_unseen_fields() {
        let dst = "10.0.2.2:5432".parse().unwrap();
        let mut record = DecisionRecord::new(
            rfc3339_utc(0),
            "sbx",
            FlowProtocol::Tcp,
            dst,
            &Decision::Deny(DenyReason::HostGateway { port: 5432 }),
        )
        .unwrap();
        record.names = vec!["host.kiln.internal".into()];
        let line = record.to_json_line();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["decision"], "deny");
        assert_eq!(value["dst_addr"], "10.0.2.2");
        assert_eq!(value["dst_port"], 5432);
        assert_eq!(value["protocol"], "tcp");
        assert!(value["reason"]
            .as_str()
            .unwrap()
            .contains("host.kiln.internal:5432"));
        assert!(value.get("sni").is_none() && value.get("bytes_up").is_none());
        let back: DecisionRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back, record);
    }

    #[test]
    fn dns_records_carry_the_name_type_and_reason() {
        let refused = DnsDecision::Refused {
            reason: "TXT query for x.test, which no policy entry names".into(),
        };
        let r = DecisionRecord::dns(
            rfc3339_utc(0),
            "s",
            "10.0.2.3:53".parse().unwrap(),
            "x.test",
            16,
            &refused,
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
        assert_eq!(v["protocol"], "dns");
        assert_eq!(v["query_type"], "TXT");
        assert_eq!(v["names"][0], "x.test");
        assert_eq!(v["decision"], "deny");
        assert!(v["reason"].as_str().unwrap().contains("no policy entry"));
        let ok = DecisionRecord::dns(
            rfc3339_utc(0),
            "s",
            "10.0.2.3:53".parse().unwrap(),
            "a.test",
            1,
            &DnsDecision::Resolve,
        );
        assert_eq!(
            (ok.decision, ok.query_type.as_deref(), ok.reason),
            (Verdict::Allow, Some("A"), None)
        );
        assert_eq!(dns_type_name(4242), "TYPE4242");
    }

    #[test]
    fn need_peek_is_not_logged_and_allows_name_what_allowed() {
        let dst = "198.18.0.5:443".parse().unwrap();
        assert!(DecisionRecord::new(
            String::new(),
            "s",
            FlowProtocol::Tls,
            dst,
            &Decision::NeedPeek
        )
        .is_none());
        let r = DecisionRecord::new(
            String::new(),
            "s",
            FlowProtocol::Tls,
            dst,
            &Decision::Allow(Allowed::Internet),
        )
        .unwrap();
        assert_eq!(r.entry.as_deref(), Some("default: public internet"));
        assert_eq!(r.reason, None);
    }
}
