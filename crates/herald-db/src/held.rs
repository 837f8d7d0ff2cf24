//! Connections a hot path keeps between its statements.
//!
//! sqlx tests every connection given back to its pool with a ping: a Sync
//! message and its answer, one more round trip after every statement, with
//! the Postgres backend woken to answer it and the connection unusable
//! until it has. The batchers run one statement after another on the same
//! few connections, so they take them from a [`Held`] instead: a connection
//! whose statement succeeded goes straight back to the `Held`, unpinged;
//! one whose statement failed, or whose future was dropped half way, goes
//! back to sqlx's pool by the usual path, which tests it and discards it if
//! it is broken. A connection that sat unused for [`PING_IF_IDLE_FOR`] is
//! pinged before its next statement, as the pool does
//! ([`connect_lazy`](crate::connect_lazy)), and one kept for
//! [`RECYCLE_AFTER`] goes back to the pool, which closes connections past
//! their lifetime (sqlx's default: 30 minutes), so a kept connection does
//! not outlive what the pool would allow.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use crate::{ACQUIRE_TIMEOUT, PING_IF_IDLE_FOR, Result};

/// Connections kept, each with when it was first taken from the pool and
/// when it was last given back.
type Kept = Arc<Mutex<Vec<Idle>>>;

struct Idle {
    conn: PoolConnection<Postgres>,
    taken: Instant,
    since: Instant,
}

/// A connection kept this long is given back to the pool instead of used.
pub const RECYCLE_AFTER: Duration = Duration::from_secs(30 * 60);

/// A pool's connections kept between statements. Cheap to clone; clones
/// share the kept connections.
#[derive(Clone)]
pub struct Held {
    pool: PgPool,
    idle: Kept,
}

impl Held {
    /// Keeps connections of `pool` (at most as many as run statements at
    /// once: each statement takes one and gives it back).
    #[must_use]
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            idle: Arc::default(),
        }
    }

    /// A kept connection if there is one (pinged first if it sat unused a
    /// while, for at most [`ACQUIRE_TIMEOUT`], as the pool's own acquire:
    /// a peer gone silent is given up, not waited on until TCP gives up),
    /// else one from the pool.
    pub async fn acquire(&self) -> Result<HeldConn> {
        loop {
            let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(Idle { mut conn, taken, since }) = kept else {
                break;
            };
            if taken.elapsed() >= RECYCLE_AFTER {
                // Back to the pool, which closes it once past its lifetime.
                drop(conn);
                continue;
            }
            if since.elapsed() < PING_IF_IDLE_FOR
                || matches!(tokio::time::timeout(ACQUIRE_TIMEOUT, conn.ping()).await, Ok(Ok(())))
            {
                return Ok(self.wrap(conn, taken));
            }
            // Broken while it sat here (Postgres restarted): close it, try
            // the next.
            conn.close_on_drop();
        }
        let conn = self.pool.acquire().await?;
        Ok(self.wrap(conn, Instant::now()))
    }

    /// Connections kept now (for tests).
    #[must_use]
    pub fn kept(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn wrap(&self, conn: PoolConnection<Postgres>, taken: Instant) -> HeldConn {
        HeldConn {
            conn: Some(conn),
            taken,
            home: Arc::clone(&self.idle),
        }
    }
}

/// A connection taken from a [`Held`]. Call [`keep`](Self::keep) once its
/// statement succeeded; dropped without it, it goes back to the pool,
/// which tests it.
pub struct HeldConn {
    conn: Option<PoolConnection<Postgres>>,
    taken: Instant,
    home: Kept,
}

impl HeldConn {
    /// The statement succeeded: the connection is ready for the next one.
    pub fn keep(mut self) {
        if let Some(conn) = self.conn.take() {
            self.home.lock().unwrap_or_else(|e| e.into_inner()).push(Idle {
                conn,
                taken: self.taken,
                since: Instant::now(),
            });
        }
    }
}

impl Deref for HeldConn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("a HeldConn holds its connection until kept or dropped")
    }
}

impl DerefMut for HeldConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a HeldConn holds its connection until kept or dropped")
    }
}
