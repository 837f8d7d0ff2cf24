//! The worker's side: claim a delivery, record how the attempt ended.
//!
//! Both statements are fenced on the attempt number. A job carries the
//! attempt count it was enqueued for; the claim succeeds only if the
//! delivery is still waiting at that count, and the result is written only
//! if the delivery is still `sending` at the count the claim produced. A
//! duplicate job, or a stale worker waking after its lease, changes nothing.
//!
//! Every fenced statement finds its rows by primary key only: the status
//! test is written `(d.status || '') …`, which no index can answer. Written
//! plainly, it matches the sweeper's partial index on pending deliveries,
//! and with statistics taken while few deliveries were pending (a quiet
//! hour, a drained backlog) Postgres prefers scanning that index for the
//! whole batch; once the backlog is back, each batch walks every pending
//! delivery to find a few rows (docs/performance.md). The test
//! stays in the `WHERE` of the `UPDATE`, so Postgres re-checks it on the
//! newest row version when two claims race: the fence is unchanged.
//!
//! Nor may a plan depend on how full the table was when it was made: a
//! plan cached while the table was empty (a new deployment; a table just
//! truncated) can seq-scan it for every batch until
//! autovacuum's next analyze, which a busy table may not get for minutes.
//! The claim, result and in-app statements ([`CLAIM_SQL`], [`RECORD_SQL`],
//! [`DELIVER_IN_APP_SQL`]) are shaped so that their one plan reaches every
//! row by index on any table, and the workers run them on connections that
//! plan once ([`connect_lazy_planned_once`](crate::connect_lazy_planned_once),
//! which says what planning each call cost). The workers' other
//! statements run on connections that plan each call with its values
//! ([`connect_lazy_planned_per_call`](crate::connect_lazy_planned_per_call)).

use chrono::{DateTime, Utc};
use herald_core::{Channel, DeliveryId, DevicePlatform, NotificationId, Priority, PushProvider};
use sqlx::PgPool;

use crate::Result;

/// What a worker needs to send one delivery, read in the claim itself.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: DeliveryId,
    pub notification_id: NotificationId,
    pub user_id: String,
    pub channel: Channel,
    pub priority: Priority,
    /// The attempt this claim started (1 for the first).
    pub attempt: i32,
    pub max_attempts: i32,
    pub category: String,
    pub title: String,
    pub body: String,
    pub data: serde_json::Value,
    pub request_id: Option<String>,
    pub email: Option<String>,
    /// For a push delivery: the user's active devices, oldest first, read
    /// in the same statement. Empty for other channels.
    pub devices: sqlx::types::Json<Vec<PushDevice>>,
}

/// A device a push goes to, as the claim reads it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PushDevice {
    pub id: String,
    pub platform: DevicePlatform,
    pub provider: PushProvider,
    pub token: String,
}

/// Claims a delivery for one attempt: `queued|retrying → sending`, with a
/// lease, and opens the attempt's row. `None` when the job is stale.
pub async fn claim_delivery(
    pool: &PgPool,
    delivery_id: &str,
    expected_attempt: i32,
    lease_secs: f64,
    worker_id: &str,
) -> Result<Option<ClaimedDelivery>> {
    let claim = (delivery_id.to_owned(), expected_attempt);
    let mut conn = pool.acquire().await?;
    Ok(
        claim_deliveries(&mut conn, std::slice::from_ref(&claim), lease_secs, worker_id)
            .await?
            .pop()
            .flatten(),
    )
}

// [`CLAIM_SQL`] and [`CLAIM_SQL_KEEPING_ROWS`]: one statement, with or
// without `ON CONFLICT` on the attempt row it inserts.
macro_rules! claim_sql {
    ($on_conflict:literal) => {
        concat!(
            "WITH c AS (
         UPDATE deliveries d SET status = 'sending', attempt = d.attempt + 1,
             lease_until = now() + make_interval(secs => $3), next_attempt_at = NULL, updated_at = now()
         WHERE d.id = ANY($1::TEXT[]) AND ($2::JSONB -> d.id) @> to_jsonb(d.attempt)
           AND (d.status || '') IN ('queued', 'retrying')
         RETURNING d.id, d.notification_id, d.user_id, d.channel, d.priority, d.attempt, d.max_attempts
     ), a AS (
         INSERT INTO delivery_attempts (delivery_id, attempt, worker_id, started_at)
         SELECT id, attempt, $4, now() FROM c",
            $on_conflict,
            "
     )
     SELECT c.id, c.notification_id, c.user_id, c.channel, c.priority, c.attempt, c.max_attempts,
            n.category, n.title, n.body, n.data, n.request_id, u.email,
            CASE WHEN c.channel = 'push' THEN COALESCE((
                SELECT json_agg(json_build_object('id', v.id, 'platform', v.platform,
                                                  'provider', v.provider, 'token', v.token)
                                ORDER BY v.created_at)
                FROM devices v WHERE v.user_id = c.user_id AND v.disabled_at IS NULL
            ), '[]'::JSON) ELSE '[]'::JSON END AS devices
     FROM c
     CROSS JOIN LATERAL (SELECT * FROM notifications n WHERE n.id = c.notification_id OFFSET 0) n
     LEFT JOIN LATERAL (SELECT u.email FROM users u WHERE u.id = c.user_id OFFSET 0) u ON true",
        )
    };
}

/// The claim statement: `$1` the jobs' delivery ids (in lock order), `$2`
/// their attempts ([`attempts_by_id`]), `$3` the lease in seconds, `$4` the
/// worker id.
///
/// Shaped so that one plan, made once on any table (the workers' batch
/// pool is [`connect_lazy_planned_once`](crate::connect_lazy_planned_once)),
/// reaches every row by index: deliveries by `id = ANY($1)` with the
/// attempt checked per row in the JSON object (no join with the batch, so
/// no plan can scan deliveries in full and filter by the batch), and each
/// claimed row's notification and user by a lateral lookup that cannot be
/// flattened into a join (`OFFSET 0`). `tests/it/db/fencing.rs` checks the plan
/// made on empty tables and the rows it reads on full ones.
///
/// It inserts the attempt's row without `ON CONFLICT`: a claim moves the
/// delivery to an attempt number no row can have yet (attempt rows are
/// written only by claims and in-app deliveries, each for the number it
/// moves the delivery to, and a delivery's number only grows), and the
/// conflict check costs Postgres work on every row it inserts. Should a
/// row be there all the same (written by hand, say),
/// the statement fails on `delivery_attempts_pkey` and
/// [`claim_deliveries`] runs [`CLAIM_SQL_KEEPING_ROWS`] for the batch.
pub const CLAIM_SQL: &str = claim_sql!("");

/// [`CLAIM_SQL`] that leaves an attempt row already there as it is. The
/// claim runs it only for a batch whose [`CLAIM_SQL`] hit one (see
/// [`claim_deliveries`]); the conflict check costs every row it inserts.
pub const CLAIM_SQL_KEEPING_ROWS: &str = claim_sql!(
    "
         ON CONFLICT (delivery_id, attempt) DO NOTHING"
);

/// [`claim_delivery`] for many jobs in one statement ([`CLAIM_SQL`]); one
/// answer per job, in order. Of two identical jobs in a batch only the
/// first claims; of two for one delivery with different attempts, the one
/// whose attempt the delivery is at.
///
/// On a connection outside a transaction: should the statement meet an
/// attempt row that is already there, it runs again as
/// [`CLAIM_SQL_KEEPING_ROWS`], which a failed transaction could not.
pub async fn claim_deliveries(
    conn: &mut sqlx::PgConnection,
    jobs: &[(String, i32)],
    lease_secs: f64,
    worker_id: &str,
) -> Result<Vec<Option<ClaimedDelivery>>> {
    let (ids, _) = in_lock_order(jobs);
    let attempts = attempts_by_id(jobs);
    let claimed = fetch_keeping_rows_if_met(conn, [CLAIM_SQL, CLAIM_SQL_KEEPING_ROWS], |sql| {
        sqlx::query_as(sql)
            .bind(&ids)
            .bind(&attempts)
            .bind(lease_secs)
            .bind(worker_id)
    })
    .await?;
    Ok(answer_per_job(jobs, claimed, |c| (c.id, c.attempt)))
}

/// Runs a batch statement written without `ON CONFLICT` ([`CLAIM_SQL`],
/// [`DELIVER_IN_APP_SQL`]), `query` binding its parameters; should it fail
/// on an attempt row or inbox item already there, which the invariants say
/// it cannot meet, the batch runs again as the statement's `_KEEPING_ROWS`
/// variant (on a connection outside a transaction, which a failed one
/// could not).
async fn fetch_keeping_rows_if_met<'q, O>(
    conn: &mut sqlx::PgConnection,
    [first, keeping_rows]: [&'static str; 2],
    query: impl Fn(&'static str) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
) -> Result<Vec<O>>
where
    O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    match query(first).fetch_all(&mut *conn).await.map_err(crate::DbError::from) {
        Err(e) if e.is_conflict_on("delivery_attempts_pkey") || e.is_conflict_on("inbox_items_pkey") => {
            Ok(query(keeping_rows).fetch_all(conn).await?)
        }
        rows => rows,
    }
}

/// One answer per job, in order, from the rows a fenced batch statement
/// returned (each with its delivery id and the attempt it started): a
/// job's row if that job's attempt is the one that moved the delivery,
/// `None` for a stale or duplicate job.
fn answer_per_job<T>(
    jobs: &[(String, i32)],
    rows: Vec<T>,
    id_and_attempt: fn(&T) -> (DeliveryId, i32),
) -> Vec<Option<T>> {
    let mut by_id: std::collections::HashMap<DeliveryId, T> =
        rows.into_iter().map(|r| (id_and_attempt(&r).0, r)).collect();
    jobs.iter()
        .map(|(id, attempt)| {
            let id = id.parse::<DeliveryId>().ok()?;
            match by_id.get(&id) {
                Some(r) if id_and_attempt(r).1 == attempt + 1 => by_id.remove(&id),
                _ => None,
            }
        })
        .collect()
}

/// The jobs' ids and attempts, sorted by id: every batched statement that
/// updates waiting deliveries (claims, in-app, the API's enqueue marks)
/// locks its rows in this one order, so two batches sharing rows wait for
/// each other instead of deadlocking (which costs a second and a failed
/// batch).
pub(crate) fn in_lock_order(jobs: &[(String, i32)]) -> (Vec<&str>, Vec<i32>) {
    let mut sorted: Vec<&(String, i32)> = jobs.iter().collect();
    sorted.sort();
    sorted.into_iter().map(|(id, a)| (id.as_str(), *a)).unzip()
}

/// The jobs' attempts as one JSON object, `{"dlv_…": [attempt, …]}`: a
/// statement checks a row's attempt with `($n -> d.id) @> to_jsonb(d.attempt)`,
/// a lookup by key (JSONB keeps an object's keys sorted) instead of a join
/// with the batch.
#[must_use]
pub fn attempts_by_id(jobs: &[(String, i32)]) -> serde_json::Value {
    let mut by_id = serde_json::Map::with_capacity(jobs.len());
    for (id, attempt) in jobs {
        let entry = by_id
            .entry(id.clone())
            .or_insert_with(|| serde_json::Value::Array(Vec::with_capacity(1)));
        if let serde_json::Value::Array(attempts) = entry {
            attempts.push((*attempt).into());
        }
    }
    serde_json::Value::Object(by_id)
}

/// An in-app delivery written to its user's inbox.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InboxDelivered {
    pub id: DeliveryId,
    pub notification_id: NotificationId,
    pub user_id: String,
    /// The attempt this delivery made (1 for the first).
    pub attempt: i32,
    pub category: String,
    pub title: String,
}

// [`DELIVER_IN_APP_SQL`] and [`DELIVER_IN_APP_SQL_KEEPING_ROWS`]: one
// statement, with or without `ON CONFLICT` on the rows it inserts.
macro_rules! in_app_sql {
    ($on_conflict_attempt:literal, $on_conflict_item:literal) => {
        concat!(
            "WITH c AS (
         UPDATE deliveries d SET status = 'delivered', attempt = d.attempt + 1, lease_until = NULL,
             next_attempt_at = NULL, updated_at = now(), sent_at = now(), delivered_at = now(),
             finished_at = now()
         WHERE d.id = ANY($1::TEXT[]) AND ($2::JSONB -> d.id) @> to_jsonb(d.attempt)
           AND (d.status || '') IN ('queued', 'retrying') AND (d.channel || '') = 'in_app'
         RETURNING d.id, d.notification_id, d.user_id, d.attempt
     ), a AS (
         INSERT INTO delivery_attempts (delivery_id, attempt, worker_id, started_at, finished_at, outcome)
         SELECT id, attempt, $3, now(), now(), 'delivered' FROM c",
            $on_conflict_attempt,
            "
     ), n AS (
         SELECT c.id, c.attempt, n.id AS notification_id, n.user_id, n.category, n.title, n.body, n.data,
                n.created_at
         FROM c CROSS JOIN LATERAL (SELECT * FROM notifications n WHERE n.id = c.notification_id OFFSET 0) n
     ), i AS (
         INSERT INTO inbox_items (notification_id, user_id, category, title, body, data, created_at)
         SELECT notification_id, user_id, category, title, body, data, created_at FROM n",
            $on_conflict_item,
            "
     )
     SELECT id, notification_id, user_id, attempt, category, title FROM n",
        )
    };
}

/// The in-app statement: `$1` the jobs' delivery ids (in lock order), `$2`
/// their attempts ([`attempts_by_id`]), `$3` the worker id. Shaped like
/// [`CLAIM_SQL`], for one plan that reaches every row by index; the
/// channel test is `(d.channel || '')` so that it cannot become the index
/// condition of a whole scan of an index on the channel (a plan made on
/// empty tables may prefer such an index to the primary key).
///
/// Without `ON CONFLICT`, like [`CLAIM_SQL`]: the attempt row is new for
/// the same reason, and so is the inbox item (a notification has one in-app
/// delivery, delivered once, and only this statement writes items).
pub const DELIVER_IN_APP_SQL: &str = in_app_sql!("", "");

/// [`DELIVER_IN_APP_SQL`] that leaves an attempt row or inbox item already
/// there as it is, for a batch whose [`DELIVER_IN_APP_SQL`] hit one (see
/// [`deliver_in_app`]).
pub const DELIVER_IN_APP_SQL_KEEPING_ROWS: &str = in_app_sql!(
    "
         ON CONFLICT (delivery_id, attempt) DO NOTHING",
    "
         ON CONFLICT (notification_id) DO NOTHING"
);

/// Delivers in-app jobs in one statement: for each delivery still waiting
/// at the job's attempt count, the inbox item is written and the delivery
/// becomes `delivered` with a completed attempt row, all in one commit.
///
/// An in-app "send" is itself a write to Postgres, so it needs neither a
/// lease nor a separate result: either everything commits or nothing does
/// and the job is tried again. The fencing is the claim's: a stale or
/// duplicate job matches no row. One answer per job, in order; `None` for a
/// stale job. The statement is [`DELIVER_IN_APP_SQL`]; outside a
/// transaction, as for [`claim_deliveries`].
pub async fn deliver_in_app(
    conn: &mut sqlx::PgConnection,
    jobs: &[(String, i32)],
    worker_id: &str,
) -> Result<Vec<Option<InboxDelivered>>> {
    let (ids, _) = in_lock_order(jobs);
    let attempts = attempts_by_id(jobs);
    let done = fetch_keeping_rows_if_met(conn, [DELIVER_IN_APP_SQL, DELIVER_IN_APP_SQL_KEEPING_ROWS], |sql| {
        sqlx::query_as(sql).bind(&ids).bind(&attempts).bind(worker_id)
    })
    .await?;
    Ok(answer_per_job(jobs, done, |d| (d.id, d.attempt)))
}

/// Where an attempt leaves the delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum NextState {
    Sent,
    Delivered,
    Skipped {
        reason: String,
    },
    /// A new attempt this long from now (by the database's clock, like
    /// every other timestamp); the caller enqueues its job for
    /// `Recorded::Moved { next_attempt_at }` after this commits.
    Retrying {
        after: std::time::Duration,
    },
    Failed,
    Dead,
}

impl NextState {
    fn status(&self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
            Self::Skipped { .. } => "skipped",
            Self::Retrying { .. } => "retrying",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub delivery_id: String,
    pub attempt: i32,
    pub next: NextState,
    /// `sent`, `delivered`, `skipped`, or an error class.
    pub outcome: &'static str,
    pub provider_status: Option<i32>,
    /// Truncated, free of secrets.
    pub error: Option<String>,
    pub detail: Option<serde_json::Value>,
}

/// Longest error text kept per attempt.
pub const MAX_ERROR_CHARS: usize = 1_000;

/// What recording did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The delivery moved; for a retry, when its next attempt is due.
    Moved { next_attempt_at: Option<DateTime<Utc>> },
    /// A newer attempt or the sweeper got there first: nothing moved (the
    /// attempt row is still completed, because what happened at the
    /// provider is history).
    Stale,
}

/// Writes the attempt's row and moves the delivery on, if this attempt
/// still owns it.
pub async fn record_attempt(pool: &PgPool, r: &AttemptResult) -> Result<Recorded> {
    Ok(record_attempts(pool, std::slice::from_ref(r))
        .await?
        .pop()
        .unwrap_or(Recorded::Stale))
}

/// The result statement: `$1` the deliveries' ids (in lock order), `$2`
/// the results ([`results_by_attempt`]).
///
/// Shaped like [`CLAIM_SQL`], for one plan that reaches every row by
/// index: deliveries by `id = ANY($1)` and attempts by the prefix of their
/// primary key, each row's own result looked up in the JSON object by
/// `id:attempt` (so the attempt fence is that lookup) and unpacked once per
/// row by the sub-select in `SET`. No join with the batch, so no plan can
/// scan either table and filter by it (`tests/it/db/fencing.rs`).
pub const RECORD_SQL: &str = "WITH u AS (
         UPDATE deliveries d SET (status, lease_until, updated_at, next_attempt_at, skip_reason, last_error,
                                  last_error_class, last_provider_status, sent_at, delivered_at, finished_at) = (
             SELECT r.status, NULL::TIMESTAMPTZ, now(), now() + make_interval(secs => r.after_secs),
                    COALESCE(r.skip_reason, d.skip_reason), COALESCE(r.error, d.last_error),
                    COALESCE(r.class, d.last_error_class), COALESCE(r.provider_status, d.last_provider_status),
                    CASE WHEN r.status IN ('sent', 'delivered') THEN now() ELSE d.sent_at END,
                    CASE WHEN r.status = 'delivered' THEN now() ELSE d.delivered_at END,
                    CASE WHEN r.status <> 'retrying' THEN now() END
             FROM jsonb_to_record($2::JSONB -> (d.id || ':' || d.attempt))
                 AS r (status TEXT, after_secs FLOAT8, skip_reason TEXT, error TEXT, class TEXT, provider_status INT))
         WHERE d.id = ANY($1::TEXT[]) AND $2::JSONB ? (d.id || ':' || d.attempt) AND (d.status || '') = 'sending'
         RETURNING d.id, d.attempt, d.next_attempt_at
     ), a AS (
         UPDATE delivery_attempts t SET (finished_at, outcome, provider_status, error, detail) = (
             SELECT now(), r.outcome, r.provider_status, r.error, r.detail
             FROM jsonb_to_record($2::JSONB -> (t.delivery_id || ':' || t.attempt))
                 AS r (outcome TEXT, provider_status INT, error TEXT, detail JSONB))
         WHERE t.delivery_id = ANY($1::TEXT[]) AND $2::JSONB ? (t.delivery_id || ':' || t.attempt)
     )
     SELECT id, attempt, next_attempt_at FROM u";

/// The results as one JSON object keyed by `delivery_id:attempt`, each
/// value the columns [`RECORD_SQL`] writes. Of two results for one attempt
/// the last is kept (there is one attempt row to write).
#[must_use]
pub fn results_by_attempt(results: &[AttemptResult]) -> serde_json::Value {
    let mut by_attempt = serde_json::Map::with_capacity(results.len());
    for r in results {
        let mut row = serde_json::Map::with_capacity(9);
        let mut put = |k: &str, v: serde_json::Value| {
            if !v.is_null() {
                row.insert(k.to_owned(), v);
            }
        };
        put("status", r.next.status().into());
        put("outcome", r.outcome.into());
        if let NextState::Retrying { after } = r.next {
            put("after_secs", after.as_secs_f64().into());
        }
        if let NextState::Skipped { reason } = &r.next {
            put("skip_reason", reason.as_str().into());
        }
        if let Some(e) = &r.error {
            put("error", e.chars().take(MAX_ERROR_CHARS).collect::<String>().into());
        }
        if matches!(r.outcome, "permanent" | "transient" | "rate_limited" | "ambiguous") {
            put("class", r.outcome.into());
        }
        put("provider_status", r.provider_status.into());
        put("detail", r.detail.clone().unwrap_or_default());
        by_attempt.insert(
            format!("{}:{}", r.delivery_id, r.attempt),
            serde_json::Value::Object(row),
        );
    }
    serde_json::Value::Object(by_attempt)
}

/// [`record_attempt`] for many attempts in one statement ([`RECORD_SQL`]);
/// one answer each, in order.
pub async fn record_attempts<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    results: &[AttemptResult],
) -> Result<Vec<Recorded>> {
    let mut ids: Vec<&str> = results.iter().map(|r| r.delivery_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let moved: Vec<(String, i32, Option<DateTime<Utc>>)> = sqlx::query_as(RECORD_SQL)
        .bind(&ids)
        .bind(results_by_attempt(results))
        .fetch_all(executor)
        .await?;
    let mut by_id: std::collections::HashMap<(String, i32), Option<DateTime<Utc>>> =
        moved.into_iter().map(|(id, a, next)| ((id, a), next)).collect();
    Ok(results
        .iter()
        .map(|r| match by_id.remove(&(r.delivery_id.clone(), r.attempt)) {
            Some(next_attempt_at) => Recorded::Moved { next_attempt_at },
            None => Recorded::Stale,
        })
        .collect())
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct AttemptRow {
    pub attempt: i32,
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub provider_status: Option<i32>,
    pub error: Option<String>,
    pub detail: Option<serde_json::Value>,
}

/// Every attempt of each of these deliveries, oldest first.
pub async fn list_attempts_for(
    pool: &PgPool,
    delivery_ids: &[String],
) -> Result<std::collections::HashMap<String, Vec<AttemptRow>>> {
    #[derive(sqlx::FromRow)]
    struct AttemptOf {
        delivery_id: String,
        #[sqlx(flatten)]
        row: AttemptRow,
    }
    let rows: Vec<AttemptOf> = sqlx::query_as(
        "SELECT delivery_id, attempt, worker_id, started_at, finished_at, outcome, provider_status, error, detail
         FROM delivery_attempts WHERE delivery_id = ANY($1) ORDER BY delivery_id, attempt",
    )
    .bind(delivery_ids)
    .fetch_all(pool)
    .await?;
    let mut out: std::collections::HashMap<String, Vec<AttemptRow>> = std::collections::HashMap::new();
    for r in rows {
        out.entry(r.delivery_id).or_default().push(r.row);
    }
    Ok(out)
}

/// Every attempt of a delivery, oldest first.
pub async fn list_attempts(pool: &PgPool, delivery_id: &str) -> Result<Vec<AttemptRow>> {
    Ok(sqlx::query_as(
        "SELECT attempt, worker_id, started_at, finished_at, outcome, provider_status, error, detail
         FROM delivery_attempts WHERE delivery_id = $1 ORDER BY attempt",
    )
    .bind(delivery_id)
    .fetch_all(pool)
    .await?)
}
