//! The producer and inspection handle.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use herald_core::{Channel, Priority};
use redis::RedisResult;
use redis::aio::MultiplexedConnection;

use crate::conn::{Conn, is_connection_error, open_client};
use crate::job::{WireJob, epoch_ms, now_ms};
use crate::names::{epoch_key, events_channel, wake_channel, workers_key};
use crate::{DeliveryJob, QueueConfig, QueueError, QueueName};

/// Arguments per command when a batch is split (keeps single commands small).
const ARGS_PER_COMMAND: usize = 1000;

/// Producer + inspection handle. Cheap to clone (one shared multiplexed
/// connection). Construction never touches Redis: while Redis is down,
/// operations fail with [`QueueError`] and the caller decides (the API keeps
/// accepting; the sweeper enqueues later).
#[derive(Clone)]
pub struct QueueClient {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: QueueConfig,
    conn: Conn,
}

/// Depth and age of one queue, each read in O(1) or O(log n).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueCounts {
    /// Waiting to be fetched.
    pub ready: u64,
    /// Delayed: not due yet (or due and not yet promoted by a fetch).
    pub scheduled: u64,
    /// Fetched by a worker (running or buffered), not yet acknowledged.
    pub in_flight: u64,
    /// Given up on: unparseable, or came back more than `max_handbacks` times.
    pub dead: u64,
    /// How long the next job to be fetched has been due.
    pub oldest_ready_age_ms: Option<u64>,
}

impl QueueClient {
    /// Fails only on an invalid URL or configuration; never connects.
    pub fn new(cfg: QueueConfig) -> Result<Self, QueueError> {
        cfg.validate()?;
        let client = open_client(&cfg.redis_url, false)?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                conn: Conn::new(client, "herald-queue-client".to_owned()),
            }),
        })
    }

    #[must_use]
    pub fn config(&self) -> &QueueConfig {
        &self.inner.cfg
    }

    /// Queues the jobs for immediate delivery in one pipelined round trip,
    /// then (same pipeline, after the pushes) wakes idle workers of each
    /// channel involved.
    pub async fn enqueue(&self, jobs: &[(QueueName, DeliveryJob)]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let prefix = &self.inner.cfg.prefix;
        let mut pipe = redis::pipe();
        let mut queues = Vec::new();
        for (queue, group) in group_by_queue(jobs.iter().map(|(q, j)| (*q, j))) {
            let ready = queue.keys(prefix).ready;
            for chunk in group.chunks(ARGS_PER_COMMAND) {
                let cmd = pipe.cmd("LPUSH").arg(&ready);
                for job in chunk {
                    cmd.arg(encode(job, now));
                }
                cmd.ignore();
            }
            queues.push(queue);
        }
        publish_wake(&mut pipe, prefix, &queues);
        self.run("enqueue jobs", |mut c| {
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }

    /// Queues jobs to become ready at the given times (past times are due at
    /// once). Workers pick each up within milliseconds of its due time when
    /// they are idle, and within `idle_poll` at worst.
    pub async fn enqueue_at(&self, jobs: &[(QueueName, DeliveryJob, SystemTime)]) -> Result<(), QueueError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let prefix = &self.inner.cfg.prefix;
        let mut pipe = redis::pipe();
        let mut by_queue: Vec<(QueueName, Vec<(u64, String)>)> = Vec::new();
        for (queue, job, at) in jobs {
            let due = epoch_ms(*at);
            let member = encode(job, due);
            match by_queue.iter_mut().find(|(q, _)| q == queue) {
                Some((_, v)) => v.push((due, member)),
                None => by_queue.push((*queue, vec![(due, member)])),
            }
        }
        for (queue, group) in &by_queue {
            let scheduled = queue.keys(prefix).scheduled;
            for chunk in group.chunks(ARGS_PER_COMMAND) {
                let cmd = pipe.cmd("ZADD").arg(&scheduled);
                for (due, member) in chunk {
                    cmd.arg(*due).arg(member);
                }
                cmd.ignore();
            }
        }
        // Idle workers re-read the next due time, so they wake exactly then.
        let queues: Vec<QueueName> = by_queue.iter().map(|(q, _)| *q).collect();
        publish_wake(&mut pipe, prefix, &queues);
        self.run("schedule jobs", |mut c| {
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }

    /// Depth and age of one queue in one round trip (LLEN, ZCARD, LINDEX).
    pub async fn counts(&self, queue: QueueName) -> Result<QueueCounts, QueueError> {
        let keys = queue.keys(&self.inner.cfg.prefix);
        let mut pipe = redis::pipe();
        pipe.cmd("LLEN").arg(&keys.ready);
        pipe.cmd("ZCARD").arg(&keys.scheduled);
        pipe.cmd("ZCARD").arg(&keys.inflight);
        pipe.cmd("ZCARD").arg(&keys.dead);
        // The right end of ready is the next job out: the oldest.
        pipe.cmd("LINDEX").arg(&keys.ready).arg(-1);
        let (ready, scheduled, in_flight, dead, oldest): (u64, u64, u64, u64, Option<String>) = self
            .run("count queue", |mut c| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        let oldest_ready_age_ms = oldest
            .and_then(|m| WireJob::decode(&m).ok())
            .map(|w| now_ms().saturating_sub(w.ready_since_ms));
        Ok(QueueCounts {
            ready,
            scheduled,
            in_flight,
            dead,
            oldest_ready_age_ms,
        })
    }

    /// Publishes `{"type":"user.changed","users":[…]}` for these users
    /// (call after the change committed): API processes wake the clients
    /// waiting for them. One message per [`crate::events::USERS_PER_EVENT`]
    /// users, all in one round trip.
    pub async fn publish_user_changes(&self, users: &[String]) -> Result<(), QueueError> {
        self.publish_changes(users, &[]).await
    }

    /// [`publish_user_changes`](Self::publish_user_changes) for `users`,
    /// then each of `events` (user-facing JSON, such as
    /// `inbox.item.created`) as it is, all in one round trip. Best effort
    /// by nature (pub/sub keeps nothing): clients that miss one catch up
    /// from Postgres.
    pub async fn publish_changes(&self, users: &[String], events: &[String]) -> Result<(), QueueError> {
        if users.is_empty() && events.is_empty() {
            return Ok(());
        }
        let channel = events_channel(&self.inner.cfg.prefix);
        let mut pipe = redis::pipe();
        for chunk in users.chunks(crate::events::USERS_PER_EVENT) {
            let event = serde_json::json!({"type": crate::events::USER_CHANGED, "users": chunk}).to_string();
            pipe.cmd("PUBLISH").arg(&channel).arg(event).ignore();
        }
        for event in events {
            pipe.cmd("PUBLISH").arg(&channel).arg(event).ignore();
        }
        self.run("publish change events", |mut c| {
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }

    /// The pub/sub channel [`publish_changes`](Self::publish_changes) uses.
    #[must_use]
    pub fn events_channel(&self) -> String {
        events_channel(&self.inner.cfg.prefix)
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        self.run("ping", |mut c| async move {
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
        .await
    }

    /// Warnings for a Redis that would lose jobs: an eviction policy other
    /// than `noeviction`, or neither AOF nor RDB persistence. Callers log
    /// them loudly at start-up.
    pub async fn durability_warnings(&self) -> Result<Vec<String>, QueueError> {
        let mut pipe = redis::pipe();
        for param in ["maxmemory-policy", "appendonly", "save"] {
            pipe.cmd("CONFIG").arg("GET").arg(param);
        }
        let replies: RedisResult<Vec<Vec<String>>> = match self.inner.conn.get().await {
            Ok(mut c) => pipe.query_async(&mut c).await,
            Err(e) => Err(e),
        };
        let replies = match replies {
            Ok(r) => r,
            // Managed Redis services often disable CONFIG; say so rather than
            // fail start-up.
            Err(e) if !is_connection_error(&e) => {
                return Ok(vec![format!(
                    "could not read the Redis configuration ({e}); make sure it runs with \
                     maxmemory-policy noeviction and AOF persistence"
                )]);
            }
            Err(source) => {
                self.inner.conn.reset().await;
                return Err(QueueError::Redis {
                    action: "read the Redis configuration",
                    source,
                });
            }
        };
        let value = |i: usize| replies.get(i).and_then(|r| r.get(1)).cloned().unwrap_or_default();
        let (policy, aof, save) = (value(0), value(1), value(2));
        let mut warnings = Vec::new();
        if policy != "noeviction" {
            warnings.push(format!(
                "Redis maxmemory-policy is `{policy}`: under memory pressure Redis will evict \
                 queued jobs (the sweeper recovers them, slowly); set it to `noeviction`"
            ));
        }
        if aof != "yes" && save.trim().is_empty() {
            warnings.push(
                "Redis has no persistence (appendonly no, no RDB save points): a Redis restart \
                 loses every queued job (the sweeper recovers them, slowly); enable AOF"
                    .to_owned(),
            );
        } else if aof != "yes" {
            warnings.push(
                "Redis persists only RDB snapshots: a crash loses the jobs queued since the \
                 last snapshot; enable AOF"
                    .to_owned(),
            );
        }
        Ok(warnings)
    }

    /// Deletes every key of every queue under this prefix, and the workers
    /// hash. For tests and for decommissioning a prefix; never needed in
    /// normal operation.
    pub async fn delete_all_keys(&self) -> Result<(), QueueError> {
        let prefix = &self.inner.cfg.prefix;
        let mut pipe = redis::pipe();
        for queue in QueueName::all() {
            let keys = queue.keys(prefix);
            pipe.cmd("DEL").arg(&keys.all()[..]).ignore();
        }
        pipe.cmd("DEL").arg(workers_key(prefix)).arg(epoch_key(prefix)).ignore();
        self.run("delete queue keys", |mut c| {
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await
    }

    /// Whether Redis still holds the data it had when this was last called:
    /// `false` the first time, and after Redis lost its data (restart without
    /// persistence, `FLUSHALL`, eviction). Sets the marker either way.
    pub async fn check_epoch(&self) -> Result<bool, QueueError> {
        let key = epoch_key(&self.inner.cfg.prefix);
        let created: bool = self
            .run("check the epoch marker", |mut c| {
                let key = &key;
                async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(now_ms())
                        .arg("NX")
                        .query_async::<Option<String>>(&mut c)
                        .await
                        .map(|r| r.is_some())
                }
            })
            .await?;
        Ok(!created)
    }

    /// Ids of the workers registered under this prefix with their last
    /// heartbeat (ms since the epoch).
    pub async fn workers(&self) -> Result<Vec<(String, u64)>, QueueError> {
        let key = workers_key(&self.inner.cfg.prefix);
        let map: Vec<(String, u64)> = self
            .run("list workers", |mut c| {
                let key = &key;
                async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await }
            })
            .await?;
        Ok(map)
    }

    /// Moves up to `max` jobs from a queue's dead set back to its ready list
    /// (oldest first), with their handback count reset. Returns how many.
    pub async fn requeue_dead(&self, queue: QueueName, max: usize) -> Result<usize, QueueError> {
        if max == 0 {
            return Ok(0);
        }
        let keys = queue.keys(&self.inner.cfg.prefix);
        let members: Vec<String> = self
            .run("read dead jobs", |mut c| {
                let keys = &keys;
                async move {
                    redis::cmd("ZRANGE")
                        .arg(&keys.dead)
                        .arg(0)
                        .arg(max.saturating_sub(1))
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        if members.is_empty() {
            return Ok(0);
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        let mut moved = 0;
        for m in &members {
            // Unparseable members stay dead: requeueing them would only
            // bury them again.
            let Ok(mut wire) = WireJob::decode(m) else {
                continue;
            };
            wire.handbacks = 0;
            wire.ready_since_ms = now;
            pipe.cmd("ZREM").arg(&keys.dead).arg(m).ignore();
            pipe.cmd("LPUSH").arg(&keys.ready).arg(wire.encode()).ignore();
            moved += 1;
        }
        publish_wake(&mut pipe, &self.inner.cfg.prefix, &[queue]);
        self.run("requeue dead jobs", |mut c| {
            let pipe = &pipe;
            async move { pipe.query_async::<()>(&mut c).await }
        })
        .await?;
        Ok(moved)
    }

    /// Runs `op` on the shared connection; on a connection error, reconnects
    /// and tries once more (a Redis restart kills the old connection, and the
    /// first command after it would otherwise fail for nothing). Every
    /// operation here is safe to repeat: a duplicate job is harmless, a lost
    /// one is not.
    async fn run<T, F, Fut>(&self, action: &'static str, op: F) -> Result<T, QueueError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut last = None;
        for _ in 0..2 {
            let result = match self.inner.conn.get().await {
                Ok(c) => op(c).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) if is_connection_error(&e) => {
                    self.inner.conn.reset().await;
                    if e.is_connection_refusal() {
                        return Err(QueueError::Redis { action, source: e });
                    }
                    last = Some(e);
                }
                Err(e) => return Err(QueueError::Redis { action, source: e }),
            }
        }
        match last {
            Some(source) => Err(QueueError::Redis { action, source }),
            None => Err(QueueError::Timeout {
                action,
                timeout: crate::conn::RESPONSE_TIMEOUT,
            }),
        }
    }
}

fn encode(job: &DeliveryJob, ready_since_ms: u64) -> String {
    crate::job::encode(job, 0, ready_since_ms)
}

fn group_by_queue<'a>(
    jobs: impl Iterator<Item = (QueueName, &'a DeliveryJob)>,
) -> Vec<(QueueName, Vec<&'a DeliveryJob>)> {
    let mut groups: Vec<(QueueName, Vec<&DeliveryJob>)> = Vec::new();
    for (queue, job) in jobs {
        match groups.iter_mut().find(|(q, _)| *q == queue) {
            Some((_, v)) => v.push(job),
            None => groups.push((queue, vec![job])),
        }
    }
    groups
}

/// One wake-up per channel involved. The message names the priorities that
/// got jobs ("normal", "high,low"): an idle worker fetches those queues
/// first, instead of walking its round-robin order through empty ones.
fn publish_wake(pipe: &mut redis::Pipeline, prefix: &str, queues: &[QueueName]) {
    let mut by_channel: BTreeMap<Channel, BTreeSet<Priority>> = BTreeMap::new();
    for q in queues {
        by_channel.entry(q.channel).or_default().insert(q.priority);
    }
    for (channel, priorities) in by_channel {
        let names: Vec<&str> = priorities.iter().map(|p| p.as_str()).collect();
        pipe.cmd("PUBLISH")
            .arg(wake_channel(prefix, channel))
            .arg(names.join(","))
            .ignore();
    }
}
