//! Who asks: this host's own clients (loopback, its container networks, `--allow`), the rest of
//! the cluster (any node's claimed subnet, any container in the registry, the cluster's hosts),
//! or a stranger. Everyone may ask about the cluster's own names; only this host's own clients
//! have other names forwarded (a LAN machine that forges a cluster source address gets no
//! open resolver); the rest of the cluster is rate-limited at a higher rate than strangers.

use std::net::IpAddr;
use std::sync::RwLock;

use linkdns_registry::{canonical_ip, Published, Subnet};

#[derive(Debug, Default)]
pub struct Acl {
    configured: Vec<Subnet>,
    /// Subnets learned at run time (the local Docker bridge); replaced as a whole.
    detected: RwLock<Vec<Subnet>>,
}

impl Acl {
    pub fn new(configured: Vec<Subnet>) -> Acl {
        Acl {
            configured,
            detected: RwLock::new(Vec::new()),
        }
    }

    /// Replaces the subnets learned from the local Docker engine.
    pub fn set_detected(&self, subnets: Vec<Subnet>) {
        if let Ok(mut d) = self.detected.write() {
            *d = subnets;
        }
    }

    /// Which kind of client `ip` is, as of `published`.
    pub fn class(&self, ip: IpAddr, published: &Published) -> Client {
        let ip = canonical_ip(ip);
        if ip.is_loopback() || self.configured.iter().any(|s| s.contains(ip)) {
            return Client::Local;
        }
        if self
            .detected
            .read()
            .map(|d| d.iter().any(|s| s.contains(ip)))
            .unwrap_or(false)
            || published.local.is_on_host(ip)
        {
            return Client::Local;
        }
        let registry = &published.registry;
        if registry.container_at(ip, None).is_some()
            || registry.subnet_owner(ip).is_some()
            || registry.node_at(ip).is_some()
        {
            return Client::Cluster;
        }
        Client::Stranger
    }
}

/// The kinds of DNS clients (see [`Acl::class`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// Loopback, this host's container networks, `--allow`: forwarded to, never limited.
    Local,
    /// Elsewhere in the cluster: cluster names only, rate-limited at the cluster rate.
    Cluster,
    /// Anyone else: cluster names only, rate-limited at the stranger rate.
    Stranger,
}
