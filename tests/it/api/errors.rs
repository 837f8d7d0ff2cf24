//! Every invalid request gets a 4xx in the one error shape, with a stable
//! code and a message that says what to fix. Never a 500.

use herald_testkit::{Parts, TestApp, status_and_json};
use reqwest::Method;
use serde_json::{Value, json};

async fn app() -> TestApp {
    TestApp::spawn_with(Parts::api_only(), |env| {
        env.insert("HERALD_MAX_BODY_BYTES".into(), "4096".into());
        // Short, so the revocation test waits little for the key cache.
        env.insert("HERALD_API_KEY_CACHE_SECS".into(), "1".into());
    })
    .await
}

/// Asserts the error shape, the status and the code; returns the message.
fn expect_error(status: u16, body: &Value, want_status: u16, want_code: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    let err = &body["error"];
    assert_eq!(err["code"], want_code, "{body}");
    let message = err["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{body}");
    message
}

async fn post_raw(app: &TestApp, body: &str, content_type: Option<&str>) -> (u16, Value) {
    let mut req = app.request(Method::POST, "/v1/notifications").body(body.to_owned());
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    status_and_json(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_notification_requests_get_a_clear_4xx() {
    let app = app().await;
    let json_ct = Some("application/json");

    let (s, b) = post_raw(&app, "{\"user_id\": \"u_1\", ", json_ct).await;
    let m = expect_error(s, &b, 400, "malformed_json");
    assert!(m.contains("line 1"), "{m}");

    // Not JSON at all is 400 even where a field before the syntax error
    // already has the wrong type (the parse that names fields would stop
    // there and call it a wrong shape).
    let (s, b) = post_raw(&app, "{\"user_id\": 42, \"title\": ", json_ct).await;
    let m = expect_error(s, &b, 400, "malformed_json");
    assert!(m.contains("EOF while parsing"), "{m}");
    let (s, b) = post_raw(&app, r#"{"user_id": "u_1", "title": "x"} {}"#, json_ct).await;
    let m = expect_error(s, &b, 400, "malformed_json");
    assert!(m.contains("trailing characters"), "{m}");

    let (s, b) = post_raw(&app, r#"{"user_id": 42, "title": "x"}"#, json_ct).await;
    let m = expect_error(s, &b, 422, "invalid_body");
    assert!(m.contains("user_id") && m.contains("expected a string"), "{m}");
    let (s, b) = post_raw(
        &app,
        r#"{"user_id": "u_1", "title": "x", "channels": ["email", 7]}"#,
        json_ct,
    )
    .await;
    let m = expect_error(s, &b, 422, "invalid_body");
    assert!(m.contains("channels[1]"), "{m}");

    let (s, b) = post_raw(&app, r#"{"user_id": "u_1", "title": "x", "colour": "red"}"#, json_ct).await;
    let m = expect_error(s, &b, 422, "invalid_body");
    assert!(m.contains("unknown field `colour`"), "{m}");

    let (s, b) = post_raw(&app, r#"{"title": "x"}"#, json_ct).await;
    let m = expect_error(s, &b, 422, "invalid_body");
    assert!(m.contains("missing field `user_id`"), "{m}");

    let (s, b) = post_raw(&app, r#"{"user_id": "u_1", "title": "x"}"#, Some("text/plain")).await;
    expect_error(s, &b, 415, "unsupported_media_type");
    let (s, b) = post_raw(&app, r#"{"user_id": "u_1", "title": "x"}"#, None).await;
    expect_error(s, &b, 415, "unsupported_media_type");

    let cases: &[(Value, &str, &str)] = &[
        (
            json!({"user_id": "u_1", "title": "", "body": ""}),
            "title",
            "must not be empty",
        ),
        (json!({"user_id": "u_1", "title": "   "}), "title", "must not be empty"),
        (
            json!({"user_id": "u_1", "title": "x", "channels": ["sms"]}),
            "channels[0]",
            "expected one of email, push, in_app",
        ),
        (
            json!({"user_id": "u_1", "title": "x", "channels": []}),
            "channels",
            "must not be empty",
        ),
        (
            json!({"user_id": "u_1", "title": "x", "channels": ["email", "email"]}),
            "channels[1]",
            "listed twice",
        ),
        (
            json!({"user_id": "u_1", "title": "x", "priority": "urgent"}),
            "priority",
            "expected one of high, normal, low",
        ),
        (json!({"user_id": "", "title": "x"}), "user_id", "must not be empty"),
        (json!({"user_id": "u 1", "title": "x"}), "user_id", "may contain only"),
        (
            json!({"user_id": "u_1", "title": "x", "category": "Big Sale"}),
            "category",
            "a-z",
        ),
        (
            json!({"user_id": "u_1", "title": "x", "data": [1, 2]}),
            "data",
            "JSON object",
        ),
        (
            json!({"user_id": "u_1", "title": "a\u{7}b"}),
            "title",
            "control characters",
        ),
        (
            json!({"user_id": "u_1", "title": "x".repeat(300)}),
            "title",
            "at most 256",
        ),
    ];
    for (body, field, hint) in cases {
        let (s, b) = app.post_json("/v1/notifications", body).await;
        let m = expect_error(s, &b, 422, "validation_failed");
        assert_eq!(b["error"]["details"]["field"], *field, "{body} -> {b}");
        assert!(m.contains(hint), "{body} -> {m}");
    }

    let big = json!({"user_id": "u_1", "title": "x", "body": "y".repeat(5000)});
    let (s, b) = app.post_json("/v1/notifications", &big).await;
    expect_error(s, &b, 413, "body_too_large");

    // Nothing invalid was stored.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_valid_key_or_scope_are_refused() {
    let app = app().await;
    let body = json!({"user_id": "u_1", "title": "x"});

    let res = app
        .http
        .post(app.url("/v1/notifications"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (s, b) = status_and_json(res).await;
    let m = expect_error(s, &b, 401, "missing_api_key");
    assert!(m.contains("Authorization: Bearer"), "{m}");

    for bad in [
        "hk_nope",
        "hk_abcdefgh_0123456789abcdef0123456789abcdef",
        &format!("{}x", app.api_key),
    ] {
        let res = app
            .http
            .post(app.url("/v1/notifications"))
            .bearer_auth(bad)
            .json(&body)
            .send()
            .await
            .unwrap();
        let (s, b) = status_and_json(res).await;
        expect_error(s, &b, 401, "invalid_api_key");
    }

    let read_only = vec!["read".to_owned()];
    let (_, token) = herald_db::api_keys::create_api_key(app.pool(), "ro", &read_only)
        .await
        .unwrap();
    let res = app
        .http
        .post(app.url("/v1/notifications"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (s, b) = status_and_json(res).await;
    let m = expect_error(s, &b, 403, "insufficient_scope");
    assert!(m.contains("send"), "{m}");
    // The body is judged first when it is not JSON at all, after the scope
    // when it is JSON of the wrong shape.
    for (raw, status, code) in [
        ("{\"user_id\": ", 400, "malformed_json"),
        (r#"{"user_id": 42}"#, 403, "insufficient_scope"),
    ] {
        let res = app
            .http
            .post(app.url("/v1/notifications"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let (s, b) = status_and_json(res).await;
        expect_error(s, &b, status, code);
    }

    // A revoked key stops working.
    let send = vec!["send".to_owned()];
    let (key, token) = herald_db::api_keys::create_api_key(app.pool(), "s", &send)
        .await
        .unwrap();
    let ok = app
        .http
        .post(app.url("/v1/notifications"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    herald_db::api_keys::revoke_api_key(app.pool(), &key.id).await.unwrap();
    // The API trusts a key it authenticated for HERALD_API_KEY_CACHE_SECS:
    // the revoked key must be refused once that has passed, and never later.
    let revoked_at = std::time::Instant::now();
    let ttl = app.settings.api_key_cache;
    loop {
        let res = app
            .http
            .post(app.url("/v1/notifications"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        if res.status() == 401 {
            let (s, b) = status_and_json(res).await;
            expect_error(s, &b, 401, "invalid_api_key");
            break;
        }
        assert_eq!(res.status(), 202);
        assert!(
            revoked_at.elapsed() <= ttl + std::time::Duration::from_millis(500),
            "a revoked key still worked {:?} after revocation (cache TTL {ttl:?})",
            revoked_at.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // X-Api-Key works as well as the bearer form.
    let res = app
        .http
        .get(app.url("/v1/users/u_none"))
        .header("x-api-key", &app.api_key)
        .send()
        .await
        .unwrap();
    let (s, b) = status_and_json(res).await;
    expect_error(s, &b, 404, "not_found");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_routes_and_user_input_get_a_clear_4xx() {
    let app = app().await;
    let (s, b) = app.get_json("/v1/notifications/12345").await;
    let m = expect_error(s, &b, 400, "invalid_id");
    assert!(m.contains("ntf_"), "{m}");
    let (s, b) = app.get_json("/v1/notifications/ntf_01JD0000000000000000000000").await;
    expect_error(s, &b, 404, "not_found");
    let (s, b) = app.get_json("/v1/nothing-here").await;
    expect_error(s, &b, 404, "route_not_found");
    let res = app.request(Method::PATCH, "/v1/notifications").send().await.unwrap();
    let (s, b) = status_and_json(res).await;
    expect_error(s, &b, 405, "method_not_allowed");

    // Every JSON route judges a body the same way: not JSON at all is 400
    // (even after a wrong-typed field), a wrong shape 422 naming the field,
    // no JSON content type 415.
    for (raw, content_type, status, code, hint) in [
        (
            "{\"email\": 7, ",
            "application/json",
            400,
            "malformed_json",
            "EOF while parsing",
        ),
        (
            r#"{"email": 7}"#,
            "application/json",
            422,
            "invalid_body",
            "email: invalid type",
        ),
        (
            r#"{"email": "a@b.co"}"#,
            "text/plain",
            415,
            "unsupported_media_type",
            "Content-Type",
        ),
    ] {
        let res = app
            .request(Method::PUT, "/v1/users/u_1")
            .header("content-type", content_type)
            .body(raw)
            .send()
            .await
            .unwrap();
        let (s, b) = status_and_json(res).await;
        let m = expect_error(s, &b, status, code);
        assert!(m.contains(hint), "{raw} -> {m}");
    }

    let (s, b) = app.put_json("/v1/users/u_1", &json!({"email": "not-an-address"})).await;
    let m = expect_error(s, &b, 422, "validation_failed");
    assert!(m.contains("email"), "{m}");
    let (s, b) = app
        .put_json("/v1/users/u_1", &json!({"email": "a@b.co\r\nBcc: x@y.z"}))
        .await;
    expect_error(s, &b, 422, "validation_failed");
    let (s, b) = app
        .put_json("/v1/users/u_1", &json!({"locale": "english please"}))
        .await;
    expect_error(s, &b, 422, "validation_failed");
    let (s, b) = app
        .put_json("/v1/users/u_1", &json!({"timezone": "../etc/passwd"}))
        .await;
    expect_error(s, &b, 422, "validation_failed");

    let (s, b) = app
        .post_json(
            "/v1/users/u_missing/devices",
            &json!({"platform": "ios", "provider": "apns", "token": "t"}),
        )
        .await;
    let m = expect_error(s, &b, 404, "not_found");
    assert!(m.contains("PUT /v1/users/u_missing"), "{m}");
    app.put_json("/v1/users/u_1", &json!({})).await;
    let bad_devices: &[(Value, &str)] = &[
        (
            json!({"platform": "fridge", "provider": "apns", "token": "t"}),
            "platform",
        ),
        (
            json!({"platform": "android", "provider": "apns", "token": "t"}),
            "provider",
        ),
        (json!({"platform": "ios", "provider": "apns", "token": ""}), "token"),
        (json!({"platform": "ios", "provider": "apns", "token": "a b"}), "token"),
    ];
    for (body, field) in bad_devices {
        let (s, b) = app.post_json("/v1/users/u_1/devices", body).await;
        expect_error(s, &b, 422, "validation_failed");
        assert_eq!(b["error"]["details"]["field"], *field, "{b}");
    }
    let res = app
        .request(Method::DELETE, "/v1/users/u_1/devices/not-a-device")
        .send()
        .await
        .unwrap();
    let (s, b) = status_and_json(res).await;
    expect_error(s, &b, 400, "invalid_id");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_report_their_dependencies() {
    let app = app().await;
    let (s, b) = app.get_json("/healthz").await;
    assert_eq!((s, b["status"].as_str()), (200, Some("ok")));
    let (s, b) = app.get_json("/readyz").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["postgres"], "ok");
    assert_eq!(b["redis"], "ok");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_503_not_500_when_postgres_is_unreachable() {
    // A pool pointed at a port nothing listens on behaves like a Postgres
    // that is down; Redis down must not matter for accepting.
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let mut env = app.env.clone();
    env.insert("DATABASE_URL".into(), "postgres://postgres@127.0.0.1:1/none".into());
    env.insert("REDIS_URL".into(), "redis://127.0.0.1:1".into());
    let settings = herald_config::Settings::from_map(&env).unwrap();
    let state = herald_api::AppState::new(settings).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(herald_api::serve(state, listener, std::future::pending()));
    let res = app
        .http
        .post(format!("http://{addr}/v1/notifications"))
        .bearer_auth(&app.api_key)
        .json(&json!({"user_id": "u_1", "title": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    let (s, b) = status_and_json(res).await;
    expect_error(s, &b, 503, "database_unavailable");
    let res = app.http.get(format!("http://{addr}/readyz")).send().await.unwrap();
    let (s, b) = status_and_json(res).await;
    assert_eq!(s, 503, "{b}");
    assert_ne!(b["redis"], "ok");
    // A live stream fixes its starting point before it answers: without
    // Postgres that is a 503 too, not a 200 that ends at once.
    let (s, t) = app.post_json("/v1/users/u_1/tokens", &json!({})).await;
    assert_eq!(s, 201, "{t}");
    let res = app
        .http
        .get(format!("http://{addr}/v1/me/stream"))
        .bearer_auth(t["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let (s, b) = status_and_json(res).await;
    expect_error(s, &b, 503, "database_unavailable");
    server.abort();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route() {
    let app = app().await;
    let (s, doc) = app.get_json("/openapi.json").await;
    assert_eq!(s, 200);
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    // Every route the API serves, by method and path. Adding a route means
    // adding it here and to the router (with `routes!`, which documents it).
    let expected = [
        ("post", "/v1/notifications"),
        ("get", "/v1/notifications/{id}"),
        ("put", "/v1/users/{user_id}"),
        ("get", "/v1/users/{user_id}"),
        ("post", "/v1/users/{user_id}/devices"),
        ("delete", "/v1/users/{user_id}/devices/{device_id}"),
        ("post", "/v1/users/{user_id}/tokens"),
        ("get", "/v1/me/notifications"),
        ("get", "/v1/me/notifications/{id}"),
        ("post", "/v1/me/notifications/{id}/read"),
        ("post", "/v1/me/notifications/{id}/unread"),
        ("post", "/v1/me/notifications/{id}/archive"),
        ("post", "/v1/me/notifications/read-all"),
        ("get", "/v1/me/stats"),
        ("post", "/v1/me/devices"),
        ("delete", "/v1/me/devices/{device_id}"),
        ("get", "/v1/me/changes"),
        ("get", "/v1/me/stream"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/v1/admin/queues"),
        ("get", "/v1/admin/deliveries"),
        ("get", "/v1/admin/deliveries/{id}"),
        ("post", "/v1/admin/replays"),
        ("get", "/v1/admin/replays"),
        ("get", "/v1/admin/replays/{id}"),
        ("post", "/v1/admin/replays/{id}/cancel"),
        ("post", "/v1/admin/purges"),
    ];
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = Vec::new();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    for (method, path) in expected {
        assert!(
            documented.iter().any(|(m, p)| m == method && p == path),
            "{method} {path} is missing from /openapi.json"
        );
    }
    // And everything documented is really served (not a 404/405 from the router).
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "ntf_01JD0000000000000000000000")
            .replace("{user_id}", "u_1")
            .replace("{device_id}", "dev_01JD0000000000000000000000");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let res = app.request(m, &concrete).json(&json!({})).send().await.unwrap();
        let (_, b) = status_and_json(res).await;
        let code = b["error"]["code"].as_str().unwrap_or("");
        assert!(
            code != "route_not_found" && code != "method_not_allowed",
            "{method} {path}: {b}"
        );
    }
    assert_eq!(
        documented.len(),
        expected.len(),
        "undocumented expectations: {documented:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_key_cache_a_revoked_key_is_refused_at_once() {
    let app = TestApp::spawn_with(Parts::api_only(), |env| {
        env.insert("HERALD_API_KEY_CACHE_SECS".into(), "0".into());
    })
    .await;
    let body = json!({"user_id": "u_1", "title": "Hi", "channels": ["in_app"]});
    let send = vec!["send".to_owned()];
    let (key, token) = herald_db::api_keys::create_api_key(app.pool(), "s", &send)
        .await
        .unwrap();
    let post = || {
        app.http
            .post(app.url("/v1/notifications"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    assert_eq!(post().await.unwrap().status(), 202);
    herald_db::api_keys::revoke_api_key(app.pool(), &key.id).await.unwrap();
    let (s, b) = status_and_json(post().await.unwrap()).await;
    expect_error(s, &b, 401, "invalid_api_key");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_while_a_notification_commits_is_a_503_that_says_it_may_be_stored() {
    let app = app().await;
    // Hold the notifications table, so the API's accept statement (which
    // commits as it ends) waits in flight; then cut its connection, as a
    // Postgres crash would at the moment of its commit.
    let mut lock = app.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE notifications IN EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let body = json!({"user_id": "u_doubt", "channels": ["in_app"], "title": "x"});
    let post = tokio::spawn(app.request(Method::POST, "/v1/notifications").json(&body).send());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let pid: i32 = loop {
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ILIKE '%INSERT INTO notifications%'",
        )
        .fetch_optional(app.pool())
        .await
        .unwrap();
        if let Some(pid) = waiting {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the accept statement never waited on the lock"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(app.pool())
        .await
        .unwrap();
    let res = post.await.unwrap().unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    let (s, b) = status_and_json(res).await;
    let message = expect_error(s, &b, 503, "database_unavailable");
    assert_eq!(b["error"]["details"]["stored"], "unknown", "{b}");
    assert!(
        message.contains("may have been stored") && message.contains("Idempotency-Key"),
        "{message}"
    );
    lock.rollback().await.unwrap();
    // This one never reached its commit; the API takes requests again on a
    // fresh connection.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = 'u_doubt'")
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(stored, 0);
    let (s, b) = app.post_json("/v1/notifications", &body).await;
    assert_eq!(s, 202, "{b}");
    app.stop().await;
}
