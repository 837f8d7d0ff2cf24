//! Herald's workers. Each channel has its own binary (`herald-email-worker`,
//! `herald-push-worker`, `herald-inapp-worker`), deployed and scaled on its
//! own; all share this library. A worker consumes its channel's three
//! priority queues through Herald's apalis backend, and every worker process
//! also runs the sweeper (one acts at a time, by advisory lock) and the
//! replay runner (one owner per replay).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::*;
use herald_channels::email::EmailSender;
use herald_channels::push::PushSender;
use herald_config::{PushTransport, Settings};
use herald_core::Channel;
use herald_queue::{Fetched, QueueClient, QueueConfig, QueueName, RedisBackend, WorkerId};
use tokio_util::sync::CancellationToken;

pub mod deliver;
pub mod replayer;
pub mod retry;
pub mod sweeper;

pub use deliver::{Deliverer, Sender};
pub use retry::RetryPolicy;

/// The role name used in worker ids and logs.
#[must_use]
pub fn role(channel: Channel) -> &'static str {
    match channel {
        Channel::Email => "email-worker",
        Channel::Push => "push-worker",
        Channel::InApp => "inapp-worker",
    }
}

/// Builds the provider side of a channel from settings, failing with a
/// message that names the variable to fix.
pub fn sender_for(settings: &Settings, channel: Channel) -> anyhow::Result<Sender> {
    Ok(match channel {
        Channel::Email => Sender::Email(EmailSender::from_settings(
            &settings.email_transport,
            &settings.email_from,
            settings.send_timeout,
            settings.smtp_ca_file.as_deref(),
            settings.smtp_max_connections,
        )?),
        Channel::Push => match &settings.push_transport {
            PushTransport::File { path } => Sender::Push(
                PushSender::file(path.clone()).with_context(|| format!("HERALD_PUSH_FILE {}", path.display()))?,
            ),
            PushTransport::Http(_) => Sender::Push(PushSender::from_settings(
                &settings.push_transport,
                settings.send_timeout,
            )?),
        },
        Channel::InApp => Sender::InApp,
    })
}

async fn handle(task: Fetched, deliverer: Data<Arc<Deliverer>>) -> Result<(), BoxDynError> {
    deliverer.deliver(&task.job).await.map_err(Into::into)
}

/// Runs one channel's worker until `shutdown` is cancelled, then finishes
/// the deliveries in flight and hands back the jobs it had not started.
pub async fn run_worker(
    settings: &Settings,
    pool: sqlx::PgPool,
    channel: Channel,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let worker_id = WorkerId::generate(role(channel));
    let queue_cfg = QueueConfig::from_settings(settings);
    let retry = settings.retry_for(channel);
    // Two connections that plan once: a claim and a result statement (or
    // an in-app one) run at a time (`deliver::MAX_IN_FLIGHT` of each).
    let planned_once =
        herald_db::connect_lazy_planned_once(settings.database_url.expose(), 2).context("DATABASE_URL")?;
    let deliverer = Arc::new(Deliverer::new(
        deliver::Pools {
            per_call: pool,
            planned_once,
        },
        QueueClient::new(queue_cfg.clone()).context("REDIS_URL")?,
        worker_id.clone(),
        sender_for(settings, channel)?,
        RetryPolicy::new(retry.min, retry.max),
        settings.lease,
        settings.send_timeout,
    ));
    let backend = RedisBackend::new(queue_cfg, QueueName::for_channel(channel).to_vec(), worker_id.clone())
        .context("REDIS_URL")?;
    let concurrency = settings.worker_concurrency;
    tracing::info!(%worker_id, channel = %channel, concurrency, "worker started");
    WorkerBuilder::new(worker_id.to_string())
        .backend(backend)
        // Panics are caught by the queue backend's own layer, which hands
        // the job back (apalis's catch_panic layer is not Send-general
        // enough to run inside a spawned task).
        .concurrency(concurrency)
        // A hung job (a stuck query) must not hold its lease forever: the
        // queue's heartbeat extends leases while the process lives.
        .timeout(settings.send_timeout + settings.lease)
        .data(deliverer)
        .build(handle)
        .run_until(herald_queue::stop_on(shutdown))
        .await
        .with_context(|| format!("worker {worker_id}"))?;
    tracing::info!(%worker_id, "worker stopped");
    Ok(())
}

/// Connects, migrates, and runs the given channels' workers plus the
/// sweeper and the replay runner in this process until `shutdown` is cancelled.
pub async fn run(settings: Settings, channels: &[Channel], shutdown: CancellationToken) -> anyhow::Result<()> {
    let pool = herald_db::connect_lazy_planned_per_call(settings.database_url.expose(), settings.db_max_connections)
        .context("DATABASE_URL")?;
    herald_db::migrate_with_retry(&pool, Duration::from_secs(30))
        .await
        .context("applying migrations (is DATABASE_URL reachable?)")?;
    let sweeper_queue = QueueClient::new(QueueConfig::from_settings(&settings)).context("REDIS_URL")?;
    match sweeper_queue.durability_warnings().await {
        Ok(warnings) => warnings.iter().for_each(|w| tracing::warn!("{w}")),
        Err(e) => tracing::warn!(error = %e, "Redis unreachable at start-up; workers will wait for it"),
    }
    // Its own two connections: a busy worker's pool must not starve an
    // operator's replay, nor a replay slow the deliveries.
    let replay_pool =
        herald_db::connect_lazy_planned_per_call(settings.database_url.expose(), 2).context("DATABASE_URL")?;
    let replays = tokio::spawn(replayer::run(
        replayer::Replayer::new(replay_pool, sweeper_queue.clone(), &settings),
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn(sweeper::run(
        pool.clone(),
        sweeper_queue,
        settings.sweep_interval,
        shutdown.clone(),
    ));
    let mut workers = tokio::task::JoinSet::new();
    for &channel in channels {
        let (settings, pool, shutdown) = (settings.clone(), pool.clone(), shutdown.clone());
        workers.spawn(async move { run_worker(&settings, pool, channel, shutdown).await });
    }
    let mut result = Ok(());
    while let Some(done) = workers.join_next().await {
        let outcome = done.context("worker task panicked").and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %format!("{e:#}"), "worker ended with an error");
            shutdown.cancel();
            result = Err(e);
        }
    }
    shutdown.cancel();
    let _ = sweeper.await;
    let _ = replays.await;
    result
}

/// A token cancelled on SIGTERM or Ctrl-C, for the binaries.
#[must_use]
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested: finishing deliveries in flight");
        t.cancel();
    });
    token
}

/// Runtime threads of a worker process unless `HERALD_RUNTIME_THREADS`
/// says otherwise. A worker's own work per delivery is small (encoding
/// statements and requests, parsing answers) and runs between waits, so a
/// second thread mostly adds wake-ups and work-stealing between threads,
/// costing CPU per delivery and draining no faster (docs/performance.md).
/// A worker that needs more
/// than a core is scaled by running more of them, as they are deployed.
pub const DEFAULT_RUNTIME_THREADS: usize = 1;

/// The `main` of each worker binary: settings first, since they say how
/// the runtime is built.
pub fn main_for(channel: Channel) -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid configuration")?;
    herald_telemetry::init(settings.log_format);
    herald_telemetry::runtime(Some(settings.runtime_threads.unwrap_or(DEFAULT_RUNTIME_THREADS)))
        .context("starting the async runtime (HERALD_RUNTIME_THREADS)")?
        .block_on(async move {
            let shutdown = shutdown_on_signal();
            run(settings, &[channel], shutdown).await
        })
}
