//! linkdns peers: what makes several nodes one cluster.
//!
//! - [`identity`]: cluster id, join secret and CA (made at bootstrap), node certificates (issued
//!   at join), join tokens, and their file in the data dir.
//! - [`transport`]: Raft messages between members over mutual TLS.
//! - control requests (join, remove, renew, rotate, the CA key), served by the leader through a
//!   [`ControlHandler`] the transport is given ([`client`] is their caller side).
//! - [`maintain`]: the leader's liveness verdicts, voter promotions, claim limit, removals.
//! - [`credentials`]: each node's CA key (voters only) and certificate renewal.

pub mod client;
mod control;
pub mod credentials;
pub mod identity;
pub mod maintain;
mod tls;
pub mod transport;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use client::{join, remove, rotate_token, JoinAs};
pub use credentials::keep_credentials;
pub use identity::{ClusterId, Identity, Token, IDENTITY_FILE};
pub use maintain::{maintain, MaintainConfig};
pub use transport::{Caller, ControlHandler, Transport};

/// Connects the transport to the Raft node it carries messages for, and has it hand control
/// requests (join, remove, renew, rotate, the CA key) to this crate's handler.
pub fn attach(transport: &Transport, node: std::sync::Arc<linkdns_raft::NodeHandle>) {
    transport.set_control(std::sync::Arc::new(control::Handler::new(transport)));
    transport.attach(node);
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad join token: {0}")]
    BadToken(String),
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged ({reason}); this node cannot prove its membership. Restore it from a backup, or remove this node from the cluster and join again")]
    DamagedIdentity { path: PathBuf, reason: String },
    #[error("cannot listen for peers on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    #[error("cannot reach {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("refused: {0}")]
    JoinRefused(String),
    /// A refusal that asking again cannot change (a wrong token, a taken name).
    #[error("refused: {0}")]
    Denied(String),
    #[error("peer protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether trying the same request again (later, or at another member) may succeed: the
    /// cluster was unreachable, had no leader, or could not finish in time. A bad or wrong
    /// token, a taken name, a broken key or local disk trouble is final.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unreachable { .. } | Error::JoinRefused(_) | Error::Protocol(_)
        )
    }
}
