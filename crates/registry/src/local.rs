//! This node's own view of its Docker engine, ahead of the log: who is asking (every local
//! container Docker has started or is starting, healthy or not), which networks are this host's,
//! and this node's container changes that the log has not committed yet.
//!
//! A container's first query comes from the host it runs on, so answering it right is local
//! knowledge: none of this waits for Raft. Plain data, changed only by the node's own watcher;
//! never replicated.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use crate::command::Command;
use crate::model::{canonical_ip, Container, ContainerId, LinkAlias, NodeId, Subnet, Version};
use crate::Registry;

/// A Docker network of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalNetwork {
    /// Docker's network id (the full hex digits).
    pub id: String,
    pub name: String,
    pub subnets: Vec<Subnet>,
    /// The host's own addresses on the network (its gateways).
    pub gateways: Vec<IpAddr>,
}

/// A container of this host as far as asking goes: its addresses, networks and link aliases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalContainer {
    pub id: ContainerId,
    pub name: String,
    /// Link aliases from its `linkdns.links` label, normalized.
    pub links: Vec<LinkAlias>,
    /// Addresses Docker has told (empty while it is starting).
    pub ips: Vec<IpAddr>,
    /// Ids of the Docker networks it is on (also those it is being connected to), sorted: an
    /// address of this host is reachable for it only on one of these.
    pub networks: Vec<String>,
    /// Ids of networks Docker is connecting it to whose address it has not told yet.
    pub connecting: BTreeSet<String>,
    /// Askers on the same networks share a class (set by the view): answers cached for one
    /// are right for the others.
    class: u32,
}

impl LocalContainer {
    /// A running container as an inspection shows it.
    pub fn new(
        id: ContainerId,
        name: String,
        links: Vec<LinkAlias>,
        ips: Vec<IpAddr>,
        mut networks: Vec<String>,
    ) -> LocalContainer {
        networks.sort();
        networks.dedup();
        LocalContainer {
            id,
            name,
            links,
            ips,
            networks,
            connecting: BTreeSet::new(),
            class: 0,
        }
    }

    /// The class of its networks in the current view: askers with the same class get the same
    /// answers for names that are not link aliases.
    pub fn class(&self) -> u32 {
        self.class
    }
}

/// What the watcher learned about this host; applied to the [`LocalView`] in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalChange {
    /// The host's Docker networks, all of them.
    Networks(Vec<LocalNetwork>),
    /// Every local container, from a listing (the watcher follows events from here on).
    Replace(Vec<LocalContainer>),
    /// One container as an inspection shows it (running: addresses known).
    Upsert(LocalContainer),
    /// Docker is connecting a container that is starting to a network (the `connect` event
    /// comes before its process runs; its address is told only once it has started).
    Connecting {
        id: ContainerId,
        name: String,
        links: Vec<LinkAlias>,
        network: String,
    },
    /// A network connection went away before its address was told.
    Disconnected { id: ContainerId, network: String },
    /// A container being connected is known to hold `ip` already (its processes' network
    /// namespace has it), before Docker tells its address.
    Identified { id: ContainerId, ip: IpAddr },
    /// The container is not running any more.
    Remove(ContainerId),
    /// Whether events have arrived that the watcher has not handled yet.
    Backlog(bool),
    /// The watcher lost Docker: what it knows may be stale, nothing is inferred until it has
    /// listed again.
    Lost,
}

/// Who sent a query, as far as this host knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asker<'a> {
    /// A container of this host.
    Container(&'a LocalContainer),
    /// An address of a container network of this host that no known container holds: most
    /// likely a container that is starting, whose address the watcher has not learned yet
    /// (worth waiting a moment for).
    Unknown,
    /// Anything else: loopback, the host itself, other hosts, or (while the watcher is not
    /// following Docker) an address this view cannot vouch for.
    Other,
}

/// This host's view; replaced as a whole on every change (cheap: one host's containers).
#[derive(Clone, Debug, Default)]
pub struct LocalView {
    /// The watcher has listed Docker in its current session and follows its events.
    live: bool,
    /// Events are waiting to be handled: a starting container may not be known yet.
    backlog: bool,
    networks: Vec<LocalNetwork>,
    containers: BTreeMap<ContainerId, LocalContainer>,
    by_ip: HashMap<IpAddr, ContainerId>,
    link_aliases: HashSet<String>,
    /// This node's own addresses besides the networks' gateways (its peer address).
    host_addrs: Vec<IpAddr>,
    /// The other nodes' subnets this host has a path to (the routes its route programmer
    /// keeps); `None` where it programs no routes (the administrator routes), when every
    /// claimed subnet counts as reachable.
    paths: Option<Vec<Subnet>>,
}

impl LocalView {
    /// Applies one change of the watcher.
    pub fn apply(&mut self, change: LocalChange) {
        match change {
            LocalChange::Networks(networks) => self.networks = networks,
            LocalChange::Replace(containers) => {
                self.containers = containers
                    .into_iter()
                    .map(|c| (c.id.clone(), normalized(c)))
                    .collect();
                self.live = true;
            }
            LocalChange::Upsert(c) => {
                self.containers.insert(c.id.clone(), normalized(c));
            }
            LocalChange::Connecting {
                id,
                name,
                links,
                network,
            } => {
                let entry = self.containers.entry(id.clone()).or_insert_with(|| {
                    LocalContainer::new(id, name, links, Vec::new(), Vec::new())
                });
                entry.networks.push(network.clone());
                entry.connecting.insert(network);
                *entry = normalized(entry.clone());
            }
            LocalChange::Disconnected { id, network } => {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.connecting.remove(&network);
                    c.networks.retain(|n| *n != network);
                    if c.ips.is_empty() && c.connecting.is_empty() {
                        self.containers.remove(&id);
                    }
                }
            }
            LocalChange::Identified { id, ip } => {
                if let Some(c) = self.containers.get_mut(&id) {
                    c.ips.push(ip);
                    *c = normalized(c.clone());
                }
            }
            LocalChange::Remove(id) => {
                self.containers.remove(&id);
            }
            LocalChange::Backlog(backlog) => self.backlog = backlog,
            LocalChange::Lost => {
                self.live = false;
                self.backlog = false;
            }
        }
        self.reindex();
    }

    /// This node's own addresses (besides its networks' gateways): asking from them is asking
    /// from this host.
    pub fn set_host_addrs(&mut self, addrs: Vec<IpAddr>) {
        self.host_addrs = addrs;
    }

    /// The other nodes' subnets this host has a path to (see [`LocalView::has_path`]); whether
    /// that changed anything.
    pub fn set_paths(&mut self, mut paths: Option<Vec<Subnet>>) -> bool {
        if let Some(p) = paths.as_mut() {
            p.sort();
            p.dedup();
        }
        let changed = self.paths != paths;
        self.paths = paths;
        changed
    }

    /// Whether this host has a path to `ip`, an address in another node's claimed subnet:
    /// inside one of the subnets it routes, or any where routes are not managed here. An
    /// address it has no path to is answered to nobody on this host.
    pub fn has_path(&self, ip: IpAddr) -> bool {
        self.paths
            .as_ref()
            .is_none_or(|paths| paths.iter().any(|s| s.contains(canonical_ip(ip))))
    }

    fn reindex(&mut self) {
        let mut classes: HashMap<Vec<String>, u32> = HashMap::new();
        for c in self.containers.values_mut() {
            let next = u32::try_from(classes.len()).unwrap_or(u32::MAX);
            c.class = *classes.entry(c.networks.clone()).or_insert(next);
        }
        self.by_ip = self
            .containers
            .values()
            .flat_map(|c| c.ips.iter().map(move |ip| (*ip, c.id.clone())))
            .collect();
        self.link_aliases = self
            .containers
            .values()
            .flat_map(|c| c.links.iter().map(|l| l.alias.clone()))
            .collect();
    }

    /// Whether the watcher follows Docker (listed, events followed).
    pub fn is_live(&self) -> bool {
        self.live
    }

    pub fn networks(&self) -> &[LocalNetwork] {
        &self.networks
    }

    pub fn containers(&self) -> impl Iterator<Item = &LocalContainer> {
        self.containers.values()
    }

    /// Whether some local container uses `name` as a link alias (answers for it depend on who
    /// asks). Complements [`Registry::is_link_alias`] for containers the registry does not hold
    /// (starting, or failing their health check).
    pub fn is_link_alias(&self, name: &str) -> bool {
        self.link_aliases.contains(name)
    }

    /// Who `src` is: the local container known to hold the address (Docker told it, or
    /// `/proc` proved it: [`LocalChange::Identified`]). Any other address of a local network
    /// is [`Asker::Unknown`], even with one container being connected there: a container
    /// that answers ARP for a free address must not get a starting container's links and
    /// networks. The DNS server holds such a query while `/proc` is asked which of the
    /// [`LocalView::candidates`] holds the address; an asker still unknown gets what any
    /// container on that network gets.
    pub fn identify(&self, src: IpAddr) -> Asker<'_> {
        let src = canonical_ip(src);
        if let Some(c) = self.by_ip.get(&src).and_then(|id| self.containers.get(id)) {
            return Asker::Container(c);
        }
        if !self.live {
            return Asker::Other;
        }
        // Not an address of a local network, or its gateway (the host).
        if self.network_of(src).is_none() {
            return Asker::Other;
        }
        Asker::Unknown
    }

    /// The containers Docker is connecting to the network of `src` (an address of it that no
    /// known container holds): one of them is the asker at `src`.
    pub fn candidates(&self, src: IpAddr) -> Vec<ContainerId> {
        let Some(network) = self.network_of(src) else {
            return Vec::new();
        };
        self.connecting_to(network).map(|c| c.id.clone()).collect()
    }

    /// The containers Docker is connecting to `network`.
    fn connecting_to<'a>(
        &'a self,
        network: &'a LocalNetwork,
    ) -> impl Iterator<Item = &'a LocalContainer> + 'a {
        self.containers
            .values()
            .filter(move |c| c.connecting.contains(&network.id))
    }

    /// The network of this host that `ip` is an address of (not its gateway's).
    pub fn network_of(&self, ip: IpAddr) -> Option<&LocalNetwork> {
        let ip = canonical_ip(ip);
        self.networks
            .iter()
            .find(|n| n.subnets.iter().any(|s| s.contains(ip)) && !n.gateways.contains(&ip))
    }

    /// Whether `ip` lies in one of this host's Docker networks: this host's routes keep it
    /// here, so another host's container with that address is out of reach from this host.
    pub fn shadows(&self, ip: IpAddr) -> bool {
        self.networks
            .iter()
            .any(|n| n.subnets.iter().any(|s| s.contains(ip)))
    }

    /// Whether `src` is on this host: loopback, the host's own addresses, or an address of one
    /// of its container networks. Host-local addresses are answered only to such askers.
    pub fn is_on_host(&self, src: IpAddr) -> bool {
        let src = canonical_ip(src);
        src.is_loopback()
            || self.host_addrs.contains(&src)
            || self
                .networks
                .iter()
                .any(|n| n.subnets.iter().any(|s| s.contains(src)) || n.gateways.contains(&src))
    }
}

fn normalized(mut c: LocalContainer) -> LocalContainer {
    c.name = crate::model::normalize_name(&c.name);
    let links: BTreeSet<LinkAlias> = c.links.iter().filter_map(LinkAlias::normalized).collect();
    c.links = links.into_iter().collect();
    c.ips = c.ips.into_iter().map(canonical_ip).collect();
    c.ips.sort();
    c.ips.dedup();
    c.networks.extend(c.connecting.iter().cloned());
    c.networks.sort();
    c.networks.dedup();
    c
}

/// This node's container changes that the watcher has seen and the log has not committed yet:
/// laid over the committed registry for DNS, so a container's records are answered as soon as
/// Docker reports them, and dropped once the proposal that carries them is answered.
#[derive(Clone, Debug, Default)]
pub struct Pending {
    /// The latest state of each changed container.
    changes: BTreeMap<ContainerId, Change>,
}

/// The latest observation of one container.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    Up(Box<Container>),
    /// Gone, as seen at this version.
    Gone(Version),
}

impl Pending {
    /// Records a watcher command about `node`'s containers (before it is proposed).
    /// `committed` is the registry as committed now (a resync removes what it does not list).
    pub fn observe(&mut self, command: &Command, node: NodeId, committed: &Registry) {
        match command {
            Command::UpsertContainer(c) if c.node == node => {
                self.changes
                    .insert(c.id.clone(), Change::Up(Box::new(c.clone().normalized())));
            }
            Command::RemoveContainer {
                node: n,
                id,
                version,
            } if *n == node => {
                self.changes.insert(id.clone(), Change::Gone(*version));
            }
            Command::ReplaceContainers {
                node: n,
                containers,
                version,
            } if *n == node => {
                let listed: BTreeSet<&ContainerId> = containers.iter().map(|c| &c.id).collect();
                let stale: Vec<ContainerId> = committed
                    .containers_of(node)
                    .map(|c| c.id.clone())
                    .chain(self.changes.keys().cloned())
                    .filter(|id| !listed.contains(id))
                    .collect();
                for id in stale {
                    self.changes.insert(id, Change::Gone(*version));
                }
                for c in containers.iter().filter(|c| c.node == node) {
                    self.changes
                        .insert(c.id.clone(), Change::Up(Box::new(c.clone().normalized())));
                }
            }
            Command::Batch(commands) => {
                for c in commands {
                    self.observe(c, node, committed);
                }
            }
            _ => {}
        }
    }

    /// Forgets what `command` carried, now that the log has answered it (applied or refused):
    /// the committed registry says it from now on. Later changes of the same containers stay.
    pub fn settle(&mut self, command: &Command) {
        match command {
            Command::UpsertContainer(c) => {
                self.settle_one(&c.id, &Change::Up(Box::new(c.clone().normalized())))
            }
            Command::RemoveContainer { id, version, .. } => {
                self.settle_one(id, &Change::Gone(*version))
            }
            Command::ReplaceContainers {
                containers,
                version,
                ..
            } => {
                let listed: BTreeSet<&ContainerId> = containers.iter().map(|c| &c.id).collect();
                self.changes
                    .retain(|id, change| *change != Change::Gone(*version) || listed.contains(id));
                for c in containers {
                    self.settle_one(&c.id, &Change::Up(Box::new(c.clone().normalized())));
                }
            }
            Command::Batch(commands) => {
                for c in commands {
                    self.settle(c);
                }
            }
            _ => {}
        }
    }

    fn settle_one(&mut self, id: &ContainerId, carried: &Change) {
        if self.changes.get(id) == Some(carried) {
            self.changes.remove(id);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// `registry` with these changes applied, as `node`'s (what the registry would refuse, such
    /// as a container id another node holds, is left out).
    pub fn apply_to(&self, registry: &mut Registry, node: NodeId) {
        for (id, change) in &self.changes {
            let command = match change {
                Change::Up(c) => Command::UpsertContainer(Container::clone(c)),
                Change::Gone(version) => Command::RemoveContainer {
                    node,
                    id: id.clone(),
                    version: *version,
                },
            };
            let _ = registry.apply(&command);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeInfo;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn network(id: &str, subnet: &str, gateway: &str) -> LocalNetwork {
        LocalNetwork {
            id: id.into(),
            name: id.into(),
            subnets: vec![subnet.parse().expect("subnet")],
            gateways: vec![ip(gateway)],
        }
    }

    fn local(id: &str, ips: &[&str], links: &[(&str, &str)]) -> LocalContainer {
        LocalContainer::new(
            ContainerId::new(id),
            id.into(),
            links
                .iter()
                .map(|(t, a)| LinkAlias {
                    target: t.to_string(),
                    alias: a.to_string(),
                })
                .collect(),
            ips.iter().map(|s| ip(s)).collect(),
            vec!["br".into()],
        )
    }

    fn connecting(id: &str, network: &str) -> LocalChange {
        LocalChange::Connecting {
            id: ContainerId::new(id),
            name: id.into(),
            links: vec![LinkAlias {
                target: "mysql".into(),
                alias: "DB".into(),
            }],
            network: network.into(),
        }
    }

    fn view() -> LocalView {
        let mut v = LocalView::default();
        v.apply(LocalChange::Networks(vec![network(
            "br",
            "192.168.1.0/24",
            "192.168.1.1",
        )]));
        v.apply(LocalChange::Replace(vec![local(
            "old",
            &["192.168.1.2"],
            &[],
        )]));
        v
    }

    #[test]
    fn known_containers_gateways_and_strangers() {
        let v = view();
        assert!(matches!(v.identify(ip("192.168.1.2")), Asker::Container(c) if c.name == "old"));
        assert_eq!(v.identify(ip("192.168.1.1")), Asker::Other, "the host");
        assert_eq!(v.identify(ip("127.0.0.1")), Asker::Other);
        assert_eq!(v.identify(ip("172.30.0.2")), Asker::Other, "another host");
        assert_eq!(v.identify(ip("192.168.1.9")), Asker::Unknown);
        assert!(v.is_on_host(ip("192.168.1.9")));
        assert!(v.is_on_host(ip("::1")));
        assert!(!v.is_on_host(ip("172.30.0.2")));
    }

    #[test]
    fn a_container_being_connected_is_known_only_once_proven() {
        let mut v = view();
        v.apply(connecting("new", "br"));
        // Nothing is inferred: whoever holds 192.168.1.3 (a container answering ARP for a
        // free address, say) is unknown until Docker or /proc says who it is.
        assert_eq!(v.identify(ip("192.168.1.3")), Asker::Unknown);
        assert_eq!(
            v.candidates(ip("192.168.1.3")),
            vec![ContainerId::new("new")]
        );
        assert!(v.is_link_alias("db"));
        v.apply(LocalChange::Identified {
            id: ContainerId::new("new"),
            ip: ip("192.168.1.3"),
        });
        let Asker::Container(c) = v.identify(ip("192.168.1.3")) else {
            panic!("the proven container")
        };
        assert_eq!(c.links[0].alias, "db", "normalized");
        // Another free address is not the same container.
        assert_eq!(v.identify(ip("192.168.1.4")), Asker::Unknown);
        v.apply(LocalChange::Connecting {
            id: ContainerId::new("other"),
            name: "other".into(),
            links: vec![],
            network: "br".into(),
        });
        assert_eq!(v.candidates(ip("192.168.1.4")).len(), 2);
        v.apply(LocalChange::Upsert(local("other", &["192.168.1.4"], &[])));
        assert!(matches!(v.identify(ip("192.168.1.4")), Asker::Container(c) if c.name == "other"));
        // A connection that went away before it got an address leaves nothing behind.
        v.apply(LocalChange::Disconnected {
            id: ContainerId::new("new"),
            network: "br".into(),
        });
        assert_eq!(v.identify(ip("192.168.1.5")), Asker::Unknown);
    }

    #[test]
    fn nothing_is_inferred_while_docker_is_lost() {
        let mut v = view();
        v.apply(connecting("new", "br"));
        v.apply(LocalChange::Lost);
        assert_eq!(v.identify(ip("192.168.1.3")), Asker::Other);
        assert!(
            matches!(v.identify(ip("192.168.1.2")), Asker::Container(_)),
            "known addresses still identify"
        );
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.apply(&Command::UpsertNode(NodeInfo {
            id: 1,
            name: "h1".into(),
            peer_addr: "172.30.0.1:7380".into(),
        }))
        .expect("node");
        r
    }

    fn container(id: &str, ip_: &str) -> Container {
        Container::new(id, id, 1).with_ips([ip(ip_)])
    }

    #[test]
    fn pending_changes_lie_over_the_registry_until_settled() {
        let mut committed = registry();
        committed
            .apply(&Command::UpsertContainer(container("gone", "192.168.1.5")))
            .expect("gone");
        let mut pending = Pending::default();
        let up = Command::UpsertContainer(container("web", "192.168.1.2"));
        pending.observe(&up, 1, &committed);
        let resync = Command::ReplaceContainers {
            node: 1,
            containers: vec![container("web", "192.168.1.2")],
            version: 0,
        };
        pending.observe(&resync, 1, &committed);
        let mut shown = committed.clone();
        pending.apply_to(&mut shown, 1);
        assert!(shown.container(&ContainerId::new("web")).is_some());
        assert!(shown.container(&ContainerId::new("gone")).is_none());
        // The upsert is answered (the resync carries the same web); the removal of `gone`
        // waits for the resync.
        pending.settle(&up);
        assert_eq!(pending.len(), 1);
        pending.settle(&resync);
        assert!(pending.is_empty());
        // A later change of the same container outlives the settling of an earlier one.
        pending.observe(&up, 1, &committed);
        let moved = Command::UpsertContainer(container("web", "192.168.1.9"));
        pending.observe(&moved, 1, &committed);
        pending.settle(&up);
        assert_eq!(pending.len(), 1);
        // Other nodes' commands are never pending here.
        let foreign = Command::UpsertContainer(Container {
            node: 2,
            ..container("x", "192.168.2.2")
        });
        pending.observe(&foreign, 1, &committed);
        assert_eq!(pending.len(), 1);
    }
}
