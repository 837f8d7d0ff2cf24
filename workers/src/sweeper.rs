//! The sweeper: makes sure every waiting delivery has a job in Redis.
//!
//! It runs inside every worker process; a Postgres advisory lock lets one
//! act at a time. Each pass:
//! 1. if Redis lost its data (its epoch marker is gone: restart without
//!    persistence, `FLUSHALL`, eviction), forgets which deliveries were
//!    enqueued, so all waiting ones are owed a job again;
//! 2. moves claims whose lease lapsed to `retrying` (or `dead`);
//! 3. turns accepted batches whose push the API never confirmed back into
//!    owed deliveries, and pushes a job for every delivery owed one (see
//!    `herald_db::sweep`).
//!
//! Re-enqueueing is always safe: claims are fenced on the attempt number.

use std::time::Duration;

use herald_db::sweep::OwedJob;
use herald_queue::{DeliveryJob, QueueClient, QueueName};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Deliveries younger than this are left to the process that wrote them.
const GRACE_SECS: f64 = 2.0;
/// Idempotency keys are kept this long (the API promises at least 24 h).
const IDEMPOTENCY_HOURS: i32 = 48;
/// Most deliveries handled per pass; a bigger backlog takes several passes.
const BATCH: i64 = 5_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub ran: bool,
    pub redis_reset: bool,
    pub expired_leases: u64,
    pub enqueued: u64,
}

/// One sweep pass.
pub async fn sweep_once(pool: &PgPool, queue: &QueueClient) -> anyhow::Result<PassReport> {
    let mut report = PassReport::default();
    if !queue.check_epoch().await? {
        // No marker: a first start on this Redis, or Redis lost its data.
        let n = herald_db::sweep::forget_enqueued(pool).await?;
        if n > 0 {
            tracing::warn!(
                deliveries = n,
                "Redis lost its data; re-enqueueing every waiting delivery"
            );
        }
        report.redis_reset = true;
    }
    loop {
        let r = herald_db::sweep::sweep(pool, GRACE_SECS, BATCH).await?;
        if !r.ran {
            return Ok(report);
        }
        report.ran = true;
        report.expired_leases += r.expired_leases;
        publish_changes(queue, &r.changed_users).await;
        if r.expired_leases > 0 {
            tracing::warn!(
                expired = r.expired_leases,
                dead = r.dead_after_lease,
                "reclaimed lapsed claims"
            );
        }
        if r.unconfirmed_batches > 0 {
            tracing::warn!(
                batches = r.unconfirmed_batches,
                "accepted batches whose push was never confirmed; re-enqueueing their deliveries"
            );
        }
        let n = r.owed.len();
        enqueue_owed(pool, queue, &r.owed).await?;
        report.enqueued += n as u64;
        let more_unconfirmed = r.unconfirmed_batches as i64 >= herald_db::sweep::UNCONFIRMED_PER_PASS;
        if (n as i64) < BATCH && !more_unconfirmed {
            herald_db::notifications::expire_idempotency_keys(pool, IDEMPOTENCY_HOURS).await?;
            return Ok(report);
        }
    }
}

/// Live clients see lapsed claims move (to `retrying` or `dead`) at once.
/// Best effort: they find the change on their next query anyway.
async fn publish_changes(queue: &QueueClient, users: &[String]) {
    let mut users = users.to_vec();
    users.sort_unstable();
    users.dedup();
    if let Err(e) = queue.publish_user_changes(&users).await {
        tracing::debug!(error = %e, "could not publish the sweep's changes");
    }
}

async fn enqueue_owed(pool: &PgPool, queue: &QueueClient, owed: &[OwedJob]) -> anyhow::Result<()> {
    if owed.is_empty() {
        return Ok(());
    }
    let now = chrono::Utc::now();
    let mut ready = Vec::new();
    let mut later = Vec::new();
    let mut marks = Vec::with_capacity(owed.len());
    for o in owed {
        let queue_name = QueueName::new(o.channel, o.priority);
        let job = DeliveryJob {
            delivery_id: o.id,
            attempt: o.attempt,
            request_id: o.request_id.clone(),
        };
        match o.next_attempt_at {
            Some(at) if at > now => later.push((queue_name, job, std::time::SystemTime::from(at))),
            _ => ready.push((queue_name, job)),
        }
        marks.push((o.id.to_string(), o.attempt));
    }
    if !ready.is_empty() {
        queue.enqueue(&ready).await?;
    }
    if !later.is_empty() {
        queue.enqueue_at(&later).await?;
    }
    herald_db::notifications::mark_enqueued(pool, &marks).await?;
    tracing::info!(
        ready = ready.len(),
        scheduled = later.len(),
        "sweeper enqueued deliveries owed a job"
    );
    Ok(())
}

/// Sweeps every `interval` until `shutdown` is cancelled. Errors (Postgres
/// or Redis down) are logged and the next pass tries again.
pub async fn run(pool: PgPool, queue: QueueClient, interval: Duration, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        match sweep_once(&pool, &queue).await {
            Ok(_) if failing => {
                tracing::info!("sweeper recovered");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "sweep failed; retrying every pass until it works");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
