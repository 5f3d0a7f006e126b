//! The pod's resolver, as the workload sees it: A and AAAA queries answered from the
//! pod's /etc/hosts, else from the servers of its /etc/resolv.conf (asked as the proxy
//! uid, whose traffic the rules let through), every answer pinned (address → names), every
//! query decided by kiln-policy and logged. Other query types are refused: the resolver
//! hands out addresses, nothing else (no DNS tunnel). The behaviour is the VM path's.
//!
//! Datagrams from the workload and from servers are hostile: every length is checked
//! against the message, names are bounded, and compression pointers only go backwards.

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use kiln_policy::{DecisionRecord, DnsDecision};

use crate::enforcer::{log, now, Shared};
use crate::limits::{
    DNS_TIMEOUT, MAX_CONFIG_FILE, MAX_DNS_ANSWERS, MAX_DNS_INFLIGHT, MAX_DNS_MESSAGE,
};
use crate::PodnetError;

/// How long the workload may cache kiln's answers: short, so that a pinned name follows
/// a CDN's rotating addresses.
const ANSWER_TTL: u32 = 30;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const NOERROR: u8 = 0;
const FORMERR: u8 = 1;
const SERVFAIL: u8 = 2;
const NXDOMAIN: u8 = 3;
const NOTIMP: u8 = 4;
const REFUSED: u8 = 5;

/// The pod's resolver configuration: its hosts file and its name servers.
pub(crate) struct Upstream {
    hosts: HashMap<String, Vec<IpAddr>>,
    servers: Vec<SocketAddr>,
}

impl Upstream {
    pub fn read(hosts_file: &Path, resolv_conf: &Path) -> Result<Upstream, PodnetError> {
        let hosts = parse_hosts(&read_text(hosts_file)?);
        let servers = parse_resolv_conf(&read_text(resolv_conf)?);
        Ok(Upstream { hosts, servers })
    }

    /// The addresses of `name` of type `qtype`: `Ok` with the answers (maybe none), or
    /// `Err` with the response code to give.
    fn resolve(&self, name: &str, qtype: u16) -> Result<Vec<IpAddr>, u8> {
        if let Some(addrs) = self.hosts.get(name) {
            // A name the hosts file has is answered from it alone, for both families.
            return Ok(addrs
                .iter()
                .filter(|a| a.is_ipv4() == (qtype == TYPE_A))
                .copied()
                .collect());
        }
        let deadline = Instant::now() + DNS_TIMEOUT;
        let query = encode_query(random_id(), name, qtype).ok_or(FORMERR)?;
        for server in &self.servers {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match ask(*server, &query, left) {
                Ok(Answer::Addresses(addrs)) => return Ok(addrs),
                Ok(Answer::Code(code)) => return Err(code),
                Err(err) => tracing::debug!(%server, %err, "name server did not answer"),
            }
        }
        Err(SERVFAIL)
    }
}

fn read_text(path: &Path) -> Result<String, PodnetError> {
    let mut text = String::new();
    let read = |source| PodnetError::Read {
        path: path.to_owned(),
        source,
    };
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_CONFIG_FILE)
        .read_to_string(&mut text)
        .map_err(read)?;
    Ok(text)
}

fn parse_hosts(text: &str) -> HashMap<String, Vec<IpAddr>> {
    let mut hosts: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(Ok(addr)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        for name in words {
            let addrs = hosts.entry(name.to_ascii_lowercase()).or_default();
            if !addrs.contains(&addr) && addrs.len() < MAX_DNS_ANSWERS {
                addrs.push(addr);
            }
        }
    }
    hosts
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|addr| addr.parse::<IpAddr>().ok())
        .map(|addr| SocketAddr::new(addr, 53))
        .take(3) // as glibc: MAXNS
        .collect()
}

enum Answer {
    Addresses(Vec<IpAddr>),
    Code(u8),
}

/// Asks one server over UDP; the reply must carry the query's id and question.
fn ask(server: SocketAddr, query: &[u8], timeout: std::time::Duration) -> std::io::Result<Answer> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(server)?;
    socket.send(query)?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_DNS_MESSAGE];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        socket.set_read_timeout(Some(left))?;
        let n = socket.recv(&mut buf)?;
        if let Some(answer) = parse_reply(query, &buf[..n]) {
            return Ok(answer);
        }
    }
}

/// A 16-bit query id from the kernel's random source.
fn random_id() -> u16 {
    let mut id = [0u8; 2];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != 2 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return nanos as u16;
    }
    u16::from_ne_bytes(id)
}

/// A parsed query from the workload: one question.
#[derive(Debug, PartialEq, Eq)]
struct Question {
    id: u16,
    recursion_desired: bool,
    /// The name in lower case, without the final dot.
    name: String,
    qtype: u16,
    /// The question section as sent, echoed in the reply.
    raw_question: Vec<u8>,
}

/// Reads a name at `pos` (following backward compression pointers); returns it and
/// the position after it in the message.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    let mut length = 0;
    loop {
        let len = *msg.get(pos)? as usize;
        match len {
            0 => {
                end.get_or_insert(pos + 1);
                break;
            }
            l if l & 0xc0 == 0xc0 => {
                let target = ((l & 0x3f) << 8) | *msg.get(pos + 1)? as usize;
                end.get_or_insert(pos + 2);
                if target >= pos {
                    return None; // only backwards: no loops
                }
                pos = target;
            }
            l if l <= 63 => {
                let label = msg.get(pos + 1..pos + 1 + l)?;
                length += l + 1;
                if length > 255 {
                    return None;
                }
                labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
                pos += 1 + l;
            }
            _ => return None,
        }
    }
    Some((labels.join("."), end?))
}

/// `Err` holds the reply to a malformed or unsupported message (`None`: not even a
/// header to reply to).
fn parse_query(msg: &[u8]) -> Result<Question, Option<Vec<u8>>> {
    if msg.len() < 12 {
        return Err(None);
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let recursion_desired = flags & 0x0100 != 0;
    let header_reply = |code| Some(header(id, recursion_desired, code, 0, 0));
    if flags & 0x8000 != 0 {
        return Err(None); // a response: nothing to answer
    }
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if (flags >> 11) & 0xf != 0 || qdcount != 1 {
        return Err(header_reply(NOTIMP));
    }
    let Some((name, pos)) = read_name(msg, 12).filter(|(_, pos)| msg.len() >= pos + 4) else {
        return Err(header_reply(FORMERR));
    };
    let qtype = u16::from_be_bytes([msg[pos], msg[pos + 1]]);
    Ok(Question {
        id,
        recursion_desired,
        name,
        qtype,
        raw_question: msg[12..pos + 4].to_vec(),
    })
}

fn header(id: u16, rd: bool, code: u8, qdcount: u16, ancount: u16) -> Vec<u8> {
    let mut flags: u16 = 0x8000 | 0x0080 | u16::from(code); // QR, RA
    if rd {
        flags |= 0x0100;
    }
    let mut h = Vec::with_capacity(12);
    for v in [id, flags, qdcount, ancount, 0, 0] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h
}

impl Question {
    fn reply(&self, code: u8, answers: &[IpAddr]) -> Vec<u8> {
        let mut msg = header(
            self.id,
            self.recursion_desired,
            code,
            1,
            answers.len() as u16,
        );
        msg.extend_from_slice(&self.raw_question);
        for addr in answers {
            msg.extend_from_slice(&[0xc0, 12]); // the question's name
            let (kind, data) = match addr {
                IpAddr::V4(v4) => (TYPE_A, v4.octets().to_vec()),
                IpAddr::V6(v6) => (TYPE_AAAA, v6.octets().to_vec()),
            };
            msg.extend_from_slice(&kind.to_be_bytes());
            msg.extend_from_slice(&CLASS_IN.to_be_bytes());
            msg.extend_from_slice(&ANSWER_TTL.to_be_bytes());
            msg.extend_from_slice(&(data.len() as u16).to_be_bytes());
            msg.extend_from_slice(&data);
        }
        msg
    }
}

fn encode_query(id: u16, name: &str, qtype: u16) -> Option<Vec<u8>> {
    let mut msg = Vec::with_capacity(32 + name.len());
    for v in [id, 0x0100, 1, 0, 0, 0] {
        msg.extend_from_slice(&v.to_be_bytes());
    }
    for label in name.split('.').filter(|l| !l.is_empty()) {
        if label.len() > 63 {
            return None;
        }
        msg.push(label.len() as u8);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.push(0);
    msg.extend_from_slice(&qtype.to_be_bytes());
    msg.extend_from_slice(&CLASS_IN.to_be_bytes());
    Some(msg)
}

/// A server's reply to `query`: `None` when it is not one (wrong id or question).
fn parse_reply(query: &[u8], msg: &[u8]) -> Option<Answer> {
    if msg.len() < 12 || msg[..2] != query[..2] || msg[2] & 0x80 == 0 {
        return None;
    }
    let question = &query[12..];
    if !msg
        .get(12..12 + question.len())?
        .eq_ignore_ascii_case(question)
    {
        return None;
    }
    let qtype = u16::from_be_bytes([query[query.len() - 4], query[query.len() - 3]]);
    let code = msg[3] & 0x0f;
    if code != NOERROR {
        return Some(Answer::Code(if code == NXDOMAIN {
            NXDOMAIN
        } else {
            SERVFAIL
        }));
    }
    let ancount = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = 12 + question.len();
    let mut addrs = Vec::new();
    for _ in 0..ancount {
        let (_, after) = read_name(msg, pos)?;
        let fixed = msg.get(after..after + 10)?;
        let kind = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = u16::from_be_bytes([fixed[8], fixed[9]]) as usize;
        let data = msg.get(after + 10..after + 10 + len)?;
        // The addresses of the name's canonical name count: CNAME chains end in them.
        match (kind, data.len()) {
            (TYPE_A, 4) if qtype == TYPE_A => {
                addrs.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?));
            }
            (TYPE_AAAA, 16) if qtype == TYPE_AAAA => {
                addrs.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?));
            }
            _ => {}
        }
        pos = after + 10 + len;
    }
    addrs.truncate(MAX_DNS_ANSWERS);
    Some(Answer::Addresses(addrs))
}

/// Serves queries arriving on `socket` (the redirected port 53) until the process ends.
pub(crate) fn serve(shared: &Arc<Shared>, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let resolver = socket
        .local_addr()
        .unwrap_or_else(|_| (Ipv4Addr::LOCALHOST, 0).into());
    let mut buf = vec![0u8; MAX_DNS_MESSAGE];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(err) => {
                tracing::warn!(%err, "resolver socket");
                continue;
            }
        };
        let question = match parse_query(&buf[..n]) {
            Ok(q) => q,
            Err(reply) => {
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer);
                }
                continue;
            }
        };
        if shared.dns_inflight.fetch_add(1, Ordering::AcqRel) >= MAX_DNS_INFLIGHT {
            shared.dns_inflight.fetch_sub(1, Ordering::AcqRel);
            let _ = socket.send_to(&question.reply(SERVFAIL, &[]), peer);
            continue;
        }
        let (shared, socket) = (shared.clone(), socket.clone());
        std::thread::spawn(move || {
            let reply = answer(&shared, &question, resolver);
            let _ = socket.send_to(&reply, peer);
            shared.dns_inflight.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Decides, resolves, pins and logs one query; returns the reply.
fn answer(shared: &Shared, question: &Question, resolver: SocketAddr) -> Vec<u8> {
    let mut decision = shared.decide_dns(&question.name, question.qtype);
    // Only addresses are handed out, whatever the policy says about the name.
    if decision == DnsDecision::Resolve && !matches!(question.qtype, TYPE_A | TYPE_AAAA) {
        decision = DnsDecision::Refused {
            reason: format!(
                "{} queries are not answered: kiln's resolver hands out addresses only",
                kiln_policy::dns_type_name(question.qtype)
            ),
        };
    }
    let mut record = DecisionRecord::dns(
        now(),
        &shared.sandbox,
        resolver,
        &question.name,
        question.qtype,
        &decision,
    );
    let reply = match &decision {
        DnsDecision::NxDomain { .. } => question.reply(NXDOMAIN, &[]),
        DnsDecision::Refused { .. } => question.reply(REFUSED, &[]),
        DnsDecision::Resolve => match shared.upstream.resolve(&question.name, question.qtype) {
            Ok(addrs) => {
                if let Ok(mut pins) = shared.pins.lock() {
                    for addr in &addrs {
                        pins.pin(*addr, &question.name);
                    }
                }
                record.answers = addrs.clone();
                question.reply(NOERROR, &addrs)
            }
            Err(code) => question.reply(code, &[]),
        },
    };
    log(&record);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_replies_carry_the_answers() {
        let query = encode_query(0x1234, "Good.Test", TYPE_A).unwrap();
        let q = parse_query(&query).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype),
            (0x1234, "good.test", TYPE_A)
        );
        let addr: IpAddr = "198.18.0.5".parse().unwrap();
        let reply = q.reply(NOERROR, &[addr]);
        let Some(Answer::Addresses(got)) = parse_reply(&query, &reply) else {
            panic!("not a reply to the query");
        };
        assert_eq!(got, [addr]);
        // Another id is not the reply.
        let other = encode_query(0x4321, "good.test", TYPE_A).unwrap();
        assert!(parse_reply(&other, &reply).is_none());
        let nx = q.reply(NXDOMAIN, &[]);
        assert!(matches!(
            parse_reply(&query, &nx),
            Some(Answer::Code(NXDOMAIN))
        ));
    }

    #[test]
    fn hostile_messages_are_refused_not_followed() {
        assert_eq!(parse_query(&[1, 2, 3]), Err(None));
        // A name whose compression pointer points at itself.
        let mut msg = header(7, true, 0, 1, 0);
        msg[2] &= 0x7f; // a query
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(parse_query(&msg), Err(Some(_))));
        // A label running past the end.
        let mut msg = encode_query(9, "a.test", TYPE_A).unwrap();
        msg.truncate(14);
        assert!(matches!(parse_query(&msg), Err(Some(_))));
        // An answer whose data length passes the end.
        let query = encode_query(1, "a.test", TYPE_A).unwrap();
        let mut reply = parse_query(&query)
            .unwrap()
            .reply(NOERROR, &["198.18.0.1".parse().unwrap()]);
        let len = reply.len();
        reply[len - 5] = 0xff;
        assert!(parse_reply(&query, &reply).is_none());
    }

    #[test]
    fn hosts_and_resolv_conf() {
        let hosts =
            parse_hosts("# c\n198.18.0.5 Good.Test bad.test\n::1 localhost\nnot-an-address x\n");
        assert_eq!(
            hosts["good.test"],
            ["198.18.0.5".parse::<IpAddr>().unwrap()]
        );
        assert!(!hosts.contains_key("x"));
        let servers =
            parse_resolv_conf("search a\nnameserver 10.96.0.10\nnameserver ::1\noptions ndots:5\n");
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0], "10.96.0.10:53".parse().unwrap());
        let upstream = Upstream {
            hosts,
            servers: Vec::new(),
        };
        assert_eq!(upstream.resolve("good.test", TYPE_AAAA), Ok(vec![]));
        assert_eq!(upstream.resolve("unknown.test", TYPE_A), Err(SERVFAIL));
    }
}
