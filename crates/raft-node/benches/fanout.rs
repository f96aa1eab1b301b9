//! The leader's fan-out on the simulated network: one voter (the leader) and N learners, all
//! [`Core`]s in this process with in-memory stores, messages delivered at once and in order.
//!
//! ```text
//! cargo bench -p linkdns-raft --bench fanout -- [learners=1000] [changes=200]   # ~5 min at 1000
//! ```
//!
//! Prints the time to add the learners one by one (each joins as a real one does: a membership
//! change, then the log or a snapshot), then for `changes` container changes proposed one at a
//! time, the leader's CPU time and the bytes and messages it sends per committed change, and
//! the leader's cost while idle (heartbeats) per second of 20 ms ticks. Only the Raft core is
//! measured: the real transport (TLS, framing, the tokio tasks) costs more on top; see
//! docs/scale.md for the real cluster's figures.

// A benchmark's output is its figures, on stdout.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use linkdns_raft::{Core, CoreConfig, MemStore, Membership};
use linkdns_registry::{Command, Container, NodeInfo};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

/// Ticks per second of a real node (one every 20 ms).
const TICKS_PER_SECOND: u64 = 50;

type Node = Core<MemStore, u64>;

fn config(id: u64) -> CoreConfig {
    // As a real node: 20 ms ticks, elections after 50, heartbeats every 10.
    CoreConfig {
        id,
        bootstrap: id == 1,
        election_ticks: 50,
        heartbeat_ticks: 10,
        snapshot_every: 10_000,
        snapshot_log_bytes: 64 << 20,
        proposal_timeout_ticks: 250,
    }
}

fn info(id: u64) -> NodeInfo {
    NodeInfo {
        id,
        name: format!("h{id}"),
        peer_addr: format!("10.{}.{}.{}:7380", id >> 16, (id >> 8) & 255, id & 255),
    }
}

/// The leader's CPU time and what it sent.
#[derive(Default, Clone, Copy)]
struct Cost {
    busy: Duration,
    bytes: u64,
    messages: u64,
}

struct Sim {
    /// Node `id` at index `id`.
    nodes: Vec<Option<Node>>,
    queue: VecDeque<Message>,
    leader: Cost,
    done: BTreeSet<u64>,
    next_token: u64,
}

impl Sim {
    fn node(&mut self, id: u64) -> Option<&mut Node> {
        self.nodes.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// Runs `id`'s ready and queues what it sends (counted when the leader sends it).
    fn ready(&mut self, id: u64) {
        let started = Instant::now();
        let Some(node) = self.node(id) else { return };
        let progress = node.ready().expect("ready");
        if id == 1 {
            self.leader.busy += started.elapsed();
            self.leader.messages += progress.messages.len() as u64;
            self.leader.bytes += progress
                .messages
                .iter()
                .map(|m| u64::from(m.compute_size()))
                .sum::<u64>();
        }
        self.done.extend(progress.done.into_iter().map(|(t, _)| t));
        self.queue.extend(progress.messages);
    }

    /// Delivers every message (and those they cause) until nothing is in flight.
    fn settle(&mut self) {
        self.ready(1);
        while !self.queue.is_empty() {
            let mut touched = BTreeSet::new();
            while let Some(message) = self.queue.pop_front() {
                let (from, to) = (message.from, message.to);
                let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
                let started = Instant::now();
                if let Some(node) = self.node(to) {
                    node.step(message);
                    touched.insert(to);
                }
                if to == 1 {
                    self.leader.busy += started.elapsed();
                }
                if snapshot {
                    if let Some(sender) = self.node(from) {
                        sender.report_snapshot(to, true);
                    }
                    touched.insert(from);
                }
            }
            for id in touched {
                self.ready(id);
            }
        }
    }

    fn tick(&mut self) {
        for id in 1..self.nodes.len() as u64 {
            let started = Instant::now();
            if let Some(node) = self.node(id) {
                node.tick();
            }
            if id == 1 {
                self.leader.busy += started.elapsed();
            }
            self.ready(id);
        }
        self.settle();
    }

    fn propose(&mut self, command: &Command) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        let started = Instant::now();
        if let Some(leader) = self.node(1) {
            leader.propose(command, token);
        }
        self.leader.busy += started.elapsed();
        token
    }

    fn membership(&mut self, change: &Membership) {
        for _ in 0..100 {
            self.next_token += 1;
            let token = self.next_token;
            if let Some(leader) = self.node(1) {
                leader.propose_membership(change, token);
            }
            self.settle();
            for _ in 0..20 {
                if self.done.contains(&token) {
                    return;
                }
                self.tick();
            }
        }
        panic!("membership change {change:?} never landed");
    }
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .filter_map(|a| a.parse().ok())
        .collect();
    let learners = args.first().copied().unwrap_or(1000);
    let changes = args.get(1).copied().unwrap_or(200).max(1);

    let mut first = Core::open(config(1), MemStore::new(), 1).expect("open the leader");
    first.campaign().expect("campaign");
    let mut sim = Sim {
        nodes: vec![None, Some(first)],
        queue: VecDeque::new(),
        leader: Cost::default(),
        done: BTreeSet::new(),
        next_token: 0,
    };
    sim.settle();
    let token = sim.propose(&Command::UpsertNode(info(1)));
    sim.settle();
    assert!(sim.done.contains(&token), "the leader registers itself");

    let started = Instant::now();
    for id in 2..=learners + 1 {
        let core = Core::open(config(id), MemStore::new(), 1).expect("open a learner");
        sim.nodes.push(Some(core));
        sim.membership(&Membership::AddLearner {
            info: info(id),
            cert: [0; 32],
        });
    }
    for _ in 0..TICKS_PER_SECOND {
        sim.tick();
    }
    let joined = started.elapsed();
    let status = sim.node(1).map(|n| n.status()).expect("leader");
    let behind = status
        .matched
        .values()
        .filter(|m| **m < status.last_index)
        .count();
    println!(
        "1 leader + {learners} learners joined one by one in {:.1} s (simulated, one thread); {behind} behind the leader's last index {} after 1 s of ticks",
        joined.as_secs_f64(),
        status.last_index
    );

    // Steady state: one container change at a time, committed and delivered to every learner.
    let before = sim.leader;
    let mut tokens = Vec::new();
    for i in 0..changes {
        tokens.push(
            sim.propose(&Command::UpsertContainer(
                Container::new(&format!("{i:064x}"), &format!("svc{i}"), 1)
                    .with_ips([std::net::IpAddr::from([10, 200, (i >> 8) as u8, i as u8])]),
            )),
        );
        sim.settle();
    }
    let cost = Cost {
        busy: sim.leader.busy - before.busy,
        bytes: sim.leader.bytes - before.bytes,
        messages: sim.leader.messages - before.messages,
    };
    assert!(
        tokens.iter().all(|t| sim.done.contains(t)),
        "every change committed"
    );
    let status = sim.node(1).map(|n| n.status()).expect("leader");
    assert!(
        status.matched.values().all(|m| *m == status.last_index),
        "every learner has every change"
    );
    let per_change = |v: f64| v / changes as f64;
    println!(
        "per committed change (one at a time, {changes} changes): leader CPU {:.0} us ({:.2} us per learner), {:.0} bytes in {:.0} messages sent ({:.0} bytes per learner)",
        per_change(cost.busy.as_secs_f64() * 1e6),
        per_change(cost.busy.as_secs_f64() * 1e6) / learners.max(1) as f64,
        per_change(cost.bytes as f64),
        per_change(cost.messages as f64),
        per_change(cost.bytes as f64) / learners.max(1) as f64,
    );

    // Idle: heartbeats only.
    let before = sim.leader;
    let seconds = 5;
    for _ in 0..seconds * TICKS_PER_SECOND {
        sim.tick();
    }
    println!(
        "idle: leader CPU {:.1} ms per second, {:.0} bytes in {:.0} messages sent per second",
        (sim.leader.busy - before.busy).as_secs_f64() * 1e3 / seconds as f64,
        (sim.leader.bytes - before.bytes) as f64 / seconds as f64,
        (sim.leader.messages - before.messages) as f64 / seconds as f64,
    );
}
