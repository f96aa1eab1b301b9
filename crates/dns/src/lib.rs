//! The linkdns DNS front end: answers the cluster's names from the local replica, forwards the
//! rest to upstream resolvers for allowed clients, refuses everyone else.
//!
//! Wire types (hickory-proto) stay in this crate; the registry is read through `Published`.

mod acl;
mod answer;
mod forward;
mod limits;
mod metrics;
mod server;

use std::net::SocketAddr;

pub use acl::{Acl, Client};
pub use answer::{Zone, MAX_UDP_PAYLOAD};
pub use forward::{parse_nameservers, upstreams_from_resolv_conf, Forwarder};
pub use limits::Limits;
pub use metrics::DnsMetrics;
pub use server::{AnswerCache, Answerer, DnsServer, Holds, Identify, HOLD_LIMIT};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen for DNS on {0}: {1}")]
    Bind(SocketAddr, String),
    #[error("{0}")]
    Config(String),
    #[error("upstream {0}: {1}")]
    Upstream(SocketAddr, String),
    #[error("no upstream resolver configured")]
    NoUpstream,
}
