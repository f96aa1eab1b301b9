//! The driver: one thread owns a [`Core`] and turns real time and channels into its calls
//! (tick, step, propose, ready). Nothing else touches the core.
//!
//! Readers get the registry through [`Published`], swapped atomically after each batch of applied
//! entries, so a DNS answer never waits on Raft. Messages for peers go to an [`Outbox`] (the
//! peer transport, or [`NoPeers`] for a node alone).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use linkdns_registry::{Command, Outcome, Published};
use raft::eraftpb::Message;
use tokio::sync::oneshot;

use crate::core::{Core, CoreConfig, Inquiry, Membership, RaftStatus, Role};
use crate::propose::{Proposal, RetryPolicy};
use crate::storage::LogStore;
use crate::Error;

/// Settings of the Raft node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's Raft id (non-zero).
    pub id: u64,
    /// On an empty store: bootstrap a new cluster (`true`) or wait to be added (`false`).
    pub bootstrap: bool,
    /// Length of one Raft tick.
    pub tick: Duration,
    /// Ticks without a leader before an election (randomized up to twice this).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots; the log before a snapshot is compacted away.
    pub snapshot_every: u64,
    /// Bytes of applied entries after which a snapshot is due anyway.
    pub snapshot_log_bytes: u64,
    /// How long a proposal may wait to be applied before it fails.
    pub proposal_timeout: Duration,
}

impl NodeConfig {
    /// Defaults: 20 ms ticks, an election after 1.0–1.4 s without a leader (fine-grained, so
    /// two followers rarely time out in the same tick and split the vote), heartbeats every
    /// 200 ms.
    pub fn new(id: u64) -> NodeConfig {
        NodeConfig {
            id,
            bootstrap: true,
            tick: Duration::from_millis(20),
            election_ticks: 50,
            heartbeat_ticks: 10,
            snapshot_every: 10_000,
            snapshot_log_bytes: 64 << 20,
            proposal_timeout: Duration::from_secs(5),
        }
    }

    fn core(&self) -> CoreConfig {
        let tick_ms = self.tick.as_millis().max(1);
        CoreConfig {
            id: self.id,
            bootstrap: self.bootstrap,
            election_ticks: self.election_ticks,
            heartbeat_ticks: self.heartbeat_ticks,
            snapshot_every: self.snapshot_every,
            snapshot_log_bytes: self.snapshot_log_bytes,
            proposal_timeout_ticks: (self.proposal_timeout.as_millis() / tick_ms).max(1) as u64,
        }
    }
}

/// Where the node's outgoing Raft messages go. Called on the Raft thread: must not block.
pub trait Outbox: Send + Sync + 'static {
    fn send(&self, messages: Vec<Message>);

    /// Asks the voters in `inquiry` about a leader this replica refused, and calls
    /// [`NodeHandle::vouch`] if enough of them vouch for it. Must not block either. A node
    /// with no peers has nobody to ask.
    fn inquire(&self, inquiry: Inquiry) {
        tracing::debug!(?inquiry, "no peer transport; nobody to ask");
    }
}

/// The outbox of a node that has no peers (a one-node cluster): nothing to send to.
pub struct NoPeers;

impl Outbox for NoPeers {
    fn send(&self, messages: Vec<Message>) {
        if !messages.is_empty() {
            tracing::debug!(
                count = messages.len(),
                "no peer transport; messages dropped"
            );
        }
    }
}

type Reply = oneshot::Sender<Result<Outcome, Error>>;

/// Called with each published registry; see [`NodeHandle::on_publish`].
pub type PublishHook = Box<dyn Fn(&Arc<Published>) + Send + Sync>;

/// Events handled between two readies, at most.
const MAX_EVENTS_PER_READY: usize = 4096;

/// The closed set of events the driver loop handles.
enum Event {
    Propose {
        command: Command,
        reply: Reply,
    },
    Membership {
        change: Membership,
        reply: Reply,
    },
    /// A Raft message from a peer (delivered by the transport), with the share of the peer's
    /// budget it holds until it is stepped (see [`NodeHandle::step_with`]).
    Step(Box<Message>, Option<tokio::sync::OwnedSemaphorePermit>),
    Unreachable(u64),
    SnapshotSent {
        peer: u64,
        delivered: bool,
    },
    /// A majority of this replica's voters vouched for `leader` leading `term`.
    Vouch {
        leader: u64,
        term: u64,
    },
    Shutdown,
}

/// Tries `attempt` until its outcome is not [`Proposal::Retry`] or `policy` runs out.
async fn retry<F, Fut>(policy: RetryPolicy, mut attempt: F) -> Proposal
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, Error>>,
{
    let started = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match Proposal::from(attempt().await) {
            Proposal::Retry(e) => match policy.wait_after(tries, started.elapsed()) {
                Some(wait) => {
                    tracing::debug!(error = %e, tries, "proposal not through yet; trying again");
                    tokio::time::sleep(wait).await;
                }
                None => return Proposal::Retry(e),
            },
            other => return other,
        }
    }
}

/// The handle the rest of the process holds: propose, read, stop.
pub struct NodeHandle {
    id: u64,
    events: Sender<Event>,
    published: Arc<ArcSwap<Published>>,
    on_publish: Arc<ArcSwapOption<PublishHook>>,
    status: Arc<ArcSwap<RaftStatus>>,
    changes: tokio::sync::watch::Receiver<u64>,
    proposal_timeout: Duration,
    thread: Mutex<Option<JoinHandle<Result<(), Error>>>>,
}

impl NodeHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Proposes a command and waits until it is applied (or rejected, or timed out). On a
    /// follower or learner the proposal is forwarded to the leader.
    pub async fn propose(&self, command: Command) -> Result<Outcome, Error> {
        self.request(|reply| Event::Propose { command, reply })
            .await
    }

    /// Proposes a membership change (leader only) and waits until it is applied.
    pub async fn change_membership(&self, change: Membership) -> Result<Outcome, Error> {
        self.request(|reply| Event::Membership { change, reply })
            .await
    }

    /// Proposes `command` until it is applied, rejected or the node stops, trying again what
    /// may succeed later as `policy` says; when the policy runs out, the last such failure
    /// comes back as [`Proposal::Retry`].
    pub async fn propose_until(&self, command: &Command, policy: RetryPolicy) -> Proposal {
        retry(policy, || self.propose(command.clone())).await
    }

    /// [`NodeHandle::change_membership`] the same way (another change in progress, say).
    pub async fn change_membership_until(
        &self,
        change: &Membership,
        policy: RetryPolicy,
    ) -> Proposal {
        retry(policy, || self.change_membership(change.clone())).await
    }

    async fn request(&self, event: impl FnOnce(Reply) -> Event) -> Result<Outcome, Error> {
        let (reply, rx) = oneshot::channel();
        self.events.send(event(reply)).map_err(|_| Error::Stopped)?;
        match tokio::time::timeout(self.proposal_timeout + Duration::from_millis(500), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Stopped),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Hands a peer's Raft message to the loop.
    pub fn step(&self, message: Message) -> Result<(), Error> {
        self.send(Event::Step(Box::new(message), None))
    }

    /// Hands a peer's Raft message to the loop with `permit`, a share of that peer's budget of
    /// messages not yet stepped: released once Raft took the message, so a transport that
    /// waits for a share before reading on gets backpressure, and a peer cannot queue without
    /// bound while the Raft thread is busy.
    pub fn step_with(
        &self,
        message: Message,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), Error> {
        self.send(Event::Step(Box::new(message), Some(permit)))
    }

    /// The transport could not deliver to `peer`.
    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.send(Event::Unreachable(peer));
    }

    /// The transport finished streaming a snapshot to `peer` (`delivered`) or gave up.
    pub fn report_snapshot(&self, peer: u64, delivered: bool) {
        let _ = self.send(Event::SnapshotSent { peer, delivered });
    }

    /// A majority of this replica's voters vouched for `leader` leading `term` (the answer to
    /// an [`Outbox::inquire`]).
    pub fn vouch(&self, leader: u64, term: u64) {
        let _ = self.send(Event::Vouch { leader, term });
    }

    fn send(&self, event: Event) -> Result<(), Error> {
        self.events.send(event).map_err(|_| Error::Stopped)
    }

    /// The shared view of the applied registry.
    pub fn published(&self) -> Arc<ArcSwap<Published>> {
        self.published.clone()
    }

    /// Has `hook` called with every registry the node publishes, on the Raft thread, after it is
    /// stored and before the proposers it answers hear back (so what a proposer learns is
    /// already in whatever the hook builds). The hook must not block. Replaces an earlier one.
    pub fn on_publish(&self, hook: PublishHook) {
        self.on_publish.store(Some(Arc::new(hook)));
        // What was published before the hook was set.
        if let Some(hook) = self.on_publish.load().as_ref() {
            hook(&self.published.load_full());
        }
    }

    pub fn status(&self) -> RaftStatus {
        (**self.status.load()).clone()
    }

    /// A watch that changes whenever the node publishes a registry or its status changes in
    /// a way tasks act on (role, leader, term, voters, learners, a membership change pending,
    /// stopped). Its sender goes with the Raft thread: `changed()` then fails. Tasks wait on
    /// it rather than poll.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.clone()
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

/// Opens the node on `store` (see [`Core::open`]) and starts the loop thread. A storage
/// failure stops the node.
pub fn start<S: LogStore + Send + 'static>(
    config: NodeConfig,
    store: S,
    outbox: Arc<dyn Outbox>,
) -> Result<NodeHandle, Error> {
    start_with(config, store, outbox, None)
}

/// Opens a store again (after a failed write): the durable state, as a restart would.
pub type Reopen<S> = Box<dyn Fn() -> Result<S, Error> + Send>;

/// How often a degraded node tries to open its store again.
const REOPEN_EVERY: Duration = Duration::from_secs(2);

/// [`start`], but a failed write ([`Error::Storage`]: a full disk, say) degrades the node
/// instead of stopping it: the in-memory Raft state is dropped (it may be ahead of the disk),
/// the last published registry keeps being served, proposals fail with [`Error::Degraded`]
/// (a retry), messages from peers are dropped, and every [`REOPEN_EVERY`] the store is opened
/// again with `reopen`; once that works the node goes on from the durable state, as after a
/// restart.
pub fn start_reopening<S: LogStore + Send + 'static>(
    config: NodeConfig,
    store: S,
    outbox: Arc<dyn Outbox>,
    reopen: Reopen<S>,
) -> Result<NodeHandle, Error> {
    start_with(config, store, outbox, Some(reopen))
}

fn start_with<S: LogStore + Send + 'static>(
    config: NodeConfig,
    store: S,
    outbox: Arc<dyn Outbox>,
    reopen: Option<Reopen<S>>,
) -> Result<NodeHandle, Error> {
    let core_config = config.core();
    let core: Core<S, Reply> = Core::open(core_config.clone(), store, incarnation())?;
    let published = Arc::new(ArcSwap::from_pointee(Published::committed(
        core.applied(),
        core.registry().clone(),
    )));
    let status = Arc::new(ArcSwap::from_pointee(core.status()));
    let (events, rx) = mpsc::channel();
    let on_publish = Arc::new(ArcSwapOption::empty());
    let (changes_tx, changes) = tokio::sync::watch::channel(0u64);
    let mut core = core;
    let mut driver = Driver {
        tick: config.tick,
        outbox,
        published: published.clone(),
        on_publish: on_publish.clone(),
        status: status.clone(),
        changes: changes_tx,
        shape: None,
        last_tick: None,
        max_tick_gap: Duration::ZERO,
    };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || loop {
            let result = driver.run(&mut core, &rx);
            let degrade = match (&result, &reopen) {
                (Err(Error::Storage { reason, .. }), Some(_)) => Some(reason.clone()),
                _ => None,
            };
            for (reply, result) in core.fail_pending() {
                // Proposals still pending may be tried again once the node can write; those
                // that finished keep their outcome.
                let result = match (&degrade, result) {
                    (Some(reason), Err(Error::Stopped)) => Err(Error::Degraded(reason.clone())),
                    (_, result) => result,
                };
                let _ = reply.send(result);
            }
            let mut last = driver.status_of(&core);
            if let (Some(reason), Some(reopen)) = (&degrade, &reopen) {
                tracing::error!(error = %reason, "the data dir cannot be written; answering DNS from memory, writes wait until it can be (trying again every {REOPEN_EVERY:?})");
                // Nothing it says about Raft holds while it cannot write: no role, no leader.
                last.degraded = Some(reason.clone());
                last.role = Role::Stopped;
                last.leader = None;
                // The next publication of the status wakes the tasks, whatever it says.
                driver.shape = None;
                driver.publish_stopped(last.clone());
                drop(core);
                core = match driver.degraded(&rx, reopen, &core_config, reason, last) {
                    Ok(Some(reopened)) => reopened,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        tracing::error!(error = %e, "raft loop stopped");
                        driver.publish_stopped(driver.status.load().as_ref().clone());
                        return Err(e);
                    }
                };
                tracing::info!("the data dir can be written again; the node goes on from its durable state");
                continue;
            }
            if let Err(e) = &result {
                tracing::error!(error = %e, "raft loop stopped");
            }
            driver.publish_stopped(last);
            return result;
        })
        .map_err(|e| Error::Storage {
            path: String::new(),
            reason: format!("cannot start the raft thread: {e}"),
        })?;
    Ok(NodeHandle {
        id: config.id,
        events,
        published,
        on_publish,
        status,
        changes,
        proposal_timeout: config.proposal_timeout,
        thread: Mutex::new(Some(thread)),
    })
}

/// A number that differs between runs of this process: start time and pid. Only used to tell
/// this run's proposals from replayed ones, never by the state machine.
fn incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 48)
}

/// The loop's ends: where messages, publications and status go. The core it drives is
/// passed in, so that a degraded node can drop it (and the store it holds) and open another.
struct Driver {
    tick: Duration,
    outbox: Arc<dyn Outbox>,
    published: Arc<ArcSwap<Published>>,
    on_publish: Arc<ArcSwapOption<PublishHook>>,
    status: Arc<ArcSwap<RaftStatus>>,
    /// Bumped on every publication and change of `shape` (see [`NodeHandle::subscribe`]).
    changes: tokio::sync::watch::Sender<u64>,
    shape: Option<Shape>,
    /// When the last tick ran (none before the loop's first), and the longest time between
    /// two ticks so far: what a slow ready (a snapshot, a slow disk) costs the timers.
    last_tick: Option<Instant>,
    max_tick_gap: Duration,
}

/// What of the status tasks act on: a change of it wakes them.
#[derive(Clone, PartialEq, Eq)]
struct Shape {
    role: Role,
    leader: Option<u64>,
    term: u64,
    voters: Vec<u64>,
    learners: Vec<u64>,
    conf_change_pending: bool,
}

impl Shape {
    fn of(status: &RaftStatus) -> Shape {
        Shape {
            role: status.role,
            leader: status.leader,
            term: status.term,
            voters: status.voters.clone(),
            learners: status.learners.clone(),
            conf_change_pending: status.conf_change_pending,
        }
    }
}

impl Driver {
    fn run<S: LogStore>(
        &mut self,
        core: &mut Core<S, Reply>,
        rx: &Receiver<Event>,
    ) -> Result<(), Error> {
        // Replay the committed log first (it may change the configuration), then decide.
        self.pump(core)?;
        if core.is_lone_voter() {
            core.campaign()?;
            self.pump(core)?;
        }
        let mut next_tick = Instant::now() + self.tick;
        self.last_tick = None;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(event) => {
                    if !Self::handle(core, event) {
                        return Ok(());
                    }
                    // Take what is already queued, so one ready (one fsync) covers it all; but
                    // not forever, or a flood of messages would starve ticks and readies.
                    for _ in 0..MAX_EVENTS_PER_READY {
                        let Ok(event) = rx.try_recv() else { break };
                        if !Self::handle(core, event) {
                            return Ok(());
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            let now = Instant::now();
            if now >= next_tick {
                core.tick();
                next_tick = now + self.tick;
                if let Some(last) = self.last_tick.replace(now) {
                    self.max_tick_gap = self.max_tick_gap.max(now - last);
                }
            }
            self.pump(core)?;
        }
    }

    /// While the store cannot be written (the old core, which held it, is dropped): answers
    /// proposals with [`Error::Degraded`], drops peers' messages, and opens the store again
    /// every [`REOPEN_EVERY`], until it opens and takes a durable write. The new core (the
    /// durable state), `None` on shutdown, or the error of a store that opens damaged.
    fn degraded<S: LogStore>(
        &mut self,
        rx: &Receiver<Event>,
        reopen: &Reopen<S>,
        config: &CoreConfig,
        reason: &str,
        status: RaftStatus,
    ) -> Result<Option<Core<S, Reply>>, Error> {
        let mut next_try = Instant::now() + REOPEN_EVERY;
        loop {
            let wait = next_try.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Event::Propose { reply, .. } | Event::Membership { reply, .. }) => {
                    let _ = reply.send(Err(Error::Degraded(reason.to_string())));
                }
                Ok(Event::Shutdown) | Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    next_try = Instant::now() + REOPEN_EVERY;
                    let opened = reopen()
                        .and_then(|store| Core::open(config.clone(), store, incarnation()))
                        .and_then(|mut core| core.check_writable().map(|()| core));
                    match opened {
                        Ok(core) => return Ok(Some(core)),
                        // Only a failed or refused write is waited out; damage is not.
                        Err(e @ (Error::DamagedDataDir { .. } | Error::Corrupt { .. })) => {
                            return Err(e)
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "the data dir still cannot be opened");
                            let mut status = status.clone();
                            status.degraded = Some(format!("{reason}; reopening: {e}"));
                            self.status.store(Arc::new(status));
                        }
                    }
                }
            }
        }
    }

    /// Handles one event; `false` means shut down.
    fn handle<S: LogStore>(core: &mut Core<S, Reply>, event: Event) -> bool {
        match event {
            Event::Propose { command, reply } => core.propose(&command, reply),
            Event::Membership { change, reply } => core.propose_membership(&change, reply),
            Event::Step(message, _share) => core.step(*message),
            Event::Unreachable(peer) => core.report_unreachable(peer),
            Event::SnapshotSent { peer, delivered } => core.report_snapshot(peer, delivered),
            Event::Vouch { leader, term } => core.vouch(leader, term),
            Event::Shutdown => return false,
        }
        true
    }

    /// The core's status, with what the driver measures.
    fn status_of<S: LogStore>(&self, core: &Core<S, Reply>) -> RaftStatus {
        let mut status = core.status();
        status.max_tick_gap_micros = self.max_tick_gap.as_micros() as u64;
        status
    }

    /// Publishes `last` as the status of a stopped node, and wakes the tasks.
    fn publish_stopped(&mut self, mut last: RaftStatus) {
        last.role = Role::Stopped;
        self.status.store(Arc::new(last));
        self.changes.send_modify(|n| *n += 1);
    }

    /// Runs a ready: sends, publishes, then answers proposers (so one that hears back reads a
    /// registry that includes its change).
    fn pump<S: LogStore>(&mut self, core: &mut Core<S, Reply>) -> Result<(), Error> {
        let progress = core.ready()?;
        if !progress.messages.is_empty() {
            self.outbox.send(progress.messages);
        }
        for inquiry in progress.inquiries {
            self.outbox.inquire(inquiry);
        }
        let mut changed = false;
        if let Some(published) = progress.published {
            let published = Arc::new(published);
            self.published.store(published.clone());
            if let Some(hook) = self.on_publish.load().as_ref() {
                hook(&published);
            }
            changed = true;
        }
        for (reply, result) in progress.done {
            let _ = reply.send(result);
        }
        let status = self.status_of(core);
        let shape = Shape::of(&status);
        self.status.store(Arc::new(status));
        if self.shape.as_ref() != Some(&shape) {
            self.shape = Some(shape);
            changed = true;
        }
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        Ok(())
    }
}
