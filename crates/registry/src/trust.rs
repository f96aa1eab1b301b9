//! Who may change what (DESIGN.md "Trust"). Every log entry names its proposer, authenticated
//! by the peer connection it arrived on; `apply` takes a command only from a proposer entitled
//! to it:
//! - a node's own records (its containers, its subnet claims, its own name and address) only
//!   from that node;
//! - membership, liveness, certificates, retirement, the claim limit and the join secret only
//!   from a voter: the leader's own admission and maintenance (the leader refuses such commands
//!   when another node forwards them, see `linkdns-raft`).
//!
//! A compromised host can lie about its own containers, never about anyone else's names.

use serde::{Deserialize, Serialize};

use crate::model::{NodeId, Subnet};
use crate::{Command, Error};

/// The proposer of a log entry, as the Raft layer authenticated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Authority {
    pub node: NodeId,
    /// Whether the proposer is a voter at the entry's place in the log.
    pub voter: bool,
}

impl Authority {
    /// A node speaking for itself only (a forwarded proposal, whatever the sender's role).
    pub fn own(node: NodeId) -> Authority {
        Authority { node, voter: false }
    }
}

/// The widest subnet one claim may hold, per family: a claim wider than this would draw a
/// large part of the address space to one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimLimit {
    /// Shortest IPv4 prefix a claimed subnet may have.
    pub v4: u8,
    /// Shortest IPv6 prefix a claimed subnet may have.
    pub v6: u8,
}

impl Default for ClaimLimit {
    fn default() -> Self {
        ClaimLimit { v4: 16, v6: 48 }
    }
}

impl ClaimLimit {
    /// Whether both prefixes are lengths of their family.
    pub fn is_valid(&self) -> bool {
        (1..=32).contains(&self.v4) && (1..=128).contains(&self.v6)
    }

    /// The shortest prefix allowed for `subnet`'s family.
    pub fn for_subnet(&self, subnet: &Subnet) -> u8 {
        if subnet.addr().is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}

/// Whose records a command changes.
enum Subject {
    /// One node's own records: only that node may propose it.
    Own(NodeId, &'static str),
    /// The cluster's membership, liveness or policy: only a voter (the leader's maintenance).
    Cluster(&'static str),
}

impl Command {
    /// Whether `by` may propose this command (for a batch: every part of it).
    pub fn authorized(&self, by: Authority) -> Result<(), Error> {
        if let Command::Batch(commands) = self {
            return commands.iter().try_for_each(|c| c.authorized(by));
        }
        match self.subject() {
            Subject::Own(node, what) if node != by.node => Err(Error::NotAuthorized {
                proposer: by.node,
                what,
                owner: Some(node),
            }),
            Subject::Cluster(what) if !by.voter => Err(Error::NotAuthorized {
                proposer: by.node,
                what,
                owner: None,
            }),
            _ => Ok(()),
        }
    }

    fn subject(&self) -> Subject {
        match self {
            Command::UpsertNode(info) => Subject::Own(info.id, "the name and address"),
            Command::ReplaceContainers { node, .. } | Command::RemoveContainer { node, .. } => {
                Subject::Own(*node, "the containers")
            }
            Command::UpsertContainer(c) => Subject::Own(c.node, "the containers"),
            Command::SetNodeSubnets { node, .. } => Subject::Own(*node, "the subnet claim"),
            Command::SetNodeVersion { node, .. } => Subject::Own(*node, "the software version"),
            Command::SetNodeDown { .. } => Subject::Cluster("liveness"),
            Command::RemoveNode { .. } | Command::RetireNode { .. } => {
                Subject::Cluster("membership")
            }
            Command::SetNodeCert { .. } => Subject::Cluster("certificates"),
            Command::SetClaimLimit(_) => Subject::Cluster("the claim limit"),
            Command::SetJoinSecret { .. } => Subject::Cluster("the join secret"),
            // Checked part by part in `authorized`.
            Command::Batch(_) => Subject::Cluster("batches"),
        }
    }
}
