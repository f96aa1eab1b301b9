//! The node's routing duties: claims this host's container subnet in the registry, and keeps
//! the host's routes and forwarding rules in step with the cluster's claims through
//! [`linkdns_routes::Programmer`] — at start, on every change of the claims or members, after
//! Docker reconnects, and every [`RECONCILE_EVERY`] in any case.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use linkdns_raft::{NodeHandle, Proposal};
use linkdns_registry::{Command, LocalNetwork, NodeId, Subnet};
use linkdns_routes::{ClaimPolicy, Desired, Encapsulation, Programmer, Report};

use crate::catch_up::CatchUp;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

/// A reconciliation this often even when nothing changed (someone deleted a route, Docker
/// rewrote its rules).
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// Other nodes' subnet claims, by node.
type Claims = Vec<(NodeId, Vec<Subnet>)>;

/// `GET /routes` and `linkdns routes`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RoutesStatus {
    /// Whether linkdns programs this host's routes.
    pub enabled: bool,
    /// Why not, when it does not.
    pub disabled: Option<String>,
    pub protocol: u8,
    /// This node's claimed container subnets, as the registry has them.
    pub subnets: Vec<String>,
    /// Why the registry refused this node's claim, if it did.
    pub claim_refused: Option<String>,
    /// linkdns's routes on this host.
    pub routes: Vec<String>,
    /// linkdns's firewall rules on this host.
    pub rules: Vec<String>,
    /// How each other node's subnet is reached: `<node> <subnet>: direct via <host> on <if>`
    /// or `... vxlan to <host>`.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The BGP sessions with routers, which learn this host's subnets from it.
    #[serde(default)]
    pub bgp: Vec<crate::announce::BgpSession>,
    /// Subnets of other nodes not routed, and why.
    pub refused: Vec<String>,
    /// What could not be read or changed at the last reconciliation.
    pub errors: Vec<String>,
    /// What the host's administrator should change (IPv6 forwarding, a missing bridge).
    #[serde(default)]
    pub notes: Vec<String>,
    /// Changes still to make (`--plan`; empty once reconciled).
    pub plan: Vec<String>,
    /// Reconciliations done since start.
    #[serde(default)]
    pub reconciliations: u64,
}

/// `GET /docker-config` and `linkdns docker-config`: the Docker daemon settings
/// (`/etc/docker/daemon.json`) that fit this host's place in the cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DockerConfig {
    /// Whether the node knows enough of this host to say (its Docker networks, its block).
    #[serde(default)]
    pub ready: bool,
    /// The keys to put into daemon.json.
    pub daemon: serde_json::Map<String, serde_json::Value>,
    /// What the settings do, and what they cannot (or, not ready, what is missing).
    pub notes: Vec<String>,
}

impl DockerConfig {
    /// The settings for a host whose networks are `networks`, whose DNS listens on the
    /// gateways of `bridge_network`, and whose claim is `block` of `cluster_cidr`, if any:
    /// - `dns` and `dns-search`: containers ask this node, and find names in `domain`;
    /// - with a block wider than one network: `bip` (Docker's bridge in the block: its subnet
    ///   if it is in the block already, else the first network-sized subnet of the block no
    ///   other Docker network uses) and `default-address-pools` (the block, in networks of
    ///   /24 or /64), so that every network Docker makes — compose's `<project>_default`
    ///   too — is in the block, and so routed cluster-wide.
    pub fn for_host(
        networks: &[LocalNetwork],
        bridge_network: &str,
        domain: &str,
        block: Option<Subnet>,
    ) -> DockerConfig {
        let mut config = DockerConfig::default();
        if !networks.iter().any(|n| n.name == bridge_network) {
            config.notes.push(format!("the Docker network {bridge_network} is not known yet (is Docker running, and has linkdns made it?); ask again in a moment"));
            return config;
        }
        config.ready = true;
        let dns: Vec<String> = networks
            .iter()
            .filter(|n| n.name == bridge_network)
            .flat_map(|n| n.gateways.iter().filter(|g| g.is_ipv4()))
            .map(ToString::to_string)
            .collect();
        if dns.is_empty() {
            config.notes.push(format!("the Docker network {bridge_network} has no IPv4 gateway yet, so there is no address to give containers as their DNS server"));
        } else {
            config.daemon.insert("dns".into(), dns.into());
            config
                .daemon
                .insert("dns-search".into(), vec![domain.to_string()].into());
        }
        let Some(block) = block else {
            config.notes.push("Docker's networks other than the bridge network stay host-local: start linkdns with --cluster-cidr to give this host a block that holds them all".to_string());
            return config;
        };
        if !block.is_ipv4() {
            config.notes.push(format!("this host's block {block} is IPv6: Docker's bridge and address pools are not set from it; other Docker networks (compose's) stay host-local"));
            return config;
        }
        let size = linkdns_docker::network_prefix(&block);
        if size == block.prefix() {
            config.notes.push(format!("this host's block {block} holds one network ({bridge_network}); other Docker networks (compose's) stay host-local. A wider block (--subnet-prefix 20 for IPv4) holds them too"));
            return config;
        }
        let in_block = |n: &LocalNetwork| n.subnets.iter().copied().find(|s| block.covers(s));
        let bridge = networks
            .iter()
            .find(|n| n.name == "bridge")
            .and_then(in_block);
        let taken: Vec<Subnet> = networks
            .iter()
            .filter(|n| n.name != "bridge")
            .flat_map(|n| n.subnets.iter().copied())
            .collect();
        match bridge.or_else(|| linkdns_docker::free_network(block, &taken)) {
            Some(subnet) => {
                config.daemon.insert(
                    "bip".into(),
                    format!("{}/{}", subnet.first_host(), subnet.prefix()).into(),
                );
            }
            None => config.notes.push(format!(
                "no subnet of {block} is free for Docker's bridge; it keeps its own (host-local)"
            )),
        }
        config.daemon.insert(
            "default-address-pools".into(),
            serde_json::json!([{ "base": block.to_string(), "size": size }]),
        );
        config.notes.push(format!("with these settings (and Docker restarted), every network Docker makes on this host is in {block}, routed to this host by every other host"));
        config
    }
}

/// Why linkdns cannot program this host alongside a Docker engine whose firewall backend is
/// `backend`, if it cannot: it writes iptables rules, and an engine on nftables (Docker 29's
/// `"firewall-backend": "nftables"`) keeps its own drops where those rules do not reach.
pub fn firewall_refusal(backend: Option<&str>) -> Option<String> {
    let backend = backend?;
    backend.contains("nftables").then(|| {
        format!("Docker's firewall backend is {backend}; linkdns programs iptables, which does not get past Docker's nftables rules. Set \"firewall-backend\": \"iptables\" in /etc/docker/daemon.json and restart Docker, or run linkdns with --routing false to serve DNS only")
    })
}

/// Shared between the routing tasks and the admin endpoint.
pub struct Routing {
    node: Arc<NodeHandle>,
    protocol: u8,
    encapsulation: Encapsulation,
    /// Networks outside the cluster let in to this host's containers.
    reach_from: Vec<Subnet>,
    /// Which claims this host routes (the claimable ranges, the addresses no claim may hold).
    policy: ClaimPolicy,
    /// The BGP speaker, when there are routers to tell.
    announcer: std::sync::OnceLock<Arc<crate::announce::Announcer>>,
    /// `None` when routes are programmed; else why not.
    disabled: Option<String>,
    /// The Docker engine's firewall backend refuses routing (see [`firewall_refusal`]).
    engine_refusal: Mutex<Option<String>>,
    status: Mutex<RoutesStatus>,
    /// The one programmer that changes the host; `None` once withdrawn (the node left), so a
    /// reconciliation still under way cannot put routes back.
    programmer: Arc<Mutex<Option<Programmer>>>,
    reconcile_now: Notify,
    wanted: watch::Sender<Option<Vec<Subnet>>>,
    /// With `cluster_cidr`: the pool this host's subnet comes from; only subnets inside it are
    /// claimed (Docker also gives an IPv6 pool's network an IPv4 subnet of its own).
    pool: Option<Subnet>,
    /// See [`CatchUp`].
    catch_up: CatchUp,
    docker: HostDocker,
    /// The last plan and when it was made: plans (a dry run of the firewall, four iptables
    /// runs) come at most once per [`PLAN_EVERY`], one at a time; askers in between get it.
    last_plan: tokio::sync::Mutex<Option<(std::time::Instant, RoutesStatus)>>,
}

/// How often `/routes?plan=true` makes a new plan.
const PLAN_EVERY: Duration = Duration::from_secs(1);

/// What [`Routing::docker_config`] reads of this host: its Docker networks (the view's), the
/// network whose gateway DNS listens on, and the cluster domain.
pub struct HostDocker {
    pub view: Arc<crate::view::View>,
    pub bridge_network: String,
    pub domain: String,
}

/// The routing settings of a node (from its configuration).
pub struct RoutingConfig {
    pub enabled: bool,
    pub protocol: u8,
    pub encapsulation: Encapsulation,
    /// Networks outside the cluster let in to this host's containers.
    pub reach_from: Vec<Subnet>,
    /// `cluster_cidr`: the block this host's subnet is allocated from.
    pub pool: Option<Subnet>,
    /// Which claims this host routes.
    pub policy: ClaimPolicy,
}

impl Routing {
    pub fn new(node: Arc<NodeHandle>, config: RoutingConfig, docker: HostDocker) -> Arc<Routing> {
        let RoutingConfig {
            enabled,
            protocol,
            encapsulation,
            reach_from,
            pool,
            policy,
        } = config;
        let disabled = if !enabled {
            Some("routing is off in the configuration (routing = false)".to_string())
        } else if !linkdns_routes::has_net_admin() {
            Some("this process lacks CAP_NET_ADMIN; run linkdns as root (or grant the capability) to program routes".to_string())
        } else {
            None
        };
        match &disabled {
            Some(reason) => tracing::warn!(%reason, "not programming routes; DNS works as usual"),
            None => tracing::info!(
                protocol,
                "programming routes to the other hosts' container subnets"
            ),
        }
        Arc::new(Routing {
            policy,
            engine_refusal: Mutex::new(None),
            protocol,
            encapsulation,
            reach_from,
            announcer: std::sync::OnceLock::new(),
            disabled,
            status: Mutex::new(RoutesStatus::default()),
            programmer: Arc::new(Mutex::new(Some(Programmer::new(protocol)))),
            reconcile_now: Notify::new(),
            wanted: watch::channel(None).0,
            pool,
            catch_up: CatchUp::new(&node),
            node,
            docker,
            last_plan: tokio::sync::Mutex::new(None),
        })
    }

    /// The Docker daemon settings for this host (see [`DockerConfig::for_host`]).
    pub fn docker_config(&self) -> DockerConfig {
        let published = self.docker.view.published().load_full();
        let block = self.pool.and_then(|pool| {
            published
                .registry
                .node_subnets(self.node.id())
                .iter()
                .copied()
                .find(|s| pool.covers(s))
        });
        if !published.local.is_live() {
            return DockerConfig {
                notes: vec!["Docker's networks are not known yet (the watcher is not following Docker: see `linkdns status`); ask again once it is".to_string()],
                ..DockerConfig::default()
            };
        }
        if self.pool.is_some() && block.is_none() {
            return DockerConfig {
                notes: vec!["no block of cluster_cidr is claimed for this host yet (see `linkdns routes`); ask again once it is".to_string()],
                ..DockerConfig::default()
            };
        }
        DockerConfig::for_host(
            published.local.networks(),
            &self.docker.bridge_network,
            &self.docker.domain,
            block,
        )
    }

    /// What the cluster wants this host to route, as this node reaches other hosts.
    fn desired(&self, registry: &linkdns_registry::Registry) -> Desired {
        Desired {
            encapsulation: self.encapsulation,
            reach_from: self.reach_from.clone(),
            // The routers this node announces to learn every node's subnets the same way.
            via_router: self.announcer.get().is_some(),
            policy: self.policy.clone(),
            ..Desired::from_registry(registry, self.node.id())
        }
    }

    /// The BGP speaker that tells routers this host's subnets (shown in status, stopped with
    /// the routes).
    pub fn set_announcer(&self, announcer: Arc<crate::announce::Announcer>) {
        let _ = self.announcer.set(announcer);
    }

    /// Ends the BGP sessions (a Cease: the routers withdraw this host's subnets).
    pub async fn stop_announcing(&self) {
        if let Some(announcer) = self.announcer.get() {
            announcer.stop().await;
        }
    }

    /// Whether routes are programmed (else `status` says why not).
    pub fn enabled(&self) -> bool {
        self.disabled.is_none()
    }

    /// Whether this replica holds the cluster's view (see [`CatchUp`]): routes and claims
    /// change only then.
    fn caught_up(&self) -> bool {
        self.catch_up.done(&self.node)
    }

    /// The container subnets this host's Docker network has (after every Docker connect): the
    /// claim, unless the host's claim is a block of `cluster_cidr` (which holds that network).
    pub fn set_local_subnets(&self, subnets: Vec<Subnet>) {
        if self.pool.is_none() && !subnets.is_empty() {
            self.wanted.send_replace(Some(subnets));
        }
        // Docker may have rewritten its rules above linkdns's on a restart.
        self.reconcile_now.notify_one();
    }

    /// The engine's firewall backend, at every connect: routing stops (and says why) while it
    /// is one linkdns cannot work with, and goes on once it is not.
    pub fn set_firewall_backend(&self, backend: Option<&str>) {
        let refusal = firewall_refusal(backend);
        let Ok(mut current) = self.engine_refusal.lock() else {
            return;
        };
        if *current != refusal {
            match &refusal {
                Some(why) => tracing::error!(reason = %why, "not programming routes"),
                None if self.disabled.is_none() => {
                    tracing::info!(
                        ?backend,
                        "Docker's firewall backend is one linkdns works with; programming routes"
                    )
                }
                None => {}
            }
            *current = refusal;
            self.reconcile_now.notify_one();
        }
    }

    fn engine_refusal(&self) -> Option<String> {
        self.engine_refusal.lock().ok().and_then(|r| r.clone())
    }

    /// Docker's networks changed (one made or removed): the forwarding rules name each bridge
    /// of this host's claim.
    pub fn networks_changed(&self) {
        self.reconcile_now.notify_one();
    }

    /// What a reconciliation would do now, changing nothing (a programmer of its own, so it
    /// never waits for one under way).
    async fn dry_run(&self, desired: Desired) -> Report {
        let protocol = self.protocol;
        tokio::task::spawn_blocking(move || Programmer::new(protocol).reconcile(&desired, false))
            .await
            .unwrap_or_default()
    }

    /// Without the capability to remove them, says so if an earlier run left routes behind
    /// (listing routes needs no privilege).
    async fn warn_of_leftovers(&self) {
        let protocol = self.protocol;
        let report = self.dry_run(Desired::default()).await;
        if !report.owned_routes.is_empty() {
            tracing::warn!(routes = report.owned_routes.len(), "routes of an earlier run remain (ip route show proto {protocol}) and this process cannot remove them: run linkdns once as root with routing = false, or delete them by hand");
        }
    }

    /// The current view, with (for `plan`) the changes a reconciliation would make now.
    pub async fn status(&self, plan: bool) -> RoutesStatus {
        let mut status = self.view();
        if plan {
            let mut last = self.last_plan.lock().await;
            if let Some((at, planned)) = last.as_ref() {
                if at.elapsed() < PLAN_EVERY {
                    return planned.clone();
                }
            }
            let registry = self.node.published().load_full();
            let desired = self.desired(&registry.registry);
            fill(&mut status, &self.dry_run(desired).await);
            *last = Some((std::time::Instant::now(), status.clone()));
        }
        status
    }

    /// The current view, as of the last reconciliation.
    pub fn view(&self) -> RoutesStatus {
        let mut status = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        let registry = self.node.published().load_full();
        status.disabled = self.disabled.clone().or_else(|| self.engine_refusal());
        status.enabled = status.disabled.is_none();
        status.protocol = self.protocol;
        status.bgp = self
            .announcer
            .get()
            .map(|a| a.sessions())
            .unwrap_or_default();
        status.subnets = registry
            .registry
            .node_subnets(self.node.id())
            .iter()
            .map(ToString::to_string)
            .collect();
        status
    }

    /// Keeps this node's claim in the registry equal to Docker's subnets. A refused claim is
    /// reported (log and status) and tried again when the other claims change.
    pub async fn claim(self: Arc<Routing>, mut shutdown: watch::Receiver<bool>) {
        let id = self.node.id();
        let mut wanted_rx = self.wanted.subscribe();
        // The claims of the others when a claim was refused, so it is retried only once they
        // change.
        let mut refused_against: Option<(Vec<Subnet>, Claims)> = None;
        let mut changes = self.node.subscribe();
        // Until the replica has caught up (partly a matter of time), and after a proposal
        // that may succeed later, look again after a second as well.
        let mut again = true;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)), if again => {}
                changed = changes.changed() => if changed.is_err() { return },
                _ = wanted_rx.changed() => {}
                _ = shutdown.changed() => return,
            }
            again = !self.caught_up();
            // A node that does not route claims nothing: other hosts would route to it, and
            // their containers' traffic would find no way back.
            let wanted = match &self.disabled {
                Some(_) => Some(Vec::new()),
                None => wanted_rx.borrow().clone(),
            };
            let Some(mut wanted) = wanted else {
                continue;
            };
            if let Some(pool) = self.pool {
                wanted.retain(|s| pool.covers(s));
            }
            if !self.caught_up() {
                continue;
            }
            wanted.sort();
            wanted.dedup();
            let published = self.node.published().load_full();
            let registry = &published.registry;
            if registry.node(id).is_none() || registry.node_subnets(id) == wanted.as_slice() {
                continue;
            }
            let others: Claims = registry
                .subnets()
                .filter(|(n, _)| *n != id)
                .map(|(n, s)| (n, s.to_vec()))
                .collect();
            if refused_against.as_ref() == Some(&(wanted.clone(), others.clone())) {
                continue;
            }
            let command = Command::SetNodeSubnets {
                node: id,
                subnets: wanted.clone(),
            };
            match Proposal::from(self.node.propose(command).await) {
                Proposal::Applied(_) => {
                    refused_against = None;
                    self.set_claim_refused(None);
                    tracing::info!(subnets = ?wanted.iter().map(ToString::to_string).collect::<Vec<_>>(), "claimed this host's container subnet");
                    self.reconcile_now.notify_one();
                }
                Proposal::Rejected(e) => {
                    tracing::error!(error = %e, "the cluster refused this host's container subnet; other hosts will not route to its containers. DNS keeps working");
                    self.set_claim_refused(Some(refusal(&e)));
                    refused_against = Some((wanted, others));
                }
                Proposal::Stopped(_) => return,
                Proposal::Retry(e) => {
                    tracing::debug!(error = %e, "claiming the container subnet; retrying");
                    again = true;
                }
            }
        }
    }

    /// This host's block of the pool (`cluster_cidr`), claimed in the registry: the one it
    /// claims already (after a restart, also without a quorum), else the block that holds the
    /// Docker network `network` at `docker` if it is there already and free, else a free
    /// `/prefix` block, avoiding the host's own networks. The Docker network is made inside it;
    /// every Docker network of the host inside it is routed (`linkdns docker-config` gives the
    /// daemon settings that put Docker's bridge and address pools there). None when the pool
    /// is full (reported), on shutdown, when there is no pool, or when this node does not route
    /// (it takes no subnet, see [`Routing::claim`]).
    pub async fn allocate(
        &self,
        prefix: u8,
        docker: &str,
        network: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Option<Subnet> {
        let block = self
            .allocate_block(prefix, docker, network, shutdown)
            .await?;
        // The claim is the block, not the networks inside it.
        self.wanted.send_replace(Some(vec![block]));
        Some(block)
    }

    async fn allocate_block(
        &self,
        prefix: u8,
        docker: &str,
        network: &str,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<Subnet> {
        let pool = self.pool?;
        if !self.enabled() {
            tracing::warn!(
                "cluster_cidr is ignored: this node does not program routes (see `linkdns routes`)"
            );
            return None;
        }
        let id = self.node.id();
        let own = |published: &linkdns_registry::Published| {
            published
                .registry
                .node_subnets(id)
                .iter()
                .copied()
                .find(|s| pool.covers(s))
        };
        if let Some(own) = own(&self.node.published().load_full()) {
            return Some(own);
        }
        let docker_networks = linkdns_docker::networks(docker).await.unwrap_or_default();
        let existing = docker_networks
            .iter()
            .filter(|n| n.name == network)
            .flat_map(|n| n.subnets.iter())
            .map(|s| s.widened(prefix))
            .find(|s| pool.covers(s));
        let protocol = self.protocol;
        let avoid = match tokio::task::spawn_blocking(move || {
            linkdns_routes::host_networks(protocol)
        })
        .await
        {
            Ok(Ok(networks)) => networks,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read this host's networks; allocating a subnet without avoiding them");
                Vec::new()
            }
            Err(_) => Vec::new(),
        };
        // The block around an existing network may hold other Docker networks of the host
        // (that is what it is for), but none of the host's other networks.
        let docker_subnets: Vec<&Subnet> =
            docker_networks.iter().flat_map(|n| &n.subnets).collect();
        let existing = existing.filter(|block| {
            !avoid
                .iter()
                .filter(|a| !docker_subnets.contains(a))
                .any(|a| a.overlaps(block))
        });
        let mut changes = self.node.subscribe();
        loop {
            if *shutdown.borrow() {
                return None;
            }
            if !self.caught_up() {
                // Catching up is partly a matter of time: look again after a second as well.
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return None },
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return None,
                }
                continue;
            }
            let published = self.node.published().load_full();
            let registry = &published.registry;
            if let Some(own) = own(&published) {
                return Some(own);
            }
            // A network that is there already keeps its subnet if it is free; else a block the
            // host does not use (its own networks include that network's, so not `existing`).
            let free = |s: &Subnet| registry.claimed_elsewhere(id, s).is_none();
            let candidate = match existing.filter(free) {
                Some(existing) => existing,
                None => match registry.free_subnet(id, pool, prefix, &avoid) {
                    Some(candidate) => candidate,
                    None => {
                        tracing::error!(%pool, prefix, "no free subnet left in cluster_cidr; this host's Docker network is not created (remove a host or widen cluster_cidr, then restart linkdns). DNS keeps working");
                        return None;
                    }
                },
            };
            if registry.node_subnets(id) == [candidate] {
                return Some(candidate);
            }
            let command = Command::SetNodeSubnets {
                node: id,
                subnets: vec![candidate],
            };
            match Proposal::from(self.node.propose(command).await) {
                Proposal::Applied(_) => {
                    tracing::info!(subnet = %candidate, %pool, "allocated this host's container subnet; every Docker network of this host inside it is routed: `linkdns docker-config` prints the daemon.json settings that put Docker's bridge and address pools there");
                    return Some(candidate);
                }
                // Another host took it meanwhile: the next free one.
                Proposal::Rejected(e) => {
                    tracing::info!(error = %e, "subnet taken meanwhile; trying the next");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Proposal::Stopped(_) => return None,
                Proposal::Retry(e) => {
                    tracing::debug!(error = %e, "allocating a subnet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    fn set_claim_refused(&self, reason: Option<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.claim_refused = reason;
        }
    }

    /// Reconciles the host with the cluster until shutdown. Does nothing but report when
    /// routing is disabled.
    pub async fn program(self: Arc<Routing>, mut shutdown: watch::Receiver<bool>) {
        if self.disabled.is_some() {
            if linkdns_routes::has_net_admin() {
                // Turned off by configuration: what an earlier run made goes (a no-op if
                // nothing).
                self.withdraw_now().await;
            } else {
                self.warn_of_leftovers().await;
            }
            return;
        }
        let id = self.node.id();
        // Until the first reconciliation, the routes an earlier run left are this host's
        // paths: answers leave out what it cannot reach from the start.
        if let Some(paths) = self.dry_run(Desired::default()).await.paths() {
            self.docker.view.set_paths(Some(paths));
        }
        let mut last: Option<Desired> = None;
        let mut last_refused: Vec<String> = Vec::new();
        let mut last_errors: Vec<String> = Vec::new();
        let mut every = tokio::time::interval(RECONCILE_EVERY);
        let mut changes = self.node.subscribe();
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = self.reconcile_now.notified() => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let registry = self.node.published().load_full();
                    if last.as_ref() == Some(&self.desired(&registry.registry)) {
                        continue;
                    }
                }
                _ = shutdown.changed() => return,
            }
            // Routes follow the cluster's view only: a replica without a leader, or still
            // applying what it had on disk at start, may be behind, and would withdraw routes
            // that are still wanted (and flap them on every restart). A joined node's registry
            // arrives with its first snapshot; until it names this node, it is not that view
            // either.
            let registry = self.node.published().load_full();
            if !self.caught_up() || registry.registry.node(id).is_none() {
                continue;
            }
            // What an earlier reconciliation made stays; nothing changes until the engine's
            // backend is one linkdns works with.
            if self.engine_refusal().is_some() {
                last = None;
                continue;
            }
            let desired = self.desired(&registry.registry);
            let report = {
                let (programmer, desired) = (self.programmer.clone(), desired.clone());
                tokio::task::spawn_blocking(move || {
                    // The programmer holds only a socket: usable after a panic elsewhere.
                    let mut p = programmer.lock().unwrap_or_else(|e| e.into_inner());
                    p.as_mut().map(|p| p.reconcile(&desired, true))
                })
                .await
            };
            let report = match report {
                Ok(Some(report)) => report,
                // Withdrawn: the node is leaving.
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(error = %e, "a route reconciliation failed; trying again at the next");
                    if let Ok(mut s) = self.status.lock() {
                        s.errors = vec![format!("the last reconciliation failed: {e}")];
                    }
                    continue;
                }
            };
            last = Some(desired);
            if let Some(paths) = report.paths() {
                self.docker.view.set_paths(Some(paths));
            }
            let refused: Vec<String> = report
                .plan
                .refused
                .iter()
                .map(ToString::to_string)
                .collect();
            for r in refused.iter().filter(|r| !last_refused.contains(r)) {
                tracing::warn!(refusal = %r, "route refused; what is in the way is left as it is");
            }
            last_refused = refused;
            for e in report.errors.iter().filter(|e| !last_errors.contains(e)) {
                tracing::warn!(error = %e, "routing");
            }
            last_errors = report.errors.clone();
            if let Ok(mut s) = self.status.lock() {
                fill(&mut s, &report);
                // Applied already; `--plan` asks for what is still to do.
                s.plan.clear();
                s.reconciliations += 1;
            }
        }
    }

    /// Withdraws every route and rule linkdns made on this host (the node left the cluster).
    pub async fn withdraw(&self) {
        self.stop_announcing().await;
        if self.disabled.is_some() {
            return;
        }
        self.withdraw_now().await;
    }

    async fn withdraw_now(&self) {
        let programmer = self.programmer.clone();
        // Waits for a reconciliation under way, then takes the programmer for good.
        let report = tokio::task::spawn_blocking(move || {
            let taken = programmer.lock().unwrap_or_else(|e| e.into_inner()).take();
            taken.map(|mut p| p.withdraw())
        })
        .await
        .ok()
        .flatten();
        let Some(report) = report else {
            return;
        };
        for e in &report.errors {
            tracing::warn!(error = %e, "withdrawing this host's routes");
        }
        tracing::info!(
            removed = report.plan.routes.len(),
            "withdrew this host's cluster routes and forwarding rules"
        );
    }
}

fn fill(status: &mut RoutesStatus, report: &Report) {
    status.routes = report
        .owned_routes
        .iter()
        .map(ToString::to_string)
        .collect();
    status.rules = report.owned_rules.clone();
    status.peers = report
        .plan
        .wanted
        .iter()
        .map(|r| {
            let how = match r.tunnel {
                Some(remote) => format!("vxlan to {remote} (dev {})", r.device),
                None if r.router => format!("through the router {} on {}", r.via, r.device),
                None => format!("direct via {} on {}", r.via, r.device),
            };
            format!("{} {}: {how}", r.node, r.dst)
        })
        .collect();
    status.refused = report
        .plan
        .refused
        .iter()
        .map(ToString::to_string)
        .collect();
    status.errors = report.errors.clone();
    status.notes = report.plan.notes.clone();
    let mut changes = report.plan.clone();
    changes.refused.clear();
    changes.keep.clear();
    changes.notes.clear();
    status.plan = changes.to_string().lines().map(str::to_string).collect();
}

/// Why the cluster refused a claim, as status shows it: the registry's own words.
fn refusal(e: &linkdns_raft::Error) -> String {
    match e {
        linkdns_raft::Error::Registry(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, subnet: &str, gateway: &str) -> LocalNetwork {
        LocalNetwork {
            id: format!("id-{name}"),
            name: name.into(),
            subnets: vec![subnet.parse().expect("subnet")],
            gateways: vec![gateway.parse().expect("ip")],
        }
    }

    fn render(c: &DockerConfig) -> String {
        let mut out = serde_json::to_string_pretty(&c.daemon).expect("json");
        for n in &c.notes {
            out.push_str("\nnote: ");
            out.push_str(n);
        }
        out
    }

    #[test]
    fn an_engine_on_nftables_refuses_routing_with_the_setting_to_use() {
        assert_eq!(firewall_refusal(None), None, "engines before 28");
        assert_eq!(firewall_refusal(Some("iptables")), None);
        assert_eq!(firewall_refusal(Some("iptables+firewalld")), None);
        let why = firewall_refusal(Some("nftables")).expect("refused");
        assert!(
            why.contains("\"firewall-backend\": \"iptables\" in /etc/docker/daemon.json")
                && why.contains("--routing false"),
            "{why}"
        );
    }

    #[test]
    fn docker_config_puts_every_network_in_the_block() {
        // Before: Docker's bridge from its defaults, `linkdns` made in the block.
        let before = [
            network("bridge", "172.17.0.0/16", "172.17.0.1"),
            network("linkdns", "10.77.16.0/24", "10.77.16.1"),
        ];
        let block = Some("10.77.16.0/20".parse().expect("block"));
        assert_eq!(
            render(&DockerConfig::for_host(
                &before, "linkdns", "cluster", block
            )),
            r#"{
  "bip": "10.77.17.1/24",
  "default-address-pools": [
    {
      "base": "10.77.16.0/20",
      "size": 24
    }
  ],
  "dns": [
    "10.77.16.1"
  ],
  "dns-search": [
    "cluster"
  ]
}
note: with these settings (and Docker restarted), every network Docker makes on this host is in 10.77.16.0/20, routed to this host by every other host"#
        );
        // After the restart (and a compose project): the same settings, so asking again is
        // harmless.
        let after = [
            network("bridge", "10.77.17.0/24", "10.77.17.1"),
            network("linkdns", "10.77.16.0/24", "10.77.16.1"),
            network("shop_default", "10.77.18.0/24", "10.77.18.1"),
        ];
        assert_eq!(
            DockerConfig::for_host(&after, "linkdns", "cluster", block),
            DockerConfig::for_host(&before, "linkdns", "cluster", block)
        );
        // A block of one network, and no block at all: DNS settings, and why no more.
        let narrow = Some("10.77.16.0/24".parse().expect("block"));
        let one = DockerConfig::for_host(&before, "linkdns", "cluster", narrow);
        assert!(one.ready);
        assert_eq!(one.daemon.keys().collect::<Vec<_>>(), ["dns", "dns-search"]);
        assert!(
            one.notes[0].contains("--subnet-prefix 20"),
            "{:?}",
            one.notes
        );
        let plain = [network("bridge", "192.168.1.0/24", "192.168.1.1")];
        let none = DockerConfig::for_host(&plain, "bridge", "cluster", None);
        assert_eq!(none.daemon["dns"], serde_json::json!(["192.168.1.1"]));
        assert!(none.notes[0].contains("--cluster-cidr"));
        // Before the watcher has seen the network DNS listens on: not ready, nothing to say.
        let early = DockerConfig::for_host(&plain, "linkdns", "cluster", block);
        assert!(!early.ready && early.daemon.is_empty(), "{early:?}");
    }
}
