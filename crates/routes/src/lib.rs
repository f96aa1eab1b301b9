//! The route programmer: makes every other node's container subnet reachable from this host
//! through a kernel route via that node's host address, with the forwarding rules container
//! traffic needs and no masquerading between cluster subnets.
//!
//! [`plan`] is pure (desired vs. actual → changes and refusals); [`netlink`] and [`firewall`]
//! are the edges that read the host and apply a plan; [`Programmer`] ties them together.

pub mod firewall;
pub mod netlink;
pub mod plan;

pub use plan::{
    plan, Chain, ChainState, Conflict, Desired, Family, FirewallChange, HostAddress, HostRoute,
    HostState, Peer, Plan, Refusal, Route, RouteChange, RouteKind, Rule, DEFAULT_PROTOCOL,
    MAIN_TABLE,
};

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
        let result = self.read_netlink();
        if result.is_err() {
            // A socket in a bad state is not reused.
            self.netlink = None;
        }
        let (routes, addresses) = result?;
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
            routes,
            addresses,
            chains,
            forwarding: firewall::forwarding(),
        })
    }

    fn read_netlink(&mut self) -> Result<(Vec<HostRoute>, Vec<HostAddress>), Error> {
        self.netlink()?.read().map_err(|source| Error::Netlink {
            action: "list routes and addresses".into(),
            source,
        })
    }

    fn apply(&mut self, plan: &Plan, errors: &mut Vec<String>) {
        let protocol = self.protocol;
        for change in &plan.routes {
            let result = self.netlink().and_then(|netlink| {
                let (action, io) = match change {
                    RouteChange::Add(r) => (
                        format!("add route {} via {}", r.dst, r.via),
                        netlink.add_route(r.dst, r.via, protocol, None),
                    ),
                    RouteChange::Replace { old, new } => (
                        format!("replace route {} via {}", new.dst, new.via),
                        netlink.add_route(new.dst, new.via, protocol, Some(old.metric)),
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
