//! The replicated state machine of linkdns: nodes, containers, the closed command set, a
//! deterministic `apply`, the lookup indexes behind the naming contract, and snapshots.
//!
//! Plain Rust: no clock, no I/O, no async. `apply` depends only on the registry and the command,
//! so every replica that applies the same log holds the same registry.

mod command;
mod local;
mod lookup;
mod model;
mod snapshot;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use imbl::OrdMap;
use std::net::IpAddr;
use std::sync::Arc;

pub use command::{Command, COMMAND_VERSION};
pub use local::{Asker, LocalChange, LocalContainer, LocalNetwork, LocalView, Pending};
pub use lookup::{reverse_name_to_ip, Reach, Resolution, Scope};
pub use model::{
    canonical_ip, max_prefix, normalize_name, Container, ContainerId, LinkAlias, NodeId, NodeInfo,
    Port, Protocol, Record, Subnet,
};
pub use snapshot::SNAPSHOT_VERSION;

/// Errors of the registry. The `apply` variants are deterministic: every replica reaches the same
/// one for the same log, so they are results of a command, never reasons to stop a node.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    #[error("node {0} is not a member of the registry; it must register (UpsertNode) before reporting containers")]
    UnknownNode(NodeId),
    #[error("node name {name:?} is already used by node {owner}; pick another --node-name")]
    NodeNameTaken { name: String, owner: NodeId },
    #[error("container {id} is reported by node {claimed} but belongs to node {owner}")]
    ContainerOwnedElsewhere {
        id: ContainerId,
        owner: NodeId,
        claimed: NodeId,
    },
    #[error("container {id} has an empty name")]
    EmptyName { id: ContainerId },
    #[error("{count} command(s) of a batch were rejected, the first: {first}")]
    BatchPartlyRejected { count: usize, first: Box<Error> },
    #[error("subnet {subnet} overlaps {owner_subnet} of node {owner_name} (id {owner}); give this host's Docker network a subnet of its own")]
    SubnetTaken {
        subnet: Subnet,
        owner: NodeId,
        owner_name: String,
        owner_subnet: Subnet,
    },
    #[error("subnet {subnet} cannot be a container subnet: {reason}")]
    BadSubnet {
        subnet: Subnet,
        reason: &'static str,
    },
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("{what} has encoding version {found}, this build reads version {supported}; upgrade linkdns")]
    UnsupportedVersion {
        what: &'static str,
        found: u8,
        supported: u8,
    },
}

/// The registry as of an applied Raft index: what DNS answers from. Replaced as a whole, never
/// changed in place.
///
/// The Raft node publishes the committed registry. The DNS front end reads a copy that also
/// carries this node's [`LocalView`] and has its [`Pending`] own-container changes laid over
/// the registry (see `linkdns`'s `view.rs`); `version` then counts those publications.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Index of the last log entry reflected in `registry`; changes whenever the registry does.
    pub applied: u64,
    pub registry: Registry,
    /// This host's own view of its Docker engine (empty in the committed publication).
    pub local: Arc<LocalView>,
    /// Bumped on every publication of a local view: with `applied`, tells an answer cache that
    /// what it holds may be stale.
    pub version: u64,
}

impl Published {
    /// The committed registry as of `applied`, with an empty local view.
    pub fn committed(applied: u64, registry: Registry) -> Published {
        Published {
            applied,
            registry,
            ..Published::default()
        }
    }
}

/// What applying a command did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
}

/// The registry: the state every node replicates, with indexes for DNS lookups.
///
/// The container map and the indexes are persistent maps (`imbl::OrdMap`): a clone — one per
/// published version — shares everything with the original and costs O(1); a change copies only
/// the few tree nodes on its path. So the applying side and every published version together
/// hold about one copy of the data.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    nodes: BTreeMap<NodeId, NodeInfo>,
    /// Nodes whose containers are hidden from answers (stopped reporting; see `SetNodeDown`).
    down: BTreeSet<NodeId>,
    /// The highest node id ever registered: ids of removed nodes are never handed out again.
    max_node_id: NodeId,
    /// Each node's certificate fingerprint (SHA-256 of its DER).
    certs: BTreeMap<NodeId, [u8; 32]>,
    /// The container subnets each node claims; no two nodes' subnets overlap.
    subnets: BTreeMap<NodeId, Vec<Subnet>>,
    containers: OrdMap<ContainerId, Arc<Record>>,
    // Indexes, derived from `nodes` and `containers`; rebuilt from them on snapshot restore.
    node_by_name: HashMap<String, NodeId>,
    /// Keyed by the record's own name (shared, not copied).
    by_name: OrdMap<Arc<str>, IdSet>,
    by_alias: OrdMap<String, IdSet>,
    by_ip: OrdMap<IpAddr, IdSet>,
    /// How many containers use each link alias.
    link_aliases: OrdMap<String, usize>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Applies one command. Deterministic: reads nothing but `self` and `command`.
    ///
    /// A rejected command (an `Err`) leaves the registry exactly as it was, except a
    /// [`Command::Batch`], whose accepted members stay applied.
    pub fn apply(&mut self, command: &Command) -> Result<Outcome, Error> {
        match command {
            Command::UpsertNode(node) => self.upsert_node(node),
            Command::ReplaceContainers { node, containers } => {
                self.replace_containers(*node, containers)
            }
            Command::UpsertContainer(container) => {
                self.check_container(container)?;
                Ok(self.put_container(container.clone().normalized()))
            }
            Command::RemoveContainer { node, id } => {
                self.known_node(*node)?;
                match self.containers.get(id) {
                    Some(c) if c.node != *node => Err(Error::ContainerOwnedElsewhere {
                        id: id.clone(),
                        owner: c.node,
                        claimed: *node,
                    }),
                    Some(_) => {
                        self.remove_container(id);
                        Ok(Outcome::Changed)
                    }
                    None => Ok(Outcome::Unchanged),
                }
            }
            Command::SetNodeDown { node, down } => {
                self.known_node(*node)?;
                let changed = if *down {
                    self.down.insert(*node)
                } else {
                    self.down.remove(node)
                };
                Ok(if changed {
                    Outcome::Changed
                } else {
                    Outcome::Unchanged
                })
            }
            Command::RemoveNode { node } => {
                let Some(info) = self.nodes.remove(node) else {
                    return Ok(Outcome::Unchanged);
                };
                self.node_by_name.remove(&info.name);
                self.down.remove(node);
                self.certs.remove(node);
                self.subnets.remove(node);
                let ids: Vec<ContainerId> =
                    self.containers_of(*node).map(|c| c.id.clone()).collect();
                for id in ids {
                    self.remove_container(&id);
                }
                Ok(Outcome::Changed)
            }
            Command::SetNodeCert { node, fingerprint } => {
                self.known_node(*node)?;
                if self.certs.contains_key(node) {
                    return Ok(Outcome::Unchanged);
                }
                self.certs.insert(*node, *fingerprint);
                Ok(Outcome::Changed)
            }
            Command::SetNodeSubnets { node, subnets } => self.set_subnets(*node, subnets),
            Command::Batch(commands) => {
                // Each member is atomic, the batch is not: a rejected member is skipped and the
                // rest apply, in order. Cloning the registry to make batches atomic would cost
                // O(records) per log entry.
                let mut outcome = Outcome::Unchanged;
                let mut rejected = Vec::new();
                for c in commands {
                    match self.apply(c) {
                        Ok(Outcome::Changed) => outcome = Outcome::Changed,
                        Ok(Outcome::Unchanged) => {}
                        Err(e) => rejected.push(e),
                    }
                }
                match rejected.len() {
                    0 => Ok(outcome),
                    count => Err(Error::BatchPartlyRejected {
                        count,
                        first: Box::new(rejected.swap_remove(0)),
                    }),
                }
            }
        }
    }

    fn upsert_node(&mut self, node: &NodeInfo) -> Result<Outcome, Error> {
        let name = normalize_name(&node.name);
        if let Some(&owner) = self.node_by_name.get(&name) {
            if owner != node.id {
                return Err(Error::NodeNameTaken { name, owner });
            }
        }
        let node = NodeInfo {
            name: name.clone(),
            ..node.clone()
        };
        if self.nodes.get(&node.id) == Some(&node) {
            return Ok(Outcome::Unchanged);
        }
        let id = node.id;
        self.max_node_id = self.max_node_id.max(id);
        if let Some(old) = self.nodes.insert(id, node) {
            self.node_by_name.remove(&old.name);
        }
        self.node_by_name.insert(name, id);
        Ok(Outcome::Changed)
    }

    fn set_subnets(&mut self, node: NodeId, subnets: &[Subnet]) -> Result<Outcome, Error> {
        self.known_node(node)?;
        let mut wanted = subnets.to_vec();
        wanted.sort();
        wanted.dedup();
        for (i, &subnet) in wanted.iter().enumerate() {
            // Decoded from the log: a prefix too long or host bits set is not a network.
            if Subnet::new(subnet.addr(), subnet.prefix()) != Some(subnet) {
                return Err(Error::BadSubnet {
                    subnet,
                    reason: "it is not a network address (host bits set, or prefix too long)",
                });
            }
            if subnet.prefix() == 0 {
                return Err(Error::BadSubnet {
                    subnet,
                    reason: "it covers every address (prefix length 0)",
                });
            }
            if wanted[..i].iter().any(|other| other.overlaps(&subnet)) {
                return Err(Error::BadSubnet {
                    subnet,
                    reason: "it overlaps another subnet of the same claim",
                });
            }
            if let Some((owner, owner_subnet)) = self.claimed_elsewhere(node, &subnet) {
                return Err(Error::SubnetTaken {
                    subnet,
                    owner,
                    owner_name: self
                        .nodes
                        .get(&owner)
                        .map_or_else(String::new, |n| n.name.clone()),
                    owner_subnet,
                });
            }
        }
        let current = self.subnets.get(&node).map_or(&[][..], Vec::as_slice);
        if current == wanted.as_slice() {
            return Ok(Outcome::Unchanged);
        }
        if wanted.is_empty() {
            self.subnets.remove(&node);
        } else {
            self.subnets.insert(node, wanted);
        }
        Ok(Outcome::Changed)
    }

    fn replace_containers(
        &mut self,
        node: NodeId,
        containers: &[Container],
    ) -> Result<Outcome, Error> {
        self.known_node(node)?;
        for c in containers {
            if c.node != node {
                return Err(Error::ContainerOwnedElsewhere {
                    id: c.id.clone(),
                    owner: c.node,
                    claimed: node,
                });
            }
            self.check_container(c)?;
        }
        let wanted: BTreeMap<ContainerId, Container> = containers
            .iter()
            .map(|c| (c.id.clone(), c.clone().normalized()))
            .collect();
        let stale: Vec<ContainerId> = self
            .containers
            .values()
            .filter(|c| c.node == node && !wanted.contains_key(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let mut outcome = Outcome::Unchanged;
        for id in stale {
            self.remove_container(&id);
            outcome = Outcome::Changed;
        }
        for c in wanted.into_values() {
            if self.put_container(c) == Outcome::Changed {
                outcome = Outcome::Changed;
            }
        }
        Ok(outcome)
    }

    fn known_node(&self, node: NodeId) -> Result<(), Error> {
        if self.nodes.contains_key(&node) {
            Ok(())
        } else {
            Err(Error::UnknownNode(node))
        }
    }

    fn check_container(&self, c: &Container) -> Result<(), Error> {
        self.known_node(c.node)?;
        if normalize_name(&c.name).is_empty() {
            return Err(Error::EmptyName { id: c.id.clone() });
        }
        match self.containers.get(&c.id) {
            Some(existing) if existing.node != c.node => Err(Error::ContainerOwnedElsewhere {
                id: c.id.clone(),
                owner: existing.node,
                claimed: c.node,
            }),
            _ => Ok(()),
        }
    }

    /// Inserts or replaces a normalized container, keeping the indexes in step.
    fn put_container(&mut self, c: Container) -> Outcome {
        let c = Record::from(c);
        if self.containers.get(&c.id).is_some_and(|old| **old == c) {
            return Outcome::Unchanged;
        }
        self.remove_container(&c.id);
        index_insert(&mut self.by_name, c.name.clone(), &c.id);
        for alias in c.aliases() {
            index_insert(&mut self.by_alias, alias.clone(), &c.id);
        }
        for ip in &c.ips {
            index_insert(&mut self.by_ip, *ip, &c.id);
        }
        for link in c.links() {
            *self.link_aliases.entry(link.alias.clone()).or_default() += 1;
        }
        self.containers.insert(c.id.clone(), Arc::new(c));
        Outcome::Changed
    }

    fn remove_container(&mut self, id: &ContainerId) {
        let Some(c) = self.containers.remove(id) else {
            return;
        };
        index_remove(&mut self.by_name, &*c.name, id);
        for alias in c.aliases() {
            index_remove(&mut self.by_alias, alias.as_str(), id);
        }
        for ip in &c.ips {
            index_remove(&mut self.by_ip, ip, id);
        }
        for link in c.links() {
            if let Some(count) = self.link_aliases.get_mut(&link.alias) {
                *count -= 1;
                if *count == 0 {
                    self.link_aliases.remove(&link.alias);
                }
            }
        }
    }

    /// All nodes, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(&id)
    }

    pub fn node_by_name(&self, name: &str) -> Option<&NodeInfo> {
        self.node_by_name
            .get(&normalize_name(name))
            .and_then(|id| self.nodes.get(id))
    }

    /// Whether the node's containers are hidden from answers (it stopped reporting).
    pub fn is_down(&self, id: NodeId) -> bool {
        self.down.contains(&id)
    }

    /// The certificate fingerprint node `id` must present to its peers, once bound.
    pub fn node_cert(&self, id: NodeId) -> Option<&[u8; 32]> {
        self.certs.get(&id)
    }

    /// The container subnets node `id` claims (empty if none).
    pub fn node_subnets(&self, id: NodeId) -> &[Subnet] {
        self.subnets.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Every node's claimed subnets, by node id.
    pub fn subnets(&self) -> impl Iterator<Item = (NodeId, &[Subnet])> {
        self.subnets.iter().map(|(&n, s)| (n, s.as_slice()))
    }

    /// A subnet of a node other than `node` that overlaps `subnet`, with its owner.
    pub fn claimed_elsewhere(&self, node: NodeId, subnet: &Subnet) -> Option<(NodeId, Subnet)> {
        self.subnets
            .iter()
            .filter(|(&owner, _)| owner != node)
            .find_map(|(&owner, theirs)| {
                let hit = theirs.iter().find(|s| s.overlaps(subnet))?;
                Some((owner, *hit))
            })
    }

    /// The subnet node `node` should claim inside `pool`, in blocks of `/prefix`: the block it
    /// claims already, else the first block that overlaps neither another node's claim nor any
    /// of `avoid` (the host's own networks, say). None if the pool is full.
    pub fn free_subnet(
        &self,
        node: NodeId,
        pool: Subnet,
        prefix: u8,
        avoid: &[Subnet],
    ) -> Option<Subnet> {
        /// Blocks looked at, at most (a /8 pool has 65,536 /24s).
        const MAX_BLOCKS: u128 = 1 << 20;
        let bits = model::max_prefix(pool.addr());
        if prefix < pool.prefix() || prefix > bits {
            return None;
        }
        if let Some(own) = self
            .node_subnets(node)
            .iter()
            .find(|s| s.prefix() == prefix && pool.covers(s))
        {
            return Some(*own);
        }
        let base = match pool.addr() {
            IpAddr::V4(a) => u128::from(u32::from(a)),
            IpAddr::V6(a) => u128::from(a),
        };
        let blocks = 1u128
            .checked_shl(u32::from(prefix - pool.prefix()))
            .unwrap_or(u128::MAX)
            .min(MAX_BLOCKS);
        let step = 1u128.checked_shl(u32::from(bits - prefix)).unwrap_or(0);
        (0..blocks)
            .filter_map(|i| {
                let addr = base.checked_add(i.checked_mul(step)?)?;
                let addr = if pool.is_ipv4() {
                    IpAddr::V4(u32::try_from(addr).ok()?.into())
                } else {
                    IpAddr::V6(addr.into())
                };
                Subnet::new(addr, prefix)
            })
            .find(|candidate| {
                self.claimed_elsewhere(node, candidate).is_none()
                    && !avoid.iter().any(|a| a.overlaps(candidate))
            })
    }

    /// The node whose claimed subnet holds `ip`.
    pub fn subnet_owner(&self, ip: IpAddr) -> Option<NodeId> {
        self.subnets
            .iter()
            .find(|(_, subnets)| subnets.iter().any(|s| s.contains(ip)))
            .map(|(&n, _)| n)
    }

    /// Whether node `id` was registered once and has been removed since. (An id above every
    /// id this registry has seen belongs to a node that joined after this replica's state.)
    pub fn was_removed(&self, id: NodeId) -> bool {
        id <= self.max_node_id && !self.nodes.contains_key(&id)
    }

    /// The id to give the next node that joins: above every id ever registered.
    pub fn next_node_id(&self) -> NodeId {
        self.max_node_id + 1
    }

    /// All containers, by id.
    pub fn containers(&self) -> impl Iterator<Item = &Record> {
        self.containers.values().map(|c| &**c)
    }

    pub fn container(&self, id: &ContainerId) -> Option<&Record> {
        self.containers.get(id).map(|c| &**c)
    }

    /// Containers of one node, by id.
    pub fn containers_of(&self, node: NodeId) -> impl Iterator<Item = &Record> {
        self.containers
            .values()
            .map(|c| &**c)
            .filter(move |c| c.node == node)
    }

    /// Number of container records.
    pub fn record_count(&self) -> usize {
        self.containers.len()
    }
}

/// The containers under one index key. Most keys have one: that one is held inline, with no
/// allocation of its own; more are a sorted vector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum IdSet {
    One(ContainerId),
    Many(Vec<ContainerId>),
}

impl IdSet {
    fn insert(&mut self, id: &ContainerId) {
        match self {
            IdSet::One(one) if one == id => {}
            IdSet::One(one) => {
                let mut v = vec![one.clone(), id.clone()];
                v.sort();
                *self = IdSet::Many(v);
            }
            IdSet::Many(v) => {
                if let Err(at) = v.binary_search(id) {
                    v.insert(at, id.clone());
                }
            }
        }
    }

    /// Removes `id`; `true` when the set is now empty.
    fn remove(&mut self, id: &ContainerId) -> bool {
        match self {
            IdSet::One(one) => one == id,
            IdSet::Many(v) => {
                if let Ok(at) = v.binary_search(id) {
                    v.remove(at);
                }
                match v.len() {
                    0 => true,
                    1 => {
                        *self = IdSet::One(v.remove(0));
                        false
                    }
                    _ => false,
                }
            }
        }
    }

    fn iter(&self) -> std::slice::Iter<'_, ContainerId> {
        match self {
            IdSet::One(one) => std::slice::from_ref(one).iter(),
            IdSet::Many(v) => v.iter(),
        }
    }
}

impl<'a> IntoIterator for &'a IdSet {
    type Item = &'a ContainerId;
    type IntoIter = std::slice::Iter<'a, ContainerId>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

fn index_insert<K: Ord + Clone>(index: &mut OrdMap<K, IdSet>, key: K, id: &ContainerId) {
    match index.get_mut(&key) {
        Some(set) => set.insert(id),
        None => {
            index.insert(key, IdSet::One(id.clone()));
        }
    }
}

fn index_remove<K, Q>(index: &mut OrdMap<K, IdSet>, key: &Q, id: &ContainerId)
where
    K: Ord + Clone + std::borrow::Borrow<Q>,
    Q: Ord + ?Sized,
{
    let empty = index.get_mut(key).is_some_and(|set| set.remove(id));
    if empty {
        index.remove(key);
    }
}

#[cfg(test)]
mod tests;
