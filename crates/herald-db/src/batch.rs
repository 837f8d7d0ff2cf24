//! Sharing round trips between concurrent callers.
//!
//! Postgres spends its time per statement and per commit far more than per
//! row, so Herald's hot paths (accepting notifications,
//! claiming deliveries, recording attempts) hand their item to a
//! [`Batcher`] and wait. A collector takes whatever items are waiting, up to
//! a maximum, runs ONE statement for all of them and answers each caller
//! with its own result. An idle batcher never waits: a lone item runs at
//! once as a batch of one; items that arrive while a batch runs form the
//! next. Where several batches may run at once, a new one starts beside a
//! running one only with [`MIN_BESIDE_ANOTHER`] items; fewer wait for a
//! running batch to finish (never on a timer). A caller is answered only
//! after its batch's statement returned, so "committed" means the same as
//! without batching.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

use crate::DbError;

type Reply<O> = oneshot::Sender<Result<O, Arc<DbError>>>;

/// Fewest items a batch starts with while another batch is running: enough
/// that a batch beside another is worth its own statement and commit, few
/// enough that a burst does not wait long for company (docs/performance.md).
pub const MIN_BESIDE_ANOTHER: usize = 8;

/// A handle to submit items to one batched statement. Cheap to clone.
pub struct Batcher<I, O> {
    tx: mpsc::Sender<(I, Reply<O>)>,
    /// One permit per batch that may run at once; a running batch holds
    /// its permit until its after-work is done.
    slots: Arc<Semaphore>,
    max_in_flight: u32,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            slots: Arc::clone(&self.slots),
            max_in_flight: self.max_in_flight,
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts the collector on the current tokio runtime. `run` gets a batch
    /// and must return one output per input, in order; at most
    /// `max_in_flight` batches run at once (each holds one connection).
    pub fn start<F, Fut>(max_batch: usize, max_in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, DbError>> + Send + 'static,
    {
        Self::start_then(max_batch, max_in_flight, move |items| {
            let answered = run(items);
            async move { answered.await.map(|outputs| (outputs, std::future::ready(()))) }
        })
    }

    /// Like [`Batcher::start`], but `run` also returns work to do after its
    /// callers are answered: the batch keeps its slot until that work is
    /// done, so it still counts against `max_in_flight` (the API answers
    /// once a batch is committed and pushes its jobs to Redis afterwards).
    pub fn start_then<F, Fut, Then>(max_batch: usize, max_in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(Vec<O>, Then), DbError>> + Send + 'static,
        Then: Future<Output = ()> + Send + 'static,
    {
        let max_in_flight = u32::try_from(max_in_flight.max(1)).unwrap_or(u32::MAX);
        let slots = Arc::new(Semaphore::new(max_in_flight as usize));
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(8).max(1));
        tokio::spawn(collect(
            rx,
            max_batch.max(1),
            Arc::clone(&slots),
            max_in_flight as usize,
            Arc::new(run),
        ));
        Self {
            tx,
            slots,
            max_in_flight,
        }
    }

    /// Waits until no batch is running, its after-work included. Every
    /// item whose [`submit`](Self::submit) has returned was in a batch that
    /// has then finished; items submitted meanwhile may start new batches.
    /// A process shutting down calls this once its callers are gone, so
    /// the work it owes them after answering (the API's Redis push) is not
    /// cut off by the exit.
    pub async fn settled(&self) {
        // The permits come back as each running batch finishes; holding
        // them all at once means none was running. Dropped at once.
        let _all = self.slots.acquire_many(self.max_in_flight).await;
    }

    /// Runs `item` as part of the next batch and returns its output.
    pub async fn submit(&self, item: I) -> Result<O, Arc<DbError>> {
        let (reply, answer) = oneshot::channel();
        let gone = || Arc::new(DbError::Other(sqlx::Error::WorkerCrashed));
        self.tx.send((item, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn collect<I, O, F, Fut, Then>(
    mut rx: mpsc::Receiver<(I, Reply<O>)>,
    max_batch: usize,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    run: Arc<F>,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(Vec<O>, Then), DbError>> + Send + 'static,
    Then: Future<Output = ()> + Send + 'static,
{
    // Told whenever a batch finishes.
    let finished = Arc::new(Notify::new());
    while let Some(first) = rx.recv().await {
        // Waiting for a free slot before gathering lets items pile up
        // meanwhile: busy means big batches, idle means no delay.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        drain_waiting(&mut rx, &mut batch, max_batch);
        // A small batch does not start beside a running one: it waits for
        // that one to finish or for enough company. Without this the
        // answers of one big batch, whose callers come back in a burst,
        // let the burst's first arrival take the free slot alone, and many
        // batches would hold a single request.
        // Nothing waits on a timer, and an idle batcher never waits.
        loop {
            let notified = finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let others_running = permits.available_permits() + 1 < max_in_flight;
            if batch.len() >= MIN_BESIDE_ANOTHER.min(max_batch) || !others_running {
                break;
            }
            tokio::select! {
                next = rx.recv() => match next {
                    Some(next) => {
                        batch.push(next);
                        drain_waiting(&mut rx, &mut batch, max_batch);
                    }
                    None => break,
                },
                () = &mut notified => break,
            }
        }
        let run = Arc::clone(&run);
        let finished = Arc::clone(&finished);
        tokio::spawn(async move {
            let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.into_iter().unzip();
            let expected = items.len();
            match run(items).await {
                Ok((outputs, then)) if outputs.len() == expected => {
                    for (reply, out) in replies.into_iter().zip(outputs) {
                        let _ = reply.send(Ok(out));
                    }
                    then.await;
                }
                Ok((outputs, then)) => {
                    let e = Arc::new(DbError::Other(sqlx::Error::Protocol(format!(
                        "a batched statement answered {} results for {expected} items",
                        outputs.len()
                    ))));
                    for reply in replies {
                        let _ = reply.send(Err(Arc::clone(&e)));
                    }
                    then.await;
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for reply in replies {
                        let _ = reply.send(Err(Arc::clone(&e)));
                    }
                }
            }
            drop(permit);
            finished.notify_waiters();
        });
    }
}

/// Moves items already waiting into `batch`, up to `max_batch`.
fn drain_waiting<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max_batch: usize) {
    while batch.len() < max_batch {
        match rx.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_items_share_a_batch_and_each_gets_its_own_result() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&calls);
        let batcher = Batcher::start(100, 1, move |items: Vec<u32>| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push(items.len());
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(items.into_iter().map(|i| i * 2).collect())
            }
        });
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(i).await.unwrap() })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.await.unwrap(), 2 * i as u32);
        }
        let sizes = calls.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 50);
        assert!(sizes.len() < 50, "items should have shared batches: {sizes:?}");
    }

    type Log = Arc<std::sync::Mutex<Vec<(usize, u128, u128)>>>;

    /// A batcher whose statement takes `ms` and records (size, started,
    /// finished) of every batch, relative to `t0`; and how many started.
    fn timed(ms: u64, max_in_flight: usize) -> (Batcher<u32, u32>, Log, Arc<std::sync::atomic::AtomicUsize>) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&log);
        let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&starts);
        let t0 = std::time::Instant::now();
        let batcher = Batcher::start(256, max_in_flight, move |items: Vec<u32>| {
            let seen = Arc::clone(&seen);
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let started = t0.elapsed().as_millis();
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                seen.lock()
                    .unwrap()
                    .push((items.len(), started, t0.elapsed().as_millis()));
                Ok(items)
            }
        });
        (batcher, log, starts)
    }

    /// Waits until `n` batches have started.
    async fn started(starts: &std::sync::atomic::AtomicUsize, n: usize) {
        while starts.load(std::sync::atomic::Ordering::SeqCst) < n {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    fn submit_all(b: &Batcher<u32, u32>, n: u32) -> Vec<tokio::task::JoinHandle<u32>> {
        (0..n)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(i).await.unwrap() })
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_few_items_wait_for_the_running_batch_instead_of_starting_beside_it() {
        let (batcher, log, starts) = timed(100, 2);
        let first = submit_all(&batcher, 1);
        started(&starts, 1).await;
        // Fewer than MIN_BESIDE_ANOTHER arrive while the first batch runs.
        let rest = submit_all(&batcher, 3);
        for h in first.into_iter().chain(rest) {
            h.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        let sizes: Vec<usize> = log.iter().map(|(n, ..)| *n).collect();
        assert_eq!(sizes, vec![1, 3], "{log:?}");
        assert!(
            log[1].1 >= log[0].2,
            "the second batch started only after the first ended: {log:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enough_items_start_a_batch_beside_the_running_one() {
        let (batcher, log, starts) = timed(200, 2);
        let first = submit_all(&batcher, 1);
        started(&starts, 1).await;
        let rest = submit_all(&batcher, 2 * MIN_BESIDE_ANOTHER as u32);
        for h in first.into_iter().chain(rest) {
            h.await.unwrap();
        }
        let log = log.lock().unwrap().clone();
        assert!(log.len() >= 2, "{log:?}");
        let (first_started, first_ended) = (log.iter().map(|l| l.1).min().unwrap(), log[0].2);
        let second_started = log.iter().map(|l| l.1).filter(|s| *s > first_started).min().unwrap();
        assert!(
            second_started < first_ended,
            "the second batch ran beside the first: {log:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_item_on_an_idle_batcher_runs_at_once() {
        let (batcher, log, _) = timed(10, 2);
        let t = std::time::Instant::now();
        assert_eq!(batcher.submit(7).await.unwrap(), 7);
        assert!(t.elapsed() < std::time::Duration::from_millis(200), "{:?}", t.elapsed());
        assert_eq!(log.lock().unwrap()[0].0, 1);
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_items() {
        let batcher: Batcher<u32, u32> = Batcher::start(10, 1, |_items: Vec<u32>| async {
            Err(DbError::Other(sqlx::Error::PoolTimedOut))
        });
        assert!(batcher.submit(1).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_are_answered_before_the_follow_up_which_keeps_the_slot() {
        // The follow-up of the first batch waits until the test lets it go.
        let (release, released) = tokio::sync::watch::channel(false);
        let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&batches);
        let batcher = Batcher::start_then(10, 1, move |items: Vec<u32>| {
            let mut released = released.clone();
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let then = async move {
                    if n == 0 {
                        let _ = released.wait_for(|r| *r).await;
                    }
                };
                Ok((items, then))
            }
        });
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), batcher.submit(1)).await;
        assert_eq!(first.expect("answered while its follow-up still runs").unwrap(), 1);
        // With one slot, held by the first batch's follow-up, a second
        // item cannot start its batch yet.
        let b = batcher.clone();
        let second = tokio::spawn(async move { b.submit(2).await.unwrap() });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!second.is_finished(), "the slot was free during the follow-up");
        assert_eq!(batches.load(std::sync::atomic::Ordering::SeqCst), 1);
        release.send(true).unwrap();
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), second).await;
        assert_eq!(second.expect("the slot came back").unwrap(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settled_waits_for_every_running_follow_up() {
        // Two batches at once, each with a follow-up that waits for the
        // test; settled() may return only once both follow-ups are done.
        let (release, released) = tokio::sync::watch::channel(false);
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let finished = Arc::clone(&done);
        let batcher = Batcher::start_then(256, 2, move |items: Vec<u32>| {
            let mut released = released.clone();
            let finished = Arc::clone(&finished);
            async move {
                let then = async move {
                    let _ = released.wait_for(|r| *r).await;
                    finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                };
                Ok((items, then))
            }
        });
        // A lone item takes the first slot (its follow-up keeps it), then
        // enough items for a batch beside it take the second.
        let first = batcher.submit(0).await.unwrap();
        assert_eq!(first, 0);
        let answers: Vec<_> = (1..=MIN_BESIDE_ANOTHER as u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { b.submit(i).await.unwrap() })
            })
            .collect();
        for a in answers {
            tokio::time::timeout(std::time::Duration::from_secs(5), a)
                .await
                .expect("answered before the follow-ups")
                .unwrap();
        }
        let settled = {
            let b = batcher.clone();
            tokio::spawn(async move { b.settled().await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!settled.is_finished(), "settled while follow-ups were running");
        release.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), settled)
            .await
            .expect("settled once the follow-ups finished")
            .unwrap();
        assert_eq!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "both batches' follow-ups ran"
        );
        // Settling leaves the batcher usable.
        assert_eq!(batcher.submit(99).await.unwrap(), 99);
    }
}
