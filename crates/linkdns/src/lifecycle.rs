//! The node's lifecycle, as a small state machine the supervisor in `run.rs` feeds with what it
//! sees of the Raft node each time that changes, and acts on: write the state marker once the
//! node holds state, resync with Docker when the node is shown again after being hidden, stop
//! when the node was removed (only by its own log: its removal from the configuration, or its
//! retirement and then a deadline). Pure, so every way of stopping has a unit test.

use std::fmt;

/// Why the node stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT or SIGTERM.
    Signal,
    /// This node applied its own removal, or its retirement and the deadline passed: its
    /// routes are withdrawn and its state moved aside.
    Removed,
    /// The Raft thread ended (its error is in the log and is what the process exits with).
    RaftStopped,
    /// The task that proposes the watcher's commands ended.
    ProposerStopped,
    /// The Docker watcher's reports ended (the watcher stopped).
    WatcherEnded,
}

impl StopReason {
    /// Whether the process exits with success (its own stop, or a removal).
    pub fn is_clean(self) -> bool {
        matches!(
            self,
            StopReason::Signal | StopReason::Removed | StopReason::WatcherEnded
        )
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::Signal => "stopped by a signal",
            StopReason::Removed => "removed from the cluster",
            StopReason::RaftStopped => "the raft node stopped; see the log above",
            StopReason::ProposerStopped => "the proposer stopped; see the log above",
            StopReason::WatcherEnded => "the Docker watcher ended",
        })
    }
}

/// What the supervisor sees of the node when it changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The node is in the Raft configuration.
    pub member: bool,
    /// The Raft node is detached (not in any configuration it knows).
    pub detached: bool,
    /// The last applied log index.
    pub applied: u64,
    /// The registry holds this node's retirement.
    pub retiring: bool,
    /// The leader hides this node's records (it stopped hearing from it).
    pub down: bool,
}

/// What the supervisor should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Write the marker that says this data dir holds the node's state.
    WriteMarker,
    /// Restate every container: the node was hidden and may have missed events.
    Resync,
    /// Start the retirement's deadline; when it passes, stop as removed.
    RetireDeadline,
    Stop(StopReason),
}

#[derive(Debug)]
pub struct Lifecycle {
    was_member: bool,
    was_down: bool,
    retiring: bool,
    marker: bool,
}

impl Lifecycle {
    /// `marker`: whether the state marker exists already.
    pub fn new(marker: bool) -> Lifecycle {
        Lifecycle {
            was_member: false,
            was_down: false,
            retiring: false,
            marker,
        }
    }

    /// What to do now that the node looks like `seen`.
    pub fn step(&mut self, seen: Seen) -> Vec<Act> {
        let mut acts = Vec::new();
        if seen.member {
            self.was_member = true;
            if !self.marker && seen.applied > 0 {
                self.marker = true;
                acts.push(Act::WriteMarker);
            }
        } else if self.was_member && seen.detached {
            acts.push(Act::Stop(StopReason::Removed));
            return acts;
        }
        if seen.retiring && !self.retiring {
            self.retiring = true;
            acts.push(Act::RetireDeadline);
        }
        if self.was_down && !seen.down {
            acts.push(Act::Resync);
        }
        self.was_down = seen.down;
        acts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(applied: u64) -> Seen {
        Seen {
            member: true,
            applied,
            ..Seen::default()
        }
    }

    #[test]
    fn the_marker_is_written_once_the_node_holds_state() {
        let mut l = Lifecycle::new(false);
        assert_eq!(l.step(member(0)), vec![]);
        assert_eq!(l.step(member(3)), vec![Act::WriteMarker]);
        assert_eq!(l.step(member(4)), vec![]);
        let mut had = Lifecycle::new(true);
        assert_eq!(had.step(member(3)), vec![]);
    }

    #[test]
    fn only_its_own_removal_stops_a_node() {
        let mut l = Lifecycle::new(true);
        // Detached before it ever was a member (a joining node waiting for its snapshot).
        let detached = Seen {
            detached: true,
            ..Seen::default()
        };
        assert_eq!(l.step(detached), vec![]);
        assert_eq!(l.step(member(5)), vec![]);
        assert_eq!(l.step(detached), vec![Act::Stop(StopReason::Removed)]);
    }

    #[test]
    fn a_retirement_starts_the_deadline_once() {
        let mut l = Lifecycle::new(true);
        let retiring = Seen {
            retiring: true,
            ..member(9)
        };
        assert_eq!(l.step(retiring), vec![Act::RetireDeadline]);
        assert_eq!(l.step(retiring), vec![]);
        let gone = Seen {
            detached: true,
            retiring: true,
            ..Seen::default()
        };
        assert_eq!(l.step(gone), vec![Act::Stop(StopReason::Removed)]);
    }

    #[test]
    fn shown_again_after_being_hidden_resyncs() {
        let mut l = Lifecycle::new(true);
        let down = Seen {
            down: true,
            ..member(2)
        };
        assert_eq!(l.step(member(1)), vec![]);
        assert_eq!(l.step(down), vec![]);
        assert_eq!(l.step(down), vec![]);
        assert_eq!(l.step(member(3)), vec![Act::Resync]);
        assert_eq!(l.step(member(4)), vec![]);
    }

    #[test]
    fn stop_reasons_say_whether_the_exit_is_clean() {
        assert!(StopReason::Signal.is_clean());
        assert!(StopReason::Removed.is_clean());
        assert!(StopReason::WatcherEnded.is_clean());
        assert!(!StopReason::RaftStopped.is_clean());
        assert!(!StopReason::ProposerStopped.is_clean());
        assert_eq!(
            StopReason::RaftStopped.to_string(),
            "the raft node stopped; see the log above"
        );
    }
}
