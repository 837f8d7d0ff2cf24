//! Lazily (re)connected Redis connections, backoff and outage logging.
//!
//! Nothing here connects at construction: the API must start and keep
//! accepting while Redis is down, and workers must outlive any outage.

use std::time::{Duration, Instant};

use rand::Rng;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion, RedisError, RedisResult};

use crate::QueueError;
use crate::config::redact_url;

pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds how long a hung Redis (or a half-open TCP connection) can stall a
/// command before the connection is dropped and rebuilt.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client for `url`; `resp3` for the wake-up subscription (RESP3 lets one
/// connection both subscribe and run `CLIENT SETNAME`/`PING`).
pub(crate) fn open_client(url: &str, resp3: bool) -> Result<Client, QueueError> {
    let mut info = url.into_connection_info().map_err(QueueError::InvalidUrl)?;
    if resp3 {
        let redis = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        info = info.set_redis_settings(redis);
    }
    Client::open(info).map_err(QueueError::InvalidUrl)
}

/// Names a fresh connection (`CLIENT SETNAME`), so an operator (or a test)
/// can tell in `CLIENT LIST` whose it is.
pub(crate) async fn set_name(conn: &mut MultiplexedConnection, name: &str) -> RedisResult<()> {
    redis::cmd("CLIENT").arg("SETNAME").arg(name).query_async(conn).await
}

pub(crate) fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
}

/// One multiplexed connection, made on first use and rebuilt after errors.
pub(crate) struct Conn {
    client: Client,
    name: String,
    current: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl Conn {
    pub fn new(client: Client, name: String) -> Self {
        Self {
            client,
            name,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The current connection, or a new one. Cheap when connected: a
    /// multiplexed connection is a handle that is cloned, not a socket.
    pub async fn get(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut current = self.current.lock().await;
        if let Some(conn) = current.as_ref() {
            return Ok(conn.clone());
        }
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await?;
        set_name(&mut conn, &self.name).await?;
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the connection after an error so the next use reconnects
    /// (a killed or timed-out connection never recovers by itself).
    pub async fn reset(&self) {
        *self.current.lock().await = None;
    }
}

/// Whether retrying on a fresh connection may help.
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
}

/// Capped exponential backoff with jitter, so that many workers coming back
/// after an outage do not hit Redis in lockstep.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);

    pub fn new() -> Self {
        Self { next: Self::MIN }
    }

    pub fn reset(&mut self) {
        self.next = Self::MIN;
    }

    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(rand::rng().random_range(0.75..1.25))
    }
}

/// Logs an outage once when it starts and once when it ends, instead of once
/// per failed retry.
pub(crate) struct Outage {
    what: &'static str,
    since: Option<Instant>,
}

impl Outage {
    pub fn new(what: &'static str) -> Self {
        Self { what, since: None }
    }

    pub fn failed(&mut self, worker: &str, url: &str, err: &dyn std::fmt::Display) {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!(
                worker,
                redis = %redact_url(url),
                error = %err,
                "{}: Redis unavailable; retrying with backoff", self.what
            );
        } else {
            tracing::debug!(worker, error = %err, "{}: Redis still unavailable", self.what);
        }
    }

    pub fn recovered(&mut self, worker: &str) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                worker,
                outage_ms = since.elapsed().as_millis() as u64,
                "{}: Redis reachable again",
                self.what
            );
        }
    }
}
