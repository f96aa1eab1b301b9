//! Bytes → DNS answer through the UDP path (cache included): never a panic, and every answer
//! parses and carries the query's id.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use libfuzzer_sys::fuzz_target;
use linkdns_dns::{Acl, AnswerCache, Answerer, DnsMetrics, Forwarder, Holds, Zone};
use linkdns_registry::{
    Command, ComposeService, Container, LinkAlias, NamedPort, NodeInfo, Port, Protocol, Published,
    Registry,
};

fn answerer() -> &'static (Answerer, Mutex<AnswerCache>) {
    static A: OnceLock<(Answerer, Mutex<AnswerCache>)> = OnceLock::new();
    A.get_or_init(|| {
        let mut r = Registry::new();
        let _ = r.apply(&Command::UpsertNode(NodeInfo { id: 1, name: "h1".into(), peer_addr: "127.0.0.1:7380".into() }));
        let mut web = Container::new("a", "web", 1)
            .with_ips(["192.168.1.2".parse().expect("ip"), "fd00::2".parse().expect("ip")]);
        web.aliases = ["www".to_string()].into_iter().collect();
        web.links = [LinkAlias { target: "web".into(), alias: "self".into() }].into_iter().collect();
        web.ports.insert(Port { port: 80, protocol: Protocol::Tcp });
        web.services.insert(NamedPort { name: "http".into(), port: Port { port: 8080, protocol: Protocol::Tcp } });
        web.compose = Some(ComposeService { project: "shop".into(), service: "web".into() });
        let _ = r.apply(&Command::UpsertContainer(web));
        // Three behind one alias: their answers rotate, in the cache too.
        for i in 3..6u8 {
            let mut c = Container::new(&format!("p{i}"), &format!("pool-{i}"), 1)
                .with_ips([format!("192.168.1.{i}").parse().expect("ip")]);
            c.aliases.insert("pool".into());
            let _ = r.apply(&Command::UpsertContainer(c));
        }
        let answerer = Answerer {
            zone: Zone::new("cluster", 5, Some(1)).expect("zone"),
            acl: Acl::new(vec![]),
            forwarder: Forwarder::new(vec![], Duration::from_secs(1)),
            published: Arc::new(ArcSwap::from_pointee(Published::committed(7, r))),
            view_changes: tokio::sync::watch::channel(0).1,
            holds: Holds::default(),
            metrics: DnsMetrics::default(),
        };
        (answerer, Mutex::new(AnswerCache::new()))
    })
}

fuzz_target!(|data: &[u8]| {
    let (answerer, cache) = answerer();
    let Ok(mut cache) = cache.lock() else { return };
    for src in ["192.168.1.2:53000", "203.0.113.9:53000"] {
        let src: SocketAddr = src.parse().expect("src");
        if let Some(reply) = answerer.answer_datagram(data, src, &mut cache) {
            assert!(reply.len() >= 12);
            assert_eq!(reply[..2], data[..2], "the reply carries the query's id");
            assert!(reply[2] & 0x80 != 0, "the reply is a response");
        }
    }
});
