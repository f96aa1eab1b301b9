//! What routing costs a host: `cargo bench -p linkdns-routes --bench reconcile --
//! [peers=20,200] [foreign routes=10000]` (root; it works in a network namespace of its own,
//! `ldb-routes`).
//!
//! The namespace gets a LAN interface (10.0.0.1/16), a bridge with this node's subnet, and
//! `foreign routes` routes of someone else's; the cluster has `peers` other nodes, each with a
//! /24, first all on the LAN (plain routes), then all behind a router (the VXLAN tunnel: a
//! route, an FDB and a neighbour entry each). For each: the time and the CPU (this process and
//! the iptables it runs) of the first reconciliation (everything made), of a steady-state one
//! (nothing to change: what runs every 10 s) and of reading the host and planning alone.
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
    let peers = args
        .first()
        .cloned()
        .unwrap_or_else(|| "20,200".to_string());
    let foreign: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    if std::env::var_os(INSIDE).is_none() {
        for count in peers.split(',').filter_map(|p| p.parse::<usize>().ok()) {
            outside(count, foreign);
        }
    } else {
        let count = peers.parse().unwrap_or(20);
        inside(count, foreign, false);
        inside(count, foreign, true);
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

/// CPU seconds this process and its waited-for children (iptables) used so far, from
/// /proc/self/stat (clock ticks of 10 ms).
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<f64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14-17 of the line, 12-15 after the name.
    fields
        .get(11..15)
        .map_or(0.0, |t| t.iter().sum::<f64>() / 100.0)
}

/// Time and CPU of `f`.
fn measure<T>(f: impl FnOnce() -> T) -> (T, Duration, f64) {
    let (t, c) = (Instant::now(), cpu());
    let out = f();
    (out, t.elapsed(), cpu() - c)
}

fn inside(peers: usize, foreign: usize, tunnel: bool) {
    // A clean namespace for each pass.
    let _ = Command::new("ip")
        .args(["link", "delete", "lan0"])
        .stderr(Stdio::null())
        .status();
    let _ = Command::new("ip")
        .args(["link", "delete", "br0"])
        .stderr(Stdio::null())
        .status();
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
                // On the LAN, or behind a router (off-link: the tunnel).
                let host = if tunnel {
                    Ipv4Addr::new(10, 200, a, b)
                } else {
                    Ipv4Addr::new(10, 0, a, b)
                };
                Peer {
                    id: i as u64 + 2,
                    name: format!("h{}", i + 2),
                    host: Some(IpAddr::V4(host)),
                    subnets: vec![subnet(Ipv4Addr::new(10, 100 + c, d, 0), 24)],
                }
            })
            .collect(),
        local_host: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        ..Desired::default()
    };
    let mut programmer = Programmer::new(DEFAULT_PROTOCOL);
    let (first, first_time, first_cpu) = measure(|| programmer.reconcile(&desired, true));
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.owned_routes.len(), peers);
    assert_eq!(first.plan.tunnel.is_empty(), !tunnel, "{}", first.plan);

    const RUNS: u32 = 20;
    let mut steady = Vec::new();
    let mut steady_cpu = 0.0;
    for _ in 0..RUNS {
        let (report, time, cpu) = measure(|| programmer.reconcile(&desired, true));
        steady.push(time);
        steady_cpu += cpu;
        assert!(
            report.plan.is_empty(),
            "steady state changed:\n{}",
            report.plan
        );
    }
    steady.sort();
    let (report, plan_time, plan_cpu) = measure(|| programmer.reconcile(&desired, false));
    assert!(report.plan.is_empty());
    let how = if tunnel {
        "behind a router: VXLAN (route, FDB and neighbour entry each)"
    } else {
        "on the LAN: plain routes"
    };
    println!("reconcile: {peers} peers {how}, {foreign} foreign routes");
    println!(
        "  first (make everything): {} wall, {} CPU",
        ms(first_time),
        ms_f(first_cpu)
    );
    println!(
        "  steady state, nothing to change ({RUNS} runs): p50 {}, max {} wall; {} CPU each",
        ms(steady[steady.len() / 2]),
        ms(steady[steady.len() - 1]),
        ms_f(steady_cpu / f64::from(RUNS))
    );
    println!(
        "  read and plan only: {} wall, {} CPU",
        ms(plan_time),
        ms_f(plan_cpu)
    );
    println!(
        "  routing work every 10 s in steady state: {:.2}% of a core",
        steady_cpu / f64::from(RUNS) / 10.0 * 100.0
    );
    let withdrawn = programmer.withdraw();
    assert!(withdrawn.owned_routes.is_empty());
}

fn ms_f(seconds: f64) -> String {
    format!("{:.1} ms", seconds * 1000.0)
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
