//! `linkdns run`: start, supervise, shut down. It opens the data dir, starts the Raft node and
//! its peer transport, the DNS front end, the Docker watcher and the admin endpoint; then the
//! node runs as tasks (`watcher_reports`, `lifecycle`, `Signals`, and the spawned ones) until
//! the first of the supervised three ends with a [`StopReason`]; `shut_down` stops the rest.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use linkdns_cluster::{Identity, MaintainConfig, Transport, IDENTITY_FILE};
use linkdns_dns::{
    upstreams_from_resolv_conf, Acl, Answerer, DnsMetrics, DnsServer, Forwarder, Holds, Zone,
};
use linkdns_docker::{Report, WatcherConfig};
use linkdns_raft::{NodeConfig, NodeHandle, Proposal, RetryPolicy, Role, SledStore};
use linkdns_registry::{Command, LocalChange, NodeInfo};
use linkdns_routes::ClaimPolicy;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};

use crate::admin::{self, AdminState, NodeMetrics};
use crate::config::{Config, DEFAULT_DNS_LISTEN};
use crate::lifecycle::{Act, Lifecycle, Seen, StopReason};
use crate::routing::{HostDocker, Routing, RoutingConfig};
use crate::view::View;

/// Written once the node holds Raft state: an identity without state after that means the log
/// was lost.
const STARTED_MARKER: &str = "raft.started";

/// Most watcher reports folded into one proposal.
const MAX_BATCH: usize = 1024;

/// Name of the file in the data dir that holds the admin address, for `linkdns status`.
pub const ADMIN_ADDR_FILE: &str = "admin.addr";

/// The Raft id of the node that bootstraps a cluster; joining nodes get higher ones.
const BOOTSTRAP_ID: u64 = 1;

/// Name of the file in the data dir that counts this node's runs: the watcher's versions of a
/// run start at `run << 32`, above every version of the runs before.
const WATCHER_EPOCH_FILE: &str = "watcher.epoch";

/// A node that applied its own retirement waits this long for its removal from the
/// configuration (it may have to vote for it) before it stops anyway.
const RETIRE_GRACE: Duration = Duration::from_secs(30);

pub async fn run(config: Config) -> anyhow::Result<()> {
    refuse_an_engine_it_cannot_route_with(&config).await?;
    private_dir(&config.data_dir)?;
    if config.force_new_cluster {
        crate::recovery::force_new_cluster(&config.data_dir)?;
    }
    let store = SledStore::open(&config.data_dir)?;
    let (identity, created) = identity(&config.data_dir, &store)?;
    let node_id = identity.node_id;
    let cluster = identity.cluster;
    let marker = config.data_dir.join(STARTED_MARKER);
    // Before anything runs: a data dir that cannot count this run stops the start here.
    let epoch = next_watcher_epoch(&config.data_dir)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let transport = Transport::new(identity.clone(), shutdown_rx.clone())?;
    transport.set_cert_validity(config.cert_validity);
    transport.set_max_snapshot(config.max_snapshot);
    // A write that fails (a full disk) degrades the node rather than stopping it: DNS goes
    // on from memory and the store is opened again until it can be written.
    let reopen_dir = config.data_dir.clone();
    let node = linkdns_raft::start_reopening(
        NodeConfig {
            // Only a new cluster's first node bootstraps; a joined node waits for the leader.
            bootstrap: created,
            snapshot_every: config.snapshot_every,
            proposal_timeout: config.proposal_timeout,
            ..NodeConfig::new(node_id)
        },
        store,
        transport.outbox(),
        Box::new(move || SledStore::open(&reopen_dir)),
    )?;
    let node = Arc::new(node);
    // DNS answers from the committed registry with this node's own uncommitted changes laid
    // over it (see view.rs).
    let view = View::new(node_id, node.published().load_full());
    {
        let view = view.clone();
        node.on_publish(Box::new(move |published| view.committed(published)));
    }
    if created {
        // After the store is bootstrapped: a crash in between leaves a one-voter store
        // without identity, which the next start completes.
        identity.save(&config.data_dir)?;
        tracing::info!(%cluster, "created a new cluster; `linkdns token` prints the token other hosts join with");
    }
    // Saved from now on whenever it changes (a renewed certificate, the CA key of a voter).
    transport.set_data_dir(config.data_dir.clone());
    linkdns_cluster::attach(&transport, node.clone());
    let peer_addr = transport.serve(config.peer_listen).await?;
    let advertised = config.advertise_addr.unwrap_or(peer_addr);
    transport.set_advertised(advertised);
    if !advertised.ip().is_unspecified() {
        view.set_host_addrs(vec![advertised.ip()]);
    }
    tracing::info!(node = %config.node_name, id = node_id, %cluster, peer = %advertised, data_dir = %config.data_dir.display(), "raft node started");

    tokio::spawn(register_self(
        node.clone(),
        transport.clone(),
        config.node_name.clone(),
        advertised,
    ));
    tokio::spawn(linkdns_cluster::keep_credentials(
        transport.clone(),
        node.clone(),
        shutdown_rx.clone(),
    ));
    tokio::spawn(linkdns_cluster::maintain(
        transport.clone(),
        node.clone(),
        MaintainConfig {
            voters: config.voters,
            liveness_timeout: config.liveness_timeout,
            claim_limit: config.claim_limit,
        },
        shutdown_rx.clone(),
    ));

    let explicit_listen = config.dns_listen.is_some();
    let listen = match &config.dns_listen {
        Some(l) => l.clone(),
        None => vec![DEFAULT_DNS_LISTEN.parse()?],
    };
    let dns_metrics = DnsMetrics::default();
    let upstreams = upstreams(&config, &listen);
    // No claim routed here may hold what this host reaches its own ways besides the cluster's
    // hosts: its upstream resolvers and its BGP routers.
    let policy = ClaimPolicy {
        claimable: config.claimable.clone(),
        protected: upstreams
            .iter()
            .map(|u| (u.ip(), "an upstream resolver of this host".to_string()))
            .chain(
                config
                    .bgp
                    .peers
                    .iter()
                    .map(|p| (p.ip(), "a BGP router of this host".to_string())),
            )
            .collect(),
    };
    let answerer = Arc::new(answerer(
        &config,
        node_id,
        &view,
        upstreams,
        dns_metrics.clone(),
    )?);
    let mut dns = vec![DnsServer::start(&listen, answerer.clone(), config.dns_limits).await?];
    let dns_addrs: Vec<SocketAddr> = dns.iter().flat_map(|d| d.local_addrs().to_vec()).collect();

    let routing = Routing::new(
        node.clone(),
        RoutingConfig {
            enabled: config.routing,
            protocol: config.route_protocol,
            encapsulation: config.encapsulation,
            reach_from: config.reach_from.clone(),
            pool: config.cluster_cidr.map(|(pool, _)| pool),
            policy,
        },
        HostDocker {
            view: view.clone(),
            bridge_network: config.bridge_network.clone(),
            domain: config.domain.clone(),
        },
    );
    if let Some(announcer) = crate::announce::Announcer::start(config.bgp.clone(), node.clone()) {
        routing.set_announcer(announcer.clone());
        tokio::spawn(announcer.follow(shutdown_rx.clone()));
    }
    tokio::spawn(routing.clone().claim(shutdown_rx.clone()));
    tokio::spawn(routing.clone().program(shutdown_rx.clone()));

    let node_metrics = NodeMetrics::default();
    tokio::spawn(node_metrics.clone().count_leader_changes(node.clone()));
    let admin_state = Arc::new(AdminState::new(
        &config,
        node.clone(),
        transport.clone(),
        dns_addrs.clone(),
        dns_metrics,
        node_metrics.clone(),
        routing.clone(),
    ));
    let admin_addr = admin::serve(config.admin_listen, admin_state.clone()).await?;
    admin::serve_private(&config.data_dir, admin_state.clone()).await?;
    write_admin_addr(&config.data_dir, admin_addr)?;
    // DNS answers (from the replica, whatever it holds yet: /ready says whether it follows a
    // leader) and the admin endpoint is up.
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=serving DNS on {}",
        dns_addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let resync = Arc::new(Notify::new());
    let (reports_tx, reports) = mpsc::channel(1024);
    let watcher = spawn_watcher(
        &config,
        node.clone(),
        routing.clone(),
        epoch,
        WatcherEnds {
            reports: reports_tx,
            resync: resync.clone(),
            shutdown: shutdown_rx.clone(),
        },
    );

    // Proposals run beside the main loop, so a slow one (no leader, say) never holds up signals,
    // the stop checks or Docker state; what queues up meanwhile goes out as one batch.
    // Unbounded, so the loop below never waits on Raft and the local view stays current; the
    // watcher's pace (Docker's events) bounds what queues, and it all goes out as one batch.
    let (proposals_tx, proposals_rx) = mpsc::unbounded_channel::<Command>();
    let proposer = tokio::spawn(propose_loop(
        node.clone(),
        proposals_rx,
        resync.clone(),
        view.clone(),
        node_metrics.clone(),
    ));
    // The supervisor: the node runs as these tasks (beside the spawned ones: proposer,
    // watcher, registration, credentials, maintenance, routing, admin, DNS); the first to end
    // says why the node stops. Signals are caught from here on, so one that arrives early is
    // not lost.
    let mut signals = Signals::new()?;
    let stop = tokio::select! {
        stop = watcher_reports(ReportsTask {
            reports,
            view: view.clone(),
            proposals: proposals_tx,
            metrics: node_metrics,
            routing: routing.clone(),
            answerer,
            admin: admin_state,
            dns: &mut dns,
            dns_addrs,
            explicit_listen,
            limits: config.dns_limits,
        }) => stop,
        stop = lifecycle(node.clone(), node_id, marker, resync) => stop,
        stop = signals.first() => stop,
    };
    shut_down(
        stop,
        ShutDown {
            config: &config,
            node,
            routing: &routing,
            dns,
            watcher,
            proposer,
            shutdown_tx,
        },
    )
    .await
}

/// Where the Docker watcher's reports go, what asks it to resync, and what stops it.
struct WatcherEnds {
    reports: mpsc::Sender<Report>,
    resync: Arc<Notify>,
    shutdown: watch::Receiver<bool>,
}

/// Starts the Docker watcher once the registry knows this node (containers are refused for a
/// node it does not know yet), its first version above all of this node's earlier ones, after
/// allocating this host's block when the subnets come from a cluster pool.
fn spawn_watcher(
    config: &Config,
    node: Arc<NodeHandle>,
    routing: Arc<Routing>,
    epoch: u64,
    ends: WatcherEnds,
) -> tokio::task::JoinHandle<()> {
    let node_id = node.id();
    let mut watcher_config = WatcherConfig {
        uri: config.docker.clone(),
        node: node_id,
        bridge_network: config.bridge_network.clone(),
        create_network: None,
        max_backoff: Duration::from_secs(5),
        resync_every: Duration::from_secs(300),
        first_version: 0,
        held: Some(linkdns_docker::Held({
            let node = node.clone();
            Arc::new(move || {
                node.published()
                    .load()
                    .registry
                    .containers_of(node_id)
                    .map(|c| c.id.clone())
                    .collect()
            })
        })),
    };
    let prefix = config.cluster_cidr.map(|(_, prefix)| prefix);
    let WatcherEnds {
        reports,
        resync,
        mut shutdown,
    } = ends;
    tokio::spawn(async move {
        let mut changes = node.subscribe();
        while node.published().load().registry.node(node_id).is_none() {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
        }
        watcher_config.first_version =
            first_version(epoch, &node.published().load().registry, node_id);
        if let Some(prefix) = prefix {
            watcher_config.create_network = routing
                .allocate(
                    prefix,
                    &watcher_config.uri,
                    &watcher_config.bridge_network,
                    shutdown.clone(),
                )
                .await;
            if *shutdown.borrow() {
                return;
            }
        }
        linkdns_docker::watch(watcher_config, reports, resync, shutdown).await;
    })
}

/// The upstream resolvers: the configured ones, else the host's resolv.conf's; never one of
/// this node's own DNS addresses `listen` (a host whose resolv.conf already points at linkdns
/// would loop).
fn upstreams(config: &Config, listen: &[SocketAddr]) -> Vec<SocketAddr> {
    let upstreams = if config.upstreams.is_empty() {
        match upstreams_from_resolv_conf(Path::new("/etc/resolv.conf")) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "no upstream resolvers; names outside the domain will get SERVFAIL");
                Vec::new()
            }
        }
    } else {
        config.upstreams.clone()
    };
    let is_own = |u: &SocketAddr| {
        listen.iter().any(|l| {
            l.port() == u.port()
                && (l.ip() == u.ip()
                    || (l.ip().is_unspecified()
                        && (u.ip().is_loopback() || u.ip().is_unspecified())))
        })
    };
    let (own, upstreams): (Vec<SocketAddr>, Vec<SocketAddr>) =
        upstreams.into_iter().partition(is_own);
    if !own.is_empty() {
        tracing::warn!(skipped = ?own, "upstream resolvers that are this node's own DNS address are skipped; set --upstream");
    }
    tracing::info!(?upstreams, "upstream resolvers");
    upstreams
}

/// What answers DNS: the zone over the view, the ACL, the forwarder, and held queries whose
/// asker is looked up in /proc at once (its process runs already) rather than waiting for
/// Docker to tell its address.
fn answerer(
    config: &Config,
    node_id: u64,
    view: &Arc<View>,
    upstreams: Vec<SocketAddr>,
    metrics: DnsMetrics,
) -> anyhow::Result<Answerer> {
    let identify = {
        let view = view.clone();
        Arc::new(move |addresses: Vec<IpAddr>| {
            let asks: Vec<(IpAddr, Vec<_>)> = addresses
                .into_iter()
                .map(|src| (src, view.candidates(src)))
                .filter(|(_, candidates)| !candidates.is_empty())
                .collect();
            if asks.is_empty() {
                return;
            }
            let view = view.clone();
            tokio::task::spawn_blocking(move || {
                for (src, id) in linkdns_docker::containers_at_addresses(&asks) {
                    tracing::debug!(%src, container = %id, "identified a starting container by its network namespace");
                    view.local(LocalChange::Identified { id, ip: src });
                }
            });
        })
    };
    Ok(Answerer {
        zone: Zone::new(&config.domain, config.ttl, Some(node_id))?,
        acl: Acl::new(config.allowed_clients.clone()),
        forwarder: Forwarder::new(upstreams, Duration::from_secs(2)),
        published: view.published(),
        view_changes: view.subscribe(),
        holds: Holds::with_identify(identify),
        metrics,
    })
}

/// What [`watcher_reports`] works with.
struct ReportsTask<'a> {
    reports: mpsc::Receiver<Report>,
    view: Arc<View>,
    proposals: mpsc::UnboundedSender<Command>,
    metrics: NodeMetrics,
    routing: Arc<Routing>,
    answerer: Arc<Answerer>,
    admin: Arc<AdminState>,
    /// The DNS servers: one more on each Docker bridge gateway the watcher reports.
    dns: &'a mut Vec<DnsServer>,
    dns_addrs: Vec<SocketAddr>,
    /// DNS listen addresses were configured: no extra listener on bridge gateways.
    explicit_listen: bool,
    limits: linkdns_dns::Limits,
}

/// The watcher's reports: each goes into the view at once, then (commands) to the proposer,
/// so the proposer never holds up Docker state; Docker's bridge networks set this host's
/// subnets, the ACL and the extra DNS listeners. Ends when the watcher or the proposer does.
async fn watcher_reports(mut t: ReportsTask<'_>) -> StopReason {
    loop {
        let Some(report) = t.reports.recv().await else {
            return StopReason::WatcherEnded;
        };
        match report {
            Report::Command(command) => {
                t.metrics.docker_events.inc();
                if matches!(command, Command::ReplaceContainers { .. }) {
                    t.metrics.resyncs.inc();
                }
                t.view.observe(&command);
                if t.proposals.send(command).is_err() {
                    return StopReason::ProposerStopped;
                }
            }
            Report::Local(change) => {
                if matches!(change, LocalChange::Networks(_)) {
                    t.routing.networks_changed();
                }
                t.view.local(change);
            }
            Report::Connected {
                bridge_subnets,
                bridge_gateways,
                firewall_backend,
            } => {
                t.admin.set_docker(true, None);
                t.routing.set_firewall_backend(firewall_backend.as_deref());
                t.routing.set_local_subnets(bridge_subnets.clone());
                t.answerer.acl.set_detected(bridge_subnets);
                if !t.explicit_listen {
                    for gateway in bridge_gateways {
                        let addr = SocketAddr::new(gateway, 53);
                        if t.dns_addrs.contains(&addr) {
                            continue;
                        }
                        match DnsServer::start(&[addr], t.answerer.clone(), t.limits).await {
                            Ok(server) => {
                                t.dns_addrs.push(addr);
                                t.dns.push(server);
                                t.admin.set_dns_listen(t.dns_addrs.clone());
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot serve DNS on the Docker bridge gateway; containers must use another address")
                            }
                        }
                    }
                }
            }
            Report::Disconnected { reason } => {
                t.view.local(LocalChange::Lost);
                t.admin.set_docker(false, Some(reason));
            }
        }
    }
}

/// The node's lifecycle: on every change of the node (membership, liveness, retirement) the
/// checks of [`Lifecycle`], and a retirement's deadline. Ends with the reason to stop: the
/// Raft thread ended, or this node was removed.
async fn lifecycle(
    node: Arc<NodeHandle>,
    node_id: u64,
    marker: std::path::PathBuf,
    resync: Arc<Notify>,
) -> StopReason {
    let mut changes = node.subscribe();
    let mut lifecycle = Lifecycle::new(marker.exists());
    // When this node applied its own retirement; it stops by RETIRE_GRACE after.
    let mut retiring_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() || node.is_stopped() {
                    return StopReason::RaftStopped;
                }
                let status = node.status();
                let published = node.published().load();
                let seen = Seen {
                    member: status.is_member(node_id),
                    detached: status.role == Role::Detached,
                    applied: status.applied_index,
                    retiring: published.registry.is_retiring(node_id),
                    down: published.registry.is_down(node_id),
                };
                for act in lifecycle.step(seen) {
                    match act {
                        Act::WriteMarker => {
                            if let Err(e) = std::fs::write(&marker, b"") {
                                tracing::warn!(error = %e, path = %marker.display(), "cannot write the state marker");
                            }
                        }
                        // Hidden by the leader while it could not hear us: restate everything,
                        // in case events were lost meanwhile.
                        Act::Resync => {
                            tracing::info!("this node is reporting again; resyncing with Docker");
                            resync.notify_one();
                        }
                        // Only the log retires a node. Its replica keeps running until it
                        // applies its removal from the configuration too (which may need its
                        // vote), for at most RETIRE_GRACE.
                        Act::RetireDeadline => {
                            tracing::warn!("this node is being removed from the cluster; stopping once the removal is through");
                            retiring_since = Some(tokio::time::Instant::now());
                        }
                        Act::Stop(reason) => {
                            tracing::warn!(%reason, "stopping");
                            return reason;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(
                retiring_since.map_or_else(tokio::time::Instant::now, |t| t + RETIRE_GRACE)
            ), if retiring_since.is_some() => {
                tracing::warn!("this node's removal did not complete in time; stopping as removed");
                return StopReason::Removed;
            }
        }
    }
}

/// SIGINT and SIGTERM, caught from when this is made.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The first of them.
    async fn first(&mut self) -> StopReason {
        tokio::select! {
            _ = self.interrupt.recv() => StopReason::Signal,
            _ = self.terminate.recv() => StopReason::Signal,
        }
    }
}

/// What [`shut_down`] stops, in order.
struct ShutDown<'a> {
    config: &'a Config,
    node: Arc<NodeHandle>,
    routing: &'a Routing,
    dns: Vec<DnsServer>,
    watcher: tokio::task::JoinHandle<()>,
    proposer: tokio::task::JoinHandle<()>,
    shutdown_tx: watch::Sender<bool>,
}

/// Stops every task for `stop`, flushes and joins the Raft thread, and for a removal withdraws
/// the routes and moves the state aside. The exit is an error unless the stop was clean; the
/// Raft thread's own error, if it failed, says why best.
async fn shut_down(stop: StopReason, parts: ShutDown<'_>) -> anyhow::Result<()> {
    let ShutDown {
        config,
        node,
        routing,
        dns,
        watcher,
        proposer,
        shutdown_tx,
    } = parts;
    tracing::info!(%stop, "shutting down");
    crate::notify::notify(&format!("STOPPING=1\nSTATUS=stopping: {stop}"));
    let _ = shutdown_tx.send(true);
    // The routers withdraw this host's subnets at once (a restart announces them again).
    routing.stop_announcing().await;
    let _ = watcher.await;
    proposer.abort();
    for server in dns {
        server.shutdown().await;
    }
    let _ = std::fs::remove_file(config.data_dir.join(ADMIN_ADDR_FILE));
    let _ = std::fs::remove_file(config.data_dir.join(admin::ADMIN_SOCKET));
    // Flushes and joins the Raft thread; an error that stopped it is reported.
    let stopped = node.shutdown();
    let removed = stop == StopReason::Removed;
    if removed {
        // Other hosts no longer route here, nor this host to them.
        routing.withdraw().await;
    }
    if removed && stopped.is_ok() {
        drop(node);
        retire(&config.data_dir)?;
    }
    match stopped {
        Err(e) => Err(e.into()),
        Ok(()) if stop.is_clean() => Ok(()),
        Ok(()) => Err(anyhow::anyhow!("{stop}")),
    }
}

/// A node that routes does not start beside a Docker engine whose firewall backend it cannot
/// work with (nftables): it says which daemon setting to use. An engine not answering yet is
/// checked again at every connect (routing stops then, DNS goes on).
async fn refuse_an_engine_it_cannot_route_with(config: &Config) -> anyhow::Result<()> {
    if !config.routing {
        return Ok(());
    }
    let check = async {
        let docker = linkdns_docker::connect(&config.docker).await.ok()?;
        linkdns_docker::firewall_backend(&docker).await.ok()?
    };
    let backend = tokio::time::timeout(std::time::Duration::from_secs(2), check)
        .await
        .ok()
        .flatten();
    match crate::routing::firewall_refusal(backend.as_deref()) {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

/// This node's cluster identity: from `DIR/cluster.json`, or a new cluster's if the data dir is
/// new (or holds a one-node store from before clusters).
/// This node's cluster identity: from `DIR/cluster.json`, or a new cluster's (not saved yet;
/// `true`) if the data dir is new or holds a one-node store without one (from before clusters,
/// or a crash during bootstrap).
fn identity(data_dir: &Path, store: &SledStore) -> anyhow::Result<(Identity, bool)> {
    if let Some(identity) = Identity::load(data_dir)? {
        // A member whose log is gone would vote with an empty log, or (the first node)
        // start a new cluster of its own under the old one's identity.
        let had_state = data_dir.join(STARTED_MARKER).exists() || identity.node_id == BOOTSTRAP_ID;
        if store.is_fresh() && had_state {
            bail!(
                "data dir {} has this node's identity ({IDENTITY_FILE}) but its Raft log is gone; starting would risk the cluster's data. Run `linkdns remove` for this node on a member, then join again with an empty data dir",
                data_dir.display()
            );
        }
        return Ok((identity, false));
    }
    // A one-voter store without an identity is a crash during bootstrap (or a data dir from
    // before clusters): the identity is made now. One that ran as a member (its marker says
    // so) lost its identity instead: a new one would be a new cluster under the old log.
    let single = store.stored_voters() == [BOOTSTRAP_ID];
    let ran = data_dir.join(STARTED_MARKER).exists();
    if !store.is_fresh() && (!single || ran) {
        bail!(
            "data dir {} holds a cluster member's log but no {IDENTITY_FILE}, so this node cannot prove its membership; restore the file, or run `linkdns remove` for this node on a member and join again with an empty data dir",
            data_dir.display()
        );
    }
    Ok((Identity::bootstrap(BOOTSTRAP_ID)?, true))
}

/// Counts this run in `DIR/watcher.epoch` (written and synced before the watcher observes
/// anything) and returns its number. A missing file counts from 0; one that does not hold a
/// number stops the start: guessing low would make this run's observations look older than
/// the last run's.
fn next_watcher_epoch(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join(WATCHER_EPOCH_FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| {
            format!(
                "{} does not hold a number ({:?}); remove it and start again (this run's versions then start above those the replica holds)",
                path.display(),
                text.trim()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let epoch = last + 1;
    let tmp = data_dir.join(format!("{WATCHER_EPOCH_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(epoch.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(epoch)
}

/// The version of this run's first observation: above every earlier run's by the epoch, and
/// above every version of this node the replica holds (in case the epoch file was lost).
fn first_version(epoch: u64, registry: &linkdns_registry::Registry, node: u64) -> u64 {
    (epoch << 32).max(registry.last_version(node) + 1)
}

/// Records that this data dir holds Raft state (see [`STARTED_MARKER`]).
pub fn mark_started(data_dir: &Path) -> anyhow::Result<()> {
    let marker = data_dir.join(STARTED_MARKER);
    std::fs::write(&marker, b"").with_context(|| format!("cannot write {}", marker.display()))
}

/// Moves the state of a node that was removed aside: a later `linkdns run` on this data dir
/// starts a new cluster, `linkdns join` joins one again.
fn retire(data_dir: &Path) -> anyhow::Result<()> {
    let suffix = format!(
        "removed-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    // The identity first: a crash between the two leaves a log without identity, which is
    // refused at start, never an identity without its log.
    let identity_to = Identity::retire(data_dir, &suffix)?;
    let _ = std::fs::remove_file(data_dir.join(STARTED_MARKER));
    let raft = data_dir.join("raft");
    let raft_to = data_dir.join(format!("raft.{suffix}"));
    std::fs::rename(&raft, &raft_to)
        .with_context(|| format!("cannot move {} aside", raft.display()))?;
    tracing::warn!(raft = %raft_to.display(), identity = %identity_to.display(), "this node's state was moved aside; join a cluster again with `linkdns join`");
    Ok(())
}

/// Keeps this node's registry entry (name, peer address) current, in the background so DNS
/// serves from the replica meanwhile. The address is the configured one; with none (listening
/// on 0.0.0.0) it is the one already registered (from the join), else the one this node's
/// connections to peers show. A joined node waits for its entry (made at admission) to arrive.
async fn register_self(
    node: Arc<NodeHandle>,
    transport: Transport,
    name: String,
    advertised: SocketAddr,
) -> Option<()> {
    let mut changes = node.subscribe();
    loop {
        // After a try that may succeed later, or while waiting for the address this node's
        // peer connections show, look again after a moment; else when the node changes.
        let again = register_once(&node, &transport, &name, advertised).await?;
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return None },
            _ = tokio::time::sleep(Duration::from_millis(500)), if again => {}
        }
    }
}

/// One step of [`register_self`]: `None` when done (or stopped), else whether to look again
/// after a moment rather than only when the node changes.
async fn register_once(
    node: &NodeHandle,
    transport: &Transport,
    name: &str,
    advertised: SocketAddr,
) -> Option<bool> {
    let id = node.id();
    let usable = |a: &str| {
        a.parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_unspecified())
    };
    if node.is_stopped() {
        return None;
    }
    let current = node.published().load().registry.node(id).cloned();
    if current.is_none() && id != BOOTSTRAP_ID {
        // A joined node's entry comes with the log (made at admission).
        return Some(false);
    }
    let peer_addr = if !advertised.ip().is_unspecified() {
        advertised.to_string()
    } else if let Some(c) = current.as_ref().filter(|c| usable(&c.peer_addr)) {
        c.peer_addr.clone()
    } else if let Some(seen) = transport.observed_address() {
        seen.to_string()
    } else {
        advertised.to_string()
    };
    let wanted = NodeInfo {
        id,
        name: name.to_string(),
        peer_addr,
    };
    if current.as_ref() == Some(&wanted) {
        // The first node's certificate was made at bootstrap, not at an admission: bind it.
        if node.published().load().registry.node_cert(id).is_none() {
            let bind = Command::SetNodeCert {
                node: id,
                fingerprint: transport.identity().cert_fingerprint(),
            };
            if let Err(e) = node.propose(bind).await {
                tracing::debug!(error = %e, "binding this node's certificate; retrying");
                return Some(true);
            }
            return Some(false);
        }
        // The version it runs, for `linkdns status` (an older leader may refuse it).
        if node.published().load().registry.software_version(id) != Some(crate::VERSION) {
            let say = Command::SetNodeVersion {
                node: id,
                version: crate::VERSION.to_string(),
            };
            match Proposal::from(node.propose(say).await) {
                Proposal::Applied(_) => return Some(false),
                Proposal::Rejected(e) => {
                    tracing::warn!(error = %e, "cannot register this node's version");
                }
                Proposal::Stopped(_) => return None,
                Proposal::Retry(e) => {
                    tracing::debug!(error = %e, "registering this node's version; retrying");
                    return Some(true);
                }
            }
        }
        // Registered; with an unspecified address, until connections show a usable one.
        return (!usable(&wanted.peer_addr)).then_some(true);
    }
    match Proposal::from(node.propose(Command::UpsertNode(wanted)).await) {
        Proposal::Applied(_) => Some(false),
        Proposal::Rejected(e) => {
            tracing::error!(error = %e, "cannot register this node under its name; DNS keeps serving, but its containers cannot be published");
            None
        }
        Proposal::Stopped(_) => None,
        Proposal::Retry(e) => {
            tracing::debug!(error = %e, "registering this node; retrying");
            Some(true)
        }
    }
}

/// Proposes the watcher's commands: everything queued goes into one proposal (one log entry,
/// one round of fsyncs), however many containers changed at once.
async fn propose_loop(
    node: Arc<NodeHandle>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    resync: Arc<Notify>,
    view: Arc<View>,
    metrics: NodeMetrics,
) {
    while let Some(first) = commands.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match commands.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let command = if batch.len() == 1 {
            batch.swap_remove(0)
        } else {
            Command::Batch(batch)
        };
        // The periodic resync of a quiet node restates what the log holds: nothing to write.
        if let Command::ReplaceContainers {
            node: id,
            containers,
            ..
        } = &command
        {
            if node
                .published()
                .load()
                .registry
                .holds_exactly(*id, containers)
            {
                tracing::debug!(
                    containers = containers.len(),
                    "resync: the replica holds these containers already; nothing to propose"
                );
                view.settle(&command);
                continue;
            }
        }
        match propose_with_retry(&node, command.clone(), &metrics).await {
            Ok(Proposed::Applied) => view.settle(&command),
            // The data dir cannot be written: wait until it can, then have the watcher restate
            // the whole node (what queued meanwhile is in the view already).
            Ok(Proposed::GaveUp) if node.status().degraded.is_some() => {
                let mut changes = node.subscribe();
                while node.status().degraded.is_some() {
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
                resync.notify_one();
            }
            // Lost: have the watcher restate the whole node.
            Ok(Proposed::GaveUp) => resync.notify_one(),
            Err(e) => {
                tracing::error!(error = %e, "proposer stopped");
                return;
            }
        }
    }
}

enum Proposed {
    /// Applied, or rejected by the registry (a deterministic answer; retrying cannot help).
    Applied,
    /// Still failing after the retries.
    GaveUp,
}

/// How a watcher command is retried before the watcher is asked to restate everything.
const WATCHER_RETRY: RetryPolicy =
    RetryPolicy::times(5, Duration::from_millis(200), Duration::from_secs(1));

/// Proposes a watcher command; retries a few times on transient failures. Fails only when the
/// Raft node itself has stopped.
async fn propose_with_retry(
    node: &NodeHandle,
    command: Command,
    metrics: &NodeMetrics,
) -> anyhow::Result<Proposed> {
    let proposal = node.propose_until(&command, WATCHER_RETRY).await;
    metrics.proposal(proposal.outcome());
    match proposal {
        Proposal::Applied(_) => Ok(Proposed::Applied),
        Proposal::Rejected(e) => {
            tracing::warn!(error = %e, "watcher command rejected");
            Ok(Proposed::Applied)
        }
        Proposal::Stopped(e) => bail!("the raft node stopped ({e}); see the log above"),
        Proposal::Retry(linkdns_raft::Error::Degraded(_)) => {
            tracing::info!("the data dir cannot be written; this host's changes wait until it can, then go out as a full resync");
            Ok(Proposed::GaveUp)
        }
        Proposal::Retry(e) => {
            tracing::warn!(error = %e, "a watcher command kept failing; asking the watcher for a full resync");
            Ok(Proposed::GaveUp)
        }
    }
}

/// Creates the data dir, or makes an existing one private: mode 0700, since it holds the Raft
/// store, the snapshots (every host's records) and the node's key. A looser one (made by
/// `docker run -v`, say) is tightened, with a warning.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("cannot read data dir {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o7777), "the data dir was open to other users; made it 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make data dir {} private (0700)", dir.display()))?;
    }
    Ok(())
}

fn write_admin_addr(data_dir: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let path = data_dir.join(ADMIN_ADDR_FILE);
    let tmp = data_dir.join(format!("{ADMIN_ADDR_FILE}.tmp"));
    std::fs::write(&tmp, addr.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The loopback address `linkdns status` should use for an admin endpoint bound to `addr`.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(v6) if v6.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}
