//! `POST /v1/notifications` and `GET /v1/notifications/{id}`.
//!
//! Accepting is one transaction (the notification and one delivery per
//! channel), committed before the 202; jobs go to Redis after the commit.
//! If Redis is down the request still succeeds: the deliveries wait in
//! Postgres and the sweeper enqueues them when Redis is back.

use std::collections::BTreeSet;

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use herald_core::validate::{MAX_BODY_CHARS, MAX_TITLE_CHARS, check_text};
use herald_core::{Category, Channel, DeliveryId, NotificationId, Priority, UserId};
use herald_db::notifications::{Idempotency, NewDelivery, NewNotification, NewNotificationWithDeliveries};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tower_http::request_id::RequestId;
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{Caller, IdempotencyKey, JsonBody, OneHeader, malformed_json, parse_json};
use crate::ingest::Submission;

/// Largest `data` object, serialized, in bytes.
const MAX_DATA_BYTES: usize = 8 * 1024;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNotification {
    /// The product's id of the recipient.
    #[schema(example = "u_42")]
    pub user_id: String,
    /// A slug for grouping and preferences; defaults to `general`.
    #[schema(example = "alert")]
    pub category: Option<String>,
    /// `high`, `normal` (default) or `low`.
    #[schema(example = "high")]
    pub priority: Option<String>,
    /// Any of `email`, `push`, `in_app`. Omitted: every channel the user can receive.
    #[schema(example = json!(["email", "push", "in_app"]))]
    pub channels: Option<Vec<String>>,
    #[schema(example = "Your order shipped")]
    pub title: String,
    #[schema(example = "Order 1234 is on its way.")]
    #[serde(default)]
    pub body: String,
    /// Free-form JSON object passed to the push payload and the inbox.
    #[schema(value_type = Option<Object>, example = json!({"order_id": "1234"}))]
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    #[schema(example = "ntf_01JD0000000000000000000000")]
    pub id: String,
    pub user_id: String,
    pub created_at: DateTime<Utc>,
    pub deliveries: Vec<AcceptedDelivery>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedDelivery {
    #[schema(example = "dlv_01JD0000000000000000000000")]
    pub id: String,
    pub channel: String,
    /// `queued`, or `skipped` when the user cannot receive on this channel.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
}

struct Validated {
    user_id: UserId,
    category: Category,
    priority: Priority,
    channels: Option<Vec<Channel>>,
    title: String,
    body: String,
    data: serde_json::Value,
}

fn validate(req: CreateNotification) -> ApiResult<Validated> {
    let user_id = UserId::parse(&req.user_id)?;
    let category = match req.category.as_deref() {
        Some(c) => Category::parse(c)?,
        None => Category::default(),
    };
    let priority = match req.priority.as_deref() {
        Some(p) => p
            .parse()
            .map_err(|e: herald_core::UnknownValue| ApiError::invalid("priority", e.to_string()))?,
        None => Priority::Normal,
    };
    let channels = match req.channels {
        None => None,
        Some(list) => {
            if list.is_empty() {
                return Err(ApiError::invalid(
                    "channels",
                    "must not be empty; omit it to use every channel the user can receive",
                ));
            }
            let mut seen = BTreeSet::new();
            let mut out = Vec::with_capacity(list.len());
            for (i, c) in list.iter().enumerate() {
                let ch: Channel = c.parse().map_err(|e: herald_core::UnknownValue| {
                    ApiError::invalid(&format!("channels[{i}]"), e.to_string())
                })?;
                if !seen.insert(ch) {
                    return Err(ApiError::invalid(
                        &format!("channels[{i}]"),
                        format!("`{c}` is listed twice"),
                    ));
                }
                out.push(ch);
            }
            Some(out)
        }
    };
    if req.title.trim().is_empty() {
        return Err(ApiError::invalid("title", "must not be empty"));
    }
    check_text("title", &req.title, MAX_TITLE_CHARS, false)?;
    check_text("body", &req.body, MAX_BODY_CHARS, true)?;
    let data = match req.data {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(v @ serde_json::Value::Object(_)) => {
            if serialized_len(&v) > MAX_DATA_BYTES {
                return Err(ApiError::invalid(
                    "data",
                    format!("must serialize to at most {MAX_DATA_BYTES} bytes"),
                ));
            }
            v
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "data",
                "must be a JSON object, like {\"order_id\": \"1234\"}",
            ));
        }
    };
    Ok(Validated {
        user_id,
        category,
        priority,
        channels,
        title: req.title,
        body: req.body,
        data,
    })
}

/// Accept a notification for delivery.
///
/// Answers 202 once the notification and one delivery per channel are
/// committed; delivery happens afterwards. Poll `GET /v1/notifications/{id}`
/// for progress. With an `Idempotency-Key` header (per API key, kept at
/// least 24 hours), a repeat of the same request answers the original
/// response (`Idempotent-Replayed: true`) and creates nothing. A 503
/// means nothing was stored, except one whose `details.stored` is
/// `"unknown"`: the connection to Postgres failed while the request
/// committed, so it may have been; retry it with the same key.
#[utoipa::path(
    post, path = "/v1/notifications", tag = "notifications",
    request_body = CreateNotification,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key and body answer the first response again")),
    responses(
        (status = 202, description = "Accepted: stored and queued", body = Accepted),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `send` scope", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
        (status = 503, description = "Database unavailable; retry. Nothing was stored, unless `details.stored` is `\"unknown\"` (the connection failed while the request committed): retry that one with the same Idempotency-Key", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_notification(
    State(state): State<AppState>,
    caller: Caller,
    request_id: Option<Extension<RequestId>>,
    OneHeader(idempotency_header, _): OneHeader<IdempotencyKey>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    // Malformed JSON (400) comes before the scope; a wrong shape (422)
    // after it and the Idempotency-Key.
    let parsed = parse_json::<CreateNotification>(&body)?;
    caller.require("send")?;
    let idempotency_key = idempotency_key(idempotency_header.as_ref())?;
    let req = parsed.shape()?;
    let idempotency = match idempotency_key {
        None => None,
        Some(key) => {
            // serde_json's maps are sorted, so equal bodies hash equally
            // whatever their key order or spacing.
            let canonical: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| malformed_json(&e.to_string()))?;
            Some((key, Sha256::digest(canonical.to_string().as_bytes()).to_vec()))
        }
    };
    let v = validate(req)?;
    let request_id = request_id.and_then(|Extension(r)| r.header_value().to_str().ok().map(str::to_owned));

    // Named channels are recorded even when the user cannot receive on them
    // (as skipped); omitted ones mean "whatever the user can receive".
    let (channels, requested) = match &v.channels {
        Some(list) => (list.clone(), true),
        None => (vec![Channel::Email, Channel::Push, Channel::InApp], false),
    };
    let ntf_id = NotificationId::generate();
    let deliveries: Vec<NewDelivery> = channels
        .iter()
        .map(|&ch| NewDelivery {
            id: DeliveryId::of(ntf_id, ch).to_string(),
            channel: ch.as_str(),
            max_attempts: i32::try_from(state.settings.retry_for(ch).max_attempts).unwrap_or(i32::MAX),
            // In-app needs nothing from the user, so it is always kept.
            requested: requested || ch == Channel::InApp,
        })
        .collect();
    let item = NewNotificationWithDeliveries {
        notification: NewNotification {
            id: ntf_id.to_string(),
            api_key_id: Some(caller.key_id().to_owned()),
            user_id: v.user_id.to_string(),
            category: v.category.as_str().to_owned(),
            priority: v.priority.as_str(),
            title: v.title,
            body: v.body,
            data: v.data,
            request_id,
        },
        deliveries,
    };
    let (id, user_id) = (item.notification.id.clone(), item.notification.user_id.clone());
    let accepted = match idempotency {
        None => state
            .ingestor
            .accept(Submission {
                item,
                priority: v.priority,
            })
            .await
            .map_err(|e| ApiError::from_db(&e))?,
        Some((key, hash)) => match accept_idempotent(&state, &caller, &key, &hash, item, v.priority).await? {
            Ok(accepted) => accepted,
            Err(replay) => return Ok(replay),
        },
    };
    tracing::info!(notification_id = %id, user_id = %user_id, channels = accepted.deliveries.len(), "notification accepted");
    Ok((StatusCode::ACCEPTED, Json(accepted_body(id, user_id, &accepted))).into_response())
}

/// Bytes of `v` as compact JSON, counted without building the text.
fn serialized_len(v: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Writing to a counter cannot fail, nor can a Value's serialization.
    serde_json::to_writer(&mut n, v).map_or(usize::MAX, |()| n.0)
}

/// The idempotent path: its own transaction, so the key's reservation, the
/// rows and the stored response commit together. `Ok(Err(response))` is a
/// replay of the original answer.
async fn accept_idempotent(
    state: &AppState,
    caller: &Caller,
    key: &str,
    hash: &[u8],
    item: NewNotificationWithDeliveries,
    priority: Priority,
) -> ApiResult<Result<herald_db::notifications::Accepted, Response>> {
    let mut tx = state.pool.begin().await.map_err(herald_db::DbError::from)?;
    match herald_db::notifications::claim_idempotency_key(&mut tx, caller.key_id(), key, hash).await? {
        Idempotency::Fresh => {}
        Idempotency::Replay { status, response } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
            let mut res = (status, Json(response)).into_response();
            res.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(Err(res));
        }
        Idempotency::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!(
                    "Idempotency-Key `{key}` was already used with a different request body; \
                     use a new key for a new notification"
                ),
            ));
        }
    }
    let mut inserted = herald_db::notifications::insert_notifications(&mut *tx, std::slice::from_ref(&item)).await?;
    let accepted = inserted
        .accepted
        .pop()
        .ok_or_else(|| ApiError::internal(&"the insert returned no row"))?;
    let body = accepted_body(
        item.notification.id.clone(),
        item.notification.user_id.clone(),
        &accepted,
    );
    let stored = serde_json::to_value(&body).map_err(|e| ApiError::internal(&e))?;
    herald_db::notifications::store_idempotent_response(&mut tx, caller.key_id(), key, 202, &stored).await?;
    tx.commit()
        .await
        .map_err(|e| herald_db::DbError::from(e).while_committing())?;
    let request_id = item.notification.request_id.as_deref();
    let jobs = crate::ingest::jobs_for([(&accepted, priority, request_id)]);
    crate::ingest::push_jobs(state.sinks().clone(), jobs, inserted.push_intent).await;
    Ok(Ok(accepted))
}

fn accepted_body(id: String, user_id: String, a: &herald_db::notifications::Accepted) -> Accepted {
    Accepted {
        id,
        user_id,
        created_at: a.created_at,
        deliveries: a
            .deliveries
            .iter()
            .map(|d| AcceptedDelivery {
                id: d.id.clone(),
                channel: d.channel.clone(),
                status: d.status.clone(),
                skip_reason: d.skip_reason.clone(),
            })
            .collect(),
    }
}

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The `Idempotency-Key` header, if any, checked to be short and printable.
fn idempotency_key(header: Option<&HeaderValue>) -> ApiResult<Option<String>> {
    let Some(v) = header else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY && k.chars().all(|c| c.is_ascii_graphic()) => {
            Ok(Some(k.to_owned()))
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters without spaces (a UUID works)"
            ),
        )),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationStatus {
    pub id: String,
    pub user_id: String,
    pub category: String,
    pub priority: String,
    pub title: String,
    pub body: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub deliveries: Vec<DeliveryStatusView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryStatusView {
    pub id: String,
    pub channel: String,
    /// queued, sending, retrying, sent, delivered, failed, dead, cancelled, skipped
    pub status: String,
    /// Attempts started so far.
    pub attempts: i32,
    pub max_attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    pub attempt_history: Vec<AttemptView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub attempt: i32,
    pub worker_id: String,
    pub started_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// sent, delivered, skipped, permanent, transient, rate_limited, ambiguous, lease_expired
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A notification and the state of each channel's delivery.
#[utoipa::path(
    get, path = "/v1/notifications/{id}", tag = "notifications",
    params(("id" = String, Path, description = "Notification id (`ntf_…`)")),
    responses(
        (status = 200, description = "The notification with every delivery", body = NotificationStatus),
        (status = 400, description = "Not a notification id", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such notification", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_notification(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<NotificationStatus>> {
    caller.require("read")?;
    id.parse::<NotificationId>()?;
    let Some((n, deliveries)) = herald_db::notifications::get_notification(&state.pool, &id).await? else {
        return Err(ApiError::not_found("notification", &id));
    };
    let ids: Vec<String> = deliveries.iter().map(|d| d.id.clone()).collect();
    let mut attempts = herald_db::deliveries::list_attempts_for(&state.pool, &ids).await?;
    Ok(Json(NotificationStatus {
        id: n.id,
        user_id: n.user_id,
        category: n.category,
        priority: n.priority,
        title: n.title,
        body: n.body,
        data: n.data,
        created_at: n.created_at,
        deliveries: deliveries
            .into_iter()
            .map(|d| DeliveryStatusView {
                attempt_history: attempts
                    .remove(&d.id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|a| AttemptView {
                        attempt: a.attempt,
                        worker_id: a.worker_id,
                        started_at: a.started_at,
                        finished_at: a.finished_at,
                        outcome: a.outcome,
                        provider_status: a.provider_status,
                        error: a.error,
                    })
                    .collect(),
                id: d.id,
                channel: d.channel,
                status: d.status,
                attempts: d.attempt,
                max_attempts: d.max_attempts,
                skip_reason: d.skip_reason,
                last_error: d.last_error,
                last_error_class: d.last_error_class,
                next_attempt_at: d.next_attempt_at,
                created_at: d.created_at,
                updated_at: d.updated_at,
                sent_at: d.sent_at,
                delivered_at: d.delivered_at,
                finished_at: d.finished_at,
            })
            .collect(),
    }))
}

pub(crate) fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(data: serde_json::Value) -> CreateNotification {
        serde_json::from_value(serde_json::json!({"user_id": "u_1", "title": "x", "data": data})).unwrap()
    }

    #[test]
    fn data_is_limited_by_its_compact_json_size() {
        // `{"k":"…"}` is the string's length plus 8 bytes.
        let at_limit = serde_json::json!({"k": "x".repeat(MAX_DATA_BYTES - 8)});
        assert_eq!(serialized_len(&at_limit), MAX_DATA_BYTES);
        assert!(validate(request(at_limit)).is_ok());
        let over = serde_json::json!({"k": "é".repeat(MAX_DATA_BYTES / 2)});
        assert_eq!(serialized_len(&over), over.to_string().len());
        assert!(validate(request(over)).is_err());
    }
}
