//! Push: one message per active device of the user, each through the
//! provider its token belongs to.
//!
//! Two transports:
//! - **file** (development): one JSON line per device appended to a file;
//! - **http**: the providers' own APIs, each enabled by its settings —
//!   [FCM HTTP v1](fcm) (service-account OAuth2), [APNs](apns) (HTTP/2,
//!   token-based auth) and [Web Push](webpush) (VAPID, RFC 8291 payload
//!   encryption, with an [SSRF guard](ssrf) because endpoints come from
//!   browsers).
//!
//! A notification goes to every device in parallel (bounded by
//! [`PushOptions::concurrency`]); [`PushSender::send`] returns one
//! [`DeviceResult`] per device, in the order of the targets. Each failure is
//! classified (`Permanent`, `Transient`, `RateLimited` with the provider's
//! `Retry-After`, `Ambiguous` when a request may have reached the provider
//! but no answer came back), and `unregistered` says the provider declared
//! the token gone, so the worker disables the device.
//!
//! Credentials are read and keys parsed once, in
//! [`PushSender::from_settings`], whose errors name the variable to fix.
//! Tokens, JWTs and credentials never appear in logs or error messages;
//! device tokens are logged masked to their last six characters.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use herald_config::{PushHttp, PushTransport};
use herald_core::{DevicePlatform, ErrorClass, Priority, PushProvider};
use serde::Serialize;

use crate::SendError;

pub mod apns;
pub mod fcm;
mod file;
pub mod ssrf;
pub mod webpush;

/// One device to push to.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub device_id: &'a str,
    pub provider: PushProvider,
    pub platform: DevicePlatform,
    /// The provider's token: an FCM registration token, an APNs device
    /// token (hex), or for Web Push the browser's subscription as JSON
    /// (`{"endpoint": "https://…", "keys": {"p256dh": "…", "auth": "…"}}`).
    pub token: &'a str,
}

/// What every device receives.
#[derive(Debug, Clone, Serialize)]
pub struct PushMessage<'a> {
    /// Stable per delivery, so a client can drop a duplicate.
    pub delivery_id: &'a str,
    pub notification_id: &'a str,
    pub title: &'a str,
    pub body: &'a str,
    pub data: &'a serde_json::Value,
    pub priority: Priority,
}

impl PushMessage<'_> {
    fn is_high_priority(&self) -> bool {
        self.priority == Priority::High
    }
}

/// A notification's title and body, as FCM's `notification` and APNs's
/// `aps.alert` spell them.
#[derive(Serialize)]
struct Alert<'a> {
    title: &'a str,
    body: &'a str,
}

/// A payload's custom fields, written straight from the notification's
/// data (no JSON tree built, copied and dropped per device): the data's
/// fields (a value that is not an object goes in as `herald_data`), then
/// APNs's `aps` when given, then Herald's ids. A data field named `aps`
/// (for APNs) or like one of Herald's ids is left out, so Herald's wins
/// and no key appears twice.
struct Fields<'a> {
    message: &'a PushMessage<'a>,
    /// FCM wants every data value as a string: non-strings go as their
    /// compact JSON text.
    as_strings: bool,
    aps: Option<Alert<'a>>,
}

impl Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        /// A JSON value written as a string of its compact text.
        struct Text<'v>(&'v serde_json::Value);
        impl Serialize for Text<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self.0 {
                    serde_json::Value::String(text) => s.serialize_str(text),
                    other => s.collect_str(other),
                }
            }
        }
        let mut map = s.serialize_map(None)?;
        let mut field = |k: &str, v: &serde_json::Value| {
            if self.as_strings {
                map.serialize_entry(k, &Text(v))
            } else {
                map.serialize_entry(k, v)
            }
        };
        let ours =
            |k: &str| k == "herald_delivery_id" || k == "herald_notification_id" || (self.aps.is_some() && k == "aps");
        match self.message.data {
            serde_json::Value::Object(fields) => {
                for (k, v) in fields.iter().filter(|(k, _)| !ours(k)) {
                    field(k, v)?;
                }
            }
            serde_json::Value::Null => {}
            other => field("herald_data", other)?,
        }
        if let Some(alert) = &self.aps {
            #[derive(Serialize)]
            struct Aps<'r, 'a> {
                alert: &'r Alert<'a>,
            }
            map.serialize_entry("aps", &Aps { alert })?;
        }
        map.serialize_entry("herald_delivery_id", self.message.delivery_id)?;
        map.serialize_entry("herald_notification_id", self.message.notification_id)?;
        map.end()
    }
}

/// The outcome for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceResult {
    pub device_id: String,
    pub ok: bool,
    /// Why it failed; free of tokens and credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The provider said the token is gone (or it can never be valid):
    /// disable the device; `error` says why.
    pub unregistered: bool,
    /// How the failure is classified; `None` when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<ErrorClass>,
    /// The provider's HTTP status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<u16>,
    /// The provider asked us to wait this long (`Retry-After`).
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl DeviceResult {
    fn sent(device_id: &str) -> Self {
        Self {
            device_id: device_id.to_owned(),
            ok: true,
            error: None,
            unregistered: false,
            class: None,
            provider_status: None,
            retry_after: None,
        }
    }

    fn failed(device_id: &str, f: Failure) -> Self {
        Self {
            device_id: device_id.to_owned(),
            ok: false,
            error: Some(f.message),
            unregistered: f.unregistered,
            class: Some(f.class),
            provider_status: f.status,
            retry_after: f.retry_after,
        }
    }
}

/// Tuning of the HTTP transport. The defaults suit production; tests use
/// short intervals to see refreshes happen.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Devices of one notification sent at once.
    pub concurrency: usize,
    /// Age at which the APNs provider JWT is replaced (Apple rejects
    /// tokens older than an hour).
    pub apns_token_refresh: Duration,
    /// Apple answers `TooManyProviderTokenUpdates` when a token is
    /// replaced more often than every 20 minutes: a JWT younger than this
    /// is kept even after `ExpiredProviderToken`.
    pub apns_token_min_interval: Duration,
    /// An FCM access token is refreshed this long before it expires
    /// (at most half its lifetime).
    pub fcm_token_margin: Duration,
    /// `TTL` of Web Push messages: how long the push service keeps a
    /// message for an offline browser.
    pub webpush_ttl: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            concurrency: 16,
            apns_token_refresh: Duration::from_secs(50 * 60),
            apns_token_min_interval: Duration::from_secs(20 * 60),
            fcm_token_margin: Duration::from_secs(5 * 60),
            webpush_ttl: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// A push setting that cannot be used, naming the variable to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct PushSetupError {
    pub variable: &'static str,
    pub message: String,
}

impl PushSetupError {
    fn new(variable: &'static str, message: impl Into<String>) -> Self {
        Self {
            variable,
            message: message.into(),
        }
    }
}

/// Sends pushes through the configured transport. Cheap to clone: clones
/// share connections and cached provider tokens.
#[derive(Clone, Debug)]
pub struct PushSender {
    inner: Arc<Inner>,
}

#[derive(Debug)]
enum Inner {
    File(file::FileSink),
    Http(Box<Providers>),
}

#[derive(Debug)]
struct Providers {
    fcm: Option<fcm::Fcm>,
    apns: Option<apns::Apns>,
    webpush: Option<webpush::WebPush>,
    concurrency: usize,
}

impl PushSender {
    /// The development transport: one JSON line per device appended to `path`.
    pub fn file(path: PathBuf) -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner::File(file::FileSink::new(path)?)),
        })
    }

    /// Builds the transport from settings with default [`PushOptions`].
    /// Reads credential files and parses keys now, so a bad one stops
    /// start-up. `timeout` bounds every HTTP request to a provider.
    pub fn from_settings(transport: &PushTransport, timeout: Duration) -> Result<Self, PushSetupError> {
        Self::from_settings_with(transport, timeout, PushOptions::default())
    }

    /// [`PushSender::from_settings`] with explicit tuning.
    pub fn from_settings_with(
        transport: &PushTransport,
        timeout: Duration,
        options: PushOptions,
    ) -> Result<Self, PushSetupError> {
        let inner = match transport {
            PushTransport::File { path } => Inner::File(
                file::FileSink::new(path.clone())
                    .map_err(|e| PushSetupError::new("HERALD_PUSH_FILE", format!("{}: {e}", path.display())))?,
            ),
            PushTransport::Http(http) => Inner::Http(Box::new(Providers::from_settings(http, timeout, &options)?)),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Sends to every device; the per-device results (in the order of
    /// `targets`) say which failed and why. An `Err` means nothing was
    /// sent at all (only the file transport fails that way).
    pub async fn send(
        &self,
        message: &PushMessage<'_>,
        targets: &[Target<'_>],
    ) -> Result<Vec<DeviceResult>, SendError> {
        match &*self.inner {
            Inner::File(sink) => sink.send(message, targets).await,
            Inner::Http(providers) => Ok(providers.send(message, targets).await),
        }
    }
}

impl Providers {
    fn from_settings(http: &PushHttp, timeout: Duration, options: &PushOptions) -> Result<Self, PushSetupError> {
        let fcm = match &http.fcm_credentials_file {
            Some(file) => Some(fcm::Fcm::from_settings(file, &http.fcm_base_url, timeout, options)?),
            None => None,
        };
        let apns = match &http.apns {
            Some(settings) => Some(apns::Apns::from_settings(
                settings,
                &http.apns_base_url,
                timeout,
                options,
            )?),
            None => None,
        };
        let webpush = match &http.webpush {
            Some(settings) => Some(webpush::WebPush::from_settings(
                settings,
                http.webpush_allow_loopback,
                timeout,
                options,
            )?),
            None => None,
        };
        Ok(Self {
            fcm,
            apns,
            webpush,
            concurrency: options.concurrency.max(1),
        })
    }

    async fn send(&self, message: &PushMessage<'_>, targets: &[Target<'_>]) -> Vec<DeviceResult> {
        // Most users have one device: no stream to set up for it.
        if let [target] = targets {
            return vec![self.send_one(message, target).await];
        }
        // Collected first: a lazy `map` inside the stream would make the
        // future lose `Send` (a higher-ranked lifetime limitation of rustc).
        let sends: Vec<_> = targets.iter().map(|t| self.send_one(message, t)).collect();
        futures::stream::iter(sends).buffered(self.concurrency).collect().await
    }

    async fn send_one(&self, message: &PushMessage<'_>, target: &Target<'_>) -> DeviceResult {
        let outcome = match target.provider {
            PushProvider::Fcm => match &self.fcm {
                Some(fcm) => fcm.send(message, target.token).await,
                None => Err(Failure::not_configured(PushProvider::Fcm)),
            },
            PushProvider::Apns => match &self.apns {
                Some(apns) => apns.send(message, target.token).await,
                None => Err(Failure::not_configured(PushProvider::Apns)),
            },
            PushProvider::WebPush => match &self.webpush {
                Some(webpush) => webpush.send(message, target.token).await,
                None => Err(Failure::not_configured(PushProvider::WebPush)),
            },
        };
        let masked = match target.provider {
            // A Web Push token is the subscription JSON; its tail says nothing.
            PushProvider::WebPush => webpush::describe_endpoint(target.token),
            PushProvider::Fcm | PushProvider::Apns => mask_token(target.token),
        };
        match outcome {
            Ok(()) => {
                tracing::debug!(device_id = target.device_id, provider = %target.provider, token = %masked, "push accepted");
                DeviceResult::sent(target.device_id)
            }
            Err(f) => {
                tracing::info!(
                    device_id = target.device_id,
                    provider = %target.provider,
                    token = %masked,
                    class = %f.class,
                    status = f.status,
                    unregistered = f.unregistered,
                    error = %f.message,
                    "push to device failed"
                );
                DeviceResult::failed(target.device_id, f)
            }
        }
    }
}

/// Why one device's push failed, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    class: ErrorClass,
    status: Option<u16>,
    message: String,
    retry_after: Option<Duration>,
    unregistered: bool,
}

impl Failure {
    fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            status: None,
            message: message.into(),
            retry_after: None,
            unregistered: false,
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, message)
    }

    fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, message)
    }

    /// The token can never work: the device is disabled.
    fn unregistered(message: impl Into<String>) -> Self {
        Self {
            unregistered: true,
            ..Self::permanent(message)
        }
    }

    fn not_configured(provider: PushProvider) -> Self {
        Self::permanent(format!("{provider} is not configured on this Herald"))
    }

    #[must_use]
    fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    #[must_use]
    fn retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// A request that failed without an HTTP answer. A connection that was
    /// never made is transient; one that broke or timed out after the
    /// request went out may have been delivered: ambiguous.
    fn from_reqwest(provider: &str, e: reqwest::Error) -> Self {
        let detail = describe_error(&e);
        if e.is_builder() {
            Self::permanent(format!("{provider}: cannot build the request: {detail}"))
        } else if e.is_connect() {
            Self::transient(format!("{provider}: cannot connect: {detail}"))
        } else if e.is_timeout() {
            Self::new(
                ErrorClass::Ambiguous,
                format!("{provider}: no answer in time: {detail}"),
            )
        } else {
            Self::new(ErrorClass::Ambiguous, format!("{provider}: request failed: {detail}"))
        }
    }
}

/// An error and its causes on one line, without the request URL (an APNs
/// URL carries the device token; a Web Push URL is a capability).
fn describe_error(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        let kind = if e.is_timeout() { "timed out" } else { "request error" };
        parts.push(kind.to_owned());
    }
    parts.join(": ")
}

/// A device token for logs: its last six characters.
#[must_use]
pub fn mask_token(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    let tail: String = chars[chars.len().saturating_sub(6)..].iter().collect();
    format!("…{tail}")
}

/// `Retry-After` as seconds or an HTTP date; a date in the past means now.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = at.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// Text from a provider, cut to a length that fits an attempt row.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Reads a credentials file, naming the variable when it cannot.
fn read_file(variable: &'static str, path: &Path) -> Result<String, PushSetupError> {
    std::fs::read_to_string(path)
        .map_err(|e| PushSetupError::new(variable, format!("cannot read {}: {e}", path.display())))
}

/// A provider base URL without its trailing slash, checked to be http(s).
fn base_url(variable: &'static str, url: &str) -> Result<String, PushSetupError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| PushSetupError::new(variable, format!("`{url}` is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "https" | "http") || parsed.host().is_none() {
        return Err(PushSetupError::new(
            variable,
            format!("`{url}` is not valid: expected an https:// URL"),
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Whether a URL names this machine (plain http is allowed only there).
fn is_loopback_url(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// The seconds since the Unix epoch, for JWT claims.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs a P-256 private key's PKCS#8 document into a JWT key, checking
/// that signing works (the signer only parses the key when it is used).
fn es256_key(secret: &p256::SecretKey) -> Result<jsonwebtoken::EncodingKey, String> {
    use p256::pkcs8::EncodePrivateKey;
    let der = secret
        .to_pkcs8_der()
        .map_err(|e| format!("cannot encode the key: {e}"))?;
    let key = jsonwebtoken::EncodingKey::from_ec_der(der.as_bytes());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &serde_json::json!({"check": true}),
        &key,
    )
    .map_err(|e| format!("cannot sign with the key: {e}"))?;
    Ok(key)
}

/// The delivery's outcome when no device accepted the push, from the
/// per-device results (`None` when at least one device succeeded, or there
/// were none). Every device permanently failed → Permanent; all rate
/// limited → RateLimited, waiting the longest `Retry-After`; any outcome
/// unknown → Ambiguous (it may have arrived); otherwise Transient.
#[must_use]
pub fn overall_failure(results: &[DeviceResult]) -> Option<SendError> {
    if results.is_empty() || results.iter().any(|r| r.ok) {
        return None;
    }
    let classes: Vec<ErrorClass> = results
        .iter()
        .map(|r| r.class.unwrap_or(ErrorClass::Transient))
        .collect();
    let all = |c: ErrorClass| classes.iter().all(|x| *x == c);
    let class = if all(ErrorClass::Permanent) {
        ErrorClass::Permanent
    } else if all(ErrorClass::RateLimited) {
        ErrorClass::RateLimited
    } else if classes.contains(&ErrorClass::Ambiguous) {
        ErrorClass::Ambiguous
    } else {
        ErrorClass::Transient
    };
    let first = &results[0];
    let message = match results.len() {
        1 => first
            .error
            .clone()
            .unwrap_or_else(|| "the device did not accept the push".to_owned()),
        n => format!(
            "none of {n} devices accepted the push (first: {})",
            first.error.as_deref().unwrap_or("no detail")
        ),
    };
    Some(SendError {
        class,
        provider_status: first.provider_status,
        message,
        retry_after: results.iter().filter_map(|r| r.retry_after).max(),
    })
}

#[cfg(test)]
mod tests {

    fn failed(class: ErrorClass, retry_after: Option<u64>) -> DeviceResult {
        DeviceResult {
            device_id: "dev".into(),
            ok: false,
            error: Some(format!("{class}")),
            unregistered: class == ErrorClass::Permanent,
            class: Some(class),
            provider_status: Some(429),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn the_overall_failure_follows_the_devices() {
        use ErrorClass::*;
        assert!(overall_failure(&[DeviceResult::sent("a"), failed(Transient, None)]).is_none());
        let all_gone = overall_failure(&[failed(Permanent, None), failed(Permanent, None)]).unwrap();
        assert_eq!(all_gone.class, Permanent);
        let limited = overall_failure(&[failed(RateLimited, Some(5)), failed(RateLimited, Some(30))]).unwrap();
        assert_eq!(
            (limited.class, limited.retry_after),
            (RateLimited, Some(Duration::from_secs(30)))
        );
        assert_eq!(
            overall_failure(&[failed(Permanent, None), failed(Transient, None)])
                .unwrap()
                .class,
            Transient
        );
        assert_eq!(
            overall_failure(&[failed(Ambiguous, None), failed(Transient, None)])
                .unwrap()
                .class,
            Ambiguous
        );
    }

    use super::*;

    /// The worker runs sends on a multi-threaded runtime: the future must be `Send`.
    #[test]
    fn the_send_future_is_send() {
        fn is_send<T: Send>(_: T) {}
        let sender = PushSender::file(std::env::temp_dir().join("herald-send-check.jsonl")).unwrap();
        is_send(async move {
            let data = serde_json::Value::Null;
            let message = PushMessage {
                delivery_id: "dlv_1",
                notification_id: "ntf_1",
                title: "",
                body: "",
                data: &data,
                priority: Priority::Normal,
            };
            let _ = sender.send(&message, &[]).await;
        });
    }

    #[test]
    fn tokens_are_masked_to_their_last_six_characters() {
        assert_eq!(mask_token("abcdefghijkl"), "…ghijkl");
        assert_eq!(mask_token("abc"), "…abc");
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        h.insert("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
