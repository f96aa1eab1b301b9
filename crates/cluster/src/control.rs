//! Control requests: a new host asks to join, a member asks to remove a node. Served by the
//! leader; other members redirect to it. Both end in one membership change through Raft.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use linkdns_raft::{Membership, NodeHandle, RetryPolicy, Role};
use linkdns_registry::{normalize_name, Command, NodeInfo};

use crate::identity::{fingerprint, RawPublicKey, Secret};
use crate::transport::{member_ids, Caller, ControlHandler, Inner};
use crate::wire::{self, Reply, Request};

/// How long a membership change may keep meeting another one in progress.
const CHANGE_PATIENCE: Duration = Duration::from_secs(15);
/// How long a removal waits for the node to receive its retirement.
pub(crate) const RETIRE_PATIENCE: Duration = Duration::from_secs(5);
/// A node not heard from for this long will not receive its retirement now.
pub(crate) const SILENT: Duration = Duration::from_secs(2);

/// The control requests' handler the transport is given (see [`crate::attach`]). It holds the
/// transport weakly: the transport holds it.
pub(crate) struct Handler {
    transport: std::sync::Weak<Inner>,
}

impl Handler {
    pub(crate) fn new(transport: &crate::Transport) -> Handler {
        Handler {
            transport: Arc::downgrade(&transport.inner),
        }
    }
}

impl ControlHandler for Handler {
    fn handle(
        &self,
        request: Request,
        caller: Caller,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send + '_>> {
        Box::pin(async move {
            match self.transport.upgrade() {
                Some(inner) => handle(&inner, request, caller).await,
                None => refused("this node is stopping"),
            }
        })
    }
}

async fn handle(inner: &Inner, request: Request, caller: Caller) -> Reply {
    let Caller {
        member,
        superseded,
        local,
        remote,
    } = caller;
    let Some(node) = inner.node() else {
        return refused("this node is still starting; retry in a moment");
    };
    if let Request::Join {
        version,
        cluster,
        secret,
        name,
        peer_addr,
        public_key,
    } = request
    {
        if version != wire::PROTOCOL_VERSION {
            return denied(format!(
                "protocol version {version}; this node speaks {}: use the same linkdns version",
                wire::PROTOCOL_VERSION
            ));
        }
        if cluster != inner.cluster {
            return denied(format!(
                "the token is for cluster {cluster}, this node belongs to cluster {}",
                inner.cluster
            ));
        }
        if !join_secret_matches(inner, node, &Secret(secret)) {
            return denied("wrong join token: the secret does not match this cluster's (was it rotated? `linkdns token` on a member prints the current one)");
        }
        if let Some(reply) = redirect_unless_leader(node) {
            return reply;
        }
        let _one_at_a_time = inner.admission.lock().await;
        return admit(
            inner,
            node,
            name,
            peer_addr,
            RawPublicKey(public_key),
            local,
            remote,
        )
        .await;
    }
    // Everything else is a member's request, made with its bound certificate: the current
    // one. The one a renewal replaced may only fetch again the certificate that renewal
    // issued (its answer was lost), for the very key it was issued for.
    let Some(member) = member else {
        return refused("only a member of the cluster, with its current certificate, may ask this");
    };
    if superseded {
        if let Request::Renew { public_key } = &request {
            if let Some(reply) = reissue(inner, member, public_key) {
                return reply;
            }
        }
        tracing::error!(
            node = member,
            %remote,
            "a control request with node's superseded certificate refused (a stolen old key?)"
        );
        return denied(format!("node {member} presented the certificate its last renewal replaced; only the current one may ask this"));
    }
    match request {
        Request::Join { .. } => refused("a join is not a member's request"),
        Request::Leader => {
            let status = node.status();
            Reply::Leader {
                term: status.term,
                leader: status.leader,
                voters: status.voters,
            }
        }
        Request::CaKey => {
            let identity = inner.identity.load();
            if !node.status().voters.contains(&member) {
                refused(format!(
                    "node {member} is not a voter; only voters hold the CA key"
                ))
            } else if !identity.has_ca_key() {
                refused("this node holds no CA key yet; ask the leader")
            } else {
                tracing::info!(node = member, "handing the CA key to a voter");
                Reply::CaKey {
                    ca_key: identity.ca_key.clone(),
                }
            }
        }
        Request::Renew { public_key } => {
            if let Some(reply) = redirect_unless_leader(node) {
                return reply;
            }
            match renew(inner, node, member, &RawPublicKey(public_key)).await {
                Ok((node_cert, expires)) => Reply::Renewed { node_cert, expires },
                Err(reason) => refused(reason),
            }
        }
        Request::RotateToken => {
            if !node.status().voters.contains(&member) {
                return refused(format!("node {member} is a learner; the join token is rotated on a voter (`linkdns status` lists them)"));
            }
            if let Some(reply) = redirect_unless_leader(node) {
                return reply;
            }
            match rotate(node).await {
                Ok(secret) => {
                    tracing::info!(
                        by = member,
                        "join secret rotated; tokens with the old one are refused from now on"
                    );
                    Reply::Rotated { secret: secret.0 }
                }
                Err(reason) => refused(reason),
            }
        }
        Request::Remove { node: target } => {
            if let Some(reply) = redirect_unless_leader(node) {
                return reply;
            }
            let registry = node.published().load_full();
            let id = match registry.registry.node_by_name(&target) {
                Some(n) => n.id,
                None => match target.parse::<u64>() {
                    Ok(id) if member_ids(node).contains(&id) => id,
                    _ => return refused(format!("no node {target:?} in this cluster")),
                },
            };
            // A learner takes out itself only (`linkdns leave`); others are a voter's call.
            if id != member && !node.status().voters.contains(&member) {
                return refused(format!("node {member} is a learner; it may remove itself only (`linkdns remove` runs on a voter)"));
            }
            let _one_at_a_time = inner.admission.lock().await;
            match retire_then_remove(inner, node, id).await {
                Ok(()) => {
                    tracing::info!(node = id, by = member, "node removed from the cluster");
                    Reply::Removed { node_id: id }
                }
                Err(e) => refused(format!("cannot remove node {id}: {e}")),
            }
        }
    }
}

/// Whether `secret` is the cluster's join secret: the one the log last set, else (a cluster
/// whose first leader has not recorded it yet) this node's own.
fn join_secret_matches(inner: &Inner, node: &NodeHandle, secret: &Secret) -> bool {
    match node.published().load().registry.join_hash() {
        Some(hash) => Secret(*hash).matches(&Secret(secret.hash())),
        None => secret.matches(&inner.identity.load().secret),
    }
}

/// The last certificate this node issued to a member, as leader.
pub(crate) struct Issued {
    key: Vec<u8>,
    cert: Vec<u8>,
    expires: u64,
    at: std::time::Instant,
}

/// The certificate last issued to `id` for `key`, again (its answer was lost and `id` asks
/// with the certificate that renewal replaced); nothing new is issued or bound.
fn reissue(inner: &Inner, id: u64, key: &[u8]) -> Option<Reply> {
    let issued = inner.issued.lock().ok()?;
    let last = issued.get(&id).filter(|i| i.key == key)?;
    tracing::info!(
        node = id,
        "handing out again the certificate its last renewal issued"
    );
    Some(Reply::Renewed {
        node_cert: last.cert.clone(),
        expires: last.expires,
    })
}

/// A new certificate of member `id` for `key`, bound to it through the log before it is
/// handed out (peers accept only the bound one). At most one per sixth of the validity per
/// node: a stolen key cannot mint one after another.
pub(crate) async fn renew(
    inner: &Inner,
    node: &NodeHandle,
    id: u64,
    key: &RawPublicKey,
) -> Result<(Vec<u8>, u64), String> {
    key.check()?;
    let spacing = inner.cert_validity() / 6;
    if let Some(last) = inner
        .issued
        .lock()
        .ok()
        .and_then(|i| i.get(&id).map(|i| i.at))
    {
        if last.elapsed() < spacing {
            return Err(format!(
                "node {id} was issued a certificate {:?} ago; renewals are at most one per {spacing:?}",
                last.elapsed()
            ));
        }
    }
    let (cert, expires) = inner
        .identity
        .load()
        .issue(id, key, inner.cert_validity())
        .map_err(|e| format!("cannot issue a certificate: {e}"))?;
    node.propose(Command::SetNodeCert {
        node: id,
        fingerprint: fingerprint(&cert),
    })
    .await
    .map_err(|e| format!("cannot bind the new certificate: {e}"))?;
    tracing::info!(node = id, expires, "certificate renewed");
    if let Ok(mut issued) = inner.issued.lock() {
        issued.insert(
            id,
            Issued {
                key: key.0.clone(),
                cert: cert.clone(),
                expires,
                at: std::time::Instant::now(),
            },
        );
    }
    Ok((cert, expires))
}

/// A new join secret: its hash goes through the log (the old secret is refused once that is
/// applied, here at once); the secret itself goes only to the asker.
async fn rotate(node: &NodeHandle) -> Result<Secret, String> {
    let secret = Secret::random().map_err(|e| e.to_string())?;
    node.propose(Command::SetJoinSecret {
        hash: secret.hash(),
    })
    .await
    .map_err(|e| format!("cannot record the new join secret: {e}"))?;
    Ok(secret)
}

/// A refusal that asking again cannot change (the joiner stops rather than retrying).
fn denied(reason: impl Into<String>) -> Reply {
    Reply::Denied {
        reason: reason.into(),
    }
}

fn refused(reason: impl Into<String>) -> Reply {
    Reply::Refused {
        reason: reason.into(),
    }
}

/// `None` on the leader; else where to go (or why there is nowhere).
fn redirect_unless_leader(node: &NodeHandle) -> Option<Reply> {
    let status = node.status();
    if status.role == Role::Leader {
        return None;
    }
    let leader = status
        .leader
        .and_then(|id| node.published().load().registry.node(id).cloned());
    Some(match leader {
        Some(info) => Reply::Redirect {
            leader: info.peer_addr,
        },
        None => refused("no leader is elected right now; retry in a few seconds"),
    })
}

async fn admit(
    inner: &Inner,
    node: &NodeHandle,
    name: String,
    peer_addr: String,
    public_key: RawPublicKey,
    local: Option<SocketAddr>,
    remote: SocketAddr,
) -> Reply {
    let name = normalize_name(&name);
    if name.is_empty() {
        return denied("the node name is empty");
    }
    let published = node.published().load_full();
    let registry = &published.registry;
    // A record no member holds (kept by a restore or a forced new cluster) gives its name up
    // to the host that joins under it.
    let member_owner = registry
        .node_by_name(&name)
        .filter(|owner| node.status().is_member(owner.id));
    if let Some(owner) = member_owner {
        return denied(format!(
            "node name {name:?} is already used by node {}; pick another --node-name, or run `linkdns remove {name}` on a member first",
            owner.id
        ));
    }
    let peer_addr = match peer_addr.parse::<SocketAddr>() {
        // A node listening on 0.0.0.0 is reached at the address it came from.
        Ok(a) if a.ip().is_unspecified() => SocketAddr::new(remote.ip(), a.port()).to_string(),
        Ok(a) => a.to_string(),
        Err(_) => return denied(format!("peer address {peer_addr:?} is not ip:port")),
    };
    if let Err(reason) = public_key.check() {
        return denied(reason);
    }
    fix_own_address(inner, node, local).await;
    // The id is chosen afresh on every attempt: a change still in flight from an earlier
    // admission may take the one chosen before. The applied change is checked again (a used id
    // or name is refused there), so two hosts never share an id.
    let deadline = tokio::time::Instant::now() + CHANGE_PATIENCE;
    loop {
        let published = node.published().load_full();
        let status = node.status();
        let highest_member = status.members().max().unwrap_or(0);
        let id = published.registry.next_node_id().max(highest_member + 1);
        let identity = inner.identity.load_full();
        let issued = identity.issue(id, &public_key, inner.cert_validity());
        let (node_cert, expires) = match issued {
            Ok(c) => c,
            Err(e) => return refused(format!("cannot issue a certificate: {e}")),
        };
        let info = NodeInfo {
            id,
            name: name.clone(),
            peer_addr: peer_addr.clone(),
        };
        let change = Membership::AddLearner {
            info,
            cert: fingerprint(&node_cert),
        };
        match node.change_membership(change).await {
            Ok(_) => {
                tracing::info!(node = id, %name, %peer_addr, "node joined as a learner");
                let registry = &node.published().load_full().registry;
                let mut members: Vec<(u64, [u8; 32])> = registry
                    .nodes()
                    .filter_map(|n| registry.node_cert(n.id).map(|f| (n.id, *f)))
                    .collect();
                if registry.node_cert(inner.id).is_none() {
                    members.push((inner.id, identity.cert_fingerprint()));
                }
                // No CA key: a new node is a learner.
                return Reply::Joined {
                    node_id: id,
                    node_cert,
                    expires,
                    ca_cert: identity.ca_cert.clone(),
                    members,
                };
            }
            Err(linkdns_raft::Error::ConfChangeInProgress)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(linkdns_raft::Error::Timeout | linkdns_raft::Error::OutcomeUnknown) => {
                return refused(format!(
                    "the admission of node {id} did not complete in time; its outcome is unknown. Check `linkdns status` on a member, remove {name:?} if it is listed, and join again"
                ))
            }
            Err(e) => return refused(format!("cannot add the node: {e}")),
        }
    }
}

/// A node that registered an unspecified listen address (`0.0.0.0:7380`) is given the address
/// a joining node reached it at, so that the new node can reach it back.
async fn fix_own_address(inner: &Inner, node: &NodeHandle, local: Option<SocketAddr>) {
    let Some(local) = local else { return };
    let published = node.published().load_full();
    let Some(me) = published.registry.node(inner.id) else {
        return;
    };
    let Ok(current) = me.peer_addr.parse::<SocketAddr>() else {
        return;
    };
    if !current.ip().is_unspecified() {
        return;
    }
    let fixed = NodeInfo {
        peer_addr: SocketAddr::new(local.ip(), current.port()).to_string(),
        ..me.clone()
    };
    tracing::info!(addr = %fixed.peer_addr, "advertising this node's peer address as seen by a joining node");
    if let Err(e) = node.propose(Command::UpsertNode(fixed)).await {
        tracing::warn!(error = %e, "cannot record this node's peer address");
    }
}

/// Removes node `id`. First its retirement goes through the log, while it is still a member,
/// so that it applies it itself (only the log retires a node); once it holds that entry, or is
/// silent, the configuration change follows. A leader removing itself applies the change
/// itself. If this leader fails in between, the next one finishes the removal (`maintain`).
async fn retire_then_remove(
    inner: &Inner,
    node: &NodeHandle,
    id: u64,
) -> Result<(), linkdns_raft::Error> {
    let registered = node.published().load().registry.node(id).is_some();
    // A record no member holds (kept by a restore or a forced new cluster): no one to retire.
    if registered && !node.status().is_member(id) {
        return node
            .propose(Command::RemoveNode { node: id })
            .await
            .map(|_| ());
    }
    if id != inner.id && registered {
        node.propose(Command::RetireNode { node: id }).await?;
        let index = node.status().applied_index;
        let deadline = tokio::time::Instant::now() + RETIRE_PATIENCE;
        while tokio::time::Instant::now() < deadline {
            let holds = node.status().matched.get(&id).is_some_and(|&m| m >= index);
            let silent = inner.last_contact(id).is_none_or(|d| d > SILENT);
            if holds || silent {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The commit index that lets it apply the entry goes out with the next heartbeat.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    match change(node, Membership::Remove(id)).await {
        // Finished meanwhile by the leader's maintenance.
        Err(linkdns_raft::Error::InvalidMembership(_)) if !node.status().is_member(id) => Ok(()),
        result => result,
    }
}

/// How a membership change waits out one already in progress (or a moment without a leader):
/// every 200 ms, for `CHANGE_PATIENCE` at most.
const CHANGE_RETRY: RetryPolicy =
    RetryPolicy::forever(Duration::from_millis(200), Duration::from_millis(200))
        .within(CHANGE_PATIENCE);

/// Proposes a membership change, waiting out one already in progress.
pub(crate) async fn change(
    node: &NodeHandle,
    change: Membership,
) -> Result<(), linkdns_raft::Error> {
    node.change_membership_until(&change, CHANGE_RETRY)
        .await
        .into_result()
        .map(|_| ())
}
