//! Cluster benchmarks: documented commands that print figures (never pass/fail on time).
//!
//! ```text
//! cargo bench -p linkdns --bench cluster -- <propagation|churn|failover|scale|crash|all> [N]
//! ```
//!
//! - `propagation [containers=200] [hosts=3]`: hosts of the namespace test bed, each with its own
//!   Docker engine (3 voters, the rest learners); containers start one at a time on rotating
//!   hosts; the time from Docker's `start` event to the name being answered by each *other*
//!   host's DNS, p50/p99/max; the leader's CPU per committed change, and the bytes one learner
//!   (that starts nothing and is not asked) received per change.
//! - `churn [seconds=10] [starts per batch=100]`: 3 real `linkdns` voters on loopback (sled,
//!   fsync), plus an in-process learner whose 32 writers propose batches of container starts and
//!   stops (each start paired with a stop) through them; record changes committed per second.
//! - `failover [rounds=5]`: 3 real voters on loopback with records; kill -9 the leader while the
//!   two others are queried every 2 ms; failed queries, and the time until a new leader commits.
//! - `scale [records=100000]`: a real node that joins a cluster holding `records` records: its
//!   RSS over an empty joined node, per record; then kill -9 and the time from `linkdns run` to
//!   the first answer.
//! - `crash [rounds=100]`: 3 real voters under a steady write load from an in-process learner;
//!   each round kill -9 a random voter, restart it, and wait (at most 5 s) for a leader. Then:
//!   acknowledged records missing on any node, and restarts that failed or panicked.
//!
//! - `first-query [runs=100]`: 3 voters of the namespace test bed; mysql on h1; `runs` times
//!   `docker run --rm --label linkdns.links=mysql:db … nslookup db` on h2 and h3 in turn (an app
//!   that resolves its link at its first instruction), one after another; then again 5 at a
//!   time on one host (as `docker-compose up` starts a project's services). How many were
//!   answered mysql's address, and the latency linkdns added to those queries (held for an
//!   unknown asker), p50/p99/max.
//!
//! - `dns-mix [names=10000] [seconds=10]`: DNS as containers use it. One host of the namespace
//!   test bed with its Docker engine, `names` cluster names (another member's, written by an
//!   in-process member), and a container `app` with three link aliases; dnsperf runs in app's
//!   network namespace (pinned to core 0, linkdns with one UDP thread to core 1) against the
//!   bridge gateway, with three query files: in-zone hits alone; a realistic mix (70% in-zone
//!   hits, 20% NXDOMAIN, 10% app's link aliases); link aliases alone. Then Knot (one UDP
//!   worker, same core, same namespace, the same names from a zone file) with the hits. For
//!   each: server CPU per answered query at 20,000 q/s, lost queries, and max q/s. Needs
//!   dnsperf and knot.
//!
//! - `paths [megabytes=400]`: the container-to-container paths of the networks people have,
//!   on the namespace test bed: h1 and h3 on one LAN, h2 on another behind a router namespace
//!   running BIRD 2. From a container on h1: round-trip time (100 pings, 10 ms apart) and TCP
//!   throughput (`megabytes` MB over HTTP, busybox wget ← httpd) to a container on h3 (a plain
//!   route), to one on h2 through linkdns's VXLAN tunnel (encapsulation auto), and to the same
//!   one through the router (encapsulation never, the router having learned the subnets over
//!   BGP). The namespaces share this machine's cores, so the figures compare the paths with
//!   each other, not with a real network.
//!
//! All need root only for `propagation`, `first-query`, `dns-mix` and `paths` (network
//! namespaces, dockerd).

// A benchmark's output is its figures, on stdout.
#![allow(clippy::print_stdout)]

#[allow(dead_code)]
use linkdns_testbed as testbed;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use linkdns_cluster::{JoinAs, Token, Transport};
use linkdns_raft::{NodeConfig, NodeHandle, SledStore};
use linkdns_registry::{Command as RegistryCommand, Container, Subnet};
use tokio::sync::watch;

fn main() {
    testbed::use_linkdns_bin(env!("CARGO_BIN_EXE_linkdns"));
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mode = args.first().map(String::as_str).unwrap_or("all");
    let n = args.get(1).and_then(|s| s.parse::<u64>().ok());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let modes: Vec<&str> = match mode {
        "all" => vec!["churn", "failover", "scale", "crash", "propagation"],
        m => vec![m],
    };
    for m in modes {
        println!("== {m}");
        match m {
            "propagation" => propagation(
                n.unwrap_or(200) as usize,
                args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3),
            ),
            "first-query" => first_query(n.unwrap_or(100) as usize),
            "paths" => paths(n.unwrap_or(400)),
            "dns-mix" => dns_mix(
                &runtime,
                n.unwrap_or(10_000),
                args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10),
            ),
            "churn" => {
                let batch = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
                runtime.block_on(churn(n.unwrap_or(10), batch))
            }
            "failover" => runtime.block_on(failover(n.unwrap_or(5) as usize)),
            "scale" => runtime.block_on(scale(n.unwrap_or(100_000))),
            "crash" => runtime.block_on(crash(n.unwrap_or(100) as usize)),
            other => {
                eprintln!("unknown benchmark {other}; see the header of benches/cluster.rs");
                std::process::exit(2);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Real nodes on loopback.

const BASE: &str = "/tmp/linkdns-bench";

struct Proc {
    index: u16,
    dir: PathBuf,
    child: Option<Child>,
    first: Vec<String>,
}

impl Proc {
    fn dns(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5300 + self.index))
    }
    fn peer(&self) -> String {
        format!("127.0.0.1:{}", 7400 + self.index)
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.join(format!("h{}", self.index))
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("h{}.log", self.index)))
            .expect("log");
        let mut args = std::mem::replace(&mut self.first, vec!["run".into()]);
        args.extend(
            [
                "--data-dir",
                &self.data_dir().to_string_lossy(),
                "--node-name",
                &format!("h{}", self.index),
                "--dns-listen",
                &self.dns().to_string(),
                "--peer-listen",
                &self.peer(),
                "--admin-listen",
                &format!("127.0.0.1:{}", 7500 + self.index),
                "--docker",
                "unix:///nonexistent/docker.sock",
                "--upstream",
                "127.0.0.1:9",
            ]
            .map(String::from),
        );
        let child = Command::new(testbed::linkdns_bin())
            .args(&args)
            .env("LINKDNS_LOG", "info,raft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn linkdns");
        self.child = Some(child);
    }

    /// Waits until the node answers DNS (the zone apex); false if it exited or took > `limit`.
    fn wait_serving(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if ask(self.dns(), "cluster", 6, Duration::from_millis(50)).is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(testbed::linkdns_bin())
            .args([
                "status",
                "--json",
                "--data-dir",
                &self.data_dir().to_string_lossy(),
            ])
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The Prometheus text of its admin endpoint (empty when it does not answer).
    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let admin = SocketAddr::from(([127, 0, 0, 1], 7500 + self.index));
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(2))
        else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text.split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_string())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("h{}.log", self.index))).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `voters` real nodes: h1 bootstraps, the others join; returns once h1 sees them all voters.
fn real_cluster(name: &str, voters: u16) -> (Vec<Proc>, String) {
    let dir = PathBuf::from(BASE).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let mut procs: Vec<Proc> = (1..=voters)
        .map(|index| Proc {
            index,
            dir: dir.clone(),
            child: None,
            first: vec!["run".into()],
        })
        .collect();
    procs[0].spawn();
    assert!(
        procs[0].wait_serving(Duration::from_secs(20)),
        "h1 did not start:\n{}",
        procs[0].log()
    );
    let token = loop {
        let out = Command::new(testbed::linkdns_bin())
            .args([
                "token",
                "--data-dir",
                &procs[0].data_dir().to_string_lossy(),
            ])
            .output()
            .expect("token");
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let first_peer = procs[0].peer();
    for p in procs.iter_mut().skip(1) {
        p.first = vec![
            "join".into(),
            first_peer.clone(),
            "--token".into(),
            token.clone(),
        ];
        p.spawn();
        assert!(
            p.wait_serving(Duration::from_secs(30)),
            "h{} did not join:\n{}",
            p.index,
            p.log()
        );
    }
    wait(Duration::from_secs(60), "all voters", || {
        procs[0].status().is_some_and(|s| {
            s["members"].as_array().is_some_and(|m| {
                m.iter().filter(|m| m["role"] == "voter").count() == voters as usize
            })
        })
    });
    (procs, token)
}

fn wait(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An in-process learner that writes records through the cluster (it is never killed).
struct Injector {
    node: Arc<NodeHandle>,
    id: u64,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Injector {
    async fn join(via: &str, token: &str, port: u16) -> Injector {
        Injector::join_at(via, token, SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    /// Joins through `via`, serving and advertising `at` (an address of this namespace).
    async fn join_at(via: &str, token: &str, at: SocketAddr) -> Injector {
        let token: Token = token.parse().expect("token");
        let me = JoinAs {
            name: "bench".into(),
            advertise: Some(at),
            listen_port: at.port(),
        };
        let identity = linkdns_cluster::join(via, &token, &me).await.expect("join");
        let id = identity.node_id;
        let dir = tempfile::tempdir().expect("tempdir");
        let (stop, stopped) = watch::channel(false);
        let transport = Transport::new(identity, stopped).expect("transport");
        let config = NodeConfig {
            bootstrap: false,
            ..NodeConfig::new(id)
        };
        let store = SledStore::open(dir.path()).expect("store");
        let node = Arc::new(linkdns_raft::start(config, store, transport.outbox()).expect("start"));
        linkdns_cluster::attach(&transport, node.clone());
        transport.serve(at).await.expect("serve");
        transport.set_advertised(at);
        let injector = Injector {
            node,
            id,
            _stop: stop,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while injector.node.published().load().registry.node(id).is_none() {
            assert!(Instant::now() < deadline, "the injector never caught up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Its records' addresses (see `container`) are in subnets it claims, as a real node's
        // are: an address no node routes is answered to nobody.
        let subnets = (0..=u8::MAX)
            .filter_map(|b| Subnet::new(std::net::IpAddr::from([10, b, 0, 0]), 16))
            .take(16)
            .collect();
        assert!(
            injector
                .write(RegistryCommand::SetNodeSubnets { node: id, subnets })
                .await,
            "the injector's subnet claim failed"
        );
        injector
    }

    /// Writes its containers 0..`records` (see [`container`]), 1,000 to an entry.
    async fn load(&self, records: u64) {
        let mut written = 0;
        while written < records {
            let batch: Vec<RegistryCommand> = (written..(written + 1000).min(records))
                .map(|i| RegistryCommand::UpsertContainer(container(self.id, i)))
                .collect();
            written += batch.len() as u64;
            assert!(
                self.write(RegistryCommand::Batch(batch)).await,
                "write failed"
            );
        }
    }

    /// Proposes until applied (idempotent commands; the outcome of a failed try is unknown).
    async fn write(&self, command: RegistryCommand) -> bool {
        for _ in 0..50 {
            match self.node.propose(command.clone()).await {
                Ok(_) => return true,
                Err(linkdns_raft::Error::Registry(e)) => panic!("rejected: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        false
    }
}

/// A random-looking 64-hex-digit id, the same for the same `i` (splitmix64).
fn docker_id(i: u64) -> String {
    let mut state = i;
    (0..4)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            format!("{:016x}", z ^ (z >> 31))
        })
        .collect()
}

/// Container `i` of `node`: `svc<i>` at the `i`th address of 10.0.0.0/12, with an id that
/// looks like Docker's (64 hex digits, random: ids in counting order would fill the
/// registry's ordered maps as no real cluster does).
fn container(node: u64, i: u64) -> Container {
    Container::new(&docker_id(i), &format!("svc{i}"), node).with_ips([std::net::IpAddr::from([
        10,
        (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ])])
}

// ------------------------------------------------------------------------------------------
// DNS over UDP, by hand: one A query, was it answered with records?

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut q = vec![(id >> 8) as u8, id as u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Asks `server` for `name` (A = 1, SOA = 6); returns (rcode, answer count).
fn ask(server: SocketAddr, name: &str, qtype: u8, timeout: Duration) -> Option<(u8, u16)> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(timeout)).ok()?;
    let id = (Instant::now().elapsed().as_nanos() as u16) ^ 0x5a5a;
    let mut q = query(name, id);
    let len = q.len();
    q[len - 3] = qtype;
    socket.send_to(&q, server).ok()?;
    let mut buf = [0u8; 1500];
    loop {
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        if n >= 12 && buf[0] == (id >> 8) as u8 && buf[1] == id as u8 {
            return Some((buf[3] & 0x0f, u16::from_be_bytes([buf[6], buf[7]])));
        }
    }
}

fn answered(server: SocketAddr, name: &str) -> bool {
    matches!(ask(server, name, 1, Duration::from_millis(200)), Some((0, n)) if n > 0)
}

fn percentiles(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "n={} p50={:.1} p90={:.1} p99={:.1} max={:.1}",
        v.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        v[v.len() - 1]
    )
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------

async fn churn(seconds: u64, batch_size: u64) {
    let (procs, token) = real_cluster("churn", 3);
    let injector = Arc::new(Injector::join(&procs[0].peer(), &token, 7499).await);
    // Containers come and go: each batch starts `batch_size` and stops those of the batch before.
    let batch_size = batch_size.max(1);
    const WRITERS: u64 = 32;
    let changes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (injector, changes, stop) = (injector.clone(), changes.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let base = (w * 1_000_000) + (round % 2) * batch_size;
                let old = (w * 1_000_000) + ((round + 1) % 2) * batch_size;
                let mut batch = Vec::with_capacity(2 * batch_size as usize);
                for i in 0..batch_size {
                    batch.push(RegistryCommand::UpsertContainer(container(
                        injector.id,
                        base + i,
                    )));
                    batch.push(RegistryCommand::RemoveContainer {
                        node: injector.id,
                        id: container(injector.id, old + i).id,
                        version: 0,
                    });
                }
                if injector.write(RegistryCommand::Batch(batch)).await {
                    changes.fetch_add(2 * batch_size, Ordering::Relaxed);
                }
                round += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    let total = changes.load(Ordering::Relaxed);
    let status = procs[0].status().unwrap_or_default();
    println!(
        "3 voters (real processes, sled, fsync per ready) + 1 learner proposing; {WRITERS} writers, batches of {} changes",
        2 * batch_size
    );
    println!(
        "committed record changes: {total} in {:.1}s = {:.0}/s; leader term {} commit {}",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        status["term"],
        status["commit_index"]
    );
}

async fn failover(rounds: usize) {
    let (mut procs, token) = real_cluster("failover", 3);
    let injector = Injector::join(&procs[0].peer(), &token, 7498).await;
    injector
        .write(RegistryCommand::UpsertContainer(container(injector.id, 1)))
        .await;
    for p in &procs {
        wait(Duration::from_secs(10), "web on every node", || {
            answered(p.dns(), "svc1.cluster")
        });
    }
    let mut resume_ms = Vec::new();
    let mut failed_total = 0;
    let mut asked_total = 0;
    for round in 0..rounds {
        let leader_name = procs[0]
            .status()
            .or_else(|| procs[1].status())
            .and_then(|s| s["leader"].as_str().map(str::to_string))
            .expect("a leader");
        let dead = procs
            .iter()
            .position(|p| format!("h{}", p.index) == leader_name)
            .expect("leader is a real node");
        let survivors: Vec<usize> = (0..3).filter(|&i| i != dead).collect();
        let commit_before = procs[survivors[0]].status().expect("status")["commit_index"]
            .as_u64()
            .unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let (failed, asked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut loops = Vec::new();
        for &i in &survivors {
            let (server, stop, failed, asked) =
                (procs[i].dns(), stop.clone(), failed.clone(), asked.clone());
            loops.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    asked.fetch_add(1, Ordering::Relaxed);
                    match ask(server, "svc1.cluster", 1, Duration::from_secs(1)) {
                        Some((0, n)) if n > 0 => {}
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }));
        }
        std::thread::sleep(Duration::from_millis(300));
        let killed = Instant::now();
        procs[dead].kill();
        // Writes resume when a survivor sees a new leader whose commit index moved on.
        let mut resumed = None;
        while killed.elapsed() < Duration::from_secs(10) {
            let s = procs[survivors[0]].status();
            if let Some(s) = s {
                let new_leader = s["leader"].as_str().is_some_and(|l| l != leader_name);
                if new_leader && s["commit_index"].as_u64().unwrap_or(0) > commit_before {
                    resumed = Some(killed.elapsed());
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // A write through the new leader confirms it.
        let t = Instant::now();
        let ok = injector
            .write(RegistryCommand::UpsertContainer(container(
                injector.id,
                100 + round as u64,
            )))
            .await;
        let write_ms = t.elapsed().as_secs_f64() * 1000.0;
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        for l in loops {
            let _ = l.join();
        }
        let (f, a) = (
            failed.load(Ordering::Relaxed),
            asked.load(Ordering::Relaxed),
        );
        failed_total += f;
        asked_total += a;
        let resumed_ms = resumed.map(|d| d.as_secs_f64() * 1000.0);
        println!(
            "round {round}: killed leader {leader_name}; survivors answered {a} queries, {f} failed; new leader committing after {} ms; a write then took {:.0} ms ({})",
            resumed_ms.map_or("never".into(), |m| format!("{m:.0}")),
            write_ms,
            if ok { "applied" } else { "FAILED" }
        );
        if let Some(m) = resumed_ms {
            resume_ms.push(m);
        }
        procs[dead].spawn();
        assert!(
            procs[dead].wait_serving(Duration::from_secs(20)),
            "restart failed"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    println!("failed queries on survivors: {failed_total} of {asked_total}");
    println!("time until writes resume (ms): {}", percentiles(resume_ms));
}

async fn scale(records: u64) {
    let (procs, token) = real_cluster("scale", 1);
    let injector = Injector::join(&procs[0].peer(), &token, 7497).await;
    // Real processes that join the cluster (`linkdns join`) as hosts `index`.
    let joiner = |index: u16| Proc {
        index,
        dir: PathBuf::from(BASE).join("scale"),
        child: None,
        first: vec![
            "join".into(),
            procs[0].peer(),
            "--token".into(),
            token.clone(),
        ],
    };
    // The measured node: it joins and then holds everything.
    let mut measured = joiner(9);
    measured.spawn();
    assert!(
        measured.wait_serving(Duration::from_secs(30)),
        "join:\n{}",
        measured.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    let empty_kb = rss_kb(measured.pid());
    let started = Instant::now();
    injector.load(records).await;
    let last = format!("svc{}.cluster", records - 1);
    wait(
        Duration::from_secs(120),
        "the measured node to catch up",
        || answered(measured.dns(), &last),
    );
    println!(
        "loaded {records} records in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    let full_kb = rss_kb(measured.pid());
    println!(
        "joined node RSS: empty {empty_kb} kB, with {records} records {full_kb} kB: {:.0} bytes per record",
        (full_kb.saturating_sub(empty_kb) * 1024) as f64 / records as f64
    );
    // Snapshots are taken on their own thread: the Raft thread's ticks (every 20 ms) should
    // not wait for them.
    for (label, text) in [
        ("leader h1", procs[0].metrics()),
        ("joined h9", measured.metrics()),
    ] {
        println!(
            "{label}: {} snapshots while loading, the last {:.1} MB in {:.0} ms (encoded and written off the Raft thread); largest gap between Raft ticks since start {:.1} ms (target <= 50)",
            metric(&text, "linkdns_snapshots_total"),
            metric(&text, "linkdns_snapshot_bytes") / 1e6,
            metric(&text, "linkdns_snapshot_seconds") * 1000.0,
            metric(&text, "linkdns_raft_max_tick_gap_seconds") * 1000.0,
        );
    }
    for attempt in 0..3 {
        measured.kill();
        let t = Instant::now();
        measured.spawn();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !answered(measured.dns(), &last) {
            assert!(
                Instant::now() < deadline,
                "no answer after restart:\n{}",
                measured.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let answered_after = t.elapsed();
        std::thread::sleep(Duration::from_secs(2));
        println!(
            "restart {attempt}: kill -9, `linkdns run`, first answer for {last} after {:.0} ms; RSS then {} kB",
            answered_after.as_secs_f64() * 1000.0,
            rss_kb(measured.pid())
        );
    }
    // A new node joining the cluster as it is now (all records in the leader's snapshot):
    // from `linkdns join` to its first answer for the last record, asked every 20 ms with a
    // 20 ms timeout.
    let mut late = joiner(8);
    let t = Instant::now();
    late.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(ask(late.dns(), &last, 1, Duration::from_millis(20)), Some((0, n)) if n > 0) {
        assert!(
            Instant::now() < deadline,
            "the late joiner never caught up:\n{}",
            late.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "a node joining the cluster of {records} records: `linkdns join` to its first answer for {last} in {:.0} ms (target <= 2000)",
        t.elapsed().as_secs_f64() * 1000.0
    );
    drop(injector);
}

async fn crash(rounds: usize) {
    let (mut procs, token) = real_cluster("crash", 3);
    let injector = Arc::new(Injector::join(&procs[0].peer(), &token, 7496).await);
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (injector, acked, stop) = (injector.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                if injector
                    .write(RegistryCommand::UpsertContainer(container(injector.id, i)))
                    .await
                {
                    if let Ok(mut a) = acked.lock() {
                        a.push(i);
                    }
                }
                i += 4;
            }
        }));
    }
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut failed_restarts = 0;
    let mut kills: HashMap<u16, usize> = HashMap::new();
    for round in 0..rounds {
        let victim = (next() % 3) as usize;
        tokio::time::sleep(Duration::from_millis(next() % 400)).await;
        procs[victim].kill();
        *kills.entry(procs[victim].index).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(next() % 300)).await;
        procs[victim].spawn();
        let p = &mut procs[victim];
        let ok = tokio::task::block_in_place(|| p.wait_serving(Duration::from_secs(20)));
        if !ok {
            failed_restarts += 1;
            println!("round {round}: h{} did not come back", p.index);
            p.kill();
            p.spawn();
        }
        // Each round is one crash and recovery: the next kill waits for a leader (at most 5 s),
        // or kills faster than elections (1.0-1.4 s) would leave the cluster leaderless.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && !procs
                .iter()
                .any(|p| p.status().is_some_and(|s| s["role"] == "leader"))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if round % 10 == 9 {
            let n = acked.lock().map_or(0, |a| a.len());
            let s = injector.node.status();
            let views: Vec<String> = procs
                .iter()
                .map(|p| {
                    p.status().map_or("-".into(), |s| {
                        format!(
                            "h{}:{} t{} c{}",
                            p.index, s["role"], s["term"], s["commit_index"]
                        )
                    })
                })
                .collect();
            println!(
                "round {}: {n} records acknowledged so far; writer sees leader {:?} term {} commit {}; {}",
                round + 1,
                s.leader,
                s.term,
                s.commit_index,
                views.join(", ")
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    // Every acknowledged record must be on every voter once they agree.
    let mut missing = 0;
    for p in &procs {
        let server = p.dns();
        let deadline = Instant::now() + Duration::from_secs(60);
        let last = acked.iter().max().copied().unwrap_or(0);
        while !answered(server, &format!("svc{last}.cluster")) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for &i in &acked {
            if !answered(server, &format!("svc{i}.cluster")) {
                missing += 1;
                if missing < 10 {
                    println!("svc{i} missing on h{}", p.index);
                }
            }
        }
    }
    let panics: usize = procs
        .iter()
        .map(|p| p.log().matches("panicked").count())
        .sum();
    println!(
        "{rounds} rounds of kill -9 (per node: {:?}); {} records acknowledged; missing on any node: {missing}; restarts that failed: {failed_restarts}; panics in logs: {panics}",
        {
            let mut k: Vec<_> = kills.into_iter().collect();
            k.sort();
            k
        },
        acked.len()
    );
}

// ------------------------------------------------------------------------------------------

fn propagation(containers: usize, n_hosts: usize) {
    let available_before = mem_available_kb();
    let mut hosts: Vec<testbed::Host> = (0..n_hosts).map(|_| testbed::Host::on_lan()).collect();
    let extra = ["--dns-listen", "0.0.0.0:53"];
    hosts[0].start_linkdns(&extra);
    let token = hosts[0].token();
    let (first, rest) = hosts.split_at_mut(1);
    for h in rest {
        h.join_linkdns(&first[0], &token, &extra);
    }
    let voters = n_hosts.min(3);
    testbed::wait_until(
        Duration::from_secs(180),
        "every host a member, 3 voters",
        || {
            hosts[0].status_json()["members"]
                .as_array()
                .is_some_and(|m| {
                    m.len() == n_hosts
                        && m.iter().filter(|m| m["role"] == "voter").count() == voters
                })
        },
    );
    testbed::wait_until(
        Duration::from_secs(60),
        "every host knowing every member",
        || {
            hosts.iter().all(|h| {
                h.status_json()["members"]
                    .as_array()
                    .is_some_and(|m| m.len() == n_hosts)
            })
        },
    );
    let statuses: Vec<serde_json::Value> = hosts.iter().map(|h| h.status_json()).collect();
    let leader = statuses
        .iter()
        .position(|s| s["role"] == "leader")
        .unwrap_or(0);
    // A learner that neither starts containers nor is asked (when there is one): what it
    // receives is the cluster's traffic alone.
    let learner = statuses.iter().position(|s| s["role"] == "learner");
    let silent = |h: usize| Some(h) == learner;
    let learner = learner.unwrap_or((leader + 1) % n_hosts);
    let starters: Vec<usize> = (0..n_hosts).filter(|&h| !silent(h)).collect();
    let per_host_mb =
        available_before.saturating_sub(mem_available_kb()) as f64 / 1024.0 / n_hosts as f64;
    println!(
        "{n_hosts} hosts up: {per_host_mb:.0} MB of the machine's memory each (dockerd, containerd, linkdns, namespace); linkdns RSS {} kB on the leader, {} kB on a learner",
        rss_kb(hosts[leader].linkdns_pid().unwrap_or(0)),
        rss_kb(hosts[learner].linkdns_pid().unwrap_or(0))
    );
    // The cluster's cost with nothing changing (heartbeats, liveness), to tell it apart from
    // the cost of changes.
    let idle = Duration::from_secs(10);
    let (cpu0, rx0) = (linkdns_cpu_ns(&hosts[leader]), rx_bytes(&hosts[learner]));
    std::thread::sleep(idle);
    let idle_cpu_per_s = (linkdns_cpu_ns(&hosts[leader]) - cpu0) as f64 / idle.as_secs_f64();
    let idle_rx_per_s = (rx_bytes(&hosts[learner]) - rx0) as f64 / idle.as_secs_f64();
    println!(
        "idle cluster: leader CPU {:.1} ms/s, a learner receives {:.0} bytes/s",
        idle_cpu_per_s / 1e6,
        idle_rx_per_s
    );
    let run_started = Instant::now();
    let (leader_cpu0, learner_rx0) = (linkdns_cpu_ns(&hosts[leader]), rx_bytes(&hosts[learner]));
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // (container, answering host index) -> wall-clock ns of the first answer.
    let mut answered_at: HashMap<(String, usize), u128> = HashMap::new();
    for i in 0..containers {
        let on = starters[i % starters.len()];
        let name = format!("p{i}");
        hosts[on].run_container(&name, &[]);
        let others: Vec<usize> = (0..n_hosts).filter(|&h| h != on && !silent(h)).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut pending = others.clone();
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|&h| {
                let server = SocketAddr::from((hosts[h].addr, 53));
                if matches!(ask(server, &format!("{name}.cluster"), 1, Duration::from_millis(100)), Some((0, n)) if n > 0) {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos());
                    answered_at.insert((name.clone(), h), now);
                    false
                } else {
                    true
                }
            });
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    let leader_cpu = linkdns_cpu_ns(&hosts[leader]).saturating_sub(leader_cpu0);
    let learner_rx = rx_bytes(&hosts[learner]).saturating_sub(learner_rx0);
    let run_secs = run_started.elapsed().as_secs_f64();
    // Docker's own start times.
    let mut started: HashMap<String, u128> = HashMap::new();
    for h in &hosts {
        let until = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 1;
        let out = h.docker(&[
            "events",
            "--since",
            &since.to_string(),
            "--until",
            &until.to_string(),
            "--filter",
            "event=start",
            "--format",
            "{{.TimeNano}} {{.Actor.Attributes.name}}",
        ]);
        for line in out.lines() {
            let mut parts = line.split_whitespace();
            if let (Some(t), Some(n)) = (parts.next(), parts.next()) {
                if let Ok(t) = t.parse::<u128>() {
                    started.insert(n.to_string(), t);
                }
            }
        }
    }
    let mut ms = Vec::new();
    let mut never = 0;
    for i in 0..containers {
        let name = format!("p{i}");
        let on = starters[i % starters.len()];
        for h in (0..n_hosts).filter(|&h| h != on && !silent(h)) {
            match (answered_at.get(&(name.clone(), h)), started.get(&name)) {
                (Some(&a), Some(&s)) => ms.push(a.saturating_sub(s) as f64 / 1e6),
                _ => never += 1,
            }
        }
    }
    println!(
        "{containers} containers on {n_hosts} hosts ({voters} voters); Docker start event -> answered by another host's DNS (ms): {}; never answered within 10 s: {never}",
        percentiles(ms)
    );
    // Each container start is one committed change (its record). Over the run, the leader's
    // CPU and the learner's received bytes also carry the idle cost: shown whole, and net of
    // the idle rate measured before.
    let per_change = |total: f64, idle_per_s: f64| {
        (
            total / containers as f64,
            (total - idle_per_s * run_secs).max(0.0) / containers as f64,
        )
    };
    let (cpu_all, cpu_net) = per_change(leader_cpu as f64, idle_cpu_per_s);
    let (rx_all, rx_net) = per_change(learner_rx as f64, idle_rx_per_s);
    println!(
        "leader (h{}) CPU per committed change: {:.0} us with the idle cost, {:.0} us net of it; a learner (h{}) received per change {:.0} bytes with the idle traffic, {:.0} net of it ({containers} changes in {run_secs:.0} s)",
        leader + 1,
        cpu_all / 1000.0,
        cpu_net / 1000.0,
        learner + 1,
        rx_all,
        rx_net
    );
}

/// The machine's available memory, in kB.
fn mem_available_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// CPU time of every thread of `h`'s linkdns, in ns (the scheduler's own accounting).
fn linkdns_cpu_ns(h: &testbed::Host) -> u64 {
    cpu_ns(h.linkdns_pid().unwrap_or(0))
}

/// A child process of the bench, killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time of every thread of process `pid`, in ns (the scheduler's own accounting).
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Bytes received on `h`'s interfaces other than loopback (its namespace's own counters).
fn rx_bytes(h: &testbed::Host) -> u64 {
    let out = h.exec("cat", &["/proc/net/dev"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .filter_map(|(_, counters)| counters.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

// ------------------------------------------------------------------------------------------
// First queries of new containers, on the namespace test bed.

/// The Prometheus text of `h`'s admin endpoint.
fn metrics(h: &testbed::Host) -> String {
    let out = h.exec(
        "busybox",
        &["wget", "-q", "-O", "-", "http://127.0.0.1:7381/metrics"],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the metric line that starts with `prefix` (0 when there is none).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `(upper bound in seconds, cumulative count)` of the held-time histogram.
fn held_buckets(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("linkdns_dns_held_seconds_bucket{le=\"")?;
            let (le, value) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.parse().ok()?))
        })
        .collect()
}

/// Round trips and throughput from container `from` on `h` to `to`: (rtt min/avg/max in ms,
/// MB/s).
fn path_figures(h: &testbed::Host, from: &str, to: &str, megabytes: u64) -> (String, f64) {
    let ping = h.try_docker(&["exec", from, "ping", "-q", "-c", "100", "-i", "0.01", to]);
    let text = String::from_utf8_lossy(&ping.stdout).into_owned();
    let rtt = text
        .lines()
        .find_map(|l| l.strip_prefix("round-trip min/avg/max = "))
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|| format!("no answer: {text}"));
    let lost = text
        .lines()
        .find(|l| l.contains("packet loss"))
        .unwrap_or_default()
        .to_string();
    // Timed inside the container (/proc/uptime, 10 ms), so docker exec's own cost is out.
    let script = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); wget -q -O /dev/null http://{to}:8080/big || exit 1; b=$(cut -d' ' -f1 /proc/uptime); echo $a $b"
    );
    let out = h.try_docker(&["exec", from, "sh", "-c", &script]);
    let times: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let rate = match times.as_slice() {
        [a, b] if b > a => megabytes as f64 / (b - a),
        _ => 0.0,
    };
    (format!("{rtt} ms ({lost})").replace(" ms ms", " ms"), rate)
}

/// Waits until `h` routes `subnet` as `how` says (`ip route` text it must contain).
fn wait_route(h: &testbed::Host, subnet: &str, how: &str) {
    testbed::wait_until(Duration::from_secs(60), how, || {
        let out = h.exec("ip", &["route", "show", subnet]);
        String::from_utf8_lossy(&out.stdout).contains(how)
    });
}

fn paths(megabytes: u64) {
    use testbed::{Bird, Host, Lan};
    let mut hosts = [
        Host::on_routed(Lan::A),
        Host::on_routed(Lan::B),
        Host::on_routed(Lan::A),
    ];
    let _bird = Bird::start();
    let router = |lan: Lan| lan.router().to_string();
    let args = |lan: Lan, encapsulation: &str| {
        vec![
            "--bgp-peer".to_string(),
            router(lan),
            "--encapsulation".to_string(),
            encapsulation.to_string(),
        ]
    };
    let lans = [Lan::A, Lan::B, Lan::A];
    let first = args(lans[0], "auto");
    hosts[0].start_linkdns(&first.iter().map(String::as_str).collect::<Vec<_>>());
    let token = hosts[0].token();
    let (head, rest) = hosts.split_at_mut(1);
    for (h, lan) in rest.iter_mut().zip(&lans[1..]) {
        let a = args(*lan, "auto");
        h.join_linkdns(
            &head[0],
            &token,
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }
    testbed::wait_until(Duration::from_secs(60), "three voters", || {
        hosts[0].status_json()["members"]
            .as_array()
            .is_some_and(|m| m.iter().filter(|m| m["role"] == "voter").count() == 3)
    });
    let serve = format!(
        "dd if=/dev/zero of=/tmp/big bs=1048576 count={megabytes} 2>/dev/null && httpd -f -p 8080 -h /tmp"
    );
    for h in &hosts[1..] {
        h.docker(&[
            "run",
            "-d",
            "--name",
            "srv",
            testbed::IMAGE,
            "sh",
            "-c",
            &serve,
        ]);
    }
    let on_h2 = hosts[1].container_ip("srv");
    let on_h3 = hosts[2].container_ip("srv");
    hosts[0].run_container("cli", &[]);
    let subnet = |h: &Host| format!("192.168.{}.0/24", h.index);
    wait_route(
        &hosts[0],
        &subnet(&hosts[2]),
        &format!("via {}", hosts[2].addr),
    );
    wait_route(&hosts[0], &subnet(&hosts[1]), "dev linkdns.vx");
    wait_route(&hosts[1], &subnet(&hosts[0]), "dev linkdns.vx");
    // Let each server write its file.
    std::thread::sleep(Duration::from_secs(2));
    let mut rows = Vec::new();
    rows.push((
        "direct (same LAN, plain route)",
        path_figures(&hosts[0], "cli", &on_h3, megabytes),
    ));
    rows.push((
        "VXLAN (other LAN, through the tunnel)",
        path_figures(&hosts[0], "cli", &on_h2, megabytes),
    ));
    // Through the router: h1 and h2 without encapsulation, the router knowing the subnets.
    for (i, lan) in [(0, Lan::A), (1, Lan::B)] {
        hosts[i].stop_linkdns();
        let a = args(lan, "never");
        hosts[i].start_linkdns(&a.iter().map(String::as_str).collect::<Vec<_>>());
    }
    wait_route(
        &hosts[0],
        &subnet(&hosts[1]),
        &format!("via {}", Lan::A.router()),
    );
    wait_route(
        &hosts[1],
        &subnet(&hosts[0]),
        &format!("via {}", Lan::B.router()),
    );
    rows.push((
        "via the router (other LAN, BGP-learned routes)",
        path_figures(&hosts[0], "cli", &on_h2, megabytes),
    ));
    println!("container on h1 to a container on each path ({megabytes} MB over TCP; 100 pings):");
    for (label, (rtt, rate)) in rows {
        println!("  {label:<48} {rate:>8.1} MB/s   rtt min/avg/max {rtt}");
    }
}

fn first_query(runs: usize) {
    let mut hosts: Vec<testbed::Host> = (0..3).map(|_| testbed::Host::on_lan()).collect();
    hosts[0].start_linkdns(&[]);
    let token = hosts[0].token();
    let (first, rest) = hosts.split_at_mut(1);
    for h in rest {
        h.join_linkdns(&first[0], &token, &[]);
    }
    testbed::wait_until(Duration::from_secs(60), "three voters", || {
        hosts[0].status_json()["members"]
            .as_array()
            .is_some_and(|m| m.iter().filter(|m| m["role"] == "voter").count() == 3)
    });
    hosts[0].run_container("mysql", &[]);
    let mysql = hosts[0].container_ip("mysql");
    for h in &hosts[1..] {
        testbed::wait_until(Duration::from_secs(20), "mysql replicated", || {
            h.dig(&["@127.0.0.1", "mysql.cluster", "A"]).rdata() == [mysql.clone()]
        });
    }
    // One after another, as a user starts containers by hand; then `parallel` at once on one
    // host, as `docker-compose up` starts a project's services (the inference from Docker's
    // `connect` event is ambiguous then, and queries wait for the watcher).
    first_queries(&hosts, &mysql, runs, 1, false);
    first_queries(&hosts, &mysql, runs, 5, false);
    // Five different services at once: each has link aliases of its own.
    first_queries(&hosts, &mysql, runs, 5, true);
}

/// `runs` containers that resolve their link at their first instruction, started `parallel` at
/// a time on h2 or h3 (alternately), all alike or (`distinct`) each with link aliases of its
/// own; prints how many got mysql's address and the latency that linkdns added to the queries
/// the hosts answered meanwhile.
fn first_queries(
    hosts: &[testbed::Host],
    mysql: &str,
    runs: usize,
    parallel: usize,
    distinct: bool,
) {
    let before: Vec<String> = hosts[1..].iter().map(metrics).collect();
    let lookup = |h: &testbed::Host, k: usize| {
        let dns = h.gateway.to_string();
        let links = if distinct {
            format!("linkdns.links=mysql:db,svc{k}:peer{k}")
        } else {
            "linkdns.links=mysql:db".to_string()
        };
        let out = h.try_docker(&[
            "run",
            "--rm",
            "--label",
            &links,
            "--dns",
            &dns,
            "--dns-search",
            "cluster",
            testbed::IMAGE,
            "nslookup",
            "db",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut right = 0;
    let mut wrong = Vec::new();
    for round in 0..runs.div_ceil(parallel) {
        let h = &hosts[1 + round % 2];
        let outputs: Vec<String> = std::thread::scope(|s| {
            let started: Vec<_> = (0..parallel)
                .map(|k| s.spawn(move || lookup(h, k)))
                .collect();
            started
                .into_iter()
                .map(|t| t.join().unwrap_or_default())
                .collect()
        });
        for text in outputs {
            if text.contains(mysql) {
                right += 1;
            } else {
                wrong.push(format!("round {round} on {}: {text}", h.ns));
            }
        }
    }
    let total = runs.div_ceil(parallel) * parallel;
    let after: Vec<String> = hosts[1..].iter().map(metrics).collect();
    // Every query the askers' hosts answered meanwhile came from the new containers.
    let mut queries = 0.0;
    let mut held = 0.0;
    let mut expired = 0.0;
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for (b, a) in before.iter().zip(&after) {
        let answered = |t: &str| {
            t.lines()
                .filter(|l| l.starts_with("linkdns_dns_queries_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        queries += answered(a) - answered(b);
        held += metric(a, "linkdns_dns_held_seconds_count")
            - metric(b, "linkdns_dns_held_seconds_count");
        expired += metric(a, "linkdns_dns_held_expired_total")
            - metric(b, "linkdns_dns_held_expired_total");
        let (hb, ha) = (held_buckets(b), held_buckets(a));
        for (i, (le, count)) in ha.iter().enumerate() {
            let was = hb.get(i).map_or(0.0, |(_, c)| *c);
            match buckets.get_mut(i) {
                Some(slot) => slot.1 += count - was,
                None => buckets.push((*le, count - was)),
            }
        }
    }
    // Added latency per query: 0 for those not held, the bucket's bound for held ones.
    let quantile = |q: f64| -> String {
        let rank = (q * queries).ceil();
        let not_held = queries - held;
        if rank <= not_held {
            return "0 ms (not held)".into();
        }
        let need = rank - not_held;
        buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= need)
            .map_or("?".into(), |(le, _)| format!("<= {:.1} ms", le * 1000.0))
    };
    let alike = if distinct {
        "each with links of its own"
    } else {
        "alike"
    };
    println!("runs: {total}, {parallel} at a time, {alike} (`docker run --rm --label linkdns.links=mysql:db… … nslookup db` on h2/h3, mysql on h1)");
    println!("answered mysql's address: {right}/{total}");
    for w in wrong.iter().take(5) {
        println!("  wrong: {w}");
    }
    println!("queries answered on h2/h3 meanwhile: {queries}; held for an unknown asker: {held} (waited out: {expired})");
    println!(
        "added latency: p50 {}, p99 {}, max {}",
        quantile(0.5),
        quantile(0.99),
        quantile(1.0)
    );
}

// ------------------------------------------------------------------------------------------
// DNS as containers use it.

fn dns_mix(runtime: &tokio::runtime::Runtime, names: u64, seconds: u64) {
    for tool in ["dnsperf", "knotd", "taskset"] {
        assert!(
            testbed::run("sh", &["-c", &format!("command -v {tool}")])
                .status
                .success(),
            "dns-mix needs {tool} (apt-get install dnsperf knot util-linux)"
        );
    }
    // Its Docker engine is up already.
    let mut h = testbed::Host::on_lan();
    // As a service runs: warnings only (the test bed's debug log would cost each query).
    let args: Vec<String> = [
        "run",
        "--data-dir",
        &h.data_dir().to_string_lossy(),
        "--node-name",
        "h1",
        "--docker",
        &format!("unix://{}", h.docker_sock().display()),
        "--dns-threads",
        "1",
    ]
    .map(String::from)
    .to_vec();
    h.start_linkdns_service(&args, &[("LINKDNS_LOG".into(), "warn".into())]);
    h.wait_linkdns_answers();
    let injector = runtime.block_on(async {
        let injector = Injector::join_at(
            &h.peer_addr(),
            &h.token(),
            SocketAddr::from((testbed::lan_root(), 7496)),
        )
        .await;
        injector.load(names).await;
        injector
    });
    let last = format!("svc{}.cluster", names - 1);
    testbed::wait_until(
        Duration::from_secs(60),
        "the host to answer the last name",
        || !h.dig(&["@127.0.0.1", &last, "A"]).rdata().is_empty(),
    );
    // app links three of them; its resolver is the node on the bridge's gateway.
    h.run_container(
        "app",
        &[
            "--label",
            "linkdns.links=svc1:db,svc2:cache,svc3:queue",
            "--dns",
            &h.gateway.to_string(),
        ],
    );
    let app_pid = h.docker(&["inspect", "-f", "{{.State.Pid}}", "app"]);
    testbed::wait_until(Duration::from_secs(10), "app's link alias", || {
        let out = h.try_docker(&["exec", "app", "nslookup", "db"]);
        String::from_utf8_lossy(&out.stdout).contains("10.0.0.1")
    });
    let pid = h.linkdns_pid().expect("linkdns runs").to_string();
    let pinned = testbed::run("taskset", &["-a", "-p", "-c", "1", &pid]);
    assert!(pinned.status.success(), "taskset: {pinned:?}");

    // Knot beside it in the same namespace, pinned to the same core, serving the same names
    // from a zone file: the same path through the bridge, for in-zone hits.
    let knot_dir = h.dir.join("knot");
    std::fs::create_dir_all(&knot_dir).expect("knot dir");
    let mut zone = String::from(
        "$ORIGIN cluster.\n$TTL 5\n@ SOA ns.cluster. hostmaster.cluster. 1 60 10 600 5\n@ NS ns\nns A 127.0.0.1\n",
    );
    for i in 0..names {
        let ip = container(0, i).ips().next().expect("an address");
        zone.push_str(&format!("svc{i} A {ip}\n"));
    }
    std::fs::write(knot_dir.join("cluster.zone"), zone).expect("zone");
    let knot_conf = knot_dir.join("knot.conf");
    let kd = knot_dir.display();
    std::fs::write(
        &knot_conf,
        format!(
            "server:\n    listen: {}@5354\n    rundir: \"{kd}\"\n    udp-workers: 1\n    tcp-workers: 1\n    background-workers: 1\ndatabase:\n    storage: \"{kd}\"\nlog:\n  - target: stderr\n    any: warning\nzone:\n  - domain: cluster\n    file: \"{kd}/cluster.zone\"\n    storage: \"{kd}\"\n    journal-content: none\n    zonefile-sync: -1\n",
            h.gateway
        ),
    )
    .expect("knot.conf");
    // `ip netns exec` and taskset exec: the child is knotd.
    let knot = Command::new("ip")
        .args(["netns", "exec", &h.ns, "taskset", "-c", "1", "knotd", "-c"])
        .arg(&knot_conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("knotd");
    // Killed also when the bench fails.
    let knot = KillOnDrop(knot);
    let knot_pid = knot.0.id();
    testbed::wait_until(Duration::from_secs(10), "knot to answer", || {
        let at = format!("@{}", h.gateway);
        !h.dig(&[&at, "-p", "5354", "svc1.cluster", "A"])
            .rdata()
            .is_empty()
    });

    let hit = move |k: u64| format!("svc{}.cluster A", k * 7919 % names);
    let links = ["db A", "cache A", "queue A"];
    type Line = Box<dyn Fn(u64) -> String>;
    let mix: Line = Box::new(move |k: u64| match k % 10 {
        0..=6 => hit(k),
        7 | 8 => format!("nosuch{k}.cluster A"),
        _ => links[(k / 10 % 3) as usize].to_string(),
    });
    let linkdns_pid = h.linkdns_pid().expect("linkdns runs");
    let runs: [(&str, u16, u32, Line); 4] = [
        ("linkdns: in-zone hits", 53, linkdns_pid, Box::new(hit)),
        ("linkdns: mix 70/20/10", 53, linkdns_pid, mix),
        (
            "linkdns: link aliases",
            53,
            linkdns_pid,
            Box::new(move |k: u64| links[(k % 3) as usize].to_string()),
        ),
        ("knot: in-zone hits", 5354, knot_pid, Box::new(hit)),
    ];
    println!(
        "{names} names; linkdns (1 UDP thread) and knot (1 UDP worker) on core 1; dnsperf in app's network namespace on core 0, to {}",
        h.gateway
    );
    println!(
        "{:<22} {:>22} {:>14} {:>10}",
        "server: queries", "cpu_us/query@20000", "lost@20000", "max_qps"
    );
    for (label, port, pid, line) in &runs {
        let file = h.dir.join("queries.txt");
        let text: String = (0..names.max(1000)).map(|k| line(k) + "\n").collect();
        std::fs::write(&file, text).expect("query file");
        let dnsperf = |extra: &[&str]| -> String {
            let file = file.to_string_lossy();
            let (server, port) = (h.gateway.to_string(), port.to_string());
            let mut argv = vec![
                "-t", &app_pid, "-n", "taskset", "-c", "0", "dnsperf", "-s", &server, "-p", &port,
                "-d", &file, "-c", "4",
            ];
            argv.extend_from_slice(extra);
            let out = testbed::run("nsenter", &argv);
            assert!(out.status.success(), "dnsperf: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let field = |out: &str, key: &str| -> f64 {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or(0.0)
        };
        let secs = seconds.to_string();
        dnsperf(&["-l", "2", "-Q", "20000"]);
        let t0 = cpu_ns(*pid);
        let out = dnsperf(&["-l", &secs, "-Q", "20000"]);
        let cpu = cpu_ns(*pid) - t0;
        let completed = field(&out, "Queries completed:");
        let lost = field(&out, "Queries lost:");
        let flat = dnsperf(&["-l", &secs, "-q", "2000"]);
        println!(
            "{label:<22} {:>22.1} {lost:>14} {:>10.0}",
            cpu as f64 / 1000.0 / completed.max(1.0),
            field(&flat, "Queries per second:")
        );
    }
    drop(knot);
    drop(injector);
}
