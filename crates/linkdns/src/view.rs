//! What DNS answers from: the committed registry (published by the Raft node) with this node's
//! own container changes that the log has not committed yet laid over it, plus the local view
//! of this host's Docker engine (who is asking). Rebuilt and published as one `Published` on
//! every change of either side; queries held for an unknown asker wake on [`View::subscribe`].
//!
//! Only this node's own containers are laid over the registry, and only as Docker reported them
//! to this node's watcher: a container's first query is answered from local knowledge, never
//! after a Raft round trip. The authoritative registry still changes only through the log.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use linkdns_registry::{Command, LocalChange, LocalView, NodeId, Pending, Published};
use tokio::sync::watch;

pub struct View {
    node: NodeId,
    state: Mutex<State>,
    out: Arc<ArcSwap<Published>>,
    changes: watch::Sender<u64>,
}

struct State {
    committed: Arc<Published>,
    pending: Pending,
    local: Arc<LocalView>,
    version: u64,
    /// Compose projects named like a node, logged once each (the node wins their names).
    shadowed: Vec<String>,
}

impl View {
    pub fn new(node: NodeId, committed: Arc<Published>) -> Arc<View> {
        let (changes, _) = watch::channel(0);
        Arc::new(View {
            node,
            out: Arc::new(ArcSwap::new(committed.clone())),
            state: Mutex::new(State {
                committed,
                pending: Pending::default(),
                local: Arc::new(LocalView::default()),
                version: 0,
                shadowed: Vec::new(),
            }),
            changes,
        })
    }

    /// The view DNS reads.
    pub fn published(&self) -> Arc<ArcSwap<Published>> {
        self.out.clone()
    }

    /// Changes on every publication.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The Raft node published a committed registry (called on its thread).
    pub fn committed(&self, published: &Arc<Published>) {
        let mut state = self.lock();
        if published.applied < state.committed.applied {
            return; // an older one, raced by a newer
        }
        state.committed = published.clone();
        let shadowed: Vec<String> = published
            .registry
            .projects_shadowed_by_nodes()
            .into_iter()
            .map(str::to_string)
            .collect();
        for project in shadowed.iter().filter(|p| !state.shadowed.contains(p)) {
            tracing::warn!(%project, "a compose project is named like a node: <service>.{project}.cluster names the service's containers on node {project}, not the project's; its services still answer as <service>.cluster");
        }
        state.shadowed = shadowed;
        self.publish(&mut state);
    }

    /// The watcher reported `command` (about to be proposed): answer it from now on.
    pub fn observe(&self, command: &Command) {
        let mut state = self.lock();
        let committed = state.committed.clone();
        state
            .pending
            .observe(command, self.node, &committed.registry);
        self.publish(&mut state);
    }

    /// The log answered `command` (applied or refused): the committed registry says it now.
    pub fn settle(&self, command: &Command) {
        let mut state = self.lock();
        state.pending.settle(command);
        self.publish(&mut state);
    }

    /// The watcher learned something about this host's containers or networks.
    pub fn local(&self, change: LocalChange) {
        let mut state = self.lock();
        Arc::make_mut(&mut state.local).apply(change);
        self.publish(&mut state);
    }

    /// The containers being connected to the network of `src`, one of which asks from it.
    pub fn candidates(&self, src: IpAddr) -> Vec<linkdns_registry::ContainerId> {
        self.lock().local.candidates(src)
    }

    /// This node's own addresses (its peer address): queries from them are from this host.
    pub fn set_host_addrs(&self, addrs: Vec<IpAddr>) {
        let mut state = self.lock();
        Arc::make_mut(&mut state.local).set_host_addrs(addrs);
        self.publish(&mut state);
    }

    /// The other nodes' subnets this host has a path to (`None`: routes are not managed here,
    /// every claimed subnet counts): answers on this host leave out addresses it cannot reach.
    /// Published only when it changes.
    pub fn set_paths(&self, paths: Option<Vec<linkdns_registry::Subnet>>) {
        let mut state = self.lock();
        if Arc::make_mut(&mut state.local).set_paths(paths) {
            self.publish(&mut state);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change leaves the state whole; a panic elsewhere must not stop DNS.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, state: &mut State) {
        let mut registry = state.committed.registry.clone();
        state.pending.apply_to(&mut registry, self.node);
        state.version += 1;
        self.out.store(Arc::new(Published {
            applied: state.committed.applied,
            registry,
            local: state.local.clone(),
            version: state.version,
        }));
        self.changes.send_replace(state.version);
    }
}
