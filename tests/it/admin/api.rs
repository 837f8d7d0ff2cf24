//! The operators' API: queue table, delivery search, one delivery's
//! history, replays (dry run, fenced, audited, cancellable, resumable) and
//! purges; and every bad input it must refuse with a clear 4xx.

use std::collections::HashSet;
use std::time::Duration;

use herald_testkit::seed::{DeadLetters, seed_dead_letters};
use herald_testkit::{Parts, TestApp, status_and_json};
use reqwest::Method;
use serde_json::{Value, json};

fn expect_error(status: u16, body: &Value, want_status: u16, want_code: &str) -> String {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{body}");
    message
}

fn ids_of(page: &Value) -> Vec<String> {
    page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_table_shows_redis_depths_and_postgres_counts_per_channel() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    // No workers: accepted deliveries wait in Redis and in Postgres.
    for i in 0..3 {
        let (s, b) = app
            .post_json(
                "/v1/notifications",
                &json!({"user_id": format!("u_{i}"), "title": "t", "channels": ["in_app"], "priority": "high"}),
            )
            .await;
        assert_eq!(s, 202, "{b}");
    }
    seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 4,
            channel: "email",
            ..DeadLetters::default()
        },
    )
    .await;
    let (s, q) = app.get_json("/v1/admin/queues").await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(q["redis"], "ok");
    assert_eq!(q["queues"].as_array().unwrap().len(), 9, "{q}");
    let inapp_high = q["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["queue"] == "in_app:high")
        .unwrap();
    assert_eq!(inapp_high["ready"], 3, "{q}");
    assert!(inapp_high["oldest_ready_age_ms"].as_u64().is_some(), "{q}");
    let channel = |name: &str| {
        q["channels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["channel"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(channel("in_app")["queued"], 3, "{q}");
    assert_eq!(channel("email")["dead"], 4, "{q}");
    assert!(channel("email")["per_minute"].as_i64().is_some(), "{q}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_filters_and_pages_newest_first() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let email = DeadLetters {
        count: 30,
        tag: "0001",
        channel: "email",
        status: "dead",
        error: "SMTP 451 mailbox busy",
        error_class: "transient",
        provider_status: Some(451),
        user_prefix: "u_mail_",
        users: 3,
        ..DeadLetters::default()
    };
    let push = DeadLetters {
        count: 20,
        tag: "0002",
        channel: "push",
        status: "failed",
        attempts: 1,
        error: "APNs 410 Unregistered (50%_off)",
        error_class: "permanent",
        provider_status: Some(410),
        user_prefix: "u_push_",
        users: 2,
        offset_secs: 1000,
        ..DeadLetters::default()
    };
    let email_ids = seed_dead_letters(app.pool(), &email).await;
    let push_ids = seed_dead_letters(app.pool(), &push).await;

    // Pages of 7 walk all 50 newest first, without gaps or repeats.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/admin/deliveries?status=failed,dead&limit=7&cursor={c}"),
            None => "/v1/admin/deliveries?status=failed&status=dead&limit=7".to_owned(),
        };
        let (s, page) = app.get_json(&path).await;
        assert_eq!(s, 200, "{page}");
        seen.extend(ids_of(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = email_ids.iter().chain(push_ids.iter()).cloned().collect();
    assert_eq!(seen, expected, "newest first: the email batch is younger");

    let cases: &[(&str, usize)] = &[
        ("channel=push", 20),
        ("channel=email,push&status=dead", 30),
        ("status=failed", 20),
        ("error_class=permanent", 20),
        ("error_class=transient,ambiguous", 30),
        ("provider_status=451", 30),
        ("provider_status=500", 0),
        ("user_id=u_mail_1", 10),
        ("q=mailbox%20BUSY", 30),
        ("q=busy%20%2317", 1),
        // `%` and `_` in the text match literally.
        ("q=50%25_off", 20),
        ("q=50%25", 20),
        ("q=5_%25", 0),
        ("status=sent", 0),
    ];
    for (query, n) in cases {
        let (s, page) = app.get_json(&format!("/v1/admin/deliveries?limit=200&{query}")).await;
        assert_eq!(s, 200, "{query}: {page}");
        assert_eq!(ids_of(&page).len(), *n, "{query}: {page}");
    }
    let ntf = email.notification_id(5);
    let (_, page) = app
        .get_json(&format!("/v1/admin/deliveries?notification_id={ntf}"))
        .await;
    assert_eq!(ids_of(&page), vec![email.delivery_id(5)]);

    // Time range on created_at: email row n was created n seconds ago.
    let t = |secs: i64| (chrono::Utc::now() - chrono::Duration::seconds(secs)).to_rfc3339();
    let (s, page) = app
        .get_json(&format!(
            "/v1/admin/deliveries?limit=200&since={}&until={}",
            urlencode(&t(20)),
            urlencode(&t(10))
        ))
        .await;
    assert_eq!(s, 200, "{page}");
    let n = ids_of(&page).len();
    assert!((9..=11).contains(&n), "about ten rows between 20 s and 10 s ago: {n}");
    app.stop().await;
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delivery_shows_its_notification_and_every_attempt() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let ids = seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 2,
            attempts: 4,
            ..DeadLetters::default()
        },
    )
    .await;
    let (s, d) = app.get_json(&format!("/v1/admin/deliveries/{}", ids[0])).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["delivery"]["id"], ids[0].as_str());
    assert_eq!(d["delivery"]["status"], "dead");
    assert_eq!(d["notification"]["title"], "Seeded 1");
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(
        attempts
            .iter()
            .map(|a| a["attempt"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(attempts[0]["error"], "connection reset by peer #1");

    let (s, b) = app
        .get_json("/v1/admin/deliveries/dlv_01JD0000000000000000000000")
        .await;
    expect_error(s, &b, 404, "not_found");
    let (s, b) = app
        .get_json("/v1/admin/deliveries/ntf_01JD0000000000000000000000")
        .await;
    let m = expect_error(s, &b, 400, "invalid_id");
    assert!(m.contains("dlv_"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_filters_are_refused_with_a_400_naming_the_field() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let cases: &[(&str, &str, &str)] = &[
        ("status=bogus", "status", "expected one of queued"),
        ("channel=sms", "channel", "expected one of email, push, in_app"),
        ("error_class=bad", "error_class", "expected one of permanent"),
        ("provider_status=abc", "provider_status", "number from 0 to 999"),
        ("provider_status=1000", "provider_status", "number from 0 to 999"),
        ("user_id=a%20b", "user_id", "may contain only"),
        (
            "notification_id=dlv_01JD0000000000000000000000",
            "notification_id",
            "ntf_",
        ),
        ("since=yesterday", "since", "RFC 3339"),
        (
            "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            "until",
            "later than `since`",
        ),
        ("q=", "q", "must not be empty"),
        ("limit=0", "limit", "1 to 200"),
        ("limit=201", "limit", "1 to 200"),
        ("cursor=zz", "cursor", "next_cursor"),
        ("colour=red", "colour", "unknown filter"),
        ("user_id=a&user_id=b", "user_id", "once"),
    ];
    for (query, field, hint) in cases {
        let (s, b) = app.get_json(&format!("/v1/admin/deliveries?{query}")).await;
        let m = expect_error(s, &b, 400, "invalid_filter");
        assert_eq!(b["error"]["details"]["field"], *field, "{query}: {b}");
        assert!(m.contains(hint), "{query}: {m}");
    }
    // The same parser reads the JSON filters of replays and purges.
    let bodies: &[(&str, Value, &str)] = &[
        ("/v1/admin/replays", json!({"filter": {"status": ["sent"]}}), "status"),
        ("/v1/admin/replays", json!({"filter": {"channel": "fax"}}), "channel"),
        ("/v1/admin/replays", json!({"filter": {"since": true}}), "since"),
        ("/v1/admin/replays", json!({"filter": {"nope": 1}}), "nope"),
        (
            "/v1/admin/replays",
            json!({"delivery_ids": ["dlv_x"]}),
            "delivery_ids[0]",
        ),
        ("/v1/admin/replays", json!({"delivery_ids": []}), "delivery_ids"),
        ("/v1/admin/purges", json!({"before": "last week"}), "before"),
        (
            "/v1/admin/purges",
            json!({"before": "2026-01-01T00:00:00Z", "filter": {"status": "queued"}}),
            "status",
        ),
        (
            "/v1/admin/purges",
            json!({"before": "2026-01-01T00:00:00Z", "filter": {"provider_status": [1, "x"]}}),
            "provider_status",
        ),
    ];
    for (path, body, field) in bodies {
        let (s, b) = app.post_json(path, body).await;
        expect_error(s, &b, 400, "invalid_filter");
        assert_eq!(b["error"]["details"]["field"], *field, "{body}: {b}");
    }
    // Shape errors of the body itself are 422s, as everywhere else.
    let (s, b) = app.post_json("/v1/admin/replays", &json!({})).await;
    expect_error(s, &b, 422, "validation_failed");
    let (s, b) = app
        .post_json(
            "/v1/admin/replays",
            &json!({"delivery_ids": ["dlv_01JD0000000000000000000000"], "filter": {}}),
        )
        .await;
    expect_error(s, &b, 422, "validation_failed");
    let (s, b) = app
        .post_json("/v1/admin/replays", &json!({"filter": {}, "pace": 0}))
        .await;
    assert_eq!(b["error"]["details"]["field"], "pace", "{b}");
    expect_error(s, &b, 422, "validation_failed");
    let (s, b) = app.post_json("/v1/admin/replays", &json!({"filters": {}})).await;
    expect_error(s, &b, 422, "invalid_body");
    // Nothing was recorded.
    assert_eq!(count(&app, "SELECT count(*) FROM replays").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM purges").await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_refuse_keys_without_the_admin_scope() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let key = app.key_with_scopes(&["send", "read"]).await;
    let routes: &[(Method, &str)] = &[
        (Method::GET, "/v1/admin/queues"),
        (Method::GET, "/v1/admin/deliveries"),
        (Method::GET, "/v1/admin/deliveries/dlv_01JD0000000000000000000000"),
        (Method::POST, "/v1/admin/replays"),
        (Method::GET, "/v1/admin/replays"),
        (Method::GET, "/v1/admin/replays/rpl_01JD0000000000000000000000"),
        (Method::POST, "/v1/admin/replays/rpl_01JD0000000000000000000000/cancel"),
        (Method::POST, "/v1/admin/purges"),
    ];
    for (method, path) in routes {
        let res = app
            .http
            .request(method.clone(), app.url(path))
            .bearer_auth(&key)
            .json(&json!({"filter": {}, "before": "2026-01-01T00:00:00Z"}))
            .send()
            .await
            .unwrap();
        let (s, b) = status_and_json(res).await;
        let m = expect_error(s, &b, 403, "insufficient_scope");
        assert!(m.contains("admin"), "{path}: {m}");
        let res = app.http.request(method.clone(), app.url(path)).send().await.unwrap();
        let (s, b) = status_and_json(res).await;
        expect_error(s, &b, 401, "missing_api_key");
    }
    // The page itself is public (it holds no data); it asks for a key.
    let page = app.http.get(app.url("/admin")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("Admin API key"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_replays_are_404_and_finished_ones_cannot_be_cancelled() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let (s, b) = app.get_json("/v1/admin/replays/rpl_01JD0000000000000000000000").await;
    expect_error(s, &b, 404, "not_found");
    let (s, b) = app
        .post_json("/v1/admin/replays/rpl_01JD0000000000000000000000/cancel", &json!({}))
        .await;
    expect_error(s, &b, 404, "not_found");
    let (s, b) = app.get_json("/v1/admin/replays/nope").await;
    expect_error(s, &b, 400, "invalid_id");

    // No runner in this app: the replay waits, pending, and can be cancelled once.
    let ids = seed_dead_letters(app.pool(), &DeadLetters::default()).await;
    let (s, r) = app.post_json("/v1/admin/replays", &json!({"delivery_ids": ids})).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["status"], "pending");
    let id = r["id"].as_str().unwrap();
    let (s, c) = app
        .post_json(&format!("/v1/admin/replays/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["status"], "cancelled");
    assert!(c["cancelled_by"].as_str().unwrap().contains("test"), "{c}");
    let (s, b) = app
        .post_json(&format!("/v1/admin/replays/{id}/cancel"), &json!({}))
        .await;
    expect_error(s, &b, 409, "replay_finished");
    // Cancelled before it ran: nothing moved.
    assert_eq!(
        count(&app, "SELECT count(*) FROM deliveries WHERE status = 'dead'").await,
        10
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_over_the_ceiling_needs_confirm_large() {
    let app = TestApp::spawn_with(Parts::api_only(), |env| {
        env.insert("HERALD_REPLAY_MAX".into(), "10".into());
    })
    .await;
    seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 11,
            ..DeadLetters::default()
        },
    )
    .await;
    let (s, b) = app.post_json("/v1/admin/replays", &json!({"filter": {}})).await;
    let m = expect_error(s, &b, 422, "replay_too_large");
    assert!(m.contains("confirm_large") && m.contains("11"), "{m}");
    assert_eq!(b["error"]["details"]["max"], 10);
    // A dry run says so without refusing.
    let (s, d) = app
        .post_json("/v1/admin/replays", &json!({"filter": {}, "dry_run": true}))
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (d["matched"].as_i64(), d["max_without_confirmation"].as_i64()),
        (Some(11), Some(10))
    );
    let (s, r) = app
        .post_json("/v1/admin/replays", &json!({"filter": {}, "confirm_large": true}))
        .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["matched"], 11);
    // Ten or fewer need nothing.
    let (s, r) = app
        .post_json("/v1/admin/replays", &json!({"filter": {"user_id": "u_seed_1"}}))
        .await;
    assert_eq!(s, 202, "{r}");
    app.stop().await;
}

/// Dead letters of several kinds: replayable in-app ones, ones whose user
/// is gone, push without a device, email without an address, and one
/// already sent (listed by id).
async fn mixed_dead_letters(app: &TestApp) -> (Vec<String>, Vec<String>) {
    let ok = seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 40,
            tag: "0001",
            user_prefix: "u_ok_",
            users: 8,
            ..DeadLetters::default()
        },
    )
    .await;
    let gone = seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 3,
            tag: "0002",
            user_prefix: "u_gone_",
            users: 3,
            create_users: false,
            offset_secs: 100,
            ..DeadLetters::default()
        },
    )
    .await;
    let push = seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 2,
            tag: "0003",
            channel: "push",
            user_prefix: "u_nodevice_",
            users: 2,
            offset_secs: 200,
            ..DeadLetters::default()
        },
    )
    .await;
    sqlx::query("DELETE FROM devices WHERE user_id LIKE 'u_nodevice_%'")
        .execute(app.pool())
        .await
        .unwrap();
    let email = seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 1,
            tag: "0004",
            channel: "email",
            user_prefix: "u_noemail_",
            users: 1,
            offset_secs: 300,
            ..DeadLetters::default()
        },
    )
    .await;
    sqlx::query("UPDATE users SET email = NULL WHERE id LIKE 'u_noemail_%'")
        .execute(app.pool())
        .await
        .unwrap();
    let skipped: Vec<String> = gone.into_iter().chain(push).chain(email).collect();
    (ok, skipped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_counts_what_would_be_replayed_and_skipped_and_changes_nothing() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let (ok, _) = mixed_dead_letters(&app).await;
    let (s, d) = app
        .post_json(
            "/v1/admin/replays",
            &json!({"filter": {"status": "dead"}, "dry_run": true}),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["dry_run"], true);
    assert_eq!(d["matched"], 46, "{d}");
    assert_eq!(d["would_replay"], 40, "{d}");
    assert_eq!(d["would_skip"]["user no longer exists"], 3, "{d}");
    assert_eq!(d["would_skip"]["user has no active push device"], 2, "{d}");
    assert_eq!(d["would_skip"]["user has no email address"], 1, "{d}");
    let sample = d["sample"].as_array().unwrap();
    assert_eq!(sample.len(), 10);
    assert_eq!(sample[0]["id"], ok[0].as_str(), "newest first");

    // By ids, with one that does not exist and one that is not dead.
    sqlx::query("UPDATE deliveries SET status = 'sent' WHERE id = $1")
        .bind(&ok[1])
        .execute(app.pool())
        .await
        .unwrap();
    let (s, d) = app
        .post_json(
            "/v1/admin/replays",
            &json!({"delivery_ids": [ok[0], ok[1], "dlv_01JD9999999999999999999999"], "dry_run": true}),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(
        (d["matched"].as_i64(), d["would_replay"].as_i64()),
        (Some(3), Some(1)),
        "{d}"
    );
    assert_eq!(d["would_skip"]["no longer failed or dead (now sent)"], 1, "{d}");
    assert_eq!(d["would_skip"]["no such delivery (never existed or purged)"], 1, "{d}");

    assert_eq!(count(&app, "SELECT count(*) FROM replays").await, 0);
    assert_eq!(
        count(&app, "SELECT count(*) FROM deliveries WHERE status = 'dead'").await,
        45
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_sends_each_dead_letter_once_with_a_fresh_budget_and_says_why_it_skipped_others() {
    let app = TestApp::spawn().await;
    let (ok, skipped) = mixed_dead_letters(&app).await;
    let (s, r) = app
        .post_json("/v1/admin/replays", &json!({"filter": {"status": ["dead"]}}))
        .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["matched"], 46);
    assert_eq!(r["requested_by"]["api_key_name"], "test");
    let id = r["id"].as_str().unwrap().to_owned();
    let done = app.wait_replay(&id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (done["replayed"].as_i64(), done["skipped"].as_i64()),
        (Some(40), Some(6)),
        "{done}"
    );
    assert_eq!(done["failed"], 0);
    assert_eq!(done["skip_reasons"]["user no longer exists"], 3, "{done}");
    let listed: HashSet<String> = done["skipped_deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["delivery_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, skipped.iter().cloned().collect(), "{done}");

    // Every replayed one is delivered after exactly one new attempt, with
    // its earlier attempts intact and a fresh budget (3 + HERALD_MAX_ATTEMPTS).
    let delivered = app
        .wait_count(
            "SELECT count(*) FROM deliveries WHERE status = 'delivered'",
            40,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(delivered, 40);
    let rows: Vec<(String, i32, i32, i64)> = sqlx::query_as(
        "SELECT d.id, d.attempt, d.max_attempts, (SELECT count(*) FROM delivery_attempts a WHERE a.delivery_id = d.id)
         FROM deliveries d WHERE d.id = ANY($1)",
    )
    .bind(&ok)
    .fetch_all(app.pool())
    .await
    .unwrap();
    for (id, attempt, max, attempts) in &rows {
        assert_eq!((*attempt, *max, *attempts), (4, 3 + 8, 4), "{id}");
    }
    assert_eq!(count(&app, "SELECT count(*) FROM inbox_items").await, 40);

    // The same batch again: nothing is sent twice.
    let (s, again) = app.post_json("/v1/admin/replays", &json!({"delivery_ids": ok})).await;
    assert_eq!(s, 202, "{again}");
    let again = app
        .wait_replay(again["id"].as_str().unwrap(), Duration::from_secs(20))
        .await;
    assert_eq!(
        (again["replayed"].as_i64(), again["skipped"].as_i64()),
        (Some(0), Some(40)),
        "{again}"
    );
    assert_eq!(again["skip_reasons"]["no longer failed or dead (now delivered)"], 40);
    let (_, f) = app
        .post_json("/v1/admin/replays", &json!({"filter": {"status": ["dead"]}}))
        .await;
    assert_eq!(f["matched"], 6, "only the skipped ones are still dead: {f}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM delivery_attempts WHERE delivery_id LIKE 'dlv_01JD0001%'"
        )
        .await,
        40 * 4
    );
    // Audited: who, when, what, counts.
    let (s, list) = app.get_json("/v1/admin/replays").await;
    assert_eq!(s, 200);
    let first = list["replays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(first["filter"]["status"], json!(["dead"]), "{first}");
    assert_eq!(first["replayed"], 40);
    assert!(first["finished_at"].is_string());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_permanent_failure_is_found_with_its_history_and_replayed_after_the_fix() {
    let app = TestApp::spawn().await;
    app.put_json("/v1/users/u_ada", &json!({"email": "ada@example.com"}))
        .await;
    // The address went bad behind Herald's back: the worker fails it permanently.
    sqlx::query("UPDATE users SET email = 'not-an-address' WHERE id = 'u_ada'")
        .execute(app.pool())
        .await
        .unwrap();
    let (s, n) = app
        .post_json(
            "/v1/notifications",
            &json!({"user_id": "u_ada", "title": "Invoice", "channels": ["email"]}),
        )
        .await;
    assert_eq!(s, 202, "{n}");
    let (doc, _) = app.wait_final(n["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(doc["deliveries"][0]["status"], "failed", "{doc}");
    let (_, page) = app
        .get_json("/v1/admin/deliveries?status=failed&error_class=permanent&user_id=u_ada")
        .await;
    let found = ids_of(&page);
    assert_eq!(found.len(), 1, "{page}");
    let (_, d) = app.get_json(&format!("/v1/admin/deliveries/{}", found[0])).await;
    assert_eq!(d["attempts"][0]["outcome"], "permanent", "{d}");
    assert_eq!(d["notification"]["title"], "Invoice");

    app.put_json("/v1/users/u_ada", &json!({"email": "ada@example.com"}))
        .await;
    let (s, r) = app
        .post_json("/v1/admin/replays", &json!({"delivery_ids": found}))
        .await;
    assert_eq!(s, 202, "{r}");
    let done = app
        .wait_replay(r["id"].as_str().unwrap(), Duration::from_secs(20))
        .await;
    assert_eq!(done["replayed"], 1, "{done}");
    let (doc, _) = app.wait_final(n["id"].as_str().unwrap(), Duration::from_secs(20)).await;
    assert_eq!(doc["deliveries"][0]["status"], "sent", "{doc}");
    assert_eq!(doc["deliveries"][0]["attempts"], 2);
    let mails = std::fs::read_dir(app.mail_dir()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(mails, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_replay_can_be_cancelled_and_stops_there() {
    let app = TestApp::spawn().await;
    let ids = seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 60,
            ..DeadLetters::default()
        },
    )
    .await;
    let (s, r) = app
        .post_json("/v1/admin/replays", &json!({"delivery_ids": ids, "pace": 20}))
        .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["pace"], 20);
    let id = r["id"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    loop {
        let (_, p) = app.get_json(&format!("/v1/admin/replays/{id}")).await;
        if p["replayed"].as_i64().unwrap_or(0) >= 5 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, c) = app
        .post_json(&format!("/v1/admin/replays/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(s, 200, "{c}");
    let at_cancel = c["replayed"].as_i64().unwrap();
    // 20 per second: far from done after about a quarter of a second.
    assert!(at_cancel < 40, "{c}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, p) = app.get_json(&format!("/v1/admin/replays/{id}")).await;
    assert_eq!(p["status"], "cancelled");
    assert_eq!(
        p["replayed"].as_i64().unwrap(),
        at_cancel,
        "nothing after the cancel: {p}"
    );
    let requeued = count(&app, "SELECT count(*) FROM deliveries WHERE status <> 'dead'").await;
    assert_eq!(requeued, at_cancel);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_runner_died_is_resumed_by_another_and_finishes_once() {
    // No workers: this test plays the runners itself.
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let ids = seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 25,
            ..DeadLetters::default()
        },
    )
    .await;
    let (s, r) = app.post_json("/v1/admin/replays", &json!({"filter": {}})).await;
    assert_eq!(s, 202, "{r}");
    let id = r["id"].as_str().unwrap().to_owned();
    let budgets = herald_db::replays::AttemptBudgets {
        email: 5,
        push: 5,
        in_app: 5,
    };
    // Runner A claims it and does one batch of ten, then "dies".
    let a = herald_db::replays::claim_replay(app.pool(), "runner-a", 30.0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.id, id);
    assert!(
        herald_db::replays::claim_replay(app.pool(), "runner-b", 30.0)
            .await
            .unwrap()
            .is_none(),
        "one owner at a time"
    );
    let first = herald_db::replays::replay_batch(app.pool(), &id, "runner-a", 10, budgets)
        .await
        .unwrap();
    assert_eq!(first.requeued.len(), 10);
    sqlx::query("UPDATE replays SET heartbeat_at = now() - interval '1 hour' WHERE id = $1")
        .bind(&id)
        .execute(app.pool())
        .await
        .unwrap();
    // Runner B (a real one) takes it over and finishes the other fifteen.
    let queue = herald_queue::QueueClient::new(herald_queue::QueueConfig::from_settings(&app.settings)).unwrap();
    let b = herald_workers::replayer::Replayer::new(app.pool().clone(), queue, &app.settings);
    assert!(b.run_one(&tokio_util::sync::CancellationToken::new()).await.unwrap());
    let (_, done) = app.get_json(&format!("/v1/admin/replays/{id}")).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (done["replayed"].as_i64(), done["skipped"].as_i64()),
        (Some(25), Some(0)),
        "{done}"
    );
    // A wakes up: it no longer owns the replay and changes nothing.
    let late = herald_db::replays::replay_batch(app.pool(), &id, "runner-a", 10, budgets)
        .await
        .unwrap();
    assert!(late.stopped.is_some() && late.requeued.is_empty());
    let rows: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT status, attempt, max_attempts FROM deliveries WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(app.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 25);
    for (status, attempt, max) in rows {
        assert_eq!(status, "queued");
        assert_eq!(attempt, 3, "attempt numbers are kept");
        assert!(
            max == 8 || max == 11,
            "a fresh budget on top of the attempts made: {max}"
        );
    }
    // The jobs are in Redis for the workers (B pushed its fifteen; the
    // first ten are owed one and the sweeper would push them).
    let owed = count(
        &app,
        "SELECT count(*) FROM deliveries WHERE status = 'queued' AND (enqueued_at IS NULL OR enqueued_at < updated_at)",
    )
    .await;
    assert_eq!(owed, 10);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_old_dead_letters_with_their_attempts_and_is_audited() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 30,
            channel: "email",
            ..DeadLetters::default()
        },
    )
    .await;
    seed_dead_letters(
        app.pool(),
        &DeadLetters {
            count: 30,
            tag: "0002",
            channel: "push",
            ..DeadLetters::default()
        },
    )
    .await;
    // Row n finished n - 1 seconds ago: before 15.5 s ago means n >= 17.
    let before = (chrono::Utc::now() - chrono::Duration::milliseconds(15_500)).to_rfc3339();
    let body = json!({"before": before, "filter": {"channel": "email"}, "dry_run": true});
    let (s, d) = app.post_json("/v1/admin/purges", &body).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["dry_run"], true);
    assert_eq!(d["deleted"], 14, "{d}");
    assert_eq!(count(&app, "SELECT count(*) FROM deliveries").await, 60);

    let (s, p) = app
        .post_json(
            "/v1/admin/purges",
            &json!({"before": before, "filter": {"channel": "email"}}),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["deleted"], 14, "{p}");
    assert!(p["id"].as_str().unwrap().starts_with("prg_"));
    assert_eq!(
        count(&app, "SELECT count(*) FROM deliveries WHERE channel = 'email'").await,
        16
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM deliveries WHERE channel = 'push'").await,
        30
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM delivery_attempts a LEFT JOIN deliveries d ON d.id = a.delivery_id WHERE d.id IS NULL"
        )
        .await,
        0,
        "attempts went with their deliveries"
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM notifications").await,
        60,
        "notifications stay"
    );
    let audit: (String, i64, serde_json::Value, String) =
        sqlx::query_as("SELECT api_key_name, deleted, filter, status FROM purges")
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!(audit.0, "test");
    assert_eq!(audit.1, 14);
    assert_eq!(audit.2["channel"], json!(["email"]));
    assert_eq!(audit.3, "completed");
    app.stop().await;
}
