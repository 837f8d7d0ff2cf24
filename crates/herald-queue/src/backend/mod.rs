//! [`RedisBackend`]: Herald's apalis backend.
//!
//! The apalis worker drives it through `poll_next` (hand me a task) and
//! `poll_close` (shutting down); neither does I/O. A per-backend engine task
//! (`engine.rs`) does all Redis work in the background and meets the worker
//! in a small shared buffer (`shared.rs`). The backend's middleware
//! (`settle.rs`) sees each task's outcome and queues the ack or handback.
//!
//! `poll_next` never returns an error (an error would end the apalis worker):
//! Redis trouble is the engine's to retry, and meanwhile the worker simply
//! has no new tasks.

mod engine;
mod settle;
mod shared;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use tokio::task::JoinHandle;

use self::engine::{Engine, Slot};
pub use self::settle::{HandlerPanicked, SettleLayer, SettleService};
use self::shared::Shared;
use crate::conn::open_client;
use crate::{DeliveryJob, QueueConfig, QueueError, QueueName, WorkerId};

/// What a handler receives: the job, where it came from, and how many times
/// it came back before (handler error or panic, lease expiry).
#[derive(Debug, Clone)]
pub struct Fetched {
    pub job: DeliveryJob,
    pub queue: QueueName,
    pub handbacks: u32,
    pub(crate) ready_since_ms: u64,
    /// Index of the queue in the backend's list.
    pub(crate) slot: usize,
    /// The exact stored member: acks and handbacks name it.
    pub(crate) member: Arc<str>,
}

impl Fetched {
    /// When the job became due (enqueued, or its delay ended): the time it
    /// has been waiting for a worker is measured from here.
    #[must_use]
    pub fn ready_since(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.ready_since_ms)
    }
}

/// Herald's Redis backend for apalis. See the crate documentation for the
/// protocol and for how to build and stop a worker with it.
pub struct RedisBackend {
    cfg: QueueConfig,
    queues: Vec<QueueName>,
    worker_id: WorkerId,
    shared: Arc<Shared>,
    slots: Arc<[Slot]>,
    client: redis::Client,
    pubsub_client: redis::Client,
    engine: Option<JoinHandle<()>>,
    served: u64,
}

impl RedisBackend {
    /// `queues` in priority order (use [`QueueName::for_channel`]); higher
    /// priorities are served first but lower ones are never starved. Does
    /// not connect: the engine starts on the first poll and keeps trying
    /// until Redis answers.
    pub fn new(cfg: QueueConfig, queues: Vec<QueueName>, worker_id: WorkerId) -> Result<Self, QueueError> {
        cfg.validate()?;
        if queues.is_empty() {
            return Err(QueueError::InvalidConfig(
                "a backend needs at least one queue".to_owned(),
            ));
        }
        let distinct: std::collections::HashSet<_> = queues.iter().collect();
        if distinct.len() != queues.len() {
            return Err(QueueError::InvalidConfig(format!(
                "a backend's queues must be distinct: {queues:?}"
            )));
        }
        let client = open_client(&cfg.redis_url, false)?;
        let pubsub_client = open_client(&cfg.redis_url, true)?;
        let slots: Arc<[Slot]> = queues
            .iter()
            .map(|q| Slot {
                name: *q,
                keys: q.keys(&cfg.prefix),
            })
            .collect();
        Ok(Self {
            shared: Arc::new(Shared::new(cfg.fetch_batch, cfg.max_handbacks)),
            cfg,
            queues,
            worker_id,
            slots,
            client,
            pubsub_client,
            engine: None,
            served: 0,
        })
    }

    #[must_use]
    pub fn worker_id(&self) -> &WorkerId {
        &self.worker_id
    }

    #[must_use]
    pub fn queues(&self) -> &[QueueName] {
        &self.queues
    }

    /// Starts the engine on first use, and again should it ever have died
    /// (it is not supposed to: it catches every Redis error itself).
    fn ensure_engine(&mut self) -> Result<(), QueueError> {
        if self.engine.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        if self.engine.is_some() {
            tracing::error!(worker = %self.worker_id, "queue backend engine stopped; restarting it");
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| QueueError::NoRuntime)?;
        let engine = Engine::new(
            self.cfg.clone(),
            self.worker_id.clone(),
            self.shared.clone(),
            self.slots.clone(),
            self.client.clone(),
            self.pubsub_client.clone(),
        );
        self.engine = Some(runtime.spawn(engine.run()));
        Ok(())
    }
}

impl Backend for RedisBackend {
    type Task = Task<Fetched>;
    type Error = QueueError;

    fn poll_ready(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(&mut self, cx: &mut Context<'_>, _: &WorkerContext) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        if let Err(e) = self.ensure_engine() {
            // Only without a Tokio runtime: a programming error, not an outage.
            return Poll::Ready(Some(Err(e)));
        }
        let mut st = self.shared.lock();
        if let Some(fetched) = st.buffer.pop_front() {
            let refill = st.buffer.len() <= self.shared.low_water();
            drop(st);
            if refill {
                self.shared.notify.notify_one();
            }
            self.served += 1;
            let id = format!("{}~{}", fetched.job.delivery_id, self.served);
            return Poll::Ready(Some(Ok(TaskBuilder::new(fetched)
                .task_id(TaskId::from_string(id))
                .build())));
        }
        let was_waiting = st.consumer.replace(cx.waker().clone()).is_some();
        drop(st);
        if !was_waiting {
            self.shared.notify.notify_one();
        }
        Poll::Pending
    }

    /// Called by apalis once every started task has finished: hands back what
    /// is buffered, flushes acks, deregisters; completes when that is done
    /// (or, with Redis down, after a few seconds: leases then return the jobs).
    fn poll_close(&mut self, cx: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        let Some(engine) = self.engine.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        let mut st = self.shared.lock();
        if st.closed || engine.is_finished() {
            st.closed = true;
            return Poll::Ready(Ok(()));
        }
        st.close_waker = Some(cx.waker().clone());
        if !st.closing {
            st.closing = true;
            drop(st);
            self.shared.notify.notify_one();
        }
        Poll::Pending
    }
}

impl BackendConfig for RedisBackend {
    type Args = Fetched;
    type Id = String;
    type Kind = Ephemeral;
    type Config = QueueConfig;
    type Layer = SettleLayer;

    fn config(&self) -> &Self::Config {
        &self.cfg
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Self::Layer {
        SettleLayer::new(self.shared.clone())
    }
}

impl Drop for RedisBackend {
    /// A backend dropped without `poll_close` (its worker future was
    /// dropped) still hands back its buffered jobs in the background.
    fn drop(&mut self) {
        if self.engine.is_some() {
            self.shared.lock().closing = true;
            self.shared.notify.notify_one();
        }
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("worker_id", &self.worker_id)
            .field("queues", &self.queues)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}
