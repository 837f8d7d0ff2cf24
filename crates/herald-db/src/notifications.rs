//! Accepting notifications: one transaction writes the notification and
//! one delivery per channel; reading them back with every delivery's state.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use crate::Result;

/// A notification about to be accepted.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub id: String,
    pub api_key_id: Option<String>,
    pub user_id: String,
    pub category: String,
    pub priority: &'static str,
    pub title: String,
    pub body: String,
    pub data: serde_json::Value,
    pub request_id: Option<String>,
}

/// One channel's delivery, decided at accept time: `queued`, or `skipped`
/// with the reason the user cannot receive on that channel.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub channel: &'static str,
    pub skip_reason: Option<String>,
    pub max_attempts: i32,
}

/// Writes the notification and its deliveries in the caller's transaction:
/// the caller commits before answering, so a 2xx means all of it is stored.
pub async fn insert_notification(
    tx: &mut Transaction<'_, Postgres>,
    n: &NewNotification,
    deliveries: &[NewDelivery],
) -> Result<DateTime<Utc>> {
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO notifications (id, api_key_id, user_id, category, priority, title, body, data, request_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING created_at",
    )
    .bind(&n.id)
    .bind(&n.api_key_id)
    .bind(&n.user_id)
    .bind(&n.category)
    .bind(n.priority)
    .bind(&n.title)
    .bind(&n.body)
    .bind(&n.data)
    .bind(&n.request_id)
    .fetch_one(&mut **tx)
    .await?;

    let ids: Vec<&str> = deliveries.iter().map(|d| d.id.as_str()).collect();
    let channels: Vec<&str> = deliveries.iter().map(|d| d.channel).collect();
    let reasons: Vec<Option<&str>> = deliveries.iter().map(|d| d.skip_reason.as_deref()).collect();
    let max_attempts: Vec<i32> = deliveries.iter().map(|d| d.max_attempts).collect();
    sqlx::query(
        "INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, skip_reason,
                                 max_attempts, finished_at)
         SELECT d.id, $1, $2, d.channel, $3,
                CASE WHEN d.reason IS NULL THEN 'queued' ELSE 'skipped' END, d.reason, d.max_attempts,
                CASE WHEN d.reason IS NULL THEN NULL ELSE now() END
         FROM UNNEST($4::TEXT[], $5::TEXT[], $6::TEXT[], $7::INT[]) AS d (id, channel, reason, max_attempts)",
    )
    .bind(&n.id)
    .bind(&n.user_id)
    .bind(n.priority)
    .bind(&ids)
    .bind(&channels)
    .bind(&reasons)
    .bind(&max_attempts)
    .execute(&mut **tx)
    .await?;
    Ok(created_at)
}

/// Records that jobs for these `(delivery, attempt)` pairs were pushed to
/// Redis, so the sweeper knows they are not owed one. Only a delivery still
/// waiting at that attempt is marked: a late mark must not hide a newer
/// state that is owed its own job.
pub async fn mark_enqueued(pool: &PgPool, jobs: &[(String, i32)]) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = jobs.iter().map(|(id, _)| id.as_str()).collect();
    let attempts: Vec<i32> = jobs.iter().map(|(_, a)| *a).collect();
    sqlx::query(
        "UPDATE deliveries d SET enqueued_at = clock_timestamp()
         FROM UNNEST($1::TEXT[], $2::INT[]) AS j (id, attempt)
         WHERE d.id = j.id AND d.attempt = j.attempt AND d.status IN ('queued', 'retrying')",
    )
    .bind(&ids)
    .bind(&attempts)
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct NotificationRow {
    pub id: String,
    pub user_id: String,
    pub category: String,
    pub priority: String,
    pub title: String,
    pub body: String,
    pub data: serde_json::Value,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub notification_id: String,
    pub channel: String,
    pub status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub skip_reason: Option<String>,
    pub last_error: Option<String>,
    pub last_error_class: Option<String>,
    pub last_provider_status: Option<i32>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub const DELIVERY_COLUMNS: &str = "id, notification_id, channel, status, attempt, max_attempts, skip_reason, \
     last_error, last_error_class, last_provider_status, next_attempt_at, created_at, updated_at, sent_at, \
     delivered_at, finished_at";

/// A notification and its deliveries (in channel order), or `None`.
pub async fn get_notification(pool: &PgPool, id: &str) -> Result<Option<(NotificationRow, Vec<DeliveryRow>)>> {
    let Some(n): Option<NotificationRow> = sqlx::query_as(
        "SELECT id, user_id, category, priority, title, body, data, request_id, created_at
         FROM notifications WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let deliveries: Vec<DeliveryRow> = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE notification_id = $1
         ORDER BY array_position(ARRAY['email','push','in_app'], channel)"
    ))
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(Some((n, deliveries)))
}

/// Whether the user has any item in the inbox for this notification.
pub async fn inbox_item_exists(pool: &PgPool, notification_id: &str) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM inbox_items WHERE notification_id = $1)")
            .bind(notification_id)
            .fetch_one(pool)
            .await?,
    )
}

/// What an `Idempotency-Key` says about a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Idempotency {
    /// First use of the key: go ahead, then [`store_idempotent_response`]
    /// in the same transaction.
    Fresh,
    /// The same request was already accepted: answer this again.
    Replay { status: u16, response: serde_json::Value },
    /// The key was used for a different request.
    Mismatch,
}

/// Reserves an idempotency key in the caller's transaction. A concurrent
/// request with the same key waits on the unique index until this
/// transaction ends, then sees its stored response: two requests in flight
/// can never both create a notification.
pub async fn claim_idempotency_key(
    tx: &mut Transaction<'_, Postgres>,
    api_key_id: &str,
    key: &str,
    request_hash: &[u8],
) -> Result<Idempotency> {
    let inserted: Option<bool> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (api_key_id, key, request_hash, status_code, response)
         VALUES ($1, $2, $3, 0, 'null'::JSONB) ON CONFLICT (api_key_id, key) DO NOTHING RETURNING true",
    )
    .bind(api_key_id)
    .bind(key)
    .bind(request_hash)
    .fetch_optional(&mut **tx)
    .await?;
    if inserted.is_some() {
        return Ok(Idempotency::Fresh);
    }
    let (hash, status, response): (Vec<u8>, i32, serde_json::Value) = sqlx::query_as(
        "SELECT request_hash, status_code, response FROM idempotency_keys WHERE api_key_id = $1 AND key = $2",
    )
    .bind(api_key_id)
    .bind(key)
    .fetch_one(&mut **tx)
    .await?;
    if hash != request_hash {
        return Ok(Idempotency::Mismatch);
    }
    Ok(Idempotency::Replay {
        status: u16::try_from(status).unwrap_or(200),
        response,
    })
}

/// Stores the response for a key reserved by [`claim_idempotency_key`].
pub async fn store_idempotent_response(
    tx: &mut Transaction<'_, Postgres>,
    api_key_id: &str,
    key: &str,
    status: u16,
    response: &serde_json::Value,
) -> Result<()> {
    sqlx::query("UPDATE idempotency_keys SET status_code = $3, response = $4 WHERE api_key_id = $1 AND key = $2")
        .bind(api_key_id)
        .bind(key)
        .bind(i32::from(status))
        .bind(response)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Forgets idempotency keys older than `hours` (the sweeper calls this).
pub async fn expire_idempotency_keys(pool: &PgPool, hours: i32) -> Result<u64> {
    let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)")
        .bind(hours)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
