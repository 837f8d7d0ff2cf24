//! Accepted batches and their push intents: the API marks a batch's
//! deliveries enqueued in the insert and confirms the batch once its jobs
//! are in Redis; the sweeper re-enqueues a batch that was never confirmed,
//! and leaves confirmed ones (waiting their turn in Redis) alone.

use std::time::Duration;

use herald_core::{Channel, Priority};
use herald_db::notifications::NewNotificationWithDeliveries;
use herald_queue::{QueueClient, QueueConfig, QueueName};
use herald_testkit::{Parts, TestApp};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn in_app_notification(user: &str) -> NewNotificationWithDeliveries {
    herald_testkit::seed::notification(user, &["in_app"])
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(app.pool()).await.expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_committed_but_never_pushed_is_delivered_by_the_sweeper() {
    // The workers start only after the batch is written: a sweeper's first
    // pass on a Redis without its epoch marker re-enqueues every waiting
    // delivery on purpose (Redis lost its data), which would deliver this
    // batch without the intent ever being looked at (and, racing the
    // insert, clear its marks before the checks below).
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let queue = QueueClient::new(QueueConfig::from_settings(&app.settings)).expect("queue client");
    queue.check_epoch().await.expect("set the epoch marker");
    // What an API process leaves behind when it dies right after the
    // commit: the rows, marked enqueued, with the batch's intent, and no job.
    let batch: Vec<_> = (0..25).map(|i| in_app_notification(&format!("u_{i}"))).collect();
    let inserted = herald_db::notifications::insert_notifications(app.pool(), &batch)
        .await
        .expect("insert");
    assert!(
        inserted.push_intent.is_some(),
        "a batch with queued deliveries has an intent"
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM deliveries WHERE status = 'queued' AND enqueued_at IS NOT NULL"
        )
        .await,
        25,
        "accepted deliveries are written marked enqueued"
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let workers = {
        let (settings, stop) = (app.settings.clone(), stop.clone());
        tokio::spawn(async move { herald_workers::run(settings, &[Channel::InApp], stop).await })
    };
    // After the grace period (2 s) a sweep pass (every second in tests)
    // turns the intent back into owed deliveries and pushes their jobs.
    let delivered = app
        .wait_count("SELECT count(*) FROM deliveries WHERE status = 'delivered'", 25, WAIT)
        .await;
    assert_eq!(delivered, 25);
    assert_eq!(count(&app, "SELECT count(*) FROM push_intents").await, 0);
    assert_eq!(
        count(&app, "SELECT count(*) FROM delivery_attempts").await,
        25,
        "one attempt each"
    );
    stop.cancel();
    workers.await.expect("workers task").expect("workers ran");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_batches_waiting_in_redis_are_not_pushed_again() {
    // The API alone: the jobs wait in Redis, as in a backlog.
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let queue = QueueClient::new(QueueConfig::from_settings(&app.settings)).expect("queue client");
    // A first pass sets Redis's epoch marker (a pass that finds none
    // re-enqueues everything on purpose: Redis lost its data).
    herald_workers::sweeper::sweep_once(app.pool(), &queue)
        .await
        .expect("first sweep");
    for i in 0..30 {
        let (s, doc) = app
            .post_json(
                "/v1/notifications",
                &json!({"user_id": format!("u_{i}"), "channels": ["in_app"], "title": "Hi"}),
            )
            .await;
        assert_eq!(s, 202, "{doc}");
    }
    let unconfirmed = app
        .wait_count("SELECT count(*) FROM push_intents", 0, Duration::from_secs(5))
        .await;
    assert_eq!(unconfirmed, 0, "the API confirms every batch whose jobs are in Redis");
    // Well past the grace period, a pass finds nothing owed.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let report = herald_workers::sweeper::sweep_once(app.pool(), &queue)
        .await
        .expect("sweep");
    assert!(report.ran);
    assert_eq!(report.enqueued, 0, "no duplicate job for a delivery waiting its turn");
    let ready = queue
        .counts(QueueName::new(Channel::InApp, Priority::Normal))
        .await
        .expect("counts")
        .ready;
    assert_eq!(ready, 30, "one job per delivery");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_only_skipped_deliveries_leaves_no_intent() {
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    // Nobody is known: email is skipped, and nothing is owed a job.
    let n = herald_testkit::seed::notification("nobody", &["email"]);
    let inserted = herald_db::notifications::insert_notifications(app.pool(), &[n])
        .await
        .expect("insert");
    assert_eq!(inserted.accepted[0].deliveries[0].status, "skipped");
    assert_eq!(inserted.push_intent, None);
    assert_eq!(count(&app, "SELECT count(*) FROM push_intents").await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_api_pushes_and_confirms_every_batch_it_answered() {
    // A second API process takes the requests and is stopped the moment
    // the last one is answered: what it owes them after the 202 (the Redis
    // push, then the confirmation, which lingers 100 ms) must be done
    // before it exits, not left to the sweeper.
    let app = TestApp::spawn_with(Parts::api_only(), |_| {}).await;
    let queue = QueueClient::new(QueueConfig::from_settings(&app.settings)).expect("queue client");
    let replica = app.spawn_api_replica().await;
    let posts: Vec<_> = (0..64)
        .map(|i| {
            let (http, url, key) = (app.http.clone(), replica.url("/v1/notifications"), app.api_key.clone());
            tokio::spawn(async move {
                let res = http
                    .post(url)
                    .bearer_auth(key)
                    .json(&json!({"user_id": format!("u_{i}"), "channels": ["in_app"], "title": "Hi"}))
                    .send()
                    .await
                    .expect("POST");
                res.status().as_u16()
            })
        })
        .collect();
    for p in posts {
        assert_eq!(p.await.expect("request task"), 202);
    }
    replica.stop().await;
    // Checked at once: nothing here waits for anything to catch up.
    assert_eq!(
        count(&app, "SELECT count(*) FROM push_intents").await,
        0,
        "every answered batch was confirmed before the API exited"
    );
    let ready = queue
        .counts(QueueName::new(Channel::InApp, Priority::Normal))
        .await
        .expect("counts")
        .ready;
    assert_eq!(ready, 64, "every accepted delivery's job is in Redis");
    app.stop().await;
}
