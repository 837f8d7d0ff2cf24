//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Auth: the service account signs a JWT (RS256; `iss` = `client_email`,
//! `scope` = firebase.messaging, `aud` = `token_uri`) and exchanges it at
//! `token_uri` for an OAuth2 access token (grant type `jwt-bearer`). The
//! token is cached until shortly before it expires and shared by all
//! concurrent sends; one refresh runs at a time (the others wait for it).
//!
//! Send: `POST {base}/v1/projects/{project_id}/messages:send` with the
//! notification, a string `data` map carrying `herald_delivery_id` (so a
//! client can drop duplicates), and Android/APNs priority from the
//! notification's priority.
//!
//! Errors, after the FCM documentation: `UNREGISTERED` (404), an
//! `INVALID_ARGUMENT` (400) about the token, and `SENDER_ID_MISMATCH` (403)
//! disable the device; `QUOTA_EXCEEDED` (429) is rate limited; 500/503 are
//! transient, both honouring `Retry-After`; a 401 refreshes the access token
//! and tries once more, then is transient.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::ErrorClass;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{Alert, Failure, Fields, PushMessage, PushOptions, PushSetupError, retry_after, truncate};

const VAR: &str = "HERALD_FCM_CREDENTIALS_FILE";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

pub(crate) struct Fcm {
    client: reqwest::Client,
    /// Parsed once: reqwest parses a URL given as text on every request
    /// (host, IDNA, path), and every push goes to this one URL.
    send_url: reqwest::Url,
    account: ServiceAccount,
    token: Mutex<Option<AccessToken>>,
    margin: Duration,
}

impl fmt::Debug for Fcm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fcm")
            .field("send_url", &self.send_url.as_str())
            .finish_non_exhaustive()
    }
}

struct ServiceAccount {
    client_email: String,
    token_uri: String,
    key_id: Option<String>,
    key: jsonwebtoken::EncodingKey,
}

#[derive(Clone)]
struct AccessToken {
    value: Arc<str>,
    refresh_at: Instant,
    /// Counts refreshes, so a send that saw a token rejected refreshes
    /// only if no one else has since.
    generation: u64,
}

impl Fcm {
    pub(crate) fn from_settings(
        file: &Path,
        base_url: &str,
        timeout: Duration,
        options: &PushOptions,
    ) -> Result<Self, PushSetupError> {
        let text = super::read_file(VAR, file)?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            PushSetupError::new(
                VAR,
                format!(
                    "{} is not JSON (line {}, column {})",
                    file.display(),
                    e.line(),
                    e.column()
                ),
            )
        })?;
        let field = |name: &str| -> Result<String, PushSetupError> {
            match json.get(name).and_then(Value::as_str).filter(|v| !v.is_empty()) {
                Some(v) => Ok(v.to_owned()),
                None => Err(PushSetupError::new(
                    VAR,
                    format!("not a service account: missing {name}"),
                )),
            }
        };
        if let Some(kind) = json
            .get("type")
            .and_then(Value::as_str)
            .filter(|k| *k != "service_account")
        {
            return Err(PushSetupError::new(
                VAR,
                format!(
                    "not a service account: its type is `{kind}` (download a service-account key from the Firebase console)"
                ),
            ));
        }
        let private_key = field("private_key")?;
        let client_email = field("client_email")?;
        let project_id = field("project_id")?;
        let token_uri = field("token_uri")?;
        // It becomes part of the request path.
        if !project_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(PushSetupError::new(
                VAR,
                format!("project_id `{project_id}` is not a Firebase project id"),
            ));
        }
        let parsed = reqwest::Url::parse(&token_uri).map_err(|_| PushSetupError::new(VAR, "token_uri is not a URL"))?;
        // The signed assertion is as good as a password for an hour: never
        // send it in clear text, except to a stand-in on this machine.
        if parsed.scheme() != "https" && !(parsed.scheme() == "http" && super::is_loopback_url(&parsed)) {
            return Err(PushSetupError::new(VAR, "token_uri must be an https:// URL"));
        }
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key.as_bytes())
            .map_err(|_| PushSetupError::new(VAR, "private_key is not an RSA private key in PEM form"))?;
        let account = ServiceAccount {
            client_email,
            token_uri,
            key_id: json.get("private_key_id").and_then(Value::as_str).map(str::to_owned),
            key,
        };
        account
            .assertion()
            .map_err(|_| PushSetupError::new(VAR, "cannot sign with private_key: it is not a usable RSA key"))?;
        let base = super::base_url("HERALD_FCM_BASE_URL", base_url)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| PushSetupError::new("HERALD_FCM_BASE_URL", format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            client,
            send_url: reqwest::Url::parse(&format!("{base}/v1/projects/{project_id}/messages:send")).map_err(|e| {
                PushSetupError::new(
                    "HERALD_FCM_BASE_URL",
                    format!("the send URL is not valid with this project id: {e}"),
                )
            })?,
            account,
            token: Mutex::new(None),
            margin: options.fcm_token_margin,
        })
    }

    pub(crate) async fn send(&self, message: &PushMessage<'_>, token: &str) -> Result<(), Failure> {
        if token.is_empty() || token.len() > 4096 {
            return Err(Failure::unregistered("not an FCM registration token"));
        }
        let body = fcm_body(message, token);
        let access = self.access_token(None).await?;
        let response = self.post(&body, &access).await?;
        if response.status() != reqwest::StatusCode::UNAUTHORIZED {
            return classify(response).await;
        }
        let error = read_error(response).await;
        if error.error_code.as_deref() == Some("THIRD_PARTY_AUTH_ERROR") {
            return Err(error.failure(
                ErrorClass::Transient,
                "FCM: the APNs or Web Push credentials in Firebase were rejected",
            ));
        }
        // The access token was revoked or expired early: refresh once.
        let access = self.access_token(Some(access.generation)).await?;
        let response = self.post(&body, &access).await?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            let error = read_error(response).await;
            return Err(error.failure(ErrorClass::Transient, "FCM rejected a freshly issued access token"));
        }
        classify(response).await
    }

    async fn post(&self, body: &FcmRequest<'_>, access: &AccessToken) -> Result<reqwest::Response, Failure> {
        self.client
            .post(self.send_url.clone())
            .bearer_auth(&*access.value)
            .json(body)
            .send()
            .await
            .map_err(|e| Failure::from_reqwest("FCM", e))
    }

    /// The cached access token, or a new one. `rejected` is the generation
    /// of a token the provider refused: it is replaced unless someone
    /// already did.
    async fn access_token(&self, rejected: Option<u64>) -> Result<AccessToken, Failure> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref() {
            let refused = rejected == Some(t.generation);
            if !refused && Instant::now() < t.refresh_at {
                return Ok(t.clone());
            }
        }
        let generation = cached.as_ref().map_or(0, |t| t.generation + 1);
        let fresh = self.fetch_token(generation).await?;
        *cached = Some(fresh.clone());
        Ok(fresh)
    }

    async fn fetch_token(&self, generation: u64) -> Result<AccessToken, Failure> {
        let assertion = self
            .account
            .assertion()
            .map_err(|_| Failure::transient("FCM: cannot sign the token request"))?;
        let response = self
            .client
            .post(&self.account.token_uri)
            .form(&[("grant_type", GRANT_TYPE), ("assertion", assertion.as_str())])
            .send()
            .await
            .map_err(|e| {
                let mut f = Failure::from_reqwest("FCM token endpoint", e);
                // No message went out yet: a failed token request is never ambiguous.
                f.class = ErrorClass::Transient;
                f
            })?;
        let status = response.status();
        if !status.is_success() {
            let after = retry_after(response.headers());
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let code = body.get("error").and_then(Value::as_str).unwrap_or("unknown error");
            let description = body.get("error_description").and_then(Value::as_str).unwrap_or("");
            let class = if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                ErrorClass::RateLimited
            } else {
                ErrorClass::Transient
            };
            let message = format!(
                "FCM: the token endpoint refused the service account ({}: {code} {})",
                status.as_u16(),
                truncate(description, 200)
            );
            return Err(Failure::new(class, message).status(status.as_u16()).retry_after(after));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            access_token: String,
            expires_in: Option<u64>,
        }
        let t: TokenResponse = response
            .json()
            .await
            .map_err(|_| Failure::transient("FCM: the token endpoint answered without an access token"))?;
        let lifetime = Duration::from_secs(t.expires_in.unwrap_or(3600));
        let margin = self.margin.min(lifetime / 2);
        Ok(AccessToken {
            value: t.access_token.into(),
            refresh_at: Instant::now() + lifetime - margin,
            generation,
        })
    }
}

impl ServiceAccount {
    fn assertion(&self) -> Result<String, jsonwebtoken::errors::Error> {
        let now = super::unix_now();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid.clone_from(&self.key_id);
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        jsonwebtoken::encode(&header, &claims, &self.key)
    }
}

/// The `messages:send` body.
#[derive(Serialize)]
struct FcmRequest<'a> {
    message: FcmMessage<'a>,
}

#[derive(Serialize)]
struct FcmMessage<'a> {
    token: &'a str,
    notification: Alert<'a>,
    /// FCM data values must be strings.
    data: Fields<'a>,
    android: AndroidConfig,
    apns: ApnsConfig,
}

#[derive(Serialize)]
struct AndroidConfig {
    priority: &'static str,
}

#[derive(Serialize)]
struct ApnsConfig {
    headers: ApnsHeaders,
}

#[derive(Serialize)]
struct ApnsHeaders {
    #[serde(rename = "apns-priority")]
    apns_priority: &'static str,
}

fn fcm_body<'a>(message: &'a PushMessage<'a>, token: &'a str) -> FcmRequest<'a> {
    let high = message.is_high_priority();
    FcmRequest {
        message: FcmMessage {
            token,
            notification: Alert {
                title: message.title,
                body: message.body,
            },
            data: Fields {
                message,
                as_strings: true,
                aps: None,
            },
            android: AndroidConfig {
                priority: if high { "HIGH" } else { "NORMAL" },
            },
            apns: ApnsConfig {
                headers: ApnsHeaders {
                    apns_priority: if high { "10" } else { "5" },
                },
            },
        },
    }
}

/// What FCM said in an error answer.
struct FcmError {
    status: u16,
    retry_after: Option<Duration>,
    /// `error.status`, e.g. `INVALID_ARGUMENT`.
    rpc_status: Option<String>,
    /// The `FcmError` detail's `errorCode`, e.g. `UNREGISTERED`.
    error_code: Option<String>,
    message: String,
    about_token: bool,
}

impl FcmError {
    fn code(&self) -> &str {
        self.error_code
            .as_deref()
            .or(self.rpc_status.as_deref())
            .unwrap_or("no error code")
    }

    fn failure(&self, class: ErrorClass, what: &str) -> Failure {
        let mut text = format!("{what} ({} {})", self.status, self.code());
        if !self.message.is_empty() {
            text.push_str(": ");
            text.push_str(&self.message);
        }
        Failure {
            class,
            status: Some(self.status),
            message: text,
            retry_after: self.retry_after,
            unregistered: false,
        }
    }

    fn gone(&self, what: &str) -> Failure {
        Failure {
            unregistered: true,
            ..self.failure(ErrorClass::Permanent, what)
        }
    }
}

async fn read_error(response: reqwest::Response) -> FcmError {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let error = &body["error"];
    let details = error["details"].as_array().cloned().unwrap_or_default();
    let error_code = details
        .iter()
        .find_map(|d| d.get("errorCode").and_then(Value::as_str))
        .map(str::to_owned);
    let token_field = details.iter().any(|d| {
        d["fieldViolations"]
            .as_array()
            .is_some_and(|v| v.iter().any(|f| f["field"].as_str() == Some("message.token")))
    });
    let message = error["message"].as_str().unwrap_or_default();
    let about_token = token_field || message.to_ascii_lowercase().contains("registration token");
    FcmError {
        status,
        retry_after,
        rpc_status: error["status"].as_str().map(str::to_owned),
        error_code,
        message: truncate(message, 200),
        about_token,
    }
}

async fn classify(response: reqwest::Response) -> Result<(), Failure> {
    if response.status().is_success() {
        return Ok(());
    }
    let e = read_error(response).await;
    let code = e.code().to_owned();
    Err(match (e.status, code.as_str()) {
        (_, "UNREGISTERED") | (404, _) => e.gone("FCM: the registration token is no longer valid"),
        (_, "SENDER_ID_MISMATCH") => e.gone("FCM: the token belongs to another Firebase project"),
        (400, _) if e.about_token => e.gone("FCM: not a valid registration token"),
        (429, _) | (_, "QUOTA_EXCEEDED") => e.failure(ErrorClass::RateLimited, "FCM: sending too fast"),
        (500..=599, _) | (_, "UNAVAILABLE" | "INTERNAL") => e.failure(ErrorClass::Transient, "FCM is unavailable"),
        // Missing permissions of the service account: an operator can fix it.
        (401 | 403, _) => e.failure(ErrorClass::Transient, "FCM refused the service account"),
        _ => e.failure(ErrorClass::Permanent, "FCM rejected the message"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::Priority;

    #[test]
    fn data_values_become_strings_and_carry_the_delivery_id() {
        let data = json!({"order": 42, "kind": "shipped", "nested": {"a": 1}});
        let message = PushMessage {
            delivery_id: "dlv_1",
            notification_id: "ntf_1",
            title: "T",
            body: "B",
            data: &data,
            priority: Priority::High,
        };
        let body = serde_json::to_value(fcm_body(&message, "tok")).unwrap();
        let m = &body["message"];
        assert_eq!(m["data"]["order"], "42");
        assert_eq!(m["data"]["kind"], "shipped");
        assert_eq!(m["data"]["nested"], "{\"a\":1}");
        assert_eq!(m["data"]["herald_delivery_id"], "dlv_1");
        assert_eq!(m["android"]["priority"], "HIGH");
        assert_eq!(m["apns"]["headers"]["apns-priority"], "10");
        assert_eq!(m["notification"]["title"], "T");
        assert_eq!(m["token"], "tok");
    }

    #[test]
    fn herald_ids_win_over_data_fields_and_other_data_is_carried_as_text() {
        let forged = json!({"herald_delivery_id": "forged", "herald_notification_id": 1, "aps": "kept"});
        let array = json!([1, "two"]);
        for (data, expected) in [
            (
                &forged,
                json!({"aps": "kept", "herald_delivery_id": "dlv_1", "herald_notification_id": "ntf_1"}),
            ),
            (
                &array,
                json!({"herald_data": "[1,\"two\"]", "herald_delivery_id": "dlv_1", "herald_notification_id": "ntf_1"}),
            ),
        ] {
            let message = PushMessage {
                delivery_id: "dlv_1",
                notification_id: "ntf_1",
                title: "T",
                body: "B",
                data,
                priority: Priority::Normal,
            };
            let text = serde_json::to_string(&fcm_body(&message, "tok")).unwrap();
            assert_eq!(text.matches("herald_delivery_id").count(), 1, "{text}");
            let body: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(body["message"]["data"], expected, "{text}");
            assert_eq!(body["message"]["android"]["priority"], "NORMAL");
        }
    }
}
