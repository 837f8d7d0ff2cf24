//! Apple Push Notification service, HTTP/2 with token-based auth.
//!
//! Auth: a provider JWT (ES256, header `kid` = key id, claims `iss` = team
//! id and `iat`) signed with the `.p8` key, cached and replaced after
//! [`PushOptions::apns_token_refresh`] (~50 min; Apple refuses tokens older
//! than an hour), never more often than
//! [`PushOptions::apns_token_min_interval`] (20 min; Apple answers
//! `TooManyProviderTokenUpdates` otherwise). An `ExpiredProviderToken`
//! marks the JWT stale, so the next send signs a new one (once it is
//! allowed to).
//!
//! Send: `POST {base}/3/device/{token}` over HTTP/2 (ALPN `h2` for https;
//! prior knowledge for a cleartext `http://` stand-in) with `apns-topic`,
//! `apns-push-type: alert`, `apns-priority` (10 for high, 5 otherwise),
//! `apns-collapse-id` = the delivery id (stable, so a retried push replaces
//! rather than duplicates) and a fresh `apns-id`. The payload is
//! `{"aps": {"alert": {"title", "body"}}, "herald_delivery_id": …}` plus the
//! notification's data fields.
//!
//! Errors, after Apple's documentation: 410 `Unregistered` and 400
//! `BadDeviceToken`/`DeviceTokenNotForTopic` disable the device; 429
//! `TooManyRequests` is rate limited; 5xx is transient; 403
//! `ExpiredProviderToken` refreshes the JWT and is transient.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use herald_config::Apns as ApnsSettings;
use herald_core::ErrorClass;
use serde_json::{Value, json};

use super::{Alert, Failure, Fields, PushMessage, PushOptions, PushSetupError, retry_after, truncate};

/// Largest payload APNs accepts for an alert.
const MAX_PAYLOAD: usize = 4096;

pub(crate) struct Apns {
    client: reqwest::Client,
    base: String,
    topic: String,
    key_id: String,
    team_id: String,
    key: jsonwebtoken::EncodingKey,
    token: Mutex<Option<ProviderToken>>,
    refresh_after: Duration,
    min_interval: Duration,
}

impl fmt::Debug for Apns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Apns")
            .field("base", &self.base)
            .field("topic", &self.topic)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

struct ProviderToken {
    jwt: String,
    issued: Instant,
    /// APNs said it expired: replace it as soon as that is allowed.
    stale: bool,
}

impl Apns {
    pub(crate) fn from_settings(
        settings: &ApnsSettings,
        base_url: &str,
        timeout: Duration,
        options: &PushOptions,
    ) -> Result<Self, PushSetupError> {
        const VAR: &str = "HERALD_APNS_KEY_FILE";
        let pem = super::read_file(VAR, &settings.key_file)?;
        let secret = <p256::SecretKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(pem.trim()).map_err(|_| {
            PushSetupError::new(
                VAR,
                format!(
                    "{} is not an APNs auth key: expected the .p8 file (a PKCS#8 P-256 private key in PEM form)",
                    settings.key_file.display()
                ),
            )
        })?;
        let key = super::es256_key(&secret).map_err(|e| PushSetupError::new(VAR, e))?;
        for (var, value) in [
            ("HERALD_APNS_KEY_ID", &settings.key_id),
            ("HERALD_APNS_TEAM_ID", &settings.team_id),
        ] {
            if value.len() != 10 || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(PushSetupError::new(
                    var,
                    format!("`{value}` is not valid: expected the 10-character id from the Apple developer account"),
                ));
            }
        }
        if settings.topic.is_empty() || settings.topic.contains(char::is_whitespace) {
            return Err(PushSetupError::new(
                "HERALD_APNS_TOPIC",
                "expected the app's bundle id, e.g. com.example.app",
            ));
        }
        let base = super::base_url("HERALD_APNS_BASE_URL", base_url)?;
        let mut builder = reqwest::Client::builder().timeout(timeout).connect_timeout(timeout);
        if base.starts_with("http://") {
            // Cleartext has no ALPN: speak HTTP/2 from the first byte, as APNs requires.
            builder = builder.http2_prior_knowledge();
        }
        let client = builder
            .build()
            .map_err(|e| PushSetupError::new("HERALD_APNS_BASE_URL", format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            base,
            topic: settings.topic.clone(),
            key_id: settings.key_id.clone(),
            team_id: settings.team_id.clone(),
            key,
            token: Mutex::new(None),
            refresh_after: options.apns_token_refresh,
            min_interval: options.apns_token_min_interval,
        })
    }

    pub(crate) async fn send(&self, message: &PushMessage<'_>, token: &str) -> Result<(), Failure> {
        // Device tokens are hex; anything else would also change the URL path.
        if token.is_empty() || token.len() > 200 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Failure::unregistered("not an APNs device token (expected hex digits)"));
        }
        let body = apns_body(message);
        let body = serde_json::to_vec(&body).map_err(|e| Failure::permanent(format!("encoding the payload: {e}")))?;
        if body.len() > MAX_PAYLOAD {
            return Err(Failure::permanent(format!(
                "the APNs payload is {} bytes; APNs accepts at most {MAX_PAYLOAD}",
                body.len()
            )));
        }
        let jwt = self.provider_token()?;
        let response = self
            .client
            .post(format!("{}/3/device/{token}", self.base))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", if message.is_high_priority() { "10" } else { "5" })
            .header("apns-collapse-id", collapse_id(message.delivery_id))
            .header("apns-id", uuid::Uuid::new_v4().to_string())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::from_reqwest("APNs", e))?;
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        let after = retry_after(response.headers());
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let reason = body["reason"].as_str().unwrap_or("no reason given").to_owned();
        let failure = |class: ErrorClass, what: &str| {
            Failure::new(class, format!("APNs: {what} ({status} {})", truncate(&reason, 64)))
                .status(status)
                .retry_after(after)
        };
        Err(match (status, reason.as_str()) {
            (410, _) | (_, "Unregistered") => Failure {
                unregistered: true,
                ..failure(ErrorClass::Permanent, "the device token is no longer active")
            },
            (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => Failure {
                unregistered: true,
                ..failure(ErrorClass::Permanent, "the device token is not valid for this app")
            },
            (403, "ExpiredProviderToken") => {
                self.mark_stale(&jwt);
                failure(
                    ErrorClass::Transient,
                    "the provider token expired; a new one is used next",
                )
            }
            (403, _) => failure(ErrorClass::Transient, "the provider token or key was refused"),
            (429, _) => failure(ErrorClass::RateLimited, "sending too fast to this device"),
            (500..=599, _) => failure(ErrorClass::Transient, "APNs is unavailable"),
            _ => failure(ErrorClass::Permanent, "the push was rejected"),
        })
    }

    /// The cached provider JWT, replaced when it is old, or stale and old
    /// enough that Apple allows a new one.
    fn provider_token(&self) -> Result<String, Failure> {
        let mut cached = self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = cached.as_ref() {
            let age = t.issued.elapsed();
            let replace = age >= self.refresh_after || (t.stale && age >= self.min_interval);
            if !replace {
                return Ok(t.jwt.clone());
            }
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = json!({"iss": self.team_id, "iat": super::unix_now()});
        let jwt = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|_| Failure::transient("APNs: cannot sign the provider token"))?;
        *cached = Some(ProviderToken {
            jwt: jwt.clone(),
            issued: Instant::now(),
            stale: false,
        });
        Ok(jwt)
    }

    fn mark_stale(&self, jwt: &str) {
        let mut cached = self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = cached.as_mut().filter(|t| t.jwt == jwt) {
            t.stale = true;
        }
    }
}

/// The delivery id, cut to the 64 bytes APNs allows.
fn collapse_id(delivery_id: &str) -> String {
    truncate_bytes(delivery_id, 64).to_owned()
}

fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The APNs payload: the data fields, `aps`, Herald's ids (the data cannot
/// replace `aps` or Herald's ids).
fn apns_body<'a>(message: &'a PushMessage<'a>) -> Fields<'a> {
    Fields {
        message,
        as_strings: false,
        aps: Some(Alert {
            title: message.title,
            body: message.body,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::Priority;

    #[test]
    fn data_cannot_replace_aps_or_the_delivery_id() {
        let data = json!({"aps": "x", "herald_delivery_id": "forged", "order": 7});
        let message = PushMessage {
            delivery_id: "dlv_1",
            notification_id: "ntf_1",
            title: "T",
            body: "B",
            data: &data,
            priority: Priority::Normal,
        };
        let text = serde_json::to_string(&apns_body(&message)).unwrap();
        assert_eq!(text.matches("herald_delivery_id").count(), 1, "{text}");
        assert_eq!(text.matches("\"aps\"").count(), 1, "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["aps"]["alert"]["title"], "T");
        assert_eq!(body["herald_delivery_id"], "dlv_1");
        assert_eq!(body["order"], 7);
    }

    #[test]
    fn the_collapse_id_fits_in_64_bytes() {
        assert_eq!(collapse_id("dlv_01"), "dlv_01");
        assert_eq!(collapse_id(&"é".repeat(40)).len(), 64);
    }
}
