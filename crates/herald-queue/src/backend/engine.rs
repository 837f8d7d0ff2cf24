//! The engine: one Tokio task per backend doing all of its Redis I/O —
//! fetching into the buffer, heartbeating leases, flushing acks and
//! handbacks, and the graceful close. It never gives up on Redis: every error
//! drops the connection, waits a capped backoff and tries again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Client, PushInfo, PushKind, RedisResult};
use tokio_util::sync::CancellationToken;

use super::shared::{Move, MoveKind, Shared, priority_bit, priority_bits};
use crate::conn::{Backoff, CONNECT_TIMEOUT, Conn, Outage, connection_config, set_name};
use crate::job::{WireJob, ms, now_ms};
use crate::names::{QueueKeys, workers_key};
use crate::scripts::{FETCH, MAINTENANCE_CHUNK, MOVE};
use crate::{Fetched, QueueConfig, QueueName, WorkerId};

/// Acks wait at most this long for company before they are written.
const ACK_LINGER: Duration = Duration::from_millis(3);
/// Shortest idle sleep, so a clock disagreement can never make a busy loop.
const MIN_IDLE: Duration = Duration::from_millis(10);
/// Dead jobs are kept this long.
const DEAD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a graceful close keeps trying to hand jobs back before leaving
/// them to their leases.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Members per command when writing many at once.
const MEMBERS_PER_COMMAND: usize = 500;
/// A pub/sub connection is pinged this often: a silently dead connection
/// would otherwise only cost wake-ups (the idle poll still runs), but not
/// for long.
const PUBSUB_PING: Duration = Duration::from_secs(10);

pub(crate) struct Slot {
    pub name: QueueName,
    pub keys: QueueKeys,
}

pub(crate) struct Engine {
    cfg: QueueConfig,
    worker_id: WorkerId,
    shared: Arc<Shared>,
    slots: Arc<[Slot]>,
    conn: Conn,
    pubsub_client: Client,
    /// Primary queue of each fetch round: a smooth weighted round robin.
    schedule: Vec<usize>,
    /// Fall-through order within a round: by priority.
    by_priority: Vec<usize>,
    round: usize,
    /// Priorities that wake-ups said got jobs while this engine was idle:
    /// the next round fetches only their queues.
    hint: u8,
    /// Per queue, from its last fetch: when a job of it becomes ready by
    /// itself (a delayed job due, a lease expiring), if ever.
    due: Vec<Option<u64>>,
    idle_until: Option<Instant>,
    /// When a fetch last looked at every queue. Jobs also become ready
    /// without a wake-up (another worker's handbacks and returns, expired
    /// leases), so however many wake-ups name only some queues, every queue
    /// is looked at at least once per idle poll.
    last_full: Instant,
    next_heartbeat: Instant,
    heartbeats: u64,
    backoff: Backoff,
    outage: Outage,
    cancel: CancellationToken,
}

impl Engine {
    pub fn new(
        cfg: QueueConfig,
        worker_id: WorkerId,
        shared: Arc<Shared>,
        slots: Arc<[Slot]>,
        client: Client,
        pubsub_client: Client,
    ) -> Self {
        let weights: Vec<u32> = slots.iter().map(|s| weight(s.name)).collect();
        let mut by_priority: Vec<usize> = (0..slots.len()).collect();
        by_priority.sort_by_key(|&i| std::cmp::Reverse(weights[i]));
        let queues = slots.len();
        Self {
            conn: Conn::new(client, connection_name(&worker_id)),
            cfg,
            worker_id,
            shared,
            pubsub_client,
            schedule: smooth_schedule(&weights),
            by_priority,
            slots,
            round: 0,
            hint: 0,
            due: vec![None; queues],
            idle_until: None,
            last_full: Instant::now(),
            next_heartbeat: Instant::now(),
            heartbeats: 0,
            backoff: Backoff::new(),
            outage: Outage::new("queue backend"),
            cancel: CancellationToken::new(),
        }
    }

    pub async fn run(mut self) {
        // Stops the wake-up listener however this task ends (even by panic).
        let _stop_listener = self.cancel.clone().drop_guard();
        let mut channels: Vec<String> = self
            .slots
            .iter()
            .map(|s| crate::names::wake_channel(&self.cfg.prefix, s.name.channel))
            .collect();
        channels.sort();
        channels.dedup();
        tokio::spawn(listen(
            self.pubsub_client.clone(),
            channels,
            self.shared.clone(),
            self.cancel.clone(),
            self.worker_id.to_string(),
            self.cfg.redis_url.clone(),
        ));
        tracing::debug!(worker = %self.worker_id, "queue backend started");
        while !self.shared.lock().closing {
            match self.step().await {
                Ok(()) => {
                    self.backoff.reset();
                    self.outage.recovered(self.worker_id.as_str());
                }
                Err(e) => {
                    self.outage.failed(self.worker_id.as_str(), &self.cfg.redis_url, &e);
                    self.conn.reset().await;
                    let delay = self.backoff.next_delay();
                    self.sleep_unless_closing(delay).await;
                }
            }
        }
        self.close().await;
    }

    /// One pass: heartbeat if due, settle what is ready to settle, fetch if
    /// the buffer is low, then sleep until the next thing to do.
    async fn step(&mut self) -> RedisResult<()> {
        let now = Instant::now();
        if now >= self.next_heartbeat {
            self.heartbeat().await?;
            self.next_heartbeat = Instant::now() + self.cfg.lease / 3;
        }
        if self.shared.wake.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let hinted = self.shared.hinted.swap(0, std::sync::atomic::Ordering::SeqCst);
            // Only an engine still idle follows the hint: every queue was
            // empty at its last look, so fetching only the ones that just got
            // jobs saves round trips and costs no fairness. A busy engine (or
            // one whose idle sleep ran out) keeps its weighted order over
            // every queue, whatever wake-ups say, and forgets an older hint.
            if self.idle_until.is_some_and(|t| now < t) {
                self.hint |= hinted;
            } else {
                self.hint = 0;
            }
            self.idle_until = None;
        }
        let (buffered, acks, first_ack_at, moves) = {
            let st = self.shared.lock();
            (st.buffer.len(), st.acks.len(), st.first_ack_at, st.moves.len())
        };
        let idle = self.idle_until.is_some_and(|t| now < t);
        let low = buffered <= self.shared.low_water();
        let want_fetch = low && !idle;
        let acks_due = acks >= self.cfg.fetch_batch
            || first_ack_at.is_some_and(|t| now >= t + ACK_LINGER)
            || (want_fetch && acks > 0);
        if acks_due || moves > 0 {
            self.flush().await?;
        }
        if want_fetch && self.fetch(self.cfg.fetch_batch - buffered).await? > 0 {
            // There may be more: go round again without sleeping.
            return Ok(());
        }
        if low && self.idle_until.is_none() {
            // A settlement cleared the idle state: look again at once.
            return Ok(());
        }
        let mut until = self.next_heartbeat;
        if let Some(t) = self.shared.lock().first_ack_at {
            until = until.min(t + ACK_LINGER);
        }
        if let (true, Some(t)) = (low, self.idle_until) {
            until = until.min(t);
        }
        tokio::select! {
            () = self.shared.notify.notified() => {}
            () = tokio::time::sleep_until(until.into()) => {}
        }
        Ok(())
    }

    /// One fetch round: the round's primary queue first, then the others by
    /// priority for whatever is still wanted. One script run per queue.
    ///
    /// An engine woken from idle looks only at the queues the wake-up named,
    /// and any with a delayed job or lease due: every queue was empty at its
    /// last look, and a push to another names that one. Jobs that become
    /// ready without a push (another worker's handbacks and returns) are
    /// found by the look at every queue that at least one fetch per idle
    /// poll still takes (`last_full`). And when every queue it looked at
    /// gave fewer jobs than asked, with nothing due, the engine goes idle at
    /// once rather than looking again: those queues are empty, and the next
    /// push wakes it.
    /// Idle, a notification costs each worker one script run instead of
    /// six (three queues, twice), at the moment the workers, the API and
    /// Postgres all want the CPU.
    async fn fetch(&mut self, want: usize) -> RedisResult<usize> {
        let mut conn = self.conn.get().await?;
        let primary = self.schedule[self.round % self.schedule.len()];
        self.round = self.round.wrapping_add(1);
        let hint = std::mem::take(&mut self.hint);
        let named = |s: usize| hint & priority_bit(self.slots[s].name.priority) != 0;
        let mut order = fetch_order(primary, &self.by_priority, named);
        if hint != 0 && self.last_full.elapsed() < self.cfg.idle_poll {
            // The named queues, and any whose delayed job or lease is due.
            let now = now_ms();
            order.retain(|&s| named(s) || self.due[s].is_some_and(|d| d <= now));
        }
        if order.len() == self.slots.len() {
            self.last_full = Instant::now();
        }
        let lease = ms(self.cfg.lease);
        let mut got = 0;
        let mut drained = true;
        for slot in order {
            let left = want.saturating_sub(got);
            if left == 0 {
                drained = false;
                break;
            }
            let keys = &self.slots[slot].keys;
            let now = now_ms();
            let reply: Vec<String> = FETCH
                .key(&keys.ready)
                .key(&keys.scheduled)
                .key(&keys.inflight)
                .key(&keys.dead)
                .arg(now)
                .arg(now + lease)
                .arg(left)
                .arg(self.cfg.max_handbacks)
                .arg(MAINTENANCE_CHUNK)
                .arg(now.saturating_sub(ms(DEAD_TTL)))
                .invoke_async(&mut conn)
                .await?;
            let field = |i: usize| reply.get(i).map_or("", String::as_str);
            let (reclaimed, dead) = (field(1), field(2));
            if reclaimed != "0" || dead != "0" {
                tracing::info!(
                    worker = %self.worker_id,
                    queue = %self.slots[slot].name,
                    reclaimed, dead,
                    "jobs with an expired lease came back"
                );
            }
            let due = [field(3), field(4)]
                .into_iter()
                .filter_map(|at| at.parse::<u64>().ok())
                .min();
            self.due[slot] = due;
            // Fewer than asked and nothing due now: this queue is empty.
            drained &= reply.len().saturating_sub(5) < left && due.is_none_or(|d| d > now);
            let (mut fetched, mut buried) = (Vec::new(), Vec::new());
            for member in reply.into_iter().skip(5) {
                let member: Arc<str> = member.into();
                match WireJob::decode(&member) {
                    Ok(w) => fetched.push(Fetched {
                        job: w.job,
                        queue: self.slots[slot].name,
                        handbacks: w.handbacks,
                        ready_since_ms: w.ready_since_ms,
                        slot,
                        member,
                    }),
                    Err(e) => {
                        tracing::warn!(
                            worker = %self.worker_id,
                            queue = %self.slots[slot].name,
                            error = %e,
                            "moving an unparseable job to the dead set"
                        );
                        buried.push(Move {
                            slot,
                            new: member.to_string(),
                            old: member,
                            kind: MoveKind::Bury,
                            score: now_ms(),
                        });
                    }
                }
            }
            // Hand this queue's jobs over now: the worker starts on them
            // while the round goes on to the next queue.
            got += fetched.len();
            let consumer = {
                let mut st = self.shared.lock();
                let any = !fetched.is_empty();
                for f in fetched {
                    *st.held.entry((f.slot, f.member.clone())).or_default() += 1;
                    st.buffer.push_back(f);
                }
                for m in buried {
                    *st.held.entry((m.slot, m.old.clone())).or_default() += 1;
                    st.moves.push(m);
                    self.shared.notify.notify_one();
                }
                if any { st.consumer.take() } else { None }
            };
            if let Some(waker) = consumer {
                waker.wake();
            }
        }
        self.idle_until = if got == 0 || drained {
            // Nothing (more) now: sleep until a wake-up, the next due job or
            // lease expiry of any queue, or the fallback poll, whichever is
            // first.
            let wait = self.due.iter().flatten().min().map_or(self.cfg.idle_poll, |&due| {
                Duration::from_millis(due.saturating_sub(now_ms())).min(self.cfg.idle_poll)
            });
            Some(Instant::now() + wait.max(MIN_IDLE))
        } else {
            None
        };
        Ok(got)
    }

    /// Writes pending acks (one pipeline) and moves (one script run per
    /// queue). On failure everything is put back to be retried: both are
    /// idempotent (ZREM; the move script skips jobs no longer in flight).
    async fn flush(&mut self) -> RedisResult<()> {
        let (acks, moves) = {
            let mut st = self.shared.lock();
            st.first_ack_at = None;
            (std::mem::take(&mut st.acks), std::mem::take(&mut st.moves))
        };
        if acks.is_empty() && moves.is_empty() {
            return Ok(());
        }
        let result = self.write_settlements(&acks, &moves).await;
        let mut st = self.shared.lock();
        match result {
            Ok(()) => {
                let mut rescheduled = false;
                for key in acks.into_iter().chain(moves.iter().map(|m| (m.slot, m.old.clone()))) {
                    if let Some(count) = st.held.get_mut(&key) {
                        *count -= 1;
                        if *count == 0 {
                            st.held.remove(&key);
                        }
                    }
                }
                for m in &moves {
                    rescheduled |= m.kind != MoveKind::Bury;
                }
                drop(st);
                if rescheduled {
                    // Look again, at every queue: a handback may be due
                    // before the current idle sleep ends, and a returned
                    // job is ready now.
                    self.idle_until = None;
                    self.hint = 0;
                }
                Ok(())
            }
            Err(e) => {
                if !acks.is_empty() && st.first_ack_at.is_none() {
                    st.first_ack_at = Some(Instant::now());
                }
                st.acks.extend(acks);
                let later = std::mem::replace(&mut st.moves, moves);
                st.moves.extend(later);
                Err(e)
            }
        }
    }

    async fn write_settlements(&self, acks: &[(usize, Arc<str>)], moves: &[Move]) -> RedisResult<()> {
        let mut conn = self.conn.get().await?;
        if !acks.is_empty() {
            let mut by_slot: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
            for (slot, member) in acks {
                by_slot.entry(*slot).or_default().push(member);
            }
            let mut pipe = redis::pipe();
            for (slot, members) in &by_slot {
                for chunk in members.chunks(MEMBERS_PER_COMMAND) {
                    pipe.cmd("ZREM")
                        .arg(&self.slots[*slot].keys.inflight)
                        .arg(chunk)
                        .ignore();
                }
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        let mut by_slot: BTreeMap<usize, Vec<&Move>> = BTreeMap::new();
        for m in moves {
            by_slot.entry(m.slot).or_default().push(m);
        }
        for (slot, moves) in by_slot {
            let keys = &self.slots[slot].keys;
            for chunk in moves.chunks(MEMBERS_PER_COMMAND / 2) {
                let mut inv = MOVE.prepare_invoke();
                inv.key(&keys.inflight)
                    .key(&keys.scheduled)
                    .key(&keys.dead)
                    .key(&keys.ready);
                for m in chunk {
                    inv.arg(m.kind.code()).arg(&*m.old).arg(&m.new).arg(m.score);
                }
                inv.invoke_async::<()>(&mut conn).await?;
            }
        }
        Ok(())
    }

    /// Extends the lease of every job this process holds (`ZADD XX`: a job
    /// already acked or reclaimed is not brought back) and records the
    /// worker as alive.
    async fn heartbeat(&mut self) -> RedisResult<()> {
        let mut by_slot: BTreeMap<usize, Vec<Arc<str>>> = BTreeMap::new();
        for (slot, member) in self.shared.lock().held.keys() {
            by_slot.entry(*slot).or_default().push(member.clone());
        }
        let now = now_ms();
        let deadline = now + ms(self.cfg.lease);
        let mut pipe = redis::pipe();
        for (slot, members) in &by_slot {
            for chunk in members.chunks(MEMBERS_PER_COMMAND) {
                let cmd = pipe.cmd("ZADD").arg(&self.slots[*slot].keys.inflight).arg("XX");
                for m in chunk {
                    cmd.arg(deadline).arg(&**m);
                }
                cmd.ignore();
            }
        }
        let workers = workers_key(&self.cfg.prefix);
        pipe.cmd("HSET")
            .arg(&workers)
            .arg(self.worker_id.as_str())
            .arg(now)
            .ignore();
        let mut conn = self.conn.get().await?;
        pipe.query_async::<()>(&mut conn).await?;
        self.heartbeats += 1;
        if self.heartbeats % 20 == 1 {
            self.prune_workers(now).await?;
        }
        Ok(())
    }

    /// Removes workers that stopped heartbeating long ago (killed ones never
    /// deregister). The hash is informational, so this is only hygiene.
    async fn prune_workers(&mut self, now: u64) -> RedisResult<()> {
        let stale_before = now.saturating_sub(ms(self.cfg.lease * 10).max(ms(Duration::from_secs(600))));
        let workers = workers_key(&self.cfg.prefix);
        let mut conn = self.conn.get().await?;
        let all: Vec<(String, u64)> = redis::cmd("HGETALL").arg(&workers).query_async(&mut conn).await?;
        let stale: Vec<&str> = all
            .iter()
            .filter(|(_, seen)| *seen < stale_before)
            .map(|(id, _)| id.as_str())
            .collect();
        if !stale.is_empty() {
            redis::cmd("HDEL")
                .arg(&workers)
                .arg(&stale)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Graceful close: jobs fetched but never started go back to the front of
    /// their ready lists (in order, unchanged, so a restarted worker gets
    /// them at once), pending acks are written, the worker deregisters.
    async fn close(mut self) {
        self.cancel.cancel();
        {
            let mut st = self.shared.lock();
            let unstarted: Vec<Fetched> = st.buffer.drain(..).collect();
            // RPUSH in reverse, so the first fetched ends up next out.
            for f in unstarted.iter().rev() {
                st.moves.push(Move::returned(f));
            }
        }
        let give_up = Instant::now() + CLOSE_GRACE;
        loop {
            let result = async {
                self.flush().await?;
                let mut conn = self.conn.get().await?;
                redis::cmd("HDEL")
                    .arg(workers_key(&self.cfg.prefix))
                    .arg(self.worker_id.as_str())
                    .query_async::<()>(&mut conn)
                    .await
            }
            .await;
            match result {
                Ok(()) => break,
                Err(e) if Instant::now() >= give_up => {
                    tracing::warn!(
                        worker = %self.worker_id,
                        error = %e,
                        "could not hand back jobs on close; they return when their leases expire"
                    );
                    break;
                }
                Err(e) => {
                    self.outage.failed(self.worker_id.as_str(), &self.cfg.redis_url, &e);
                    self.conn.reset().await;
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
            }
        }
        tracing::debug!(worker = %self.worker_id, "queue backend closed");
        let waker = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.close_waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    async fn sleep_unless_closing(&self, delay: Duration) {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                () = self.shared.notify.notified() => {
                    if self.shared.lock().closing { return; }
                }
                () = tokio::time::sleep_until(until) => return,
            }
        }
    }
}

/// Fetch rounds per cycle a queue leads: high 6, normal 3, low 1. A queue
/// with no work falls through to the next, so the weights only matter when
/// several have work, and low still gets a tenth of the rounds then.
fn weight(queue: QueueName) -> u32 {
    match queue.priority {
        herald_core::Priority::High => 6,
        herald_core::Priority::Normal => 3,
        herald_core::Priority::Low => 1,
    }
}

/// The queues of one fetch round: those a wake-up named first (by
/// priority), else the round's primary; then the rest by priority.
fn fetch_order(primary: usize, by_priority: &[usize], hinted: impl Fn(usize) -> bool) -> Vec<usize> {
    let (named, rest): (Vec<usize>, Vec<usize>) = by_priority.iter().copied().partition(|&s| hinted(s));
    if named.is_empty() {
        std::iter::once(primary)
            .chain(by_priority.iter().copied().filter(|&s| s != primary))
            .collect()
    } else {
        named.into_iter().chain(rest).collect()
    }
}

/// Smooth weighted round robin (as in nginx): for weights 6, 3, 1 the cycle
/// is spread out (H N H L H H N H N H...), not six highs in a row.
fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0_i64; weights.len()];
    let mut out = Vec::new();
    for _ in 0..total {
        for (c, &w) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let mut best = 0;
        for i in 1..current.len() {
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    if out.is_empty() {
        out.push(0);
    }
    out
}

/// The `CLIENT SETNAME` of a worker's connections (both of them).
pub(crate) fn connection_name(worker_id: &impl std::fmt::Display) -> String {
    format!("herald-worker:{worker_id}")
}

/// Keeps a subscription to the wake-up channels alive and turns each message
/// into an engine wake-up. Re-subscribes after any connection loss, and wakes
/// the engine then too (a push may have come while nobody listened).
///
/// Uses a RESP3 connection whose pushes go to a channel: unlike a RESP2
/// pub/sub connection it can be named and pinged while subscribed.
async fn listen(
    client: Client,
    channels: Vec<String>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    worker: String,
    url: String,
) {
    let name = connection_name(&worker);
    let mut backoff = Backoff::new();
    let mut outage = Outage::new("wake-up subscription");
    loop {
        let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
        let subscribe = async {
            let config = connection_config().set_push_sender(tx);
            let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
            set_name(&mut conn, &name).await?;
            conn.subscribe(&channels).await?;
            RedisResult::Ok(conn)
        };
        let subscribed = tokio::select! {
            () = cancel.cancelled() => return,
            r = tokio::time::timeout(CONNECT_TIMEOUT * 2, subscribe) => r,
        };
        let failure = match subscribed {
            Ok(Ok(mut conn)) => {
                outage.recovered(&worker);
                backoff.reset();
                shared.wake_engine();
                let mut ping = tokio::time::interval(PUBSUB_PING);
                ping.tick().await;
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        push = pushes.recv() => match push {
                            Some(PushInfo { kind: PushKind::Message, data }) => {
                                shared.wake_engine_for(message_bits(&data));
                            }
                            Some(PushInfo { kind: PushKind::Disconnection, .. }) | None => {
                                break "subscription connection closed".to_owned();
                            }
                            Some(_) => {}
                        },
                        _ = ping.tick() => {
                            if let Err(e) = redis::cmd("PING").query_async::<()>(&mut conn).await {
                                break e.to_string();
                            }
                        }
                    }
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "subscribing timed out".to_owned(),
        };
        outage.failed(&worker, &url, &failure);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// The priorities a wake-up names; its data is `[channel, message]`.
fn message_bits(data: &[redis::Value]) -> u8 {
    match data.get(1) {
        Some(redis::Value::BulkString(m)) => priority_bits(m),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_starts_with_the_queues_a_wake_up_named() {
        // Slots 0, 1, 2 are high, normal, low.
        let by_priority = [0, 1, 2];
        assert_eq!(fetch_order(0, &by_priority, |_| false), [0, 1, 2]);
        assert_eq!(fetch_order(2, &by_priority, |_| false), [2, 0, 1]);
        assert_eq!(fetch_order(0, &by_priority, |s| s == 1), [1, 0, 2]);
        assert_eq!(fetch_order(0, &by_priority, |s| s == 2), [2, 0, 1]);
        assert_eq!(fetch_order(1, &by_priority, |s| s != 1), [0, 2, 1]);
    }

    #[test]
    fn a_wake_up_names_priorities_and_an_old_one_names_none() {
        use herald_core::Priority::{High, Low, Normal};
        let v = |s: &str| {
            vec![
                redis::Value::BulkString(b"herald:wake:email".to_vec()),
                redis::Value::BulkString(s.into()),
            ]
        };
        assert_eq!(message_bits(&v("normal")), priority_bit(Normal));
        assert_eq!(message_bits(&v("high,low")), priority_bit(High) | priority_bit(Low));
        assert_eq!(message_bits(&v("1")), 0);
        assert_eq!(message_bits(&[]), 0);
        assert_eq!(priority_bit(High) & priority_bit(Normal), 0);
    }

    #[test]
    fn high_normal_low_lead_six_three_and_one_rounds_in_ten() {
        let s = smooth_schedule(&[6, 3, 1]);
        assert_eq!(s.len(), 10);
        let count = |q| s.iter().filter(|&&x| x == q).count();
        assert_eq!((count(0), count(1), count(2)), (6, 3, 1));
        // Spread out: never more than two highs in a row.
        assert!(!s.windows(3).any(|w| w.iter().all(|&x| x == 0)), "{s:?}");
    }
}
