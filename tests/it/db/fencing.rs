//! Claims and results are fenced on the attempt number, in SQL: a
//! duplicate job or a stale worker can neither send twice nor move a
//! status backwards.

use herald_core::PushProvider;
use herald_db::deliveries::{
    AttemptResult, NextState, Recorded, claim_deliveries, claim_delivery, deliver_in_app, record_attempt,
};
use herald_testkit::TestDb;

/// [`claim_deliveries`] on a connection of its own from `pool`.
async fn claim_on(
    pool: &sqlx::PgPool,
    jobs: &[(String, i32)],
    lease_secs: f64,
    worker: &str,
) -> herald_db::Result<Vec<Option<herald_db::deliveries::ClaimedDelivery>>> {
    claim_deliveries(&mut *pool.acquire().await?, jobs, lease_secs, worker).await
}

/// [`deliver_in_app`] on a connection of its own from `pool`.
async fn in_app_on(
    pool: &sqlx::PgPool,
    jobs: &[(String, i32)],
    worker: &str,
) -> herald_db::Result<Vec<Option<herald_db::deliveries::InboxDelivered>>> {
    deliver_in_app(&mut *pool.acquire().await?, jobs, worker).await
}

async fn one_queued_delivery(db: &TestDb) -> String {
    one_queued_delivery_on(db, "in_app", "u_1").await
}

async fn one_queued_delivery_on(db: &TestDb, channel: &'static str, user: &str) -> String {
    let item = herald_testkit::seed::notification(user, &[channel]);
    let dlv = item.deliveries[0].id.clone();
    herald_db::notifications::insert_notifications(&db.pool, &[item])
        .await
        .unwrap();
    dlv
}

fn result(id: &str, attempt: i32, next: NextState, outcome: &'static str) -> AttemptResult {
    AttemptResult {
        delivery_id: id.to_owned(),
        attempt,
        next,
        outcome,
        provider_status: None,
        error: None,
        detail: None,
    }
}

/// The same result for the first attempt of each of these deliveries.
fn first_attempts(ids: &[String], next: &NextState, outcome: &'static str) -> Vec<AttemptResult> {
    ids.iter().map(|id| result(id, 1, next.clone(), outcome)).collect()
}

async fn status_of(db: &TestDb, id: &str) -> (String, i32) {
    sqlx::query_as("SELECT status, attempt FROM deliveries WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_duplicate_job_cannot_claim_a_delivery_twice() {
    let db = TestDb::new().await;
    let id = one_queued_delivery(&db).await;
    let first = claim_delivery(&db.pool, &id, 0, 30.0, "w1").await.unwrap();
    assert_eq!(first.map(|c| c.attempt), Some(1));
    // The same job again (Redis redelivered it, or the sweeper pushed a copy).
    assert!(claim_delivery(&db.pool, &id, 0, 30.0, "w2").await.unwrap().is_none());
    assert!(matches!(
        record_attempt(&db.pool, &result(&id, 1, NextState::Delivered, "delivered"))
            .await
            .unwrap(),
        Recorded::Moved { .. }
    ));
    // A late copy after it finished changes nothing.
    assert!(claim_delivery(&db.pool, &id, 0, 30.0, "w3").await.unwrap().is_none());
    assert!(claim_delivery(&db.pool, &id, 1, 30.0, "w3").await.unwrap().is_none());
    assert_eq!(status_of(&db, &id).await, ("delivered".into(), 1));
    db.drop_db().await;
}

#[tokio::test]
async fn a_stale_worker_cannot_overwrite_a_newer_attempt_or_move_a_status_back() {
    let db = TestDb::new().await;
    let id = one_queued_delivery(&db).await;
    // Worker A claims attempt 1, then stalls past its lease.
    claim_delivery(&db.pool, &id, 0, 0.0, "stalled").await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let swept = herald_db::sweep::sweep(&db.pool, 0.0, 100).await.unwrap();
    assert_eq!(swept.expired_leases, 1);
    assert_eq!(status_of(&db, &id).await, ("retrying".into(), 1));
    // Worker B takes attempt 2 and succeeds.
    let b = claim_delivery(&db.pool, &id, 1, 30.0, "fresh").await.unwrap().unwrap();
    assert_eq!(b.attempt, 2);
    assert!(matches!(
        record_attempt(&db.pool, &result(&id, 2, NextState::Sent, "sent"))
            .await
            .unwrap(),
        Recorded::Moved { .. }
    ));
    // Worker A wakes up and reports a failure for attempt 1: not applied.
    let late = result(&id, 1, NextState::Failed, "permanent");
    assert_eq!(record_attempt(&db.pool, &late).await.unwrap(), Recorded::Stale);
    assert_eq!(status_of(&db, &id).await, ("sent".into(), 2));
    // Its attempt row still tells what happened at the provider.
    let outcomes: Vec<(i32, Option<String>)> =
        sqlx::query_as("SELECT attempt, outcome FROM delivery_attempts WHERE delivery_id = $1 ORDER BY attempt")
            .bind(&id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(outcomes, vec![(1, Some("permanent".into())), (2, Some("sent".into()))]);
    db.drop_db().await;
}

#[tokio::test]
async fn in_one_batch_a_stale_copy_of_a_job_does_not_shadow_the_current_one() {
    let db = TestDb::new().await;
    let id = one_queued_delivery(&db).await;
    // Attempt 1 is claimed and fails; the delivery waits for attempt 2.
    claim_delivery(&db.pool, &id, 0, 30.0, "w").await.unwrap().unwrap();
    let retry = result(
        &id,
        1,
        NextState::Retrying {
            after: std::time::Duration::ZERO,
        },
        "transient",
    );
    let recorded = record_attempt(&db.pool, &retry).await.unwrap();
    assert!(
        matches!(
            recorded,
            Recorded::Moved {
                next_attempt_at: Some(_)
            }
        ),
        "{recorded:?}"
    );
    // The old job (attempt 0), the current one (1) and a duplicate of it.
    let jobs = vec![(id.clone(), 0), (id.clone(), 1), (id.clone(), 1)];
    let claims = claim_on(&db.pool, &jobs, 30.0, "w").await.unwrap();
    let attempts: Vec<Option<i32>> = claims.iter().map(|c| c.as_ref().map(|c| c.attempt)).collect();
    assert_eq!(attempts, vec![None, Some(2), None]);
    db.drop_db().await;
}

/// A user with an email address, so that email deliveries are not skipped.
async fn reachable_user(db: &TestDb, id: &str) {
    let user = herald_db::users::UserUpsert {
        id,
        email: Some("someone@example.com"),
        locale: None,
        timezone: None,
    };
    herald_db::users::upsert_user(&db.pool, &user).await.unwrap();
}

async fn count(db: &TestDb, sql: &str, id: &str) -> i64 {
    sqlx::query_scalar(sql).bind(id).fetch_one(&db.pool).await.unwrap()
}

#[tokio::test]
async fn an_in_app_delivery_is_written_whole_once_and_stale_copies_change_nothing() {
    let db = TestDb::new().await;
    let id = one_queued_delivery(&db).await;
    // A stale job (wrong attempt count) finds nothing to do and writes nothing.
    let stale = in_app_on(&db.pool, &[(id.clone(), 1)], "w0").await.unwrap();
    assert!(stale[0].is_none());
    let inbox = "SELECT count(*) FROM inbox_items i JOIN deliveries d ON d.notification_id = i.notification_id
                 WHERE d.id = $1";
    assert_eq!(count(&db, inbox, &id).await, 0);
    assert_eq!(status_of(&db, &id).await, ("queued".into(), 0));

    // The job and a duplicate of it in one batch: one delivers, one is stale.
    let done = in_app_on(&db.pool, &[(id.clone(), 0), (id.clone(), 0)], "w1")
        .await
        .unwrap();
    let delivered: Vec<bool> = done.iter().map(Option::is_some).collect();
    assert_eq!(delivered, vec![true, false]);
    let d = done[0].as_ref().unwrap();
    assert_eq!((d.user_id.as_str(), d.attempt, d.title.as_str()), ("u_1", 1, "t"));
    assert_eq!(status_of(&db, &id).await, ("delivered".into(), 1));
    assert_eq!(count(&db, inbox, &id).await, 1);
    // The attempt is in the history, complete, with the worker that made it.
    let attempts = herald_db::deliveries::list_attempts(&db.pool, &id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    let a = &attempts[0];
    assert_eq!(
        (a.attempt, a.worker_id.as_str(), a.outcome.as_deref()),
        (1, "w1", Some("delivered"))
    );
    assert!(a.finished_at.is_some());
    let stamped: (bool, bool) = sqlx::query_as(
        "SELECT delivered_at IS NOT NULL AND finished_at IS NOT NULL, lease_until IS NULL FROM deliveries WHERE id = $1",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stamped, (true, true));

    // A late copy after it finished: nothing moves, nothing is duplicated.
    assert!(in_app_on(&db.pool, &[(id.clone(), 0)], "w2").await.unwrap()[0].is_none());
    assert!(in_app_on(&db.pool, &[(id.clone(), 1)], "w2").await.unwrap()[0].is_none());
    assert_eq!(count(&db, inbox, &id).await, 1);
    assert_eq!(status_of(&db, &id).await, ("delivered".into(), 1));
    db.drop_db().await;
}

/// Writes the row a delivery's next attempt will have, as no claim would
/// (by hand, against the invariant that a delivery's attempt rows are all
/// at or below its attempt count).
async fn attempt_row_ahead(db: &TestDb, id: &str) {
    sqlx::query(
        "INSERT INTO delivery_attempts (delivery_id, attempt, worker_id, started_at, outcome)
         VALUES ($1, 1, 'by hand', now(), 'ambiguous')",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_claim_or_in_app_delivery_that_meets_a_row_already_written_keeps_it_and_goes_on() {
    let db = TestDb::new().await;
    reachable_user(&db, "u_1").await;
    let email = one_queued_delivery_on(&db, "email", "u_1").await;
    let other = one_queued_delivery_on(&db, "email", "u_1").await;
    let in_app = one_queued_delivery(&db).await;
    let in_app_item = one_queued_delivery_on(&db, "in_app", "u_2").await;
    attempt_row_ahead(&db, &email).await;
    attempt_row_ahead(&db, &in_app).await;
    sqlx::query(
        "INSERT INTO inbox_items (notification_id, user_id, category, title, body)
         SELECT notification_id, user_id, 'by hand', 'by hand', '' FROM deliveries WHERE id = $1",
    )
    .bind(&in_app_item)
    .execute(&db.pool)
    .await
    .unwrap();

    // The statements the workers run first do not look for such rows: they
    // fail on them, and nothing of theirs is written.
    let jobs = serde_json::json!({ &email: [0], &in_app: [0], &in_app_item: [0] });
    for (sql, ids, constraint) in [
        (herald_db::deliveries::CLAIM_SQL, vec![&email], "delivery_attempts_pkey"),
        (
            herald_db::deliveries::DELIVER_IN_APP_SQL,
            vec![&in_app],
            "delivery_attempts_pkey",
        ),
        (
            herald_db::deliveries::DELIVER_IN_APP_SQL,
            vec![&in_app_item],
            "inbox_items_pkey",
        ),
    ] {
        let mut q = sqlx::query(sql).bind(&ids).bind(&jobs);
        if sql == herald_db::deliveries::CLAIM_SQL {
            q = q.bind(30.0_f64);
        }
        let err = q.bind("w").execute(&db.pool).await.unwrap_err();
        let err = herald_db::DbError::from(err);
        assert!(err.is_conflict_on(constraint), "{constraint}: {err}");
    }
    assert_eq!(status_of(&db, &email).await, ("queued".into(), 0));

    // The functions run them again keeping the row: the batch is claimed,
    // or delivered, all the same.
    let claimed = claim_on(&db.pool, &[(email.clone(), 0), (other.clone(), 0)], 30.0, "w1")
        .await
        .unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|c| c.as_ref().map(|c| c.attempt))
            .collect::<Vec<_>>(),
        [Some(1), Some(1)]
    );
    assert_eq!(status_of(&db, &email).await, ("sending".into(), 1));
    let done = in_app_on(&db.pool, &[(in_app.clone(), 0), (in_app_item.clone(), 0)], "w1")
        .await
        .unwrap();
    assert!(done.iter().all(Option::is_some), "{done:?}");
    assert_eq!(status_of(&db, &in_app).await, ("delivered".into(), 1));
    assert_eq!(status_of(&db, &in_app_item).await, ("delivered".into(), 1));
    let workers = "SELECT string_agg(worker_id, ',' ORDER BY attempt) FROM delivery_attempts WHERE delivery_id = $1";
    for (id, worker) in [
        (&email, "by hand"),
        (&other, "w1"),
        (&in_app, "by hand"),
        (&in_app_item, "w1"),
    ] {
        let found: String = sqlx::query_scalar(workers).bind(id).fetch_one(&db.pool).await.unwrap();
        assert_eq!(found, worker, "{id}");
    }
    let title: String = sqlx::query_scalar(
        "SELECT i.title FROM inbox_items i JOIN deliveries d ON d.notification_id = i.notification_id WHERE d.id = $1",
    )
    .bind(&in_app_item)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(title, "by hand");
    db.drop_db().await;
}

#[tokio::test]
async fn the_in_app_path_takes_only_in_app_deliveries_and_resumes_a_retrying_one() {
    let db = TestDb::new().await;
    // An email delivery's job must never be "delivered" by an in-app worker.
    reachable_user(&db, "u_1").await;
    let email = one_queued_delivery_on(&db, "email", "u_1").await;
    assert!(in_app_on(&db.pool, &[(email.clone(), 0)], "w").await.unwrap()[0].is_none());
    assert_eq!(status_of(&db, &email).await, ("queued".into(), 0));

    // An in-app delivery whose first attempt was claimed and then lapsed
    // (retrying at attempt 1) is delivered by its attempt-1 job as attempt 2.
    let id = one_queued_delivery(&db).await;
    claim_delivery(&db.pool, &id, 0, 30.0, "w").await.unwrap().unwrap();
    let retry = result(
        &id,
        1,
        NextState::Retrying {
            after: std::time::Duration::ZERO,
        },
        "transient",
    );
    record_attempt(&db.pool, &retry).await.unwrap();
    let done = in_app_on(&db.pool, &[(id.clone(), 1)], "w").await.unwrap();
    assert_eq!(done[0].as_ref().map(|d| d.attempt), Some(2));
    assert_eq!(status_of(&db, &id).await, ("delivered".into(), 2));
    assert_eq!(
        herald_db::deliveries::list_attempts(&db.pool, &id).await.unwrap().len(),
        2
    );
    db.drop_db().await;
}

#[tokio::test]
async fn a_push_claim_reads_the_users_active_devices_in_the_same_statement() {
    let db = TestDb::new().await;
    reachable_user(&db, "u_push").await;
    let (old, _) = herald_db::users::register_device(&db.pool, "u_push", "ios", "apns", "tok-a")
        .await
        .unwrap();
    let (gone, _) = herald_db::users::register_device(&db.pool, "u_push", "android", "fcm", "tok-b")
        .await
        .unwrap();
    let (new, _) = herald_db::users::register_device(&db.pool, "u_push", "web", "webpush", "tok-c")
        .await
        .unwrap();
    herald_db::users::disable_device(&db.pool, &gone.id, "unregistered")
        .await
        .unwrap();
    let push = one_queued_delivery_on(&db, "push", "u_push").await;
    let email = one_queued_delivery_on(&db, "email", "u_push").await;
    let claims = claim_on(&db.pool, &[(push, 0), (email, 0)], 30.0, "w").await.unwrap();
    let devices: Vec<(String, PushProvider, String)> = claims[0]
        .as_ref()
        .unwrap()
        .devices
        .0
        .iter()
        .map(|d| (d.id.clone(), d.provider, d.token.clone()))
        .collect();
    // Active devices only, oldest first.
    assert_eq!(
        devices,
        vec![
            (old.id, PushProvider::Apns, "tok-a".to_owned()),
            (new.id, PushProvider::WebPush, "tok-c".to_owned()),
        ]
    );
    // Other channels carry none.
    assert!(claims[1].as_ref().unwrap().devices.0.is_empty());
    db.drop_db().await;
}

/// Makes `conn`'s backend publish its statistics counters and read fresh
/// ones.
async fn flush_stats(conn: &mut sqlx::PgConnection) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// Index and sequential scans of `deliveries` so far, as seen by `conn`'s
/// backend once its own counters are flushed.
async fn deliveries_scans(conn: &mut sqlx::PgConnection) -> (i64, i64) {
    flush_stats(conn).await;
    sqlx::query_as(
        "SELECT (SELECT COALESCE(idx_scan, 0) FROM pg_stat_user_indexes WHERE indexrelname = 'deliveries_pending'),
                (SELECT COALESCE(seq_scan, 0) FROM pg_stat_user_tables WHERE relname = 'deliveries')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// Four queued deliveries to work on (returned), then 20,000 more queued
/// ones: a backlog that arrives before the next analyze.
async fn backlog_arrives(db: &TestDb) -> Vec<String> {
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(one_queued_delivery(db).await);
    }
    sqlx::query(
        "WITH n AS (
             INSERT INTO notifications (id, user_id, category, priority, title, body)
             SELECT 'ntf_new' || g, 'u_new', 'c', 'normal', 't', 'b' FROM generate_series(1, 20000) g
             RETURNING id
         )
         INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, max_attempts)
         SELECT 'dlv_new' || substr(id, 8), id, 'u_new', 'in_app', 'normal', 'queued', 3 FROM n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    waiting
}

#[tokio::test]
async fn worker_statements_find_deliveries_by_primary_key_even_with_stale_statistics() {
    let db = TestDb::new().await;
    // Statistics taken after a quiet hour: 20,000 deliveries, none pending…
    sqlx::query(
        "WITH n AS (
             INSERT INTO notifications (id, user_id, category, priority, title, body)
             SELECT 'ntf_old' || g, 'u_old', 'c', 'normal', 't', 'b' FROM generate_series(1, 20000) g
             RETURNING id
         )
         INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, max_attempts, finished_at)
         SELECT 'dlv_old' || substr(id, 8), id, 'u_old', 'in_app', 'normal', 'delivered', 3, now() FROM n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE deliveries").execute(&db.pool).await.unwrap();
    // …then a backlog arrives before the next analyze.
    let waiting = backlog_arrives(&db).await;

    // One connection, so the scans counted are the statements' own.
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let mut conn = one.acquire().await.unwrap();
    let before = deliveries_scans(&mut conn).await;
    drop(conn);
    let jobs: Vec<(String, i32)> = waiting.iter().map(|id| (id.clone(), 0)).collect();
    herald_db::notifications::mark_enqueued(&one, &jobs[..2]).await.unwrap();
    let claimed = claim_on(&one, &jobs[..2], 30.0, "w").await.unwrap();
    assert!(claimed.iter().all(Option::is_some));
    let results = first_attempts(&waiting[..2], &NextState::Delivered, "delivered");
    let recorded = herald_db::deliveries::record_attempts(&one, &results).await.unwrap();
    assert!(recorded.iter().all(|r| matches!(r, Recorded::Moved { .. })));
    let done = in_app_on(&one, &jobs[2..], "w").await.unwrap();
    assert!(done.iter().all(Option::is_some));
    let mut conn = one.acquire().await.unwrap();
    let after = deliveries_scans(&mut conn).await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 0),
        "(pending-index scans, sequential scans) of deliveries by the worker's statements: \
         each must find its rows by primary key, whatever the statistics say"
    );
    drop(conn);
    one.close().await;
    db.drop_db().await;
}

/// Runs the worker's three statements `rounds` times for ids that do not
/// exist (what a new deployment's first jobs look like to the planner: an
/// empty table), so a connection that caches generic plans has cached them.
async fn warm_up_on_empty_table(pool: &sqlx::PgPool, rounds: usize) {
    for i in 0..rounds {
        let none = vec![(format!("dlv_none{i}"), 0)];
        assert!(claim_on(pool, &none, 30.0, "w").await.unwrap()[0].is_none());
        let r = result(&none[0].0, 1, NextState::Delivered, "delivered");
        assert!(matches!(
            herald_db::deliveries::record_attempts(pool, &[r]).await.unwrap()[0],
            Recorded::Stale
        ));
        assert!(in_app_on(pool, &none, "w").await.unwrap()[0].is_none());
    }
}

/// The same statements once the table holds a backlog (not analyzed yet);
/// returns the sequential scans of `deliveries` they made.
async fn seq_scans_on_full_table(pool: &sqlx::PgPool, waiting: &[String]) -> i64 {
    let mut conn = pool.acquire().await.unwrap();
    let before = deliveries_scans(&mut conn).await.1;
    drop(conn);
    let jobs: Vec<(String, i32)> = waiting.iter().map(|id| (id.clone(), 0)).collect();
    let claimed = claim_on(pool, &jobs[..1], 30.0, "w").await.unwrap();
    assert!(claimed[0].is_some());
    let r = result(&waiting[0], 1, NextState::Delivered, "delivered");
    let recorded = herald_db::deliveries::record_attempts(pool, &[r]).await.unwrap();
    assert!(matches!(recorded[0], Recorded::Moved { .. }));
    assert!(in_app_on(pool, &jobs[1..], "w").await.unwrap()[0].is_some());
    let mut conn = pool.acquire().await.unwrap();
    deliveries_scans(&mut conn).await.1 - before
}

#[tokio::test]
async fn the_workers_pool_never_reuses_a_plan_made_on_an_empty_table() {
    let db = TestDb::new().await;
    // One connection each, so every call reuses the same cached statements.
    let workers = herald_db::connect_lazy_planned_per_call(&db.url, 1).unwrap();
    let plain = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&workers)
        .await
        .unwrap();
    assert_eq!(mode, "force_custom_plan");
    // Postgres switches a prepared statement to its generic plan after five
    // custom ones when the generic one looks no more expensive, which on an
    // empty table it does not: a plain connection caches it here.
    warm_up_on_empty_table(&workers, 8).await;
    warm_up_on_empty_table(&plain, 8).await;
    // A backlog arrives before any analyze.
    let waiting = backlog_arrives(&db).await;
    let on_workers = seq_scans_on_full_table(&workers, &waiting[..2]).await;
    // For comparison (not asserted: an autovacuum analyze arriving meanwhile
    // would invalidate the plain connection's cached plans).
    let on_plain = seq_scans_on_full_table(&plain, &waiting[2..]).await;
    println!(
        "sequential scans of 20,004 deliveries by claim + record + in-app: workers' pool {on_workers}, a plain pool {on_plain}"
    );
    assert_eq!(
        on_workers, 0,
        "the workers' statements must be planned for the table as it is now, not as it was"
    );
    workers.close().await;
    plain.close().await;
    db.drop_db().await;
}

/// Rows of `deliveries` and of `notifications` read so far by sequential
/// and index scans, as seen by `conn`'s backend once its counters are
/// flushed.
async fn rows_read(conn: &mut sqlx::PgConnection) -> (i64, i64) {
    flush_stats(conn).await;
    sqlx::query_as(
        "SELECT (SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0)
                   FROM pg_stat_user_tables WHERE relname = 'deliveries'),
                (SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0)
                   FROM pg_stat_user_tables WHERE relname = 'notifications')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap()
}

/// Claims, results and in-app deliveries run on connections that plan
/// once (`connect_lazy_planned_once`), so their one plan is made on
/// whatever the tables held at a worker's first job: here, nothing,
/// freshly analyzed. That plan must still read only the batch's rows when
/// 20,000 more arrive, not scan an index whole and filter by the batch.
#[tokio::test]
async fn claims_results_and_in_app_planned_once_on_empty_tables_read_only_their_rows_on_full_ones() {
    let db = TestDb::new().await;
    sqlx::raw_sql("ANALYZE").execute(&db.pool).await.unwrap();
    let once = herald_db::connect_lazy_planned_once(&db.url, 1).unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&once)
        .await
        .unwrap();
    assert_eq!(mode, "force_generic_plan");
    for i in 0..2 {
        let none = vec![(format!("dlv_none{i}"), 0)];
        assert!(claim_on(&once, &none, 30.0, "w").await.unwrap()[0].is_none());
        let stale = result(&none[0].0, 1, NextState::Sent, "sent");
        let recorded = herald_db::deliveries::record_attempts(&once, &[stale]).await.unwrap();
        assert_eq!(recorded, [Recorded::Stale]);
        assert!(in_app_on(&once, &none, "w").await.unwrap()[0].is_none());
    }
    let waiting = backlog_arrives(&db).await;
    let jobs: Vec<(String, i32)> = waiting.iter().map(|id| (id.clone(), 0)).collect();

    let mut conn = once.acquire().await.unwrap();
    let before = rows_read(&mut conn).await;
    drop(conn);
    let claimed = claim_on(&once, &jobs[..2], 30.0, "w").await.unwrap();
    assert!(claimed.iter().all(Option::is_some));
    let results = first_attempts(&waiting[..2], &NextState::Sent, "sent");
    let recorded = herald_db::deliveries::record_attempts(&once, &results).await.unwrap();
    assert!(
        recorded.iter().all(|r| matches!(r, Recorded::Moved { .. })),
        "{recorded:?}"
    );
    let done = in_app_on(&once, &jobs[2..], "w").await.unwrap();
    assert!(done.iter().all(Option::is_some));
    let mut conn = once.acquire().await.unwrap();
    let after = rows_read(&mut conn).await;
    drop(conn);
    let read = (after.0 - before.0, after.1 - before.1);
    println!(
        "rows read for 2 claims, 2 results and 2 in-app deliveries among 20,004: (deliveries, notifications) {read:?}"
    );
    assert!(
        read.0 <= 12 && read.1 <= 8,
        "(deliveries, notifications) rows read: {read:?}; the plan made on empty tables must reach each row by \
         primary key"
    );
    let statuses: Vec<String> = sqlx::query_scalar("SELECT status FROM deliveries WHERE id = ANY($1) ORDER BY id")
        .bind(&waiting)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(statuses, ["sent", "sent", "delivered", "delivered"]);

    // The plan itself, as that connection holds it: every table by index.
    let mut conn = once.acquire().await.unwrap();
    let claim = (
        "TEXT[], JSONB, FLOAT8, TEXT",
        "'{dlv_a,dlv_b}', '{\"dlv_a\": [0], \"dlv_b\": [1]}', 30, 'w'",
    );
    let in_app = (
        "TEXT[], JSONB, TEXT",
        "'{dlv_a,dlv_b}', '{\"dlv_a\": [0], \"dlv_b\": [1]}', 'w'",
    );
    let record = (
        "TEXT[], JSONB",
        "'{dlv_a,dlv_b}', '{\"dlv_a:1\": {\"status\": \"sent\"}, \"dlv_b:2\": {\"status\": \"failed\"}}'",
    );
    for (name, sql, (args, params), index) in [
        ("claim", herald_db::deliveries::CLAIM_SQL, claim, "notifications_pkey"),
        (
            "claim_keeping_rows",
            herald_db::deliveries::CLAIM_SQL_KEEPING_ROWS,
            claim,
            "notifications_pkey",
        ),
        (
            "record",
            herald_db::deliveries::RECORD_SQL,
            record,
            "delivery_attempts_pkey",
        ),
        (
            "in_app",
            herald_db::deliveries::DELIVER_IN_APP_SQL,
            in_app,
            "notifications_pkey",
        ),
        (
            "in_app_keeping_rows",
            herald_db::deliveries::DELIVER_IN_APP_SQL_KEEPING_ROWS,
            in_app,
            "notifications_pkey",
        ),
    ] {
        sqlx::raw_sql(&format!("PREPARE {name}_plan ({args}) AS {sql}"))
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE {name}_plan({params})"))
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("Index Cond: (id = ANY ($1))"), "{name}: {plan}");
        assert!(plan.contains(index), "{name}: no {index} in\n{plan}");
        for bad in ["Seq Scan", "Join Filter", "Hash Join", "Merge Join", "Materialize"] {
            assert!(!plan.contains(bad), "{name}: {bad} in\n{plan}");
        }
    }
    drop(conn);
    once.close().await;
    db.drop_db().await;
}

/// A sweep pass reads the deliveries owed a job, not every waiting one:
/// among 20,000 deliveries waiting their turn in Redis (written marked, as
/// the API writes them) and older than the grace period, the 3 owed a job
/// are found through `deliveries_owed` without reading the rest.
#[tokio::test]
async fn a_sweep_pass_reads_the_deliveries_owed_a_job_not_every_waiting_one() {
    let db = TestDb::new().await;
    sqlx::query(
        "WITH n AS (
             INSERT INTO notifications (id, user_id, category, priority, title, body)
             SELECT 'ntf_01J' || lpad(g::TEXT, 22, '0') || '0', 'u_wait', 'c', 'normal', 't', 'b'
             FROM generate_series(1, 20003) g
             RETURNING id
         )
         INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, max_attempts,
                                 updated_at, enqueued_at)
         SELECT 'dlv_' || substr(id, 5, 25) || '3', id, 'u_wait', 'in_app', 'normal', 'queued', 3,
                now() - interval '1 minute',
                CASE WHEN substr(id, 8, 22)::INT > 20000 THEN NULL ELSE now() - interval '1 minute' END
         FROM n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::raw_sql("ANALYZE").execute(&db.pool).await.unwrap();
    // One connection, so its backend's counters are the pass's.
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let mut conn = one.acquire().await.unwrap();
    let before = rows_read(&mut conn).await;
    drop(conn);
    let pass = herald_db::sweep::sweep(&one, 2.0, 5_000).await.unwrap();
    let mut conn = one.acquire().await.unwrap();
    let after = rows_read(&mut conn).await;
    drop(conn);
    assert!(pass.ran);
    let mut owed: Vec<String> = pass.owed.iter().map(|o| o.id.to_string()).collect();
    owed.sort_unstable();
    assert_eq!(
        owed,
        [
            "dlv_01J00000000000000000200013",
            "dlv_01J00000000000000000200023",
            "dlv_01J00000000000000000200033"
        ]
    );
    let read = (after.0 - before.0, after.1 - before.1);
    println!("rows read by a sweep pass among 20,003 waiting deliveries, 3 owed: (deliveries, notifications) {read:?}");
    assert!(
        read.0 <= 20 && read.1 <= 10,
        "(deliveries, notifications) rows read: {read:?}; a pass must reach the owed deliveries through \
         deliveries_owed, not read every waiting one"
    );
    one.close().await;
    db.drop_db().await;
}

/// Every move the workers' statements make, observed in the database, is
/// one that `DeliveryStatus::can_move_to` allows: the list the state
/// machine documents is the one the SQL follows.
#[tokio::test]
async fn every_move_the_workers_statements_make_is_one_the_state_machine_allows() {
    use herald_core::DeliveryStatus;

    let db = TestDb::new().await;
    let mut moves: Vec<(DeliveryStatus, DeliveryStatus)> = Vec::new();
    let status = |id: String| {
        let pool = db.pool.clone();
        async move {
            let (s, attempt) =
                sqlx::query_as::<_, (DeliveryStatus, i32)>("SELECT status, attempt FROM deliveries WHERE id = $1")
                    .bind(&id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            (s, attempt)
        }
    };
    let claim = |id: &str, attempt: i32| vec![(id.to_owned(), attempt)];

    // Each (channel, results after each claim): the paths a delivery takes.
    let paths: [(&'static str, &[(NextState, &'static str)]); 6] = [
        ("email", &[(NextState::Sent, "sent")]),
        (
            "email",
            &[
                (
                    NextState::Retrying {
                        after: std::time::Duration::ZERO,
                    },
                    "transient",
                ),
                (NextState::Failed, "permanent"),
            ],
        ),
        (
            "email",
            &[
                (
                    NextState::Retrying {
                        after: std::time::Duration::ZERO,
                    },
                    "transient",
                ),
                (NextState::Dead, "transient"),
            ],
        ),
        (
            "email",
            &[(
                NextState::Skipped {
                    reason: "no device".into(),
                },
                "skipped",
            )],
        ),
        ("in_app", &[(NextState::Delivered, "delivered")]),
        (
            "in_app",
            &[(
                NextState::Retrying {
                    after: std::time::Duration::ZERO,
                },
                "transient",
            )],
        ),
    ];
    for (n, (channel, results)) in paths.iter().enumerate() {
        let user = format!("u_path{n}");
        reachable_user(&db, &user).await;
        let id = one_queued_delivery_on(&db, channel, &user).await;
        let (mut before, _) = status(id.clone()).await;
        for (next, outcome) in results.iter() {
            let (_, attempt) = status(id.clone()).await;
            assert!(
                claim_on(&db.pool, &claim(&id, attempt), 30.0, "w").await.unwrap()[0].is_some(),
                "{channel} delivery at attempt {attempt} was not claimed"
            );
            let (claimed, _) = status(id.clone()).await;
            moves.push((before, claimed));
            let recorded = record_attempt(&db.pool, &result(&id, attempt + 1, next.clone(), outcome))
                .await
                .unwrap();
            assert!(matches!(recorded, Recorded::Moved { .. }), "{channel}: {recorded:?}");
            let (after, _) = status(id.clone()).await;
            moves.push((claimed, after));
            before = after;
        }
        // An in-app delivery, waiting or retrying, is delivered by its one statement.
        if *channel == "in_app" {
            let (_, attempt) = status(id.clone()).await;
            let done = in_app_on(&db.pool, &claim(&id, attempt), "w").await.unwrap();
            let (after, _) = status(id.clone()).await;
            if done[0].is_some() {
                moves.push((before, after));
            } else {
                assert_eq!(before, after, "a statement that did nothing moved {id}");
            }
        }
    }
    // A second in-app delivery straight from `queued`.
    let id = one_queued_delivery_on(&db, "in_app", "u_direct").await;
    let (before, _) = status(id.clone()).await;
    assert!(in_app_on(&db.pool, &claim(&id, 0), "w").await.unwrap()[0].is_some());
    moves.push((before, status(id.clone()).await.0));

    for (from, to) in &moves {
        assert!(
            from.can_move_to(*to),
            "the SQL moved a delivery {from} -> {to}, which the state machine forbids"
        );
    }
    let seen: std::collections::HashSet<_> = moves.iter().copied().collect();
    for expected in [
        (DeliveryStatus::Queued, DeliveryStatus::Sending),
        (DeliveryStatus::Sending, DeliveryStatus::Sent),
        (DeliveryStatus::Sending, DeliveryStatus::Retrying),
        (DeliveryStatus::Retrying, DeliveryStatus::Sending),
        (DeliveryStatus::Sending, DeliveryStatus::Failed),
        (DeliveryStatus::Sending, DeliveryStatus::Dead),
        (DeliveryStatus::Sending, DeliveryStatus::Skipped),
        (DeliveryStatus::Sending, DeliveryStatus::Delivered),
        (DeliveryStatus::Retrying, DeliveryStatus::Delivered),
        (DeliveryStatus::Queued, DeliveryStatus::Delivered),
    ] {
        assert!(
            seen.contains(&expected),
            "no path exercised {} -> {}",
            expected.0,
            expected.1
        );
    }
    db.drop_db().await;
}
