//! The naming contract as lookups on the registry: names, node-qualified names, compose
//! services, aliases, link aliases scoped to the asking container, SRV, and reverse (PTR)
//! names — and which of a name's addresses reach the asker.
//!
//! Names here are relative to the cluster domain, lowercased, without a trailing dot: the DNS
//! front end strips `cluster.` before it asks.
//!
//! One rule reads a dotted name (`a.b`, `a.b.c`): if its last label is a node's name, it is
//! node-qualified (`web.h2` is `web` on node `h2`, even if a container is named `web.h2`);
//! else, if it is `<service>.<project>` of a compose service, it is that service; else it is
//! a container name or alias with dots in it. A container `web.h2` on node `h1` is found as
//! `web.h2.h1`, and its PTR name says so.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::local::LocalView;
use crate::model::{ContainerId, LinkAlias, NodeId, Protocol, Record, RecordAddress};
use crate::Registry;

/// The answer to a name lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The name exists. The addresses may be empty (a container without an address the asker
    /// reaches, the zone apex, a node name): DNS answers NOERROR with no records then.
    Found(Vec<IpAddr>),
    /// No such name: NXDOMAIN.
    NotFound,
}

/// Who asks, as far as answers depend on it: the asking container's link aliases, and which
/// addresses reach it.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The asking container's link aliases (empty: it has none, or it is not a known container).
    pub links: &'a [LinkAlias],
    pub reach: Reach<'a>,
}

/// Which addresses an asker can reach.
#[derive(Clone, Copy, Debug)]
pub enum Reach<'a> {
    /// Every address (administration and tests).
    All,
    /// As seen by an asker of node `node`'s DNS:
    /// - an address of another node is reachable if it is routed (inside a subnet its node
    ///   claims) — and, for an asker on this host, not inside one of this host's own networks
    ///   (`host`), where this host's routes keep it local: there it is another container's;
    ///   nor inside a subnet this host has no path to (its route refused: see
    ///   [`LocalView::has_path`]);
    /// - an address of this node goes to the host itself whatever its network, to a container
    ///   of this host only on a network the container is on (Docker isolates its networks from
    ///   each other), and to askers elsewhere only if routed.
    From {
        node: NodeId,
        vantage: Vantage<'a>,
        host: &'a LocalView,
    },
}

/// Where an asker of a node's DNS is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vantage<'a> {
    /// Not on the node's host: another host, or anything beyond.
    Elsewhere,
    /// The host itself: loopback, its addresses, a process that is not a known container.
    Host,
    /// A container of the host, on these Docker networks (ids; empty: not known).
    Container(&'a [String]),
}

impl Vantage<'_> {
    fn on_host(&self) -> bool {
        !matches!(self, Vantage::Elsewhere)
    }
}

/// The addresses of a name that reach an asker: those on the asker's own host first
/// (`local` of them), then the others, each part sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addresses {
    pub ips: Vec<IpAddr>,
    pub local: usize,
}

/// What an SRV query asks for, from its first two labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SrvQuery<'n> {
    /// `_8080._tcp.<name>`
    Port { port: u16, protocol: Protocol },
    /// `_http._tcp.<name>` (label `linkdns.srv=http:8080`).
    Named { name: &'n str, protocol: Protocol },
    /// SRV of `<name>` itself: every port.
    All,
}

impl<'n> SrvQuery<'n> {
    /// Splits `_<service>._<proto>.<name>` into the query and `<name>`; anything else is a
    /// plain name (every port).
    pub fn parse(rel: &'n str) -> (SrvQuery<'n>, &'n str) {
        let mut parts = rel.splitn(3, '.');
        if let (Some(service), Some(proto), Some(name)) = (parts.next(), parts.next(), parts.next())
        {
            if let (Some(service), Some(protocol)) = (
                service.strip_prefix('_').filter(|s| !s.is_empty()),
                proto.strip_prefix('_').and_then(Protocol::from_label),
            ) {
                let query = match service.parse::<u16>() {
                    Ok(port) if port > 0 => SrvQuery::Port { port, protocol },
                    _ => SrvQuery::Named {
                        name: service,
                        protocol,
                    },
                };
                return (query, name);
            }
        }
        (SrvQuery::All, rel)
    }

    /// The ports of `c` this query matches.
    fn ports_of(&self, c: &Record) -> Vec<u16> {
        match *self {
            SrvQuery::Port { port, protocol } => c
                .ports()
                .iter()
                .filter(|p| p.port == port && p.protocol == protocol)
                .map(|p| p.port)
                .collect(),
            SrvQuery::Named { name, protocol } => c
                .services()
                .iter()
                .filter(|s| s.name == name && s.port.protocol == protocol)
                .map(|s| s.port.port)
                .collect(),
            SrvQuery::All => {
                let ports: BTreeSet<u16> = c
                    .ports()
                    .iter()
                    .map(|p| p.port)
                    .chain(c.services().iter().map(|s| s.port.port))
                    .collect();
                ports.into_iter().collect()
            }
        }
    }
}

/// One SRV answer: a port of a container, its target name and the addresses for the
/// additional section (never empty: a container the asker cannot reach is left out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    /// `<container>.<node>`, relative to the domain.
    pub target: String,
    pub port: u16,
    pub addrs: Addresses,
}

impl Registry {
    /// Resolves `name` (relative to the cluster domain) as seen from `source`, the address the
    /// query came from, with every address answered. `local` is the answering node, preferred
    /// when several containers share the source address. See [`Registry::resolve_in`].
    pub fn resolve(&self, name: &str, source: Option<IpAddr>, local: Option<NodeId>) -> Resolution {
        let links = source
            .and_then(|s| self.container_at(s, local))
            .map_or(&[][..], |c| c.links());
        self.resolve_in(
            name,
            &Scope {
                links,
                reach: Reach::All,
            },
        )
    }

    /// Resolves `name` (relative to the cluster domain) for an asker: the addresses of
    /// [`Registry::lookup`]'s containers that reach it, its own host's first. A name whose
    /// containers have no address the asker can reach exists with no addresses (NODATA, never a
    /// wrong one).
    pub fn resolve_in(&self, name: &str, scope: &Scope<'_>) -> Resolution {
        match self.lookup(name, scope.links) {
            Some(records) => Resolution::Found(self.addresses(&records, scope.reach).ips),
            None => Resolution::NotFound,
        }
    }

    /// The containers `name` stands for (`None`: no such name; an empty list: the name exists
    /// without containers — the apex, a node's name).
    ///
    /// Order: a link alias of the asker (`links`), then the name itself by the dotted-name rule
    /// of this module: node-qualified, compose service, container name or alias; then a bare
    /// node name.
    pub fn lookup(&self, name: &str, links: &[LinkAlias]) -> Option<Vec<&Record>> {
        if name.is_empty() {
            return Some(Vec::new());
        }
        if let Some(targets) = self.link_targets(name, links) {
            return Some(targets);
        }
        if let Some(found) = self.lookup_name(name) {
            return Some(found);
        }
        // `_tcp.<name>`, the parent of `_<port>._tcp.<name>`: exists (no records) when a
        // container of `<name>` has a port of that protocol. NXDOMAIN would tell resolvers
        // that nothing exists below it.
        let (proto, rest) = name.split_once('.')?;
        let protocol = proto.strip_prefix('_').and_then(Protocol::from_label)?;
        let has_port = |c: &&Record| {
            c.ports().iter().any(|p| p.protocol == protocol)
                || c.services().iter().any(|s| s.port.protocol == protocol)
        };
        self.lookup(rest, links)?
            .iter()
            .any(has_port)
            .then(Vec::new)
    }

    /// The containers of a link alias of the asker (None: not its link, or the linked
    /// container is not running — the name then means what it means for everyone).
    fn link_targets(&self, name: &str, links: &[LinkAlias]) -> Option<Vec<&Record>> {
        let link = links.iter().find(|l| l.alias == name)?;
        self.lookup_name(&link.target)
            .filter(|targets| !targets.is_empty())
    }

    /// A name for everyone (no link aliases).
    fn lookup_name(&self, name: &str) -> Option<Vec<&Record>> {
        if let Some((head, node_name)) = name.rsplit_once('.') {
            if let Some(node) = self.node_by_name(node_name) {
                // `<name>.<node>` exists only if such a container runs there.
                let on_node: Vec<&Record> = self
                    .named(head)
                    .into_iter()
                    .map(|id| &*self.containers[id])
                    .filter(|c| c.node == node.id)
                    .collect();
                return (!on_node.is_empty()).then_some(on_node);
            }
            let service = self.visible_in(self.by_service.get(name));
            if !service.is_empty() {
                return Some(service);
            }
        }
        let named = self.named(name);
        if !named.is_empty() {
            return Some(named.into_iter().map(|id| &*self.containers[id]).collect());
        }
        // A node's name, or a compose project's (the parent of `<service>.<project>`): the
        // name exists, without records of its own.
        (self.node_by_name(name).is_some() || self.projects.contains_key(name)).then(Vec::new)
    }

    /// The SRV answers for `rel` (`_<port|service>._<proto>.<name>`, or a plain `<name>` for
    /// every port) for an asker: `None` when there is no such name, or when `<name>` exists and
    /// none of its containers has that port. Targets the asker cannot reach are left out.
    pub fn srv_in(&self, rel: &str, scope: &Scope<'_>) -> Option<Vec<SrvTarget>> {
        let (query, name) = SrvQuery::parse(rel);
        let records = self.lookup(name, scope.links)?;
        let mut any = false;
        let mut targets = Vec::new();
        for c in records {
            let ports = query.ports_of(c);
            if ports.is_empty() {
                continue;
            }
            any = true;
            let addrs = self.addresses(&[c], scope.reach);
            let Some(node) = self.node(c.node) else {
                continue;
            };
            if addrs.ips.is_empty() {
                continue;
            }
            let target = format!("{}.{}", c.name, node.name);
            for port in ports {
                targets.push(SrvTarget {
                    target: target.clone(),
                    port,
                    addrs: addrs.clone(),
                });
            }
        }
        if !any && !matches!(query, SrvQuery::All) {
            return None;
        }
        // The asker's own host first, then by target and port.
        targets.sort_by(|a, b| {
            (a.addrs.local == 0, &a.target, a.port).cmp(&(b.addrs.local == 0, &b.target, b.port))
        });
        Some(targets)
    }

    /// Resolves a bare single-label name (`db`, queried without the cluster domain): only link
    /// aliases of the asking container answer it; everything else goes upstream.
    pub fn resolve_bare(
        &self,
        name: &str,
        source: Option<IpAddr>,
        local: Option<NodeId>,
    ) -> Option<Vec<IpAddr>> {
        let links = self.container_at(source?, local)?.links();
        self.resolve_link(
            name,
            &Scope {
                links,
                reach: Reach::All,
            },
        )
    }

    /// Whether some container uses `name` as a link alias: answers for such a name depend on who
    /// asks, so they must not be cached across clients.
    pub fn is_link_alias(&self, name: &str) -> bool {
        self.link_aliases.contains_key(name)
    }

    /// The name a PTR query for `ip` answers: the container's name, relative to the domain.
    pub fn reverse(&self, ip: IpAddr, local: Option<NodeId>) -> Option<Cow<'_, str>> {
        self.container_at(ip, local).map(|c| self.ptr_name(c))
    }

    /// The name a PTR query for `ip` answers for an asker: the container there that reaches it
    /// (its own host's first).
    pub fn reverse_in(&self, ip: IpAddr, reach: Reach<'_>) -> Option<Cow<'_, str>> {
        let local = match reach {
            Reach::All => None,
            Reach::From { node, .. } => Some(node),
        };
        let candidates = self
            .containers_at(ip)
            .filter(|c| c.addrs().any(|a| a.ip() == ip && self.reaches(c, a, reach)));
        prefer(candidates, local).map(|c| self.ptr_name(c))
    }

    /// The one name a container is answered under for PTR, relative to the domain: its name,
    /// or `<name>.<node>` when its name would read as node-qualified (see the module's rule).
    pub fn ptr_name<'a>(&'a self, c: &'a Record) -> Cow<'a, str> {
        // The name would read as node-qualified, or as a compose service.
        let shadowed = c
            .name
            .rsplit_once('.')
            .is_some_and(|(_, last)| self.node_by_name.contains_key(last))
            || self.by_service.contains_key(&*c.name);
        match (shadowed, self.node(c.node)) {
            (true, Some(node)) => Cow::Owned(format!("{}.{}", c.name, node.name)),
            _ => Cow::Borrowed(&c.name),
        }
    }

    /// The container that holds `ip`, preferring one on `local`.
    pub fn container_at(&self, ip: IpAddr, local: Option<NodeId>) -> Option<&Record> {
        prefer(self.containers_at(ip), local)
    }

    /// The visible containers holding `ip`, by id.
    fn containers_at(&self, ip: IpAddr) -> impl Iterator<Item = &Record> {
        self.by_ip
            .get(ip)
            .iter()
            .filter_map(|id| self.containers.get(id).map(|c| &**c))
            .filter(|c| !self.down.contains(&c.node))
    }

    /// Whether address `addr` of container `c` reaches an asker with `reach` (see [`Reach`]).
    pub fn reaches(&self, c: &Record, addr: &RecordAddress, reach: Reach<'_>) -> bool {
        let Reach::From {
            node,
            vantage,
            host,
        } = reach
        else {
            return true;
        };
        let routed = || {
            self.node_subnets(c.node)
                .iter()
                .any(|s| s.contains(addr.ip()))
        };
        if c.node == node {
            return match vantage {
                Vantage::Elsewhere => routed(),
                Vantage::Host => true,
                Vantage::Container(networks) => {
                    networks.is_empty()
                        || addr
                            .network
                            .as_ref()
                            .is_none_or(|n| networks.contains(&n.id))
                }
            };
        }
        routed() && !(vantage.on_host() && (host.shadows(addr.ip()) || !host.has_path(addr.ip())))
    }

    /// The addresses a link alias of the asker stands for (None: not its link, or the linked
    /// container is not running).
    pub fn resolve_link(&self, name: &str, scope: &Scope<'_>) -> Option<Vec<IpAddr>> {
        self.link_addresses(name, scope).map(|a| a.ips)
    }

    /// [`Registry::resolve_link`], with the asker's own host's addresses counted.
    pub fn link_addresses(&self, name: &str, scope: &Scope<'_>) -> Option<Addresses> {
        let targets = self.link_targets(name, scope.links)?;
        Some(self.addresses(&targets, scope.reach))
    }

    /// The addresses of `containers` that reach the asker: the asker's own host's first, each
    /// part sorted, without duplicates within a part (an address cannot be on two hosts'
    /// parts: the same address on this host and another is this host's only, as another
    /// host's it is shadowed here).
    pub fn addresses(&self, containers: &[&Record], reach: Reach<'_>) -> Addresses {
        let here = match reach {
            Reach::From { node, vantage, .. } if vantage.on_host() => Some(node),
            _ => None,
        };
        let mut found: Vec<(bool, IpAddr)> = containers
            .iter()
            .flat_map(|c| {
                c.addrs()
                    .filter(move |a| self.reaches(c, a, reach))
                    .map(move |a| (here != Some(c.node), a.ip()))
            })
            .collect();
        found.sort();
        found.dedup_by(|a, b| a.1 == b.1);
        Addresses {
            local: found.iter().take_while(|(elsewhere, _)| !elsewhere).count(),
            ips: found.into_iter().map(|(_, ip)| ip).collect(),
        }
    }

    /// Containers whose name or alias is `name`, except those of nodes that are down.
    fn named(&self, name: &str) -> BTreeSet<&ContainerId> {
        let by_name = self.by_name.get(name).iter();
        let by_alias = self.by_alias.get(name).iter();
        by_name
            .chain(by_alias)
            .filter(|id| self.visible(id))
            .collect()
    }

    /// The visible containers of an index entry.
    fn visible_in(&self, ids: &[ContainerId]) -> Vec<&Record> {
        ids.iter()
            .filter(|id| self.visible(id))
            .filter_map(|id| self.containers.get(id).map(|c| &**c))
            .collect()
    }

    fn visible(&self, id: &ContainerId) -> bool {
        self.down.is_empty()
            || self
                .containers
                .get(id)
                .is_some_and(|c| !self.down.contains(&c.node))
    }
}

/// The first of `candidates` on node `local`, else the first of all (without collecting them:
/// this runs for queries on the answer path).
fn prefer<'a>(
    mut candidates: impl Iterator<Item = &'a Record>,
    local: Option<NodeId>,
) -> Option<&'a Record> {
    let first = candidates.next()?;
    match local {
        Some(node) if first.node != node => {
            Some(candidates.find(|c| c.node == node).unwrap_or(first))
        }
        _ => Some(first),
    }
}

/// Parses a reverse-lookup name (`4.3.2.1.in-addr.arpa`, nibbles `.ip6.arpa`, lowercased, no
/// trailing dot) into the address it names. Partial names (a whole /24) give `None`.
pub fn reverse_name_to_ip(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut octets = [0u8; 4];
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() != 4 {
            return None;
        }
        for (i, label) in labels.iter().rev().enumerate() {
            if label.is_empty() || label.len() > 3 || (label.len() > 1 && label.starts_with('0')) {
                return None;
            }
            octets[i] = label.parse().ok()?;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(octets)));
    }
    if let Some(rest) = name.strip_suffix(".ip6.arpa") {
        let labels: Vec<&str> = rest.split('.').collect();
        if labels.len() != 32 {
            return None;
        }
        let mut value: u128 = 0;
        for label in labels.iter().rev() {
            let mut chars = label.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return None;
            };
            value = (value << 4) | u128::from(c.to_digit(16)?);
        }
        return Some(IpAddr::V6(Ipv6Addr::from(value)));
    }
    None
}
