//! The kernel's routing tables, interfaces and linkdns's VXLAN tunnel over a NETLINK_ROUTE
//! socket: reads them into the planner's [`HostRoute`], [`HostAddress`] and
//! [`TunnelState`], adds, replaces and deletes routes, and makes the tunnel device and its FDB
//! and neighbour entries.
//!
//! Blocking; callers run it off the async runtime. Netlink types stop here.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use linkdns_registry::Subnet;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric,
    RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::plan::{HostAddress, HostRoute, RouteKind, MAIN_TABLE};
use crate::vxlan::{self, Mac, TunnelState, VxlanLink};

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

/// `RTAX_MTU`: the route metric whose lock bit keeps path MTU discovery off a route.
const RTAX_MTU: u32 = 2;

/// `NUD_PERMANENT`: a neighbour entry nobody ages out.
const NUD_PERMANENT: u16 = 0x80;

/// What one read of the host's interfaces gives.
#[derive(Debug, Default)]
pub struct Interfaces {
    pub routes: Vec<HostRoute>,
    pub addresses: Vec<HostAddress>,
    /// MTUs by interface name.
    pub mtus: BTreeMap<String, u32>,
    pub tunnel: TunnelState,
}

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
        let (links, _, _) = self.links()?;
        Ok((self.routes(&links)?, self.addresses(&links)?))
    }

    /// [`Netlink::read`], with the interfaces' MTUs, every VXLAN device and linkdns's tunnel's
    /// FDB and neighbour entries.
    pub fn read_all(&mut self) -> io::Result<Interfaces> {
        let (links, mtus, mut tunnel) = self.links()?;
        if let Some(index) = tunnel.device().map(|d| d.index) {
            tunnel.fdb = self.fdb(index)?;
            tunnel.neighbours = self.neighbours(index)?;
        }
        tunnel.foreign_device =
            tunnel.device().is_none() && links.values().any(|(name, _)| name == vxlan::DEVICE);
        Ok(Interfaces {
            routes: self.routes(&links)?,
            addresses: self.addresses(&links)?,
            mtus: mtus
                .into_iter()
                .filter_map(|(index, mtu)| Some((links.get(&index)?.0.clone(), mtu)))
                .collect(),
            tunnel,
        })
    }

    /// The FDB entries of the tunnel device (index `device`): MAC → remote host.
    fn fdb(&mut self, device: u32) -> io::Result<Vec<(Mac, IpAddr)>> {
        let mut request = NeighbourMessage::default();
        request.header.family = AddressFamily::Bridge;
        let mut entries = Vec::new();
        for message in self.dump(RouteNetlinkMessage::GetNeighbour(request))? {
            let RouteNetlinkMessage::NewNeighbour(m) = message else {
                continue;
            };
            // The kernel does not filter an old-style FDB dump by device.
            if m.header.ifindex != device {
                continue;
            }
            let (mac, dst) = neighbour_entry(&m);
            if let (Some(mac), Some(dst)) = (mac, dst) {
                entries.push((mac, dst));
            }
        }
        Ok(entries)
    }

    /// The permanent neighbour (ARP) entries of the tunnel device: address → MAC.
    fn neighbours(&mut self, device: u32) -> io::Result<Vec<(IpAddr, Mac)>> {
        let mut request = NeighbourMessage::default();
        request.header.family = AddressFamily::Inet;
        request.attributes.push(NeighbourAttribute::IfIndex(device));
        let mut entries = Vec::new();
        for message in self.dump(RouteNetlinkMessage::GetNeighbour(request))? {
            let RouteNetlinkMessage::NewNeighbour(m) = message else {
                continue;
            };
            if m.header.ifindex != device || u16::from(m.header.state) & NUD_PERMANENT == 0 {
                continue;
            }
            let (mac, dst) = neighbour_entry(&m);
            if let (Some(mac), Some(dst)) = (mac, dst) {
                entries.push((dst, mac));
            }
        }
        Ok(entries)
    }

    /// Makes the tunnel device, up.
    pub fn create_tunnel(&mut self, device: &vxlan::Device) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        m.attributes
            .push(LinkAttribute::IfName(vxlan::DEVICE.to_string()));
        m.attributes
            .push(LinkAttribute::Address(device.mac.to_vec()));
        m.attributes.push(LinkAttribute::Mtu(device.mtu));
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(device.vni),
                InfoVxlan::Local(device.local),
                // Host order: the crate writes it big-endian.
                InfoVxlan::Port(device.port),
                // A new device learns unless told not to.
                InfoVxlan::Learning(false),
            ])),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .map(drop)
    }

    /// Sets a link's MTU and brings it up.
    pub fn set_link(&mut self, index: u32, mtu: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        // Without a mask the kernel takes `flags` as every flag of the link.
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(drop)
    }

    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request(RouteNetlinkMessage::DelLink(m), NLM_F_REQUEST | NLM_F_ACK)
            .map(drop)
    }

    /// The index of the link named `name`.
    pub fn link_index(&mut self, name: &str) -> io::Result<u32> {
        self.link(name).map(|(index, _)| index)
    }

    /// The index and MTU of the link named `name`.
    pub fn link(&mut self, name: &str) -> io::Result<(u32, u32)> {
        let (links, mtus, _) = self.links()?;
        links
            .iter()
            .find(|(_, (n, _))| n == name)
            .map(|(index, _)| (*index, mtus.get(index).copied().unwrap_or(1500)))
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link {name}")))
    }

    /// `bridge fdb replace MAC dev DEVICE dst REMOTE self permanent` (a replace: an append
    /// would keep an old remote of the MAC).
    pub fn set_fdb(&mut self, device: u32, mac: Mac, remote: Ipv4Addr) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::NewNeighbour(fdb_message(device, mac, Some(remote))),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    /// Deletes every remote of `mac` (no destination given: one given that does not match
    /// would delete nothing, successfully).
    pub fn delete_fdb(&mut self, device: u32, mac: Mac) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::DelNeighbour(fdb_message(device, mac, None)),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .map(drop)
    }

    /// `ip neigh replace IP lladdr MAC dev DEVICE nud permanent`.
    pub fn set_neighbour(&mut self, device: u32, ip: IpAddr, mac: Mac) -> io::Result<()> {
        let mut m = neighbour_message(device, ip);
        m.header.state = NeighbourState::Permanent;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.request(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map(drop)
    }

    pub fn delete_neighbour(&mut self, device: u32, ip: IpAddr) -> io::Result<()> {
        self.request(
            RouteNetlinkMessage::DelNeighbour(neighbour_message(device, ip)),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .map(drop)
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
    /// With `onlink: Some((index, mtu))`, out of that interface with the gateway taken as
    /// on-link (the tunnel's routes, whose gateway is no address of any network of the host),
    /// and with the interface's MTU locked: the VXLAN driver would otherwise lower the route's
    /// path MTU to the uplink's less its headers at the first large packet, and the host would
    /// then drop full-size packets with DF set that the tunnel carries (fragmenting outside).
    pub fn add_route(
        &mut self,
        dst: Subnet,
        gateway: IpAddr,
        onlink: Option<(u32, u32)>,
        protocol: u8,
        replace: Option<u32>,
    ) -> io::Result<()> {
        let mut message = route_message(MAIN_TABLE, dst, Some(gateway), protocol, replace);
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        if let Some((index, mtu)) = onlink {
            message.header.flags = RouteFlags::Onlink;
            message.attributes.push(RouteAttribute::Oif(index));
            message.attributes.push(RouteAttribute::Metrics(vec![
                RouteMetric::Lock(1 << RTAX_MTU),
                RouteMetric::Mtu(mtu),
            ]));
        }
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

    /// The interfaces (name, up), their MTUs by index, and the VXLAN devices among them.
    fn links(&mut self) -> io::Result<(Links, HashMap<u32, u32>, TunnelState)> {
        let request = RouteNetlinkMessage::GetLink(LinkMessage::default());
        let mut links = HashMap::new();
        let mut mtus = HashMap::new();
        let mut tunnel = TunnelState::default();
        for message in self.dump(request)? {
            let RouteNetlinkMessage::NewLink(m) = message else {
                continue;
            };
            let name = m.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            let name = name.unwrap_or_else(|| format!("if{}", m.header.index));
            for a in &m.attributes {
                if let LinkAttribute::Mtu(mtu) = a {
                    mtus.insert(m.header.index, *mtu);
                }
            }
            if let Some(link) = vxlan_link(&m, &name) {
                tunnel.links.push(link);
            }
            links.insert(
                m.header.index,
                (name, m.header.flags.contains(LinkFlags::Up)),
            );
        }
        Ok((links, mtus, tunnel))
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
    // A cached exception (a path MTU learned, a redirect) is the kernel's, not a route.
    if header.flags.contains(RouteFlags::Cloned) {
        return None;
    }
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

/// A link as a VXLAN device, if it is one.
fn vxlan_link(m: &LinkMessage, name: &str) -> Option<VxlanLink> {
    let mut link = VxlanLink {
        index: m.header.index,
        name: name.to_string(),
        vni: 0,
        local: None,
        // The kernel's default, for a dump without the attribute.
        port: 8472,
        learning: true,
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    let mut is_vxlan = false;
    for attribute in &m.attributes {
        match attribute {
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(a) => link.mac = <Mac>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Id(id) => link.vni = *id,
                                    InfoVxlan::Local(ip) => link.local = Some(*ip),
                                    InfoVxlan::Port(p) => link.port = *p,
                                    InfoVxlan::Learning(l) => link.learning = *l,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    is_vxlan.then_some(link)
}

/// An FDB entry of the tunnel device: `self permanent` (a VXLAN device takes no other).
fn fdb_message(device: u32, mac: Mac, remote: Option<Ipv4Addr>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = device;
    m.header.flags = NeighbourFlags::Own;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(remote) = remote {
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                remote,
            )));
    }
    m
}

fn neighbour_message(device: u32, ip: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.ifindex = device;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    m
}

/// A neighbour or FDB entry's MAC and address (in a bridge-family entry the address comes as
/// raw bytes).
fn neighbour_entry(m: &NeighbourMessage) -> (Option<Mac>, Option<IpAddr>) {
    let (mut mac, mut dst) = (None, None);
    for a in &m.attributes {
        match a {
            NeighbourAttribute::LinkLayerAddress(l) => mac = <Mac>::try_from(l.as_slice()).ok(),
            NeighbourAttribute::Destination(d) => {
                dst = match d {
                    NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                    NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                    NeighbourAddress::Other(b) => match b.len() {
                        4 => <[u8; 4]>::try_from(b.as_slice())
                            .ok()
                            .map(|o| IpAddr::V4(Ipv4Addr::from(o))),
                        16 => <[u8; 16]>::try_from(b.as_slice())
                            .ok()
                            .map(|o| IpAddr::V6(Ipv6Addr::from(o))),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => {}
        }
    }
    (mac, dst)
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}
