//! Group commit for accepting notifications.
//!
//! Each request hands its validated notification to the [`Ingestor`] and
//! waits. A collector takes whatever requests are waiting (up to
//! [`MAX_BATCH`]) and writes them in one statement — one round trip, one
//! commit — then pushes their jobs to Redis in one pipeline and answers
//! each request. Nothing is delayed on purpose: a lone request is a batch of
//! one; under load, requests that arrive while a batch is being written form
//! the next one. Every 2xx still means "committed": a request is answered
//! only after the statement holding it committed.
//!
//! Postgres does most of the work per round trip, not per row, so this is
//! what lifts ingest above the one-transaction-per-request ceiling
//! (DESIGN.md §9).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use herald_core::{Channel, Priority};
use herald_db::DbError;
use herald_db::notifications::{Accepted, NewNotificationWithDeliveries};
use herald_queue::{DeliveryJob, QueueClient, QueueName};
use sqlx::PgPool;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Most notifications written by one statement.
pub const MAX_BATCH: usize = 256;
/// Batches written at the same time (each holds one connection).
pub const MAX_IN_FLIGHT: usize = 4;
/// Requests waiting for a batch before new ones wait for room.
const QUEUE_DEPTH: usize = 8 * MAX_BATCH;

/// What a request hands over: the rows to write, and what its jobs need.
pub struct Submission {
    pub item: NewNotificationWithDeliveries,
    pub priority: Priority,
}

type Reply = oneshot::Sender<Result<Accepted, Arc<DbError>>>;

/// The handle requests use. Cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    tx: mpsc::Sender<(Submission, Reply)>,
}

/// What the collector and the enqueue step share with the rest of the API.
#[derive(Clone)]
pub struct Sinks {
    pub pool: PgPool,
    pub queue: QueueClient,
    /// Set while enqueueing fails, so an outage is logged once.
    pub redis_down: Arc<AtomicBool>,
}

impl Ingestor {
    /// Starts the collector on the current runtime.
    #[must_use]
    pub fn start(sinks: Sinks) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(collect(rx, sinks));
        Self { tx }
    }

    /// Writes one notification as part of the next batch; returns once it
    /// is committed (and its jobs pushed, if Redis is up).
    pub async fn accept(&self, submission: Submission) -> Result<Accepted, Arc<DbError>> {
        let (reply, answer) = oneshot::channel();
        let gone = || Arc::new(DbError::Other(sqlx::Error::WorkerCrashed));
        self.tx.send((submission, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn collect(mut rx: mpsc::Receiver<(Submission, Reply)>, sinks: Sinks) {
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a free slot first lets requests pile up meanwhile,
        // so a busy API writes big batches and an idle one writes at once.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let sinks = sinks.clone();
        tokio::spawn(async move {
            write_batch(&sinks, batch).await;
            drop(permit);
        });
    }
}

async fn write_batch(sinks: &Sinks, batch: Vec<(Submission, Reply)>) {
    let (submissions, replies): (Vec<Submission>, Vec<Reply>) = batch.into_iter().unzip();
    let items: Vec<NewNotificationWithDeliveries> = submissions.iter().map(|s| s.item.clone()).collect();
    match herald_db::notifications::insert_notifications(&sinks.pool, &items).await {
        Ok(accepted) => {
            let jobs: Vec<_> = accepted
                .iter()
                .zip(&submissions)
                .map(|(a, s)| (a, s.priority, s.item.notification.request_id.as_deref()))
                .collect();
            enqueue_accepted(sinks, &jobs).await;
            for (reply, a) in replies.into_iter().zip(accepted) {
                let _ = reply.send(Ok(a));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(Arc::clone(&e)));
            }
        }
    }
}

/// Pushes one job per queued delivery, in one pipeline. A failure is not
/// the callers' problem: the deliveries are committed, and the sweeper
/// enqueues whatever has no job.
pub async fn enqueue_accepted(sinks: &Sinks, accepted: &[(&Accepted, Priority, Option<&str>)]) {
    let jobs: Vec<(QueueName, DeliveryJob)> = accepted
        .iter()
        .flat_map(|(a, priority, request_id)| {
            a.deliveries
                .iter()
                .filter(|d| d.status == "queued")
                .filter_map(move |d| {
                    let channel: Channel = d.channel.parse().ok()?;
                    Some((
                        QueueName::new(channel, *priority),
                        DeliveryJob {
                            delivery_id: d.id.parse().ok()?,
                            attempt: 0,
                            request_id: request_id.map(str::to_owned),
                        },
                    ))
                })
        })
        .collect();
    if jobs.is_empty() {
        return;
    }
    match sinks.queue.enqueue(&jobs).await {
        Ok(()) => {
            if sinks.redis_down.swap(false, Ordering::Relaxed) {
                tracing::info!("Redis is reachable again; enqueueing directly");
            }
            let marks: Vec<(String, i32)> = jobs.iter().map(|(_, j)| (j.delivery_id.to_string(), 0)).collect();
            let pool = sinks.pool.clone();
            // Off the request path: if this is lost, the sweeper pushes a
            // duplicate job, which the claim fence turns into a no-op.
            tokio::spawn(async move {
                if let Err(e) = herald_db::notifications::mark_enqueued(&pool, &marks).await {
                    tracing::debug!(error = %e, "could not mark deliveries enqueued; the sweeper will re-enqueue");
                }
            });
        }
        Err(e) => {
            // Once per outage: every request would otherwise say the same.
            if !sinks.redis_down.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "Redis unavailable; accepted deliveries wait in Postgres for the sweeper");
            }
        }
    }
}
