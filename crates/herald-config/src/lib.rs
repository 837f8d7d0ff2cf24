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

use herald_core::Channel;

/// Signs user tokens when `HERALD_USER_TOKEN_SECRET` is unset in
/// development. Public by design: production refuses to start without a
/// secret of its own.
pub const DEVELOPMENT_USER_TOKEN_SECRET: &str = "herald-development-user-token-secret-not-for-production";

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
    "HERALD_DB_MAX_CONNECTIONS" = Some("16"), "Postgres pool size per process (the API holds 4 more, for its group commit).";
    "REDIS_URL" = Some("redis://127.0.0.1:6379"), "Redis connection URL (queues and pub/sub).";
    "HERALD_QUEUE_PREFIX" = Some("herald"), "Prefix of every Redis key Herald writes.";
    "HERALD_BIND" = Some("127.0.0.1:8080"), "Address the API listens on.";
    "HERALD_MAX_BODY_BYTES" = Some("262144"), "Largest request body the API accepts, in bytes.";
    "HERALD_USER_TOKEN_SECRET" = None, "Key (32+ characters) that signs user tokens for mobile and web clients; every API replica needs the same one. Required in production; development uses a fixed, public key.";
    "HERALD_USER_TOKEN_TTL_SECS" = Some("3600"), "Default lifetime of a user token (at most 86400).";
    "HERALD_API_KEY_CACHE_SECS" = Some("5"), "How long the API trusts an API key it authenticated without asking Postgres again; a revoked key keeps working for at most this long per API process. 0 turns the cache off.";
    "HERALD_SSE_HEARTBEAT_SECS" = Some("15"), "How often the live stream (GET /v1/me/stream) sends a heartbeat comment while idle, so proxies keep the connection open (1 to 300).";
    "HERALD_LOG_FORMAT" = Some("pretty"), "`pretty` or `json` (production defaults to json).";
    "HERALD_RUNTIME_THREADS" = None, "Threads of a process's async runtime (1 to 1024). Default: 1 in a worker process (each uses one core: run more workers for more), one per CPU available to the process in the API and `herald`.";
    "HERALD_WORKER_CONCURRENCY" = Some("256"), "Deliveries one worker process handles at once; its claims and results share bigger batches with more (email sends beyond HERALD_SMTP_MAX_CONNECTIONS wait for a free connection).";
    "HERALD_LEASE_SECS" = Some("30"), "How long a claimed delivery or fetched job is held before another worker may take it.";
    "HERALD_FETCH_BATCH" = Some("64"), "Jobs a worker fetches from Redis per round trip.";
    "HERALD_MAX_ATTEMPTS" = Some("8"), "Attempts per delivery before it is dead-lettered.";
    "HERALD_SEND_TIMEOUT_SECS" = Some("30"), "Upper bound on one provider call.";
    "HERALD_SWEEP_INTERVAL_SECS" = Some("5"), "How often the sweeper looks for deliveries that lost their job.";
    "HERALD_RETRY_MIN_MS" = Some("5000"), "Delay before the first retry; later ones grow about threefold, with jitter.";
    "HERALD_RETRY_MAX_SECS" = Some("21600"), "Longest delay between two attempts.";
    "HERALD_EMAIL_MAX_ATTEMPTS" = None, "Attempts for email deliveries (default: HERALD_MAX_ATTEMPTS).";
    "HERALD_EMAIL_RETRY_MIN_MS" = None, "First retry delay for email (default: HERALD_RETRY_MIN_MS).";
    "HERALD_PUSH_MAX_ATTEMPTS" = None, "Attempts for push deliveries (default: HERALD_MAX_ATTEMPTS).";
    "HERALD_PUSH_RETRY_MIN_MS" = None, "First retry delay for push (default: HERALD_RETRY_MIN_MS).";
    "HERALD_INAPP_MAX_ATTEMPTS" = None, "Attempts for in-app deliveries (default: HERALD_MAX_ATTEMPTS).";
    "HERALD_INAPP_RETRY_MIN_MS" = None, "First retry delay for in-app (default: HERALD_RETRY_MIN_MS).";
    "HERALD_EMAIL_TRANSPORT" = Some("file"), "`file` (writes .eml files; development only) or `smtp`.";
    "HERALD_EMAIL_DIR" = Some("var/mail"), "Where the file transport writes .eml files.";
    "HERALD_EMAIL_FROM" = Some("Herald <herald@localhost.localdomain>"), "From address of every email.";
    "HERALD_SMTP_URL" = None, "SMTP server (required when the transport is smtp): `smtp://host:25` (plain), `smtp://user:pass@host:587?tls=required` (STARTTLS), `smtp://host?tls=opportunistic` (STARTTLS if offered; not for production), `smtps://user:pass@host:465` (implicit TLS). Percent-encode reserved characters in user and password.";
    "HERALD_SMTP_MAX_CONNECTIONS" = Some("50"), "Most SMTP connections one email worker keeps open (and sends on at once); relays cap connections per client (Postfix: 50).";
    "HERALD_SMTP_CA_FILE" = None, "PEM certificate(s) to trust for the SMTP server's TLS, besides the system roots (private CAs).";
    "HERALD_PUSH_TRANSPORT" = Some("file"), "`file` (JSON lines; development only) or `http` (FCM, APNs and Web Push, each enabled by its settings below).";
    "HERALD_FCM_CREDENTIALS_FILE" = None, "Firebase service-account JSON; enables FCM HTTP v1.";
    "HERALD_FCM_BASE_URL" = Some("https://fcm.googleapis.com"), "FCM API base URL.";
    "HERALD_APNS_KEY_FILE" = None, "APNs token-auth key (.p8, ES256); with the three below, enables APNs.";
    "HERALD_APNS_KEY_ID" = None, "APNs key id (10 characters).";
    "HERALD_APNS_TEAM_ID" = None, "Apple developer team id.";
    "HERALD_APNS_TOPIC" = None, "The app's bundle id (apns-topic).";
    "HERALD_APNS_BASE_URL" = Some("https://api.push.apple.com"), "APNs base URL (sandbox: https://api.sandbox.push.apple.com).";
    "HERALD_VAPID_PRIVATE_KEY_FILE" = None, "VAPID private key (PEM, P-256); with HERALD_VAPID_SUBJECT, enables Web Push.";
    "HERALD_VAPID_SUBJECT" = None, "VAPID contact, `mailto:` or `https:` URL.";
    "HERALD_WEBPUSH_ALLOW_LOOPBACK" = Some("false"), "Tests only: allow http:// and loopback Web Push endpoints. Refused in production.";
    "HERALD_PUSH_FILE" = Some("var/push.jsonl"), "Where the file push transport appends one JSON line per device.";
    "HERALD_REPLAY_MAX" = Some("100000"), "Most deliveries one filtered replay may match without `confirm_large: true`.";
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
    /// The providers' HTTP APIs.
    Http(PushHttp),
}

/// Which push providers are enabled, and with what. Files are read and
/// keys parsed by `herald-channels` at start-up, with errors naming these
/// variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushHttp {
    pub fcm_credentials_file: Option<PathBuf>,
    pub fcm_base_url: String,
    pub apns: Option<Apns>,
    pub apns_base_url: String,
    pub webpush: Option<WebPush>,
    /// Tests only: lets Web Push reach http:// and loopback endpoints.
    pub webpush_allow_loopback: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Apns {
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebPush {
    pub vapid_private_key_file: PathBuf,
    pub vapid_subject: String,
}

/// A channel's retry budget and schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub max_attempts: u32,
    pub min: Duration,
    pub max: Duration,
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
    /// Signs user tokens (HS256).
    pub user_token_secret: Secret,
    pub user_token_ttl: Duration,
    pub api_key_cache: Duration,
    /// Idle heartbeat of the clients' live stream.
    pub sse_heartbeat: Duration,
    pub log_format: LogFormat,
    /// Threads of the process's async runtime (`HERALD_RUNTIME_THREADS`);
    /// `None` when unset, for the binary's own default
    /// (`herald_telemetry::runtime`).
    pub runtime_threads: Option<usize>,
    /// Deliveries a worker process handles at once
    /// (`HERALD_WORKER_CONCURRENCY`). A worker's claims and results are
    /// batched, and more deliveries in flight make bigger batches, so less
    /// Postgres work per delivery: 256 for every channel. Email too: its
    /// SMTP connections have their own bound (`smtp_max_connections`), so
    /// its deliveries in flight need not be one per connection
    /// (docs/performance.md).
    pub worker_concurrency: usize,
    /// Most SMTP connections an email worker opens
    /// (`HERALD_SMTP_MAX_CONNECTIONS`): relays cap connections per client
    /// (Postfix's `smtpd_client_connection_count_limit` is 50).
    pub smtp_max_connections: usize,
    pub lease: Duration,
    pub fetch_batch: usize,
    pub max_attempts: u32,
    pub send_timeout: Duration,
    pub sweep_interval: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub retry_email: Retry,
    pub retry_push: Retry,
    pub retry_in_app: Retry,
    pub email_transport: EmailTransport,
    pub smtp_ca_file: Option<PathBuf>,
    pub email_from: String,
    pub push_transport: PushTransport,
    /// A filtered replay matching more deliveries than this needs an
    /// explicit `confirm_large`.
    pub replay_max: u64,
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
            "http" => PushTransport::Http(push_http(&src, prod)?),
            other => return Err(src.invalid("HERALD_PUSH_TRANSPORT", other, "`file` or `http`")),
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
                message: "the `file` transport is for development; set HERALD_PUSH_TRANSPORT=http in production".into(),
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
            user_token_secret: match src.get("HERALD_USER_TOKEN_SECRET") {
                Some(s) if s.len() >= 32 => Secret::new(s),
                Some(_) => {
                    return Err(ConfigError {
                        variable: "HERALD_USER_TOKEN_SECRET",
                        message: "must be at least 32 characters (e.g. `openssl rand -hex 32`)".into(),
                    });
                }
                None if prod => {
                    return Err(ConfigError {
                        variable: "HERALD_USER_TOKEN_SECRET",
                        message: "is required in production (32+ random characters, the same on every API replica)"
                            .into(),
                    });
                }
                None => Secret::new(DEVELOPMENT_USER_TOKEN_SECRET),
            },
            user_token_ttl: Duration::from_secs(src.parse_in("HERALD_USER_TOKEN_TTL_SECS", 60..=86_400)?),
            api_key_cache: Duration::from_secs(src.parse_in("HERALD_API_KEY_CACHE_SECS", 0..=3600)?),
            sse_heartbeat: Duration::from_secs(src.parse_in("HERALD_SSE_HEARTBEAT_SECS", 1..=300)?),
            log_format,
            runtime_threads: match src.get("HERALD_RUNTIME_THREADS") {
                Some(_) => Some(src.parse_in("HERALD_RUNTIME_THREADS", 1..=1024)?),
                None => None,
            },
            worker_concurrency: src.parse_in("HERALD_WORKER_CONCURRENCY", 1..=10_000)?,
            smtp_max_connections: src.parse_in("HERALD_SMTP_MAX_CONNECTIONS", 1..=1_000)?,
            lease: Duration::from_secs(src.parse_in("HERALD_LEASE_SECS", 1..=3600)?),
            fetch_batch: src.parse_in("HERALD_FETCH_BATCH", 1..=1000)?,
            max_attempts: src.parse_in("HERALD_MAX_ATTEMPTS", 1..=100)?,
            send_timeout: Duration::from_secs(src.parse_in("HERALD_SEND_TIMEOUT_SECS", 1..=600)?),
            sweep_interval: Duration::from_secs(src.parse_in("HERALD_SWEEP_INTERVAL_SECS", 1..=3600)?),
            retry_min: Duration::from_millis(src.parse_in("HERALD_RETRY_MIN_MS", 1..=3_600_000)?),
            retry_max: Duration::from_secs(src.parse_in("HERALD_RETRY_MAX_SECS", 1..=604_800)?),
            retry_email: src.retry("HERALD_EMAIL_MAX_ATTEMPTS", "HERALD_EMAIL_RETRY_MIN_MS")?,
            retry_push: src.retry("HERALD_PUSH_MAX_ATTEMPTS", "HERALD_PUSH_RETRY_MIN_MS")?,
            retry_in_app: src.retry("HERALD_INAPP_MAX_ATTEMPTS", "HERALD_INAPP_RETRY_MIN_MS")?,
            smtp_ca_file: src.get("HERALD_SMTP_CA_FILE").map(PathBuf::from),
            email_transport,
            email_from: src.raw("HERALD_EMAIL_FROM"),
            push_transport,
            replay_max: src.parse_in("HERALD_REPLAY_MAX", 1..=100_000_000)?,
        })
    }

    /// The retry settings of a channel.
    #[must_use]
    pub fn retry_for(&self, channel: Channel) -> Retry {
        match channel {
            Channel::Email => self.retry_email,
            Channel::Push => self.retry_push,
            Channel::InApp => self.retry_in_app,
        }
    }

    #[must_use]
    pub fn is_production(&self) -> bool {
        self.environment == Environment::Production
    }
}

fn push_http(src: &Source<'_>, prod: bool) -> Result<PushHttp, ConfigError> {
    let apns_vars = [
        "HERALD_APNS_KEY_FILE",
        "HERALD_APNS_KEY_ID",
        "HERALD_APNS_TEAM_ID",
        "HERALD_APNS_TOPIC",
    ];
    let apns_values: Vec<Option<String>> = apns_vars.iter().map(|v| src.get(v)).collect();
    let apns = if apns_values.iter().all(Option::is_none) {
        None
    } else if let Some(i) = apns_values.iter().position(Option::is_none) {
        return Err(ConfigError {
            variable: apns_vars[i],
            message: format!("is required to enable APNs ({} are all needed)", apns_vars.join(", ")),
        });
    } else {
        let v: Vec<String> = apns_values.into_iter().flatten().collect();
        Some(Apns {
            key_file: PathBuf::from(&v[0]),
            key_id: v[1].clone(),
            team_id: v[2].clone(),
            topic: v[3].clone(),
        })
    };
    let webpush = match (
        src.get("HERALD_VAPID_PRIVATE_KEY_FILE"),
        src.get("HERALD_VAPID_SUBJECT"),
    ) {
        (None, None) => None,
        (Some(file), Some(subject)) => {
            if !(subject.starts_with("mailto:") || subject.starts_with("https://")) {
                return Err(src.invalid("HERALD_VAPID_SUBJECT", &subject, "a `mailto:` or `https://` contact"));
            }
            Some(WebPush {
                vapid_private_key_file: PathBuf::from(file),
                vapid_subject: subject,
            })
        }
        (Some(_), None) => {
            return Err(ConfigError {
                variable: "HERALD_VAPID_SUBJECT",
                message: "is required with HERALD_VAPID_PRIVATE_KEY_FILE (e.g. mailto:ops@example.com)".into(),
            });
        }
        (None, Some(_)) => {
            return Err(ConfigError {
                variable: "HERALD_VAPID_PRIVATE_KEY_FILE",
                message: "is required with HERALD_VAPID_SUBJECT".into(),
            });
        }
    };
    let allow_loopback = match src.raw("HERALD_WEBPUSH_ALLOW_LOOPBACK").as_str() {
        "true" | "1" => true,
        "false" | "0" => false,
        other => return Err(src.invalid("HERALD_WEBPUSH_ALLOW_LOOPBACK", other, "`true` or `false`")),
    };
    if allow_loopback && prod {
        return Err(ConfigError {
            variable: "HERALD_WEBPUSH_ALLOW_LOOPBACK",
            message: "is for tests and is refused in production (it would weaken the SSRF guard)".into(),
        });
    }
    let http = PushHttp {
        fcm_credentials_file: src.get("HERALD_FCM_CREDENTIALS_FILE").map(PathBuf::from),
        fcm_base_url: src.raw("HERALD_FCM_BASE_URL"),
        apns,
        apns_base_url: src.raw("HERALD_APNS_BASE_URL"),
        webpush,
        webpush_allow_loopback: allow_loopback,
    };
    if http.fcm_credentials_file.is_none() && http.apns.is_none() && http.webpush.is_none() {
        return Err(ConfigError {
            variable: "HERALD_PUSH_TRANSPORT",
            message: "`http` needs at least one provider: set HERALD_FCM_CREDENTIALS_FILE, the HERALD_APNS_* \
                      variables or the HERALD_VAPID_* variables"
                .into(),
        });
    }
    Ok(http)
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

    /// A channel's retry settings: its own variables, else the global ones.
    fn retry(&self, attempts_var: &'static str, min_var: &'static str) -> Result<Retry, ConfigError> {
        let max_attempts = match self.get(attempts_var) {
            Some(_) => self.parse_in(attempts_var, 1..=100)?,
            None => self.parse_in("HERALD_MAX_ATTEMPTS", 1..=100)?,
        };
        let min_ms: u64 = match self.get(min_var) {
            Some(_) => self.parse_in(min_var, 1..=3_600_000)?,
            None => self.parse_in("HERALD_RETRY_MIN_MS", 1..=3_600_000)?,
        };
        Ok(Retry {
            max_attempts,
            min: Duration::from_millis(min_ms),
            max: Duration::from_secs(self.parse_in("HERALD_RETRY_MAX_SECS", 1..=604_800)?),
        })
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
    fn a_channel_may_override_the_retry_budget() {
        let s = Settings::from_map(&env(&[("HERALD_MAX_ATTEMPTS", "5"), ("HERALD_PUSH_MAX_ATTEMPTS", "3")])).unwrap();
        assert_eq!(s.retry_for(Channel::Push).max_attempts, 3);
        assert_eq!(s.retry_for(Channel::Email).max_attempts, 5);
    }

    #[test]
    fn http_push_needs_a_provider_and_complete_apns_settings() {
        let err = Settings::from_map(&env(&[("HERALD_PUSH_TRANSPORT", "http")])).unwrap_err();
        assert_eq!(err.variable, "HERALD_PUSH_TRANSPORT");
        let err = Settings::from_map(&env(&[
            ("HERALD_PUSH_TRANSPORT", "http"),
            ("HERALD_APNS_KEY_FILE", "k.p8"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "HERALD_APNS_KEY_ID");
        let err = Settings::from_map(&env(&[
            ("HERALD_ENV", "production"),
            ("HERALD_EMAIL_TRANSPORT", "smtp"),
            ("HERALD_SMTP_URL", "smtp://127.0.0.1:25"),
            ("HERALD_PUSH_TRANSPORT", "http"),
            ("HERALD_FCM_CREDENTIALS_FILE", "sa.json"),
            ("HERALD_WEBPUSH_ALLOW_LOOPBACK", "true"),
            ("HERALD_USER_TOKEN_SECRET", "0123456789abcdef0123456789abcdef"),
        ]))
        .unwrap_err();
        assert_eq!(err.variable, "HERALD_WEBPUSH_ALLOW_LOOPBACK");
    }

    #[test]
    fn production_needs_its_own_user_token_secret() {
        let prod = [
            ("HERALD_ENV", "production"),
            ("HERALD_EMAIL_TRANSPORT", "smtp"),
            ("HERALD_SMTP_URL", "smtp://127.0.0.1:25"),
            ("HERALD_PUSH_TRANSPORT", "http"),
            ("HERALD_FCM_CREDENTIALS_FILE", "sa.json"),
        ];
        let err = Settings::from_map(&env(&prod)).unwrap_err();
        assert_eq!(err.variable, "HERALD_USER_TOKEN_SECRET");
        let err = Settings::from_map(&env(&[("HERALD_USER_TOKEN_SECRET", "short")])).unwrap_err();
        assert_eq!(err.variable, "HERALD_USER_TOKEN_SECRET");
    }

    #[test]
    fn runtime_threads_are_left_to_the_binary_unless_set_and_in_range() {
        assert_eq!(Settings::from_map(&env(&[])).unwrap().runtime_threads, None);
        let s = Settings::from_map(&env(&[("HERALD_RUNTIME_THREADS", "4")])).unwrap();
        assert_eq!(s.runtime_threads, Some(4));
        let err = Settings::from_map(&env(&[("HERALD_RUNTIME_THREADS", "0")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "HERALD_RUNTIME_THREADS: `0` is not valid: expected a whole number from 1 to 1024"
        );
    }

    #[test]
    fn a_database_url_of_the_wrong_kind_is_refused() {
        let err = Settings::from_map(&env(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert_eq!(err.variable, "DATABASE_URL");
    }
}
