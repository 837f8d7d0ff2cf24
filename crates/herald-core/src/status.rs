//! Delivery states and the transitions between them.
//!
//! The authoritative check is in SQL (conditional updates in `herald-db`);
//! this type names the states and documents which moves are legal, so the
//! SQL and the tests can be checked against one list.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Committed, waiting for a worker.
    Queued,
    /// Claimed by a worker that holds a lease on it.
    Sending,
    /// Failed transiently; a new attempt is scheduled at `next_attempt_at`.
    Retrying,
    /// The provider accepted it.
    Sent,
    /// The recipient has it (in-app: written to the inbox).
    Delivered,
    /// Permanently rejected (bad address, unregistered token).
    Failed,
    /// Attempts exhausted; waits in the dead-letter queue for an operator.
    Dead,
    /// Withdrawn by the sender before it went out.
    Cancelled,
    /// Not attempted: the user cannot receive on this channel.
    Skipped,
}

impl DeliveryStatus {
    pub const ALL: &'static [DeliveryStatus] = &[
        Self::Queued,
        Self::Sending,
        Self::Retrying,
        Self::Sent,
        Self::Delivered,
        Self::Failed,
        Self::Dead,
        Self::Cancelled,
        Self::Skipped,
    ];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Retrying => "retrying",
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }

    /// A final state needs no further work from Herald (`sent` may still
    /// become `delivered` through a provider receipt, which is not work).
    #[must_use]
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            Self::Sent | Self::Delivered | Self::Failed | Self::Dead | Self::Cancelled | Self::Skipped
        )
    }

    /// Whether `self → next` is a legal move. Operator replays
    /// (`failed|dead → queued`) are legal only through the replay path.
    /// An in-app delivery goes from waiting straight to `delivered`: its
    /// "send" is the inbox write, committed together with the claim and
    /// the attempt row, so it never holds a lease in `sending`.
    #[must_use]
    pub const fn can_move_to(self, next: DeliveryStatus) -> bool {
        use DeliveryStatus::*;
        matches!(
            (self, next),
            (Queued, Sending)
                | (Queued, Cancelled)
                | (Queued, Skipped)
                | (Queued, Delivered)
                | (Sending, Sent)
                | (Sending, Delivered)
                | (Sending, Retrying)
                | (Sending, Failed)
                | (Sending, Dead)
                | (Sending, Skipped)
                | (Retrying, Sending)
                | (Retrying, Dead)
                | (Retrying, Cancelled)
                | (Retrying, Skipped)
                | (Retrying, Delivered)
                | (Sent, Delivered)
                | (Failed, Queued)
                | (Dead, Queued)
        )
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown delivery status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for DeliveryStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.chars().take(64).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::DeliveryStatus::*;
    use super::*;

    #[test]
    fn no_final_state_moves_back_to_work_except_by_replay() {
        for from in DeliveryStatus::ALL.iter().copied().filter(|s| s.is_final()) {
            for to in [Sending, Retrying] {
                assert!(!from.can_move_to(to), "{from} -> {to} must be illegal");
            }
        }
        assert!(Dead.can_move_to(Queued));
        assert!(!Sent.can_move_to(Queued));
    }

    #[test]
    fn names_round_trip() {
        for s in DeliveryStatus::ALL {
            assert_eq!(s.as_str().parse::<DeliveryStatus>().unwrap(), *s);
        }
    }
}
