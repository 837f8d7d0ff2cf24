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
        "SELECT {DELIVERY_COLUMNS} FROM deliveries_of($1)
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

/// Where a changes query starts: after every row version with
/// `updated_at < at`, and after those with `updated_at = at` whose key is
/// at most `key` (all of them when `key` is `None`). Keys are
/// `d:<delivery id>` and `i:<notification id>`, compared bytewise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangesFrom {
    pub at: DateTime<Utc>,
    pub key: Option<String>,
}

/// One changed row, as it is now: a delivery (`kind = "delivery"`) or an
/// inbox item (`kind = "inbox_item"`); the other kind's fields are `None`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ChangeRow {
    pub key: String,
    pub kind: String,
    pub updated_at: DateTime<Utc>,
    pub notification_id: String,
    pub delivery_id: Option<String>,
    pub channel: Option<String>,
    pub status: Option<String>,
    pub attempts: Option<i32>,
    pub category: Option<String>,
    pub title: Option<String>,
    pub body: Option<String>,
    pub data: Option<serde_json::Value>,
    pub created_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

/// What one changes query saw.
#[derive(Debug, Clone)]
pub struct ChangesPage {
    /// Oldest change first, ordered by `(updated_at, key)`.
    pub rows: Vec<ChangeRow>,
    /// The database's `now()`: in this one-statement transaction it is read
    /// before the snapshot, so every transaction that started more than the
    /// caller's settle window before it, and took less than that window to
    /// commit, is visible to this query.
    pub db_now: DateTime<Utc>,
    /// Where the query started (`from.at`, or `db_now - window`).
    pub from_at: DateTime<Utc>,
}

/// Rows the user can see that changed after `from` (or, without `from`,
/// in the last `window`); at most `limit`.
///
/// Two index range scans (`deliveries_user_updated`, `inbox_user_updated`),
/// each bounded by `limit`, merged.
pub async fn changes_since(
    pool: &PgPool,
    user_id: &str,
    from: Option<&ChangesFrom>,
    window: std::time::Duration,
    limit: i64,
) -> Result<ChangesPage> {
    #[derive(sqlx::FromRow)]
    struct Row {
        db_now: DateTime<Utc>,
        from_at: DateTime<Utc>,
        key: Option<String>,
        kind: Option<String>,
        updated_at: Option<DateTime<Utc>>,
        notification_id: Option<String>,
        delivery_id: Option<String>,
        channel: Option<String>,
        status: Option<String>,
        attempts: Option<i32>,
        category: Option<String>,
        title: Option<String>,
        body: Option<String>,
        data: Option<serde_json::Value>,
        created_at: Option<DateTime<Utc>>,
        read_at: Option<DateTime<Utc>>,
        archived_at: Option<DateTime<Utc>>,
    }
    // Keys compare in the "C" collation (bytewise, like Rust strings): a
    // linguistic collation ignores `_` and `:` and would disagree with the
    // cursor's own comparisons.
    let rows: Vec<Row> = sqlx::query_as(
        r#"WITH w AS (
                SELECT now() AS db_now, COALESCE($2::TIMESTAMPTZ, now() - make_interval(secs => $4)) AS at
            ), d AS (
                SELECT ('d:' || x.id) COLLATE "C" AS key, 'delivery' AS kind, x.updated_at, x.notification_id,
                       x.id AS delivery_id, x.channel, x.status, x.attempt AS attempts,
                       NULL::TEXT AS category, NULL::TEXT AS title, NULL::TEXT AS body, NULL::JSONB AS data,
                       NULL::TIMESTAMPTZ AS created_at, NULL::TIMESTAMPTZ AS read_at, NULL::TIMESTAMPTZ AS archived_at
                FROM deliveries x, w
                WHERE x.user_id = $1 AND x.updated_at >= w.at
                  AND (x.updated_at > w.at OR ('d:' || x.id) COLLATE "C" > $3::TEXT)
                ORDER BY x.updated_at, x.id COLLATE "C" LIMIT $5
            ), i AS (
                SELECT ('i:' || x.notification_id) COLLATE "C" AS key, 'inbox_item' AS kind, x.updated_at,
                       x.notification_id, NULL::TEXT AS delivery_id, NULL::TEXT AS channel, NULL::TEXT AS status,
                       NULL::INT AS attempts, x.category, x.title, x.body, x.data, x.created_at, x.read_at,
                       x.archived_at
                FROM inbox_items x, w
                WHERE x.user_id = $1 AND x.updated_at >= w.at
                  AND (x.updated_at > w.at OR ('i:' || x.notification_id) COLLATE "C" > $3::TEXT)
                ORDER BY x.updated_at, x.notification_id COLLATE "C" LIMIT $5
            ), c AS (
                SELECT * FROM (SELECT * FROM d UNION ALL SELECT * FROM i) u
                ORDER BY u.updated_at, u.key COLLATE "C" LIMIT $5
            )
            SELECT w.db_now, w.at AS from_at, c.* FROM w LEFT JOIN c ON true ORDER BY c.updated_at, c.key COLLATE "C""#,
    )
    .bind(user_id)
    .bind(from.map(|f| f.at))
    .bind(from.and_then(|f| f.key.as_deref()))
    .bind(window.as_secs_f64())
    .bind(limit.max(1))
    .fetch_all(pool)
    .await?;
    let (db_now, from_at) = rows
        .first()
        .map(|r| (r.db_now, r.from_at))
        .ok_or_else(|| crate::DbError::Other(sqlx::Error::Protocol("a changes query answered no row".to_owned())))?;
    let rows = rows
        .into_iter()
        .filter_map(|r| {
            Some(ChangeRow {
                key: r.key?,
                kind: r.kind?,
                updated_at: r.updated_at?,
                notification_id: r.notification_id?,
                delivery_id: r.delivery_id,
                channel: r.channel,
                status: r.status,
                attempts: r.attempts,
                category: r.category,
                title: r.title,
                body: r.body,
                data: r.data,
                created_at: r.created_at,
                read_at: r.read_at,
                archived_at: r.archived_at,
            })
        })
        .collect();
    Ok(ChangesPage { rows, db_now, from_at })
}
