//! The kernel's routing tables and interface addresses over a NETLINK_ROUTE socket: reads them
//! into the planner's [`HostRoute`] and [`HostAddress`], and adds, replaces and deletes routes.
//!
//! Blocking; callers run it off the async runtime. Netlink types stop here.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;

use linkdns_registry::Subnet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::plan::{HostAddress, HostRoute, RouteKind, MAIN_TABLE};

/// Size of a netlink message header.
const HEADER_LEN: usize = 16;

/// A dump interrupted by a concurrent change is repeated this many times at most.
const DUMP_ATTEMPTS: usize = 5;

/// `EINTR`, which stands for an interrupted (inconsistent) dump.
const EINTR: i32 = 4;

/// The kernel answers at once; a reply this late means something is wrong, and the caller
/// must not hang (it holds up the reconciliation and a node's shutdown).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Interfaces by index: name, and whether it is up.
type Links = HashMap<u32, (String, bool)>;

/// A NETLINK_ROUTE socket bound to the kernel.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Netlink {
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    /// Every IPv4 and IPv6 route of every table, and every address of every interface (with
    /// whether the interface is up). The interfaces are listed once for both.
    pub fn read(&mut self) -> io::Result<(Vec<HostRoute>, Vec<HostAddress>)> {
        let links = self.links()?;
        Ok((self.routes(&links)?, self.addresses(&links)?))
    }

    fn routes(&mut self, links: &Links) -> io::Result<Vec<HostRoute>> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = RouteMessage::default();
            request.header.address_family = family;
            for message in self.dump(RouteNetlinkMessage::GetRoute(request))? {
                if let RouteNetlinkMessage::NewRoute(m) = message {
                    if let Some(route) = host_route(&m, links) {
                        routes.push(route);
                    }
                }
            }
        }
        Ok(routes)
    }

    fn addresses(&mut self, links: &Links) -> io::Result<Vec<HostAddress>> {
        let mut addresses = Vec::new();
        let request = RouteNetlinkMessage::GetAddress(AddressMessage::default());
        for message in self.dump(request)? {
            let RouteNetlinkMessage::NewAddress(m) = message else {
                continue;
            };
            // `Local` is the interface's own address where both are given (point-to-point).
            let (mut local, mut address) = (None, None);
            for attribute in &m.attributes {
                match attribute {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            let Some(addr) = local.or(address) else {
                continue;
            };
            let peer = address.filter(|a| local.is_some() && *a != addr);
            let (device, up) = links
                .get(&m.header.index)
                .cloned()
                .unwrap_or_else(|| (format!("if{}", m.header.index), false));
            addresses.push(HostAddress {
                device,
                addr,
                peer,
                prefix: m.header.prefix_len,
                up,
            });
        }
        Ok(addresses)
    }

    /// Adds `dst via gateway` to the main table with `protocol`; with `replace: Some(metric)`,
    /// in place of the route to `dst` with that metric (the kernel matches destination and
    /// metric, so the planner makes sure that route is linkdns's).
    pub fn add_route(
        &mut self,
        dst: Subnet,
        gateway: IpAddr,
        protocol: u8,
        replace: Option<u32>,
    ) -> io::Result<()> {
        let mut message = route_message(MAIN_TABLE, dst, Some(gateway), protocol, replace);
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        let mode = if replace.is_some() {
            NLM_F_REPLACE
        } else {
            NLM_F_EXCL
        };
        self.request(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | mode,
        )
        .map(drop)
    }

    /// Deletes exactly `route` (table, destination, gateway, protocol, metric).
    pub fn delete_route(&mut self, route: &HostRoute) -> io::Result<()> {
        let mut message = route_message(
            route.table,
            route.dst,
            route.gateway,
            route.protocol,
            Some(route.metric),
        );
        // Any scope and type, as `ip route del` does.
        message.header.scope = RouteScope::NoWhere;
        message.header.kind = RouteType::Unspec;
        self.request(
            RouteNetlinkMessage::DelRoute(message),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .map(drop)
    }

    fn links(&mut self) -> io::Result<Links> {
        let request = RouteNetlinkMessage::GetLink(LinkMessage::default());
        let mut links = HashMap::new();
        for message in self.dump(request)? {
            let RouteNetlinkMessage::NewLink(m) = message else {
                continue;
            };
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            let name = name.unwrap_or_else(|| format!("if{}", m.header.index));
            links.insert(
                m.header.index,
                (name, m.header.flags.contains(LinkFlags::Up)),
            );
        }
        Ok(links)
    }

    /// A dump request, repeated while the kernel says a concurrent change interrupted it.
    fn dump(&mut self, request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut attempt = 1;
        loop {
            match self.request(request.clone(), NLM_F_REQUEST | NLM_F_DUMP) {
                Err(e) if e.raw_os_error() == Some(EINTR) && attempt < DUMP_ATTEMPTS => {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Sends one request; collects the replies up to the end of a dump, or the kernel's
    /// acknowledgement (or error) of a change.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;

        let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        let mut interrupted = false;
        loop {
            // One datagram holds several messages; `recv_from_full` never truncates one.
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while let Some(len) = message_len(&datagram, at) {
                let bytes = &datagram[at..at + len];
                at += (len + 3) & !3;
                let Ok(reply) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes) else {
                    // One message this crate cannot parse does not spoil the rest.
                    continue;
                };
                if reply.header.sequence_number != sequence {
                    continue;
                }
                interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
                match reply.payload {
                    NetlinkPayload::Done(done) => {
                        if done.code != 0 {
                            return Err(io::Error::from_raw_os_error(-done.code));
                        }
                        if interrupted {
                            return Err(io::Error::from_raw_os_error(EINTR));
                        }
                        return Ok(replies);
                    }
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => return Err(io::Error::from_raw_os_error(-code.get())),
                        None if !is_dump => return Ok(replies),
                        None => {}
                    },
                    NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                    _ => {}
                }
            }
        }
    }
}

/// The length of the netlink message at `at` in `datagram`, if a whole one is there.
fn message_len(datagram: &[u8], at: usize) -> Option<usize> {
    let header = datagram.get(at..at + HEADER_LEN)?;
    let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
    (len >= HEADER_LEN && at + len <= datagram.len()).then_some(len)
}

fn route_message(
    table: u32,
    dst: Subnet,
    gateway: Option<IpAddr>,
    protocol: u8,
    metric: Option<u32>,
) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    message.header.destination_prefix_length = dst.prefix();
    // The full table id goes in the attribute, as iproute2 does.
    message.header.table = RouteHeader::RT_TABLE_UNSPEC;
    message.header.protocol = RouteProtocol::from(protocol);
    message.attributes.push(RouteAttribute::Table(table));
    message
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst.addr())));
    if let Some(gateway) = gateway {
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
    }
    if let Some(metric) = metric.filter(|m| *m != 0) {
        message.attributes.push(RouteAttribute::Priority(metric));
    }
    message
}

/// A dumped route in the planner's terms; none for families other than IPv4 and IPv6.
fn host_route(m: &RouteMessage, links: &Links) -> Option<HostRoute> {
    let header = &m.header;
    let unspecified: IpAddr = match header.address_family {
        AddressFamily::Inet => std::net::Ipv4Addr::UNSPECIFIED.into(),
        AddressFamily::Inet6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
        _ => return None,
    };
    let mut dst = unspecified;
    let mut table = u32::from(header.table);
    let mut gateway = None;
    let mut oif = None;
    let mut metric = 0;
    for attribute in &m.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = ip_of(a).unwrap_or(unspecified),
            RouteAttribute::Gateway(a) => gateway = ip_of(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::MultiPath(hops) => {
                if let Some(hop) = hops.first() {
                    oif = oif.or(Some(hop.interface_index));
                    for a in &hop.attributes {
                        if let RouteAttribute::Gateway(a) = a {
                            gateway = gateway.or(ip_of(a));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(HostRoute {
        dst: Subnet::new(dst, header.destination_prefix_length)?,
        table,
        gateway,
        device: oif.and_then(|i| links.get(&i).map(|(name, _)| name.clone())),
        protocol: u8::from(header.protocol),
        kind: match header.kind {
            RouteType::Unicast => RouteKind::Unicast,
            RouteType::Local => RouteKind::Local,
            RouteType::Broadcast => RouteKind::Broadcast,
            RouteType::BlackHole => RouteKind::Blackhole,
            RouteType::Unreachable => RouteKind::Unreachable,
            RouteType::Prohibit => RouteKind::Prohibit,
            other => RouteKind::Other(u8::from(other)),
        },
        metric,
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}
