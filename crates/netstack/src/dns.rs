//! The guest's resolver: A and AAAA queries answered from the host's own resolver
//! configuration (/etc/hosts and /etc/resolv.conf, read when the sandbox starts), every
//! answer remembered per sandbox (name pinning), every query logged. Other query types
//! are refused: the resolver carries no data but addresses (no DNS tunnel).

use std::net::{IpAddr, Ipv4Addr};

pub use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use hickory_resolver::{Hosts, TokioResolver};

use crate::limits::{DNS_TIMEOUT, MAX_DNS_ANSWERS};
use kiln_policy::HOST_GATEWAY_NAME;

/// How long the guest may cache kiln's answers: short, so that a pinned name follows a
/// CDN's rotating addresses.
const ANSWER_TTL: u32 = 30;

/// A parsed guest query, answered by [`answer`].
pub struct Question {
    request: Message,
}

impl Question {
    /// Reads a guest's datagram; `Err` holds the reply for a malformed or non-query one
    /// (`None`: not even a header to reply to).
    pub fn parse(datagram: &[u8]) -> Result<Question, Option<Vec<u8>>> {
        let Ok(request) = Message::from_vec(datagram) else {
            return Err(reply_header(datagram, ResponseCode::FormErr));
        };
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
            || request.queries.len() != 1
        {
            return Err(reply_header(datagram, ResponseCode::NotImp));
        }
        Ok(Question { request })
    }

    fn query(&self) -> &Query {
        &self.request.queries[0]
    }

    /// The name asked for, lower case without the final dot.
    pub fn name(&self) -> String {
        let name = self.query().name().to_lowercase().to_ascii();
        name.trim_end_matches('.').to_owned()
    }

    pub fn record_type(&self) -> RecordType {
        self.query().query_type()
    }

    /// A reply carrying `code` and no answers.
    pub fn failure(&self, code: ResponseCode) -> Vec<u8> {
        self.reply(code, Vec::new())
    }

    fn reply(&self, code: ResponseCode, answers: Vec<Record>) -> Vec<u8> {
        let mut reply = Message::response(self.request.metadata.id, OpCode::Query);
        reply.metadata.recursion_desired = self.request.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.metadata.response_code = code;
        reply.add_query(self.query().clone());
        reply.add_answers(answers);
        reply.to_vec().unwrap_or_default()
    }
}

/// A reply with only `datagram`'s id and `code`, for what cannot be parsed further.
fn reply_header(datagram: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*datagram.first()?, *datagram.get(1)?]);
    Message::error_msg(id, OpCode::Query, code).to_vec().ok()
}

/// The host's resolver configuration.
#[derive(Clone)]
pub struct HostResolver {
    resolver: TokioResolver,
    /// The hosts file, also read on its own: a name it has for one address family is
    /// answered for the other without asking the network.
    hosts: std::sync::Arc<Hosts>,
}

/// Answers `question`: the reply to send and the addresses it gave (to pin).
pub async fn answer(
    host: &HostResolver,
    question: &Question,
    gateway: Ipv4Addr,
) -> (Vec<u8>, Vec<IpAddr>) {
    let record_type = question.record_type();
    if !matches!(record_type, RecordType::A | RecordType::AAAA) {
        return (question.failure(ResponseCode::Refused), Vec::new());
    }
    let name = question.query().name().clone();
    if question.name() == HOST_GATEWAY_NAME {
        let answers = match record_type {
            RecordType::A => vec![Record::from_rdata(
                name,
                ANSWER_TTL,
                RData::A(gateway.into()),
            )],
            _ => Vec::new(),
        };
        return (question.reply(ResponseCode::NoError, answers), Vec::new());
    }
    let other_family = match record_type {
        RecordType::A => RecordType::AAAA,
        _ => RecordType::A,
    };
    let in_hosts = |record_type| {
        host.hosts
            .lookup_static_host(&Query::query(name.clone(), record_type))
            .is_some()
    };
    if !in_hosts(record_type) && in_hosts(other_family) {
        return (question.failure(ResponseCode::NoError), Vec::new());
    }
    let lookup = host.resolver.lookup(name.clone(), record_type);
    let lookup = tokio::time::timeout(DNS_TIMEOUT, lookup);
    match lookup.await {
        Ok(Ok(lookup)) => {
            let mut addresses = Vec::new();
            let answers = lookup
                .answers()
                .iter()
                .filter_map(|record| {
                    let ip = match &record.data {
                        RData::A(a) => IpAddr::V4(a.0),
                        RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
                        _ => return None,
                    };
                    addresses.push(ip);
                    Some(Record::from_rdata(
                        name.clone(),
                        ANSWER_TTL,
                        record.data.clone(),
                    ))
                })
                .take(MAX_DNS_ANSWERS)
                .collect();
            addresses.truncate(MAX_DNS_ANSWERS);
            (question.reply(ResponseCode::NoError, answers), addresses)
        }
        Ok(Err(err)) if err.is_nx_domain() => {
            (question.failure(ResponseCode::NXDomain), Vec::new())
        }
        Ok(Err(err)) if err.is_no_records_found() => {
            (question.failure(ResponseCode::NoError), Vec::new())
        }
        Ok(Err(err)) => {
            tracing::debug!(name = %question.name(), %err, "resolution failed");
            (question.failure(ResponseCode::ServFail), Vec::new())
        }
        Err(_) => (question.failure(ResponseCode::ServFail), Vec::new()),
    }
}

/// The host's resolver, from its /etc/resolv.conf and /etc/hosts.
pub fn host_resolver() -> std::io::Result<HostResolver> {
    let builder = TokioResolver::builder_tokio().map_err(std::io::Error::other)?;
    Ok(HostResolver {
        resolver: builder.build().map_err(std::io::Error::other)?,
        hosts: std::sync::Arc::new(Hosts::from_system()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::Name;

    fn query(name: &str, record_type: RecordType) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 0x1234;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        message.to_vec().unwrap()
    }

    fn code(reply: &[u8]) -> ResponseCode {
        Message::from_vec(reply).unwrap().metadata.response_code
    }

    #[tokio::test]
    async fn the_host_name_is_the_gateway_and_other_types_are_refused() {
        let resolver = host_resolver().unwrap();
        let gateway = Ipv4Addr::new(10, 0, 2, 2);
        let question = Question::parse(&query("Host.Kiln.Internal.", RecordType::A)).unwrap();
        let (reply, pinned) = answer(&resolver, &question, gateway).await;
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(reply.answers[0].data, RData::A(gateway.into()));
        assert!(pinned.is_empty());

        let question = Question::parse(&query("example.com.", RecordType::TXT)).unwrap();
        let (reply, _) = answer(&resolver, &question, gateway).await;
        assert_eq!(code(&reply), ResponseCode::Refused);
    }

    #[tokio::test]
    async fn names_come_from_the_hosts_file() {
        // "localhost" is in every /etc/hosts.
        let resolver = host_resolver().unwrap();
        let question = Question::parse(&query("localhost.", RecordType::A)).unwrap();
        let (reply, pinned) = answer(&resolver, &question, Ipv4Addr::new(10, 0, 2, 2)).await;
        assert_eq!(code(&reply), ResponseCode::NoError);
        assert_eq!(pinned, [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    }

    #[test]
    fn malformed_datagrams_get_an_error_or_nothing() {
        assert!(matches!(Question::parse(&[]), Err(None)));
        let Err(Some(reply)) = Question::parse(&[0xab, 0xcd, 0xff]) else {
            panic!("expected a FORMERR reply");
        };
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, 0xabcd);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
    }
}
