//! Users and their devices: who can be reached, and where.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use herald_core::validate::MAX_TOKEN_CHARS;
use herald_core::{DeviceId, DevicePlatform, EmailAddress, PushProvider, UnknownValue, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiJson, Caller};
use crate::routes::notifications::truncate;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutUser {
    /// Where email notifications go; `null` or omitted: none.
    #[schema(example = "ada@example.com")]
    pub email: Option<String>,
    /// BCP 47 language tag.
    #[schema(example = "en-GB")]
    pub locale: Option<String>,
    /// IANA time zone name.
    #[schema(example = "Europe/London")]
    pub timezone: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    pub id: String,
    pub email: Option<String>,
    pub locale: Option<String>,
    pub timezone: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub devices: Vec<DeviceView>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceView {
    #[schema(example = "dev_01JD0000000000000000000000")]
    pub id: String,
    pub platform: String,
    pub provider: String,
    /// The last 6 characters of the token, to recognise it; the token itself is not echoed.
    pub token_suffix: String,
    pub created_at: DateTime<Utc>,
    /// Set when a provider reported the token gone; re-register to enable it again.
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
}

impl From<herald_db::users::Device> for DeviceView {
    fn from(d: herald_db::users::Device) -> Self {
        let n = d.token.chars().count();
        Self {
            id: d.id,
            platform: d.platform,
            provider: d.provider,
            token_suffix: d.token.chars().skip(n.saturating_sub(6)).collect(),
            created_at: d.created_at,
            disabled_at: d.disabled_at,
            disabled_reason: d.disabled_reason,
        }
    }
}

pub(crate) fn parse_user_id(id: &str) -> ApiResult<UserId> {
    UserId::parse(id).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            format!("user id `{}`: {}", truncate(id), e.message),
        )
    })
}

fn check_locale(s: &str) -> ApiResult<()> {
    let mut parts = s.split('-');
    let lang_ok = parts
        .next()
        .is_some_and(|p| (2..=3).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphabetic()));
    let rest_ok = parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric()));
    if lang_ok && rest_ok && s.len() <= 35 {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "locale",
            format!("`{}` is not a language tag like `en` or `pt-BR`", truncate(s)),
        ))
    }
}

fn check_timezone(s: &str) -> ApiResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('/')
        && !s.ends_with('/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "timezone",
            format!("`{}` is not a time zone name like `Europe/Paris` or `UTC`", truncate(s)),
        ))
    }
}

async fn user_view(state: &AppState, user: herald_db::users::User) -> ApiResult<UserView> {
    let devices = herald_db::users::list_devices(&state.pool, &user.id).await?;
    Ok(UserView {
        id: user.id,
        email: user.email,
        locale: user.locale,
        timezone: user.timezone,
        created_at: user.created_at,
        updated_at: user.updated_at,
        devices: devices.into_iter().map(Into::into).collect(),
    })
}

/// Create or replace a user's contact profile.
#[utoipa::path(
    put, path = "/v1/users/{user_id}", tag = "users",
    params(("user_id" = String, Path, description = "The product's user id")),
    request_body = PutUser,
    responses(
        (status = 200, description = "Updated", body = UserView),
        (status = 201, description = "Created", body = UserView),
        (status = 400, description = "Malformed user id or JSON", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn put_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    ApiJson(req): ApiJson<PutUser>,
) -> ApiResult<impl IntoResponse> {
    caller.require("send")?;
    let user_id = parse_user_id(&user_id)?;
    let email = req.email.as_deref().map(EmailAddress::parse).transpose()?;
    if let Some(l) = &req.locale {
        check_locale(l)?;
    }
    if let Some(tz) = &req.timezone {
        check_timezone(tz)?;
    }
    let (user, created) = herald_db::users::upsert_user(
        &state.pool,
        &herald_db::users::UserUpsert {
            id: user_id.as_str(),
            email: email.as_ref().map(EmailAddress::as_str),
            locale: req.locale.as_deref(),
            timezone: req.timezone.as_deref(),
        },
    )
    .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(user_view(&state, user).await?)))
}

/// A user's profile and devices.
#[utoipa::path(
    get, path = "/v1/users/{user_id}", tag = "users",
    params(("user_id" = String, Path, description = "The product's user id")),
    responses(
        (status = 200, description = "The user", body = UserView),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such user", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
) -> ApiResult<Json<UserView>> {
    caller.require("read")?;
    let user_id = parse_user_id(&user_id)?;
    let Some(user) = herald_db::users::get_user(&state.pool, user_id.as_str()).await? else {
        return Err(ApiError::not_found("user", user_id.as_str()));
    };
    Ok(Json(user_view(&state, user).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    /// `ios`, `android` or `web`.
    #[schema(example = "ios")]
    pub platform: String,
    /// `fcm`, `apns` or `webpush`.
    #[schema(example = "apns")]
    pub provider: String,
    /// The provider's device token. For Web Push: the browser's subscription as JSON
    /// (`JSON.stringify(subscription)`: `{"endpoint", "expirationTime", "keys": {"p256dh", "auth"}}`).
    pub token: String,
}

/// A device registration's fields, checked: known platform and provider,
/// a provider that serves that platform, a plain token.
pub(crate) fn checked_device(req: &RegisterDevice) -> ApiResult<(DevicePlatform, PushProvider, &str)> {
    let platform: DevicePlatform = req
        .platform
        .parse()
        .map_err(|e: UnknownValue| ApiError::invalid("platform", e.to_string()))?;
    let provider: PushProvider = req
        .provider
        .parse()
        .map_err(|e: UnknownValue| ApiError::invalid("provider", e.to_string()))?;
    let compatible = matches!(
        (platform, provider),
        (DevicePlatform::Ios, PushProvider::Apns | PushProvider::Fcm)
            | (DevicePlatform::Android, PushProvider::Fcm)
            | (DevicePlatform::Web, PushProvider::WebPush | PushProvider::Fcm)
    );
    if !compatible {
        return Err(ApiError::invalid(
            "provider",
            format!(
                "`{provider}` does not deliver to `{platform}` devices (ios: apns or fcm; android: fcm; web: webpush or fcm)"
            ),
        ));
    }
    let token = req.token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_CHARS || token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(
            "token",
            format!("must be 1 to {MAX_TOKEN_CHARS} characters without spaces or control characters"),
        ));
    }
    Ok((platform, provider, token))
}

/// Register a push device for a user (re-registering a token enables it again).
#[utoipa::path(
    post, path = "/v1/users/{user_id}/devices", tag = "users",
    params(("user_id" = String, Path, description = "The product's user id")),
    request_body = RegisterDevice,
    responses(
        (status = 201, description = "Registered", body = DeviceView),
        (status = 200, description = "Already registered; now active on this user", body = DeviceView),
        (status = 404, description = "No such user: create it with PUT first", body = ErrorBody),
        (status = 422, description = "A field is invalid", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn register_device(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    ApiJson(req): ApiJson<RegisterDevice>,
) -> ApiResult<impl IntoResponse> {
    caller.require("send")?;
    let user_id = parse_user_id(&user_id)?;
    let (platform, provider, token) = checked_device(&req)?;
    if herald_db::users::get_user(&state.pool, user_id.as_str())
        .await?
        .is_none()
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no user with id `{user_id}`: create it first with PUT /v1/users/{user_id}"),
        ));
    }
    let (device, created) = herald_db::users::register_device(
        &state.pool,
        user_id.as_str(),
        platform.as_str(),
        provider.as_str(),
        token,
    )
    .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(DeviceView::from(device))))
}

/// Remove a user's device.
#[utoipa::path(
    delete, path = "/v1/users/{user_id}/devices/{device_id}", tag = "users",
    params(
        ("user_id" = String, Path, description = "The product's user id"),
        ("device_id" = String, Path, description = "Device id (`dev_…`)"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "The user has no such device", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn delete_device(
    State(state): State<AppState>,
    caller: Caller,
    Path((user_id, device_id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require("send")?;
    let user_id = parse_user_id(&user_id)?;
    device_id.parse::<DeviceId>()?;
    if herald_db::users::delete_device(&state.pool, user_id.as_str(), &device_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("device of this user", &device_id))
    }
}
