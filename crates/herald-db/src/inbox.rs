//! The signed-in user's side: their in-app inbox and the status of their
//! notifications. Every statement is scoped by `user_id` in SQL, so one
//! user can never read or change another's rows: a foreign id simply
//! matches nothing.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::Result;
use crate::notifications::{DELIVERY_COLUMNS, DeliveryRow, NotificationRow};

/// One inbox entry as a client sees it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct InboxItem {
    pub notification_id: String,
    pub category: String,
    pub title: String,
    pub body: String,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

/// Where a page starts: just after this item (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub notification_id: String,
}

/// Which items a page holds.
#[derive(Debug, Clone, Default)]
pub struct InboxQuery {
    pub after: Option<Cursor>,
    pub limit: i64,
    pub unread_only: bool,
    pub include_archived: bool,
    pub category: Option<String>,
    /// Words to find in title or body (Postgres full-text search).
    pub text: Option<String>,
}

/// One page of the inbox, newest first, plus whether more follow.
pub async fn list_inbox(pool: &PgPool, user_id: &str, q: &InboxQuery) -> Result<(Vec<InboxItem>, bool)> {
    let limit = q.limit.clamp(1, 100);
    let mut items: Vec<InboxItem> = sqlx::query_as(
        "SELECT notification_id, category, title, body, data, created_at, read_at, archived_at
         FROM inbox_items
         WHERE user_id = $1
           AND ($2::TIMESTAMPTZ IS NULL OR (created_at, notification_id) < ($2, $3))
           AND (NOT $4 OR read_at IS NULL)
           AND ($5 OR archived_at IS NULL)
           AND ($6::TEXT IS NULL OR category = $6)
           AND ($7::TEXT IS NULL OR search @@ plainto_tsquery('simple', $7))
         ORDER BY created_at DESC, notification_id DESC
         LIMIT $8",
    )
    .bind(user_id)
    .bind(q.after.as_ref().map(|c| c.created_at))
    .bind(q.after.as_ref().map(|c| c.notification_id.as_str()))
    .bind(q.unread_only)
    .bind(q.include_archived)
    .bind(q.category.as_deref())
    .bind(q.text.as_deref())
    .bind(limit + 1)
    .fetch_all(pool)
    .await?;
    let more = items.len() as i64 > limit;
    items.truncate(usize::try_from(limit).unwrap_or(100));
    Ok((items, more))
}

/// One of the user's notifications with every delivery, or `None` (also
/// when it belongs to someone else).
pub async fn get_own_notification(
    pool: &PgPool,
    user_id: &str,
    notification_id: &str,
) -> Result<Option<(NotificationRow, Vec<DeliveryRow>, Option<InboxItem>)>> {
    let Some(n): Option<NotificationRow> = sqlx::query_as(
        "SELECT id, user_id, category, priority, title, body, data, request_id, created_at
         FROM notifications WHERE id = $1 AND user_id = $2",
    )
    .bind(notification_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let deliveries: Vec<DeliveryRow> = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE notification_id = $1
         ORDER BY array_position(ARRAY['email','push','in_app'], channel)"
    ))
    .bind(notification_id)
    .fetch_all(pool)
    .await?;
    let item: Option<InboxItem> = sqlx::query_as(
        "SELECT notification_id, category, title, body, data, created_at, read_at, archived_at
         FROM inbox_items WHERE notification_id = $1 AND user_id = $2",
    )
    .bind(notification_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?;
    Ok(Some((n, deliveries, item)))
}

/// A change to one inbox item's read state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Read,
    Unread,
    Archived,
}

/// Applies `mark` to one of the user's items; the item afterwards, or
/// `None` if the user has no such item. Marking twice changes nothing (and
/// keeps the first time).
pub async fn mark_item(pool: &PgPool, user_id: &str, notification_id: &str, mark: Mark) -> Result<Option<InboxItem>> {
    let set = match mark {
        Mark::Read => "read_at = COALESCE(read_at, now())",
        Mark::Unread => "read_at = NULL",
        Mark::Archived => "archived_at = COALESCE(archived_at, now()), read_at = COALESCE(read_at, now())",
    };
    Ok(sqlx::query_as(&format!(
        "UPDATE inbox_items SET {set}, updated_at = now()
         WHERE notification_id = $1 AND user_id = $2
         RETURNING notification_id, category, title, body, data, created_at, read_at, archived_at"
    ))
    .bind(notification_id)
    .bind(user_id)
    .fetch_optional(pool)
    .await?)
}

/// Marks every unread item read; returns how many changed.
pub async fn mark_all_read(pool: &PgPool, user_id: &str) -> Result<u64> {
    let done = sqlx::query(
        "UPDATE inbox_items SET read_at = now(), updated_at = now() WHERE user_id = $1 AND read_at IS NULL",
    )
    .bind(user_id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Counts over the user's inbox (archived items excluded).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, sqlx::FromRow)]
pub struct Stats {
    pub total: i64,
    pub unread: i64,
    pub read: i64,
}

pub async fn stats(pool: &PgPool, user_id: &str) -> Result<Stats> {
    Ok(sqlx::query_as(
        "SELECT count(*) AS total, count(*) FILTER (WHERE read_at IS NULL) AS unread,
                count(*) FILTER (WHERE read_at IS NOT NULL) AS read
         FROM inbox_items WHERE user_id = $1 AND archived_at IS NULL",
    )
    .bind(user_id)
    .fetch_one(pool)
    .await?)
}

/// When anything a user can see last changed: a new or re-read inbox item,
/// a delivery status change. Two index-only lookups, so a poll that finds
/// nothing new costs almost nothing; the API derives ETags from it.
pub async fn last_change(pool: &PgPool, user_id: &str) -> Result<(Option<DateTime<Utc>>, Option<DateTime<Utc>>)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT max(updated_at) FROM deliveries WHERE user_id = $1),
                (SELECT max(updated_at) FROM inbox_items WHERE user_id = $1)",
    )
    .bind(user_id)
    .fetch_one(pool)
    .await?)
}
