//! Benchmark helper: loads N container names into a linkdns data dir through the same Command →
//! Raft → sled path the watcher uses, and writes the same names as a zone file (for Knot) and a
//! dnsperf query file. Used by `tests/bench-dns.sh`; not part of the service.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use linkdns_raft::{NodeConfig, SledStore};
use linkdns_registry::{Command, Container, NodeInfo};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    names: u32,
    #[arg(long, default_value = "bench")]
    node_name: String,
    /// Zone file to write (origin `cluster.`).
    #[arg(long)]
    zone: PathBuf,
    /// dnsperf query file to write.
    #[arg(long)]
    queries: PathBuf,
}

fn address(i: u32) -> IpAddr {
    let n = i + 1;
    IpAddr::V4(Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.data_dir)?;
    let node = linkdns_raft::start(
        NodeConfig::new(1),
        SledStore::open(&args.data_dir)?,
        std::sync::Arc::new(linkdns_raft::NoPeers),
    )?;
    node.propose(Command::UpsertNode(NodeInfo {
        id: 1,
        name: args.node_name.clone(),
        peer_addr: "127.0.0.1:7380".into(),
    }))
    .await
    .context("register the bench node")?;
    let containers: Vec<Container> = (0..args.names)
        .map(|i| Container::new(&format!("{i:064x}"), &format!("svc{i}"), 1).with_ips([address(i)]))
        .collect();
    for chunk in containers.chunks(500) {
        let batch = chunk
            .iter()
            .cloned()
            .map(Command::UpsertContainer)
            .collect();
        node.propose(Command::Batch(batch))
            .await
            .context("load names")?;
    }
    let records = node.published().load().registry.record_count();
    node.shutdown()?;

    let mut zone = String::from(
        "$ORIGIN cluster.\n$TTL 5\n@ SOA ns.cluster. hostmaster.cluster. 1 60 10 600 5\n@ NS ns\nns A 127.0.0.1\n",
    );
    let mut queries = String::new();
    for i in 0..args.names {
        let _ = writeln!(zone, "svc{i} A {}", address(i));
    }
    // Queries in a scattered but fixed order, so both servers see the same sequence.
    for k in 0..args.names {
        let i = (u64::from(k) * 7919 % u64::from(args.names)) as u32;
        let _ = writeln!(queries, "svc{i}.cluster A");
    }
    std::fs::write(&args.zone, zone)?;
    std::fs::write(&args.queries, queries)?;
    eprintln!("loaded {records} records into {}", args.data_dir.display());
    Ok(())
}
