//! The replay runner: carries out the replays operators ask for
//! (`POST /v1/admin/replays`), in the background, durably.
//!
//! It runs in every worker process next to the sweeper. A replay has one
//! owner at a time: a runner claims it (`FOR UPDATE SKIP LOCKED`), beats on
//! every batch, and each batch is fenced on the owner under the replay's
//! row lock; a replay whose owner stops beating (crash, SIGKILL, frozen
//! process) is taken over after [`STALE_SECS`] and resumes from its last
//! checkpoint (`herald_db::replays`). Batches are paced to the replay's
//! deliveries per second; after each commit the replayed deliveries' jobs
//! are pushed to Redis (if that fails, the sweeper pushes them: they are
//! owed a job).

use std::time::{Duration, Instant};

use herald_config::Settings;
use herald_core::Channel;
use herald_db::replays::{AttemptBudgets, Replay, Requeued};
use herald_queue::{DeliveryJob, QueueClient, QueueName, WorkerId};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// A replay whose owner has not beaten for this long is taken over.
pub const STALE_SECS: f64 = 30.0;
/// Most deliveries per batch at full pace.
const FULL_PACE_BATCH: i64 = 1_000;
/// How often an idle runner looks for work.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// What a runner needs.
#[derive(Clone)]
pub struct Replayer {
    pub pool: PgPool,
    pub queue: QueueClient,
    pub owner: String,
    pub budgets: AttemptBudgets,
}

impl Replayer {
    #[must_use]
    pub fn new(pool: PgPool, queue: QueueClient, settings: &Settings) -> Self {
        let budget = |c: Channel| i32::try_from(settings.retry_for(c).max_attempts).unwrap_or(i32::MAX);
        Self {
            pool,
            queue,
            owner: WorkerId::generate("replayer").to_string(),
            budgets: AttemptBudgets {
                email: budget(Channel::Email),
                push: budget(Channel::Push),
                in_app: budget(Channel::InApp),
            },
        }
    }

    /// Claims one replay, if any is waiting, and runs it to its end (or
    /// until it is cancelled, taken over, or `shutdown`). Returns whether
    /// there was one.
    pub async fn run_one(&self, shutdown: &CancellationToken) -> anyhow::Result<bool> {
        let Some(replay) = herald_db::replays::claim_replay(&self.pool, &self.owner, STALE_SECS).await? else {
            return Ok(false);
        };
        tracing::info!(replay_id = %replay.id, matched = replay.matched, replayed = replay.replayed,
            owner = %self.owner, "running replay");
        if let Err(e) = self.run_replay(&replay, shutdown).await {
            match e.downcast_ref::<herald_db::DbError>() {
                // Postgres is away: the replay stays running under us and
                // is resumed (by us or, after STALE_SECS, by another).
                Some(db) if db.is_unavailable() => return Err(e),
                _ => {
                    tracing::error!(replay_id = %replay.id, error = %format!("{e:#}"), "replay failed");
                    herald_db::replays::fail_replay(&self.pool, &replay.id, &self.owner, &format!("{e:#}")).await?;
                }
            }
        }
        Ok(true)
    }

    async fn run_replay(&self, replay: &Replay, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let (batch, period) = match replay.pace {
            // Small batches keep a slow pace smooth: about four per second.
            Some(pace) => {
                let batch = (i64::from(pace) + 3) / 4;
                let batch = batch.clamp(1, FULL_PACE_BATCH);
                (batch, Duration::from_secs_f64(batch as f64 / f64::from(pace)))
            }
            None => (FULL_PACE_BATCH, Duration::ZERO),
        };
        loop {
            let started = Instant::now();
            let outcome =
                herald_db::replays::replay_batch(&self.pool, &replay.id, &self.owner, batch, self.budgets).await?;
            if let Some(status) = outcome.stopped {
                tracing::info!(replay_id = %replay.id, %status, "replay stopped");
                return Ok(());
            }
            self.enqueue(&outcome.requeued).await;
            if outcome.finished {
                tracing::info!(replay_id = %replay.id, "replay completed");
                return Ok(());
            }
            let rest = period.saturating_sub(started.elapsed());
            tokio::select! {
                () = shutdown.cancelled() => {
                    // Hand it back so another process resumes it now, not
                    // after STALE_SECS.
                    herald_db::replays::release_replay(&self.pool, &replay.id, &self.owner).await?;
                    return Ok(());
                }
                () = tokio::time::sleep(rest) => {}
            }
        }
    }

    /// Pushes the jobs of replayed deliveries and marks them enqueued. A
    /// failure is logged, not returned: the deliveries are committed as
    /// queued and the sweeper enqueues what has no job.
    async fn enqueue(&self, requeued: &[Requeued]) {
        if requeued.is_empty() {
            return;
        }
        // Committed: live clients see their deliveries queued again.
        let mut users: Vec<String> = requeued.iter().map(|r| r.user_id.clone()).collect();
        users.sort_unstable();
        users.dedup();
        if let Err(e) = self.queue.publish_user_changes(&users).await {
            tracing::debug!(error = %e, "could not publish the replay's changes");
        }
        let jobs: Vec<(QueueName, DeliveryJob)> = requeued
            .iter()
            .map(|r| {
                (
                    QueueName::new(r.channel, r.priority),
                    DeliveryJob {
                        delivery_id: r.id,
                        attempt: r.attempt,
                        request_id: r.request_id.clone(),
                    },
                )
            })
            .collect();
        if let Err(e) = self.queue.enqueue(&jobs).await {
            tracing::warn!(error = %e, deliveries = jobs.len(), "could not enqueue replayed deliveries; the sweeper will");
            return;
        }
        let ids: Vec<String> = requeued.iter().map(|r| r.id.to_string()).collect();
        let attempts: Vec<i32> = requeued.iter().map(|r| r.attempt).collect();
        if let Err(e) = herald_db::replays::mark_replayed_enqueued(&self.pool, &ids, &attempts).await {
            tracing::debug!(error = %e, "could not mark replayed deliveries enqueued; the sweeper will re-enqueue");
        }
    }
}

/// Runs replays until `shutdown` is cancelled. Errors (Postgres down) are
/// logged once and retried.
pub async fn run(replayer: Replayer, shutdown: CancellationToken) {
    let mut failing = false;
    loop {
        let found = match replayer.run_one(&shutdown).await {
            Ok(found) => {
                if failing {
                    tracing::info!("replay runner recovered");
                    failing = false;
                }
                found
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %format!("{e:#}"), "replay runner failed; retrying");
                    failing = true;
                }
                false
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
        if !found {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }
}
