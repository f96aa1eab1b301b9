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

use linkdns_raft::{NodeHandle, Role};
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
        let renewed = match status.leader {
            Some(leader) if leader == id && status.role == Role::Leader => {
                renew_own(&transport, &node, &identity).await
            }
            Some(leader) => match inner.address_of(leader) {
                Some(addr) => renew_through(&transport, &addr.to_string(), &identity).await,
                None => Err(format!("no address for the leader (node {leader})")),
            },
            None => Err("no leader right now".to_string()),
        };
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

/// The leader renews its own certificate: issued and bound here.
async fn renew_own(
    transport: &Transport,
    node: &NodeHandle,
    identity: &Identity,
) -> Result<(), String> {
    let key = new_node_key().map_err(|e| e.to_string())?;
    let (cert, expires) = crate::control::renew(
        &transport.inner,
        node,
        identity.node_id,
        &RawPublicKey::of(&key),
    )
    .await?;
    install(transport, identity, cert, &key, expires)
}

async fn renew_through(
    transport: &Transport,
    leader: &str,
    identity: &Identity,
) -> Result<(), String> {
    let key = new_node_key().map_err(|e| e.to_string())?;
    let (cert, expires) = crate::client::renew(leader, identity, &key)
        .await
        .map_err(|e| e.to_string())?;
    install(transport, identity, cert, &key, expires)
}

fn install(
    transport: &Transport,
    identity: &Identity,
    cert: Vec<u8>,
    key: &rcgen::KeyPair,
    expires: u64,
) -> Result<(), String> {
    let mut updated = identity.clone();
    updated.node_cert = cert;
    updated.node_key = key.serialize_der();
    updated.node_cert_expires = expires;
    updated.node_cert_since = unix_now();
    transport
        .replace_identity(updated)
        .map_err(|e| e.to_string())?;
    tracing::info!(expires, "this node's certificate was renewed");
    Ok(())
}
