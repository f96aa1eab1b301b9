//! `linkdns run`: opens the data dir, starts the Raft node, the DNS front end, the Docker watcher
//! and the admin endpoint, and feeds the watcher's commands into Raft until told to stop.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use linkdns_dns::{
    upstreams_from_resolv_conf, Acl, Answerer, DnsMetrics, DnsServer, Forwarder, Zone,
};
use linkdns_docker::{Report, WatcherConfig};
use linkdns_raft::{NodeConfig, NodeHandle, SledStore};
use linkdns_registry::{Command, NodeId, NodeInfo};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};

use crate::admin::{self, AdminState, NodeMetrics};
use crate::config::{Config, DEFAULT_DNS_LISTEN};

/// The bootstrap node's Raft id; joined nodes get theirs from the cluster.
const BOOTSTRAP_ID: NodeId = 1;

/// Name of the file in the data dir that holds the admin address, for `linkdns status`.
pub const ADMIN_ADDR_FILE: &str = "admin.addr";

pub async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let store = SledStore::open(&config.data_dir)?;
    let node_id = BOOTSTRAP_ID;
    let node = linkdns_raft::start(
        NodeConfig {
            snapshot_every: config.snapshot_every,
            proposal_timeout: config.proposal_timeout,
            ..NodeConfig::new(node_id)
        },
        store,
        Arc::new(linkdns_raft::NoPeers),
    )?;
    let node = Arc::new(node);
    tracing::info!(node = %config.node_name, id = node_id, data_dir = %config.data_dir.display(), "raft node started");

    register_self(&node, &config, node_id).await?;

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
    let explicit_listen = config.dns_listen.is_some();
    let listen = match &config.dns_listen {
        Some(l) => l.clone(),
        None => vec![DEFAULT_DNS_LISTEN.parse()?],
    };
    // Forwarding to ourselves would loop (a host whose resolv.conf already points at linkdns).
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
    let dns_metrics = DnsMetrics::default();
    let answerer = Arc::new(Answerer {
        zone: Zone::new(&config.domain, config.ttl, Some(node_id))?,
        acl: Acl::new(config.allowed_clients.clone()),
        forwarder: Forwarder::new(upstreams, Duration::from_secs(2)),
        published: node.published(),
        metrics: dns_metrics.clone(),
    });
    let mut dns = vec![DnsServer::start(&listen, answerer.clone(), Duration::from_secs(10)).await?];
    let mut dns_addrs: Vec<SocketAddr> =
        dns.iter().flat_map(|d| d.local_addrs().to_vec()).collect();

    let node_metrics = NodeMetrics::default();
    let admin_state = Arc::new(AdminState::new(
        node.clone(),
        config.node_name.clone(),
        dns_addrs.clone(),
        dns_metrics,
        node_metrics.clone(),
    ));
    let admin_addr = admin::serve(config.admin_listen, admin_state.clone()).await?;
    write_admin_addr(&config.data_dir, admin_addr)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let resync = Arc::new(Notify::new());
    let (reports_tx, mut reports) = mpsc::channel(1024);
    let watcher = tokio::spawn(linkdns_docker::watch(
        WatcherConfig {
            uri: config.docker.clone(),
            node: node_id,
            bridge_network: config.bridge_network.clone(),
            max_backoff: Duration::from_secs(5),
            resync_every: Duration::from_secs(300),
        },
        reports_tx,
        resync.clone(),
        shutdown_rx,
    ));

    let mut stop_check = tokio::time::interval(Duration::from_millis(500));
    // Created once, so a signal that arrives while a proposal is under way is not lost.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let exit = loop {
        tokio::select! {
            report = reports.recv() => {
                let Some(report) = report else { break Ok(()) };
                match report {
                    Report::Command(command) => {
                        node_metrics.docker_events.inc();
                        if matches!(command, Command::ReplaceContainers { .. }) {
                            node_metrics.resyncs.inc();
                        }
                        tokio::select! {
                            result = propose_with_retry(&node, command) => match result {
                                Ok(Proposed::Applied) => {}
                                // Lost: have the watcher restate the whole node.
                                Ok(Proposed::GaveUp) => resync.notify_one(),
                                Err(e) => break Err(e),
                            },
                            _ = interrupt.recv() => break Ok(()),
                            _ = terminate.recv() => break Ok(()),
                        }
                    }
                    Report::Connected { bridge_subnets, bridge_gateways } => {
                        admin_state.set_docker(true, None);
                        answerer.acl.set_detected(bridge_subnets);
                        if !explicit_listen {
                            for gateway in bridge_gateways {
                                let addr = SocketAddr::new(gateway, 53);
                                if dns_addrs.contains(&addr) {
                                    continue;
                                }
                                match DnsServer::start(&[addr], answerer.clone(), Duration::from_secs(10)).await {
                                    Ok(server) => {
                                        dns_addrs.push(addr);
                                        dns.push(server);
                                        admin_state.set_dns_listen(dns_addrs.clone());
                                    }
                                    Err(e) => tracing::warn!(error = %e, "cannot serve DNS on the Docker bridge gateway; containers must use another address"),
                                }
                            }
                        }
                    }
                    Report::Disconnected { reason } => admin_state.set_docker(false, Some(reason)),
                }
            }
            _ = stop_check.tick() => {
                if node.is_stopped() {
                    break Err(anyhow::anyhow!("the raft node stopped; see the log above"));
                }
            }
            _ = interrupt.recv() => break Ok(()),
            _ = terminate.recv() => break Ok(()),
        }
    };
    tracing::info!("shutting down");
    let _ = shutdown_tx.send(true);
    let _ = watcher.await;
    for server in dns {
        server.shutdown().await;
    }
    let _ = std::fs::remove_file(config.data_dir.join(ADMIN_ADDR_FILE));
    // Flushes and joins the Raft thread; an error that stopped it is reported.
    let stopped = node.shutdown();
    match (exit, stopped) {
        // The Raft thread's own error says why better than "the node stopped".
        (_, Err(e)) => Err(e.into()),
        (exit, Ok(())) => exit,
    }
}

/// Adds this node to the registry (or updates its name), waiting for the node to lead.
async fn register_self(node: &NodeHandle, config: &Config, id: NodeId) -> anyhow::Result<()> {
    let info = NodeInfo {
        id,
        name: config.node_name.clone(),
        peer_addr: config.peer_listen.to_string(),
    };
    for attempt in 0..20 {
        match node.propose(Command::UpsertNode(info.clone())).await {
            Ok(_) => return Ok(()),
            Err(linkdns_raft::Error::Registry(e)) => {
                bail!("cannot register node {:?}: {e}", config.node_name)
            }
            Err(e) if attempt < 19 => {
                tracing::debug!(error = %e, "registering this node; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("cannot register this node"),
        }
    }
    Ok(())
}

enum Proposed {
    /// Applied, or rejected by the registry (a deterministic answer; retrying cannot help).
    Applied,
    /// Still failing after the retries.
    GaveUp,
}

/// Proposes a watcher command; retries a few times on transient failures. Fails only when the
/// Raft node itself has stopped.
async fn propose_with_retry(node: &NodeHandle, command: Command) -> anyhow::Result<Proposed> {
    for attempt in 1..=5 {
        match node.propose(command.clone()).await {
            Ok(_) => return Ok(Proposed::Applied),
            Err(linkdns_raft::Error::Registry(e)) => {
                tracing::warn!(error = %e, "watcher command rejected");
                return Ok(Proposed::Applied);
            }
            Err(linkdns_raft::Error::Stopped) => {
                bail!("the raft node stopped; see the log above")
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "proposal failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
        }
    }
    tracing::warn!("a watcher command kept failing; asking the watcher for a full resync");
    Ok(Proposed::GaveUp)
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
