//! Queue settings shared by the producer ([`crate::QueueClient`]) and the
//! consumer ([`crate::RedisBackend`]).

use std::fmt;
use std::time::Duration;

use crate::QueueError;

/// Most jobs one fetch may pop. It bounds the work of one script run and keeps
/// `unpack` far below Lua's limit (about 8,000 values).
pub const MAX_FETCH_BATCH: usize = 1000;

/// How Herald talks to its queues. Every field has a production default.
#[derive(Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// e.g. `redis://127.0.0.1:6379`. May carry a password; `Debug` hides it.
    pub redis_url: String,
    /// First part of every key: `herald` in production, unique per test.
    pub prefix: String,
    /// A fetched job comes back this long after its worker stopped
    /// heartbeating (died, was SIGKILLed, lost Redis). Default 30 s.
    pub lease: Duration,
    /// Jobs fetched per round trip (1..=1000). Default 64.
    pub fetch_batch: usize,
    /// Fallback poll when no wake-up arrives. Default 1 s.
    pub idle_poll: Duration,
    /// Times a job may come back (handler error or panic, lease expiry)
    /// before it moves to its queue's dead set. Default 10.
    pub max_handbacks: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            prefix: "herald".to_owned(),
            lease: Duration::from_secs(30),
            fetch_batch: 64,
            idle_poll: Duration::from_secs(1),
            max_handbacks: 10,
        }
    }
}

impl QueueConfig {
    /// Checks the values that would make the backend misbehave.
    pub fn validate(&self) -> Result<(), QueueError> {
        let bad = |msg: String| Err(QueueError::InvalidConfig(msg));
        if self.prefix.is_empty() || self.prefix.contains(['{', '}', ' ']) {
            return bad(format!(
                "prefix `{}` must be non-empty without braces or spaces",
                self.prefix
            ));
        }
        if self.lease < Duration::from_millis(300) {
            return bad(format!("lease {:?} is below 300 ms", self.lease));
        }
        if !(1..=MAX_FETCH_BATCH).contains(&self.fetch_batch) {
            return bad(format!(
                "fetch_batch {} is outside 1..={MAX_FETCH_BATCH}",
                self.fetch_batch
            ));
        }
        if self.idle_poll < Duration::from_millis(10) {
            return bad(format!("idle_poll {:?} is below 10 ms", self.idle_poll));
        }
        Ok(())
    }
}

impl fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConfig")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("prefix", &self.prefix)
            .field("lease", &self.lease)
            .field("fetch_batch", &self.fetch_batch)
            .field("idle_poll", &self.idle_poll)
            .field("max_handbacks", &self.max_handbacks)
            .finish()
    }
}

/// `redis://user:secret@host` → `redis://***@host`: URLs end up in logs.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl QueueConfig {
    /// The queue settings of a Herald process, from its validated settings.
    #[must_use]
    pub fn from_settings(settings: &herald_config::Settings) -> Self {
        Self {
            redis_url: settings.redis_url.expose().to_owned(),
            prefix: settings.queue_prefix.clone(),
            lease: settings.lease,
            fetch_batch: settings.fetch_batch,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_is_not_printed() {
        let cfg = QueueConfig {
            redis_url: "redis://user:s3cret@example:6379/0".into(),
            ..QueueConfig::default()
        };
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("redis://***@example:6379/0"), "{printed}");
    }

    #[test]
    fn the_defaults_are_valid_and_a_zero_batch_is_not() {
        QueueConfig::default().validate().unwrap();
        let cfg = QueueConfig {
            fetch_batch: 0,
            ..QueueConfig::default()
        };
        assert!(cfg.validate().is_err());
    }
}
