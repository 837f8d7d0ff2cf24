//! Herald's HTTP API: validates, authenticates, writes Postgres, enqueues,
//! answers. Stateless: run as many replicas as needed.
//!
//! The router is built with `utoipa-axum`, so a route and its OpenAPI entry
//! are registered by the same call and cannot drift apart.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use herald_config::Settings;
use herald_queue::{QueueClient, QueueConfig, UserChanges};
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod changes;
pub mod error;
pub mod extract;
pub mod hub;
pub mod ingest;
pub mod key_cache;
pub mod routes;
pub mod user_token;

use error::ApiError;

/// What every handler shares: one pointer, so the clone axum makes for
/// every request (and every extractor) is one reference count, not one per
/// field (a field-by-field clone and drop on every request is a visible
/// share of the API's CPU during ingest).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The state behind [`AppState`].
pub struct Shared {
    pub pool: PgPool,
    pub queue: QueueClient,
    pub settings: Arc<Settings>,
    /// What the ingest path writes to (shared with the group commit).
    sinks: ingest::Sinks,
    /// Group commit for accepted notifications.
    pub ingestor: ingest::Ingestor,
    /// API keys authenticated recently (`HERALD_API_KEY_CACHE_SECS`).
    pub keys: Arc<key_cache::KeyCache>,
    /// Wakes requests waiting for a user's changes.
    pub hub: hub::Hub,
    /// Tells other processes whose rows changed (Redis pub/sub).
    pub changes: UserChanges,
    /// Cancelled when the server starts shutting down: waiting requests
    /// answer and live streams end at once (clients reconnect elsewhere)
    /// instead of holding the graceful shutdown open.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Stops the hub's subscriber when the last clone of the state goes.
    _subscriber: tokio_util::sync::DropGuard,
}

impl Shared {
    /// What the ingest path writes to.
    #[must_use]
    pub fn sinks(&self) -> &ingest::Sinks {
        &self.sinks
    }

    /// Says that `users`' rows changed, after the commit: wakes this
    /// process's waiters at once (even with Redis down) and other processes'
    /// through Redis. Never fails.
    pub fn users_changed(&self, users: &[&str]) {
        for user in users {
            self.hub.wake(user);
        }
        self.changes.changed(users.iter().map(|u| (*u).to_owned()));
    }
}

impl AppState {
    /// Builds the state without touching the network: the pool connects
    /// lazily and the queue client reconnects on its own, so the API starts
    /// (and reports not-ready) while a dependency is still coming up. Starts
    /// (on the current runtime) the group commit, the change publisher and
    /// the hub's event subscriber.
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        let pool = herald_db::connect_lazy(settings.database_url.expose(), settings.db_max_connections)
            .context("DATABASE_URL")?;
        let queue = QueueClient::new(QueueConfig::from_settings(&settings)).context("REDIS_URL")?;
        let hub = hub::Hub::default();
        let changes = UserChanges::start(queue.clone());
        let stop_subscriber = tokio_util::sync::CancellationToken::new();
        hub.start(queue.clone(), stop_subscriber.clone());
        let ingest_pool =
            herald_db::connect_lazy_planned_once(settings.database_url.expose(), ingest::INGEST_CONNECTIONS)
                .context("DATABASE_URL")?;
        let sinks = ingest::Sinks::new(ingest_pool, queue.clone(), hub.clone(), changes.clone());
        let ingestor = ingest::Ingestor::start(sinks.clone());
        Ok(Self(Arc::new(Shared {
            pool,
            queue,
            keys: Arc::new(key_cache::KeyCache::new(settings.api_key_cache)),
            settings: Arc::new(settings),
            sinks,
            ingestor,
            hub,
            changes,
            shutdown: tokio_util::sync::CancellationToken::new(),
            _subscriber: stop_subscriber.drop_guard(),
        })))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Herald", description = "Notification delivery: email, push and in-app, with retries and dead letters."),
    modifiers(&SecurityAddon),
    tags(
        (name = "notifications", description = "Send notifications and follow their delivery"),
        (name = "users", description = "Recipients and their devices"),
        (name = "clients", description = "For mobile and web apps, with a user token: inbox, status, read state, changes (long-poll and live stream)"),
        (name = "health", description = "Probes"),
        (name = "admin", description = "Operators: queues, delivery search, replays and purges (`admin` scope)"),
    )
)]
struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("hk_<prefix>_<secret>")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "user_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The routes and their OpenAPI document, from one registration.
pub fn api_router() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use routes::{admin, changes, health, me, notifications, users};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(notifications::create_notification))
        .routes(routes!(notifications::get_notification))
        .routes(routes!(users::put_user, users::get_user))
        .routes(routes!(users::register_device))
        .routes(routes!(users::delete_device))
        .routes(routes!(me::create_user_token))
        .routes(routes!(me::list_notifications))
        .routes(routes!(me::get_notification))
        .routes(routes!(me::mark_read))
        .routes(routes!(me::mark_unread))
        .routes(routes!(me::archive))
        .routes(routes!(me::read_all))
        .routes(routes!(me::stats))
        .routes(routes!(me::register_my_device))
        .routes(routes!(me::delete_my_device))
        .routes(routes!(changes::get_changes))
        .routes(routes!(changes::stream))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(admin::get_queues))
        .routes(routes!(admin::search_deliveries))
        .routes(routes!(admin::get_delivery))
        .routes(routes!(admin::create_replay, admin::list_replays))
        .routes(routes!(admin::get_replay))
        .routes(routes!(admin::cancel_replay))
        .routes(routes!(admin::create_purge))
        .split_for_parts()
}

/// The OpenAPI 3.1 document served at `/openapi.json`.
#[must_use]
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_router().1
}

/// Request ids are ULIDs, unless the caller sent a sane one of its own.
#[derive(Clone, Copy)]
struct MakeUlid;

impl MakeRequestId for MakeUlid {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&ulid::Ulid::new().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// A caller's `X-Request-Id` travels into logs, Postgres and Redis jobs:
/// keep it only if it is short and plain.
fn drop_unsafe_request_id(mut req: Request) -> Request {
    let ok = req.headers().get("x-request-id").is_none_or(|v| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= 64 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    });
    if !ok {
        req.headers_mut().remove("x-request-id");
    }
    req
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal(&"a request handler panicked").into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        "no such route; see /openapi.json for the API",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method; see /openapi.json",
    )
}

/// The whole application, with its middleware.
///
/// The middleware wraps the router once, outside it, rather than each
/// route through `Router::layer`: a layered route is a boxed copy of the
/// whole stack, cloned and freed on every request, which costs CPU per
/// notification and slows ingest (docs/performance.md).
pub fn app(
    state: AppState,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response, std::convert::Infallible>> + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let (router, doc) = api_router();
    let doc = Arc::new(doc);
    let max_body = state.settings.max_body_bytes;
    let router = router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = Arc::clone(&doc);
                async move { Json((*doc).clone()) }
            }),
        )
        .route("/admin", axum::routing::get(routes::admin::admin_page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    // Outermost first.
    tower::ServiceBuilder::new()
        .map_response(IntoResponse::into_response)
        // A plain function: axum's `middleware::map_request` would box a
        // future and clone the inner service for every request.
        .map_request(drop_unsafe_request_id)
        .layer(SetRequestIdLayer::x_request_id(MakeUlid))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let request_id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %request_id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .service(router)
}

/// Logs what would make Redis lose jobs: an eviction policy other than
/// `noeviction`, or no persistence.
pub async fn warn_about_redis(queue: &QueueClient) {
    match queue.durability_warnings().await {
        Ok(warnings) => {
            for w in warnings {
                tracing::warn!("{w}");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Redis unreachable at start-up; deliveries will wait in Postgres")
        }
    }
}

/// Connections the kernel holds for the API before it accepts them.
///
/// Live streams make reconnect storms part of normal operation: after a
/// restart or a network blip every client reconnects at once. With
/// tokio's default backlog (1,024) the accept queue overflows when
/// thousands of streams reconnect at once (`TcpExtListenOverflows`), and
/// each dropped handshake waits out TCP's retransmission backoff (1, 3, 7,
/// 15, 31, 63 s), so clients take minutes instead of seconds to be back
/// (docs/performance.md). The kernel caps it at
/// `net.core.somaxconn` (4,096 by default since Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4_096;

/// Binds the API's listener, with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`
/// (a restarted API rebinds while the old process's connections linger
/// in `TIME_WAIT`), as `TcpListener::bind` does apart from the backlog.
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    tracing::info!(%addr, "API listening");
    // Without TCP_NODELAY a response written in more than one segment can
    // wait for the client's delayed ACK (tens of milliseconds).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let stopping = state.shutdown.clone();
    let shutdown = async move {
        shutdown.await;
        stopping.cancel();
    };
    let served = axum::serve(listener, tower::make::Shared::new(app(state.clone())))
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving HTTP");
    // Serving has ended (on a graceful stop, every request was answered):
    // finish what the API owes the accepted ones (their Redis push, its
    // confirmation), within a bound, whatever ended it. What is left then
    // is the sweeper's, as after a crash.
    if tokio::time::timeout(FINISH_ACCEPTED, state.ingestor.finish(state.sinks()))
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?FINISH_ACCEPTED,
            "stopped before every accepted batch was pushed to Redis; the sweeper will enqueue the rest"
        );
    }
    served
}

/// How long a stopping API waits for the Redis pushes and confirmations
/// of the batches it already answered.
pub const FINISH_ACCEPTED: std::time::Duration = std::time::Duration::from_secs(5);
