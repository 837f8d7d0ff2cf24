//! Test data written straight to Postgres and Redis: the bench's users
//! (an email address and one push device each), and big backlogs, which go
//! in with SQL and one bulk enqueue per chunk instead of over HTTP (a
//! million POSTs would take minutes and measure ingest, not draining).

use anyhow::Context;
use herald_core::{Channel, DeliveryId, DeviceId, NotificationId, Priority};
use herald_queue::{DeliveryJob, QueueClient, QueueName};
use sqlx::PgPool;

/// Users `bench_u0…`, each with an email address and one device, APNs and
/// FCM alternating.
pub async fn users(pool: &PgPool, n: usize) -> anyhow::Result<Vec<String>> {
    let ids: Vec<String> = (0..n).map(|i| format!("bench_u{i}")).collect();
    let emails: Vec<String> = ids.iter().map(|u| format!("{u}@example.com")).collect();
    sqlx::query("INSERT INTO users (id, email, locale, timezone) SELECT u, e, 'en', 'UTC' FROM UNNEST($1::TEXT[], $2::TEXT[]) AS t (u, e)")
        .bind(&ids)
        .bind(&emails)
        .execute(pool)
        .await
        .context("seeding users")?;
    let devices: Vec<String> = (0..n).map(|_| DeviceId::generate().to_string()).collect();
    let (platforms, providers): (Vec<&str>, Vec<&str>) = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                ("ios", "apns")
            } else {
                ("android", "fcm")
            }
        })
        .unzip();
    // APNs device tokens are hex; FCM registration tokens are opaque.
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                format!("{i:064x}")
            } else {
                format!("bench-fcm-token-{i}")
            }
        })
        .collect();
    sqlx::query(
        "INSERT INTO devices (id, user_id, platform, provider, token)
         SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[])",
    )
    .bind(&devices)
    .bind(&ids)
    .bind(&platforms)
    .bind(&providers)
    .bind(&tokens)
    .execute(pool)
    .await
    .context("seeding devices")?;
    Ok(ids)
}

/// Notifications to write per statement and enqueue per pipeline.
const CHUNK: usize = 20_000;

/// A backlog of `deliveries` (rounded up to whole notifications of three
/// channels), `queued` in Postgres and, given a queue, one job each in
/// Redis, marked enqueued so the sweeper does not push them again. Returns
/// how many deliveries were written.
pub async fn backlog(
    pool: &PgPool,
    queue: Option<&QueueClient>,
    users: &[String],
    deliveries: u64,
) -> anyhow::Result<u64> {
    let notifications = deliveries.div_ceil(3);
    let channels = [Channel::Email, Channel::Push, Channel::InApp];
    let mut written = 0u64;
    let mut done = 0u64;
    while done < notifications {
        let n = (notifications - done).min(CHUNK as u64) as usize;
        let ntf_ids: Vec<NotificationId> = (0..n).map(|_| NotificationId::generate()).collect();
        let ntf: Vec<String> = ntf_ids.iter().map(ToString::to_string).collect();
        let owners: Vec<&str> = (0..n)
            .map(|i| users[(done as usize + i) % users.len()].as_str())
            .collect();
        let (mut d_ids, mut d_ntf, mut d_user, mut d_channel, mut jobs) = (
            Vec::with_capacity(3 * n),
            Vec::with_capacity(3 * n),
            Vec::with_capacity(3 * n),
            Vec::with_capacity(3 * n),
            Vec::with_capacity(3 * n),
        );
        for (i, id) in ntf.iter().enumerate() {
            for ch in channels {
                let d = DeliveryId::of(ntf_ids[i], ch);
                d_ids.push(d.to_string());
                d_ntf.push(id.as_str());
                d_user.push(owners[i]);
                d_channel.push(ch.as_str());
                jobs.push((QueueName::new(ch, Priority::Normal), DeliveryJob::new(d, 0)));
            }
        }
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO notifications (id, user_id, category, priority, title, body, data)
             SELECT id, u, 'bench', 'normal', 'Your order shipped', 'Order 1234 is on its way.',
                    '{\"order_id\": \"1234\"}'::JSONB
             FROM UNNEST($1::TEXT[], $2::TEXT[]) AS t (id, u)",
        )
        .bind(&ntf)
        .bind(&owners)
        .execute(&mut *tx)
        .await
        .context("seeding notifications")?;
        sqlx::query(
            "INSERT INTO deliveries (id, notification_id, user_id, channel, priority, status, max_attempts, enqueued_at)
             SELECT id, n, u, c, 'normal', 'queued', 8, now()
             FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) AS t (id, n, u, c)",
        )
        .bind(&d_ids)
        .bind(&d_ntf)
        .bind(&d_user)
        .bind(&d_channel)
        .execute(&mut *tx)
        .await
        .context("seeding deliveries")?;
        tx.commit().await?;
        if let Some(queue) = queue {
            queue.enqueue(&jobs).await.context("enqueueing the backlog")?;
        }
        written += jobs.len() as u64;
        done += n as u64;
    }
    Ok(written)
}
