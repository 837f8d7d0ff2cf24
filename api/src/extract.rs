//! Extractors that turn every bad request into an [`ApiError`] with a
//! message saying what to fix: JSON bodies ([`ApiJson`], built on
//! [`JsonBody`] and [`parse_json`], which the create route calls itself to
//! check its caller's scope between the two) and API-key authentication;
//! and [`OneHeader`], one request header without copying the others.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use herald_db::api_keys::ApiKey;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;

/// A JSON body parsed into `T`, with rejections in Herald's error shape:
/// 415 without a JSON content type, 413 over `HERALD_MAX_BODY_BYTES`, 400
/// `malformed_json` when the body is not JSON at all, 422 `invalid_body`
/// naming the field that does not fit ([`JsonBody`] and [`parse_json`]).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let JsonBody(body) = JsonBody::from_request(req, state).await?;
        parse_json(&body)?.shape().map(Self)
    }
}

fn unsupported_media_type() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the body as JSON with the header `Content-Type: application/json`",
    )
}

/// 400 `malformed_json`: the body is not JSON at all.
pub(crate) fn malformed_json(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "malformed_json",
        format!("the body is not valid JSON: {why}"),
    )
}

fn invalid_body(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
        format!("the body does not match the expected shape: {why}"),
    )
}

fn bytes_rejection(e: &BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this server accepts (HERALD_MAX_BODY_BYTES)",
        )
    } else {
        ApiError::new(e.status(), "bad_request", e.body_text())
    }
}

/// Whether the request says its body is JSON, as `axum::Json` decides it:
/// `application/json`, or any `application/…+json`.
fn json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|m| {
            m.type_() == "application" && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"))
        })
}

/// A JSON request body as sent: the content type and size are checked
/// here, the body is neither parsed nor copied ([`parse_json`] does that).
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            return Err(unsupported_media_type());
        }
        match Bytes::from_request(req, state).await {
            Ok(body) => Ok(Self(body)),
            Err(e) => Err(bytes_rejection(&e)),
        }
    }
}

/// A [`JsonBody`] that is JSON, parsed once into `T` if it has `T`'s shape.
pub struct ParsedJson<'a, T> {
    body: &'a [u8],
    typed: Result<T, serde_json::Error>,
}

/// Parses a JSON body straight into `T`, without tracking where in the
/// document the parser is (only a bad request needs the path, so only it
/// pays for `serde_path_to_error`). Err is 400 `malformed_json` when
/// the body is not JSON at all, even where a field before the syntax error
/// has the wrong type; whether it has `T`'s shape is [`ParsedJson::shape`]'s
/// answer, so a route can check other things (its caller's scope) between
/// telling malformed JSON apart and checking the shape.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<ParsedJson<'_, T>, ApiError> {
    let typed = serde_json::from_slice::<T>(body);
    if typed.is_err()
        && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body)
    {
        return Err(malformed_json(&e.to_string()));
    }
    Ok(ParsedJson { body, typed })
}

impl<T: DeserializeOwned> ParsedJson<'_, T> {
    /// The value, or 422 `invalid_body` naming the field that does not fit
    /// (the body parsed again, this time tracking the path: only bad
    /// requests pay for it).
    pub fn shape(self) -> Result<T, ApiError> {
        let first = match self.typed {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let mut de = serde_json::Deserializer::from_slice(self.body);
        let why = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Err(e) => e.to_string(),
            // The same parse failed a moment ago; say what it said.
            Ok(_) => first.to_string(),
        };
        Err(invalid_body(&why))
    }
}

/// The name of a header a route reads through [`OneHeader`].
pub trait NamedHeader {
    const NAME: HeaderName;
}

/// One request header's value as sent, taken alone: axum's `HeaderMap`
/// extractor copies every header of the request to read one. The route
/// checks the value itself, so its errors come in the route's order.
pub struct OneHeader<N>(pub Option<HeaderValue>, pub PhantomData<N>);

impl<N: NamedHeader, S: Send + Sync> FromRequestParts<S> for OneHeader<N> {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.headers.get(N::NAME).cloned(), PhantomData))
    }
}

/// `Idempotency-Key`, read by `POST /v1/notifications`.
pub enum IdempotencyKey {}

impl NamedHeader for IdempotencyKey {
    const NAME: HeaderName = HeaderName::from_static("idempotency-key");
}

/// `If-None-Match`, read by the clients' polled routes.
pub enum IfNoneMatch {}

impl NamedHeader for IfNoneMatch {
    const NAME: HeaderName = axum::http::header::IF_NONE_MATCH;
}

/// `Last-Event-ID`, sent by a reconnecting live stream (`GET /v1/me/stream`).
pub enum LastEventId {}

impl NamedHeader for LastEventId {
    const NAME: HeaderName = HeaderName::from_static("last-event-id");
}

/// The API key that authenticated this request (shared with the key
/// cache: no copy per request).
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<ApiKey>);

impl Caller {
    /// Forbids the request unless the key has `scope` (`admin` has all).
    pub fn require(&self, scope: &'static str) -> Result<(), ApiError> {
        if self.0.has_scope(scope) || self.0.has_scope("admin") {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this API key lacks the `{scope}` scope; use a key created with it"),
            ))
        }
    }

    #[must_use]
    pub fn key_id(&self) -> &str {
        &self.0.id
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim);
        if token.is_some_and(crate::user_token::looks_like_user_token) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "user_token_not_allowed",
                "user tokens reach only /v1/me routes; this route needs an API key",
            ));
        }
        let Some(token) = token else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "send an API key as `Authorization: Bearer hk_…`",
            ));
        };
        if let Some(key) = state.keys.get(token) {
            return Ok(Self(key));
        }
        match herald_db::api_keys::authenticate(&state.pool, token).await? {
            Some(key) => {
                let key = Arc::new(key);
                state.keys.put(token, &key);
                Ok(Self(key))
            }
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "the API key is unknown, malformed or revoked",
            )),
        }
    }
}

/// A caller whose key has the `admin` scope. Checked before the body is
/// read, so a key without it gets its 403 whatever it sent.
#[derive(Debug, Clone)]
pub struct AdminCaller(pub Arc<ApiKey>);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require("admin")?;
        Ok(Self(caller.0))
    }
}
