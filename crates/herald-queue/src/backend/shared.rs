//! State shared by the apalis side of the backend (its `poll_*` methods and
//! the settling middleware) and the engine task that does all Redis I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::Notify;

use crate::Fetched;
use crate::job::{WireJob, now_ms};

/// The first handback waits this long, each further one twice as long...
const HANDBACK_BASE_DELAY: Duration = Duration::from_millis(250);
/// ...up to this.
const HANDBACK_MAX_DELAY: Duration = Duration::from_secs(30);

/// The priorities a wake-up message names ("normal", "high,low"), one bit
/// per priority; anything else (an older API's "1") names none.
pub(crate) fn priority_bits(message: &[u8]) -> u8 {
    std::str::from_utf8(message)
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.parse::<herald_core::Priority>().ok())
        .fold(0, |bits, p| bits | priority_bit(p))
}

pub(crate) fn priority_bit(p: herald_core::Priority) -> u8 {
    1 << (p as u8)
}

/// Every priority's bit: a wake-up that names none means "look everywhere".
pub(crate) fn all_priority_bits() -> u8 {
    herald_core::Priority::ALL
        .iter()
        .fold(0, |bits, &p| bits | priority_bit(p))
}

/// Where a settled job goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MoveKind {
    /// Back after a delay (handler error or panic).
    Schedule,
    /// To the dead set (past `max_handbacks`, or unparseable).
    Bury,
    /// To the front of ready, unchanged: fetched but never started.
    Return,
}

#[derive(Debug, Clone)]
pub(crate) struct Move {
    pub slot: usize,
    pub old: Arc<str>,
    pub new: String,
    pub kind: MoveKind,
    pub score: u64,
}

impl MoveKind {
    pub fn code(self) -> &'static str {
        match self {
            MoveKind::Schedule => "s",
            MoveKind::Bury => "d",
            MoveKind::Return => "r",
        }
    }
}

pub(crate) struct State {
    /// Fetched, not yet handed to apalis, in fetch order.
    pub buffer: VecDeque<Fetched>,
    /// Every job this process holds a lease on (buffered, running, or
    /// settled but not yet written): the heartbeat extends these. Counted,
    /// because the same member may (rarely) be fetched twice.
    pub held: HashMap<(usize, Arc<str>), u32>,
    /// Completed jobs waiting for the next batched ack.
    pub acks: Vec<(usize, Arc<str>)>,
    pub first_ack_at: Option<Instant>,
    /// Jobs to move out of inflight (handbacks, dead, returns).
    pub moves: Vec<Move>,
    /// apalis's waker, parked while the buffer is empty.
    pub consumer: Option<Waker>,
    pub closing: bool,
    pub closed: bool,
    pub close_waker: Option<Waker>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Wakes the engine: demand, settlements, wake-ups, close.
    pub notify: Notify,
    /// Set by a pub/sub wake-up: fetch now even if the last fetch found
    /// nothing.
    pub wake: AtomicBool,
    /// Priorities the wake-ups since the engine last looked said got jobs
    /// (see [`priority_bits`]).
    pub hinted: AtomicU8,
    pub fetch_batch: usize,
    pub max_handbacks: u32,
}

impl Shared {
    pub fn new(fetch_batch: usize, max_handbacks: u32) -> Self {
        Self {
            state: Mutex::new(State {
                buffer: VecDeque::new(),
                held: HashMap::new(),
                acks: Vec::new(),
                first_ack_at: None,
                moves: Vec::new(),
                consumer: None,
                closing: false,
                closed: false,
                close_waker: None,
            }),
            notify: Notify::new(),
            wake: AtomicBool::new(false),
            hinted: AtomicU8::new(0),
            fetch_batch,
            max_handbacks,
        }
    }

    /// Never panics: a panic elsewhere while holding the lock leaves the
    /// state consistent enough (plain collections), and a job that is lost
    /// from it comes back when its lease expires.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refill when the buffer is down to this.
    pub fn low_water(&self) -> usize {
        self.fetch_batch / 2
    }

    /// A wake-up that names no queue: an idle engine looks at all of them.
    pub fn wake_engine(&self) {
        self.wake_engine_for(0);
    }

    /// A wake-up that names the priorities that got jobs (none: all).
    pub fn wake_engine_for(&self, priorities: u8) {
        let bits = if priorities == 0 {
            all_priority_bits()
        } else {
            priorities
        };
        self.hinted.fetch_or(bits, Ordering::SeqCst);
        self.wake.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// The handler returned `Ok`: remove the job for good (batched).
    pub fn ack(&self, f: &Fetched) {
        let mut st = self.lock();
        st.acks.push((f.slot, f.member.clone()));
        let n = st.acks.len();
        if n == 1 {
            st.first_ack_at = Some(Instant::now());
        }
        drop(st);
        if n == 1 || n >= self.fetch_batch {
            self.notify.notify_one();
        }
    }

    /// The handler failed or panicked: back after a growing delay, or dead
    /// past `max_handbacks`.
    pub fn hand_back(&self, f: &Fetched) {
        let handbacks = f.handbacks.saturating_add(1);
        let now = now_ms();
        let (kind, score, ready_since_ms) = if handbacks > self.max_handbacks {
            (MoveKind::Bury, now, f.ready_since_ms)
        } else {
            let due = now + crate::job::ms(handback_delay(handbacks));
            (MoveKind::Schedule, due, due)
        };
        let new = WireJob {
            job: f.job.clone(),
            handbacks,
            ready_since_ms,
        }
        .encode();
        self.push_move(Move {
            slot: f.slot,
            old: f.member.clone(),
            new,
            kind,
            score,
        });
    }

    /// The job never ran to completion through no fault of its own (the
    /// worker dropped it): to the front of ready, unchanged.
    pub fn give_back(&self, f: &Fetched) {
        self.push_move(Move::returned(f));
    }

    pub fn push_move(&self, m: Move) {
        self.lock().moves.push(m);
        self.notify.notify_one();
    }
}

impl Move {
    pub fn returned(f: &Fetched) -> Self {
        Move {
            slot: f.slot,
            old: f.member.clone(),
            new: f.member.to_string(),
            kind: MoveKind::Return,
            score: 0,
        }
    }
}

/// 250 ms, 500 ms, 1 s, ... capped at 30 s, ±20 % so that a burst of
/// failures does not come back as a burst.
fn handback_delay(handbacks: u32) -> Duration {
    let exp = handbacks.saturating_sub(1).min(16);
    let base = HANDBACK_BASE_DELAY.saturating_mul(1 << exp).min(HANDBACK_MAX_DELAY);
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handback_delays_grow_exponentially_and_are_capped() {
        let d1 = handback_delay(1);
        assert!(d1 >= Duration::from_millis(200) && d1 <= Duration::from_millis(300));
        let d3 = handback_delay(3);
        assert!(d3 >= Duration::from_millis(800) && d3 <= Duration::from_millis(1200));
        assert!(handback_delay(40) <= Duration::from_secs(36));
    }
}
