//! Who is told: this node's claimed IPv4 subnets announced over BGP to the routers of
//! `--bgp-peer` ([`linkdns_bgp::Speaker`]), with this host's address towards each router as
//! the next hop, so machines outside the cluster (a VPC's VMs) reach containers by their own
//! addresses. Follows the claims in the replicated registry: a claim changed is announced, a
//! claim given up withdrawn; a stop (and a removal) ends every session with a Cease, so the
//! routers withdraw at once, and a restart announces again.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use linkdns_bgp::{Prefix, Speaker};
use linkdns_raft::NodeHandle;
use linkdns_registry::Subnet;

use crate::catch_up::CatchUp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How long a stop waits for the Cease to go out.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// One BGP session as `linkdns routes`, `status` and `/metrics` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BgpSession {
    pub peer: String,
    /// idle, connect, opensent, openconfirm, established.
    pub state: String,
    /// This host's address towards the router: the next hop it announces.
    pub next_hop: Option<String>,
    pub announced: Vec<String>,
    pub uptime_secs: Option<u64>,
    /// Sessions established since start.
    pub established: u64,
    pub last_error: Option<String>,
}

/// The speaker, fed from the registry.
pub struct Announcer {
    node: Arc<NodeHandle>,
    /// Claims are announced once the replica caught up (see [`CatchUp`]).
    catch_up: CatchUp,
    speaker: tokio::sync::Mutex<Option<Speaker>>,
    /// The sessions' state, live (also once the speaker stopped).
    sessions: linkdns_bgp::Sessions,
}

impl Announcer {
    /// Starts the sessions with `config`'s routers (none: no announcer).
    pub fn start(config: linkdns_bgp::Config, node: Arc<NodeHandle>) -> Option<Arc<Announcer>> {
        if config.peers.is_empty() {
            return None;
        }
        tracing::info!(peers = ?config.peers, asn = config.asn, peer_asn = config.peer_asn, "announcing this host's container subnets over BGP");
        // Nothing until the replica holds the cluster's view: a claim on disk may have been
        // taken away while this node was down.
        let speaker = Speaker::start(config, Vec::new());
        Some(Arc::new(Announcer {
            catch_up: CatchUp::new(&node),
            node,
            sessions: speaker.sessions(),
            speaker: tokio::sync::Mutex::new(Some(speaker)),
        }))
    }

    /// Announces this node's claims as they change, until shutdown (then stops the sessions).
    pub async fn follow(self: Arc<Announcer>, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.node.subscribe();
        // Catching up ends with a change of the node, or (the grace period) with time.
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let mut caught_up = false;
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = check.tick(), if !caught_up => {}
                _ = shutdown.changed() => break,
            }
            caught_up = caught_up || self.catch_up.done(&self.node);
            if !caught_up {
                continue;
            }
            if let Some(speaker) = self.speaker.lock().await.as_ref() {
                speaker.announce(own_prefixes(&self.node));
            }
        }
        self.stop().await;
    }

    /// Ends every session with a Cease: the routers withdraw this host's subnets.
    pub async fn stop(&self) {
        if let Some(speaker) = self.speaker.lock().await.take() {
            speaker.stop(STOP_WAIT).await;
            tracing::info!("BGP sessions ended; the routers withdraw this host's subnets");
        }
    }

    pub fn sessions(&self) -> Vec<BgpSession> {
        self.sessions
            .status()
            .into_iter()
            .map(|s| BgpSession {
                peer: s.peer.map(|p| p.to_string()).unwrap_or_default(),
                state: s.state.name().to_string(),
                next_hop: s.local.map(|l| l.to_string()),
                announced: s.announced.iter().map(ToString::to_string).collect(),
                uptime_secs: s.uptime().map(|u| u.as_secs()),
                established: s.established,
                last_error: s.last_error,
            })
            .collect()
    }
}

/// This node's claimed IPv4 subnets, as the replica has them.
fn own_prefixes(node: &NodeHandle) -> Vec<Prefix> {
    let published = node.published().load_full();
    published
        .registry
        .node_subnets(node.id())
        .iter()
        .filter_map(prefix_of)
        .collect()
}

fn prefix_of(subnet: &Subnet) -> Option<Prefix> {
    match subnet.addr() {
        IpAddr::V4(v4) => Prefix::new(v4, subnet.prefix()),
        IpAddr::V6(_) => None,
    }
}
