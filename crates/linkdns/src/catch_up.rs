//! Whether a replica holds the cluster's view yet, for the tasks that act on the host from
//! the registry (routes, claims, BGP announcements): acting on a replica that is still behind
//! would flap what it made, or announce a claim the cluster took away meanwhile.

use std::time::Duration;

use linkdns_raft::NodeHandle;

/// After a start, routes change only once the replica has applied the log it had on disk (it
/// is behind until a leader confirms those entries) — or after this long with a leader, in case
/// the leader truncated part of that log.
const CATCH_UP_GRACE: Duration = Duration::from_secs(30);

/// Whether a replica holds the cluster's view: it has a leader, and has applied the log it had
/// on disk at start (it is behind until a leader confirms those entries) — or has had a leader
/// for [`CATCH_UP_GRACE`], in case the leader truncated part of that log. Routes, claims and
/// BGP announcements follow the registry only then, so a restart or a partition does not flap
/// them, nor announce a claim the cluster took away meanwhile.
pub struct CatchUp {
    /// The last log index on disk at start, and when that was.
    on_disk: u64,
    started: std::time::Instant,
}

impl CatchUp {
    pub fn new(node: &NodeHandle) -> CatchUp {
        CatchUp {
            on_disk: node.status().last_index,
            started: std::time::Instant::now(),
        }
    }

    pub fn done(&self, node: &NodeHandle) -> bool {
        let raft = node.status();
        raft.leader.is_some()
            && raft.applied_index >= raft.commit_index
            && (raft.applied_index >= self.on_disk || self.started.elapsed() > CATCH_UP_GRACE)
    }
}
