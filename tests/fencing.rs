//! Claims and results are fenced on the attempt number, in SQL: a
//! duplicate job or a stale worker can neither send twice nor move a
//! status backwards.

use herald_db::deliveries::{AttemptResult, NextState, Recorded, claim_deliveries, claim_delivery, record_attempt};
use herald_testkit::TestDb;

async fn one_queued_delivery(db: &TestDb) -> String {
    let dlv = herald_core::DeliveryId::generate().to_string();
    let item = herald_db::notifications::NewNotificationWithDeliveries {
        notification: herald_db::notifications::NewNotification {
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
        deliveries: vec![herald_db::notifications::NewDelivery {
            id: dlv.clone(),
            channel: "in_app",
            max_attempts: 3,
            requested: true,
        }],
    };
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
    let claims = claim_deliveries(&db.pool, &jobs, 30.0, "w").await.unwrap();
    let attempts: Vec<Option<i32>> = claims.iter().map(|c| c.as_ref().map(|c| c.attempt)).collect();
    assert_eq!(attempts, vec![None, Some(2), None]);
    db.drop_db().await;
}
