//! Herald's queues: a Redis backend for [apalis] workers, the job wire
//! format, queue names, and the producer/inspection client.
//!
//! Postgres is the source of truth; Redis is transport. A job carries ids,
//! not content. Duplicates are harmless (the worker's claim in Postgres is
//! fenced by attempt number), so every mechanism here errs towards
//! delivering twice rather than losing a job.
//!
//! # Key layout
//!
//! One queue per channel × priority. All keys of a queue share the hash tag
//! `{<prefix>:<channel>:<priority>}`, so they sit in one Redis Cluster slot
//! and one Lua script can touch them all ([`names`] is the only module that
//! spells keys):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{herald:email:high}:ready` | LIST | jobs to hand out; producers `LPUSH`, fetch `RPOP`s from the right (FIFO) |
//! | `{herald:email:high}:scheduled` | ZSET, score = due ms | delayed jobs and handbacks |
//! | `{herald:email:high}:inflight` | ZSET, score = lease deadline ms | fetched and not yet acknowledged |
//! | `{herald:email:high}:dead` | ZSET, score = death ms | given up; trimmed after 7 days |
//! | `herald:workers` | HASH | worker id → last heartbeat ms (informational) |
//! | `herald:wake:email` | pub/sub channel | "jobs were pushed", naming the priorities (`high,low`): idle workers fetch those queues at once |
//! | `herald:events` | pub/sub channel | live-client hints: `user.changed` (whose rows changed), `inbox.item.created` ([`events`]) |
//!
//! A job is one short string, `1|dlv_…|attempt|handbacks|ready_since_ms|request_id`
//! (see [`job`](crate::DeliveryJob)): about 60 bytes + the request id.
//!
//! # Fetch script
//!
//! Each fetch runs one Lua script per queue per round trip, all of whose
//! steps are bounded, so its cost does not grow with the backlog
//! (O((chunk + batch) · log n)):
//! 1. promote up to 500 due jobs from `scheduled` to `ready`
//!    (`ZRANGE … BYSCORE LIMIT`, never an unbounded `unpack`);
//! 2. reclaim up to 500 jobs whose lease expired: handbacks + 1, back to the
//!    front of `ready`, or to `dead` past `max_handbacks`;
//! 3. trim up to 100 dead entries older than 7 days;
//! 4. `RPOP ready N` and `ZADD inflight <now + lease>` for each popped job;
//! 5. return the jobs plus the next scheduled due time and lease deadline,
//!    so an idle worker sleeps exactly until there is something to do (never
//!    longer than `idle_poll`).
//!
//! Rounds are weighted across a channel's priorities (high:normal:low lead
//! 6:3:1 of the rounds, spread out); a queue without work falls through to
//! the next, so low priority is never starved and never waits for nothing.
//!
//! # Lease protocol
//!
//! - A fetched job is in `inflight` with a deadline `now + lease`. While the
//!   process holds it (buffered or running, or completed with its ack not
//!   yet written) a heartbeat every `lease / 3` extends it with `ZADD XX`
//!   (which never resurrects a job that was acked or reclaimed).
//! - A dead or stuck process stops heartbeating; any worker's next fetch
//!   reclaims the job once the deadline passes. A SIGKILLed worker's jobs
//!   come back after `lease` (seconds), not minutes.
//! - `Ok(())` from the handler ⇒ acknowledged: `ZREM inflight` in a batched
//!   pipeline (at most a few ms later, or when a batch fills).
//! - `Err` or a panic ⇒ handed back: moved to `scheduled` after 250 ms,
//!   500 ms, 1 s … (≤ 30 s) with handbacks + 1; past `max_handbacks` to
//!   `dead`. A handback only moves a job still in `inflight`, so a job that
//!   was already reclaimed is never duplicated by it.
//! - Graceful stop: apalis waits for running tasks, then the backend puts
//!   buffered (unstarted) jobs back at the front of `ready`, writes pending
//!   acks, and removes itself from `herald:workers`. A new worker (always a
//!   fresh [`WorkerId`]) starts serving them at once; nothing ever waits on
//!   the workers hash, so stale entries cannot block a restart.
//! - Redis errors (refused, killed connection, restart) never end a worker:
//!   the backend logs once per outage, reconnects with capped backoff,
//!   re-subscribes to wake-ups, and carries on. Settlements that could not be
//!   written are kept and retried; all writes are idempotent.
//!
//! # Building and stopping a worker
//!
//! ```no_run
//! use apalis::prelude::*;
//! use herald_core::Channel;
//! use herald_queue::{Fetched, QueueConfig, QueueName, RedisBackend, WorkerId};
//! use tokio_util::sync::CancellationToken;
//!
//! #[derive(Clone)]
//! struct State;
//!
//! async fn handle(task: Fetched, _state: Data<State>) -> Result<(), BoxDynError> {
//!     // claim task.job.delivery_id at task.job.attempt in Postgres, send, record
//!     Ok(())
//! }
//!
//! # async fn run(cfg: QueueConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
//! let worker_id = WorkerId::generate("email-worker");
//! let backend = RedisBackend::new(
//!     cfg,
//!     QueueName::for_channel(Channel::Email).to_vec(),
//!     worker_id.clone(),
//! )
//! .expect("valid queue config");
//! let worker = WorkerBuilder::new(worker_id.to_string())
//!     .backend(backend)
//!     .catch_panic()
//!     .concurrency(32)
//!     .data(State)
//!     .build(handle);
//! // Returns once the token is cancelled, running tasks have finished and
//! // buffered jobs were handed back.
//! worker.run_until(herald_queue::stop_on(shutdown)).await
//! # }
//! ```
//!
//! [apalis]: https://docs.rs/apalis

mod backend;
mod client;
mod config;
mod conn;
mod error;
pub mod events;
mod job;
pub mod names;
mod scripts;
mod worker_id;

pub use backend::{Fetched, HandlerPanicked, RedisBackend, SettleLayer, SettleService};
pub use client::{QueueClient, QueueCounts};
pub use config::{MAX_FETCH_BATCH, QueueConfig};
pub use error::QueueError;
pub use events::{EventSignal, UserChanges, listen_events};
pub use job::DeliveryJob;
pub use names::{QueueKeys, QueueName};
pub use worker_id::WorkerId;

/// A shutdown future for apalis's `Worker::run_until`: completes when
/// `token` is cancelled (e.g. on SIGTERM).
pub async fn stop_on(token: tokio_util::sync::CancellationToken) -> Result<(), std::io::Error> {
    token.cancelled().await;
    Ok(())
}
