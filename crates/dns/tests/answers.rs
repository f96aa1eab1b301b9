//! Golden tests of DNS answers: wire query in, wire answer out (the UDP path, cache included),
//! rendered as text a reader can check against the naming table.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use linkdns_dns::{Acl, AnswerCache, Answerer, Client, DnsMetrics, Forwarder, Holds, Zone};
use linkdns_registry::{
    Command, ComposeService, Container, ContainerId, LinkAlias, LocalChange, LocalContainer,
    LocalNetwork, LocalView, NamedPort, NodeInfo, Port, Protocol, Published, Registry,
};

fn registry() -> Registry {
    let mut r = Registry::new();
    for (id, name) in [(1, "h1"), (2, "h2")] {
        r.apply(&Command::UpsertNode(NodeInfo {
            id,
            name: name.into(),
            peer_addr: format!("172.30.0.{id}:7380"),
        }))
        .expect("node");
    }
    let c = |id: &str,
             name: &str,
             node: u64,
             ips: &[&str],
             aliases: &[&str],
             links: &[(&str, &str)]| Container {
        aliases: aliases.iter().map(|s| s.to_string()).collect(),
        links: links
            .iter()
            .map(|(t, a)| LinkAlias {
                target: t.to_string(),
                alias: a.to_string(),
            })
            .collect(),
        ..Container::new(id, name, node).with_ips(ips.iter().map(|s| s.parse().expect("ip")))
    };
    let tcp = |port| Port {
        port,
        protocol: Protocol::Tcp,
    };
    let exposing = |mut c: Container, ports: &[u16]| {
        c.ports.extend(ports.iter().map(|p| tcp(*p)));
        c
    };
    let service = |project: &str, name: &str| {
        Some(ComposeService {
            project: project.into(),
            service: name.into(),
        })
    };
    let mut web1 = exposing(c("x1", "web", 1, &["192.168.1.7"], &[], &[]), &[80]);
    web1.services.insert(NamedPort {
        name: "http".into(),
        port: tcp(8080),
    });
    for container in [
        exposing(
            c("m1", "mysql", 1, &["192.168.1.5"], &["database"], &[]),
            &[3306],
        ),
        c(
            "w2",
            "wordpress",
            2,
            &["192.168.2.9", "fd00::9"],
            &[],
            &[("mysql", "db")],
        ),
        web1,
        exposing(c("x2", "web", 2, &["192.168.2.7"], &[], &[]), &[80]),
        // Three behind one alias: answers rotate.
        c("p1", "pool-1", 1, &["192.168.1.31"], &["pool"], &[]),
        c("p2", "pool-2", 2, &["192.168.2.32"], &["pool"], &[]),
        c("p3", "pool-3", 2, &["192.168.2.33"], &["pool"], &[]),
        // A compose project across both hosts.
        Container {
            compose: service("shop", "db"),
            ..c("c1", "shop_db_1", 1, &["192.168.1.40"], &["db"], &[])
        },
        Container {
            compose: service("shop", "front"),
            ..c("c2", "shop_front_1", 2, &["192.168.2.41"], &["front"], &[])
        },
        // A dotted name that reads as node-qualified.
        c("t1", "api.h2", 1, &["192.168.1.50"], &[], &[]),
        // Host-local networks (outside every claim): Docker's default pools repeat per host.
        c("s2", "solo", 2, &["172.17.0.2"], &[], &[]),
        c("i1", "impostor", 1, &["172.17.0.2"], &[], &[]),
        c("d2", "dual", 2, &["192.168.2.20", "172.18.0.5"], &[], &[]),
    ] {
        r.apply(&Command::UpsertContainer(container))
            .expect("container");
    }
    for (node, subnets) in [
        (1, &["192.168.1.0/24"][..]),
        (2, &["192.168.2.0/24", "fd00::/64"]),
    ] {
        r.apply(&Command::SetNodeSubnets {
            node,
            subnets: subnets.iter().map(|s| s.parse().expect("subnet")).collect(),
        })
        .expect("claim");
    }
    r
}

fn answerer(registry: Registry) -> Answerer {
    Answerer {
        zone: Zone::new("cluster", 5, Some(1)).expect("zone"),
        acl: Acl::new(vec!["10.99.0.0/16".parse().expect("subnet")]),
        forwarder: Forwarder::new(vec![], Duration::from_secs(1)),
        published: Arc::new(ArcSwap::from_pointee(Published::committed(42, registry))),
        view_changes: tokio::sync::watch::channel(0).1,
        holds: Holds::default(),
        metrics: DnsMetrics::default(),
    }
}

fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(0xbeef, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

/// Renders a response: header line, then one line per record, section by section.
fn render(bytes: &[u8]) -> String {
    let m = Message::from_vec(bytes).expect("response parses");
    let md = &m.metadata;
    let mut flags = vec![];
    for (on, f) in [
        (md.authoritative, "aa"),
        (md.truncation, "tc"),
        (md.recursion_desired, "rd"),
        (md.recursion_available, "ra"),
    ] {
        if on {
            flags.push(f);
        }
    }
    let mut out = format!("id={:#x} {:?} {}", md.id, md.response_code, flags.join(" "));
    if let Some(e) = &m.edns {
        let _ = write!(out, " edns={}", e.max_payload());
    }
    out.push('\n');
    for (section, records) in [
        ("an", &m.answers),
        ("ns", &m.authorities),
        ("ad", &m.additionals),
    ] {
        for r in records.iter() {
            let _ = writeln!(
                out,
                "{section} {} {} {} {}",
                r.name,
                r.ttl,
                r.record_type(),
                r.data
            );
        }
    }
    out
}

fn ask(
    a: &Answerer,
    cache: &mut AnswerCache,
    src: &str,
    name: &str,
    qtype: RecordType,
    edns: bool,
) -> String {
    let src: SocketAddr = src.parse().expect("src");
    match a.answer_datagram(&query(name, qtype, edns), src, cache) {
        Some(bytes) => render(&bytes),
        None => "(no answer: forwarded or dropped)\n".into(),
    }
}

#[test]
fn naming_table_golden() {
    let a = answerer(registry());
    let mut cache = AnswerCache::new();
    let local = "127.0.0.1:5000";
    let cases: Vec<(&str, &str, RecordType, bool)> = vec![
        (local, "mysql.cluster.", RecordType::A, false),
        (local, "web.cluster.", RecordType::A, false),
        (local, "web.h2.cluster.", RecordType::A, false),
        (local, "database.cluster.", RecordType::A, true),
        (local, "wordpress.cluster.", RecordType::AAAA, false),
        (local, "mysql.cluster.", RecordType::AAAA, false),
        (local, "nope.cluster.", RecordType::A, false),
        (local, "h1.cluster.", RecordType::A, false),
        (local, "cluster.", RecordType::SOA, false),
        (local, "5.1.168.192.in-addr.arpa.", RecordType::PTR, false),
        ("192.168.2.9:5000", "db.cluster.", RecordType::A, false),
        ("192.168.2.9:5000", "db.", RecordType::A, false),
        ("192.168.1.7:5000", "db.cluster.", RecordType::A, false),
        ("203.0.113.1:5000", "example.com.", RecordType::A, false),
        ("203.0.113.1:5000", "web.cluster.", RecordType::A, false),
        (local, "example.com.", RecordType::A, false),
        // Only addresses the asker reaches: routed ones, and this host's own host-local ones
        // for askers on this host (node 1).
        (local, "solo.cluster.", RecordType::A, false),
        (local, "impostor.cluster.", RecordType::A, false),
        (
            "203.0.113.1:5000",
            "impostor.cluster.",
            RecordType::A,
            false,
        ),
        (local, "dual.cluster.", RecordType::A, false),
        (local, "2.0.17.172.in-addr.arpa.", RecordType::PTR, false),
        (local, "5.0.18.172.in-addr.arpa.", RecordType::PTR, false),
        // Compose services as `<service>.<project>`, wherever they run.
        (local, "db.shop.cluster.", RecordType::A, false),
        (local, "front.shop.cluster.", RecordType::A, false),
        (local, "front.blog.cluster.", RecordType::A, false),
        // A dotted name whose last label is a node: node-qualified; the container named so is
        // found as `<name>.<its node>`, which its PTR says.
        (local, "api.h2.cluster.", RecordType::A, false),
        (local, "api.h2.h1.cluster.", RecordType::A, false),
        (local, "50.1.168.192.in-addr.arpa.", RecordType::PTR, false),
        // SRV: exposed ports, named services (label), plain SRV, link aliases; targets
        // `<container>.<node>` with their addresses in the additional section.
        (local, "_80._tcp.web.cluster.", RecordType::SRV, false),
        (local, "_http._tcp.web.cluster.", RecordType::SRV, false),
        (local, "_81._tcp.web.cluster.", RecordType::SRV, false),
        (local, "_80._tcp.web.cluster.", RecordType::A, false),
        (local, "web.h2.cluster.", RecordType::SRV, false),
        (local, "h1.cluster.", RecordType::SRV, false),
        (
            "192.168.2.9:5000",
            "_3306._tcp.db.cluster.",
            RecordType::SRV,
            false,
        ),
        ("192.168.2.9:5000", "_3306._tcp.db.", RecordType::SRV, false),
        (
            "192.168.1.7:5000",
            "_3306._tcp.db.cluster.",
            RecordType::SRV,
            false,
        ),
        ("192.168.2.9:5000", "_81._tcp.db.", RecordType::SRV, false),
        // Parents of names that exist: NODATA, not NXDOMAIN.
        (local, "shop.cluster.", RecordType::A, false),
        (local, "_tcp.web.cluster.", RecordType::A, false),
    ];
    let mut got = String::new();
    for (src, name, qtype, edns) in cases {
        let _ = write!(
            got,
            "> {src} {name} {qtype}{}\n{}",
            if edns { " +edns" } else { "" },
            ask(&a, &mut cache, src, name, qtype, edns)
        );
    }
    let want = "\
> 127.0.0.1:5000 mysql.cluster. A
id=0xbeef NoError aa rd ra
an mysql.cluster. 5 A 192.168.1.5
> 127.0.0.1:5000 web.cluster. A
id=0xbeef NoError aa rd ra
an web.cluster. 5 A 192.168.1.7
an web.cluster. 5 A 192.168.2.7
> 127.0.0.1:5000 web.h2.cluster. A
id=0xbeef NoError aa rd ra
an web.h2.cluster. 5 A 192.168.2.7
> 127.0.0.1:5000 database.cluster. A +edns
id=0xbeef NoError aa rd ra edns=1232
an database.cluster. 5 A 192.168.1.5
> 127.0.0.1:5000 wordpress.cluster. AAAA
id=0xbeef NoError aa rd ra
an wordpress.cluster. 5 AAAA fd00::9
> 127.0.0.1:5000 mysql.cluster. AAAA
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 nope.cluster. A
id=0xbeef NXDomain aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 h1.cluster. A
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 cluster. SOA
id=0xbeef NoError aa rd ra
an cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 5.1.168.192.in-addr.arpa. PTR
id=0xbeef NoError aa rd ra
an 5.1.168.192.in-addr.arpa. 5 PTR mysql.cluster.
> 192.168.2.9:5000 db.cluster. A
id=0xbeef NoError aa rd ra
an db.cluster. 5 A 192.168.1.5
> 192.168.2.9:5000 db. A
id=0xbeef NoError aa rd ra
an db. 5 A 192.168.1.5
> 192.168.1.7:5000 db.cluster. A
id=0xbeef NoError aa rd ra
an db.cluster. 5 A 192.168.1.40
> 203.0.113.1:5000 example.com. A
id=0xbeef Refused rd ra
> 203.0.113.1:5000 web.cluster. A
id=0xbeef NoError aa rd ra
an web.cluster. 5 A 192.168.1.7
an web.cluster. 5 A 192.168.2.7
> 127.0.0.1:5000 example.com. A
(no answer: forwarded or dropped)
> 127.0.0.1:5000 solo.cluster. A
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 impostor.cluster. A
id=0xbeef NoError aa rd ra
an impostor.cluster. 5 A 172.17.0.2
> 203.0.113.1:5000 impostor.cluster. A
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 dual.cluster. A
id=0xbeef NoError aa rd ra
an dual.cluster. 5 A 192.168.2.20
> 127.0.0.1:5000 2.0.17.172.in-addr.arpa. PTR
id=0xbeef NoError aa rd ra
an 2.0.17.172.in-addr.arpa. 5 PTR impostor.cluster.
> 127.0.0.1:5000 5.0.18.172.in-addr.arpa. PTR
(no answer: forwarded or dropped)
> 127.0.0.1:5000 db.shop.cluster. A
id=0xbeef NoError aa rd ra
an db.shop.cluster. 5 A 192.168.1.40
> 127.0.0.1:5000 front.shop.cluster. A
id=0xbeef NoError aa rd ra
an front.shop.cluster. 5 A 192.168.2.41
> 127.0.0.1:5000 front.blog.cluster. A
id=0xbeef NXDomain aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 api.h2.cluster. A
id=0xbeef NXDomain aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 api.h2.h1.cluster. A
id=0xbeef NoError aa rd ra
an api.h2.h1.cluster. 5 A 192.168.1.50
> 127.0.0.1:5000 50.1.168.192.in-addr.arpa. PTR
id=0xbeef NoError aa rd ra
an 50.1.168.192.in-addr.arpa. 5 PTR api.h2.h1.cluster.
> 127.0.0.1:5000 _80._tcp.web.cluster. SRV
id=0xbeef NoError aa rd ra
an _80._tcp.web.cluster. 5 SRV 0 10 80 web.h1.cluster.
an _80._tcp.web.cluster. 5 SRV 0 10 80 web.h2.cluster.
ad web.h1.cluster. 5 A 192.168.1.7
ad web.h2.cluster. 5 A 192.168.2.7
> 127.0.0.1:5000 _http._tcp.web.cluster. SRV
id=0xbeef NoError aa rd ra
an _http._tcp.web.cluster. 5 SRV 0 10 8080 web.h1.cluster.
ad web.h1.cluster. 5 A 192.168.1.7
> 127.0.0.1:5000 _81._tcp.web.cluster. SRV
id=0xbeef NXDomain aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 _80._tcp.web.cluster. A
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 web.h2.cluster. SRV
id=0xbeef NoError aa rd ra
an web.h2.cluster. 5 SRV 0 10 80 web.h2.cluster.
ad web.h2.cluster. 5 A 192.168.2.7
> 127.0.0.1:5000 h1.cluster. SRV
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 192.168.2.9:5000 _3306._tcp.db.cluster. SRV
id=0xbeef NoError aa rd ra
an _3306._tcp.db.cluster. 5 SRV 0 10 3306 mysql.h1.cluster.
ad mysql.h1.cluster. 5 A 192.168.1.5
> 192.168.2.9:5000 _3306._tcp.db. SRV
id=0xbeef NoError aa rd ra
an _3306._tcp.db. 5 SRV 0 10 3306 mysql.h1.cluster.
ad mysql.h1.cluster. 5 A 192.168.1.5
> 192.168.1.7:5000 _3306._tcp.db.cluster. SRV
id=0xbeef NXDomain aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 192.168.2.9:5000 _81._tcp.db. SRV
id=0xbeef NXDomain aa rd ra
> 127.0.0.1:5000 shop.cluster. A
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
> 127.0.0.1:5000 _tcp.web.cluster. A
id=0xbeef NoError aa rd ra
ns cluster. 5 SOA ns.cluster. hostmaster.cluster. 42 60 10 600 5
";
    assert_eq!(got, want, "\n--- got ---\n{got}");
}

#[test]
fn cached_answers_keep_the_askers_id_case_and_flags() {
    let a = answerer(registry());
    let mut cache = AnswerCache::new();
    let src: SocketAddr = "127.0.0.1:5000".parse().expect("src");
    let first = a
        .answer_datagram(
            &query("mysql.cluster.", RecordType::A, false),
            src,
            &mut cache,
        )
        .expect("first");
    let mut second_query = query("MySQL.CLUSTER.", RecordType::A, false);
    second_query[0] = 0x12;
    second_query[1] = 0x34;
    second_query[2] &= !0x01; // RD off
    let second = a
        .answer_datagram(&second_query, src, &mut cache)
        .expect("second");
    let m = Message::from_vec(&second).expect("parse");
    assert_eq!(m.metadata.id, 0x1234);
    assert!(!m.metadata.recursion_desired);
    assert_eq!(m.queries[0].name().to_ascii(), "MySQL.CLUSTER.");
    assert_eq!(first.len(), second.len());
    // The answer's owner points at the question, so it too comes back in the asker's case.
    assert_eq!(
        render(&second).lines().nth(1),
        Some("an MySQL.CLUSTER. 5 A 192.168.1.5")
    );
    assert_eq!(
        render(&first).lines().nth(1),
        Some("an mysql.cluster. 5 A 192.168.1.5")
    );
}

#[test]
fn a_new_registry_version_invalidates_cached_answers() {
    let a = answerer(registry());
    let mut cache = AnswerCache::new();
    let src: SocketAddr = "127.0.0.1:5000".parse().expect("src");
    let before = render(
        &a.answer_datagram(
            &query("mysql.cluster.", RecordType::A, false),
            src,
            &mut cache,
        )
        .expect("a"),
    );
    assert!(before.contains("192.168.1.5"));
    let mut r = registry();
    r.apply(&Command::RemoveContainer {
        node: 1,
        id: ContainerId::new("m1"),
        version: 0,
    })
    .expect("remove");
    a.published.store(Arc::new(Published::committed(43, r)));
    let after = render(
        &a.answer_datagram(
            &query("mysql.cluster.", RecordType::A, false),
            src,
            &mut cache,
        )
        .expect("b"),
    );
    assert!(after.contains("NXDomain"), "{after}");
}

#[test]
fn malformed_input_gets_formerr_or_nothing() {
    let a = answerer(registry());
    let mut cache = AnswerCache::new();
    let src: SocketAddr = "127.0.0.1:5000".parse().expect("src");
    let q = query("mysql.cluster.", RecordType::A, true);
    for len in 0..q.len() {
        if let Some(r) = a.answer_datagram(&q[..len], src, &mut cache) {
            assert_eq!(r[3] & 0x0f, 1, "{len} bytes: FORMERR");
            assert_eq!(&r[..2], &q[..2]);
        }
    }
    // Two questions: FORMERR. A NOTIFY: NOTIMP.
    let mut two = Message::from_vec(&q).expect("parse");
    two.add_query(Query::query(
        Name::from_ascii("web.cluster.").expect("n"),
        RecordType::A,
    ));
    let r = Message::from_vec(
        &a.answer_datagram(&two.to_vec().expect("enc"), src, &mut cache)
            .expect("r"),
    )
    .expect("p");
    assert_eq!(
        r.metadata.response_code,
        hickory_proto::op::ResponseCode::FormErr
    );
    // EDNS version 1: BADVERS, with our OPT (version 0) so the client can fall back.
    let mut v1 = Message::from_vec(&q).expect("parse");
    if let Some(edns) = v1.edns.as_mut() {
        edns.set_version(1);
    }
    let r = Message::from_vec(
        &a.answer_datagram(&v1.to_vec().expect("enc"), src, &mut cache)
            .expect("r"),
    )
    .expect("p");
    // Extended rcode 16 (BADVERS; hickory's decoder names the shared value BADSIG).
    assert_eq!(u16::from(r.metadata.response_code), 16);
    assert_eq!(r.edns.as_ref().map(|e| e.version()), Some(0));
    let mut notify = Message::from_vec(&q).expect("parse");
    notify.metadata.op_code = OpCode::Notify;
    let r = Message::from_vec(
        &a.answer_datagram(&notify.to_vec().expect("enc"), src, &mut cache)
            .expect("r"),
    )
    .expect("p");
    assert_eq!(
        r.metadata.response_code,
        hickory_proto::op::ResponseCode::NotImp
    );
}

/// The local view of a host where `new` is being connected to the bridge (its address not told
/// yet) and `old` runs at 192.168.1.2.
fn starting(others_connecting: &[&str]) -> Arc<LocalView> {
    let mut v = LocalView::default();
    v.apply(LocalChange::Networks(vec![LocalNetwork {
        id: "br".into(),
        name: "bridge".into(),
        subnets: vec!["192.168.1.0/24".parse().expect("subnet")],
        gateways: vec!["192.168.1.1".parse().expect("ip")],
    }]));
    v.apply(LocalChange::Replace(vec![]));
    // `new` links mysql as db; the others link nothing (they would be answered differently).
    for id in std::iter::once(&"new").chain(others_connecting) {
        let links = if *id == "new" {
            vec![LinkAlias {
                target: "mysql".into(),
                alias: "db".into(),
            }]
        } else {
            vec![]
        };
        v.apply(LocalChange::Connecting {
            id: ContainerId::new(*id),
            name: (*id).into(),
            links,
            network: "br".into(),
        });
    }
    Arc::new(v)
}

/// `view` once `/proc` proved that container `id` holds `ip`.
fn proven_at(view: &LocalView, id: &str, ip: &str) -> Arc<LocalView> {
    let mut proven = view.clone();
    proven.apply(LocalChange::Identified {
        id: ContainerId::new(id),
        ip: ip.parse().expect("ip"),
    });
    Arc::new(proven)
}

#[test]
fn a_starting_container_gets_its_links_once_proven_and_nothing_by_inference() {
    let a = answerer(registry());
    let view = starting(&[]);
    a.published.store(Arc::new(Published {
        local: view.clone(),
        ..Published::committed(42, registry())
    }));
    let mut cache = AnswerCache::new();
    // The one container being connected may be the asker, or another container answering
    // ARP for a free address: unproven, its link alias is not answered (the query goes on,
    // as any other container's would), and a cluster name gets what any container of that
    // network gets.
    assert_eq!(
        ask(
            &a,
            &mut cache,
            "192.168.1.50:5000",
            "db.",
            RecordType::A,
            false
        ),
        "(no answer: forwarded or dropped)\n"
    );
    assert_eq!(
        ask(
            &a,
            &mut cache,
            "192.168.1.50:5000",
            "db.cluster.",
            RecordType::A,
            false
        ),
        "id=0xbeef NoError aa rd ra\nan db.cluster. 5 A 192.168.1.40\n",
        "shop's db, not the link"
    );
    // /proc proved `new` holds the address: its link, and bare cluster names.
    a.published.store(Arc::new(Published {
        local: proven_at(&view, "new", "192.168.1.50"),
        ..Published::committed(43, registry())
    }));
    let mut cache = AnswerCache::new();
    assert_eq!(
        ask(
            &a,
            &mut cache,
            "192.168.1.50:5000",
            "db.",
            RecordType::A,
            false
        ),
        "id=0xbeef NoError aa rd ra\nan db. 5 A 192.168.1.5\n"
    );
    // A bare cluster name from a container of this host is the cluster's name (as Docker's
    // own DNS answers its networks' names); from the host itself it goes upstream.
    assert_eq!(
        ask(
            &a,
            &mut cache,
            "192.168.1.50:5000",
            "web.",
            RecordType::A,
            false
        ),
        "id=0xbeef NoError rd ra\nan web. 5 A 192.168.1.7\nan web. 5 A 192.168.2.7\n"
    );
    assert_eq!(
        ask(
            &a,
            &mut cache,
            "127.0.0.1:5000",
            "web.",
            RecordType::A,
            false
        ),
        "(no answer: forwarded or dropped)\n"
    );
    // Another free address on that network is not `new`.
    assert_eq!(
        ask(
            &a,
            &mut cache,
            "192.168.1.51:5000",
            "db.",
            RecordType::A,
            false
        ),
        "(no answer: forwarded or dropped)\n"
    );
}

#[tokio::test]
async fn a_held_query_waits_for_the_watcher_and_no_longer() {
    let (tx, rx) = tokio::sync::watch::channel(0);
    let a = Arc::new(Answerer {
        view_changes: rx,
        ..answerer(registry())
    });
    let ambiguous = Arc::new(Published {
        local: starting(&["other"]),
        ..Published::committed(42, registry())
    });
    a.published.store(ambiguous.clone());
    let src = "192.168.1.50".parse().expect("ip");
    // The watcher tells the address 30 ms later: the wait ends then.
    let told = {
        let (a, tx) = (a.clone(), tx.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            let mut v = (*starting(&["other"])).clone();
            v.apply(LocalChange::Upsert(LocalContainer::new(
                ContainerId::new("new"),
                "new".into(),
                vec![],
                vec![src],
                vec!["br".into()],
            )));
            a.published.store(Arc::new(Published {
                local: Arc::new(v),
                version: 1,
                ..Published::committed(42, registry())
            }));
            let _ = tx.send(1);
        })
    };
    let waited = a.wait_for_asker(src).await;
    assert!(waited >= Duration::from_millis(25), "{waited:?}");
    assert!(waited < linkdns_dns::HOLD_LIMIT, "{waited:?}");
    told.await.expect("task");
    // Nobody ever tells: the wait ends at the limit, and the address is not held again soon.
    a.published.store(ambiguous);
    let other = "192.168.1.51".parse().expect("ip");
    let waited = a.wait_for_asker(other).await;
    assert!(waited >= linkdns_dns::HOLD_LIMIT, "{waited:?}");
    let mut cache = AnswerCache::new();
    let answer = ask(
        &a,
        &mut cache,
        "192.168.1.51:5000",
        "db.",
        RecordType::A,
        false,
    );
    assert!(
        answer.starts_with("(no answer"),
        "a bare name without links goes upstream: {answer}"
    );
    let named = ask(
        &a,
        &mut cache,
        "192.168.1.51:5000",
        "mysql.cluster.",
        RecordType::A,
        false,
    );
    assert!(
        named.contains("192.168.1.5"),
        "answered at once this time: {named}"
    );
}

/// The A records of a response, in order.
fn addresses(bytes: &[u8]) -> Vec<String> {
    let m = Message::from_vec(bytes).expect("response parses");
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

#[test]
fn answers_rotate_with_the_askers_own_host_first() {
    let a = answerer(registry());
    let query = query("pool.cluster.", RecordType::A, false);
    // On node 1's host: its own pool-1 first, node 2's two rotating behind it; the cached
    // answer rotates as the first one did not.
    let mut cache = AnswerCache::new();
    let here: SocketAddr = "127.0.0.1:5000".parse().expect("src");
    let orders: Vec<Vec<String>> = (0..4)
        .map(|_| addresses(&a.answer_datagram(&query, here, &mut cache).expect("answer")))
        .collect();
    for order in &orders {
        assert_eq!(order[0], "192.168.1.31", "{orders:?}");
        assert_eq!(order.len(), 3);
    }
    assert_ne!(orders[0], orders[1], "{orders:?}");
    assert_eq!(orders[0], orders[2], "two addresses behind: a cycle of two");
    // From elsewhere all three rotate, each first in turn, cached or not.
    let far: SocketAddr = "203.0.113.1:5000".parse().expect("src");
    let mut cached = AnswerCache::new();
    let firsts: BTreeSet<String> = (0..3)
        .map(|_| {
            addresses(&a.answer_datagram(&query, far, &mut cached).expect("answer"))[0].clone()
        })
        .collect();
    assert_eq!(firsts.len(), 3, "{firsts:?}");
    let firsts: BTreeSet<String> = (0..3)
        .map(|_| {
            let mut fresh = AnswerCache::new();
            addresses(&a.answer_datagram(&query, far, &mut fresh).expect("answer"))[0].clone()
        })
        .collect();
    assert_eq!(firsts.len(), 3, "uncached answers rotate too: {firsts:?}");
}

#[test]
fn large_srv_answers_drop_their_glue_before_they_truncate() {
    let mut r = registry();
    for i in 0..30 {
        let mut c = Container::new(&format!("b{i}"), &format!("big-{i:02}"), 1)
            .with_ips([format!("192.168.1.{}", 100 + i).parse().expect("ip")]);
        c.aliases.insert("big".into());
        c.ports.insert(Port {
            port: 80,
            protocol: Protocol::Tcp,
        });
        r.apply(&Command::UpsertContainer(c)).expect("big");
    }
    let a = answerer(r);
    let src: SocketAddr = "127.0.0.1:5000".parse().expect("src");
    let mut cache = AnswerCache::new();
    // 30 SRV records fit in 1232 bytes, their 30 addresses too do not: the glue goes, not TC.
    let edns = a
        .answer_datagram(
            &query("_80._tcp.big.cluster.", RecordType::SRV, true),
            src,
            &mut cache,
        )
        .expect("answer");
    let m = Message::from_vec(&edns).expect("parse");
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 30);
    assert!(m.additionals.is_empty());
    assert!(edns.len() <= 1232);
    // In 512 bytes not even the SRV records fit: TC, and the client asks over TCP.
    let plain = a
        .answer_datagram(
            &query("_80._tcp.big.cluster.", RecordType::SRV, false),
            src,
            &mut cache,
        )
        .expect("answer");
    let m = Message::from_vec(&plain).expect("parse");
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    // A small one keeps its glue.
    let small = a
        .answer_datagram(
            &query("_80._tcp.web.h1.cluster.", RecordType::SRV, false),
            src,
            &mut cache,
        )
        .expect("answer");
    assert_eq!(
        Message::from_vec(&small).expect("parse").additionals.len(),
        1
    );
}

#[tokio::test]
async fn a_held_query_asks_who_is_there_and_ends_when_told() {
    let (tx, rx) = tokio::sync::watch::channel(0);
    let published = Arc::new(ArcSwap::from_pointee(Published {
        local: starting(&["other"]),
        ..Published::committed(42, registry())
    }));
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let identify: linkdns_dns::Identify = {
        let (published, asked) = (published.clone(), asked.clone());
        Arc::new(move |addresses: Vec<IpAddr>| {
            if let Ok(mut a) = asked.lock() {
                a.push(addresses.clone());
            }
            // As /proc would tell: `new` holds the address.
            let mut v = (*starting(&["other"])).clone();
            for src in addresses {
                v.apply(LocalChange::Identified {
                    id: ContainerId::new("new"),
                    ip: src,
                });
            }
            published.store(Arc::new(Published {
                local: Arc::new(v),
                version: 1,
                ..Published::committed(42, registry())
            }));
            let _ = tx.send(1);
        })
    };
    let a = Answerer {
        view_changes: rx,
        published,
        holds: Holds::with_identify(identify),
        ..answerer(registry())
    };
    let src = "192.168.1.50".parse().expect("ip");
    let waited = a.wait_for_asker(src).await;
    assert!(waited < Duration::from_millis(100), "{waited:?}");
    assert_eq!(
        asked.lock().map(|a| a.clone()).unwrap_or_default(),
        [vec![src]]
    );
    let mut cache = AnswerCache::new();
    assert_eq!(
        ask(
            &a,
            &mut cache,
            "192.168.1.50:5000",
            "db.",
            RecordType::A,
            false
        ),
        "id=0xbeef NoError aa rd ra\nan db. 5 A 192.168.1.5\n",
        "answered as `new`, with its link"
    );
}

/// Counts the allocations each thread makes, so a test can check a path allocates nothing.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_allocation() {
    // Not during the thread's teardown, when its locals are gone.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

#[allow(unsafe_code)]
// SAFETY: every call is passed on to the system allocator as it came.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count_allocation();
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        count_allocation();
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(std::cell::Cell::get)
}

#[test]
fn a_cached_answer_allocates_nothing() {
    let a = answerer(registry());
    a.published.store(Arc::new(Published {
        local: proven_at(&starting(&[]), "new", "192.168.1.50"),
        ..Published::committed(42, registry())
    }));
    let mut cache = AnswerCache::new();
    // The common queries: a name, one that rotates, NXDOMAIN, with and without EDNS, from
    // the host and from a container (whose link alias `db` is answered per asker).
    let asked: Vec<(SocketAddr, Vec<u8>)> = [
        ("127.0.0.1:5000", "mysql.cluster.", false),
        ("127.0.0.1:5000", "pool.cluster.", true),
        ("127.0.0.1:5000", "nope.cluster.", false),
        ("203.0.113.1:5000", "pool.cluster.", false),
        ("192.168.1.50:5000", "web.cluster.", true),
        ("192.168.1.50:5000", "db.", false),
    ]
    .iter()
    .map(|(src, name, edns)| (src.parse().expect("src"), query(name, RecordType::A, *edns)))
    .collect();
    let mut firsts = Vec::new();
    for (src, q) in &asked {
        let reply = a.answer_datagram(q, *src, &mut cache).expect("answered");
        firsts.push(render(&reply));
    }
    assert!(
        firsts[5].contains("an db. 5 A 192.168.1.5"),
        "{}",
        firsts[5]
    );
    let before = allocations();
    let mut replies = 0;
    for _ in 0..100 {
        for (src, q) in &asked {
            replies += usize::from(a.answer_datagram_in(q, *src, &mut cache).is_some());
        }
    }
    let allocated = allocations() - before;
    assert_eq!(replies, 100 * asked.len());
    assert_eq!(allocated, 0, "allocations for {replies} cached answers");
    // And they are the same answers (rotation aside).
    for ((src, q), first) in asked.iter().zip(&firsts) {
        let again = render(&a.answer_datagram(q, *src, &mut cache).expect("answered"));
        let sorted = |s: &str| s.lines().map(str::to_string).collect::<BTreeSet<_>>();
        assert_eq!(sorted(&again), sorted(first));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_threads_share_the_port_and_the_rotation() {
    let a = Arc::new(answerer(registry()));
    let limits = linkdns_dns::Limits {
        udp_threads: 2,
        ..Default::default()
    };
    let listen: [SocketAddr; 1] = ["127.0.0.1:0".parse().expect("addr")];
    let server = linkdns_dns::DnsServer::start(&listen, a.clone(), limits)
        .await
        .expect("start");
    let addr = server.local_addrs()[0];
    // Two UDP sockets on the port (the kernel's own table says so).
    let udp = std::fs::read_to_string("/proc/net/udp").expect("/proc/net/udp");
    let port = format!("0100007F:{:04X}", addr.port());
    let bound = udp
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(port.as_str()))
        .count();
    assert_eq!(bound, 2, "sockets on {addr}:\n{udp}");
    // The address is taken: another server (another process, say) cannot join it.
    match linkdns_dns::DnsServer::start(&[addr], a.clone(), limits).await {
        Err(e) => assert!(e.to_string().contains(&addr.to_string()), "{e}"),
        Ok(_) => panic!("a second server bound {addr}"),
    }
    // Each client asks from a port of its own, so the kernel spreads them over both
    // threads; the answers still rotate one step each: pool-1 (this host's) first, the
    // other two taking turns behind it.
    let q = query("pool.cluster.", RecordType::A, false);
    let mut seconds = Vec::new();
    for _ in 0..16 {
        let q = q.clone();
        let reply = tokio::task::spawn_blocking(move || {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            socket.send_to(&q, addr).expect("send");
            let mut buf = [0u8; 1500];
            let (n, _) = socket.recv_from(&mut buf).expect("answer");
            buf[..n].to_vec()
        })
        .await
        .expect("client");
        let order = addresses(&reply);
        assert_eq!(order.len(), 3, "{order:?}");
        assert_eq!(order[0], "192.168.1.31", "{order:?}");
        seconds.push(order[1].clone());
    }
    for pair in seconds.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "each answer one step further: {seconds:?}"
        );
    }
    server.shutdown().await;
}

#[test]
fn a_link_alias_answer_is_cached_for_its_asker_alone() {
    // Two containers on the same network (one vantage class); only `app` links mysql as db.
    let mut view = LocalView::default();
    view.apply(LocalChange::Networks(vec![LocalNetwork {
        id: "br".into(),
        name: "bridge".into(),
        subnets: vec!["192.168.1.0/24".parse().expect("subnet")],
        gateways: vec!["192.168.1.1".parse().expect("ip")],
    }]));
    let container = |id: &str, ip: &str, links: Vec<LinkAlias>| {
        LocalContainer::new(
            ContainerId::new(id),
            id.into(),
            links,
            vec![ip.parse().expect("ip")],
            vec!["br".into()],
        )
    };
    view.apply(LocalChange::Replace(vec![
        container(
            "app",
            "192.168.1.60",
            vec![
                LinkAlias {
                    target: "mysql".into(),
                    alias: "db".into(),
                },
                LinkAlias {
                    target: "mysql".into(),
                    alias: "sql".into(),
                },
            ],
        ),
        container("plain", "192.168.1.61", vec![]),
    ]));
    let a = answerer(registry());
    a.published.store(Arc::new(Published {
        local: Arc::new(view),
        ..Published::committed(42, registry())
    }));
    let mut cache = AnswerCache::new();
    let ask_db = |cache: &mut AnswerCache, src: &str| {
        ask(&a, cache, src, "db.cluster.", RecordType::A, false)
    };
    let linked = "id=0xbeef NoError aa rd ra\nan db.cluster. 5 A 192.168.1.5\n";
    // `db.cluster` is also shop's compose db (192.168.1.40): what everyone else gets.
    let unlinked = "id=0xbeef NoError aa rd ra\nan db.cluster. 5 A 192.168.1.40\n";
    for _ in 0..3 {
        assert_eq!(ask_db(&mut cache, "192.168.1.60:5000"), linked);
        assert_eq!(ask_db(&mut cache, "192.168.1.61:5000"), unlinked);
    }
    // The bare alias: app's link, and for plain the cluster name db (shop's).
    let bare = |src: &str| {
        ask(
            &a,
            &mut AnswerCache::new(),
            src,
            "db.",
            RecordType::A,
            false,
        )
    };
    let (app_bare, plain_bare) = (bare("192.168.1.60:5000"), bare("192.168.1.61:5000"));
    for _ in 0..3 {
        assert_eq!(
            ask(
                &a,
                &mut cache,
                "192.168.1.60:5000",
                "db.",
                RecordType::A,
                false
            ),
            app_bare
        );
        assert_eq!(
            ask(
                &a,
                &mut cache,
                "192.168.1.61:5000",
                "db.",
                RecordType::A,
                false
            ),
            plain_bare
        );
    }
    assert_ne!(app_bare, plain_bare);
    // `_tcp.sql` (the parent of `_3306._tcp.sql`) exists for app alone, whoever asks first.
    for first in ["192.168.1.61:5000", "192.168.1.60:5000"] {
        let mut cache = AnswerCache::new();
        let mut tcp = |src: &str| {
            let reply = ask(
                &a,
                &mut cache,
                src,
                "_tcp.sql.cluster.",
                RecordType::A,
                false,
            );
            reply.lines().next().unwrap_or_default().to_string()
        };
        tcp(first);
        assert_eq!(tcp("192.168.1.60:5000"), "id=0xbeef NoError aa rd ra");
        assert_eq!(tcp("192.168.1.61:5000"), "id=0xbeef NXDomain aa rd ra");
    }
}

#[test]
fn only_this_hosts_own_clients_are_forwarded_to() {
    let a = answerer(registry());
    let published = Published {
        local: starting(&[]),
        ..Published::committed(42, registry())
    };
    a.published.store(Arc::new(published.clone()));
    let mut cache = AnswerCache::new();
    for (src, class) in [
        ("127.0.0.1", Client::Local),
        ("10.99.3.4", Client::Local),       // --allow
        ("192.168.1.99", Client::Local),    // a Docker network of this host
        ("192.168.2.7", Client::Cluster),   // node 2's web
        ("192.168.2.200", Client::Cluster), // in node 2's claim
        ("172.30.0.2", Client::Cluster),    // node 2's address
        ("203.0.113.9", Client::Stranger),
    ] {
        assert_eq!(
            a.acl.class(src.parse().expect("ip"), &published),
            class,
            "{src}"
        );
        let got = ask(
            &a,
            &mut cache,
            &format!("{src}:5000"),
            "example.test.",
            RecordType::A,
            false,
        );
        if class == Client::Local {
            assert_eq!(got, "(no answer: forwarded or dropped)\n", "{src}");
        } else {
            assert!(got.starts_with("id=0xbeef Refused"), "{src}: {got}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_queries_share_one_lookup_per_view_change() {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let calls = Arc::new(std::sync::Mutex::new(Vec::<Vec<IpAddr>>::new()));
    let identify: linkdns_dns::Identify = {
        let calls = calls.clone();
        // Finds nobody (as /proc would for addresses nobody holds).
        Arc::new(move |addresses: Vec<IpAddr>| {
            if let Ok(mut c) = calls.lock() {
                c.push(addresses);
            }
        })
    };
    let a = Arc::new(Answerer {
        view_changes: rx,
        holds: Holds::with_identify(identify),
        ..answerer(registry())
    });
    a.published.store(Arc::new(Published {
        local: starting(&["other"]),
        ..Published::committed(42, registry())
    }));
    // 20 queries held for 20 addresses, then 5 changes of the view while they wait.
    let held: Vec<_> = (0..20u8)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(
                async move { a.wait_for_asker(IpAddr::from([192, 168, 1, 100 + i])).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for version in 1..=5 {
        let _ = tx.send(version);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    for h in held {
        h.await.expect("held");
    }
    let calls = calls.lock().map(|c| c.clone()).unwrap_or_default();
    // The 20 new addresses in a burst: one lookup at once, at most one more for those that
    // came during it; then at most one lookup of all 20 per change of the view.
    let asked: BTreeSet<IpAddr> = calls.iter().flatten().copied().collect();
    assert_eq!(asked.len(), 20, "every held address asked about: {calls:?}");
    assert!(
        calls.len() <= 2 + 5,
        "{} lookups for 20 held addresses and 5 changes: {calls:?}",
        calls.len()
    );
}

/// A server whose host has a container network on 127.0.0.0/8 (so 127.0.0.2 and up are
/// addresses no known container holds: held, if there is room), at most `capacity` queries
/// held, forwarding to a fake upstream (UDP and TCP) that answers every query.
async fn server_for_unknown_askers(capacity: usize) -> (linkdns_dns::DnsServer, SocketAddr) {
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    let tcp = tokio::net::TcpListener::bind(upstream_addr)
        .await
        .expect("bind tcp");
    let answer = |q: &[u8]| {
        let mut r = q.to_vec();
        r[2] |= 0x80;
        r
    };
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            let _ = upstream.send_to(&answer(&buf[..n]), from).await;
        }
    });
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = tcp.accept().await {
            let Ok(len) = stream.read_u16().await else {
                continue;
            };
            let mut q = vec![0u8; usize::from(len)];
            if stream.read_exact(&mut q).await.is_err() {
                continue;
            }
            let r = answer(&q);
            let mut framed = (r.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&r);
            let _ = stream.write_all(&framed).await;
        }
    });
    let mut view = LocalView::default();
    view.apply(LocalChange::Networks(vec![LocalNetwork {
        id: "lo".into(),
        name: "lo".into(),
        subnets: vec!["127.0.0.0/8".parse().expect("subnet")],
        gateways: vec!["127.0.0.1".parse().expect("ip")],
    }]));
    view.apply(LocalChange::Replace(vec![]));
    let a = Arc::new(Answerer {
        forwarder: Forwarder::new(vec![upstream_addr], Duration::from_secs(1)),
        holds: Holds::new(capacity, None),
        ..answerer(registry())
    });
    a.published.store(Arc::new(Published {
        local: Arc::new(view),
        ..Published::committed(42, registry())
    }));
    let listen: [SocketAddr; 1] = ["127.0.0.1:0".parse().expect("addr")];
    let server = linkdns_dns::DnsServer::start(&listen, a, linkdns_dns::Limits::default())
        .await
        .expect("start");
    let addr = server.local_addrs()[0];
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_the_hold_cap_is_answered_at_once_forwarded_if_need_be() {
    let (_server, addr) = server_for_unknown_askers(0).await;
    // No room to hold: a name outside the cluster from an unknown local asker goes upstream
    // at once (it was dropped), over UDP and over TCP (which was held regardless of the cap).
    let q = query("example.test.", RecordType::A, false);
    let udp = tokio::task::spawn_blocking(move || {
        let socket = std::net::UdpSocket::bind("127.0.0.2:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(600)))
            .expect("timeout");
        socket.send_to(&q, addr).expect("send");
        let mut buf = [0u8; 512];
        socket.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec())
    })
    .await
    .expect("udp client");
    let reply = udp.expect("a UDP answer");
    assert_eq!(reply[..2], [0xbe, 0xef]);
    let q = query("example.test.", RecordType::A, false);
    let tcp = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::from(([127, 0, 0, 3], 0)))
            .map_err(|e| e.to_string())?;
        let mut stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        stream.write_all(&framed).await.map_err(|e| e.to_string())?;
        stream.read_u16().await.map_err(|e| e.to_string())
    };
    // Held, it would wait out the hold (1 s).
    let tcp = tokio::time::timeout(Duration::from_millis(600), tcp)
        .await
        .map_err(|_| "no TCP answer within 600 ms".to_string())
        .and_then(|r| r);
    assert!(tcp.as_ref().is_ok_and(|n| *n > 12), "{tcp:?}");
}
