//! Typed settings, read from the environment once at start-up.
//!
//! Every variable Herald reads is listed in [`VARIABLES`] with its default,
//! so the README, the deploy files and the tests can be checked against one
//! list. A bad value stops start-up with a message naming the variable.
//! Secrets are wrapped in [`Secret`], whose `Debug` prints `***`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// One environment variable Herald reads.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

macro_rules! variables {
    ($($name:literal = $default:expr, $help:literal;)+) => {
        /// Every variable Herald reads, with its default and meaning.
        pub const VARIABLES: &[Variable] = &[$(Variable { name: $name, default: $default, help: $help }),+];
    };
}

variables! {
    "HERALD_ENV" = Some("development"), "`development` or `production`; production refuses the file transports and the development API key.";
    "DATABASE_URL" = Some("postgres://postgres@127.0.0.1:5432/herald"), "Postgres connection URL (the database is created if missing when HERALD_ENV=development).";
    "HERALD_DB_MAX_CONNECTIONS" = Some("16"), "Postgres pool size per process.";
    "REDIS_URL" = Some("redis://127.0.0.1:6379"), "Redis connection URL (queues and pub/sub).";
    "HERALD_QUEUE_PREFIX" = Some("herald"), "Prefix of every Redis key Herald writes.";
    "HERALD_BIND" = Some("127.0.0.1:8080"), "Address the API listens on.";
    "HERALD_MAX_BODY_BYTES" = Some("262144"), "Largest request body the API accepts, in bytes.";
    "HERALD_LOG_FORMAT" = Some("pretty"), "`pretty` or `json` (production defaults to json).";
    "HERALD_WORKER_CONCURRENCY" = Some("64"), "Deliveries one worker process handles at once.";
    "HERALD_LEASE_SECS" = Some("30"), "How long a claimed delivery or fetched job is held before another worker may take it.";
    "HERALD_FETCH_BATCH" = Some("64"), "Jobs a worker fetches from Redis per round trip.";
    "HERALD_MAX_ATTEMPTS" = Some("8"), "Attempts per delivery before it is dead-lettered.";
    "HERALD_SEND_TIMEOUT_SECS" = Some("30"), "Upper bound on one provider call.";
    "HERALD_SWEEP_INTERVAL_SECS" = Some("5"), "How often the sweeper looks for deliveries that lost their job.";
    "HERALD_RETRY_MIN_MS" = Some("5000"), "Delay before the first retry; later ones grow about threefold, with jitter.";
    "HERALD_RETRY_MAX_SECS" = Some("21600"), "Longest delay between two attempts.";
    "HERALD_EMAIL_TRANSPORT" = Some("file"), "`file` (writes .eml files; development only) or `smtp`.";
    "HERALD_EMAIL_DIR" = Some("var/mail"), "Where the file transport writes .eml files.";
    "HERALD_EMAIL_FROM" = Some("Herald <herald@localhost.localdomain>"), "From address of every email.";
    "HERALD_SMTP_URL" = None, "SMTP server, e.g. smtp://mail.internal:25 or smtps://user:pass@smtp.example.com (required when the transport is smtp).";
    "HERALD_PUSH_TRANSPORT" = Some("file"), "`file` (JSON lines; development only). The providers' HTTP APIs come with the real-channels work.";
    "HERALD_PUSH_FILE" = Some("var/push.jsonl"), "Where the file push transport appends one JSON line per device.";
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub message: String,
}

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmailTransport {
    /// One `.eml` file per delivery (development).
    File { dir: PathBuf },
    /// A real SMTP server.
    Smtp { url: Secret },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushTransport {
    /// One JSON line per device in a file (development).
    File { path: PathBuf },
}

/// Everything a Herald process needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub environment: Environment,
    /// Carries credentials when the URL has them.
    pub database_url: Secret,
    pub db_max_connections: u32,
    pub redis_url: Secret,
    pub queue_prefix: String,
    pub bind: SocketAddr,
    pub max_body_bytes: usize,
    pub log_format: LogFormat,
    pub worker_concurrency: usize,
    pub lease: Duration,
    pub fetch_batch: usize,
    pub max_attempts: u32,
    pub send_timeout: Duration,
    pub sweep_interval: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub email_transport: EmailTransport,
    pub email_from: String,
    pub push_transport: PushTransport,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Reads settings from a map of variables (the environment, or a test's).
    pub fn from_map(env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let src = Source { env };
        let environment = match src.raw("HERALD_ENV").as_str() {
            "development" | "dev" => Environment::Development,
            "production" | "prod" => Environment::Production,
            other => return Err(src.invalid("HERALD_ENV", other, "`development` or `production`")),
        };
        let prod = environment == Environment::Production;
        let log_format = match src.get("HERALD_LOG_FORMAT").as_deref() {
            None if prod => LogFormat::Json,
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(src.invalid("HERALD_LOG_FORMAT", other, "`pretty` or `json`"));
            }
        };
        let email_transport = match src.raw("HERALD_EMAIL_TRANSPORT").as_str() {
            "file" => EmailTransport::File {
                dir: PathBuf::from(src.raw("HERALD_EMAIL_DIR")),
            },
            "smtp" => EmailTransport::Smtp {
                url: Secret::new(src.get("HERALD_SMTP_URL").ok_or_else(|| ConfigError {
                    variable: "HERALD_SMTP_URL",
                    message: "is required when HERALD_EMAIL_TRANSPORT=smtp (e.g. smtp://mail.internal:25)".into(),
                })?),
            },
            other => return Err(src.invalid("HERALD_EMAIL_TRANSPORT", other, "`file` or `smtp`")),
        };
        let push_transport = match src.raw("HERALD_PUSH_TRANSPORT").as_str() {
            "file" => PushTransport::File {
                path: PathBuf::from(src.raw("HERALD_PUSH_FILE")),
            },
            other => return Err(src.invalid("HERALD_PUSH_TRANSPORT", other, "`file`")),
        };
        if prod && matches!(email_transport, EmailTransport::File { .. }) {
            return Err(ConfigError {
                variable: "HERALD_EMAIL_TRANSPORT",
                message: "the `file` transport is for development; set HERALD_EMAIL_TRANSPORT=smtp in production"
                    .into(),
            });
        }
        if prod && matches!(push_transport, PushTransport::File { .. }) {
            return Err(ConfigError {
                variable: "HERALD_PUSH_TRANSPORT",
                message: "the `file` transport is for development, and this build has no production push transport yet"
                    .into(),
            });
        }
        let url_with_scheme = |var: &'static str, schemes: &[&str]| -> Result<Secret, ConfigError> {
            let v = src.raw(var);
            if schemes.iter().any(|s| v.starts_with(&format!("{s}://"))) {
                Ok(Secret::new(v))
            } else {
                Err(ConfigError {
                    variable: var,
                    message: format!("must be a URL starting with {}://", schemes.join(":// or ")),
                })
            }
        };
        Ok(Self {
            environment,
            database_url: url_with_scheme("DATABASE_URL", &["postgres", "postgresql"])?,
            db_max_connections: src.parse_in("HERALD_DB_MAX_CONNECTIONS", 1..=1000)?,
            redis_url: url_with_scheme("REDIS_URL", &["redis", "rediss", "unix"])?,
            queue_prefix: {
                let p = src.raw("HERALD_QUEUE_PREFIX");
                if p.is_empty() || p.len() > 64 || p.contains(['{', '}', ' ', ':']) {
                    return Err(src.invalid(
                        "HERALD_QUEUE_PREFIX",
                        &p,
                        "1 to 64 characters without braces, colons or spaces",
                    ));
                }
                p
            },
            bind: src.parse("HERALD_BIND", "an address like 127.0.0.1:8080")?,
            max_body_bytes: src.parse_in("HERALD_MAX_BODY_BYTES", 1024..=64 * 1024 * 1024)?,
            log_format,
            worker_concurrency: src.parse_in("HERALD_WORKER_CONCURRENCY", 1..=10_000)?,
            lease: Duration::from_secs(src.parse_in("HERALD_LEASE_SECS", 1..=3600)?),
            fetch_batch: src.parse_in("HERALD_FETCH_BATCH", 1..=1000)?,
            max_attempts: src.parse_in("HERALD_MAX_ATTEMPTS", 1..=100)?,
            send_timeout: Duration::from_secs(src.parse_in("HERALD_SEND_TIMEOUT_SECS", 1..=600)?),
            sweep_interval: Duration::from_secs(src.parse_in("HERALD_SWEEP_INTERVAL_SECS", 1..=3600)?),
            retry_min: Duration::from_millis(src.parse_in("HERALD_RETRY_MIN_MS", 1..=3_600_000)?),
            retry_max: Duration::from_secs(src.parse_in("HERALD_RETRY_MAX_SECS", 1..=604_800)?),
            email_transport,
            email_from: src.raw("HERALD_EMAIL_FROM"),
            push_transport,
        })
    }

    #[must_use]
    pub fn is_production(&self) -> bool {
        self.environment == Environment::Production
    }
}

struct Source<'a> {
    env: &'a HashMap<String, String>,
}

impl Source<'_> {
    fn get(&self, name: &'static str) -> Option<String> {
        self.env.get(name).filter(|v| !v.is_empty()).cloned()
    }

    /// The value, or the documented default.
    fn raw(&self, name: &'static str) -> String {
        self.get(name)
            .or_else(|| {
                VARIABLES
                    .iter()
                    .find(|v| v.name == name)
                    .and_then(|v| v.default)
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }

    fn invalid(&self, variable: &'static str, value: &str, expected: &str) -> ConfigError {
        ConfigError {
            variable,
            message: format!("`{value}` is not valid: expected {expected}"),
        }
    }

    fn parse<T: FromStr>(&self, name: &'static str, expected: &str) -> Result<T, ConfigError> {
        let v = self.raw(name);
        v.parse().map_err(|_| self.invalid(name, &v, expected))
    }

    fn parse_in<T>(&self, name: &'static str, range: std::ops::RangeInclusive<T>) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        let v = self.raw(name);
        let expected = format!("a whole number from {} to {}", range.start(), range.end());
        match v.parse::<T>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(self.invalid(name, &v, &expected)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn the_defaults_make_a_working_development_setup() {
        let s = Settings::from_map(&env(&[])).unwrap();
        assert_eq!(s.environment, Environment::Development);
        assert_eq!(s.bind.port(), 8080);
        assert!(matches!(s.email_transport, EmailTransport::File { .. }));
    }

    #[test]
    fn production_refuses_the_file_transports_naming_the_variable() {
        let err = Settings::from_map(&env(&[("HERALD_ENV", "production")])).unwrap_err();
        assert_eq!(err.variable, "HERALD_EMAIL_TRANSPORT");
        let err = Settings::from_map(&env(&[
            ("HERALD_ENV", "production"),
            ("HERALD_EMAIL_TRANSPORT", "smtp"),
            ("HERALD_SMTP_URL", "smtp://127.0.0.1:25"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "HERALD_PUSH_TRANSPORT");
    }

    #[test]
    fn a_bad_number_names_the_variable_and_the_range() {
        let err = Settings::from_map(&env(&[("HERALD_LEASE_SECS", "0")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "HERALD_LEASE_SECS: `0` is not valid: expected a whole number from 1 to 3600"
        );
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let s = Settings::from_map(&env(&[("DATABASE_URL", "postgres://u:hunter2@db/herald")])).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn a_database_url_of_the_wrong_kind_is_refused() {
        let err = Settings::from_map(&env(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert_eq!(err.variable, "DATABASE_URL");
    }
}
