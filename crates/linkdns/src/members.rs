//! Membership commands: `token` (print the join token), `join` (admit this host, then run),
//! `remove` and `leave` (take a host out).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context};
use linkdns_cluster::{Identity, JoinAs, Token};
use linkdns_raft::SledStore;

use crate::config::Config;

/// Prints the join token of the cluster this data dir belongs to.
pub fn token(data_dir: &Path) -> anyhow::Result<()> {
    let identity = load(data_dir)?;
    let line = format!("{}\n", identity.token());
    std::io::Write::write_all(&mut std::io::stdout(), line.as_bytes())?;
    Ok(())
}

fn load(data_dir: &Path) -> anyhow::Result<Identity> {
    match Identity::load(data_dir)? {
        Some(identity) => Ok(identity),
        None => bail!(
            "data dir {} belongs to no cluster yet: start the first host with `linkdns run`, or join one with `linkdns join`",
            data_dir.display()
        ),
    }
}

/// `linkdns join PEER --token TOKEN`: asks the cluster to admit this host, stores the identity
/// it gets, then runs the node. Later starts are plain `linkdns run`.
pub async fn join(config: Config, peer: &str, token: &str) -> anyhow::Result<()> {
    let token: Token = token.parse()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    if let Some(identity) = Identity::load(&config.data_dir)? {
        bail!(
            "data dir {} already belongs to cluster {} as node {}; start it with `linkdns run`",
            config.data_dir.display(),
            identity.cluster,
            identity.node_id
        );
    }
    {
        let store = SledStore::open(&config.data_dir)?;
        if !store.is_fresh() {
            bail!(
                "data dir {} holds another node's log; join with an empty data dir",
                config.data_dir.display()
            );
        }
    }
    tracing::info!(%peer, cluster = %token.cluster, name = %config.node_name, "asking to join");
    let me = JoinAs {
        name: config.node_name.clone(),
        advertise: config.advertise_addr,
        listen_port: config.peer_listen.port(),
    };
    let identity = linkdns_cluster::join(peer, &token, &me)
        .await
        .with_context(|| format!("cannot join the cluster through {peer}"))?;
    identity.save(&config.data_dir)?;
    tracing::info!(node = identity.node_id, cluster = %identity.cluster, "admitted as a learner; catching up");
    crate::run::run(config).await
}

/// `linkdns remove NODE`: asks the leader (through the node on this data dir) to take `node`
/// (a name or an id) out of the cluster.
pub async fn remove(data_dir: &Path, node: &str) -> anyhow::Result<u64> {
    let identity = load(data_dir)?;
    let status = crate::status::fetch(data_dir).await?;
    let own = status
        .members
        .iter()
        .find(|m| m.id == status.node_id)
        .map(|m| m.peer_addr.clone())
        .context("the local node is not a member of its cluster")?;
    let target = local_peer(&own)?;
    let id = linkdns_cluster::remove(&target, &identity, node)
        .await
        .with_context(|| format!("cannot remove {node}"))?;
    Ok(id)
}

/// `linkdns leave`: removes this host's own node; the running node then stops and moves its
/// state aside.
pub async fn leave(data_dir: &Path) -> anyhow::Result<u64> {
    let identity = load(data_dir)?;
    remove(data_dir, &identity.node_id.to_string()).await
}

/// The local node's peer address, reachable from this host.
fn local_peer(addr: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = addr
        .parse()
        .with_context(|| format!("peer address {addr:?}"))?;
    Ok(crate::run::reachable(addr).to_string())
}
