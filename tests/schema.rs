//! What the schema itself keeps true, whatever statement touches it.

use herald_db::deliveries::{AttemptResult, NextState, claim_delivery, record_attempt};
use herald_db::notifications::{NewDelivery, NewNotification, NewNotificationWithDeliveries, insert_notifications};
use herald_testkit::TestDb;

fn notification(channels: &[&'static str]) -> NewNotificationWithDeliveries {
    NewNotificationWithDeliveries {
        notification: NewNotification {
            id: herald_core::NotificationId::generate().to_string(),
            api_key_id: None,
            user_id: "u_1".into(),
            category: "general".into(),
            priority: "normal",
            title: "t".into(),
            body: "b".into(),
            data: serde_json::json!({}),
            request_id: None,
        },
        deliveries: channels
            .iter()
            .map(|&channel| NewDelivery {
                id: herald_core::DeliveryId::generate().to_string(),
                channel,
                max_attempts: 3,
                requested: true,
            })
            .collect(),
    }
}

async fn count(db: &TestDb, sql: &str, id: &str) -> i64 {
    sqlx::query_scalar(sql).bind(id).fetch_one(&db.pool).await.unwrap()
}

const DELIVERIES: &str = "SELECT count(*) FROM deliveries WHERE notification_id = $1";
const ATTEMPTS: &str = "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
                        WHERE d.notification_id = $1";
const ALL_ATTEMPTS: &str = "SELECT count(*) FROM delivery_attempts WHERE delivery_id LIKE $1";

/// Deliveries have no foreign key to their notification (the insert-time
/// check cost a fifth of Postgres's work per notification and could never
/// fail); a trigger keeps the cascade on delete.
#[tokio::test]
async fn deleting_notifications_deletes_their_deliveries_and_attempts_only() {
    let db = TestDb::new().await;
    let (gone, kept) = (notification(&["email", "push", "in_app"]), notification(&["in_app"]));
    insert_notifications(&db.pool, &[gone.clone(), kept.clone()])
        .await
        .unwrap();
    // An attempt on each, so the attempts' own cascade is exercised too.
    for d in [&gone.deliveries[2], &kept.deliveries[0]] {
        let claim = claim_delivery(&db.pool, &d.id, 0, 30.0, "w1").await.unwrap();
        assert!(claim.is_some(), "claims the fresh delivery");
        let result = AttemptResult {
            delivery_id: d.id.clone(),
            attempt: 1,
            next: NextState::Delivered,
            outcome: "delivered",
            provider_status: None,
            error: None,
            detail: None,
        };
        record_attempt(&db.pool, &result).await.unwrap();
    }
    let (g, k) = (gone.notification.id.as_str(), kept.notification.id.as_str());
    assert_eq!((count(&db, DELIVERIES, g).await, count(&db, ATTEMPTS, g).await), (3, 1));
    assert_eq!(count(&db, ALL_ATTEMPTS, "%").await, 2);

    sqlx::query("DELETE FROM notifications WHERE id = $1")
        .bind(g)
        .execute(&db.pool)
        .await
        .unwrap();

    assert_eq!(count(&db, DELIVERIES, g).await, 0, "the deliveries went with it");
    assert_eq!(count(&db, ALL_ATTEMPTS, "%").await, 1, "and their attempts");
    assert_eq!(
        (count(&db, DELIVERIES, k).await, count(&db, ATTEMPTS, k).await),
        (1, 1),
        "another notification's are untouched"
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
