//! Liveness and readiness probes.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// The process is up (no dependency is checked).
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// `ok` or the error.
    pub postgres: String,
    /// `ok` or the error. Redis down does not stop accepting, but is reported.
    pub redis: String,
}

/// Postgres and Redis answer. 503 when Postgres does not (the API cannot
/// accept without it); Redis being down is reported but still ready,
/// because accepted deliveries wait in Postgres until it returns.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 503, description = "Postgres unavailable", body = Readiness),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let (pg, redis) = tokio::join!(herald_db::ping(&state.pool), state.queue.ping());
    let postgres = pg.as_ref().map_or_else(|e| e.to_string(), |()| "ok".to_owned());
    let redis = redis.as_ref().map_or_else(|e| e.to_string(), |()| "ok".to_owned());
    let ready = pg.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" },
            postgres,
            redis,
        }),
    )
}
