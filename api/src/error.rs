//! One error type for every route, one JSON shape for every error:
//! `{"error": {"code", "message", "details"}}`.
//!
//! Codes are stable (clients switch on them); messages say what to fix.
//! A 500 is opaque to the caller and logged once, here.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::InvalidField;
use herald_db::DbError;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code, e.g. `validation_failed`.
    pub code: &'static str,
    /// What went wrong and what to change.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    #[must_use]
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no {what} with id `{id}`"))
    }

    /// A field the caller must fix, as a 422 naming the field.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("{field}: {message}"),
        )
        .with_details(serde_json::json!({ "field": field, "reason": message }))
    }

    /// A search, replay or purge filter with a bad value, as a 400 naming
    /// the field (`details.field`).
    pub fn invalid_filter(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(StatusCode::BAD_REQUEST, "invalid_filter", format!("{field}: {message}"))
            .with_details(serde_json::json!({ "field": field, "reason": message }))
    }

    /// An unexpected failure: logged here, once, and opaque to the caller.
    pub fn internal(err: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "something went wrong on our side; it has been logged",
        )
    }
}

/// A malformed prefixed id (`ntf_…`, `dlv_…`, `dev_…`, …): a 400 whose
/// message names the kind of id expected.
impl From<herald_core::ParseIdError> for ApiError {
    fn from(e: herald_core::ParseIdError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_id", e.to_string())
    }
}

impl From<InvalidField> for ApiError {
    fn from(e: InvalidField) -> Self {
        Self::invalid(e.field, e.message)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        Self::from_db(&e)
    }
}

impl ApiError {
    /// The answer to a database error, also for one shared by a batch's
    /// requests. Unavailable is a 503 (`database_unavailable`, with
    /// `Retry-After`); its message says whether the request was stored:
    /// not at all, or, when the connection failed while the write was
    /// committing, perhaps (`details.stored` = `"unknown"`), in which case
    /// a retry with the same `Idempotency-Key` is the safe one.
    pub fn from_db(e: &DbError) -> Self {
        match e {
            DbError::Unavailable(inner) => {
                tracing::warn!(error = %inner, "database unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable; retry shortly (nothing was stored)",
                )
            }
            DbError::InDoubt(inner) => {
                tracing::warn!(error = %inner, "database unavailable while committing");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database became unavailable while this request was being stored, so it may have \
                     been stored; retry with the same Idempotency-Key, which answers with the first 202 if \
                     it was, or check before sending it again",
                )
                .with_details(serde_json::json!({ "stored": "unknown" }))
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                details: self.details,
            },
        };
        let mut res = (self.status, Json(body)).into_response();
        if retry {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
