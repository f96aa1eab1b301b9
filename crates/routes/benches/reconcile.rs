//! What a reconciliation costs on a host: `cargo bench -p linkdns-routes --bench reconcile --
//! [peers] [foreign routes]` (root; it works in a network namespace of its own, `ldb-routes`).
//!
//! The namespace gets a LAN interface (10.0.0.1/16), a bridge with this node's subnet, and
//! `foreign routes` routes of someone else's; the cluster has `peers` other nodes, each with a
//! /24. Prints the time of the first reconciliation (every route and rule made), of a
//! steady-state one (nothing to change: what runs every 10 s), and of the plan alone.
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use linkdns_registry::Subnet;
use linkdns_routes::{Desired, Peer, Programmer, DEFAULT_PROTOCOL};

const NETNS: &str = "ldb-routes";
const INSIDE: &str = "LINKDNS_BENCH_IN_NETNS";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let peers: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(100);
    let foreign: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    if std::env::var_os(INSIDE).is_none() {
        outside(peers, foreign);
    } else {
        inside(peers, foreign);
    }
}

/// Makes the namespace, runs this program again inside it, removes the namespace.
fn outside(peers: usize, foreign: usize) {
    let _ = Command::new("ip")
        .args(["netns", "delete", NETNS])
        .stderr(Stdio::null())
        .status();
    sh("ip", &["netns", "add", NETNS]);
    let exe = std::env::current_exe().expect("own path");
    let status = Command::new("ip")
        .args(["netns", "exec", NETNS])
        .arg(exe)
        .args([peers.to_string(), foreign.to_string()])
        .env(INSIDE, "1")
        .status()
        .expect("run inside the namespace");
    sh("ip", &["netns", "delete", NETNS]);
    assert!(status.success(), "the benchmark failed inside {NETNS}");
}

fn inside(peers: usize, foreign: usize) {
    for cmd in [
        "link add lan0 type veth peer name lan1",
        "addr add 10.0.0.1/16 dev lan0",
        "link set lan1 up",
        "link set lan0 up",
        "link add br0 type bridge",
        "addr add 192.168.0.1/24 dev br0",
        "link set br0 up",
    ] {
        sh("ip", &cmd.split(' ').collect::<Vec<_>>());
    }
    // Someone else's routes, as on a host with a big table.
    let mut batch = String::new();
    for i in 0..foreign.min(1 << 20) {
        let [_, a, b, c] = u32::try_from(i).unwrap_or(0).to_be_bytes();
        batch.push_str(&format!(
            "route add 172.{}.{b}.{c}/32 via 10.0.0.254 proto static\n",
            16 + a
        ));
    }
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("ip -batch");
    ip.stdin
        .take()
        .expect("stdin")
        .write_all(batch.as_bytes())
        .expect("write batch");
    assert!(ip.wait().expect("ip -batch").success());

    let desired = Desired {
        local_subnets: vec![subnet(Ipv4Addr::new(192, 168, 0, 0), 24)],
        peers: (0..peers)
            .map(|i| {
                let [a, b] = u16::try_from(i + 2).unwrap_or(u16::MAX).to_be_bytes();
                let [c, d] = u16::try_from(i).unwrap_or(u16::MAX).to_be_bytes();
                Peer {
                    id: i as u64 + 2,
                    name: format!("h{}", i + 2),
                    host: Some(IpAddr::V4(Ipv4Addr::new(10, 0, a, b))),
                    subnets: vec![subnet(Ipv4Addr::new(10, 100 + c, d, 0), 24)],
                }
            })
            .collect(),
        ..Desired::default()
    };
    let mut programmer = Programmer::new(DEFAULT_PROTOCOL);
    let started = Instant::now();
    let first = programmer.reconcile(&desired, true);
    let first_time = started.elapsed();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.owned_routes.len(), peers);

    let mut steady = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let report = programmer.reconcile(&desired, true);
        steady.push(t.elapsed());
        assert!(
            report.plan.is_empty(),
            "steady state changed:\n{}",
            report.plan
        );
    }
    steady.sort();
    let plan_only = {
        let t = Instant::now();
        let report = programmer.reconcile(&desired, false);
        let read_and_plan = t.elapsed();
        assert!(report.plan.is_empty());
        read_and_plan
    };
    println!(
        "reconcile: {peers} peers, {foreign} foreign routes ({} routes in the namespace)",
        peers + foreign
    );
    println!(
        "  first (add {peers} routes, write the chains): {}",
        ms(first_time)
    );
    println!(
        "  steady state, nothing to change (10 runs): p50 {}, max {}",
        ms(steady[steady.len() / 2]),
        ms(steady[steady.len() - 1])
    );
    println!("  read and plan only: {}", ms(plan_only));
    let withdrawn = programmer.withdraw();
    assert!(withdrawn.owned_routes.is_empty());
}

fn subnet(addr: Ipv4Addr, prefix: u8) -> Subnet {
    Subnet::new(IpAddr::V4(addr), prefix).expect("subnet")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn sh(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(status.success(), "`{program} {}` failed", args.join(" "));
}
