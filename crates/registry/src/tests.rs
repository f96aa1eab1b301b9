use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::lookup::Vantage;
use crate::*;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn node(id: NodeId, name: &str) -> Command {
    Command::UpsertNode(NodeInfo {
        id,
        name: name.to_string(),
        peer_addr: format!("127.0.0.{id}:7380"),
    })
}

fn container(id: &str, name: &str, node: NodeId, ips: &[&str]) -> Container {
    Container::new(id, name, node).with_ips(ips.iter().map(|s| ip(s)))
}

/// The layout of a container in snapshots and commands before version 4 / 3.
#[derive(serde::Serialize)]
struct OldContainer {
    id: ContainerId,
    name: String,
    node: NodeId,
    ips: Vec<IpAddr>,
    aliases: BTreeSet<String>,
    links: BTreeSet<LinkAlias>,
    ports: BTreeSet<Port>,
}

fn old(c: &Container) -> OldContainer {
    OldContainer {
        id: c.id.clone(),
        name: c.name.clone(),
        node: c.node,
        ips: c.ips().collect(),
        aliases: c.aliases.clone(),
        links: c.links.clone(),
        ports: c.ports.clone(),
    }
}

fn with_alias(mut c: Container, alias: &str) -> Container {
    c.aliases.insert(alias.to_string());
    c
}

fn with_link(mut c: Container, target: &str, alias: &str) -> Container {
    c.links.insert(LinkAlias {
        target: target.to_string(),
        alias: alias.to_string(),
    });
    c
}

fn two_nodes() -> Registry {
    let mut r = Registry::new();
    r.apply(&node(1, "h1")).expect("node 1");
    r.apply(&node(2, "h2")).expect("node 2");
    r
}

fn found(ips: &[&str]) -> Resolution {
    Resolution::Found(ips.iter().map(|s| ip(s)).collect())
}

#[test]
fn names_resolve_across_nodes_and_per_node() {
    let mut r = two_nodes();
    let web1 = container("a1", "/Web", 1, &["192.168.1.2"]);
    let web2 = container("b2", "web", 2, &["192.168.2.2"]);
    r.apply(&Command::UpsertContainer(web1)).expect("web1");
    r.apply(&Command::UpsertContainer(web2)).expect("web2");

    assert_eq!(
        r.resolve("web", None, None),
        found(&["192.168.1.2", "192.168.2.2"])
    );
    assert_eq!(r.resolve("web.h2", None, None), found(&["192.168.2.2"]));
    assert_eq!(r.resolve("web.h3", None, None), Resolution::NotFound);
    assert_eq!(r.resolve("nope.h1", None, None), Resolution::NotFound);
    assert_eq!(r.resolve("h1", None, None), Resolution::Found(vec![]));
    assert_eq!(r.resolve("", None, None), Resolution::Found(vec![]));
    assert_eq!(r.resolve("nope", None, None), Resolution::NotFound);
}

#[test]
fn aliases_collect_every_carrier() {
    let mut r = two_nodes();
    let a = with_alias(container("a1", "api-1", 1, &["192.168.1.2"]), "API");
    let b = with_alias(container("b2", "api-2", 2, &["192.168.2.7"]), "api");
    r.apply(&Command::UpsertContainer(a)).expect("a");
    r.apply(&Command::UpsertContainer(b)).expect("b");
    assert_eq!(
        r.resolve("api", None, None),
        found(&["192.168.1.2", "192.168.2.7"])
    );
    assert_eq!(r.resolve("api.h2", None, None), found(&["192.168.2.7"]));
}

#[test]
fn link_alias_is_scoped_to_the_asking_container() {
    let mut r = two_nodes();
    let mysql = container("m1", "mysql", 1, &["192.168.1.5"]);
    let wp = with_link(
        container("w2", "wordpress", 2, &["192.168.2.9"]),
        "mysql",
        "db",
    );
    let other = container("o2", "other", 2, &["192.168.2.10"]);
    for c in [mysql, wp, other] {
        r.apply(&Command::UpsertContainer(c)).expect("container");
    }
    let from_wp = Some(ip("192.168.2.9"));
    assert_eq!(r.resolve("db", from_wp, Some(2)), found(&["192.168.1.5"]));
    assert_eq!(
        r.resolve_bare("db", from_wp, Some(2)),
        Some(vec![ip("192.168.1.5")])
    );
    assert_eq!(
        r.resolve("db", Some(ip("192.168.2.10")), Some(2)),
        Resolution::NotFound
    );
    assert_eq!(r.resolve_bare("db", None, Some(2)), None);
    assert!(r.is_link_alias("db"));

    // The link follows mysql's new address.
    let moved = container("m1", "mysql", 1, &["192.168.1.77"]);
    r.apply(&Command::UpsertContainer(moved)).expect("moved");
    assert_eq!(r.resolve("db", from_wp, Some(2)), found(&["192.168.1.77"]));

    // With mysql gone the link no longer answers.
    r.apply(&Command::RemoveContainer {
        node: 1,
        id: ContainerId::new("m1"),
        version: 0,
    })
    .expect("remove");
    assert_eq!(r.resolve("db", from_wp, Some(2)), Resolution::NotFound);
}

#[test]
fn same_source_ip_on_two_hosts_prefers_the_local_one() {
    let mut r = two_nodes();
    let a = with_link(container("a1", "a", 1, &["172.17.0.2"]), "x", "peer");
    let b = with_link(container("b2", "b", 2, &["172.17.0.2"]), "y", "peer");
    let x = container("x1", "x", 1, &["172.17.0.3"]);
    let y = container("y2", "y", 2, &["172.17.0.4"]);
    for c in [a, b, x, y] {
        r.apply(&Command::UpsertContainer(c)).expect("container");
    }
    let src = Some(ip("172.17.0.2"));
    assert_eq!(r.resolve("peer", src, Some(1)), found(&["172.17.0.3"]));
    assert_eq!(r.resolve("peer", src, Some(2)), found(&["172.17.0.4"]));
    assert_eq!(r.reverse(ip("172.17.0.2"), Some(2)).as_deref(), Some("b"));
}

#[test]
fn replace_reconciles_one_node_only() {
    let mut r = two_nodes();
    r.apply(&Command::UpsertContainer(container(
        "a1",
        "a",
        1,
        &["10.0.1.2"],
    )))
    .expect("a");
    r.apply(&Command::UpsertContainer(container(
        "b1",
        "b",
        1,
        &["10.0.1.3"],
    )))
    .expect("b");
    r.apply(&Command::UpsertContainer(container(
        "c2",
        "c",
        2,
        &["10.0.2.2"],
    )))
    .expect("c");
    let outcome = r
        .apply(&Command::ReplaceContainers {
            node: 1,
            containers: vec![
                container("b1", "b", 1, &["10.0.1.3"]),
                container("d1", "d", 1, &["10.0.1.4"]),
            ],
            version: 0,
        })
        .expect("replace");
    assert_eq!(outcome, Outcome::Changed);
    let names: Vec<&str> = r.containers().map(|c| &*c.name).collect();
    assert_eq!(names, ["b", "c", "d"]);
    assert_eq!(r.resolve("a", None, None), Resolution::NotFound);
    assert_eq!(r.reverse(ip("10.0.1.2"), None).as_deref(), None);

    // The same set again changes nothing.
    let again = r
        .apply(&Command::ReplaceContainers {
            node: 1,
            containers: vec![
                container("d1", "d", 1, &["10.0.1.4"]),
                container("b1", "b", 1, &["10.0.1.3"]),
            ],
            version: 0,
        })
        .expect("replace again");
    assert_eq!(again, Outcome::Unchanged);

    // What the proposer checks before a periodic resync: the same set, at another version and
    // in another order, is held already; anything else is not.
    let mut later = container("d1", "D", 1, &["10.0.1.4"]);
    later.version = 99;
    assert!(r.holds_exactly(1, &[later.clone(), container("b1", "b", 1, &["10.0.1.3"])]));
    assert!(
        !r.holds_exactly(1, std::slice::from_ref(&later)),
        "one missing"
    );
    assert!(!r.holds_exactly(1, &[later, container("b1", "b", 1, &["10.0.1.9"])]));
    assert!(r.holds_exactly(3, &[]), "no containers, none listed");
}

#[test]
fn rejected_commands_change_nothing() {
    let mut r = two_nodes();
    r.apply(&Command::UpsertContainer(container(
        "a1",
        "a",
        1,
        &["10.0.1.2"],
    )))
    .expect("a");
    let before = r.snapshot();

    let stolen = container("a1", "a", 2, &["10.0.2.2"]);
    assert_eq!(
        r.apply(&Command::UpsertContainer(stolen.clone())),
        Err(Error::ContainerOwnedElsewhere {
            id: ContainerId::new("a1"),
            owner: 1,
            claimed: 2
        })
    );
    assert!(r
        .apply(&Command::ReplaceContainers {
            node: 2,
            containers: vec![stolen],
            version: 0,
        })
        .is_err());
    assert_eq!(
        r.apply(&Command::UpsertContainer(container("z", "z", 9, &[]))),
        Err(Error::UnknownNode(9))
    );
    assert_eq!(
        r.apply(&Command::UpsertContainer(container("e", "/", 1, &[]))),
        Err(Error::EmptyName {
            id: ContainerId::new("e")
        })
    );
    assert_eq!(
        r.apply(&node(3, "H1")),
        Err(Error::NodeNameTaken {
            name: "h1".into(),
            owner: 1
        })
    );
    assert_eq!(r.snapshot(), before);
}

#[test]
fn batch_applies_members_in_order_and_reports_rejects() {
    let mut r = Registry::new();
    let batch = Command::Batch(vec![
        node(1, "h1"),
        Command::UpsertContainer(container("a1", "a", 1, &["10.0.1.2"])),
        Command::UpsertContainer(container("z9", "z", 9, &["10.0.9.2"])),
    ]);
    let err = r.apply(&batch).expect_err("one member is rejected");
    assert!(matches!(err, Error::PartlyRejected { count: 1, .. }));
    assert_eq!(r.resolve("a", None, None), found(&["10.0.1.2"]));
    assert_eq!(r.resolve("z", None, None), Resolution::NotFound);
    assert_eq!(batch.weight(), 3);
}

#[test]
fn renaming_a_node_moves_its_name() {
    let mut r = two_nodes();
    r.apply(&node(1, "alpha")).expect("rename");
    assert!(r.node_by_name("h1").is_none());
    assert_eq!(r.node_by_name("ALPHA").map(|n| n.id), Some(1));
    r.apply(&node(3, "h1")).expect("the old name is free again");
}

#[test]
fn snapshot_round_trips_and_rebuilds_indexes() {
    let mut r = two_nodes();
    let mut c = with_link(
        with_alias(container("a1", "a", 1, &["10.0.1.2", "fd00::2"]), "x"),
        "b",
        "bee",
    );
    c.ports.insert(Port {
        port: 80,
        protocol: Protocol::Tcp,
    });
    r.apply(&Command::UpsertContainer(c)).expect("a");
    r.apply(&Command::UpsertContainer(container(
        "b2",
        "b",
        2,
        &["10.0.2.2"],
    )))
    .expect("b");
    let bytes = r.snapshot();
    let restored = Registry::restore(&bytes).expect("restore");
    assert_eq!(restored.snapshot(), bytes);
    assert_eq!(
        restored.resolve("x", None, None),
        found(&["10.0.1.2", "fd00::2"])
    );
    assert_eq!(
        restored.resolve("bee", Some(ip("10.0.1.2")), Some(1)),
        found(&["10.0.2.2"])
    );
    assert_eq!(restored.reverse(ip("fd00::2"), None).as_deref(), Some("a"));
    assert_eq!(Registry::restore(&[]).map(|r| r.record_count()), Ok(0));
}

#[test]
fn bad_encodings_are_refused_with_a_reason() {
    assert!(matches!(
        Registry::restore(b"nope"),
        Err(Error::Decode {
            what: "snapshot",
            ..
        })
    ));
    assert!(matches!(
        Registry::restore(b"LDNS\x09rest"),
        Err(Error::UnsupportedVersion { found: 9, .. })
    ));
    assert!(matches!(
        Registry::restore(b"LDNS\x01\xff\xff\xff"),
        Err(Error::Decode { .. })
    ));
    assert!(matches!(Command::decode(&[]), Err(Error::Decode { .. })));
    assert!(matches!(
        Command::decode(&[7, 0]),
        Err(Error::UnsupportedVersion { found: 7, .. })
    ));
    let cmd = Command::RemoveContainer {
        node: 4,
        id: ContainerId::new("abc"),
        version: 0,
    };
    assert_eq!(Command::decode(&cmd.encode()), Ok(cmd));
}

#[test]
fn reverse_names_parse_strictly() {
    assert_eq!(
        reverse_name_to_ip("5.1.168.192.in-addr.arpa"),
        Some(ip("192.168.1.5"))
    );
    assert_eq!(reverse_name_to_ip("1.168.192.in-addr.arpa"), None);
    assert_eq!(reverse_name_to_ip("05.1.168.192.in-addr.arpa"), None);
    assert_eq!(reverse_name_to_ip("256.1.168.192.in-addr.arpa"), None);
    let v6 = "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa";
    assert_eq!(reverse_name_to_ip(v6), Some(ip("fd00::2")));
    assert_eq!(reverse_name_to_ip("example.com"), None);
}

#[test]
fn subnets_parse_and_contain() {
    let s: Subnet = "192.168.1.77/24".parse().expect("subnet");
    assert_eq!(s.to_string(), "192.168.1.0/24");
    assert!(s.contains(ip("192.168.1.200")));
    assert!(!s.contains(ip("192.168.2.1")));
    assert!(!s.contains(ip("::1")));
    let all: Subnet = "0.0.0.0/0".parse().expect("default");
    assert!(all.contains(ip("8.8.8.8")));
    let host: Subnet = "fd00::1".parse().expect("host");
    assert_eq!(host.prefix(), 128);
    assert!("10.0.0.0/33".parse::<Subnet>().is_err());
    assert!("nonsense/8".parse::<Subnet>().is_err());
}

#[test]
fn normalizing_is_idempotent() {
    for raw in [
        "/\x0c\0\x01",
        " /Web. ",
        "a.b..",
        "\t\0x",
        "//x//",
        "..",
        "/ \t/",
    ] {
        let once = normalize_name(raw);
        assert_eq!(normalize_name(&once), once, "{raw:?}");
    }
    assert_eq!(normalize_name(" /Web. "), "web");
}

#[test]
fn a_down_node_is_hidden_not_deleted() {
    let mut r = two_nodes();
    let db = container("a1", "db", 1, &["10.0.1.2"]);
    let web1 = with_link(container("a2", "web", 1, &["10.0.1.3"]), "db", "mysql");
    let web2 = container("b1", "web", 2, &["10.0.2.2"]);
    for c in [db, web1, web2] {
        r.apply(&Command::UpsertContainer(c)).expect("container");
    }
    let down = Command::SetNodeDown {
        node: 1,
        down: true,
    };
    assert_eq!(r.apply(&down), Ok(Outcome::Changed));
    assert_eq!(r.apply(&down), Ok(Outcome::Unchanged));
    assert!(r.is_down(1));
    assert_eq!(r.resolve("web", None, None), found(&["10.0.2.2"]));
    assert_eq!(r.resolve("db", None, None), Resolution::NotFound);
    assert_eq!(r.resolve("web.h1", None, None), Resolution::NotFound);
    assert_eq!(r.reverse(ip("10.0.1.2"), None).as_deref(), None);
    // Hidden, not deleted: the records are all still there, and survive a snapshot.
    assert_eq!(r.record_count(), 3);
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert!(restored.is_down(1));
    assert_eq!(restored.resolve("db", None, None), Resolution::NotFound);

    r.apply(&Command::SetNodeDown {
        node: 1,
        down: false,
    })
    .expect("up");
    assert_eq!(r.resolve("db", None, None), found(&["10.0.1.2"]));
    assert_eq!(
        r.resolve("mysql", Some(ip("10.0.1.3")), Some(1)),
        found(&["10.0.1.2"])
    );
    assert_eq!(
        r.apply(&Command::SetNodeDown {
            node: 9,
            down: true
        }),
        Err(Error::UnknownNode(9))
    );
}

#[test]
fn removing_a_node_drops_its_records_and_never_reuses_its_id() {
    let mut r = two_nodes();
    assert_eq!(r.next_node_id(), 3);
    r.apply(&node(3, "h3")).expect("node 3");
    r.apply(&Command::UpsertContainer(container(
        "c1",
        "web",
        3,
        &["10.0.3.2"],
    )))
    .expect("web");
    r.apply(&Command::UpsertContainer(container(
        "a1",
        "web",
        1,
        &["10.0.1.2"],
    )))
    .expect("web");
    assert_eq!(
        r.apply(&Command::RemoveNode { node: 3 }),
        Ok(Outcome::Changed)
    );
    assert_eq!(
        r.apply(&Command::RemoveNode { node: 3 }),
        Ok(Outcome::Unchanged)
    );
    assert_eq!(r.resolve("web", None, None), found(&["10.0.1.2"]));
    assert!(r.node_by_name("h3").is_none());
    assert_eq!(r.record_count(), 1);
    r.apply(&Command::SetNodeCert {
        node: 1,
        fingerprint: [7; 32],
    })
    .expect("cert");
    assert_eq!(
        r.apply(&Command::SetNodeCert {
            node: 1,
            fingerprint: [7; 32]
        }),
        Ok(Outcome::Unchanged)
    );
    assert_eq!(
        r.apply(&Command::SetNodeCert {
            node: 1,
            fingerprint: [8; 32]
        }),
        Ok(Outcome::Changed),
        "a renewal binds the new certificate"
    );
    assert_eq!(
        Registry::restore(&r.snapshot())
            .expect("restore")
            .node_cert(1),
        Some(&[8; 32])
    );
    // The name is free again, the id is not.
    assert_eq!(r.next_node_id(), 4);
    assert!(r.was_removed(3));
    assert!(!r.was_removed(1) && !r.was_removed(9));
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(restored.next_node_id(), 4);
    r.apply(&node(4, "h3"))
        .expect("the name can be taken again");
}

#[test]
fn version_1_snapshots_still_restore() {
    // Written by linkdns before clusters: nodes and containers only.
    #[derive(serde::Serialize)]
    struct V1<'a> {
        nodes: Vec<NodeInfo>,
        containers: Vec<&'a OldContainer>,
    }
    let c = old(&container("a1", "web", 1, &["10.0.1.2"]));
    let body = V1 {
        nodes: vec![NodeInfo {
            id: 1,
            name: "h1".into(),
            peer_addr: "127.0.0.1:7380".into(),
        }],
        containers: vec![&c],
    };
    let mut bytes = b"LDNS\x01".to_vec();
    bytes.extend(postcard::to_allocvec(&body).expect("encode"));
    let r = Registry::restore(&bytes).expect("v1 restores");
    assert_eq!(r.resolve("web", None, None), found(&["10.0.1.2"]));
    assert_eq!(r.next_node_id(), 2);
    assert!(!r.is_down(1));
}

#[test]
fn a_record_encodes_exactly_as_its_container() {
    let mut c = with_link(
        with_alias(container("a1", "web", 1, &["10.0.1.2", "fd00::2"]), "www"),
        "db",
        "mysql",
    );
    c.ports.insert(Port {
        port: 443,
        protocol: Protocol::Tcp,
    });
    for c in [c.normalized(), container("b2", "plain", 2, &[])] {
        let record = Record::from(c.clone());
        assert_eq!(
            postcard::to_allocvec(&record).expect("record"),
            postcard::to_allocvec(&c).expect("container")
        );
        assert_eq!(record.to_container(), c);
    }
}

fn net(s: &str) -> Subnet {
    s.parse().expect("subnet")
}

fn claim(node: NodeId, subnets: &[&str]) -> Command {
    Command::SetNodeSubnets {
        node,
        subnets: subnets.iter().map(|s| net(s)).collect(),
    }
}

#[test]
fn subnet_claims_never_overlap_and_name_the_owner() {
    let mut r = two_nodes();
    assert_eq!(
        r.apply(&claim(1, &["192.168.1.0/24"])),
        Ok(Outcome::Changed)
    );
    assert_eq!(
        r.apply(&claim(1, &["192.168.1.7/24"])),
        Ok(Outcome::Unchanged),
        "host bits are cleared, so this is the same claim"
    );
    // Equal, narrower and wider subnets of another node's are all refused, whole.
    for overlapping in ["192.168.1.0/24", "192.168.1.128/25", "192.168.0.0/16"] {
        let err = r
            .apply(&claim(2, &["10.9.0.0/24", overlapping]))
            .expect_err("overlap refused");
        assert_eq!(
            err.to_string(),
            format!("subnet {} overlaps 192.168.1.0/24 of node h1 (id 1); give this host's Docker network a subnet of its own", net(overlapping))
        );
        assert!(
            r.node_subnets(2).is_empty(),
            "nothing of a refused claim applies"
        );
    }
    assert_eq!(
        r.apply(&claim(2, &["192.168.2.0/24"])),
        Ok(Outcome::Changed)
    );
    assert_eq!(r.subnet_owner(ip("192.168.2.9")), Some(2));
    assert_eq!(r.subnet_owner(ip("192.168.3.9")), None);
    assert!(matches!(
        r.apply(&claim(2, &["0.0.0.0/0"])),
        Err(Error::BadSubnet { .. })
    ));
    assert!(matches!(
        r.apply(&claim(2, &["10.0.0.0/16", "10.0.1.0/24"])),
        Err(Error::BadSubnet { .. })
    ));
    assert_eq!(
        r.apply(&claim(3, &["10.0.0.0/8"])),
        Err(Error::UnknownNode(3))
    );
    // A node may move to another subnet, and its old one is free again.
    assert_eq!(
        r.apply(&claim(1, &["192.168.11.0/24"])),
        Ok(Outcome::Changed)
    );
    assert_eq!(
        r.apply(&claim(2, &["192.168.1.0/24"])),
        Ok(Outcome::Changed)
    );
    // Snapshots keep the claims; removing a node frees its subnet.
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(restored.node_subnets(2), &[net("192.168.1.0/24")]);
    assert_eq!(restored.node_subnets(1), &[net("192.168.11.0/24")]);
    r.apply(&Command::RemoveNode { node: 2 }).expect("remove");
    assert!(r.node_subnets(2).is_empty());
    assert_eq!(
        r.apply(&claim(1, &["192.168.0.0/16"])),
        Ok(Outcome::Changed)
    );
    assert_eq!(r.apply(&claim(1, &[])), Ok(Outcome::Changed));
    assert_eq!(r.subnets().count(), 0);
}

#[test]
fn subnets_overlap_only_when_they_share_addresses() {
    assert!(net("10.0.0.0/8").overlaps(&net("10.1.2.0/24")));
    assert!(net("10.1.2.0/24").overlaps(&net("10.0.0.0/8")));
    assert!(!net("10.1.2.0/24").overlaps(&net("10.1.3.0/24")));
    assert!(!net("10.0.0.0/8").overlaps(&net("::/0")));
    assert!(net("fd00::/64").overlaps(&net("fd00::/8")));
    assert!(net("10.0.0.0/8").covers(&net("10.1.2.0/24")));
    assert!(!net("10.1.2.0/24").covers(&net("10.0.0.0/8")));
}

#[test]
fn version_2_snapshots_still_restore() {
    #[derive(serde::Serialize)]
    struct V2<'a> {
        nodes: Vec<NodeInfo>,
        containers: Vec<&'a OldContainer>,
        down: Vec<NodeId>,
        max_node_id: NodeId,
        certs: Vec<(NodeId, [u8; 32])>,
    }
    let c = old(&container("a1", "web", 1, &["10.0.1.2"]));
    let body = V2 {
        nodes: vec![NodeInfo {
            id: 1,
            name: "h1".into(),
            peer_addr: "127.0.0.1:7380".into(),
        }],
        containers: vec![&c],
        down: vec![1],
        max_node_id: 5,
        certs: vec![(1, [7; 32])],
    };
    let mut bytes = b"LDNS\x02".to_vec();
    bytes.extend(postcard::to_allocvec(&body).expect("encode"));
    let r = Registry::restore(&bytes).expect("v2 restores");
    assert!(r.is_down(1));
    assert_eq!(r.next_node_id(), 6);
    assert_eq!(r.node_cert(1), Some(&[7; 32]));
    assert_eq!(r.subnets().count(), 0);
}

#[test]
fn free_subnets_come_from_the_pool_in_order_and_skip_what_is_taken() {
    let mut r = two_nodes();
    let pool = net("10.77.0.0/16");
    assert_eq!(r.free_subnet(1, pool, 24, &[]), Some(net("10.77.0.0/24")));
    r.apply(&claim(1, &["10.77.0.0/24"])).expect("claim");
    // A node keeps the block it has; the next node gets the next free one, past what the host
    // itself uses.
    assert_eq!(r.free_subnet(1, pool, 24, &[]), Some(net("10.77.0.0/24")));
    assert_eq!(
        r.free_subnet(2, pool, 24, &[net("10.77.1.5/32")]),
        Some(net("10.77.2.0/24"))
    );
    // A claim outside the pool, or of another size, is not kept.
    r.apply(&claim(2, &["192.168.2.0/24"])).expect("claim");
    assert_eq!(r.free_subnet(2, pool, 24, &[]), Some(net("10.77.1.0/24")));
    assert_eq!(r.free_subnet(2, pool, 16, &[]), None, "the pool is taken");
    assert_eq!(r.free_subnet(2, pool, 8, &[]), None, "wider than the pool");
    let tiny = net("10.9.9.0/30");
    r.apply(&claim(1, &["10.9.9.0/31"])).expect("claim");
    assert_eq!(r.free_subnet(2, tiny, 31, &[]), Some(net("10.9.9.2/31")));
    assert_eq!(
        r.free_subnet(2, tiny, 31, &[net("10.9.9.3/32")]),
        None,
        "full"
    );
    assert_eq!(
        r.free_subnet(2, net("fd00:77::/48"), 64, &[]),
        Some(net("fd00:77::/64"))
    );
}

#[test]
fn a_decoded_subnet_that_is_not_a_network_is_refused() {
    let mut r = two_nodes();
    // Subnet's fields are private; postcard writes them in order: the address, then the prefix.
    for (addr, prefix) in [("10.1.2.3", 24u8), ("10.1.2.0", 40)] {
        let bytes = postcard::to_allocvec(&(ip(addr), prefix)).expect("encode");
        let subnet: Subnet = postcard::from_bytes(&bytes).expect("decodes as is");
        assert!(matches!(
            r.apply(&Command::SetNodeSubnets {
                node: 1,
                subnets: vec![subnet],
            }),
            Err(Error::BadSubnet { .. })
        ));
    }
    assert!(r.node_subnets(1).is_empty());
}

#[test]
fn only_commands_older_nodes_cannot_apply_carry_the_new_version() {
    assert_eq!(node(1, "h1").encode()[0], 1);
    let c = claim(1, &["10.0.0.0/24"]);
    assert_eq!(c.encode()[0], 2);
    assert_eq!(
        Command::Batch(vec![node(1, "h1"), c.clone()]).encode()[0],
        2
    );
    assert_eq!(Command::decode(&c.encode()), Ok(c));
    let mut future = node(1, "h1").encode();
    future[0] = COMMAND_VERSION + 1;
    assert!(Command::decode(&future)
        .expect_err("newer")
        .to_string()
        .contains("upgrade linkdns"));
}

fn versioned(id: &str, node: NodeId, ip_: &str, version: Version) -> Command {
    let mut c = container(id, id, node, &[ip_]);
    c.version = version;
    Command::UpsertContainer(c)
}

fn removal(id: &str, node: NodeId, version: Version) -> Command {
    Command::RemoveContainer {
        node,
        id: ContainerId::new(id),
        version,
    }
}

#[test]
fn delayed_observations_never_bring_back_a_removed_container() {
    let mut r = two_nodes();
    // Seen running at 5, gone at 6; the proposal carrying 5 commits again late.
    assert_eq!(
        r.apply(&versioned("x", 1, "10.0.1.2", 5)),
        Ok(Outcome::Changed)
    );
    assert_eq!(r.apply(&removal("x", 1, 6)), Ok(Outcome::Changed));
    assert_eq!(
        r.apply(&versioned("x", 1, "10.0.1.2", 5)),
        Ok(Outcome::Stale)
    );
    assert_eq!(r.resolve("x", None, None), Resolution::NotFound);
    assert_eq!(
        r.tombstone(&ContainerId::new("x")),
        Some(Tombstone {
            node: 1,
            version: 6
        })
    );
    // A removal that overtakes the start it follows: the start, arriving later, is older.
    assert_eq!(r.apply(&removal("y", 1, 8)), Ok(Outcome::Unchanged));
    assert_eq!(
        r.apply(&versioned("y", 1, "10.0.1.3", 7)),
        Ok(Outcome::Stale)
    );
    assert_eq!(r.resolve("y", None, None), Resolution::NotFound);
    // Started again later: a newer observation goes through the tombstone.
    assert_eq!(
        r.apply(&versioned("x", 1, "10.0.1.9", 9)),
        Ok(Outcome::Changed)
    );
    assert_eq!(r.resolve("x", None, None), found(&["10.0.1.9"]));
    assert_eq!(r.tombstone(&ContainerId::new("x")), None);
    // An old removal and an old address do not undo a newer record.
    assert_eq!(r.apply(&removal("x", 1, 7)), Ok(Outcome::Stale));
    assert_eq!(
        r.apply(&versioned("x", 1, "10.0.1.2", 8)),
        Ok(Outcome::Stale)
    );
    assert_eq!(r.resolve("x", None, None), found(&["10.0.1.9"]));
    // A resync listed before the newer observation keeps it, and removes only what it saw
    // gone.
    let old_resync = Command::ReplaceContainers {
        node: 1,
        containers: vec![],
        version: 8,
    };
    assert_eq!(r.apply(&old_resync), Ok(Outcome::Stale));
    assert_eq!(r.resolve("x", None, None), found(&["10.0.1.9"]));
    let resync = Command::ReplaceContainers {
        node: 1,
        containers: vec![],
        version: 10,
    };
    assert_eq!(r.apply(&resync), Ok(Outcome::Changed));
    assert_eq!(r.resolve("x", None, None), Resolution::NotFound);
    // A resync's containers are seen at its version, whatever they say: an unversioned one in
    // it does not slip past the tombstone.
    let sneaky = Command::ReplaceContainers {
        node: 1,
        containers: vec![container("x", "x", 1, &["10.0.1.66"])],
        version: 9,
    };
    assert_eq!(r.apply(&sneaky), Ok(Outcome::Stale));
    assert_eq!(r.resolve("x", None, None), Resolution::NotFound);
    // Unversioned commands (from logs written before versions) apply in log order.
    r.apply(&versioned("x", 1, "10.0.1.2", 0)).expect("legacy");
    assert_eq!(r.resolve("x", None, None), found(&["10.0.1.2"]));
    // Tombstones survive a snapshot.
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(restored.snapshot(), r.snapshot());
    assert_eq!(
        restored.tombstone(&ContainerId::new("y")),
        Some(Tombstone {
            node: 1,
            version: 8
        })
    );
}

#[test]
fn tombstones_are_bounded_per_node_and_raise_its_floor() {
    let mut r = two_nodes();
    let extra = 10u64;
    for i in 0..(MAX_TOMBSTONES_PER_NODE as u64 + extra) {
        r.apply(&removal(&format!("gone-{i}"), 1, 100 + i))
            .expect("removal");
    }
    r.apply(&removal("other", 2, 3)).expect("node 2");
    assert_eq!(r.tombstone_count(), MAX_TOMBSTONES_PER_NODE + 1);
    // The 10 oldest were forgotten; what they guarded against is refused by age instead.
    assert_eq!(r.floor(1), 100 + extra);
    assert_eq!(r.floor(2), 0);
    assert_eq!(r.tombstone(&ContainerId::new("gone-0")), None);
    assert_eq!(
        r.apply(&versioned("gone-0", 1, "10.0.1.2", 100)),
        Ok(Outcome::Stale)
    );
    assert_eq!(
        r.apply(&versioned("fresh", 1, "10.0.1.3", 100 + extra)),
        Ok(Outcome::Changed)
    );
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(restored.floor(1), 100 + extra);
    assert_eq!(restored.tombstone_count(), r.tombstone_count());
    // A removed node's tombstones and floor go with it.
    r.apply(&Command::RemoveNode { node: 1 }).expect("remove");
    assert_eq!(r.tombstone_count(), 1);
    assert_eq!(r.floor(1), 0);
}

#[test]
fn a_foreign_container_in_a_resync_is_refused_alone() {
    let mut r = two_nodes();
    r.apply(&Command::UpsertContainer(container(
        "shared",
        "x",
        2,
        &["10.0.2.2"],
    )))
    .expect("node 2's");
    let err = r
        .apply(&Command::ReplaceContainers {
            node: 1,
            containers: vec![
                container("shared", "x", 1, &["10.0.1.2"]),
                container("mine", "web", 1, &["10.0.1.3"]),
            ],
            version: 4,
        })
        .expect_err("the foreign id is refused");
    assert!(
        matches!(&err, Error::PartlyRejected { count: 1, first } if matches!(**first, Error::ContainerOwnedElsewhere { owner: 2, claimed: 1, .. })),
        "{err}"
    );
    assert_eq!(r.resolve("web", None, None), found(&["10.0.1.3"]));
    assert_eq!(r.resolve("x", None, None), found(&["10.0.2.2"]));
}

#[test]
fn dotted_names_read_node_qualified_first() {
    let mut r = two_nodes();
    // A container named like a node-qualified name, and the container that name qualifies.
    r.apply(&Command::UpsertContainer(container(
        "d1",
        "web.h2",
        1,
        &["10.0.1.2"],
    )))
    .expect("dotted");
    r.apply(&Command::UpsertContainer(container(
        "w2",
        "web",
        2,
        &["10.0.2.2"],
    )))
    .expect("web");
    r.apply(&Command::UpsertContainer(container(
        "v1",
        "web.v2",
        1,
        &["10.0.1.3"],
    )))
    .expect("web.v2");
    assert_eq!(r.resolve("web.h2", None, None), found(&["10.0.2.2"]));
    assert_eq!(r.resolve("web.h2.h1", None, None), found(&["10.0.1.2"]));
    assert_eq!(r.resolve("web.v2", None, None), found(&["10.0.1.3"]));
    assert_eq!(r.resolve("web.v2.h1", None, None), found(&["10.0.1.3"]));
    // Each PTR name reads back as its container.
    assert_eq!(
        r.reverse(ip("10.0.1.2"), None).as_deref(),
        Some("web.h2.h1")
    );
    assert_eq!(r.reverse(ip("10.0.1.3"), None).as_deref(), Some("web.v2"));
}

fn compose(id: &str, node: NodeId, ip_: &str, project: &str, service: &str) -> Container {
    let mut c = container(id, &format!("{project}_{service}_1"), node, &[ip_]);
    c.aliases.insert(service.to_string());
    c.compose = Some(ComposeService {
        project: project.into(),
        service: service.into(),
    });
    c
}

#[test]
fn compose_services_answer_as_service_dot_project_on_every_host() {
    let mut r = two_nodes();
    for c in [
        compose("db", 1, "10.0.1.2", "shop", "db"),
        compose("web", 2, "10.0.2.2", "Shop", "web"),
        compose("db2", 2, "10.0.2.3", "blog", "db"),
        compose("h1db", 2, "10.0.2.4", "h1", "db"),
    ] {
        r.apply(&Command::UpsertContainer(c)).expect("compose");
    }
    assert_eq!(r.resolve("db.shop", None, None), found(&["10.0.1.2"]));
    assert_eq!(r.resolve("web.shop", None, None), found(&["10.0.2.2"]));
    assert_eq!(r.resolve("db.blog", None, None), found(&["10.0.2.3"]));
    assert_eq!(r.resolve("web.blog", None, None), Resolution::NotFound);
    // The service name alone is an alias of every project's.
    assert_eq!(
        r.resolve("db", None, None),
        found(&["10.0.1.2", "10.0.2.3", "10.0.2.4"])
    );
    // A project named like a node: the node wins (`db` on h1, not project h1's `db`), and the
    // registry says which projects lose.
    assert_eq!(r.resolve("db.h1", None, None), found(&["10.0.1.2"]));
    assert_eq!(r.projects_shadowed_by_nodes(), ["h1"]);
    // The parent of `<service>.<project>` exists (NODATA, not NXDOMAIN); a dotted container
    // named like a service is found under its node, which its PTR says.
    assert_eq!(r.resolve("shop", None, None), Resolution::Found(vec![]));
    assert_eq!(r.resolve("nope-project", None, None), Resolution::NotFound);
    r.apply(&Command::UpsertContainer(container(
        "dotted",
        "db.blog",
        1,
        &["10.0.1.77"],
    )))
    .expect("dotted");
    assert_eq!(r.resolve("db.blog", None, None), found(&["10.0.2.3"]));
    assert_eq!(r.resolve("db.blog.h1", None, None), found(&["10.0.1.77"]));
    assert_eq!(
        r.reverse(ip("10.0.1.77"), None).as_deref(),
        Some("db.blog.h1")
    );
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(
        restored.resolve("db.shop", None, None),
        found(&["10.0.1.2"])
    );
    r.apply(&removal("db", 1, 0)).expect("remove");
    assert_eq!(r.resolve("db.shop", None, None), Resolution::NotFound);
}

fn tcp(port: u16) -> Port {
    Port {
        port,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn srv_answers_ports_named_services_and_link_aliases() {
    let mut r = two_nodes();
    let mut web1 = container("w1", "web", 1, &["10.0.1.2"]);
    web1.ports.insert(tcp(80));
    web1.services.insert(NamedPort {
        name: "HTTP".into(),
        port: tcp(8080),
    });
    let mut web2 = container("w2", "web", 2, &["10.0.2.2"]);
    web2.ports.insert(tcp(80));
    let mut db = container("m2", "mysql", 2, &["10.0.2.5"]);
    db.ports.insert(tcp(3306));
    let app = with_link(container("a1", "app", 1, &["10.0.1.9"]), "mysql", "db");
    for c in [web1, web2, db, app] {
        r.apply(&Command::UpsertContainer(c)).expect("container");
    }
    let all = Scope {
        links: &[],
        reach: Reach::All,
    };
    let targets = |rel: &str, scope: &Scope<'_>| -> Option<Vec<(String, u16)>> {
        r.srv_in(rel, scope)
            .map(|t| t.into_iter().map(|t| (t.target, t.port)).collect())
    };
    let pair = |t: &str, p: u16| (t.to_string(), p);
    assert_eq!(
        targets("_80._tcp.web", &all),
        Some(vec![pair("web.h1", 80), pair("web.h2", 80)])
    );
    assert_eq!(
        targets("_http._tcp.web", &all),
        Some(vec![pair("web.h1", 8080)])
    );
    assert_eq!(targets("_81._tcp.web", &all), None, "nobody exposes 81");
    assert_eq!(targets("_80._udp.web", &all), None);
    assert_eq!(targets("_80._tcp.nope", &all), None);
    assert_eq!(
        targets("web", &all),
        Some(vec![
            pair("web.h1", 80),
            pair("web.h1", 8080),
            pair("web.h2", 80)
        ]),
        "plain SRV: every port"
    );
    assert_eq!(
        targets("_80._tcp.web.h2", &all),
        Some(vec![pair("web.h2", 80)])
    );
    assert_eq!(targets("app", &all), Some(vec![]), "a name without ports");
    // `_tcp.web`, the parent of `_80._tcp.web`, exists without records; `_udp.web` does not.
    assert_eq!(r.resolve("_tcp.web", None, None), Resolution::Found(vec![]));
    assert_eq!(r.resolve("_udp.web", None, None), Resolution::NotFound);
    // A link alias, from the linking container only.
    let app_rec = r.container(&ContainerId::new("a1")).expect("app");
    let from_app = Scope {
        links: app_rec.links(),
        reach: Reach::All,
    };
    assert_eq!(
        targets("_3306._tcp.db", &from_app),
        Some(vec![pair("mysql.h2", 3306)])
    );
    assert_eq!(targets("_3306._tcp.db", &all), None);
    let glue = r.srv_in("_3306._tcp.db", &from_app).expect("srv");
    assert_eq!(glue[0].addrs.ips, [ip("10.0.2.5")]);
}

fn attached(id: &str, node: NodeId, addrs: &[(&str, &str, &str)]) -> Container {
    let mut c = Container::new(id, id, node);
    c.addrs = addrs
        .iter()
        .map(|(a, network, subnet)| Address {
            ip: ip(a),
            network: Some(Network {
                id: network.to_string(),
                name: network.to_string(),
                subnet: net(subnet),
            }),
        })
        .collect();
    c
}

#[test]
fn answers_hold_only_addresses_that_reach_the_asker() {
    let mut r = two_nodes();
    r.apply(&claim(1, &["192.168.1.0/24"])).expect("claim 1");
    r.apply(&claim(2, &["192.168.2.0/24", "172.18.0.0/16"]))
        .expect("claim 2");
    for c in [
        attached("a", 1, &[("192.168.1.2", "bridge1", "192.168.1.0/24")]),
        attached("b", 1, &[("172.19.0.2", "app1", "172.19.0.0/16")]),
        attached(
            "dual",
            1,
            &[
                ("192.168.1.3", "bridge1", "192.168.1.0/24"),
                ("172.19.0.3", "app1", "172.19.0.0/16"),
            ],
        ),
        attached("c", 2, &[("192.168.2.2", "bridge2", "192.168.2.0/24")]),
        attached("d", 2, &[("172.18.0.5", "routed2", "172.18.0.0/16")]),
        attached("e", 2, &[("172.19.0.2", "app2", "172.19.0.0/16")]),
    ] {
        r.apply(&Command::UpsertContainer(c)).expect("container");
    }
    // Host 1 has a network of its own where node 2 routes 172.18.0.0/16.
    let mut host1 = LocalView::default();
    host1.apply(LocalChange::Networks(vec![LocalNetwork {
        id: "shadow".into(),
        name: "shadow".into(),
        subnets: vec![net("172.18.0.0/16")],
        gateways: vec![ip("172.18.0.1")],
    }]));
    let bridge_only = ["bridge1".to_string()];
    let ask = |name: &str, vantage: Vantage<'_>| {
        r.resolve_in(
            name,
            &Scope {
                links: &[],
                reach: Reach::From {
                    node: 1,
                    vantage,
                    host: &host1,
                },
            },
        )
    };
    // The host itself reaches every address of its own containers.
    assert_eq!(ask("b", Vantage::Host), found(&["172.19.0.2"]));
    assert_eq!(
        ask("dual", Vantage::Host),
        found(&["172.19.0.3", "192.168.1.3"])
    );
    // A container of the host only those on its networks (Docker isolates the others).
    let on_bridge = Vantage::Container(&bridge_only);
    assert_eq!(ask("a", on_bridge), found(&["192.168.1.2"]));
    assert_eq!(ask("b", on_bridge), Resolution::Found(vec![]));
    assert_eq!(ask("dual", on_bridge), found(&["192.168.1.3"]));
    // Askers elsewhere only routed ones.
    assert_eq!(ask("dual", Vantage::Elsewhere), found(&["192.168.1.3"]));
    assert_eq!(ask("b", Vantage::Elsewhere), Resolution::Found(vec![]));
    // Another node's: routed, and not where this host's own network sits.
    assert_eq!(ask("c", on_bridge), found(&["192.168.2.2"]));
    assert_eq!(ask("e", Vantage::Host), Resolution::Found(vec![]));
    assert_eq!(ask("d", Vantage::Host), Resolution::Found(vec![]));
    assert_eq!(ask("d", Vantage::Elsewhere), found(&["172.18.0.5"]));
    // PTR of an address two hosts use: the one that reaches the asker.
    let reach = |vantage| Reach::From {
        node: 1,
        vantage,
        host: &host1,
    };
    assert_eq!(
        r.reverse_in(ip("172.19.0.2"), reach(Vantage::Host))
            .as_deref(),
        Some("b")
    );
    assert_eq!(r.reverse_in(ip("172.19.0.2"), reach(on_bridge)), None);
    // The asker's own host first.
    r.apply(&Command::UpsertContainer(attached(
        "web2",
        2,
        &[("192.168.2.9", "bridge2", "192.168.2.0/24")],
    )))
    .expect("web2");
    let mut web1 = attached("web1", 1, &[("192.168.1.9", "bridge1", "192.168.1.0/24")]);
    web1.aliases.insert("web".into());
    let mut web2 = attached("web2", 2, &[("192.168.2.9", "bridge2", "192.168.2.0/24")]);
    web2.aliases.insert("web".into());
    r.apply(&Command::UpsertContainer(web1)).expect("web1");
    r.apply(&Command::UpsertContainer(web2)).expect("web2");
    let records = r.lookup("web", &[]).expect("web");
    let from2 = r.addresses(
        &records,
        Reach::From {
            node: 2,
            vantage: Vantage::Host,
            host: &LocalView::default(),
        },
    );
    assert_eq!(from2.ips, [ip("192.168.2.9"), ip("192.168.1.9")]);
    assert_eq!(from2.local, 1);
    assert_eq!(r.addresses(&records, reach(Vantage::Elsewhere)).local, 0);
}

#[test]
fn another_nodes_address_is_answered_on_this_host_only_with_a_path_to_it() {
    let mut r = two_nodes();
    r.apply(&claim(1, &["192.168.1.0/24"])).expect("claim 1");
    r.apply(&claim(2, &["192.168.2.0/24", "192.168.3.0/24"]))
        .expect("claim 2");
    for c in [
        attached("near", 2, &[("192.168.2.2", "bridge2", "192.168.2.0/24")]),
        attached("far", 2, &[("192.168.3.2", "other2", "192.168.3.0/24")]),
    ] {
        r.apply(&Command::UpsertContainer(c)).expect("container");
    }
    let mut host1 = LocalView::default();
    let ask = |host: &LocalView, name: &str, vantage: Vantage<'_>| {
        r.resolve_in(
            name,
            &Scope {
                links: &[],
                reach: Reach::From {
                    node: 1,
                    vantage,
                    host,
                },
            },
        )
    };
    let bridge = ["bridge1".to_string()];
    // Routes not managed here: every claimed subnet counts.
    assert_eq!(ask(&host1, "far", Vantage::Host), found(&["192.168.3.2"]));
    // A route to 192.168.2.0/24 only (192.168.3.0/24's refused): far is NODATA on this host,
    // for the host and its containers; an asker elsewhere is not this host's to judge.
    assert!(host1.set_paths(Some(vec![net("192.168.2.0/24")])));
    assert!(
        !host1.set_paths(Some(vec![net("192.168.2.0/24")])),
        "unchanged"
    );
    assert_eq!(ask(&host1, "near", Vantage::Host), found(&["192.168.2.2"]));
    assert_eq!(ask(&host1, "far", Vantage::Host), Resolution::Found(vec![]));
    assert_eq!(
        ask(&host1, "far", Vantage::Container(&bridge)),
        Resolution::Found(vec![])
    );
    assert_eq!(
        ask(&host1, "far", Vantage::Elsewhere),
        found(&["192.168.3.2"])
    );
    // No path at all (no route yet): nothing of node 2's.
    host1.set_paths(Some(Vec::new()));
    assert_eq!(
        ask(&host1, "near", Vantage::Host),
        Resolution::Found(vec![])
    );
    // The path comes: answered again.
    host1.set_paths(Some(vec![net("192.168.2.0/24"), net("192.168.3.0/24")]));
    assert_eq!(ask(&host1, "far", Vantage::Host), found(&["192.168.3.2"]));
}

#[test]
fn records_share_their_networks_and_encode_as_their_container() {
    let mut r = two_nodes();
    let mut a = attached("a", 1, &[("192.168.1.2", "bridge1", "192.168.1.0/24")]);
    a.services.insert(NamedPort {
        name: "_Web".into(),
        port: tcp(80),
    });
    a.compose = Some(ComposeService {
        project: "shop".into(),
        service: "web".into(),
    });
    let a = a.normalized();
    assert_eq!(
        a.services.iter().next().map(|s| s.name.as_str()),
        Some("web")
    );
    let b = attached("b", 1, &[("192.168.1.3", "bridge1", "192.168.1.0/24")]);
    r.apply(&Command::UpsertContainer(a.clone())).expect("a");
    r.apply(&Command::UpsertContainer(b)).expect("b");
    let net_of = |id: &str| {
        r.container(&ContainerId::new(id))
            .expect("record")
            .addrs()
            .next()
            .and_then(|a| a.network.clone())
            .expect("network")
    };
    assert!(std::sync::Arc::ptr_eq(&net_of("a"), &net_of("b")));
    let record = r.container(&ContainerId::new("a")).expect("a");
    assert_eq!(record.to_container(), a);
    assert_eq!(
        postcard::to_allocvec(record).expect("record"),
        postcard::to_allocvec(&a).expect("container")
    );
    assert_eq!(
        Command::decode(&Command::UpsertContainer(a.clone()).encode()),
        Ok(Command::UpsertContainer(a))
    );
}

#[test]
fn commands_and_snapshots_of_older_versions_still_read() {
    // A container upsert as linkdns wrote it before networks and versions (encoding 1).
    #[derive(serde::Serialize)]
    enum OldCommand {
        #[allow(dead_code)]
        UpsertNode(NodeInfo),
        #[allow(dead_code)]
        ReplaceContainers,
        UpsertContainer(OldContainer),
    }
    let c = container("a1", "web", 1, &["10.0.1.2"]);
    let mut bytes = vec![1u8];
    bytes.extend(postcard::to_allocvec(&OldCommand::UpsertContainer(old(&c))).expect("encode"));
    assert_eq!(
        Command::decode(&bytes),
        Ok(Command::UpsertContainer(c.clone()))
    );
    // Version 3 snapshots (before networks and versions).
    #[derive(serde::Serialize)]
    struct V3<'a> {
        nodes: Vec<NodeInfo>,
        containers: Vec<&'a OldContainer>,
        down: Vec<NodeId>,
        max_node_id: NodeId,
        certs: Vec<(NodeId, [u8; 32])>,
        subnets: Vec<(NodeId, Vec<Subnet>)>,
    }
    let oc = old(&c);
    let body = V3 {
        nodes: vec![NodeInfo {
            id: 1,
            name: "h1".into(),
            peer_addr: "127.0.0.1:7380".into(),
        }],
        containers: vec![&oc],
        down: vec![],
        max_node_id: 1,
        certs: vec![],
        subnets: vec![(1, vec![net("10.0.1.0/24")])],
    };
    let mut bytes = b"LDNS\x03".to_vec();
    bytes.extend(postcard::to_allocvec(&body).expect("encode"));
    let r = Registry::restore(&bytes).expect("v3 restores");
    assert_eq!(r.resolve("web", None, None), found(&["10.0.1.2"]));
    assert_eq!(r.node_subnets(1), &[net("10.0.1.0/24")]);
    // Commands without a container keep the encodings older nodes read.
    assert_eq!(removal("a1", 1, 3).encode()[0], 3);
    assert_eq!(
        Command::decode(&removal("a1", 1, 3).encode()),
        Ok(removal("a1", 1, 3))
    );
}

#[test]
fn each_node_changes_only_its_own_records_and_voters_the_rest() {
    let mut r = two_nodes();
    let member = Authority::own(2);
    let leader = Authority {
        node: 1,
        voter: true,
    };
    let refused = |result: Result<Outcome, Error>| {
        assert!(
            matches!(result, Err(Error::NotAuthorized { proposer: 2, .. })),
            "{result:?}"
        )
    };
    let theirs = container("a1", "a", 1, &["10.0.1.2"]);
    refused(r.apply_by(member, &Command::UpsertContainer(theirs.clone())));
    refused(r.apply_by(
        member,
        &Command::RemoveContainer {
            node: 1,
            id: ContainerId::new("a1"),
            version: 0,
        },
    ));
    refused(r.apply_by(
        member,
        &Command::ReplaceContainers {
            node: 1,
            containers: vec![],
            version: 0,
        },
    ));
    refused(r.apply_by(
        member,
        &Command::UpsertNode(NodeInfo {
            id: 1,
            name: "h1".into(),
            peer_addr: "192.0.2.66:7380".into(),
        }),
    ));
    refused(r.apply_by(member, &claim(1, &["10.9.0.0/24"])));
    for maintenance in [
        Command::SetNodeDown {
            node: 1,
            down: true,
        },
        Command::RemoveNode { node: 1 },
        Command::RetireNode { node: 1 },
        Command::SetNodeCert {
            node: 3,
            fingerprint: [7; 32],
        },
        Command::SetClaimLimit(ClaimLimit { v4: 8, v6: 32 }),
        Command::SetJoinSecret { hash: [1; 32] },
    ] {
        refused(r.apply_by(member, &maintenance));
    }
    // A batch: its own parts apply, the others are refused.
    let mine = container("b1", "b", 2, &["10.0.2.2"]);
    let result = r.apply_by(
        member,
        &Command::Batch(vec![
            Command::UpsertContainer(theirs),
            Command::UpsertContainer(mine),
        ]),
    );
    assert!(matches!(
        result,
        Err(Error::PartlyRejected { count: 1, .. })
    ));
    assert_eq!(r.resolve("b", None, None), found(&["10.0.2.2"]));
    assert_eq!(r.resolve("a", None, None), Resolution::NotFound);
    assert_eq!(
        r.node(1).map(|n| n.peer_addr.as_str()),
        Some("127.0.0.1:7380")
    );
    assert!(!r.is_down(1) && !r.is_retiring(1));
    assert_eq!(r.claim_limit(), ClaimLimit::default());

    // The leader's maintenance is taken; a voter's container claims are still its own only.
    assert_eq!(
        r.apply_by(leader, &Command::RetireNode { node: 2 }),
        Ok(Outcome::Changed)
    );
    assert!(r.is_retiring(2));
    refused(r.apply_by(
        Authority {
            node: 2,
            voter: true,
        },
        &claim(1, &["10.9.0.0/24"]),
    ));
}

#[test]
fn claims_wider_than_the_limit_or_holding_a_host_are_refused() {
    let mut r = two_nodes();
    // Node 2's host is 127.0.0.2: no claim may hold it, not even node 2's own.
    for (node, subnet) in [(1, "127.0.0.0/24"), (2, "127.0.0.0/30")] {
        let result = r.apply(&claim(node, &[subnet]));
        assert!(
            matches!(result, Err(Error::ClaimCoversHost { node: 1 | 2, .. })),
            "{result:?}"
        );
    }
    let wide = r.apply(&claim(1, &["10.0.0.0/8"]));
    assert_eq!(
        wide.map_err(|e| e.to_string()),
        Err("subnet 10.0.0.0/8 is wider than the cluster allows (/16 at most); claim a narrower subnet, or raise the limit (--max-claim-prefix on the voters)".to_string())
    );
    assert!(matches!(
        r.apply(&claim(1, &["fd00::/40"])),
        Err(Error::ClaimTooWide { limit: 48, .. })
    ));
    assert_eq!(
        r.apply(&claim(1, &["10.1.0.0/16", "fd00::/48"])),
        Ok(Outcome::Changed)
    );
    // A tighter limit refuses new claims; the claims held stay, also through a snapshot.
    assert_eq!(
        r.apply(&Command::SetClaimLimit(ClaimLimit { v4: 20, v6: 56 })),
        Ok(Outcome::Changed)
    );
    assert!(matches!(
        r.apply(&claim(2, &["10.2.0.0/16"])),
        Err(Error::ClaimTooWide { limit: 20, .. })
    ));
    assert_eq!(
        r.apply(&claim(1, &["10.1.0.0/16", "fd00::/48"])),
        Ok(Outcome::Unchanged)
    );
    assert!(matches!(
        r.apply(&Command::SetClaimLimit(ClaimLimit { v4: 33, v6: 56 })),
        Err(Error::BadClaimLimit { .. })
    ));
    r.apply(&Command::SetJoinSecret { hash: [9; 32] })
        .expect("secret");
    r.apply(&Command::RetireNode { node: 2 }).expect("retire");
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(restored.snapshot(), r.snapshot());
    assert_eq!(restored.claim_limit(), ClaimLimit { v4: 20, v6: 56 });
    assert_eq!(restored.node_subnets(1).len(), 2);
    assert_eq!(restored.join_hash(), Some(&[9; 32]));
    assert!(restored.is_retiring(2));
    // Commands of this version decode; those of version 3 still do.
    for c in [
        Command::RetireNode { node: 2 },
        Command::SetClaimLimit(ClaimLimit { v4: 20, v6: 56 }),
        Command::SetJoinSecret { hash: [9; 32] },
    ] {
        assert_eq!(c.encode()[0], 4);
        assert_eq!(Command::decode(&c.encode()), Ok(c));
    }
    let three = Command::UpsertContainer(container("a1", "a", 1, &["10.1.0.2"]));
    assert_eq!(three.encode()[0], 3);
}

#[test]
fn deeply_nested_batches_are_refused_not_recursed_into() {
    // Batch is variant 4; each level is [4, 1] (one command follows).
    let mut bytes = vec![COMMAND_VERSION];
    for _ in 0..200_000 {
        bytes.extend_from_slice(&[4, 1]);
    }
    bytes.extend_from_slice(&[6, 1]); // RemoveNode { node: 1 }
                                      // Refused (postcard keeps no message of its own), and the stack holds.
    assert!(Command::decode(&bytes).is_err());
    // The same in the older layout.
    bytes[0] = 2;
    assert!(Command::decode(&bytes).is_err());
    // Two levels, as the proposer batches the watcher's batches, decode.
    let two = Command::Batch(vec![Command::Batch(vec![Command::RemoveNode { node: 1 }])]);
    assert_eq!(Command::decode(&two.encode()), Ok(two));
}

#[test]
fn each_node_registers_its_own_software_version() {
    let mut r = two_nodes();
    let version = |node: u64, v: &str| Command::SetNodeVersion {
        node,
        version: v.to_string(),
    };
    let own = Authority {
        node: 2,
        voter: false,
    };
    assert_eq!(
        r.apply_by(own, &version(2, "0.1.0 (abc)")),
        Ok(Outcome::Changed)
    );
    assert_eq!(
        r.apply_by(own, &version(2, "0.1.0 (abc)")),
        Ok(Outcome::Unchanged)
    );
    assert!(matches!(
        r.apply_by(own, &version(1, "9.9.9")),
        Err(Error::NotAuthorized { .. })
    ));
    assert!(matches!(
        r.apply(&version(1, &"x".repeat(65))),
        Err(Error::SoftwareVersionTooLong(65))
    ));
    assert!(matches!(
        r.apply(&version(7, "1")),
        Err(Error::UnknownNode(7))
    ));
    assert_eq!(r.software_version(2), Some("0.1.0 (abc)"));
    assert_eq!(r.software_version(1), None);
    let c = version(2, "0.1.0 (abc)");
    assert_eq!(c.encode()[0], 5);
    assert_eq!(Command::decode(&c.encode()), Ok(c));
    let restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(restored.software_version(2), Some("0.1.0 (abc)"));
    r.apply(&Command::RemoveNode { node: 2 }).expect("remove");
    assert_eq!(r.software_version(2), None);
}

/// A version 5 snapshot (before nodes' software versions) still restores: it is version 6's
/// layout without the last field.
#[test]
fn a_version_5_snapshot_restores() {
    let r = two_nodes();
    let v6 = r.snapshot();
    assert_eq!(v6[4], 6);
    assert_eq!(v6.last(), Some(&0), "an empty list of versions ends it");
    let mut v5 = v6[..v6.len() - 1].to_vec();
    v5[4] = 5;
    let restored = Registry::restore(&v5).expect("a v5 snapshot restores");
    assert_eq!(restored.snapshot(), v6);
}

#[test]
fn container_ids_keep_their_text_in_order_display_and_encoding() {
    let docker = "0123456789abcdef".repeat(4);
    let upper = docker.to_uppercase();
    let ids = [
        ContainerId::new("m1"),
        ContainerId::new(&docker),
        ContainerId::new(&upper),
        ContainerId::new("ffff"),
        ContainerId::new(format!("{docker}0")),
    ];
    // Ordered as their texts are, whether held as bytes (Docker's form) or as text.
    let mut by_id = ids.to_vec();
    by_id.sort();
    let mut texts: Vec<String> = ids.iter().map(String::from).collect();
    texts.sort();
    assert_eq!(by_id.iter().map(String::from).collect::<Vec<_>>(), texts);
    assert_eq!(String::from(&ids[1]), docker);
    assert_eq!(String::from(&ids[2]), upper);
    assert_eq!(ids[1].to_string(), "0123456789ab");
    assert_ne!(ids[1], ids[2]);
    assert_eq!(ids[1], ContainerId::new(docker.clone()));
    // Encoded as the text, so logs and snapshots read the same as before.
    for id in &ids {
        let bytes = postcard::to_allocvec(id).expect("encode");
        assert_eq!(
            bytes,
            postcard::to_allocvec(&String::from(id)).expect("encode")
        );
        let back: ContainerId = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(&back, id);
    }
}

#[test]
fn records_keep_every_address_in_order_with_one_or_many_or_none() {
    let mut r = two_nodes();
    let cases = [
        container("one", "one", 1, &["10.0.1.2"]),
        container("many", "many", 1, &["10.0.1.3", "fd00::3", "10.0.2.3"]),
        container("six", "six", 1, &["fd00::4"]),
        container("none", "none", 1, &[]),
        container("unspecified", "odd", 1, &["::", "fd00::9"]),
    ];
    for c in &cases {
        let c = &c.clone().normalized();
        r.apply(&Command::UpsertContainer(c.clone()))
            .expect("upsert");
        let record = r.container(&c.id).expect("record");
        assert_eq!(&record.to_container(), c, "{}", c.name);
        let ips: Vec<IpAddr> = record.ips().collect();
        let want: Vec<IpAddr> = c.ips().collect();
        assert_eq!(ips, want, "{}", c.name);
    }
    // An IPv4 address and its IPv6-mapped form are one address in records.
    let mapped = container("mapped", "mapped", 1, &["::ffff:10.0.1.7"]);
    r.apply(&Command::UpsertContainer(mapped.clone()))
        .expect("upsert");
    let record = r.container(&mapped.id).expect("record");
    assert_eq!(record.ips().collect::<Vec<_>>(), [ip("10.0.1.7")]);
}

#[test]
fn an_index_key_moves_between_one_and_many_containers() {
    let mut index = IdIndex::<String>::default();
    let [a, b, c] = ["a", "b", "c"].map(ContainerId::new);
    let key = "web".to_string();
    index.insert(key.clone(), &b);
    index.insert(key.clone(), &b);
    assert_eq!(index.get("web"), std::slice::from_ref(&b));
    index.insert(key.clone(), &c);
    index.insert(key.clone(), &a);
    assert_eq!(index.get("web"), [a.clone(), b.clone(), c.clone()]);
    index.remove("web", &b);
    assert_eq!(index.get("web"), [a.clone(), c.clone()]);
    index.remove("web", &ContainerId::new("absent"));
    index.remove("web", &a);
    assert_eq!(index.get("web"), std::slice::from_ref(&c));
    assert!(index.contains_key("web"));
    index.remove("web", &a);
    index.remove("web", &c);
    assert!(index.get("web").is_empty());
    assert!(!index.contains_key("web"));
    assert!(index.one.is_empty() && index.many.is_empty());
}

#[test]
fn a_node_holds_at_most_the_record_quota_and_others_are_unaffected() {
    let mut r = two_nodes();
    // RECORD_QUOTA (100,000) as 1,000, for time's sake; the rule is the same.
    const RECORD_QUOTA: usize = 1_000;
    r.set_record_quota(RECORD_QUOTA);
    let record = |node: NodeId, i: usize| {
        container(
            &format!("n{node}-{i}"),
            &format!("c{node}-{i}"),
            node,
            &[&format!("10.{node}.{}.{}", i / 250, i % 250 + 1)],
        )
    };
    for i in 0..RECORD_QUOTA {
        r.apply(&Command::UpsertContainer(record(1, i)))
            .expect("within the quota");
    }
    // One more new record: refused, and said why.
    match r.apply(&Command::UpsertContainer(record(1, RECORD_QUOTA))) {
        Err(Error::RecordQuota { node: 1, quota, .. }) => assert_eq!(quota, RECORD_QUOTA),
        other => panic!("{other:?}"),
    }
    // A record it holds may change; another node's are its own business.
    let mut changed = record(1, 7);
    changed.aliases.insert("seven".into());
    r.apply(&Command::UpsertContainer(changed))
        .expect("an update");
    r.apply(&Command::UpsertContainer(record(2, 0)))
        .expect("node 2");
    // A listing that replaces the node's records holds the quota at most, the rest refused.
    let listing: Vec<Container> = (0..RECORD_QUOTA + 5).map(|i| record(1, i)).collect();
    match r.apply(&Command::ReplaceContainers {
        node: 1,
        containers: listing,
        version: 0,
    }) {
        Err(Error::PartlyRejected { count: 5, first }) => {
            assert!(matches!(*first, Error::RecordQuota { .. }), "{first}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.containers_of(1).count(), RECORD_QUOTA);
    // A replica restored from the snapshot holds the same; a removal makes room again.
    let mut restored = Registry::restore(&r.snapshot()).expect("restore");
    assert_eq!(restored.snapshot(), r.snapshot());
    restored.set_record_quota(RECORD_QUOTA);
    assert!(matches!(
        restored.apply(&Command::UpsertContainer(record(1, RECORD_QUOTA + 9))),
        Err(Error::RecordQuota { .. })
    ));
    r.apply(&Command::RemoveContainer {
        node: 1,
        id: ContainerId::new("n1-0"),
        version: 0,
    })
    .expect("remove");
    r.apply(&Command::UpsertContainer(record(1, RECORD_QUOTA + 9)))
        .expect("room again");
}
