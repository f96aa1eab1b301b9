//! The last resorts, which make a store the log of a one-voter cluster: `linkdns restore` (a
//! fresh store seeded with a backup's records) and `linkdns run --force-new-cluster` (a member
//! whose majority is gone for good keeps what it committed and goes on alone).

use linkdns_registry::Registry;
use raft::eraftpb::{HardState, Snapshot};

use crate::core::{Core, CoreConfig};
use crate::storage::LogStore;
use crate::Error;

/// The registry as far as `store` (the log of node `id`) knows it committed: its snapshot and
/// every committed entry after it, applied. Entries it holds but never saw committed are not.
pub fn committed_state<S: LogStore>(store: S, id: u64) -> Result<(Registry, S), Error> {
    let config = CoreConfig {
        id,
        bootstrap: false,
        election_ticks: 10,
        heartbeat_ticks: 2,
        // Never due while replaying (the seed that follows is the snapshot).
        snapshot_every: u64::MAX / 2,
        snapshot_log_bytes: u64::MAX / 2,
        proposal_timeout_ticks: 50,
    };
    let mut core: Core<S, ()> = Core::open(config, store, 0)?;
    // Each ready applies what raft-rs hands out (bounded by its message size); nothing is
    // ticked, so no election starts and nothing is sent.
    let commit = core.status().commit_index;
    while core.applied() < commit {
        let before = core.applied();
        core.ready()?;
        if core.applied() == before {
            return Err(Error::Corrupt {
                what: "raft log",
                reason: format!(
                    "committed entries up to {commit} do not replay (stuck at {before})"
                ),
            });
        }
    }
    let registry = core.registry().clone();
    Ok((registry, core.into_store()))
}

/// Makes `store` the log of a cluster whose only voter is `id` and whose state is `registry`:
/// a snapshot after every entry the store holds, in a term after every term it saw, replaces
/// the log. Returns the snapshot's index. Durable when it returns.
pub fn seed_single_voter<S: LogStore>(
    store: &mut S,
    id: u64,
    registry: &Registry,
) -> Result<u64, Error> {
    let state = store.initial_state()?;
    let base = store.current_snapshot()?.get_metadata().index;
    let last = store.last_index()?.max(base);
    let index = last + 1;
    let term = state.hard_state.term + 1;
    let mut snapshot = Snapshot::default();
    snapshot.data = registry.snapshot().into();
    let meta = snapshot.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.mut_conf_state().voters = vec![id];
    store.install_snapshot(&snapshot)?;
    let hard_state = HardState {
        term,
        commit: index,
        ..Default::default()
    };
    store.set_hard_state(&hard_state)?;
    store.sync()?;
    Ok(index)
}
