//! Routes for mobile and web clients, with a user token: the user's inbox,
//! the status of their notifications, read state, their own devices.
//!
//! Polling is cheap: every read answers an `ETag`, and `If-None-Match` with
//! the current one gets `304` after one small lookup (when anything of the
//! user's last changed: two index-only `max()`s), without the heavy query.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use herald_core::{DeviceId, NotificationId};
use herald_db::inbox::{Cursor, InboxItem, InboxQuery, Mark};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::AppState;
use crate::changes::SETTLE;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, Caller, IfNoneMatch, OneHeader};
use crate::routes::users::{DeviceView, RegisterDevice, checked_device, parse_user_id};
use crate::user_token::{Me, mint};

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MintToken {
    /// Lifetime in seconds (60 to 86400); default `HERALD_USER_TOKEN_TTL_SECS`.
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserToken {
    pub token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    pub user_id: String,
    pub expires_at: DateTime<Utc>,
}

/// Mint a short-lived token for one user, for their app to call `/v1/me`.
#[utoipa::path(
    post, path = "/v1/users/{user_id}/tokens", tag = "clients",
    params(("user_id" = String, Path, description = "The product's user id")),
    request_body(content = Option<MintToken>, description = "Optional; `{}` or empty for the default lifetime"),
    responses(
        (status = 201, description = "A signed token", body = UserToken),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The key lacks the `send` scope", body = ErrorBody),
        (status = 422, description = "Bad lifetime", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_user_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<UserToken>)> {
    caller.require("send")?;
    let user = parse_user_id(&user_id)?;
    let req: MintToken = if body.iter().all(u8::is_ascii_whitespace) {
        MintToken::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                format!("the body does not match: {e}"),
            )
        })?
    };
    let ttl = match req.ttl_seconds {
        None => state.settings.user_token_ttl,
        Some(s @ 60..=86_400) => std::time::Duration::from_secs(s),
        Some(_) => return Err(ApiError::invalid("ttl_seconds", "must be from 60 to 86400")),
    };
    let (token, exp) = mint(state.settings.user_token_secret.expose(), &user, ttl)?;
    let expires_at = Utc
        .timestamp_opt(i64::try_from(exp).unwrap_or(i64::MAX), 0)
        .single()
        .unwrap_or_default();
    Ok((
        StatusCode::CREATED,
        Json(UserToken {
            token,
            token_type: "Bearer",
            user_id: user.to_string(),
            expires_at,
        }),
    ))
}

/// The ETag of what `user` sees through `view`, and whether a matching
/// `If-None-Match` may be answered 304.
async fn etag(state: &AppState, user: &str, view: &str) -> ApiResult<(String, bool)> {
    let (deliveries, inbox) = herald_db::inbox::last_change(&state.pool, user).await?;
    let latest = deliveries.max(inbox);
    let settled = latest.is_none_or(|t| Utc::now() - t > SETTLE);
    let mut h = Sha256::new();
    for part in [user, view, &format!("{deliveries:?}"), &format!("{inbox:?}")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    if !settled {
        // Never equal to a later ETag: a change committing late with an
        // older timestamp must not hide behind this one.
        h.update(ulid::Ulid::new().to_string().as_bytes());
    }
    let digest = h.finalize();
    Ok((format!("W/\"{}\"", hex_prefix(&digest, 12)), settled))
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    bytes.iter().take(n).map(|b| format!("{b:02x}")).collect()
}

fn matches_etag(if_none_match: Option<&HeaderValue>, etag: &str) -> bool {
    if_none_match
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// 304 when the client already has `etag` and it may be trusted.
fn not_modified(if_none_match: Option<&HeaderValue>, etag: &str, settled: bool) -> Option<Response> {
    (settled && matches_etag(if_none_match, etag)).then(|| with_etag(StatusCode::NOT_MODIFIED.into_response(), etag))
}

fn with_etag(mut res: Response, etag: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(etag) {
        res.headers_mut().insert(header::ETAG, v);
    }
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"));
    res
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InboxEntry {
    pub notification_id: String,
    pub category: String,
    pub title: String,
    pub body: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub read: bool,
    pub read_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
}

impl From<InboxItem> for InboxEntry {
    fn from(i: InboxItem) -> Self {
        Self {
            read: i.read_at.is_some(),
            notification_id: i.notification_id,
            category: i.category,
            title: i.title,
            body: i.body,
            data: i.data,
            created_at: i.created_at,
            read_at: i.read_at,
            archived_at: i.archived_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InboxPage {
    pub items: Vec<InboxEntry>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(item: &InboxItem) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}|{}",
        item.created_at.timestamp_micros(),
        item.notification_id
    ))
}

pub(crate) fn bad_query(field: &str, message: impl Into<String>) -> ApiError {
    let message = message.into();
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("{field}: {message}"))
        .with_details(serde_json::json!({"field": field, "reason": message}))
}

fn decode_cursor(s: &str) -> ApiResult<Cursor> {
    let bad = || {
        bad_query(
            "cursor",
            "is not a cursor from a previous page (use next_cursor as given)",
        )
    };
    let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = text.split_once('|').ok_or_else(bad)?;
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    id.parse::<NotificationId>().map_err(|_| bad())?;
    Ok(Cursor {
        created_at,
        notification_id: id.to_owned(),
    })
}

fn parse_bool(field: &str, v: &str) -> ApiResult<bool> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad_query(field, "must be true or false")),
    }
}

fn inbox_query(params: &HashMap<String, String>) -> ApiResult<InboxQuery> {
    let mut q = InboxQuery {
        limit: 20,
        ..InboxQuery::default()
    };
    for (k, v) in params {
        match k.as_str() {
            "cursor" => q.after = Some(decode_cursor(v)?),
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| bad_query("limit", "must be a whole number from 1 to 100"))?;
            }
            "unread_only" => q.unread_only = parse_bool(k, v)?,
            "include_archived" => q.include_archived = parse_bool(k, v)?,
            "category" => {
                herald_core::Category::parse(v).map_err(|e| bad_query("category", e.message))?;
                q.category = Some(v.clone());
            }
            "q" => {
                if v.trim().is_empty() || v.chars().count() > 200 {
                    return Err(bad_query("q", "must be 1 to 200 characters"));
                }
                q.text = Some(v.clone());
            }
            other => {
                return Err(bad_query(
                    other,
                    "is not a parameter of this route (cursor, limit, unread_only, include_archived, category, q)",
                ));
            }
        }
    }
    Ok(q)
}

/// The user's inbox, newest first.
#[utoipa::path(
    get, path = "/v1/me/notifications", tag = "clients",
    params(
        ("cursor" = Option<String>, Query, description = "From `next_cursor` of the previous page"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 20"),
        ("unread_only" = Option<bool>, Query, description = "Only unread items"),
        ("include_archived" = Option<bool>, Query, description = "Include archived items"),
        ("category" = Option<String>, Query, description = "Only this category"),
        ("q" = Option<String>, Query, description = "Words to find in title or body"),
        ("If-None-Match" = Option<String>, Header, description = "The ETag of the copy you have"),
    ),
    responses(
        (status = 200, description = "A page of the inbox", body = InboxPage),
        (status = 304, description = "Nothing changed since that ETag"),
        (status = 400, description = "A bad parameter (named)", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or wrongly signed user token", body = ErrorBody),
    ),
    security(("user_token" = []))
)]
pub async fn list_notifications(
    State(state): State<AppState>,
    Me(user): Me,
    OneHeader(if_none_match, _): OneHeader<IfNoneMatch>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = query.map_err(|e| bad_query("query", e.body_text()))?;
    let q = inbox_query(&params)?;
    let mut view: Vec<_> = params.iter().collect();
    view.sort();
    let (etag, settled) = etag(&state, user.as_str(), &format!("list {view:?}")).await?;
    if let Some(res) = not_modified(if_none_match.as_ref(), &etag, settled) {
        return Ok(res);
    }
    let (items, more) = herald_db::inbox::list_inbox(&state.pool, user.as_str(), &q).await?;
    let next_cursor = if more { items.last().map(encode_cursor) } else { None };
    let page = InboxPage {
        items: items.into_iter().map(Into::into).collect(),
        next_cursor,
    };
    Ok(with_etag(Json(page).into_response(), &etag))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MyNotification {
    pub id: String,
    pub category: String,
    pub priority: String,
    pub title: String,
    pub body: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// In-app state, when it has an inbox item.
    pub read_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
    pub deliveries: Vec<MyDelivery>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MyDelivery {
    pub id: String,
    pub channel: String,
    pub status: String,
    pub attempts: i32,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
}

fn own_id(id: &str) -> ApiResult<()> {
    id.parse::<NotificationId>()?;
    Ok(())
}

/// One of the user's notifications with the status of every channel.
#[utoipa::path(
    get, path = "/v1/me/notifications/{id}", tag = "clients",
    params(
        ("id" = String, Path, description = "Notification id (`ntf_…`)"),
        ("If-None-Match" = Option<String>, Header, description = "The ETag of the copy you have"),
    ),
    responses(
        (status = 200, description = "The notification", body = MyNotification),
        (status = 304, description = "Nothing changed since that ETag"),
        (status = 404, description = "No such notification of this user", body = ErrorBody),
    ),
    security(("user_token" = []))
)]
pub async fn get_notification(
    State(state): State<AppState>,
    Me(user): Me,
    OneHeader(if_none_match, _): OneHeader<IfNoneMatch>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    own_id(&id)?;
    let (etag, settled) = etag(&state, user.as_str(), &format!("one {id}")).await?;
    if let Some(res) = not_modified(if_none_match.as_ref(), &etag, settled) {
        return Ok(res);
    }
    let Some((n, deliveries, item)) = herald_db::inbox::get_own_notification(&state.pool, user.as_str(), &id).await?
    else {
        return Err(ApiError::not_found("notification", &id));
    };
    let doc = MyNotification {
        id: n.id,
        category: n.category,
        priority: n.priority,
        title: n.title,
        body: n.body,
        data: n.data,
        created_at: n.created_at,
        read_at: item.as_ref().and_then(|i| i.read_at),
        archived_at: item.as_ref().and_then(|i| i.archived_at),
        deliveries: deliveries
            .into_iter()
            .map(|d| MyDelivery {
                id: d.id,
                channel: d.channel,
                status: d.status,
                attempts: d.attempt,
                updated_at: d.updated_at,
                sent_at: d.sent_at,
                delivered_at: d.delivered_at,
            })
            .collect(),
    };
    Ok(with_etag(Json(doc).into_response(), &etag))
}

async fn mark(state: &AppState, user: &str, id: &str, m: Mark) -> ApiResult<Json<InboxEntry>> {
    own_id(id)?;
    let item = herald_db::inbox::mark_item(&state.pool, user, id, m)
        .await?
        .ok_or_else(|| ApiError::not_found("inbox item", id))?;
    state.users_changed(&[user]);
    Ok(Json(item.into()))
}

/// Mark an inbox item read.
#[utoipa::path(post, path = "/v1/me/notifications/{id}/read", tag = "clients",
    params(("id" = String, Path, description = "Notification id")),
    responses((status = 200, body = InboxEntry), (status = 404, body = ErrorBody)),
    security(("user_token" = [])))]
pub async fn mark_read(
    State(state): State<AppState>,
    Me(user): Me,
    Path(id): Path<String>,
) -> ApiResult<Json<InboxEntry>> {
    mark(&state, user.as_str(), &id, Mark::Read).await
}

/// Mark an inbox item unread.
#[utoipa::path(post, path = "/v1/me/notifications/{id}/unread", tag = "clients",
    params(("id" = String, Path, description = "Notification id")),
    responses((status = 200, body = InboxEntry), (status = 404, body = ErrorBody)),
    security(("user_token" = [])))]
pub async fn mark_unread(
    State(state): State<AppState>,
    Me(user): Me,
    Path(id): Path<String>,
) -> ApiResult<Json<InboxEntry>> {
    mark(&state, user.as_str(), &id, Mark::Unread).await
}

/// Archive an inbox item (hidden from the default list; counts as read).
#[utoipa::path(post, path = "/v1/me/notifications/{id}/archive", tag = "clients",
    params(("id" = String, Path, description = "Notification id")),
    responses((status = 200, body = InboxEntry), (status = 404, body = ErrorBody)),
    security(("user_token" = [])))]
pub async fn archive(
    State(state): State<AppState>,
    Me(user): Me,
    Path(id): Path<String>,
) -> ApiResult<Json<InboxEntry>> {
    mark(&state, user.as_str(), &id, Mark::Archived).await
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Updated {
    pub updated: u64,
}

/// Mark every unread item read.
#[utoipa::path(post, path = "/v1/me/notifications/read-all", tag = "clients",
    responses((status = 200, body = Updated)), security(("user_token" = [])))]
pub async fn read_all(State(state): State<AppState>, Me(user): Me) -> ApiResult<Json<Updated>> {
    let updated = herald_db::inbox::mark_all_read(&state.pool, user.as_str()).await?;
    if updated > 0 {
        state.users_changed(&[user.as_str()]);
    }
    Ok(Json(Updated { updated }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MyStats {
    pub total: i64,
    pub unread: i64,
    pub read: i64,
}

/// Inbox counts (archived items excluded).
#[utoipa::path(get, path = "/v1/me/stats", tag = "clients",
    params(("If-None-Match" = Option<String>, Header, description = "The ETag of the copy you have")),
    responses((status = 200, body = MyStats), (status = 304, description = "Nothing changed")),
    security(("user_token" = [])))]
pub async fn stats(
    State(state): State<AppState>,
    Me(user): Me,
    OneHeader(if_none_match, _): OneHeader<IfNoneMatch>,
) -> ApiResult<Response> {
    let (etag, settled) = etag(&state, user.as_str(), "stats").await?;
    if let Some(res) = not_modified(if_none_match.as_ref(), &etag, settled) {
        return Ok(res);
    }
    let s = herald_db::inbox::stats(&state.pool, user.as_str()).await?;
    let body = MyStats {
        total: s.total,
        unread: s.unread,
        read: s.read,
    };
    Ok(with_etag(Json(body).into_response(), &etag))
}

/// Register this app's push token for the signed-in user.
#[utoipa::path(post, path = "/v1/me/devices", tag = "clients", request_body = RegisterDevice,
    responses((status = 201, body = DeviceView), (status = 200, body = DeviceView), (status = 422, body = ErrorBody)),
    security(("user_token" = [])))]
pub async fn register_my_device(
    State(state): State<AppState>,
    Me(user): Me,
    ApiJson(req): ApiJson<RegisterDevice>,
) -> ApiResult<impl IntoResponse> {
    let (platform, provider, token) = checked_device(&req)?;
    herald_db::users::ensure_user(&state.pool, user.as_str()).await?;
    let (device, created) =
        herald_db::users::register_device(&state.pool, user.as_str(), platform.as_str(), provider.as_str(), token)
            .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(DeviceView::from(device))))
}

/// Remove one of the signed-in user's devices.
#[utoipa::path(delete, path = "/v1/me/devices/{device_id}", tag = "clients",
    params(("device_id" = String, Path, description = "Device id (`dev_…`)")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)),
    security(("user_token" = [])))]
pub async fn delete_my_device(
    State(state): State<AppState>,
    Me(user): Me,
    Path(device_id): Path<String>,
) -> ApiResult<StatusCode> {
    device_id.parse::<DeviceId>()?;
    if herald_db::users::delete_device(&state.pool, user.as_str(), &device_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("device", &device_id))
    }
}
