//! The naming contract as lookups on the registry: names, node-qualified names, aliases, link
//! aliases scoped to the asking container, and reverse (PTR) names.
//!
//! Names here are relative to the cluster domain, lowercased, without a trailing dot: the DNS
//! front end strips `cluster.` before it asks.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{ContainerId, LinkAlias, NodeId, Record};
use crate::Registry;

/// The answer to a name lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// The name exists. The addresses may be empty (a container without an IP, the zone apex, a
    /// node name): DNS answers NOERROR with no records then.
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
    pub reach: Reach,
}

/// Which addresses an asker can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Every address (administration and tests).
    All,
    /// Addresses inside a subnet their node claims (routed cluster-wide), and, for an asker on
    /// `node`'s own host, that node's host-local addresses too. Host-local networks (Docker's
    /// default pools, say) repeat on every host: elsewhere such an address is unreachable, or
    /// another container's.
    From { node: NodeId, on_host: bool },
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

    /// Resolves `name` (relative to the cluster domain) for an asker.
    ///
    /// Order: a link alias of the asking container, then container names and aliases cluster-wide,
    /// then `<name>.<node>`, then a bare node name (exists, no records). A name whose containers
    /// have no address the asker can reach exists with no addresses (NODATA, never a wrong one).
    pub fn resolve_in(&self, name: &str, scope: &Scope<'_>) -> Resolution {
        if name.is_empty() {
            return Resolution::Found(Vec::new());
        }
        if let Some(ips) = self.resolve_link(name, scope) {
            return Resolution::Found(ips);
        }
        let global = self.named(name);
        if !global.is_empty() {
            return Resolution::Found(
                self.addresses(global.iter().map(|id| &*self.containers[*id]), scope.reach),
            );
        }
        if let Some((head, node_name)) = name.rsplit_once('.') {
            if let Some(node) = self.node_by_name(node_name) {
                let on_node = self
                    .named(head)
                    .into_iter()
                    .map(|id| &*self.containers[id])
                    .filter(|c| c.node == node.id);
                let ips = self.addresses(on_node, scope.reach);
                // `<name>.<node>` exists only if such a container runs there.
                return if ips.is_empty() && !self.has_named_on(head, node.id) {
                    Resolution::NotFound
                } else {
                    Resolution::Found(ips)
                };
            }
        }
        if self.node_by_name(name).is_some() {
            return Resolution::Found(Vec::new());
        }
        Resolution::NotFound
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
    pub fn reverse(&self, ip: IpAddr, local: Option<NodeId>) -> Option<&str> {
        self.container_at(ip, local).map(|c| &*c.name)
    }

    /// The name a PTR query for `ip` answers for an asker: the container there that reaches it
    /// (its own host's first).
    pub fn reverse_in(&self, ip: IpAddr, reach: Reach) -> Option<&str> {
        let local = match reach {
            Reach::All => None,
            Reach::From { node, .. } => Some(node),
        };
        let candidates = self
            .containers_at(ip)
            .filter(|c| self.reaches(c, ip, reach));
        prefer(candidates, local).map(|c| &*c.name)
    }

    /// The container that holds `ip`, preferring one on `local`.
    pub fn container_at(&self, ip: IpAddr, local: Option<NodeId>) -> Option<&Record> {
        prefer(self.containers_at(ip), local)
    }

    /// The visible containers holding `ip`, by id.
    fn containers_at(&self, ip: IpAddr) -> impl Iterator<Item = &Record> {
        self.by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .filter_map(|id| self.containers.get(id).map(|c| &**c))
            .filter(|c| !self.down.contains(&c.node))
    }

    /// Whether address `ip` of container `c` reaches an asker with `reach`.
    pub fn reaches(&self, c: &Record, ip: IpAddr, reach: Reach) -> bool {
        match reach {
            Reach::All => true,
            Reach::From { node, on_host } => {
                (on_host && c.node == node)
                    || self.node_subnets(c.node).iter().any(|s| s.contains(ip))
            }
        }
    }

    /// The addresses a link alias of the asker stands for (None: not its link, or the linked
    /// container is not running).
    pub fn resolve_link(&self, name: &str, scope: &Scope<'_>) -> Option<Vec<IpAddr>> {
        let link = scope.links.iter().find(|l| l.alias == name)?;
        let targets = self.named(&link.target);
        if targets.is_empty() {
            // The linked container is not running: fall through to the cluster-wide names.
            return None;
        }
        Some(self.addresses(targets.iter().map(|id| &*self.containers[*id]), scope.reach))
    }

    /// Containers whose name or alias is `name`, except those of nodes that are down.
    fn named(&self, name: &str) -> BTreeSet<&ContainerId> {
        let by_name = self.by_name.get(name).into_iter().flatten();
        let by_alias = self.by_alias.get(name).into_iter().flatten();
        by_name
            .chain(by_alias)
            .filter(|id| self.visible(id))
            .collect()
    }

    fn visible(&self, id: &ContainerId) -> bool {
        self.down.is_empty()
            || self
                .containers
                .get(id)
                .is_some_and(|c| !self.down.contains(&c.node))
    }

    fn has_named_on(&self, name: &str, node: NodeId) -> bool {
        self.named(name)
            .into_iter()
            .any(|id| self.containers[id].node == node)
    }

    /// The addresses of `containers` that reach the asker, sorted, without duplicates.
    fn addresses<'a>(
        &'a self,
        containers: impl Iterator<Item = &'a Record>,
        reach: Reach,
    ) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = containers
            .flat_map(|c| {
                c.ips
                    .iter()
                    .copied()
                    .filter(move |ip| self.reaches(c, *ip, reach))
            })
            .collect();
        set.into_iter().collect()
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
