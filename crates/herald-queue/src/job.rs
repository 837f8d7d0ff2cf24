//! The job payload and its wire format.
//!
//! A queued job is one short string (the member stored in the Redis list or
//! sorted set), version first so the format can evolve:
//!
//! ```text
//! 1|dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E|3|0|1718000000000|req-42
//! ^ version
//!   ^ delivery id                  ^ attempt (Postgres's, for fencing)
//!                                    ^ handbacks (times it came back)
//!                                      ^ ready-since: ms since the epoch the job became due
//!                                                    ^ request id (may be empty; may contain `|`)
//! ```
//!
//! About 60 bytes plus the request id: far below a JSON envelope. Parsing is
//! strict; a member that fails to parse is moved to the dead set by the
//! worker that fetched it (the fetch script does the same for members it has
//! to rewrite), never handed to a handler and never allowed to stop a worker.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::{DeliveryId, IdText};

use crate::QueueError;

/// What a job carries: ids, not content (a replay sends current data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryJob {
    pub delivery_id: DeliveryId,
    /// The delivery's attempt number when the job was made; the worker's
    /// claim in Postgres is fenced on it, so a stale job is harmless.
    pub attempt: i32,
    /// Carried from the HTTP request into the worker's span.
    pub request_id: Option<String>,
}

impl DeliveryJob {
    #[must_use]
    pub fn new(delivery_id: DeliveryId, attempt: i32) -> Self {
        Self {
            delivery_id,
            attempt,
            request_id: None,
        }
    }

    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }
}

/// The only wire version this crate writes and reads.
const WIRE_VERSION: &str = "1";

/// The member for `job` with the queue's bookkeeping, written piece by
/// piece into one allocation, without `format!` or the id's `Display`:
/// every delivery gets a job at ingest.
pub(crate) fn encode(job: &DeliveryJob, handbacks: u32, ready_since_ms: u64) -> String {
    let request_id = job.request_id.as_deref().unwrap_or("");
    let mut member = String::with_capacity(72 + request_id.len());
    let mut numbers = itoa::Buffer::new();
    member.push_str(WIRE_VERSION);
    member.push('|');
    member.push_str(job.delivery_id.text(&mut IdText::default()));
    member.push('|');
    member.push_str(numbers.format(job.attempt));
    member.push('|');
    member.push_str(numbers.format(handbacks));
    member.push('|');
    member.push_str(numbers.format(ready_since_ms));
    member.push('|');
    member.push_str(request_id);
    member
}

/// A job as stored: the payload plus the queue's own bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireJob {
    pub job: DeliveryJob,
    pub handbacks: u32,
    pub ready_since_ms: u64,
}

impl WireJob {
    pub fn encode(&self) -> String {
        encode(&self.job, self.handbacks, self.ready_since_ms)
    }

    pub fn decode(member: &str) -> Result<Self, QueueError> {
        let bad = |reason| QueueError::MalformedJob {
            member: member.chars().take(200).collect(),
            reason,
        };
        let mut parts = member.splitn(6, '|');
        let mut next = || parts.next().ok_or_else(|| bad("too few fields"));
        if next()? != WIRE_VERSION {
            return Err(bad("unknown wire version"));
        }
        let delivery_id = next()?.parse().map_err(|_| bad("bad delivery id"))?;
        let attempt = next()?.parse().map_err(|_| bad("bad attempt"))?;
        let handbacks = strict_u64(next()?)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad("bad handbacks"))?;
        let ready_since_ms = strict_u64(next()?).ok_or_else(|| bad("bad timestamp"))?;
        let request_id = next()?;
        Ok(WireJob {
            job: DeliveryJob {
                delivery_id,
                attempt,
                request_id: (!request_id.is_empty()).then(|| request_id.to_owned()),
            },
            handbacks,
            ready_since_ms,
        })
    }
}

/// Digits only: `u64::from_str` would accept a leading `+`, which the fetch
/// script's pattern (`%d+`) would not.
fn strict_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

pub(crate) fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(request_id: Option<&str>) -> WireJob {
        WireJob {
            job: DeliveryJob {
                delivery_id: DeliveryId::generate(),
                attempt: 3,
                request_id: request_id.map(str::to_owned),
            },
            handbacks: 2,
            ready_since_ms: 1_718_000_000_000,
        }
    }

    #[test]
    fn a_job_round_trips_through_its_wire_form() {
        for rid in [None, Some("req-42"), Some("a|b|c")] {
            let job = sample(rid);
            let member = job.encode();
            assert_eq!(WireJob::decode(&member).unwrap(), job, "{member}");
        }
    }

    #[test]
    fn the_wire_form_is_the_documented_one() {
        let mut job = sample(Some("req-42"));
        job.job.delivery_id = "dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E".parse().unwrap();
        assert_eq!(
            job.encode(),
            "1|dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E|3|2|1718000000000|req-42"
        );
        job.job.request_id = None;
        job.job.attempt = 0;
        job.handbacks = 0;
        assert_eq!(job.encode(), "1|dlv_01J9Z3M6XK1V4N9Q7W2C5B8D0E|0|0|1718000000000|");
    }

    #[test]
    fn the_wire_form_is_compact() {
        let member = sample(Some("01J9Z3M6XK1V4N9Q7W2C5B8D0E")).encode();
        assert!(member.len() <= 90, "{} bytes: {member}", member.len());
    }

    #[test]
    fn malformed_members_are_rejected() {
        let good = sample(None).encode();
        let id = sample(None).job.delivery_id;
        for bad in [
            "",
            "garbage",
            "{\"json\":1}",
            &good.replacen('1', "2", 1),
            &format!("1|{id}|3|-1|5|"),
            &format!("1|{id}|3|+1|5|"),
            &format!("1|{id}|x|0|5|"),
            &format!("1|{id}|3|0|5"),
            "1|ntf_01J9Z3M6XK1V4N9Q7W2C5B8D0E|3|0|5|",
        ] {
            assert!(WireJob::decode(bad).is_err(), "{bad}");
        }
    }
}
