//! Live-client events on the `<prefix>:events` pub/sub channel: telling API
//! processes that some users' rows changed, and listening for it.
//!
//! Events are hints, never data: pub/sub keeps nothing, so a client that
//! misses one still finds the change in Postgres on its next query. What
//! matters is that publishing is cheap on the hot path and never fails the
//! caller, and that a listener notices when it may have missed something.
//!
//! Wire format (JSON): `{"type":"user.changed","users":["u_1","u_2"]}`,
//! published after the change committed; the in-app worker's
//! `{"type":"inbox.item.created","user_id":…}` shares the channel.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::PushKind;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::QueueClient;
use crate::conn::{Backoff, CONNECT_TIMEOUT, Outage, connection_config, open_client, set_name};

/// Most user ids in one `user.changed` message (keeps a message well under
/// a few tens of kilobytes even for a huge batch).
pub const USERS_PER_EVENT: usize = 1_000;
/// How often the listener pings its connection, to find a dead one.
const PING_EVERY: Duration = Duration::from_secs(10);

/// The `type` of the event that says "these users' rows changed".
pub const USER_CHANGED: &str = "user.changed";

/// Publishes `user.changed` events off the caller's path. Callers hand over
/// the users of a committed batch and go on; one background task publishes
/// whatever has piled up in ONE message (deduplicated), so a busy process
/// sends at most one publish per round trip to Redis, whatever its rate of
/// changes. Cheap to clone.
#[derive(Clone)]
pub struct UserChanges {
    // Unbounded on purpose: the task merges everything pending into one set
    // per publish, so what waits is at most one entry per distinct user
    // (and the events announced meanwhile), and a sender never blocks or
    // fails the caller's request.
    tx: mpsc::UnboundedSender<Pending>,
}

enum Pending {
    Users(Vec<String>),
    Event(String),
}

impl UserChanges {
    /// Starts the publishing task on the current runtime.
    #[must_use]
    pub fn start(queue: QueueClient) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish_changes(queue, rx));
        Self { tx }
    }

    /// Says that these users' rows changed (call after the commit). Never
    /// blocks and never fails: a lost event only delays live clients until
    /// their next query.
    pub fn changed(&self, users: impl IntoIterator<Item = String>) {
        let users: Vec<String> = users.into_iter().collect();
        if !users.is_empty() {
            // Fails only once the task is gone (runtime shutting down).
            let _ = self.tx.send(Pending::Users(users));
        }
    }

    /// Publishes this event (JSON, such as the in-app worker's
    /// `inbox.item.created`) as it is, with the next `user.changed`: one
    /// round trip to Redis for everything pending, not one per event.
    /// Never blocks and never fails, like [`changed`](Self::changed).
    pub fn announce(&self, event: String) {
        let _ = self.tx.send(Pending::Event(event));
    }
}

async fn publish_changes(queue: QueueClient, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut users: BTreeSet<String> = BTreeSet::new();
        let mut events: Vec<String> = Vec::new();
        let mut next = Some(first);
        while let Some(pending) = next {
            match pending {
                Pending::Users(more) => users.extend(more),
                Pending::Event(event) => events.push(event),
            }
            next = rx.try_recv().ok();
        }
        let users: Vec<String> = users.into_iter().collect();
        match queue.publish_changes(&users, &events).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("publishing change events again");
            }
            Ok(()) => {}
            // Once per outage; clients catch up from Postgres.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot publish change events; live clients fall back to polling");
            }
            Err(_) => {}
        }
    }
}

/// What an event listener reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSignal {
    /// Subscribed (first time or again): events sent while not subscribed
    /// are lost, so whoever waits should look again.
    Subscribed,
    /// The subscription broke; the listener reconnects with backoff.
    Lost,
    /// One event's payload, as published.
    Event(String),
}

/// Subscribes to the events channel on a connection of its own and reports
/// each event to `on` until `cancel` fires. Reconnects with capped backoff
/// (logging once per outage) and reports every (re)subscription, so the
/// caller can wake whoever may have missed an event meanwhile. Never ends
/// because of Redis.
pub async fn listen_events(
    queue: QueueClient,
    name: &str,
    cancel: CancellationToken,
    mut on: impl FnMut(EventSignal) + Send,
) {
    let cfg = queue.config().clone();
    let channel = queue.events_channel();
    let client = match open_client(&cfg.redis_url, true) {
        Ok(c) => c,
        Err(e) => {
            // Unreachable in practice: the same URL already built `queue`.
            tracing::error!(error = %e, "cannot listen for events");
            return;
        }
    };
    let mut backoff = Backoff::new();
    let mut outage = Outage::new("event subscription");
    loop {
        let (tx, mut pushes) = mpsc::unbounded_channel();
        let subscribe = async {
            let config = connection_config().set_push_sender(tx);
            let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            set_name(&mut conn, name).await?;
            conn.subscribe(&channel).await?;
            redis::RedisResult::Ok(conn)
        };
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT * 2, subscribe) => r,
        };
        let failure = match subscribed {
            Ok(Ok(mut conn)) => {
                outage.recovered(name);
                backoff.reset();
                on(EventSignal::Subscribed);
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                let failure = loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        push = pushes.recv() => match push {
                            Some(p) if p.kind == PushKind::Message => {
                                let payload = redis::Msg::from_push_info(p)
                                    .and_then(|m| m.get_payload::<String>().ok());
                                if let Some(payload) = payload {
                                    on(EventSignal::Event(payload));
                                }
                            }
                            Some(p) if p.kind == PushKind::Disconnection => {
                                break "subscription connection closed".to_owned();
                            }
                            None => break "subscription connection closed".to_owned(),
                            Some(_) => {}
                        },
                        _ = ping.tick() => {
                            if let Err(e) = redis::cmd("PING").query_async::<()>(&mut conn).await {
                                break e.to_string();
                            }
                        }
                    }
                };
                on(EventSignal::Lost);
                failure
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "subscribing timed out".to_owned(),
        };
        outage.failed(name, &cfg.redis_url, &failure);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
