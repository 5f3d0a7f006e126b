//! What the first bytes of a flow show: the SNI of a TLS ClientHello, the head of an
//! HTTP/1.x request. The bytes come from the sandbox and are hostile: every length is
//! checked, nothing is read past [`MAX_PEEK_BYTES`], and anything ambiguous (two Host
//! headers, both Content-Length and Transfer-Encoding, ...) is malformed, because the
//! server behind might read it differently than kiln did.

use crate::check::FirstBytes;

/// The most bytes either parser looks at; a flow that has not shown what it is by then
/// is malformed.
pub const MAX_PEEK_BYTES: usize = 16 * 1024;

/// What the start of a TLS flow shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPeek {
    /// The bytes so far are a valid start; more are needed.
    NeedMore,
    /// Not a TLS handshake.
    NotTls,
    /// A TLS handshake kiln cannot read (broken lengths, too large, a bad SNI).
    Malformed(String),
    /// A ClientHello, with its server name (lowercase) if it carries one.
    ClientHello { sni: Option<String> },
}

/// What the start of a plain HTTP flow shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpPeek {
    /// The bytes so far are a valid start of a request head; more are needed.
    NeedMore,
    /// Not HTTP/1.x.
    NotHttp,
    /// An HTTP/1.x request head kiln will not forward, and why.
    Malformed(String),
    Request(RequestHead),
}

/// One parsed HTTP/1.x request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path as sent (still percent-encoded), `*` for `OPTIONS *`.
    pub path: String,
    /// The query as sent, without `?`.
    pub query: Option<String>,
    /// The Host header, or the authority of an absolute-form target.
    pub host: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// How the body that follows the head is delimited.
    pub body: BodyFraming,
    /// Whether the request asks to switch protocols (`Upgrade`), after which the
    /// connection no longer carries HTTP/1.x requests.
    pub upgrade: bool,
    /// Length of the head in bytes, the blank line included: the body starts there.
    pub head_len: usize,
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    ContentLength(u64),
    Chunked,
}

/// What the first bytes of a flow are, trying both parsers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// Both parsers need more bytes (the caller waits, up to its own deadline).
    NeedMore,
    Tls(TlsPeek),
    Http(HttpPeek),
    /// Neither TLS nor HTTP/1.x.
    Other,
}

/// Runs both parsers on the start of a flow.
pub fn peek(bytes: &[u8]) -> Peeked {
    let tls = tls_client_hello(bytes);
    if matches!(tls, TlsPeek::ClientHello { .. } | TlsPeek::Malformed(_)) {
        return Peeked::Tls(tls);
    }
    let http = http_request_head(bytes);
    if matches!(http, HttpPeek::Request(_) | HttpPeek::Malformed(_)) {
        return Peeked::Http(http);
    }
    if tls == TlsPeek::NeedMore || http == HttpPeek::NeedMore {
        Peeked::NeedMore
    } else {
        Peeked::Other
    }
}

impl Peeked {
    /// The decision's view of it. A malformed ClientHello or request head shows no
    /// name: the flow counts as neither TLS nor HTTP, so only plain-TCP endpoints can
    /// take it (and the caller answers a malformed HTTP request with an error itself).
    pub fn first_bytes(&self) -> FirstBytes<'_> {
        match self {
            Peeked::NeedMore => FirstBytes::NotSeen,
            Peeked::Tls(TlsPeek::ClientHello { sni }) => FirstBytes::Tls {
                sni: sni.as_deref(),
            },
            Peeked::Http(HttpPeek::Request(head)) => FirstBytes::Http {
                host: head.host.as_deref(),
            },
            Peeked::Tls(_) | Peeked::Http(_) | Peeked::Other => FirstBytes::Other,
        }
    }
}

const TLS_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME: u16 = 0;
const TLS_RECORD_MAX: usize = 16 * 1024;

/// Reads the SNI from the ClientHello at the start of `bytes` (possibly spread over
/// several handshake records).
pub fn tls_client_hello(bytes: &[u8]) -> TlsPeek {
    let bytes = &bytes[..bytes.len().min(MAX_PEEK_BYTES)];
    // The record header: handshake, version 3.x.
    match bytes {
        [] => return TlsPeek::NeedMore,
        [t, ..] if *t != TLS_HANDSHAKE => return TlsPeek::NotTls,
        [_, major, ..] if *major != 3 => return TlsPeek::NotTls,
        [_, _, minor, ..] if *minor > 4 => return TlsPeek::NotTls,
        _ => {}
    }
    // Gather the handshake bytes from consecutive records until the message is whole.
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = bytes.get(at..at + 5) else {
            return need_more_or_too_large(bytes);
        };
        if header[0] != TLS_HANDSHAKE || header[1] != 3 {
            return TlsPeek::Malformed("a non-handshake record inside the ClientHello".into());
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > TLS_RECORD_MAX {
            return TlsPeek::Malformed(format!("a handshake record of {len} bytes"));
        }
        // What has arrived of this record: the message header is checked as soon as
        // it is there, so an oversized ClientHello is refused without waiting for it.
        let body = &bytes[at + 5..bytes.len().min(at + 5 + len)];
        handshake.extend_from_slice(body);
        if handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return TlsPeek::Malformed(
                    "the first handshake message is not a ClientHello".into(),
                );
            }
            let msg_len =
                u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if msg_len + 4 > MAX_PEEK_BYTES {
                return TlsPeek::Malformed(format!("a ClientHello of {msg_len} bytes"));
            }
            if handshake.len() >= msg_len + 4 {
                return client_hello_sni(&handshake[4..4 + msg_len]);
            }
        }
        if body.len() < len {
            return need_more_or_too_large(bytes);
        }
        at += 5 + len;
    }
}

fn need_more_or_too_large(bytes: &[u8]) -> TlsPeek {
    if bytes.len() >= MAX_PEEK_BYTES {
        TlsPeek::Malformed(format!("no whole ClientHello in {MAX_PEEK_BYTES} bytes"))
    } else {
        TlsPeek::NeedMore
    }
}

/// A cursor over a length-checked byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.bytes.get(..n)?, self.bytes.get(n..)?);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 1- or 2-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

fn client_hello_sni(body: &[u8]) -> TlsPeek {
    let broken = |what: &str| TlsPeek::Malformed(format!("ClientHello: {what}"));
    let mut r = Reader { bytes: body };
    // legacy_version, random, session id, cipher suites, compression methods.
    if r.take(2 + 32).is_none() || r.vec8().is_none() {
        return broken("truncated before the cipher suites");
    }
    if r.vec16().is_none() || r.vec8().is_none() {
        return broken("truncated cipher suites or compression methods");
    }
    if r.bytes.is_empty() {
        return TlsPeek::ClientHello { sni: None };
    }
    let Some(extensions) = r.vec16() else {
        return broken("truncated extensions");
    };
    let mut ext = Reader { bytes: extensions };
    let mut sni = None;
    while !ext.bytes.is_empty() {
        let (Some(kind), Some(data)) = (ext.u16(), ext.vec16()) else {
            return broken("a truncated extension");
        };
        if kind != SERVER_NAME {
            continue;
        }
        if sni.is_some() {
            return broken("two server_name extensions");
        }
        let mut list = Reader { bytes: data };
        let Some(names) = list.vec16().filter(|_| list.bytes.is_empty()) else {
            return broken("a broken server_name list");
        };
        let mut names = Reader { bytes: names };
        while !names.bytes.is_empty() {
            let (Some(name_type), Some(name)) = (names.u8(), names.vec16()) else {
                return broken("a truncated server name");
            };
            // Only host_name (0) is defined; RFC 6066 allows one name of each type.
            if name_type != 0 {
                continue;
            }
            if sni.is_some() {
                return broken("two host names");
            }
            match std::str::from_utf8(name)
                .ok()
                .and_then(crate::host::normalize_name)
            {
                Some(n) => sni = Some(n),
                None => return broken("a server name that is not a DNS name"),
            }
        }
    }
    TlsPeek::ClientHello { sni }
}

const MAX_METHOD_LEN: usize = 32;

/// Parses the HTTP/1.x request head at the start of `bytes`.
pub fn http_request_head(bytes: &[u8]) -> HttpPeek {
    let bytes = &bytes[..bytes.len().min(MAX_PEEK_BYTES)];
    // Decide "is this HTTP" from the method alone, so a short read is not misjudged.
    let method_len = bytes.iter().take_while(|b| is_token_byte(**b)).count();
    match bytes.get(method_len) {
        None if method_len <= MAX_METHOD_LEN => return HttpPeek::NeedMore,
        Some(b' ') if (1..=MAX_METHOD_LEN).contains(&method_len) => {}
        _ => return HttpPeek::NotHttp,
    }
    let Some(end) = find(bytes, b"\r\n\r\n") else {
        return if bytes.len() >= MAX_PEEK_BYTES {
            HttpPeek::Malformed(format!(
                "no end of the request head in {MAX_PEEK_BYTES} bytes"
            ))
        } else {
            HttpPeek::NeedMore
        };
    };
    let Ok(head) = std::str::from_utf8(&bytes[..end]) else {
        return HttpPeek::Malformed("the request head is not UTF-8".into());
    };
    match parse_head(head) {
        Ok(mut request) => {
            request.head_len = end + 4;
            HttpPeek::Request(request)
        }
        Err(reason) => HttpPeek::Malformed(reason),
    }
}

fn parse_head(head: &str) -> Result<RequestHead, String> {
    if head.split("\r\n").any(|l| l.contains(['\n', '\r'])) {
        return Err("a bare CR or LF in the request head".into());
    }
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "request line {request_line:?} is not METHOD TARGET VERSION"
        ));
    };
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(format!("version {version:?}; accepted: HTTP/1.0, HTTP/1.1")),
    };
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("an empty target or one with control characters".into());
    }
    let (authority, path_and_query) = split_target(method, target)?;
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (path_and_query.as_str(), None),
    };
    let path = path.split('#').next().unwrap_or_default().to_string();

    let mut host = None;
    let mut content_length = None;
    let mut chunked = false;
    let mut upgrade = false;
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err("a folded header line (obs-fold)".into());
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("header line {line:?} has no ':'"));
        };
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(format!("header name {name:?} is not a token"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err(format!("header {name} has control characters"));
        }
        match name.to_ascii_lowercase().as_str() {
            "host" if host.is_some() => return Err("two Host headers".into()),
            "host" => host = Some(value.to_string()),
            "content-length" => {
                let n = parse_content_length(value)?;
                if content_length.is_some_and(|old| old != n) {
                    return Err("Content-Length headers that disagree".into());
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                if chunked || !value.eq_ignore_ascii_case("chunked") {
                    return Err(format!(
                        "Transfer-Encoding {value:?}; accepted: one header saying chunked"
                    ));
                }
                chunked = true;
            }
            "upgrade" => upgrade = true,
            _ => {}
        }
    }
    if minor_version == 1 && host.is_none() && authority.is_none() {
        return Err("an HTTP/1.1 request without Host".into());
    }
    let host = match (authority, host) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(&h) => {
            return Err(format!("the target names {a} but Host says {h}"))
        }
        (Some(a), _) => Some(a),
        (None, h) => h,
    };
    if host.as_deref().is_some_and(str::is_empty) {
        return Err("an empty Host".into());
    }
    let body = match (content_length, chunked) {
        (Some(_), true) => return Err("both Content-Length and Transfer-Encoding".into()),
        (Some(0) | None, false) => BodyFraming::None,
        (Some(n), false) => BodyFraming::ContentLength(n),
        (None, true) => BodyFraming::Chunked,
    };
    Ok(RequestHead {
        method: method.to_string(),
        path,
        query,
        host,
        minor_version,
        body,
        upgrade,
        head_len: 0,
    })
}

/// The authority (for absolute-form targets) and the path-and-query of a target.
fn split_target(method: &str, target: &str) -> Result<(Option<String>, String), String> {
    if target.starts_with('/') || (target == "*" && method == "OPTIONS") {
        return Ok((None, target.to_string()));
    }
    let scheme = target
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"));
    let Some(rest) = scheme.map(|_| &target[7..]) else {
        return Err(format!(
            "target {target:?}; accepted: /path, * (OPTIONS) or http://host/path"
        ));
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(end);
    // An absolute target without a path means "/" (RFC 9112, 3.2.1).
    let path_and_query = if path_and_query.starts_with('/') {
        path_and_query.to_string()
    } else {
        format!("/{path_and_query}")
    };
    Ok((Some(authority_of(authority)?), path_and_query))
}

fn authority_of(authority: &str) -> Result<String, String> {
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("authority {authority:?}; accepted: host[:port]"));
    }
    Ok(authority.to_string())
}

fn parse_content_length(value: &str) -> Result<u64, String> {
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("Content-Length {value:?} is not a decimal length"));
    }
    value
        .parse()
        .map_err(|_| format!("Content-Length {value:?} is out of range"))
}

/// RFC 9110 token characters.
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A ClientHello record carrying `sni` (and a few other extensions), as a TLS 1.3
    /// client sends it; `records` splits the handshake over that many records.
    pub(crate) fn client_hello(sni: Option<&str>, records: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        // supported_versions, then server_name, then a padding extension.
        ext.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
        if let Some(name) = sni {
            let n = name.len() as u16;
            ext.extend_from_slice(&0u16.to_be_bytes());
            ext.extend_from_slice(&(n + 5).to_be_bytes());
            ext.extend_from_slice(&(n + 3).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&n.to_be_bytes());
            ext.extend_from_slice(name.as_bytes());
        }
        ext.extend_from_slice(&[0, 21, 0, 4, 0, 0, 0, 0]);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(32);
        body.extend_from_slice(&[9; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut handshake = vec![CLIENT_HELLO];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let chunk = handshake.len().div_ceil(records);
        let mut out = Vec::new();
        for part in handshake.chunks(chunk) {
            out.extend_from_slice(&[TLS_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn the_sni_is_read_from_one_or_several_records() {
        for records in [1, 2, 5] {
            let hello = client_hello(Some("API.Example.com"), records);
            assert_eq!(
                tls_client_hello(&hello),
                TlsPeek::ClientHello {
                    sni: Some("api.example.com".into())
                },
                "{records} records"
            );
            // With application data already behind it.
            let mut more = hello.clone();
            more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
            assert!(matches!(
                tls_client_hello(&more),
                TlsPeek::ClientHello { .. }
            ));
        }
        assert_eq!(
            tls_client_hello(&client_hello(None, 1)),
            TlsPeek::ClientHello { sni: None }
        );
    }

    proptest::proptest! {
        #[test]
        fn the_sni_survives_any_record_split(
            name in "[a-z0-9]{1,20}(\\.[a-z0-9-]{1,20}){0,4}",
            records in 1usize..12,
        ) {
            let hello = client_hello(Some(&name), records);
            proptest::prop_assert_eq!(
                tls_client_hello(&hello),
                TlsPeek::ClientHello { sni: Some(name.clone()) }
            );
        }

        #[test]
        fn arbitrary_bytes_after_a_handshake_header_never_panic(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        ) {
            let mut bytes = vec![TLS_HANDSHAKE, 3, 1, 2, 0, CLIENT_HELLO, 0, 1, 0xfc];
            bytes.extend_from_slice(&tail);
            let _ = tls_client_hello(&bytes);
        }
    }

    #[test]
    fn every_prefix_of_a_client_hello_needs_more() {
        let hello = client_hello(Some("a.example.com"), 3);
        for n in 0..hello.len() {
            assert_eq!(
                tls_client_hello(&hello[..n]),
                TlsPeek::NeedMore,
                "{n} bytes"
            );
        }
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"SSH-2.0-x",
            &[22, 2, 0],
            &[22, 3, 9],
            &[0],
        ] {
            assert_eq!(tls_client_hello(bytes), TlsPeek::NotTls, "{bytes:?}");
        }
    }

    #[test]
    fn broken_client_hellos_are_malformed() {
        let mut server_hello = client_hello(Some("a.b"), 1);
        server_hello[5] = 2;
        assert!(matches!(
            tls_client_hello(&server_hello),
            TlsPeek::Malformed(_)
        ));
        let mut bad_name = client_hello(Some("a b.example"), 1);
        assert!(
            matches!(tls_client_hello(&bad_name), TlsPeek::Malformed(m) if m.contains("not a DNS name"))
        );
        // A lying extensions length.
        let len = bad_name.len();
        bad_name[len - 9] = 0xff;
        assert!(matches!(tls_client_hello(&bad_name), TlsPeek::Malformed(_)));
        // A huge record length.
        assert!(matches!(
            tls_client_hello(&[22, 3, 1, 0xff, 0xff]),
            TlsPeek::Malformed(_)
        ));
        // A ClientHello larger than the peek bound.
        assert!(matches!(
            tls_client_hello(&[22, 3, 1, 0x40, 0, 1, 0, 0x50, 0]),
            TlsPeek::Malformed(m) if m.contains("ClientHello of")
        ));
        // An alert record in the middle.
        let mut split = client_hello(Some("a.b"), 2);
        let second = 5 + usize::from(u16::from_be_bytes([split[3], split[4]]));
        split[second] = 21;
        assert!(matches!(tls_client_hello(&split), TlsPeek::Malformed(_)));
    }

    fn request(text: &str) -> RequestHead {
        match http_request_head(text.as_bytes()) {
            HttpPeek::Request(r) => r,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn malformed(text: &str) -> String {
        match http_request_head(text.as_bytes()) {
            HttpPeek::Malformed(m) => m,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    #[test]
    fn peek_tells_tls_http_and_others_apart() {
        let hello = client_hello(Some("a.example"), 1);
        assert_eq!(
            peek(&hello).first_bytes(),
            FirstBytes::Tls {
                sni: Some("a.example")
            }
        );
        assert_eq!(peek(&hello[..3]), Peeked::NeedMore);
        assert_eq!(peek(b"").first_bytes(), FirstBytes::NotSeen);
        let get = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n";
        assert_eq!(
            peek(get).first_bytes(),
            FirstBytes::Http {
                host: Some("a.example")
            }
        );
        assert_eq!(peek(&get[..10]), Peeked::NeedMore);
        assert_eq!(peek(b"SSH-2.0-x\r\n"), Peeked::Other);
        assert_eq!(
            peek(b"GET / HTTP/1.1\r\n\r\n").first_bytes(),
            FirstBytes::Other
        );
        assert_eq!(
            peek(&[22, 3, 1, 0xff, 0xff]).first_bytes(),
            FirstBytes::Other
        );
    }

    #[test]
    fn request_heads_parse() {
        let r = request(
            "GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: Example.com:8080\r\nAccept: */*\r\n\r\nBODY",
        );
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/a/b");
        assert_eq!(r.query.as_deref(), Some("x=1&y=2"));
        assert_eq!(r.host.as_deref(), Some("Example.com:8080"));
        assert_eq!(r.minor_version, 1);
        assert_eq!(r.body, BodyFraming::None);
        assert_eq!(r.head_len, r.head_len.min(100));
        assert_eq!(
            &"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: Example.com:8080\r\nAccept: */*\r\n\r\nBODY"
                [r.head_len..],
            "BODY"
        );
        let r = request("POST /up HTTP/1.1\r\nhost: a\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(r.body, BodyFraming::ContentLength(12));
        let r = request("POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(r.body, BodyFraming::Chunked);
        let r = request(
            "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        );
        assert!(r.upgrade);
        let r = request("GET / HTTP/1.0\r\n\r\n");
        assert_eq!((r.minor_version, r.host), (0, None));
        let r = request("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(r.path, "*");
        let r = request("GET http://a.example/x?q HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert_eq!(
            (r.host.as_deref(), r.path.as_str(), r.query.as_deref()),
            (Some("a.example"), "/x", Some("q"))
        );
        let r = request("GET HTTP://a.example?q HTTP/1.0\r\n\r\n");
        assert_eq!((r.path.as_str(), r.query.as_deref()), ("/", Some("q")));
    }

    #[test]
    fn partial_heads_need_more_and_other_protocols_are_not_http() {
        let full = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for n in 0..full.len() {
            assert_eq!(
                http_request_head(&full.as_bytes()[..n]),
                HttpPeek::NeedMore,
                "{n}"
            );
        }
        for bytes in [
            &b"\x16\x03\x01"[..],
            b"SSH-2.0-OpenSSH\r\n",
            b" GET /",
            b"PRI * HTTP/2.0\r\n\r\n",
        ] {
            let got = http_request_head(bytes);
            assert!(
                matches!(got, HttpPeek::NotHttp | HttpPeek::Malformed(_)),
                "{bytes:?}: {got:?}"
            );
        }
        assert_eq!(http_request_head(&[b'A'; 40]), HttpPeek::NotHttp);
    }

    #[test]
    fn ambiguous_heads_are_malformed() {
        for (text, why) in [
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "two Host headers"),
            ("GET / HTTP/1.1\r\n\r\n", "without Host"),
            ("GET / HTTP/1.1\r\nHost: \r\n\r\n", "empty Host"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "disagree"),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", "not a decimal"),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
            ("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", "obs-fold"),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", "not a token"),
            ("GET / HTTP/1.1\nHost: a\r\n\r\n", "bare CR or LF"),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", "accepted: HTTP/1.0"),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "METHOD TARGET VERSION"),
            ("GET x HTTP/1.1\r\nHost: a\r\n\r\n", "accepted: /path"),
            ("GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n", "the target names a but Host says b"),
            ("GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", "authority"),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", "control characters"),
        ] {
            let m = malformed(text);
            assert!(m.contains(why), "{text:?}: {m}");
        }
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_PEEK_BYTES));
        assert!(malformed(&endless).contains("no end of the request head"));
    }
}
