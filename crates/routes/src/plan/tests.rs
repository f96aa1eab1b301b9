//! Golden tests of the planner: a host and a cluster in, the plan as `linkdns routes --plan`
//! prints it out.

use super::*;
use crate::vxlan;
use linkdns_registry::{Command, NodeInfo};

const P: u8 = DEFAULT_PROTOCOL;

fn net(s: &str) -> Subnet {
    s.parse().expect("subnet")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn addr(device: &str, cidr: &str) -> HostAddress {
    let (a, p) = cidr.split_once('/').expect("cidr");
    HostAddress {
        device: device.into(),
        addr: ip(a),
        peer: None,
        prefix: p.parse().expect("prefix"),
        up: true,
    }
}

fn route(dst: &str, via: Option<&str>, protocol: u8) -> HostRoute {
    HostRoute {
        table: MAIN_TABLE,
        dst: net(dst),
        gateway: via.map(ip),
        device: Some("eth0".into()),
        protocol,
        kind: RouteKind::Unicast,
        metric: 0,
    }
}

fn peer(id: NodeId, name: &str, host: &str, subnets: &[&str]) -> Peer {
    Peer {
        id,
        name: name.into(),
        host: Some(ip(host)),
        subnets: subnets.iter().map(|s| net(s)).collect(),
    }
}

/// h1 of the test bed: 172.30.0.1 on the LAN, Docker's bridge on 192.168.1.0/24, the kernel's
/// connected routes, linkdns's chains not there yet.
fn h1() -> HostState {
    HostState {
        routes: vec![
            route("172.30.0.0/24", None, 2),
            route("192.168.1.0/24", None, 2),
            route("0.0.0.0/0", Some("172.30.0.254"), 4),
            HostRoute {
                table: 255,
                kind: RouteKind::Local,
                ..route("172.30.0.1/32", None, 2)
            },
        ],
        addresses: vec![
            addr("lo", "127.0.0.1/8"),
            addr("eth0", "172.30.0.1/24"),
            addr("docker0", "192.168.1.1/24"),
        ],
        chains: [Family::V4, Family::V6]
            .into_iter()
            .flat_map(|f| {
                Chain::ALL.map(|c| {
                    let state = ChainState {
                        position: 1,
                        ..ChainState::default()
                    };
                    (f, c, state)
                })
            })
            .collect(),
        forwarding: [Family::V4].into(),
        mtus: [("eth0".to_string(), 1500)].into(),
        tunnel: TunnelState::default(),
    }
}

fn three_hosts() -> Desired {
    Desired {
        local_subnets: vec![net("192.168.1.0/24")],
        peers: vec![
            peer(3, "h3", "172.30.0.3", &["192.168.3.0/24"]),
            peer(2, "h2", "172.30.0.2", &["192.168.2.0/24"]),
        ],
        local_host: Some(ip("172.30.0.1")),
        ..Desired::default()
    }
}

/// The host after applying `plan` (what the edges would leave), for steady-state checks.
fn applied(mut host: HostState, plan: &Plan) -> HostState {
    for change in &plan.routes {
        match change {
            RouteChange::Add(r) | RouteChange::Replace { new: r, .. } => {
                if let RouteChange::Replace { old, .. } = change {
                    host.routes.retain(|h| h != old);
                }
                host.routes.push(HostRoute {
                    device: Some("eth0".into()),
                    ..route(&r.dst.to_string(), Some(&r.via.to_string()), P)
                });
            }
            RouteChange::Remove { route, .. } => host.routes.retain(|h| h != route),
        }
    }
    host.forwarding
        .extend(plan.enable_forwarding.iter().copied());
    for change in &plan.firewall {
        for (f, c, state) in &mut host.chains {
            match change {
                FirewallChange::WriteChain {
                    family,
                    chain,
                    rules,
                } if (family, chain) == (f, c) => {
                    state.exists = true;
                    state.rules = rules.clone();
                }
                FirewallChange::PlaceJump {
                    family,
                    chain,
                    position,
                    ..
                } if (family, chain) == (f, c) => {
                    state.jumps = vec![*position];
                }
                FirewallChange::RemoveChain { family, chain, .. } if (family, chain) == (f, c) => {
                    *state = ChainState::default();
                }
                _ => {}
            }
        }
    }
    host
}

#[test]
fn a_new_host_gets_a_route_per_peer_and_the_forwarding_rules() {
    let plan = plan(&three_hosts(), &h1(), P);
    assert_eq!(
        plan.to_string(),
        "\
add      192.168.2.0/24 via 172.30.0.2 (h2)
add      192.168.3.0/24 via 172.30.0.3 (h3)
write    ipv4 filter LINKDNS-FORWARD: 4 rule(s)
           -A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.2.0/24 -i docker0 -o eth0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 2 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.2.0/24 -j ACCEPT
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.3.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 2 rule(s)
           -A LINKDNS-PREROUTING -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
           -A LINKDNS-PREROUTING -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
"
    );
    // Once applied, planning again changes nothing: restarts do not flap.
    let host = applied(h1(), &plan);
    let again = super::plan(&three_hosts(), &host, P);
    assert!(again.is_empty(), "{again}");
    assert_eq!(
        again.to_string(),
        "\
keep     192.168.2.0/24 via 172.30.0.2 (h2)
keep     192.168.3.0/24 via 172.30.0.3 (h3)
"
    );
}

#[test]
fn conflicts_are_refused_and_what_is_in_the_way_is_left_alone() {
    let mut host = h1();
    // Someone routes h2's subnet elsewhere; h4's is inside this host's 10.5.0.0/16 network.
    host.routes
        .push(route("192.168.2.0/24", Some("172.30.0.99"), 4));
    host.routes.push(route("10.5.0.0/16", None, 2));
    host.addresses.push(addr("eth1", "10.5.0.1/16"));
    // A wider foreign route covering h6's subnet counts too; a default route does not.
    host.routes
        .push(route("10.60.0.0/16", Some("172.30.0.254"), 3));
    let desired = Desired {
        local_subnets: vec![net("192.168.1.0/24")],
        peers: vec![
            peer(2, "h2", "172.30.0.2", &["192.168.2.0/24"]),
            peer(3, "h3", "172.30.0.3", &["192.168.3.0/24"]),
            peer(4, "h4", "172.30.0.4", &["10.5.3.0/24"]),
            // Behind a router, not on the LAN, and no tunnel allowed: reported, not programmed.
            peer(5, "h5", "198.51.100.5", &["192.168.5.0/24"]),
            peer(6, "h6", "172.30.0.6", &["10.60.6.0/24"]),
            // Claims this host's own LAN address as its host address.
            peer(7, "h7", "172.30.0.1", &["192.168.7.0/24"]),
            Peer {
                host: None,
                ..peer(8, "h8", "0.0.0.0", &["192.168.8.0/24"])
            },
            // Overlaps this node's subnet (the registry refuses such claims; the planner too).
            peer(9, "h9", "172.30.0.9", &["192.168.0.0/16"]),
            // An IPv6 subnet behind an IPv4-only host address.
            peer(10, "h10", "172.30.0.10", &["fd00:10::/64"]),
            // Claims a compromised member could make to take traffic over: a public range
            // the hosts reach through their default route, the network of this host's
            // upstream resolver, one that holds another node's host address.
            peer(11, "h11", "172.30.0.11", &["8.8.0.0/16"]),
            peer(12, "h12", "172.30.0.12", &["10.99.0.0/24"]),
            peer(13, "h13", "172.30.0.13", &["10.77.0.0/16"]),
            peer(14, "h14", "10.77.0.14", &["192.168.14.0/24"]),
        ],
        local_host: Some(ip("172.30.0.1")),
        encapsulation: Encapsulation::Never,
        reach_from: Vec::new(),
        via_router: false,
        policy: ClaimPolicy {
            claimable: private_ranges(),
            protected: vec![(ip("10.99.0.53"), "an upstream resolver".into())],
        },
    };
    assert_eq!(
        plan(&desired, &host, P).to_string(),
        "\
add      192.168.3.0/24 via 172.30.0.3 (h3)
write    ipv4 filter LINKDNS-FORWARD: 2 rule(s)
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.3.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 1 rule(s)
           -A LINKDNS-PREROUTING -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
refuse   not routing 192.168.2.0/24 of node h2: overlaps existing route `192.168.2.0/24 via 172.30.0.99 dev eth0 proto static`, which linkdns does not own
refuse   not routing 10.5.3.0/24 of node h4: overlaps this host's address 10.5.0.1/16 on eth1
refuse   not routing 192.168.5.0/24 of node h5: the gateway 198.51.100.5 is not on a directly connected network of this host (and encapsulation is never)
refuse   not routing 10.60.6.0/24 of node h6: overlaps existing route `10.60.0.0/16 via 172.30.0.254 dev eth0 proto boot`, which linkdns does not own
refuse   not routing 192.168.7.0/24 of node h7: the gateway 172.30.0.1 is an address of this host
refuse   not routing 192.168.8.0/24 of node h8: the node has no host address of this family to route through
refuse   not routing 192.168.0.0/16 of node h9: overlaps 192.168.1.0/24 of node (this host)
refuse   not routing fd00:10::/64 of node h10: the node has no host address of this family to route through
refuse   not routing 8.8.0.0/16 of node h11: lies outside the claimable ranges (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7; --claimable)
refuse   not routing 10.99.0.0/24 of node h12: holds 10.99.0.53, an upstream resolver
refuse   not routing 10.77.0.0/16 of node h13: holds 10.77.0.14, the host address of node h14
refuse   not routing 192.168.14.0/24 of node h14: the gateway 10.77.0.14 is not on a directly connected network of this host (and encapsulation is never)
"
    );
}

#[test]
fn only_linkdns_routes_are_replaced_or_withdrawn() {
    let mut host = applied(h1(), &plan(&three_hosts(), &h1(), P));
    // h2 moved to another address; a duplicate of h3's route sits in another table; a route
    // of a node that was removed is still there; a foreign route to a fourth subnet stays.
    host.routes
        .retain(|r| !(r.protocol == P && r.dst == net("192.168.2.0/24")));
    host.routes
        .push(route("192.168.2.0/24", Some("172.30.0.22"), P));
    host.routes.push(HostRoute {
        table: 100,
        ..route("192.168.3.0/24", Some("172.30.0.3"), P)
    });
    host.routes
        .push(route("192.168.4.0/24", Some("172.30.0.4"), P));
    host.routes
        .push(route("192.168.40.0/24", Some("172.30.0.40"), 4));
    let mut desired = three_hosts();
    desired.peers[1].host = Some(ip("172.30.0.12"));
    assert_eq!(
        plan(&desired, &host, P).to_string(),
        "\
keep     192.168.3.0/24 via 172.30.0.3 (h3)
remove   192.168.3.0/24 via 172.30.0.3 dev eth0 proto 151 table 100: a duplicate of linkdns's route to this subnet
remove   192.168.4.0/24 via 172.30.0.4 dev eth0 proto 151: no other node claims this subnet
replace  192.168.2.0/24 via 172.30.0.22 dev eth0 proto 151  ->  192.168.2.0/24 via 172.30.0.12 (h2)
"
    );

    // Every other node gone: the routes, the chains and their jumps go; the foreign route and
    // forwarding (Docker's too) stay.
    let alone = Desired {
        local_subnets: vec![net("192.168.1.0/24")],
        peers: Vec::new(),
        ..Desired::default()
    };
    let plan = plan(&alone, &host, P);
    assert_eq!(
        plan.to_string(),
        "\
remove   192.168.2.0/24 via 172.30.0.22 dev eth0 proto 151: no other node claims this subnet
remove   192.168.3.0/24 via 172.30.0.3 dev eth0 proto 151 table 100: no other node claims this subnet
remove   192.168.3.0/24 via 172.30.0.3 dev eth0 proto 151: no other node claims this subnet
remove   192.168.4.0/24 via 172.30.0.4 dev eth0 proto 151: no other node claims this subnet
delete   ipv4 filter LINKDNS-FORWARD and its jump
delete   ipv4 nat LINKDNS-POSTROUTING and its jump
delete   ipv4 raw LINKDNS-PREROUTING and its jump
"
    );
    let host = applied(host, &plan);
    assert!(host.routes.iter().all(|r| r.protocol != P));
    assert!(host
        .routes
        .contains(&route("192.168.40.0/24", Some("172.30.0.40"), 4)));
}

#[test]
fn a_route_refused_now_is_withdrawn_and_says_why() {
    let mut host = applied(h1(), &plan(&three_hosts(), &h1(), P));
    // An interface with an address in h3's subnet appears on this host.
    host.addresses.push(addr("wg0", "192.168.3.77/24"));
    assert_eq!(
        plan(&three_hosts(), &host, P).to_string(),
        "\
keep     192.168.2.0/24 via 172.30.0.2 (h2)
remove   192.168.3.0/24 via 172.30.0.3 dev eth0 proto 151: refused now: overlaps this host's address 192.168.3.77/24 on wg0
write    ipv4 filter LINKDNS-FORWARD: 2 rule(s)
           -A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.2.0/24 -i docker0 -o eth0 -j ACCEPT
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.2.0/24 -j ACCEPT
write    ipv4 raw LINKDNS-PREROUTING: 1 rule(s)
           -A LINKDNS-PREROUTING -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
refuse   not routing 192.168.3.0/24 of node h3: overlaps this host's address 192.168.3.77/24 on wg0
"
    );
}

#[test]
fn jumps_pushed_down_by_docker_are_put_back_first_and_foreign_rules_rewritten() {
    let mut host = applied(h1(), &plan(&three_hosts(), &h1(), P));
    for (_, chain, state) in host.chains.iter_mut().filter(|(f, ..)| *f == Family::V4) {
        match chain {
            // Docker restarted and inserted its rules above the jumps.
            Chain::Postrouting => state.jumps = vec![3],
            Chain::Prerouting => state.jumps = vec![2],
            Chain::Mss => {}
            // Someone added a rule to linkdns's chain, and a second jump.
            Chain::Forward => {
                state
                    .rules
                    .push(Rule::parse(Chain::Forward, "-s 10.0.0.0/8 -j DROP"));
                state.jumps = vec![1, 5];
            }
        }
    }
    host.forwarding.clear();
    let out = plan(&three_hosts(), &host, P).to_string();
    assert_eq!(
        out,
        "\
keep     192.168.2.0/24 via 172.30.0.2 (h2)
keep     192.168.3.0/24 via 172.30.0.3 (h3)
enable   ipv4 forwarding
write    ipv4 filter LINKDNS-FORWARD: 4 rule(s)
           -A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.2.0/24 -i docker0 -o eth0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [1, 5])
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [3])
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [2])
"
    );
}

#[test]
fn a_firewall_that_cannot_be_read_is_left_alone() {
    let mut host = h1();
    host.chains.clear();
    assert_eq!(
        plan(&three_hosts(), &host, P).to_string(),
        "\
add      192.168.2.0/24 via 172.30.0.2 (h2)
add      192.168.3.0/24 via 172.30.0.3 (h3)
"
    );
}

#[test]
fn rules_print_and_parse_as_iptables_does() {
    for (chain, text) in [
        (
            Chain::Forward,
            "-s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT",
        ),
        (
            Chain::Postrouting,
            "-s 192.168.1.0/24 -d 192.168.2.0/24 -j ACCEPT",
        ),
        (
            Chain::Forward,
            "-s fd00:2::/64 -d fd00:1::/64 -i eth0 -o br-1 -j ACCEPT",
        ),
    ] {
        let rule = Rule::parse(chain, text);
        assert!(!matches!(rule, Rule::Unknown(_)), "{text}");
        assert_eq!(rule.to_string(), text);
    }
    for (chain, foreign) in [
        (
            Chain::Postrouting,
            "-s 192.168.1.0/24 -d 192.168.2.0/24 -j RETURN",
        ),
        // Without the interfaces, a rule of an older linkdns: rewritten.
        (
            Chain::Forward,
            "-s 192.168.2.0/24 -d 192.168.1.0/24 -j ACCEPT",
        ),
    ] {
        assert!(matches!(Rule::parse(chain, foreign), Rule::Unknown(_)));
    }
}

#[test]
fn the_desired_state_comes_from_the_registry() {
    let mut r = Registry::new();
    for (id, name, peer) in [
        (1, "h1", "172.30.0.1:7380"),
        (2, "h2", "172.30.0.2:7380"),
        (3, "h3", "0.0.0.0:7380"),
        (4, "h4", "[::ffff:172.30.0.4]:7380"),
    ] {
        r.apply(&Command::UpsertNode(NodeInfo {
            id,
            name: name.into(),
            peer_addr: peer.into(),
        }))
        .expect("node");
    }
    for (id, subnet) in [
        (1, "192.168.1.0/24"),
        (2, "192.168.2.0/24"),
        (3, "192.168.3.0/24"),
        (4, "192.168.4.0/24"),
    ] {
        r.apply(&Command::SetNodeSubnets {
            node: id,
            subnets: vec![net(subnet)],
        })
        .expect("claim");
    }
    // A node hidden as down keeps its route: traffic to it should not leak to the default route.
    r.apply(&Command::SetNodeDown {
        node: 2,
        down: true,
    })
    .expect("down");
    let desired = Desired::from_registry(&r, 1);
    assert_eq!(desired.local_subnets, vec![net("192.168.1.0/24")]);
    assert_eq!(
        desired.peers,
        vec![
            peer(2, "h2", "172.30.0.2", &["192.168.2.0/24"]),
            Peer {
                host: None,
                ..peer(3, "h3", "0.0.0.0", &["192.168.3.0/24"])
            },
            peer(4, "h4", "172.30.0.4", &["192.168.4.0/24"]),
        ]
    );
}

#[test]
fn ipv6_point_to_point_and_docker_user_cases() {
    let mut host = h1();
    host.addresses.push(addr("eth0", "fd00:30::1/64"));
    host.addresses.push(HostAddress {
        peer: Some(ip("10.0.0.2")),
        ..addr("tun0", "10.0.0.1/32")
    });
    // An administrator's DOCKER-USER jump leads FORWARD: linkdns's goes right after it.
    for (f, c, state) in &mut host.chains {
        if (*f, *c) == (Family::V4, Chain::Forward) {
            state.position = 2;
        }
    }
    let desired = Desired {
        local_subnets: vec![net("192.168.1.0/24")],
        peers: vec![
            // Reached over a point-to-point link: the peer address is directly connected.
            peer(2, "h2", "10.0.0.2", &["192.168.2.0/24"]),
            // An IPv6-only host: routed, but IPv6 forwarding is the administrator's to switch on.
            peer(3, "h3", "fd00:30::3", &["fd00:3::/64"]),
        ],
        ..Desired::default()
    };
    assert_eq!(
        plan(&desired, &host, P).to_string(),
        "\
add      192.168.2.0/24 via 10.0.0.2 (h2)
add      fd00:3::/64 via fd00:30::3 (h3)
write    ipv4 filter LINKDNS-FORWARD: 2 rule(s)
           -A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i tun0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.2.0/24 -i docker0 -o tun0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 2 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.2.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 1 rule(s)
           -A LINKDNS-PREROUTING -s 192.168.2.0/24 -d 192.168.1.0/24 -i tun0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
note     IPv6 forwarding is off, so other hosts' containers cannot reach this host's over IPv6: set net.ipv6.conf.all.forwarding=1 (and accept_ra=2 on interfaces configured by router advertisements)
"
    );
}

#[test]
fn without_the_bridge_interface_routes_go_in_and_the_missing_rules_are_noted() {
    let mut host = h1();
    host.addresses.retain(|a| a.device != "docker0");
    let desired = Desired {
        local_subnets: vec![net("192.168.1.0/24")],
        peers: vec![peer(2, "h2", "172.30.0.2", &["192.168.2.0/24"])],
        ..Desired::default()
    };
    assert_eq!(
        plan(&desired, &host, P).to_string(),
        "\
add      192.168.2.0/24 via 172.30.0.2 (h2)
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.2.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
note     no interface of this host has an address in 192.168.1.0/24 (is Docker's bridge network up?): traffic from other hosts to it is not let in
"
    );
}

#[test]
fn a_block_with_several_docker_networks_lets_each_of_them_in() {
    // With cluster_cidr each host claims a block; Docker's bridge, the `linkdns` network and
    // compose's networks are all inside it, each on a bridge of its own.
    let mut host = h1();
    host.addresses = vec![
        addr("lo", "127.0.0.1/8"),
        addr("eth0", "172.30.0.1/24"),
        addr("br-linkdns", "10.77.0.1/24"),
        addr("docker0", "10.77.1.1/24"),
        addr("br-shop", "10.77.2.1/24"),
        // Not in the block: compose from Docker's default pools stays host-local.
        addr("br-other", "172.18.0.1/16"),
    ];
    let desired = Desired {
        local_subnets: vec![net("10.77.0.0/20")],
        peers: vec![peer(2, "h2", "172.30.0.2", &["10.77.16.0/20"])],
        ..Desired::default()
    };
    assert_eq!(
        plan(&desired, &host, P).to_string(),
        "\
add      10.77.16.0/20 via 172.30.0.2 (h2)
write    ipv4 filter LINKDNS-FORWARD: 6 rule(s)
           -A LINKDNS-FORWARD -s 10.77.16.0/20 -d 10.77.0.0/24 -i eth0 -o br-linkdns -j ACCEPT
           -A LINKDNS-FORWARD -s 10.77.0.0/24 -d 10.77.16.0/20 -i br-linkdns -o eth0 -j ACCEPT
           -A LINKDNS-FORWARD -s 10.77.16.0/20 -d 10.77.2.0/24 -i eth0 -o br-shop -j ACCEPT
           -A LINKDNS-FORWARD -s 10.77.2.0/24 -d 10.77.16.0/20 -i br-shop -o eth0 -j ACCEPT
           -A LINKDNS-FORWARD -s 10.77.16.0/20 -d 10.77.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 10.77.1.0/24 -d 10.77.16.0/20 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 10.77.0.0/20 -d 10.77.16.0/20 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 3 rule(s)
           -A LINKDNS-PREROUTING -s 10.77.16.0/20 -d 10.77.0.0/24 -i eth0 -j ACCEPT
           -A LINKDNS-PREROUTING -s 10.77.16.0/20 -d 10.77.2.0/24 -i eth0 -j ACCEPT
           -A LINKDNS-PREROUTING -s 10.77.16.0/20 -d 10.77.1.0/24 -i eth0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
"
    );
}

/// h1 of two subnets: 172.31.201.1 on LAN A, its default route via the router.
fn h1_behind_a_router() -> (HostState, Desired) {
    let mut host = h1();
    host.routes = vec![
        route("172.31.201.0/24", None, 2),
        route("192.168.1.0/24", None, 2),
        route("0.0.0.0/0", Some("172.31.201.254"), 4),
    ];
    host.addresses = vec![
        addr("lo", "127.0.0.1/8"),
        addr("eth0", "172.31.201.1/24"),
        addr("docker0", "192.168.1.1/24"),
    ];
    let desired = Desired {
        local_subnets: vec![net("192.168.1.0/24")],
        peers: vec![
            // On LAN A with h1: a plain route.
            peer(3, "h3", "172.31.201.3", &["192.168.3.0/24"]),
            // On LAN B, behind the router: the tunnel.
            peer(
                2,
                "h2",
                "172.31.202.2",
                &["192.168.2.0/24", "10.77.16.0/20"],
            ),
        ],
        local_host: Some(ip("172.31.201.1")),
        ..Desired::default()
    };
    (host, desired)
}

#[test]
fn a_host_behind_a_router_is_reached_through_the_tunnel_and_an_on_link_one_directly() {
    let (host, desired) = h1_behind_a_router();
    let first = plan(&desired, &host, P);
    assert_eq!(
        first.to_string(),
        "\
create   linkdns.vx vxlan id 151 local 172.31.201.1 dstport 4789 nolearning address 0e:6c:ac:1f:c9:01 mtu 1500
fdb      0e:6c:ac:1f:ca:02 dst 172.31.202.2 dev linkdns.vx
neigh    10.77.16.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
neigh    192.168.2.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
add      10.77.16.0/20 via 10.77.16.0 dev linkdns.vx onlink (h2, vxlan to 172.31.202.2)
add      192.168.2.0/24 via 192.168.2.0 dev linkdns.vx onlink (h2, vxlan to 172.31.202.2)
add      192.168.3.0/24 via 172.31.201.3 (h3)
write    ipv4 filter LINKDNS-FORWARD: 6 rule(s)
           -A LINKDNS-FORWARD -s 10.77.16.0/20 -d 192.168.1.0/24 -i linkdns.vx -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 10.77.16.0/20 -i docker0 -o linkdns.vx -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i linkdns.vx -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.2.0/24 -i docker0 -o linkdns.vx -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 3 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 10.77.16.0/20 -j ACCEPT
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.2.0/24 -j ACCEPT
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.3.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 5 rule(s)
           -A LINKDNS-PREROUTING -s 172.31.202.2/32 -d 172.31.201.1/32 -p udp -m udp --dport 4789 -j ACCEPT
           -A LINKDNS-PREROUTING -d 172.31.201.1/32 -p udp -m udp --dport 4789 -j DROP
           -A LINKDNS-PREROUTING -s 10.77.16.0/20 -d 192.168.1.0/24 -i linkdns.vx -j ACCEPT
           -A LINKDNS-PREROUTING -s 192.168.2.0/24 -d 192.168.1.0/24 -i linkdns.vx -j ACCEPT
           -A LINKDNS-PREROUTING -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
write    ipv4 mangle LINKDNS-MSS: 1 rule(s)
           -A LINKDNS-MSS -o linkdns.vx -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 1410
jump     ipv4 mangle FORWARD -> LINKDNS-MSS at 1 (now at [])
"
    );
    // Applied: the tunnel and its entries are there; nothing more to do.
    let mut host = applied(host, &first);
    host.tunnel = TunnelState {
        links: vec![vxlan::VxlanLink {
            index: 9,
            name: vxlan::DEVICE.into(),
            vni: vxlan::VNI,
            local: Some("172.31.201.1".parse().expect("ip")),
            port: vxlan::PORT,
            learning: false,
            mac: Some(vxlan::mac_of("172.31.201.1".parse().expect("ip"))),
            mtu: 1500,
            up: true,
        }],
        foreign_device: false,
        neighbours: first
            .tunnel
            .iter()
            .filter_map(|c| match c {
                TunnelChange::SetNeighbour { ip, mac } => Some((*ip, *mac)),
                _ => None,
            })
            .collect(),
        fdb: first
            .tunnel
            .iter()
            .filter_map(|c| match c {
                TunnelChange::SetFdb { mac, remote } => Some((*mac, IpAddr::V4(*remote))),
                _ => None,
            })
            .collect(),
    };
    for r in &mut host.routes {
        if r.gateway.is_some_and(|g| g.to_string().ends_with(".0")) {
            r.device = Some(vxlan::DEVICE.into());
        }
    }
    let again = plan(&desired, &host, P);
    assert!(again.is_empty(), "{again}");
    // A device made otherwise (learning on) is made again, and its routes with it.
    let mut learning = host.clone();
    learning.tunnel.links[0].learning = true;
    assert_eq!(
        plan(&desired, &learning, P).to_string(),
        "\
keep     192.168.3.0/24 via 172.31.201.3 (h3)
delete   linkdns.vx: made with other settings
create   linkdns.vx vxlan id 151 local 172.31.201.1 dstport 4789 nolearning address 0e:6c:ac:1f:c9:01 mtu 1500
fdb      0e:6c:ac:1f:ca:02 dst 172.31.202.2 dev linkdns.vx
neigh    10.77.16.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
neigh    192.168.2.0 lladdr 0e:6c:ac:1f:ca:02 dev linkdns.vx
add      10.77.16.0/20 via 10.77.16.0 dev linkdns.vx onlink (h2, vxlan to 172.31.202.2)
add      192.168.2.0/24 via 192.168.2.0 dev linkdns.vx onlink (h2, vxlan to 172.31.202.2)
"
    );

    // encapsulation always: h3 goes through the tunnel too; never: h2 is refused.
    let always = Desired {
        encapsulation: Encapsulation::Always,
        ..desired.clone()
    };
    assert_eq!(
        plan(&always, &host, P).to_string(),
        "\
keep     10.77.16.0/20 via 10.77.16.0 dev linkdns.vx onlink (h2, vxlan to 172.31.202.2)
keep     192.168.2.0/24 via 192.168.2.0 dev linkdns.vx onlink (h2, vxlan to 172.31.202.2)
fdb      0e:6c:ac:1f:c9:03 dst 172.31.201.3 dev linkdns.vx
neigh    192.168.3.0 lladdr 0e:6c:ac:1f:c9:03 dev linkdns.vx
replace  192.168.3.0/24 via 172.31.201.3 dev eth0 proto 151  ->  192.168.3.0/24 via 192.168.3.0 dev linkdns.vx onlink (h3, vxlan to 172.31.201.3)
write    ipv4 filter LINKDNS-FORWARD: 6 rule(s)
           -A LINKDNS-FORWARD -s 10.77.16.0/20 -d 192.168.1.0/24 -i linkdns.vx -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 10.77.16.0/20 -i docker0 -o linkdns.vx -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i linkdns.vx -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.2.0/24 -i docker0 -o linkdns.vx -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i linkdns.vx -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o linkdns.vx -j ACCEPT
write    ipv4 raw LINKDNS-PREROUTING: 6 rule(s)
           -A LINKDNS-PREROUTING -s 172.31.201.3/32 -d 172.31.201.1/32 -p udp -m udp --dport 4789 -j ACCEPT
           -A LINKDNS-PREROUTING -s 172.31.202.2/32 -d 172.31.201.1/32 -p udp -m udp --dport 4789 -j ACCEPT
           -A LINKDNS-PREROUTING -d 172.31.201.1/32 -p udp -m udp --dport 4789 -j DROP
           -A LINKDNS-PREROUTING -s 10.77.16.0/20 -d 192.168.1.0/24 -i linkdns.vx -j ACCEPT
           -A LINKDNS-PREROUTING -s 192.168.2.0/24 -d 192.168.1.0/24 -i linkdns.vx -j ACCEPT
           -A LINKDNS-PREROUTING -s 192.168.3.0/24 -d 192.168.1.0/24 -i linkdns.vx -j ACCEPT
"
    );
    let never = Desired {
        encapsulation: Encapsulation::Never,
        ..desired.clone()
    };
    assert_eq!(
        plan(&never, &host, P).to_string(),
        "\
keep     192.168.3.0/24 via 172.31.201.3 (h3)
delete   linkdns.vx: no host is reached through it
write    ipv4 filter LINKDNS-FORWARD: 2 rule(s)
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o eth0 -j ACCEPT
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.3.0/24 -j ACCEPT
write    ipv4 raw LINKDNS-PREROUTING: 1 rule(s)
           -A LINKDNS-PREROUTING -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
delete   ipv4 mangle LINKDNS-MSS and its jump
refuse   not routing 10.77.16.0/20 of node h2: the gateway 172.31.202.2 is not on a directly connected network of this host (and encapsulation is never)
refuse   not routing 192.168.2.0/24 of node h2: the gateway 172.31.202.2 is not on a directly connected network of this host (and encapsulation is never)
"
    );
}

#[test]
fn with_a_router_that_learns_the_subnets_a_host_behind_it_is_reached_through_it() {
    let (host, desired) = h1_behind_a_router();
    let routed = Desired {
        encapsulation: Encapsulation::Never,
        via_router: true,
        ..desired
    };
    assert_eq!(
        plan(&routed, &host, P).to_string(),
        "\
add      10.77.16.0/20 via 172.31.201.254 (h2, through the router)
add      192.168.2.0/24 via 172.31.201.254 (h2, through the router)
add      192.168.3.0/24 via 172.31.201.3 (h3)
write    ipv4 filter LINKDNS-FORWARD: 6 rule(s)
           -A LINKDNS-FORWARD -s 10.77.16.0/20 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 10.77.16.0/20 -i docker0 -o eth0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.2.0/24 -i docker0 -o eth0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 3 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 10.77.16.0/20 -j ACCEPT
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.2.0/24 -j ACCEPT
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.3.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 3 rule(s)
           -A LINKDNS-PREROUTING -s 10.77.16.0/20 -d 192.168.1.0/24 -i eth0 -j ACCEPT
           -A LINKDNS-PREROUTING -s 192.168.2.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
           -A LINKDNS-PREROUTING -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
"
    );
}

#[test]
fn a_vxlan_device_of_someone_else_on_the_port_refuses_the_tunnel_and_is_left_alone() {
    let (mut host, desired) = h1_behind_a_router();
    host.tunnel.links.push(vxlan::VxlanLink {
        index: 4,
        name: "flannel.151".into(),
        vni: vxlan::VNI,
        local: None,
        port: vxlan::PORT,
        learning: true,
        mac: None,
        mtu: 1450,
        up: true,
    });
    assert_eq!(
        plan(&desired, &host, P).to_string(),
        "\
add      192.168.3.0/24 via 172.31.201.3 (h3)
write    ipv4 filter LINKDNS-FORWARD: 2 rule(s)
           -A LINKDNS-FORWARD -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 192.168.3.0/24 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 192.168.3.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 1 rule(s)
           -A LINKDNS-PREROUTING -s 192.168.3.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
refuse   not routing 10.77.16.0/20 of node h2: no VXLAN tunnel to its host: the VXLAN device flannel.151 already uses VNI 151 on UDP port 4789
refuse   not routing 192.168.2.0/24 of node h2: no VXLAN tunnel to its host: the VXLAN device flannel.151 already uses VNI 151 on UDP port 4789
"
    );
}

#[test]
fn machines_of_a_reach_from_network_are_let_in_on_the_uplink_only() {
    let (host, mut desired) = h1_behind_a_router();
    desired.peers.clear();
    desired.reach_from = vec![net("172.31.202.0/24")];
    assert_eq!(
        plan(&desired, &host, P).to_string(),
        "\
write    ipv4 filter LINKDNS-FORWARD: 2 rule(s)
           -A LINKDNS-FORWARD -s 172.31.202.0/24 -d 192.168.1.0/24 -i eth0 -o docker0 -j ACCEPT
           -A LINKDNS-FORWARD -s 192.168.1.0/24 -d 172.31.202.0/24 -i docker0 -o eth0 -j ACCEPT
jump     ipv4 filter FORWARD -> LINKDNS-FORWARD at 1 (now at [])
write    ipv4 nat LINKDNS-POSTROUTING: 1 rule(s)
           -A LINKDNS-POSTROUTING -s 192.168.1.0/24 -d 172.31.202.0/24 -j ACCEPT
jump     ipv4 nat POSTROUTING -> LINKDNS-POSTROUTING at 1 (now at [])
write    ipv4 raw LINKDNS-PREROUTING: 1 rule(s)
           -A LINKDNS-PREROUTING -s 172.31.202.0/24 -d 192.168.1.0/24 -i eth0 -j ACCEPT
jump     ipv4 raw PREROUTING -> LINKDNS-PREROUTING at 1 (now at [])
"
    );
}
