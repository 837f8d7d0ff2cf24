//! Group commit for accepting notifications.
//!
//! Each request hands its validated notification to the [`Ingestor`] and
//! waits; a [`Batcher`] writes whatever requests are waiting (up to
//! [`MAX_BATCH`]) in one statement — one round trip, one commit — then each
//! request is answered and this module pushes their jobs to Redis in one
//! pipeline, the batch keeping its slot until the push is done. Every 2xx
//! still means "committed": a request is answered only after the statement
//! holding it committed. Answering before the push takes the Redis round
//! trip off every request's latency (docs/performance.md); a push that
//! never happens is the sweeper's, as if Redis were down.
//!
//! Postgres does most of the work per round trip, not per row, so this is
//! what lifts ingest above the one-transaction-per-request ceiling.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use herald_core::{Channel, Priority};
use herald_db::DbError;
use herald_db::batch::Batcher;
use herald_db::held::Held;
use herald_db::notifications::CONFIRM_LINGER;
use herald_db::notifications::{Accepted, NewNotificationWithDeliveries};
use herald_queue::{DeliveryJob, QueueClient, QueueName, UserChanges};
use sqlx::PgPool;

/// Most notifications written by one statement.
pub const MAX_BATCH: usize = 256;
/// Batches written at the same time (each holds one connection). With the
/// push confirmations merged into few commits of their own
/// ([`CONFIRM_LINGER`]), a third batch in flight lifts ingest over two
/// (docs/performance.md).
pub const MAX_IN_FLIGHT: usize = 3;

/// Connections of the group commit's own pool: one per batch in flight,
/// and one for the push confirmations.
pub const INGEST_CONNECTIONS: u32 = MAX_IN_FLIGHT as u32 + 1;

/// Most push intents one confirmation deletes (the batches of one
/// [`CONFIRM_LINGER`], with room to spare at any ingest rate).
const CONFIRMATIONS_PER_STATEMENT: usize = 1024;

/// What a request hands over: the rows to write, and what its jobs need.
pub struct Submission {
    pub item: NewNotificationWithDeliveries,
    pub priority: Priority,
}

/// The handle requests use. Cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    batcher: Batcher<Submission, Accepted>,
}

/// What the ingest path writes to.
#[derive(Clone)]
pub struct Sinks {
    /// The group commit's own connections ([`INGEST_CONNECTIONS`]), which
    /// plan the accept statement once (`herald_db::connect_lazy_planned_once`),
    /// kept between statements (`herald_db::held`: no ping after each).
    pub held: Held,
    pub queue: QueueClient,
    /// Set while enqueueing fails, so an outage is logged once.
    pub redis_down: Arc<AtomicBool>,
    /// Waiters in this process for the users' changes.
    pub hub: crate::hub::Hub,
    /// Other processes' waiters, through Redis.
    pub changes: UserChanges,
    /// Deletes the push intents of batches whose jobs are in Redis, many
    /// batches per statement, off the request path.
    pub confirmations: Batcher<i64, ()>,
    /// The confirmations on their way, so a stopping API waits for them
    /// ([`Ingestor::finish`]).
    pub confirming: tokio_util::task::TaskTracker,
}

impl Sinks {
    /// Starts the push confirmations (on the current runtime).
    #[must_use]
    pub fn new(pool: PgPool, queue: QueueClient, hub: crate::hub::Hub, changes: UserChanges) -> Self {
        let held = Held::new(pool);
        let h = held.clone();
        // One statement at a time, after a linger: a confirmation is never
        // urgent (an unconfirmed batch only costs the sweeper a duplicate
        // job, after its grace period), so the intents that arrive while
        // one lingers or runs are merged into the next.
        let confirmations = Batcher::start(CONFIRMATIONS_PER_STATEMENT, 1, move |intents: Vec<i64>| {
            let h = h.clone();
            async move {
                tokio::time::sleep(CONFIRM_LINGER).await;
                let mut conn = h.acquire().await?;
                herald_db::notifications::confirm_pushes(&mut *conn, &intents).await?;
                conn.keep();
                Ok(vec![(); intents.len()])
            }
        });
        Self {
            held,
            queue,
            redis_down: Arc::default(),
            hub,
            changes,
            confirmations,
            confirming: tokio_util::task::TaskTracker::new(),
        }
    }
}

impl Ingestor {
    /// Starts the collector on the current runtime.
    #[must_use]
    pub fn start(sinks: Sinks) -> Self {
        let batcher = Batcher::start_then(MAX_BATCH, MAX_IN_FLIGHT, move |submissions: Vec<Submission>| {
            let sinks = sinks.clone();
            async move {
                let (items, priorities): (Vec<NewNotificationWithDeliveries>, Vec<Priority>) =
                    submissions.into_iter().map(|s| (s.item, s.priority)).unzip();
                let mut conn = sinks.held.acquire().await?;
                // One statement, committed as it ends: a connection lost
                // during it leaves the batch in doubt.
                let inserted = herald_db::notifications::insert_notifications(&mut *conn, &items)
                    .await
                    .map_err(DbError::while_committing)?;
                conn.keep();
                let accepted = inserted.accepted;
                // Committed: clients waiting for these users may look now.
                // One event for the whole batch, sent off this path.
                let users: Vec<String> = items.iter().map(|i| i.notification.user_id.clone()).collect();
                for user in &users {
                    sinks.hub.wake(user);
                }
                sinks.changes.changed(users);
                let jobs = jobs_for(
                    accepted
                        .iter()
                        .zip(priorities.iter().zip(&items))
                        .map(|(a, (p, i))| (a, *p, i.notification.request_id.as_deref())),
                );
                // The callers are answered now, committed; the jobs go to
                // Redis right after, while the batch still holds its slot.
                Ok((accepted, push_jobs(sinks, jobs, inserted.push_intent)))
            }
        });
        Self { batcher }
    }

    /// Writes one notification as part of the next batch; returns once it
    /// is committed (its jobs are pushed right after).
    pub async fn accept(&self, submission: Submission) -> Result<Accepted, Arc<DbError>> {
        self.batcher.submit(submission).await
    }

    /// What a stopping API owes the requests it answered: waits until every
    /// batch's jobs are pushed to Redis (or the push failed) and every
    /// push confirmation has committed. Called once the server has stopped
    /// taking requests; without it the exit could cut a push off after its
    /// 202, leaving those deliveries to wait for the sweeper's grace
    /// period (and an unconfirmed batch costs the sweeper duplicate jobs).
    pub async fn finish(&self, sinks: &Sinks) {
        self.batcher.settled().await;
        sinks.confirming.close();
        sinks.confirming.wait().await;
    }
}

/// The job of every queued delivery among `accepted`.
pub fn jobs_for<'a>(
    accepted: impl IntoIterator<Item = (&'a Accepted, Priority, Option<&'a str>)>,
) -> Vec<(QueueName, DeliveryJob)> {
    accepted
        .into_iter()
        .flat_map(|(a, priority, request_id)| {
            a.deliveries
                .iter()
                .filter(|d| d.status == "queued")
                .filter_map(move |d| {
                    let channel: Channel = d.channel.parse().ok()?;
                    Some((
                        QueueName::new(channel, priority),
                        DeliveryJob {
                            delivery_id: d.id.parse().ok()?,
                            attempt: 0,
                            request_id: request_id.map(str::to_owned),
                        },
                    ))
                })
        })
        .collect()
}

/// Pushes `jobs` in one pipeline, then confirms the batch's push intent. A
/// failure is not the callers' problem: the deliveries are committed, and
/// the sweeper enqueues the deliveries of an intent left unconfirmed.
pub async fn push_jobs(sinks: Sinks, jobs: Vec<(QueueName, DeliveryJob)>, push_intent: Option<i64>) {
    if jobs.is_empty() {
        return;
    }
    match sinks.queue.enqueue(&jobs).await {
        Ok(()) => {
            if sinks.redis_down.swap(false, Ordering::Relaxed) {
                tracing::info!("Redis is reachable again; enqueueing directly");
            }
            if let Some(intent) = push_intent {
                let confirmations = sinks.confirmations.clone();
                // Off the request path: if this is lost, the sweeper pushes
                // duplicate jobs, which the claim fence turns into no-ops.
                sinks.confirming.spawn(async move {
                    if let Err(e) = confirmations.submit(intent).await {
                        tracing::debug!(error = %e, "could not confirm a batch's push; the sweeper will re-enqueue it");
                    }
                });
            }
        }
        Err(e) => {
            // Once per outage: every request would otherwise say the same.
            if !sinks.redis_down.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "Redis unavailable; accepted deliveries wait in Postgres for the sweeper");
            }
        }
    }
}
