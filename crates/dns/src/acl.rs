//! Who may use this node as a recursive resolver: loopback, the configured and detected
//! container subnets, every node's claimed subnet, any address of a container in the registry,
//! and the cluster's hosts.
//! Everyone may ask about the cluster's own names; only these may have other names forwarded.

use std::net::IpAddr;
use std::sync::RwLock;

use linkdns_registry::{canonical_ip, Registry, Subnet};

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

    pub fn allows(&self, ip: IpAddr, registry: &Registry) -> bool {
        let ip = canonical_ip(ip);
        if ip.is_loopback() || self.configured.iter().any(|s| s.contains(ip)) {
            return true;
        }
        if self
            .detected
            .read()
            .map(|d| d.iter().any(|s| s.contains(ip)))
            .unwrap_or(false)
        {
            return true;
        }
        if registry.container_at(ip, None).is_some() || registry.subnet_owner(ip).is_some() {
            return true;
        }
        registry.node_at(ip).is_some()
    }
}
