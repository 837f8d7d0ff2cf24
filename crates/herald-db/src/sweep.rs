//! The sweeper's statements: find deliveries owed a job and stale claims.
//!
//! A delivery is *owed a job* when it waits (`queued`/`retrying`) and no job
//! was pushed since its last change (`enqueued_at` is older than
//! `updated_at`, or unset): the process crashed between commit and enqueue,
//! Redis was down, or Redis lost its data (then [`forget_enqueued`] clears
//! the marks). Re-enqueueing is always safe: claims are fenced.
//!
//! Accepted deliveries are the exception: the API's insert marks them
//! enqueued before their jobs exist, and records the batch as a push intent
//! (`herald_db::notifications::insert_notifications`) that it deletes once
//! the jobs are in Redis. An intent older than the grace period was never
//! confirmed (the API died after the commit, Redis refused the push, or the
//! confirmation itself failed), so a pass first turns it back into owed
//! deliveries: the marks of that batch's deliveries still queued are cleared.

use chrono::{DateTime, Utc};
use herald_core::{Channel, DeliveryId, Priority};
use sqlx::PgPool;

use crate::Result;

/// Only one sweeper acts at a time, across every process.
const SWEEP_LOCK_KEY: i64 = 0x4845_5241_4c44_0001; // "HERALD" + 1

/// Unconfirmed push intents turned into owed deliveries per pass. Each
/// covers one accepted batch (at most 256 notifications, three deliveries
/// each); after a long Redis outage the sweeper loops until none is left.
pub const UNCONFIRMED_PER_PASS: i64 = 64;

/// A job the sweeper must push.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwedJob {
    pub id: DeliveryId,
    pub attempt: i32,
    pub channel: Channel,
    pub priority: Priority,
    pub request_id: Option<String>,
    /// For `retrying`: when the job is due.
    pub next_attempt_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default, Clone)]
pub struct SweepResult {
    /// False when another process holds the sweep lock.
    pub ran: bool,
    pub expired_leases: u64,
    pub dead_after_lease: u64,
    pub owed: Vec<OwedJob>,
    /// Unconfirmed push intents this pass turned into owed deliveries; a
    /// full page ([`UNCONFIRMED_PER_PASS`]) means more may be waiting.
    pub unconfirmed_batches: u64,
    /// Users whose deliveries this pass moved (lapsed claims), for live
    /// clients.
    pub changed_users: Vec<String>,
}

/// One sweep pass, under a transaction-scoped advisory lock.
/// `grace_secs` keeps it away from deliveries an API or worker process is
/// about to enqueue itself.
pub async fn sweep(pool: &PgPool, grace_secs: f64, limit: i64) -> Result<SweepResult> {
    let mut tx = pool.begin().await?;
    // Both for this transaction only. A sweeper frozen mid-pass (SIGSTOP, a
    // stalled VM) must not hold the lock forever: Postgres ends its session
    // and the lock goes with it. No parallel workers: each statement reads
    // a handful of rows by index (the owed ones through `deliveries_owed`),
    // but the planner cannot estimate how few match `enqueued_at <
    // updated_at` and, on a big backlog, starts a parallel worker for
    // them on every pass, which costs far more than the read itself.
    sqlx::query(
        "SELECT set_config('idle_in_transaction_session_timeout', '10s', true),
                set_config('max_parallel_workers_per_gather', '0', true)",
    )
    .execute(&mut *tx)
    .await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(SWEEP_LOCK_KEY)
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(SweepResult::default());
    }
    // Claims whose lease lapsed: the worker died or stalled mid-send. The
    // send may have happened, so the attempt counts and is marked
    // ambiguous; the delivery retries (or is dead if out of attempts).
    let expired: Vec<(String, String, String)> = sqlx::query_as(
        "WITH s AS (
             SELECT id FROM deliveries WHERE status = 'sending' AND lease_until < now()
             ORDER BY lease_until LIMIT $1 FOR UPDATE SKIP LOCKED
         ), u AS (
             UPDATE deliveries d SET
                 status = CASE WHEN d.attempt >= d.max_attempts THEN 'dead' ELSE 'retrying' END,
                 next_attempt_at = CASE WHEN d.attempt >= d.max_attempts THEN NULL ELSE now() END,
                 finished_at = CASE WHEN d.attempt >= d.max_attempts THEN now() ELSE NULL END,
                 lease_until = NULL, updated_at = now(), ambiguous_attempts = d.ambiguous_attempts + 1,
                 last_error = 'lease expired before the worker recorded a result',
                 last_error_class = 'ambiguous'
             FROM s WHERE d.id = s.id
             RETURNING d.id, d.attempt, d.status, d.user_id
         ), a AS (
             UPDATE delivery_attempts t SET finished_at = now(), outcome = 'lease_expired',
                 error = 'lease expired before the worker recorded a result'
             FROM u WHERE t.delivery_id = u.id AND t.attempt = u.attempt AND t.finished_at IS NULL
         )
         SELECT id, status, user_id FROM u",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    // Batches whose push was never confirmed. Their deliveries still
    // queued are found by the batch's time through the pending index
    // (status, updated_at); one that moved on since has its own job or
    // needs none.
    let unconfirmed: i64 = sqlx::query_scalar(
        "WITH i AS (
             DELETE FROM push_intents WHERE id IN (
                 SELECT id FROM push_intents WHERE batch_at < now() - make_interval(secs => $1)
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING batch_at
         ), u AS (
             UPDATE deliveries d SET enqueued_at = NULL
             FROM (SELECT DISTINCT batch_at FROM i) b
             WHERE d.status = 'queued' AND d.updated_at = b.batch_at AND d.enqueued_at IS NOT NULL
         )
         SELECT count(*) FROM i",
    )
    .bind(grace_secs)
    .bind(UNCONFIRMED_PER_PASS)
    .fetch_one(&mut *tx)
    .await?;
    // Through `deliveries_owed` (migration …090), which holds exactly the
    // rows this matches, and each one's notification by primary key (the
    // lateral `OFFSET 0` keeps a misestimate from turning the join into a
    // scan of every notification): a pass reads what it enqueues, not every
    // waiting delivery (`tests/it/db/fencing.rs`).
    let owed: Vec<OwedJob> = sqlx::query_as(
        "SELECT d.id, d.attempt, d.channel, d.priority, n.request_id, d.next_attempt_at
         FROM (SELECT id, attempt, channel, priority, next_attempt_at, notification_id, updated_at
               FROM deliveries
               WHERE status IN ('queued', 'retrying')
                 AND (enqueued_at IS NULL OR enqueued_at < updated_at)
                 AND (updated_at < now() - make_interval(secs => $2) OR id = ANY($3))
               ORDER BY updated_at LIMIT $1) d
         CROSS JOIN LATERAL (SELECT n.request_id FROM notifications n WHERE n.id = d.notification_id OFFSET 0) n
         ORDER BY d.updated_at",
    )
    .bind(limit)
    .bind(grace_secs)
    .bind(expired.iter().map(|(id, ..)| id.as_str()).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SweepResult {
        ran: true,
        expired_leases: expired.len() as u64,
        dead_after_lease: expired.iter().filter(|(_, s, _)| s == "dead").count() as u64,
        owed,
        unconfirmed_batches: unconfirmed as u64,
        changed_users: expired.into_iter().map(|(.., user)| user).collect(),
    })
}

/// Redis lost its data: every waiting delivery is owed a job again.
pub async fn forget_enqueued(pool: &PgPool) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE deliveries SET enqueued_at = NULL WHERE status IN ('queued', 'retrying') AND enqueued_at IS NOT NULL",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}
