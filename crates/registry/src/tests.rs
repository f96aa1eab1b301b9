use std::collections::BTreeSet;
use std::net::IpAddr;

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
    Container {
        id: ContainerId::new(id),
        name: name.to_string(),
        node,
        ips: ips.iter().map(|s| ip(s)).collect(),
        aliases: BTreeSet::new(),
        links: BTreeSet::new(),
        ports: BTreeSet::new(),
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
        id: ContainerId("m1".into()),
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
    assert_eq!(r.reverse(ip("172.17.0.2"), Some(2)), Some("b"));
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
        })
        .expect("replace");
    assert_eq!(outcome, Outcome::Changed);
    let names: Vec<&str> = r.containers().map(|c| &*c.name).collect();
    assert_eq!(names, ["b", "c", "d"]);
    assert_eq!(r.resolve("a", None, None), Resolution::NotFound);
    assert_eq!(r.reverse(ip("10.0.1.2"), None), None);

    // The same set again changes nothing.
    let again = r
        .apply(&Command::ReplaceContainers {
            node: 1,
            containers: vec![
                container("d1", "d", 1, &["10.0.1.4"]),
                container("b1", "b", 1, &["10.0.1.3"]),
            ],
        })
        .expect("replace again");
    assert_eq!(again, Outcome::Unchanged);
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
            id: ContainerId("a1".into()),
            owner: 1,
            claimed: 2
        })
    );
    assert!(r
        .apply(&Command::ReplaceContainers {
            node: 2,
            containers: vec![stolen]
        })
        .is_err());
    assert_eq!(
        r.apply(&Command::UpsertContainer(container("z", "z", 9, &[]))),
        Err(Error::UnknownNode(9))
    );
    assert_eq!(
        r.apply(&Command::UpsertContainer(container("e", "/", 1, &[]))),
        Err(Error::EmptyName {
            id: ContainerId("e".into())
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
    assert!(matches!(err, Error::BatchPartlyRejected { count: 1, .. }));
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
    assert_eq!(restored.reverse(ip("fd00::2"), None), Some("a"));
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
        id: ContainerId("abc".into()),
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
    assert_eq!(r.reverse(ip("10.0.1.2"), None), None);
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
            fingerprint: [8; 32]
        }),
        Ok(Outcome::Unchanged),
        "a node's certificate is bound once"
    );
    assert_eq!(
        Registry::restore(&r.snapshot())
            .expect("restore")
            .node_cert(1),
        Some(&[7; 32])
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
        containers: Vec<&'a Container>,
    }
    let c = container("a1", "web", 1, &["10.0.1.2"]);
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
        r.apply(&claim(2, &["10.0.0.0/8", "10.1.0.0/16"])),
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
        containers: Vec<&'a Container>,
        down: Vec<NodeId>,
        max_node_id: NodeId,
        certs: Vec<(NodeId, [u8; 32])>,
    }
    let c = container("a1", "web", 1, &["10.0.1.2"]);
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
