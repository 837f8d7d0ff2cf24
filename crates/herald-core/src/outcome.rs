//! How a delivery attempt ended, classified so the worker can decide what
//! happens next without knowing which provider it talked to.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why an attempt did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Will never succeed (bad address, unregistered token): no retry.
    Permanent,
    /// May succeed later: retry on the schedule.
    Transient,
    /// The provider asked us to slow down: retry no sooner than it said.
    RateLimited,
    /// The provider may have accepted it but we could not tell: retry,
    /// counted as a possible duplicate.
    Ambiguous,
}

impl ErrorClass {
    pub const ALL: &'static [ErrorClass] = &[Self::Permanent, Self::Transient, Self::RateLimited, Self::Ambiguous];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Permanent => "permanent",
            Self::Transient => "transient",
            Self::RateLimited => "rate_limited",
            Self::Ambiguous => "ambiguous",
        }
    }

    #[must_use]
    pub const fn is_retryable(self) -> bool {
        !matches!(self, Self::Permanent)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorClass {
    type Err = crate::UnknownValue;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const NAMES: &[&str] = &["permanent", "transient", "rate_limited", "ambiguous"];
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| crate::UnknownValue {
                what: "error class",
                value: s.chars().take(64).collect(),
                expected: NAMES,
            })
    }
}

/// The outcome of one attempt as recorded in `delivery_attempts.outcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutcomeClass {
    /// Accepted by the provider.
    Sent,
    /// In the recipient's hands (in-app).
    Delivered,
    /// Not attempted: nothing to send to (no address, no active device).
    Skipped { reason: String },
    /// Did not succeed.
    Error {
        class: ErrorClass,
        /// Wait at least this long before the next attempt (rate limits).
        retry_after: Option<Duration>,
    },
}

impl OutcomeClass {
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Skipped { .. } => "skipped",
            Self::Error { class, .. } => class.as_str(),
        }
    }
}
