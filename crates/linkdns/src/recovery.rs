//! Backup, restore and the last resort: `linkdns backup FILE` (a consistent copy of the running
//! node's records), `linkdns restore FILE` (a new one-voter cluster seeded with them) and
//! `linkdns run --force-new-cluster` (a member whose majority is gone for good goes on alone
//! with what it committed).
//!
//! A backup file is one line `linkdns-backup 1`, one line of JSON ([`BackupHeader`]), then the
//! registry snapshot, whose length and SHA-256 the header holds.

use std::path::Path;

use anyhow::{bail, Context};
use linkdns_cluster::identity::{fingerprint, hex};
use linkdns_cluster::Identity;
use linkdns_raft::SledStore;
use linkdns_registry::{Command, NodeInfo, Published, Registry};
use serde::{Deserialize, Serialize};

use crate::config::Config;

const MAGIC: &str = "linkdns-backup 1";

/// What a backup says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackupHeader {
    /// The cluster it was taken from, and on which node.
    pub cluster: String,
    pub node: String,
    pub node_id: u64,
    /// The last log entry the records reflect.
    pub applied_index: u64,
    /// When it was taken (Unix seconds).
    pub taken_at: u64,
    /// The linkdns that took it.
    pub software: String,
    pub records: usize,
    pub nodes: usize,
    /// Length and SHA-256 (hex) of the snapshot that follows.
    pub size: usize,
    pub sha256: String,
}

/// The backup of `published` (a consistent registry at `published.applied`), as the file holds
/// it.
pub fn encode_backup(
    published: &Published,
    cluster: String,
    node: String,
    node_id: u64,
) -> Vec<u8> {
    let snapshot = published.registry.snapshot();
    let header = BackupHeader {
        cluster,
        node,
        node_id,
        applied_index: published.applied,
        taken_at: linkdns_cluster::identity::unix_now(),
        software: crate::VERSION.to_string(),
        records: published.registry.record_count(),
        nodes: published.registry.nodes().count(),
        size: snapshot.len(),
        sha256: hex(&fingerprint(&snapshot)),
    };
    let mut out = format!("{MAGIC}\n").into_bytes();
    // A plain struct of strings and numbers always serializes.
    out.extend(serde_json::to_vec(&header).unwrap_or_default());
    out.push(b'\n');
    out.extend(snapshot);
    out
}

/// Reads a backup: its header and its records, checked whole (length, SHA-256, decoding).
pub fn decode_backup(bytes: &[u8]) -> anyhow::Result<(BackupHeader, Registry)> {
    let mut parts = bytes.splitn(3, |&b| b == b'\n');
    let (Some(magic), Some(header), Some(snapshot)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("not a linkdns backup (too short)");
    };
    if magic != MAGIC.as_bytes() {
        bail!("not a linkdns backup (it does not start with {MAGIC:?})");
    }
    let header: BackupHeader =
        serde_json::from_slice(header).context("the backup's header is damaged")?;
    if snapshot.len() != header.size {
        bail!(
            "the backup is truncated or damaged: {} bytes of records, its header says {}",
            snapshot.len(),
            header.size
        );
    }
    if hex(&fingerprint(snapshot)) != header.sha256 {
        bail!("the backup is damaged: its records do not match their SHA-256");
    }
    let registry = Registry::restore(snapshot).context("the backup's records do not decode")?;
    Ok((header, registry))
}

/// `linkdns backup FILE`: a backup from the node running on `data_dir`, written to `file`
/// (mode 0600, whole or not at all). Returns what to tell the user.
pub async fn backup(data_dir: &Path, file: &Path) -> anyhow::Result<String> {
    let bytes =
        crate::status::get_bytes(data_dir, "/backup", std::time::Duration::from_secs(120)).await?;
    let (header, _) =
        decode_backup(&bytes).context("the node sent a backup that does not check out")?;
    write_private(file, &bytes)?;
    Ok(format!(
        "backed up {} records of {} nodes (cluster {}, entry {}, from {}) to {}\n",
        header.records,
        header.nodes,
        header.cluster,
        header.applied_index,
        header.node,
        file.display()
    ))
}

/// Writes `bytes` to `path` through a temporary file of mode 0600, synced, then renamed.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// `linkdns restore FILE`: seeds `config.data_dir` (which must belong to no cluster) with a new
/// cluster (new id, CA and join secret) whose only voter is this host and whose records are
/// the backup's. The other hosts' records are hidden until they join again (each under its
/// old name takes its old record's place). Returns what to tell the user.
pub fn restore(file: &Path, config: &Config) -> anyhow::Result<String> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (header, mut registry) =
        decode_backup(&bytes).with_context(|| format!("{} cannot be restored", file.display()))?;
    let data_dir = &config.data_dir;
    crate::run::private_dir(data_dir)?;
    if let Some(identity) = Identity::load(data_dir)? {
        bail!(
            "data dir {} already belongs to cluster {} as node {}; restore into an empty data dir",
            data_dir.display(),
            identity.cluster,
            identity.node_id
        );
    }
    let mut store = SledStore::open(data_dir)?;
    if !store.is_fresh() {
        bail!(
            "data dir {} holds a node's log; restore into an empty data dir",
            data_dir.display()
        );
    }
    // This host's old record (by name) is replaced by the new node's; its watcher reports its
    // containers again.
    if let Some(old) = registry.node_by_name(&config.node_name).map(|n| n.id) {
        apply(&mut registry, Command::RemoveNode { node: old })?;
    }
    let id = registry.next_node_id();
    let identity = Identity::bootstrap(id)?;
    let peer_addr = config.advertise_addr.unwrap_or(config.peer_listen);
    apply(
        &mut registry,
        Command::UpsertNode(NodeInfo {
            id,
            name: config.node_name.clone(),
            peer_addr: peer_addr.to_string(),
        }),
    )?;
    apply(
        &mut registry,
        Command::SetJoinSecret {
            hash: identity.secret.hash(),
        },
    )?;
    alone(&mut registry, id)?;
    let index = linkdns_raft::seed_single_voter(&mut store, id, &registry)?;
    drop(store);
    identity.save(data_dir)?;
    crate::run::mark_started(data_dir)?;
    tracing::info!(cluster = %identity.cluster, node = id, index, "restored a backup into a new cluster");
    Ok(format!(
        "restored {} records of {} nodes (cluster {}, entry {}, taken on {}) into new cluster {} as node {id} ({}).\n\
         Start it with `linkdns run` on this data dir; other hosts join it again with `linkdns token`, after emptying their data dirs. Their records are hidden until they do.\n",
        header.records,
        header.nodes,
        header.cluster,
        header.applied_index,
        header.node,
        identity.cluster,
        config.node_name
    ))
}

/// `linkdns run --force-new-cluster`: this member's log becomes that of a one-voter cluster
/// (itself) holding what it committed; the other members are out (their records hidden until
/// they join again, each under its old name taking its old record's place). Same cluster id,
/// CA and join token.
pub fn force_new_cluster(data_dir: &Path) -> anyhow::Result<()> {
    let Some(identity) = Identity::load(data_dir)? else {
        bail!(
            "--force-new-cluster: data dir {} belongs to no cluster",
            data_dir.display()
        );
    };
    // The only voter issues every certificate: without the CA key it could admit nobody.
    if !identity.has_ca_key() {
        bail!(
            "--force-new-cluster: this node holds no CA key (a learner, or a voter that never fetched it), so alone it could admit no host; force the cluster on a voter whose {} holds one",
            linkdns_cluster::IDENTITY_FILE
        );
    }
    let store = SledStore::open(data_dir)?;
    if store.is_fresh() {
        bail!(
            "--force-new-cluster: data dir {} holds no log to go on with",
            data_dir.display()
        );
    }
    let id = identity.node_id;
    let (mut registry, mut store) = linkdns_raft::committed_state(store, id)?;
    alone(&mut registry, id)?;
    let index = linkdns_raft::seed_single_voter(&mut store, id, &registry)?;
    tracing::warn!(
        node = id,
        index,
        records = registry.record_count(),
        "forced a new cluster: this node is its only voter, with what it had committed; the other hosts must empty their data dirs and join again"
    );
    Ok(())
}

/// The records of a cluster that is `id` alone: every other node hidden (it is no member),
/// removals under way finished.
fn alone(registry: &mut Registry, id: u64) -> anyhow::Result<()> {
    let retiring: Vec<u64> = registry.retiring().filter(|&n| n != id).collect();
    for node in retiring {
        apply(registry, Command::RemoveNode { node })?;
    }
    let others: Vec<u64> = registry
        .nodes()
        .map(|n| n.id)
        .filter(|&n| n != id)
        .collect();
    for node in others {
        apply(registry, Command::SetNodeDown { node, down: true })?;
    }
    if registry.is_down(id) {
        apply(
            registry,
            Command::SetNodeDown {
                node: id,
                down: false,
            },
        )?;
    }
    Ok(())
}

fn apply(registry: &mut Registry, command: Command) -> anyhow::Result<()> {
    registry
        .apply(&command)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("cannot prepare the records ({command:?}): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use linkdns_registry::{Container, LocalView};
    use std::sync::Arc;

    fn published() -> Published {
        let mut registry = Registry::new();
        for (id, name) in [(1, "h1"), (2, "h2")] {
            let info = NodeInfo {
                id,
                name: name.into(),
                peer_addr: format!("10.0.0.{id}:7380"),
            };
            registry.apply(&Command::UpsertNode(info)).expect("node");
        }
        let web = Container::new("c1", "web", 2).with_ips(["10.2.0.2".parse().expect("ip")]);
        registry.apply(&Command::UpsertContainer(web)).expect("web");
        Published {
            applied: 42,
            registry,
            local: Arc::new(LocalView::default()),
            version: 0,
        }
    }

    #[test]
    fn a_backup_reads_back_whole_and_refuses_damage() {
        let p = published();
        let bytes = encode_backup(&p, "c0ffee".into(), "h1".into(), 1);
        let (header, registry) = decode_backup(&bytes).expect("reads back");
        assert_eq!(registry.snapshot(), p.registry.snapshot());
        assert_eq!(
            (header.applied_index, header.records, header.nodes),
            (42, 1, 2)
        );
        assert_eq!(header.software, crate::VERSION);

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let e = decode_backup(&flipped).expect_err("damaged");
        assert!(e.to_string().contains("SHA-256"), "{e:#}");
        let e = decode_backup(&bytes[..bytes.len() - 1]).expect_err("truncated");
        assert!(e.to_string().contains("truncated"), "{e:#}");
        let e = decode_backup(b"hello\n{}\n").expect_err("not one");
        assert!(e.to_string().contains("not a linkdns backup"), "{e:#}");
    }

    #[test]
    fn alone_hides_the_others_and_keeps_their_records() {
        let mut registry = published().registry;
        registry
            .apply(&Command::RetireNode { node: 2 })
            .expect("retire");
        let mut kept = published().registry;
        alone(&mut kept, 1).expect("alone");
        assert!(kept.is_down(2) && !kept.is_down(1));
        assert_eq!(kept.record_count(), 1, "hidden, not deleted");
        alone(&mut registry, 1).expect("alone");
        assert!(
            registry.node(2).is_none(),
            "a retiring node's removal is finished"
        );
    }
}
