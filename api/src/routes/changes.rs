//! What changed for the signed-in user: `GET /v1/me/changes` (a page, or a
//! long-poll with `wait`) and `GET /v1/me/stream` (Server-Sent Events).
//!
//! Both read Postgres, the source of truth, from a cursor
//! ([`crate::changes`]); the hub ([`crate::hub`]) only says *when* to read
//! again. No pool connection is held while a request waits: each query
//! takes one and gives it back, so idle clients cost a task and a watch
//! receiver each.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::time::Instant;
use utoipa::ToSchema;

use crate::AppState;
use crate::changes::{Change, Cursor, MAX_REMEMBERED, Page, SETTLE, fetch_limit, next_page, now_cursor};
use crate::error::{ApiResult, ErrorBody};
use crate::extract::{LastEventId, OneHeader};
use crate::hub::{DEGRADED_POLL, Waiter};
use crate::routes::me::bad_query;
use crate::user_token::{Me, Session};

/// Longest `wait`, in seconds.
const MAX_WAIT_SECS: u64 = 30;
/// How long a waiter pauses when its cursor is full of unsettled rows.
const STALLED_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, ToSchema)]
pub struct ChangesBody {
    /// Oldest change first. Each is the row's *current* state, so applying
    /// one twice is harmless.
    pub changes: Vec<Change>,
    /// Pass as `since` next time (also after an empty answer: it moves on).
    pub next_cursor: String,
    /// More changes are ready: ask again at once with `next_cursor`.
    pub has_more: bool,
}

fn settle_window() -> Duration {
    SETTLE.to_std().unwrap_or(Duration::from_secs(5))
}

/// One page from `cursor`, or the "now" cursor without one.
async fn fetch_page(state: &AppState, user: &str, cursor: Option<&Cursor>, limit: usize) -> ApiResult<Page> {
    let Some(cursor) = cursor else {
        let page =
            herald_db::inbox::changes_since(&state.pool, user, None, settle_window(), MAX_REMEMBERED as i64).await?;
        return Ok(Page {
            rows: Vec::new(),
            next: now_cursor(&page),
            has_more: false,
            stalled: false,
        });
    };
    let fetch = i64::try_from(fetch_limit(cursor, limit)).unwrap_or(i64::MAX);
    let page = herald_db::inbox::changes_since(&state.pool, user, Some(&cursor.from), settle_window(), fetch).await?;
    Ok(next_page(cursor, limit, page))
}

fn decode_cursor(field: &str, s: &str) -> ApiResult<Cursor> {
    Cursor::decode(s).ok_or_else(|| {
        bad_query(
            field,
            "is not a changes cursor (use next_cursor or the last event id as given)",
        )
    })
}

struct ChangesQuery {
    since: Option<Cursor>,
    wait: Duration,
    limit: usize,
}

fn changes_query(params: &HashMap<String, String>) -> ApiResult<ChangesQuery> {
    let mut q = ChangesQuery {
        since: None,
        wait: Duration::ZERO,
        limit: 100,
    };
    for (k, v) in params {
        match k.as_str() {
            "since" => q.since = Some(decode_cursor("since", v)?),
            "wait" => {
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|s| *s <= MAX_WAIT_SECS)
                    .ok_or_else(|| bad_query("wait", "must be a whole number of seconds from 0 to 30"))?;
                q.wait = Duration::from_secs(secs);
            }
            "limit" => {
                q.limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| bad_query("limit", "must be a whole number from 1 to 100"))?;
            }
            other => {
                return Err(bad_query(
                    other,
                    "is not a parameter of this route (since, wait, limit)",
                ));
            }
        }
    }
    Ok(q)
}

/// How long a waiter may sleep before it queries again even without a
/// wake-up: never long while events cannot arrive.
fn pause(state: &AppState, stalled: bool) -> Option<Duration> {
    if stalled {
        Some(STALLED_PAUSE)
    } else if !state.hub.connected() {
        Some(DEGRADED_POLL)
    } else {
        None
    }
}

/// Waits for a wake-up, `until`, the end of `pause`, or the server's
/// shutdown; `false` for the shutdown.
async fn wait_for_change(state: &AppState, waiter: &mut Waiter, until: Instant, pause: Option<Duration>) -> bool {
    let until = pause.map_or(until, |p| until.min(Instant::now() + p));
    tokio::select! {
        () = waiter.woken() => true,
        () = tokio::time::sleep_until(until) => true,
        () = state.shutdown.cancelled() => false,
    }
}

/// What changed for the signed-in user since a cursor.
///
/// A change is the current state of a row: a `delivery` (a new notification
/// shows up as its deliveries' first status, then every status change) or
/// an `inbox_item` (once delivered in-app, then read, unread, archived).
/// Rows are snapshots, so a rare repeat is harmless; a change is never
/// skipped, even one that commits late with an older timestamp.
///
/// Without `since`: no changes and a cursor meaning "now". With `wait`,
/// answers as soon as something changes (in any API replica or worker), or
/// empty at the deadline.
#[utoipa::path(
    get, path = "/v1/me/changes", tag = "clients",
    params(
        ("since" = Option<String>, Query, description = "`next_cursor` of the previous answer; omit for \"now\""),
        ("wait" = Option<u32>, Query, description = "Seconds (0 to 30) to wait for a change when there is none yet"),
        ("limit" = Option<u32>, Query, description = "1 to 100, default 100"),
    ),
    responses(
        (status = 200, description = "Changes, oldest first, and the cursor to continue from", body = ChangesBody),
        (status = 400, description = "A bad parameter (named), e.g. a cursor that is not one", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or wrongly signed user token", body = ErrorBody),
        (status = 403, description = "An API key instead of a user token", body = ErrorBody),
    ),
    security(("user_token" = []))
)]
pub async fn get_changes(
    State(state): State<AppState>,
    Me(user): Me,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Json<ChangesBody>> {
    let Query(params) = query.map_err(|e| bad_query("query", e.body_text()))?;
    let q = changes_query(&params)?;
    let deadline = Instant::now() + q.wait;
    // Subscribed before the first query, so nothing slips in between.
    let mut waiter = (!q.wait.is_zero()).then(|| state.hub.subscribe(user.as_str()));
    let mut cursor = q.since;
    loop {
        if let Some(w) = waiter.as_mut() {
            w.mark_seen();
        }
        let page = fetch_page(&state, user.as_str(), cursor.as_ref(), q.limit).await?;
        let ready = !page.rows.is_empty() || (page.has_more && !page.stalled);
        match waiter.as_mut() {
            Some(w) if !ready && Instant::now() < deadline && !state.shutdown.is_cancelled() => {
                let p = pause(&state, page.stalled);
                cursor = Some(page.next);
                // On shutdown, one last query answers with what there is.
                if !wait_for_change(&state, w, deadline, p).await {
                    waiter = None;
                }
            }
            _ => {
                return Ok(Json(ChangesBody {
                    changes: page.rows.into_iter().map(Change::from).collect(),
                    next_cursor: page.next.encode(),
                    has_more: page.has_more,
                }));
            }
        }
    }
}

/// A live stream of the signed-in user's changes (Server-Sent Events).
///
/// Events: `ready` first (with an `id` when the stream starts from "now",
/// which is when the response starts: a change after it is sent),
/// then one `delivery` or `inbox_item` event per change, `data` being the
/// same JSON as in `/v1/me/changes`. The last event of each batch carries
/// `id:` = the cursor after it: reconnect with `Last-Event-ID` (or
/// `?since=`) to miss nothing. Idle streams get a comment every
/// `HERALD_SSE_HEARTBEAT_SECS`. The stream ends with a `token_expired`
/// event when the user token expires: reconnect with a fresh token.
#[utoipa::path(
    get, path = "/v1/me/stream", tag = "clients",
    params(
        ("since" = Option<String>, Query, description = "A cursor to resume from (`Last-Event-ID` wins if both are sent)"),
        ("Last-Event-ID" = Option<String>, Header, description = "The `id` of the last event received"),
    ),
    responses(
        (status = 200, description = "`text/event-stream` of `ready`, `delivery`, `inbox_item` and `token_expired` events", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad cursor or parameter (named)", body = ErrorBody),
        (status = 401, description = "Missing, malformed, expired or wrongly signed user token", body = ErrorBody),
        (status = 403, description = "An API key instead of a user token", body = ErrorBody),
    ),
    security(("user_token" = []))
)]
pub async fn stream(
    State(state): State<AppState>,
    session: Session,
    OneHeader(last_event_id, _): OneHeader<LastEventId>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let Query(params) = query.map_err(|e| bad_query("query", e.body_text()))?;
    let mut cursor = None;
    for (k, v) in &params {
        match k.as_str() {
            "since" => cursor = Some(decode_cursor("since", v)?),
            other => return Err(bad_query(other, "is not a parameter of this route (since)")),
        }
    }
    // A browser reconnecting sends the header with the original URL: the
    // header is the newer of the two.
    if let Some(v) = last_event_id {
        let v = v.to_str().map_err(|_| bad_query("Last-Event-ID", "is not a cursor"))?;
        if !v.is_empty() {
            cursor = Some(decode_cursor("Last-Event-ID", v)?);
        }
    }
    let remaining = session
        .expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let heartbeat = state.settings.sse_heartbeat;
    let user = session.user.to_string();
    // Subscribed before any query: a change that commits meanwhile wakes it.
    let waiter = state.hub.subscribe(&user);
    // Without a cursor the stream starts from "now", fixed before the 200
    // goes out: every change the client could expect after seeing it is
    // sent. Were "now" taken by the stream's first query, which runs after
    // the headers (later still on a busy API), a change made in between
    // would count as already seen.
    let fresh = cursor.is_none();
    let cursor = match cursor {
        Some(cursor) => cursor,
        None => Box::pin(fetch_page(&state, &user, None, 100)).await?.next,
    };
    let live = Live {
        waiter,
        fresh,
        state,
        user,
        cursor,
        expires: Instant::now() + remaining,
        pending: VecDeque::new(),
        query_now: true,
        stalled: false,
        started: false,
        done: false,
    };
    let events = futures::stream::unfold(live, |mut live| async move { live.next().await.map(|e| (Ok(e), live)) });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat")))
}

/// One stream's state; dropped (with its waiter) when the client goes.
struct Live {
    state: AppState,
    user: String,
    waiter: Waiter,
    cursor: Cursor,
    /// Started without a cursor: the `ready` event carries the "now" one.
    fresh: bool,
    expires: Instant,
    pending: VecDeque<Event>,
    /// The last page said more is ready: query without waiting.
    query_now: bool,
    started: bool,
    /// The last page stopped on unsettled rows (see [`Page::stalled`]).
    stalled: bool,
    done: bool,
}

impl Live {
    fn json(change: &Change) -> String {
        // Plain structs of strings, numbers and timestamps: serialising
        // them cannot fail.
        serde_json::to_string(change).unwrap_or_default()
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            if Instant::now() >= self.expires {
                self.done = true;
                return Some(Event::default().event("token_expired").data(
                    r#"{"message":"the user token has expired; reconnect with a fresh one and Last-Event-ID"}"#,
                ));
            }
            if !self.query_now {
                let pause = pause(&self.state, self.stalled);
                if !wait_for_change(&self.state, &mut self.waiter, self.expires, pause).await {
                    // The server is stopping: the client resumes elsewhere
                    // from its last id.
                    return None;
                }
            }
            self.waiter.mark_seen();
            let Page {
                rows,
                next,
                has_more,
                stalled,
            } = match Box::pin(fetch_page(&self.state, &self.user, Some(&self.cursor), 100)).await {
                Ok(p) => p,
                Err(e) => {
                    // Already logged by ApiError; the client reconnects
                    // with its last id and misses nothing.
                    tracing::debug!(code = e.code, "ending a live stream: a query failed");
                    self.done = true;
                    continue;
                }
            };
            if !self.started {
                self.started = true;
                let ready = Event::default().event("ready").data("{}");
                self.pending
                    .push_back(if self.fresh { ready.id(next.encode()) } else { ready });
            }
            let n = rows.len();
            for (i, row) in rows.into_iter().enumerate() {
                let change = Change::from(row);
                let mut event = Event::default().event(change.event_name()).data(Self::json(&change));
                if i + 1 == n {
                    event = event.id(next.encode());
                }
                self.pending.push_back(event);
            }
            self.query_now = has_more && !stalled;
            self.stalled = stalled;
            self.cursor = next;
        }
    }
}
