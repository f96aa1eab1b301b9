//! The answer core: one parsed query and its source address in, a response message (or a
//! decision to forward or refuse) out. Shared by the UDP fast path and the TCP server.
//!
//! It reads the registry from an immutable [`Published`] snapshot; nothing here blocks.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use linkdns_registry::{
    reverse_name_to_ip, Addresses, Asker, LinkAlias, NodeId, Published, Reach, Scope, SrvQuery,
    SrvTarget, Vantage,
};

use crate::acl::{Acl, Client};

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

/// Whether an in-zone answer may be reused: for other clients of the same vantage class, only
/// for the same asker when it depends on who asked (link aliases), and never for forwarded or
/// refused queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cacheable {
    Yes,
    /// For the same source address, while the registry and the local view stay as they are
    /// (they say who is at that address and which link aliases it has).
    PerAsker,
    No,
}

/// Runs of answer records that rotate on every query (addresses of one family, of the asker's
/// own host or of the others): `(first record, count)` in the answer section.
pub type Rotation = Vec<(usize, usize)>;

/// A decided query: what to do, whether the response may be cached, and which of its answer
/// records rotate.
#[derive(Debug)]
pub struct Decided {
    pub decision: Decision,
    pub cacheable: Cacheable,
    pub rotation: Rotation,
}

impl Decided {
    fn respond(response: Message, cacheable: Cacheable) -> Decided {
        Decided {
            decision: Decision::Respond(response),
            cacheable,
            rotation: Vec::new(),
        }
    }

    fn not_cached(decision: Decision) -> Decided {
        Decided {
            decision,
            cacheable: Cacheable::No,
            rotation: Vec::new(),
        }
    }
}

/// Where an asker stands, as the answer cache keys it: askers of one class get the same answers
/// for every name that is not a link alias (0 elsewhere, 1 the host, 2 and up a class of
/// containers on the same networks).
pub fn vantage_class(asker: Asker<'_>, on_host: bool) -> u32 {
    match asker {
        Asker::Container(c) => c.class().saturating_add(2),
        _ => u32::from(on_host),
    }
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
    /// Counts answers that are not cached, to rotate them (shared by the clones of a zone).
    turns: std::sync::Arc<std::sync::atomic::AtomicUsize>,
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
            turns: Default::default(),
        })
    }

    /// How far to rotate the next answer that is not cached (cached ones keep a count of
    /// their own).
    pub fn next_turn(&self) -> usize {
        self.turns
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
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

    /// Where `asker` (at `src`) stands: a container of this host (on its networks; one that is
    /// still unknown on the network of its address), the host itself, or elsewhere.
    pub fn vantage<'a>(
        &self,
        src: IpAddr,
        asker: Asker<'a>,
        published: &'a Published,
    ) -> Vantage<'a> {
        match asker {
            Asker::Container(c) => Vantage::Container(&c.networks),
            Asker::Unknown => published.local.network_of(src).map_or(Vantage::Host, |n| {
                Vantage::Container(std::slice::from_ref(&n.id))
            }),
            Asker::Other if self.on_host(src, published) => Vantage::Host,
            Asker::Other => Vantage::Elsewhere,
        }
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

    /// Decides the answer to `request` from `src`, which is `asker` standing at `vantage`.
    /// `request` has passed [`check_request`]. The answer holds only addresses that reach the
    /// asker; it may be cached for other askers of the same [`vantage_class`] when it says
    /// [`Cacheable::Yes`].
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        request: &Message,
        query: &Query,
        src: IpAddr,
        published: &Published,
        asker: Asker<'_>,
        vantage: Vantage<'_>,
        acl: &Acl,
    ) -> Decided {
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
                Some(node) => Reach::From {
                    node,
                    vantage,
                    host: &published.local,
                },
                None => Reach::All,
            },
        };
        let name = query.name().to_lowercase();
        let qtype = query.query_type();
        let wants_srv = matches!(qtype, RecordType::SRV | RecordType::ANY);
        if self.domain.zone_of(&name) {
            if query.query_class() != DNSClass::IN && query.query_class() != DNSClass::ANY {
                return Decided::not_cached(refuse(request));
            }
            let rel = relative(&name, &self.domain);
            let (srv, base) = SrvQuery::parse(&rel);
            // `_tcp.<name>` looks `<name>` up as the asker sees it, link aliases included: any
            // suffix that is someone's link alias makes the answer the asker's own.
            let linked = std::iter::successors(Some(base), |n| n.split_once('.').map(|(_, r)| r))
                .any(|n| registry.is_link_alias(n) || published.local.is_link_alias(n));
            let cacheable = if linked {
                Cacheable::PerAsker
            } else {
                Cacheable::Yes
            };
            if srv != SrvQuery::All {
                // `_<port|service>._<proto>.<name>`: SRV only; other types NODATA.
                let Some(targets) = registry.srv_in(&rel, &scope) else {
                    let response = self.response(request, ResponseCode::NXDomain, vec![], serial);
                    return Decided::respond(response, cacheable);
                };
                let wanted = if wants_srv { &targets[..] } else { &[] };
                let response = self.srv_response(request, &query.name, wanted, Some(serial));
                return Decided::respond(response, cacheable);
            }
            let Some(records) = registry.lookup(&rel, scope.links) else {
                let response = self.response(request, ResponseCode::NXDomain, vec![], serial);
                return Decided::respond(response, cacheable);
            };
            if qtype == RecordType::SRV {
                // Every port of the name's containers.
                let targets = registry.srv_in(&rel, &scope).unwrap_or_default();
                let response = self.srv_response(request, &query.name, &targets, Some(serial));
                return Decided::respond(response, cacheable);
            }
            let addrs = registry.addresses(&records, scope.reach);
            let (mut answers, rotation) = address_records(&query.name, &addrs, qtype, self.ttl);
            if rel.is_empty() && matches!(qtype, RecordType::SOA | RecordType::ANY) {
                answers.push(self.soa(serial));
            }
            let response = self.response(request, ResponseCode::NoError, answers, serial);
            return Decided {
                decision: Decision::Respond(response),
                cacheable,
                rotation,
            };
        }
        let label = ascii(&name);
        // Reverse lookups of container addresses.
        if let Some(ip) = reverse_name_to_ip(&label) {
            if let Some(container) = registry.reverse_in(ip, scope.reach) {
                let answers = if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                    match Name::from_ascii(&*container).and_then(|n| n.append_domain(&self.domain))
                    {
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
                return Decided::respond(response, Cacheable::Yes);
            }
        }
        // A bare link alias (`db`), or SRV of one (`_3306._tcp.db`), from a container that has
        // it; and a bare cluster name (a compose service, say) from a known container of this
        // host, as Docker's own DNS answers the names of its networks (a container whose
        // resolver tries names as they are first — Docker's `ndots:0` — would else go
        // upstream). Not for an asker not known yet: the name may be its link alias.
        let (srv, base) = SrvQuery::parse(&label);
        let from_container = matches!(asker, Asker::Container(_));
        if from_container && name.num_labels() == 1 && !scope.links.iter().any(|l| l.alias == base)
        {
            if let Some(records) = registry.lookup(&label, &[]).filter(|r| !r.is_empty()) {
                let addrs = registry.addresses(&records, scope.reach);
                let (answers, rotation) = address_records(&query.name, &addrs, qtype, self.ttl);
                let mut response = reply_to(request, ResponseCode::NoError);
                response.add_answers(answers);
                // Another container of the same networks may have the name as a link alias.
                let linked =
                    registry.is_link_alias(&label) || published.local.is_link_alias(&label);
                return Decided {
                    decision: Decision::Respond(response),
                    cacheable: if linked {
                        Cacheable::PerAsker
                    } else {
                        Cacheable::Yes
                    },
                    rotation,
                };
            }
        }
        if !base.contains('.') && scope.links.iter().any(|l| l.alias == base) {
            if srv != SrvQuery::All {
                let response = match registry.srv_in(&label, &scope) {
                    Some(targets) => {
                        let wanted = if wants_srv { &targets[..] } else { &[] };
                        self.srv_response(request, &query.name, wanted, None)
                    }
                    // The link's target has no such port: as in the cluster's domain.
                    None => {
                        let mut response = reply_to(request, ResponseCode::NXDomain);
                        response.metadata.authoritative = true;
                        response
                    }
                };
                return Decided::respond(response, Cacheable::PerAsker);
            } else if let Some(addrs) = registry.link_addresses(base, &scope) {
                let (answers, rotation) = address_records(&query.name, &addrs, qtype, self.ttl);
                let mut response = reply_to(request, ResponseCode::NoError);
                response.metadata.authoritative = true;
                response.add_answers(answers);
                return Decided {
                    decision: Decision::Respond(response),
                    cacheable: Cacheable::PerAsker,
                    rotation,
                };
            }
        }
        if acl.class(src, published) == Client::Local {
            Decided::not_cached(Decision::Forward)
        } else {
            Decided::not_cached(refuse(request))
        }
    }

    /// A NOERROR response with `targets` as SRV records under `owner`, each target's addresses
    /// in the additional section; without targets, NODATA (with the zone's SOA for a name in
    /// the zone, whose SOA serial is `serial`).
    fn srv_response(
        &self,
        request: &Message,
        owner: &Name,
        targets: &[SrvTarget],
        serial: Option<u64>,
    ) -> Message {
        let mut answers = Vec::with_capacity(targets.len());
        let mut glue = Vec::new();
        let mut glued: Vec<&str> = Vec::new();
        for t in targets {
            let Ok(target) =
                Name::from_ascii(&t.target).and_then(|n| n.append_domain(&self.domain))
            else {
                continue;
            };
            answers.push(Record::from_rdata(
                owner.clone(),
                self.ttl,
                RData::SRV(SRV::new(0, 10, t.port, target.clone())),
            ));
            if !glued.contains(&t.target.as_str()) {
                glued.push(&t.target);
                glue.extend(address_records(&target, &t.addrs, RecordType::ANY, self.ttl).0);
            }
        }
        let mut response = match serial {
            Some(serial) => self.response(request, ResponseCode::NoError, answers, serial),
            None => {
                let mut response = reply_to(request, ResponseCode::NoError);
                response.metadata.authoritative = true;
                response.add_answers(answers);
                response
            }
        };
        response.add_additionals(glue);
        response
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

/// The address records of `addrs` for `qtype` under `owner`: the asker's own host's first, each
/// family in a run of its own, and the runs that rotate.
fn address_records(
    owner: &Name,
    addrs: &Addresses,
    qtype: RecordType,
    ttl: u32,
) -> (Vec<Record>, Rotation) {
    let (local, elsewhere) = addrs.ips.split_at(addrs.local.min(addrs.ips.len()));
    let mut records = Vec::with_capacity(addrs.ips.len());
    let mut rotation = Vec::new();
    for part in [local, elsewhere] {
        for family_v4 in [true, false] {
            let start = records.len();
            records.extend(
                part.iter()
                    .filter(|ip| ip.is_ipv4() == family_v4)
                    .filter_map(|ip| match (ip, qtype) {
                        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
                            Some(Record::from_rdata(owner.clone(), ttl, RData::A(A(*v4))))
                        }
                        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(
                            Record::from_rdata(owner.clone(), ttl, RData::AAAA(AAAA(*v6))),
                        ),
                        _ => None,
                    }),
            );
            if records.len() - start > 1 {
                rotation.push((start, records.len() - start));
            }
        }
    }
    (records, rotation)
}

/// Rotates each run of `rotation` in `records` by `turn` places (the `turn`-th answer of a run
/// comes first).
pub fn rotate_records(records: &mut [Record], rotation: &[(usize, usize)], turn: usize) {
    for &(start, count) in rotation.iter().filter(|(_, count)| *count > 1) {
        if let Some(run) = records.get_mut(start..start + count) {
            run.rotate_left(turn % count);
        }
    }
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
