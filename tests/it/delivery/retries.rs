//! Retries and dead letters against providers that misbehave on purpose:
//! an SMTP server that is not ours (aiosmtpd, scripted per recipient) and a
//! stand-in speaking FCM's documented contract. Each test checks the
//! attempt history in Postgres against what the provider saw, and prints
//! its figures.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_testkit::push_providers::{FcmStandIn, Reply, push_env};
use herald_testkit::smtp::{SmtpSink, SmtpSinkOptions, address};
use herald_testkit::{Parts, TestApp};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Retries fast enough for a test: 200 ms, then ×3 (with jitter), at most 2 s.
fn quick_retries(env: &mut HashMap<String, String>) {
    env.insert("HERALD_RETRY_MIN_MS".into(), "200".into());
    env.insert("HERALD_RETRY_MAX_SECS".into(), "2".into());
}

async fn app_with_smtp(sink: &SmtpSink, tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
    let smtp_env = sink.env();
    TestApp::spawn_with(Parts::all(), |env| {
        quick_retries(env);
        env.extend(smtp_env);
        tweak(env);
    })
    .await
}

/// Posts one email notification to a new user whose address scripts the
/// server; returns the delivery id.
async fn email_to(app: &TestApp, user: &str, email: &str) -> (String, String) {
    let (s, _) = app
        .put_json(&format!("/v1/users/{user}"), &json!({"email": email}))
        .await;
    assert_eq!(s, 201);
    let (s, b) = app
        .post_json(
            "/v1/notifications",
            &json!({"user_id": user, "channels": ["email"], "title": "Hi", "body": "x"}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    (
        b["id"].as_str().unwrap().to_owned(),
        b["deliveries"][0]["id"].as_str().unwrap().to_owned(),
    )
}

#[derive(Debug, sqlx::FromRow)]
struct Attempt {
    attempt: i32,
    started_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    outcome: Option<String>,
    provider_status: Option<i32>,
    error: Option<String>,
    worker_id: String,
}

async fn attempts(app: &TestApp, delivery: &str) -> Vec<Attempt> {
    sqlx::query_as(
        "SELECT attempt, started_at, finished_at, outcome, provider_status, error, worker_id
         FROM delivery_attempts WHERE delivery_id = $1 ORDER BY attempt",
    )
    .bind(delivery)
    .fetch_all(app.pool())
    .await
    .unwrap()
}

async fn status(app: &TestApp, delivery: &str) -> (String, i32, Option<String>) {
    sqlx::query_as("SELECT status, attempt, last_error_class FROM deliveries WHERE id = $1")
        .bind(delivery)
        .fetch_one(app.pool())
        .await
        .unwrap()
}

/// Gaps between one attempt's end and the next one's start.
fn gaps(history: &[Attempt]) -> Vec<Duration> {
    history
        .windows(2)
        .map(|w| {
            (w[1].started_at - w[0].finished_at.unwrap_or(w[0].started_at))
                .to_std()
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_failing_transiently_for_a_while_is_retried_on_the_schedule_until_sent() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let app = app_with_smtp(&sink, |_| {}).await;
    let mut deliveries = Vec::new();
    for i in 0..5 {
        let (ntf, dlv) = email_to(&app, &format!("u_t{i}"), &address::tempfail(3, &format!("t{i}"))).await;
        deliveries.push((ntf, dlv));
    }
    for (ntf, _) in &deliveries {
        app.wait_final(ntf, WAIT).await;
    }
    for (_, dlv) in &deliveries {
        assert_eq!(status(&app, dlv).await.0, "sent");
        let history = attempts(&app, dlv).await;
        let outcomes: Vec<&str> = history.iter().map(|a| a.outcome.as_deref().unwrap_or("?")).collect();
        assert_eq!(outcomes, ["transient", "transient", "transient", "sent"], "{history:?}");
        assert_eq!(history.iter().map(|a| a.attempt).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(history[..3].iter().all(|a| a.provider_status == Some(451)));
        assert!(history.iter().all(|a| a.worker_id.starts_with("email-worker")));
        // The schedule: at least 200 ms, 600 ms, 1.8 s (×3 each time).
        let g = gaps(&history);
        println!("transient ×3 then sent: gaps between attempts {g:?}");
        for (k, gap) in g.iter().enumerate() {
            let floor = Duration::from_millis(200 * 3u64.pow(u32::try_from(k).unwrap())).min(Duration::from_secs(2));
            assert!(
                *gap + Duration::from_millis(50) >= floor,
                "gap {k} was {gap:?}, scheduled at least {floor:?}"
            );
        }
        // Exactly one copy reached the server.
        let received = sink
            .messages()
            .iter()
            .filter(|m| m.delivery_id() == Some(dlv.as_str()))
            .count();
        assert_eq!(received, 1);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_rejection_is_attempted_once_and_fails() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let app = app_with_smtp(&sink, |_| {}).await;
    let (ntf, dlv) = email_to(&app, "u_r", &address::reject("r")).await;
    let (doc, _) = app.wait_final(&ntf, WAIT).await;
    assert_eq!(doc["deliveries"][0]["status"], "failed", "{doc}");
    assert_eq!(doc["deliveries"][0]["last_error_class"], "permanent");
    let history = attempts(&app, &dlv).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].outcome.as_deref(), Some("permanent"));
    assert_eq!(history[0].provider_status, Some(550));
    assert!(
        history[0].error.as_deref().unwrap_or_default().contains("550"),
        "{history:?}"
    );
    // Shown to the caller with its attempt.
    assert_eq!(doc["deliveries"][0]["attempt_history"][0]["provider_status"], 550);
    // The operator's view: a failed delivery with its last error.
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'failed' AND last_error IS NOT NULL")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(failed, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_always_fails_transiently_leaves_a_dead_letter_after_the_configured_attempts() {
    let sink = SmtpSink::start(SmtpSinkOptions::plain());
    let app = app_with_smtp(&sink, |env| {
        env.insert("HERALD_EMAIL_MAX_ATTEMPTS".into(), "4".into());
    })
    .await;
    let (ntf, dlv) = email_to(&app, "u_d", &address::tempfail_always("d")).await;
    let (doc, _) = app.wait_final(&ntf, WAIT).await;
    assert_eq!(doc["deliveries"][0]["status"], "dead", "{doc}");
    assert_eq!(doc["deliveries"][0]["attempts"], 4);
    let history = attempts(&app, &dlv).await;
    assert_eq!(history.len(), 4);
    assert!(
        history
            .iter()
            .all(|a| a.outcome.as_deref() == Some("transient") && a.provider_status == Some(451))
    );
    assert!(history.iter().all(|a| a.finished_at.is_some()));
    println!("dead after 4 attempts; gaps {:?}", gaps(&history));
    assert_eq!(
        status(&app, &dlv).await,
        ("dead".to_owned(), 4, Some("transient".to_owned()))
    );
    // Nothing left in Redis for it: no job waits, none is in flight.
    let queue = herald_queue::QueueClient::new(herald_queue::QueueConfig::from_settings(&app.settings)).unwrap();
    for q in herald_queue::QueueName::for_channel(herald_core::Channel::Email) {
        let c = queue.counts(q).await.unwrap();
        assert_eq!((c.ready, c.scheduled, c.in_flight), (0, 0, 0), "{q}: {c:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_push_is_not_retried_before_retry_after() {
    let fcm = FcmStandIn::start().await;
    fcm.fail_next(3, Reply::fcm_quota_exceeded(Some(2)));
    let push = push_env(&[fcm.env()]);
    let app = TestApp::spawn_with(Parts::all(), |env| {
        quick_retries(env);
        env.extend(push);
    })
    .await;
    app.put_json("/v1/users/u_rl", &json!({})).await;
    let (s, _) = app
        .post_json(
            "/v1/users/u_rl/devices",
            &json!({"platform": "android", "provider": "fcm", "token": "tok-rl-1"}),
        )
        .await;
    assert_eq!(s, 201);
    let (s, b) = app
        .post_json(
            "/v1/notifications",
            &json!({"user_id": "u_rl", "channels": ["push"], "title": "Hi"}),
        )
        .await;
    assert_eq!(s, 202);
    let ntf = b["id"].as_str().unwrap();
    let dlv = b["deliveries"][0]["id"].as_str().unwrap().to_owned();
    let (doc, _) = app.wait_final(ntf, WAIT).await;
    assert_eq!(doc["deliveries"][0]["status"], "sent", "{doc}");
    let history = attempts(&app, &dlv).await;
    let outcomes: Vec<&str> = history.iter().map(|a| a.outcome.as_deref().unwrap_or("?")).collect();
    assert_eq!(
        outcomes,
        ["rate_limited", "rate_limited", "rate_limited", "sent"],
        "{history:?}"
    );
    assert!(history[..3].iter().all(|a| a.provider_status == Some(429)));
    // What FCM saw: four sends carrying the delivery id, each at least
    // Retry-After (2 s) after the 429 before it. The retry schedule alone
    // would have waited 200 ms, then 600 ms.
    let sends: Vec<_> = fcm
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("messages:send"))
        .collect();
    assert_eq!(sends.len(), 4);
    assert!(sends.iter().all(|r| String::from_utf8_lossy(&r.body).contains(&dlv)));
    let g: Vec<Duration> = sends.windows(2).map(|w| w[1].received_at - w[0].received_at).collect();
    println!("429 with Retry-After: 2 → gaps between sends at the provider {g:?}");
    assert!(
        g.iter().all(|gap| *gap >= Duration::from_secs(2)),
        "retried sooner than Retry-After: {g:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_provider_calls_unregistered_disables_the_device_until_it_registers_again() {
    let fcm = FcmStandIn::start().await;
    fcm.fail_token("tok-gone", Reply::fcm_unregistered());
    let push = push_env(&[fcm.env()]);
    let app = TestApp::spawn_with(Parts::all(), |env| {
        quick_retries(env);
        env.extend(push);
    })
    .await;
    app.put_json("/v1/users/u_gone", &json!({})).await;
    let register = json!({"platform": "android", "provider": "fcm", "token": "tok-gone"});
    let (_, gone) = app.post_json("/v1/users/u_gone/devices", &register).await;
    let (_, alive) = app
        .post_json(
            "/v1/users/u_gone/devices",
            &json!({"platform": "android", "provider": "fcm", "token": "tok-alive"}),
        )
        .await;
    let post = json!({"user_id": "u_gone", "channels": ["push"], "title": "Hi"});
    let (_, b) = app.post_json("/v1/notifications", &post).await;
    let (doc, _) = app.wait_final(b["id"].as_str().unwrap(), WAIT).await;
    // One device took it: the delivery is sent, with per-device results.
    let d = &doc["deliveries"][0];
    assert_eq!(d["status"], "sent", "{doc}");
    let detail: serde_json::Value = sqlx::query_scalar("SELECT detail FROM delivery_attempts WHERE delivery_id = $1")
        .bind(d["id"].as_str().unwrap())
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(
        (detail["devices"].as_i64(), detail["succeeded"].as_i64()),
        (Some(2), Some(1)),
        "{detail}"
    );
    // The gone one is disabled, with when and why.
    let (_, user) = app.get_json("/v1/users/u_gone").await;
    let device = |id: &serde_json::Value| {
        user["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == *id)
            .cloned()
            .unwrap()
    };
    let g = device(&gone["id"]);
    assert!(g["disabled_at"].is_string(), "{user}");
    assert!(
        g["disabled_reason"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
            .contains("unregistered"),
        "{g}"
    );
    assert!(device(&alive["id"])["disabled_at"].is_null());
    // It is never sent to again...
    let sends_before = fcm
        .requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("tok-gone"))
        .count();
    let (_, b) = app.post_json("/v1/notifications", &post).await;
    app.wait_final(b["id"].as_str().unwrap(), WAIT).await;
    let sends_after = fcm
        .requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("tok-gone"))
        .count();
    assert_eq!(sends_before, sends_after);
    // ...until the app registers it again.
    let (s, again) = app.post_json("/v1/users/u_gone/devices", &register).await;
    assert_eq!(s, 200);
    assert!(again["disabled_at"].is_null(), "{again}");
    app.stop().await;
}
