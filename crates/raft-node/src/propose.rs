//! What became of a proposal, in the terms its caller decides by, and retrying by policy.
//!
//! [`crate::Error`] mixes three kinds of failure: the registry's deterministic refusal of a
//! command (the same on every replica, so retrying cannot help), a proposal that may succeed
//! later (no leader, timed out, outcome unknown, another membership change in progress), and a
//! node that has stopped (its thread ended, or its storage failed). [`Proposal`] names them, and
//! [`NodeHandle::propose_until`](crate::NodeHandle::propose_until) retries the middle kind.

use std::time::Duration;

use linkdns_registry::Outcome;

use crate::Error;

/// What became of a proposal.
#[derive(Debug)]
pub enum Proposal {
    /// Applied (whether or not it changed anything).
    Applied(Outcome),
    /// Refused where it is applied (by the registry, or as a membership change): the same on
    /// every replica, so retrying cannot help.
    Rejected(Error),
    /// It may succeed if tried again: no leader, timed out, outcome unknown (commands are
    /// idempotent), another membership change in progress.
    Retry(Error),
    /// The node has stopped: nothing more will be applied.
    Stopped(Error),
}

impl From<Result<Outcome, Error>> for Proposal {
    fn from(result: Result<Outcome, Error>) -> Proposal {
        match result {
            Ok(outcome) => Proposal::Applied(outcome),
            Err(e) => match e {
                Error::Registry(_) | Error::InvalidMembership(_) => Proposal::Rejected(e),
                Error::Timeout
                | Error::NotLeader { .. }
                | Error::ConfChangeInProgress
                | Error::OutcomeUnknown
                | Error::Degraded(_)
                | Error::Raft(_) => Proposal::Retry(e),
                Error::Stopped
                | Error::Storage { .. }
                | Error::DamagedDataDir { .. }
                | Error::Locked { .. }
                | Error::Corrupt { .. } => Proposal::Stopped(e),
            },
        }
    }
}

impl Proposal {
    /// The outcome's name, for metrics: `applied`, `rejected`, `retry` or `stopped`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Proposal::Applied(_) => "applied",
            Proposal::Rejected(_) => "rejected",
            Proposal::Retry(_) => "retry",
            Proposal::Stopped(_) => "stopped",
        }
    }

    /// The proposal as a plain result: applied, or why not.
    pub fn into_result(self) -> Result<Outcome, Error> {
        match self {
            Proposal::Applied(outcome) => Ok(outcome),
            Proposal::Rejected(e) | Proposal::Retry(e) | Proposal::Stopped(e) => Err(e),
        }
    }
}

/// How [`NodeHandle::propose_until`](crate::NodeHandle::propose_until) retries a proposal that
/// may succeed later: up to `attempts` tries in all (`None`: no count), no new try once
/// `within` has passed since the first (`None`: no time limit), waiting `first` after the
/// first failure and twice as long after each next one, up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: Option<u32>,
    pub within: Option<Duration>,
    pub first: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// Until applied, rejected or stopped.
    pub const fn forever(first: Duration, max: Duration) -> RetryPolicy {
        RetryPolicy {
            attempts: None,
            within: None,
            first,
            max,
        }
    }

    /// At most `attempts` tries.
    pub const fn times(attempts: u32, first: Duration, max: Duration) -> RetryPolicy {
        RetryPolicy {
            attempts: Some(attempts),
            within: None,
            first,
            max,
        }
    }

    /// The same, but no new try once `within` has passed since the first.
    pub const fn within(self, within: Duration) -> RetryPolicy {
        RetryPolicy {
            within: Some(within),
            ..self
        }
    }

    /// The wait after failed try number `attempt` (1-based), `elapsed` since the first try
    /// began, or `None` when there is no next try.
    pub fn wait_after(&self, attempt: u32, elapsed: Duration) -> Option<Duration> {
        if self.attempts.is_some_and(|n| attempt >= n) {
            return None;
        }
        let doublings = attempt.saturating_sub(1).min(16);
        let wait = self.first.saturating_mul(1 << doublings).min(self.max);
        match self.within {
            Some(within) if elapsed + wait > within => None,
            _ => Some(wait),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_sort_into_what_a_caller_does_next() {
        let kind = |e: Error| match Proposal::from(Err(e)) {
            Proposal::Applied(_) => "applied",
            Proposal::Rejected(_) => "rejected",
            Proposal::Retry(_) => "retry",
            Proposal::Stopped(_) => "stopped",
        };
        assert_eq!(
            kind(Error::Registry(linkdns_registry::Error::UnknownNode(9))),
            "rejected"
        );
        assert_eq!(kind(Error::InvalidMembership("x".into())), "rejected");
        for e in [
            Error::Timeout,
            Error::NotLeader { leader: Some(2) },
            Error::ConfChangeInProgress,
            Error::OutcomeUnknown,
        ] {
            assert_eq!(kind(e), "retry");
        }
        for e in [
            Error::Stopped,
            Error::Locked { path: "d".into() },
            Error::Storage {
                path: "d".into(),
                reason: "full".into(),
            },
        ] {
            assert_eq!(kind(e), "stopped");
        }
        assert!(matches!(
            Proposal::from(Ok(Outcome::Unchanged)),
            Proposal::Applied(Outcome::Unchanged)
        ));
    }

    #[test]
    fn policies_double_their_wait_up_to_the_max_and_count_tries() {
        let ms = Duration::from_millis;
        let zero = Duration::ZERO;
        let three = RetryPolicy::times(3, ms(100), ms(250));
        assert_eq!(three.wait_after(1, zero), Some(ms(100)));
        assert_eq!(three.wait_after(2, zero), Some(ms(200)));
        assert_eq!(three.wait_after(3, zero), None);
        let forever = RetryPolicy::forever(ms(100), ms(500));
        assert_eq!(forever.wait_after(3, zero), Some(ms(400)));
        assert_eq!(forever.wait_after(4, zero), Some(ms(500)));
        assert_eq!(forever.wait_after(1000, ms(1_000_000)), Some(ms(500)));
        // A time budget: no try that would start after it.
        let budget = RetryPolicy::forever(ms(200), ms(200)).within(ms(1000));
        assert_eq!(budget.wait_after(4, ms(700)), Some(ms(200)));
        assert_eq!(budget.wait_after(5, ms(900)), None);
    }
}
