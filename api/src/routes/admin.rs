//! The operators' API (`/v1/admin/…`, keys with the `admin` scope): queue
//! depths, delivery search, one delivery with its attempts, replays of
//! failed and dead deliveries, and purges of old dead letters.
//!
//! Replays run in the background, in the worker processes
//! (`herald_workers::replayer`); this module validates, audits and snapshots
//! what a replay covers (`herald_db::replays`). Filters are parsed here, in
//! one place, for the query string of the search and the JSON `filter` of
//! replays and purges alike: a bad value is a 400 `invalid_filter` naming
//! the field.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use herald_core::validate::check_text;
use herald_core::{Channel, DeliveryId, DeliveryStatus, ErrorClass, NotificationId, PurgeId, ReplayId, UserId};
use herald_db::admin::{AdminDelivery, Cursor, DEAD_LETTER_STATUSES, DeliveryFilter};
use herald_db::replays::{NewReplay, ReplayTarget};
use herald_queue::QueueName;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{AdminCaller, ApiJson};
use crate::routes::notifications::truncate;

/// Longest error text search.
const MAX_Q_CHARS: usize = 200;
/// Most ids one replay may list (use a filter for more).
const MAX_REPLAY_IDS: usize = 10_000;
/// Deliveries shown in a dry run's sample.
const DRY_RUN_SAMPLE: i64 = 10;
/// Deliveries deleted per statement by a purge.
const PURGE_BATCH: i64 = 5_000;
/// Skipped deliveries listed with a replay's progress.
const SKIPPED_LISTED: i64 = 100;

const FILTER_FIELDS: &[&str] = &[
    "status",
    "channel",
    "error_class",
    "provider_status",
    "user_id",
    "notification_id",
    "since",
    "until",
    "q",
];

/// Parses filter fields from name/value pairs (a query string, or a JSON
/// `filter` flattened). Names in `extra` are returned untouched; any other
/// unknown name is an error.
fn parse_filter(pairs: Vec<(String, String)>, extra: &[&str]) -> ApiResult<(DeliveryFilter, BTreeMap<String, String>)> {
    let mut f = DeliveryFilter::default();
    let mut rest = BTreeMap::new();
    let single = |seen: &mut BTreeMap<String, ()>, name: &str| -> ApiResult<()> {
        if seen.insert(name.to_owned(), ()).is_some() {
            return Err(ApiError::invalid_filter(name, "give it once"));
        }
        Ok(())
    };
    let mut seen = BTreeMap::new();
    for (name, value) in pairs {
        let value = value.trim().to_owned();
        match name.as_str() {
            "status" => {
                for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    let s: DeliveryStatus = v.parse().map_err(|_| {
                        ApiError::invalid_filter(
                            "status",
                            format!(
                                "unknown status `{}`: expected one of {}",
                                truncate(v),
                                DeliveryStatus::ALL
                                    .iter()
                                    .map(|s| s.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        )
                    })?;
                    if !f.statuses.contains(&s) {
                        f.statuses.push(s);
                    }
                }
            }
            "channel" => {
                for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    let c: Channel = v
                        .parse()
                        .map_err(|e: herald_core::UnknownValue| ApiError::invalid_filter("channel", e.to_string()))?;
                    if !f.channels.contains(&c) {
                        f.channels.push(c);
                    }
                }
            }
            "error_class" => {
                for v in value.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                    let c = ErrorClass::ALL
                        .iter()
                        .copied()
                        .find(|c| c.as_str() == v)
                        .ok_or_else(|| {
                            ApiError::invalid_filter(
                                "error_class",
                                format!(
                                    "unknown error class `{}`: expected one of {}",
                                    truncate(v),
                                    ErrorClass::ALL
                                        .iter()
                                        .map(|c| c.as_str())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            )
                        })?;
                    if !f.error_classes.contains(&c) {
                        f.error_classes.push(c);
                    }
                }
            }
            "provider_status" => {
                single(&mut seen, "provider_status")?;
                f.provider_status = Some(value.parse::<i32>().ok().filter(|n| (0..=999).contains(n)).ok_or_else(
                    || {
                        ApiError::invalid_filter(
                            "provider_status",
                            format!(
                                "`{}` is not a provider status code (a number from 0 to 999, e.g. 550)",
                                truncate(&value)
                            ),
                        )
                    },
                )?);
            }
            "user_id" => {
                single(&mut seen, "user_id")?;
                let u = UserId::parse(&value).map_err(|e| ApiError::invalid_filter("user_id", e.message))?;
                f.user_id = Some(u.to_string());
            }
            "notification_id" => {
                single(&mut seen, "notification_id")?;
                let n: NotificationId = value.parse().map_err(|e: herald_core::ParseIdError| {
                    ApiError::invalid_filter("notification_id", e.to_string())
                })?;
                f.notification_id = Some(n.to_string());
            }
            "since" | "until" => {
                let field = if name == "since" { "since" } else { "until" };
                single(&mut seen, field)?;
                let t = parse_time(field, &value)?;
                if field == "since" {
                    f.since = Some(t);
                } else {
                    f.until = Some(t);
                }
            }
            "q" => {
                single(&mut seen, "q")?;
                if value.is_empty() {
                    return Err(ApiError::invalid_filter(
                        "q",
                        "must not be empty; omit it to match any error",
                    ));
                }
                check_text("q", &value, MAX_Q_CHARS, false).map_err(|e| ApiError::invalid_filter("q", e.message))?;
                f.q = Some(value);
            }
            other if extra.contains(&other) => {
                single(&mut seen, other)?;
                rest.insert(other.to_owned(), value);
            }
            other => {
                let mut known: Vec<&str> = FILTER_FIELDS.to_vec();
                known.extend_from_slice(extra);
                return Err(ApiError::invalid_filter(
                    &truncate(other),
                    format!("unknown filter; expected one of {}", known.join(", ")),
                ));
            }
        }
    }
    if let (Some(since), Some(until)) = (f.since, f.until)
        && since >= until
    {
        return Err(ApiError::invalid_filter("until", "must be later than `since`"));
    }
    Ok((f, rest))
}

fn parse_time(field: &str, value: &str) -> ApiResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            ApiError::invalid_filter(
                field,
                format!(
                    "`{}` is not an RFC 3339 time (e.g. 2026-11-22T09:30:00Z)",
                    truncate(value)
                ),
            )
        })
}

/// Flattens a JSON `filter` object into the pairs [`parse_filter`] reads.
fn json_filter_pairs(filter: serde_json::Map<String, serde_json::Value>) -> ApiResult<Vec<(String, String)>> {
    use serde_json::Value;
    let mut pairs = Vec::new();
    for (k, v) in filter {
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        match &v {
            Value::Null => {}
            Value::Array(items) => {
                for item in items {
                    let s = scalar(item).ok_or_else(|| {
                        ApiError::invalid_filter(&truncate(&k), "list items must be strings or numbers")
                    })?;
                    pairs.push((k.clone(), s));
                }
            }
            other => {
                let s = scalar(other).ok_or_else(|| {
                    ApiError::invalid_filter(&truncate(&k), "must be a string, a number or a list of them")
                })?;
                pairs.push((k, s));
            }
        }
    }
    Ok(pairs)
}

/// Replays and purges touch only failed and dead deliveries.
fn dead_letters_only(mut f: DeliveryFilter, what: &str) -> ApiResult<DeliveryFilter> {
    if let Some(bad) = f.statuses.iter().find(|s| !DEAD_LETTER_STATUSES.contains(s)) {
        return Err(ApiError::invalid_filter(
            "status",
            format!("a {what} only touches failed or dead deliveries, not `{bad}`"),
        ));
    }
    f = f.dead_letters_by_default();
    Ok(f)
}

// ---------------------------------------------------------------- views

/// A delivery as operators see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AdminDeliveryView {
    #[schema(example = "dlv_01JD0000000000000000000000")]
    pub id: String,
    pub notification_id: String,
    pub user_id: String,
    pub channel: String,
    pub priority: String,
    /// queued, sending, retrying, sent, delivered, failed, dead, cancelled, skipped
    pub status: String,
    /// Attempts started so far.
    pub attempts: i32,
    pub max_attempts: i32,
    pub skip_reason: Option<String>,
    pub last_error: Option<String>,
    /// permanent, transient, rate_limited, ambiguous
    pub last_error_class: Option<String>,
    /// The provider's last status code (SMTP reply code, HTTP status).
    pub last_provider_status: Option<i32>,
    /// Attempts whose outcome could not be recorded: possible duplicates.
    pub ambiguous_attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<AdminDelivery> for AdminDeliveryView {
    fn from(d: AdminDelivery) -> Self {
        Self {
            id: d.id,
            notification_id: d.notification_id,
            user_id: d.user_id,
            channel: d.channel,
            priority: d.priority,
            status: d.status,
            attempts: d.attempt,
            max_attempts: d.max_attempts,
            skip_reason: d.skip_reason,
            last_error: d.last_error,
            last_error_class: d.last_error_class,
            last_provider_status: d.last_provider_status,
            ambiguous_attempts: d.ambiguous_attempts,
            next_attempt_at: d.next_attempt_at,
            enqueued_at: d.enqueued_at,
            created_at: d.created_at,
            updated_at: d.updated_at,
            sent_at: d.sent_at,
            delivered_at: d.delivered_at,
            finished_at: d.finished_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    /// `channel:priority`
    #[schema(example = "email:high")]
    pub queue: String,
    pub channel: String,
    pub priority: String,
    /// Jobs waiting to be fetched.
    pub ready: u64,
    /// Delayed jobs (retries not due yet).
    pub scheduled: u64,
    /// Fetched by a worker, not yet acknowledged.
    pub in_flight: u64,
    /// Jobs the queue gave up on (unparseable or handed back too often).
    pub dead: u64,
    /// How long the next job out has been waiting, in milliseconds.
    pub oldest_ready_age_ms: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelView {
    pub channel: String,
    /// Deliveries in Postgres by status.
    pub queued: i64,
    pub sending: i64,
    pub retrying: i64,
    pub failed: i64,
    pub dead: i64,
    /// Deliveries that reached a final state in the last 60 seconds.
    pub per_minute: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueuesView {
    /// Redis's side, per channel × priority (empty when Redis is unreachable).
    pub queues: Vec<QueueView>,
    /// Postgres's side, per channel.
    pub channels: Vec<ChannelView>,
    /// `ok`, or why Redis could not be read.
    pub redis: String,
    pub at: DateTime<Utc>,
}

/// Queue depths and ages, and delivery counts and throughput per channel.
///
/// Cheap enough to poll every few seconds: four Redis commands per queue
/// (pipelined) and one Postgres round trip over partial indexes.
#[utoipa::path(
    get, path = "/v1/admin/queues", tag = "admin",
    responses(
        (status = 200, description = "The queue table", body = QueuesView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_queues(State(state): State<AppState>, _caller: AdminCaller) -> ApiResult<Json<QueuesView>> {
    let names = QueueName::all();
    let (redis, pg) = tokio::join!(
        futures_join_counts(&state, &names),
        herald_db::admin::count_by_channel(&state.pool)
    );
    let (queues, redis) = match redis {
        Ok(q) => (q, "ok".to_owned()),
        Err(e) => (Vec::new(), e.to_string()),
    };
    Ok(Json(QueuesView {
        queues,
        channels: pg?
            .into_iter()
            .map(|c| ChannelView {
                channel: c.channel,
                queued: c.queued,
                sending: c.sending,
                retrying: c.retrying,
                failed: c.failed,
                dead: c.dead,
                per_minute: c.finished_last_minute,
            })
            .collect(),
        redis,
        at: Utc::now(),
    }))
}

async fn futures_join_counts(
    state: &AppState,
    names: &[QueueName],
) -> Result<Vec<QueueView>, herald_queue::QueueError> {
    let mut set = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let (queue, name) = (state.queue.clone(), *name);
        set.spawn(async move { (i, name, queue.counts(name).await) });
    }
    let mut out: Vec<(usize, QueueView)> = Vec::with_capacity(names.len());
    while let Some(joined) = set.join_next().await {
        let Ok((i, name, counts)) = joined else {
            continue;
        };
        let c = counts?;
        out.push((
            i,
            QueueView {
                queue: name.to_string(),
                channel: name.channel.as_str().to_owned(),
                priority: name.priority.as_str().to_owned(),
                ready: c.ready,
                scheduled: c.scheduled,
                in_flight: c.in_flight,
                dead: c.dead,
                oldest_ready_age_ms: c.oldest_ready_age_ms,
            },
        ));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, v)| v).collect())
}

/// Search parameters (all optional; each narrows). `status`, `channel` and
/// `error_class` take several values, comma-separated or repeated.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documents the query string; parsing is `parse_filter`
pub struct SearchParams {
    /// e.g. `failed,dead`
    status: Option<String>,
    /// email, push, in_app
    channel: Option<String>,
    /// permanent, transient, rate_limited, ambiguous
    error_class: Option<String>,
    /// The provider's last status code, e.g. 550.
    provider_status: Option<i32>,
    user_id: Option<String>,
    /// `ntf_…`
    notification_id: Option<String>,
    /// RFC 3339; on `created_at` (when the notification was accepted), inclusive.
    since: Option<String>,
    /// RFC 3339; on `created_at`, exclusive.
    until: Option<String>,
    /// Text in the last error, case-insensitive.
    q: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// 1 to 200 (default 50).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    pub deliveries: Vec<AdminDeliveryView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Search deliveries, newest first (by `created_at`).
#[utoipa::path(
    get, path = "/v1/admin/deliveries", tag = "admin",
    params(SearchParams),
    responses(
        (status = 200, description = "One page of deliveries", body = DeliveryPage),
        (status = 400, description = "A filter has a bad value (`invalid_filter`, `details.field`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn search_deliveries(
    State(state): State<AppState>,
    _caller: AdminCaller,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<DeliveryPage>> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let (filter, rest) = parse_filter(pairs, &["cursor", "limit"])?;
    let limit = match rest.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=200).contains(n))
            .ok_or_else(|| ApiError::invalid_filter("limit", "must be a number from 1 to 200"))?,
    };
    let cursor = match rest.get("cursor") {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
            ApiError::invalid_filter(
                "cursor",
                "is not a cursor this API gave out; pass `next_cursor` unchanged",
            )
        })?),
    };
    let (rows, next) = herald_db::admin::search_deliveries(&state.pool, &filter, cursor.as_ref(), limit).await?;
    Ok(Json(DeliveryPage {
        deliveries: rows.into_iter().map(Into::into).collect(),
        next_cursor: next.map(|c| c.encode()),
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminNotificationView {
    pub id: String,
    pub user_id: String,
    pub category: String,
    pub priority: String,
    pub title: String,
    pub body: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminAttemptView {
    pub attempt: i32,
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// sent, delivered, skipped, permanent, transient, rate_limited, ambiguous, lease_expired
    pub outcome: Option<String>,
    pub provider_status: Option<i32>,
    pub error: Option<String>,
    /// Provider detail, e.g. per-device results of a push.
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryDetailView {
    pub delivery: AdminDeliveryView,
    pub notification: AdminNotificationView,
    /// Every attempt, oldest first.
    pub attempts: Vec<AdminAttemptView>,
}

/// One delivery, its notification and every attempt.
#[utoipa::path(
    get, path = "/v1/admin/deliveries/{id}", tag = "admin",
    params(("id" = String, Path, description = "Delivery id (`dlv_…`)")),
    responses(
        (status = 200, description = "The delivery with its history", body = DeliveryDetailView),
        (status = 400, description = "Not a delivery id", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "No such delivery", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_delivery(
    State(state): State<AppState>,
    _caller: AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<DeliveryDetailView>> {
    parse_delivery_id(&id)?;
    let Some((d, n, attempts)) = herald_db::admin::get_delivery_detail(&state.pool, &id).await? else {
        return Err(ApiError::not_found("delivery", &id));
    };
    Ok(Json(DeliveryDetailView {
        delivery: d.into(),
        notification: AdminNotificationView {
            id: n.id,
            user_id: n.user_id,
            category: n.category,
            priority: n.priority,
            title: n.title,
            body: n.body,
            data: n.data,
            request_id: n.request_id,
            created_at: n.created_at,
        },
        attempts: attempts
            .into_iter()
            .map(|a| AdminAttemptView {
                attempt: a.attempt,
                worker_id: a.worker_id,
                started_at: a.started_at,
                finished_at: a.finished_at,
                outcome: a.outcome,
                provider_status: a.provider_status,
                error: a.error,
                detail: a.detail,
            })
            .collect(),
    }))
}

fn parse_delivery_id(id: &str) -> ApiResult<()> {
    id.parse::<DeliveryId>()?;
    Ok(())
}

fn parse_replay_id(id: &str) -> ApiResult<()> {
    id.parse::<ReplayId>()?;
    Ok(())
}

// -------------------------------------------------------------- replays

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReplay {
    /// The deliveries to replay (`dlv_…`, at most 10,000). Either this or `filter`.
    pub delivery_ids: Option<Vec<String>>,
    /// The same fields as the search (`status` limited to failed and dead,
    /// the default). Either this or `delivery_ids`.
    #[schema(value_type = Option<Object>, example = json!({"status": ["dead"], "channel": "email", "q": "timeout"}))]
    pub filter: Option<serde_json::Map<String, serde_json::Value>>,
    /// Only count what would be replayed, and show a sample.
    #[serde(default)]
    pub dry_run: bool,
    /// Deliveries per second (default: as fast as the runner goes).
    pub pace: Option<u32>,
    /// Needed when a filter matches more than HERALD_REPLAY_MAX deliveries.
    #[serde(default)]
    pub confirm_large: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DryRunView {
    /// Always true.
    pub dry_run: bool,
    pub matched: i64,
    pub would_replay: i64,
    /// Reason → how many would be skipped for it.
    #[schema(value_type = Object)]
    pub would_skip: BTreeMap<String, i64>,
    /// Some matched deliveries, newest first.
    pub sample: Vec<AdminDeliveryView>,
    /// HERALD_REPLAY_MAX: more than this needs `confirm_large`.
    pub max_without_confirmation: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayView {
    #[schema(example = "rpl_01JD0000000000000000000000")]
    pub id: String,
    /// pending, running, completed, cancelled, failed
    pub status: String,
    /// Who asked: the API key's id and name.
    pub requested_by: RequestedBy,
    /// The filter, for a filtered replay.
    #[schema(value_type = Option<Object>)]
    pub filter: Option<serde_json::Value>,
    /// How many ids were listed, for a replay of listed deliveries.
    pub delivery_ids: Option<i32>,
    /// Deliveries per second, if paced.
    pub pace: Option<i32>,
    /// Deliveries the replay covers (fixed when it was created).
    pub matched: i64,
    /// Moved back to `queued` with a fresh attempt budget.
    pub replayed: i64,
    pub skipped: i64,
    /// Not processed because the replay stopped on an error.
    pub failed: i64,
    /// Reason → how many were skipped for it.
    #[schema(value_type = Object)]
    pub skip_reasons: serde_json::Value,
    /// The first skipped deliveries, each with its reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped_deliveries: Vec<SkippedDelivery>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancelled_by: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RequestedBy {
    pub api_key_id: Option<String>,
    pub api_key_name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SkippedDelivery {
    pub delivery_id: String,
    pub reason: String,
}

fn replay_view(r: herald_db::replays::Replay, skipped: Vec<(String, String)>) -> ReplayView {
    ReplayView {
        id: r.id,
        status: r.status,
        requested_by: RequestedBy {
            api_key_id: r.api_key_id,
            api_key_name: r.api_key_name,
        },
        filter: r.filter,
        delivery_ids: r.delivery_ids,
        pace: r.pace,
        matched: r.matched,
        replayed: r.replayed,
        skipped: r.skipped,
        failed: r.failed,
        skip_reasons: r.skip_reasons,
        skipped_deliveries: skipped
            .into_iter()
            .map(|(delivery_id, reason)| SkippedDelivery { delivery_id, reason })
            .collect(),
        error: r.error,
        created_at: r.created_at,
        started_at: r.started_at,
        finished_at: r.finished_at,
        cancelled_by: r.cancelled_by,
    }
}

/// Replay failed or dead deliveries (or count what would be replayed).
///
/// Either `delivery_ids` or `filter`. With `dry_run` it answers 200 with
/// counts and a sample and changes nothing. Otherwise the replay is
/// recorded (who, when, what) with the deliveries it matched, answered 202,
/// and run in the background by the worker processes at `pace`: each
/// delivery still failed or dead (at the attempt it was matched at), whose
/// user (and, for push, an active device; for email, an address) still
/// exists, moves back to `queued` with a fresh attempt budget; every other
/// one is skipped with its reason. Follow it at `GET /v1/admin/replays/{id}`.
#[utoipa::path(
    post, path = "/v1/admin/replays", tag = "admin",
    request_body = CreateReplay,
    responses(
        (status = 200, description = "Dry run: what would happen", body = DryRunView),
        (status = 202, description = "The replay is recorded and will run in the background", body = ReplayView),
        (status = 400, description = "A filter or id has a bad value (`invalid_filter`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
        (status = 422, description = "Invalid body, or `replay_too_large` without `confirm_large`", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_replay(
    State(state): State<AppState>,
    caller: AdminCaller,
    ApiJson(req): ApiJson<CreateReplay>,
) -> ApiResult<Response> {
    let pace = match req.pace {
        None => None,
        Some(p) if (1..=100_000).contains(&p) => i32::try_from(p).ok(),
        Some(_) => {
            return Err(ApiError::invalid(
                "pace",
                "must be from 1 to 100000 deliveries per second; omit it for full pace",
            ));
        }
    };
    let ids: Vec<String>;
    let filter: DeliveryFilter;
    let target = match (req.delivery_ids, req.filter) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "filter",
                "give either `delivery_ids` or `filter`, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "filter",
                "give `delivery_ids` or a `filter` (e.g. {\"status\": [\"dead\"]})",
            ));
        }
        (Some(list), None) => {
            if list.is_empty() || list.len() > MAX_REPLAY_IDS {
                return Err(ApiError::invalid_filter(
                    "delivery_ids",
                    format!("must list 1 to {MAX_REPLAY_IDS} ids; use a filter for more"),
                ));
            }
            for (i, id) in list.iter().enumerate() {
                id.parse::<DeliveryId>()
                    .map_err(|e| ApiError::invalid_filter(&format!("delivery_ids[{i}]"), e.to_string()))?;
            }
            ids = list;
            ReplayTarget::Ids(&ids)
        }
        (None, Some(map)) => {
            let (f, _) = parse_filter(json_filter_pairs(map)?, &[])?;
            filter = dead_letters_only(f, "replay")?;
            ReplayTarget::Filter(&filter)
        }
    };
    let max = state.settings.replay_max;
    if req.dry_run {
        let dry = herald_db::replays::dry_run_replay(&state.pool, target, DRY_RUN_SAMPLE).await?;
        return Ok(Json(DryRunView {
            dry_run: true,
            matched: dry.matched,
            would_replay: dry.would_replay,
            would_skip: dry.would_skip,
            sample: dry.sample.into_iter().map(Into::into).collect(),
            max_without_confirmation: max,
        })
        .into_response());
    }
    if let ReplayTarget::Filter(_) = target {
        let matched = herald_db::replays::count_replay_target(&state.pool, target).await?;
        if u64::try_from(matched).unwrap_or(0) > max && !req.confirm_large {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "replay_too_large",
                format!(
                    "the filter matches {matched} deliveries, more than HERALD_REPLAY_MAX ({max}); \
                     narrow it, or send \"confirm_large\": true to replay them all"
                ),
            )
            .with_details(serde_json::json!({ "matched": matched, "max": max })));
        }
    }
    let id = ReplayId::generate().to_string();
    let replay = herald_db::replays::create_replay(
        &state.pool,
        NewReplay {
            id: &id,
            api_key: (&caller.0.id, &caller.0.name),
            target,
            pace,
        },
    )
    .await?;
    tracing::info!(
        replay_id = %replay.id,
        api_key_id = %caller.0.id,
        matched = replay.matched,
        pace = ?pace,
        "replay requested"
    );
    Ok((StatusCode::ACCEPTED, Json(replay_view(replay, Vec::new()))).into_response())
}

/// A replay's progress: matched, replayed, skipped (with reasons), failed.
#[utoipa::path(
    get, path = "/v1/admin/replays/{id}", tag = "admin",
    params(("id" = String, Path, description = "Replay id (`rpl_…`)")),
    responses(
        (status = 200, description = "The replay and its progress", body = ReplayView),
        (status = 400, description = "Not a replay id", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "No such replay", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_replay(
    State(state): State<AppState>,
    _caller: AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<ReplayView>> {
    parse_replay_id(&id)?;
    let Some(r) = herald_db::replays::get_replay(&state.pool, &id).await? else {
        return Err(ApiError::not_found("replay", &id));
    };
    let skipped = if r.skipped > 0 {
        herald_db::replays::list_skipped(&state.pool, &id, SKIPPED_LISTED).await?
    } else {
        Vec::new()
    };
    Ok(Json(replay_view(r, skipped)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayList {
    pub replays: Vec<ReplayView>,
}

/// The 50 most recent replays, newest first: the audit trail.
#[utoipa::path(
    get, path = "/v1/admin/replays", tag = "admin",
    responses(
        (status = 200, description = "Recent replays", body = ReplayList),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_replays(State(state): State<AppState>, _caller: AdminCaller) -> ApiResult<Json<ReplayList>> {
    let replays = herald_db::replays::list_replays(&state.pool, 50).await?;
    Ok(Json(ReplayList {
        replays: replays.into_iter().map(|r| replay_view(r, Vec::new())).collect(),
    }))
}

/// Cancel a pending or running replay; what it already replayed stays so.
#[utoipa::path(
    post, path = "/v1/admin/replays/{id}/cancel", tag = "admin",
    params(("id" = String, Path, description = "Replay id (`rpl_…`)")),
    responses(
        (status = 200, description = "Cancelled", body = ReplayView),
        (status = 400, description = "Not a replay id", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
        (status = 404, description = "No such replay", body = ErrorBody),
        (status = 409, description = "The replay already ended (`replay_finished`)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn cancel_replay(
    State(state): State<AppState>,
    caller: AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<Json<ReplayView>> {
    parse_replay_id(&id)?;
    let who = format!("{} ({})", caller.0.id, caller.0.name);
    match herald_db::replays::cancel_replay(&state.pool, &id, &who).await? {
        None => Err(ApiError::not_found("replay", &id)),
        Some((r, true)) => {
            tracing::info!(replay_id = %id, api_key_id = %caller.0.id, "replay cancelled");
            Ok(Json(replay_view(r, Vec::new())))
        }
        Some((r, false)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "replay_finished",
            format!("replay `{id}` already ended ({}); nothing to cancel", r.status),
        )
        .with_details(serde_json::json!({ "status": r.status }))),
    }
}

// --------------------------------------------------------------- purges

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePurge {
    /// RFC 3339: dead letters that finished (failed or died) before this.
    #[schema(example = "2026-10-01T00:00:00Z")]
    pub before: String,
    /// The same fields as the search (`status` limited to failed and dead, the default).
    #[schema(value_type = Option<Object>)]
    pub filter: Option<serde_json::Map<String, serde_json::Value>>,
    /// Only count what would be deleted.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PurgeView {
    /// `prg_…`; absent for a dry run.
    pub id: Option<String>,
    pub dry_run: bool,
    /// Dead letters matched (dry run) or deleted, with their attempts.
    pub deleted: i64,
    pub before: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub filter: serde_json::Value,
    pub requested_by: RequestedBy,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Delete failed and dead deliveries (with their attempts) that finished
/// before `before` and match `filter`; audited. Notifications stay.
#[utoipa::path(
    post, path = "/v1/admin/purges", tag = "admin",
    request_body = CreatePurge,
    responses(
        (status = 200, description = "Deleted (or, dry run, would delete)", body = PurgeView),
        (status = 400, description = "A filter has a bad value (`invalid_filter`)", body = ErrorBody),
        (status = 403, description = "The key lacks the `admin` scope", body = ErrorBody),
        (status = 422, description = "Invalid body", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_purge(
    State(state): State<AppState>,
    caller: AdminCaller,
    ApiJson(req): ApiJson<CreatePurge>,
) -> ApiResult<Json<PurgeView>> {
    let before = parse_time("before", req.before.trim())?;
    let (f, _) = parse_filter(json_filter_pairs(req.filter.unwrap_or_default())?, &[])?;
    let filter = dead_letters_only(f, "purge")?;
    let filter_json = serde_json::to_value(&filter).map_err(|e| ApiError::internal(&e))?;
    let requested_by = RequestedBy {
        api_key_id: Some(caller.0.id.clone()),
        api_key_name: Some(caller.0.name.clone()),
    };
    if req.dry_run {
        let n = herald_db::admin::count_purgeable(&state.pool, &filter, before).await?;
        return Ok(Json(PurgeView {
            id: None,
            dry_run: true,
            deleted: n,
            before,
            filter: filter_json,
            requested_by,
            finished_at: None,
        }));
    }
    let id = PurgeId::generate().to_string();
    herald_db::admin::start_purge(&state.pool, &id, (&caller.0.id, &caller.0.name), &filter, before).await?;
    // In batches, each one statement that also counts on the audit row, so
    // no statement holds many row locks for long and an interrupted purge
    // says how far it got.
    loop {
        let n = herald_db::admin::purge_batch(&state.pool, &id, &filter, before, PURGE_BATCH).await?;
        if n < PURGE_BATCH {
            break;
        }
    }
    let done = herald_db::admin::finish_purge(&state.pool, &id).await?;
    tracing::info!(purge_id = %id, api_key_id = %caller.0.id, deleted = done.deleted, "dead letters purged");
    Ok(Json(PurgeView {
        id: Some(done.id),
        dry_run: false,
        deleted: done.deleted,
        before: done.before,
        filter: done.filter,
        requested_by,
        finished_at: done.finished_at,
    }))
}

/// The admin web page: one HTML file with its script, no build step. It
/// signs in with an admin key (kept in `sessionStorage`) and calls the
/// routes above.
pub async fn admin_page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (axum::http::header::X_FRAME_OPTIONS, "DENY"),
        ],
        include_str!("../admin.html"),
    )
        .into_response()
}
