//! The closed set of commands that change the registry, and their wire encoding.
//!
//! Every state change goes through the Raft log as one of these. The encoding is a version byte
//! followed by postcard; a decoder that meets an unknown version refuses it instead of guessing.
//! Older encodings are still read (a log written by an older linkdns replays), through the
//! layouts in [`legacy`].

use serde::{Deserialize, Serialize};

use crate::model::{Container, ContainerId, NodeId, NodeInfo, Subnet, Version};
use crate::trust::ClaimLimit;
use crate::Error;

/// Current version of the command encoding. Version 2 added `SetNodeSubnets`; version 3 gave
/// containers their networks, versions, compose service and named ports, and removals and
/// resyncs their version; version 4 added retirement, the claim limit and the join secret;
/// version 5 nodes' software versions (each appended, so the layout of the others is that of
/// version 3). Commands are written as the
/// oldest version that can carry them, so older nodes read them.
pub const COMMAND_VERSION: u8 = 5;

/// A change to the registry. Each node's watcher issues commands about its own containers only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Adds a node or updates its name and peer address.
    UpsertNode(NodeInfo),
    /// Replaces one node's whole container set (reconciliation with `docker ps`), as its watcher
    /// listed it at `version`: what it does not list and was not seen since is removed.
    ReplaceContainers {
        node: NodeId,
        containers: Vec<Container>,
        version: Version,
    },
    /// Adds or updates one container (ignored if the registry holds a later observation).
    UpsertContainer(Container),
    /// Removes one container of a node, as its watcher saw it gone at `version`; removing one
    /// that is gone already is not an error.
    RemoveContainer {
        node: NodeId,
        id: ContainerId,
        version: Version,
    },
    /// Several commands applied in order, as one log entry (batched watcher output). Batches
    /// nest at most [`MAX_BATCH_DEPTH`] deep, or the command does not decode.
    Batch(#[serde(deserialize_with = "bounded_batch")] Vec<Command>),
    /// Hides (`down: true`) or shows again a node's containers: the leader's liveness verdict.
    /// Hidden is not deleted; the records stay and return with the node.
    SetNodeDown { node: NodeId, down: bool },
    /// Removes a node and all its containers (the node left or was removed from the cluster).
    RemoveNode { node: NodeId },
    /// Binds a node to its certificate (SHA-256 of the DER): peers accept only that one for
    /// it. Set at admission, replaced at each renewal (the leader's).
    SetNodeCert { node: NodeId, fingerprint: [u8; 32] },
    /// Replaces the container subnets a node claims (routed to it by every other host). The
    /// whole claim is refused if any subnet overlaps another node's; an empty list releases.
    SetNodeSubnets { node: NodeId, subnets: Vec<Subnet> },
    /// The node is being removed from the cluster: it stops and moves its state aside when it
    /// applies this (only the log retires a node), then the leader takes it out of the
    /// configuration.
    RetireNode { node: NodeId },
    /// The widest subnets a claim may hold from now on (claims already held stay).
    SetClaimLimit(ClaimLimit),
    /// A new join secret (`linkdns token --rotate`), as its SHA-256: tokens with any other
    /// secret are refused from now on. The secret itself never enters the log.
    SetJoinSecret { hash: [u8; 32] },
    /// The linkdns version a node runs (`0.1.0 (commit)`, at most
    /// [`MAX_SOFTWARE_VERSION`] bytes), as it says at each start; `linkdns status` lists it.
    SetNodeVersion { node: NodeId, version: String },
}

/// The longest version text a node may register.
pub const MAX_SOFTWARE_VERSION: usize = 64;

impl Command {
    /// Encodes the command for the log.
    pub fn encode(&self) -> Vec<u8> {
        let version = self.version();
        let out = vec![version];
        // Serializing plain data into a Vec cannot fail: postcard only errors on writer
        // exhaustion or on types it cannot represent, and these types are all representable.
        let encoded = if version < 3 {
            // No container in it: the older layout, which older nodes read.
            legacy::CommandV2::from_current(self).map(|old| postcard::to_extend(&old, out))
        } else {
            Some(postcard::to_extend(self, out))
        };
        match encoded {
            Some(Ok(v)) => v,
            _ => unreachable_encoding(),
        }
    }

    /// Decodes a command written by [`Command::encode`] (of this or an older linkdns).
    pub fn decode(bytes: &[u8]) -> Result<Command, Error> {
        let (&version, body) = bytes.split_first().ok_or(Error::Decode {
            what: "command",
            reason: "empty".to_string(),
        })?;
        let decode_err = |e: postcard::Error| Error::Decode {
            what: "command",
            reason: e.to_string(),
        };
        match version {
            1 | 2 => postcard::from_bytes::<legacy::CommandV2>(body)
                .map(legacy::CommandV2::into_current)
                .map_err(decode_err),
            // Versions 4 and 5 only appended variants to version 3.
            3 | 4 | COMMAND_VERSION => postcard::from_bytes(body).map_err(decode_err),
            found => Err(Error::UnsupportedVersion {
                what: "command",
                found,
                supported: COMMAND_VERSION,
            }),
        }
    }

    /// The oldest encoding version that can carry this command.
    fn version(&self) -> u8 {
        match self {
            Command::RetireNode { .. }
            | Command::SetClaimLimit(_)
            | Command::SetJoinSecret { .. } => 4,
            Command::SetNodeVersion { .. } => 5,
            Command::ReplaceContainers { .. }
            | Command::UpsertContainer(_)
            | Command::RemoveContainer { .. } => 3,
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

/// How deep batches may nest in a decoded command: decoding recurses once per level, and a
/// member must not overflow a replica's stack with a small entry of nested batches. linkdns
/// itself nests two deep at most (the proposer's batch of watcher batches).
pub const MAX_BATCH_DEPTH: u32 = 8;

thread_local! {
    /// Batches being decoded on this thread, outermost first.
    static BATCH_DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Decodes a batch's commands, refusing one nested deeper than [`MAX_BATCH_DEPTH`].
fn bounded_batch<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Level;
    impl Drop for Level {
        fn drop(&mut self) {
            BATCH_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    let depth = BATCH_DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    let _level = Level;
    if depth > MAX_BATCH_DEPTH {
        return Err(serde::de::Error::custom(format!(
            "batches nested deeper than {MAX_BATCH_DEPTH}"
        )));
    }
    Vec::<T>::deserialize(deserializer)
}

#[cold]
fn unreachable_encoding() -> Vec<u8> {
    // Kept as a function so the impossible branch has one obvious place; see `Command::encode`.
    panic!("postcard failed to serialize plain registry data into a Vec")
}

/// The layouts of command encodings 1 and 2 (2 only added `SetNodeSubnets`), read when a log
/// written by an older linkdns replays, and written for commands that carry no container.
pub(crate) mod legacy {
    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use serde::{Deserialize, Serialize};

    use crate::model::{
        Address, Container, ContainerId, LinkAlias, NodeId, NodeInfo, Port, Subnet,
    };

    use super::Command;

    /// A container before addresses carried their network and records their version.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ContainerV1 {
        pub id: ContainerId,
        pub name: String,
        pub node: NodeId,
        pub ips: Vec<IpAddr>,
        pub aliases: BTreeSet<String>,
        pub links: BTreeSet<LinkAlias>,
        pub ports: BTreeSet<Port>,
    }

    impl From<ContainerV1> for Container {
        fn from(c: ContainerV1) -> Container {
            Container {
                id: c.id,
                addrs: c.ips.into_iter().map(Address::bare).collect(),
                aliases: c.aliases,
                links: c.links,
                ports: c.ports,
                ..Container::new("", &c.name, c.node)
            }
        }
    }

    /// Variant for variant, the command set of encodings 1 and 2.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub enum CommandV2 {
        UpsertNode(NodeInfo),
        ReplaceContainers {
            node: NodeId,
            containers: Vec<ContainerV1>,
        },
        UpsertContainer(ContainerV1),
        RemoveContainer {
            node: NodeId,
            id: ContainerId,
        },
        Batch(#[serde(deserialize_with = "super::bounded_batch")] Vec<CommandV2>),
        SetNodeDown {
            node: NodeId,
            down: bool,
        },
        RemoveNode {
            node: NodeId,
        },
        SetNodeCert {
            node: NodeId,
            fingerprint: [u8; 32],
        },
        SetNodeSubnets {
            node: NodeId,
            subnets: Vec<Subnet>,
        },
    }

    impl CommandV2 {
        /// The command as this version has it: containers unversioned, networks unknown.
        pub fn into_current(self) -> Command {
            match self {
                CommandV2::UpsertNode(n) => Command::UpsertNode(n),
                CommandV2::ReplaceContainers { node, containers } => Command::ReplaceContainers {
                    node,
                    containers: containers.into_iter().map(Container::from).collect(),
                    version: 0,
                },
                CommandV2::UpsertContainer(c) => Command::UpsertContainer(c.into()),
                CommandV2::RemoveContainer { node, id } => Command::RemoveContainer {
                    node,
                    id,
                    version: 0,
                },
                CommandV2::Batch(commands) => {
                    Command::Batch(commands.into_iter().map(CommandV2::into_current).collect())
                }
                CommandV2::SetNodeDown { node, down } => Command::SetNodeDown { node, down },
                CommandV2::RemoveNode { node } => Command::RemoveNode { node },
                CommandV2::SetNodeCert { node, fingerprint } => {
                    Command::SetNodeCert { node, fingerprint }
                }
                CommandV2::SetNodeSubnets { node, subnets } => {
                    Command::SetNodeSubnets { node, subnets }
                }
            }
        }

        /// The older layout of a command that carries no container (`None` for one that does).
        pub fn from_current(command: &Command) -> Option<CommandV2> {
            Some(match command {
                Command::UpsertNode(n) => CommandV2::UpsertNode(n.clone()),
                Command::Batch(commands) => CommandV2::Batch(
                    commands
                        .iter()
                        .map(CommandV2::from_current)
                        .collect::<Option<_>>()?,
                ),
                Command::SetNodeDown { node, down } => CommandV2::SetNodeDown {
                    node: *node,
                    down: *down,
                },
                Command::RemoveNode { node } => CommandV2::RemoveNode { node: *node },
                Command::SetNodeCert { node, fingerprint } => CommandV2::SetNodeCert {
                    node: *node,
                    fingerprint: *fingerprint,
                },
                Command::SetNodeSubnets { node, subnets } => CommandV2::SetNodeSubnets {
                    node: *node,
                    subnets: subnets.clone(),
                },
                Command::ReplaceContainers { .. }
                | Command::UpsertContainer(_)
                | Command::RemoveContainer { .. }
                | Command::RetireNode { .. }
                | Command::SetClaimLimit(_)
                | Command::SetJoinSecret { .. }
                | Command::SetNodeVersion { .. } => return None,
            })
        }
    }
}
