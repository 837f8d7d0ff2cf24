//! The backend's middleware: it sees every task's outcome and settles the
//! job accordingly (ack, hand back, or give back).
//!
//! apalis places a backend's layer outside the user's middleware, so it sees
//! the result after `catch_panic`, `timeout` and the like. It also catches
//! panics itself: a worker built without `catch_panic` must still neither
//! stop nor lose the job.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use futures::FutureExt;
use tower_layer::Layer;
use tower_service::Service;

use super::shared::Shared;
use crate::Fetched;

/// The `Layer` of [`crate::RedisBackend`] (see `BackendConfig::middleware`).
#[derive(Clone)]
pub struct SettleLayer {
    shared: Arc<Shared>,
}

impl SettleLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> Layer<S> for SettleLayer {
    type Service = SettleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SettleService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct SettleService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// A handler panicked; the job was handed back.
#[derive(Debug, thiserror::Error)]
#[error("handler panicked: {0}")]
pub struct HandlerPanicked(pub String);

impl<S> Service<Task<Fetched>> for SettleService<S>
where
    S: Service<Task<Fetched>>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxDynError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Fetched>) -> Self::Future {
        // Armed before the inner call: if anything below drops the task
        // unfinished, the guard gives the job back instead of losing it.
        let mut guard = Settle {
            shared: self.shared.clone(),
            fetched: Some(task.args.clone()),
        };
        let fut = self.inner.call(task);
        Box::pin(async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(response)) => {
                    guard.settle(Outcome::Done);
                    Ok(response)
                }
                Ok(Err(e)) => {
                    guard.settle(Outcome::Failed);
                    Err(e.into())
                }
                Err(panic) => {
                    guard.settle(Outcome::Failed);
                    Err(HandlerPanicked(panic_message(panic.as_ref())).into())
                }
            }
        })
    }
}

enum Outcome {
    Done,
    Failed,
}

struct Settle {
    shared: Arc<Shared>,
    fetched: Option<Fetched>,
}

impl Settle {
    fn settle(&mut self, outcome: Outcome) {
        if let Some(f) = self.fetched.take() {
            match outcome {
                Outcome::Done => self.shared.ack(&f),
                Outcome::Failed => self.shared.hand_back(&f),
            }
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if let Some(f) = self.fetched.take() {
            self.shared.give_back(&f);
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
