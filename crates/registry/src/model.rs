//! The registry's own record types: nodes, containers, links, ports.
//!
//! These are the project's small types; Docker, DNS and Raft types are converted into them at the
//! edges and never appear here.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A Raft node id. Also the key of a node in the registry.
pub type NodeId = u64;

/// Docker's container id (the full 64 hex digits), unique across the cluster. Shared, not
/// copied, by the registry's indexes and its published copies: one pointer, to the id's 32
/// bytes when it is Docker's form (any other text is kept as it is). It orders, compares,
/// hashes and encodes as its text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ContainerId(Arc<IdRepr>);

#[derive(PartialEq, Eq, Hash)]
enum IdRepr {
    /// 64 lowercase hex digits, as bytes.
    Hex([u8; 32]),
    Text(Box<str>),
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

impl ContainerId {
    pub fn new(id: impl AsRef<str>) -> ContainerId {
        let text = id.as_ref();
        ContainerId(Arc::new(match hex_id(text) {
            Some(bytes) => IdRepr::Hex(bytes),
            None => IdRepr::Text(text.into()),
        }))
    }

    /// The bytes of its text.
    fn text_bytes(&self) -> impl Iterator<Item = u8> + '_ {
        let (hex, text): (&[u8], &[u8]) = match &*self.0 {
            IdRepr::Hex(b) => (b, &[]),
            IdRepr::Text(t) => (&[], t.as_bytes()),
        };
        hex.iter()
            .flat_map(|b| {
                [
                    HEX_DIGITS[usize::from(b >> 4)],
                    HEX_DIGITS[usize::from(b & 0xf)],
                ]
            })
            .chain(text.iter().copied())
    }

    /// Its text, written into `buf` when it is Docker's form.
    fn as_text<'a>(&'a self, buf: &'a mut [u8; 64]) -> &'a str {
        match &*self.0 {
            IdRepr::Text(t) => t,
            IdRepr::Hex(_) => {
                for (slot, b) in buf.iter_mut().zip(self.text_bytes()) {
                    *slot = b;
                }
                // Hex digits are ASCII.
                std::str::from_utf8(&buf[..]).unwrap_or_default()
            }
        }
    }
}

/// The 32 bytes of a 64-digit lowercase hex id.
fn hex_id(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let value = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut bytes = [0u8; 32];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (value(pair[0])? << 4) | value(pair[1])?;
    }
    Some(bytes)
}

impl Ord for ContainerId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (&*self.0, &*other.0) {
            (IdRepr::Hex(a), IdRepr::Hex(b)) => a.cmp(b),
            (IdRepr::Text(a), IdRepr::Text(b)) => a.cmp(b),
            _ => self.text_bytes().cmp(other.text_bytes()),
        }
    }
}

impl PartialOrd for ContainerId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Docker's short form is what users see in `docker ps`.
        let mut buf = [0u8; 64];
        let text = self.as_text(&mut buf);
        f.write_str(text.get(..12).unwrap_or(text))
    }
}

impl fmt::Debug for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        f.debug_tuple("ContainerId")
            .field(&self.as_text(&mut buf))
            .finish()
    }
}

impl From<&ContainerId> for String {
    fn from(id: &ContainerId) -> String {
        let mut buf = [0u8; 64];
        id.as_text(&mut buf).to_string()
    }
}

impl Serialize for ContainerId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 64];
        serializer.serialize_str(self.as_text(&mut buf))
    }
}

impl<'de> Deserialize<'de> for ContainerId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Ok(ContainerId::new(&*text))
    }
}

/// A host in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// The host's name, a DNS label (`<container>.<node>.cluster`).
    pub name: String,
    /// Address peers use to reach this node's Raft transport (`ip:port`).
    pub peer_addr: String,
}

impl NodeInfo {
    /// The host's address: the IP of `peer_addr`, canonical; none when that is not `ip:port`
    /// or is unspecified (`0.0.0.0:7380`, before the node learns its address).
    pub fn host_ip(&self) -> Option<IpAddr> {
        let addr: std::net::SocketAddr = self.peer_addr.parse().ok()?;
        let ip = canonical_ip(addr.ip());
        (!ip.is_unspecified()).then_some(ip)
    }
}

/// `mysql:db` in the `linkdns.links` label: `db` resolves to `mysql` for the labelled container.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LinkAlias {
    /// The container name (or alias) the link points at.
    pub target: String,
    /// The name the linking container uses for it.
    pub alias: String,
}

impl LinkAlias {
    /// Both names normalized; `None` if either is empty.
    pub fn normalized(&self) -> Option<LinkAlias> {
        let link = LinkAlias {
            target: normalize_name(&self.target),
            alias: normalize_name(&self.alias),
        };
        (!link.target.is_empty() && !link.alias.is_empty()).then_some(link)
    }
}

/// Transport protocol of a published or exposed port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The SRV label of the protocol, without the underscore (`tcp`).
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// The protocol of an SRV label without the underscore (`tcp`, any case).
    pub fn from_label(label: &str) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.label().eq_ignore_ascii_case(label))
    }
}

/// A port a container exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Port {
    pub port: u16,
    pub protocol: Protocol,
}

/// A named service of a container (label `linkdns.srv=http:8080`): `_http._tcp.<name>` is
/// answered with the port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    /// The service name, normalized, without the underscore (`http`).
    pub name: String,
    pub port: Port,
}

/// The Docker network an address is on, as its host's engine names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Network {
    /// Docker's network id (the full hex digits); unique on its host, never shared by two
    /// hosts' engines.
    pub id: String,
    pub name: String,
    /// The network's subnet that holds the address.
    pub subnet: Subnet,
}

/// One address of a container and the network it has it on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Address {
    pub ip: IpAddr,
    /// `None` for records written before addresses carried their network.
    pub network: Option<Network>,
}

impl Address {
    /// An address whose network is not known.
    pub fn bare(ip: IpAddr) -> Address {
        Address { ip, network: None }
    }
}

/// A compose service (labels `com.docker.compose.project` and `.service`): answered as
/// `<service>.<project>.cluster` on every host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ComposeService {
    pub project: String,
    pub service: String,
}

impl ComposeService {
    /// The name it is answered under, relative to the domain: `<service>.<project>`.
    pub fn name(&self) -> String {
        format!("{}.{}", self.service, self.project)
    }
}

/// The order in which a node's watcher observed its containers: a later observation has a
/// higher version, also across restarts of the node. 0 is "unversioned" (commands written
/// before records had versions), which is applied in log order as it always was.
pub type Version = u64;

/// One running container as the registry knows it.
///
/// Names, aliases and link aliases are stored lowercased and without a trailing dot; constructors
/// at the edge go through [`Container::normalized`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: ContainerId,
    /// Docker's name without the leading `/`.
    pub name: String,
    pub node: NodeId,
    /// When the node's watcher saw it so (see [`Version`]).
    pub version: Version,
    /// Its addresses with their networks, sorted by address, no duplicates.
    pub addrs: Vec<Address>,
    /// Extra names: `linkdns.alias`, Docker network aliases, compose service name.
    pub aliases: BTreeSet<String>,
    /// Link aliases scoped to this container.
    pub links: BTreeSet<LinkAlias>,
    /// Ports it exposes (image `EXPOSE`, `--expose`, published ports).
    pub ports: BTreeSet<Port>,
    /// Named services (`linkdns.srv`).
    pub services: BTreeSet<NamedPort>,
    pub compose: Option<ComposeService>,
}

impl Container {
    /// A container with a name and nothing else, unversioned (tests and tools fill in the rest).
    pub fn new(id: &str, name: &str, node: NodeId) -> Container {
        Container {
            id: ContainerId::new(id),
            name: name.to_string(),
            node,
            version: 0,
            addrs: Vec::new(),
            aliases: BTreeSet::new(),
            links: BTreeSet::new(),
            ports: BTreeSet::new(),
            services: BTreeSet::new(),
            compose: None,
        }
    }

    /// The same container with these addresses, networks unknown.
    pub fn with_ips(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Container {
        self.addrs = ips.into_iter().map(Address::bare).collect();
        self
    }

    /// Its addresses, in order.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addrs.iter().map(|a| a.ip)
    }

    /// Brings a container seen at the edge into the registry's canonical form: lowercased names,
    /// no empty names, no alias equal to the name, addresses canonical, sorted and deduplicated.
    pub fn normalized(mut self) -> Container {
        self.name = normalize_name(&self.name);
        self.aliases = self
            .aliases
            .iter()
            .map(|a| normalize_name(a))
            .filter(|a| !a.is_empty() && *a != self.name)
            .collect();
        self.links = self
            .links
            .iter()
            .filter_map(LinkAlias::normalized)
            .collect();
        self.services = self
            .services
            .iter()
            .map(|s| NamedPort {
                name: normalize_name(s.name.trim_start_matches('_')),
                port: s.port,
            })
            .filter(|s| !s.name.is_empty() && !s.name.contains('.'))
            .collect();
        self.compose = self.compose.take().and_then(|c| {
            let c = ComposeService {
                project: normalize_name(&c.project),
                service: normalize_name(&c.service),
            };
            let plain = |s: &str| !s.is_empty() && !s.contains('.');
            (plain(&c.project) && plain(&c.service)).then_some(c)
        });
        for a in &mut self.addrs {
            a.ip = canonical_ip(a.ip);
        }
        self.addrs.sort();
        self.addrs.dedup_by(|a, b| a.ip == b.ip);
        self
    }
}

/// One address of a [`Record`]: its network shared with every record on that network. The
/// address is kept in 16 bytes, an IPv4 one as `::ffff:a.b.c.d` (records hold canonical
/// addresses only, so that form never means anything else there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordAddress {
    ip: [u8; 16],
    pub network: Option<Arc<Network>>,
}

impl RecordAddress {
    pub fn new(ip: IpAddr, network: Option<Arc<Network>>) -> RecordAddress {
        let ip = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        RecordAddress { ip, network }
    }

    pub fn ip(&self) -> IpAddr {
        canonical_ip(IpAddr::from(self.ip))
    }

    /// Stands for "no address" in [`Record::first`]; no container holds `::`.
    const NONE: RecordAddress = RecordAddress {
        ip: [0; 16],
        network: None,
    };
}

/// A container as the registry keeps it: the content of a normalized [`Container`], packed —
/// boxed slices instead of vectors and sets, networks shared between records, the rarely used
/// fields behind one pointer, the name shared with the name index. It encodes exactly as the
/// `Container` it came from, so snapshots do not depend on the packing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: ContainerId,
    pub name: Arc<str>,
    pub node: NodeId,
    pub version: Version,
    /// Its first address inline ([`RecordAddress::NONE`] when it has none), the others in
    /// `extra`: most containers have one, and the record stays 72 bytes.
    first: RecordAddress,
    extra: Option<Box<Extra>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Extra {
    /// Addresses after the first.
    more: Box<[RecordAddress]>,
    aliases: Box<[String]>,
    links: Box<[LinkAlias]>,
    ports: Box<[Port]>,
    services: Box<[NamedPort]>,
    compose: Option<ComposeService>,
}

impl Record {
    /// Packs a normalized container (the sets' order is kept as it is).
    fn pack(c: Container) -> Record {
        let mut addrs: Vec<RecordAddress> = c
            .addrs
            .into_iter()
            .map(|a| RecordAddress::new(a.ip, a.network.map(Arc::new)))
            .collect();
        // `::` without a network (held by no container) would read as "none": then every
        // address goes to `more`.
        let first = match addrs.first() {
            Some(a) if *a != RecordAddress::NONE => addrs.remove(0),
            _ => RecordAddress::NONE,
        };
        let more = addrs.into_boxed_slice();
        let has_extra = !more.is_empty()
            || !c.aliases.is_empty()
            || !c.links.is_empty()
            || !c.ports.is_empty()
            || !c.services.is_empty()
            || c.compose.is_some();
        let extra = has_extra.then(|| {
            Box::new(Extra {
                more,
                aliases: c.aliases.into_iter().collect(),
                links: c.links.into_iter().collect(),
                ports: c.ports.into_iter().collect(),
                services: c.services.into_iter().collect(),
                compose: c.compose,
            })
        });
        Record {
            id: c.id,
            name: c.name.into(),
            node: c.node,
            version: c.version,
            first,
            extra,
        }
    }

    /// Its addresses, in order.
    pub fn addrs(&self) -> impl Iterator<Item = &RecordAddress> + Clone + '_ {
        let first = (self.first != RecordAddress::NONE).then_some(&self.first);
        first.into_iter().chain(self.more().iter())
    }

    /// Its addresses, to share their networks (see `Registry`'s interning).
    pub(crate) fn addrs_mut(&mut self) -> impl Iterator<Item = &mut RecordAddress> + '_ {
        let first = (self.first != RecordAddress::NONE).then_some(&mut self.first);
        let more = self.extra.as_mut().map_or(&mut [][..], |e| &mut e.more[..]);
        first.into_iter().chain(more.iter_mut())
    }

    fn more(&self) -> &[RecordAddress] {
        self.extra.as_ref().map_or(&[], |e| &e.more)
    }

    /// Its addresses, in order.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.addrs().map(RecordAddress::ip)
    }

    pub fn aliases(&self) -> &[String] {
        self.extra.as_ref().map_or(&[], |e| &e.aliases)
    }

    pub fn links(&self) -> &[LinkAlias] {
        self.extra.as_ref().map_or(&[], |e| &e.links)
    }

    pub fn ports(&self) -> &[Port] {
        self.extra.as_ref().map_or(&[], |e| &e.ports)
    }

    pub fn services(&self) -> &[NamedPort] {
        self.extra.as_ref().map_or(&[], |e| &e.services)
    }

    pub fn compose(&self) -> Option<&ComposeService> {
        self.extra.as_ref().and_then(|e| e.compose.as_ref())
    }

    /// The container this record holds.
    pub fn to_container(&self) -> Container {
        Container {
            id: self.id.clone(),
            name: self.name.to_string(),
            node: self.node,
            version: self.version,
            addrs: self.addrs().map(RecordAddress::to_address).collect(),
            aliases: self.aliases().iter().cloned().collect(),
            links: self.links().iter().cloned().collect(),
            ports: self.ports().iter().cloned().collect(),
            services: self.services().iter().cloned().collect(),
            compose: self.compose().cloned(),
        }
    }
}

impl RecordAddress {
    fn to_address(&self) -> Address {
        Address {
            ip: self.ip(),
            network: self.network.as_deref().cloned(),
        }
    }
}

impl From<Container> for Record {
    /// Packs a container (normalize it first: the sets' order is kept as it is), with networks
    /// of its own (the registry shares them between its records).
    fn from(c: Container) -> Record {
        Record::pack(c)
    }
}

/// One address as [`Address`] encodes it, borrowed from a [`RecordAddress`].
#[derive(Serialize)]
struct AddressRef<'a> {
    ip: IpAddr,
    network: Option<&'a Network>,
}

/// The fields of [`Container`], in its order, borrowed from a [`Record`].
#[derive(Serialize)]
struct ContainerRef<'a> {
    id: &'a ContainerId,
    name: &'a str,
    node: NodeId,
    version: Version,
    addrs: Vec<AddressRef<'a>>,
    aliases: &'a [String],
    links: &'a [LinkAlias],
    ports: &'a [Port],
    services: &'a [NamedPort],
    compose: Option<&'a ComposeService>,
}

impl Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ContainerRef {
            id: &self.id,
            name: &self.name,
            node: self.node,
            version: self.version,
            addrs: self
                .addrs()
                .map(|a| AddressRef {
                    ip: a.ip(),
                    network: a.network.as_deref(),
                })
                .collect(),
            aliases: self.aliases(),
            links: self.links(),
            ports: self.ports(),
            services: self.services(),
            compose: self.compose(),
        }
        .serialize(serializer)
    }
}

/// Lowercases a name and strips leading `/` (Docker's names), trailing `.` and surrounding
/// white space. Idempotent: a normalized name normalizes to itself.
pub fn normalize_name(name: &str) -> String {
    name.trim_start_matches(|c: char| c == '/' || c.is_whitespace())
        .trim_end_matches(|c: char| c == '.' || c.is_whitespace())
        .to_ascii_lowercase()
}

/// An IPv4 address seen through an IPv6 socket, or written as one (`::ffff:a.b.c.d`), is that
/// IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The longest prefix of `ip`'s family: 32 or 128.
pub fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// An IP network (`192.168.1.0/24`): container subnets, allowed-client ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Subnet {
    addr: IpAddr,
    prefix: u8,
}

impl Subnet {
    /// A subnet from an address and prefix length; host bits are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Subnet> {
        let max = max_prefix(addr);
        if prefix > max {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(prefix)).into()),
        };
        Some(Subnet { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether the two share any address (one contains the other). Networks of different
    /// families never overlap.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let wider = if self.prefix <= other.prefix {
            self
        } else {
            other
        };
        let narrower = if self.prefix <= other.prefix {
            other
        } else {
            self
        };
        wider.contains(narrower.addr)
    }

    /// Whether every address of `other` is in this one.
    pub fn covers(&self, other: &Subnet) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The subnets of length `prefix` this one divides into, in order (at most 2^20 of them);
    /// none if `prefix` is shorter than this subnet's or too long for its family.
    pub fn blocks(self, prefix: u8) -> impl Iterator<Item = Subnet> {
        /// Blocks handed out, at most (a /8 has 65,536 /24s).
        const MAX_BLOCKS: u128 = 1 << 20;
        let bits = max_prefix(self.addr);
        let fits = prefix >= self.prefix && prefix <= bits;
        let base = match self.addr {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let count = if fits {
            1u128
                .checked_shl(u32::from(prefix - self.prefix))
                .unwrap_or(u128::MAX)
                .min(MAX_BLOCKS)
        } else {
            0
        };
        let step = 1u128
            .checked_shl(u32::from(bits.saturating_sub(prefix)))
            .unwrap_or(0);
        let v4 = self.is_ipv4();
        (0..count).filter_map(move |i| {
            let addr = base.checked_add(i.checked_mul(step)?)?;
            let addr = if v4 {
                IpAddr::V4(u32::try_from(addr).ok()?.into())
            } else {
                IpAddr::V6(addr.into())
            };
            Subnet::new(addr, prefix)
        })
    }

    /// The subnet's first address after the network address (where Docker puts a network's
    /// gateway).
    pub fn first_host(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(1).into()),
            IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(1).into()),
        }
    }

    /// The subnet of length `prefix` that holds this one (itself if it is that wide or wider).
    pub fn widened(&self, prefix: u8) -> Subnet {
        Subnet::new(self.addr, prefix.min(self.prefix)).unwrap_or(*self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// The netmask of a prefix length; a length above 32 (never made by `Subnet::new`, but
/// decodable) is treated as 32.
fn mask32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX
        .checked_shl(128u32.saturating_sub(u32::from(prefix)))
        .unwrap_or(0)
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;

    /// Parses `a.b.c.d/n` or `x::/n`; a bare address is a host route (/32 or /128).
    fn from_str(s: &str) -> Result<Subnet, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network (expected e.g. 192.168.1.0/24)"))?;
        let max = max_prefix(addr);
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .map_err(|_| format!("{s:?}: prefix length {p:?} is not a number"))?,
            None => max,
        };
        Subnet::new(addr, prefix).ok_or_else(|| format!("{s:?}: prefix length above {max}"))
    }
}
