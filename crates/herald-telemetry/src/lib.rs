//! Process set-up shared by every Herald binary: tracing (human-readable
//! in development, JSON lines in production; `RUST_LOG` overrides the
//! filter) and the async runtime.

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

/// The process's async runtime with `threads` (`HERALD_RUNTIME_THREADS`,
/// or the binary's own default): `None` for one thread per CPU available
/// to the process (tokio's default, which follows a container's CPU
/// quota), `Some(1)` for a single-threaded runtime that runs every task on
/// the main thread, `Some(n)` for `n` threads. Blocking work still goes to
/// tokio's separate blocking pool either way.
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::runtime;

    #[test]
    fn one_thread_runs_every_task_on_the_calling_thread_and_more_use_workers() {
        let main = std::thread::current().id();
        let on = |threads| {
            let rt = runtime(threads).unwrap();
            rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await.unwrap() })
        };
        assert_eq!(on(Some(1)), main);
        assert_ne!(on(Some(2)), main);
        assert_ne!(on(None), main);
        let rt = runtime(Some(3)).unwrap();
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
