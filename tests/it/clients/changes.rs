//! What changed for a client's user: `/v1/me/changes` (pages, long-poll)
//! and `/v1/me/stream` (Server-Sent Events), across API replicas, with a
//! cursor that never loses a change that commits late.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use herald_testkit::{Parts, TestApp, status_and_json};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

async fn token_for(app: &TestApp, user: &str) -> String {
    let (s, b) = app.post_json(&format!("/v1/users/{user}/tokens"), &json!({})).await;
    assert_eq!(s, 201, "{b}");
    b["token"].as_str().unwrap().to_owned()
}

async fn get_as(app: &TestApp, base: &str, token: &str, path: &str) -> (u16, Value) {
    let res = app
        .http
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    status_and_json(res).await
}

async fn changes(app: &TestApp, token: &str, query: &str) -> Value {
    let (s, b) = get_as(app, &app.base_url, token, &format!("/v1/me/changes?{query}")).await;
    assert_eq!(s, 200, "{query}: {b}");
    b
}

async fn now_cursor(app: &TestApp, token: &str) -> String {
    let b = changes(app, token, "").await;
    assert_eq!(b["changes"], json!([]), "without since: no changes");
    assert_eq!(b["has_more"], false);
    b["next_cursor"].as_str().unwrap().to_owned()
}

async fn post_notification(app: &TestApp, user: &str, title: &str) -> (String, Vec<String>) {
    let (s, b) = app
        .post_json(
            "/v1/notifications",
            &json!({"user_id": user, "channels": ["in_app"], "title": title, "body": "body", "category": "general"}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let deliveries = b["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    (b["id"].as_str().unwrap().to_owned(), deliveries)
}

/// A change's identity: `d:<delivery>` or `i:<notification>`.
fn key(c: &Value) -> String {
    match c["type"].as_str() {
        Some("delivery") => format!("d:{}", c["delivery_id"].as_str().unwrap()),
        Some("inbox_item") => format!("i:{}", c["notification_id"].as_str().unwrap()),
        other => panic!("unknown change type {other:?}: {c}"),
    }
}

/// Every change from `cursor` on, page by page; returns them and the last cursor.
async fn drain(app: &TestApp, token: &str, mut cursor: String, limit: u32) -> (Vec<Value>, String) {
    let mut all = Vec::new();
    for _ in 0..1000 {
        let b = changes(app, token, &format!("since={cursor}&limit={limit}")).await;
        let page = b["changes"].as_array().unwrap();
        assert!(page.len() <= limit as usize, "{b}");
        all.extend(page.iter().cloned());
        cursor = b["next_cursor"].as_str().unwrap().to_owned();
        if b["has_more"] == false {
            return (all, cursor);
        }
    }
    panic!("changes never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_show_new_notifications_deliveries_and_read_state_once_each() {
    let app = TestApp::spawn().await;
    let token = token_for(&app, "u_ann").await;
    let start = now_cursor(&app, &token).await;

    let (ntf, dlv) = post_notification(&app, "u_ann", "Hello").await;
    // Another user's changes never reach Ann.
    let (other, _) = post_notification(&app, "u_bob", "Not for Ann").await;
    app.wait_final(&ntf, WAIT).await;
    app.wait_final(&other, WAIT).await;

    let (seen, cursor) = drain(&app, &token, start.clone(), 100).await;
    let by_key: HashMap<String, &Value> = seen.iter().map(|c| (key(c), c)).collect();
    let delivery = by_key.get(&format!("d:{}", dlv[0])).expect("the delivery changed");
    assert_eq!(delivery["notification_id"], ntf.as_str());
    assert_eq!(delivery["channel"], "in_app");
    let item = by_key.get(&format!("i:{ntf}")).expect("the inbox item appeared");
    assert_eq!(
        (item["title"].as_str(), item["read"].as_bool()),
        (Some("Hello"), Some(false))
    );
    assert!(
        seen.iter().all(|c| c["notification_id"] == ntf.as_str()),
        "only Ann's rows: {seen:?}"
    );
    // The last state of the delivery is among what was seen.
    assert!(
        seen.iter()
            .any(|c| c["type"] == "delivery" && c["status"] == "delivered"),
        "{seen:?}"
    );

    // Nothing new: the cursor does not repeat anything.
    let again = changes(&app, &token, &format!("since={cursor}")).await;
    assert_eq!(again["changes"], json!([]), "{again}");

    // Read, unread, archive: each is a change of the inbox item.
    let mut cursor = again["next_cursor"].as_str().unwrap().to_owned();
    for (action, read, archived) in [("read", true, false), ("unread", false, false), ("archive", true, true)] {
        let res = app
            .http
            .post(app.url(&format!("/v1/me/notifications/{ntf}/{action}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let b = changes(&app, &token, &format!("since={cursor}")).await;
        let page = b["changes"].as_array().unwrap();
        assert_eq!(page.len(), 1, "{action}: {b}");
        assert_eq!(page[0]["type"], "inbox_item");
        assert_eq!(page[0]["read"], read, "{action}");
        assert_eq!(page[0]["archived_at"].is_string(), archived, "{action}");
        cursor = b["next_cursor"].as_str().unwrap().to_owned();
    }
    let b = changes(&app, &token, &format!("since={cursor}")).await;
    assert_eq!(b["changes"], json!([]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_one_change_at_a_time_walks_everything_exactly_once() {
    let app = TestApp::spawn().await;
    let token = token_for(&app, "u_pages").await;
    let start = now_cursor(&app, &token).await;
    let mut ntfs = Vec::new();
    for i in 0..6 {
        ntfs.push(post_notification(&app, "u_pages", &format!("n{i}")).await.0);
    }
    for n in &ntfs {
        app.wait_final(n, WAIT).await;
    }
    // Read-all changes every item in one transaction: one timestamp.
    let res = app
        .http
        .post(app.url("/v1/me/notifications/read-all"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (seen, _) = drain(&app, &token, start.clone(), 1).await;
    let keys: Vec<String> = seen.iter().map(key).collect();
    let unique: HashSet<&String> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "no change twice: {keys:?}");
    let mut expected: HashSet<String> = HashSet::new();
    let rows: Vec<(String,)> = sqlx::query_as("SELECT id FROM deliveries WHERE user_id = 'u_pages'")
        .fetch_all(app.pool())
        .await
        .unwrap();
    expected.extend(rows.into_iter().map(|(id,)| format!("d:{id}")));
    expected.extend(ntfs.iter().map(|n| format!("i:{n}")));
    assert_eq!(unique.into_iter().cloned().collect::<HashSet<_>>(), expected);
    assert!(
        seen.iter()
            .filter(|c| c["type"] == "inbox_item")
            .all(|c| c["read"] == true),
        "each row is reported in its current state"
    );
    // The same walk after the changes settled gives the same set.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (later, cursor) = drain(&app, &token, start, 2).await;
    assert_eq!(later.len(), expected.len());
    let b = changes(&app, &token, &format!("since={cursor}")).await;
    assert_eq!(b["changes"], json!([]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_commits_late_with_an_older_timestamp_is_not_missed() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let token = token_for(&app, "u_late").await;
    let (_, first) = post_notification(&app, "u_late", "first").await;
    let (_, second) = post_notification(&app, "u_late", "second").await;
    let start = now_cursor(&app, &token).await;

    // Transaction A starts (its now() is fixed here) and updates a row...
    let mut a = app.pool().begin().await.unwrap();
    sqlx::query("UPDATE deliveries SET status = 'sending', attempt = 1, updated_at = now() WHERE id = $1")
        .bind(&first[0])
        .execute(&mut *a)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...a later transaction commits first...
    sqlx::query("UPDATE deliveries SET status = 'sending', attempt = 1, updated_at = now() WHERE id = $1")
        .bind(&second[0])
        .execute(app.pool())
        .await
        .unwrap();
    let b = changes(&app, &token, &format!("since={start}")).await;
    let page = b["changes"].as_array().unwrap();
    assert_eq!(page.len(), 1, "{b}");
    assert_eq!(page[0]["delivery_id"], second[0].as_str());
    let cursor = b["next_cursor"].as_str().unwrap().to_owned();
    // ...then A commits, with a timestamp older than the one just seen.
    a.commit().await.unwrap();
    let (older,): (bool,) = sqlx::query_as(
        "SELECT (SELECT updated_at FROM deliveries WHERE id = $1) < (SELECT updated_at FROM deliveries WHERE id = $2)",
    )
    .bind(&first[0])
    .bind(&second[0])
    .fetch_one(app.pool())
    .await
    .unwrap();
    assert!(older, "the late row carries the older timestamp");
    let b = changes(&app, &token, &format!("since={cursor}")).await;
    let page = b["changes"].as_array().unwrap();
    assert_eq!(page.len(), 1, "the late change, and only it: {b}");
    assert_eq!(page[0]["delivery_id"], first[0].as_str());
    assert_eq!(page[0]["status"], "sending");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answers_as_soon_as_something_changes_and_empty_at_its_deadline() {
    let app = TestApp::spawn().await;
    let token = token_for(&app, "u_wait").await;
    let (ntf, _) = post_notification(&app, "u_wait", "Hello").await;
    app.wait_final(&ntf, WAIT).await;
    let cursor = now_cursor(&app, &token).await;

    // Nothing happens: empty after about the wait.
    let started = Instant::now();
    let b = changes(&app, &token, &format!("since={cursor}&wait=1")).await;
    let took = started.elapsed();
    assert_eq!(b["changes"], json!([]));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // Marking read answers a waiting request early.
    let poll = {
        let (http, url, token) = (
            app.http.clone(),
            app.url(&format!("/v1/me/changes?since={cursor}&wait=10")),
            token.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let res = http.get(url).bearer_auth(token).send().await.unwrap();
            (started.elapsed(), status_and_json(res).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = app
        .http
        .post(app.url(&format!("/v1/me/notifications/{ntf}/read")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (took, (s, b)) = poll.await.unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    assert_eq!(b["changes"][0]["read"], true, "{b}");

    // Without since, wait waits for changes after "now": a new notification
    // (accepted, then delivered by the worker) answers it.
    let poll = {
        let (http, url, token) = (app.http.clone(), app.url("/v1/me/changes?wait=10"), token.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let res = http.get(url).bearer_auth(token).send().await.unwrap();
            (started.elapsed(), status_and_json(res).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (second, _) = post_notification(&app, "u_wait", "Second").await;
    let (took, (s, b)) = poll.await.unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    assert!(
        b["changes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["notification_id"] == second.as_str()),
        "{b}"
    );
    assert!(!b["changes"].as_array().unwrap().is_empty());
    app.stop().await;
}

/// Waits until `n` processes subscribe to the prefix's events channel.
async fn wait_for_subscribers(app: &TestApp, n: i64) {
    let client = redis::Client::open(herald_testkit::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}:events", app.prefix);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, count): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        if count >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{count} subscribers to {channel}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_through_one_replica_wakes_a_long_poll_on_another() {
    let app = TestApp::spawn().await;
    let replica = app.spawn_api_replica().await;
    let token = token_for(&app, "u_multi").await;
    let (ntf, _) = post_notification(&app, "u_multi", "Hello").await;
    app.wait_final(&ntf, WAIT).await;
    // Both API processes listen (the workers publish, they do not listen).
    wait_for_subscribers(&app, 2).await;
    let (s, b) = get_as(&app, &replica.base_url, &token, "/v1/me/changes").await;
    assert_eq!(s, 200, "{b}");
    let cursor = b["next_cursor"].as_str().unwrap().to_owned();

    let poll = {
        let (http, url, token) = (
            app.http.clone(),
            replica.url(&format!("/v1/me/changes?since={cursor}&wait=10")),
            token.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let res = http.get(url).bearer_auth(token).send().await.unwrap();
            (started.elapsed(), status_and_json(res).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = app
        .http
        .post(app.url(&format!("/v1/me/notifications/{ntf}/archive")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (took, (s, b)) = poll.await.unwrap();
    assert_eq!(s, 200, "{b}");
    // Well under the 2 s re-query of a process without events: woken by Redis.
    assert!(took < Duration::from_millis(1_500), "answered after {took:?}");
    assert!(b["changes"][0]["archived_at"].is_string(), "{b}");

    // A worker's change (a new delivery's statuses) reaches it too.
    let cursor = b["next_cursor"].as_str().unwrap().to_owned();
    let poll = {
        let (http, url, token) = (
            app.http.clone(),
            replica.url(&format!("/v1/me/changes?since={cursor}&wait=10")),
            token.clone(),
        );
        tokio::spawn(async move {
            let res = http.get(url).bearer_auth(token).send().await.unwrap();
            status_and_json(res).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    post_notification(&app, "u_multi", "Second").await;
    let (s, b) = poll.await.unwrap();
    assert_eq!(s, 200, "{b}");
    assert!(!b["changes"].as_array().unwrap().is_empty(), "{b}");
    replica.stop().await;
    app.stop().await;
}

/// One parsed server-sent event (or a comment).
#[derive(Debug, Clone, Default)]
struct Sse {
    event: String,
    id: Option<String>,
    data: String,
    comment: Option<String>,
}

/// Reads server-sent events until `done` says stop or `timeout` passes.
async fn read_events(res: &mut reqwest::Response, timeout: Duration, mut done: impl FnMut(&[Sse]) -> bool) -> Vec<Sse> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = String::new();
    let mut events = Vec::new();
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut e = Sse::default();
            for line in block.lines() {
                if let Some(c) = line.strip_prefix(':') {
                    e.comment = Some(c.trim().to_owned());
                } else if let Some((field, value)) = line.split_once(':') {
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => e.event = value.to_owned(),
                        "id" => e.id = Some(value.to_owned()),
                        "data" => e.data.push_str(value),
                        _ => {}
                    }
                }
            }
            events.push(e);
            if done(&events) {
                return events;
            }
        }
        match tokio::time::timeout_at(deadline, res.chunk()).await {
            Ok(Ok(Some(chunk))) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return events,
        }
    }
}

async fn open_stream(app: &TestApp, token: &str, last_id: Option<&str>) -> reqwest::Response {
    let mut req = app.http.get(app.url("/v1/me/stream")).bearer_auth(token);
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"),
        "{:?}",
        res.headers()
    );
    res
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_sends_each_change_and_resumes_from_the_last_event_id() {
    let app = TestApp::spawn_with(Parts::all(), |env| {
        env.insert("HERALD_SSE_HEARTBEAT_SECS".into(), "1".into());
    })
    .await;
    let token = token_for(&app, "u_live").await;
    let mut res = open_stream(&app, &token, None).await;
    let first = read_events(&mut res, Duration::from_secs(5), |e| !e.is_empty()).await;
    assert_eq!(first[0].event, "ready");
    assert!(first[0].id.is_some(), "a fresh stream says where it starts");

    let (ntf, _) = post_notification(&app, "u_live", "Live").await;
    let data = |e: &Sse| serde_json::from_str::<Value>(&e.data).unwrap();
    let events = read_events(&mut res, WAIT, |events| {
        let changes: Vec<Value> = events.iter().filter(|e| e.comment.is_none()).map(data).collect();
        let delivered = changes
            .iter()
            .any(|c| c["type"] == "delivery" && c["status"] == "delivered");
        let item = changes.iter().any(|c| c["type"] == "inbox_item");
        delivered && item && events.last().is_some_and(|e| e.id.is_some())
    })
    .await;
    let changes: Vec<&Sse> = events.iter().filter(|e| e.comment.is_none()).collect();
    assert!(
        changes
            .iter()
            .any(|e| e.event == "inbox_item" && data(e)["notification_id"] == ntf.as_str()),
        "{events:?}"
    );
    assert!(changes.iter().all(|e| e.event == "delivery" || e.event == "inbox_item"));
    let last_id = events
        .last()
        .and_then(|e| e.id.clone())
        .expect("the batch's last event has an id");
    drop(res);

    // Offline: the item is read. Reconnecting from the last id brings only that.
    let r = app
        .http
        .post(app.url(&format!("/v1/me/notifications/{ntf}/read")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut res = open_stream(&app, &token, Some(&last_id)).await;
    let events = read_events(&mut res, Duration::from_secs(10), |events| {
        events.iter().any(|e| e.event == "inbox_item")
    })
    .await;
    let changes: Vec<&Sse> = events
        .iter()
        .filter(|e| e.event == "delivery" || e.event == "inbox_item")
        .collect();
    assert_eq!(changes.len(), 1, "only what changed since the last id: {events:?}");
    assert_eq!(data(changes[0])["read"], true);
    assert!(changes[0].id.is_some());

    // Idle: heartbeat comments keep the connection alive.
    let idle = read_events(&mut res, Duration::from_millis(2_500), |_| false).await;
    assert!(
        idle.iter().any(|e| e.comment.as_deref() == Some("heartbeat")),
        "{idle:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_after_a_fresh_stream_answered_is_sent_even_when_its_first_query_waited() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let token = token_for(&app, "u_open").await;
    let (_, deliveries) = post_notification(&app, "u_open", "before").await;
    let change = "UPDATE deliveries SET status = 'sending', attempt = 1, updated_at = now() WHERE id = $1";

    // The stream's queries wait behind this lock, as on a busy API.
    let mut lock = app.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let request = app.http.get(app.url("/v1/me/stream")).bearer_auth(&token).send();
    tokio::pin!(request);
    let mut res = match tokio::time::timeout(Duration::from_millis(700), &mut request).await {
        // Answered before its starting point was fixed: a change committed
        // now is after the 200, so it must still be sent.
        Ok(res) => {
            sqlx::query(change)
                .bind(&deliveries[0])
                .execute(&mut *lock)
                .await
                .unwrap();
            lock.commit().await.unwrap();
            res.unwrap()
        }
        // Waiting for its starting point: the change comes once it answered.
        Err(_) => {
            lock.commit().await.unwrap();
            let res = request.await.unwrap();
            sqlx::query(change)
                .bind(&deliveries[0])
                .execute(app.pool())
                .await
                .unwrap();
            res
        }
    };
    assert_eq!(res.status(), 200);
    let events = read_events(&mut res, Duration::from_secs(10), |events| {
        events
            .iter()
            .any(|e| e.event == "delivery" && e.data.contains("\"sending\""))
    })
    .await;
    assert!(
        events.iter().any(|e| {
            e.event == "delivery"
                && serde_json::from_str::<Value>(&e.data)
                    .is_ok_and(|c| c["delivery_id"] == deliveries[0].as_str() && c["status"] == "sending")
        }),
        "the change after the 200 was not sent: {events:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_ends_when_the_user_token_expires() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "u_short", "aud": "herald-user", "iat": exp - 60, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(herald_config::DEVELOPMENT_USER_TOKEN_SECRET.as_bytes()),
    )
    .unwrap();
    let mut res = open_stream(&app, &token, None).await;
    let started = Instant::now();
    let events = read_events(&mut res, Duration::from_secs(10), |_| false).await;
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(
        events.last().map(|e| e.event.as_str()),
        Some("token_expired"),
        "{events:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cursors_waits_limits_and_credentials_are_refused_clearly() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let token = token_for(&app, "u_bad").await;
    let code = |b: &Value| b["error"]["code"].as_str().unwrap_or_default().to_owned();
    for (query, field) in [
        ("since=garbage", "since"),
        ("since=AgAAAAAAAAAAAA", "since"),
        ("wait=31", "wait"),
        ("wait=soon", "wait"),
        ("wait=-1", "wait"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=many", "limit"),
        ("colour=red", "colour"),
    ] {
        let (s, b) = get_as(&app, &app.base_url, &token, &format!("/v1/me/changes?{query}")).await;
        assert_eq!((s, code(&b)), (400, "invalid_query".to_owned()), "{query}: {b}");
        assert_eq!(b["error"]["details"]["field"], field, "{query}: {b}");
    }
    let (s, b) = get_as(&app, &app.base_url, &token, "/v1/me/stream?since=garbage").await;
    assert_eq!((s, code(&b)), (400, "invalid_query".to_owned()), "{b}");
    let res = app
        .http
        .get(app.url("/v1/me/stream"))
        .bearer_auth(&token)
        .header("last-event-id", "not-a-cursor")
        .send()
        .await
        .unwrap();
    let (s, b) = status_and_json(res).await;
    assert_eq!(
        (s, b["error"]["details"]["field"].as_str()),
        (400, Some("Last-Event-ID")),
        "{b}"
    );
    for path in ["/v1/me/changes", "/v1/me/stream"] {
        let (s, b) = get_as(&app, &app.base_url, &app.api_key, path).await;
        assert_eq!((s, code(&b)), (403, "api_key_not_allowed".to_owned()), "{path}");
        let (s, b) = get_as(&app, &app.base_url, "eyJhbGciOiJIUzI1NiJ9.e30.bm9wZQ", path).await;
        assert_eq!((s, code(&b)), (401, "invalid_user_token".to_owned()), "{path}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_changes_still_come_from_postgres() {
    // Nothing listens on port 1: Redis is down for this whole test.
    let app = TestApp::spawn_with(Parts::api_only(), |env| {
        env.insert("REDIS_URL".into(), "redis://127.0.0.1:1".into());
    })
    .await;
    let token = token_for(&app, "u_noredis").await;
    let cursor = now_cursor(&app, &token).await;
    let (ntf, _) = post_notification(&app, "u_noredis", "Still accepted").await;
    let b = changes(&app, &token, &format!("since={cursor}")).await;
    let page = b["changes"].as_array().unwrap();
    assert_eq!(page.len(), 1, "{b}");
    assert_eq!(
        (page[0]["notification_id"].as_str(), page[0]["status"].as_str()),
        (Some(ntf.as_str()), Some("queued"))
    );
    // A long-poll still answers, at its deadline when nothing changes.
    let cursor = b["next_cursor"].as_str().unwrap();
    let started = Instant::now();
    let b = changes(&app, &token, &format!("since={cursor}&wait=1")).await;
    assert_eq!(b["changes"], json!([]));
    assert!(started.elapsed() < Duration::from_secs(4));
    app.stop().await;
}
