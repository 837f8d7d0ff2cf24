//! What operators read: delivery search with filters and a cursor, one
//! delivery with its notification and attempts, per-channel counts, and
//! the purge of old dead letters.
//!
//! Filters are built with a `QueryBuilder`. Values from closed sets
//! (status, channel, error class) are validated enums written as SQL
//! literals, so the planner can match the partial dead-letter indexes;
//! everything else is a bound parameter.

use chrono::{DateTime, Utc};
use herald_core::{Channel, DeliveryStatus, ErrorClass};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::Result;
use crate::deliveries::AttemptRow;
use crate::notifications::NotificationRow;

/// Which deliveries an operator means. Every field narrows; an empty list
/// or `None` means "any". Times are on `created_at` (when the notification
/// was accepted), half-open: `since <= created_at < until`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryFilter {
    #[serde(default, rename = "status", skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<DeliveryStatus>,
    #[serde(default, rename = "channel", skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<Channel>,
    #[serde(default, rename = "error_class", skip_serializing_if = "Vec::is_empty")]
    pub error_classes: Vec<ErrorClass>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// Text in the last error, case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
}

/// The statuses a replay or a purge may touch.
pub const DEAD_LETTER_STATUSES: &[DeliveryStatus] = &[DeliveryStatus::Failed, DeliveryStatus::Dead];

impl DeliveryFilter {
    /// `status IN (…)` defaults to failed and dead when the filter names none.
    #[must_use]
    pub fn dead_letters_by_default(mut self) -> Self {
        if self.statuses.is_empty() {
            self.statuses = DEAD_LETTER_STATUSES.to_vec();
        }
        self
    }
}

/// Escapes `%`, `_` and `\` so the text matches literally inside `ILIKE`.
fn like_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

fn push_literals<'a>(qb: &mut QueryBuilder<'a, Postgres>, column: &str, values: impl Iterator<Item = &'static str>) {
    let values: Vec<&'static str> = values.collect();
    if values.is_empty() {
        return;
    }
    qb.push(format_args!(" AND {column} IN ("));
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            qb.push(", ");
        }
        // Only the wire names of closed enums reach here (see module docs).
        qb.push(format_args!("'{v}'"));
    }
    qb.push(")");
}

/// Appends the filter's conditions (each `AND …`) on deliveries aliased `d`.
pub(crate) fn push_filter<'a>(qb: &mut QueryBuilder<'a, Postgres>, f: &'a DeliveryFilter) {
    push_literals(qb, "d.status", f.statuses.iter().map(|s| s.as_str()));
    push_literals(qb, "d.channel", f.channels.iter().map(|c| c.as_str()));
    push_literals(qb, "d.last_error_class", f.error_classes.iter().map(|c| c.as_str()));
    if let Some(code) = f.provider_status {
        qb.push(" AND d.last_provider_status = ").push_bind(code);
    }
    if let Some(user) = &f.user_id {
        qb.push(" AND d.user_id = ").push_bind(user);
    }
    if let Some(ntf) = &f.notification_id {
        // By primary key (ids follow their notification's: migration …080).
        qb.push(" AND d.id IN (SELECT o.id FROM deliveries_of(")
            .push_bind(ntf)
            .push(") o)");
    }
    if let Some(since) = f.since {
        qb.push(" AND d.created_at >= ").push_bind(since);
    }
    if let Some(until) = f.until {
        qb.push(" AND d.created_at < ").push_bind(until);
    }
    if let Some(q) = &f.q {
        qb.push(" AND d.last_error ILIKE ").push_bind(like_pattern(q));
    }
}

/// A delivery as an operator sees it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AdminDelivery {
    pub id: String,
    pub notification_id: String,
    pub user_id: String,
    pub channel: String,
    pub priority: String,
    pub status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub skip_reason: Option<String>,
    pub last_error: Option<String>,
    pub last_error_class: Option<String>,
    pub last_provider_status: Option<i32>,
    pub ambiguous_attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

const ADMIN_COLUMNS: &str = "d.id, d.notification_id, d.user_id, d.channel, d.priority, d.status, d.attempt, \
     d.max_attempts, d.skip_reason, d.last_error, d.last_error_class, d.last_provider_status, d.ambiguous_attempts, \
     d.next_attempt_at, d.enqueued_at, d.created_at, d.updated_at, d.sent_at, d.delivered_at, d.finished_at";

/// Where a page of search results ends: the sort key of its last row.
/// Opaque to callers (hex of `micros:id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

impl Cursor {
    #[must_use]
    pub fn encode(&self) -> String {
        hex::encode(format!("{}:{}", self.created_at.timestamp_micros(), self.id))
    }

    /// `None` for anything [`Cursor::encode`] did not make.
    #[must_use]
    pub fn decode(s: &str) -> Option<Self> {
        let raw = String::from_utf8(hex::decode(s).ok()?).ok()?;
        let (micros, id) = raw.split_once(':')?;
        let created_at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
        (!id.is_empty() && id.len() <= 64).then(|| Self {
            created_at,
            id: id.to_owned(),
        })
    }
}

/// One page of deliveries matching `filter`, newest first (`created_at`,
/// then id), after `cursor`; and the cursor of the next page, if any.
pub async fn search_deliveries(
    pool: &PgPool,
    filter: &DeliveryFilter,
    cursor: Option<&Cursor>,
    limit: i64,
) -> Result<(Vec<AdminDelivery>, Option<Cursor>)> {
    let mut qb = QueryBuilder::new(format!("SELECT {ADMIN_COLUMNS} FROM deliveries d WHERE true"));
    push_filter(&mut qb, filter);
    if let Some(c) = cursor {
        qb.push(" AND (d.created_at, d.id) < (")
            .push_bind(c.created_at)
            .push(", ")
            .push_bind(&c.id)
            .push(")");
    }
    // One extra row tells whether there is a next page.
    qb.push(" ORDER BY d.created_at DESC, d.id DESC LIMIT ")
        .push_bind(limit + 1);
    let mut rows: Vec<AdminDelivery> = qb.build_query_as().fetch_all(pool).await?;
    let next = if rows.len() as i64 > limit {
        rows.truncate(usize::try_from(limit).unwrap_or(0));
        rows.last().map(|d| Cursor {
            created_at: d.created_at,
            id: d.id.clone(),
        })
    } else {
        None
    };
    Ok((rows, next))
}

/// How many deliveries match `filter`.
pub async fn count_deliveries(pool: &PgPool, filter: &DeliveryFilter) -> Result<i64> {
    let mut qb = QueryBuilder::new("SELECT count(*) FROM deliveries d WHERE true");
    push_filter(&mut qb, filter);
    Ok(qb.build_query_scalar().fetch_one(pool).await?)
}

/// These deliveries (those that exist), newest first.
pub async fn get_deliveries(pool: &PgPool, ids: &[String]) -> Result<Vec<AdminDelivery>> {
    Ok(sqlx::query_as(&format!(
        "SELECT {ADMIN_COLUMNS} FROM deliveries d WHERE d.id = ANY($1) ORDER BY d.created_at DESC, d.id DESC"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// A delivery, its notification and every attempt (oldest first).
pub async fn get_delivery_detail(
    pool: &PgPool,
    id: &str,
) -> Result<Option<(AdminDelivery, NotificationRow, Vec<AttemptRow>)>> {
    let Some(d): Option<AdminDelivery> =
        sqlx::query_as(&format!("SELECT {ADMIN_COLUMNS} FROM deliveries d WHERE d.id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?
    else {
        return Ok(None);
    };
    let n: NotificationRow = sqlx::query_as(
        "SELECT id, user_id, category, priority, title, body, data, request_id, created_at
         FROM notifications WHERE id = $1",
    )
    .bind(&d.notification_id)
    .fetch_one(pool)
    .await?;
    let attempts = crate::deliveries::list_attempts(pool, id).await?;
    Ok(Some((d, n, attempts)))
}

/// Postgres's side of the queue table, per channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChannelCounts {
    pub channel: String,
    pub queued: i64,
    pub sending: i64,
    pub retrying: i64,
    pub failed: i64,
    pub dead: i64,
    /// Deliveries that reached a final state in the last 60 seconds.
    pub finished_last_minute: i64,
}

/// Per-channel counts in one round trip. Each part reads a partial index:
/// waiting deliveries (`deliveries_pending`), dead letters
/// (`deliveries_failed`), and the last minute of `deliveries_finished`.
pub async fn count_by_channel(pool: &PgPool) -> Result<Vec<ChannelCounts>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT channel, status, count(*) FROM deliveries
             WHERE status IN ('queued', 'sending', 'retrying') GROUP BY 1, 2
         UNION ALL
         SELECT channel, status, count(*) FROM deliveries
             WHERE status IN ('failed', 'dead') GROUP BY 1, 2
         UNION ALL
         SELECT channel, 'finished_last_minute', count(*) FROM deliveries
             WHERE finished_at IS NOT NULL AND finished_at > now() - interval '60 seconds' GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    let mut out: Vec<ChannelCounts> = Channel::ALL
        .iter()
        .map(|c| ChannelCounts {
            channel: c.as_str().to_owned(),
            ..ChannelCounts::default()
        })
        .collect();
    for (channel, what, n) in rows {
        let Some(c) = out.iter_mut().find(|c| c.channel == channel) else {
            continue;
        };
        match what.as_str() {
            "queued" => c.queued = n,
            "sending" => c.sending = n,
            "retrying" => c.retrying = n,
            "failed" => c.failed = n,
            "dead" => c.dead = n,
            _ => c.finished_last_minute = n,
        }
    }
    Ok(out)
}

/// An audited purge.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Purge {
    pub id: String,
    pub api_key_id: Option<String>,
    pub api_key_name: Option<String>,
    pub filter: serde_json::Value,
    pub before: DateTime<Utc>,
    pub status: String,
    pub deleted: i64,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Dead letters a purge would delete: matching `filter` (whose statuses
/// the caller restricted to failed/dead) and finished before `before`.
pub async fn count_purgeable(pool: &PgPool, filter: &DeliveryFilter, before: DateTime<Utc>) -> Result<i64> {
    let mut qb = QueryBuilder::new(
        "SELECT count(*) FROM deliveries d WHERE d.status IN ('failed', 'dead') AND d.finished_at < ",
    );
    qb.push_bind(before);
    push_filter(&mut qb, filter);
    Ok(qb.build_query_scalar().fetch_one(pool).await?)
}

/// Writes the audit row of a purge about to run.
pub async fn start_purge(
    pool: &PgPool,
    id: &str,
    api_key: (&str, &str),
    filter: &DeliveryFilter,
    before: DateTime<Utc>,
) -> Result<()> {
    sqlx::query("INSERT INTO purges (id, api_key_id, api_key_name, filter, before) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(api_key.0)
        .bind(api_key.1)
        .bind(sqlx::types::Json(filter))
        .bind(before)
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes up to `batch` matching dead letters (their attempts go with
/// them, by cascade) and counts them on the audit row, in one statement.
/// Returns how many were deleted; fewer than `batch` means done.
pub async fn purge_batch(
    pool: &PgPool,
    purge_id: &str,
    filter: &DeliveryFilter,
    before: DateTime<Utc>,
    batch: i64,
) -> Result<i64> {
    let mut qb = QueryBuilder::new(
        "WITH del AS (
             DELETE FROM deliveries WHERE id IN (
                 SELECT d.id FROM deliveries d WHERE d.status IN ('failed', 'dead') AND d.finished_at < ",
    );
    qb.push_bind(before);
    push_filter(&mut qb, filter);
    qb.push(" LIMIT ").push_bind(batch);
    qb.push(
        ") RETURNING 1
         ), counted AS (
             UPDATE purges SET deleted = deleted + (SELECT count(*) FROM del) WHERE id = ",
    );
    qb.push_bind(purge_id);
    qb.push(") SELECT count(*) FROM del");
    Ok(qb.build_query_scalar().fetch_one(pool).await?)
}

/// Marks a purge done and returns its audit row.
pub async fn finish_purge(pool: &PgPool, id: &str) -> Result<Purge> {
    Ok(sqlx::query_as(
        "UPDATE purges SET status = 'completed', finished_at = now() WHERE id = $1
         RETURNING id, api_key_id, api_key_name, filter, before, status, deleted, created_at, finished_at",
    )
    .bind(id)
    .fetch_one(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: "dlv_01JD0000000000000000000000".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("zz"), None);
        assert_eq!(Cursor::decode(&hex::encode("no-colon")), None);
        assert_eq!(Cursor::decode(&hex::encode("12:")), None);
    }

    #[test]
    fn like_wildcards_in_search_text_match_literally() {
        assert_eq!(like_pattern("50%_off\\"), "%50\\%\\_off\\\\%");
    }

    #[test]
    fn filters_default_to_dead_letters_only_when_no_status_is_named() {
        let f = DeliveryFilter::default().dead_letters_by_default();
        assert_eq!(f.statuses, DEAD_LETTER_STATUSES);
        let f = DeliveryFilter {
            statuses: vec![DeliveryStatus::Dead],
            ..DeliveryFilter::default()
        }
        .dead_letters_by_default();
        assert_eq!(f.statuses, vec![DeliveryStatus::Dead]);
    }
}
