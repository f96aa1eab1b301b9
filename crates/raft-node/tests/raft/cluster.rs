//! Clusters of [`Core`]s on a simulated network, driven in logical time: messages are delivered,
//! dropped, delayed, cut by partitions; nodes crash and restart on the store they had.
//!
//! The network is driven by a seeded generator, so a failing seed replays the same message
//! schedule. (raft-rs draws its randomized election timeouts from its own generator, so leader
//! choice can still differ between runs; the assertions hold for every schedule.)

use std::collections::{BTreeMap, BTreeSet, HashMap};

use linkdns_raft::{
    committed_state, seed_single_voter, Core, CoreConfig, Error, Inquiry, LeaderView, MemStore,
    Membership, RaftStatus, Role,
};
use linkdns_registry::{Authority, Command, Container, NodeInfo, Outcome, Resolution, Subnet};
use raft::eraftpb::{Message, MessageType};

/// Delivery rounds per tick: a message delayed by one round arrives within the same tick.
const ROUNDS: u64 = 4;

/// A small, seeded generator (xorshift64*): the simulated network's only source of chance.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

type Token = u64;
type Node = Core<MemStore, Token>;

struct Sim {
    rng: Rng,
    round: u64,
    config: CoreConfig,
    live: BTreeMap<u64, Node>,
    crashed: BTreeMap<u64, MemStore>,
    in_flight: Vec<(u64, Message)>,
    /// Directed links that deliver nothing.
    cut: BTreeSet<(u64, u64)>,
    drop_per_mille: u64,
    max_delay_rounds: u64,
    next_token: Token,
    incarnation: u64,
    results: HashMap<Token, Result<Outcome, Error>>,
    /// Leaders refused for want of a vouch, by the replica that asks.
    inquiries: Vec<(u64, Inquiry)>,
    /// Inquiries answered, and how many of them found a majority vouching.
    asked: u64,
    /// The leaders vouched for (that a replica did not hold as voters), in order.
    vouched_for: Vec<u64>,
}

fn core_config(id: u64, bootstrap: bool, snapshot_every: u64) -> CoreConfig {
    CoreConfig {
        id,
        bootstrap,
        election_ticks: 10,
        heartbeat_ticks: 2,
        snapshot_every,
        snapshot_log_bytes: 64 << 20,
        proposal_timeout_ticks: 50,
    }
}

fn info(id: u64) -> NodeInfo {
    NodeInfo {
        id,
        name: format!("h{id}"),
        peer_addr: format!("10.0.0.{id}:7380"),
    }
}

fn container(node: u64, i: u64) -> Command {
    Command::UpsertContainer(
        Container::new(&format!("n{node}-c{i}"), &format!("svc-{node}-{i}"), node).with_ips([
            format!("10.{node}.{}.{}", i / 200, i % 200 + 1)
                .parse()
                .expect("ip"),
        ]),
    )
}

impl Sim {
    /// Node 1 alone, bootstrapped and leading.
    fn new(seed: u64, snapshot_every: u64) -> Sim {
        let config = core_config(1, true, snapshot_every);
        let mut sim = Sim {
            rng: Rng::new(seed),
            round: 0,
            config: config.clone(),
            live: BTreeMap::new(),
            crashed: BTreeMap::new(),
            in_flight: Vec::new(),
            cut: BTreeSet::new(),
            drop_per_mille: 0,
            max_delay_rounds: 1,
            next_token: 1,
            incarnation: 1,
            results: HashMap::new(),
            inquiries: Vec::new(),
            asked: 0,
            vouched_for: Vec::new(),
        };
        let mut first = Core::open(config, MemStore::new(), 1).expect("open node 1");
        first.campaign().expect("campaign");
        sim.live.insert(1, first);
        sim.settle(5);
        let t = sim.propose(1, &Command::UpsertNode(info(1)));
        sim.settle(5);
        assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
        sim
    }

    /// `voters` voters (node 1 and the next ones) and then `learners` learners, all caught up.
    fn cluster(seed: u64, voters: u64, learners: u64, snapshot_every: u64) -> Sim {
        let mut sim = Sim::new(seed, snapshot_every);
        for id in 2..=voters + learners {
            sim.join(id);
            if id <= voters {
                sim.change(Membership::Promote(id));
            }
        }
        sim.settle(20);
        sim
    }

    /// Starts an empty node `id` and has the leader add it as a learner.
    fn join(&mut self, id: u64) {
        self.join_as(info(id));
    }

    /// [`Sim::join`] with the registry record `info` (its name, say).
    fn join_as(&mut self, info: NodeInfo) {
        let id = info.id;
        self.incarnation += 1;
        let core = Core::open(
            core_config(id, false, self.config.snapshot_every),
            MemStore::new(),
            self.incarnation,
        )
        .expect("open joining node");
        self.live.insert(id, core);
        self.change(Membership::AddLearner {
            info,
            cert: [id as u8; 32],
        });
    }

    /// Proposes a membership change on the leader until it lands.
    fn change(&mut self, change: Membership) {
        for _ in 0..20 {
            let leader = self.wait_leader(100);
            let token = self.token();
            if let Some(core) = self.live.get_mut(&leader) {
                core.propose_membership(&change, token);
            }
            for _ in 0..60 {
                self.run_ticks(1);
                if self.results.contains_key(&token) {
                    break;
                }
            }
            if let Some(Ok(_)) = self.results.get(&token) {
                return;
            }
        }
        panic!("membership change {change:?} never landed");
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    fn propose(&mut self, on: u64, command: &Command) -> Token {
        let token = self.token();
        let core = self.live.get_mut(&on).expect("proposing node is live");
        core.propose(command, token);
        token
    }

    fn result(&self, token: Token) -> Option<Result<Outcome, String>> {
        self.results
            .get(&token)
            .map(|r| r.as_ref().copied().map_err(|e| e.to_string()))
    }

    /// One delivery round: deliver what is due, then run every node's ready.
    fn round(&mut self) {
        self.round += 1;
        let now = self.round;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.in_flight = later;
        for (_, message) in due {
            let (from, to) = (message.from, message.to);
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let delivered = match self.live.get_mut(&to) {
                Some(core) => {
                    core.step(message);
                    true
                }
                None => false,
            };
            if snapshot {
                if let Some(sender) = self.live.get_mut(&from) {
                    sender.report_snapshot(to, delivered);
                }
            }
        }
        let ids: Vec<u64> = self.live.keys().copied().collect();
        for id in ids {
            let Some(core) = self.live.get_mut(&id) else {
                continue;
            };
            let progress = core.ready().expect("ready");
            for (token, result) in progress.done {
                self.results.insert(token, result);
            }
            for message in progress.messages {
                self.route(message);
            }
            self.inquiries
                .extend(progress.inquiries.into_iter().map(|i| (id, i)));
        }
        self.answer_inquiries();
    }

    /// What the transport does with an inquiry: asks each voter named (over links that are
    /// not cut) for its own account of its leader, and vouches if enough of them back it.
    fn answer_inquiries(&mut self) {
        for (asker, inquiry) in std::mem::take(&mut self.inquiries) {
            let answers: Vec<(u64, LeaderView)> = inquiry
                .ask
                .iter()
                .filter(|&&v| !self.cut.contains(&(asker, v)) && !self.cut.contains(&(v, asker)))
                .filter_map(|&v| self.live.get(&v).map(|c| (v, LeaderView::of(&c.status()))))
                .collect();
            self.asked += 1;
            if let Some((leader, term)) = inquiry.vouched_by(&answers) {
                if let Some(core) = self.live.get_mut(&asker) {
                    // Counted when it changes who leads here (a learner is never vouched for).
                    if core.status().voters.contains(&leader) {
                        continue;
                    }
                    self.vouched_for.push(leader);
                    core.vouch(leader, term);
                }
            }
        }
    }

    fn route(&mut self, message: Message) {
        let (from, to) = (message.from, message.to);
        let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        let lost = self.cut.contains(&(from, to))
            || !self.live.contains_key(&to)
            || self.rng.chance(self.drop_per_mille);
        if lost {
            if let Some(sender) = self.live.get_mut(&from) {
                if snapshot {
                    sender.report_snapshot(to, false);
                } else if self.rng.chance(100) {
                    sender.report_unreachable(to);
                }
            }
            return;
        }
        let at = self.round + 1 + self.rng.below(self.max_delay_rounds);
        self.in_flight.push((at, message));
    }

    fn run_ticks(&mut self, ticks: u64) {
        for _ in 0..ticks {
            for core in self.live.values_mut() {
                core.tick();
            }
            for _ in 0..ROUNDS {
                self.round();
            }
        }
    }

    /// Runs with a healthy network until nothing is in flight (or `ticks` pass).
    fn settle(&mut self, ticks: u64) {
        self.run_ticks(ticks);
    }

    fn status(&self, id: u64) -> RaftStatus {
        self.live.get(&id).expect("live node").status()
    }

    fn leaders(&self) -> Vec<u64> {
        self.live
            .values()
            .map(|c| c.status())
            .filter(|s| s.role == Role::Leader)
            .map(|s| s.id)
            .collect()
    }

    /// Runs until exactly one live node leads, with the highest term among live nodes.
    fn wait_leader(&mut self, max_ticks: u64) -> u64 {
        for _ in 0..max_ticks {
            let leaders = self.leaders();
            let max_term = self.live.values().map(|c| c.status().term).max();
            if let [one] = leaders[..] {
                if Some(self.status(one).term) == max_term {
                    return one;
                }
            }
            self.run_ticks(1);
        }
        panic!(
            "no single leader after {max_ticks} ticks: {:?}",
            self.describe()
        );
    }

    /// Crashes and restarts whichever other node leads until `id` does (elections are
    /// random: at most 40 rounds, each waiting `max_ticks` for a leader).
    fn bring_to_lead(&mut self, id: u64, max_ticks: u64) {
        let mut leader = self.wait_leader(max_ticks);
        for _ in 0..40 {
            if leader == id {
                return;
            }
            self.crash(leader);
            self.run_ticks(40);
            self.restart(leader);
            self.settle(20);
            leader = self.wait_leader(300);
        }
        assert_eq!(
            leader,
            id,
            "node {id} never came to lead: {:?}",
            self.describe()
        );
    }

    fn describe(&self) -> Vec<String> {
        self.live
            .values()
            .map(|c| {
                let s = c.status();
                format!(
                    "{} {:?} term {} leader {:?} commit {} applied {}",
                    s.id, s.role, s.term, s.leader, s.commit_index, s.applied_index
                )
            })
            .collect()
    }

    fn crash(&mut self, id: u64) {
        let core = self.live.remove(&id).expect("crashing a live node");
        self.crashed.insert(id, core.into_store());
        // What was on its way to it is lost; a transport tells the sender of a snapshot.
        let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(_, m)| m.to == id);
        self.in_flight = kept;
        for (_, m) in lost {
            if m.get_msg_type() == MessageType::MsgSnapshot {
                if let Some(sender) = self.live.get_mut(&m.from) {
                    sender.report_snapshot(id, false);
                }
            }
        }
    }

    fn restart(&mut self, id: u64) {
        let store = self.crashed.remove(&id).expect("restarting a crashed node");
        self.incarnation += 1;
        let config = core_config(id, id == 1, self.config.snapshot_every);
        let core = Core::open(config, store, self.incarnation).expect("reopen");
        self.live.insert(id, core);
    }

    /// Cuts every link between `side` and the rest, both ways.
    fn partition(&mut self, side: &[u64]) {
        let all: Vec<u64> = self
            .live
            .keys()
            .chain(self.crashed.keys())
            .copied()
            .collect();
        for &a in side {
            for &b in &all {
                if !side.contains(&b) {
                    self.cut.insert((a, b));
                    self.cut.insert((b, a));
                }
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.drop_per_mille = 0;
        self.max_delay_rounds = 1;
    }

    /// After healing: every live node applied the same log and holds the same registry.
    fn assert_converged(&mut self, max_ticks: u64) {
        for _ in 0..max_ticks {
            if self.converged() {
                return;
            }
            self.run_ticks(1);
        }
        panic!("replicas did not converge: {:?}", self.describe());
    }

    fn converged(&self) -> bool {
        let mut views = self.live.values().map(|c| {
            (
                c.status().commit_index,
                c.applied(),
                c.registry().snapshot(),
            )
        });
        let Some(first) = views.next() else {
            return true;
        };
        first.0 == first.1 && views.all(|v| v == first)
    }

    fn resolves(&self, on: u64, name: &str) -> bool {
        let core = self.live.get(&on).expect("live node");
        matches!(core.registry().resolve(name, None, None), Resolution::Found(ips) if !ips.is_empty())
    }
}

#[test]
fn three_voters_replicate_proposals_made_on_any_node() {
    let mut sim = Sim::cluster(1, 3, 0, 1_000);
    let leader = sim.wait_leader(50);
    assert_eq!(sim.status(leader).voters, vec![1, 2, 3]);
    // Every node registers itself and proposes its own containers, followers included: Raft
    // forwards a follower's proposal to the leader.
    let mut tokens = Vec::new();
    for id in [2, 3] {
        // Joining registered the node already: the same record again changes nothing.
        let t = sim.propose(id, &Command::UpsertNode(info(id)));
        sim.settle(10);
        assert_eq!(sim.result(t), Some(Ok(Outcome::Unchanged)));
    }
    for id in 1..=3 {
        for i in 0..5 {
            tokens.push(sim.propose(id, &container(id, i)));
        }
    }
    sim.settle(20);
    for t in tokens {
        assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)), "token {t}");
    }
    sim.assert_converged(10);
    for on in 1..=3 {
        for of in 1..=3 {
            assert!(sim.resolves(on, &format!("svc-{of}-4")), "{of} on {on}");
        }
        assert_eq!(sim.live[&on].registry().record_count(), 15);
    }
}

#[test]
fn a_new_leader_takes_over_when_the_leader_dies_and_the_old_one_catches_up() {
    let mut sim = Sim::cluster(2, 3, 0, 1_000);
    let old = sim.wait_leader(50);
    let t = sim.propose(old, &container(old, 1));
    sim.settle(5);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    sim.crash(old);
    let new = sim.wait_leader(100);
    assert_ne!(new, old);
    let follower = *sim.live.keys().find(|&&id| id != new).expect("a follower");
    // Writes resume, also through the remaining follower.
    let t = sim.propose(follower, &container(follower, 2));
    sim.settle(10);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    sim.restart(old);
    sim.assert_converged(100);
    assert!(
        sim.resolves(old, &format!("svc-{follower}-2")),
        "restarted node caught up"
    );
    assert_eq!(sim.leaders().len(), 1);
}

#[test]
fn a_learner_far_behind_catches_up_by_snapshot() {
    // Snapshot (and compact) every 10 entries: a new node cannot get the early log.
    let mut sim = Sim::cluster(3, 3, 0, 10);
    let leader = sim.wait_leader(50);
    for i in 0..60 {
        let on = 1 + i % 3;
        sim.propose(on, &container(on, i));
        if i % 10 == 0 {
            sim.settle(2);
        }
    }
    sim.settle(20);
    assert!(sim.status(leader).snapshot_index > 10, "log compacted");
    sim.join(4);
    sim.assert_converged(100);
    let learner = sim.status(4);
    assert_eq!(learner.role, Role::Learner);
    assert!(
        learner.snapshot_index > 1,
        "installed a snapshot: {learner:?}"
    );
    assert_eq!(sim.live[&4].registry().record_count(), 60);
    assert!(sim.resolves(4, "svc-3-59"));
    // A learner proposes like any node (forwarded to the leader), but has no vote.
    let t = sim.propose(4, &container(4, 1));
    sim.settle(10);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    assert!(sim.resolves(leader, "svc-4-1"));
    assert_eq!(sim.status(leader).voters, vec![1, 2, 3]);
}

#[test]
fn membership_changes_go_one_at_a_time_and_removal_detaches_a_node() {
    let mut sim = Sim::cluster(4, 3, 1, 1_000);
    let leader = sim.wait_leader(50);
    assert_eq!(sim.status(leader).learners, vec![4]);
    // Two changes at once: the second is refused while the first is in flight.
    let victim = if leader == 3 { 2 } else { 3 };
    let (t1, t2) = (sim.token(), sim.token());
    let core = sim.live.get_mut(&leader).expect("leader");
    core.propose_membership(&Membership::Remove(victim), t1);
    core.propose_membership(&Membership::Promote(4), t2);
    sim.settle(10);
    assert_eq!(sim.result(t1), Some(Ok(Outcome::Changed)));
    let second = sim.result(t2).expect("answered");
    assert!(
        second.as_ref().is_err_and(|e| e.contains("in progress")),
        "{second:?}"
    );
    sim.change(Membership::Promote(4));
    sim.settle(10);
    let leader = sim.wait_leader(50);
    let status = sim.status(leader);
    let mut expected: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&i| i != victim).collect();
    expected.sort_unstable();
    assert_eq!(status.voters, expected);
    assert!(status.learners.is_empty());
    assert_eq!(sim.status(victim).role, Role::Detached);
    // The removed node's registry entry is gone everywhere it is still a member.
    for id in expected {
        assert!(sim.live[&id].registry().node(victim).is_none());
    }
    // Changes that do not fit the configuration are refused, also when they were proposed
    // before an earlier change made them invalid: judged when applied, the same everywhere.
    let leader = sim.wait_leader(50);
    for change in [
        Membership::Promote(victim),
        Membership::Remove(victim),
        Membership::AddLearner {
            info: info(victim),
            cert: [0; 32],
        },
        Membership::AddLearner {
            info: NodeInfo {
                name: "h1".into(),
                ..info(9)
            },
            cert: [0; 32],
        },
    ] {
        let t = sim.token();
        sim.live
            .get_mut(&leader)
            .expect("leader")
            .propose_membership(&change, t);
        sim.settle(5);
        let r = sim.result(t).expect("answered");
        assert!(
            r.as_ref().is_err_and(|e| e.contains("refused")),
            "{change:?}: {r:?}"
        );
    }
    // Followers refuse membership changes: only the leader proposes them.
    let follower = *sim
        .live
        .keys()
        .find(|&&id| id != leader && id != victim)
        .expect("follower");
    let t = sim.token();
    sim.live
        .get_mut(&follower)
        .expect("follower")
        .propose_membership(&Membership::Promote(9), t);
    sim.settle(1);
    assert!(sim.result(t).expect("answered").is_err());
}

#[test]
fn a_partitioned_minority_accepts_no_writes_and_converges_after_healing() {
    let mut sim = Sim::cluster(5, 3, 0, 1_000);
    let leader = sim.wait_leader(50);
    let before = sim.propose(leader, &container(leader, 1));
    sim.settle(10);
    assert_eq!(sim.result(before), Some(Ok(Outcome::Changed)));
    // Cut the leader off: the majority elects another one.
    sim.partition(&[leader]);
    let minority_write = sim.propose(leader, &container(leader, 100));
    let majority = *sim.live.keys().find(|&&id| id != leader).expect("majority");
    // Elections take 10-14 ticks, and a split vote another round.
    let mut new = None;
    for _ in 0..200 {
        sim.run_ticks(1);
        new = sim.leaders().into_iter().find(|&l| l != leader);
        if new.is_some() {
            break;
        }
    }
    let new = new.expect("the majority elected a leader");
    let t = sim.propose(majority, &container(majority, 101));
    sim.run_ticks(20);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    // The old leader stepped down (check-quorum) and its write never committed.
    sim.run_ticks(60);
    assert_ne!(sim.status(leader).role, Role::Leader);
    let minority = sim.result(minority_write).expect("answered");
    assert!(minority.is_err(), "{minority:?}");
    // ... and it kept its replica to answer from.
    assert!(sim.resolves(leader, &format!("svc-{leader}-1")));
    sim.heal();
    sim.assert_converged(100);
    assert!(sim.resolves(leader, &format!("svc-{majority}-101")));
    assert!(
        !sim.resolves(new, &format!("svc-{leader}-100")),
        "the uncommitted write is gone"
    );
}

/// Many schedules: a lossy, reordering network, crashes and restarts, partitions, proposals on
/// random nodes. Afterwards every acknowledged write is on every replica, and they all agree.
///
/// A single schedule may keep a quorum apart for its whole run (a crashed voter and a partitioned
/// one), and raft-rs draws election timeouts from its own generator, so whether one seed gets any
/// write through varies between runs. That the test is not vacuous is checked over all schedules:
/// about two thirds of the proposals are acknowledged on this network (4,000 of 6,000 over twenty
/// runs, never fewer than 3,900), and the test asks for a third.
#[test]
fn random_faults_lose_no_acknowledged_write() {
    let (mut proposed, mut acked) = (0usize, 0usize);
    for seed in 10..110 {
        let mut sim = Sim::cluster(seed, 3, 1, 25);
        sim.drop_per_mille = 100;
        sim.max_delay_rounds = 6;
        let mut acked_candidates = Vec::new();
        for step in 0..60u64 {
            let live: Vec<u64> = sim.live.keys().copied().collect();
            let on = live[sim.rng.below(live.len() as u64) as usize];
            let command = container(on, step);
            acked_candidates.push((sim.propose(on, &command), on, step));
            match sim.rng.below(20) {
                0 if sim.crashed.is_empty() && sim.live.len() > 3 => {
                    let victim = live[sim.rng.below(live.len() as u64) as usize];
                    sim.crash(victim);
                }
                1 if !sim.crashed.is_empty() => {
                    let id = *sim.crashed.keys().next().expect("crashed");
                    sim.restart(id);
                }
                2 if sim.cut.is_empty() => {
                    let side = live[sim.rng.below(live.len() as u64) as usize];
                    sim.partition(&[side]);
                }
                3 => sim.cut.clear(),
                _ => {}
            }
            let ticks = 1 + sim.rng.below(4);
            sim.run_ticks(ticks);
        }
        let crashed: Vec<u64> = sim.crashed.keys().copied().collect();
        for id in crashed {
            sim.restart(id);
        }
        sim.heal();
        sim.wait_leader(200);
        sim.assert_converged(300);
        proposed += acked_candidates.len();
        for (token, on, step) in acked_candidates {
            if let Some(Ok(_)) = sim.result(token) {
                acked += 1;
                for (&id, core) in &sim.live {
                    let name = format!("svc-{on}-{step}");
                    assert!(
                        matches!(
                            core.registry().resolve(&name, None, None),
                            Resolution::Found(_)
                        ),
                        "seed {seed}: acknowledged {name} missing on node {id}"
                    );
                }
            }
        }
    }
    assert!(
        acked * 3 >= proposed,
        "only {acked} of {proposed} writes were acknowledged: the schedules test too little"
    );
}

/// A watcher's observation of container `name` on node `node` at `version`: running at `ip`,
/// or gone.
fn observation(node: u64, name: &str, version: u64, ip: Option<&str>) -> Command {
    let id = format!("n{node}-{name}");
    match ip {
        Some(ip) => {
            let mut c = Container::new(&id, name, node).with_ips([ip.parse().expect("ip")]);
            c.version = version;
            Command::UpsertContainer(c)
        }
        None => Command::RemoveContainer {
            node,
            id: linkdns_registry::ContainerId::new(id),
            version,
        },
    }
}

/// A follower's watcher reports its containers starting, moving and stopping through a lossy,
/// slow network; proposals whose fate was unknown are proposed again, and copies of old
/// observations arrive late, after newer ones. Whatever the order they commit in, every replica
/// ends with each container as the watcher last saw it: no stopped container comes back, no
/// old address returns.
#[test]
fn delayed_duplicate_proposals_never_resurrect_a_container() {
    let mut stale_seen = 0;
    for seed in 200..260 {
        let mut sim = Sim::cluster(seed, 3, 0, 40);
        let leader = sim.wait_leader(50);
        let watcher = if leader == 2 { 3 } else { 2 };
        sim.drop_per_mille = 50;
        sim.max_delay_rounds = 10;
        let mut version = 1u64 << 32;
        let mut latest: BTreeMap<String, Command> = BTreeMap::new();
        let mut sent: Vec<Command> = Vec::new();
        let mut tokens = Vec::new();
        for step in 0..80u64 {
            let name = format!("c{}", sim.rng.below(4));
            version += 1;
            let ip = format!("10.2.{}.{}", step / 200, step % 200 + 1);
            let running = !sim.rng.chance(400);
            let command = observation(watcher, &name, version, running.then_some(ip.as_str()));
            latest.insert(name, command.clone());
            sent.push(command.clone());
            tokens.push(sim.propose(watcher, &command));
            if sim.rng.chance(300) {
                // A retry of an earlier observation (its first attempt timed out).
                let old = sent[sim.rng.below(sent.len() as u64) as usize].clone();
                tokens.push(sim.propose(watcher, &old));
            }
            let ticks = 1 + sim.rng.below(3);
            sim.run_ticks(ticks);
        }
        // The proposer retries each container's last observation until the log answers it ...
        sim.heal();
        for command in latest.values() {
            for _ in 0..20 {
                sim.wait_leader(200);
                let t = sim.propose(watcher, command);
                sim.run_ticks(15);
                if matches!(sim.result(t), Some(Ok(_))) {
                    break;
                }
            }
        }
        // ... and the oldest copies still commit after it.
        for old in sent.iter().take(20) {
            tokens.push(sim.propose(watcher, old));
        }
        sim.run_ticks(30);
        sim.assert_converged(300);
        stale_seen += tokens
            .iter()
            .filter(|t| sim.result(**t) == Some(Ok(Outcome::Stale)))
            .count();
        for (name, last) in &latest {
            let want = match last {
                Command::UpsertContainer(c) => Resolution::Found(c.ips().collect()),
                _ => Resolution::NotFound,
            };
            for (&id, core) in &sim.live {
                assert_eq!(
                    core.registry().resolve(name, None, None),
                    want,
                    "seed {seed}: {name} on node {id} is not as the watcher last saw it"
                );
            }
        }
    }
    assert!(
        stale_seen > 100,
        "late copies must have reached the log ({stale_seen} were refused as stale)"
    );
}

/// The context a core gives its proposals: proposer node, incarnation, request id.
fn proposer_context(node: u64) -> Vec<u8> {
    [node, 1, 999]
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .collect()
}

#[test]
fn a_node_changes_only_its_own_records_and_forwards_no_maintenance() {
    let mut sim = Sim::cluster(11, 3, 1, 1_000);
    let leader = sim.wait_leader(50);
    let learner = 4;
    let t = sim.propose(learner, &container(learner, 1));
    sim.settle(10);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)), "its own: taken");

    // Another node's container, another node's address, a /8 claim: refused where applied.
    let theirs = sim.propose(learner, &container(1, 2));
    let address = sim.propose(
        learner,
        &Command::UpsertNode(NodeInfo {
            peer_addr: "192.0.2.66:7380".into(),
            ..info(1)
        }),
    );
    let wide = sim.propose(
        learner,
        &Command::SetNodeSubnets {
            node: learner,
            subnets: vec![Subnet::new("10.0.0.0".parse().expect("ip"), 8).expect("subnet")],
        },
    );
    // Maintenance from a node that is not the leader: refused at once.
    let liveness = sim.propose(
        learner,
        &Command::SetNodeDown {
            node: 1,
            down: true,
        },
    );
    sim.settle(60);
    for (t, what) in [(theirs, "may not change"), (address, "may not change")] {
        let result = sim.result(t).expect("answered");
        assert!(matches!(&result, Err(e) if e.contains(what)), "{result:?}");
    }
    let result = sim.result(wide).expect("answered");
    assert!(
        matches!(&result, Err(e) if e.contains("wider")),
        "{result:?}"
    );
    let result = sim.result(liveness).expect("answered");
    assert!(
        matches!(&result, Err(e) if e.contains("the cluster")),
        "{result:?}"
    );

    // What a node that skips its own checks forwards: an entry naming another proposer than
    // its sender, another node's records, maintenance, one that would not decode. The leader
    // drops them before Raft sees them.
    let forged = |data: Vec<u8>, proposer: u64| {
        let entry = raft::eraftpb::Entry {
            data: data.into(),
            context: proposer_context(proposer).into(),
            ..Default::default()
        };
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = learner;
        m.to = leader;
        m.entries = vec![entry].into();
        m
    };
    let leader_core = sim.live.get_mut(&leader).expect("leader");
    leader_core.step(forged(container(2, 3).encode(), 2));
    leader_core.step(forged(vec![0xff, 1, 2, 3], learner));
    leader_core.step(forged(container(1, 4).encode(), learner));
    let down = Command::SetNodeDown {
        node: 1,
        down: true,
    };
    leader_core.step(forged(down.encode(), learner));
    sim.settle(20);
    sim.assert_converged(50);
    for (&id, core) in &sim.live {
        let registry = core.registry();
        for name in ["svc-1-2", "svc-2-3", "svc-1-4"] {
            assert!(!sim.resolves(id, name), "{name} on {id}");
        }
        assert_eq!(
            registry.node(1).map(|n| n.peer_addr.clone()),
            Some(info(1).peer_addr)
        );
        assert!(registry.node_subnets(learner).is_empty());
        assert!(!registry.is_down(1));
        assert!(sim.resolves(id, "svc-4-1"));
    }
    assert!(sim.leaders().contains(&leader), "the leader kept going");

    // A learner posing as the leader of a later term, with entries that name a voter as their
    // proposer, and asking for votes: a follower that hears from its leader refuses it all.
    let follower = *sim
        .live
        .keys()
        .find(|&&id| id != leader && id != learner)
        .expect("a follower");
    let before = sim.status(follower);
    let down = Command::SetNodeDown {
        node: leader,
        down: true,
    };
    let append = forged_append(&sim, learner, follower, before.term + 1, &down, leader);
    let mut vote = Message::default();
    vote.set_msg_type(MessageType::MsgRequestVote);
    vote.from = learner;
    vote.to = follower;
    vote.term = before.term + 5;
    vote.index = before.last_index + 100;
    vote.log_term = before.term + 5;
    let core = sim.live.get_mut(&follower).expect("follower");
    core.step(append);
    core.step(vote);
    sim.settle(10);
    let after = sim.status(follower);
    assert_eq!((after.term, after.leader), (before.term, Some(leader)));
    assert!(!sim.live[&follower].registry().is_down(leader));

    // The leader's own maintenance is taken.
    let t = sim.propose(
        leader,
        &Command::SetNodeDown {
            node: learner,
            down: true,
        },
    );
    sim.settle(10);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
}

/// What a learner that skips every check can send replica `to`: an append that claims the
/// lead of `term`, with one entry of `command` naming `proposer` after `to`'s last entry, and
/// a commit index that covers it (a replica that took it would apply it at once).
fn forged_append(
    sim: &Sim,
    from: u64,
    to: u64,
    term: u64,
    command: &Command,
    proposer: u64,
) -> Message {
    let target = sim.status(to);
    let log_term = sim.live[&to]
        .term_of(target.last_index)
        .expect("the term of the last entry");
    let entry = raft::eraftpb::Entry {
        term,
        index: target.last_index + 1,
        data: command.encode().into(),
        context: proposer_context(proposer).into(),
        ..Default::default()
    };
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = from;
    m.to = to;
    m.term = term;
    m.index = target.last_index;
    m.log_term = log_term;
    m.commit = target.last_index + 1;
    m.entries = vec![entry].into();
    m
}

/// ... and a snapshot: `to`'s registry with `command` applied as a voter's, past `to`'s log,
/// with the forger as the only voter.
fn forged_snapshot(sim: &Sim, from: u64, to: u64, term: u64, command: &Command) -> Message {
    let target = sim.status(to);
    let mut registry = sim.live[&to].registry().clone();
    let _ = registry.apply_by(
        Authority {
            node: target.voters[0],
            voter: true,
        },
        command,
    );
    let mut snapshot = raft::eraftpb::Snapshot::default();
    snapshot.data = registry.snapshot().into();
    let meta = snapshot.mut_metadata();
    meta.index = target.last_index + 10;
    meta.term = term;
    meta.mut_conf_state().voters = vec![from];
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = from;
    m.to = to;
    m.term = term;
    m.set_snapshot(snapshot);
    m
}

/// The maintenance only voters may do, each naming a voter as its proposer: what a learner
/// acting as leader would forge.
fn voter_commands(voters: &[u64]) -> Vec<(Command, u64)> {
    let (a, b) = (voters[0], voters[voters.len() - 1]);
    vec![
        (
            Command::SetNodeDown {
                node: b,
                down: true,
            },
            a,
        ),
        (Command::RetireNode { node: b }, a),
        (
            Command::SetNodeCert {
                node: b,
                fingerprint: [0xee; 32],
            },
            a,
        ),
        (Command::SetJoinSecret { hash: [0xab; 32] }, b),
    ]
}

/// Every live replica applied the same log and holds `registry` (the encoded snapshot).
fn assert_all_hold(sim: &mut Sim, registry: &[u8], what: &str) {
    sim.assert_converged(300);
    for (&id, core) in &sim.live {
        assert!(
            core.registry().snapshot() == registry,
            "{what}: node {id}'s registry changed: {:?}",
            sim.describe()
        );
    }
}

#[test]
fn a_learner_cannot_lead_during_a_failover_or_after_a_restart() {
    let mut sim = Sim::cluster(21, 3, 1, 1_000);
    let learner = 4;
    let leader = sim.wait_leader(50);
    sim.settle(20);
    let before = sim.live[&leader].registry().snapshot();
    let voters = sim.status(leader).voters;
    let commands = voter_commands(&voters);

    // A failover: the leader dies. Every tick until the others elect a new one (the window in
    // which no replica hears from a leader), and a while after, the learner claims the next
    // term to each of them with forged maintenance, as appends and as snapshots.
    sim.crash(leader);
    let mut refusals_asked = 0;
    for tick in 0..60u64 {
        for &v in voters.iter().filter(|&&v| v != leader) {
            let (command, proposer) = &commands[tick as usize % commands.len()];
            let term = sim.status(v).term + 1;
            let append = forged_append(&sim, learner, v, term, command, *proposer);
            let snapshot = forged_snapshot(&sim, learner, v, term + 1, command);
            let core = sim.live.get_mut(&v).expect("voter");
            core.step(append);
            core.step(snapshot);
            refusals_asked += 1;
        }
        sim.run_ticks(1);
    }
    let new_leader = sim.wait_leader(200);
    assert_ne!(new_leader, learner);
    assert_ne!(new_leader, leader);
    assert!(
        sim.asked > 0 && !sim.vouched_for.contains(&learner),
        "the replicas asked their voters ({} inquiries for {refusals_asked} forgeries) and the learner was never vouched for ({:?})",
        sim.asked,
        sim.vouched_for
    );

    // A restart: the old leader comes back knowing no leader; the learner gets in first.
    sim.restart(leader);
    for (command, proposer) in &commands {
        let term = sim.status(leader).term + 1;
        let append = forged_append(&sim, learner, leader, term, command, *proposer);
        let snapshot = forged_snapshot(&sim, learner, leader, term + 1, command);
        let core = sim.live.get_mut(&leader).expect("restarted");
        core.step(append);
        core.step(snapshot);
        sim.run_ticks(1);
    }
    sim.settle(50);
    assert_all_hold(&mut sim, &before, "after forged appends and snapshots");
    for (&id, core) in &sim.live {
        let registry = core.registry();
        for &v in &voters {
            assert!(!registry.is_down(v), "node {v} marked down on {id}");
            assert!(!registry.was_removed(v), "node {v} retired on {id}");
        }
    }
    assert!(
        sim.status(learner).voters == voters,
        "the learner is still no voter"
    );
}

#[test]
fn a_replica_behind_a_promotion_follows_the_new_leader_once_its_voters_vouch() {
    let mut sim = Sim::cluster(23, 3, 2, 1_000);
    let (promoted, behind) = (4, 5);
    // Node 5 misses the promotion of node 4, and node 4 comes to lead.
    sim.partition(&[behind]);
    sim.change(Membership::Promote(promoted));
    sim.bring_to_lead(promoted, 200);
    let t = sim.propose(promoted, &container(promoted, 1));
    sim.settle(20);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    let lagging = sim.status(behind);
    assert!(
        !lagging.voters.contains(&promoted),
        "node 5 must not know of the promotion yet: {lagging:?}"
    );
    let vouched_before = sim.vouched_for.len();

    // The partition heals: node 5 refuses node 4 at first (no voter in its log), asks its
    // voters, follows node 4 once they vouch, and catches up.
    sim.heal();
    sim.settle(100);
    sim.assert_converged(300);
    let caught_up = sim.status(behind);
    assert_eq!(caught_up.leader, Some(promoted), "{:?}", sim.describe());
    assert!(caught_up.voters.contains(&promoted));
    assert!(sim.resolves(behind, "svc-4-1"));
    assert!(
        sim.vouched_for[vouched_before..].contains(&promoted),
        "followed after a vouch"
    );
}

#[test]
fn a_voter_behind_a_replacement_follows_the_new_leader_though_its_old_voters_are_gone() {
    // Voters 1, 2, 3 and learner 4; voter 3 misses 4's promotion and 1's removal.
    let mut sim = Sim::cluster(29, 3, 1, 1_000);
    let (behind, promoted) = (3, 4);
    sim.partition(&[behind]);
    sim.change(Membership::Promote(promoted));
    sim.change(Membership::Remove(1));
    sim.settle(20);
    sim.crash(1);
    sim.bring_to_lead(promoted, 300);
    let t = sim.propose(promoted, &container(promoted, 1));
    sim.settle(20);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    assert_eq!(
        sim.status(behind).voters,
        vec![1, 2, 3],
        "node 3 still has the old set"
    );

    // Only node 2 of its old voters is there to say whom it follows: enough.
    sim.heal();
    sim.settle(100);
    let caught_up = sim.status(behind);
    assert_eq!(caught_up.leader, Some(promoted), "{:?}", sim.describe());
    assert_eq!(caught_up.voters, vec![2, 3, 4]);
    assert!(sim.resolves(behind, "svc-4-1"));
}

/// Random peer messages from a learner, of every kind, claiming terms around the real one,
/// with entries of every command naming any node, snapshots of forged registries: stepped
/// into every replica while it follows a leader, during a failover and after a restart.
/// Replicas change nothing for any of it and agree at the end.
#[test]
fn a_stream_of_random_messages_from_a_learner_changes_nothing() {
    for seed in 31..37 {
        let mut sim = Sim::cluster(seed, 3, 1, 1_000);
        let learner = 4;
        let leader = sim.wait_leader(50);
        sim.settle(20);
        let before = sim.live[&leader].registry().snapshot();
        let voters = sim.status(leader).voters;
        let commands = voter_commands(&voters);
        let mut rng = Rng::new(seed * 7919);
        let kinds = [
            MessageType::MsgAppend,
            MessageType::MsgHeartbeat,
            MessageType::MsgSnapshot,
            MessageType::MsgRequestVote,
            MessageType::MsgRequestPreVote,
            MessageType::MsgTimeoutNow,
            MessageType::MsgPropose,
            MessageType::MsgReadIndex,
            MessageType::MsgTransferLeader,
            MessageType::MsgAppendResponse,
            MessageType::MsgHeartbeatResponse,
            MessageType::MsgRequestVoteResponse,
            MessageType::MsgRequestPreVoteResponse,
            MessageType::MsgHup,
            MessageType::MsgBeat,
            MessageType::MsgCheckQuorum,
            MessageType::MsgUnreachable,
            MessageType::MsgSnapStatus,
            MessageType::MsgReadIndexResp,
        ];
        let fire = |sim: &mut Sim, rng: &mut Rng| {
            let targets: Vec<u64> = sim
                .live
                .keys()
                .copied()
                .filter(|&id| id != learner)
                .collect();
            for &to in &targets {
                let status = sim.status(to);
                let (command, proposer) = &commands[rng.below(commands.len() as u64) as usize];
                let proposer = if rng.chance(300) {
                    rng.below(6)
                } else {
                    *proposer
                };
                let term = status.term + rng.below(3);
                let mut m = match kinds[rng.below(kinds.len() as u64) as usize] {
                    MessageType::MsgAppend => {
                        forged_append(sim, learner, to, term, command, proposer)
                    }
                    MessageType::MsgSnapshot => forged_snapshot(sim, learner, to, term, command),
                    kind => {
                        let mut m = forged_append(sim, learner, to, term, command, proposer);
                        m.set_msg_type(kind);
                        m
                    }
                };
                m.commit += rng.below(3);
                if rng.chance(100) {
                    m.term = 0;
                }
                if rng.chance(200) {
                    m.index = m.index.saturating_sub(rng.below(3));
                }
                sim.live.get_mut(&to).expect("live").step(m);
            }
        };
        for _ in 0..20 {
            fire(&mut sim, &mut rng);
            sim.run_ticks(1);
        }
        sim.crash(leader);
        for _ in 0..60 {
            fire(&mut sim, &mut rng);
            sim.run_ticks(1);
        }
        sim.restart(leader);
        for _ in 0..20 {
            fire(&mut sim, &mut rng);
            sim.run_ticks(1);
        }
        sim.settle(50);
        let leader = sim.wait_leader(200);
        assert!(voters.contains(&leader), "seed {seed}: node {leader} leads");
        assert_all_hold(&mut sim, &before, &format!("seed {seed}"));
    }
}

#[test]
fn a_snapshot_that_does_not_decode_is_never_installed() {
    let mut sim = Sim::cluster(13, 3, 0, 1_000);
    let leader = sim.wait_leader(50);
    let t = sim.propose(leader, &container(leader, 1));
    sim.settle(10);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    let follower = *sim
        .live
        .keys()
        .find(|&&id| id != leader)
        .expect("a follower");
    let before = sim.status(follower);
    // From the leader itself, of its term, far ahead of the follower: only its data is wrong.
    let mut snapshot = raft::eraftpb::Snapshot {
        data: b"LDNS\x63 not a registry".to_vec().into(),
        ..Default::default()
    };
    snapshot.mut_metadata().index = before.last_index + 1000;
    snapshot.mut_metadata().term = before.term;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = leader;
    m.to = follower;
    m.term = before.term;
    m.set_snapshot(snapshot);
    sim.live.get_mut(&follower).expect("follower").step(m);
    sim.settle(10);
    // The follower kept its replica and its log, and goes on following.
    let after = sim.status(follower);
    assert!(after.snapshot_index < before.last_index + 1000, "{after:?}");
    assert!(sim.resolves(follower, &format!("svc-{leader}-1")));
    let t = sim.propose(follower, &container(follower, 2));
    sim.settle(10);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    sim.assert_converged(50);
}

/// `--force-new-cluster`: the majority is gone for good. The survivor's store, replayed to what
/// it committed and seeded as a one-voter cluster, elects it and takes writes; a lost host
/// that joins again under its old name takes its old record's place (a new id, the old
/// record and its containers gone).
#[test]
fn a_forced_new_cluster_goes_on_alone_and_takes_a_lost_host_back_under_its_name() {
    let mut sim = Sim::cluster(7, 3, 0, 1000);
    sim.wait_leader(100);
    let t = sim.propose(2, &container(2, 1));
    sim.run_ticks(20);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));
    sim.run_ticks(10);
    for id in [2, 3] {
        sim.crash(id);
    }
    sim.crashed.clear();
    let store = sim.live.remove(&1).expect("node 1").into_store();
    let (registry, mut store) = committed_state(store, 1).expect("replay");
    assert!(matches!(
        registry.resolve("svc-2-1", None, None),
        Resolution::Found(_)
    ));
    let index = seed_single_voter(&mut store, 1, &registry).expect("seed");
    sim.incarnation += 1;
    let core = Core::open(core_config(1, false, 1000), store, sim.incarnation).expect("reopen");
    assert_eq!(core.applied(), index);
    sim.live.insert(1, core);
    assert_eq!(sim.wait_leader(100), 1);
    assert_eq!(sim.status(1).voters, vec![1]);
    let t = sim.propose(1, &container(1, 5));
    sim.run_ticks(10);
    assert_eq!(sim.result(t), Some(Ok(Outcome::Changed)));

    // h2 again, as node 4.
    sim.join_as(NodeInfo {
        id: 4,
        name: "h2".into(),
        peer_addr: "10.0.0.4:7380".into(),
    });
    sim.assert_converged(100);
    for core in sim.live.values() {
        let r = core.registry();
        assert_eq!(r.node_by_name("h2").map(|n| n.id), Some(4));
        assert!(r.node(2).is_none());
        assert_eq!(r.resolve("svc-2-1", None, None), Resolution::NotFound);
        assert!(matches!(
            r.resolve("svc-1-5", None, None),
            Resolution::Found(_)
        ));
    }
    // A name a member holds is still refused.
    let token = sim.token();
    let leader = sim.wait_leader(50);
    let taken = Membership::AddLearner {
        info: NodeInfo {
            id: 5,
            name: "h2".into(),
            peer_addr: "10.0.0.5:7380".into(),
        },
        cert: [5; 32],
    };
    if let Some(core) = sim.live.get_mut(&leader) {
        core.propose_membership(&taken, token);
    }
    sim.run_ticks(20);
    let refused = sim.result(token).expect("answered");
    assert!(
        matches!(&refused, Err(e) if e.contains("is used by node 4")),
        "{refused:?}"
    );
}
