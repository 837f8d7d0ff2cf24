//! Tracing set-up shared by every Herald binary: human-readable in
//! development, JSON lines in production; `RUST_LOG` overrides the filter.

use herald_config::LogFormat;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is unset: Herald at info, noisy
/// dependencies at warn.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,tower_http=info,apalis=warn,apalis_core=warn";

/// Installs the global subscriber. Safe to call more than once (tests):
/// later calls do nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
