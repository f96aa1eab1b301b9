//! The Docker watcher: lists the local engine's running containers at start and after every
//! reconnect, then follows its event stream, and reports what it sees as registry commands about
//! this node's containers. Docker going away is a warning and a retry, never a crash.
//!
//! bollard's models stop here: they are turned into registry [`Container`]s in [`convert`].

mod convert;
mod procfs;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{EventMessage, EventMessageTypeEnum, Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    EventsOptionsBuilder, InspectNetworkOptions, ListContainersOptionsBuilder, ListNetworksOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use linkdns_registry::{
    Command, Container, ContainerId, LinkAlias, LocalChange, LocalContainer, LocalNetwork, NodeId,
    Subnet, Version,
};
use tokio::sync::{mpsc, watch, Notify};

pub use convert::{
    container_from_inspect, local_from_inspect, parse_links, parse_services, LABEL_ALIAS,
    LABEL_LINKS, LABEL_SRV,
};
pub use procfs::{container_at_address, containers_at_addresses, running_containers};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("docker at {uri}: {reason}")]
    Unavailable { uri: String, reason: String },
    #[error("docker API: {0}")]
    Api(String),
}

/// What the watcher tells the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A command about this node's containers, to be proposed.
    Command(Command),
    /// What this host's containers and networks are now, for the local view (not proposed).
    Local(LocalChange),
    /// Connected (again) to the engine; its bridge network's subnets and gateway addresses,
    /// and its firewall backend (`iptables`, `nftables`; `None` from engines before 28, which
    /// have only iptables).
    Connected {
        bridge_subnets: Vec<Subnet>,
        bridge_gateways: Vec<IpAddr>,
        firewall_backend: Option<String>,
    },
    /// Lost the engine; records stay as they are until it is back, but for containers whose
    /// processes are gone (withdrawn meanwhile).
    Disconnected { reason: String },
}

/// Watcher settings.
#[derive(Clone, Debug)]
pub struct WatcherConfig {
    /// `unix:///var/run/docker.sock` or a plain socket path.
    pub uri: String,
    pub node: NodeId,
    /// The Docker network whose subnet is this host's container subnet.
    pub bridge_network: String,
    /// Create `bridge_network` as a bridge network inside this block (the one linkdns
    /// allocated to this host), on the first [`network_prefix`] subnet of it that no Docker
    /// network uses, with its gateway at the first address, whenever it does not exist.
    pub create_network: Option<Subnet>,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// A full resync this often even when no event was missed (belt and braces).
    pub resync_every: Duration,
    /// The version of the first observation; each later one gets the next. It must be above
    /// every version an earlier run of this node used (see [`Version`]).
    pub first_version: Version,
    /// This node's containers in the registry: while the engine is away, those whose
    /// processes are gone from `/proc` are withdrawn (see [`watch`]).
    pub held: Option<Held>,
}

/// This node's containers as the registry holds them (read when Docker is away).
#[derive(Clone)]
pub struct Held(pub Arc<dyn Fn() -> Vec<ContainerId> + Send + Sync>);

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held(..)")
    }
}

/// While the engine is away: containers of this node whose processes were missing from `/proc`
/// at the last look (withdrawn if they still are at the next).
async fn withdraw_the_gone(
    config: &WatcherConfig,
    reports: &mpsc::Sender<Report>,
    clock: &mut Clock,
    missing_before: &mut Vec<ContainerId>,
) {
    let Some(held) = &config.held else { return };
    let ids = (held.0)();
    if ids.is_empty() {
        missing_before.clear();
        return;
    }
    let asked = ids.clone();
    let Ok(Some(running)) =
        tokio::task::spawn_blocking(move || procfs::running_containers(&asked)).await
    else {
        // Cannot tell from here (outside the host's PID namespace): records stay.
        return;
    };
    let missing: Vec<ContainerId> = ids.into_iter().filter(|id| !running.contains(id)).collect();
    for id in missing.iter().filter(|id| missing_before.contains(id)) {
        tracing::info!(container = %id, "container gone while Docker is away (no process left); its records are withdrawn");
        let command = Command::RemoveContainer {
            node: config.node,
            id: id.clone(),
            version: clock.tick(),
        };
        if reports.send(Report::Command(command)).await.is_err() {
            return;
        }
    }
    *missing_before = missing;
}

/// Runs until `shutdown` flips to true or the receiver of `reports` is gone. A notification on
/// `resync` makes it restate this node's whole container set (after a lost proposal).
pub async fn watch(
    config: WatcherConfig,
    reports: mpsc::Sender<Report>,
    resync: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(250);
    let mut was_connected = true; // log the first failure as a warning too
    let mut clock = Clock {
        next: config.first_version,
    };
    let mut missing_before: Vec<ContainerId> = Vec::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let mut resynced = false;
        let started = tokio::time::Instant::now();
        let ended = tokio::select! {
            r = follow(&config, &reports, &resync, &mut resynced, &mut clock) => r,
            _ = shutdown.changed() => return,
        };
        if resynced {
            // The engine's listing said what runs: earlier looks at /proc are moot.
            missing_before.clear();
        }
        if resynced && started.elapsed() >= HEALTHY_SESSION {
            // The session worked for a while: start the backoff over. One that failed right
            // after its resync (an events endpoint that refuses, say) keeps backing off.
            backoff = Duration::from_millis(250);
            was_connected = true;
        }
        let reason = match ended {
            Ok(()) => "event stream ended".to_string(),
            Err(e) => e.to_string(),
        };
        if reports.is_closed() {
            return;
        }
        if was_connected {
            tracing::warn!(uri = %config.uri, %reason, "docker unavailable; DNS keeps serving the last known records, retrying");
            let disconnected = Report::Disconnected {
                reason: reason.clone(),
            };
            tokio::select! {
                _ = reports.send(disconnected) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            tracing::debug!(uri = %config.uri, %reason, ?backoff, "docker still unavailable");
        }
        was_connected = false;
        // Meanwhile, a container of this node whose processes are gone two looks in a row
        // (it died with the engine, or was killed) is withdrawn; one still running stays
        // (live-restore). The engine's listing sets all right once it is back.
        tokio::select! {
            _ = withdraw_the_gone(&config, &reports, &mut clock, &mut missing_before) => {}
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(config.max_backoff);
    }
}

/// Hands out the versions of the watcher's observations, in the order it makes them, across
/// sessions with the engine.
struct Clock {
    next: Version,
}

impl Clock {
    fn tick(&mut self) -> Version {
        let now = self.next;
        self.next += 1;
        now
    }
}

/// Connects to the engine, subscribes to events, resyncs, then follows events until the stream
/// ends or fails.
async fn follow(
    config: &WatcherConfig,
    reports: &mpsc::Sender<Report>,
    resync: &Notify,
    resynced: &mut bool,
    clock: &mut Clock,
) -> Result<(), Error> {
    let docker = connect(&config.uri).await?;
    // The event stream connects when first polled, a moment after this; asking for events since
    // a second before the listing replays whatever happened in between. Replays are harmless:
    // each event leads to an inspection of the container's current state.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().saturating_sub(1))
        .to_string();
    let mut filters = HashMap::new();
    filters.insert("type", vec!["container", "network"]);
    let options = EventsOptionsBuilder::new()
        .since(&since)
        .filters(&filters)
        .build();
    // Read the stream from now on in a task of its own, so the daemon never drops events for a
    // subscriber that is busy listing, inspecting or waiting on the node.
    let mut stream = Box::pin(docker.events(Some(options)));
    let (event_tx, mut events) = mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        while let Some(event) = stream.next().await {
            if event_tx.send(event).is_err() {
                break;
            }
        }
    });
    let _pump = AbortOnDrop(pump);

    let (mut bridge_subnets, mut bridge_gateways) =
        bridge_network(&docker, &config.bridge_network).await;
    if let (true, Some(block)) = (bridge_subnets.is_empty(), config.create_network) {
        // A failure is reported and the watcher goes on: containers on other networks are
        // still answered.
        match create_network(&docker, &config.bridge_network, block).await {
            Ok(()) => {
                (bridge_subnets, bridge_gateways) =
                    bridge_network(&docker, &config.bridge_network).await
            }
            Err(e) => tracing::error!(error = %e, "this host's container network is missing"),
        }
    }
    // An engine whose `info` cannot be read (a proxy, an answer bollard does not parse) is
    // followed all the same; only routing needs to know.
    let firewall_backend = firewall_backend(&docker).await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the engine's firewall backend (docker info); taking it as iptables");
        None
    });
    send(
        reports,
        Report::Connected {
            bridge_subnets,
            bridge_gateways,
            firewall_backend,
        },
    )
    .await?;
    let mut session = Session::default();
    report_networks(&docker, reports).await?;
    resync_all(&docker, config, reports, &mut session, clock).await?;
    *resynced = true;

    let mut periodic = tokio::time::interval(config.resync_every);
    periodic.tick().await; // the first tick is immediate; we just resynced
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return Ok(()) };
                // Everything that arrived meanwhile too (containers starting together): their
                // inspections run at once, the events are handled in order.
                let mut batch = vec![event];
                while batch.len() < MAX_EVENT_BATCH {
                    match events.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => break,
                    }
                }
                let batch = batch
                    .into_iter()
                    .collect::<Result<Vec<EventMessage>, _>>()
                    .map_err(|e| Error::Unavailable {
                        uri: config.uri.clone(),
                        reason: e.to_string(),
                    })?;
                // While events wait, a container that is starting may not be known yet.
                set_backlog(reports, &mut session, batch.len() > 1 || !events.is_empty()).await?;
                let mut inspected = prefetch(&docker, &session, &batch).await?;
                for event in &batch {
                    handle_event(&docker, config, reports, &mut session, clock, &mut inspected, event)
                        .await?;
                }
                set_backlog(reports, &mut session, !events.is_empty()).await?;
            }
            _ = resync.notified() => resync_all(&docker, config, reports, &mut session, clock).await?,
            _ = periodic.tick() => resync_all(&docker, config, reports, &mut session, clock).await?,
        }
    }
}

/// Most events handled as one batch (their inspections at once).
const MAX_EVENT_BATCH: usize = 64;

/// Most inspections under way at once.
const MAX_INSPECTIONS: usize = 16;

/// Inspections made ahead for a batch of events, by container id (`None`: it is gone).
type Inspected = HashMap<String, Option<bollard::models::ContainerInspectResponse>>;

/// Tells the local view whether events wait to be handled, when that changes.
async fn set_backlog(
    reports: &mpsc::Sender<Report>,
    session: &mut Session,
    backlog: bool,
) -> Result<(), Error> {
    if backlog != session.backlog {
        session.backlog = backlog;
        send(reports, Report::Local(LocalChange::Backlog(backlog))).await?;
    }
    Ok(())
}

/// Inspects, all at once, each container whose state the events of `batch` report: each
/// inspection shows the state after all of them (they happened before it), so one per
/// container serves every event of the batch. Not the containers being connected while they
/// start: an inspection waits until the start is over (their `start` event follows).
async fn prefetch(
    docker: &Docker,
    session: &Session,
    batch: &[EventMessage],
) -> Result<Inspected, Error> {
    let mut ids: Vec<String> = batch
        .iter()
        .filter_map(|event| match classify(event)? {
            Happened::Changed { id, .. } | Happened::Disconnect { id, .. } => Some(id),
            Happened::Connect { id, .. } if session.running.contains(&id) => Some(id),
            _ => None,
        })
        .collect();
    ids.sort();
    ids.dedup();
    if ids.len() < 2 {
        // One inspection is made when its event is handled, as it always was.
        return Ok(Inspected::new());
    }
    let results: Vec<(String, Result<_, Error>)> = futures_util::stream::iter(ids)
        .map(|id| async move {
            let details = inspect_details(docker, &id).await;
            (id, details)
        })
        .buffer_unordered(MAX_INSPECTIONS)
        .collect()
        .await;
    results
        .into_iter()
        .map(|(id, details)| details.map(|d| (id, d)))
        .collect()
}

/// What one session with the engine remembers between events.
#[derive(Default)]
struct Session {
    /// Containers reported running (their addresses are known).
    running: HashSet<String>,
    /// Name and link aliases of containers created in this session, from the `create` event's
    /// attributes (which carry the labels): a container being connected is not yet inspectable
    /// without waiting for its start to finish.
    created: HashMap<String, (String, Vec<LinkAlias>)>,
    backlog: bool,
}

/// Most `create` events remembered (a container that is never started is forgotten at the
/// next resync or when there are more than this many).
const MAX_CREATED: usize = 4096;

/// Handles one event: reports what it changed.
async fn handle_event(
    docker: &Docker,
    config: &WatcherConfig,
    reports: &mpsc::Sender<Report>,
    session: &mut Session,
    clock: &mut Clock,
    inspected: &mut Inspected,
    event: &EventMessage,
) -> Result<(), Error> {
    match classify(event) {
        None => Ok(()),
        Some(Happened::Created { id, name, links }) => {
            if session.created.len() >= MAX_CREATED {
                session.created.clear();
            }
            session.created.insert(id, (name, links));
            Ok(())
        }
        Some(Happened::Networks) => report_networks(docker, reports).await,
        Some(Happened::Connect { id, network }) if !session.running.contains(&id) => {
            // Docker connects a container before its process runs and tells its address only
            // once the start is over (an inspection waits for that): say it is coming, so a
            // query from an address nobody holds on that network is known to be it. The
            // `start` event that follows gives its addresses.
            let (name, links) = match session.created.get(&id) {
                Some(known) => known.clone(),
                None => match labels_of(docker, &id).await? {
                    Some(known) => known,
                    None => return Ok(()),
                },
            };
            let change = LocalChange::Connecting {
                id: ContainerId::new(id),
                name,
                links,
                network,
            };
            send(reports, Report::Local(change)).await
        }
        Some(Happened::Connect { id, .. }) => {
            report_state(docker, config, reports, session, clock, inspected, &id).await
        }
        Some(Happened::Disconnect { id, network }) => {
            let change = LocalChange::Disconnected {
                id: ContainerId::new(id.clone()),
                network,
            };
            send(reports, Report::Local(change)).await?;
            report_state(docker, config, reports, session, clock, inspected, &id).await
        }
        Some(Happened::Changed { id, destroyed }) => {
            if destroyed {
                session.created.remove(&id);
            }
            report_state(docker, config, reports, session, clock, inspected, &id).await
        }
    }
}

/// Inspects container `id` and reports its state: to the local view, and as a command.
async fn report_state(
    docker: &Docker,
    config: &WatcherConfig,
    reports: &mpsc::Sender<Report>,
    session: &mut Session,
    clock: &mut Clock,
    inspected: &mut Inspected,
    id: &str,
) -> Result<(), Error> {
    let version = clock.tick();
    let details = match inspected.get(id) {
        Some(details) => details.clone(),
        None => inspect_details(docker, id).await?,
    };
    let (record, local) = match details {
        Some(details) => (
            container_from_inspect(&details, config.node, version),
            local_from_inspect(&details),
        ),
        None => (None, None),
    };
    let change = match local {
        Some(local) => {
            session.running.insert(id.to_string());
            session.created.remove(id);
            LocalChange::Upsert(local)
        }
        None => {
            session.running.remove(id);
            LocalChange::Remove(ContainerId::new(id))
        }
    };
    send(reports, Report::Local(change)).await?;
    let command = match record {
        Some(container) => Command::UpsertContainer(container),
        None => Command::RemoveContainer {
            node: config.node,
            id: ContainerId::new(id),
            version,
        },
    };
    send(reports, Report::Command(command)).await
}

/// Name and link aliases of a container from the listing (which, unlike an inspection, does
/// not wait for a start under way). `None` if it is gone.
async fn labels_of(docker: &Docker, id: &str) -> Result<Option<(String, Vec<LinkAlias>)>, Error> {
    let filters = HashMap::from([("id", vec![id])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let listed = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| Error::Api(e.to_string()))?;
    Ok(listed.into_iter().next().map(|summary| {
        let name = summary
            .names
            .and_then(|n| n.into_iter().next())
            .unwrap_or_default();
        let links = convert::links_of(summary.labels.as_ref());
        (name, links)
    }))
}

/// Lists the engine's networks for the local view.
async fn report_networks(docker: &Docker, reports: &mpsc::Sender<Report>) -> Result<(), Error> {
    let networks = list_networks(docker).await?;
    send(reports, Report::Local(LocalChange::Networks(networks))).await
}

/// The engine's networks, with their subnets and gateways.
async fn list_networks(docker: &Docker) -> Result<Vec<LocalNetwork>, Error> {
    let networks = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .map_err(|e| Error::Api(e.to_string()))?;
    Ok(networks
        .into_iter()
        .filter_map(|n| {
            let configs = n.ipam.and_then(|i| i.config).unwrap_or_default();
            Some(LocalNetwork {
                id: n.id?,
                name: n.name.unwrap_or_default(),
                subnets: configs
                    .iter()
                    .filter_map(|c| c.subnet.as_deref()?.parse().ok())
                    .collect(),
                gateways: configs
                    .iter()
                    .filter_map(|c| c.gateway.as_deref()?.parse().ok())
                    .collect(),
            })
        })
        .collect())
}

/// A session that lasted this long was healthy: the next failure starts the backoff over.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Aborts the task when dropped (the event pump dies with its session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lists every running container and reports them as this node's whole set.
async fn resync_all(
    docker: &Docker,
    config: &WatcherConfig,
    reports: &mpsc::Sender<Report>,
    session: &mut Session,
    clock: &mut Clock,
) -> Result<(), Error> {
    let version = clock.tick();
    let (containers, locals) = list_running(docker, config.node, version).await?;
    tracing::info!(uri = %config.uri, containers = containers.len(), "resyncing this node's records with docker");
    session.running = locals.iter().map(|c| String::from(&c.id)).collect();
    send(reports, Report::Local(LocalChange::Replace(locals))).await?;
    send(
        reports,
        Report::Command(Command::ReplaceContainers {
            node: config.node,
            containers,
            version,
        }),
    )
    .await
}

async fn send(reports: &mpsc::Sender<Report>, report: Report) -> Result<(), Error> {
    reports
        .send(report)
        .await
        .map_err(|_| Error::Api("the node stopped listening".into()))
}

/// Opens a client and checks that the engine answers.
pub async fn connect(uri: &str) -> Result<Docker, Error> {
    let unavailable = |reason: String| Error::Unavailable {
        uri: uri.to_string(),
        reason,
    };
    let path = uri.strip_prefix("unix://").unwrap_or(uri);
    let docker = Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION)
        .map_err(|e| unavailable(e.to_string()))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    docker
        .ping()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    Ok(docker)
}

/// The engine's firewall backend driver (`docker info`'s `FirewallBackend.Driver`: Docker 28
/// says `iptables`, Docker 29 `iptables` or `nftables`; older engines say nothing).
pub async fn firewall_backend(docker: &Docker) -> Result<Option<String>, Error> {
    let info = docker.info().await.map_err(|e| Error::Api(e.to_string()))?;
    Ok(info.firewall_backend.and_then(|f| f.driver))
}

/// The running containers of this engine: the answerable ones as registry records, and all of
/// them as askers.
async fn list_running(
    docker: &Docker,
    node: NodeId,
    version: Version,
) -> Result<(Vec<Container>, Vec<LocalContainer>), Error> {
    let options = ListContainersOptionsBuilder::new().all(false).build();
    let summaries = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| Error::Api(e.to_string()))?;
    let mut records = Vec::with_capacity(summaries.len());
    let mut locals = Vec::with_capacity(summaries.len());
    for summary in summaries {
        let Some(id) = summary.id else { continue };
        // A container can stop between the listing and the inspection: then it is simply gone.
        let Some(details) = inspect_details(docker, &id).await? else {
            continue;
        };
        records.extend(container_from_inspect(&details, node, version));
        locals.extend(local_from_inspect(&details));
    }
    Ok((records, locals))
}

/// The container's details, or `None` if it is gone.
async fn inspect_details(
    docker: &Docker,
    id: &str,
) -> Result<Option<bollard::models::ContainerInspectResponse>, Error> {
    match docker.inspect_container(id, None).await {
        Ok(details) => Ok(Some(details)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(Error::Api(e.to_string())),
    }
}

/// What an event tells the watcher.
#[derive(Debug, PartialEq, Eq)]
enum Happened {
    /// A container was created: its name and link aliases (from the event's labels).
    Created {
        id: String,
        name: String,
        links: Vec<LinkAlias>,
    },
    /// A container is being connected to a network (before its process runs, when starting).
    Connect {
        id: String,
        network: String,
    },
    Disconnect {
        id: String,
        network: String,
    },
    /// A network came or went.
    Networks,
    /// Something that may change what DNS answers for the container.
    Changed {
        id: String,
        destroyed: bool,
    },
}

/// What `event` means for the watcher, if anything.
fn classify(event: &EventMessage) -> Option<Happened> {
    let action = event.action.as_deref()?;
    let actor = event.actor.as_ref()?;
    match event.typ? {
        EventMessageTypeEnum::CONTAINER if action == "create" => {
            let attributes = actor.attributes.as_ref();
            let name = attributes.and_then(|a| a.get("name")).cloned()?;
            let links = convert::links_of(attributes);
            Some(Happened::Created {
                id: actor.id.clone()?,
                name,
                links,
            })
        }
        EventMessageTypeEnum::NETWORK if matches!(action, "connect" | "disconnect") => {
            let id = actor.attributes.as_ref()?.get("container").cloned()?;
            let network = actor.id.clone()?;
            Some(if action == "connect" {
                Happened::Connect { id, network }
            } else {
                Happened::Disconnect { id, network }
            })
        }
        EventMessageTypeEnum::NETWORK if matches!(action, "create" | "destroy") => {
            Some(Happened::Networks)
        }
        EventMessageTypeEnum::CONTAINER => {
            let relevant = matches!(
                action,
                "start"
                    | "restart"
                    | "die"
                    | "stop"
                    | "kill"
                    | "destroy"
                    | "pause"
                    | "unpause"
                    | "rename"
                    | "update"
            ) || action.starts_with("health_status");
            if !relevant {
                return None;
            }
            Some(Happened::Changed {
                id: actor.id.clone()?,
                destroyed: action == "destroy",
            })
        }
        _ => None,
    }
}

/// The Docker networks at `uri`, with their subnets and gateways.
pub async fn networks(uri: &str) -> Result<Vec<LocalNetwork>, Error> {
    list_networks(&connect(uri).await?).await
}

/// The length of each Docker network in a host's block: /24 (IPv4) or /64 (IPv6), or the
/// whole block when it is no wider.
pub fn network_prefix(block: &Subnet) -> u8 {
    let size = if block.is_ipv4() { 24 } else { 64 };
    block.prefix().max(size)
}

/// The first network-sized subnet of `block` that overlaps none of `taken`.
pub fn free_network(block: Subnet, taken: &[Subnet]) -> Option<Subnet> {
    block
        .blocks(network_prefix(&block))
        .find(|candidate| !taken.iter().any(|t| t.overlaps(candidate)))
}

/// Creates the bridge network `name` inside `block`, on a subnet no Docker network of this
/// engine uses, its gateway at the first address.
async fn create_network(docker: &Docker, name: &str, block: Subnet) -> Result<(), Error> {
    let taken: Vec<Subnet> = list_networks(docker)
        .await?
        .into_iter()
        .flat_map(|n| n.subnets)
        .collect();
    let subnet = free_network(block, &taken).ok_or_else(|| {
        Error::Api(format!(
            "cannot create Docker network {name}: every subnet of this host's block {block} is in use"
        ))
    })?;
    let gateway = subnet.first_host();
    let request = NetworkCreateRequest {
        name: name.to_string(),
        driver: Some("bridge".to_string()),
        enable_ipv6: Some(!subnet.is_ipv4()),
        ipam: Some(Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(subnet.to_string()),
                gateway: Some(gateway.to_string()),
                ..IpamConfig::default()
            }]),
            ..Ipam::default()
        }),
        labels: Some(HashMap::from([(
            "linkdns.allocated".to_string(),
            block.to_string(),
        )])),
        ..NetworkCreateRequest::default()
    };
    docker.create_network(request).await.map_err(|e| {
        Error::Api(format!(
            "cannot create Docker network {name} with subnet {subnet}: {e}"
        ))
    })?;
    tracing::info!(network = %name, %subnet, %gateway, "created this host's container network with its allocated subnet; run containers with --network {name}");
    Ok(())
}

/// Subnets and gateways of the named Docker network (empty if it does not exist).
async fn bridge_network(docker: &Docker, network: &str) -> (Vec<Subnet>, Vec<IpAddr>) {
    let inspected = docker
        .inspect_network(network, None::<InspectNetworkOptions>)
        .await;
    match inspected {
        Ok(net) => {
            let configs = net.ipam.and_then(|ipam| ipam.config).unwrap_or_default();
            let subnets = configs
                .iter()
                .filter_map(|c| c.subnet.as_deref()?.parse().ok())
                .collect();
            let gateways = configs
                .iter()
                .filter_map(|c| c.gateway.as_deref()?.parse().ok())
                .collect();
            (subnets, gateways)
        }
        Err(e) => {
            tracing::warn!(%network, error = %e, "cannot read the bridge network's subnet");
            (Vec::new(), Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::EventActor;

    use super::*;

    fn event(
        typ: EventMessageTypeEnum,
        action: &str,
        id: &str,
        attrs: &[(&str, &str)],
    ) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some(id.into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn events_that_change_answers_name_their_container() {
        use EventMessageTypeEnum::{CONTAINER, IMAGE, NETWORK};
        let changed = |id: &str, destroyed| {
            Some(Happened::Changed {
                id: id.into(),
                destroyed,
            })
        };
        for action in [
            "start",
            "die",
            "rename",
            "pause",
            "unpause",
            "health_status: healthy",
        ] {
            assert_eq!(
                classify(&event(CONTAINER, action, "c1", &[])),
                changed("c1", false),
                "{action}"
            );
        }
        assert_eq!(
            classify(&event(CONTAINER, "destroy", "c1", &[])),
            changed("c1", true)
        );
        for action in [
            "exec_create: true",
            "exec_start: true",
            "exec_die",
            "attach",
        ] {
            assert_eq!(
                classify(&event(CONTAINER, action, "c1", &[])),
                None,
                "{action}"
            );
        }
        // A create carries the labels: the link aliases are known before the start.
        assert_eq!(
            classify(&event(
                CONTAINER,
                "create",
                "c1",
                &[
                    ("name", "wp"),
                    ("linkdns.links", "mysql:db"),
                    ("image", "x")
                ]
            )),
            Some(Happened::Created {
                id: "c1".into(),
                name: "wp".into(),
                links: vec![LinkAlias {
                    target: "mysql".into(),
                    alias: "db".into()
                }],
            })
        );
        let connect = event(
            NETWORK,
            "connect",
            "net1",
            &[("container", "c2"), ("name", "app")],
        );
        assert_eq!(
            classify(&connect),
            Some(Happened::Connect {
                id: "c2".into(),
                network: "net1".into()
            })
        );
        assert_eq!(
            classify(&event(NETWORK, "create", "net1", &[])),
            Some(Happened::Networks)
        );
        assert_eq!(classify(&event(IMAGE, "pull", "busybox", &[])), None);
    }
}
