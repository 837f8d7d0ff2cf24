//! What the schema itself keeps true, whatever statement touches it.

use herald_db::deliveries::{AttemptResult, NextState, claim_delivery, deliver_in_app, record_attempt};
use herald_db::notifications::{NewNotificationWithDeliveries, insert_notifications};
use herald_testkit::TestDb;

fn notification(channels: &[&'static str]) -> NewNotificationWithDeliveries {
    herald_testkit::seed::notification("u_1", channels)
}

async fn count(db: &TestDb, sql: &str, id: &str) -> i64 {
    sqlx::query_scalar(sql).bind(id).fetch_one(&db.pool).await.unwrap()
}

/// A notification's deliveries, their attempts, and its inbox items.
async fn rows_of(db: &TestDb, id: &str) -> (i64, i64, i64) {
    (
        count(db, DELIVERIES, id).await,
        count(db, ATTEMPTS, id).await,
        count(db, INBOX, id).await,
    )
}

const DELIVERIES: &str = "SELECT count(*) FROM deliveries WHERE notification_id = $1";
const ATTEMPTS: &str = "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
                        WHERE d.notification_id = $1";
const INBOX: &str = "SELECT count(*) FROM inbox_items WHERE notification_id = $1";

/// Attempts whose delivery is gone: what a missing cascade leaves behind.
async fn orphan_attempts(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM delivery_attempts WHERE delivery_id NOT IN (SELECT id FROM deliveries)")
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Deliveries, attempts and inbox items have no foreign keys (the
/// insert-time checks would cost Postgres work on every notification and
/// could never fail); triggers keep the cascades on delete.
#[tokio::test]
async fn deleting_a_notification_deletes_its_deliveries_attempts_and_inbox_item_only() {
    let db = TestDb::new().await;
    sqlx::query("INSERT INTO users (id, email) VALUES ('u_1', 'ada@example.com')")
        .execute(&db.pool)
        .await
        .unwrap();
    let (gone, kept) = (notification(&["email", "push", "in_app"]), notification(&["in_app"]));
    insert_notifications(&db.pool, &[gone.clone(), kept.clone()])
        .await
        .unwrap();
    // An email attempt (claimed, then recorded) on the one, an in-app
    // delivery (attempt and inbox item) on each.
    let email = &gone.deliveries[0].id;
    assert!(claim_delivery(&db.pool, email, 0, 30.0, "w1").await.unwrap().is_some());
    let result = AttemptResult {
        delivery_id: email.clone(),
        attempt: 1,
        next: NextState::Sent,
        outcome: "sent",
        provider_status: None,
        error: None,
        detail: None,
    };
    record_attempt(&db.pool, &result).await.unwrap();
    let in_app = [(gone.deliveries[2].id.clone(), 0), (kept.deliveries[0].id.clone(), 0)];
    let delivered = deliver_in_app(&mut db.pool.acquire().await.unwrap(), &in_app, "w1")
        .await
        .unwrap();
    assert!(
        delivered.iter().all(Option::is_some),
        "both in-app deliveries delivered"
    );
    let (g, k) = (gone.notification.id.as_str(), kept.notification.id.as_str());
    assert_eq!(rows_of(&db, g).await, (3, 2, 1), "deliveries, attempts, inbox item");

    sqlx::query("DELETE FROM notifications WHERE id = $1")
        .bind(g)
        .execute(&db.pool)
        .await
        .unwrap();

    assert_eq!(rows_of(&db, g).await, (0, 0, 0), "they went with it");
    assert_eq!(orphan_attempts(&db).await, 0, "no attempt was left behind");
    assert_eq!(rows_of(&db, k).await, (1, 1, 1), "another notification's are untouched");
    db.drop_db().await;
}

/// A delivery's id follows its notification's (migration …080), and
/// deliveries written before that, with ids of their own, are still found
/// by notification: reading a notification, the admin filter and the
/// delete cascade see both kinds, and only the old kind is in the partial
/// index.
#[tokio::test]
async fn a_notifications_deliveries_are_found_whether_their_ids_follow_it_or_not() {
    let db = TestDb::new().await;
    let new = notification(&["email", "push", "in_app"]);
    insert_notifications(&db.pool, std::slice::from_ref(&new))
        .await
        .unwrap();
    let ntf = new.notification.id.as_str();
    for d in &new.deliveries {
        assert_eq!(d.id[4..29], ntf[4..29], "{} follows {ntf}", d.id);
    }
    // Written as the previous release did: random delivery ids.
    let old = herald_core::NotificationId::generate().to_string();
    let old_ids: Vec<String> = (0..3)
        .map(|_| herald_core::DeliveryId::generate().to_string())
        .collect();
    sqlx::query(
        "WITH n AS (INSERT INTO notifications (id, user_id, category, priority, title, body)
                    VALUES ($1, 'u_1', 'general', 'normal', 't', 'b'))
         INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, max_attempts)
         SELECT i, $1, 'u_1', c, 'normal', 'queued', 3
         FROM unnest($2::TEXT[], ARRAY['email', 'push', 'in_app']) AS x (i, c)",
    )
    .bind(&old)
    .bind(&old_ids)
    .execute(&db.pool)
    .await
    .unwrap();

    for (id, expected) in [
        (ntf, new.deliveries.iter().map(|d| d.id.clone()).collect::<Vec<_>>()),
        (old.as_str(), old_ids.clone()),
    ] {
        let (_, deliveries) = herald_db::notifications::get_notification(&db.pool, id)
            .await
            .unwrap()
            .expect("the notification");
        let got: Vec<String> = deliveries.iter().map(|d| d.id.clone()).collect();
        assert_eq!(got, expected, "{id}: its deliveries, in channel order");
        let filter = herald_db::admin::DeliveryFilter {
            notification_id: Some(id.to_owned()),
            ..Default::default()
        };
        let (found, _) = herald_db::admin::search_deliveries(&db.pool, &filter, None, 10)
            .await
            .unwrap();
        let mut found: Vec<String> = found.into_iter().map(|d| d.id).collect();
        let mut expected = expected.clone();
        found.sort();
        expected.sort();
        assert_eq!(found, expected, "{id}: the admin filter finds them");
    }
    let in_partial_index: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM deliveries
         WHERE substr(id, 5, 25) <> substr(notification_id, 5, 25) OR length(id) <> 30 ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut old_sorted = old_ids.clone();
    old_sorted.sort();
    assert_eq!(
        in_partial_index, old_sorted,
        "only the old kind needs the partial index"
    );

    sqlx::query("DELETE FROM notifications WHERE id = ANY($1)")
        .bind(vec![ntf.to_owned(), old.clone()])
        .execute(&db.pool)
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "both kinds went with their notification");
    db.drop_db().await;
}

/// With no unique index on `(notification_id, channel)`, the primary key
/// and a check keep one delivery per notification and channel.
#[tokio::test]
async fn a_notification_still_has_at_most_one_delivery_per_channel() {
    let db = TestDb::new().await;
    let item = notification(&["email"]);
    insert_notifications(&db.pool, std::slice::from_ref(&item))
        .await
        .unwrap();
    let ntf = item.notification.id.as_str();
    let insert = |id: String, channel: &'static str| {
        let pool = db.pool.clone();
        let ntf = ntf.to_owned();
        async move {
            sqlx::query(
                "INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, max_attempts)
                 VALUES ($1, $2, 'u_1', $3, 'normal', 'queued', 3)",
            )
            .bind(id)
            .bind(ntf)
            .bind(channel)
            .execute(&pool)
            .await
        }
    };
    let again = insert(item.deliveries[0].id.clone(), "email").await.unwrap_err();
    assert!(again.to_string().contains("deliveries_pkey"), "{again}");
    // An id that follows the notification but names another channel.
    let wrong_digit = format!("dlv_{}2", &ntf[4..29]);
    let mislabelled = insert(wrong_digit, "email").await.unwrap_err();
    assert!(
        mislabelled.to_string().contains("deliveries_id_follows_notification"),
        "{mislabelled}"
    );
    db.drop_db().await;
}

/// Notifications keep no foreign key to their API key (every accepted row
/// would check it, locking the key's row); deleting a key by hand still
/// clears it from its notifications, as `ON DELETE SET NULL` would, and
/// from no other key's.
#[tokio::test]
async fn deleting_an_api_key_clears_it_from_its_notifications_only() {
    let db = TestDb::new().await;
    let mut keys = Vec::new();
    for name in ["gone", "kept"] {
        let (key, _secret) = herald_db::api_keys::create_api_key(&db.pool, name, &["send".to_owned()])
            .await
            .unwrap();
        keys.push(key.id);
    }
    let mut ids = Vec::new();
    for key in &keys {
        let mut n = notification(&["in_app"]);
        n.notification.api_key_id = Some(key.clone());
        insert_notifications(&db.pool, std::slice::from_ref(&n)).await.unwrap();
        ids.push(n.notification.id);
    }
    sqlx::query("DELETE FROM api_keys WHERE id = $1")
        .bind(&keys[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let key_of = |id: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>("SELECT api_key_id FROM notifications WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(key_of(ids[0].clone()).await, None, "the deleted key is cleared");
    assert_eq!(
        key_of(ids[1].clone()).await.as_ref(),
        Some(&keys[1]),
        "the other key stays"
    );
    db.drop_db().await;
}

/// A rolling deploy: a newer release migrated the database, and a process
/// of the previous release (a worker not yet replaced) restarts. It starts
/// instead of refusing the migration it does not know.
#[tokio::test]
async fn a_process_of_the_previous_release_starts_on_a_database_a_newer_one_migrated() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000000, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    herald_db::migrate(&db.pool)
        .await
        .expect("migrations a newer release applied do not stop an older process");
    db.drop_db().await;
}
