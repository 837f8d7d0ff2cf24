//! `herald-api`: the HTTP API, on its own (deploy N replicas).

use anyhow::Context;
use herald_config::Settings;

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid configuration")?;
    herald_telemetry::init(settings.log_format);
    herald_telemetry::runtime(settings.runtime_threads)
        .context("starting the async runtime (HERALD_RUNTIME_THREADS)")?
        .block_on(run(settings))
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let bind = settings.bind;
    let state = herald_api::AppState::new(settings)?;
    herald_db::migrate_with_retry(&state.pool, std::time::Duration::from_secs(30))
        .await
        .context("applying migrations (is DATABASE_URL reachable?)")?;
    herald_api::warn_about_redis(&state.queue).await;
    let listener = herald_api::bind(bind).with_context(|| format!("binding HERALD_BIND={bind}"))?;
    herald_api::serve(state, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
