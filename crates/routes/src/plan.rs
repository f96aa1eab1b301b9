//! The route planner: what this host should have (a route to every other node's container
//! subnet via that node's host address, and the forwarding rules container traffic needs),
//! compared with what it has, gives the changes to make and the routes it refuses to make.
//!
//! Pure: no netlink, no iptables, no clock. The edges read [`HostState`] and apply [`Plan`].

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use linkdns_registry::{max_prefix, NodeId, NodeInfo, Registry, Subnet};

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
}

impl Chain {
    pub const ALL: [Chain; 3] = [Chain::Forward, Chain::Postrouting, Chain::Prerouting];

    pub fn table(self) -> &'static str {
        match self {
            Chain::Forward => "filter",
            Chain::Postrouting => "nat",
            Chain::Prerouting => "raw",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Chain::Forward => "LINKDNS-FORWARD",
            Chain::Postrouting => "LINKDNS-POSTROUTING",
            Chain::Prerouting => "LINKDNS-PREROUTING",
        }
    }

    pub fn parent(self) -> &'static str {
        match self {
            Chain::Forward => "FORWARD",
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
    /// The gateway is on none of this host's connected networks.
    GatewayUnreachable(IpAddr),
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
                "the gateway {gw} is not on a directly connected network of this host"
            ),
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
}

impl Plan {
    /// Whether applying the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.firewall.is_empty() && self.enable_forwarding.is_empty()
    }
}

/// Plans the changes that bring `host` to `desired`. Only routes marked with `protocol`, and
/// only linkdns's chains, are ever changed; anything else in the way is refused and reported.
pub fn plan(desired: &Desired, host: &HostState, protocol: u8) -> Plan {
    let mut plan = Plan::default();
    let mut wanted: Vec<Route> = Vec::new();
    let mut peers = desired.peers.clone();
    peers.sort_by_key(|p| p.id);
    for peer in &peers {
        let mut subnets = peer.subnets.clone();
        subnets.sort();
        for subnet in subnets {
            match check(
                subnet,
                peer,
                &desired.local_subnets,
                &wanted,
                host,
                protocol,
            ) {
                Ok((via, device)) => {
                    wanted.push(Route {
                        dst: subnet,
                        via,
                        node: peer.name.clone(),
                        device,
                    });
                }
                Err(conflict) => plan.refused.push(Refusal {
                    subnet,
                    node: peer.name.clone(),
                    conflict,
                }),
            }
        }
    }
    wanted.sort();

    let mut owned: Vec<&HostRoute> = host
        .routes
        .iter()
        .filter(|r| r.protocol == protocol)
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

    plan_firewall(&mut plan, desired, host, &wanted);
    plan
}

/// Whether `host_route` is exactly linkdns's route `route` in the main table.
fn is_exactly(host_route: &HostRoute, route: &Route) -> bool {
    host_route.table == MAIN_TABLE
        && host_route.kind == RouteKind::Unicast
        && host_route.gateway == Some(route.via)
}

/// Checks one peer subnet against this node's subnets, the routes accepted so far (earlier
/// nodes') and everything on this host; the gateway to use, and its interface, if it is clear.
fn check(
    subnet: Subnet,
    peer: &Peer,
    local: &[Subnet],
    accepted: &[Route],
    host: &HostState,
    protocol: u8,
) -> Result<(IpAddr, String), Conflict> {
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
    match on_link {
        Some(a) => Ok((via, a.device.clone())),
        None => Err(Conflict::GatewayUnreachable(via)),
    }
}

/// For each family with routes: accept forwarded traffic between this node's subnets and the
/// routed ones both ways, and do not masquerade this node's containers towards them. Families
/// without routes get no chains (a single host is left as it was).
fn plan_firewall(plan: &mut Plan, desired: &Desired, host: &HostState, wanted: &[Route]) {
    for family in [Family::V4, Family::V6] {
        let remote: Vec<Subnet> = wanted
            .iter()
            .map(|r| r.dst)
            .filter(|s| Family::of(s.addr()) == family)
            .collect();
        if !remote.is_empty() && !host.forwarding.contains(&family) {
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
        }
        for (chain, rules) in [
            (Chain::Forward, forward),
            (Chain::Postrouting, nat),
            (Chain::Prerouting, raw),
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
        write!(f, "{} via {} ({})", self.dst, self.via, self.node)
    }
}

impl fmt::Display for Plan {
    /// One line per change, in the order they apply, then the refusals: what `linkdns routes
    /// --plan` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for route in &self.keep {
            writeln!(f, "keep     {route}")?;
        }
        for change in &self.routes {
            match change {
                RouteChange::Add(route) => writeln!(f, "add      {route}")?,
                RouteChange::Replace { old, new } => writeln!(f, "replace  {old}  ->  {new}")?,
                RouteChange::Remove { route, why } => writeln!(f, "remove   {route}: {why}")?,
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
