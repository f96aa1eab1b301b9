//! What the leader keeps doing for the cluster, once a second:
//! - liveness: a node not heard from for `liveness_timeout` is marked down (its records are
//!   hidden on every host) and marked up again when it is heard from; a registered node that
//!   is no member (after a restore or a forced new cluster) stays down;
//! - voters: while there are fewer voters than wanted, the most caught-up live learner is
//!   promoted (one change at a time);
//! - the claim limit: the registry's is kept at the leader's configured one;
//! - removals: a retiring node still in the configuration is taken out of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use linkdns_raft::{Membership, NodeHandle, Role};
use linkdns_registry::{ClaimLimit, Command};
use tokio::sync::watch;

use crate::control::{change, RETIRE_PATIENCE, SILENT};
use crate::transport::Transport;

#[derive(Clone, Debug)]
pub struct MaintainConfig {
    /// Voters wanted: 1, 3 or 5.
    pub voters: usize,
    /// Silence after which a node's records are hidden.
    pub liveness_timeout: Duration,
    /// The widest subnets a claim may hold, kept in the registry for the whole cluster.
    pub claim_limit: ClaimLimit,
}

/// A learner this far behind the leader's log is not promoted yet.
const CAUGHT_UP: u64 = 100;
/// A learner not heard from this recently is not promoted.
const RECENT: Duration = Duration::from_secs(3);

pub async fn maintain(
    transport: Transport,
    node: Arc<NodeHandle>,
    config: MaintainConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let started = Instant::now();
    // When this leader first saw each retiring node.
    let mut retiring: HashMap<u64, Instant> = HashMap::new();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let status = node.status();
        if status.role != Role::Leader {
            continue;
        }
        let silence = |id: u64| -> Duration {
            transport
                .last_contact(id)
                .unwrap_or_else(|| started.elapsed())
        };
        // Liveness, as one batch.
        let published = node.published().load_full();
        let registry = &published.registry;
        let mut verdicts = Vec::new();
        for n in registry.nodes() {
            // A record no member holds (kept by a restore or a forced new cluster) stays
            // hidden: its host cannot reach this cluster until it joins again.
            let down = n.id != status.id
                && (!status.is_member(n.id) || silence(n.id) > config.liveness_timeout);
            if down != registry.is_down(n.id) {
                if down {
                    tracing::warn!(node = n.id, name = %n.name, timeout = ?config.liveness_timeout, "node stopped reporting; hiding its records");
                } else {
                    tracing::info!(node = n.id, name = %n.name, "node reporting again; showing its records");
                }
                verdicts.push(Command::SetNodeDown { node: n.id, down });
            }
        }
        // A cluster whose join secret the log does not hold yet (new, or from before
        // rotation): the first leader records its own, so every later leader checks joins.
        if registry.join_hash().is_none() {
            let secret = transport.identity().secret.clone();
            if secret.0 != [0; 32] {
                verdicts.push(Command::SetJoinSecret {
                    hash: secret.hash(),
                });
            }
        }
        if registry.claim_limit() != config.claim_limit {
            tracing::info!(
                v4 = config.claim_limit.v4,
                v6 = config.claim_limit.v6,
                "setting the cluster's claim limit"
            );
            verdicts.push(Command::SetClaimLimit(config.claim_limit));
        }
        if !verdicts.is_empty() {
            if let Err(e) = node.propose(Command::Batch(verdicts)).await {
                tracing::warn!(error = %e, "cannot record liveness");
            }
        }
        // Retiring nodes still in the configuration (a removal whose leader failed midway):
        // out once they are silent (they retired) or had time to receive their retirement.
        retiring.retain(|id, _| registry.is_retiring(*id));
        for id in registry.retiring() {
            let since = *retiring.entry(id).or_insert_with(Instant::now);
            let done = silence(id) > SILENT || since.elapsed() > RETIRE_PATIENCE * 2;
            if status.is_member(id) && done && !status.conf_change_pending {
                tracing::info!(node = id, "finishing the removal of a retired node");
                if let Err(e) = change(&node, Membership::Remove(id)).await {
                    tracing::warn!(node = id, error = %e, "removal failed; will retry");
                }
            }
        }
        // Voters: towards the target through odd counts. From an odd count a promotion needs
        // two ready learners (the second follows a second later): an even count tolerates no
        // more failures than the odd one below it, and needs more nodes up.
        if status.voters.len() < config.voters && !status.conf_change_pending {
            let mut ready: Vec<u64> = status
                .learners
                .iter()
                .copied()
                // Heard from just now, and holding nearly all of the log: a voter that cannot
                // vote yet would only weaken the quorum.
                .filter(|&id| transport.last_contact(id).is_some_and(|d| d < RECENT))
                .filter(|id| {
                    status.matched.get(id).is_some_and(|&m| {
                        m > 0 && m + CAUGHT_UP >= status.last_index && m >= status.snapshot_index
                    })
                })
                .collect();
            ready.sort_by_key(|id| (std::cmp::Reverse(status.matched.get(id).copied()), *id));
            let needed = if status.voters.len() % 2 == 1 { 2 } else { 1 };
            let candidate = (ready.len() >= needed).then(|| ready[0]);
            if let Some(id) = candidate {
                tracing::info!(
                    node = id,
                    voters = status.voters.len(),
                    wanted = config.voters,
                    "promoting a learner to voter"
                );
                if let Err(e) = change(&node, Membership::Promote(id)).await {
                    tracing::warn!(node = id, error = %e, "promotion failed; will retry");
                }
            }
        }
    }
}
