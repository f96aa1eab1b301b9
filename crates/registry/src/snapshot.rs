//! Versioned snapshot encoding of the registry: what Raft compaction stores and ships.
//!
//! Only the primary data (nodes, containers) is encoded; indexes are rebuilt on restore, so a
//! snapshot can never carry an index that disagrees with its data.

use serde::{Deserialize, Serialize};

use crate::model::{Container, NodeInfo};
use crate::{Command, Error, Registry};

/// Current version of the snapshot encoding.
pub const SNAPSHOT_VERSION: u8 = 1;

/// Leading bytes of every snapshot, so a stray blob is refused rather than misread.
const MAGIC: &[u8; 4] = b"LDNS";

#[derive(Deserialize)]
struct SnapshotV1 {
    nodes: Vec<NodeInfo>,
    containers: Vec<Container>,
}

/// The same layout as [`SnapshotV1`], borrowing from the registry instead of copying it.
#[derive(Serialize)]
struct SnapshotV1Ref<'a> {
    nodes: Vec<&'a NodeInfo>,
    containers: Vec<&'a Container>,
}

impl Registry {
    /// Encodes the whole registry.
    pub fn snapshot(&self) -> Vec<u8> {
        let body = SnapshotV1Ref {
            nodes: self.nodes.values().collect(),
            containers: self.containers.values().map(|c| &**c).collect(),
        };
        let mut out = MAGIC.to_vec();
        out.push(SNAPSHOT_VERSION);
        match postcard::to_extend(&body, out) {
            Ok(v) => v,
            // Plain data into a Vec: postcard cannot fail here (see `Command::encode`).
            Err(e) => panic!("postcard failed to serialize a registry snapshot: {e}"),
        }
    }

    /// Rebuilds a registry from [`Registry::snapshot`] output. An empty input is the empty
    /// registry (Raft's initial snapshot carries no data).
    pub fn restore(bytes: &[u8]) -> Result<Registry, Error> {
        if bytes.is_empty() {
            return Ok(Registry::new());
        }
        let decode_err = |reason: String| Error::Decode {
            what: "snapshot",
            reason,
        };
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| decode_err("missing LDNS header".to_string()))?;
        let (&version, body) = rest
            .split_first()
            .ok_or_else(|| decode_err("truncated header".to_string()))?;
        if version != SNAPSHOT_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "snapshot",
                found: version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let body: SnapshotV1 = postcard::from_bytes(body).map_err(|e| decode_err(e.to_string()))?;
        let mut registry = Registry::new();
        for node in &body.nodes {
            registry
                .apply(&Command::UpsertNode(node.clone()))
                .map_err(|e| decode_err(format!("inconsistent node: {e}")))?;
        }
        for container in &body.containers {
            registry
                .apply(&Command::UpsertContainer(container.clone()))
                .map_err(|e| decode_err(format!("inconsistent container: {e}")))?;
        }
        Ok(registry)
    }
}
