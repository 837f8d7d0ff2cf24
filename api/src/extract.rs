//! Extractors that turn every bad request into an [`ApiError`] with a
//! message saying what to fix: JSON bodies and API-key authentication;
//! and [`OneHeader`], one request header without copying the others.

use std::marker::PhantomData;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use herald_db::api_keys::ApiKey;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;

/// `axum::Json`, with rejections in Herald's error shape.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(r: &JsonRejection) -> ApiError {
    match r {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with the header `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(e) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {}", serde_source(e)),
        ),
        JsonRejection::JsonDataError(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("the body does not match the expected shape: {}", serde_source(e)),
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than this server accepts (HERALD_MAX_BODY_BYTES)",
        ),
        other => ApiError::new(other.status(), "bad_request", other.body_text()),
    }
}

/// The innermost message of a JSON error: serde's, with its path and
/// position, without axum's generic prefix.
fn serde_source(e: &dyn std::error::Error) -> String {
    let mut cur: &dyn std::error::Error = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
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
