//! Figures for operators' tooling over a large dead-letter queue: list,
//! filter and dry-run over N dead letters, then replay all N at full pace
//! through the in-app channel and check that each was sent exactly once
//! more. The replay is timed in two parts: the runner alone (moving every
//! delivery back to `queued` and pushing its job), then the in-app workers
//! (in-process) draining the queue.
//!
//! N is 5,000 by default (a few seconds); `HERALD_ADMIN_BENCH=1` makes it
//! 100,000 (the figures in docs/performance.md). Run with `--nocapture` to
//! see them: `cargo test -p herald-tests --test it admin::figures -- --nocapture`.

use std::time::{Duration, Instant};

use herald_testkit::seed::{DeadLetters, seed_dead_letters};
use herald_testkit::{Parts, TestApp};
use serde_json::{Value, json};

async fn timed_get(app: &TestApp, path: &str) -> (Duration, Value) {
    let t = Instant::now();
    let (s, v) = app.get_json(path).await;
    assert_eq!(s, 200, "{path}: {v}");
    (t.elapsed(), v)
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.pool()).await.unwrap()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filtering_and_replaying_many_dead_letters_finds_them_all_and_sends_each_once() {
    let n: i64 = if std::env::var("HERALD_ADMIN_BENCH").is_ok_and(|v| v == "1") {
        100_000
    } else {
        5_000
    };
    // Workers start later, so the runner's own time can be told apart.
    let app = TestApp::spawn_with(Parts::api_only(), |env| {
        env.insert("HERALD_WORKER_CONCURRENCY".into(), "64".into());
        env.insert("HERALD_DB_MAX_CONNECTIONS".into(), "16".into());
    })
    .await;
    let t = Instant::now();
    let seed = DeadLetters {
        count: n,
        users: (n / 10).max(1),
        error: "inbox write timed out after 5s",
        ..DeadLetters::default()
    };
    seed_dead_letters(app.pool(), &seed).await;
    sqlx::query("ANALYZE deliveries").execute(app.pool()).await.unwrap();
    let seeded = t.elapsed();

    // List: the first page, and twenty pages deep through the cursor.
    let (first_page, page) = timed_get(&app, "/v1/admin/deliveries?status=dead&limit=50").await;
    assert_eq!(page["deliveries"].as_array().unwrap().len(), 50);
    let mut cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let t = Instant::now();
    for _ in 0..20 {
        let (_, p) = timed_get(
            &app,
            &format!("/v1/admin/deliveries?status=dead&limit=50&cursor={cursor}"),
        )
        .await;
        cursor = p["next_cursor"].as_str().unwrap().to_owned();
    }
    let per_page = t.elapsed() / 20;
    // Filter: error text (trigram index), and a user's dead letters.
    let (by_text, p) = timed_get(
        &app,
        "/v1/admin/deliveries?status=dead&channel=in_app&q=timed%20out%20after&limit=50",
    )
    .await;
    assert_eq!(p["deliveries"].as_array().unwrap().len(), 50);
    let (rare_text, p) = timed_get(&app, "/v1/admin/deliveries?q=after%205s%20%23777&limit=50").await;
    assert!(!p["deliveries"].as_array().unwrap().is_empty());
    let (by_user, p) = timed_get(&app, "/v1/admin/deliveries?user_id=u_seed_7&limit=200").await;
    assert_eq!(
        p["deliveries"].as_array().unwrap().len(),
        10.min(usize::try_from(n).unwrap())
    );
    let (queues, _) = timed_get(&app, "/v1/admin/queues").await;

    // Dry run over everything.
    let t = Instant::now();
    let (s, dry) = app
        .post_json(
            "/v1/admin/replays",
            &json!({"filter": {"status": "dead"}, "dry_run": true}),
        )
        .await;
    let dry_run = t.elapsed();
    assert_eq!(s, 200, "{dry}");
    assert_eq!(
        (dry["matched"].as_i64(), dry["would_replay"].as_i64()),
        (Some(n), Some(n)),
        "{dry}"
    );

    // Replay everything at full pace: the runner first, on its own.
    let t = Instant::now();
    let (s, r) = app
        .post_json(
            "/v1/admin/replays",
            &json!({"filter": {"status": "dead"}, "confirm_large": true}),
        )
        .await;
    let create = t.elapsed();
    assert_eq!(s, 202, "{r}");
    let queue = herald_queue::QueueClient::new(herald_queue::QueueConfig::from_settings(&app.settings)).unwrap();
    let pool = herald_db::connect_lazy(app.settings.database_url.expose(), 2).unwrap();
    let runner = herald_workers::replayer::Replayer::new(pool, queue, &app.settings);
    let shutdown = tokio_util::sync::CancellationToken::new();
    assert!(runner.run_one(&shutdown).await.unwrap());
    let replayed_in = t.elapsed();
    let (_, done) = app
        .get_json(&format!("/v1/admin/replays/{}", r["id"].as_str().unwrap()))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["replayed"].as_i64(), Some(n), "{done}");
    // Then the in-app workers drain what it queued.
    let t_drain = Instant::now();
    let workers = {
        let (settings, token) = (app.settings.clone(), shutdown.clone());
        tokio::spawn(async move { herald_workers::run(settings, &[herald_core::Channel::InApp], token).await })
    };
    let timeout = Duration::from_secs(60 + u64::try_from(n / 500).unwrap_or(0));
    let delivered = app
        .wait_count("SELECT count(*) FROM deliveries WHERE status = 'delivered'", n, timeout)
        .await;
    let drained_in = t_drain.elapsed();
    let delivered_in = t.elapsed();
    shutdown.cancel();
    let _ = workers.await;
    assert_eq!(delivered, n);

    // Sent exactly once more: one new attempt each, one inbox item each.
    assert_eq!(
        count(&app, "SELECT count(*) FROM deliveries WHERE attempt <> 4").await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM (SELECT delivery_id FROM delivery_attempts GROUP BY 1 HAVING count(*) <> 4) x"
        )
        .await,
        0
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM delivery_attempts WHERE attempt = 4").await,
        n
    );
    assert_eq!(count(&app, "SELECT count(*) FROM inbox_items").await, n);
    // And replaying the same filter again finds nothing to do.
    let (_, again) = app
        .post_json(
            "/v1/admin/replays",
            &json!({"filter": {"status": "dead"}, "dry_run": true}),
        )
        .await;
    assert_eq!(again["matched"], 0, "{again}");

    let rate = n as f64 / delivered_in.as_secs_f64();
    let runner_rate = n as f64 / replayed_in.as_secs_f64();
    let drain_rate = n as f64 / drained_in.as_secs_f64();
    let row = |label: &str, value: String| println!("  {label:<40} {value}");
    println!("\nadmin figures over {n} dead letters (loopback, debug build, this machine):");
    row(
        "seed (INSERT … SELECT generate_series)",
        format!("{:.2} s", seeded.as_secs_f64()),
    );
    row("list: first page of 50", ms(first_page));
    row("list: a page via the cursor (20 deep)", ms(per_page));
    row("filter: channel + error text", ms(by_text));
    row("filter: rare error text", ms(rare_text));
    row("filter: one user's deliveries", ms(by_user));
    row("queue table (GET /v1/admin/queues)", ms(queues));
    row("dry run over all", ms(dry_run));
    row(&format!("replay: create (snapshot of {n})"), ms(create));
    row(
        "replay: runner (all queued, jobs pushed)",
        format!("{:.2} s ({runner_rate:.0}/s)", replayed_in.as_secs_f64()),
    );
    row(
        "replay: in-app workers drain",
        format!("{:.2} s ({drain_rate:.0}/s)", drained_in.as_secs_f64()),
    );
    row(
        "replay: end to end, all delivered",
        format!("{:.2} s ({rate:.0}/s)", delivered_in.as_secs_f64()),
    );
    row("sent twice", "0 (each has exactly one new attempt)".to_owned());
    app.stop().await;
}
