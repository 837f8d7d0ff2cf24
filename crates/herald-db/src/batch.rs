//! Sharing round trips between concurrent callers.
//!
//! Postgres spends its time per statement and per commit far more than per
//! row (DESIGN.md §9), so Herald's hot paths (accepting notifications,
//! claiming deliveries, recording attempts) hand their item to a
//! [`Batcher`] and wait. A collector takes whatever items are waiting, up to
//! a maximum, runs ONE statement for all of them and answers each caller
//! with its own result. Nothing waits on purpose: a lone item runs at once
//! as a batch of one; items that arrive while a batch runs form the next.
//! A caller is answered only after its batch's statement returned, so
//! "committed" means the same as without batching.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::DbError;

type Reply<O> = oneshot::Sender<Result<O, Arc<DbError>>>;

/// A handle to submit items to one batched statement. Cheap to clone.
pub struct Batcher<I, O> {
    tx: mpsc::Sender<(I, Reply<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
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
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(8).max(1));
        tokio::spawn(collect(rx, max_batch.max(1), max_in_flight.max(1), Arc::new(run)));
        Self { tx }
    }

    /// Runs `item` as part of the next batch and returns its output.
    pub async fn submit(&self, item: I) -> Result<O, Arc<DbError>> {
        let (reply, answer) = oneshot::channel();
        let gone = || Arc::new(DbError::Other(sqlx::Error::WorkerCrashed));
        self.tx.send((item, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn collect<I, O, F, Fut>(
    mut rx: mpsc::Receiver<(I, Reply<O>)>,
    max_batch: usize,
    max_in_flight: usize,
    run: Arc<F>,
) where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<O>, DbError>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_in_flight));
    while let Some(first) = rx.recv().await {
        // Waiting for a free slot before gathering lets items pile up
        // meanwhile: busy means big batches, idle means no delay.
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let run = Arc::clone(&run);
        tokio::spawn(async move {
            let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.into_iter().unzip();
            let expected = items.len();
            match run(items).await {
                Ok(outputs) if outputs.len() == expected => {
                    for (reply, out) in replies.into_iter().zip(outputs) {
                        let _ = reply.send(Ok(out));
                    }
                }
                Ok(outputs) => {
                    let e = Arc::new(DbError::Other(sqlx::Error::Protocol(format!(
                        "a batched statement answered {} results for {expected} items",
                        outputs.len()
                    ))));
                    for reply in replies {
                        let _ = reply.send(Err(Arc::clone(&e)));
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for reply in replies {
                        let _ = reply.send(Err(Arc::clone(&e)));
                    }
                }
            }
            drop(permit);
        });
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

    #[tokio::test]
    async fn a_failed_batch_fails_each_of_its_items() {
        let batcher: Batcher<u32, u32> = Batcher::start(10, 1, |_items: Vec<u32>| async {
            Err(DbError::Other(sqlx::Error::PoolTimedOut))
        });
        assert!(batcher.submit(1).await.is_err());
    }
}
