//! Stand-ins for the push providers, speaking their documented contracts on
//! 127.0.0.1, with test credentials of their own (written to a temp dir, so
//! no test needs real credentials).
//!
//! - [`FcmStandIn`]: an OAuth2 token endpoint (`/token`) that verifies the
//!   service account's signed JWT assertion (RS256, `aud`, `iss`, `scope`)
//!   with the test key's public half and issues access tokens, and
//!   `POST /v1/projects/{project}/messages:send`, which checks the bearer
//!   token and records each request.
//! - [`ApnsStandIn`]: APNs over HTTP/2 cleartext (prior knowledge; HTTP/1
//!   is refused), verifying the ES256 provider JWT (`kid`, `iss`, `iat` no
//!   older than an hour) and `apns-topic`, recording headers and body.
//! - [`WebPushStandIn`]: a push service endpoint verifying the VAPID
//!   `Authorization` header and recording headers and the encrypted body;
//!   [`WebPushStandIn::subscribe`] makes a browser subscription (with its
//!   private key, so a test can decrypt what was sent, e.g. with
//!   [`decrypt_independently`]).
//!
//! Every stand-in answers success by default and can be scripted with a
//! [`Reply`] (status, the provider's documented JSON error body, headers
//! such as `Retry-After`): `fail_next(n, reply)` for the next `n` requests,
//! or `fail_token(token, reply)` (`fail_subscription` for Web Push) for
//! every request to one device. `requests()` returns what was received,
//! each with the status it was answered with. `env()` gives the `HERALD_*`
//! variables that point Herald at the stand-in (add
//! `HERALD_PUSH_TRANSPORT=http`, or use [`push_env`]).
//!
//! ```no_run
//! # async fn example() {
//! use herald_testkit::push_providers::{FcmStandIn, Reply, push_env};
//! let fcm = FcmStandIn::start().await;
//! fcm.fail_next(2, Reply::fcm_quota_exceeded(Some(30)));
//! let env = push_env(&[fcm.env()]); // HERALD_PUSH_TRANSPORT=http + HERALD_FCM_*
//! let settings = herald_config::Settings::from_map(&env).unwrap();
//! // … build Herald from `settings`, send, then look at `fcm.requests()`.
//! # }
//! ```
//!
//! Servers run on the test's tokio runtime and stop when the stand-in is
//! dropped.
#![allow(clippy::missing_panics_doc)] // test support: panicking is how it reports

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Version};
use axum::response::Response;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use rand::Rng;
use serde_json::{Value, json};

/// The OAuth2 scope FCM's HTTP v1 API needs.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// An answer a stand-in gives instead of success.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    #[must_use]
    pub fn new(status: u16, body: Value) -> Self {
        Self {
            status,
            body,
            headers: Vec::new(),
        }
    }

    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    #[must_use]
    pub fn retry_after(self, secs: u64) -> Self {
        self.header("retry-after", &secs.to_string())
    }

    fn maybe_retry_after(self, secs: Option<u64>) -> Self {
        match secs {
            Some(s) => self.retry_after(s),
            None => self,
        }
    }

    /// An FCM v1 error body: `{"error": {code, message, status, details: [FcmError]}}`.
    #[must_use]
    pub fn fcm_error(status: u16, rpc_status: &str, error_code: &str, message: &str) -> Self {
        Self::new(
            status,
            json!({"error": {
                "code": status,
                "message": message,
                "status": rpc_status,
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}],
            }}),
        )
    }

    /// 404 `UNREGISTERED`: the app was uninstalled or the token expired.
    #[must_use]
    pub fn fcm_unregistered() -> Self {
        Self::fcm_error(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found.")
    }

    /// 400 `INVALID_ARGUMENT` about `message.token`.
    #[must_use]
    pub fn fcm_invalid_token() -> Self {
        let mut r = Self::fcm_error(
            400,
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
        );
        if let Some(details) = r.body["error"]["details"].as_array_mut() {
            details.push(json!({
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}],
            }));
        }
        r
    }

    /// 429 `QUOTA_EXCEEDED`, with `Retry-After` when given.
    #[must_use]
    pub fn fcm_quota_exceeded(retry_after: Option<u64>) -> Self {
        Self::fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded.").maybe_retry_after(retry_after)
    }

    /// 503 `UNAVAILABLE`, with `Retry-After` when given.
    #[must_use]
    pub fn fcm_unavailable(retry_after: Option<u64>) -> Self {
        Self::fcm_error(
            503,
            "UNAVAILABLE",
            "UNAVAILABLE",
            "The service is currently unavailable.",
        )
        .maybe_retry_after(retry_after)
    }

    /// 500 `INTERNAL`.
    #[must_use]
    pub fn fcm_internal() -> Self {
        Self::fcm_error(500, "INTERNAL", "INTERNAL", "Internal error encountered.")
    }

    /// 401 `UNAUTHENTICATED` (the access token was not accepted).
    #[must_use]
    pub fn fcm_unauthenticated() -> Self {
        Self::new(
            401,
            json!({"error": {
                "code": 401,
                "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
                "status": "UNAUTHENTICATED",
            }}),
        )
    }

    /// An APNs error: `{"reason": …}` (410 also carries a `timestamp`).
    #[must_use]
    pub fn apns(status: u16, reason: &str) -> Self {
        let body = if status == 410 {
            json!({"reason": reason, "timestamp": 1_700_000_000_000_u64})
        } else {
            json!({"reason": reason})
        };
        Self::new(status, body)
    }

    /// 410 `Unregistered`.
    #[must_use]
    pub fn apns_unregistered() -> Self {
        Self::apns(410, "Unregistered")
    }

    /// 400 `BadDeviceToken`.
    #[must_use]
    pub fn apns_bad_device_token() -> Self {
        Self::apns(400, "BadDeviceToken")
    }

    /// 429 `TooManyRequests`.
    #[must_use]
    pub fn apns_too_many_requests() -> Self {
        Self::apns(429, "TooManyRequests")
    }

    /// 403 `ExpiredProviderToken`.
    #[must_use]
    pub fn apns_expired_provider_token() -> Self {
        Self::apns(403, "ExpiredProviderToken")
    }

    /// 503 `ServiceUnavailable`.
    #[must_use]
    pub fn apns_service_unavailable() -> Self {
        Self::apns(503, "ServiceUnavailable")
    }

    /// A Web Push service's error (push services answer with a short text or JSON body).
    #[must_use]
    pub fn webpush(status: u16) -> Self {
        Self::new(status, json!({"code": status, "errno": 0, "error": "stand-in error"}))
    }

    /// 410 Gone: the subscription expired or the user unsubscribed.
    #[must_use]
    pub fn webpush_gone() -> Self {
        Self::webpush(410)
    }

    /// 429 with `Retry-After` when given.
    #[must_use]
    pub fn webpush_too_many_requests(retry_after: Option<u64>) -> Self {
        Self::webpush(429).maybe_retry_after(retry_after)
    }

    /// A redirect to `location` (Herald must not follow it).
    #[must_use]
    pub fn redirect(status: u16, location: &str) -> Self {
        Self::new(status, Value::Null).header("location", location)
    }
}

/// One request a stand-in received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    /// Names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The status the stand-in answered with.
    pub answered: u16,
    /// When it arrived (the answer follows within microseconds).
    pub received_at: std::time::Instant,
}

impl RecordedRequest {
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Value::Null` when it is not JSON).
    #[must_use]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The claims of a JWT, without verifying it (for assertions in tests).
#[must_use]
pub fn jwt_claims(jwt: &str) -> Value {
    jwt_part(jwt, 1)
}

/// The header of a JWT, without verifying it.
#[must_use]
pub fn jwt_header(jwt: &str) -> Value {
    jwt_part(jwt, 0)
}

fn jwt_part(jwt: &str, i: usize) -> Value {
    jwt.split('.')
        .nth(i)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// `HERALD_PUSH_TRANSPORT=http` plus the given stand-ins' variables.
#[must_use]
pub fn push_env(parts: &[Vec<(&'static str, String)>]) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = parts
        .iter()
        .flatten()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    env.insert("HERALD_PUSH_TRANSPORT".into(), "http".into());
    env
}

/// Scripted answers: per key (device token or path) first, then the queue.
#[derive(Default)]
struct Script {
    next: VecDeque<Reply>,
    by_key: HashMap<String, Reply>,
}

impl Script {
    fn take(&mut self, key: &str) -> Option<Reply> {
        if let Some(r) = self.by_key.get(key) {
            return Some(r.clone());
        }
        self.next.pop_front()
    }
}

/// Everything a stand-in shares with its handler.
struct Shared<C> {
    config: C,
    state: Mutex<StandInState>,
}

#[derive(Default)]
struct StandInState {
    script: Script,
    requests: Vec<RecordedRequest>,
    token_requests: Vec<RecordedRequest>,
    issued: HashSet<String>,
    counter: u64,
    token_lifetime: u64,
}

impl<C> Shared<C> {
    fn new(config: C) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: Mutex::new(StandInState {
                token_lifetime: 3600,
                ..StandInState::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StandInState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running server; stops when dropped.
struct Server {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(app: Router) -> (String, Server) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a stand-in");
    let addr = listener.local_addr().expect("stand-in address");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), Server { task })
}

async fn read_request(req: Request) -> RecordedRequest {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        answered: 0,
        received_at: std::time::Instant::now(),
    }
}

fn respond(reply: &Reply) -> Response {
    let mut builder = Response::builder().status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::OK));
    for (n, v) in &reply.headers {
        builder = builder.header(n.as_str(), v.as_str());
    }
    let body = if reply.body.is_null() {
        Body::empty()
    } else {
        builder = builder.header("content-type", "application/json");
        Body::from(reply.body.to_string())
    };
    builder.body(body).expect("a valid stand-in response")
}

fn random_id(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

const ALNUM_UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_ec_key() -> p256::SecretKey {
    p256::SecretKey::random(&mut rand_core::OsRng)
}

fn ec_decoding_key(public: &p256::PublicKey) -> DecodingKey {
    let point = public.to_encoded_point(false);
    let (x, y) = (point.x().expect("x"), point.y().expect("y"));
    DecodingKey::from_ec_components(&URL_SAFE_NO_PAD.encode(x), &URL_SAFE_NO_PAD.encode(y)).expect("EC decoding key")
}

/// Generating a 2048-bit RSA key takes a while in a debug build: one per
/// test process, shared by its FCM stand-ins.
fn rsa_key() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("generate an RSA key"))
}

// ---------------------------------------------------------------- FCM

struct FcmConfig {
    project_id: String,
    client_email: String,
    token_uri: String,
    public_key: DecodingKey,
}

/// FCM HTTP v1 and its OAuth2 token endpoint. See the module docs.
pub struct FcmStandIn {
    /// What `HERALD_FCM_BASE_URL` should be.
    pub base_url: String,
    /// The service account's `token_uri` (`{base_url}/token`).
    pub token_uri: String,
    pub project_id: String,
    pub client_email: String,
    /// The service-account JSON (`HERALD_FCM_CREDENTIALS_FILE`).
    pub credentials_file: PathBuf,
    shared: Arc<Shared<FcmConfig>>,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl FcmStandIn {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the FCM stand-in");
        let base_url = format!("http://{}", listener.local_addr().expect("address"));
        let token_uri = format!("{base_url}/token");
        let project_id = format!("herald-test-{}", random_id(6, b"abcdefghijklmnopqrstuvwxyz0123456789"));
        let client_email = format!("herald-sender@{project_id}.iam.gserviceaccount.com");
        let key = rsa_key();
        let public_key = {
            use rsa::traits::PublicKeyParts;
            DecodingKey::from_rsa_components(
                &URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                &URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
            )
            .expect("RSA decoding key")
        };
        let private_pem = key.to_pkcs8_pem(LineEnding::LF).expect("PEM of the RSA key");
        let dir = tempfile::tempdir().expect("temp dir");
        let credentials_file = dir.path().join("service-account.json");
        let account = json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": random_id(40, b"0123456789abcdef"),
            "private_key": private_pem.as_str(),
            "client_email": client_email,
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        });
        std::fs::write(&credentials_file, serde_json::to_vec_pretty(&account).expect("JSON"))
            .expect("write credentials");
        let shared = Shared::new(FcmConfig {
            project_id: project_id.clone(),
            client_email: client_email.clone(),
            token_uri: token_uri.clone(),
            public_key,
        });
        let app = Router::new().fallback(fcm_handler).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url,
            token_uri,
            project_id,
            client_email,
            credentials_file,
            shared,
            _server: Server { task },
            _dir: dir,
        }
    }

    /// `HERALD_FCM_CREDENTIALS_FILE` and `HERALD_FCM_BASE_URL`.
    #[must_use]
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "HERALD_FCM_CREDENTIALS_FILE",
                self.credentials_file.display().to_string(),
            ),
            ("HERALD_FCM_BASE_URL", self.base_url.clone()),
        ]
    }

    /// Answer the next `n` sends with `reply`.
    pub fn fail_next(&self, n: usize, reply: Reply) {
        let mut s = self.shared.lock();
        s.script.next.extend(std::iter::repeat_n(reply, n));
    }

    /// Answer every send to `device_token` with `reply`.
    pub fn fail_token(&self, device_token: &str, reply: Reply) {
        self.shared.lock().script.by_key.insert(device_token.to_owned(), reply);
    }

    /// Every `messages:send` request received (including refused ones).
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Every request to the token endpoint.
    #[must_use]
    pub fn token_requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().token_requests.clone()
    }

    /// Forget every access token issued so far: the next send with one gets
    /// a 401, as after a revocation.
    pub fn revoke_access_tokens(&self) {
        self.shared.lock().issued.clear();
    }

    /// `expires_in` of the access tokens issued from now on (default 3600).
    pub fn set_token_lifetime(&self, secs: u64) {
        self.shared.lock().token_lifetime = secs;
    }
}

async fn fcm_handler(State(shared): State<Arc<Shared<FcmConfig>>>, req: Request) -> Response {
    let mut recorded = read_request(req).await;
    let config = &shared.config;
    if recorded.path == "/token" {
        let reply = fcm_token(&shared, &recorded);
        recorded.answered = reply.status;
        shared.lock().token_requests.push(recorded);
        return respond(&reply);
    }
    let send_path = format!("/v1/projects/{}/messages:send", config.project_id);
    let reply = {
        let mut s = shared.lock();
        let bearer = recorded
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        if recorded.path != send_path || recorded.method != "POST" {
            Reply::fcm_error(404, "NOT_FOUND", "UNSPECIFIED_ERROR", "stand-in: unknown path")
        } else if !bearer.is_some_and(|b| s.issued.contains(&b)) {
            Reply::fcm_unauthenticated()
        } else {
            let body = recorded.json();
            match body["message"]["token"].as_str() {
                None => Reply::fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "message.token is required"),
                Some(token) => s.script.take(token).unwrap_or_else(|| {
                    s.counter += 1;
                    Reply::new(
                        200,
                        json!({"name": format!("projects/{}/messages/0:{}", config.project_id, s.counter)}),
                    )
                }),
            }
        }
    };
    recorded.answered = reply.status;
    shared.lock().requests.push(recorded);
    respond(&reply)
}

/// The OAuth2 token endpoint: checks the grant and the signed assertion.
fn fcm_token(shared: &Shared<FcmConfig>, recorded: &RecordedRequest) -> Reply {
    let config = &shared.config;
    let form: HashMap<String, String> = url::form_urlencoded::parse(&recorded.body).into_owned().collect();
    let invalid = |why: &str| Reply::new(400, json!({"error": "invalid_grant", "error_description": why}));
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return Reply::new(
            400,
            json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"}),
        );
    }
    let Some(assertion) = form.get("assertion") else {
        return invalid("Missing assertion");
    };
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[&config.token_uri]);
    validation.set_issuer(&[&config.client_email]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let claims = match jsonwebtoken::decode::<Value>(assertion, &config.public_key, &validation) {
        Ok(data) => data.claims,
        Err(_) => return invalid("Invalid JWT Signature."),
    };
    if claims["scope"].as_str() != Some(FCM_SCOPE) {
        return invalid("Invalid scope");
    }
    let (iat, exp) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
    if exp <= iat || exp - iat > 3600 || iat > unix_now() + 60 {
        return invalid("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe.");
    }
    let mut s = shared.lock();
    s.counter += 1;
    let token = format!("ya29.stand-in-{}-{}", s.counter, random_id(24, ALNUM_UPPER));
    s.issued.insert(token.clone());
    Reply::new(
        200,
        json!({"access_token": token, "expires_in": s.token_lifetime, "token_type": "Bearer"}),
    )
}

// --------------------------------------------------------------- APNs

struct ApnsConfig {
    key_id: String,
    team_id: String,
    topic: String,
    public_key: DecodingKey,
}

/// APNs over HTTP/2 cleartext. See the module docs.
pub struct ApnsStandIn {
    /// What `HERALD_APNS_BASE_URL` should be.
    pub base_url: String,
    /// The `.p8` key (`HERALD_APNS_KEY_FILE`).
    pub key_file: PathBuf,
    pub key_id: String,
    pub team_id: String,
    pub topic: String,
    shared: Arc<Shared<ApnsConfig>>,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl ApnsStandIn {
    pub async fn start() -> Self {
        let secret = new_ec_key();
        let dir = tempfile::tempdir().expect("temp dir");
        let key_id = random_id(10, ALNUM_UPPER);
        let key_file = dir.path().join(format!("AuthKey_{key_id}.p8"));
        std::fs::write(&key_file, secret.to_pkcs8_pem(LineEnding::LF).expect("PEM").as_bytes()).expect("write .p8");
        let team_id = random_id(10, ALNUM_UPPER);
        let topic = "com.example.herald".to_owned();
        let shared = Shared::new(ApnsConfig {
            key_id: key_id.clone(),
            team_id: team_id.clone(),
            topic: topic.clone(),
            public_key: ec_decoding_key(&secret.public_key()),
        });
        let (base_url, server) = serve(Router::new().fallback(apns_handler).with_state(shared.clone())).await;
        Self {
            base_url,
            key_file,
            key_id,
            team_id,
            topic,
            shared,
            _server: server,
            _dir: dir,
        }
    }

    /// The four `HERALD_APNS_*` settings and `HERALD_APNS_BASE_URL`.
    #[must_use]
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HERALD_APNS_KEY_FILE", self.key_file.display().to_string()),
            ("HERALD_APNS_KEY_ID", self.key_id.clone()),
            ("HERALD_APNS_TEAM_ID", self.team_id.clone()),
            ("HERALD_APNS_TOPIC", self.topic.clone()),
            ("HERALD_APNS_BASE_URL", self.base_url.clone()),
        ]
    }

    /// Answer the next `n` pushes with `reply`.
    pub fn fail_next(&self, n: usize, reply: Reply) {
        self.shared.lock().script.next.extend(std::iter::repeat_n(reply, n));
    }

    /// Answer every push to `device_token` with `reply`.
    pub fn fail_token(&self, device_token: &str, reply: Reply) {
        self.shared.lock().script.by_key.insert(device_token.to_owned(), reply);
    }

    /// Every request received (including refused ones).
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }
}

async fn apns_handler(State(shared): State<Arc<Shared<ApnsConfig>>>, req: Request) -> Response {
    let http2 = req.version() == Version::HTTP_2;
    let mut recorded = read_request(req).await;
    let reply = apns_reply(&shared, &recorded, http2);
    recorded.answered = reply.status;
    shared.lock().requests.push(recorded);
    respond(&reply)
}

fn apns_reply(shared: &Shared<ApnsConfig>, r: &RecordedRequest, http2: bool) -> Reply {
    let config = &shared.config;
    if !http2 {
        // APNs speaks HTTP/2 only.
        return Reply::apns(400, "BadRequest").header("x-stand-in", "HTTP/2 required");
    }
    let Some(token) = r.path.strip_prefix("/3/device/") else {
        return Reply::apns(404, "BadPath");
    };
    if r.method != "POST" {
        return Reply::apns(405, "MethodNotAllowed");
    }
    let Some(jwt) = r.header("authorization").and_then(|v| v.strip_prefix("bearer ")) else {
        return Reply::apns(403, "MissingProviderToken");
    };
    let header = jwt_header(jwt);
    if header["alg"] != "ES256" || header["kid"].as_str() != Some(config.key_id.as_str()) {
        return Reply::apns(403, "InvalidProviderToken");
    }
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.set_required_spec_claims::<&str>(&[]);
    validation.set_issuer(&[&config.team_id]);
    let Ok(data) = jsonwebtoken::decode::<Value>(jwt, &config.public_key, &validation) else {
        return Reply::apns(403, "InvalidProviderToken");
    };
    let Some(iat) = data.claims["iat"].as_u64() else {
        return Reply::apns(403, "InvalidProviderToken");
    };
    if unix_now().saturating_sub(iat) > 3600 {
        return Reply::apns(403, "ExpiredProviderToken");
    }
    match r.header("apns-topic") {
        None => return Reply::apns(400, "MissingTopic"),
        Some(t) if t != config.topic => return Reply::apns(400, "TopicDisallowed"),
        Some(_) => {}
    }
    if r.json()["aps"].is_null() {
        return Reply::apns(400, "PayloadEmpty");
    }
    let apns_id = r
        .header("apns-id")
        .unwrap_or("00000000-0000-0000-0000-000000000000")
        .to_owned();
    shared
        .lock()
        .script
        .take(token)
        .unwrap_or_else(|| Reply::new(200, Value::Null))
        .header("apns-id", &apns_id)
}

// ----------------------------------------------------------- Web Push

struct WebPushConfig {
    origin: String,
    vapid_public: String,
    vapid_key: DecodingKey,
}

/// A browser's push subscription made by [`WebPushStandIn::subscribe`],
/// with the browser-side private key.
#[derive(Debug, Clone)]
pub struct BrowserSubscription {
    pub endpoint: String,
    /// base64url, uncompressed P-256 point.
    pub p256dh: String,
    /// base64url, 16 bytes.
    pub auth: String,
    /// base64url, the 32-byte private scalar matching `p256dh`.
    pub private_key: String,
}

impl BrowserSubscription {
    /// The device token Herald stores: what `JSON.stringify(subscription)` gives.
    #[must_use]
    pub fn token(&self) -> String {
        json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": {"p256dh": self.p256dh, "auth": self.auth},
        })
        .to_string()
    }

    /// The path of the endpoint (what the stand-in records).
    #[must_use]
    pub fn path(&self) -> String {
        url::Url::parse(&self.endpoint)
            .map(|u| u.path().to_owned())
            .unwrap_or_default()
    }
}

/// A Web Push service endpoint. See the module docs.
pub struct WebPushStandIn {
    pub base_url: String,
    /// The VAPID private key, SEC1 PEM as `openssl ecparam -genkey` writes
    /// it (`HERALD_VAPID_PRIVATE_KEY_FILE`).
    pub vapid_key_file: PathBuf,
    pub vapid_subject: String,
    /// base64url of the uncompressed public key (the `k=` Herald must send).
    pub vapid_public_key: String,
    shared: Arc<Shared<WebPushConfig>>,
    _server: Server,
    _dir: tempfile::TempDir,
}

impl WebPushStandIn {
    pub async fn start() -> Self {
        let vapid = new_ec_key();
        let dir = tempfile::tempdir().expect("temp dir");
        let vapid_key_file = dir.path().join("vapid.pem");
        std::fs::write(
            &vapid_key_file,
            vapid.to_sec1_pem(LineEnding::LF).expect("PEM").as_bytes(),
        )
        .expect("write the VAPID key");
        let vapid_public_key = URL_SAFE_NO_PAD.encode(vapid.public_key().to_encoded_point(false).as_bytes());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Web Push stand-in");
        let base_url = format!("http://{}", listener.local_addr().expect("address"));
        let shared = Shared::new(WebPushConfig {
            origin: base_url.clone(),
            vapid_public: vapid_public_key.clone(),
            vapid_key: ec_decoding_key(&vapid.public_key()),
        });
        let app = Router::new().fallback(webpush_handler).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url,
            vapid_key_file,
            vapid_subject: "mailto:ops@herald.test".to_owned(),
            vapid_public_key,
            shared,
            _server: Server { task },
            _dir: dir,
        }
    }

    /// The `HERALD_VAPID_*` settings and `HERALD_WEBPUSH_ALLOW_LOOPBACK=true`
    /// (the stand-in is on loopback, over http).
    #[must_use]
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "HERALD_VAPID_PRIVATE_KEY_FILE",
                self.vapid_key_file.display().to_string(),
            ),
            ("HERALD_VAPID_SUBJECT", self.vapid_subject.clone()),
            ("HERALD_WEBPUSH_ALLOW_LOOPBACK", "true".to_owned()),
        ]
    }

    /// A new browser subscription on this push service.
    #[must_use]
    pub fn subscribe(&self) -> BrowserSubscription {
        let secret = new_ec_key();
        let mut auth = [0u8; 16];
        rand::rng().fill(&mut auth);
        BrowserSubscription {
            endpoint: format!(
                "{}/push/{}",
                self.base_url,
                random_id(32, b"abcdefghijklmnopqrstuvwxyz0123456789")
            ),
            p256dh: URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes()),
            auth: URL_SAFE_NO_PAD.encode(auth),
            private_key: URL_SAFE_NO_PAD.encode(secret.to_bytes()),
        }
    }

    /// Answer the next `n` pushes with `reply`.
    pub fn fail_next(&self, n: usize, reply: Reply) {
        self.shared.lock().script.next.extend(std::iter::repeat_n(reply, n));
    }

    /// Answer every push to `subscription` with `reply`.
    pub fn fail_subscription(&self, subscription: &BrowserSubscription, reply: Reply) {
        self.shared.lock().script.by_key.insert(subscription.path(), reply);
    }

    /// Every request received (including refused ones).
    #[must_use]
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }
}

async fn webpush_handler(State(shared): State<Arc<Shared<WebPushConfig>>>, req: Request) -> Response {
    let mut recorded = read_request(req).await;
    let reply = webpush_reply(&shared, &recorded);
    recorded.answered = reply.status;
    shared.lock().requests.push(recorded);
    respond(&reply)
}

fn webpush_reply(shared: &Shared<WebPushConfig>, r: &RecordedRequest) -> Reply {
    let config = &shared.config;
    if r.method != "POST" || !r.path.starts_with("/push/") {
        return Reply::webpush(404);
    }
    // RFC 8292: `vapid t=<JWT>, k=<public key>`.
    let Some(auth) = r.header("authorization").and_then(|v| v.strip_prefix("vapid ")) else {
        return Reply::webpush(401);
    };
    let params: HashMap<&str, &str> = auth.split(',').filter_map(|p| p.trim().split_once('=')).collect();
    let (Some(jwt), Some(k)) = (params.get("t"), params.get("k")) else {
        return Reply::webpush(401);
    };
    if *k != config.vapid_public {
        // The subscription was made for another application server key.
        return Reply::webpush(403);
    }
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&[&config.origin]);
    validation.set_required_spec_claims(&["exp", "aud", "sub"]);
    let Ok(data) = jsonwebtoken::decode::<Value>(jwt, &config.vapid_key, &validation) else {
        return Reply::webpush(401);
    };
    let exp = data.claims["exp"].as_u64().unwrap_or(0);
    let sub = data.claims["sub"].as_str().unwrap_or_default();
    if exp > unix_now() + 24 * 3600 || !(sub.starts_with("mailto:") || sub.starts_with("https://")) {
        return Reply::webpush(401);
    }
    if r.header("content-encoding") != Some("aes128gcm") || r.header("ttl").is_none() || r.body.is_empty() {
        return Reply::webpush(400);
    }
    shared.lock().script.take(&r.path).unwrap_or_else(|| {
        Reply::new(201, Value::Null).header(
            "location",
            &format!("{}/message/{}", config.origin, random_id(16, ALNUM_UPPER)),
        )
    })
}

/// Decrypts a Web Push body with an implementation independent of
/// Herald's: Python's `http_ece` (with `cryptography`), from
/// `tests/support/requirements.txt`.
pub fn decrypt_independently(subscription: &BrowserSubscription, body: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    const SCRIPT: &str = r"
import base64, sys, http_ece
from cryptography.hazmat.primitives.asymmetric import ec
def b64(s): return base64.urlsafe_b64decode(s + '=' * (-len(s) % 4))
private = ec.derive_private_key(int.from_bytes(b64(sys.argv[1]), 'big'), ec.SECP256R1())
body = sys.stdin.buffer.read()
sys.stdout.buffer.write(http_ece.decrypt(body, private_key=private, auth_secret=b64(sys.argv[2]), version='aes128gcm'))
";
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT, &subscription.private_key, &subscription.auth])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(body)
        .map_err(|e| format!("writing to python3: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("python3: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "http_ece could not decrypt (pip install -r tests/support/requirements.txt?): {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
