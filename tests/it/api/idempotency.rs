//! `Idempotency-Key`: a repeat returns the original response and creates
//! nothing; a different body under the same key is refused; concurrent
//! identical requests create exactly one notification.

use std::time::Instant;

use herald_testkit::{Parts, TestApp, status_and_json};
use serde_json::{Value, json};

async fn post(app: &TestApp, key: &str, body: &Value) -> (u16, Value, bool) {
    let res = app
        .request(reqwest::Method::POST, "/v1/notifications")
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    let replayed = res.headers().get("idempotent-replayed").is_some();
    let (s, b) = status_and_json(res).await;
    (s, b, replayed)
}

async fn count(app: &TestApp, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(app.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_returns_the_original_response_and_creates_nothing() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let body = json!({"user_id": "u_1", "channels": ["in_app"], "title": "Hi", "data": {"a": 1, "b": 2}});
    let (s1, first, replayed) = post(&app, "order-1234-shipped", &body).await;
    assert_eq!((s1, replayed), (202, false), "{first}");
    // Same content, keys in another order: the same request.
    let same = json!({"data": {"b": 2, "a": 1}, "title": "Hi", "channels": ["in_app"], "user_id": "u_1"});
    let (s2, second, replayed) = post(&app, "order-1234-shipped", &same).await;
    assert_eq!((s2, replayed), (202, true), "{second}");
    assert_eq!(first, second);
    assert_eq!(count(&app, "notifications").await, 1);
    assert_eq!(count(&app, "deliveries").await, 1);

    let (s, b, _) = post(&app, "order-1234-shipped", &json!({"user_id": "u_1", "title": "Other"})).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["error"]["code"], "idempotency_key_reused");
    // The key is per API key: another key may use the same value.
    let scopes = vec!["send".to_owned()];
    let (_, other) = herald_db::api_keys::create_api_key(app.pool(), "other", &scopes)
        .await
        .unwrap();
    let res = app
        .http
        .post(app.url("/v1/notifications"))
        .bearer_auth(&other)
        .header("idempotency-key", "order-1234-shipped")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    assert_eq!(count(&app, "notifications").await, 2);

    let (s, b, _) = post(&app, "has space", &body).await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "invalid_idempotency_key");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_identical_requests_create_exactly_one_notification() {
    let app = TestApp::spawn_with(Parts::api_only(), |env| {
        env.insert("HERALD_DB_MAX_CONNECTIONS".into(), "16".into());
    })
    .await;
    let body = json!({"user_id": "u_1", "channels": ["in_app"], "title": "Once"});
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (http, url, key, body) = (
            app.http.clone(),
            app.url("/v1/notifications"),
            app.api_key.clone(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Like a real client: a 503 (the API shedding load) is retried,
            // after Retry-After, with the same key; that is what the key is for.
            let mut retries = 0;
            loop {
                let res = http
                    .post(&url)
                    .bearer_auth(&key)
                    .header("idempotency-key", "the-one")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let (s, b) = status_and_json(res).await;
                if s == 503 && retries < 30 {
                    retries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
                return (s, b, retries);
            }
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut retried = 0;
    for t in tasks {
        let (s, b, retries) = t.await.unwrap();
        assert_eq!(s, 202, "{b}");
        retried += retries;
        ids.insert(b["id"].as_str().unwrap().to_owned());
    }
    println!(
        "1000 concurrent identical requests answered in {:?} ({retried} retries after a 503)",
        started.elapsed()
    );
    assert_eq!(ids.len(), 1, "every answer names the same notification");
    assert_eq!(count(&app, "notifications").await, 1);
    assert_eq!(count(&app, "deliveries").await, 1);
    app.stop().await;
}
