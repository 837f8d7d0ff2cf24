//! Test support. Every test gets its own Postgres database (cloned from a
//! migrated template, so it is ready in milliseconds) and its own Redis key
//! prefix, so tests run in parallel against the shared local servers.
//!
//! Environment: `HERALD_TEST_DATABASE_URL` (a server URL, default
//! `postgres://postgres@127.0.0.1:5432`) and `REDIS_URL`.
#![allow(clippy::missing_panics_doc)] // test support: panicking is how it reports

pub mod history;
pub mod logs;
pub mod process;
pub mod push_providers;
pub mod seed;
pub mod servers;
pub mod smtp;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use herald_config::Settings;
use herald_core::Channel;
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

/// The Postgres server tests create their databases on.
#[must_use]
pub fn server_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

#[must_use]
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn random_suffix() -> String {
    let mut rng = rand::rng();
    (0..10).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect()
}

/// A Redis key prefix no other test uses.
#[must_use]
pub fn unique_prefix() -> String {
    format!("herald-test-{}", random_suffix())
}

async fn admin_pool(server: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&format!("{server}/postgres"))
        .await
        .expect("connect to the test Postgres server (is it running? see .ci/run)")
}

/// The template's name follows the migrations, so a changed migration makes
/// a new template instead of reusing a stale one. Old templates are left in
/// place: another checkout (a branch with other migrations) may be running
/// its tests against the same server and still need its own.
fn template_name() -> String {
    let mut h = Sha256::new();
    for m in herald_db::MIGRATOR.iter() {
        h.update(m.version.to_le_bytes());
        h.update(&*m.checksum);
    }
    format!("herald_tpl_{}", &hex::encode(h.finalize())[..16])
}

async fn ensure_template(admin: &PgPool, server: &str) -> String {
    let name = template_name();
    let mut conn = admin.acquire().await.expect("admin connection");
    // Serialises template creation across test processes.
    sqlx::query("SELECT pg_advisory_lock(7262001)")
        .execute(&mut *conn)
        .await
        .expect("lock");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut *conn)
        .await
        .expect("query pg_database");
    if !exists {
        // Per process: a build in another process (another checkout with
        // other migrations runs its own tests) never touches this one.
        let building = format!("herald_tplbuild_{}", std::process::id());
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{building}\" WITH (FORCE)"))
            .execute(&mut *conn)
            .await
            .expect("drop");
        sqlx::query(&format!("CREATE DATABASE \"{building}\""))
            .execute(&mut *conn)
            .await
            .expect("create template");
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("{server}/{building}"))
            .await
            .expect("connect to template");
        herald_db::migrate(&pool).await.expect("migrate template");
        pool.close().await;
        // A closed connection's server session can take a moment to end, and
        // a database in use cannot be renamed: end it and retry briefly.
        let mut tries = 0;
        loop {
            sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                .bind(&building)
                .execute(&mut *conn)
                .await
                .expect("end sessions on the template");
            match sqlx::query(&format!("ALTER DATABASE \"{building}\" RENAME TO \"{name}\""))
                .execute(&mut *conn)
                .await
            {
                Ok(_) => break,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55006") && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rename template: {e}"),
            }
        }
    }
    sqlx::query("SELECT pg_advisory_unlock(7262001)")
        .execute(&mut *conn)
        .await
        .expect("unlock");
    name
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    server: String,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::new_on(&server_url()).await
    }

    /// A database on another server (a [`servers::PrivatePostgres`]).
    pub async fn new_on(server: &str) -> Self {
        let admin = admin_pool(server).await;
        let template = ensure_template(&admin, server).await;
        drop_stale_test_databases(&admin).await;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let name = format!("herald_test_{secs}_{}", random_suffix());
        sqlx::query(&format!("CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = format!("{server}/{name}");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("connect to test database");
        Self {
            name,
            url,
            pool,
            server: server.to_owned(),
        }
    }

    /// Drops the database (tests call this at the end; a test that panics
    /// leaves it for the next run's clean-up of databases over an hour old).
    pub async fn drop_db(self) {
        self.pool.close().await;
        let admin = admin_pool(&self.server).await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
            .execute(&admin)
            .await;
        admin.close().await;
    }
}

async fn drop_stale_test_databases(admin: &PgPool) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'herald_test_%'")
        .fetch_all(admin)
        .await
        .unwrap_or_default();
    for name in names {
        let created: Option<u64> = name.split('_').nth(2).and_then(|s| s.parse().ok());
        if created.is_some_and(|t| t + 3600 < now) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(admin)
                .await;
        }
    }
}

/// Settings for a test: its database, its prefix, its sink directory, and
/// retry/lease/sweep timings short enough for tests.
#[must_use]
pub fn test_env(db_url: &str, prefix: &str, sink_dir: &std::path::Path) -> HashMap<String, String> {
    [
        ("DATABASE_URL", db_url.to_owned()),
        ("REDIS_URL", redis_url()),
        ("HERALD_QUEUE_PREFIX", prefix.to_owned()),
        ("HERALD_BIND", "127.0.0.1:0".to_owned()),
        ("HERALD_EMAIL_DIR", sink_dir.join("mail").display().to_string()),
        ("HERALD_PUSH_FILE", sink_dir.join("push.jsonl").display().to_string()),
        ("HERALD_RETRY_MIN_MS", "100".to_owned()),
        ("HERALD_RETRY_MAX_SECS", "2".to_owned()),
        ("HERALD_LEASE_SECS", "5".to_owned()),
        ("HERALD_SWEEP_INTERVAL_SECS", "1".to_owned()),
        ("HERALD_WORKER_CONCURRENCY", "16".to_owned()),
        ("HERALD_DB_MAX_CONNECTIONS", "8".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The API and (optionally) the workers, running in this process against a
/// fresh database and Redis prefix.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base_url: String,
    pub settings: Settings,
    pub env: HashMap<String, String>,
    pub db: TestDb,
    pub prefix: String,
    /// A key with every scope.
    pub api_key: String,
    pub sink: tempfile::TempDir,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Which parts a test runs, and on which servers.
#[derive(Debug, Clone, Default)]
pub struct Parts {
    /// Run the three channel workers (and the sweeper) in-process.
    pub workers: bool,
    /// A Postgres server URL other than the shared one.
    pub pg_server: Option<String>,
}

impl Parts {
    #[must_use]
    pub fn api_only() -> Self {
        Self::default()
    }

    #[must_use]
    pub fn all() -> Self {
        Self {
            workers: true,
            ..Self::default()
        }
    }
}

impl TestApp {
    /// API and all workers.
    pub async fn spawn() -> Self {
        Self::spawn_with(Parts::all(), |_| {}).await
    }

    pub async fn spawn_with(parts: Parts, tweak: impl FnOnce(&mut HashMap<String, String>)) -> Self {
        herald_telemetry::init(herald_config::LogFormat::Pretty);
        let db = match &parts.pg_server {
            Some(server) => TestDb::new_on(server).await,
            None => TestDb::new().await,
        };
        let prefix = unique_prefix();
        let sink = tempfile::tempdir().expect("temp dir");
        let mut env = test_env(&db.url, &prefix, sink.path());
        tweak(&mut env);
        let settings = Settings::from_map(&env).expect("test settings are valid");
        let state = herald_api::AppState::new(settings.clone()).expect("app state");
        let listener = herald_api::bind(([127, 0, 0, 1], 0).into()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let api_shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = herald_api::serve(state, listener, async move { api_shutdown.cancelled().await }).await {
                tracing::error!(error = %e, "test API ended");
            }
        }));
        if parts.workers {
            let (s, t) = (settings.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = herald_workers::run(s, &[Channel::Email, Channel::Push, Channel::InApp], t).await {
                    tracing::error!(error = %format!("{e:#}"), "test workers ended");
                }
            }));
        }
        let scopes: Vec<String> = ["send", "read", "admin"].iter().map(|s| (*s).to_owned()).collect();
        let (_, api_key) = herald_db::api_keys::create_api_key(&db.pool, "test", &scopes)
            .await
            .expect("create api key");
        Self {
            addr,
            base_url: format!("http://{addr}"),
            settings,
            env,
            db,
            prefix,
            api_key,
            sink,
            http: reqwest::Client::new(),
            shutdown,
            tasks,
        }
    }

    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A request with the all-scopes key.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(&self.api_key)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let res = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("POST");
        status_and_json(res).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let res = self
            .request(reqwest::Method::PUT, path)
            .json(body)
            .send()
            .await
            .expect("PUT");
        status_and_json(res).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let res = self.request(reqwest::Method::GET, path).send().await.expect("GET");
        status_and_json(res).await
    }

    /// Creates a user with an email address and one device of each platform.
    pub async fn create_reachable_user(&self, user_id: &str) -> Value {
        let (s, _) = self
            .put_json(
                &format!("/v1/users/{user_id}"),
                &serde_json::json!({"email": format!("{user_id}@example.com"), "locale": "en", "timezone": "UTC"}),
            )
            .await;
        assert!(s == 201 || s == 200, "PUT user answered {s}");
        let token = format!("tok-{user_id}-{}", random_suffix());
        let (s, device) = self
            .post_json(
                &format!("/v1/users/{user_id}/devices"),
                &serde_json::json!({"platform": "ios", "provider": "apns", "token": token}),
            )
            .await;
        assert_eq!(s, 201, "{device}");
        device
    }

    /// Polls a notification until every delivery is final, returning the
    /// last status document and every status seen per delivery, in order.
    pub async fn wait_final(&self, ntf_id: &str, timeout: Duration) -> (Value, HashMap<String, Vec<String>>) {
        let deadline = Instant::now() + timeout;
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        loop {
            let (status, doc) = self.get_json(&format!("/v1/notifications/{ntf_id}")).await;
            assert_eq!(status, 200, "{doc}");
            let deliveries = doc["deliveries"].as_array().cloned().unwrap_or_default();
            for d in &deliveries {
                let id = d["id"].as_str().unwrap_or_default().to_owned();
                let st = d["status"].as_str().unwrap_or_default().to_owned();
                let list = seen.entry(id).or_default();
                if list.last() != Some(&st) {
                    list.push(st);
                }
            }
            let all_final = deliveries.iter().all(|d| {
                d["status"]
                    .as_str()
                    .and_then(|s| s.parse::<herald_core::DeliveryStatus>().ok())
                    .is_some_and(herald_core::DeliveryStatus::is_final)
            });
            if all_final {
                return (doc, seen);
            }
            assert!(
                Instant::now() < deadline,
                "deliveries not final after {timeout:?}: {doc}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls a replay until it ends (completed, cancelled or failed) and
    /// returns its last progress document.
    pub async fn wait_replay(&self, replay_id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, doc) = self.get_json(&format!("/v1/admin/replays/{replay_id}")).await;
            assert_eq!(status, 200, "{doc}");
            if !matches!(doc["status"].as_str(), Some("pending" | "running")) {
                return doc;
            }
            assert!(
                Instant::now() < deadline,
                "replay not finished after {timeout:?}: {doc}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A key with only these scopes.
    pub async fn key_with_scopes(&self, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
        herald_db::api_keys::create_api_key(self.pool(), "scoped", &scopes)
            .await
            .expect("create api key")
            .1
    }

    /// Waits until a SQL count reaches `expected`.
    pub async fn wait_count(&self, sql: &str, expected: i64, timeout: Duration) -> i64 {
        let deadline = Instant::now() + timeout;
        loop {
            let n: i64 = sqlx::query_scalar(sql)
                .fetch_one(self.pool())
                .await
                .expect("count query");
            if n == expected || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[must_use]
    pub fn mail_dir(&self) -> PathBuf {
        self.sink.path().join("mail")
    }

    #[must_use]
    pub fn push_file(&self) -> PathBuf {
        self.sink.path().join("push.jsonl")
    }

    /// Another API process (in-process, on its own port) on the same
    /// database and Redis prefix: a replica behind the same load balancer.
    pub async fn spawn_api_replica(&self) -> ApiReplica {
        let state = herald_api::AppState::new(self.settings.clone()).expect("app state");
        let listener = herald_api::bind(([127, 0, 0, 1], 0).into()).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = herald_api::serve(state, listener, async move { stop.cancelled().await }).await {
                tracing::error!(error = %e, "test API replica ended");
            }
        });
        ApiReplica {
            base_url: format!("http://{addr}"),
            shutdown,
            task,
        }
    }

    /// Stops everything, then removes the test's database and Redis keys.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        if let Ok(q) = herald_queue::QueueClient::new(herald_queue::QueueConfig::from_settings(&self.settings)) {
            let _ = q.delete_all_keys().await;
        }
        self.db.drop_db().await;
    }
}

/// A second API process of a [`TestApp`].
pub struct ApiReplica {
    pub base_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ApiReplica {
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }
}

pub async fn status_and_json(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}
