//! The pod's nftables rules, sent to the kernel over netlink in one batch (the
//! supervisor image has no `nft`, and one batch is applied wholly or not at all).
//!
//! `nft list ruleset` in the pod's network namespace shows them as [`RuleSet::nft_text`]
//! prints them; docs/kubernetes.md quotes that text and the end-to-end tests compare the
//! kernel's listing with it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::PodnetError;

/// The table kiln owns in the pod's network namespace (family `inet`: IPv4 and IPv6).
pub const TABLE: &str = "kiln";

/// What the rules need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleSet {
    /// The enforcer's uid: its own traffic passes untouched.
    pub proxy_uid: u32,
    /// Where every other uid's TCP connections are redirected (the transparent proxy).
    pub proxy_port: u16,
    /// Where every other uid's UDP DNS queries (port 53) are redirected (the resolver).
    pub dns_port: u16,
}

/// One expression of a rule, as the kernel's nf_tables evaluates it (what
/// `nft --debug=netlink` shows). Every load goes to register 1.
#[derive(Clone)]
enum Expr {
    /// `meta load KEY`; with no socket (e.g. a kernel-made packet) `skuid` does not
    /// match, so such packets pass.
    Meta(u32),
    /// The transport header's destination port (2 bytes at offset 2).
    DestinationPort,
    /// `ct load KEY`.
    Ct(u32),
    /// register = register & mask.
    Mask(u32),
    Cmp {
        op: u32,
        data: Vec<u8>,
    },
    Verdict(u32),
    /// register = this port (network order), for the redirect.
    Port(u16),
    /// Redirects to the port in register 1 on the local host.
    Redirect,
}

/// `ct status dnat`: the connection's destination was rewritten (by the redirect).
const IPS_DST_NAT: u32 = 1 << 5;
/// `ct state established`.
const CT_STATE_ESTABLISHED: u32 = 1 << 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;

impl RuleSet {
    /// The rules as `nft list ruleset` prints them.
    pub fn nft_text(&self) -> String {
        let RuleSet {
            proxy_uid: uid,
            proxy_port,
            dns_port,
        } = *self;
        format!(
            "table inet {TABLE} {{\n\
             \tchain redirect {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tmeta skuid {uid} accept\n\
             \t\tmeta l4proto tcp redirect to :{proxy_port}\n\
             \t\tudp dport 53 redirect to :{dns_port}\n\
             \t}}\n\
             \n\
             \tchain egress {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\tmeta skuid {uid} accept\n\
             \t\tct status dnat accept\n\
             \t\tct state established accept\n\
             \t\tmeta skuid != {uid} drop\n\
             \t}}\n\
             }}\n"
        )
    }

    fn chains(&self) -> [Chain; 2] {
        let cmp = |op, data: &[u8]| Expr::Cmp {
            op,
            data: data.to_vec(),
        };
        let uid = |op| {
            vec![
                Expr::Meta(NFT_META_SKUID),
                cmp(op, &self.proxy_uid.to_ne_bytes()),
            ]
        };
        let l4proto = |proto: u8| vec![Expr::Meta(NFT_META_L4PROTO), cmp(NFT_CMP_EQ, &[proto])];
        let dport = vec![
            Expr::DestinationPort,
            cmp(NFT_CMP_EQ, &DNS_PORT.to_be_bytes()),
        ];
        let redirect = |port| vec![Expr::Port(port), Expr::Redirect];
        let bit_set = |key, mask: u32| {
            vec![
                Expr::Ct(key),
                Expr::Mask(mask),
                cmp(NFT_CMP_NEQ, &0u32.to_ne_bytes()),
            ]
        };
        let accept = || vec![Expr::Verdict(NF_ACCEPT)];
        [
            Chain {
                name: "redirect",
                kind: "nat",
                priority: -100,
                rules: vec![
                    [uid(NFT_CMP_EQ), accept()].concat(),
                    [l4proto(IPPROTO_TCP), redirect(self.proxy_port)].concat(),
                    [l4proto(IPPROTO_UDP), dport, redirect(self.dns_port)].concat(),
                ],
            },
            Chain {
                name: "egress",
                kind: "filter",
                priority: 0,
                rules: vec![
                    [uid(NFT_CMP_EQ), accept()].concat(),
                    [bit_set(NFT_CT_STATUS, IPS_DST_NAT), accept()].concat(),
                    [bit_set(NFT_CT_STATE, CT_STATE_ESTABLISHED), accept()].concat(),
                    [uid(NFT_CMP_NEQ), vec![Expr::Verdict(NF_DROP)]].concat(),
                ],
            },
        ]
    }

    /// Replaces kiln's table in the current network namespace with these rules, in one
    /// netlink batch. Needs CAP_NET_ADMIN.
    pub fn install(&self) -> Result<(), PodnetError> {
        let mut batch = Batch::default();
        // Create-then-delete makes the delete succeed whether or not an earlier run of
        // the init container left the table; the batch then adds it afresh.
        batch.table(NFT_MSG_NEWTABLE);
        batch.table(NFT_MSG_DELTABLE);
        batch.table(NFT_MSG_NEWTABLE);
        for chain in self.chains() {
            batch.chain(&chain);
            for rule in &chain.rules {
                batch.rule(chain.name, rule);
            }
        }
        batch.send()
    }
}

struct Chain {
    name: &'static str,
    kind: &'static str,
    priority: i32,
    rules: Vec<Vec<Expr>>,
}

// Netlink and nf_tables constants (linux/netlink.h, linux/netfilter/nfnetlink.h,
// linux/netfilter/nf_tables.h).
const NETLINK_NETFILTER: i32 = 12;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NLA_F_NESTED: u16 = 0x8000;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_META_SKUID: u32 = 10;
const NFT_META_L4PROTO: u32 = 16;
const NFT_CT_STATE: u32 = 0;
const NFT_CT_STATUS: u32 = 2;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;

/// Netlink attributes being written into one message.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn bytes(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = 4 + value.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.pad();
        self
    }

    fn str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.bytes(kind, &bytes)
    }

    fn be32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.bytes(kind, &value.to_be_bytes())
    }

    fn nested(&mut self, kind: u16, build: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut inner = Attrs::default();
        build(&mut inner);
        self.bytes(kind | NLA_F_NESTED, &inner.0)
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
}

/// One nf_tables transaction: begin, messages, end.
#[derive(Default)]
struct Batch {
    messages: Vec<u8>,
    seq: u32,
    acked: Vec<u32>,
}

impl Batch {
    fn message(&mut self, kind: u16, flags: u16, family: u8, res_id: u16, attrs: &[u8]) {
        self.seq += 1;
        let len = 16 + 4 + attrs.len();
        let m = &mut self.messages;
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[family, 0]);
        m.extend_from_slice(&res_id.to_be_bytes());
        m.extend_from_slice(attrs);
        if flags & NLM_F_ACK != 0 {
            self.acked.push(self.seq);
        }
    }

    fn nftables(&mut self, command: u16, extra_flags: u16, attrs: &Attrs) {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | command;
        let flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
        self.message(kind, flags, NFPROTO_INET, 0, &attrs.0);
    }

    fn table(&mut self, command: u16) {
        let mut attrs = Attrs::default();
        attrs.str(1, TABLE); // NFTA_TABLE_NAME
        let flags = if command == NFT_MSG_NEWTABLE {
            NLM_F_CREATE
        } else {
            0
        };
        self.nftables(command, flags, &attrs);
    }

    fn chain(&mut self, chain: &Chain) {
        let mut attrs = Attrs::default();
        attrs
            .str(1, TABLE) // NFTA_CHAIN_TABLE
            .str(3, chain.name) // NFTA_CHAIN_NAME
            .nested(4, |hook| {
                // NFTA_CHAIN_HOOK: NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY
                hook.be32(1, NF_INET_LOCAL_OUT)
                    .be32(2, chain.priority as u32);
            })
            .be32(5, NF_ACCEPT) // NFTA_CHAIN_POLICY
            .str(7, chain.kind); // NFTA_CHAIN_TYPE
        self.nftables(NFT_MSG_NEWCHAIN, NLM_F_CREATE, &attrs);
    }

    fn rule(&mut self, chain: &str, exprs: &[Expr]) {
        let mut attrs = Attrs::default();
        attrs
            .str(1, TABLE) // NFTA_RULE_TABLE
            .str(2, chain) // NFTA_RULE_CHAIN
            .nested(4, |list| {
                // NFTA_RULE_EXPRESSIONS: NFTA_LIST_ELEM each
                for expr in exprs {
                    list.nested(1, |elem| expr.encode(elem));
                }
            });
        self.nftables(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, &attrs);
    }

    fn send(mut self) -> Result<(), PodnetError> {
        let body = std::mem::take(&mut self.messages);
        let acked = std::mem::take(&mut self.acked);
        let mut all = Batch {
            seq: self.seq,
            ..Batch::default()
        };
        let res = NFNL_SUBSYS_NFTABLES;
        all.message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, res, &[]);
        all.messages.extend_from_slice(&body);
        all.message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, res, &[]);

        let socket = netlink_socket()?;
        let fd = socket.as_raw_fd();
        // SAFETY: fd is an open netlink socket; the buffer is valid for its length.
        let sent = unsafe { libc::send(fd, all.messages.as_ptr().cast(), all.messages.len(), 0) };
        if sent < 0 || sent as usize != all.messages.len() {
            return Err(PodnetError::Rules(format!(
                "sending the batch: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut waiting = acked;
        let mut buf = vec![0u8; 64 * 1024];
        while !waiting.is_empty() {
            // SAFETY: the buffer is valid for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(PodnetError::Rules(format!(
                    "reading the kernel's answer: {}",
                    std::io::Error::last_os_error()
                )));
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                if len < 16 || len > rest.len() {
                    return Err(PodnetError::Rules("a malformed netlink answer".into()));
                }
                if kind == NLMSG_ERROR && len >= 20 {
                    let code = i32::from_ne_bytes(rest[16..20].try_into().unwrap_or_default());
                    if code != 0 {
                        return Err(PodnetError::Rules(format!(
                            "message {seq} of the batch: {}",
                            std::io::Error::from_raw_os_error(-code)
                        )));
                    }
                    waiting.retain(|s| *s != seq);
                }
                rest = &rest[(len + 3) & !3..];
            }
        }
        Ok(())
    }
}

impl Expr {
    fn encode(&self, elem: &mut Attrs) {
        let mut d = Attrs::default();
        let name = match self {
            Expr::Meta(key) => {
                d.be32(2, *key).be32(1, NFT_REG_1); // NFTA_META_KEY, NFTA_META_DREG
                "meta"
            }
            Expr::DestinationPort => {
                // NFTA_PAYLOAD_DREG, _BASE, _OFFSET, _LEN
                d.be32(1, NFT_REG_1)
                    .be32(2, NFT_PAYLOAD_TRANSPORT_HEADER)
                    .be32(3, 2)
                    .be32(4, 2);
                "payload"
            }
            Expr::Ct(key) => {
                d.be32(2, *key).be32(1, NFT_REG_1); // NFTA_CT_KEY, NFTA_CT_DREG
                "ct"
            }
            Expr::Mask(mask) => {
                // NFTA_BITWISE_SREG, _DREG, _LEN, _MASK, _XOR
                d.be32(1, NFT_REG_1)
                    .be32(2, NFT_REG_1)
                    .be32(3, 4)
                    .nested(4, |v| {
                        v.bytes(1, &mask.to_ne_bytes());
                    })
                    .nested(5, |v| {
                        v.bytes(1, &0u32.to_ne_bytes());
                    });
                "bitwise"
            }
            Expr::Cmp { op, data } => {
                // NFTA_CMP_SREG, _OP, _DATA { NFTA_DATA_VALUE }
                d.be32(1, NFT_REG_1).be32(2, *op).nested(3, |v| {
                    v.bytes(1, data);
                });
                "cmp"
            }
            Expr::Verdict(code) => {
                // NFTA_IMMEDIATE_DREG, _DATA { NFTA_DATA_VERDICT { NFTA_VERDICT_CODE } }
                d.be32(1, NFT_REG_VERDICT).nested(2, |v| {
                    v.nested(2, |verdict| {
                        verdict.be32(1, *code);
                    });
                });
                "immediate"
            }
            Expr::Port(port) => {
                d.be32(1, NFT_REG_1).nested(2, |v| {
                    v.bytes(1, &port.to_be_bytes());
                });
                "immediate"
            }
            Expr::Redirect => {
                // NFTA_REDIR_REG_PROTO_MIN, _MAX, _FLAGS
                d.be32(1, NFT_REG_1)
                    .be32(2, NFT_REG_1)
                    .be32(3, NF_NAT_RANGE_PROTO_SPECIFIED);
                "redir"
            }
        };
        elem.str(1, name).bytes(2 | NLA_F_NESTED, &d.0); // NFTA_EXPR_NAME, NFTA_EXPR_DATA
    }
}

fn netlink_socket() -> Result<OwnedFd, PodnetError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(PodnetError::Rules(format!(
            "opening a netfilter netlink socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = Duration::from_secs(5);
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/kubernetes.md shows the rules between `<!-- kiln:rules -->` markers.
    fn documented() -> String {
        let docs = include_str!("../../../docs/kubernetes.md");
        let start = docs
            .find("<!-- kiln:rules -->\n```\n")
            .expect("the rules' start marker")
            + 24;
        let end = docs
            .find("```\n<!-- /kiln:rules -->")
            .expect("the rules' end marker");
        docs[start..end].to_owned()
    }

    #[test]
    fn the_documented_rules_are_the_installed_ones() {
        let rules = RuleSet {
            proxy_uid: 10000,
            proxy_port: 15001,
            dns_port: 15053,
        };
        assert_eq!(rules.nft_text(), documented());
    }

    #[test]
    fn attributes_are_padded_and_nested() {
        let mut attrs = Attrs::default();
        attrs.str(1, "kiln").nested(4, |n| {
            n.be32(1, 3);
        });
        // "kiln\0" (9 bytes with its header) pads to 12; the nest is 4 + 8.
        assert_eq!(attrs.0.len(), 12 + 12);
        assert_eq!(&attrs.0[0..4], &[9, 0, 1, 0]);
        assert_eq!(&attrs.0[12..16], &[12, 0, 4, 0x80]);
        assert_eq!(&attrs.0[20..24], &3u32.to_be_bytes());
    }
}
