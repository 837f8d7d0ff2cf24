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

/// One channel a notification asks for, with the id its delivery gets.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub channel: &'static str,
    pub max_attempts: i32,
    /// Named by the caller. A channel that was not (the caller omitted
    /// `channels`) is dropped when the user cannot receive on it, instead of
    /// being recorded `skipped`.
    pub requested: bool,
}

/// A notification with the deliveries it asks for.
#[derive(Debug, Clone)]
pub struct NewNotificationWithDeliveries {
    pub notification: NewNotification,
    pub deliveries: Vec<NewDelivery>,
}

/// A delivery as accepted: `queued`, or `skipped` with the reason.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AcceptedDelivery {
    pub id: String,
    pub notification_id: String,
    pub channel: String,
    pub status: String,
    pub skip_reason: Option<String>,
}

/// What accepting a batch wrote, per notification (in input order).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub created_at: DateTime<Utc>,
    pub deliveries: Vec<AcceptedDelivery>,
}

/// What [`insert_notifications`] wrote.
#[derive(Debug, Clone)]
pub struct Inserted {
    /// Per notification, in input order.
    pub accepted: Vec<Accepted>,
    /// The batch's push intent, when any delivery is queued: once its jobs
    /// are in Redis, pass it to [`confirm_pushes`]. Left alone, the sweeper
    /// treats the batch's waiting deliveries as owed a job after its grace
    /// period (`herald_db::sweep`).
    pub push_intent: Option<i64>,
}

/// The statement [`insert_notifications`] runs (public so the tests can
/// check its plan). `$1`–`$9` are the notifications' columns, `$10`–`$16`
/// the deliveries' (each with its notification's user and priority).
///
/// It is shaped to have one good plan for every batch size and table size,
/// so the ingest pool can plan it once ([`connect_lazy_planned_once`](crate::connect_lazy_planned_once)):
/// nothing joins one batch-sized set to another (a generic plan cannot
/// know their sizes and may nested-loop a full batch over another); each
/// delivery looks up only what its channel needs, by
/// index: the user's email address for email, one active device for push,
/// nothing for in-app.
pub const ACCEPT_SQL: &str = "WITH n AS (
         INSERT INTO notifications (id, api_key_id, user_id, category, priority, title, body, data, request_id)
         SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                              $7::TEXT[], $8::JSONB[], $9::TEXT[])
     ), wanted AS (
         SELECT w.id, w.notification_id, w.user_id, w.channel, w.priority, w.max_attempts, w.requested,
                CASE w.channel
                    WHEN 'email' THEN
                        -- NULL when the user is unknown.
                        CASE (SELECT u.email IS NOT NULL FROM users u WHERE u.id = w.user_id)
                            WHEN true THEN NULL
                            WHEN false THEN 'user has no email address'
                            ELSE 'unknown user: no email address on record'
                        END
                    WHEN 'push' THEN
                        CASE WHEN (SELECT 1 FROM devices v WHERE v.user_id = w.user_id AND v.disabled_at IS NULL
                                   LIMIT 1) IS NULL
                            THEN 'user has no active push device'
                        END
                END AS reason
         FROM UNNEST($10::TEXT[], $11::TEXT[], $12::TEXT[], $13::TEXT[], $14::TEXT[], $15::INT[], $16::BOOL[])
                  AS w (id, notification_id, user_id, channel, priority, max_attempts, requested)
     ), d AS (
         INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, skip_reason,
                                 max_attempts, finished_at, enqueued_at)
         SELECT id, notification_id, user_id, channel, priority,
                CASE WHEN reason IS NULL THEN 'queued' ELSE 'skipped' END, reason, max_attempts,
                CASE WHEN reason IS NULL THEN NULL ELSE now() END,
                CASE WHEN reason IS NULL THEN now() END
         FROM wanted WHERE requested OR reason IS NULL
         RETURNING id, status, skip_reason
     ), intent AS (
         INSERT INTO push_intents (batch_at)
         SELECT now() WHERE EXISTS (SELECT 1 FROM d WHERE status = 'queued')
         RETURNING id
     )
     SELECT now() AS created_at, (SELECT id FROM intent) AS intent, NULL::TEXT AS d_id,
            NULL::TEXT AS reason, false AS dropped
     UNION ALL
     SELECT NULL, NULL, d.id, d.skip_reason, false FROM d WHERE d.status = 'skipped'
     UNION ALL
     SELECT NULL, NULL, w.id, NULL, true FROM wanted w WHERE NOT (w.requested OR w.reason IS NULL)";

/// Writes many notifications and their deliveries in ONE statement (one
/// round trip, atomic on its own or inside the caller's transaction), so
/// concurrent requests can share a commit. Whether a user can receive on a
/// channel (an email address; an active device) is decided in the same
/// statement, from the same snapshot as the insert.
///
/// Queued deliveries are written already marked enqueued, and the batch
/// gets a push intent (`push_intents`, keyed by the transaction's time,
/// which is every delivery's `updated_at`): the caller pushes the jobs after
/// the commit and then confirms the intent: marking each delivery after the
/// push would rewrite every row a second time.
pub async fn insert_notifications<'e, E>(executor: E, batch: &[NewNotificationWithDeliveries]) -> Result<Inserted>
where
    E: sqlx::PgExecutor<'e>,
{
    if batch.is_empty() {
        return Ok(Inserted {
            accepted: Vec::new(),
            push_intent: None,
        });
    }
    let col = |f: fn(&NewNotification) -> Option<&str>| -> Vec<Option<&str>> {
        batch.iter().map(|b| f(&b.notification)).collect()
    };
    let ids = col(|n| Some(n.id.as_str()));
    let keys = col(|n| n.api_key_id.as_deref());
    let users = col(|n| Some(n.user_id.as_str()));
    let categories = col(|n| Some(n.category.as_str()));
    let priorities = col(|n| Some(n.priority));
    let titles = col(|n| Some(n.title.as_str()));
    let bodies = col(|n| Some(n.body.as_str()));
    let request_ids = col(|n| n.request_id.as_deref());
    let data: Vec<&serde_json::Value> = batch.iter().map(|b| &b.notification.data).collect();
    let deliveries = batch
        .iter()
        .flat_map(|b| b.deliveries.iter().map(move |d| (&b.notification, d)));
    let (mut d_ids, mut d_ntf, mut d_user, mut d_channel, mut d_priority, mut d_max, mut d_req) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (n, d) in deliveries {
        d_ids.push(d.id.as_str());
        d_ntf.push(n.id.as_str());
        d_user.push(n.user_id.as_str());
        d_channel.push(d.channel);
        d_priority.push(n.priority);
        d_max.push(d.max_attempts);
        d_req.push(d.requested);
    }
    /// One row for the batch (`created_at`, `intent`), then one per
    /// delivery that is not simply queued: recorded `skipped` (with its
    /// reason), or `dropped` (not requested, and the user cannot receive on
    /// that channel). Every other delivery is queued, so it costs no row.
    #[derive(sqlx::FromRow)]
    struct Row {
        created_at: Option<DateTime<Utc>>,
        intent: Option<i64>,
        d_id: Option<String>,
        reason: Option<String>,
        dropped: bool,
    }
    let rows: Vec<Row> = sqlx::query_as(ACCEPT_SQL)
        .bind(&ids)
        .bind(&keys)
        .bind(&users)
        .bind(&categories)
        .bind(&priorities)
        .bind(&titles)
        .bind(&bodies)
        .bind(&data)
        .bind(&request_ids)
        .bind(&d_ids)
        .bind(&d_ntf)
        .bind(&d_user)
        .bind(&d_channel)
        .bind(&d_priority)
        .bind(&d_max)
        .bind(&d_req)
        .fetch_all(executor)
        .await?;
    // Every notification's `created_at` is the transaction's `now()`.
    let mut created_at = DateTime::<Utc>::MIN_UTC;
    let mut push_intent = None;
    let mut not_queued: std::collections::HashMap<String, Option<String>> = std::collections::HashMap::new();
    for row in rows {
        match row {
            Row {
                created_at: Some(at),
                intent,
                ..
            } => {
                created_at = at;
                push_intent = intent;
            }
            Row {
                d_id: Some(id),
                reason,
                dropped,
                ..
            } => {
                // A dropped delivery has no row, and no reason either.
                not_queued.insert(
                    id,
                    if dropped {
                        None
                    } else {
                        Some(reason.unwrap_or_default())
                    },
                );
            }
            _ => {}
        }
    }
    // In the caller's channel order.
    let accepted = batch
        .iter()
        .map(|b| Accepted {
            created_at,
            deliveries: b
                .deliveries
                .iter()
                .filter_map(|d| {
                    let (status, skip_reason) = match not_queued.remove(&d.id) {
                        None => ("queued", None),
                        Some(Some(reason)) => ("skipped", Some(reason)),
                        Some(None) => return None,
                    };
                    Some(AcceptedDelivery {
                        id: d.id.clone(),
                        notification_id: b.notification.id.clone(),
                        channel: d.channel.to_owned(),
                        status: status.to_owned(),
                        skip_reason,
                    })
                })
                .collect(),
        })
        .collect();
    Ok(Inserted { accepted, push_intent })
}

/// How long a push confirmation waits for others before it is written.
/// A confirmation only keeps the sweeper (after its 2 s grace) from pushing
/// a duplicate job, so it can wait: one commit then confirms every batch of
/// the last tenth of a second, instead of nearly one commit per batch, each
/// with its own WAL flush beside the accept statements', which slows
/// ingest (docs/performance.md).
pub const CONFIRM_LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// The jobs of these batches are in Redis: their push intents are done.
pub async fn confirm_pushes<'e, E: sqlx::PgExecutor<'e>>(executor: E, intents: &[i64]) -> Result<()> {
    if intents.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM push_intents WHERE id = ANY($1)")
        .bind(intents)
        .execute(executor)
        .await?;
    Ok(())
}

/// Records that jobs for these `(delivery, attempt)` pairs were pushed to
/// Redis, so the sweeper knows they are not owed one. Only a delivery still
/// waiting at that attempt is marked: a late mark must not hide a newer
/// state that is owed its own job.
pub async fn mark_enqueued(pool: &PgPool, jobs: &[(String, i32)]) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let (ids, attempts) = crate::deliveries::in_lock_order(jobs);
    // By primary key only, like the worker's statements (see
    // `herald_db::deliveries`).
    sqlx::query(
        "UPDATE deliveries d SET enqueued_at = clock_timestamp()
         FROM UNNEST($1::TEXT[], $2::INT[]) AS j (id, attempt)
         WHERE d.id = j.id AND d.attempt = j.attempt AND (d.status || '') IN ('queued', 'retrying')",
    )
    .bind(&ids)
    .bind(&attempts)
    // Planned with the real values on every call: a cached generic plan,
    // built before a mass status change, can scan the whole table.
    .persistent(false)
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
        "SELECT {DELIVERY_COLUMNS} FROM deliveries_of($1)
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
