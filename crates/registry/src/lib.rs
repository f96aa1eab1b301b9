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
mod trust;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;

pub use command::{Command, COMMAND_VERSION};
pub use local::{Asker, LocalChange, LocalContainer, LocalNetwork, LocalView, Pending};
pub use lookup::{
    reverse_name_to_ip, Addresses, Reach, Resolution, Scope, SrvQuery, SrvTarget, Vantage,
};
pub use model::{
    canonical_ip, max_prefix, normalize_name, Address, ComposeService, Container, ContainerId,
    LinkAlias, NamedPort, Network, NodeId, NodeInfo, Port, Protocol, Record, RecordAddress, Subnet,
    Version,
};
pub use snapshot::SNAPSHOT_VERSION;
pub use trust::{Authority, ClaimLimit};

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
    #[error("node {node} holds {quota} container records, the most one node may; container {id} is refused")]
    RecordQuota {
        node: NodeId,
        quota: usize,
        id: ContainerId,
    },
    #[error("{count} part(s) of the command were rejected (the rest applied), the first: {first}")]
    PartlyRejected { count: usize, first: Box<Error> },
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
    #[error("subnet {subnet} is wider than the cluster allows (/{limit} at most); claim a narrower subnet, or raise the limit (--max-claim-prefix on the voters)")]
    ClaimTooWide { subnet: Subnet, limit: u8 },
    #[error("subnet {subnet} holds the host address {addr} of node {node}; a claim would route that host's own traffic to another")]
    ClaimCoversHost {
        subnet: Subnet,
        node: NodeId,
        addr: IpAddr,
    },
    #[error("node {proposer} may not change {what} of {}", owner.map_or_else(|| "the cluster (only the leader's maintenance may)".to_string(), |o| format!("node {o}")))]
    NotAuthorized {
        proposer: NodeId,
        what: &'static str,
        owner: Option<NodeId>,
    },
    #[error("a software version of {0} bytes; at most {max} are kept", max = command::MAX_SOFTWARE_VERSION)]
    SoftwareVersionTooLong(usize),
    #[error("the claim limit /{v4} (IPv4), /{v6} (IPv6) is not a pair of prefix lengths")]
    BadClaimLimit { v4: u8, v6: u8 },
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
    /// Ignored: the registry holds a later observation of the container (or of its removal)
    /// by its node's watcher. A delayed or repeated proposal never brings back an old state.
    Stale,
}

impl Outcome {
    /// The outcome of two changes applied together.
    fn and(self, other: Outcome) -> Outcome {
        match (self, other) {
            (Outcome::Changed, _) | (_, Outcome::Changed) => Outcome::Changed,
            (Outcome::Stale, _) | (_, Outcome::Stale) => Outcome::Stale,
            _ => Outcome::Unchanged,
        }
    }
}

/// Most removals remembered per node (tombstones; see [`Registry`]). Beyond it the oldest are
/// forgotten and the node's floor rises past them.
pub const MAX_TOMBSTONES_PER_NODE: usize = 4096;

/// A removed container, remembered so that an older observation of it arriving late (a
/// proposal retried across a change of leader) cannot bring it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub node: NodeId,
    pub version: Version,
}

/// The registry: the state every node replicates, with indexes for DNS lookups.
///
/// Container records are versioned by their node's watcher (see [`Version`]): an update older
/// than the record, or than the tombstone its removal left, is ignored. Tombstones are bounded
/// ([`MAX_TOMBSTONES_PER_NODE`]); forgetting one raises the node's floor above it, and commands
/// of the node older than its floor are ignored. Both happen in `apply`, so every replica,
/// also one restored from a snapshot, holds the same tombstones and floors.
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
    /// The one each renewal replaced, still accepted until it expires: a peer that lags
    /// behind the renewal, or a renewal whose answer was lost, locks nobody out.
    previous_certs: BTreeMap<NodeId, [u8; 32]>,
    /// The container subnets each node claims; no two nodes' subnets overlap.
    subnets: BTreeMap<NodeId, Vec<Subnet>>,
    containers: OrdMap<ContainerId, Arc<Record>>,
    /// Removed containers, by id (see [`Tombstone`]).
    tombstones: OrdMap<ContainerId, Tombstone>,
    /// The same tombstones by node and age, oldest first: which to forget first.
    tombstone_order: OrdSet<(NodeId, Version, ContainerId)>,
    /// How many tombstones each node has.
    tombstone_counts: BTreeMap<NodeId, usize>,
    /// Each node's oldest version still applied (0: every version).
    floors: BTreeMap<NodeId, Version>,
    /// Nodes being removed: each retires when it applies its own retirement.
    retiring: BTreeSet<NodeId>,
    /// The widest subnets a claim may hold.
    claim_limit: ClaimLimit,
    /// SHA-256 of the join secret, once rotated (before: the secret of the cluster's identity).
    join_hash: Option<[u8; 32]>,
    /// The linkdns version each node said it runs.
    software: BTreeMap<NodeId, String>,
    // Indexes, derived from `nodes` and `containers`; rebuilt from them on snapshot restore.
    node_by_name: HashMap<String, NodeId>,
    /// Keyed by the record's own name (shared, not copied).
    by_name: IdIndex<Arc<str>>,
    by_alias: IdIndex<String>,
    by_ip: IpIndex,
    /// Compose services, keyed `<service>.<project>`.
    by_service: IdIndex<String>,
    /// How many containers each compose project has.
    projects: OrdMap<String, usize>,
    /// How many containers use each link alias.
    link_aliases: OrdMap<String, usize>,
    /// The one shared copy of each network the records' addresses are on, with its users.
    networks: OrdMap<Network, (Arc<Network>, usize)>,
    /// How many container records each node holds (see [`RECORD_QUOTA`]).
    per_node: OrdMap<NodeId, usize>,
    /// [`RECORD_QUOTA`], but in this crate's tests (which cannot wait for 100,000 records).
    #[cfg(test)]
    quota: Option<usize>,
}

/// Most container records one node may hold: far more containers than one host runs. A node
/// reporting more (a compromised one, say) has the rest refused, so no member can grow every
/// replica's memory without bound. Part of what the log means: every replica applies the same
/// quota, so changing it needs a new command version.
pub const RECORD_QUOTA: usize = 100_000;

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Applies one command proposed by `by`, refusing what `by` may not change (see
    /// [`Authority`]); the parts of a batch are judged one by one. Deterministic, as
    /// [`Registry::apply`].
    pub fn apply_by(&mut self, by: Authority, command: &Command) -> Result<Outcome, Error> {
        if let Command::Batch(commands) = command {
            return self.apply_each(commands, |r, c| r.apply_by(by, c));
        }
        command.authorized(by)?;
        self.apply(command)
    }

    /// Applies one command, whoever proposed it (the caller checked; tests, snapshots).
    /// Deterministic: reads nothing but `self` and `command`.
    ///
    /// A rejected command (an `Err`) leaves the registry exactly as it was, except a
    /// [`Command::Batch`] or a [`Command::ReplaceContainers`], whose accepted parts stay
    /// applied ([`Error::PartlyRejected`]).
    pub fn apply(&mut self, command: &Command) -> Result<Outcome, Error> {
        match command {
            Command::UpsertNode(node) => self.upsert_node(node),
            Command::ReplaceContainers {
                node,
                containers,
                version,
            } => self.replace_containers(*node, containers, *version),
            Command::UpsertContainer(container) => {
                self.check_container(container)?;
                self.check_quota(container.node, &container.id)?;
                Ok(self.upsert_container(container.clone().normalized()))
            }
            Command::RemoveContainer { node, id, version } => {
                self.known_node(*node)?;
                if let Some(c) = self.containers.get(id) {
                    if c.node != *node {
                        return Err(Error::ContainerOwnedElsewhere {
                            id: id.clone(),
                            owner: c.node,
                            claimed: *node,
                        });
                    }
                }
                Ok(self.remove_observed(*node, id, *version))
            }
            Command::SetNodeDown { node, down } => {
                self.known_node(*node)?;
                Ok(changed(if *down {
                    self.down.insert(*node)
                } else {
                    self.down.remove(node)
                }))
            }
            Command::RemoveNode { node } => {
                let Some(info) = self.nodes.remove(node) else {
                    return Ok(Outcome::Unchanged);
                };
                self.node_by_name.remove(&info.name);
                self.down.remove(node);
                self.certs.remove(node);
                self.previous_certs.remove(node);
                self.subnets.remove(node);
                self.floors.remove(node);
                self.retiring.remove(node);
                self.software.remove(node);
                let ids: Vec<ContainerId> =
                    self.containers_of(*node).map(|c| c.id.clone()).collect();
                for id in ids {
                    self.remove_container(&id);
                }
                let forgotten: Vec<ContainerId> =
                    self.tombstones_of(*node).map(|t| t.2.clone()).collect();
                for id in forgotten {
                    self.forget_tombstone(&id);
                }
                Ok(Outcome::Changed)
            }
            Command::SetNodeCert { node, fingerprint } => {
                self.known_node(*node)?;
                match self.certs.insert(*node, *fingerprint) {
                    Some(old) if old == *fingerprint => Ok(Outcome::Unchanged),
                    Some(old) => {
                        self.previous_certs.insert(*node, old);
                        Ok(Outcome::Changed)
                    }
                    None => Ok(Outcome::Changed),
                }
            }
            Command::SetNodeSubnets { node, subnets } => self.set_subnets(*node, subnets),
            Command::RetireNode { node } => {
                self.known_node(*node)?;
                Ok(changed(self.retiring.insert(*node)))
            }
            Command::SetClaimLimit(limit) => {
                if !limit.is_valid() {
                    return Err(Error::BadClaimLimit {
                        v4: limit.v4,
                        v6: limit.v6,
                    });
                }
                Ok(changed(
                    std::mem::replace(&mut self.claim_limit, *limit) != *limit,
                ))
            }
            Command::SetJoinSecret { hash } => {
                Ok(changed(self.join_hash.replace(*hash) != Some(*hash)))
            }
            Command::SetNodeVersion { node, version } => {
                self.known_node(*node)?;
                if version.len() > command::MAX_SOFTWARE_VERSION {
                    return Err(Error::SoftwareVersionTooLong(version.len()));
                }
                Ok(changed(
                    self.software.insert(*node, version.clone()).as_ref() != Some(version),
                ))
            }
            Command::Batch(commands) => self.apply_each(commands, Registry::apply),
        }
    }

    /// Applies a batch's commands in order with `apply`. Each member is atomic, the batch is
    /// not: a rejected member is skipped and the rest apply. Cloning the registry to make
    /// batches atomic would cost O(records) per log entry.
    fn apply_each(
        &mut self,
        commands: &[Command],
        mut apply: impl FnMut(&mut Registry, &Command) -> Result<Outcome, Error>,
    ) -> Result<Outcome, Error> {
        let mut outcome = Outcome::Unchanged;
        let mut rejected = Vec::new();
        for c in commands {
            match apply(self, c) {
                Ok(o) => outcome = outcome.and(o),
                Err(e) => rejected.push(e),
            }
        }
        partly(outcome, rejected)
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

    /// A claim from a snapshot, as it was accepted: only its shape and overlaps are checked
    /// again, not today's limit or host addresses.
    fn restore_subnets(&mut self, node: NodeId, subnets: Vec<Subnet>) -> Result<(), Error> {
        self.claim(node, &subnets, false).map(|_| ())
    }

    fn set_subnets(&mut self, node: NodeId, subnets: &[Subnet]) -> Result<Outcome, Error> {
        self.claim(node, subnets, true)
    }

    /// Replaces node `node`'s claim; a `new` claim must also fit the claim limit and hold no
    /// node's host address.
    fn claim(&mut self, node: NodeId, subnets: &[Subnet], new: bool) -> Result<Outcome, Error> {
        self.known_node(node)?;
        let mut wanted = subnets.to_vec();
        wanted.sort();
        wanted.dedup();
        for (i, &subnet) in wanted.iter().enumerate() {
            // A subnet the node holds already was judged when it was claimed.
            let new = new && !self.node_subnets(node).contains(&subnet);
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
            let limit = self.claim_limit.for_subnet(&subnet);
            if new && subnet.prefix() < limit {
                return Err(Error::ClaimTooWide { subnet, limit });
            }
            if let Some((holder, addr)) = self.host_in(&subnet).filter(|_| new) {
                return Err(Error::ClaimCoversHost {
                    subnet,
                    node: holder,
                    addr,
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

    /// A node's whole container set as its watcher listed it at `version`. A listed container
    /// that another node holds, or that has no name, is refused on its own: the rest applies.
    fn replace_containers(
        &mut self,
        node: NodeId,
        containers: &[Container],
        version: Version,
    ) -> Result<Outcome, Error> {
        self.known_node(node)?;
        if self.is_stale(node, version) {
            return Ok(Outcome::Stale);
        }
        let mut rejected = Vec::new();
        let mut wanted: BTreeMap<ContainerId, Container> = BTreeMap::new();
        for c in containers {
            let owned = if c.node != node {
                Err(Error::ContainerOwnedElsewhere {
                    id: c.id.clone(),
                    owner: c.node,
                    claimed: node,
                })
            } else {
                self.check_container(c)
            };
            match owned {
                // The listing replaces the node's records: it may hold up to the quota.
                Ok(()) if wanted.len() >= self.record_quota() && !wanted.contains_key(&c.id) => {
                    rejected.push(Error::RecordQuota {
                        node,
                        quota: self.record_quota(),
                        id: c.id.clone(),
                    });
                }
                Ok(()) => {
                    wanted.insert(c.id.clone(), c.clone().normalized());
                }
                Err(e) => rejected.push(e),
            }
        }
        let stale: Vec<ContainerId> = self
            .containers_of(node)
            .filter(|c| !wanted.contains_key(&c.id))
            .map(|c| c.id.clone())
            .collect();
        let mut outcome = Outcome::Unchanged;
        // What it lists first: the removals may forget old tombstones and raise the node's
        // floor past this very listing.
        for mut c in wanted.into_values() {
            if version != 0 {
                // Seen at the listing's version, whatever the container says.
                c.version = version;
            }
            outcome = outcome.and(self.upsert_container(c));
        }
        for id in stale {
            outcome = outcome.and(self.remove_observed(node, &id, version));
        }
        partly(outcome, rejected)
    }

    /// Whether a command of `node` observed at `version` is older than the node's floor, below
    /// which removals were forgotten (unversioned commands are never stale).
    fn is_stale(&self, node: NodeId, version: Version) -> bool {
        version != 0 && self.floors.get(&node).is_some_and(|&floor| version < floor)
    }

    /// Whether a versioned observation of container `id` of `node` at `version` comes too
    /// late: below the node's floor, or older than the record held.
    fn superseded(&self, node: NodeId, id: &ContainerId, version: Version) -> bool {
        self.is_stale(node, version)
            || self
                .containers
                .get(id)
                .is_some_and(|held| held.version > version)
    }

    /// Adds or updates a checked, normalized container unless the registry holds a later
    /// observation of it: a newer record, or a removal at the same version or later.
    fn upsert_container(&mut self, c: Container) -> Outcome {
        let version = c.version;
        if version != 0 {
            if self.superseded(c.node, &c.id, version) {
                return Outcome::Stale;
            }
            if let Some(t) = self.tombstones.get(&c.id).copied() {
                if t.node == c.node && t.version >= version {
                    return Outcome::Stale;
                }
            }
        }
        // Whatever removal was remembered, this observation is later (or unversioned: in log
        // order, so later too).
        self.forget_tombstone(&c.id);
        self.put_container(c)
    }

    /// Removes container `id` if the registry holds it.
    fn remove_if_held(&mut self, id: &ContainerId) -> Outcome {
        let held = self.containers.contains_key(id);
        if held {
            self.remove_container(id);
        }
        changed(held)
    }

    /// Removes container `id` of `node`, seen gone at `version`, unless a later observation is
    /// held; a versioned removal leaves a tombstone, also for a container not (yet) held.
    fn remove_observed(&mut self, node: NodeId, id: &ContainerId, version: Version) -> Outcome {
        if version == 0 {
            return self.remove_if_held(id);
        }
        if self.superseded(node, id, version) {
            return Outcome::Stale;
        }
        let outcome = self.remove_if_held(id);
        match self.tombstones.get(id).copied() {
            Some(t) if t.node == node && t.version >= version => {}
            _ => {
                self.put_tombstone(id.clone(), Tombstone { node, version });
                self.bound_tombstones(node);
            }
        }
        outcome
    }

    /// Remembers a removal (replacing any earlier one of the same container).
    fn put_tombstone(&mut self, id: ContainerId, tombstone: Tombstone) {
        self.forget_tombstone(&id);
        self.tombstone_order
            .insert((tombstone.node, tombstone.version, id.clone()));
        *self.tombstone_counts.entry(tombstone.node).or_default() += 1;
        self.tombstones.insert(id, tombstone);
    }

    fn forget_tombstone(&mut self, id: &ContainerId) {
        if let Some(t) = self.tombstones.remove(id) {
            self.tombstone_order
                .remove(&(t.node, t.version, id.clone()));
            let empty = self.tombstone_counts.get_mut(&t.node).is_some_and(|n| {
                *n -= 1;
                *n == 0
            });
            if empty {
                self.tombstone_counts.remove(&t.node);
            }
        }
    }

    /// Node `node`'s tombstones, oldest first.
    fn tombstones_of(
        &self,
        node: NodeId,
    ) -> impl Iterator<Item = &(NodeId, Version, ContainerId)> + '_ {
        self.tombstone_order
            .range((node, 0, ContainerId::new(""))..)
            .take_while(move |(n, _, _)| *n == node)
    }

    /// Forgets the node's oldest tombstones beyond [`MAX_TOMBSTONES_PER_NODE`], raising its
    /// floor past them: what they guarded against is now refused by age.
    fn bound_tombstones(&mut self, node: NodeId) {
        let held = self.tombstone_counts.get(&node).copied().unwrap_or(0);
        let excess = held.saturating_sub(MAX_TOMBSTONES_PER_NODE);
        if excess == 0 {
            return;
        }
        let oldest: Vec<(Version, ContainerId)> = self
            .tombstones_of(node)
            .take(excess)
            .map(|(_, version, id)| (*version, id.clone()))
            .collect();
        for (version, id) in oldest {
            let floor = self.floors.entry(node).or_default();
            *floor = (*floor).max(version.saturating_add(1));
            self.forget_tombstone(&id);
        }
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

    fn record_quota(&self) -> usize {
        #[cfg(test)]
        if let Some(quota) = self.quota {
            return quota;
        }
        RECORD_QUOTA
    }

    #[cfg(test)]
    pub(crate) fn set_record_quota(&mut self, quota: usize) {
        self.quota = Some(quota);
    }

    /// Whether `node` may have container `id` (held already, or within [`RECORD_QUOTA`]).
    fn check_quota(&self, node: NodeId, id: &ContainerId) -> Result<(), Error> {
        let held = self.per_node.get(&node).copied().unwrap_or(0);
        let quota = self.record_quota();
        if held >= quota && !self.containers.contains_key(id) {
            return Err(Error::RecordQuota {
                node,
                quota,
                id: id.clone(),
            });
        }
        Ok(())
    }

    /// Inserts or replaces a normalized container, keeping the indexes in step.
    fn put_container(&mut self, c: Container) -> Outcome {
        let mut c = Record::from(c);
        if self.containers.get(&c.id).is_some_and(|old| **old == c) {
            return Outcome::Unchanged;
        }
        self.remove_container(&c.id);
        for network in c.addrs_mut().filter_map(|a| a.network.as_mut()) {
            let entry = self
                .networks
                .entry(Network::clone(network))
                .or_insert_with(|| (network.clone(), 0));
            entry.1 += 1;
            *network = entry.0.clone();
        }
        self.by_name.insert(c.name.clone(), &c.id);
        for alias in c.aliases() {
            self.by_alias.insert(alias.clone(), &c.id);
        }
        for ip in c.ips() {
            self.by_ip.insert(ip, &c.id);
        }
        if let Some(compose) = c.compose() {
            self.by_service.insert(compose.name(), &c.id);
            *self.projects.entry(compose.project.clone()).or_default() += 1;
        }
        for link in c.links() {
            *self.link_aliases.entry(link.alias.clone()).or_default() += 1;
        }
        *self.per_node.entry(c.node).or_default() += 1;
        self.containers.insert(c.id.clone(), Arc::new(c));
        Outcome::Changed
    }

    fn remove_container(&mut self, id: &ContainerId) {
        let Some(c) = self.containers.remove(id) else {
            return;
        };
        let emptied = self.per_node.get_mut(&c.node).is_some_and(|n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
        if emptied {
            self.per_node.remove(&c.node);
        }
        self.by_name.remove(&*c.name, id);
        for alias in c.aliases() {
            self.by_alias.remove(alias.as_str(), id);
        }
        for ip in c.ips() {
            self.by_ip.remove(ip, id);
        }
        if let Some(compose) = c.compose() {
            self.by_service.remove(compose.name().as_str(), id);
            count_down(&mut self.projects, &compose.project);
        }
        for link in c.links() {
            count_down(&mut self.link_aliases, &link.alias);
        }
        for network in c.addrs().filter_map(|a| a.network.as_deref()) {
            let unused = self.networks.get_mut(network).is_some_and(|entry| {
                entry.1 -= 1;
                entry.1 == 0
            });
            if unused {
                self.networks.remove(network);
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

    /// The certificate node `id` had before its last renewal, still accepted until it expires.
    pub fn previous_node_cert(&self, id: NodeId) -> Option<&[u8; 32]> {
        self.previous_certs.get(&id)
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
        if let Some(own) = self
            .node_subnets(node)
            .iter()
            .find(|s| s.prefix() == prefix && pool.covers(s))
        {
            return Some(*own);
        }
        pool.blocks(prefix).find(|candidate| {
            self.claimed_elsewhere(node, candidate).is_none()
                && !avoid.iter().any(|a| a.overlaps(candidate))
        })
    }

    /// A node whose registered host address `subnet` holds, with that address.
    fn host_in(&self, subnet: &Subnet) -> Option<(NodeId, IpAddr)> {
        self.nodes.values().find_map(|n| {
            let ip = n.host_ip()?;
            subnet.contains(ip).then_some((n.id, ip))
        })
    }

    /// The node whose registered host address is `ip`.
    pub fn node_at(&self, ip: IpAddr) -> Option<NodeId> {
        let ip = canonical_ip(ip);
        self.nodes
            .values()
            .find(|n| n.host_ip() == Some(ip))
            .map(|n| n.id)
    }

    /// Whether node `id` is being removed (it retires when it applies that).
    /// The linkdns version node `id` said it runs, if it did.
    pub fn software_version(&self, id: NodeId) -> Option<&str> {
        self.software.get(&id).map(String::as_str)
    }

    pub fn is_retiring(&self, id: NodeId) -> bool {
        self.retiring.contains(&id)
    }

    /// Nodes being removed that are still registered.
    pub fn retiring(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.retiring.iter().copied()
    }

    /// The widest subnets a claim may hold.
    pub fn claim_limit(&self) -> ClaimLimit {
        self.claim_limit
    }

    /// SHA-256 of the current join secret, once one was set through the log.
    pub fn join_hash(&self) -> Option<&[u8; 32]> {
        self.join_hash.as_ref()
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

    /// Whether node `node`'s containers are exactly `containers` (as a resync lists them),
    /// observation versions aside: replacing them with these would change nothing else.
    pub fn holds_exactly(&self, node: NodeId, containers: &[Container]) -> bool {
        let unversioned = |mut c: Container| {
            c.version = 0;
            c
        };
        let wanted: BTreeMap<&ContainerId, Container> = containers
            .iter()
            .map(|c| (&c.id, unversioned(c.clone().normalized())))
            .collect();
        let mut held = 0;
        for record in self.containers_of(node) {
            held += 1;
            if wanted.get(&record.id) != Some(&unversioned(record.to_container())) {
                return false;
            }
        }
        held == wanted.len()
    }

    /// Number of container records.
    pub fn record_count(&self) -> usize {
        self.containers.len()
    }

    /// The removal remembered for container `id`, if any.
    pub fn tombstone(&self, id: &ContainerId) -> Option<Tombstone> {
        self.tombstones.get(id).copied()
    }

    /// How many removals are remembered.
    pub fn tombstone_count(&self) -> usize {
        self.tombstones.len()
    }

    /// The latest version of node `node` the registry holds: of a record, a tombstone or its
    /// floor (0 if none). A node's watcher must observe above it.
    pub fn last_version(&self, node: NodeId) -> Version {
        let records = self.containers_of(node).map(|c| c.version).max();
        let tombstones = self.tombstones_of(node).map(|(_, v, _)| *v).max();
        records
            .into_iter()
            .chain(tombstones)
            .chain([self.floor(node).saturating_sub(1)])
            .max()
            .unwrap_or(0)
    }

    /// Node `node`'s floor: its commands observed before this version are ignored.
    pub fn floor(&self, node: NodeId) -> Version {
        self.floors.get(&node).copied().unwrap_or(0)
    }

    /// Compose projects named like a node: `<service>.<project>` reads as node-qualified for
    /// them (the node wins), so their services answer only as `<service>.cluster`.
    pub fn projects_shadowed_by_nodes(&self) -> Vec<&str> {
        self.nodes
            .values()
            .filter(|n| self.projects.contains_key(&n.name))
            .map(|n| n.name.as_str())
            .collect()
    }
}

/// `outcome`, or the rejection of the parts in `rejected` (the others applied).
fn changed(changed: bool) -> Outcome {
    if changed {
        Outcome::Changed
    } else {
        Outcome::Unchanged
    }
}

fn partly(outcome: Outcome, mut rejected: Vec<Error>) -> Result<Outcome, Error> {
    match rejected.len() {
        0 => Ok(outcome),
        count => Err(Error::PartlyRejected {
            count,
            first: Box::new(rejected.swap_remove(0)),
        }),
    }
}

/// Counts one user of `key` less, dropping the key at zero.
fn count_down(counts: &mut OrdMap<String, usize>, key: &str) {
    let gone = counts.get_mut(key).is_some_and(|n| {
        *n -= 1;
        *n == 0
    });
    if gone {
        counts.remove(key);
    }
}

/// An index: the containers under each key. Most keys have one container, held alone in
/// `one` (an 8-byte value); keys with more have theirs, sorted, in `many` instead. A key is
/// in one of the two maps, never both.
#[derive(Clone, Debug)]
struct IdIndex<K: Ord + Clone> {
    one: OrdMap<K, ContainerId>,
    many: OrdMap<K, Box<[ContainerId]>>,
}

impl<K: Ord + Clone> Default for IdIndex<K> {
    fn default() -> Self {
        IdIndex {
            one: OrdMap::new(),
            many: OrdMap::new(),
        }
    }
}

// The index entries' sizes are what a record costs in memory (issue 12's 400 bytes a record).
const _: () = assert!(std::mem::size_of::<ContainerId>() == 8);
const _: () = assert!(std::mem::size_of::<Record>() == 72);

impl<K: Ord + Clone> IdIndex<K> {
    fn insert(&mut self, key: K, id: &ContainerId) {
        if let Some(ids) = self.many.get_mut(&key) {
            if let Err(at) = ids.binary_search(id) {
                let mut more = ids.to_vec();
                more.insert(at, id.clone());
                *ids = more.into_boxed_slice();
            }
            return;
        }
        match self.one.get(&key) {
            None => {
                self.one.insert(key, id.clone());
            }
            Some(one) if one == id => {}
            Some(_) => {
                if let Some(one) = self.one.remove(&key) {
                    let mut both = vec![one, id.clone()];
                    both.sort();
                    self.many.insert(key, both.into_boxed_slice());
                }
            }
        }
    }

    fn remove<Q>(&mut self, key: &Q, id: &ContainerId)
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        if self.one.get(key) == Some(id) {
            self.one.remove(key);
            return;
        }
        let Some(ids) = self.many.get(key) else {
            return;
        };
        let Ok(at) = ids.binary_search(id) else {
            return;
        };
        let mut rest = ids.to_vec();
        rest.remove(at);
        let Some((full_key, _)) = self.many.remove_with_key(key) else {
            return;
        };
        match rest.len() {
            0 => {}
            1 => {
                self.one.insert(full_key, rest.remove(0));
            }
            _ => {
                self.many.insert(full_key, rest.into_boxed_slice());
            }
        }
    }

    /// The containers under `key` (none: empty).
    fn get<Q>(&self, key: &Q) -> &[ContainerId]
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        match self.one.get(key) {
            Some(one) => std::slice::from_ref(one),
            None => self.many.get(key).map_or(&[], |ids| &ids[..]),
        }
    }

    fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.one.contains_key(key) || self.many.contains_key(key)
    }
}

/// Containers by address, IPv4 and IPv6 apart: a 4-byte key where most addresses are IPv4
/// (an `IpAddr` key would take 17 bytes, padded to 24, in every entry).
#[derive(Clone, Debug, Default)]
struct IpIndex {
    v4: IdIndex<std::net::Ipv4Addr>,
    v6: IdIndex<std::net::Ipv6Addr>,
}

impl IpIndex {
    fn insert(&mut self, ip: IpAddr, id: &ContainerId) {
        match ip {
            IpAddr::V4(v4) => self.v4.insert(v4, id),
            IpAddr::V6(v6) => self.v6.insert(v6, id),
        }
    }

    fn remove(&mut self, ip: IpAddr, id: &ContainerId) {
        match ip {
            IpAddr::V4(v4) => self.v4.remove(&v4, id),
            IpAddr::V6(v6) => self.v6.remove(&v6, id),
        }
    }

    fn get(&self, ip: IpAddr) -> &[ContainerId] {
        match ip {
            IpAddr::V4(v4) => self.v4.get(&v4),
            IpAddr::V6(v6) => self.v6.get(&v6),
        }
    }
}

#[cfg(test)]
mod tests;
