//! Herald's Postgres layer. Every SQL statement Herald runs lives in this
//! crate, in a function named for what it does.
//!
//! Two rules shape the statements:
//! - status only moves forward, and the check is in the `WHERE` clause
//!   (`status IN (…) AND attempt = $n`), never in application memory;
//! - writes that belong together are one statement (CTEs) or one
//!   transaction, so a crash leaves either all of it or none.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub mod admin;
pub mod api_keys;
pub mod batch;
pub mod deliveries;
pub mod held;
pub mod inbox;
pub mod notifications;
pub mod replays;
pub mod sweep;
pub mod users;

/// The migrations in `migrations/` at the top of the repository.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Postgres cannot be reached or is restarting: callers answer 503 and retry.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The connection failed while a statement that commits (or a
    /// `COMMIT`) was under way: the write may or may not have committed
    /// (Postgres may have made it durable just before the connection
    /// went). Unavailable all the same: callers answer 503, saying so.
    #[error("database unavailable while committing (the write may have committed): {0}")]
    InDoubt(#[source] sqlx::Error),
    /// A unique constraint was violated (the constraint's name is given).
    #[error("unique constraint `{constraint}` violated")]
    Conflict { constraint: String },
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
    #[error("could not apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
}

impl DbError {
    #[must_use]
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::InDoubt(_))
    }

    /// Whether a unique constraint of this name was violated.
    #[must_use]
    pub fn is_conflict_on(&self, name: &str) -> bool {
        matches!(self, Self::Conflict { constraint } if constraint == name)
    }

    /// For the error of a statement that commits, or of a `COMMIT`: an
    /// unavailable database there leaves the write in doubt
    /// ([`DbError::InDoubt`]). Other errors are kept as they are.
    #[must_use]
    pub fn while_committing(self) -> Self {
        match self {
            Self::Unavailable(e) => Self::InDoubt(e),
            other => other,
        }
    }
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(e),
            sqlx::Error::Database(db) => {
                // 57P01..03: admin shutdown, crash shutdown, cannot connect now;
                // 53300: too many connections; 08*: connection exceptions.
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                if code.starts_with("57P") || code.starts_with("08") || code == "53300" {
                    Self::Unavailable(e)
                } else if code == "23505" {
                    Self::Conflict {
                        constraint: db.constraint().unwrap_or_default().to_owned(),
                    }
                } else {
                    Self::Other(e)
                }
            }
            _ => Self::Other(e),
        }
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// Opens a pool. It connects lazily, so a process can start (and answer
/// `/readyz` with "not ready") while Postgres is still coming up.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool> {
    Ok(pool_options(max_connections).connect_lazy_with(connect_options(url)?))
}

/// [`connect_lazy`] for the workers: every statement on these connections
/// is planned with its parameters' values and the table's current size on
/// each execution (`plan_cache_mode = force_custom_plan`), while still
/// prepared once (one round trip per statement, not two).
///
/// The workers' other statements (sweeps, replays, enqueue marks)
/// run against a table whose contents swing from empty to a million
/// pending rows and back. A generic plan cached at the wrong
/// moment (a new deployment, a drained backlog) seq-scans the table for
/// every batch until the next analyze, to find a few rows
/// (`herald_db::deliveries`).
pub fn connect_lazy_planned_per_call(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = connect_options(url)?.options([("plan_cache_mode", "force_custom_plan")]);
    Ok(pool_options(max_connections).connect_lazy_with(options))
}

/// [`connect_lazy`] for the API's group commit: every statement on these
/// connections is planned once, when first prepared
/// (`plan_cache_mode = force_generic_plan`), and that plan reads tables by
/// index only (`enable_seqscan = off`).
///
/// Only statements shaped for one plan run here: the accept statement
/// ([`notifications::ACCEPT_SQL`]) and its push confirmations in the API,
/// and the workers' claims, results and in-app deliveries
/// ([`deliveries::CLAIM_SQL`], [`deliveries::RECORD_SQL`],
/// [`deliveries::DELIVER_IN_APP_SQL`]).
/// Planning them costs a large share of running them for small batches
/// (docs/performance.md), and each is shaped so that one
/// plan suits every batch size. With sequential scans off, and every table
/// reached by a condition on its key that no join can replace, that plan
/// does not depend on how many rows there were when it was made: on empty
/// tables it still looks each one up by index (`tests/it/db/accept.rs`,
/// `tests/it/db/fencing.rs`).
pub fn connect_lazy_planned_once(url: &str, max_connections: u32) -> Result<PgPool> {
    let options = connect_options(url)?.options([("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")]);
    Ok(pool_options(max_connections).connect_lazy_with(options))
}

fn connect_options(url: &str) -> Result<PgConnectOptions> {
    Ok(url
        .parse::<PgConnectOptions>()
        .map_err(|e| DbError::InvalidUrl(e.to_string()))?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // sqlx pings every connection it hands out: a round trip (and a
        // Postgres wake-up) before every statement on the hot paths. Only a
        // connection idle for a while is worth checking; one used in the
        // last second that broke since fails its statement, which callers
        // already treat as "database unavailable" (503, or the job handed
        // back), and the pool opens a fresh one.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < PING_IF_IDLE_FOR {
                    return Ok(true);
                }
                // A broken connection is closed and another one taken.
                Ok(sqlx::Connection::ping(conn).await.is_ok())
            })
        })
}

/// Longest wait for a connection from a pool (including its ping), and for
/// the ping of a kept one (`held`).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// A pooled connection idle at least this long is pinged before use.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Creates the database named in `url` if it does not exist (development
/// and tests: production databases are provisioned by their owners).
pub async fn create_database_if_missing(url: &str) -> Result<()> {
    let parsed = url::Url::parse(url).map_err(|e| DbError::InvalidUrl(e.to_string()))?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbError::InvalidUrl(format!(
            "database name `{name}` must be letters, digits and underscores"
        )));
    }
    let mut admin_url = parsed.clone();
    admin_url.set_path("/postgres");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(admin_url.as_str())
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&admin)
        .await?;
    if !exists {
        // The name was checked above to be a plain identifier.
        match sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    admin.close().await;
    Ok(())
}

/// Applies pending migrations. Safe to call from every process at start-up:
/// sqlx serialises concurrent runs with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    // Every process migrates at start-up, so during a rolling deploy an
    // older binary (a worker not yet replaced) restarts against a database
    // a newer one already migrated. It must start, not crash-loop on
    // migrations it does not know: Herald's migrations keep the previous
    // release's statements working (expand first, remove a release later).
    let mut migrator = sqlx::migrate!("../../migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await?;
    Ok(())
}

/// Applies migrations, retrying while Postgres comes up (every process
/// calls this at start-up, so start order does not matter).
pub async fn migrate_with_retry(pool: &PgPool, patience: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match migrate(pool).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "migrations not applied yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One cheap round trip, for `/readyz`.
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(pool).await?;
    Ok(())
}
