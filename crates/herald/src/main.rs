//! `herald`: the whole system in one process, for development and the
//! quick start. Creates the database if it is missing, applies migrations,
//! makes sure the documented development API key exists, then runs the API,
//! the three channel workers and the sweeper until Ctrl-C.
//!
//! Production deploys the separate binaries instead (`herald-api`,
//! `herald-email-worker`, `herald-push-worker`, `herald-inapp-worker`);
//! this one refuses to start with `HERALD_ENV=production`.

use std::time::Duration;

use anyhow::Context;
use herald_config::Settings;
use herald_core::Channel;

/// The development key, documented in the README. Never valid in production:
/// this binary refuses to run there, and only this binary creates it.
pub const DEV_API_KEY: &str = "hk_devlocal_heraldlocaldevelopmentkey0000000";

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().context("invalid configuration")?;
    herald_telemetry::init(settings.log_format);
    herald_telemetry::runtime(settings.runtime_threads)
        .context("starting the async runtime (HERALD_RUNTIME_THREADS)")?
        .block_on(run(settings))
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        !settings.is_production(),
        "`herald` is the development all-in-one; in production run herald-api and the herald-*-worker binaries"
    );
    herald_db::create_database_if_missing(settings.database_url.expose())
        .await
        .context("creating the database named in DATABASE_URL (is Postgres running on it?)")?;
    let state = herald_api::AppState::new(settings.clone())?;
    herald_db::migrate_with_retry(&state.pool, Duration::from_secs(30))
        .await
        .context("applying migrations")?;
    let scopes: Vec<String> = herald_db::api_keys::SCOPES.iter().map(|s| (*s).to_owned()).collect();
    herald_db::api_keys::ensure_api_key(&state.pool, "development", DEV_API_KEY, &scopes)
        .await
        .context("creating the development API key")?;
    herald_api::warn_about_redis(&state.queue).await;

    let listener = herald_api::bind(settings.bind).with_context(|| format!("binding HERALD_BIND={}", settings.bind))?;
    let addr = listener.local_addr().context("listener address")?;
    let shutdown = herald_workers::shutdown_on_signal();
    let api_shutdown = shutdown.clone();
    let api = tokio::spawn(herald_api::serve(state, listener, async move {
        api_shutdown.cancelled().await
    }));
    let workers = tokio::spawn(herald_workers::run(
        settings.clone(),
        &[Channel::Email, Channel::Push, Channel::InApp],
        shutdown.clone(),
    ));
    print_banner(&addr.to_string(), &settings);

    let (api, workers) = tokio::join!(api, workers);
    shutdown.cancel();
    api.context("API task panicked")??;
    workers.context("worker task panicked")??;
    Ok(())
}

fn print_banner(addr: &str, settings: &Settings) {
    let mail = match &settings.email_transport {
        herald_config::EmailTransport::File { dir } => {
            format!("emails are written to {}/", dir.display())
        }
        herald_config::EmailTransport::Smtp { .. } => "emails go to HERALD_SMTP_URL".to_owned(),
    };
    let push = match &settings.push_transport {
        herald_config::PushTransport::File { path } => format!("pushes are appended to {}", path.display()),
        herald_config::PushTransport::Http(_) => "pushes go to the configured providers".to_owned(),
    };
    println!(
        "\nHerald is running on http://{addr}  (OpenAPI: http://{addr}/openapi.json)\n\
         API key (development): {DEV_API_KEY}\n\
         {mail}; {push}\n\n\
         Try:\n  curl -s -X POST http://{addr}/v1/notifications \\\n    \
         -H 'Authorization: Bearer {DEV_API_KEY}' -H 'Content-Type: application/json' \\\n    \
         -d '{{\"user_id\":\"u_42\",\"channels\":[\"in_app\"],\"title\":\"Hello\",\"body\":\"From Herald\"}}'\n"
    );
}
