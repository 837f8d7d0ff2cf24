//! Mobile and web clients: user tokens, the inbox and status routes, read
//! state, cheap polling with ETags — each scoped to the signed-in user.

use std::time::Duration;

use herald_testkit::{TestApp, status_and_json};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn token_for(app: &TestApp, user: &str) -> String {
    let (s, b) = app.post_json(&format!("/v1/users/{user}/tokens"), &json!({})).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["token_type"], "Bearer");
    b["token"].as_str().unwrap().to_owned()
}

async fn as_user(
    app: &TestApp,
    token: &str,
    method: Method,
    path: &str,
    etag: Option<&str>,
) -> (u16, Value, Option<String>) {
    let mut req = app.http.request(method, app.url(path)).bearer_auth(token);
    if let Some(e) = etag {
        req = req.header("if-none-match", e);
    }
    let res = req.send().await.unwrap();
    let etag = res.headers().get("etag").map(|v| v.to_str().unwrap().to_owned());
    let (s, b) = status_and_json(res).await;
    (s, b, etag)
}

/// Sends `n` in-app notifications to `user` and waits until they are in the inbox.
async fn deliver_in_app(app: &TestApp, user: &str, titles: &[&str], category: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for title in titles {
        let (s, b) = app
            .post_json(
                "/v1/notifications",
                &json!({"user_id": user, "channels": ["in_app"], "title": title, "body": format!("{title} body"), "category": category}),
            )
            .await;
        assert_eq!(s, 202, "{b}");
        let id = b["id"].as_str().unwrap().to_owned();
        app.wait_final(&id, WAIT).await;
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reads_pages_filters_and_searches_their_inbox() {
    let app = TestApp::spawn().await;
    let token = token_for(&app, "u_ann").await;
    let ids = deliver_in_app(
        &app,
        "u_ann",
        &["Parcel shipped", "Invoice ready", "Parcel delivered"],
        "orders",
    )
    .await;
    deliver_in_app(&app, "u_ann", &["Weekly digest"], "digest").await;

    let (s, page, _) = as_user(&app, &token, Method::GET, "/v1/me/notifications?limit=2", None).await;
    assert_eq!(s, 200, "{page}");
    let titles = |p: &Value| {
        p["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["title"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(titles(&page), ["Weekly digest", "Parcel delivered"]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page2, _) = as_user(
        &app,
        &token,
        Method::GET,
        &format!("/v1/me/notifications?limit=2&cursor={cursor}"),
        None,
    )
    .await;
    assert_eq!(titles(&page2), ["Invoice ready", "Parcel shipped"]);
    assert!(page2["next_cursor"].is_null());

    let (_, orders, _) = as_user(&app, &token, Method::GET, "/v1/me/notifications?category=orders", None).await;
    assert_eq!(orders["items"].as_array().unwrap().len(), 3);
    let (_, found, _) = as_user(&app, &token, Method::GET, "/v1/me/notifications?q=parcel", None).await;
    assert_eq!(titles(&found), ["Parcel delivered", "Parcel shipped"]);

    // Read state, read-all, archive, stats.
    let (s, item, _) = as_user(
        &app,
        &token,
        Method::POST,
        &format!("/v1/me/notifications/{}/read", ids[0]),
        None,
    )
    .await;
    assert_eq!((s, item["read"].as_bool()), (200, Some(true)), "{item}");
    let (_, unread, _) = as_user(&app, &token, Method::GET, "/v1/me/notifications?unread_only=true", None).await;
    assert_eq!(unread["items"].as_array().unwrap().len(), 3);
    let (_, stats, _) = as_user(&app, &token, Method::GET, "/v1/me/stats", None).await;
    assert_eq!(
        (
            stats["total"].as_i64(),
            stats["unread"].as_i64(),
            stats["read"].as_i64()
        ),
        (Some(4), Some(3), Some(1))
    );
    let (_, item, _) = as_user(
        &app,
        &token,
        Method::POST,
        &format!("/v1/me/notifications/{}/unread", ids[0]),
        None,
    )
    .await;
    assert_eq!(item["read"], false);
    let (_, done, _) = as_user(&app, &token, Method::POST, "/v1/me/notifications/read-all", None).await;
    assert_eq!(done["updated"], 4);
    let (_, archived, _) = as_user(
        &app,
        &token,
        Method::POST,
        &format!("/v1/me/notifications/{}/archive", ids[1]),
        None,
    )
    .await;
    assert!(archived["archived_at"].is_string());
    let (_, list, _) = as_user(&app, &token, Method::GET, "/v1/me/notifications", None).await;
    assert_eq!(
        list["items"].as_array().unwrap().len(),
        3,
        "archived items are hidden by default"
    );
    let (_, all, _) = as_user(
        &app,
        &token,
        Method::GET,
        "/v1/me/notifications?include_archived=true",
        None,
    )
    .await;
    assert_eq!(all["items"].as_array().unwrap().len(), 4);

    // One notification with the status of every channel.
    let (s, one, _) = as_user(
        &app,
        &token,
        Method::GET,
        &format!("/v1/me/notifications/{}", ids[2]),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(one["deliveries"][0]["channel"], "in_app");
    assert_eq!(one["deliveries"][0]["status"], "delivered");
    assert_eq!(one["deliveries"][0]["attempts"], 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_token_reaches_only_that_users_data() {
    let app = TestApp::spawn().await;
    let ann = token_for(&app, "u_ann").await;
    let bob = token_for(&app, "u_bob").await;
    let ids = deliver_in_app(&app, "u_ann", &["For Ann only"], "general").await;
    // Bob cannot see, read or archive Ann's notification: 404, exactly as
    // for one that does not exist.
    let missing = "ntf_01JD0000000000000000000000";
    for path in [
        format!("/v1/me/notifications/{}", ids[0]),
        format!("/v1/me/notifications/{missing}"),
    ] {
        let (s, b, _) = as_user(&app, &bob, Method::GET, &path, None).await;
        assert_eq!((s, b["error"]["code"].as_str()), (404, Some("not_found")), "{b}");
    }
    let (s, _, _) = as_user(
        &app,
        &bob,
        Method::POST,
        &format!("/v1/me/notifications/{}/read", ids[0]),
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (_, list, _) = as_user(&app, &bob, Method::GET, "/v1/me/notifications", None).await;
    assert!(list["items"].as_array().unwrap().is_empty());
    let (_, stats, _) = as_user(&app, &ann, Method::GET, "/v1/me/stats", None).await;
    assert_eq!(stats["unread"], 1, "Bob's attempt changed nothing");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_with_the_etag_answers_304_until_something_changes() {
    let app = TestApp::spawn().await;
    let token = token_for(&app, "u_poll").await;
    let ids = deliver_in_app(&app, "u_poll", &["First"], "general").await;
    // Changes younger than the settle window never answer 304.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (s, _, etag) = as_user(&app, &token, Method::GET, "/v1/me/notifications", None).await;
    assert_eq!(s, 200);
    let etag = etag.expect("an ETag");
    let (s, body, again) = as_user(&app, &token, Method::GET, "/v1/me/notifications", Some(&etag)).await;
    assert_eq!(s, 304);
    assert_eq!(body, Value::String(String::new()), "a 304 has no body");
    assert_eq!(again.as_deref(), Some(etag.as_str()));
    // The ETag depends on the view: another query is another resource.
    let (s, _, other) = as_user(&app, &token, Method::GET, "/v1/me/notifications?limit=5", Some(&etag)).await;
    assert_eq!(s, 200);
    assert_ne!(other.as_deref(), Some(etag.as_str()));
    // A read-state change makes the old ETag stale...
    as_user(
        &app,
        &token,
        Method::POST,
        &format!("/v1/me/notifications/{}/read", ids[0]),
        None,
    )
    .await;
    let (s, body, _) = as_user(&app, &token, Method::GET, "/v1/me/notifications", Some(&etag)).await;
    assert_eq!(s, 200);
    assert_eq!(body["items"][0]["read"], true);
    // ...and so does a new delivery.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (_, _, settled) = as_user(&app, &token, Method::GET, "/v1/me/stats", None).await;
    let settled = settled.unwrap();
    assert_eq!(
        as_user(&app, &token, Method::GET, "/v1/me/stats", Some(&settled))
            .await
            .0,
        304
    );
    deliver_in_app(&app, "u_poll", &["Second"], "general").await;
    let (s, stats, _) = as_user(&app, &token, Method::GET, "/v1/me/stats", Some(&settled)).await;
    assert_eq!((s, stats["total"].as_i64()), (200, Some(2)));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_wrong_credentials_and_bad_queries_get_clear_errors() {
    let app = TestApp::spawn_with(herald_testkit::Parts::api_only(), |_| {}).await;
    let token = token_for(&app, "u_x").await;
    let code = |b: &Value| b["error"]["code"].as_str().unwrap_or_default().to_owned();

    let (s, b, _) = as_user(
        &app,
        "eyJhbGciOiJIUzI1NiJ9.e30.bm9wZQ",
        Method::GET,
        "/v1/me/stats",
        None,
    )
    .await;
    assert_eq!((s, code(&b)), (401, "invalid_user_token".to_owned()));
    let mut forged = token.clone();
    forged.push('x');
    let (s, b, _) = as_user(&app, &forged, Method::GET, "/v1/me/stats", None).await;
    assert_eq!((s, code(&b)), (401, "invalid_user_token".to_owned()));
    let res = app.http.get(app.url("/v1/me/stats")).send().await.unwrap();
    let (s, b) = status_and_json(res).await;
    assert_eq!((s, code(&b)), (401, "missing_user_token".to_owned()));
    // An expired token: minted by a key of the same secret with a past expiry.
    let expired = {
        let secret = herald_config::DEVELOPMENT_USER_TOKEN_SECRET;
        let claims = json!({"sub": "u_x", "aud": "herald-user", "iat": 1_000, "exp": 2_000});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let (s, b, _) = as_user(&app, &expired, Method::GET, "/v1/me/stats", None).await;
    assert_eq!((s, code(&b)), (401, "user_token_expired".to_owned()));

    // The wrong kind of credential for the route: 403.
    let (s, b, _) = as_user(&app, &token, Method::GET, "/v1/users/u_x", None).await;
    assert_eq!((s, code(&b)), (403, "user_token_not_allowed".to_owned()));
    let (s, b, _) = as_user(&app, &app.api_key, Method::GET, "/v1/me/stats", None).await;
    assert_eq!((s, code(&b)), (403, "api_key_not_allowed".to_owned()));

    for (query, field) in [
        ("cursor=garbage", "cursor"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("unread_only=maybe", "unread_only"),
        ("colour=red", "colour"),
        ("category=Not%20A%20Slug", "category"),
    ] {
        let (s, b, _) = as_user(
            &app,
            &token,
            Method::GET,
            &format!("/v1/me/notifications?{query}"),
            None,
        )
        .await;
        assert_eq!((s, code(&b)), (400, "invalid_query".to_owned()), "{query}: {b}");
        assert_eq!(b["error"]["details"]["field"], field, "{query}: {b}");
    }
    let (s, b) = app.post_json("/v1/users/u_x/tokens", &json!({"ttl_seconds": 5})).await;
    assert_eq!((s, code(&b)), (422, "validation_failed".to_owned()));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_registers_and_removes_its_own_push_token() {
    let app = TestApp::spawn_with(herald_testkit::Parts::api_only(), |_| {}).await;
    let token = token_for(&app, "u_phone").await;
    let res = app
        .http
        .post(app.url("/v1/me/devices"))
        .bearer_auth(&token)
        .json(&json!({"platform": "ios", "provider": "apns", "token": "a1b2c3d4"}))
        .send()
        .await
        .unwrap();
    let (s, device) = status_and_json(res).await;
    assert_eq!(s, 201, "{device}");
    let (_, user) = app.get_json("/v1/users/u_phone").await;
    assert_eq!(user["devices"][0]["id"], device["id"]);
    // Another user's token cannot remove it.
    let other = token_for(&app, "u_other").await;
    let path = format!("/v1/me/devices/{}", device["id"].as_str().unwrap());
    assert_eq!(as_user(&app, &other, Method::DELETE, &path, None).await.0, 404);
    assert_eq!(as_user(&app, &token, Method::DELETE, &path, None).await.0, 204);
    let (_, user) = app.get_json("/v1/users/u_phone").await;
    assert!(user["devices"].as_array().unwrap().is_empty());
    app.stop().await;
}

/// A reconnect storm (every live client after an API restart) must not
/// overflow the accept queue: each handshake the kernel drops waits out
/// TCP's retransmission backoff (1, 3, 7 s …) before it tries again. Here
/// 2,000 clients connect at once to a listener that accepts nothing yet;
/// with tokio's default backlog (1,024) the ones beyond it would still be
/// waiting after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_2000_clients_fits_in_the_apis_accept_queue() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4_096);
    assert!(
        somaxconn >= 2_048,
        "net.core.somaxconn is {somaxconn}: the kernel caps the API's backlog ({}) at it; raise it",
        herald_api::LISTEN_BACKLOG
    );
    let listener = herald_api::bind(([127, 0, 0, 1], 0).into()).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..2_000 {
        clients.spawn(async move {
            tokio::time::timeout(Duration::from_millis(2_500), tokio::net::TcpStream::connect(addr)).await
        });
    }
    let (mut connected, mut timed_out, mut failed) = (0, 0, 0);
    let mut streams = Vec::new();
    while let Some(outcome) = clients.join_next().await {
        match outcome.unwrap() {
            Ok(Ok(stream)) => {
                connected += 1;
                streams.push(stream);
            }
            Ok(Err(_)) => failed += 1,
            Err(_) => timed_out += 1,
        }
    }
    assert_eq!(
        (connected, timed_out, failed),
        (2_000, 0, 0),
        "(connected, timed out, failed) of 2,000 clients connecting at once before any accept"
    );
    // And the API then accepts them all.
    for _ in 0..2_000 {
        tokio::time::timeout(Duration::from_secs(5), listener.accept())
            .await
            .expect("a queued connection to accept")
            .unwrap();
    }
    drop(streams);
}
