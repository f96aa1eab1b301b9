//! The route programmer: makes every other node's container subnet reachable from this host
//! through a kernel route via that node's host address, with the forwarding rules container
//! traffic needs and no masquerading between cluster subnets.
//!
//! [`plan`] is pure (desired vs. actual → changes and refusals); [`netlink`] and [`firewall`]
//! are the edges that read the host and apply a plan.

pub mod plan;

pub use plan::{
    plan, Chain, ChainState, Conflict, Desired, Family, FirewallChange, HostAddress, HostRoute,
    HostState, Peer, Plan, Refusal, Route, RouteChange, RouteKind, Rule, DEFAULT_PROTOCOL,
    MAIN_TABLE,
};
