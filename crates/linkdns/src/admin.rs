//! The admin HTTP endpoint (loopback): `/status` as JSON, `/metrics` in Prometheus text,
//! `/health` and `/ready` for supervisors and load balancers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use linkdns_cluster::Transport;
use linkdns_dns::DnsMetrics;
use linkdns_raft::NodeHandle;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as MetricsRegistry;
use serde::{Deserialize, Serialize};

use crate::routing::{DockerConfig, RoutesStatus, Routing};

/// Counters of the node itself (the DNS crate keeps its own). Most are read off the node's
/// status at each scrape; counters of events (leader changes, proposals) are counted as they
/// happen.
#[derive(Clone, Debug, Default)]
pub struct NodeMetrics {
    pub docker_events: Counter,
    pub resyncs: Counter,
    records: Gauge,
    term: Gauge,
    commit: Gauge,
    applied: Gauge,
    leader_id: Gauge,
    is_leader: Gauge,
    leader_changes: Counter,
    members: Gauge,
    members_alive: Gauge,
    last_contact: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    proposals: Family<OutcomeLabels, Counter>,
    routes: Gauge,
    routes_refused: Gauge,
    bgp_established: Family<PeerLabels, Gauge>,
    bgp_announced: Family<PeerLabels, Gauge>,
    bgp_sessions: Counter,
    reconciliations: Counter,
    snapshots: Counter,
    snapshot_bytes: Gauge,
    snapshot_seconds: Gauge<f64, AtomicU64>,
    max_tick_gap: Gauge<f64, AtomicU64>,
    data_dir_bytes: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl NodeMetrics {
    /// Counts a proposal's outcome: `applied`, `rejected`, `retry` (given up after retries) or
    /// `stopped`.
    pub fn proposal(&self, outcome: &'static str) {
        self.proposals
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts leader changes as the node reports them, until it stops.
    pub async fn count_leader_changes(self, node: Arc<NodeHandle>) {
        let mut changes = node.subscribe();
        let mut leader = node.status().leader;
        while changes.changed().await.is_ok() {
            let now = node.status().leader;
            if now != leader && now.is_some() {
                self.leader_changes.inc();
            }
            leader = now;
        }
    }

    /// Raises `counter` to `total` (a count kept elsewhere, read at a scrape).
    fn catch_up(counter: &Counter, total: u64) {
        let seen = counter.get();
        if total > seen {
            counter.inc_by(total - seen);
        }
    }
}

/// `/status` and `linkdns status --json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub cluster: String,
    pub node: String,
    pub node_id: u64,
    pub leader: Option<String>,
    pub leader_id: Option<u64>,
    pub role: String,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub records: usize,
    pub members: Vec<Member>,
    pub docker: DockerStatus,
    pub dns_listen: Vec<SocketAddr>,
    /// Routes to the other hosts' container subnets (`linkdns routes` has the details).
    #[serde(default)]
    pub routing: RoutesStatus,
    /// SHA-256 of the cluster's join secret as the log holds it (hex): lets `linkdns token`
    /// tell a rotated secret from this host's copy. The secret itself is never here.
    #[serde(default)]
    pub join_secret_sha256: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub name: String,
    pub id: u64,
    pub peer_addr: String,
    /// `voter` or `learner`.
    pub role: String,
    /// The cluster's verdict (the leader's): `false` while the host's records are hidden.
    pub alive: bool,
    /// Milliseconds since this node last heard from the member (`None`: never, or itself).
    pub last_contact_ms: Option<u64>,
    /// The linkdns version the member registered at its last start (`None`: not yet, or a
    /// version from before nodes registered theirs).
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DockerStatus {
    pub connected: bool,
    pub error: Option<String>,
}

pub struct AdminState {
    node: Arc<NodeHandle>,
    transport: Transport,
    node_name: String,
    dns_listen: Mutex<Vec<SocketAddr>>,
    docker: Mutex<DockerStatus>,
    metrics: MetricsRegistry,
    node_metrics: NodeMetrics,
    routing: Arc<Routing>,
    data_dir: PathBuf,
    /// The last log index on disk when the node started: a replica that applied it is caught
    /// up as far as it can know without a leader.
    on_disk: u64,
    /// One backup is encoded at a time (off the runtime); another asked meanwhile gets 429.
    backups: Arc<tokio::sync::Semaphore>,
}

/// `/ready`: whether DNS serves from a replica that has a leader or is caught up, and why not.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Readiness {
    pub ready: bool,
    /// Whether the replica follows a leader right now.
    pub leader: bool,
    pub reason: String,
}

impl AdminState {
    /// The admin state of the node `config` describes (its name and data dir).
    pub fn new(
        config: &crate::config::Config,
        node: Arc<NodeHandle>,
        transport: Transport,
        dns_listen: Vec<SocketAddr>,
        dns: DnsMetrics,
        node_metrics: NodeMetrics,
        routing: Arc<Routing>,
    ) -> AdminState {
        let mut metrics = MetricsRegistry::default();
        dns.register(&mut metrics);
        metrics.register(
            "linkdns_docker_events",
            "Container changes reported by the Docker watcher",
            node_metrics.docker_events.clone(),
        );
        metrics.register(
            "linkdns_docker_resyncs",
            "Full resyncs with the Docker engine",
            node_metrics.resyncs.clone(),
        );
        metrics.register(
            "linkdns_records",
            "Container records in the local replica",
            node_metrics.records.clone(),
        );
        metrics.register(
            "linkdns_raft_term",
            "Current Raft term",
            node_metrics.term.clone(),
        );
        metrics.register(
            "linkdns_raft_commit_index",
            "Raft commit index",
            node_metrics.commit.clone(),
        );
        metrics.register(
            "linkdns_raft_applied_index",
            "Raft applied index",
            node_metrics.applied.clone(),
        );
        let m = &node_metrics;
        // Every outcome exposed from the start (at 0).
        for outcome in ["applied", "rejected", "retry", "stopped"] {
            let _ = m.proposals.get_or_create(&OutcomeLabels { outcome });
        }
        metrics.register(
            "linkdns_raft_leader_id",
            "Raft id of the leader this node follows (0: none)",
            m.leader_id.clone(),
        );
        metrics.register(
            "linkdns_raft_is_leader",
            "1 while this node is the leader",
            m.is_leader.clone(),
        );
        metrics.register(
            "linkdns_raft_leader_changes",
            "Times this node saw a new leader",
            m.leader_changes.clone(),
        );
        metrics.register(
            "linkdns_members",
            "Voters and learners of the cluster",
            m.members.clone(),
        );
        metrics.register(
            "linkdns_members_alive",
            "Members whose records are shown (the leader heard from them recently)",
            m.members_alive.clone(),
        );
        metrics.register(
            "linkdns_peer_last_contact_seconds",
            "Seconds since this node last heard from each other member",
            m.last_contact.clone(),
        );
        metrics.register(
            "linkdns_proposals",
            "This node's proposals of its own records, by outcome",
            m.proposals.clone(),
        );
        metrics.register(
            "linkdns_routes",
            "Routes to other hosts' container subnets in the kernel",
            m.routes.clone(),
        );
        metrics.register(
            "linkdns_routes_refused",
            "Other hosts' subnets not routed (conflicts), see `linkdns routes`",
            m.routes_refused.clone(),
        );
        metrics.register(
            "linkdns_bgp_session_established",
            "1 while the BGP session with each router is established, else 0",
            m.bgp_established.clone(),
        );
        metrics.register(
            "linkdns_bgp_announced_prefixes",
            "Prefixes this node announces to each router",
            m.bgp_announced.clone(),
        );
        metrics.register(
            "linkdns_bgp_sessions_established",
            "BGP sessions established since start (a rising count is a flapping router)",
            m.bgp_sessions.clone(),
        );
        metrics.register(
            "linkdns_route_reconciliations",
            "Route and firewall reconciliations done",
            m.reconciliations.clone(),
        );
        metrics.register(
            "linkdns_snapshots",
            "Raft snapshots this node took",
            m.snapshots.clone(),
        );
        metrics.register(
            "linkdns_snapshot_bytes",
            "Size of the last snapshot this node took",
            m.snapshot_bytes.clone(),
        );
        metrics.register(
            "linkdns_snapshot_seconds",
            "Time the last snapshot took to encode and store (on its own thread)",
            m.snapshot_seconds.clone(),
        );
        metrics.register(
            "linkdns_raft_max_tick_gap_seconds",
            "Longest time between two Raft ticks since the node started (nominally 0.02)",
            m.max_tick_gap.clone(),
        );
        metrics.register(
            "linkdns_data_dir_bytes",
            "Bytes in the data dir (Raft log, snapshots, identity)",
            m.data_dir_bytes.clone(),
        );
        AdminState {
            on_disk: node.status().last_index,
            node,
            transport,
            node_name: config.node_name.clone(),
            dns_listen: Mutex::new(dns_listen),
            docker: Mutex::new(DockerStatus::default()),
            metrics,
            node_metrics,
            routing,
            data_dir: config.data_dir.clone(),
            backups: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    pub fn set_docker(&self, connected: bool, error: Option<String>) {
        if let Ok(mut d) = self.docker.lock() {
            *d = DockerStatus { connected, error };
        }
    }

    pub fn set_dns_listen(&self, addrs: Vec<SocketAddr>) {
        if let Ok(mut d) = self.dns_listen.lock() {
            *d = addrs;
        }
    }

    pub fn status(&self) -> Status {
        let raft = self.node.status();
        let published = self.node.published().load_full();
        let registry = &published.registry;
        let name_of = |id: u64| registry.node(id).map(|n| n.name.clone());
        let mut members: Vec<Member> = raft
            .voters
            .iter()
            .map(|&id| (id, "voter"))
            .chain(raft.learners.iter().map(|&id| (id, "learner")))
            .map(|(id, role)| Member {
                name: name_of(id).unwrap_or_else(|| format!("node-{id}")),
                id,
                peer_addr: registry
                    .node(id)
                    .map(|n| n.peer_addr.clone())
                    .unwrap_or_default(),
                role: role.to_string(),
                alive: if id == raft.id {
                    raft.role != linkdns_raft::Role::Stopped
                } else {
                    !registry.is_down(id)
                },
                last_contact_ms: (id != raft.id)
                    .then(|| self.transport.last_contact(id))
                    .flatten()
                    .map(|d| d.as_millis() as u64),
                version: registry.software_version(id).map(str::to_string),
            })
            .collect();
        members.sort_by_key(|m| m.id);
        Status {
            cluster: self.transport.identity().cluster.to_string(),
            node: self.node_name.clone(),
            node_id: raft.id,
            leader: raft.leader.and_then(name_of),
            leader_id: raft.leader,
            role: raft.role.as_str().to_string(),
            term: raft.term,
            commit_index: raft.commit_index,
            applied_index: raft.applied_index,
            snapshot_index: raft.snapshot_index,
            records: registry.record_count(),
            members,
            docker: self.docker.lock().map(|d| d.clone()).unwrap_or_default(),
            dns_listen: self
                .dns_listen
                .lock()
                .map(|d| d.clone())
                .unwrap_or_default(),
            routing: self.routing.view(),
            join_secret_sha256: registry
                .join_hash()
                .map(|h| linkdns_cluster::identity::hex(h)),
        }
    }

    fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let s = self.status();
        let raft = self.node.status();
        let m = &self.node_metrics;
        m.records.set(s.records as i64);
        m.term.set(s.term as i64);
        m.commit.set(s.commit_index as i64);
        m.applied.set(s.applied_index as i64);
        m.leader_id.set(raft.leader.unwrap_or(0) as i64);
        m.is_leader
            .set(i64::from(raft.role == linkdns_raft::Role::Leader));
        m.members.set(s.members.len() as i64);
        m.members_alive
            .set(s.members.iter().filter(|m| m.alive).count() as i64);
        m.last_contact.clear();
        for member in &s.members {
            if let Some(ms) = member.last_contact_ms {
                let peer = PeerLabels {
                    peer: member.name.clone(),
                };
                m.last_contact.get_or_create(&peer).set(ms as f64 / 1000.0);
            }
        }
        m.routes.set(s.routing.routes.len() as i64);
        m.routes_refused.set(s.routing.refused.len() as i64);
        NodeMetrics::catch_up(&m.reconciliations, s.routing.reconciliations);
        for b in &s.routing.bgp {
            let peer = PeerLabels {
                peer: b.peer.clone(),
            };
            m.bgp_established
                .get_or_create(&peer)
                .set(i64::from(b.state == "established"));
            m.bgp_announced
                .get_or_create(&peer)
                .set(b.announced.len() as i64);
        }
        NodeMetrics::catch_up(
            &m.bgp_sessions,
            s.routing.bgp.iter().map(|b| b.established).sum(),
        );
        NodeMetrics::catch_up(&m.snapshots, raft.snapshots_taken);
        m.snapshot_bytes.set(raft.last_snapshot_bytes as i64);
        m.snapshot_seconds
            .set(raft.last_snapshot_micros as f64 / 1_000_000.0);
        m.max_tick_gap
            .set(raft.max_tick_gap_micros as f64 / 1_000_000.0);
        m.data_dir_bytes.set(dir_bytes(&self.data_dir) as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.metrics)?;
        Ok(out)
    }
}

/// Bytes of the files under `dir` (a few dozen: sled's files, the identity, markers).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// What monitoring reads, on TCP and on the admin socket: `/health`, `/ready`, `/metrics`.
fn monitoring() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/health", get(health_handler))
        .route("/ready", get(ready_handler))
        .route("/metrics", get(metrics_handler))
}

/// The admin socket in the data dir: everything the endpoint serves, to root only.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// Binds the TCP admin endpoint and serves it in the background; returns the bound address.
/// It serves what monitoring needs, `/health`, `/ready` and `/metrics`; what exports or shows
/// the cluster's state is on the admin socket only ([`serve_private`]).
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for the admin endpoint on {addr} (--admin-listen)")
    })?;
    let bound = listener.local_addr()?;
    let app = monitoring().with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });
    if !bound.ip().is_loopback() {
        tracing::warn!(addr = %bound, "the admin endpoint listens on a non-loopback address (--admin-public): other hosts read /metrics");
    }
    tracing::info!(addr = %bound, "admin endpoint listening (/ready, /health, /metrics)");
    Ok(bound)
}

/// Binds `DIR/admin.sock` (mode 0600: its owner, root for a service, only) and serves the
/// whole admin API on it in the background: `/status`, `/routes`, `/docker-config`,
/// `/backup`, and what the TCP endpoint serves. The CLI talks to the node through it. A
/// socket left by a run that died is replaced (the data dir's lock is already held).
pub async fn serve_private(data_dir: &Path, state: Arc<AdminState>) -> anyhow::Result<PathBuf> {
    let path = data_dir.join(ADMIN_SOCKET);
    let tmp = data_dir.join(format!("{ADMIN_SOCKET}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp)
        .with_context(|| format!("cannot listen on the admin socket {}", tmp.display()))?;
    // Private before it has its name: nobody else ever connects.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot make {} private", tmp.display()))?;
    }
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot put the admin socket at {}", path.display()))?;
    let app = monitoring()
        .route("/status", get(status_handler))
        .route("/routes", get(routes_handler))
        .route("/docker-config", get(docker_config_handler))
        .route("/backup", get(backup_handler))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin socket stopped");
        }
    });
    tracing::info!(socket = %path.display(), "admin socket listening (/status, /routes, /docker-config, /backup; root only)");
    Ok(path)
}

impl AdminState {
    /// Whether DNS answers from a replica that has a leader, or that has applied everything it
    /// had on disk at start (a host cut off from the others keeps answering from it).
    pub fn readiness(&self) -> Readiness {
        let status = self.node.status();
        if let Some(reason) = status.degraded {
            return Readiness {
                ready: false,
                leader: false,
                reason: format!("the data dir cannot be written ({reason}); DNS answers from memory, writes wait until it can be"),
            };
        }
        readiness(
            self.node.is_stopped(),
            status.applied_index,
            status.leader.is_some(),
            self.on_disk,
        )
    }
}

/// See [`AdminState::readiness`].
fn readiness(stopped: bool, applied: u64, leader: bool, on_disk: u64) -> Readiness {
    let (ready, reason) = if stopped {
        (false, "the raft node stopped; see the log".to_string())
    } else if applied == 0 {
        (
            false,
            "no replica yet: waiting for the leader's snapshot (a joining node)".to_string(),
        )
    } else if leader {
        (true, "following the leader".to_string())
    } else if applied >= on_disk {
        (
            true,
            "no leader right now; answering from the replica, which is caught up with what it had at start".to_string(),
        )
    } else {
        (
            false,
            format!("no leader, and the replica has applied {applied} of the {on_disk} log entries it had at start"),
        )
    };
    Readiness {
        ready,
        leader,
        reason,
    }
}

/// `/backup`: the committed records as a backup file (see `recovery.rs`). Encoded on a
/// blocking thread, one at a time: another asked meanwhile gets 429 at once.
async fn backup_handler(State(state): State<Arc<AdminState>>) -> axum::response::Response {
    let Ok(permit) = state.backups.clone().try_acquire_owned() else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "a backup is being taken; ask again when it is done\n",
        )
            .into_response();
    };
    let published = state.node.published().load_full();
    let raft = state.node.status();
    let (cluster, name) = (
        state.transport.identity().cluster.to_string(),
        state.node_name.clone(),
    );
    let encoded = tokio::task::spawn_blocking(move || {
        let _one_at_a_time = permit;
        let bytes = crate::recovery::encode_backup(&published, cluster, name, raft.id);
        tracing::info!(
            applied = published.applied,
            records = published.registry.record_count(),
            "backup taken"
        );
        bytes
    })
    .await;
    match encoded {
        Ok(bytes) => (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the backup failed: {e}\n"),
        )
            .into_response(),
    }
}

/// `/health`: 200 while the process serves.
async fn health_handler() -> &'static str {
    "ok\n"
}

/// `/ready`: 200 when ready, else 503; the body says why.
async fn ready_handler(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let readiness = state.readiness();
    let code = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(readiness))
}

async fn status_handler(State(state): State<Arc<AdminState>>) -> Json<Status> {
    Json(state.status())
}

#[derive(Debug, Deserialize)]
struct RoutesQuery {
    #[serde(default)]
    plan: bool,
}

/// `/routes`, and with `?plan=true` the changes a reconciliation would make now.
async fn routes_handler(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<RoutesQuery>,
) -> Json<RoutesStatus> {
    Json(state.routing.status(query.plan).await)
}

/// `/docker-config`: the Docker daemon settings for this host.
async fn docker_config_handler(State(state): State<Arc<AdminState>>) -> Json<DockerConfig> {
    Json(state.routing.docker_config())
}

async fn metrics_handler(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    match state.metrics_text() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::readiness;

    #[test]
    fn ready_means_a_replica_with_a_leader_or_caught_up() {
        assert!(readiness(false, 40, true, 50).ready, "with a leader");
        let alone = readiness(false, 50, false, 50);
        assert!(alone.ready && !alone.leader, "caught up, no leader");
        let behind = readiness(false, 40, false, 50);
        assert!(!behind.ready);
        assert_eq!(
            behind.reason,
            "no leader, and the replica has applied 40 of the 50 log entries it had at start"
        );
        assert!(!readiness(false, 0, true, 0).ready, "no replica yet");
        assert!(!readiness(true, 50, true, 50).ready, "stopped");
    }
}
