//! The accept statement (`herald_db::notifications::ACCEPT_SQL`) as the
//! API's group commit runs it: on a pool that plans it once, for batches of
//! any size and tables of any size.

use herald_db::notifications::{ACCEPT_SQL, NewNotificationWithDeliveries, insert_notifications};
use herald_testkit::TestDb;

const CHANNELS: [&str; 3] = ["email", "push", "in_app"];

/// In-app is always kept; email and push are named by the caller or not.
fn notification(user: &str, requested: bool) -> NewNotificationWithDeliveries {
    let mut n = herald_testkit::seed::notification(user, &CHANNELS);
    n.notification.priority = "high";
    n.notification.data = serde_json::json!({"k": user});
    for d in &mut n.deliveries {
        d.requested = requested || d.channel == "in_app";
    }
    n
}

/// What each kind of recipient gets on email and push: `Some(reason)` for a
/// skip, `None` for queued.
fn expected(user: &str) -> [Option<&'static str>; 2] {
    match user {
        "u_full" => [None, None],
        "u_bare" => [
            Some("user has no email address"),
            Some("user has no active push device"),
        ],
        // Its only device is disabled.
        "u_disabled" => [None, Some("user has no active push device")],
        _ => [
            Some("unknown user: no email address on record"),
            Some("user has no active push device"),
        ],
    }
}

async fn seed_users(db: &TestDb) {
    sqlx::raw_sql(
        "INSERT INTO users (id, email) VALUES ('u_full', 'full@example.com'), ('u_bare', NULL),
                                              ('u_disabled', 'd@example.com');
         INSERT INTO devices (id, user_id, platform, provider, token, disabled_at) VALUES
             ('dev_1', 'u_full', 'ios', 'apns', 'tok1', NULL),
             ('dev_2', 'u_disabled', 'android', 'fcm', 'tok2', now());",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

/// 600 notifications in batches of 1, 43 and 256 (a generic plan assumes 10
/// rows), to four kinds of recipient, with channels named and omitted:
/// every notification gets its own answer, and the rows say the same.
#[tokio::test]
async fn every_notification_in_a_batch_of_any_size_gets_its_own_answer() {
    let db = TestDb::new().await;
    seed_users(&db).await;
    let pool = herald_db::connect_lazy_planned_once(&db.url, 1).unwrap();
    let users = ["u_full", "u_bare", "u_disabled", "u_nobody"];
    let mut i = 0;
    for size in [1usize, 43, 256, 256, 43, 1] {
        let batch: Vec<_> = (0..size)
            .map(|_| {
                i += 1;
                notification(users[i % users.len()], !i.is_multiple_of(3))
            })
            .collect();
        let inserted = insert_notifications(&pool, &batch).await.unwrap();
        assert_eq!(inserted.accepted.len(), batch.len());
        assert!(inserted.push_intent.is_some(), "in-app is always queued");
        for (item, accepted) in batch.iter().zip(&inserted.accepted) {
            let user = item.notification.user_id.as_str();
            let requested = item.deliveries[0].requested;
            let mut want = Vec::new();
            for (channel, reason) in ["email", "push"].into_iter().zip(expected(user)) {
                match (reason, requested) {
                    (None, _) => want.push((channel, "queued", None)),
                    (Some(r), true) => want.push((channel, "skipped", Some(r))),
                    // Omitted and unreachable: dropped, no row.
                    (Some(_), false) => {}
                }
            }
            want.push(("in_app", "queued", None));
            let got: Vec<_> = accepted
                .deliveries
                .iter()
                .map(|d| (d.channel.as_str(), d.status.as_str(), d.skip_reason.as_deref()))
                .collect();
            assert_eq!(got, want, "{user}, channels named: {requested}");
            for d in &accepted.deliveries {
                assert_eq!(d.notification_id, item.notification.id);
                let (status, reason, user_id, priority, queued_mark, finished): (
                    String,
                    Option<String>,
                    String,
                    String,
                    bool,
                    bool,
                ) = sqlx::query_as(
                    "SELECT status, skip_reason, user_id, priority, enqueued_at IS NOT NULL, finished_at IS NOT NULL
                     FROM deliveries WHERE id = $1",
                )
                .bind(&d.id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
                assert_eq!(
                    (status.as_str(), reason.as_deref()),
                    (d.status.as_str(), d.skip_reason.as_deref())
                );
                assert_eq!((user_id.as_str(), priority.as_str()), (user, "high"));
                assert_eq!((queued_mark, finished), (d.status == "queued", d.status == "skipped"));
            }
        }
    }
    let (notifications, deliveries): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM notifications), (SELECT count(*) FROM deliveries)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(notifications, 600);
    // Per four notifications: u_full 3, u_bare 3 or 1, u_disabled 3 or 2,
    // u_nobody 3 or 1 (named or omitted).
    let want: i64 = (1..=600)
        .map(|i: usize| {
            let named = !i.is_multiple_of(3);
            match (users[i % users.len()], named) {
                ("u_full", _) | (_, true) => 3,
                ("u_disabled", false) => 2,
                _ => 1,
            }
        })
        .sum();
    assert_eq!(deliveries, want);
    pool.close().await;
    db.drop_db().await;
}

/// The plan the ingest pool makes once must suit a table of any size: on
/// empty, freshly analyzed `users` and `devices` (a new deployment, which
/// then imports a million users), it still looks each recipient up by
/// index, and nothing nested-loops one batch-sized set over another.
#[tokio::test]
async fn the_accept_plan_looks_recipients_up_by_index_even_on_empty_tables() {
    let db = TestDb::new().await;
    sqlx::raw_sql("ANALYZE users; ANALYZE devices")
        .execute(&db.pool)
        .await
        .unwrap();
    let pool = herald_db::connect_lazy_planned_once(&db.url, 1).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(mode, "force_generic_plan");
    sqlx::raw_sql(&format!(
        "PREPARE accept (TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], JSONB[], TEXT[],
                         TEXT[], TEXT[], TEXT[], TEXT[], TEXT[], INT[], BOOL[]) AS {ACCEPT_SQL}"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN EXECUTE accept('{n1}', '{NULL}', '{u1}', '{general}', '{normal}', '{t}', '{b}',
                                ARRAY['{}'::JSONB], '{NULL}', '{d1,d2,d3}', '{n1,n1,n1}', '{u1,u1,u1}',
                                '{email,push,in_app}', '{normal,normal,normal}', '{3,3,3}', '{t,t,t}')",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("using users_pkey on users"), "{plan}");
    assert!(plan.contains("using devices_user on devices"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(!plan.contains("Join Filter"), "{plan}");
    assert!(!plan.contains("Nested Loop"), "{plan}");
    drop(conn);
    pool.close().await;
    db.drop_db().await;
}

/// The batchers' connections (`herald_db::held`) are kept between
/// statements: the next statement runs on the same backend, without the
/// round trip sqlx spends testing a connection given back to its pool. A
/// connection whose statement failed is not kept, and one that broke while
/// kept (its backend terminated) is replaced before its next statement.
#[tokio::test]
async fn held_connections_are_reused_and_a_broken_one_is_replaced() {
    use herald_db::held::Held;
    let db = TestDb::new().await;
    let held = Held::new(herald_db::connect_lazy_planned_once(&db.url, 2).unwrap());
    let pid_of = async |held: &Held| -> (i32, herald_db::held::HeldConn) {
        let mut conn = held.acquire().await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        (pid, conn)
    };

    let (first, conn) = pid_of(&held).await;
    conn.keep();
    assert_eq!(held.kept(), 1);
    let (again, conn) = pid_of(&held).await;
    assert_eq!(held.kept(), 0, "taken while in use");
    assert_eq!(again, first, "the kept connection is the one used next");
    conn.keep();

    // A failed statement: its connection goes back to the pool, not here.
    let mut conn = held.acquire().await.unwrap();
    let failed = sqlx::query("SELECT no_such_column FROM notifications")
        .execute(&mut *conn)
        .await;
    assert!(failed.is_err());
    drop(conn);
    assert_eq!(held.kept(), 0);

    // Kept, then broken: replaced once it has sat for the ping interval.
    let (pid, conn) = pid_of(&held).await;
    conn.keep();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(terminated);
    tokio::time::sleep(herald_db::PING_IF_IDLE_FOR + std::time::Duration::from_millis(100)).await;
    let (fresh, conn) = pid_of(&held).await;
    assert_ne!(fresh, pid, "a working connection, not the terminated one");
    conn.keep();
    db.drop_db().await;
}
