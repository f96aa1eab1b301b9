//! The route planner: what this host should have (a route to every other node's container
//! subnet — via that node's host address where it is on a directly connected network, else
//! through linkdns's VXLAN tunnel ([`crate::vxlan`]) — and the forwarding rules container
//! traffic needs), compared with what it has, gives the changes to make and the routes it
//! refuses to make.
//!
//! Pure: no netlink, no iptables, no clock. The edges read [`HostState`] and apply [`Plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use linkdns_registry::{max_prefix, NodeId, NodeInfo, Registry, Subnet};

use crate::vxlan::{self, TunnelChange, TunnelState};

/// The route protocol number linkdns marks its routes with (`ip route show proto 151`). The
/// kernel keeps it as given; linkdns treats exactly the routes with it as its own.
pub const DEFAULT_PROTOCOL: u8 = 151;

/// The main routing table, where linkdns puts its routes.
pub const MAIN_TABLE: u32 = 254;

/// The local table: the kernel's routes for the host's own addresses.
const LOCAL_TABLE: u32 = 255;

/// IPv4 or IPv6: routes, forwarding switches and firewall tables are per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// How another host's subnets are reached when that host is not on a directly connected
/// network (`--encapsulation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Encapsulation {
    /// A plain route where the host is on-link, VXLAN where it is not.
    #[default]
    Auto,
    /// VXLAN to every host (IPv4), on-link or not.
    Always,
    /// Plain routes only: a host that is not on-link is not routed to (refused).
    Never,
}

impl fmt::Display for Encapsulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encapsulation::Auto => "auto",
            Encapsulation::Always => "always",
            Encapsulation::Never => "never",
        })
    }
}

impl std::str::FromStr for Encapsulation {
    type Err = String;

    fn from_str(s: &str) -> Result<Encapsulation, String> {
        match s {
            "auto" => Ok(Encapsulation::Auto),
            "always" => Ok(Encapsulation::Always),
            "never" => Ok(Encapsulation::Never),
            other => Err(format!(
                "encapsulation must be auto, always or never, not {other:?}"
            )),
        }
    }
}

/// A route as the kernel has it, in the project's terms.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostRoute {
    // `dst` first: routes sort by destination.
    pub dst: Subnet,
    pub table: u32,
    pub gateway: Option<IpAddr>,
    /// The output interface's name, when the route names one.
    pub device: Option<String>,
    pub protocol: u8,
    pub kind: RouteKind,
    pub metric: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Unicast,
    Local,
    Broadcast,
    Blackhole,
    Unreachable,
    Prohibit,
    Other(u8),
}

impl HostRoute {
    /// Whether this is a route of someone else's that a container subnet must not overlap:
    /// not linkdns's (`protocol`), not the kernel's local table, not a default route.
    pub fn is_foreign(&self, protocol: u8) -> bool {
        self.protocol != protocol && self.table != LOCAL_TABLE && self.dst.prefix() > 0
    }
}

impl fmt::Display for HostRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            RouteKind::Unicast => {}
            RouteKind::Local => f.write_str("local ")?,
            RouteKind::Broadcast => f.write_str("broadcast ")?,
            RouteKind::Blackhole => f.write_str("blackhole ")?,
            RouteKind::Unreachable => f.write_str("unreachable ")?,
            RouteKind::Prohibit => f.write_str("prohibit ")?,
            RouteKind::Other(k) => write!(f, "type {k} ")?,
        }
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(dev) = &self.device {
            write!(f, " dev {dev}")?;
        }
        write!(f, " proto {}", protocol_name(self.protocol))?;
        if self.metric != 0 {
            write!(f, " metric {}", self.metric)?;
        }
        if self.table != MAIN_TABLE {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

/// The names `ip route` prints for the common protocol numbers.
fn protocol_name(protocol: u8) -> String {
    match protocol {
        0 => "unspec".into(),
        1 => "redirect".into(),
        2 => "kernel".into(),
        3 => "boot".into(),
        4 => "static".into(),
        16 => "dhcp".into(),
        p => p.to_string(),
    }
}

/// An address on one of the host's interfaces (`ip addr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddress {
    pub device: String,
    pub addr: IpAddr,
    /// The far end of a point-to-point address (`10.0.0.1 peer 10.0.0.2/32`): the prefix is
    /// the peer's.
    pub peer: Option<IpAddr>,
    pub prefix: u8,
    /// Whether the interface is up; a gateway is only reachable through an interface that is.
    pub up: bool,
}

impl HostAddress {
    /// The network this address makes directly reachable.
    pub fn network(&self) -> Option<Subnet> {
        Subnet::new(self.peer.unwrap_or(self.addr), self.prefix)
    }
}

/// One rule of a linkdns chain: traffic from `src` to `dst` is accepted (forward chain) or
/// exempted from masquerading (nat chain).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// Forwarded traffic from `src` arriving on `in_if` to `dst` leaving on `out_if`.
    Accept {
        src: Subnet,
        dst: Subnet,
        in_if: String,
        out_if: String,
    },
    NoMasquerade {
        src: Subnet,
        dst: Subnet,
    },
    /// Traffic from `src` arriving on `in_if` to `dst` passes the raw table untouched: current
    /// Docker engines (28 and later) drop there every packet that reaches a container from
    /// another interface than its bridge (`-t raw -A PREROUTING -d <container> ! -i <bridge>
    /// -j DROP`); ACCEPT ends the raw chain before those drops, and the forward chain still
    /// decides.
    Admit {
        src: Subnet,
        dst: Subnet,
        in_if: String,
    },
    /// TCP connections forwarded out of `out_if` (the tunnel) open with at most `mss` bytes
    /// per segment, so they fit the uplink after the encapsulation.
    ClampMss {
        out_if: String,
        mss: u32,
    },
    /// VXLAN from remote host `src` to this host's address `dst` on UDP `port` is taken.
    TunnelFrom {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
    },
    /// Any other VXLAN to this host's tunnel is dropped: the kernel takes it from any sender,
    /// and its inner packets would carry whatever source the sender wrote.
    TunnelDrop {
        dst: Ipv4Addr,
        port: u16,
    },
    /// Something in a linkdns chain that linkdns did not write; the chain is rewritten.
    Unknown(String),
}

/// linkdns's chains. Each hangs off one built-in chain by a single jump, which must be that
/// chain's first rule so Docker's own rules (drops, masquerading) come after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Chain {
    /// `filter` table, jumped to from `FORWARD`.
    Forward,
    /// `nat` table, jumped to from `POSTROUTING`.
    Postrouting,
    /// `raw` table, jumped to from `PREROUTING`: ahead of current Docker's drops of traffic
    /// routed to containers from other interfaces.
    Prerouting,
    /// `mangle` table, jumped to from `FORWARD`: TCP's MSS into the tunnel.
    Mss,
}

impl Chain {
    pub const ALL: [Chain; 4] = [
        Chain::Forward,
        Chain::Postrouting,
        Chain::Prerouting,
        Chain::Mss,
    ];

    pub fn table(self) -> &'static str {
        match self {
            Chain::Forward => "filter",
            Chain::Postrouting => "nat",
            Chain::Prerouting => "raw",
            Chain::Mss => "mangle",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Chain::Forward => "LINKDNS-FORWARD",
            Chain::Postrouting => "LINKDNS-POSTROUTING",
            Chain::Prerouting => "LINKDNS-PREROUTING",
            Chain::Mss => "LINKDNS-MSS",
        }
    }

    pub fn parent(self) -> &'static str {
        match self {
            Chain::Forward | Chain::Mss => "FORWARD",
            Chain::Postrouting => "POSTROUTING",
            Chain::Prerouting => "PREROUTING",
        }
    }
}

/// One of linkdns's chains as the host has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainState {
    pub exists: bool,
    pub rules: Vec<Rule>,
    /// Positions (1-based) of the jumps to this chain in its parent chain.
    pub jumps: Vec<usize>,
    /// Where the jump belongs (1-based, counted without linkdns's own jumps): first, but after
    /// a leading jump to `DOCKER-USER`, where administrators filter container traffic.
    pub position: usize,
}

/// What the host has: routes of every table, interface addresses, linkdns's chains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    pub routes: Vec<HostRoute>,
    pub addresses: Vec<HostAddress>,
    /// linkdns's chains per family; a family whose firewall could not be read is absent.
    pub chains: Vec<(Family, Chain, ChainState)>,
    /// Families whose IP forwarding is on.
    pub forwarding: BTreeSet<Family>,
    /// Interfaces' MTUs, by name.
    pub mtus: BTreeMap<String, u32>,
    /// VXLAN devices, and linkdns's tunnel's entries.
    pub tunnel: TunnelState,
}

impl HostState {
    fn chain(&self, family: Family, chain: Chain) -> Option<&ChainState> {
        self.chains
            .iter()
            .find(|(f, c, _)| *f == family && *c == chain)
            .map(|(_, _, s)| s)
    }
}

/// Another node, as far as routing goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: NodeId,
    pub name: String,
    /// The node's host address (from its peer address); routes to its subnets go via it.
    pub host: Option<IpAddr>,
    pub subnets: Vec<Subnet>,
}

/// What the cluster wants this host to route (the default: nothing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// This node's own container subnets (the far end of every forwarding rule).
    pub local_subnets: Vec<Subnet>,
    /// Every other node that claims a subnet, by id.
    pub peers: Vec<Peer>,
    /// This node's own host address: the tunnel's local end.
    pub local_host: Option<IpAddr>,
    pub encapsulation: Encapsulation,
    /// Networks outside the cluster whose machines may reach this node's containers directly
    /// (their router learned the routes): let in on the interface of the host address.
    pub reach_from: Vec<Subnet>,
    /// The router of this host's default route learns every node's subnets (the nodes
    /// announce them over BGP): with encapsulation `never`, a node that is not on-link is
    /// reached through it.
    pub via_router: bool,
    /// Which claims this host routes at all.
    pub policy: ClaimPolicy,
}

/// Which claims a host routes: those inside the claimable ranges that hold none of the
/// addresses the host reaches its own ways (the cluster's hosts, its upstream resolvers, its
/// BGP routers). A compromised member can claim any free subnet within the claim limit; this
/// keeps it from taking over traffic the hosts send elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimPolicy {
    /// Claims must lie inside one of these.
    pub claimable: Vec<Subnet>,
    /// Addresses no routed claim may hold, with what each is (every node's host address is
    /// protected besides).
    pub protected: Vec<(IpAddr, String)>,
}

impl Default for ClaimPolicy {
    /// The private ranges (RFC 1918, and unique local IPv6), nothing protected but the hosts.
    fn default() -> Self {
        ClaimPolicy {
            claimable: private_ranges(),
            protected: Vec::new(),
        }
    }
}

/// 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and fc00::/7: where Docker's pools and
/// container networks live unless told otherwise.
pub fn private_ranges() -> Vec<Subnet> {
    [
        (IpAddr::from([10, 0, 0, 0]), 8),
        (IpAddr::from([172, 16, 0, 0]), 12),
        (IpAddr::from([192, 168, 0, 0]), 16),
        (IpAddr::from([0xfc00u16, 0, 0, 0, 0, 0, 0, 0]), 7),
    ]
    .into_iter()
    .filter_map(|(addr, prefix)| Subnet::new(addr, prefix))
    .collect()
}

impl Desired {
    /// The routing wanted on node `local`: every other member's claimed subnets, whether or
    /// not the node is hidden as down (withdrawing its route would only send that traffic to
    /// the default route). Removed nodes are gone from the registry, and so are their routes.
    pub fn from_registry(registry: &Registry, local: NodeId) -> Desired {
        let peers = registry
            .subnets()
            .filter(|(id, _)| *id != local)
            .map(|(id, subnets)| {
                let node = registry.node(id);
                Peer {
                    id,
                    name: node.map_or_else(|| format!("node {id}"), |n| n.name.clone()),
                    host: node.and_then(NodeInfo::host_ip),
                    subnets: subnets.to_vec(),
                }
            })
            .collect();
        Desired {
            local_subnets: registry.node_subnets(local).to_vec(),
            peers,
            local_host: registry.node(local).and_then(NodeInfo::host_ip),
            encapsulation: Encapsulation::Auto,
            reach_from: Vec::new(),
            via_router: false,
            policy: ClaimPolicy::default(),
        }
    }
}

/// A route linkdns wants: `dst via via`, for node `node`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: Subnet,
    pub via: IpAddr,
    pub node: String,
    /// The interface towards `via`.
    pub device: String,
    /// Through the tunnel to this host (`via` is then `dst`'s network address, on-link on the
    /// tunnel device).
    pub tunnel: Option<Ipv4Addr>,
    /// `via` is the router of the host's default route, which learned `dst` over BGP.
    pub router: bool,
}

/// How a peer's subnet is reached.
enum Path {
    /// A route via the peer's host address on the interface towards it.
    Direct { via: IpAddr, device: String },
    /// Through the tunnel to the peer's host address.
    Tunnel(Ipv4Addr),
    /// Via the router of the default route, which knows the subnet.
    Router { via: IpAddr, device: String },
}

impl RouteChange {
    /// Destination, then table: the order changes are listed and made in.
    fn order(&self) -> (Subnet, u32) {
        match self {
            RouteChange::Add(r) | RouteChange::Replace { new: r, .. } => (r.dst, MAIN_TABLE),
            RouteChange::Remove { route, .. } => (route.dst, route.table),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteChange {
    Add(Route),
    /// linkdns's own route to the subnet goes elsewhere (the node moved): replaced in place.
    Replace {
        old: HostRoute,
        new: Route,
    },
    /// linkdns's own route that is no longer wanted (or a duplicate of a wanted one).
    Remove {
        route: HostRoute,
        why: String,
    },
}

/// Why a subnet is not routed. Each names what is in the way; nothing in the way is touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// The node's peer address is unspecified, or of the other family than the subnet.
    NoHostAddress,
    /// The subnet overlaps an address of this host's interfaces.
    LocalAddress(HostAddress),
    /// The subnet overlaps a route that linkdns does not own.
    ForeignRoute(HostRoute),
    /// The subnet overlaps this node's own subnet or an earlier node's.
    OtherSubnet { node: String, subnet: Subnet },
    /// The gateway is one of this host's own addresses.
    GatewayIsLocal(IpAddr),
    /// The gateway is on none of this host's connected networks (and no tunnel is allowed).
    GatewayUnreachable(IpAddr),
    /// The peer needs the tunnel, which cannot be had: why.
    NoTunnel(String),
    /// The subnet lies outside every claimable range.
    NotClaimable(Vec<Subnet>),
    /// The subnet holds an address this host reaches its own way: which, and what it is.
    Protected { addr: IpAddr, what: String },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::NoHostAddress => {
                f.write_str("the node has no host address of this family to route through")
            }
            Conflict::LocalAddress(a) => write!(
                f,
                "overlaps this host's address {}/{} on {}",
                a.addr, a.prefix, a.device
            ),
            Conflict::ForeignRoute(r) => {
                write!(
                    f,
                    "overlaps existing route `{r}`, which linkdns does not own"
                )
            }
            Conflict::OtherSubnet { node, subnet } => {
                write!(f, "overlaps {subnet} of node {node}")
            }
            Conflict::GatewayIsLocal(gw) => {
                write!(f, "the gateway {gw} is an address of this host")
            }
            Conflict::GatewayUnreachable(gw) => write!(
                f,
                "the gateway {gw} is not on a directly connected network of this host (and encapsulation is never)"
            ),
            Conflict::NoTunnel(why) => write!(f, "no VXLAN tunnel to its host: {why}"),
            Conflict::NotClaimable(ranges) => {
                let ranges: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "lies outside the claimable ranges ({}; --claimable)",
                    ranges.join(", ")
                )
            }
            Conflict::Protected { addr, what } => write!(f, "holds {addr}, {what}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub subnet: Subnet,
    pub node: String,
    pub conflict: Conflict,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not routing {} of node {}: {}",
            self.subnet, self.node, self.conflict
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirewallChange {
    /// Create the chain if needed and set its rules to exactly these.
    WriteChain {
        family: Family,
        chain: Chain,
        rules: Vec<Rule>,
    },
    /// Make the jump to the chain the parent chain's first rule, and the only jump to it.
    PlaceJump {
        family: Family,
        chain: Chain,
        /// Positions of the existing jumps, to delete.
        existing: Vec<usize>,
        /// Where the one jump goes, counted without the existing ones.
        position: usize,
    },
    /// linkdns's chain is not needed: delete its jumps, then the chain.
    RemoveChain {
        family: Family,
        chain: Chain,
        existing_jumps: Vec<usize>,
    },
}

/// The changes that bring the host to the desired state, and what is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Routes already right.
    pub keep: Vec<Route>,
    /// Things the host should change itself, which linkdns does not (IPv6 forwarding).
    pub notes: Vec<String>,
    pub routes: Vec<RouteChange>,
    pub refused: Vec<Refusal>,
    pub firewall: Vec<FirewallChange>,
    /// Families whose IP forwarding must be switched on.
    pub enable_forwarding: Vec<Family>,
    /// Changes to the tunnel, made after the route removals and before the additions.
    pub tunnel: Vec<TunnelChange>,
    /// Every route wanted (kept or made): how each peer subnet is reached.
    pub wanted: Vec<Route>,
}

impl Plan {
    /// The route changes in the two phases they are made in, around the tunnel's changes:
    /// removals first (an addition never meets a route of linkdns's on its way out), then
    /// additions and replacements.
    pub fn route_phases(&self) -> (&[RouteChange], &[RouteChange]) {
        let first_addition = self
            .routes
            .iter()
            .position(|c| !matches!(c, RouteChange::Remove { .. }))
            .unwrap_or(self.routes.len());
        self.routes.split_at(first_addition)
    }

    /// Whether applying the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
            && self.firewall.is_empty()
            && self.enable_forwarding.is_empty()
            && self.tunnel.is_empty()
    }
}

/// Plans the changes that bring `host` to `desired`. Only routes marked with `protocol`, and
/// only linkdns's chains, are ever changed; anything else in the way is refused and reported.
pub fn plan(desired: &Desired, host: &HostState, protocol: u8) -> Plan {
    let mut plan = Plan::default();
    let mut wanted: Vec<Route> = Vec::new();
    let mut peers = desired.peers.clone();
    peers.sort_by_key(|p| p.id);
    let tunnel = TunnelEnd::of(desired, host);
    for peer in &peers {
        let mut subnets = peer.subnets.clone();
        subnets.sort();
        for subnet in subnets {
            let path = allowed(subnet, desired)
                .and_then(|()| {
                    check(
                        subnet,
                        peer,
                        &desired.local_subnets,
                        &wanted,
                        host,
                        protocol,
                    )
                })
                .and_then(|on_link| choose(subnet, peer, on_link, desired, host, &tunnel));
            match path {
                Ok(Path::Direct { via, device }) => wanted.push(Route {
                    dst: subnet,
                    via,
                    node: peer.name.clone(),
                    device,
                    tunnel: None,
                    router: false,
                }),
                Ok(Path::Router { via, device }) => wanted.push(Route {
                    dst: subnet,
                    via,
                    node: peer.name.clone(),
                    device,
                    tunnel: None,
                    router: true,
                }),
                Ok(Path::Tunnel(remote)) => wanted.push(Route {
                    dst: subnet,
                    via: subnet.addr(),
                    node: peer.name.clone(),
                    device: vxlan::DEVICE.to_string(),
                    tunnel: Some(remote),
                    router: false,
                }),
                Err(conflict) => plan.refused.push(Refusal {
                    subnet,
                    node: peer.name.clone(),
                    conflict,
                }),
            }
        }
    }
    wanted.sort();
    plan.tunnel = plan_tunnel(&tunnel, &wanted, host);
    // A tunnel device that goes (made again, or not wanted) takes its routes with it: they
    // are neither kept nor removed, and made again after a new device.
    let device_goes = plan
        .tunnel
        .iter()
        .any(|c| matches!(c, TunnelChange::Remove { .. }));

    let mut owned: Vec<&HostRoute> = host
        .routes
        .iter()
        .filter(|r| r.protocol == protocol)
        .filter(|r| !(device_goes && r.device.as_deref() == Some(vxlan::DEVICE)))
        .collect();
    owned.sort();
    // Removals go first, so an add never meets a route of linkdns's that is on its way out.
    let mut additions = Vec::new();
    for route in &wanted {
        let mine: Vec<&HostRoute> = owned
            .iter()
            .copied()
            .filter(|r| r.dst == route.dst)
            .collect();
        let right = mine.iter().position(|r| is_exactly(r, route));
        let kept = match right {
            Some(i) => {
                plan.keep.push(route.clone());
                Some(i)
            }
            None => match mine
                .iter()
                .position(|r| r.table == MAIN_TABLE && r.kind == RouteKind::Unicast)
            {
                Some(i) => {
                    additions.push(RouteChange::Replace {
                        old: mine[i].clone(),
                        new: route.clone(),
                    });
                    Some(i)
                }
                None => {
                    additions.push(RouteChange::Add(route.clone()));
                    None
                }
            },
        };
        for (i, extra) in mine.iter().enumerate() {
            if Some(i) != kept {
                plan.routes.push(RouteChange::Remove {
                    route: (*extra).clone(),
                    why: "a duplicate of linkdns's route to this subnet".to_string(),
                });
            }
        }
    }
    for route in owned {
        if wanted.iter().any(|w| w.dst == route.dst) {
            continue;
        }
        let why = match plan.refused.iter().find(|r| r.subnet == route.dst) {
            Some(refusal) => format!("refused now: {}", refusal.conflict),
            None => "no other node claims this subnet".to_string(),
        };
        plan.routes.push(RouteChange::Remove {
            route: route.clone(),
            why,
        });
    }
    plan.routes.sort_by_key(RouteChange::order);
    plan.routes.extend(additions);

    plan_firewall(&mut plan, desired, host, &wanted, &tunnel);
    plan.wanted = wanted;
    plan
}

/// Whether `host_route` is exactly linkdns's route `route` in the main table.
fn is_exactly(host_route: &HostRoute, route: &Route) -> bool {
    host_route.table == MAIN_TABLE
        && host_route.kind == RouteKind::Unicast
        && host_route.gateway == Some(route.via)
        && (route.tunnel.is_none() || host_route.device.as_deref() == Some(vxlan::DEVICE))
}

/// This host's end of the tunnel: the device it would have, or why it cannot have one.
struct TunnelEnd(Result<vxlan::Device, String>);

impl TunnelEnd {
    fn of(desired: &Desired, host: &HostState) -> TunnelEnd {
        TunnelEnd((|| {
            if let Some(why) = host.tunnel.blocked() {
                return Err(why);
            }
            let Some(local) = desired.local_host else {
                return Err("this node has no host address of its own".to_string());
            };
            let IpAddr::V4(local) = local else {
                return Err(format!(
                    "this node's host address {local} is IPv6; VXLAN here carries IPv4"
                ));
            };
            let uplink = host
                .addresses
                .iter()
                .find(|a| a.addr == IpAddr::V4(local))
                .ok_or_else(|| {
                    format!("this node's host address {local} is on none of this host's interfaces")
                })?;
            let mtu = host.mtus.get(&uplink.device).copied().unwrap_or(1500);
            Ok(vxlan::Device::new(local, mtu))
        })())
    }
}

/// How a subnet whose checks passed is reached: directly where its host is on-link (unless
/// encapsulation is always), through the tunnel where allowed, else refused.
fn choose(
    subnet: Subnet,
    peer: &Peer,
    on_link: Option<(IpAddr, String)>,
    desired: &Desired,
    host: &HostState,
    tunnel: &TunnelEnd,
) -> Result<Path, Conflict> {
    let via = peer.host.unwrap_or(subnet.addr());
    match (on_link, desired.encapsulation) {
        (Some((via, device)), Encapsulation::Auto | Encapsulation::Never) => {
            return Ok(Path::Direct { via, device })
        }
        (None, Encapsulation::Never) if desired.via_router => {
            return match default_gateway(host, Family::of(subnet.addr())) {
                Some((via, device)) => Ok(Path::Router { via, device }),
                None => Err(Conflict::GatewayUnreachable(via)),
            };
        }
        (None, Encapsulation::Never) => return Err(Conflict::GatewayUnreachable(via)),
        // IPv6 subnets stay on plain routes.
        (Some((via, device)), Encapsulation::Always) if !subnet.is_ipv4() => {
            return Ok(Path::Direct { via, device })
        }
        _ => {}
    }
    if !subnet.is_ipv4() {
        return Err(Conflict::NoTunnel(format!(
            "{subnet} is IPv6; VXLAN here carries IPv4"
        )));
    }
    let IpAddr::V4(remote) = via else {
        return Err(Conflict::NoTunnel(format!(
            "the node's host address {via} is IPv6"
        )));
    };
    match &tunnel.0 {
        Ok(_) => Ok(Path::Tunnel(remote)),
        Err(why) => Err(Conflict::NoTunnel(why.clone())),
    }
}

/// The gateway and interface of the host's default route of `family` in the main table (the
/// one with the lowest metric).
fn default_gateway(host: &HostState, family: Family) -> Option<(IpAddr, String)> {
    host.routes
        .iter()
        .filter(|r| r.table == MAIN_TABLE && r.dst.prefix() == 0 && r.kind == RouteKind::Unicast)
        .filter(|r| Family::of(r.dst.addr()) == family)
        // A device-only default route (a point-to-point link) has no router to name.
        .filter_map(|r| Some((r.metric, r.gateway?, r.device.clone()?)))
        .min_by_key(|(metric, ..)| *metric)
        .map(|(_, gateway, device)| (gateway, device))
}

/// The tunnel's changes: the device and an entry per remote host and subnet while any route
/// goes through it, nothing (the device removed) otherwise.
fn plan_tunnel(tunnel: &TunnelEnd, wanted: &[Route], host: &HostState) -> Vec<TunnelChange> {
    let mut remotes: Vec<vxlan::Remote> = Vec::new();
    for route in wanted {
        let Some(remote) = route.tunnel else {
            continue;
        };
        match remotes.iter_mut().find(|r| r.host == remote) {
            Some(r) => r.gateways.push(route.via),
            None => remotes.push(vxlan::Remote {
                host: remote,
                gateways: vec![route.via],
            }),
        }
    }
    let device = tunnel.0.as_ref().ok().filter(|_| !remotes.is_empty());
    if device.is_none() && host.tunnel.blocked().is_some() {
        // Someone else's device: never touched.
        return Vec::new();
    }
    vxlan::plan(device, &remotes, &host.tunnel)
}

/// Whether `subnet` is a claim this host routes at all (see [`ClaimPolicy`]).
fn allowed(subnet: Subnet, desired: &Desired) -> Result<(), Conflict> {
    let policy = &desired.policy;
    if !policy.claimable.iter().any(|c| c.covers(&subnet)) {
        return Err(Conflict::NotClaimable(policy.claimable.clone()));
    }
    let hosts = desired
        .peers
        .iter()
        .filter_map(|p| {
            p.host
                .map(|h| (h, format!("the host address of node {}", p.name)))
        })
        .chain(
            desired
                .local_host
                .map(|h| (h, "this host's own address".to_string())),
        );
    match hosts
        .chain(policy.protected.iter().cloned())
        .find(|(addr, _)| subnet.contains(*addr))
    {
        Some((addr, what)) => Err(Conflict::Protected { addr, what }),
        None => Ok(()),
    }
}

/// Checks one peer subnet against this node's subnets, the routes accepted so far (earlier
/// nodes') and everything on this host; if it is clear, the gateway and its interface where
/// the peer's host is on a directly connected network (`None`: it is not).
fn check(
    subnet: Subnet,
    peer: &Peer,
    local: &[Subnet],
    accepted: &[Route],
    host: &HostState,
    protocol: u8,
) -> Result<Option<(IpAddr, String)>, Conflict> {
    let via = peer
        .host
        .filter(|h| Family::of(*h) == Family::of(subnet.addr()))
        .ok_or(Conflict::NoHostAddress)?;
    let taken = local
        .iter()
        .map(|s| ("(this host)", *s))
        .chain(accepted.iter().map(|r| (r.node.as_str(), r.dst)));
    if let Some((node, other)) = taken.into_iter().find(|(_, s)| s.overlaps(&subnet)) {
        return Err(Conflict::OtherSubnet {
            node: node.to_string(),
            subnet: other,
        });
    }
    if let Some(a) = host
        .addresses
        .iter()
        .find(|a| a.network().is_some_and(|n| n.overlaps(&subnet)))
    {
        return Err(Conflict::LocalAddress(a.clone()));
    }
    let mut foreign: Vec<&HostRoute> = host
        .routes
        .iter()
        .filter(|r| r.is_foreign(protocol) && r.dst.overlaps(&subnet))
        .collect();
    foreign.sort();
    if let Some(r) = foreign.first() {
        return Err(Conflict::ForeignRoute((*r).clone()));
    }
    if host.addresses.iter().any(|a| a.addr == via) {
        return Err(Conflict::GatewayIsLocal(via));
    }
    let on_link = host.addresses.iter().find(|a| {
        a.up && a.network().is_some_and(|n| {
            n.contains(via) && (n.prefix() < max_prefix(via) || a.peer == Some(via))
        })
    });
    Ok(on_link.map(|a| (via, a.device.clone())))
}

/// For each family with routes: accept forwarded traffic between this node's subnets and the
/// routed ones both ways, and do not masquerade this node's containers towards them. Families
/// without routes get no chains (a single host is left as it was).
fn plan_firewall(
    plan: &mut Plan,
    desired: &Desired,
    host: &HostState,
    wanted: &[Route],
    tunnel: &TunnelEnd,
) {
    for family in [Family::V4, Family::V6] {
        let remote: Vec<Subnet> = wanted
            .iter()
            .map(|r| r.dst)
            .filter(|s| Family::of(s.addr()) == family)
            .collect();
        let outsiders = desired
            .reach_from
            .iter()
            .any(|s| Family::of(s.addr()) == family);
        if (!remote.is_empty() || outsiders) && !host.forwarding.contains(&family) {
            match family {
                Family::V4 => plan.enable_forwarding.push(family),
                // Switching it on makes the kernel ignore router advertisements, which may be
                // how this host gets its own IPv6 default route: left to the administrator.
                Family::V6 => plan.notes.push("IPv6 forwarding is off, so other hosts' containers cannot reach this host's over IPv6: set net.ipv6.conf.all.forwarding=1 (and accept_ra=2 on interfaces configured by router advertisements)".to_string()),
            }
        }
        // Each local subnet with the interfaces it is on (Docker's bridges, which hold their
        // gateway addresses inside it; a block of `cluster_cidr` holds several): the rules name
        // the interfaces and each bridge's own network, so traffic claiming a cluster source on
        // any other interface is not let in.
        let mut forward = Vec::new();
        let mut nat = Vec::new();
        let mut raw = Vec::new();
        let mut mss = Vec::new();
        if let Ok(device) = &tunnel.0 {
            let mut remotes: Vec<Ipv4Addr> = wanted.iter().filter_map(|r| r.tunnel).collect();
            remotes.sort();
            remotes.dedup();
            if family == Family::V4 && !remotes.is_empty() {
                mss.push(Rule::ClampMss {
                    out_if: vxlan::DEVICE.to_string(),
                    mss: vxlan::clamped_mss(device.mtu),
                });
                // First in the raw chain: only the remote hosts' VXLAN reaches the tunnel.
                for src in remotes {
                    raw.push(Rule::TunnelFrom {
                        src,
                        dst: device.local,
                        port: device.port,
                    });
                }
                raw.push(Rule::TunnelDrop {
                    dst: device.local,
                    port: device.port,
                });
            }
        }
        for l in desired
            .local_subnets
            .iter()
            .filter(|s| Family::of(s.addr()) == family)
        {
            let bridges = bridges_in(host, l);
            if bridges.is_empty() && !remote.is_empty() {
                plan.notes.push(format!("no interface of this host has an address in {l} (is Docker's bridge network up?): traffic from other hosts to it is not let in"));
            }
            for r in wanted.iter().filter(|r| Family::of(r.dst.addr()) == family) {
                for (bridge, network) in &bridges {
                    raw.push(Rule::Admit {
                        src: r.dst,
                        dst: *network,
                        in_if: r.device.clone(),
                    });
                    forward.push(Rule::Accept {
                        src: r.dst,
                        dst: *network,
                        in_if: r.device.clone(),
                        out_if: bridge.to_string(),
                    });
                    forward.push(Rule::Accept {
                        src: *network,
                        dst: r.dst,
                        in_if: bridge.to_string(),
                        out_if: r.device.clone(),
                    });
                }
                nat.push(Rule::NoMasquerade {
                    src: *l,
                    dst: r.dst,
                });
            }
            // Machines of the reach-from networks, on the interface of this host's address
            // (their router sends this host's subnets to it): the same narrow exemption.
            let uplink = desired.local_host.and_then(|h| {
                host.addresses
                    .iter()
                    .find(|a| a.addr == h)
                    .map(|a| a.device.clone())
            });
            let outside = desired
                .reach_from
                .iter()
                .filter(|s| Family::of(s.addr()) == family);
            for network in outside {
                let Some(uplink) = &uplink else {
                    plan.notes.push(format!("this node's host address is on none of this host's interfaces: {network} (reach_from) is not let in"));
                    continue;
                };
                for (bridge, local) in &bridges {
                    raw.push(Rule::Admit {
                        src: *network,
                        dst: *local,
                        in_if: uplink.clone(),
                    });
                    forward.push(Rule::Accept {
                        src: *network,
                        dst: *local,
                        in_if: uplink.clone(),
                        out_if: bridge.to_string(),
                    });
                    forward.push(Rule::Accept {
                        src: *local,
                        dst: *network,
                        in_if: bridge.to_string(),
                        out_if: uplink.clone(),
                    });
                }
                nat.push(Rule::NoMasquerade {
                    src: *l,
                    dst: *network,
                });
            }
        }
        for (chain, rules) in [
            (Chain::Forward, forward),
            (Chain::Postrouting, nat),
            (Chain::Prerouting, raw),
            (Chain::Mss, mss),
        ] {
            // A family whose firewall cannot be read is left alone (reported by the edge).
            let Some(state) = host.chain(family, chain) else {
                continue;
            };
            if rules.is_empty() {
                if state.exists || !state.jumps.is_empty() {
                    plan.firewall.push(FirewallChange::RemoveChain {
                        family,
                        chain,
                        existing_jumps: state.jumps.clone(),
                    });
                }
                continue;
            }
            if !state.exists || state.rules != rules {
                plan.firewall.push(FirewallChange::WriteChain {
                    family,
                    chain,
                    rules,
                });
            }
            if state.jumps != [state.position] {
                plan.firewall.push(FirewallChange::PlaceJump {
                    family,
                    chain,
                    existing: state.jumps.clone(),
                    position: state.position,
                });
            }
        }
    }
}

/// The interfaces of the host with an address in this node's subnet `local`, each with the part
/// of `local` it holds (its own network, or all of `local` for an address wider than it), in
/// order of interface, then network.
fn bridges_in<'h>(host: &'h HostState, local: &Subnet) -> Vec<(&'h str, Subnet)> {
    let mut found: Vec<(&str, Subnet)> = host
        .addresses
        .iter()
        .filter(|a| local.contains(a.addr))
        .filter_map(|a| {
            let network = a.network()?;
            let network = if network.covers(local) {
                *local
            } else {
                network
            };
            Some((a.device.as_str(), network))
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

impl fmt::Display for Rule {
    /// The rule as `iptables -S` prints it after the `-A CHAIN` part.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Accept {
                src,
                dst,
                in_if,
                out_if,
            } => write!(f, "-s {src} -d {dst} -i {in_if} -o {out_if} -j ACCEPT"),
            // ACCEPT ends the nat chain's traversal, so Docker's MASQUERADE after the jump is
            // skipped (a RETURN would come back to it).
            Rule::NoMasquerade { src, dst } => write!(f, "-s {src} -d {dst} -j ACCEPT"),
            Rule::Admit { src, dst, in_if } => {
                write!(f, "-s {src} -d {dst} -i {in_if} -j ACCEPT")
            }
            Rule::ClampMss { out_if, mss } => write!(
                f,
                "-o {out_if} -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {mss}"
            ),
            Rule::TunnelFrom { src, dst, port } => write!(
                f,
                "-s {src}/32 -d {dst}/32 -p udp -m udp --dport {port} -j ACCEPT"
            ),
            Rule::TunnelDrop { dst, port } => {
                write!(f, "-d {dst}/32 -p udp -m udp --dport {port} -j DROP")
            }
            Rule::Unknown(text) => f.write_str(text),
        }
    }
}

impl Rule {
    /// Parses a rule of `chain` as `iptables -S` prints it (without the `-A CHAIN `).
    pub fn parse(chain: Chain, text: &str) -> Rule {
        let words: Vec<&str> = text.split_whitespace().collect();
        let parsed = match words.as_slice() {
            ["-s", src, "-d", dst, "-i", in_if, "-o", out_if, "-j", "ACCEPT"]
                if chain == Chain::Forward =>
            {
                match (src.parse::<Subnet>(), dst.parse::<Subnet>()) {
                    (Ok(src), Ok(dst)) => Some(Rule::Accept {
                        src,
                        dst,
                        in_if: in_if.to_string(),
                        out_if: out_if.to_string(),
                    }),
                    _ => None,
                }
            }
            ["-s", src, "-d", dst, "-j", "ACCEPT"] if chain == Chain::Postrouting => {
                match (src.parse::<Subnet>(), dst.parse::<Subnet>()) {
                    (Ok(src), Ok(dst)) => Some(Rule::NoMasquerade { src, dst }),
                    _ => None,
                }
            }
            ["-o", out_if, "-p", "tcp", "-m", "tcp", "--tcp-flags", "SYN,RST", "SYN", "-j", "TCPMSS", "--set-mss", mss]
                if chain == Chain::Mss =>
            {
                mss.parse().ok().map(|mss| Rule::ClampMss {
                    out_if: out_if.to_string(),
                    mss,
                })
            }
            ["-s", src, "-d", dst, "-p", "udp", "-m", "udp", "--dport", port, "-j", "ACCEPT"]
                if chain == Chain::Prerouting =>
            {
                match (
                    src.strip_suffix("/32").and_then(|a| a.parse().ok()),
                    dst.strip_suffix("/32").and_then(|a| a.parse().ok()),
                    port.parse().ok(),
                ) {
                    (Some(src), Some(dst), Some(port)) => Some(Rule::TunnelFrom { src, dst, port }),
                    _ => None,
                }
            }
            ["-d", dst, "-p", "udp", "-m", "udp", "--dport", port, "-j", "DROP"]
                if chain == Chain::Prerouting =>
            {
                match (
                    dst.strip_suffix("/32").and_then(|a| a.parse().ok()),
                    port.parse().ok(),
                ) {
                    (Some(dst), Some(port)) => Some(Rule::TunnelDrop { dst, port }),
                    _ => None,
                }
            }
            ["-s", src, "-d", dst, "-i", in_if, "-j", "ACCEPT"] if chain == Chain::Prerouting => {
                match (src.parse::<Subnet>(), dst.parse::<Subnet>()) {
                    (Ok(src), Ok(dst)) => Some(Rule::Admit {
                        src,
                        dst,
                        in_if: in_if.to_string(),
                    }),
                    _ => None,
                }
            }
            _ => None,
        };
        parsed.unwrap_or_else(|| Rule::Unknown(text.to_string()))
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tunnel {
            None if self.router => write!(
                f,
                "{} via {} ({}, through the router)",
                self.dst, self.via, self.node
            ),
            None => write!(f, "{} via {} ({})", self.dst, self.via, self.node),
            Some(remote) => write!(
                f,
                "{} via {} dev {} onlink ({}, vxlan to {remote})",
                self.dst, self.via, self.device, self.node
            ),
        }
    }
}

impl fmt::Display for Plan {
    /// One line per change, in the order they apply, then the refusals: what `linkdns routes
    /// --plan` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for route in &self.keep {
            writeln!(f, "keep     {route}")?;
        }
        // In the order they are made: removals, the tunnel, additions.
        let (removals, additions) = self.route_phases();
        for change in removals {
            if let RouteChange::Remove { route, why } = change {
                writeln!(f, "remove   {route}: {why}")?;
            }
        }
        for change in &self.tunnel {
            writeln!(f, "{change}")?;
        }
        for change in additions {
            match change {
                RouteChange::Add(route) => writeln!(f, "add      {route}")?,
                RouteChange::Replace { old, new } => writeln!(f, "replace  {old}  ->  {new}")?,
                RouteChange::Remove { .. } => {}
            }
        }
        for family in &self.enable_forwarding {
            writeln!(f, "enable   {family} forwarding")?;
        }
        for change in &self.firewall {
            match change {
                FirewallChange::WriteChain {
                    family,
                    chain,
                    rules,
                } => {
                    writeln!(
                        f,
                        "write    {family} {} {}: {} rule(s)",
                        chain.table(),
                        chain.name(),
                        rules.len()
                    )?;
                    for rule in rules {
                        writeln!(f, "           -A {} {rule}", chain.name())?;
                    }
                }
                FirewallChange::PlaceJump {
                    family,
                    chain,
                    existing,
                    position,
                } => writeln!(
                    f,
                    "jump     {family} {} {} -> {} at {position} (now at {existing:?})",
                    chain.table(),
                    chain.parent(),
                    chain.name()
                )?,
                FirewallChange::RemoveChain { family, chain, .. } => writeln!(
                    f,
                    "delete   {family} {} {} and its jump",
                    chain.table(),
                    chain.name()
                )?,
            }
        }
        for refusal in &self.refused {
            writeln!(f, "refuse   {refusal}")?;
        }
        for note in &self.notes {
            writeln!(f, "note     {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
