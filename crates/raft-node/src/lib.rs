//! The linkdns Raft node: the raft-rs driver loop, sled-backed log storage, and the published
//! view of the registry that the DNS front end reads.
//!
//! The loop in [`node`] owns the `RawNode` and the registry; everything else talks to it through
//! [`NodeHandle`] (proposals) and reads [`Published`] state without locks on the answer path.

mod core;
mod logger;
mod node;
mod propose;
mod reseed;
mod storage;

use std::path::Path;

pub use crate::core::{
    limit_retained_memory, Core, CoreConfig, Inquiry, LeaderView, Membership, Progress, RaftStatus,
    Role,
};
pub use linkdns_registry::Published;
pub use node::{
    start, start_reopening, NoPeers, NodeConfig, NodeHandle, Outbox, PublishHook, Reopen,
};
pub use propose::{Proposal, RetryPolicy};
pub use reseed::{committed_state, seed_single_voter};
pub use storage::{LogStore, MemStore, SledStore, Stager};

/// Errors of the Raft node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data dir {path}: {reason}")]
    Storage { path: String, reason: String },
    #[error("data dir {path} is damaged ({reason}); move it aside and let the node rejoin, or restore a backup")]
    DamagedDataDir { path: String, reason: String },
    #[error("data dir {path} is in use by another linkdns process; stop it first")]
    Locked { path: String },
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("registry: {0}")]
    Registry(#[from] linkdns_registry::Error),
    #[error("proposal timed out; is a leader elected? (see `linkdns status`)")]
    Timeout,
    #[error("this node is not the leader (leader: {leader:?}); proposal dropped")]
    NotLeader { leader: Option<u64> },
    #[error("another membership change is in progress; retry when it has landed")]
    ConfChangeInProgress,
    #[error("membership change refused: {0}")]
    InvalidMembership(String),
    #[error("the leader changed, or a snapshot replaced this node's log, before the proposal was seen applied; its outcome is unknown (commands are idempotent: retry)")]
    OutcomeUnknown,
    #[error("the raft node has stopped")]
    Stopped,
    /// The store failed a write (a full disk, say); the node waits until it can reopen it.
    #[error("the data dir cannot be written now ({0}); DNS answers from memory, and writes wait until it can be")]
    Degraded(String),
}

impl Error {
    /// Classifies a sled error on the store at `path`.
    pub(crate) fn from_sled(path: &Path, e: sled::Error) -> Error {
        let path_text = path.display().to_string();
        match e {
            sled::Error::Corruption { .. } => Error::DamagedDataDir {
                path: path_text,
                reason: e.to_string(),
            },
            sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                Error::Locked { path: path_text }
            }
            sled::Error::Io(ref io) if io.raw_os_error() == Some(11) => {
                Error::Locked { path: path_text }
            }
            sled::Error::Io(ref io) if io.to_string().contains("lock") => {
                Error::Locked { path: path_text }
            }
            sled::Error::Io(io) => Error::Storage {
                path: path_text,
                reason: format!("{io}; check free space and permissions"),
            },
            other => Error::Storage {
                path: path_text,
                reason: other.to_string(),
            },
        }
    }
}
