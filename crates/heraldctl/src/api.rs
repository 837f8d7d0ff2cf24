//! The admin API client, and the failures `heraldctl` reports with their
//! exit codes.

use std::fmt;

use reqwest::Method;
use serde_json::Value;

/// Exit codes, one per kind of failure (also listed in `--help`).
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything not listed below.
    pub const OTHER: u8 = 1;
    /// Bad usage (clap uses it too).
    pub const USAGE: u8 = 2;
    /// The API refused the request (bad filter, not found, too large…).
    pub const REFUSED: u8 = 3;
    /// No key, a bad key, or a key without the `admin` scope.
    pub const AUTH: u8 = 4;
    /// The API is unreachable or failed (5xx).
    pub const UNAVAILABLE: u8 = 5;
    /// A destructive action was not confirmed (declined, or no terminal
    /// to ask on and no `--yes`).
    pub const NOT_CONFIRMED: u8 = 6;
    /// A replay ended cancelled or failed, or with deliveries it could not
    /// process.
    pub const REPLAY_INCOMPLETE: u8 = 7;
}

/// Why a command failed, and the exit code that says so.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::new(exit::OTHER, format!("{e:#}"))
    }
}

pub type Outcome<T = ()> = Result<T, Failure>;

/// Talks to `/v1/admin/…` with a key from `HERALD_API_KEY`.
pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    pub fn new(base: &str, key: Option<String>) -> Outcome<Self> {
        let key = key.filter(|k| !k.trim().is_empty()).ok_or_else(|| {
            Failure::new(
                exit::AUTH,
                "set HERALD_API_KEY to an API key with the `admin` scope \
                 (heraldctl keys create --name ops --scopes admin)",
            )
        })?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| Failure::new(exit::OTHER, format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            key: key.trim().to_owned(),
        })
    }

    pub async fn get(&self, path: &str) -> Outcome<Value> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Outcome<Value> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Outcome<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.map_err(|e| {
            Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach the Herald API at {} ({e}); check --api-url / HERALD_API_URL",
                    self.base
                ),
            )
        })?;
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        let json: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(json);
        }
        let code = json["error"]["code"].as_str().unwrap_or("http_error").to_owned();
        let message = json["error"]["message"]
            .as_str()
            .map_or_else(|| format!("HTTP {status}"), str::to_owned);
        let exit_code = match status.as_u16() {
            401 | 403 => exit::AUTH,
            400..=499 => exit::REFUSED,
            _ => exit::UNAVAILABLE,
        };
        let hint = match code.as_str() {
            "replay_too_large" => " (pass --confirm-large to go ahead)",
            _ => "",
        };
        Err(Failure::new(exit_code, format!("{message} [{code}]{hint}")))
    }
}
