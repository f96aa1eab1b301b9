//! The deterministic core of a node: the `RawNode`, its log store and the registry it applies
//! to, driven by explicit calls (tick, step, propose, ready) with no threads, clocks or sockets.
//!
//! The driver thread ([`crate::node`]) wraps a `Core` with real time and channels; the simulated
//! cluster tests drive several `Core`s directly over a simulated network. A proposal carries a
//! caller-chosen token `T` that comes back with its result once the entry is applied.

use std::collections::{BTreeMap, HashMap};

use linkdns_registry::{Authority, Command, Outcome, Published, Registry};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::Serialize;

use crate::logger::raft_logger;
use crate::storage::LogStore;
use crate::Error;

/// Settings of the Raft core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// This node's Raft id (non-zero).
    pub id: u64,
    /// On an empty store: start a new one-voter cluster (`true`), or wait to be added to an
    /// existing one and receive its snapshot (`false`, a joining node).
    pub bootstrap: bool,
    /// Ticks without a leader before an election (randomized up to twice this).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots; the log before a snapshot is compacted away.
    pub snapshot_every: u64,
    /// Bytes of applied entries after which a snapshot is due even before `snapshot_every`
    /// entries (a few large batches grow the log as much as many small entries).
    pub snapshot_log_bytes: u64,
    /// Ticks a proposal may wait to be applied before it fails.
    pub proposal_timeout_ticks: u64,
}

/// A node's role in the Raft group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    PreCandidate,
    Learner,
    /// Not (or no longer) in the cluster's configuration: joining, or removed.
    Detached,
    Stopped,
}

impl Role {
    /// The name used in status output (the same as the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre_candidate",
            Role::Learner => "learner",
            Role::Detached => "detached",
            Role::Stopped => "stopped",
        }
    }
}

/// What the node last reported about its Raft state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RaftStatus {
    pub id: u64,
    pub role: Role,
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub last_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// On the leader: the highest log index known to be replicated on each member.
    pub matched: BTreeMap<u64, u64>,
    /// A configuration change is proposed and not yet applied.
    pub conf_change_pending: bool,
    /// Snapshots this node took since it started, and the size and time (encoding and
    /// storing) of the last one.
    pub snapshots_taken: u64,
    pub last_snapshot_bytes: u64,
    pub last_snapshot_micros: u64,
    /// The longest time between two Raft ticks since the node started (nominally one tick,
    /// 20 ms): how long the Raft thread was held up, by a snapshot or a slow disk, say.
    pub max_tick_gap_micros: u64,
    /// Why the node cannot write its data dir now (it answers from memory meanwhile).
    pub degraded: Option<String>,
}

impl RaftStatus {
    pub fn is_member(&self, id: u64) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Voters, then learners.
    pub fn members(&self) -> impl Iterator<Item = u64> + '_ {
        self.voters.iter().chain(&self.learners).copied()
    }
}

/// A change of membership, proposed by the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Adds a node as a learner (a full replica without a vote), registers it and binds it to
    /// its certificate (SHA-256 fingerprint).
    AddLearner {
        info: linkdns_registry::NodeInfo,
        cert: [u8; 32],
    },
    /// Makes a learner a voter.
    Promote(u64),
    /// Removes a node from the configuration and its records from the registry.
    Remove(u64),
}

/// What one [`Core::ready`] produced.
pub struct Progress<T> {
    /// Raft messages to send to peers.
    pub messages: Vec<Message>,
    /// Proposals that finished (applied, rejected or failed), with their tokens. Their results
    /// are visible in the registry that `published` carries (or that was published before).
    pub done: Vec<(T, Result<Outcome, Error>)>,
    /// The registry changed: the new view to publish.
    pub published: Option<Published>,
    /// Leaders refused for want of a vouch: the voters to ask (see [`Inquiry`]).
    pub inquiries: Vec<Inquiry>,
}

impl<T> Default for Progress<T> {
    fn default() -> Self {
        Progress {
            messages: Vec::new(),
            done: Vec::new(),
            published: None,
            inquiries: Vec::new(),
        }
    }
}

/// Leader messages came from a node this replica's log does not hold as a voter. A learner
/// acting as leader looks like that; so does a real voter promoted after the point this
/// replica has applied (it lags). Raft cannot tell them apart, so such messages are refused,
/// and this replica asks the voters its log holds whom they follow: a leader that `needed`
/// of them follow in one term and hold as a voter is vouched for ([`Core::vouch`]) and leads
/// that term here. What the voters report counts, not what the refused sender claimed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inquiry {
    /// This replica's voters, itself left out (it cannot vouch).
    pub ask: Vec<u64>,
    /// How many of them must agree: one. Raft trusts each voter already (any can campaign
    /// and lead, and then append what it likes), so one voter's word adds no risk; asking
    /// for more would leave a replica whose old voters are gone (replaced, or an even-sized
    /// set) unable to follow the real leader ever.
    pub needed: usize,
}

/// A member's own account of who leads it, as it answers an [`Inquiry`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderView {
    pub term: u64,
    pub leader: Option<u64>,
    pub voters: Vec<u64>,
}

impl LeaderView {
    pub fn of(status: &RaftStatus) -> LeaderView {
        LeaderView {
            term: status.term,
            leader: status.leader,
            voters: status.voters.clone(),
        }
    }
}

impl Inquiry {
    /// The leader and term that `answers` (each from the member it names, as the transport
    /// authenticated it) vouch for: followed by at least `needed` of the asked voters in that
    /// term, and a voter in their configuration; the latest such term.
    pub fn vouched_by(&self, answers: &[(u64, LeaderView)]) -> Option<(u64, u64)> {
        let mut backing: BTreeMap<(u64, u64), std::collections::BTreeSet<u64>> = BTreeMap::new();
        for (from, view) in answers {
            let Some(leader) = view.leader else { continue };
            if self.ask.contains(from) && view.voters.contains(&leader) {
                backing
                    .entry((view.term, leader))
                    .or_default()
                    .insert(*from);
            }
        }
        backing
            .into_iter()
            .rev()
            .find(|(_, voters)| voters.len() >= self.needed)
            .map(|((term, leader), _)| (leader, term))
    }
}

/// Who proposed an entry: the node, which run of that node (request ids restart at 1 with every
/// run, and a restart replays entries of earlier runs), and the request id within the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Proposer {
    node: u64,
    incarnation: u64,
    request: u64,
}

impl Proposer {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.extend_from_slice(&self.node.to_be_bytes());
        v.extend_from_slice(&self.incarnation.to_be_bytes());
        v.extend_from_slice(&self.request.to_be_bytes());
        v
    }

    fn decode(context: &[u8]) -> Option<Proposer> {
        let word = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(
                context.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        Some(Proposer {
            node: word(0)?,
            incarnation: word(1)?,
            request: word(2)?,
        })
    }
}

struct Pending<T> {
    token: T,
    deadline_tick: u64,
}

/// One Raft member with its storage and state machine.
pub struct Core<S: LogStore, T> {
    config: CoreConfig,
    raw: RawNode<S>,
    registry: Registry,
    applied: u64,
    snapshot_index: u64,
    ticks: u64,
    pending: HashMap<u64, Pending<T>>,
    next_request: u64,
    incarnation: u64,
    /// Results of applied proposals, handed out once the registry that holds them is published.
    done: Vec<(T, Result<Outcome, Error>)>,
    /// The leader when the last ready ran.
    leader: u64,
    /// The registry of the last snapshot message stepped in, decoded when it arrived (to
    /// refuse one that does not decode), by its index: installing it needs no second decode.
    incoming: Option<(u64, Registry)>,
    /// Bytes of entries applied since the last snapshot (see `snapshot_log_bytes`).
    log_bytes: u64,
    /// Snapshots taken: how many, and the size and microseconds of the last.
    snapshots: (u64, u64, u64),
    /// The snapshot being encoded and written on its own thread, when the store can take its
    /// file from another thread; at most one at a time.
    snapshot_job: Option<SnapshotJob>,
    /// A leader this replica's log does not hold as a voter, and its term, that one of its
    /// voters vouched for (see [`Inquiry`]).
    vouched: Option<(u64, u64)>,
    /// When (in ticks) the voters were last asked: one inquiry per election timeout, however
    /// often and with whatever terms refused senders send.
    asked: Option<u64>,
    /// The inquiry to hand out with the next ready.
    inquiry: Option<Inquiry>,
}

/// A snapshot taken off the Raft thread: the registry's encoding and its file are made by
/// the `raft-snapshot` thread from a clone (which shares the records); the Raft thread then
/// only records it and compacts the log.
struct SnapshotJob {
    index: u64,
    wanted: bool,
    started: std::time::Instant,
    done: std::sync::mpsc::Receiver<Result<Snapshot, Error>>,
}

impl<S: LogStore, T> Core<S, T> {
    /// Opens the core on `store`. An empty store is bootstrapped as a one-voter cluster when
    /// `config.bootstrap`, else left empty for a leader to fill (a joining node). The registry
    /// is restored from the latest snapshot; committed entries after it are re-applied by the
    /// first [`Core::ready`] (`Config.applied` is the snapshot's index). `incarnation` must differ
    /// between runs of the same node.
    pub fn open(config: CoreConfig, mut store: S, incarnation: u64) -> Result<Self, Error> {
        let initial = store.initial_state()?;
        // The first index follows the snapshot's: no need to read the snapshot itself here.
        let fresh = initial.conf_state.voters.is_empty()
            && initial.conf_state.learners.is_empty()
            && store.first_index()? == 1;
        if fresh && config.bootstrap {
            tracing::info!(
                node = config.id,
                "empty data dir: bootstrapping a one-voter cluster"
            );
            let mut snapshot = Snapshot::default();
            snapshot.data = Registry::new().snapshot().into();
            let meta = snapshot.mut_metadata();
            meta.index = 1;
            meta.term = 1;
            meta.mut_conf_state().voters = vec![config.id];
            store.install_snapshot(&snapshot)?;
            store.sync()?;
        }
        let snapshot = store.current_snapshot()?;
        let registry = Registry::restore(&snapshot.data)?;
        let snapshot_index = snapshot.get_metadata().index;
        drop(snapshot);
        release_freed_memory();

        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            // Randomized in [1, 1.4) election timeouts rather than raft-rs's [1, 2): a dead
            // leader is replaced sooner, split votes stay rare with a handful of voters.
            min_election_tick: config.election_ticks,
            max_election_tick: config.election_ticks + config.election_ticks.div_ceil(5) * 2,
            heartbeat_tick: config.heartbeat_ticks,
            applied: snapshot_index,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        let raw = RawNode::new(&raft_config, store, &raft_logger())?;
        Ok(Core {
            config,
            raw,
            registry,
            applied: snapshot_index,
            snapshot_index,
            ticks: 0,
            pending: HashMap::new(),
            next_request: 1,
            incarnation,
            done: Vec::new(),
            leader: raft::INVALID_ID,
            incoming: None,
            log_bytes: 0,
            snapshots: (0, 0, 0),
            snapshot_job: None,
            vouched: None,
            asked: None,
            inquiry: None,
        })
    }

    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The applied registry (the driver's copy; readers use the published one).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The term of the log entry at `index`, if the log (or its snapshot) still holds it.
    pub fn term_of(&self, index: u64) -> Option<u64> {
        self.raw.raft.raft_log.term(index).ok()
    }

    /// Gives the store back (a simulated restart reopens a core on it).
    pub fn into_store(self) -> S {
        self.raw.raft.r.raft_log.store
    }

    /// Advances logical time by one tick: elections, heartbeats, proposal deadlines.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.raw.tick();
        let now = self.ticks;
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_tick <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                self.done.push((p.token, Err(Error::Timeout)));
            }
        }
    }

    /// Hands a peer's message to Raft. Messages from unknown peers or of a stale term are
    /// dropped by Raft itself; a forwarded proposal that does not come from the node it names,
    /// or asks for what that node may not change, and a leader's message from a node that is
    /// not this term's leader, are dropped here (the caller checked `from` against the
    /// connection's certificate).
    pub fn step(&mut self, message: Message) {
        if let Err(refusal) = self.admissible(&message) {
            match refusal {
                Refusal::Unvouched { leader, term } => self.inquire(leader, term),
                Refusal::Other(reason) => {
                    tracing::warn!(peer = message.from, kind = ?message.get_msg_type(), %reason, "refused a peer's message")
                }
            }
            return;
        }
        // A snapshot this build cannot read must never be installed: the store would hold it,
        // and every later start would fail on it.
        if message.get_msg_type() == MessageType::MsgSnapshot {
            let snapshot = message.get_snapshot();
            match Registry::restore(&snapshot.data) {
                Ok(registry) => self.incoming = Some((snapshot.get_metadata().index, registry)),
                Err(e) => {
                    tracing::warn!(peer = message.from, error = %e, "refused a snapshot this node cannot read; not installed");
                    return;
                }
            }
        }
        if let Err(e) = self.raw.step(message) {
            tracing::debug!(error = %e, "dropped a raft message");
        }
    }

    /// Why a peer's message must not reach Raft, if it must not. Raft trusts its voters; these
    /// checks keep a learner (or any non-voter) from acting as one:
    /// - a forwarded proposal must come from the node it names and change only its records;
    /// - one leader per term: leader messages of this term from another node are lies;
    /// - leader messages from a node this replica's log does not hold as a voter are refused,
    ///   in every window (after a restart, during a failover), unless a voter this
    ///   replica's log holds vouched for that node leading that term (a replica that lags behind a
    ///   promotion follows the real new leader that way; see [`Inquiry`]). A node with no
    ///   configuration yet (joining, before its first snapshot) follows whoever leads it;
    /// - the entries a leader appends in its own term are its own proposals, or a node's
    ///   proposals of its own records (as the leader took them, forwarded): an entry's rights
    ///   come from the leader of the term it was appended in, never from the name alone;
    /// - vote requests from a node that is no voter here, and a timeout-now from anyone but
    ///   the leader (linkdns never transfers leadership), are refused.
    fn admissible(&self, m: &Message) -> Result<(), Refusal> {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        let voter = conf.voters().contains(m.from);
        let configured = !conf.voters().ids().is_empty();
        // raft-rs takes a message without a term as its own (local) one, unchecked.
        if m.term == 0 && m.get_msg_type() != MessageType::MsgPropose {
            return Err(Refusal::Other(format!(
                "a {:?} without a term",
                m.get_msg_type()
            )));
        }
        // A leader's heartbeat commits no further than the follower has acknowledged; raft-rs
        // stops the process on one that does.
        if m.get_msg_type() == MessageType::MsgHeartbeat && m.commit > raft.raft_log.last_index() {
            return Err(Refusal::Other(format!(
                "a heartbeat committing index {} past this replica's last, {}",
                m.commit,
                raft.raft_log.last_index()
            )));
        }
        match m.get_msg_type() {
            // Forwarded proposals carry no term (raft-rs stops the process on forwarding one
            // that does).
            MessageType::MsgPropose if m.term != 0 => Err(Refusal::Other(format!(
                "a forwarded proposal with a term ({})",
                m.term
            ))),
            MessageType::MsgPropose => m
                .entries
                .iter()
                .try_for_each(|e| forwarded(m.from, e))
                .map_err(Refusal::Other),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot => {
                if m.term == raft.term
                    && raft.leader_id != raft::INVALID_ID
                    && m.from != raft.leader_id
                {
                    return Err(Refusal::Other(format!(
                        "node {} is not the leader of term {} (node {} is)",
                        m.from, m.term, raft.leader_id
                    )));
                }
                // Stale terms are Raft's to answer (it tells the sender the current one).
                if configured
                    && !voter
                    && m.term >= raft.term
                    && self.vouched != Some((m.from, m.term))
                {
                    return Err(Refusal::Unvouched {
                        leader: m.from,
                        term: m.term,
                    });
                }
                m.entries
                    .iter()
                    .try_for_each(|e| appended(m.from, m.term, e))
                    .map_err(Refusal::Other)
            }
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote if !voter => {
                Err(Refusal::Other(format!(
                    "node {} is no voter; its vote requests do not count",
                    m.from
                )))
            }
            MessageType::MsgTimeoutNow if m.from != raft.leader_id => Err(Refusal::Other(format!(
                "node {} is not the leader; only a leader hands over",
                m.from
            ))),
            MessageType::MsgTimeoutNow
            | MessageType::MsgAppendResponse
            | MessageType::MsgHeartbeatResponse
            | MessageType::MsgRequestVote
            | MessageType::MsgRequestVoteResponse
            | MessageType::MsgRequestPreVote
            | MessageType::MsgRequestPreVoteResponse => Ok(()),
            // Local to raft-rs (elections, beats, reports), or what linkdns never sends
            // (leadership transfer, read index): raft-rs stops the process on some of them.
            kind => Err(Refusal::Other(format!(
                "a {kind:?}, which linkdns peers never send"
            ))),
        }
    }

    /// Asks this replica's voters whom they follow (at most once per election timeout), after
    /// refusing leader messages from `leader` for `term`.
    fn inquire(&mut self, leader: u64, term: u64) {
        let now = self.ticks;
        let timeout = self.config.election_ticks as u64;
        if self.asked.is_some_and(|at| now < at + timeout) {
            return;
        }
        self.asked = Some(now);
        let voters = self.raw.raft.prs().conf().voters().ids();
        let mut ask: Vec<u64> = voters.iter().filter(|&v| v != self.config.id).collect();
        ask.sort_unstable();
        if ask.is_empty() {
            tracing::warn!(peer = leader, term, "refused leader messages from a node this replica does not hold as a voter; it has no other voter to ask");
            return;
        }
        tracing::warn!(
            peer = leader,
            term,
            voters = ?ask,
            "refused leader messages from a node this replica does not hold as a voter; asking its voters whom they follow"
        );
        self.inquiry = Some(Inquiry { ask, needed: 1 });
    }

    /// This replica's voters vouched for `leader` leading `term` (see [`Inquiry`]): its
    /// messages of that term are taken from now on.
    pub fn vouch(&mut self, leader: u64, term: u64) {
        if term < self.raw.raft.term {
            return;
        }
        tracing::info!(
            peer = leader,
            term,
            "this replica's voters vouch for the node as leader; following it"
        );
        self.vouched = Some((leader, term));
    }

    /// The proposer of an entry, and whether it is a voter now (at this point of the log). An
    /// entry that names none (only a forger's: linkdns names the proposer of every entry) may
    /// change nothing: node 0 is nobody.
    fn authority(&self, entry: &Entry) -> Authority {
        let Some(proposer) = Proposer::decode(&entry.context) else {
            return Authority::own(0);
        };
        let voter = self.raw.raft.prs().conf().voters().contains(proposer.node);
        Authority {
            node: proposer.node,
            voter,
        }
    }

    /// The transport could not reach `peer`: Raft slows down replication to it.
    pub fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    /// The transport finished (or failed) streaming a snapshot to `peer`.
    pub fn report_snapshot(&mut self, peer: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(peer, status);
    }

    /// Starts an election now (a lone voter need not wait out the election timeout).
    pub fn campaign(&mut self) -> Result<(), Error> {
        self.raw.campaign()?;
        Ok(())
    }

    /// Proposes a registry command. On a follower or learner Raft forwards it to the leader;
    /// with no leader known it fails at once with [`Error::NotLeader`].
    pub fn propose(&mut self, command: &Command, token: T) {
        // What the leader would refuse to take from this node, or apply would refuse: said at
        // once rather than as a timeout.
        let by = match self.raw.raft.state {
            StateRole::Leader => Authority {
                node: self.config.id,
                voter: true,
            },
            _ => Authority::own(self.config.id),
        };
        if let Err(e) = command.authorized(by) {
            self.done.push((token, Err(Error::Registry(e))));
            return;
        }
        let context = self.proposer();
        match self.raw.propose(context.encode(), command.encode()) {
            Ok(()) => self.track(context.request, token),
            Err(e) => self.done.push((token, Err(self.propose_error(e)))),
        }
    }

    /// Proposes a membership change. Only the leader takes them, one at a time.
    pub fn propose_membership(&mut self, change: &Membership, token: T) {
        if self.raw.raft.state != StateRole::Leader {
            let e = self.not_leader();
            self.done.push((token, Err(e)));
            return;
        }
        if self.raw.raft.has_pending_conf() {
            self.done.push((token, Err(Error::ConfChangeInProgress)));
            return;
        }
        let mut cc = ConfChange::default();
        match change {
            Membership::AddLearner { info, cert } => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.node_id = info.id;
                cc.context = Command::Batch(vec![
                    Command::UpsertNode(info.clone()),
                    Command::SetNodeCert {
                        node: info.id,
                        fingerprint: *cert,
                    },
                ])
                .encode()
                .into();
            }
            Membership::Promote(id) => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.node_id = *id;
            }
            Membership::Remove(id) => {
                cc.set_change_type(ConfChangeType::RemoveNode);
                cc.node_id = *id;
            }
        }
        // Checked here for a quick answer, and again when applied (where it counts).
        if let Some(reason) = self.membership_error(&cc) {
            self.done
                .push((token, Err(Error::InvalidMembership(reason))));
            return;
        }
        let context = self.proposer();
        match self.raw.propose_conf_change(context.encode(), cc) {
            Ok(()) => self.track(context.request, token),
            Err(e) => self.done.push((token, Err(self.propose_error(e)))),
        }
    }

    fn proposer(&mut self) -> Proposer {
        let request = self.next_request;
        self.next_request += 1;
        Proposer {
            node: self.config.id,
            incarnation: self.incarnation,
            request,
        }
    }

    fn track(&mut self, request: u64, token: T) {
        let deadline_tick = self.ticks + self.config.proposal_timeout_ticks;
        self.pending.insert(
            request,
            Pending {
                token,
                deadline_tick,
            },
        );
    }

    fn not_leader(&self) -> Error {
        let leader = self.raw.raft.leader_id;
        Error::NotLeader {
            leader: (leader != raft::INVALID_ID).then_some(leader),
        }
    }

    fn propose_error(&self, e: raft::Error) -> Error {
        match e {
            raft::Error::ProposalDropped => self.not_leader(),
            e => Error::Raft(e),
        }
    }

    /// Writes the hard state as it is and syncs: whether the store takes a durable write now
    /// (a degraded node checks before it goes on).
    pub fn check_writable(&mut self) -> Result<(), Error> {
        let hard_state = self.raw.raft.hard_state();
        let store = self.raw.mut_store();
        store.set_hard_state(&hard_state)?;
        store.sync()
    }

    /// Fails every proposal still waiting (the node is stopping).
    pub fn fail_pending(&mut self) -> Vec<(T, Result<Outcome, Error>)> {
        let mut out: Vec<_> = self.done.drain(..).collect();
        out.extend(
            self.pending
                .drain()
                .map(|(_, p)| (p.token, Err(Error::Stopped))),
        );
        out
    }

    pub fn status(&self) -> RaftStatus {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        let mut voters: Vec<u64> = conf.voters().ids().iter().collect();
        voters.sort_unstable();
        let mut learners: Vec<u64> = conf.learners().iter().copied().collect();
        learners.sort_unstable();
        let member = voters.contains(&raft.id) || learners.contains(&raft.id);
        let role = if !member {
            Role::Detached
        } else if learners.contains(&raft.id) {
            Role::Learner
        } else {
            match raft.state {
                StateRole::Leader => Role::Leader,
                StateRole::Follower => Role::Follower,
                StateRole::Candidate => Role::Candidate,
                StateRole::PreCandidate => Role::PreCandidate,
            }
        };
        let matched = if raft.state == StateRole::Leader {
            raft.prs()
                .iter()
                .map(|(&id, pr)| (id, pr.matched))
                .collect()
        } else {
            BTreeMap::new()
        };
        RaftStatus {
            id: raft.id,
            role,
            leader: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            snapshot_index: raft.raft_log.store.first_index().unwrap_or(1) - 1,
            last_index: raft.raft_log.last_index(),
            voters,
            learners,
            matched,
            conf_change_pending: raft.state == StateRole::Leader && raft.has_pending_conf(),
            snapshots_taken: self.snapshots.0,
            last_snapshot_bytes: self.snapshots.1,
            last_snapshot_micros: self.snapshots.2,
            max_tick_gap_micros: 0,
            degraded: None,
        }
    }

    /// Whether this node is the only voter: it can elect itself at once.
    pub fn is_lone_voter(&self) -> bool {
        let voters = self.raw.raft.prs().conf().voters().ids();
        voters.len() == 1 && voters.contains(self.config.id)
    }

    /// Handles what Raft has ready. The order is raft-rs's (examples/five_mem_node `on_ready`)
    /// with one change, so that the commit index is durable before anything is applied:
    ///
    /// 1. take `messages` (the leader may send while it persists),
    /// 2. install `snapshot` into the store and the registry,
    /// 3. append `entries` and write `hs` (term, vote, commit) together, then flush,
    /// 4. apply `committed_entries` (raft-rs applies them before step 3; we apply after the
    ///    flush so a crash never leaves applied state ahead of the durable commit index),
    /// 5. take `persisted_messages` (votes and append responses: only after the flush),
    /// 6. `advance`; from the light ready: persist and flush the commit index, take its
    ///    messages, apply its committed entries,
    /// 7. `advance_apply`, snapshot and compact if due (or if a peer needs a newer snapshot),
    ///    and hand out the new registry and the finished proposals.
    pub fn ready(&mut self) -> Result<Progress<T>, Error> {
        let mut progress = Progress::default();
        progress.inquiries.extend(self.inquiry.take());
        let applied_before = self.applied;
        // Raft takes a snapshot message in the step before this ready, or never.
        let incoming = self.incoming.take();
        if self.raw.has_ready() {
            let mut ready = self.raw.ready();
            progress.messages = ready.take_messages();

            if !ready.snapshot().is_empty() {
                let snapshot = ready.snapshot().clone();
                // Decoded before it is stored (in `step`, when it arrived): a store never holds
                // one that does not decode.
                let index = snapshot.get_metadata().index;
                let registry = match incoming {
                    Some((decoded, registry)) if decoded == index => registry,
                    _ => Registry::restore(&snapshot.data)?,
                };
                self.raw.mut_store().install_snapshot(&snapshot)?;
                self.registry = registry;
                self.applied = snapshot.get_metadata().index;
                self.snapshot_index = self.applied;
                self.log_bytes = 0;
                // Entries inside the snapshot are never applied here one by one: whoever waits
                // for one cannot be told whether it is in (nor, below, after a change of leader).
                for (_, p) in self.pending.drain() {
                    self.done.push((p.token, Err(Error::OutcomeUnknown)));
                }
                tracing::info!(
                    index = self.applied,
                    records = self.registry.record_count(),
                    "installed a snapshot from the leader"
                );
            }

            let store = self.raw.mut_store();
            store.append(ready.entries())?;
            if let Some(hs) = ready.hs() {
                store.set_hard_state(hs)?;
            }
            store.sync()?;

            self.apply(ready.take_committed_entries())?;
            progress.messages.extend(ready.take_persisted_messages());

            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                let store = self.raw.mut_store();
                store.set_commit(commit)?;
                store.sync()?;
            }
            progress.messages.extend(light.take_messages());
            self.apply(light.take_committed_entries())?;
            self.raw.advance_apply();
        }

        // A new leader: proposals forwarded to the old one may be lost with it, and waiting out
        // their timeout would stall the proposers. Their outcome is unknown; they retry
        // (commands are idempotent).
        let leader = self.raw.raft.leader_id;
        if leader != self.leader {
            if self.leader != raft::INVALID_ID {
                for (_, p) in self.pending.drain() {
                    self.done.push((p.token, Err(Error::OutcomeUnknown)));
                }
            }
            self.leader = leader;
        }

        self.finish_snapshot()?;
        let wanted = self.raw.store().take_snapshot_request();
        if self.applied != applied_before || wanted {
            self.maybe_snapshot(wanted)?;
        }
        if self.applied != applied_before {
            progress.published = Some(Published::committed(self.applied, self.registry.clone()));
        }
        progress.done = std::mem::take(&mut self.done);
        Ok(progress)
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        for entry in entries {
            self.applied = entry.index;
            self.log_bytes += entry.data.len() as u64;
            // Conf changes update the in-memory configuration; the stored conf state is the one
            // of the latest snapshot, and a restart replays later conf changes from the log.
            let result = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => continue, // a new leader's
                EntryType::EntryNormal => self.apply_command(&entry)?,
                EntryType::EntryConfChange => {
                    let cc =
                        ConfChange::parse_from_bytes(&entry.data).map_err(|e| Error::Corrupt {
                            what: "committed conf change",
                            reason: format!("entry {}: {e}", entry.index),
                        })?;
                    let authority = self.authority(&entry);
                    self.apply_conf_change(&cc, entry.index, authority)?
                }
                EntryType::EntryConfChangeV2 => {
                    // Not proposed by linkdns; applied as raft-rs defines them.
                    let cc = ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| {
                        Error::Corrupt {
                            what: "committed conf change",
                            reason: format!("entry {}: {e}", entry.index),
                        }
                    })?;
                    self.raw
                        .apply_conf_change(&cc)
                        .map(|_| Outcome::Changed)
                        .map_err(Error::Raft)
                }
            };
            if let Some(p) = Proposer::decode(&entry.context) {
                if p.node == self.config.id && p.incarnation == self.incarnation {
                    if let Some(pending) = self.pending.remove(&p.request) {
                        self.done.push((pending.token, result));
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_command(&mut self, entry: &Entry) -> Result<Result<Outcome, Error>, Error> {
        // A committed entry that does not decode is corruption (or a newer format): stop rather
        // than let this replica diverge from the others.
        let command = Command::decode(&entry.data).map_err(|e| Error::Corrupt {
            what: "committed log entry",
            reason: format!("entry {}: {e}", entry.index),
        })?;
        // Applying is deterministic: a rejected command is rejected the same way on every
        // replica, so it is a result for the proposer, not a reason to stop.
        let result = self.registry.apply_by(self.authority(entry), &command);
        if let Err(e) = &result {
            tracing::warn!(index = entry.index, error = %e, "command rejected");
        }
        Ok(result.map_err(Error::Registry))
    }

    /// Why a membership change is not valid now, if it is not: judged against the current
    /// configuration and registry, which are the same on every replica at a given index.
    fn membership_error(&self, cc: &ConfChange) -> Option<String> {
        let conf = self.raw.raft.prs().conf();
        let id = cc.node_id;
        let voters = conf.voters().ids();
        let is_voter = voters.contains(id);
        let is_learner = conf.learners().contains(&id);
        match cc.get_change_type() {
            ConfChangeType::AddLearnerNode => {
                if is_voter || is_learner {
                    return Some(format!("node {id} is already a member"));
                }
                if id < self.registry.next_node_id() {
                    return Some(format!("node id {id} was used before"));
                }
                let info = match Command::decode(&cc.context) {
                    Ok(Command::Batch(commands)) => commands.into_iter().find_map(|c| match c {
                        Command::UpsertNode(info) => Some(info),
                        _ => None,
                    }),
                    Ok(Command::UpsertNode(info)) => Some(info),
                    _ => None,
                };
                match info {
                    Some(info) if info.id != id => {
                        Some(format!("record of node {} for node {id}", info.id))
                    }
                    // A name held by a node that is no member (a record kept by a restore or a
                    // forced new cluster) is taken over: see `apply_conf_change`.
                    Some(info) => self
                        .registry
                        .node_by_name(&info.name)
                        .filter(|owner| {
                            conf.voters().contains(owner.id) || conf.learners().contains(&owner.id)
                        })
                        .map(|owner| {
                            format!("node name {:?} is used by node {}", owner.name, owner.id)
                        }),
                    None => Some(format!("no registry record for node {id}")),
                }
            }
            ConfChangeType::AddNode => (!is_learner).then(|| format!("node {id} is not a learner")),
            ConfChangeType::RemoveNode => {
                if !is_voter && !is_learner {
                    Some(format!("node {id} is not a member"))
                } else if is_voter && voters.len() == 1 {
                    Some(format!("node {id} is the last voter"))
                } else {
                    None
                }
            }
        }
    }

    /// Applies a membership change to the configuration and the registry together, or to
    /// neither if it is not valid at this point of the log.
    fn apply_conf_change(
        &mut self,
        cc: &ConfChange,
        index: u64,
        authority: Authority,
    ) -> Result<Result<Outcome, Error>, Error> {
        if let Some(reason) = self.membership_error(cc) {
            tracing::warn!(index, node = cc.node_id, %reason, "conf change rejected");
            return Ok(Err(Error::InvalidMembership(reason)));
        }
        if !authority.voter {
            let by = authority;
            let reason = format!(
                "node {} is not a voter; membership is the leader's",
                by.node
            );
            tracing::warn!(index, node = cc.node_id, %reason, "conf change rejected");
            return Ok(Err(Error::InvalidMembership(reason)));
        }
        if let Err(e) = self.raw.apply_conf_change(cc) {
            // Deterministic (the same configuration on every replica): a result, not a stop.
            tracing::warn!(index, node = cc.node_id, error = %e, "conf change rejected");
            return Ok(Err(Error::Raft(e)));
        }
        let registry_change = match cc.get_change_type() {
            ConfChangeType::AddLearnerNode | ConfChangeType::AddNode if !cc.context.is_empty() => {
                Some(Command::decode(&cc.context).map_err(|e| Error::Corrupt {
                    what: "committed conf change",
                    reason: format!("entry {index}: {e}"),
                })?)
            }
            ConfChangeType::RemoveNode => Some(Command::RemoveNode { node: cc.node_id }),
            _ => None,
        };
        // A host admitted again under the name of a record no member holds (kept by a restore
        // or a forced new cluster) replaces it: its containers come again from its watcher.
        if let (ConfChangeType::AddLearnerNode, Some(Command::Batch(commands))) =
            (cc.get_change_type(), &registry_change)
        {
            let stale = commands.iter().find_map(|c| match c {
                Command::UpsertNode(info) => self
                    .registry
                    .node_by_name(&info.name)
                    .map(|owner| owner.id)
                    .filter(|&owner| owner != info.id),
                _ => None,
            });
            if let Some(owner) = stale {
                tracing::info!(
                    index,
                    node = owner,
                    new = cc.node_id,
                    "a host joined again under the name of an old record; replacing it"
                );
                let _ = self.registry.apply(&Command::RemoveNode { node: owner });
            }
        }
        if let Some(command) = registry_change {
            if let Err(e) = self.registry.apply(&command) {
                tracing::warn!(index, error = %e, "registry side of a conf change rejected");
            }
        }
        tracing::info!(
            index,
            node = cc.node_id,
            change = ?cc.get_change_type(),
            "membership changed"
        );
        Ok(Ok(Outcome::Changed))
    }

    /// Log bytes after which a snapshot is due: a quarter of the last snapshot's size (at
    /// least 1 MiB, at most `snapshot_log_bytes`). The log is what a node holds besides its
    /// registry, so it stays a small part of it; each snapshot then costs at most four times
    /// the log it replaces.
    fn snapshot_due_bytes(&self) -> u64 {
        (self.snapshots.1 / 4)
            .max(1024 * 1024)
            .min(self.config.snapshot_log_bytes)
    }

    /// Snapshots the registry and compacts the log once enough entries have been applied, or
    /// at once when `wanted` (a peer needs a snapshot the store does not have). Where the store
    /// has a [`LogStore::stager`], the snapshot is encoded and written on its own thread and
    /// recorded by a later [`Core::ready`]; else here.
    fn maybe_snapshot(&mut self, wanted: bool) -> Result<(), Error> {
        let due = self.applied >= self.snapshot_index + self.config.snapshot_every
            || self.log_bytes >= self.snapshot_due_bytes();
        if !(due || wanted) || self.applied <= self.snapshot_index {
            return Ok(());
        }
        if self.snapshot_job.is_some() {
            // One at a time; a peer that wanted one asks again at its next heartbeat.
            return Ok(());
        }
        let started = std::time::Instant::now();
        let index = self.applied;
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = self.raw.raft.raft_log.term(index)?;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        self.log_bytes = 0;
        let Some(stager) = self.raw.store().stager() else {
            snapshot.data = self.registry.snapshot().into();
            return self.record_snapshot(snapshot, wanted, started);
        };
        let registry = self.registry.clone();
        let (send, done) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("raft-snapshot".into())
            .spawn(move || {
                yield_to_raft_thread();
                snapshot.data = registry.snapshot().into();
                drop(registry);
                let staged = stager(&snapshot).map(|()| snapshot);
                let _ = send.send(staged);
            })
            .map_err(|e| Error::Storage {
                path: String::new(),
                reason: format!("cannot start the snapshot thread: {e}"),
            })?;
        self.snapshot_job = Some(SnapshotJob {
            index,
            wanted,
            started,
            done,
        });
        Ok(())
    }

    /// Records the snapshot the snapshot thread finished, if it did.
    fn finish_snapshot(&mut self) -> Result<(), Error> {
        let Some(job) = &self.snapshot_job else {
            return Ok(());
        };
        let finished = match job.done.try_recv() {
            Ok(finished) => finished,
            Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(()),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => Err(Error::Storage {
                path: String::new(),
                reason: format!("the thread taking snapshot {} ended", job.index),
            }),
        };
        let (wanted, started) = (job.wanted, job.started);
        self.snapshot_job = None;
        self.record_snapshot(finished?, wanted, started)
    }

    /// Installs a snapshot of this node's own registry as the log's base and compacts the log.
    fn record_snapshot(
        &mut self,
        snapshot: Snapshot,
        wanted: bool,
        started: std::time::Instant,
    ) -> Result<(), Error> {
        let (index, term) = (snapshot.get_metadata().index, snapshot.get_metadata().term);
        if index <= self.snapshot_index {
            // A leader's newer snapshot was installed meanwhile: the store ignores this one
            // (and drops its staged file).
            return self.raw.mut_store().install_snapshot(&snapshot);
        }
        let store = self.raw.mut_store();
        store.install_snapshot(&snapshot)?;
        store.sync()?;
        let bytes = snapshot.data.len() as u64;
        drop(snapshot);
        release_freed_memory();
        self.snapshot_index = index;
        self.snapshots = (
            self.snapshots.0 + 1,
            bytes,
            started.elapsed().as_micros() as u64,
        );
        tracing::info!(
            index,
            term,
            bytes = self.snapshots.1,
            micros = self.snapshots.2,
            records = self.registry.record_count(),
            for_peer = wanted,
            "snapshot taken, log compacted"
        );
        Ok(())
    }
}

/// Hands memory freed after a snapshot (its encoding, megabytes, made on another thread and
/// so in another malloc arena) back to the system: glibc keeps freed memory of its arenas
/// otherwise, and the node's resident size would keep the high-water mark of every snapshot.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it only returns free pages to the kernel.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lowers the calling thread's priority (nice 10), for the snapshot thread: on a busy host
/// its hundreds of milliseconds of encoding must not take the CPU the Raft thread's ticks and
/// heartbeats need.
fn yield_to_raft_thread() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes the scheduling priority; on Linux, `who` 0 with
    // PRIO_PROCESS is the calling thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// Makes the allocator give large freed buffers back at once, for a long-running node: with
/// glibc's default, each freed buffer larger than its mmap threshold raises that threshold
/// (up to 32 MiB) and the trim threshold with it, so after one snapshot every later buffer of
/// a few megabytes (snapshots, batches of log entries decoded by the transport) stays resident
/// once freed. A fixed threshold of 256 KiB keeps such buffers mapped on their own and
/// unmapped when freed. Call before the node starts its threads.
pub fn limit_retained_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before other threads start.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Why [`Core::admissible`] refused a message.
enum Refusal {
    /// Leader messages from a node not held as a voter: ask the voters about it.
    Unvouched {
        leader: u64,
        term: u64,
    },
    Other(String),
}

/// Whether `entry`, in an append of `leader`'s for `term`, may be its: entries of earlier terms
/// are earlier leaders' (checked when they were appended); one of this term is the leader's own
/// proposal, or a node's proposal of its own records forwarded to the leader, or the leader's
/// empty entry of a new term.
fn appended(leader: u64, term: u64, entry: &Entry) -> Result<(), String> {
    if entry.term != term || entry.data.is_empty() {
        return Ok(());
    }
    match Proposer::decode(&entry.context) {
        Some(proposer) if proposer.node == leader => Ok(()),
        Some(proposer) => forwarded(proposer.node, entry).map_err(|e| {
            format!("an entry of term {term} naming node {} as its proposer, which the leader {leader} could not have taken from it: {e}", proposer.node)
        }),
        None => Err(format!(
            "an entry of term {term} that names no proposer, from leader {leader}"
        )),
    }
}

/// Whether a proposal entry forwarded by node `from` may go into the log: a command of the
/// node's own records, proposed by that very node. Membership changes and maintenance are the
/// leader's own, never forwarded; an entry that does not decode would stop every replica that
/// applies it, so it never gets in.
fn forwarded(from: u64, entry: &Entry) -> Result<(), String> {
    if entry.get_entry_type() != EntryType::EntryNormal {
        return Err("a forwarded membership change (only the leader proposes them)".into());
    }
    let proposer = Proposer::decode(&entry.context)
        .ok_or_else(|| "a forwarded entry that names no proposer".to_string())?;
    if proposer.node != from {
        return Err(format!(
            "a forwarded entry naming node {} as its proposer",
            proposer.node
        ));
    }
    let command = Command::decode(&entry.data).map_err(|e| format!("a forwarded entry: {e}"))?;
    command
        .authorized(Authority::own(from))
        .map_err(|e| e.to_string())
}
