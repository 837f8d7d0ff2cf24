//! End to end: a notification goes in over HTTP and comes out of every
//! channel, through Postgres, Redis and the real workers.

use std::time::Duration;

use herald_testkit::{Parts, TestApp};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn delivery<'a>(doc: &'a Value, channel: &str) -> &'a Value {
    doc["deliveries"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["channel"] == channel))
        .unwrap_or_else(|| panic!("no {channel} delivery in {doc}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_is_delivered_on_email_push_and_in_app() {
    let app = TestApp::spawn().await;
    let device = app.create_reachable_user("u_42").await;

    let started = std::time::Instant::now();
    let (status, accepted) = app
        .post_json(
            "/v1/notifications",
            &json!({"user_id": "u_42", "category": "alert", "priority": "high",
                    "channels": ["email", "push", "in_app"],
                    "title": "Your order shipped", "body": "Order 1234 is on its way.",
                    "data": {"order_id": "1234"}}),
        )
        .await;
    println!("POST answered {status} in {:?}", started.elapsed());
    assert_eq!(status, 202, "{accepted}");
    let ntf = accepted["id"].as_str().unwrap().to_owned();
    assert!(ntf.starts_with("ntf_"), "{accepted}");
    let deliveries = accepted["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 3);
    for d in deliveries {
        assert!(d["id"].as_str().unwrap().starts_with("dlv_"));
        assert_eq!(d["status"], "queued");
    }

    let (doc, seen) = app.wait_final(&ntf, WAIT).await;
    println!("all channels final after {:?}", started.elapsed());
    let email = delivery(&doc, "email");
    let push = delivery(&doc, "push");
    let in_app = delivery(&doc, "in_app");
    assert_eq!(email["status"], "sent", "{doc}");
    assert_eq!(push["status"], "sent", "{doc}");
    assert_eq!(in_app["status"], "delivered", "{doc}");
    for d in [email, push, in_app] {
        assert_eq!(d["attempts"], 1, "{d}");
        assert!(d["sent_at"].is_string() && d["finished_at"].is_string(), "{d}");
        let history = d["attempt_history"].as_array().unwrap();
        assert_eq!(history.len(), 1);
        assert!(history[0]["worker_id"].as_str().unwrap().contains("worker"));
    }
    // Statuses only move forward, by moves the state machine allows.
    for (id, statuses) in &seen {
        herald_testkit::history::assert_moves_forward(id, statuses);
    }

    // The email exists as a file a person can open, with the delivery id.
    let email_id = email["id"].as_str().unwrap();
    let eml = std::fs::read_to_string(app.mail_dir().join(format!("{email_id}.eml"))).unwrap();
    assert!(eml.contains("To: u_42@example.com"), "{eml}");
    assert!(eml.contains("Subject: Your order shipped"));
    assert!(eml.contains(&format!("X-Herald-Delivery-Id: {email_id}")));
    assert!(eml.contains("Order 1234 is on its way."));

    // One JSON line for the user's one device.
    let push_id = push["id"].as_str().unwrap();
    let lines: Vec<Value> = std::fs::read_to_string(app.push_file())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["delivery_id"], push_id);
    assert_eq!(lines[0]["device_id"], device["id"]);
    assert_eq!(lines[0]["data"]["order_id"], "1234");

    // The in-app message is in the user's inbox.
    let (user, title): (String, String) =
        sqlx::query_as("SELECT user_id, title FROM inbox_items WHERE notification_id = $1")
            .bind(&ntf)
            .fetch_one(app.pool())
            .await
            .unwrap();
    assert_eq!((user.as_str(), title.as_str()), ("u_42", "Your order shipped"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_email_or_devices_gets_skipped_channels_not_an_error() {
    let app = TestApp::spawn().await;
    let (s, _) = app.put_json("/v1/users/u_bare", &json!({})).await;
    assert_eq!(s, 201);
    let (status, accepted) = app
        .post_json(
            "/v1/notifications",
            &json!({"user_id": "u_bare", "channels": ["email", "push", "in_app"], "title": "Hi", "body": "x"}),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    let ntf = accepted["id"].as_str().unwrap();
    assert_eq!(delivery(&accepted, "email")["status"], "skipped");
    assert_eq!(delivery(&accepted, "email")["skip_reason"], "user has no email address");
    assert_eq!(
        delivery(&accepted, "push")["skip_reason"],
        "user has no active push device"
    );
    assert_eq!(delivery(&accepted, "in_app")["status"], "queued");
    let (doc, _) = app.wait_final(ntf, WAIT).await;
    assert_eq!(delivery(&doc, "email")["status"], "skipped");
    assert_eq!(delivery(&doc, "email")["attempts"], 0);
    assert_eq!(delivery(&doc, "in_app")["status"], "delivered");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omitted_channels_mean_every_channel_the_user_can_receive() {
    let app = TestApp::spawn().await;
    app.put_json("/v1/users/u_mail", &json!({"email": "mail@example.com"}))
        .await;
    let (_, accepted) = app
        .post_json("/v1/notifications", &json!({"user_id": "u_mail", "title": "Hi"}))
        .await;
    let channels: Vec<&str> = accepted["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["channel"].as_str().unwrap())
        .collect();
    assert_eq!(channels, ["email", "in_app"], "{accepted}");

    app.create_reachable_user("u_all").await;
    let (_, accepted) = app
        .post_json("/v1/notifications", &json!({"user_id": "u_all", "title": "Hi"}))
        .await;
    assert_eq!(accepted["deliveries"].as_array().unwrap().len(), 3, "{accepted}");

    // An unknown user can still be reached in-app.
    let (s, accepted) = app
        .post_json("/v1/notifications", &json!({"user_id": "u_nobody", "title": "Hi"}))
        .await;
    assert_eq!(s, 202);
    assert_eq!(accepted["deliveries"][0]["channel"], "in_app");
    app.wait_final(accepted["id"].as_str().unwrap(), WAIT).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_id_is_echoed_and_travels_with_the_notification() {
    let app = TestApp::spawn().await;
    let res = app
        .request(reqwest::Method::POST, "/v1/notifications")
        .header("x-request-id", "req-from-caller-1")
        .json(&json!({"user_id": "u_1", "channels": ["in_app"], "title": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "req-from-caller-1");
    let body: Value = res.json().await.unwrap();
    let stored: Option<String> = sqlx::query_scalar("SELECT request_id FROM notifications WHERE id = $1")
        .bind(body["id"].as_str().unwrap())
        .fetch_one(app.pool())
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("req-from-caller-1"));

    // Without one (or with an unsafe one), Herald makes one.
    let res = app
        .request(reqwest::Method::GET, "/healthz")
        .header("x-request-id", "bad id\twith tab")
        .send()
        .await
        .unwrap();
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(rid.len(), 26, "{rid}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_accepted_while_no_worker_runs_are_delivered_when_one_starts() {
    // The API alone: deliveries wait, queued, in Postgres and Redis.
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let (s, a) = app
            .post_json(
                "/v1/notifications",
                &json!({"user_id": format!("u_{i}"), "channels": ["in_app"], "title": "Hi"}),
            )
            .await;
        assert_eq!(s, 202);
        ids.push(a["id"].as_str().unwrap().to_owned());
    }
    let queued = app
        .wait_count(
            "SELECT count(*) FROM deliveries WHERE status = 'queued'",
            20,
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(queued, 20);
    // A worker started afterwards, on its own, drains them.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(herald_workers::run(
        app.settings.clone(),
        &[herald_core::Channel::InApp],
        shutdown.clone(),
    ));
    let delivered = app
        .wait_count("SELECT count(*) FROM deliveries WHERE status = 'delivered'", 20, WAIT)
        .await;
    assert_eq!(delivered, 20);
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_devices_can_be_created_read_and_removed() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let (s, user) = app
        .put_json(
            "/v1/users/u_7",
            &json!({"email": "ada@example.com", "locale": "en-GB", "timezone": "Europe/London"}),
        )
        .await;
    assert_eq!(s, 201, "{user}");
    let (s, _) = app
        .put_json("/v1/users/u_7", &json!({"email": "ada@example.org"}))
        .await;
    assert_eq!(s, 200);
    let (s, dev) = app
        .post_json(
            "/v1/users/u_7/devices",
            &json!({"platform": "android", "provider": "fcm", "token": "abcdef123456"}),
        )
        .await;
    assert_eq!(s, 201, "{dev}");
    assert_eq!(dev["token_suffix"], "123456");
    // Registering the same token again is not a second device.
    let (s, again) = app
        .post_json(
            "/v1/users/u_7/devices",
            &json!({"platform": "android", "provider": "fcm", "token": "abcdef123456"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(again["id"], dev["id"]);
    let (s, got) = app.get_json("/v1/users/u_7").await;
    assert_eq!(s, 200);
    assert_eq!(got["email"], "ada@example.org");
    assert_eq!(got["devices"].as_array().unwrap().len(), 1);
    let dev_id = dev["id"].as_str().unwrap();
    let res = app
        .request(reqwest::Method::DELETE, &format!("/v1/users/u_7/devices/{dev_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let res = app
        .request(reqwest::Method::DELETE, &format!("/v1/users/u_7/devices/{dev_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let (_, got) = app.get_json("/v1/users/u_7").await;
    assert_eq!(got["devices"].as_array().unwrap().len(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_app_delivery_publishes_a_live_event_for_the_user() {
    use futures::StreamExt;
    let app = TestApp::spawn().await;
    let queue = herald_queue::QueueClient::new(herald_queue::QueueConfig::from_settings(&app.settings)).unwrap();
    let client = redis::Client::open(herald_testkit::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe(queue.events_channel()).await.unwrap();
    let (s, accepted) = app
        .post_json(
            "/v1/notifications",
            &json!({"user_id": "u_live", "channels": ["in_app"], "title": "Live"}),
        )
        .await;
    assert_eq!(s, 202);
    // The channel also carries `user.changed` hints (whose rows moved); the
    // in-app event is the one with the item.
    let mut messages = pubsub.on_message();
    let event = tokio::time::timeout(WAIT, async {
        loop {
            let msg = messages.next().await.expect("a message");
            let event: Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
            if event["type"] == "inbox.item.created" {
                return event;
            }
            assert_eq!(event["type"], "user.changed", "{event}");
            assert_eq!(event["users"], json!(["u_live"]), "{event}");
        }
    })
    .await
    .expect("an in-app event");
    assert_eq!(event["user_id"], "u_live");
    assert_eq!(event["notification_id"], accepted["id"]);
    app.stop().await;
}
