//! The closed set of commands that change the registry, and their wire encoding.
//!
//! Every state change goes through the Raft log as one of these. The encoding is a version byte
//! followed by postcard; a decoder that meets an unknown version refuses it instead of guessing.

use serde::{Deserialize, Serialize};

use crate::model::{Container, ContainerId, NodeId, NodeInfo, Subnet};
use crate::Error;

/// Current version of the command encoding. Version 2 added `SetNodeSubnets`; every other
/// command is still written as version 1, which older nodes read, so only the commands they
/// cannot apply stop them, and with "upgrade linkdns" rather than "corrupt".
pub const COMMAND_VERSION: u8 = 2;

/// A change to the registry. Each node's watcher issues commands about its own containers only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds a node or updates its name and peer address.
    UpsertNode(NodeInfo),
    /// Replaces one node's whole container set atomically (reconciliation with `docker ps`).
    ReplaceContainers {
        node: NodeId,
        containers: Vec<Container>,
    },
    /// Adds or updates one container.
    UpsertContainer(Container),
    /// Removes one container of a node; removing one that is gone already is not an error.
    RemoveContainer { node: NodeId, id: ContainerId },
    /// Several commands applied in order, as one log entry (batched watcher output).
    Batch(Vec<Command>),
    /// Hides (`down: true`) or shows again a node's containers: the leader's liveness verdict.
    /// Hidden is not deleted; the records stay and return with the node.
    SetNodeDown { node: NodeId, down: bool },
    /// Removes a node and all its containers (the node left or was removed from the cluster).
    RemoveNode { node: NodeId },
    /// Binds a node to its certificate (SHA-256 of the DER): peers accept only that one for
    /// it. Set once; later attempts change nothing.
    SetNodeCert { node: NodeId, fingerprint: [u8; 32] },
    /// Replaces the container subnets a node claims (routed to it by every other host). The
    /// whole claim is refused if any subnet overlaps another node's; an empty list releases.
    SetNodeSubnets { node: NodeId, subnets: Vec<Subnet> },
}

impl Command {
    /// Encodes the command for the log.
    pub fn encode(&self) -> Vec<u8> {
        let out = vec![self.version()];
        // Serializing plain data into a Vec cannot fail: postcard only errors on writer
        // exhaustion or on types it cannot represent, and these types are all representable.
        match postcard::to_extend(self, out) {
            Ok(v) => v,
            Err(_) => unreachable_encoding(),
        }
    }

    /// Decodes a command written by [`Command::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Command, Error> {
        let (&version, body) = bytes.split_first().ok_or(Error::Decode {
            what: "command",
            reason: "empty".to_string(),
        })?;
        if !(1..=COMMAND_VERSION).contains(&version) {
            return Err(Error::UnsupportedVersion {
                what: "command",
                found: version,
                supported: COMMAND_VERSION,
            });
        }
        postcard::from_bytes(body).map_err(|e| Error::Decode {
            what: "command",
            reason: e.to_string(),
        })
    }

    /// The oldest encoding version that can carry this command.
    fn version(&self) -> u8 {
        match self {
            Command::SetNodeSubnets { .. } => 2,
            Command::Batch(commands) => commands.iter().map(Command::version).max().unwrap_or(1),
            _ => 1,
        }
    }

    /// Number of single record changes this command carries (for metrics and batching).
    pub fn weight(&self) -> usize {
        match self {
            Command::ReplaceContainers { containers, .. } => containers.len().max(1),
            Command::Batch(commands) => commands.iter().map(Command::weight).sum(),
            _ => 1,
        }
    }
}

#[cold]
fn unreachable_encoding() -> Vec<u8> {
    // Kept as a function so the impossible branch has one obvious place; see `Command::encode`.
    panic!("postcard failed to serialize plain registry data into a Vec")
}
