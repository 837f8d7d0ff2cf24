//! Wakes the requests waiting for a user's changes (long-polls and live
//! streams) when that user's rows change, in any process.
//!
//! One Redis subscription per API process (its own connection, reconnecting
//! with backoff) reads `user.changed` events and bumps a per-user counter: a
//! `watch` channel per user that has a waiter, created by the first waiter
//! and removed, under the map's lock, when the last one goes. An event
//! costs one map lookup per user it names, never a pass over all waiters,
//! so ten thousand idle clients cost memory, not CPU.
//!
//! Events are only hints. Waiters always re-query Postgres, and whenever the
//! subscription (re)connects every waiter is woken, because events sent
//! while it was down are lost. While it is down, waiters also re-query
//! every [`DEGRADED_POLL`], so clients still see changes without Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use herald_queue::{EventSignal, QueueClient};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a waiter re-queries while the subscription is down.
pub const DEGRADED_POLL: Duration = Duration::from_secs(2);

/// Cheap to clone; every clone is the same hub.
#[derive(Clone, Default)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    users: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Bumped on every (re)subscription: wakes every waiter at once.
    resync: watch::Sender<u64>,
    connected: AtomicBool,
}

impl Inner {
    fn users(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        // A panic while holding this lock leaves the map consistent (every
        // operation under it is a single insert, remove or send).
        self.users.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One waiting request's subscription to its user's changes.
pub struct Waiter {
    inner: Arc<Inner>,
    user: String,
    rx: Option<watch::Receiver<u64>>,
    resync: watch::Receiver<u64>,
}

impl Hub {
    /// Starts the process's subscriber on the current runtime; it runs until
    /// `cancel` fires and never fails (Redis down only degrades waiting).
    pub fn start(&self, queue: QueueClient, cancel: CancellationToken) {
        let hub = self.clone();
        tokio::spawn(async move {
            herald_queue::listen_events(queue, "herald-api-events", cancel, move |signal| hub.on_signal(signal)).await;
        });
    }

    fn on_signal(&self, signal: EventSignal) {
        match signal {
            EventSignal::Subscribed => {
                self.inner.connected.store(true, Ordering::SeqCst);
                self.wake_all();
            }
            EventSignal::Lost => {
                self.inner.connected.store(false, Ordering::SeqCst);
                // Waiters switch to re-querying every DEGRADED_POLL.
                self.wake_all();
            }
            EventSignal::Event(payload) => {
                for user in users_of(&payload) {
                    self.wake(&user);
                }
            }
        }
    }

    /// Whether events are arriving (the subscription is up).
    #[must_use]
    pub fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::SeqCst)
    }

    /// Registers interest in `user`'s changes. Subscribe *before* querying:
    /// a change that commits between the query and the wait then still
    /// wakes the waiter.
    #[must_use]
    pub fn subscribe(&self, user: &str) -> Waiter {
        let rx = self
            .inner
            .users()
            .entry(user.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Waiter {
            inner: Arc::clone(&self.inner),
            user: user.to_owned(),
            rx: Some(rx),
            resync: self.inner.resync.subscribe(),
        }
    }

    /// Wakes `user`'s waiters, if any (this process's, not others').
    pub fn wake(&self, user: &str) {
        if let Some(tx) = self.inner.users().get(user) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn wake_all(&self) {
        self.inner.resync.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Users with at least one waiter in this process.
    #[must_use]
    pub fn users_waited_on(&self) -> usize {
        self.inner.users().len()
    }
}

impl Waiter {
    /// Forgets wake-ups so far: call right before querying.
    pub fn mark_seen(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            rx.borrow_and_update();
        }
        self.resync.borrow_and_update();
    }

    /// Resolves at the first wake-up since [`mark_seen`](Self::mark_seen):
    /// a change of this user, a (re)subscription, a lost subscription.
    pub async fn woken(&mut self) {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        tokio::select! {
            r = rx.changed() => {
                // The sender lives in the map while this receiver exists.
                if r.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            r = self.resync.changed() => {
                if r.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // Under the lock, so a new waiter cannot subscribe to an entry that
        // is about to be removed.
        let mut users = self.inner.users();
        drop(self.rx.take());
        if users.get(&self.user).is_some_and(|tx| tx.receiver_count() == 0) {
            users.remove(&self.user);
        }
    }
}

/// The users an event names: `user.changed` lists them; the in-app
/// worker's `inbox.item.created` names one. Anything else names nobody.
fn users_of(payload: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Event {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        users: Vec<String>,
        user_id: Option<String>,
    }
    match serde_json::from_str::<Event>(payload) {
        Ok(e) if e.kind == herald_queue::events::USER_CHANGED => e.users,
        Ok(e) if e.kind == "inbox.item.created" => e.user_id.into_iter().collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_for_its_user_only_and_the_last_one_out_removes_the_entry() {
        let hub = Hub::default();
        let mut ann = hub.subscribe("u_ann");
        let ann2 = hub.subscribe("u_ann");
        let mut bob = hub.subscribe("u_bob");
        assert_eq!(hub.users_waited_on(), 2);
        ann.mark_seen();
        bob.mark_seen();
        hub.on_signal(EventSignal::Event(
            r#"{"type":"user.changed","users":["u_ann","u_zed"]}"#.into(),
        ));
        tokio::time::timeout(Duration::from_secs(1), ann.woken()).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), bob.woken())
                .await
                .is_err()
        );
        drop(ann);
        assert_eq!(hub.users_waited_on(), 2, "another waiter of u_ann remains");
        drop(ann2);
        drop(bob);
        assert_eq!(hub.users_waited_on(), 0);
    }

    #[tokio::test]
    async fn ten_thousand_waiters_cost_one_lookup_per_event_and_leave_nothing_behind() {
        let hub = Hub::default();
        let mut waiters: Vec<Waiter> = (0..10_000).map(|i| hub.subscribe(&format!("u_{i}"))).collect();
        for w in &mut waiters {
            w.mark_seen();
        }
        assert_eq!(hub.users_waited_on(), 10_000);
        let started = std::time::Instant::now();
        for _ in 0..1_000 {
            hub.on_signal(EventSignal::Event(
                r#"{"type":"user.changed","users":["u_4242"]}"#.into(),
            ));
        }
        // A thousand events touch one entry each: far from a pass over
        // ten thousand waiters per event.
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        tokio::time::timeout(Duration::from_secs(1), waiters[4242].woken())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), waiters[4241].woken())
                .await
                .is_err()
        );
        drop(waiters);
        assert_eq!(hub.users_waited_on(), 0);
    }

    #[tokio::test]
    async fn a_wake_before_the_wait_is_not_lost_and_a_resubscription_wakes_everyone() {
        let hub = Hub::default();
        let mut w = hub.subscribe("u_a");
        w.mark_seen();
        hub.wake("u_a");
        tokio::time::timeout(Duration::from_secs(1), w.woken()).await.unwrap();
        w.mark_seen();
        hub.on_signal(EventSignal::Subscribed);
        assert!(hub.connected());
        tokio::time::timeout(Duration::from_secs(1), w.woken()).await.unwrap();
        w.mark_seen();
        hub.on_signal(EventSignal::Event(
            r#"{"type":"inbox.item.created","user_id":"u_a"}"#.into(),
        ));
        tokio::time::timeout(Duration::from_secs(1), w.woken()).await.unwrap();
    }
}
