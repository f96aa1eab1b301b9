//! Versioned snapshot encoding of the registry: what Raft compaction stores and ships.
//!
//! Only the primary data (nodes, containers, liveness, certificates, subnets, tombstones, floors)
//! is encoded; indexes are rebuilt on restore, so a snapshot can never carry an index that
//! disagrees with its data.

use serde::{Deserialize, Serialize};

use crate::command::legacy::ContainerV1;
use crate::model::{Container, ContainerId, NodeId, NodeInfo, Record, Subnet, Version};
use crate::trust::ClaimLimit;
use crate::{Command, Error, Registry, Tombstone};

/// Current version of the snapshot encoding. Version 4 gave containers their networks,
/// versions, compose service and named ports, and added tombstones and floors; version 5 added
/// retiring nodes, the claim limit and the join secret's hash; version 6 the software version
/// each node registered.
pub const SNAPSHOT_VERSION: u8 = 6;

/// Leading bytes of every snapshot, so a stray blob is refused rather than misread.
const MAGIC: &[u8; 4] = b"LDNS";

/// Version 1 (linkdns before clusters): no liveness, no id counter. Still read.
#[derive(Deserialize)]
struct SnapshotV1 {
    nodes: Vec<NodeInfo>,
    containers: Vec<ContainerV1>,
}

/// Version 2 (clusters): no container subnets. Still read.
#[derive(Deserialize)]
struct SnapshotV2 {
    nodes: Vec<NodeInfo>,
    containers: Vec<ContainerV1>,
    down: Vec<NodeId>,
    max_node_id: NodeId,
    certs: Vec<(NodeId, [u8; 32])>,
}

/// Version 3 (routes): containers without networks or versions. Still read.
#[derive(Deserialize)]
struct SnapshotV3 {
    nodes: Vec<NodeInfo>,
    containers: Vec<ContainerV1>,
    down: Vec<NodeId>,
    max_node_id: NodeId,
    certs: Vec<(NodeId, [u8; 32])>,
    subnets: Vec<(NodeId, Vec<Subnet>)>,
}

/// Version 4 (compose): no trust state. Still read.
#[derive(Deserialize)]
struct SnapshotV4 {
    nodes: Vec<NodeInfo>,
    containers: Vec<Container>,
    down: Vec<NodeId>,
    max_node_id: NodeId,
    certs: Vec<(NodeId, [u8; 32])>,
    subnets: Vec<(NodeId, Vec<Subnet>)>,
    tombstones: Vec<(ContainerId, Tombstone)>,
    floors: Vec<(NodeId, Version)>,
}

#[derive(Deserialize)]
struct SnapshotV5 {
    nodes: Vec<NodeInfo>,
    containers: Vec<Container>,
    down: Vec<NodeId>,
    max_node_id: NodeId,
    certs: Vec<(NodeId, [u8; 32])>,
    subnets: Vec<(NodeId, Vec<Subnet>)>,
    tombstones: Vec<(ContainerId, Tombstone)>,
    floors: Vec<(NodeId, Version)>,
    retiring: Vec<NodeId>,
    claim_limit: ClaimLimit,
    join_hash: Option<[u8; 32]>,
    previous_certs: Vec<(NodeId, [u8; 32])>,
}

#[derive(Deserialize)]
struct SnapshotV6 {
    nodes: Vec<NodeInfo>,
    containers: Vec<Container>,
    down: Vec<NodeId>,
    max_node_id: NodeId,
    certs: Vec<(NodeId, [u8; 32])>,
    subnets: Vec<(NodeId, Vec<Subnet>)>,
    tombstones: Vec<(ContainerId, Tombstone)>,
    floors: Vec<(NodeId, Version)>,
    retiring: Vec<NodeId>,
    claim_limit: ClaimLimit,
    join_hash: Option<[u8; 32]>,
    previous_certs: Vec<(NodeId, [u8; 32])>,
    software: Vec<(NodeId, String)>,
}

impl From<SnapshotV5> for SnapshotV6 {
    fn from(v5: SnapshotV5) -> SnapshotV6 {
        SnapshotV6 {
            nodes: v5.nodes,
            containers: v5.containers,
            down: v5.down,
            max_node_id: v5.max_node_id,
            certs: v5.certs,
            subnets: v5.subnets,
            tombstones: v5.tombstones,
            floors: v5.floors,
            retiring: v5.retiring,
            claim_limit: v5.claim_limit,
            join_hash: v5.join_hash,
            previous_certs: v5.previous_certs,
            software: Vec::new(),
        }
    }
}

/// The same layout as [`SnapshotV6`], borrowing from the registry instead of copying it.
#[derive(Serialize)]
struct SnapshotV6Ref<'a> {
    nodes: Vec<&'a NodeInfo>,
    containers: Vec<&'a Record>,
    down: Vec<NodeId>,
    max_node_id: NodeId,
    certs: Vec<(NodeId, [u8; 32])>,
    subnets: Vec<(NodeId, &'a [Subnet])>,
    tombstones: Vec<(&'a ContainerId, Tombstone)>,
    floors: Vec<(NodeId, Version)>,
    retiring: Vec<NodeId>,
    claim_limit: ClaimLimit,
    join_hash: Option<[u8; 32]>,
    previous_certs: Vec<(NodeId, [u8; 32])>,
    software: Vec<(NodeId, &'a str)>,
}

impl From<SnapshotV4> for SnapshotV5 {
    fn from(v4: SnapshotV4) -> SnapshotV5 {
        SnapshotV5 {
            nodes: v4.nodes,
            containers: v4.containers,
            down: v4.down,
            max_node_id: v4.max_node_id,
            certs: v4.certs,
            subnets: v4.subnets,
            tombstones: v4.tombstones,
            floors: v4.floors,
            retiring: Vec::new(),
            claim_limit: ClaimLimit::default(),
            join_hash: None,
            previous_certs: Vec::new(),
        }
    }
}

impl From<SnapshotV3> for SnapshotV4 {
    fn from(v3: SnapshotV3) -> SnapshotV4 {
        SnapshotV4 {
            nodes: v3.nodes,
            containers: v3.containers.into_iter().map(Container::from).collect(),
            down: v3.down,
            max_node_id: v3.max_node_id,
            certs: v3.certs,
            subnets: v3.subnets,
            tombstones: Vec::new(),
            floors: Vec::new(),
        }
    }
}

impl Registry {
    /// Encodes the whole registry.
    pub fn snapshot(&self) -> Vec<u8> {
        let body = SnapshotV6Ref {
            nodes: self.nodes.values().collect(),
            containers: self.containers.values().map(|c| &**c).collect(),
            down: self.down.iter().copied().collect(),
            max_node_id: self.max_node_id,
            certs: self.certs.iter().map(|(&n, &f)| (n, f)).collect(),
            subnets: self.subnets().collect(),
            tombstones: self.tombstones.iter().map(|(id, t)| (id, *t)).collect(),
            floors: self.floors.iter().map(|(&n, &v)| (n, v)).collect(),
            retiring: self.retiring.iter().copied().collect(),
            claim_limit: self.claim_limit,
            join_hash: self.join_hash,
            previous_certs: self.previous_certs.iter().map(|(&n, &f)| (n, f)).collect(),
            software: self
                .software
                .iter()
                .map(|(&n, v)| (n, v.as_str()))
                .collect(),
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
        let body = match version {
            1 => {
                let v1: SnapshotV1 =
                    postcard::from_bytes(body).map_err(|e| decode_err(e.to_string()))?;
                SnapshotV6::from(SnapshotV5::from(SnapshotV4::from(SnapshotV3 {
                    nodes: v1.nodes,
                    containers: v1.containers,
                    down: Vec::new(),
                    max_node_id: 0,
                    certs: Vec::new(),
                    subnets: Vec::new(),
                })))
            }
            2 => {
                let v2: SnapshotV2 =
                    postcard::from_bytes(body).map_err(|e| decode_err(e.to_string()))?;
                SnapshotV6::from(SnapshotV5::from(SnapshotV4::from(SnapshotV3 {
                    nodes: v2.nodes,
                    containers: v2.containers,
                    down: v2.down,
                    max_node_id: v2.max_node_id,
                    certs: v2.certs,
                    subnets: Vec::new(),
                })))
            }
            3 => SnapshotV6::from(SnapshotV5::from(SnapshotV4::from(
                postcard::from_bytes::<SnapshotV3>(body).map_err(|e| decode_err(e.to_string()))?,
            ))),
            4 => SnapshotV6::from(SnapshotV5::from(
                postcard::from_bytes::<SnapshotV4>(body).map_err(|e| decode_err(e.to_string()))?,
            )),
            5 => SnapshotV6::from(
                postcard::from_bytes::<SnapshotV5>(body).map_err(|e| decode_err(e.to_string()))?,
            ),
            SNAPSHOT_VERSION => {
                postcard::from_bytes(body).map_err(|e| decode_err(e.to_string()))?
            }
            found => {
                return Err(Error::UnsupportedVersion {
                    what: "snapshot",
                    found,
                    supported: SNAPSHOT_VERSION,
                })
            }
        };
        let mut registry = Registry::new();
        for node in &body.nodes {
            registry
                .apply(&Command::UpsertNode(node.clone()))
                .map_err(|e| decode_err(format!("inconsistent node: {e}")))?;
        }
        // As they were accepted: a quota met since does not undo them.
        for container in &body.containers {
            registry
                .check_container(container)
                .map_err(|e| decode_err(format!("inconsistent container: {e}")))?;
            registry.upsert_container(container.clone().normalized());
        }
        for &node in &body.down {
            registry
                .apply(&Command::SetNodeDown { node, down: true })
                .map_err(|e| decode_err(format!("inconsistent liveness: {e}")))?;
        }
        // Each node's previous certificate first: binding the current one then keeps it.
        for &(node, fingerprint) in body.previous_certs.iter().chain(&body.certs) {
            registry
                .apply(&Command::SetNodeCert { node, fingerprint })
                .map_err(|e| decode_err(format!("inconsistent certificate: {e}")))?;
        }
        // Claims as they were accepted: a limit set or an address registered since does not
        // undo them.
        for (node, subnets) in body.subnets {
            registry
                .restore_subnets(node, subnets)
                .map_err(|e| decode_err(format!("inconsistent subnets: {e}")))?;
        }
        for node in body.retiring {
            registry
                .apply(&Command::RetireNode { node })
                .map_err(|e| decode_err(format!("inconsistent retirement: {e}")))?;
        }
        registry.claim_limit = body.claim_limit;
        registry.join_hash = body.join_hash;
        for (node, version) in body.software {
            registry
                .apply(&Command::SetNodeVersion { node, version })
                .map_err(|e| decode_err(format!("inconsistent software version: {e}")))?;
        }
        for (id, tombstone) in body.tombstones {
            if registry.node(tombstone.node).is_none() || registry.container(&id).is_some() {
                return Err(decode_err(format!(
                    "inconsistent tombstone of container {id}"
                )));
            }
            registry.put_tombstone(id, tombstone);
        }
        for (node, floor) in body.floors {
            if registry.node(node).is_none() {
                return Err(decode_err(format!("floor of unknown node {node}")));
            }
            registry.floors.insert(node, floor);
        }
        registry.max_node_id = registry.max_node_id.max(body.max_node_id);
        Ok(registry)
    }
}
