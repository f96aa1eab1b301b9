//! The answer core: one parsed query and its source address in, a response message (or a
//! decision to forward or refuse) out. Shared by the UDP fast path and the TCP server.
//!
//! It reads the registry from an immutable [`Published`] snapshot; nothing here blocks.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use linkdns_registry::{
    reverse_name_to_ip, Asker, LinkAlias, NodeId, Published, Reach, Resolution, Scope,
};

use crate::acl::Acl;

/// Largest UDP answer we send to an EDNS client (the DNS flag day 2020 value).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// What to do with a query.
#[derive(Debug)]
pub enum Decision {
    /// Send this response.
    Respond(Message),
    /// Outside the cluster's names, from an allowed client: ask the upstream resolvers.
    Forward,
}

/// Whether an in-zone answer may be reused for other clients: not if it depends on who asked
/// (link aliases), and never for forwarded or refused queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cacheable {
    Yes,
    No,
}

/// The cluster zone's settings.
#[derive(Clone, Debug)]
pub struct Zone {
    /// The cluster domain, lowercased, fully qualified (`cluster.`).
    pub domain: Name,
    /// TTL of every answer, and the negative-caching TTL in the SOA.
    pub ttl: u32,
    /// The answering node, preferred when a source address is ambiguous.
    pub local_node: Option<NodeId>,
    soa_mname: Name,
    soa_rname: Name,
}

impl Zone {
    pub fn new(domain: &str, ttl: u32, local_node: Option<NodeId>) -> Result<Zone, crate::Error> {
        let bad = |reason: String| crate::Error::Config(format!("domain {domain:?}: {reason}"));
        let mut domain = Name::from_ascii(domain)
            .map_err(|e| bad(e.to_string()))?
            .to_lowercase();
        domain.set_fqdn(true);
        if domain.is_root() {
            return Err(bad("the cluster domain cannot be the root".into()));
        }
        let mname = Name::from_ascii("ns")
            .and_then(|n| n.append_domain(&domain))
            .map_err(|e| bad(e.to_string()))?;
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&domain))
            .map_err(|e| bad(e.to_string()))?;
        Ok(Zone {
            domain,
            ttl,
            local_node,
            soa_mname: mname,
            soa_rname: rname,
        })
    }

    /// The zone's SOA record; the serial follows the registry's applied index.
    pub fn soa(&self, serial: u64) -> Record {
        let soa = SOA::new(
            self.soa_mname.clone(),
            self.soa_rname.clone(),
            serial as u32,
            60,
            10,
            600,
            self.ttl,
        );
        Record::from_rdata(self.domain.clone(), self.ttl, RData::SOA(soa))
    }

    /// Whether `src` is on this node's host (so host-local addresses reach it): on one of its
    /// container networks, loopback, the host itself, or a container the registry places here.
    pub fn on_host(&self, src: IpAddr, published: &Published) -> bool {
        published.local.is_on_host(src)
            || self.local_node.is_some_and(|node| {
                published
                    .registry
                    .container_at(src, Some(node))
                    .is_some_and(|c| c.node == node)
            })
    }

    /// Decides the answer to `request` from `src`, which is `asker` and (`on_host`) on this
    /// node's host or not. `request` has passed [`check_request`]. The answer holds only
    /// addresses that reach the asker; it may be cached for other askers with the same
    /// `on_host` when it says [`Cacheable::Yes`].
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        request: &Message,
        query: &Query,
        src: IpAddr,
        published: &Published,
        asker: Asker<'_>,
        on_host: bool,
        acl: &Acl,
    ) -> (Decision, Cacheable) {
        let registry = &published.registry;
        let serial = published.applied;
        let links: &[LinkAlias] = match asker {
            Asker::Container(c) => &c.links,
            Asker::Unknown => &[],
            Asker::Other => registry
                .container_at(src, self.local_node)
                .map_or(&[][..], |c| c.links()),
        };
        let scope = Scope {
            links,
            reach: match self.local_node {
                Some(node) => Reach::From { node, on_host },
                None => Reach::All,
            },
        };
        let name = query.name().to_lowercase();
        let qtype = query.query_type();
        let in_zone = self.domain.zone_of(&name);
        if in_zone {
            if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
                return (refuse(request), Cacheable::No);
            }
            let rel = relative(&name, &self.domain);
            let cacheable = if registry.is_link_alias(&rel) || published.local.is_link_alias(&rel) {
                Cacheable::No
            } else {
                Cacheable::Yes
            };
            let resolution = registry.resolve_in(&rel, &scope);
            let response = match resolution {
                Resolution::NotFound => {
                    self.response(request, ResponseCode::NXDomain, vec![], serial)
                }
                Resolution::Found(ips) => {
                    let mut answers = address_records(&query.name, &ips, qtype, self.ttl);
                    if rel.is_empty() && matches!(qtype, RecordType::SOA | RecordType::ANY) {
                        answers.push(self.soa(serial));
                    }
                    self.response(request, ResponseCode::NoError, answers, serial)
                }
            };
            return (Decision::Respond(response), cacheable);
        }
        // Reverse lookups of container addresses.
        if let Some(ip) = reverse_name_to_ip(&ascii(&name)) {
            if let Some(container) = registry.reverse_in(ip, scope.reach) {
                let answers = if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                    match Name::from_ascii(container).and_then(|n| n.append_domain(&self.domain)) {
                        Ok(target) => vec![Record::from_rdata(
                            query.name().clone(),
                            self.ttl,
                            RData::PTR(PTR(target)),
                        )],
                        Err(_) => vec![],
                    }
                } else {
                    vec![]
                };
                let mut response = reply_to(request, ResponseCode::NoError);
                response.metadata.authoritative = true;
                response.add_answers(answers);
                return (Decision::Respond(response), Cacheable::Yes);
            }
        }
        // A bare link alias (`db`), from a container that has it.
        if name.num_labels() == 1 {
            let label = ascii(&name);
            if let Some(ips) = registry.resolve_link(&label, &scope) {
                let answers = address_records(&query.name, &ips, qtype, self.ttl);
                let mut response = reply_to(request, ResponseCode::NoError);
                response.metadata.authoritative = true;
                response.add_answers(answers);
                return (Decision::Respond(response), Cacheable::No);
            }
        }
        if acl.allows(src, registry) {
            (Decision::Forward, Cacheable::No)
        } else {
            (refuse(request), Cacheable::No)
        }
    }

    fn response(
        &self,
        request: &Message,
        rcode: ResponseCode,
        answers: Vec<Record>,
        serial: u64,
    ) -> Message {
        let mut response = reply_to(request, rcode);
        response.metadata.authoritative = true;
        if answers.is_empty() {
            response.add_authority(self.soa(serial));
        }
        response.add_answers(answers);
        response
    }
}

/// Checks what every query must satisfy before it is looked at. Returns the error response for
/// one that fails: a non-QUERY opcode (NOTIMP), not exactly one question (FORMERR), an EDNS
/// version above 0 (BADVERS).
pub fn check_request(request: &Message) -> Result<&Query, Box<Message>> {
    if request.metadata.op_code != OpCode::Query {
        return Err(Box::new(reply_to(request, ResponseCode::NotImp)));
    }
    if let Some(edns) = &request.edns {
        if edns.version() > 0 {
            let mut response = reply_to(request, ResponseCode::NoError);
            response.metadata.response_code = ResponseCode::BADVERS;
            let mut edns = response_edns();
            edns.set_rcode_high(ResponseCode::BADVERS.high());
            response.set_edns(edns);
            return Err(Box::new(response));
        }
    }
    match request.queries.as_slice() {
        [query] => Ok(query),
        _ => Err(Box::new(reply_to(request, ResponseCode::FormErr))),
    }
}

/// A response skeleton for `request`: same id, opcode, RD and CD, the question echoed, EDNS
/// echoed when the client used it.
pub fn reply_to(request: &Message, rcode: ResponseCode) -> Message {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.message_type = MessageType::Response;
    metadata.response_code = rcode;
    metadata.recursion_available = true;
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata = metadata;
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        response.set_edns(response_edns());
    }
    response
}

/// A bare FORMERR for bytes that do not parse as a DNS message: the header's id and opcode are
/// echoed, nothing else.
pub fn formerr_for(bytes: &[u8]) -> Option<Vec<u8>> {
    let header = bytes.get(..12)?;
    if header[2] & 0x80 != 0 {
        return None; // a response: never answer one, that is how loops start
    }
    let mut out = vec![0u8; 12];
    out[0] = header[0];
    out[1] = header[1];
    out[2] = 0x80 | (header[2] & 0x78) | (header[2] & 0x01);
    out[3] = 0x80 | ResponseCode::FormErr.low();
    Some(out)
}

fn refuse(request: &Message) -> Decision {
    Decision::Respond(reply_to(request, ResponseCode::Refused))
}

fn response_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_PAYLOAD);
    edns.set_version(0);
    edns
}

fn address_records(owner: &Name, ips: &[IpAddr], qtype: RecordType, ttl: u32) -> Vec<Record> {
    ips.iter()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
                Some(Record::from_rdata(owner.clone(), ttl, RData::A(A(*v4))))
            }
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(Record::from_rdata(
                owner.clone(),
                ttl,
                RData::AAAA(AAAA(*v6)),
            )),
            _ => None,
        })
        .collect()
}

/// `name` without the zone's labels, dot-joined, lowercase (`web.h1` for `web.h1.cluster.`).
fn relative(name: &Name, zone: &Name) -> String {
    let keep = usize::from(name.num_labels() - zone.num_labels());
    let labels: Vec<String> = name
        .iter()
        .take(keep)
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    labels.join(".")
}

/// The name as lowercase text without the trailing dot.
fn ascii(name: &Name) -> String {
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    labels.join(".")
}
