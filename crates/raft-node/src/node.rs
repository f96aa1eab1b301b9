//! The driver loop: one thread owns the `RawNode`, the log store and the registry, and handles a
//! closed set of events (tick, proposal, peer message, shutdown). Nothing else touches them.
//!
//! Readers get the registry through [`Published`], swapped atomically after each batch of applied
//! entries, so a DNS answer never waits on Raft.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use linkdns_registry::{Command, Outcome, Published, Registry};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole, Storage};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::logger::raft_logger;
use crate::storage::LogStore;
use crate::Error;

/// Settings of the Raft node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's Raft id (non-zero).
    pub id: u64,
    /// Length of one Raft tick.
    pub tick: Duration,
    /// Ticks without a leader before an election (randomized up to twice this).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots; the log before a snapshot is compacted away.
    pub snapshot_every: u64,
    /// How long a proposal may wait to be applied before it fails.
    pub proposal_timeout: Duration,
}

impl NodeConfig {
    pub fn new(id: u64) -> NodeConfig {
        NodeConfig {
            id,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every: 10_000,
            proposal_timeout: Duration::from_secs(5),
        }
    }
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
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

type Reply = oneshot::Sender<Result<Outcome, Error>>;

/// The closed set of events the driver loop handles.
enum Event {
    Propose {
        command: Command,
        reply: Reply,
    },
    /// A Raft message from a peer (delivered by the transport).
    Step(Box<Message>),
    Shutdown,
}

/// The handle the rest of the process holds: propose, read, stop.
pub struct NodeHandle {
    events: Sender<Event>,
    published: Arc<ArcSwap<Published>>,
    status: Arc<ArcSwap<RaftStatus>>,
    proposal_timeout: Duration,
    thread: Mutex<Option<JoinHandle<Result<(), Error>>>>,
}

impl NodeHandle {
    /// Proposes a command and waits until it is applied (or rejected, or timed out).
    pub async fn propose(&self, command: Command) -> Result<Outcome, Error> {
        let (reply, rx) = oneshot::channel();
        self.events
            .send(Event::Propose { command, reply })
            .map_err(|_| Error::Stopped)?;
        match tokio::time::timeout(self.proposal_timeout + Duration::from_millis(500), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Timeout(self.proposal_timeout)),
        }
    }

    /// Hands a peer's Raft message to the loop.
    pub fn step(&self, message: Message) -> Result<(), Error> {
        self.events
            .send(Event::Step(Box::new(message)))
            .map_err(|_| Error::Stopped)
    }

    /// The shared view of the applied registry.
    pub fn published(&self) -> Arc<ArcSwap<Published>> {
        self.published.clone()
    }

    pub fn status(&self) -> RaftStatus {
        (**self.status.load()).clone()
    }

    /// Whether the loop thread has ended (after an error or a shutdown).
    pub fn is_stopped(&self) -> bool {
        match self.thread.lock() {
            Ok(t) => t.as_ref().is_none_or(|t| t.is_finished()),
            Err(_) => true,
        }
    }

    /// Stops the loop (flushing what it holds) and waits for it; returns the error that ended it
    /// early, if any. Later calls return `Ok`.
    pub fn shutdown(&self) -> Result<(), Error> {
        let _ = self.events.send(Event::Shutdown);
        let thread = match self.thread.lock() {
            Ok(mut t) => t.take(),
            Err(_) => None,
        };
        match thread {
            Some(t) => t.join().unwrap_or(Err(Error::Stopped)),
            None => Ok(()),
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Opens the node on `store` (bootstrapping a one-voter cluster on an empty store), restores the
/// registry from the latest snapshot, and starts the loop thread. Committed entries after the
/// snapshot are re-applied by Raft itself (`Config.applied` is the snapshot's index).
pub fn start<S: LogStore + Send + 'static>(
    config: NodeConfig,
    mut store: S,
) -> Result<NodeHandle, Error> {
    let initial = store.initial_state()?;
    let fresh = initial.conf_state.voters.is_empty()
        && initial.conf_state.learners.is_empty()
        && store.current_snapshot()?.get_metadata().index == 0;
    if fresh {
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

    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied: snapshot_index,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    let raw = RawNode::new(&raft_config, store, &raft_logger())?;

    let published = Arc::new(ArcSwap::from_pointee(Published {
        applied: snapshot_index,
        registry: registry.clone(),
    }));
    let status = Arc::new(ArcSwap::from_pointee(status_of(&raw, snapshot_index)));
    let (events, rx) = mpsc::channel();
    let mut driver = Driver {
        config: config.clone(),
        raw,
        registry,
        applied: snapshot_index,
        snapshot_index,
        pending: HashMap::new(),
        replies: Vec::new(),
        next_request: 1,
        incarnation: incarnation(),
        published: published.clone(),
        status: status.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || {
            let result = driver.run(rx);
            if let Err(e) = &result {
                tracing::error!(error = %e, "raft loop stopped");
            }
            driver.fail_pending();
            let mut last = driver.current_status();
            last.role = Role::Stopped;
            driver.status.store(Arc::new(last));
            result
        })
        .map_err(|e| Error::Storage {
            path: String::new(),
            reason: format!("cannot start the raft thread: {e}"),
        })?;
    Ok(NodeHandle {
        events,
        published,
        status,
        proposal_timeout: config.proposal_timeout,
        thread: Mutex::new(Some(thread)),
    })
}

struct Pending {
    reply: Reply,
    deadline: Instant,
}

struct Driver<S: LogStore> {
    config: NodeConfig,
    raw: RawNode<S>,
    registry: Registry,
    applied: u64,
    snapshot_index: u64,
    pending: HashMap<u64, Pending>,
    /// Results of applied proposals, sent once the registry that includes them is published.
    replies: Vec<(Reply, Result<Outcome, Error>)>,
    next_request: u64,
    incarnation: u64,
    published: Arc<ArcSwap<Published>>,
    status: Arc<ArcSwap<RaftStatus>>,
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

/// A number that differs between runs of this process: start time and pid. Only used to tell
/// this run's proposals from replayed ones, never by the state machine.
fn incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 48)
}

fn status_of<S: Storage>(raw: &RawNode<S>, applied: u64) -> RaftStatus {
    let raft = &raw.raft;
    let conf = raft.prs().conf();
    let mut voters: Vec<u64> = conf.voters().ids().iter().collect();
    voters.sort_unstable();
    let mut learners: Vec<u64> = conf.learners().iter().copied().collect();
    learners.sort_unstable();
    let role = if learners.contains(&raft.id) {
        Role::Learner
    } else {
        match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
        }
    };
    RaftStatus {
        id: raft.id,
        role,
        leader: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
        term: raft.term,
        commit_index: raft.raft_log.committed,
        applied_index: applied,
        snapshot_index: raft.raft_log.store.first_index().unwrap_or(1) - 1,
        voters,
        learners,
    }
}

impl<S: LogStore> Driver<S> {
    fn run(&mut self, rx: Receiver<Event>) -> Result<(), Error> {
        // Replay the committed log first (it may change the configuration), then decide.
        self.on_ready()?;
        self.maybe_campaign_alone()?;
        let mut next_tick = Instant::now() + self.config.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(event) => {
                    if !self.handle(event)? {
                        return Ok(());
                    }
                    // Take everything already queued, so one ready (one fsync) covers it all.
                    while let Ok(event) = rx.try_recv() {
                        if !self.handle(event)? {
                            return Ok(());
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + self.config.tick;
                self.expire_pending(now);
            }
            self.on_ready()?;
        }
    }

    /// Handles one event; `false` means shut down.
    fn handle(&mut self, event: Event) -> Result<bool, Error> {
        match event {
            Event::Propose { command, reply } => self.propose(command, reply),
            Event::Step(message) => {
                if let Err(e) = self.raw.step(*message) {
                    tracing::debug!(error = %e, "dropped a raft message");
                }
            }
            Event::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn propose(&mut self, command: Command, reply: Reply) {
        let request = self.next_request;
        self.next_request += 1;
        let context = Proposer {
            node: self.config.id,
            incarnation: self.incarnation,
            request,
        }
        .encode();
        match self.raw.propose(context, command.encode()) {
            Ok(()) => {
                let deadline = Instant::now() + self.config.proposal_timeout;
                self.pending.insert(request, Pending { reply, deadline });
            }
            Err(raft::Error::ProposalDropped) => {
                let leader = self.raw.raft.leader_id;
                let _ = reply.send(Err(Error::NotLeader {
                    leader: (leader != raft::INVALID_ID).then_some(leader),
                }));
            }
            Err(e) => {
                let _ = reply.send(Err(Error::Raft(e)));
            }
        }
    }

    fn expire_pending(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(p) = self.pending.remove(&id) {
                let _ = p
                    .reply
                    .send(Err(Error::Timeout(self.config.proposal_timeout)));
            }
        }
    }

    fn fail_pending(&mut self) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(Error::Stopped));
        }
    }

    /// Handles a Ready. The order is raft-rs's (examples/five_mem_node `on_ready`) with one
    /// change, so that the commit index is durable before anything is applied:
    ///
    /// 1. send `messages` (the leader may send while it persists),
    /// 2. install `snapshot` into the store and the registry,
    /// 3. append `entries` and write `hs` (term, vote, commit) together, then flush,
    /// 4. apply `committed_entries` (raft-rs applies them before step 3; we apply after the
    ///    flush so a crash never leaves applied state ahead of the durable commit index),
    /// 5. send `persisted_messages`,
    /// 6. `advance`; from the light ready: persist and flush the commit index, send its
    ///    messages, apply its committed entries,
    /// 7. `advance_apply`, publish the registry, maybe snapshot and compact, then answer the
    ///    proposers whose entries were applied.
    fn on_ready(&mut self) -> Result<(), Error> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        let applied_before = self.applied;

        self.send(ready.take_messages());

        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.raw.mut_store().install_snapshot(&snapshot)?;
            self.registry = Registry::restore(&snapshot.data)?;
            self.applied = snapshot.get_metadata().index;
            self.snapshot_index = self.applied;
        }

        let store = self.raw.mut_store();
        store.append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            store.set_hard_state(hs)?;
        }
        store.sync()?;

        let committed = ready.take_committed_entries();
        self.apply(committed)?;

        self.send(ready.take_persisted_messages());

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let store = self.raw.mut_store();
            store.set_commit(commit)?;
            store.sync()?;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();

        if self.applied != applied_before {
            self.published.store(Arc::new(Published {
                applied: self.applied,
                registry: self.registry.clone(),
            }));
            self.maybe_snapshot()?;
        }
        // Only now: a proposer that hears back reads a registry that includes its change.
        for (reply, result) in self.replies.drain(..) {
            let _ = reply.send(result);
        }
        self.status
            .store(Arc::new(status_of(&self.raw, self.applied)));
        Ok(())
    }

    /// The only voter wins at once: no reason to wait out an election timeout.
    fn maybe_campaign_alone(&mut self) -> Result<(), Error> {
        let voters = self.raw.raft.prs().conf().voters().ids();
        if voters.len() == 1 && voters.contains(self.config.id) {
            self.raw.campaign()?;
            self.on_ready()?;
        }
        Ok(())
    }

    fn current_status(&self) -> RaftStatus {
        status_of(&self.raw, self.applied)
    }

    fn send(&mut self, messages: Vec<Message>) {
        if !messages.is_empty() {
            // Peers arrive with the cluster transport; a one-voter group has no one to talk to.
            tracing::debug!(
                count = messages.len(),
                "no peer transport; raft messages dropped"
            );
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Error> {
        for entry in entries {
            self.applied = entry.index;
            // Conf changes update the in-memory configuration only; the stored conf state is the
            // one of the latest snapshot, and a restart replays later conf changes from the log.
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {} // a new leader's empty entry
                EntryType::EntryNormal => self.apply_command(&entry)?,
                EntryType::EntryConfChange => {
                    let cc =
                        ConfChange::parse_from_bytes(&entry.data).map_err(raft::Error::from)?;
                    self.raw.apply_conf_change(&cc)?;
                }
                EntryType::EntryConfChangeV2 => {
                    // Also the empty one raft-rs appends to leave a joint configuration.
                    let cc =
                        ConfChangeV2::parse_from_bytes(&entry.data).map_err(raft::Error::from)?;
                    self.raw.apply_conf_change(&cc)?;
                }
            }
        }
        Ok(())
    }

    fn apply_command(&mut self, entry: &Entry) -> Result<(), Error> {
        // A committed entry that does not decode is corruption (or a newer format): stop rather
        // than let this replica diverge from the others.
        let command = Command::decode(&entry.data).map_err(|e| Error::Corrupt {
            what: "committed log entry",
            reason: format!("entry {}: {e}", entry.index),
        })?;
        // Applying is deterministic: a rejected command is rejected the same way on every
        // replica, so it is a result for the proposer, not a reason to stop.
        let result = self.registry.apply(&command);
        if let Err(e) = &result {
            tracing::warn!(index = entry.index, error = %e, "command rejected");
        }
        if let Some(p) = Proposer::decode(&entry.context) {
            if p.node == self.config.id && p.incarnation == self.incarnation {
                if let Some(pending) = self.pending.remove(&p.request) {
                    self.replies
                        .push((pending.reply, result.map_err(Error::Registry)));
                }
            }
        }
        Ok(())
    }

    /// Snapshots the registry and compacts the log once enough entries have been applied.
    fn maybe_snapshot(&mut self) -> Result<(), Error> {
        if self.applied < self.snapshot_index + self.config.snapshot_every {
            return Ok(());
        }
        let index = self.applied;
        let term = self.raw.raft.raft_log.term(index)?;
        let mut snapshot = Snapshot::default();
        snapshot.data = self.registry.snapshot().into();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        let store = self.raw.mut_store();
        store.install_snapshot(&snapshot)?;
        store.sync()?;
        self.snapshot_index = index;
        tracing::info!(
            index,
            term,
            records = self.registry.record_count(),
            "snapshot taken, log compacted"
        );
        Ok(())
    }
}
