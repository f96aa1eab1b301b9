//! What a node keeps doing for its own credentials, once a second:
//! - a voter without the CA key fetches it from a voter that holds it; a learner holding one
//!   (from before only voters kept it) drops it;
//! - a certificate with less than a third of its validity left (or one from before
//!   certificates expired) is renewed through the leader, which binds the new one through the
//!   log first; the leader renews its own the same way.
//!
//! The new identity is saved to the data dir and used for every new connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use linkdns_raft::{NodeHandle, RaftStatus, Role};
use tokio::sync::watch;

use crate::identity::{new_node_key, unix_now, Identity, RawPublicKey};
use crate::transport::Transport;

/// After a failed attempt, wait this long before the next.
const RETRY: Duration = Duration::from_secs(10);

pub async fn keep_credentials(
    transport: Transport,
    node: Arc<NodeHandle>,
    mut shutdown: watch::Receiver<bool>,
) {
    let inner = transport.inner.clone();
    let id = inner.id;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut failed: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        if failed.is_some_and(|t| t.elapsed() < RETRY) {
            continue;
        }
        let status = node.status();
        let identity = transport.identity();
        if status.voters.contains(&id) && !identity.has_ca_key() {
            if let Err(e) = fetch_ca_key(&transport, &status.voters, &identity).await {
                tracing::warn!(error = %e, "this node is a voter but cannot get the CA key yet; will retry");
                failed = Some(Instant::now());
            }
            continue;
        }
        if !status.is_member(id) {
            continue;
        }
        if !status.voters.contains(&id) && identity.has_ca_key() && status.role == Role::Learner {
            // A learner that holds the CA key from before only voters kept it: drop it.
            let mut updated = (*identity).clone();
            updated.ca_key.clear();
            match transport.replace_identity(updated) {
                Ok(()) => {
                    tracing::info!("this learner dropped its copy of the CA key (voters keep it)")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot drop this learner's copy of the CA key")
                }
            }
            continue;
        }
        let now = unix_now();
        if !identity.renewal_due(now, inner.cert_validity()) {
            continue;
        }
        let left = identity.node_cert_expires.saturating_sub(now);
        let renewed = renew(&transport, &node, &status, &identity).await;
        match renewed {
            Ok(()) => failed = None,
            Err(e) => {
                tracing::warn!(error = %e, left_secs = left, "cannot renew this node's certificate yet; will retry");
                failed = Some(Instant::now());
            }
        }
    }
}

async fn fetch_ca_key(
    transport: &Transport,
    voters: &[u64],
    identity: &Identity,
) -> Result<(), String> {
    let inner = &transport.inner;
    let mut last = "no other voter to ask".to_string();
    for &voter in voters.iter().filter(|&&v| v != inner.id) {
        let Some(addr) = inner.address_of(voter) else {
            continue;
        };
        match crate::client::fetch_ca_key(&addr.to_string(), identity).await {
            Ok(ca_key) => {
                let mut updated = identity.clone();
                updated.ca_key = ca_key;
                transport
                    .replace_identity(updated)
                    .map_err(|e| e.to_string())?;
                tracing::info!(from = voter, "this voter now holds the CA key");
                return Ok(());
            }
            Err(e) => last = format!("node {voter}: {e}"),
        }
    }
    Err(last)
}

/// A new certificate for a new key, from the leader (issued and bound there; by the leader
/// itself when this node leads), installed as this node's identity.
async fn renew(
    transport: &Transport,
    node: &NodeHandle,
    status: &RaftStatus,
    identity: &Identity,
) -> Result<(), String> {
    // The same key until a renewal lands: one whose answer was lost is fetched again for it
    // (the leader hands out what it issued; with the certificate it replaced this node may
    // ask for nothing else).
    let pending = transport
        .inner
        .pending_key
        .lock()
        .ok()
        .and_then(|p| p.clone());
    let key = match pending.map(|der| rcgen::KeyPair::try_from(der.as_slice())) {
        Some(Ok(key)) => key,
        _ => {
            let key = new_node_key().map_err(|e| e.to_string())?;
            if let Ok(mut p) = transport.inner.pending_key.lock() {
                *p = Some(key.serialize_der());
            }
            key
        }
    };
    let (cert, expires) = match status.leader {
        Some(leader) if leader == identity.node_id && status.role == Role::Leader => {
            crate::control::renew(
                &transport.inner,
                node,
                identity.node_id,
                &RawPublicKey::of(&key),
            )
            .await?
        }
        Some(leader) => {
            let addr = transport
                .inner
                .address_of(leader)
                .ok_or_else(|| format!("no address for the leader (node {leader})"))?;
            crate::client::renew(&addr.to_string(), identity, &key)
                .await
                .map_err(|e| e.to_string())?
        }
        None => return Err("no leader right now".to_string()),
    };
    let mut updated = identity.clone();
    updated.node_cert = cert;
    updated.node_key = key.serialize_der();
    updated.node_cert_expires = expires;
    updated.node_cert_since = unix_now();
    transport
        .replace_identity(updated)
        .map_err(|e| e.to_string())?;
    if let Ok(mut p) = transport.inner.pending_key.lock() {
        *p = None;
    }
    tracing::info!(expires, "this node's certificate was renewed");
    Ok(())
}
