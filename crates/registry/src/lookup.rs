//! The naming contract as lookups on the registry: names, node-qualified names, aliases, link
//! aliases scoped to the asking container, and reverse (PTR) names.
//!
//! Names here are relative to the cluster domain, lowercased, without a trailing dot: the DNS
//! front end strips `cluster.` before it asks.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::model::{ContainerId, NodeId, Record};
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

impl Registry {
    /// Resolves `name` (relative to the cluster domain) as seen from `source`, the address the
    /// query came from. `local` is the answering node, preferred when several containers share the
    /// source address (hosts whose bridges use the same subnet).
    ///
    /// Order: a link alias of the asking container, then container names and aliases cluster-wide,
    /// then `<name>.<node>`, then a bare node name (exists, no records).
    pub fn resolve(&self, name: &str, source: Option<IpAddr>, local: Option<NodeId>) -> Resolution {
        if name.is_empty() {
            return Resolution::Found(Vec::new());
        }
        if let Some(ips) = self.resolve_link(name, source, local) {
            return Resolution::Found(ips);
        }
        let global = self.named(name);
        if !global.is_empty() {
            return Resolution::Found(addresses(global.iter().map(|id| &*self.containers[*id])));
        }
        if let Some((head, node_name)) = name.rsplit_once('.') {
            if let Some(node) = self.node_by_name(node_name) {
                let on_node = self
                    .named(head)
                    .into_iter()
                    .map(|id| &*self.containers[id])
                    .filter(|c| c.node == node.id);
                let ips = addresses(on_node);
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
        self.resolve_link(name, source, local)
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

    /// The container that holds `ip`, preferring one on `local`.
    pub fn container_at(&self, ip: IpAddr, local: Option<NodeId>) -> Option<&Record> {
        let ids = self.by_ip.get(&ip)?;
        let mut candidates = ids
            .iter()
            .filter_map(|id| self.containers.get(id).map(|c| &**c))
            .filter(|c| !self.down.contains(&c.node));
        match local {
            Some(node) => {
                let all: Vec<&Record> = candidates.collect();
                all.iter()
                    .find(|c| c.node == node)
                    .or_else(|| all.first())
                    .copied()
            }
            None => candidates.next(),
        }
    }

    fn resolve_link(
        &self,
        name: &str,
        source: Option<IpAddr>,
        local: Option<NodeId>,
    ) -> Option<Vec<IpAddr>> {
        let asker = self.container_at(source?, local)?;
        let link = asker.links().iter().find(|l| l.alias == name)?;
        let targets = self.named(&link.target);
        if targets.is_empty() {
            // The linked container is not running: fall through to the cluster-wide names.
            return None;
        }
        Some(addresses(targets.iter().map(|id| &*self.containers[*id])))
    }

    /// Containers whose name or alias is `name`.
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
}

fn addresses<'a>(containers: impl Iterator<Item = &'a Record>) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = containers.flat_map(|c| c.ips.iter().copied()).collect();
    set.into_iter().collect()
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
