//! Queue names and every Redis key and pub/sub channel Herald uses.
//!
//! This module is the only place that spells a Redis key. All keys of one
//! queue share the hash tag `{<prefix>:<channel>:<priority>}`, so they live in
//! one Redis Cluster slot and one Lua script may touch all of them.

use std::fmt;
use std::str::FromStr;

use herald_core::{Channel, Priority};

use crate::QueueError;

/// One queue: a channel at a priority (`email:high`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueName {
    pub channel: Channel,
    pub priority: Priority,
}

impl QueueName {
    #[must_use]
    pub fn new(channel: Channel, priority: Priority) -> Self {
        Self { channel, priority }
    }

    /// The three queues of a channel, highest priority first: the order a
    /// [`crate::RedisBackend`] expects.
    #[must_use]
    pub fn for_channel(channel: Channel) -> [QueueName; 3] {
        [Priority::High, Priority::Normal, Priority::Low].map(|p| QueueName::new(channel, p))
    }

    /// All nine queues, channel by channel, highest priority first.
    #[must_use]
    pub fn all() -> Vec<QueueName> {
        Channel::ALL.iter().flat_map(|c| QueueName::for_channel(*c)).collect()
    }

    /// The Redis keys of this queue under `prefix`.
    #[must_use]
    pub fn keys(&self, prefix: &str) -> QueueKeys {
        let tag = format!("{{{prefix}:{}:{}}}", self.channel, self.priority);
        QueueKeys {
            ready: format!("{tag}:ready"),
            scheduled: format!("{tag}:scheduled"),
            inflight: format!("{tag}:inflight"),
            dead: format!("{tag}:dead"),
        }
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.channel, self.priority)
    }
}

impl FromStr for QueueName {
    type Err = QueueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || QueueError::UnknownQueue(s.chars().take(64).collect());
        let (channel, priority) = s.split_once(':').ok_or_else(unknown)?;
        Ok(QueueName::new(
            channel.parse().map_err(|_| unknown())?,
            priority.parse().map_err(|_| unknown())?,
        ))
    }
}

/// The four keys of one queue.
///
/// - `ready` LIST: jobs to hand out. Producers `LPUSH`; fetch `RPOP`s the
///   oldest from the right; jobs returned unstarted are `RPUSH`ed so they go
///   out next.
/// - `scheduled` ZSET scored by due time (ms): delayed jobs and handbacks.
/// - `inflight` ZSET scored by lease deadline (ms): fetched, not yet acked.
/// - `dead` ZSET scored by time of death (ms): trimmed after seven days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    pub ready: String,
    pub scheduled: String,
    pub inflight: String,
    pub dead: String,
}

impl QueueKeys {
    #[must_use]
    pub fn all(&self) -> [&str; 4] {
        [&self.ready, &self.scheduled, &self.inflight, &self.dead]
    }
}

/// HASH of live workers: worker id → last heartbeat (ms since the epoch).
/// Informational only (nothing waits on it), so a stale entry never blocks
/// a restart; entries are removed on graceful close and pruned when stale.
#[must_use]
pub fn workers_key(prefix: &str) -> String {
    format!("{prefix}:workers")
}

/// A marker that exists as long as Redis keeps its data. The sweeper sets
/// it; finding it gone means Redis restarted empty, was flushed or evicted
/// keys, so every waiting delivery needs its job pushed again.
#[must_use]
pub fn epoch_key(prefix: &str) -> String {
    format!("{prefix}:epoch")
}

/// Pub/sub channel of user-facing events (a new inbox item, a delivery's
/// status change), for API replicas serving live clients. One channel for
/// all users: each replica subscribes once and fans out to its clients.
#[must_use]
pub fn events_channel(prefix: &str) -> String {
    format!("{prefix}:events")
}

/// Pub/sub channel producers publish on after an enqueue so idle workers of
/// that channel fetch at once.
#[must_use]
pub fn wake_channel(prefix: &str, channel: Channel) -> String {
    format!("{prefix}:wake:{channel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes: between the first `{` and the
    /// next `}`.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("a hash tag opens");
        let close = key[open..].find('}').expect("a hash tag closes") + open;
        &key[open + 1..close]
    }

    #[test]
    fn every_key_of_a_queue_has_the_same_hash_tag() {
        for queue in QueueName::all() {
            let keys = queue.keys("herald");
            let tag = hash_tag(&keys.ready);
            assert_eq!(tag, format!("herald:{queue}"));
            for key in keys.all() {
                assert_eq!(hash_tag(key), tag, "{key}");
            }
        }
        assert_eq!(
            QueueName::new(Channel::Email, Priority::High).keys("herald").ready,
            "{herald:email:high}:ready"
        );
    }

    #[test]
    fn there_are_nine_queues_named_channel_colon_priority() {
        let all = QueueName::all();
        assert_eq!(all.len(), 9);
        assert_eq!(all[0].to_string(), "email:high");
        assert_eq!(all[8].to_string(), "in_app:low");
        for q in all {
            assert_eq!(q.to_string().parse::<QueueName>().unwrap(), q);
        }
        assert!("sms:high".parse::<QueueName>().is_err());
    }
}
