//! The worker's side: claim a delivery, record how the attempt ended.
//!
//! Both statements are fenced on the attempt number. A job carries the
//! attempt count it was enqueued for; the claim succeeds only if the
//! delivery is still waiting at that count, and the result is written only
//! if the delivery is still `sending` at the count the claim produced. A
//! duplicate job, or a stale worker waking after its lease, changes nothing.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::Result;

/// What a worker needs to send one delivery, read in the claim itself.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: String,
    pub notification_id: String,
    pub user_id: String,
    pub channel: String,
    pub priority: String,
    /// The attempt this claim started (1 for the first).
    pub attempt: i32,
    pub max_attempts: i32,
    pub category: String,
    pub title: String,
    pub body: String,
    pub data: serde_json::Value,
    pub request_id: Option<String>,
    pub email: Option<String>,
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
    Ok(sqlx::query_as(
        "WITH c AS (
             UPDATE deliveries SET status = 'sending', attempt = attempt + 1,
                 lease_until = now() + make_interval(secs => $3), next_attempt_at = NULL, updated_at = now()
             WHERE id = $1 AND attempt = $2 AND status IN ('queued', 'retrying')
             RETURNING id, notification_id, user_id, channel, priority, attempt, max_attempts
         ), a AS (
             INSERT INTO delivery_attempts (delivery_id, attempt, worker_id, started_at)
             SELECT id, attempt, $4, now() FROM c
             ON CONFLICT (delivery_id, attempt) DO NOTHING
         )
         SELECT c.id, c.notification_id, c.user_id, c.channel, c.priority, c.attempt, c.max_attempts,
                n.category, n.title, n.body, n.data, n.request_id, u.email
         FROM c JOIN notifications n ON n.id = c.notification_id
         LEFT JOIN users u ON u.id = c.user_id",
    )
    .bind(delivery_id)
    .bind(expected_attempt)
    .bind(lease_secs)
    .bind(worker_id)
    .fetch_optional(pool)
    .await?)
}

/// Where an attempt leaves the delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum NextState {
    Sent,
    Delivered,
    Skipped {
        reason: String,
    },
    /// A new attempt at `at`; the caller enqueues its job after this commits.
    Retrying {
        at: DateTime<Utc>,
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
pub struct AttemptResult<'a> {
    pub delivery_id: &'a str,
    pub attempt: i32,
    pub next: NextState,
    /// `sent`, `delivered`, `skipped`, or an error class.
    pub outcome: &'a str,
    pub provider_status: Option<i32>,
    /// Truncated, free of secrets.
    pub error: Option<String>,
    pub detail: Option<serde_json::Value>,
}

/// Longest error text kept per attempt.
pub const MAX_ERROR_CHARS: usize = 1_000;

/// Writes the attempt's row and moves the delivery on, if this attempt
/// still owns it. Returns whether the delivery moved (false: a newer
/// attempt or the sweeper got there first; the attempt row is still
/// completed, because what happened at the provider is history).
pub async fn record_attempt(pool: &PgPool, r: &AttemptResult<'_>) -> Result<bool> {
    let error: Option<String> = r.error.as_ref().map(|e| e.chars().take(MAX_ERROR_CHARS).collect());
    let error_class = match r.outcome {
        "permanent" | "transient" | "rate_limited" | "ambiguous" => Some(r.outcome),
        _ => None,
    };
    let next_at = match &r.next {
        NextState::Retrying { at } => Some(*at),
        _ => None,
    };
    let skip_reason = match &r.next {
        NextState::Skipped { reason } => Some(reason.as_str()),
        _ => None,
    };
    let moved: Option<String> = sqlx::query_scalar(
        "WITH u AS (
             UPDATE deliveries SET status = $3, lease_until = NULL, next_attempt_at = $4, updated_at = now(),
                 skip_reason = COALESCE($5, skip_reason),
                 last_error = COALESCE($6, last_error), last_error_class = COALESCE($7, last_error_class),
                 last_provider_status = COALESCE($8, last_provider_status),
                 sent_at = CASE WHEN $3 IN ('sent', 'delivered') THEN now() ELSE sent_at END,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END,
                 finished_at = CASE WHEN $3 <> 'retrying' THEN now() ELSE NULL END
             WHERE id = $1 AND attempt = $2 AND status = 'sending'
             RETURNING id
         ), a AS (
             UPDATE delivery_attempts SET finished_at = now(), outcome = $9, provider_status = $8,
                 error = $6, detail = $10
             WHERE delivery_id = $1 AND attempt = $2
         )
         SELECT id FROM u",
    )
    .bind(r.delivery_id)
    .bind(r.attempt)
    .bind(r.next.status())
    .bind(next_at)
    .bind(skip_reason)
    .bind(&error)
    .bind(error_class)
    .bind(r.provider_status)
    .bind(r.outcome)
    .bind(&r.detail)
    .fetch_optional(pool)
    .await?;
    Ok(moved.is_some())
}

/// Writes the in-app inbox item for a notification. Idempotent: a retried
/// attempt finds the item already there.
pub async fn insert_inbox_item(pool: &PgPool, notification_id: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO inbox_items (notification_id, user_id, category, title, body, data, created_at)
         SELECT id, user_id, category, title, body, data, created_at FROM notifications WHERE id = $1
         ON CONFLICT (notification_id) DO NOTHING",
    )
    .bind(notification_id)
    .execute(pool)
    .await?;
    Ok(())
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
