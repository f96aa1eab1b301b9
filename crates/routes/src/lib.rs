//! The route programmer: makes every other node's container subnet reachable from this host
//! through a kernel route via that node's host address (or, where that host is not on a
//! directly connected network, through linkdns's VXLAN tunnel), with the forwarding rules
//! container traffic needs and no masquerading between cluster subnets.
//!
//! [`plan`] is pure (desired vs. actual → changes and refusals), and so is [`vxlan`] (the
//! tunnel's part); [`netlink`] and [`firewall`] are the edges that read the host and apply a
//! plan; [`Programmer`] ties them together.

pub mod firewall;
pub mod netlink;
pub mod plan;
pub mod vxlan;

pub use plan::{
    plan, private_ranges, Chain, ChainState, ClaimPolicy, Conflict, Desired, Encapsulation, Family,
    FirewallChange, HostAddress, HostRoute, HostState, Peer, Plan, Refusal, Route, RouteChange,
    RouteKind, Rule, DEFAULT_PROTOCOL, MAIN_TABLE,
};
pub use vxlan::TunnelChange;

use netlink::Netlink;

/// Errors of reading or changing the host's routing. None of them stops a node: DNS goes on,
/// and the next reconciliation tries again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink: cannot {action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {reason}")]
    Firewall { command: String, reason: String },
    #[error("cannot switch on IP forwarding ({path}): {reason}")]
    Forwarding { path: &'static str, reason: String },
}

/// Whether this process may change routes and firewall rules (CAP_NET_ADMIN in its effective
/// set, read from `/proc/self/status`).
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// The networks this host already uses — its interface addresses' networks and the
/// destinations of routes not marked with `protocol` (but the default routes and the local
/// table) — which a container subnet allocated to it must not overlap.
pub fn host_networks(protocol: u8) -> Result<Vec<linkdns_registry::Subnet>, Error> {
    let (routes, addresses) = Programmer::new(protocol).read_netlink()?;
    let mut networks: Vec<linkdns_registry::Subnet> = addresses
        .iter()
        .filter_map(HostAddress::network)
        .chain(
            routes
                .iter()
                .filter(|r| r.is_foreign(protocol))
                .map(|r| r.dst),
        )
        .collect();
    networks.sort();
    networks.dedup();
    Ok(networks)
}

/// What one reconciliation saw and did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The plan against the host as it was.
    pub plan: Plan,
    /// linkdns's routes and rules after the reconciliation.
    pub owned_routes: Vec<HostRoute>,
    pub owned_rules: Vec<String>,
    /// What could not be read or applied.
    pub errors: Vec<String>,
    /// Whether the host's routes could be read (else `owned_routes` says nothing).
    pub read: bool,
}

impl Report {
    /// The subnets linkdns's routes on this host lead to: the other nodes' subnets it has a
    /// path to. `None` when the host could not be read.
    pub fn paths(&self) -> Option<Vec<linkdns_registry::Subnet>> {
        self.read
            .then(|| self.owned_routes.iter().map(|r| r.dst).collect())
    }
}

/// Reads the host, plans, and (if asked) applies, touching only linkdns's own routes (by
/// `protocol`) and chains.
#[derive(Debug)]
pub struct Programmer {
    protocol: u8,
    netlink: Option<Netlink>,
}

impl Programmer {
    pub fn new(protocol: u8) -> Programmer {
        Programmer {
            protocol,
            netlink: None,
        }
    }

    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// Plans against the host as it is; with `apply`, makes the changes, then reads the host
    /// again for the report. A change that fails is reported and the others still go ahead.
    pub fn reconcile(&mut self, desired: &Desired, apply: bool) -> Report {
        // IPv6 rules only matter where IPv6 subnets are wanted: a host without ip6tables, or
        // without IPv6 nat, is not told about it every 10 s.
        let has_v6 = desired
            .local_subnets
            .iter()
            .chain(desired.peers.iter().flat_map(|p| &p.subnets))
            .any(|s| !s.is_ipv4());
        let quiet: &[Family] = if has_v6 { &[] } else { &[Family::V6] };
        self.reconcile_quietly(desired, apply, quiet)
    }

    /// [`Programmer::reconcile`], with firewall read errors of the `quiet` families left out
    /// of the report (their chains are still removed when they can be read).
    fn reconcile_quietly(&mut self, desired: &Desired, apply: bool, quiet: &[Family]) -> Report {
        let mut report = Report::default();
        let host = match self.read_host(quiet, &mut report.errors) {
            Ok(host) => host,
            Err(e) => {
                report.errors.push(e.to_string());
                return report;
            }
        };
        report.plan = plan(desired, &host, self.protocol);
        if apply && !report.plan.is_empty() {
            self.apply(&report.plan, &mut report.errors);
            let mut ignored = Vec::new();
            match self.read_host(quiet, &mut ignored) {
                Ok(after) => self.describe_owned(&after, &mut report),
                Err(e) => report.errors.push(e.to_string()),
            }
        } else {
            self.describe_owned(&host, &mut report);
        }
        report
    }

    /// Removes every route and chain linkdns owns (the node left the cluster).
    pub fn withdraw(&mut self) -> Report {
        self.reconcile_quietly(&Desired::default(), true, &[])
    }

    fn describe_owned(&self, host: &HostState, report: &mut Report) {
        report.read = true;
        report.owned_routes = host
            .routes
            .iter()
            .filter(|r| r.protocol == self.protocol)
            .cloned()
            .collect();
        report.owned_routes.sort();
        for (family, chain, state) in &host.chains {
            let prefix = match family {
                Family::V4 => "",
                Family::V6 => "(ipv6) ",
            };
            if !state.jumps.is_empty() {
                report.owned_rules.push(format!(
                    "{prefix}-t {} -A {} -j {} (rule {:?})",
                    chain.table(),
                    chain.parent(),
                    chain.name(),
                    state.jumps
                ));
            }
            for rule in &state.rules {
                report.owned_rules.push(format!(
                    "{prefix}-t {} -A {} {rule}",
                    chain.table(),
                    chain.name()
                ));
            }
        }
    }

    fn netlink(&mut self) -> Result<&mut Netlink, Error> {
        let socket = match self.netlink.take() {
            Some(socket) => socket,
            None => Netlink::open().map_err(|source| Error::Netlink {
                action: "open a NETLINK_ROUTE socket".into(),
                source,
            })?,
        };
        Ok(self.netlink.insert(socket))
    }

    /// Routes and addresses (required), and linkdns's chains (a chain that cannot be read is
    /// left out, so it is left alone, and reported in `errors` unless its family is `quiet`).
    fn read_host(
        &mut self,
        quiet: &[Family],
        errors: &mut Vec<String>,
    ) -> Result<HostState, Error> {
        let result = self.netlink().and_then(|netlink| {
            netlink.read_all().map_err(|source| Error::Netlink {
                action: "list routes, links, addresses and tunnel entries".into(),
                source,
            })
        });
        if result.is_err() {
            // A socket in a bad state is not reused.
            self.netlink = None;
        }
        let interfaces = result?;
        let mut chains = Vec::new();
        for family in [Family::V4, Family::V6] {
            for chain in Chain::ALL {
                match firewall::read(family, chain) {
                    Ok(state) => chains.push((family, chain, state)),
                    Err(_) if quiet.contains(&family) => {}
                    Err(e) => errors.push(format!(
                        "{family} {} {} not managed: {e}",
                        chain.table(),
                        chain.name()
                    )),
                }
            }
        }
        Ok(HostState {
            routes: interfaces.routes,
            addresses: interfaces.addresses,
            chains,
            forwarding: firewall::forwarding(),
            mtus: interfaces.mtus,
            tunnel: interfaces.tunnel,
        })
    }

    fn read_netlink(&mut self) -> Result<(Vec<HostRoute>, Vec<HostAddress>), Error> {
        self.netlink()?.read().map_err(|source| Error::Netlink {
            action: "list routes and addresses".into(),
            source,
        })
    }

    /// Makes the plan's changes in order: route removals, the tunnel, route additions,
    /// forwarding, then the firewall.
    fn apply(&mut self, plan: &Plan, errors: &mut Vec<String>) {
        let (removals, additions) = plan.route_phases();
        for change in removals {
            self.apply_route(change, None, errors);
        }
        // The device's index, once it is known (made in this pass, or there already).
        let mut device = plan.tunnel.iter().find_map(|c| match c {
            TunnelChange::Set { index, .. } => Some(*index),
            _ => None,
        });
        for change in &plan.tunnel {
            let result = self.netlink().and_then(|netlink| {
                let io = apply_tunnel(netlink, change, &mut device);
                io.map_err(|source| Error::Netlink {
                    action: change.to_string(),
                    source,
                })
            });
            match result {
                Ok(()) => tracing::info!(change = %change, "tunnel changed"),
                Err(e) => {
                    tracing::warn!(error = %e, "tunnel change failed");
                    errors.push(e.to_string());
                }
            }
        }
        // The tunnel device's index and MTU, looked up once for all the routes through it.
        let tunnelled = additions.iter().any(|c| match c {
            RouteChange::Add(r) | RouteChange::Replace { new: r, .. } => r.tunnel.is_some(),
            RouteChange::Remove { .. } => false,
        });
        let tunnel_link = if tunnelled {
            self.netlink()
                .ok()
                .and_then(|netlink| netlink.link(vxlan::DEVICE).ok())
        } else {
            None
        };
        for change in additions {
            self.apply_route(change, tunnel_link, errors);
        }
        for family in &plan.enable_forwarding {
            match firewall::enable_forwarding(*family) {
                Ok(()) => tracing::info!(%family, "IP forwarding switched on"),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for family in [Family::V4, Family::V6] {
            let changes: Vec<&FirewallChange> = plan
                .firewall
                .iter()
                .filter(|c| change_family(c) == family)
                .collect();
            if changes.is_empty() {
                continue;
            }
            match firewall::apply(family, &changes) {
                Ok(()) => {
                    tracing::info!(%family, changes = changes.len(), "forwarding rules updated")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "forwarding rules not updated");
                    errors.push(e.to_string());
                }
            }
        }
    }
}

impl Programmer {
    /// One route change; `tunnel_link` is the tunnel device's index and MTU, for routes
    /// through it.
    fn apply_route(
        &mut self,
        change: &RouteChange,
        tunnel_link: Option<(u32, u32)>,
        errors: &mut Vec<String>,
    ) {
        let protocol = self.protocol;
        let result = self.netlink().and_then(|netlink| {
            let (action, io) = match change {
                RouteChange::Add(r) => (
                    format!("add route {r}"),
                    onlink(r, tunnel_link)
                        .and_then(|dev| netlink.add_route(r.dst, r.via, dev, protocol, None)),
                ),
                RouteChange::Replace { old, new } => (
                    format!("replace route {new}"),
                    onlink(new, tunnel_link).and_then(|dev| {
                        netlink.add_route(new.dst, new.via, dev, protocol, Some(old.metric))
                    }),
                ),
                RouteChange::Remove { route, .. } => {
                    (format!("delete route {route}"), netlink.delete_route(route))
                }
            };
            io.map_err(|source| Error::Netlink { action, source })
        });
        match result {
            Ok(()) => tracing::info!(change = %describe(change), "route changed"),
            Err(e) => {
                tracing::warn!(error = %e, "route change failed");
                errors.push(e.to_string());
            }
        }
    }
}

/// The interface a tunnel route goes out of, on-link, and its MTU (none for a plain route).
fn onlink(route: &Route, tunnel_link: Option<(u32, u32)>) -> std::io::Result<Option<(u32, u32)>> {
    match (route.tunnel, tunnel_link) {
        (None, _) => Ok(None),
        (Some(_), Some(link)) => Ok(Some(link)),
        (Some(_), None) => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no link {}", route.device),
        )),
    }
}

/// One change to the tunnel; `device` is the tunnel device's index once known.
fn apply_tunnel(
    netlink: &mut Netlink,
    change: &TunnelChange,
    device: &mut Option<u32>,
) -> std::io::Result<()> {
    let mut index = |netlink: &mut Netlink| -> std::io::Result<u32> {
        match *device {
            Some(index) => Ok(index),
            None => {
                let index = netlink.link_index(vxlan::DEVICE)?;
                *device = Some(index);
                Ok(index)
            }
        }
    };
    match change {
        TunnelChange::Create(d) => {
            *device = None;
            netlink.create_tunnel(d)
        }
        TunnelChange::Remove { index, .. } => {
            *device = None;
            netlink.delete_link(*index)
        }
        TunnelChange::Set { index, mtu } => netlink.set_link(*index, *mtu),
        TunnelChange::SetFdb { mac, remote } => {
            let i = index(netlink)?;
            netlink.set_fdb(i, *mac, *remote)
        }
        TunnelChange::RemoveFdb { mac } => {
            let i = index(netlink)?;
            netlink.delete_fdb(i, *mac)
        }
        TunnelChange::SetNeighbour { ip, mac } => {
            let i = index(netlink)?;
            netlink.set_neighbour(i, *ip, *mac)
        }
        TunnelChange::RemoveNeighbour { ip } => {
            let i = index(netlink)?;
            netlink.delete_neighbour(i, *ip)
        }
    }
}

fn change_family(change: &FirewallChange) -> Family {
    match change {
        FirewallChange::WriteChain { family, .. }
        | FirewallChange::PlaceJump { family, .. }
        | FirewallChange::RemoveChain { family, .. } => *family,
    }
}

fn describe(change: &RouteChange) -> String {
    match change {
        RouteChange::Add(r) => format!("add {r}"),
        RouteChange::Replace { old, new } => format!("replace {old} with {new}"),
        RouteChange::Remove { route, why } => format!("remove {route} ({why})"),
    }
}
