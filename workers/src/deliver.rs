//! One job, start to finish: claim in Postgres, send through the channel,
//! classify, record, and schedule the retry if there is one.

use std::sync::Arc;
use std::time::Duration;

use herald_channels::SendError;
use herald_channels::email::{Email, EmailSender};
use herald_channels::push::{PushMessage, PushSender, Target};
use herald_core::validate::mask_email;
use herald_core::{EmailAddress, ErrorClass, IdText};
use herald_db::batch::Batcher;
use herald_db::deliveries::{AttemptResult, ClaimedDelivery, InboxDelivered, NextState, Recorded};
use herald_db::held::Held;
use herald_queue::{DeliveryJob, QueueClient, QueueName, UserChanges, WorkerId};
use sqlx::PgPool;
use tracing::Instrument;

use crate::retry::RetryPolicy;

/// The provider side of a worker.
#[derive(Debug, Clone)]
pub enum Sender {
    Email(EmailSender),
    Push(PushSender),
    InApp,
}

/// A worker's connections to Postgres.
pub struct Pools {
    /// Planned per call (`herald_db::connect_lazy_planned_per_call`):
    /// device updates, retries' enqueue marks.
    pub per_call: PgPool,
    /// Planned once (`herald_db::connect_lazy_planned_once`): claims,
    /// results and in-app deliveries, whose statements are shaped for one
    /// plan.
    pub planned_once: PgPool,
}

/// Everything a worker's handler needs. Shared by all its in-flight jobs.
pub struct Deliverer {
    pub pool: PgPool,
    pub queue: QueueClient,
    pub worker_id: WorkerId,
    pub sender: Sender,
    pub retry: RetryPolicy,
    pub lease: Duration,
    pub send_timeout: Duration,
    batches: Batches,
}

/// Concurrent jobs share their round trips to Postgres: a worker with 64
/// deliveries in flight claims them in a few statements, not 64.
///
/// After each claim and record statement, the users whose deliveries moved
/// are published once for the whole batch (off the batch's path), so live
/// clients see `sending` and the outcome without polling.
struct Batches {
    claims: Batcher<(String, i32), Option<ClaimedDelivery>>,
    /// Each result with its delivery's user.
    records: Batcher<(AttemptResult, String), Recorded>,
    /// In-app jobs, delivered whole in one statement each batch.
    in_app: Batcher<(String, i32), Option<InboxDelivered>>,
}

/// Most items in one batched statement.
const MAX_BATCH: usize = 256;
/// Statements of one kind running at once. One: the jobs that arrive while
/// a claim (or result) statement runs all go into the next, so batches are
/// bigger than with two in flight, and Postgres plans and commits fewer
/// statements per delivery (docs/performance.md); a lone job on an idle
/// worker still runs at once.
const MAX_IN_FLIGHT: usize = 1;

impl Batches {
    /// Every batch runs on `planned_once`
    /// (`herald_db::connect_lazy_planned_once`: its statements are shaped
    /// for one plan).
    fn start(planned_once: &PgPool, queue: &QueueClient, worker_id: &WorkerId, lease: Duration) -> Self {
        let changes = UserChanges::start(queue.clone());
        // Kept between statements (no ping after each: `herald_db::held`).
        let held = Held::new(planned_once.clone());
        let p = held.clone();
        let c = changes.clone();
        let (w, lease_secs) = (worker_id.to_string(), lease.as_secs_f64());
        let claims = Batcher::start(MAX_BATCH, MAX_IN_FLIGHT, move |jobs: Vec<(String, i32)>| {
            let (p, w, c) = (p.clone(), w.clone(), c.clone());
            async move {
                let mut conn = p.acquire().await?;
                let claimed = herald_db::deliveries::claim_deliveries(&mut conn, &jobs, lease_secs, &w).await?;
                conn.keep();
                c.changed(claimed.iter().flatten().map(|d| d.user_id.clone()));
                Ok(claimed)
            }
        });
        let p = held.clone();
        let c = changes.clone();
        let records = Batcher::start(MAX_BATCH, MAX_IN_FLIGHT, move |items: Vec<(AttemptResult, String)>| {
            let (p, c) = (p.clone(), c.clone());
            async move {
                let (results, users): (Vec<AttemptResult>, Vec<String>) = items.into_iter().unzip();
                // The sends are done: a batch that fails here costs each of
                // its deliveries a second send. A connection that broke
                // while idle (Postgres restarted) fails only its statement,
                // so try once more on a fresh one. Safe to repeat: the
                // statement is fenced on `sending` and the attempt, so a
                // first try that did commit makes the second find nothing
                // (stale), and the sweeper enqueues a retry it then owes.
                let record = async || -> herald_db::Result<Vec<Recorded>> {
                    let mut conn = p.acquire().await?;
                    let recorded = herald_db::deliveries::record_attempts(&mut *conn, &results).await?;
                    conn.keep();
                    Ok(recorded)
                };
                let recorded: Vec<Recorded> = match record().await {
                    Err(e) if e.is_unavailable() => record().await?,
                    outcome => outcome?,
                };
                c.changed(
                    users
                        .into_iter()
                        .zip(&recorded)
                        .filter(|(_, r)| matches!(r, Recorded::Moved { .. }))
                        .map(|(u, _)| u),
                );
                Ok(recorded)
            }
        });
        let p = held;
        let w = worker_id.to_string();
        let in_app = Batcher::start(MAX_BATCH, MAX_IN_FLIGHT, move |jobs: Vec<(String, i32)>| {
            let (p, w, c) = (p.clone(), w.clone(), changes.clone());
            async move {
                let mut conn = p.acquire().await?;
                let done = herald_db::deliveries::deliver_in_app(&mut conn, &jobs, &w).await?;
                conn.keep();
                c.changed(done.iter().flatten().map(|d| d.user_id.clone()));
                // Live clients hear of each item at once, the whole batch
                // in one publish; one that misses it (pub/sub keeps
                // nothing) finds the item in its inbox.
                for d in done.iter().flatten() {
                    let event = serde_json::json!({
                        "type": "inbox.item.created",
                        "user_id": d.user_id,
                        "notification_id": d.notification_id,
                        "category": d.category,
                        "title": d.title,
                    });
                    c.announce(event.to_string());
                }
                Ok(done)
            }
        });
        Self {
            claims,
            records,
            in_app,
        }
    }
}

/// A batch failed for all its items: the job goes back to the queue.
fn shared(e: &herald_db::DbError) -> DeliverError {
    DeliverError::Db(if e.is_unavailable() {
        herald_db::DbError::Unavailable(sqlx::Error::PoolTimedOut)
    } else {
        herald_db::DbError::Other(sqlx::Error::Protocol(e.to_string()))
    })
}

/// How sending went, before it is turned into a state.
enum Sent {
    Ok {
        status: &'static str,
        detail: Option<serde_json::Value>,
    },
    Skipped(String),
    Err(SendError, Option<serde_json::Value>),
}

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// Postgres is unavailable or failed: the job goes back to the queue
    /// and is tried again shortly.
    #[error(transparent)]
    Db(#[from] herald_db::DbError),
}

impl Deliverer {
    /// Builds the deliverer and starts its batchers (on the current runtime).
    #[must_use]
    pub fn new(
        pools: Pools,
        queue: QueueClient,
        worker_id: WorkerId,
        sender: Sender,
        retry: RetryPolicy,
        lease: Duration,
        send_timeout: Duration,
    ) -> Self {
        let batches = Batches::start(&pools.planned_once, &queue, &worker_id, lease);
        Self {
            pool: pools.per_call,
            queue,
            worker_id,
            sender,
            retry,
            lease,
            send_timeout,
            batches,
        }
    }

    /// Handles one job. `Ok` acknowledges it; `Err` hands it back to the
    /// queue (only for infrastructure failures: provider failures are
    /// outcomes, recorded and scheduled in Postgres).
    pub async fn deliver(self: &Arc<Self>, job: &DeliveryJob) -> Result<(), DeliverError> {
        let span = tracing::info_span!(
            "delivery",
            delivery_id = %job.delivery_id,
            attempt = job.attempt + 1,
            request_id = job.request_id.as_deref().unwrap_or("-"),
            worker_id = %self.worker_id,
        );
        self.deliver_inner(job).instrument(span).await
    }

    async fn deliver_inner(&self, job: &DeliveryJob) -> Result<(), DeliverError> {
        let id = job.delivery_id.to_string();
        if matches!(self.sender, Sender::InApp) {
            return self.deliver_in_app(id, job.attempt).await;
        }
        let Some(claimed) = self
            .batches
            .claims
            .submit((id, job.attempt))
            .await
            .map_err(|e| shared(&e))?
        else {
            // Already claimed, finished or cancelled: a duplicate or stale job.
            tracing::debug!("job is stale; nothing to do");
            return Ok(());
        };
        // A backstop only: each channel bounds its own calls by the send
        // timeout and classifies what it knows (before or after the content
        // went out); this fires only if a channel overran its own bound.
        let backstop = self.send_timeout + Duration::from_secs(2);
        let sent = match tokio::time::timeout(backstop, self.send(&claimed)).await {
            Ok(sent) => sent?,
            Err(_) => Sent::Err(
                SendError::new(ErrorClass::Ambiguous, format!("no answer within {backstop:?}")),
                None,
            ),
        };
        self.record(&claimed, sent).await
    }

    async fn send(&self, d: &ClaimedDelivery) -> Result<Sent, DeliverError> {
        Ok(match &self.sender {
            Sender::Email(sender) => {
                let Some(raw) = d.email.as_deref() else {
                    return Ok(Sent::Skipped("user has no email address".into()));
                };
                let to = match EmailAddress::parse(raw) {
                    Ok(to) => to,
                    Err(e) => {
                        return Ok(Sent::Err(SendError::new(ErrorClass::Permanent, e.to_string()), None));
                    }
                };
                let mut delivery_id = IdText::default();
                let email = Email {
                    delivery_id: d.id.text(&mut delivery_id),
                    to: &to,
                    subject: &d.title,
                    text: &d.body,
                };
                match sender.send(&email).await {
                    Ok(()) => {
                        tracing::info!(to = %mask_email(raw), "email sent");
                        Sent::Ok {
                            status: "sent",
                            detail: None,
                        }
                    }
                    Err(e) => Sent::Err(e, None),
                }
            }
            Sender::Push(sender) => {
                let devices = &d.devices.0;
                if devices.is_empty() {
                    return Ok(Sent::Skipped("user has no active push device".into()));
                }
                let targets: Vec<Target<'_>> = devices
                    .iter()
                    .map(|dev| Target {
                        device_id: &dev.id,
                        provider: dev.provider,
                        platform: dev.platform,
                        token: &dev.token,
                    })
                    .collect();
                let (mut delivery_id, mut notification_id) = (IdText::default(), IdText::default());
                let message = PushMessage {
                    delivery_id: d.id.text(&mut delivery_id),
                    notification_id: d.notification_id.text(&mut notification_id),
                    title: &d.title,
                    body: &d.body,
                    data: &d.data,
                    priority: d.priority,
                };
                match sender.send(&message, &targets).await {
                    Err(e) => Sent::Err(e, None),
                    Ok(results) => {
                        for r in results.iter().filter(|r| r.unregistered) {
                            let reason = r.error.as_deref().unwrap_or("unregistered");
                            herald_db::users::disable_device(&self.pool, &r.device_id, reason).await?;
                        }
                        let ok = results.iter().filter(|r| r.ok).count();
                        let detail = serde_json::json!({
                            "devices": results.len(),
                            "succeeded": ok,
                            "failed": results.len() - ok,
                            "results": results,
                        });
                        tracing::info!(devices = results.len(), succeeded = ok, "push sent");
                        match herald_channels::push::overall_failure(&results) {
                            None => Sent::Ok {
                                status: "sent",
                                detail: Some(detail),
                            },
                            Some(e) => Sent::Err(e, Some(detail)),
                        }
                    }
                }
            }
            // Not reached: `deliver_inner` hands in-app jobs to
            // `deliver_in_app`, which needs no claim. Failing the attempt
            // (rather than panicking) keeps a future routing bug visible in
            // the delivery's history.
            Sender::InApp => Sent::Err(
                SendError::new(ErrorClass::Permanent, "in-app deliveries are not sent through a claim"),
                None,
            ),
        })
    }

    /// An in-app job: claim, inbox write and result in one statement.
    async fn deliver_in_app(&self, id: String, attempt: i32) -> Result<(), DeliverError> {
        let delivered = self
            .batches
            .in_app
            .submit((id, attempt))
            .await
            .map_err(|e| shared(&e))?;
        if delivered.is_some() {
            // Its `inbox.item.created` went out with the batch's changes.
            tracing::info!("in-app message delivered to the inbox");
        } else {
            tracing::debug!("job is stale; nothing to do");
        }
        Ok(())
    }

    async fn record(&self, d: &ClaimedDelivery, sent: Sent) -> Result<(), DeliverError> {
        let attempt = u32::try_from(d.attempt).unwrap_or(u32::MAX);
        let (next, outcome, provider_status, error, detail) = match sent {
            Sent::Ok { status, detail } => {
                let next = if status == "delivered" {
                    NextState::Delivered
                } else {
                    NextState::Sent
                };
                (next, status, None, None, detail)
            }
            Sent::Skipped(reason) => (NextState::Skipped { reason }, "skipped", None, None, None),
            Sent::Err(e, detail) => {
                let next = if !e.class.is_retryable() {
                    NextState::Failed
                } else if d.attempt >= d.max_attempts {
                    NextState::Dead
                } else {
                    NextState::Retrying {
                        after: self.retry.delay_after(attempt, e.retry_after),
                    }
                };
                tracing::warn!(class = %e.class, error = %e.message, next = ?next, "attempt failed");
                (
                    next,
                    e.class.as_str(),
                    e.provider_status.map(i32::from),
                    Some(e.message),
                    detail,
                )
            }
        };
        let recorded = self
            .batches
            .records
            .submit((
                AttemptResult {
                    delivery_id: d.id.to_string(),
                    attempt: d.attempt,
                    next,
                    outcome,
                    provider_status,
                    error,
                    detail,
                },
                d.user_id.clone(),
            ))
            .await
            .map_err(|e| shared(&e))?;
        match recorded {
            Recorded::Stale => {
                // The lease lapsed and the sweeper (or a newer attempt) took
                // over: this result must not overwrite theirs.
                tracing::warn!("result not applied: the delivery moved on while this attempt ran");
            }
            Recorded::Moved {
                next_attempt_at: Some(at),
            } => self.schedule_retry(d, at).await,
            Recorded::Moved { next_attempt_at: None } => {}
        }
        Ok(())
    }

    /// Pushes the delayed job for the next attempt. If Redis is down, the
    /// delivery is still `retrying` in Postgres and the sweeper enqueues it.
    async fn schedule_retry(&self, d: &ClaimedDelivery, at: chrono::DateTime<chrono::Utc>) {
        let job = DeliveryJob {
            delivery_id: d.id,
            attempt: d.attempt,
            request_id: d.request_id.clone(),
        };
        let when = std::time::SystemTime::from(at);
        match self
            .queue
            .enqueue_at(&[(QueueName::new(d.channel, d.priority), job, when)])
            .await
        {
            Ok(()) => {
                if let Err(e) =
                    herald_db::notifications::mark_enqueued(&self.pool, &[(d.id.to_string(), d.attempt)]).await
                {
                    tracing::debug!(error = %e, "could not mark the retry enqueued; the sweeper may push a duplicate");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not enqueue the retry; the sweeper will"),
        }
    }
}
