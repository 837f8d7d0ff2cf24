//! Operator replays of failed and dead deliveries: audited, durable,
//! resumable, and fenced so that nothing is sent twice.
//!
//! - **Snapshot.** Creating a replay writes the matched deliveries, with
//!   the attempt count each had, to `replay_items` in the same transaction
//!   as the audit row. The runner works through that list, so a replay that
//!   resumes after a crash does exactly what was matched, no more.
//! - **Fence.** A delivery moves `failed|dead → queued` only in SQL, and
//!   only while it is still failed/dead *at the attempt it was matched at*:
//!   one that succeeded, was replayed by someone else, or failed again since
//!   is skipped, with the reason recorded. Replaying the same batch twice
//!   therefore queues each delivery once.
//! - **Checkpoint.** Each batch moves its deliveries, marks their items and
//!   adds to the replay's counters in one transaction, under a row lock on
//!   the replay held by its single owner (`owner`, fenced on every batch).
//!   The caller enqueues the jobs after commit; if that fails, the sweeper
//!   does it (the deliveries are owed a job: `updated_at` moved past
//!   `enqueued_at`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use herald_core::{Channel, DeliveryId, Priority};
use serde::Serialize;
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::Result;
use crate::admin::{AdminDelivery, DeliveryFilter, push_filter};

/// Why a matched delivery would not be (or was not) replayed, given `m`
/// (the matched id and attempt), `d` (the delivery, left-joined) and `u`
/// (its user, left-joined). NULL: replay it.
const SKIP_REASON_SQL: &str = "CASE
    WHEN d.id IS NULL THEN 'no such delivery (never existed or purged)'
    WHEN d.status NOT IN ('failed', 'dead') THEN 'no longer failed or dead (now ' || d.status || ')'
    WHEN m.attempt IS DISTINCT FROM d.attempt THEN 'attempted again since the replay was created'
    WHEN u.id IS NULL THEN 'user no longer exists'
    WHEN d.channel = 'email' AND u.email IS NULL THEN 'user has no email address'
    WHEN d.channel = 'push' AND NOT EXISTS (
        SELECT 1 FROM devices v WHERE v.user_id = d.user_id AND v.disabled_at IS NULL
    ) THEN 'user has no active push device'
END";

/// What a replay covers.
#[derive(Debug, Clone, Copy)]
pub enum ReplayTarget<'a> {
    /// These deliveries (validated ids; unknown ones are skipped).
    Ids(&'a [String]),
    /// Every delivery matching the filter, whose statuses the caller
    /// restricted to failed and dead.
    Filter(&'a DeliveryFilter),
}

/// Appends `SELECT id, attempt` of the target's deliveries (the `m` rows).
fn push_matched<'a>(qb: &mut QueryBuilder<'a, Postgres>, target: ReplayTarget<'a>) {
    match target {
        ReplayTarget::Ids(ids) => {
            qb.push("SELECT x.id, d.attempt FROM (SELECT DISTINCT unnest(")
                .push_bind(ids)
                .push("::TEXT[]) AS id) x LEFT JOIN deliveries d ON d.id = x.id");
        }
        ReplayTarget::Filter(f) => {
            qb.push("SELECT d.id, d.attempt FROM deliveries d WHERE d.status IN ('failed', 'dead')");
            push_filter(qb, f);
        }
    }
}

/// What a replay would do, without doing it.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    pub matched: i64,
    pub would_replay: i64,
    /// Reason → how many.
    pub would_skip: BTreeMap<String, i64>,
    /// Some of the matched deliveries, newest first.
    pub sample: Vec<AdminDelivery>,
}

/// How many deliveries a replay would match.
pub async fn count_replay_target(pool: &PgPool, target: ReplayTarget<'_>) -> Result<i64> {
    let mut qb = QueryBuilder::new("SELECT count(*) FROM (");
    push_matched(&mut qb, target);
    qb.push(") m");
    Ok(qb.build_query_scalar().fetch_one(pool).await?)
}

/// Counts what a replay would replay and skip (with the same checks the
/// runner makes), and samples the matched deliveries.
pub async fn dry_run_replay(pool: &PgPool, target: ReplayTarget<'_>, sample: i64) -> Result<DryRun> {
    let mut qb = QueryBuilder::new("WITH m AS (");
    push_matched(&mut qb, target);
    qb.push(format_args!(
        ") SELECT {SKIP_REASON_SQL} AS reason, count(*)
           FROM m LEFT JOIN deliveries d ON d.id = m.id LEFT JOIN users u ON u.id = d.user_id
           GROUP BY 1"
    ));
    let groups: Vec<(Option<String>, i64)> = qb.build_query_as().fetch_all(pool).await?;
    let mut dry = DryRun {
        matched: 0,
        would_replay: 0,
        would_skip: BTreeMap::new(),
        sample: Vec::new(),
    };
    for (reason, n) in groups {
        dry.matched += n;
        match reason {
            None => dry.would_replay += n,
            Some(r) => {
                dry.would_skip.insert(r, n);
            }
        }
    }
    dry.sample = match target {
        ReplayTarget::Ids(ids) => {
            let n = usize::try_from(sample).unwrap_or(0);
            crate::admin::get_deliveries(pool, &ids[..ids.len().min(n)]).await?
        }
        ReplayTarget::Filter(f) => {
            let f = DeliveryFilter {
                statuses: crate::admin::DEAD_LETTER_STATUSES
                    .iter()
                    .copied()
                    .filter(|s| f.statuses.is_empty() || f.statuses.contains(s))
                    .collect(),
                ..f.clone()
            };
            crate::admin::search_deliveries(pool, &f, None, sample).await?.0
        }
    };
    Ok(dry)
}

/// A replay and its progress (the audit record).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Replay {
    pub id: String,
    pub api_key_id: Option<String>,
    pub api_key_name: Option<String>,
    pub filter: Option<serde_json::Value>,
    pub delivery_ids: Option<i32>,
    pub pace: Option<i32>,
    /// pending, running, completed, cancelled, failed
    pub status: String,
    pub matched: i64,
    pub replayed: i64,
    pub skipped: i64,
    pub failed: i64,
    pub skip_reasons: serde_json::Value,
    pub owner: Option<String>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancelled_by: Option<String>,
}

const REPLAY_COLUMNS: &str = "id, api_key_id, api_key_name, filter, delivery_ids, pace, status, matched, replayed, \
     skipped, failed, skip_reasons, owner, heartbeat_at, error, created_at, started_at, finished_at, cancelled_by";

/// A replay about to be created.
#[derive(Debug, Clone, Copy)]
pub struct NewReplay<'a> {
    pub id: &'a str,
    /// Who: the API key's id and name.
    pub api_key: (&'a str, &'a str),
    pub target: ReplayTarget<'a>,
    pub pace: Option<i32>,
}

/// Writes the audit row and the matched deliveries in one transaction; the
/// replay is `pending` until a worker process's runner claims it.
pub async fn create_replay(pool: &PgPool, r: NewReplay<'_>) -> Result<Replay> {
    let mut tx = pool.begin().await?;
    let (filter, ids) = match r.target {
        ReplayTarget::Ids(ids) => (None, Some(i32::try_from(ids.len()).unwrap_or(i32::MAX))),
        ReplayTarget::Filter(f) => (Some(sqlx::types::Json(f)), None),
    };
    sqlx::query(
        "INSERT INTO replays (id, api_key_id, api_key_name, filter, delivery_ids, pace)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(r.id)
    .bind(r.api_key.0)
    .bind(r.api_key.1)
    .bind(filter)
    .bind(ids)
    .bind(r.pace)
    .execute(&mut *tx)
    .await?;
    let mut qb = QueryBuilder::new("INSERT INTO replay_items (replay_id, delivery_id, attempt) SELECT ");
    qb.push_bind(r.id).push(", m.id, m.attempt FROM (");
    push_matched(&mut qb, r.target);
    qb.push(") m");
    let matched = qb.build().execute(&mut *tx).await?.rows_affected();
    let replay: Replay = sqlx::query_as(&format!(
        "UPDATE replays SET matched = $2 WHERE id = $1 RETURNING {REPLAY_COLUMNS}"
    ))
    .bind(r.id)
    .bind(i64::try_from(matched).unwrap_or(i64::MAX))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(replay)
}

pub async fn get_replay(pool: &PgPool, id: &str) -> Result<Option<Replay>> {
    Ok(
        sqlx::query_as(&format!("SELECT {REPLAY_COLUMNS} FROM replays WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// The most recent replays, newest first (the audit trail).
pub async fn list_replays(pool: &PgPool, limit: i64) -> Result<Vec<Replay>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {REPLAY_COLUMNS} FROM replays ORDER BY created_at DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Cancels a pending or running replay (what it already replayed stays
/// replayed). Returns the replay as it is afterwards, and whether this call
/// cancelled it; `None` if there is no such replay. A batch in progress
/// finishes first: the runner holds the replay's row lock while it works.
pub async fn cancel_replay(pool: &PgPool, id: &str, by: &str) -> Result<Option<(Replay, bool)>> {
    let cancelled: Option<Replay> = sqlx::query_as(&format!(
        "UPDATE replays SET status = 'cancelled', finished_at = now(), cancelled_by = $2
         WHERE id = $1 AND status IN ('pending', 'running') RETURNING {REPLAY_COLUMNS}"
    ))
    .bind(id)
    .bind(by)
    .fetch_optional(pool)
    .await?;
    if let Some(r) = cancelled {
        return Ok(Some((r, true)));
    }
    Ok(get_replay(pool, id).await?.map(|r| (r, false)))
}

/// Takes the oldest replay that is pending, or running under an owner that
/// stopped beating for `stale_secs` (a crashed or frozen process), for
/// `owner`. `SKIP LOCKED`: a replay whose owner is mid-batch is not even
/// looked at.
pub async fn claim_replay(pool: &PgPool, owner: &str, stale_secs: f64) -> Result<Option<Replay>> {
    Ok(sqlx::query_as(&format!(
        "UPDATE replays SET status = 'running', owner = $1, heartbeat_at = now(),
             started_at = COALESCE(started_at, now())
         WHERE id = (
             SELECT id FROM replays
             WHERE status = 'pending'
                OR (status = 'running' AND (heartbeat_at IS NULL
                    OR heartbeat_at < now() - make_interval(secs => $2)))
             ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED
         )
         RETURNING {REPLAY_COLUMNS}"
    ))
    .bind(owner)
    .bind(stale_secs)
    .fetch_optional(pool)
    .await?)
}

/// Fresh attempts a replayed delivery gets, per channel: its
/// `max_attempts` becomes `attempt + budget`, so earlier attempts keep
/// their numbers and the history stays whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptBudgets {
    pub email: i32,
    pub push: i32,
    pub in_app: i32,
}

/// A delivery a batch moved back to `queued`: the job to push.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Requeued {
    pub id: DeliveryId,
    pub user_id: String,
    pub attempt: i32,
    pub channel: Channel,
    pub priority: Priority,
    pub request_id: Option<String>,
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct BatchOutcome {
    /// The replay is no longer ours to run (cancelled, taken over, gone):
    /// its status now.
    pub stopped: Option<String>,
    pub requeued: Vec<Requeued>,
    pub skipped: u64,
    /// Nothing is left: the replay is completed.
    pub finished: bool,
}

/// Processes up to `batch` of a replay's remaining items, if `owner`
/// still runs it (see the module docs for the fence and the checkpoint).
pub async fn replay_batch(
    pool: &PgPool,
    replay_id: &str,
    owner: &str,
    batch: i64,
    budgets: AttemptBudgets,
) -> Result<BatchOutcome> {
    let mut tx = pool.begin().await?;
    let mine: Option<(String, serde_json::Value)> =
        sqlx::query_as("SELECT status, skip_reasons FROM replays WHERE id = $1 AND owner = $2 FOR UPDATE")
            .bind(replay_id)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?;
    let reasons = match mine {
        Some((status, reasons)) if status == "running" => reasons,
        Some((status, _)) => {
            return Ok(BatchOutcome {
                stopped: Some(status),
                ..BatchOutcome::default()
            });
        }
        None => {
            return Ok(BatchOutcome {
                stopped: Some("taken over by another process".into()),
                ..BatchOutcome::default()
            });
        }
    };
    #[derive(sqlx::FromRow)]
    struct Row {
        id: String,
        reason: Option<String>,
        attempt: Option<i32>,
        channel: Option<Channel>,
        priority: Option<Priority>,
        request_id: Option<String>,
        user_id: Option<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "WITH m AS (
             SELECT i.delivery_id AS id, i.attempt FROM replay_items i
             WHERE i.replay_id = $1 AND i.outcome IS NULL ORDER BY i.delivery_id LIMIT $2
         ), c AS (
             SELECT m.id, m.attempt, {SKIP_REASON_SQL} AS reason
             FROM m LEFT JOIN deliveries d ON d.id = m.id LEFT JOIN users u ON u.id = d.user_id
         ), moved AS (
             UPDATE deliveries d SET status = 'queued',
                 max_attempts = d.attempt + CASE d.channel WHEN 'email' THEN $3 WHEN 'push' THEN $4 ELSE $5 END,
                 next_attempt_at = NULL, lease_until = NULL, finished_at = NULL, updated_at = now()
             FROM c
             WHERE d.id = c.id AND c.reason IS NULL
               AND d.status IN ('failed', 'dead') AND d.attempt = c.attempt
             RETURNING d.id, d.attempt, d.channel, d.priority, d.notification_id, d.user_id
         ), items AS (
             UPDATE replay_items i SET
                 outcome = CASE WHEN c.id IN (SELECT id FROM moved) THEN 'replayed' ELSE 'skipped' END,
                 reason = CASE WHEN c.id IN (SELECT id FROM moved) THEN NULL
                               ELSE COALESCE(c.reason, 'changed while being replayed') END,
                 processed_at = now()
             FROM c
             WHERE i.replay_id = $1 AND i.delivery_id = c.id
         )
         -- `IN (SELECT …)` rather than joins between CTEs: a CTE has no
         -- statistics, and the planner's nested loop over two of them is
         -- quadratic in the batch; the subplan is hashed.
         SELECT mv.id, NULL::TEXT AS reason, mv.attempt, mv.channel, mv.priority, n.request_id, mv.user_id
         FROM moved mv LEFT JOIN notifications n ON n.id = mv.notification_id
         UNION ALL
         SELECT c.id, COALESCE(c.reason, 'changed while being replayed'), NULL, NULL, NULL, NULL, NULL
         FROM c WHERE NOT (c.id IN (SELECT id FROM moved))"
    ))
    // Planned with the real values every time: a cached generic plan would
    // be built on statistics a large replay has just made stale.
    .persistent(false)
    .bind(replay_id)
    .bind(batch)
    .bind(budgets.email)
    .bind(budgets.push)
    .bind(budgets.in_app)
    .fetch_all(&mut *tx)
    .await?;

    let mut out = BatchOutcome {
        finished: (rows.len() as i64) < batch,
        ..BatchOutcome::default()
    };
    let mut reasons: BTreeMap<String, i64> = serde_json::from_value(reasons).unwrap_or_default();
    for r in rows {
        // A moved row's id was read from `deliveries`, so it parses.
        match (r.reason, r.attempt, r.channel, r.priority, r.id.parse::<DeliveryId>()) {
            (None, Some(attempt), Some(channel), Some(priority), Ok(id)) => out.requeued.push(Requeued {
                id,
                user_id: r.user_id.unwrap_or_default(),
                attempt,
                channel,
                priority,
                request_id: r.request_id,
            }),
            (reason, ..) => {
                out.skipped += 1;
                *reasons
                    .entry(reason.unwrap_or_else(|| "changed while being replayed".into()))
                    .or_default() += 1;
            }
        }
    }
    sqlx::query(
        "UPDATE replays SET replayed = replayed + $2, skipped = skipped + $3, skip_reasons = $4,
             heartbeat_at = now(),
             status = CASE WHEN $5 THEN 'completed' ELSE status END,
             finished_at = CASE WHEN $5 THEN now() ELSE finished_at END
         WHERE id = $1",
    )
    .bind(replay_id)
    .bind(out.requeued.len() as i64)
    .bind(i64::try_from(out.skipped).unwrap_or(i64::MAX))
    .bind(sqlx::types::Json(&reasons))
    .bind(out.finished)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// Records that jobs were pushed for these replayed deliveries (ids and the
/// attempt each was queued at), so the sweeper knows they are not owed one.
/// Only a delivery still `queued` at that attempt is marked.
///
/// Planned afresh for every call (an unnamed statement): right after a
/// mass replay the statistics still say almost nothing is `queued`, and a
/// cached generic plan then scans the whole table for every batch. With
/// the real ids the
/// primary key drives it; the attempt is matched by position.
pub async fn mark_replayed_enqueued(pool: &PgPool, ids: &[String], attempts: &[i32]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE deliveries d SET enqueued_at = clock_timestamp()
         WHERE d.id = ANY($1) AND d.status = 'queued'
           AND d.attempt = ($2::INT[])[array_position($1::TEXT[], d.id)]",
    )
    .persistent(false)
    .bind(ids)
    .bind(attempts)
    .execute(pool)
    .await?;
    Ok(())
}

/// Hands a running replay back (its owner is shutting down), so the next
/// runner to look resumes it at once.
pub async fn release_replay(pool: &PgPool, replay_id: &str, owner: &str) -> Result<()> {
    sqlx::query(
        "UPDATE replays SET status = 'pending', owner = NULL, heartbeat_at = NULL
         WHERE id = $1 AND owner = $2 AND status = 'running'",
    )
    .bind(replay_id)
    .bind(owner)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends a replay that cannot go on (an unexpected database error): the
/// items not processed are counted as failed.
pub async fn fail_replay(pool: &PgPool, replay_id: &str, owner: &str, error: &str) -> Result<()> {
    sqlx::query(
        "UPDATE replays SET status = 'failed', error = $3, finished_at = now(),
             failed = (SELECT count(*) FROM replay_items WHERE replay_id = $1 AND outcome IS NULL)
         WHERE id = $1 AND owner = $2 AND status = 'running'",
    )
    .bind(replay_id)
    .bind(owner)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// The skip reason recorded for each skipped delivery of a replay (up to
/// `limit`), for operators who want the ids behind the counts.
pub async fn list_skipped(pool: &PgPool, replay_id: &str, limit: i64) -> Result<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT delivery_id, COALESCE(reason, '') FROM replay_items
         WHERE replay_id = $1 AND outcome = 'skipped' ORDER BY delivery_id LIMIT $2",
    )
    .bind(replay_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
