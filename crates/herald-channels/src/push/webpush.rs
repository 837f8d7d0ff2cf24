//! Web Push (RFC 8030) with VAPID (RFC 8292) and payload encryption
//! (RFC 8291, `Content-Encoding: aes128gcm`).
//!
//! A Web Push device's token is the browser's `PushSubscription` as JSON,
//! exactly what `JSON.stringify(subscription)` gives:
//! `{"endpoint": "https://…", "expirationTime": null, "keys": {"p256dh": "…", "auth": "…"}}`.
//! It is parsed strictly (unknown fields, a bad key or a bad endpoint
//! disable the device).
//!
//! Each request carries `Authorization: vapid t=<JWT>, k=<public key>`
//! (ES256; `aud` = the endpoint's origin, `exp` 12 hours ahead, `sub` =
//! `HERALD_VAPID_SUBJECT`), `TTL`, `Urgency` (from the priority) and
//! `Topic` (the delivery id, so a push service holding an undelivered copy
//! replaces it). The body is the JSON message encrypted to the
//! subscription's `p256dh` key and `auth` secret (the `web-push-native`
//! crate's RFC 8291 implementation).
//!
//! Answers: 2xx sent; 404/410 the subscription is gone (device disabled);
//! 429 rate limited with `Retry-After`; 5xx transient.
//!
//! Endpoints come from browsers, so every request passes the
//! [SSRF guard](super::ssrf): https only, public addresses only (checked on
//! the resolved addresses the client then connects to), no redirects.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_config::WebPush as WebPushSettings;
use herald_core::ErrorClass;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde::Deserialize;
use serde_json::json;

use super::ssrf::{self, GuardedResolver};
use super::{Failure, PushMessage, PushOptions, PushSetupError, retry_after};

/// Largest encrypted body every push service must accept (RFC 8030 §7.2).
const MAX_BODY: usize = 4096;
/// How long a VAPID JWT is valid (RFC 8292 allows at most 24 hours).
const VAPID_VALIDITY_SECS: u64 = 12 * 60 * 60;

pub(crate) struct WebPush {
    client: reqwest::Client,
    vapid_key: jsonwebtoken::EncodingKey,
    vapid_public: String,
    subject: String,
    allow_loopback: bool,
    ttl: Duration,
}

impl fmt::Debug for WebPush {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebPush")
            .field("vapid_public", &self.vapid_public)
            .field("subject", &self.subject)
            .field("allow_loopback", &self.allow_loopback)
            .finish_non_exhaustive()
    }
}

/// A browser's push subscription, as the browser serialises it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionJson {
    endpoint: String,
    #[serde(default, rename = "expirationTime")]
    _expiration_time: Option<serde::de::IgnoredAny>,
    keys: KeysJson,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysJson {
    p256dh: String,
    auth: String,
}

struct Subscription {
    endpoint: reqwest::Url,
    p256dh: p256::PublicKey,
    auth: web_push_native::Auth,
}

impl WebPush {
    pub(crate) fn from_settings(
        settings: &WebPushSettings,
        allow_loopback: bool,
        timeout: Duration,
        options: &PushOptions,
    ) -> Result<Self, PushSetupError> {
        const VAR: &str = "HERALD_VAPID_PRIVATE_KEY_FILE";
        let file = &settings.vapid_private_key_file;
        let pem = super::read_file(VAR, file)?;
        let pem = pem.trim();
        let secret = <p256::SecretKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
            .map_err(|_| {
                PushSetupError::new(
                    VAR,
                    format!(
                        "{} is not a P-256 private key in PEM form (PKCS#8 `PRIVATE KEY` or `EC PRIVATE KEY`)",
                        file.display()
                    ),
                )
            })?;
        let vapid_key = super::es256_key(&secret).map_err(|e| PushSetupError::new(VAR, e))?;
        let vapid_public = URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would connect on our behalf, past the guarded resolver.
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { allow_loopback }))
            .https_only(!allow_loopback)
            .build()
            .map_err(|e| PushSetupError::new(VAR, format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            vapid_key,
            vapid_public,
            subject: settings.vapid_subject.clone(),
            allow_loopback,
            ttl: options.webpush_ttl,
        })
    }

    pub(crate) async fn send(&self, message: &PushMessage<'_>, token: &str) -> Result<(), Failure> {
        let sub = parse_subscription(token)
            .map_err(|why| Failure::unregistered(format!("not a Web Push subscription: {why}")))?;
        ssrf::check_endpoint(&sub.endpoint, self.allow_loopback).map_err(|b| Failure::unregistered(b.to_string()))?;
        let payload = json!({
            "title": message.title,
            "body": message.body,
            "data": message.data,
            "priority": message.priority,
            "herald_delivery_id": message.delivery_id,
            "herald_notification_id": message.notification_id,
        });
        let plaintext =
            serde_json::to_vec(&payload).map_err(|e| Failure::permanent(format!("encoding the payload: {e}")))?;
        let body = web_push_native::encrypt(plaintext, &sub.p256dh, &sub.auth)
            .map_err(|e| Failure::permanent(format!("Web Push: cannot encrypt the payload: {e}")))?;
        if body.len() > MAX_BODY {
            return Err(Failure::permanent(format!(
                "the encrypted Web Push payload is {} bytes; push services accept at most {MAX_BODY}",
                body.len()
            )));
        }
        let vapid = self.vapid_jwt(&sub.endpoint)?;
        let urgency = message.priority.as_str();
        let mut request = self
            .client
            .post(sub.endpoint.clone())
            .header("authorization", format!("vapid t={vapid}, k={}", self.vapid_public))
            .header("ttl", self.ttl.as_secs().to_string())
            .header("urgency", urgency)
            .header("content-encoding", "aes128gcm")
            .header("content-type", "application/octet-stream")
            .body(body);
        if let Some(topic) = topic(message.delivery_id) {
            request = request.header("topic", topic);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                return Err(match ssrf::blocked_in(&e) {
                    Some(blocked) => Failure::unregistered(blocked.to_string()),
                    None => Failure::from_reqwest("Web Push", e),
                });
            }
        };
        let status = response.status().as_u16();
        if response.status().is_success() {
            return Ok(());
        }
        let after = retry_after(response.headers());
        let failure = |class: ErrorClass, what: &str| {
            Failure::new(class, format!("Web Push: {what} ({status})"))
                .status(status)
                .retry_after(after)
        };
        Err(match status {
            300..=399 => failure(
                ErrorClass::Permanent,
                "the push service answered with a redirect, which is not followed",
            ),
            404 | 410 => Failure {
                unregistered: true,
                ..failure(
                    ErrorClass::Permanent,
                    "the subscription has expired or was unsubscribed",
                )
            },
            413 => failure(ErrorClass::Permanent, "the payload is too large"),
            429 => failure(ErrorClass::RateLimited, "sending too fast"),
            401 | 403 => failure(
                ErrorClass::Transient,
                "the push service refused the VAPID authorization",
            ),
            500..=599 => failure(ErrorClass::Transient, "the push service is unavailable"),
            _ => failure(ErrorClass::Permanent, "the push service rejected the message"),
        })
    }

    fn vapid_jwt(&self, endpoint: &reqwest::Url) -> Result<String, Failure> {
        let claims = json!({
            "aud": endpoint.origin().ascii_serialization(),
            "exp": super::unix_now() + VAPID_VALIDITY_SECS,
            "sub": self.subject,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &self.vapid_key,
        )
        .map_err(|_| Failure::transient("Web Push: cannot sign the VAPID token"))
    }
}

fn parse_subscription(token: &str) -> Result<Subscription, String> {
    let json: SubscriptionJson = serde_json::from_str(token).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => "expected {\"endpoint\", \"keys\": {\"p256dh\", \"auth\"}}".to_owned(),
        _ => format!("not JSON (line {}, column {})", e.line(), e.column()),
    })?;
    let endpoint = reqwest::Url::parse(&json.endpoint).map_err(|_| "the endpoint is not a URL".to_owned())?;
    let p256dh = decode_b64url(&json.keys.p256dh).ok_or("keys.p256dh is not base64url")?;
    let p256dh = p256::PublicKey::from_sec1_bytes(&p256dh).map_err(|_| "keys.p256dh is not a P-256 public key")?;
    let auth = decode_b64url(&json.keys.auth).ok_or("keys.auth is not base64url")?;
    if auth.len() != 16 {
        return Err(format!("keys.auth is {} bytes; expected 16", auth.len()));
    }
    Ok(Subscription {
        endpoint,
        p256dh,
        auth: web_push_native::Auth::clone_from_slice(&auth),
    })
}

/// Browsers send unpadded base64url; some libraries pad it.
fn decode_b64url(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// The `Topic` header: at most 32 characters of the base64url alphabet.
fn topic(delivery_id: &str) -> Option<&str> {
    let ok = !delivery_id.is_empty()
        && delivery_id.len() <= 32
        && delivery_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(delivery_id)
}

/// A subscription for logs: the push service's origin, never the path
/// (which identifies the browser) or the keys.
pub(crate) fn describe_endpoint(token: &str) -> String {
    serde_json::from_str::<serde_json::Value>(token)
        .ok()
        .and_then(|v| v["endpoint"].as_str().and_then(|e| reqwest::Url::parse(e).ok()))
        .map_or_else(
            || "invalid subscription".to_owned(),
            |u| u.origin().ascii_serialization(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256DH: &str = "BLn9b-VR0ca83knDNZ32dCHGyjJp-1riX9ZTN40MqV8K_LpQmLqxC_DoHvqvFXO_nGdAB4W9dogZb_sM-uV4JbY";
    const AUTH: &str = "_ordMnz7uTCmrpBTeUV4Bw";

    fn subscription(endpoint: &str, p256dh: &str, auth: &str) -> String {
        json!({"endpoint": endpoint, "expirationTime": null, "keys": {"p256dh": p256dh, "auth": auth}}).to_string()
    }

    #[test]
    fn a_browser_subscription_parses() {
        let s = parse_subscription(&subscription("https://push.example.net/abc", P256DH, AUTH)).unwrap();
        assert_eq!(s.endpoint.host_str(), Some("push.example.net"));
    }

    #[test]
    fn malformed_subscriptions_are_refused_with_a_reason() {
        for (token, reason) in [
            ("not json".to_owned(), "not JSON"),
            ("{\"endpoint\": \"https://x\"}".to_owned(), "expected"),
            (subscription("nope", P256DH, AUTH), "not a URL"),
            (subscription("https://x", "AAAA", AUTH), "not a P-256 public key"),
            (subscription("https://x", P256DH, "AAAA"), "expected 16"),
            (subscription("https://x", "!!", AUTH), "not base64url"),
            (
                json!({"endpoint": "https://x", "keys": {"p256dh": P256DH, "auth": AUTH}, "extra": 1}).to_string(),
                "expected",
            ),
        ] {
            let err = parse_subscription(&token)
                .err()
                .unwrap_or_else(|| panic!("{token} should be refused"));
            assert!(err.contains(reason), "{token}: {err}");
        }
    }

    #[test]
    fn the_topic_is_the_delivery_id_when_it_fits() {
        assert_eq!(
            topic("dlv_01HZX3V9J5T3K0M4Q8W2B6N7PR"),
            Some("dlv_01HZX3V9J5T3K0M4Q8W2B6N7PR")
        );
        assert_eq!(topic(&"a".repeat(33)), None);
        assert_eq!(topic("a.b"), None);
    }

    #[test]
    fn logs_see_only_the_origin_of_a_subscription() {
        let token = subscription("https://push.example.net/secret-path", P256DH, AUTH);
        assert_eq!(describe_endpoint(&token), "https://push.example.net");
    }
}
