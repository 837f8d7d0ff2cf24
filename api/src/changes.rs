//! The changes cursor: what a client has already seen of its user's rows,
//! and how one page of changes moves it forward.
//!
//! Rows carry `updated_at` = the start time of the transaction that last
//! wrote them (`now()`), so a change can commit *after* a client has seen a
//! newer timestamp. A cursor is therefore two things:
//! - a position `(W, K)`: every row version ordered at or before
//!   `(updated_at, key)` = `(W, K)` has been seen. It only moves into
//!   time that has *settled* (older than [`SETTLE`] by the database's
//!   clock), where every transaction has committed (Herald's transactions
//!   take milliseconds; the window assumes none takes 5 s);
//! - `H`: 32-bit hashes of `(key, updated_at)` of the row versions after the
//!   position that were already returned. Younger rows are remembered, not
//!   re-sent, and a late commit with an older timestamp is still after the
//!   position, so the next query finds it.
//!
//! Row keys are `d:<delivery id>` and `i:<notification id>`; a row changed
//! again gets a new `updated_at`, hence a new hash. See
//! [`next_page`] for how a page moves the cursor, and ARCHITECTURE.md for
//! the invariant.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use herald_db::inbox::{ChangeRow, ChangesFrom, ChangesPage};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

/// How long after its timestamp a change is assumed committed.
pub const SETTLE: chrono::Duration = chrono::Duration::seconds(5);

/// Most row versions a cursor remembers (4 bytes each: ~2.8 KB of cursor
/// at most). A page stops early rather than remember more; the rest come
/// once they settle, within [`SETTLE`].
pub const MAX_REMEMBERED: usize = 512;

const VERSION: u8 = 1;
/// Longest row key a cursor may hold (`d:dlv_` + a 26-character ULID is 32).
const MAX_KEY: usize = 64;

/// What a client has seen. Opaque to clients (URL-safe base64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub from: ChangesFrom,
    /// Sorted, without duplicates.
    pub seen: Vec<u32>,
}

impl Cursor {
    /// `[version][W: i64 µs, big-endian][key length][key][hashes: 4 bytes each]`.
    #[must_use]
    pub fn encode(&self) -> String {
        let key = self.from.key.as_deref().unwrap_or_default().as_bytes();
        let mut raw = Vec::with_capacity(10 + key.len() + 4 * self.seen.len());
        raw.push(VERSION);
        raw.extend_from_slice(&self.from.at.timestamp_micros().to_be_bytes());
        // Keys are at most MAX_KEY bytes (checked where they come from).
        raw.push(u8::try_from(key.len()).unwrap_or(u8::MAX));
        raw.extend_from_slice(key);
        for h in &self.seen {
            raw.extend_from_slice(&h.to_be_bytes());
        }
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// `None` for anything that is not a cursor this code made.
    #[must_use]
    pub fn decode(s: &str) -> Option<Self> {
        let raw = URL_SAFE_NO_PAD.decode(s).ok()?;
        let (&version, rest) = raw.split_first()?;
        if version != VERSION || rest.len() < 9 {
            return None;
        }
        let (micros, rest) = rest.split_at(8);
        let at = DateTime::from_timestamp_micros(i64::from_be_bytes(micros.try_into().ok()?))?;
        let (&key_len, rest) = rest.split_first()?;
        let key_len = usize::from(key_len);
        if key_len > MAX_KEY || rest.len() < key_len {
            return None;
        }
        let (key, hashes) = rest.split_at(key_len);
        let key = match key_len {
            0 => None,
            _ => Some(valid_key(std::str::from_utf8(key).ok()?)?.to_owned()),
        };
        if hashes.len() % 4 != 0 || hashes.len() / 4 > MAX_REMEMBERED {
            return None;
        }
        let seen: Vec<u32> = hashes
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if !seen.windows(2).all(|w| w[0] < w[1]) {
            return None;
        }
        Some(Self {
            from: ChangesFrom { at, key },
            seen,
        })
    }
}

fn valid_key(k: &str) -> Option<&str> {
    let ok = (k.starts_with("d:") || k.starts_with("i:"))
        && k.len() > 2
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
    ok.then_some(k)
}

/// The hash a cursor remembers a row version by. SHA-256, so it is the same
/// in every process and every version of Herald.
#[must_use]
pub fn version_hash(key: &str, updated_at: DateTime<Utc>) -> u32 {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(updated_at.timestamp_micros().to_be_bytes());
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Whether a row version comes after a position, in `(updated_at, key)` order.
fn after(row: &ChangeRow, from: &ChangesFrom) -> bool {
    row.updated_at > from.at || (row.updated_at == from.at && from.key.as_deref().is_some_and(|k| row.key.as_str() > k))
}

/// How many rows to ask the database for: every remembered one may be in
/// the way, plus one to know whether more follow.
#[must_use]
pub fn fetch_limit(cursor: &Cursor, limit: usize) -> usize {
    limit + cursor.seen.len() + 1
}

/// The cursor meaning "now": positioned at the settle horizon, remembering
/// every younger row, so nothing that exists now is reported as a change.
/// `page` came from a query without a position, limited to
/// [`MAX_REMEMBERED`] rows; beyond that (a user with hundreds of changes in
/// the last seconds) the rest are reported once, harmlessly.
#[must_use]
pub fn now_cursor(page: &ChangesPage) -> Cursor {
    let mut seen: Vec<u32> = page
        .rows
        .iter()
        .take(MAX_REMEMBERED)
        .map(|r| version_hash(&r.key, r.updated_at))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    Cursor {
        from: ChangesFrom {
            at: page.from_at,
            key: None,
        },
        seen,
    }
}

/// One page of changes and where the next one starts.
#[derive(Debug, Clone)]
pub struct Page {
    pub rows: Vec<ChangeRow>,
    pub next: Cursor,
    /// More changes are ready now: ask again at once.
    pub has_more: bool,
    /// The page stopped because the cursor remembers all it may; the rest
    /// come once they settle. A waiting caller should pause before asking.
    pub stalled: bool,
}

/// Picks the rows of `page` the client has not seen (at most `limit`) and
/// moves the cursor. `page` must be the answer to a query from
/// `cursor.from` limited to [`fetch_limit`] rows.
///
/// The position moves to the settle horizon when every row up to it was
/// looked at, or to the last row looked at when that row has settled (a
/// keyset position, exact because settled rows can no longer change
/// behind it, which keeps a read-all of thousands of rows sharing one
/// timestamp from growing the cursor). It never moves into unsettled time.
/// Every row looked at that is still after the new position is
/// remembered; so are remembered rows the page did not reach.
#[must_use]
pub fn next_page(cursor: &Cursor, limit: usize, page: ChangesPage) -> Page {
    let settle = page.db_now - SETTLE;
    let seen: HashSet<u32> = cursor.seen.iter().copied().collect();
    let full = page.rows.len() >= fetch_limit(cursor, limit);
    let mut take = vec![false; page.rows.len()];
    let (mut taken, mut remembered) = (0, cursor.seen.len());
    let mut stop = None;
    let mut stalled = false;
    for (i, row) in page.rows.iter().enumerate() {
        if seen.contains(&version_hash(&row.key, row.updated_at)) {
            continue;
        }
        if taken == limit {
            stop = Some(i);
            break;
        }
        if row.updated_at > settle {
            if remembered >= MAX_REMEMBERED {
                stop = Some(i);
                stalled = true;
                break;
            }
            remembered += 1;
        }
        take[i] = true;
        taken += 1;
    }
    let complete = stop.is_none() && !full;
    let scanned = stop.unwrap_or(page.rows.len());
    let frontier = page.rows.get(scanned);
    let last = scanned.checked_sub(1).and_then(|i| page.rows.get(i));
    let horizon = || {
        if settle > cursor.from.at {
            ChangesFrom { at: settle, key: None }
        } else {
            cursor.from.clone()
        }
    };
    let from =
        if complete || frontier.is_some_and(|s| s.updated_at > settle) || last.is_some_and(|p| p.updated_at > settle) {
            // Everything up to the horizon was looked at.
            horizon()
        } else if let Some(p) = last {
            // Stopped among settled rows: exactly after the last one looked at.
            ChangesFrom {
                at: p.updated_at,
                key: Some(p.key.clone()),
            }
        } else {
            cursor.from.clone()
        };
    let mut next_seen: Vec<u32> = page.rows[..scanned]
        .iter()
        .filter(|r| after(r, &from))
        .map(|r| version_hash(&r.key, r.updated_at))
        .collect();
    if !complete {
        // Remembered rows past where this page stopped are still ahead.
        let looked: HashSet<u32> = page.rows[..scanned]
            .iter()
            .map(|r| version_hash(&r.key, r.updated_at))
            .collect();
        next_seen.extend(cursor.seen.iter().filter(|h| !looked.contains(h)));
    }
    next_seen.sort_unstable();
    next_seen.dedup();
    // A safety net only (the scan above keeps within the bound): forgetting
    // a row means sending it once more, never losing it.
    next_seen.truncate(MAX_REMEMBERED);
    let rows = page
        .rows
        .into_iter()
        .zip(take)
        .filter_map(|(r, t)| t.then_some(r))
        .collect();
    Page {
        rows,
        next: Cursor { from, seen: next_seen },
        has_more: !complete,
        stalled,
    }
}

/// One change, as the client receives it: the row's current state.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    /// A delivery of one of the user's notifications: created (its first
    /// status, e.g. `queued`), or its status or attempts changed.
    Delivery(DeliveryChange),
    /// An in-app inbox item: new (once delivered), read, unread, archived.
    InboxItem(InboxItemChange),
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryChange {
    pub notification_id: String,
    pub delivery_id: String,
    pub channel: String,
    pub status: String,
    pub attempts: i32,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InboxItemChange {
    pub notification_id: String,
    pub category: String,
    pub title: String,
    pub body: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub read: bool,
    pub read_at: Option<DateTime<Utc>>,
    pub archived_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl Change {
    /// The SSE event name.
    #[must_use]
    pub fn event_name(&self) -> &'static str {
        match self {
            Self::Delivery(_) => "delivery",
            Self::InboxItem(_) => "inbox_item",
        }
    }
}

impl From<ChangeRow> for Change {
    fn from(r: ChangeRow) -> Self {
        if r.kind == "delivery" {
            Self::Delivery(DeliveryChange {
                notification_id: r.notification_id,
                delivery_id: r.delivery_id.unwrap_or_default(),
                channel: r.channel.unwrap_or_default(),
                status: r.status.unwrap_or_default(),
                attempts: r.attempts.unwrap_or_default(),
                updated_at: r.updated_at,
            })
        } else {
            Self::InboxItem(InboxItemChange {
                notification_id: r.notification_id,
                category: r.category.unwrap_or_default(),
                title: r.title.unwrap_or_default(),
                body: r.body.unwrap_or_default(),
                data: r.data.unwrap_or(serde_json::Value::Null),
                created_at: r.created_at.unwrap_or(r.updated_at),
                read: r.read_at.is_some(),
                read_at: r.read_at,
                archived_at: r.archived_at,
                updated_at: r.updated_at,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn row(key: &str, at: DateTime<Utc>) -> ChangeRow {
        ChangeRow {
            key: key.to_owned(),
            kind: "delivery".to_owned(),
            updated_at: at,
            notification_id: "ntf_x".to_owned(),
            delivery_id: None,
            channel: None,
            status: None,
            attempts: None,
            category: None,
            title: None,
            body: None,
            data: None,
            created_at: None,
            read_at: None,
            archived_at: None,
        }
    }

    /// A toy database: the rows a query from `cursor` would answer, now.
    fn query(all: &[ChangeRow], cursor: &Cursor, limit: usize, now: DateTime<Utc>) -> ChangesPage {
        let mut rows: Vec<ChangeRow> = all.iter().filter(|r| after(r, &cursor.from)).cloned().collect();
        rows.sort_by(|a, b| (a.updated_at, &a.key).cmp(&(b.updated_at, &b.key)));
        rows.truncate(fetch_limit(cursor, limit));
        ChangesPage {
            rows,
            db_now: now,
            from_at: cursor.from.at,
        }
    }

    fn start() -> Cursor {
        Cursor {
            from: ChangesFrom { at: t(0), key: None },
            seen: vec![],
        }
    }

    #[test]
    fn a_cursor_survives_encoding_and_garbage_is_refused() {
        let c = Cursor {
            from: ChangesFrom {
                at: t(5) + chrono::Duration::microseconds(7),
                key: Some("d:dlv_01JD0000000000000000000000".to_owned()),
            },
            seen: vec![1, 99, u32::MAX],
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c.clone()));
        let none = Cursor {
            from: ChangesFrom { at: t(1), key: None },
            seen: vec![],
        };
        assert_eq!(Cursor::decode(&none.encode()), Some(none));
        for bad in ["", "garbage!", "AAAA", &c.encode()[1..], &format!("{}A", c.encode())] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
        // Unsorted hashes, a key that is not a row key, a wrong version.
        let unsorted = Cursor {
            seen: vec![99, 1],
            ..c.clone()
        };
        assert_eq!(Cursor::decode(&unsorted.encode()), None);
        let odd = Cursor {
            from: ChangesFrom {
                at: t(1),
                key: Some("x:1".into()),
            },
            seen: vec![],
        };
        assert_eq!(Cursor::decode(&odd.encode()), None);
        let mut raw = URL_SAFE_NO_PAD.decode(c.encode()).unwrap();
        raw[0] = 9;
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&raw)), None);
    }

    #[test]
    fn paging_returns_every_row_once_even_when_many_share_a_timestamp() {
        // 250 rows of one read-all at t(1), settled; then 3 recent ones.
        let mut all: Vec<ChangeRow> = (0..250).map(|i| row(&format!("i:ntf_{i:04}"), t(1))).collect();
        all.extend((0..3).map(|i| row(&format!("d:dlv_{i}"), t(99))));
        let now = t(100);
        let mut cursor = start();
        let mut got = Vec::new();
        for _ in 0..100 {
            let page = next_page(&cursor, 7, query(&all, &cursor, 7, now));
            assert!(page.rows.len() <= 7);
            assert!(page.next.seen.len() <= 7, "settled rows need no memory");
            got.extend(page.rows.iter().map(|r| r.key.clone()));
            cursor = page.next;
            if !page.has_more {
                break;
            }
        }
        let mut want: Vec<String> = all.iter().map(|r| r.key.clone()).collect();
        want.sort();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, want, "every row exactly once");
        // Nothing new: nothing returned, and the cursor holds the 3 young rows.
        let again = next_page(&cursor, 7, query(&all, &cursor, 7, now));
        assert!(again.rows.is_empty() && !again.has_more);
        assert_eq!(again.next.seen.len(), 3);
    }

    #[test]
    fn a_late_commit_with_an_older_timestamp_is_still_found() {
        let now = t(100);
        let mut all = vec![row("d:dlv_b", t(98))];
        let first = next_page(&start(), 100, query(&all, &start(), 100, now));
        assert_eq!(first.rows.len(), 1);
        // Committed later, stamped earlier (its transaction began first).
        all.push(row("d:dlv_a", t(97)));
        let second = next_page(
            &first.next,
            100,
            query(&all, &first.next, 100, now + chrono::Duration::seconds(1)),
        );
        let keys: Vec<&str> = second.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["d:dlv_a"], "the late row, and not the one already seen");
        // Once settled, both are forgotten by the cursor and never return.
        let later = now + chrono::Duration::seconds(30);
        let third = next_page(&second.next, 100, query(&all, &second.next, 100, later));
        assert!(third.rows.is_empty());
        assert!(third.next.seen.is_empty());
        assert_eq!(third.next.from.at, later - SETTLE);
    }

    #[test]
    fn a_row_changed_again_is_reported_again() {
        let now = t(100);
        let mut all = vec![row("i:ntf_a", t(99))];
        let first = next_page(&start(), 10, query(&all, &start(), 10, now));
        all[0].updated_at = t(99) + chrono::Duration::milliseconds(300);
        let second = next_page(&first.next, 10, query(&all, &first.next, 10, now));
        assert_eq!(second.rows.len(), 1);
    }

    #[test]
    fn a_burst_of_young_rows_is_paged_without_outgrowing_the_cursor() {
        let now = t(100);
        let all: Vec<ChangeRow> = (0..MAX_REMEMBERED + 40)
            .map(|i| row(&format!("i:ntf_{i:05}"), t(99)))
            .collect();
        let mut cursor = start();
        let mut got = 0;
        let mut stalled = false;
        for _ in 0..100 {
            let page = next_page(&cursor, 100, query(&all, &cursor, 100, now));
            assert!(page.next.seen.len() <= MAX_REMEMBERED);
            got += page.rows.len();
            cursor = page.next;
            if page.stalled {
                stalled = true;
                break;
            }
        }
        assert!(stalled);
        assert_eq!(got, MAX_REMEMBERED);
        // Once they settle, the rest come, and nothing twice.
        let later = now + chrono::Duration::seconds(10);
        let page = next_page(&cursor, 100, query(&all, &cursor, 100, later));
        assert_eq!(page.rows.len(), 40);
        assert!(!page.has_more);
    }

    #[test]
    fn the_now_cursor_reports_nothing_that_exists() {
        let now = t(100);
        let all = vec![row("d:dlv_a", t(90)), row("d:dlv_b", t(98)), row("i:ntf_b", t(99))];
        let c0 = Cursor {
            from: ChangesFrom {
                at: now - SETTLE,
                key: None,
            },
            seen: vec![],
        };
        let cursor = now_cursor(&query(&all, &c0, MAX_REMEMBERED, now));
        assert_eq!(cursor.seen.len(), 2);
        let page = next_page(&cursor, 100, query(&all, &cursor, 100, now));
        assert!(page.rows.is_empty());
    }
}
