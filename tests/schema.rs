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
/// insert-time checks cost Postgres a fifth of its work per notification
/// and could never fail); triggers keep the cascades on delete.
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
    let delivered = deliver_in_app(&db.pool, &in_app, "w1").await.unwrap();
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

/// Notifications keep no foreign key to their API key (every accepted row
/// checked it, locking the key's row); deleting a key by hand still clears
/// it from its notifications, as `ON DELETE SET NULL` did, and from no
/// other key's.
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
