//! The one error type of the queue crate.

use std::time::Duration;

/// What went wrong talking to the queue. Messages say which operation failed
/// and never contain the Redis password.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),

    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),

    #[error("Redis failed while trying to {action}: {source}")]
    Redis {
        action: &'static str,
        #[source]
        source: redis::RedisError,
    },

    #[error("Redis did not answer within {timeout:?} while trying to {action}")]
    Timeout { action: &'static str, timeout: Duration },

    #[error("malformed queue job `{member}`: {reason}")]
    MalformedJob { member: String, reason: &'static str },

    #[error("unknown queue name `{0}`: expected `<channel>:<priority>`, e.g. `email:high`")]
    UnknownQueue(String),

    #[error("the Redis backend must be polled inside a Tokio runtime")]
    NoRuntime,
}
