//! Rows for tests to write: a notification as the API hands it to
//! `herald_db::notifications::insert_notifications`, and dead letters in
//! bulk, written straight to Postgres with `INSERT … SELECT
//! generate_series` (100,000 take a few seconds), for the admin tests and
//! figures.
//!
//! Ids are valid prefixed ULIDs made of digits: `dlv_01JD<tag><n>`, so a
//! test can seed several distinguishable batches. Row `n = 1` is the newest
//! (`created_at = now() - n seconds`), and each one finished a second after
//! it was created, after `attempt` attempts that are all recorded.

use herald_db::notifications::{NewDelivery, NewNotification, NewNotificationWithDeliveries};
use sqlx::PgPool;

/// A notification to `user` with one delivery per channel, each named by
/// the caller (`requested`) and allowed 3 attempts; fresh ids, priority
/// `normal`, title `t`, body `b`, empty data.
#[must_use]
pub fn notification(user: &str, channels: &[&'static str]) -> NewNotificationWithDeliveries {
    let ntf_id = herald_core::NotificationId::generate();
    NewNotificationWithDeliveries {
        notification: NewNotification {
            id: ntf_id.to_string(),
            api_key_id: None,
            user_id: user.to_owned(),
            category: "general".to_owned(),
            priority: "normal",
            title: "t".to_owned(),
            body: "b".to_owned(),
            data: serde_json::json!({}),
            request_id: None,
        },
        deliveries: channels
            .iter()
            .map(|&channel| NewDelivery {
                id: match channel.parse::<herald_core::Channel>() {
                    Ok(c) => herald_core::DeliveryId::of(ntf_id, c).to_string(),
                    // A channel the schema rejects, for tests of that.
                    Err(_) => herald_core::DeliveryId::generate().to_string(),
                },
                channel,
                max_attempts: 3,
                requested: true,
            })
            .collect(),
    }
}

#[derive(Debug, Clone)]
pub struct DeadLetters {
    pub count: i64,
    /// Four digits that tell this batch's ids apart.
    pub tag: &'static str,
    pub channel: &'static str,
    /// `dead` or `failed`.
    pub status: &'static str,
    /// Attempts made (and the budget that ran out).
    pub attempts: i32,
    /// Each row's last error is this, then ` #<n>`.
    pub error: &'static str,
    pub error_class: &'static str,
    pub provider_status: Option<i32>,
    /// Deliveries go to `<user_prefix><1..=users>`, who exist with an email
    /// address and one active device (unless `create_users` is false).
    pub user_prefix: &'static str,
    pub users: i64,
    pub create_users: bool,
    /// How many seconds ago row 1 was created.
    pub offset_secs: i64,
}

impl Default for DeadLetters {
    fn default() -> Self {
        Self {
            count: 10,
            tag: "0001",
            channel: "in_app",
            status: "dead",
            attempts: 3,
            error: "connection reset by peer",
            error_class: "transient",
            provider_status: None,
            user_prefix: "u_seed_",
            users: 10,
            create_users: true,
            offset_secs: 0,
        }
    }
}

impl DeadLetters {
    /// The id of row `n` (1-based); it follows its notification's
    /// (`herald_core::DeliveryId::of`: the channel as the last digit).
    #[must_use]
    pub fn delivery_id(&self, n: i64) -> String {
        let digit = match self.channel {
            "email" => '1',
            "push" => '2',
            _ => '3',
        };
        format!("dlv_01JD{}{n:017}{digit}", self.tag)
    }

    #[must_use]
    pub fn notification_id(&self, n: i64) -> String {
        format!("ntf_01JD{}{n:017}0", self.tag)
    }
}

/// Writes the batch; returns its delivery ids, newest first.
pub async fn seed_dead_letters(pool: &PgPool, s: &DeadLetters) -> Vec<String> {
    assert!(
        s.tag.len() == 4 && s.tag.chars().all(|c| c.is_ascii_digit()),
        "tag: four digits"
    );
    if s.create_users {
        sqlx::query(
            "INSERT INTO users (id, email) SELECT $1 || g, $1 || g || '@example.com' FROM generate_series(1, $2) g
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(s.user_prefix)
        .bind(s.users)
        .execute(pool)
        .await
        .expect("seed users");
        sqlx::query(
            "INSERT INTO devices (id, user_id, platform, provider, token)
             SELECT 'dev_01JD' || $3 || lpad(g::TEXT, 18, '0'), $1 || g, 'ios', 'apns', 'tok-' || $3 || '-' || g
             FROM generate_series(1, $2) g ON CONFLICT DO NOTHING",
        )
        .bind(s.user_prefix)
        .bind(s.users)
        .bind(s.tag)
        .execute(pool)
        .await
        .expect("seed devices");
    }
    sqlx::query(
        "INSERT INTO notifications (id, user_id, category, priority, title, body, created_at)
         SELECT 'ntf_01JD' || $1 || lpad(g::TEXT, 17, '0') || '0', $2 || ((g - 1) % $4 + 1), 'general', 'normal',
                'Seeded ' || g, 'A seeded dead letter', now() - make_interval(secs => g + $5)
         FROM generate_series(1, $3) g",
    )
    .bind(s.tag)
    .bind(s.user_prefix)
    .bind(s.count)
    .bind(s.users)
    .bind(s.offset_secs as f64)
    .execute(pool)
    .await
    .expect("seed notifications");
    sqlx::query(
        "INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, attempt, max_attempts,
                                 last_error, last_error_class, last_provider_status, created_at, updated_at,
                                 finished_at)
         SELECT 'dlv_01JD' || $1 || lpad(n.g::TEXT, 17, '0')
                    || CASE $2 WHEN 'email' THEN '1' WHEN 'push' THEN '2' ELSE '3' END,
                n.id, n.user_id, $2, 'normal', $3, $4, $4,
                $5 || ' #' || n.g, $6, $7, n.created_at, n.created_at + interval '1 second',
                n.created_at + interval '1 second'
         FROM (SELECT g, 'ntf_01JD' || $1 || lpad(g::TEXT, 17, '0') || '0' AS id, $8 || ((g - 1) % $9 + 1) AS user_id,
                      now() - make_interval(secs => g + $10) AS created_at
               FROM generate_series(1, $11) g) n",
    )
    .bind(s.tag)
    .bind(s.channel)
    .bind(s.status)
    .bind(s.attempts)
    .bind(s.error)
    .bind(s.error_class)
    .bind(s.provider_status)
    .bind(s.user_prefix)
    .bind(s.users)
    .bind(s.offset_secs as f64)
    .bind(s.count)
    .execute(pool)
    .await
    .expect("seed deliveries");
    sqlx::query(
        "INSERT INTO delivery_attempts (delivery_id, attempt, worker_id, started_at, finished_at, outcome,
                                        provider_status, error)
         SELECT d.id, a, 'seed-worker', d.created_at, d.created_at, $2, d.last_provider_status, d.last_error
         FROM deliveries d, generate_series(1, d.attempt) a WHERE d.id LIKE 'dlv_01JD' || $1 || '%'",
    )
    .bind(s.tag)
    .bind(s.error_class)
    .execute(pool)
    .await
    .expect("seed attempts");
    (1..=s.count).map(|n| s.delivery_id(n)).collect()
}
